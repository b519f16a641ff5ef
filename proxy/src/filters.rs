//! Proxy-wasm filter chains in the request path: installing a config's chains on the filter
//! host, turning pingora's headers into the ABI's header lists and back, and running the
//! callouts filters make (`proxy_http_call`, `proxy_grpc_call`) against weir's clusters.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::{Error, ErrorType, Result};
use weir_filters::{
    Callout, CalloutResult, Callouts, Chain, FilterHost, GrpcCall, GrpcCallResponse, HttpCall,
    HttpCallResponse, Limits, Pairs, PluginConfig,
};
use weir_policies::model::UpstreamProtocol;
use weir_policies::snapshot::WasmFilter;
use weir_policies::Snapshot;

use crate::state::{Runtime, SharedRuntime};

/// Largest callout response body a filter gets.
const MAX_CALLOUT_BODY: usize = 4 << 20;
/// Callout timeout when the filter gives none.
const DEFAULT_CALLOUT_TIMEOUT: Duration = Duration::from_secs(5);

/// The filter host, started on first use (a config without filter chains never starts it).
pub struct Filters {
    threads: usize,
    callouts: Arc<ProxyCallouts>,
    host: OnceLock<Result<FilterHost, String>>,
}

impl Filters {
    pub fn new(threads: usize) -> Self {
        Self {
            threads: threads.max(1),
            callouts: Arc::new(ProxyCallouts::default()),
            host: OnceLock::new(),
        }
    }

    /// Callouts resolve clusters in `runtime` (set once the runtime exists).
    pub fn set_runtime(&self, runtime: SharedRuntime) {
        let _ = self.callouts.runtime.set(runtime);
    }

    /// The host, if it was started.
    pub fn started(&self) -> Option<&FilterHost> {
        self.host.get().and_then(|h| h.as_ref().ok())
    }

    fn host(&self) -> Result<&FilterHost, String> {
        self.host
            .get_or_init(|| {
                FilterHost::start(self.threads, self.callouts.clone()).map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Installs `snapshot`'s filter chains (same order), keeping chains of `previous` that did
    /// not change. Fails with the chain, plugin and reason when a module does not load or a
    /// filter rejects its config.
    pub fn install(
        &self,
        snapshot: &Snapshot,
        previous: Option<&Runtime>,
    ) -> Result<Vec<Arc<Chain>>, String> {
        if let Some(prev) = previous {
            if Arc::ptr_eq(&prev.snapshot.filter_chains, &snapshot.filter_chains) {
                return Ok(prev.filter_chains.clone());
            }
        }
        if snapshot.filter_chains.is_empty() {
            return Ok(Vec::new());
        }
        let host = self.host()?;
        snapshot
            .filter_chains
            .iter()
            .map(|c| {
                let plugins: Vec<PluginConfig> = c.filters.iter().map(plugin_config).collect();
                let reuse =
                    previous.and_then(|p| p.filter_chains.iter().find(|o| o.name() == c.name));
                host.install(&c.name, &plugins, reuse)
                    .map_err(|e| e.to_string())
            })
            .collect()
    }
}

fn plugin_config(f: &WasmFilter) -> PluginConfig {
    PluginConfig {
        name: f.name.clone(),
        root_id: f.root_id.clone(),
        vm_id: f.vm_id.clone(),
        module: f.module.clone(),
        sha256: f.sha256.clone(),
        vm_config: f.vm_config.clone(),
        plugin_config: f.config.clone(),
        fail_open: f.fail_open,
        limits: Limits {
            memory_bytes: f.memory_limit_bytes,
            callback_deadline: f.callback_deadline,
        },
    }
}

// ---- headers ----

/// Request headers as filters see them in Envoy: `:authority`, `:path`, `:method`, `:scheme`
/// first (the Host header becomes `:authority`), then the rest, names lowercase.
pub fn request_pairs(req: &RequestHeader) -> Pairs {
    let authority = req
        .uri
        .authority()
        .map(|a| a.as_str().as_bytes().to_vec())
        .or_else(|| {
            req.headers
                .get(http::header::HOST)
                .map(|v| v.as_bytes().to_vec())
        })
        .unwrap_or_default();
    let mut pairs: Pairs = Vec::with_capacity(req.headers.len() + 4);
    pairs.push((":authority".into(), authority));
    pairs.push((
        ":path".into(),
        req.uri
            .path_and_query()
            .map_or(b"/".to_vec(), |p| p.as_str().as_bytes().to_vec()),
    ));
    pairs.push((":method".into(), req.method.as_str().as_bytes().to_vec()));
    pairs.push((":scheme".into(), b"http".to_vec()));
    for (k, v) in &req.headers {
        if k != http::header::HOST {
            pairs.push((k.as_str().to_owned(), v.as_bytes().to_vec()));
        }
    }
    pairs
}

fn bad_header(what: &str) -> Box<Error> {
    Error::explain(
        ErrorType::InternalError,
        format!("filter set an invalid {what}"),
    )
}

/// Writes filters' request headers back: method, path, authority (as Host) and the rest.
pub fn apply_request_pairs(req: &mut RequestHeader, pairs: Pairs) -> Result<()> {
    let names: Vec<http::HeaderName> = req.headers.keys().cloned().collect();
    for name in names {
        req.remove_header(&name);
    }
    for (k, v) in pairs {
        match k.as_str() {
            ":method" => {
                let m = http::Method::from_bytes(&v).map_err(|_| bad_header(":method"))?;
                req.set_method(m);
            }
            ":path" => {
                let uri = http::Uri::try_from(v.as_slice()).map_err(|_| bad_header(":path"))?;
                req.set_uri(uri);
            }
            ":authority" => {
                let v = http::HeaderValue::from_bytes(&v).map_err(|_| bad_header(":authority"))?;
                req.insert_header(http::header::HOST, v)?;
            }
            name if name.starts_with(':') => {}
            _ => {
                let v = http::HeaderValue::from_bytes(&v).map_err(|_| bad_header(&k))?;
                req.append_header(k, v)?;
            }
        }
    }
    Ok(())
}

/// Response headers, `:status` first.
pub fn response_pairs(resp: &ResponseHeader) -> Pairs {
    let mut pairs: Pairs = Vec::with_capacity(resp.headers.len() + 1);
    pairs.push((":status".into(), resp.status.as_str().as_bytes().to_vec()));
    for (k, v) in &resp.headers {
        pairs.push((k.as_str().to_owned(), v.as_bytes().to_vec()));
    }
    pairs
}

pub fn apply_response_pairs(resp: &mut ResponseHeader, pairs: Pairs) -> Result<()> {
    let names: Vec<http::HeaderName> = resp.headers.keys().cloned().collect();
    for name in names {
        resp.remove_header(&name);
    }
    for (k, v) in pairs {
        if k == ":status" {
            let status = std::str::from_utf8(&v)
                .ok()
                .and_then(|s| s.parse::<u16>().ok())
                .ok_or_else(|| bad_header(":status"))?;
            resp.set_status(status)?;
        } else if !k.starts_with(':') {
            let v = http::HeaderValue::from_bytes(&v).map_err(|_| bad_header(&k))?;
            resp.append_header(k, v)?;
        }
    }
    Ok(())
}

pub fn map_pairs(map: &http::HeaderMap) -> Pairs {
    map.iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect()
}

pub fn apply_map_pairs(map: &mut http::HeaderMap, pairs: Pairs) -> Result<()> {
    map.clear();
    for (k, v) in pairs {
        let name = http::HeaderName::from_bytes(k.as_bytes()).map_err(|_| bad_header(&k))?;
        let v = http::HeaderValue::from_bytes(&v).map_err(|_| bad_header(&k))?;
        map.append(name, v);
    }
    Ok(())
}

// ---- callouts ----

type Body = Full<Bytes>;

/// Runs filters' callouts on weir's clusters, picking an endpoint with the cluster's balancer.
pub struct ProxyCallouts {
    runtime: OnceLock<SharedRuntime>,
    h1: Client<HttpConnector, Body>,
    h2: Client<HttpConnector, Body>,
}

impl Default for ProxyCallouts {
    fn default() -> Self {
        Self {
            runtime: OnceLock::new(),
            h1: Client::builder(TokioExecutor::new()).build_http(),
            h2: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build_http(),
        }
    }
}

impl ProxyCallouts {
    /// The client and endpoint address for a call to `cluster`.
    fn target(&self, cluster: &str) -> Option<(Client<HttpConnector, Body>, std::net::SocketAddr)> {
        let rt = self.runtime.get()?.load_full();
        let id = rt.snapshot.cluster_id(cluster)?;
        let (c, state) = (&rt.snapshot.clusters[id], &rt.clusters[id]);
        let ep = state.pick(&c.lb, None, &[])?;
        let client = match c.protocol {
            UpstreamProtocol::H2c => self.h2.clone(),
            _ => self.h1.clone(),
        };
        Some((client, state.endpoints[ep].address))
    }
}

async fn http_call(
    target: Option<(Client<HttpConnector, Body>, std::net::SocketAddr)>,
    call: HttpCall,
) -> Option<HttpCallResponse> {
    let (client, addr) = target?;
    let mut req = http::Request::builder();
    let mut path = "/".to_string();
    for (k, v) in &call.headers {
        match k.as_str() {
            ":method" => req = req.method(v.as_slice()),
            ":path" => path = String::from_utf8_lossy(v).into_owned(),
            ":authority" => req = req.header(http::header::HOST, v.as_slice()),
            name if name.starts_with(':') => {}
            _ => req = req.header(k.as_str(), v.as_slice()),
        }
    }
    let req = req
        .uri(format!("http://{addr}{path}"))
        .body(Full::new(Bytes::from(call.body)))
        .ok()?;
    let timeout = if call.timeout.is_zero() {
        DEFAULT_CALLOUT_TIMEOUT
    } else {
        call.timeout
    };
    let result = tokio::time::timeout(timeout, async {
        let resp = client.request(req).await.ok()?;
        let (parts, body) = resp.into_parts();
        let collected = Limited::new(body, MAX_CALLOUT_BODY).collect().await.ok()?;
        let trailers = collected.trailers().map(map_pairs).unwrap_or_default();
        let mut headers: Pairs =
            vec![(":status".into(), parts.status.as_str().as_bytes().to_vec())];
        headers.extend(map_pairs(&parts.headers));
        Some(HttpCallResponse {
            headers,
            body: collected.to_bytes().to_vec(),
            trailers,
        })
    })
    .await;
    result.ok().flatten()
}

fn grpc_failure(status: u32, message: &str) -> GrpcCallResponse {
    GrpcCallResponse {
        status,
        message: message.into(),
        ..Default::default()
    }
}

async fn grpc_call(
    target: Option<(Client<HttpConnector, Body>, std::net::SocketAddr)>,
    call: GrpcCall,
) -> GrpcCallResponse {
    const UNAVAILABLE: u32 = 14;
    const DEADLINE_EXCEEDED: u32 = 4;
    const INTERNAL: u32 = 13;
    let Some((client, addr)) = target else {
        return grpc_failure(UNAVAILABLE, "no endpoint for the callout's cluster");
    };
    let mut frame = Vec::with_capacity(5 + call.message.len());
    frame.push(0);
    frame.extend_from_slice(&(call.message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&call.message);
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/{}/{}", call.service, call.method))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in &call.metadata {
        if !k.starts_with(':') {
            req = req.header(k.as_str(), v.as_slice());
        }
    }
    let Ok(req) = req.body(Full::new(Bytes::from(frame))) else {
        return grpc_failure(INTERNAL, "invalid callout metadata");
    };
    let timeout = if call.timeout.is_zero() {
        DEFAULT_CALLOUT_TIMEOUT
    } else {
        call.timeout
    };
    let outcome = tokio::time::timeout(timeout, async {
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        let (parts, body) = resp.into_parts();
        let collected = Limited::new(body, MAX_CALLOUT_BODY)
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        let trailers = collected.trailers().cloned().unwrap_or_default();
        Ok::<_, String>((parts.headers, collected.to_bytes(), trailers))
    })
    .await;
    let (headers, mut body, trailers) = match outcome {
        Err(_) => return grpc_failure(DEADLINE_EXCEEDED, "callout timed out"),
        Ok(Err(e)) => return grpc_failure(UNAVAILABLE, &e),
        Ok(Ok(r)) => r,
    };
    // Trailers-only replies carry the status in the headers.
    let field = |name: &str| {
        trailers
            .get(name)
            .or_else(|| headers.get(name))
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let status = field("grpc-status")
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let message = field("grpc-message").unwrap_or_default();
    let reply = (body.len() >= 5).then(|| {
        body.advance(1);
        let len = body.get_u32() as usize;
        body.slice(..len.min(body.len())).to_vec()
    });
    GrpcCallResponse {
        status,
        message,
        initial_metadata: map_pairs(&headers),
        body: reply.filter(|_| status == 0),
        trailing_metadata: map_pairs(&trailers),
    }
}

impl Callouts for ProxyCallouts {
    fn has_cluster(&self, cluster: &str) -> bool {
        self.runtime
            .get()
            .is_some_and(|rt| rt.load().snapshot.cluster_id(cluster).is_some())
    }

    fn call(&self, call: Callout) -> Pin<Box<dyn Future<Output = CalloutResult> + Send>> {
        match call {
            Callout::Http(c) => {
                let target = self.target(&c.cluster);
                Box::pin(async move { CalloutResult::Http(http_call(target, c).await) })
            }
            Callout::Grpc(c) => {
                let target = self.target(&c.cluster);
                Box::pin(async move { CalloutResult::Grpc(grpc_call(target, c).await) })
            }
        }
    }
}
