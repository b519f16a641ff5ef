//! The pingora `ProxyHttp` phases. Each phase is a thin dispatcher: the decisions live in
//! `weir_policies::routing`, [`crate::lb`], [`crate::retry`], [`crate::outlier`] and
//! [`crate::reply`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::{HttpPeer, Tracer};
use pingora::{Error, ErrorSource, ErrorType, Result, RetryType};
use weir_policies::model::{InferenceProtocol, LbPolicy, UpstreamProtocol};
use weir_policies::routing::{self, RequestView};
use weir_policies::snapshot::{Cluster, Route};

use bytes::Bytes;
use weir_filters::{FilterStream, LocalResponse, StreamInfo, Verdict};

use crate::drain::{Drain, InFlight};
use crate::inference::load;
use crate::inference::model::{self as infer_model, Extract, Unreadable, MODEL_HEADER};
use crate::inference::picker::{Need, Pick};
use crate::inference::pool::{self, Lease, NoReplica, Origin};
use crate::inference::reload::Signal;
use crate::inference::usage::UsageScanner;
use crate::metrics::Metrics;
use crate::retry::{self, Failure};
use crate::state::{
    ClusterState, EndpointLoad, EndpointSeries, Gauge, OpenConnections, Runtime, SharedRuntime,
};
use crate::telemetry::Attrs;
use crate::{downstream, filters, grpc, reply};

/// Concurrent h2 streams weir opens on one upstream connection (pingora's default is 1).
const MAX_H2_STREAMS: usize = 128;

/// Pins a request to one version of its model's weights.
pub const MODEL_VERSION_HEADER: &str = "x-weir-model-version";
/// The version of the weights that produced a response, as model servers report it.
pub const WEIGHT_VERSION_HEADER: &str = "x-weight-version";

/// The retry policy of pool routes that set none: another replica, only before the first
/// response byte, when the chosen one refused the stream or was not ready for it.
static POOL_RETRY: std::sync::LazyLock<weir_policies::snapshot::RetryPolicy> =
    std::sync::LazyLock::new(|| weir_policies::snapshot::RetryPolicy {
        retries: 2,
        on: weir_policies::snapshot::RetryOn {
            connect_failure: true,
            reset: true,
            statuses: vec![503],
            grpc_statuses: vec![grpc::code::UNAVAILABLE],
            ..Default::default()
        },
        per_try_timeout: None,
    });

/// An inference request's state.
struct InferenceCtx {
    pool: usize,
    model: String,
    adapter: Option<String>,
    version: Option<String>,
    prefix: Option<u64>,
    /// The replica it holds (index into the pool's endpoints).
    endpoint: usize,
    lease: Lease,
    /// When the last response chunk went through (none yet: the first is the TTFT).
    last_chunk: Option<Instant>,
    first_chunk: Option<Instant>,
    chunks: u64,
    /// This stream's inter-token histogram and token counter, looked up at its first chunk.
    stream_metrics: Option<(prometheus::Histogram, prometheus::IntCounter)>,
    /// OpenAI-compatible pools: the `usage` the server reports in its response.
    usage: Option<UsageScanner>,
}

/// One listener's proxy logic.
pub struct WeirProxy {
    pub listener: String,
    /// Largest HTTP/1.1 request head taken, in bytes (the listener's
    /// `max_request_headers_kb`); pingora itself reads up to 1 MiB.
    pub max_request_headers: usize,
    /// The listener's `idle_timeout`, also the longest a response write may wait on a client
    /// that does not read.
    pub idle_timeout: Option<Duration>,
    /// The listener's filter chain (index into the snapshot's), for routes without their own.
    pub filter_chain: Option<usize>,
    pub runtime: SharedRuntime,
    pub metrics: Arc<Metrics>,
    pub drain: Arc<Drain>,
    pub access_log: Option<Arc<crate::access_log::AccessLog>>,
    pub tracer: Option<Arc<crate::telemetry::Tracer>>,
    /// The attributes of every server span of the listener ([`Attrs::listener`]).
    pub listener_attrs: Attrs,
    /// The sockmap fast path: outbound capture's original destinations.
    pub fast_path: Arc<crate::fast_path::FastPathState>,
}

/// Per-request state.
pub struct RequestCtx {
    start: Instant,
    /// The runtime this request started on; it keeps it to the end, across reloads.
    runtime: Option<Arc<Runtime>>,
    route: Option<usize>,
    cluster: Option<usize>,
    grpc: bool,
    deadline: Option<Instant>,
    /// Attempts started (1 after the first `upstream_peer`).
    tries: u32,
    /// Endpoints tried, in order; the last one is the current attempt's.
    tried: Vec<usize>,
    /// Set when `upstream_response_filter` turned a response into a retry.
    retry_next: bool,
    /// weir asked the replica for its load report (ORCA): the client does not get it.
    orca_asked: bool,
    /// weir answered the client's `Expect: 100-continue` (once per request, retries too).
    continue_sent: bool,
    _load: Option<EndpointLoad>,
    _cluster_slot: Option<Gauge>,
    retry_slot: Option<Gauge>,
    /// The request's pass through its proxy-wasm filter chain.
    filters: Option<FilterStream>,
    /// Filters have seen the end of the request (or the response) body.
    filters_request_done: bool,
    filters_response_done: bool,
    /// The request has a body (known when filters ran).
    request_has_body: bool,
    /// A reply a filter asked for in a phase where pingora must first unwind (sent by
    /// `fail_to_proxy`).
    local_reply: Option<LocalResponse>,
    /// Set on requests routed to an inference pool.
    inference: Option<InferenceCtx>,
    /// The request's trace, when tracing is on. Boxed: in place, the larger context was
    /// copied with every move of the request's futures, tracing or not (+259 instructions per
    /// request); the box is reused by the thread's next request ([`RequestTrace::recycle`]).
    ///
    /// [`RequestTrace::recycle`]: crate::telemetry::RequestTrace::recycle
    trace: Option<Box<crate::telemetry::RequestTrace>>,
    /// The gRPC status the upstream answered with (trailers, or the headers of a trailers-only
    /// reply).
    grpc_status: Option<u32>,
    _in_flight: InFlight,
}

impl RequestCtx {
    fn parts(&self) -> Option<(&Runtime, &Route, &Cluster, &ClusterState)> {
        let rt = self.runtime.as_deref()?;
        let route = &rt.snapshot.routes[self.route?];
        let id = self.cluster?;
        Some((rt, route, &rt.snapshot.clusters[id], &rt.clusters[id]))
    }

    /// Feeds the current attempt's result to outlier detection.
    fn record_result(&self, failed: bool) {
        if let (Some((_, _, cluster, state)), Some(ep)) = (self.parts(), self.tried.last()) {
            state.endpoints[*ep].record_result(state, cluster.outlier_detection.as_ref(), failed);
        }
    }
}

impl WeirProxy {
    /// The route `req` takes on this listener, recorded in its trace's server span.
    fn route(
        &self,
        rt: &Runtime,
        req: &RequestHeader,
        trace: Option<&mut crate::telemetry::RequestTrace>,
    ) -> Option<usize> {
        let authority = req.uri.authority().map(|a| a.as_str()).or_else(|| {
            req.headers
                .get(http::header::HOST)
                .and_then(|v| v.to_str().ok())
        });
        if let Some(t) = trace {
            t.routed(authority);
        }
        let view = RequestView {
            listener: &self.listener,
            authority,
            path: req.uri.path(),
            headers: &req.headers,
        };
        routing::select(&rt.snapshot, &view).map(|(id, _)| id)
    }

    /// Runs the request headers through `chain`. `None`: the request is answered (a filter
    /// replied or failed); `Some(changed)`: go on, `changed` when filters edited the headers.
    async fn request_headers_filters(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        chain: &Arc<weir_filters::Chain>,
        rt: &Runtime,
        route: Option<usize>,
    ) -> Result<Option<bool>> {
        let route = route.map(|id| &rt.snapshot.routes[id]);
        let downstream = session.as_downstream();
        let info = StreamInfo {
            source: downstream.client_addr().and_then(|a| a.as_inet()).copied(),
            destination: downstream.server_addr().and_then(|a| a.as_inet()).copied(),
            protocol: if downstream.is_http2() {
                "HTTP/2"
            } else {
                "HTTP/1.1"
            },
            route: route.map(|r| r.name.clone()).unwrap_or_default(),
            cluster: route
                .and_then(|r| r.action.clusters.first())
                .map(|(id, _)| rt.snapshot.clusters[*id].name.clone())
                .unwrap_or_default(),
            listener: self.listener.clone(),
            start: Some(std::time::SystemTime::now()),
        };
        let eos = session.as_downstream_mut().is_body_empty();
        ctx.filters_request_done = eos;
        ctx.request_has_body = !eos;
        let mut stream = chain.stream();
        let started = Instant::now();
        let verdict = stream
            .request_headers(info, filters::request_pairs(session.req_header()), eos)
            .await;
        self.filter_timed("request_headers", started);
        ctx.filters = Some(stream);
        match verdict {
            Verdict::Continue(None) => Ok(Some(false)),
            Verdict::Continue(Some(pairs)) => {
                filters::apply_request_pairs(session.req_header_mut(), pairs)?;
                Ok(Some(true))
            }
            Verdict::Respond(r) => {
                reply::send_local(session, ctx.grpc, &r).await?;
                Ok(None)
            }
            Verdict::Fail(why) => {
                tracing::warn!(listener = %self.listener, "request failed in a filter: {why}");
                reply::send(session, ctx.grpc, 500, "filter failed", &[]).await?;
                Ok(None)
            }
            Verdict::Close => Err(Error::explain(
                ErrorType::ConnectionClosed,
                "a filter closed the stream",
            )),
        }
    }

    /// Turns a non-continue verdict of a later phase into the error that ends the request
    /// (`fail_to_proxy` sends a filter's reply if nothing was written yet).
    fn filter_stop<T>(&self, ctx: &mut RequestCtx, verdict: Verdict<T>) -> Result<T> {
        match verdict {
            Verdict::Continue(v) => Ok(v),
            Verdict::Respond(r) => {
                let status = r.status;
                ctx.local_reply = Some(r);
                Err(Error::explain(
                    ErrorType::HTTPStatus(status),
                    "filter replied",
                ))
            }
            Verdict::Fail(why) => {
                tracing::warn!(listener = %self.listener, "request failed in a filter: {why}");
                Err(Error::explain(ErrorType::HTTPStatus(500), "filter failed"))
            }
            Verdict::Close => Err(Error::explain(
                ErrorType::ConnectionClosed,
                "a filter closed the stream",
            )),
        }
    }

    /// Whether the route's policy retries `failure` now, and if so takes a retry slot.
    fn may_retry(&self, session: &Session, ctx: &mut RequestCtx, failure: Failure) -> bool {
        let (Some(rt), Some(route_id), Some(cluster_id)) =
            (ctx.runtime.clone(), ctx.route, ctx.cluster)
        else {
            return false;
        };
        let (route, cluster, state) = (
            &rt.snapshot.routes[route_id],
            &rt.snapshot.clusters[cluster_id],
            &rt.clusters[cluster_id],
        );
        let Some(policy) = route
            .action
            .retry
            .as_ref()
            .or(route.action.pool.map(|_| &*POOL_RETRY))
        else {
            return false;
        };
        let allowed = ctx.tries <= policy.retries
            && retry::retries(policy, failure)
            // Safe only before anything reached the client, with the body still replayable.
            && session.as_downstream().response_written().is_none()
            && !session.as_downstream().retry_buffer_truncated()
            && ctx.deadline.is_none_or(|d| Instant::now() < d);
        if !allowed {
            return false;
        }
        if ctx.retry_slot.is_none() {
            match Gauge::try_acquire(&state.active_retries, cluster.circuit_breaker.max_retries) {
                Some(slot) => ctx.retry_slot = Some(slot),
                None => return false,
            }
        }
        self.metrics
            .retries
            .with_label_values(&[cluster.name.as_str()])
            .inc();
        true
    }

    /// Reads which model the request asks for, waits for a replica of the pool that can take
    /// it, and holds it in `ctx`. `Ok(true)`: answered here (the pool's model list, no such
    /// model, shed...). A request that names no model goes to any replica.
    async fn pick_replica(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        pool_id: usize,
    ) -> Result<bool> {
        let rt = ctx.runtime.clone().expect("routed before picking");
        let (cfg, pool) = (&rt.snapshot.pools[pool_id], &rt.pools[pool_id]);
        if cfg.protocol == InferenceProtocol::Openai
            && session.req_header().method == http::Method::GET
        {
            if let Some((status, body)) = openai_models(pool, session.req_header().uri.path()) {
                let local = LocalResponse {
                    status,
                    headers: vec![("content-type".to_string(), b"application/json".to_vec())],
                    body: body.to_string().into_bytes(),
                    grpc_status: None,
                    details: String::new(),
                };
                reply::send_local(session, false, &local).await?;
                return Ok(true);
            }
        }
        let header = |session: &Session, name: &str| {
            session
                .req_header()
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .map(str::to_string)
        };
        let version = header(session, MODEL_VERSION_HEADER);
        let read = match header(session, MODEL_HEADER).filter(|_| cfg.model_header) {
            Some(m) => Ok((Some(m), None)),
            None => self.read_model(session, ctx, cfg).await?,
        };
        let reply = |status: u16, code: u32, kind: &'static str, message: String| {
            (status, code, kind, message)
        };
        let (named, prefix, refused) = match read {
            Ok((named, prefix)) => (named, prefix, None),
            Err(why) => (None, None, Some(unreadable(why, ctx.grpc, cfg.max_body))),
        };
        let failed = match named.as_deref().map(|n| (n, pool.resolve(n))) {
            // Server-wide calls (`ServerReady`, `GET /v1/models`) name no model: any replica
            // answers them, picked by the cluster's balancer. A model weir cannot read is
            // refused: a replica picked without it may not serve it.
            None => refused,
            Some((n, None)) => Some(reply(
                404,
                grpc::code::NOT_FOUND,
                "model_not_found",
                format!("pool {:?} serves no model {n:?}", cfg.name),
            )),
            Some((_, Some((model, adapter)))) => {
                let version = version.or_else(|| {
                    cfg.version_split
                        .get(&model)
                        .and_then(|split| pool.split_version(&model, split))
                });
                let need = Need {
                    model: &model,
                    version: version.as_deref(),
                    adapter: adapter.as_deref(),
                    prefix,
                };
                let wait = pool::acquire(pool, cfg, &need, ctx.deadline);
                let Some(acquired) = unless_client_leaves(session.as_downstream_mut(), wait).await
                else {
                    pool.counters
                        .abandoned
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return Err(Error::explain(
                        ErrorType::ConnectionClosed,
                        "the client left while its request waited for a replica",
                    )
                    .into_down());
                };
                match acquired {
                    Ok((endpoint, lease)) => {
                        ctx.inference = Some(InferenceCtx {
                            pool: pool_id,
                            model: model.clone(),
                            adapter,
                            version,
                            prefix,
                            endpoint,
                            lease,
                            last_chunk: None,
                            first_chunk: None,
                            chunks: 0,
                            stream_metrics: None,
                            usage: (cfg.protocol == InferenceProtocol::Openai)
                                .then(UsageScanner::default),
                        });
                        None
                    }
                    Err(NoReplica::UnknownModel) => Some(reply(
                        404,
                        grpc::code::NOT_FOUND,
                        "model_not_found",
                        format!(
                            "no replica in pool {:?} serves model {model:?}{}{}",
                            cfg.name,
                            version
                                .as_deref()
                                .map(|v| format!(" version {v}"))
                                .unwrap_or_default(),
                            need.adapter
                                .map(|a| format!(" with adapter {a}"))
                                .unwrap_or_default()
                        ),
                    )),
                    Err(NoReplica::Shed) => Some(reply(
                        429,
                        grpc::code::RESOURCE_EXHAUSTED,
                        "rate_limit_exceeded",
                        format!("every replica of {model:?} is busy and the queue is full"),
                    )),
                    Err(NoReplica::DeadlineExceeded) => Some(reply(
                        504,
                        grpc::code::DEADLINE_EXCEEDED,
                        "timeout",
                        format!(
                            "the request's deadline passed while it waited for a replica of {model:?}"
                        ),
                    )),
                    Err(NoReplica::Reloading) => Some(reply(
                        503,
                        grpc::code::UNAVAILABLE,
                        "model_reloading",
                        format!("every replica of {model:?} is still reloading its weights"),
                    )),
                }
            }
        };
        let Some((status, code, kind, message)) = failed else {
            // On to the replica (if the body was not read here already).
            self.continue_if_expected(session, ctx).await?;
            return Ok(false);
        };
        if !session.as_downstream_mut().is_body_done() {
            session.set_keepalive(None);
        }
        let local = if ctx.grpc {
            LocalResponse {
                status,
                headers: Vec::new(),
                body: message.into_bytes(),
                grpc_status: Some(code),
                details: String::new(),
            }
        } else {
            let body =
                serde_json::json!({"error": {"message": message, "type": kind, "code": status}});
            let mut headers = vec![("content-type".to_string(), b"application/json".to_vec())];
            if status == 429 {
                headers.push(("retry-after".to_string(), b"1".to_vec()));
            }
            LocalResponse {
                status,
                headers,
                body: body.to_string().into_bytes(),
                grpc_status: None,
                details: String::new(),
            }
        };
        reply::send_local(session, ctx.grpc, &local).await?;
        Ok(true)
    }

    /// Answers an HTTP/1.1 client's `Expect: 100-continue` once the request is accepted and
    /// its body is wanted (as Envoy does by default; the upstream request goes without the
    /// header). Left to the upstream, the 100 waited for the body, and the client waited for
    /// the 100 (curl: a second) before sending it. A request refused before this point (no
    /// route, a body over `max_body`) gets its answer without the client sending the body.
    async fn continue_if_expected(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let downstream = session.as_downstream_mut();
        let req = downstream.req_header();
        // Not to HTTP/1.0 clients (RFC 9110 10.1.1); h2 is left as it was.
        let expects = !downstream.is_http2()
            && req.version == http::Version::HTTP_11
            && req
                .headers
                .get(http::header::EXPECT)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if expects && !ctx.continue_sent && !downstream.is_body_empty() {
            downstream.write_continue_response().await?;
            ctx.continue_sent = true;
        }
        Ok(())
    }

    /// Reads what of the body names the model: a gRPC call's first message, or a JSON body
    /// whole (for its prompt's prefix hash too), at most the pool's `max_body`. What is read
    /// stays in pingora's retry buffer, which replays it upstream; the rest of a gRPC stream
    /// is not held back. `Err` of the outer result: the client's body failed; of the inner
    /// one: the request names a model weir cannot read, and is refused.
    async fn read_model(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        cfg: &weir_policies::snapshot::InferencePool,
    ) -> Result<std::result::Result<(Option<String>, Option<u64>), Unreadable>> {
        let grpc = ctx.grpc;
        let req = session.req_header();
        let text = |name: &str| req.headers.get(name).and_then(|v| v.to_str().ok());
        let encoding = text("grpc-encoding").map(str::to_string);
        if grpc && !infer_model::names_a_model(req.uri.path()) {
            return Ok(Ok((None, None)));
        }
        if !grpc {
            // Only a JSON body is read: a form upload (`/v1/audio/transcriptions`) or another
            // body names no model weir knows how to find.
            let json = text("content-type")
                .and_then(|t| t.split(';').next())
                .is_none_or(|t| {
                    let t = t.trim().to_ascii_lowercase();
                    t == "application/json" || t.ends_with("+json")
                });
            if !json {
                return Ok(Ok((None, None)));
            }
            if let Some(coding) =
                text("content-encoding").filter(|c| !c.eq_ignore_ascii_case("identity"))
            {
                return Ok(Err(Unreadable::Encoded(coding.to_string())));
            }
            let declared = text("content-length").and_then(|n| n.parse::<u64>().ok());
            if declared.is_some_and(|n| n > cfg.max_body as u64) {
                return Ok(Err(Unreadable::TooLarge));
            }
        }
        self.continue_if_expected(session, ctx).await?;
        let downstream = session.as_downstream_mut();
        // One read is at most 64 KiB: room for the last read past `max_body`.
        downstream.enable_retry_buffering_up_to(cfg.max_body + (128 << 10));
        let mut done = downstream.is_body_empty();
        let mut buf = bytes::BytesMut::new();
        loop {
            if grpc {
                match infer_model::from_grpc(&buf, encoding.as_deref(), cfg.max_body, done) {
                    Extract::Found(m) => {
                        let prefix = infer_model::grpc_prompt_prefix(
                            buf.freeze(),
                            encoding.as_deref(),
                            cfg.picker.prefix_bytes as usize,
                        );
                        return Ok(Ok((Some(m), prefix)));
                    }
                    Extract::Absent | Extract::Unnamed => return Ok(Ok((None, None))),
                    Extract::Unreadable(why) => return Ok(Err(why)),
                    Extract::NeedMore => {}
                }
            } else if buf.len() > cfg.max_body {
                return Ok(Err(Unreadable::TooLarge));
            } else if done {
                // The whole body, parsed once.
                return Ok(
                    match infer_model::from_json(&buf, cfg.picker.prefix_bytes as usize) {
                        (Extract::Found(m), prefix) => Ok((Some(m), prefix)),
                        // The server will serve its default model: in a pool of one model,
                        // that one, with its queue and limits.
                        (Extract::Unnamed, prefix) => {
                            Ok((cfg.only_model().map(str::to_string), prefix))
                        }
                        (Extract::Unreadable(why), _) => Err(why),
                        _ => Ok((None, None)),
                    },
                );
            }
            match session.as_downstream_mut().read_request_body().await? {
                Some(chunk) => buf.extend_from_slice(&chunk),
                None => done = true,
            }
            done |= session.as_downstream_mut().is_body_done();
        }
    }

    /// Learns from a replica's response headers: the weights version it served
    /// (`x-weight-version`) and its load (ORCA `endpoint-load-metrics`).
    fn observe_replica(&self, ctx: &RequestCtx, resp: &ResponseHeader) {
        let (Some(inf), Some(rt)) = (ctx.inference.as_ref(), ctx.runtime.as_ref()) else {
            return;
        };
        if let Some(sample) = load::orca_sample(&resp.headers) {
            inf.lease.endpoint.report(&sample);
        }
        let version = resp
            .headers
            .get(WEIGHT_VERSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty());
        if let Some(version) = version {
            if inf.lease.endpoint.version(&inf.model).as_deref() != Some(version) {
                let _ = rt.pools[inf.pool].signal(
                    inf.endpoint,
                    &inf.model,
                    Signal::Observed {
                        version: version.to_string(),
                    },
                    Origin::Explicit,
                );
            }
        }
    }

    fn count_failure(&self, ctx: &RequestCtx, kind: &str) {
        if let Some((_, _, cluster, _)) = ctx.parts() {
            self.metrics
                .upstream_failures
                .with_label_values(&[cluster.name.as_str(), kind])
                .inc();
        }
    }
}

/// OpenAI's model list (`GET /v1/models`) and model (`GET /v1/models/{id}`) for a pool: the
/// pool's models and adapters, not the one replica's a forwarded request would list. `None`
/// for other paths.
fn openai_models(pool: &pool::PoolState, path: &str) -> Option<(u16, serde_json::Value)> {
    // The list, or one model (`None`: another path, answered by a replica).
    let one = match path.strip_prefix("/v1/models/") {
        _ if path.trim_end_matches('/') == "/v1/models" => None,
        Some(id) => Some(id),
        None => return None,
    };
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let model = |id: &str, parent: Option<&str>| {
        serde_json::json!({
            "id": id, "object": "model", "created": created, "owned_by": "weir",
            "root": parent.unwrap_or(id), "parent": parent,
        })
    };
    let models = pool.models();
    let Some(id) = one else {
        let data: Vec<_> = models
            .iter()
            .map(|(id, parent)| model(id, parent.as_deref()))
            .collect();
        return Some((200, serde_json::json!({"object": "list", "data": data})));
    };
    Some(match models.iter().find(|(m, _)| m == id) {
        Some((id, parent)) => (200, model(id, parent.as_deref())),
        None => (
            404,
            serde_json::json!({"error": {
                "message": format!("the model {id:?} does not exist"),
                "type": "invalid_request_error", "param": "model", "code": "model_not_found",
            }}),
        ),
    })
}

/// The answer to a request whose model cannot be read: status, gRPC code, OpenAI error type
/// and message.
fn unreadable(why: Unreadable, on_grpc: bool, max_body: usize) -> (u16, u32, &'static str, String) {
    let what = if on_grpc {
        "the first gRPC message"
    } else {
        "the request body"
    };
    match why {
        Unreadable::TooLarge => (
            413,
            grpc::code::RESOURCE_EXHAUSTED,
            "invalid_request_error",
            format!(
                "{what} is larger than the pool's max_body ({max_body} bytes), the most weir \
                 reads to find the model: raise max_body, or name the model in the \
                 {MODEL_HEADER} header"
            ),
        ),
        Unreadable::Encoded(coding) => (
            415,
            grpc::code::UNIMPLEMENTED,
            "invalid_request_error",
            format!(
                "weir cannot read the model from {what} encoded with {coding:?}: send it {}, \
                 or name the model in the {MODEL_HEADER} header",
                if on_grpc {
                    "uncompressed, gzip or deflate"
                } else {
                    "uncompressed"
                }
            ),
        ),
        Unreadable::Malformed(e) => (
            400,
            grpc::code::INVALID_ARGUMENT,
            "invalid_request_error",
            format!("weir cannot read the model from {what}: {e}"),
        ),
    }
}

fn failure_kind(e: &Error) -> Failure {
    match e.etype() {
        ErrorType::ReadTimedout | ErrorType::WriteTimedout => Failure::Timeout,
        ErrorType::HTTPStatus(s) => Failure::Status(*s),
        _ => Failure::Reset,
    }
}

#[async_trait]
impl ProxyHttp for WeirProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            start: Instant::now(),
            runtime: None,
            route: None,
            cluster: None,
            grpc: false,
            deadline: None,
            tries: 0,
            tried: Vec::new(),
            retry_next: false,
            orca_asked: false,
            continue_sent: false,
            _load: None,
            _cluster_slot: None,
            retry_slot: None,
            filters: None,
            filters_request_done: false,
            filters_response_done: false,
            request_has_body: false,
            local_reply: None,
            inference: None,
            trace: None,
            grpc_status: None,
            _in_flight: self.drain.track(),
        }
    }

    async fn early_request_filter(
        &self,
        session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> Result<()> {
        // HTTP/1.1 clients may pipeline: requests sent before the responses to earlier ones
        // are served in order on the connection (RFC 9112 9.3.2), as Envoy and HAProxy do.
        // Without this pingora answered the first and closed, dropping the rest.
        session.as_downstream_mut().set_pipelining_enabled(true);
        // A client that stops reading would otherwise hold this request, and its upstream
        // connection, for as long as it stays connected.
        if self.idle_timeout.is_some() {
            session
                .as_downstream_mut()
                .set_write_timeout(self.idle_timeout);
        }
        let Some(h1) = session.as_downstream().as_http1() else {
            // h2c: the h2 crate bounds the header list itself.
            return Ok(());
        };
        let head = h1.get_headers_raw_bytes();
        if head.len() > self.max_request_headers {
            return Err(reply::error(431, "request headers too large"));
        }
        downstream::check_h1_request(session.req_header_mut(), &head)
            .map_err(|(status, why)| reply::error(status, why))
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        ctx.trace = self
            .tracer
            .as_ref()
            .map(|t| t.start(session.req_header(), ctx.start));
        let rt = self.runtime.load_full();
        ctx.grpc = routing::is_grpc(&session.req_header().headers);
        let mut selected = self.route(&rt, session.req_header(), ctx.trace.as_deref_mut());
        let chain = selected
            .and_then(|id| rt.snapshot.routes[id].filter_chain)
            .or(self.filter_chain)
            .and_then(|i| rt.filter_chains.get(i));
        if let Some(chain) = chain {
            match self
                .request_headers_filters(session, ctx, chain, &rt, selected)
                .await?
            {
                None => return Ok(true),
                // Like Envoy, a filter's header change clears the route choice.
                Some(true) => {
                    selected = self.route(&rt, session.req_header(), ctx.trace.as_deref_mut())
                }
                Some(false) => {}
            }
        }
        let req = session.req_header();
        let Some((route_id, route)) = selected.map(|id| (id, &rt.snapshot.routes[id])) else {
            reply::send(session, ctx.grpc, 404, "no route", &[]).await?;
            return Ok(true);
        };
        let cluster_id = routing::pick_cluster(&route.action, fastrand::u64(..));
        let limit = rt.snapshot.clusters[cluster_id]
            .circuit_breaker
            .max_requests;
        let mut timeout = route.action.timeout;
        if ctx.grpc {
            let client = req
                .headers
                .get("grpc-timeout")
                .and_then(|v| v.to_str().ok())
                .and_then(grpc::parse_timeout);
            timeout = match (timeout, client) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        ctx.deadline = timeout.map(|t| ctx.start + t);
        ctx.route = Some(route_id);
        ctx.cluster = Some(cluster_id);
        let pool = route.action.pool;
        let slot = Gauge::try_acquire(&rt.clusters[cluster_id].active_requests, limit);
        ctx.runtime = Some(rt);
        match slot {
            Some(slot) => ctx._cluster_slot = Some(slot),
            None => {
                self.count_failure(ctx, "overflow");
                reply::send(
                    session,
                    ctx.grpc,
                    503,
                    "upstream overloaded",
                    &[("x-weir-overloaded", "true")],
                )
                .await?;
                return Ok(true);
            }
        }
        if let Some(pool) = pool {
            return self.pick_replica(session, ctx, pool).await;
        }
        self.continue_if_expected(session, ctx).await?;
        Ok(false)
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if ctx.filters_request_done {
            return Ok(());
        }
        let Some(stream) = ctx.filters.as_mut() else {
            return Ok(());
        };
        if body.as_ref().is_none_or(|b| b.is_empty()) && !end_of_stream {
            return Ok(());
        }
        ctx.filters_request_done = end_of_stream;
        let chunk = body.take().map(Vec::from).unwrap_or_default();
        let started = Instant::now();
        let verdict = stream.request_body(chunk, end_of_stream).await;
        self.filter_timed("request_body", started);
        let out = self.filter_stop(ctx, verdict)?;
        // `None` would tell pingora the body ended; held data is an empty chunk instead.
        *body = Some(out.map(Bytes::from).unwrap_or_default());
        Ok(())
    }

    async fn request_trailer_filter(
        &self,
        _session: &mut Session,
        trailers: &mut http::HeaderMap,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        self.trailers_through_filters(Dir::Request, trailers, ctx)
            .await
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let now = Instant::now();
        if ctx.deadline.is_some_and(|d| now >= d) {
            return Err(reply::error(504, "route timeout"));
        }
        let rt = ctx
            .runtime
            .clone()
            .ok_or_else(|| reply::error(500, "request not routed"))?;
        let (Some(route_id), Some(cluster_id)) = (ctx.route, ctx.cluster) else {
            return Err(reply::error(500, "request not routed"));
        };
        let (route, cluster, state) = (
            &rt.snapshot.routes[route_id],
            &rt.snapshot.clusters[cluster_id],
            &rt.clusters[cluster_id],
        );
        let hash_key = match &cluster.lb {
            LbPolicy::RingHash { ring_hash } => {
                session.req_header().headers.get(ring_hash.header.as_str())
            }
            _ => None,
        };
        let ep = if cluster.original_dst {
            None
        } else if let Some(inf) = ctx.inference.as_mut() {
            if ctx.tries > 0 {
                // A retry: another replica, picked now (no waiting).
                let pool = &rt.pools[inf.pool];
                let need = Need {
                    model: &inf.model,
                    version: inf.version.as_deref(),
                    adapter: inf.adapter.as_deref(),
                    prefix: inf.prefix,
                };
                match pool.pick(&need, &ctx.tried) {
                    Pick::Replica(i) => {
                        inf.lease = Lease::new(pool, i);
                        inf.endpoint = i;
                    }
                    _ => return Err(reply::error(503, "no other replica for a retry")),
                }
            }
            Some(inf.endpoint)
        } else {
            let Some(ep) = state.pick(&cluster.lb, hash_key.map(|v| v.as_bytes()), &ctx.tried)
            else {
                return Err(reply::error(503, "no healthy upstream"));
            };
            ctx._load = Some(EndpointLoad::new(&state.endpoints[ep]));
            Some(ep)
        };
        let address = match ep {
            Some(ep) => state.endpoints[ep].address,
            // Where the downstream connection was going before outbound capture sent it here.
            None => session
                .client_addr()
                .and_then(|a| a.as_inet())
                .and_then(|peer| self.fast_path.original_destination(*peer))
                .ok_or_else(|| {
                    reply::error(
                        503,
                        "original_dst cluster: this connection has no original destination (not captured by fast_path.outbound)",
                    )
                })?,
        };
        let mut peer = HttpPeer::new(address, false, String::new());
        if let Some(ep) = ep {
            peer.options.tracer = Some(Tracer(Box::new(OpenConnections(
                state.endpoints[ep].clone(),
            ))));
        }
        peer.options.connection_timeout = Some(cluster.connect_timeout);
        let per_try = route.action.retry.as_ref().and_then(|r| r.per_try_timeout);
        let left = ctx.deadline.map(|d| d.saturating_duration_since(now));
        peer.options.read_timeout = match (per_try, left) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if cluster.protocol == UpstreamProtocol::H2c {
            peer.options.set_http_version(2, 2);
            peer.options.max_h2_streams = MAX_H2_STREAMS;
        }
        if let (Some(tracer), Some(trace)) = (&self.tracer, ctx.trace.as_mut()) {
            if let Some(attributes) = tracer.attempt(trace, Some(address), now) {
                let endpoint = || Attrs::endpoint(address, &cluster.name);
                match ep {
                    Some(ep) => {
                        attributes.extend(state.endpoints[ep].trace_attrs.get_or_init(endpoint))
                    }
                    None => attributes.extend(&endpoint()),
                };
                if ctx.tries > 0 {
                    attributes.int("http.request.resend_count", i64::from(ctx.tries));
                }
            }
        }
        // An original destination is no endpoint of the cluster's: nothing to exclude on a
        // retry, no endpoint state to feed.
        ctx.tried.extend(ep);
        ctx.tries += 1;
        Ok(Box::new(peer))
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        _peer: &HttpPeer,
        _fd: std::os::unix::io::RawFd,
        _digest: Option<&pingora::protocols::Digest>,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let (Some(rt), Some(cluster), Some(&ep)) =
            (ctx.runtime.as_deref(), ctx.cluster, ctx.tried.last())
        {
            let e = &rt.clusters[cluster].endpoints[ep];
            let counter = if reused {
                &e.connections_reused
            } else {
                &e.connections_opened
            };
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let (Some(tracer), Some(trace)) = (&self.tracer, ctx.trace.as_ref()) {
            tracer.inject(trace, upstream);
        }
        // An HTTP/1.x client's expectation is weir's to meet: answered already (see
        // `continue_if_expected`), or to be ignored (an HTTP/1.0 request, a request without a
        // body); left to the upstream, its 100 would reach an HTTP/1.0 client.
        if !session.as_downstream().is_http2() {
            upstream.remove_header(&http::header::EXPECT);
        }
        // vLLM and Triton report their load (ORCA) only when asked; a client that did not ask
        // does not get the report.
        let asks = ctx
            .inference
            .as_ref()
            .zip(ctx.runtime.as_deref())
            .is_some_and(|(i, rt)| rt.snapshot.pools[i.pool].load_reports);
        if asks && !upstream.headers.contains_key(load::ORCA_FORMAT_HEADER) {
            upstream.insert_header(load::ORCA_FORMAT_HEADER, "TEXT")?;
            ctx.orca_asked = true;
        }
        let Some((_, route, cluster, _)) = ctx.parts() else {
            self.trace_upstream_request(ctx, upstream);
            return Ok(());
        };
        let h1_upstream = cluster.protocol != UpstreamProtocol::H2c;
        let original = session
            .req_header()
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str());
        if let Some(path) = routing::rewrite_path(route, original) {
            // Only the path changes: an HTTP/2 request's scheme and authority (it has no Host
            // header) stay, or an h2 upstream would get a request with no authority.
            let bad = |e: Box<dyn std::error::Error + Send + Sync>| {
                Error::because(ErrorType::InternalError, "rewritten path is not valid", e)
            };
            let mut parts = upstream.uri.clone().into_parts();
            parts.path_and_query = Some(path.parse().map_err(|e| bad(Box::new(e)))?);
            let uri = http::Uri::from_parts(parts).map_err(|e| bad(Box::new(e)))?;
            upstream.set_uri(uri);
        }
        // TE is hop-by-hop (pingora strips it), but its `trailers` says what weir can take
        // now: an upstream's trailers are forwarded (HTTP/1.1 and h2), so a client that takes
        // them has the upstream asked to send them (as gRPC servers expect).
        let takes_trailers = session
            .req_header()
            .headers
            .get_all(http::header::TE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| {
                t.split(';')
                    .next()
                    .is_some_and(|c| c.trim().eq_ignore_ascii_case("trailers"))
            });
        if takes_trailers {
            upstream.insert_header(http::header::TE, "trailers")?;
        }
        // `Trailer` (the fields a body ends with) is not hop-by-hop, though pingora strips it
        // with those that are: the request's trailers go on to the upstream, so does it.
        let declared = session.req_header().headers.get_all(http::header::TRAILER);
        if declared.iter().next().is_some() && !upstream.headers.contains_key(http::header::TRAILER)
        {
            for v in declared {
                upstream.append_header(http::header::TRAILER, v.clone())?;
            }
        }
        let mutation = &route.action.request_headers;
        for name in &mutation.remove {
            upstream.remove_header(name.as_str());
        }
        for (k, v) in &mutation.set {
            upstream.insert_header(k.clone(), v.as_str())?;
        }
        // A filter that rewrites the body drops Content-Length; HTTP/1.1 upstreams then need
        // chunked framing, or they would read no body at all.
        if ctx.filters.is_some()
            && h1_upstream
            && ctx.request_has_body
            && upstream.headers.get(http::header::CONTENT_LENGTH).is_none()
            && upstream
                .headers
                .get(http::header::TRANSFER_ENCODING)
                .is_none()
        {
            upstream.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
        }
        self.trace_upstream_request(ctx, upstream);
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // An HTTP/1.1 upstream's body in a transfer coding other than `chunked` (`gzip`, or
        // `gzip, chunked`): pingora would frame it anew, and an h2 client would get the coded
        // bytes as the content itself. 502, as nginx answers it.
        if resp.headers.contains_key(http::header::TRANSFER_ENCODING)
            && !downstream::chunked_alone(&resp.headers)
        {
            return Err(Error::explain(
                ErrorType::InvalidHTTPHeader,
                "upstream response in a transfer coding other than chunked",
            )
            .into_up());
        }
        let status = resp.status.as_u16();
        if let (Some(tracer), Some(trace)) = (&self.tracer, ctx.trace.as_mut()) {
            tracer.attempt_status(trace, status);
        }
        self.observe_replica(ctx, resp);
        if ctx.orca_asked {
            resp.remove_header(load::ORCA_HEADER);
        }
        ctx.record_result(status >= 500);
        if status >= 500 {
            self.count_failure(ctx, "status");
        }
        let grpc_status = resp
            .headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok())
            .filter(|s| *s != 0);
        ctx.grpc_status = grpc_status;
        let retry = self.may_retry(session, ctx, Failure::Status(status))
            || grpc_status.is_some_and(|g| self.may_retry(session, ctx, Failure::Grpc(g)));
        if retry {
            ctx.retry_next = true;
            return Err(Error::explain(
                ErrorType::HTTPStatus(status),
                "retriable response",
            ));
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some((_, route, _, _)) = ctx.parts() {
            let mutation = &route.action.response_headers;
            for name in &mutation.remove {
                resp.remove_header(name.as_str());
            }
            for (k, v) in &mutation.set {
                resp.insert_header(k.clone(), v.as_str())?;
            }
        }
        // Interim responses (100 Continue) are not the response filters see, as in Envoy.
        if resp.status.is_informational() {
            return Ok(());
        }
        let Some(stream) = ctx.filters.as_mut() else {
            return Ok(());
        };
        let no_body = matches!(resp.status.as_u16(), 204 | 304)
            || session.req_header().method == http::Method::HEAD
            || resp
                .headers
                .get(http::header::CONTENT_LENGTH)
                .is_some_and(|v| v.as_bytes() == b"0");
        ctx.filters_response_done = no_body;
        let started = Instant::now();
        let verdict = stream
            .response_headers(filters::response_pairs(resp), no_body)
            .await;
        self.filter_timed("response_headers", started);
        if let Some(pairs) = self.filter_stop(ctx, verdict)? {
            filters::apply_response_pairs(resp, pairs)?;
            // A body filter that drops Content-Length needs chunked framing on HTTP/1.1.
            if !no_body
                && !session.as_downstream().is_http2()
                && resp.headers.get(http::header::CONTENT_LENGTH).is_none()
                && resp.headers.get(http::header::TRANSFER_ENCODING).is_none()
            {
                resp.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
            }
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<std::time::Duration>> {
        if ctx.inference.as_ref().is_some_and(|i| i.lease.is_cut()) {
            return Err(Error::explain(
                ErrorType::HTTPStatus(503),
                "the replica's drain deadline ended the stream",
            ));
        }
        if let Some(b) = body.as_ref().filter(|b| !b.is_empty()) {
            if let Some(usage) = ctx.inference.as_mut().and_then(|i| i.usage.as_mut()) {
                usage.feed(b);
            }
            self.observe_token(ctx);
        }
        if ctx.filters_response_done || ctx.filters.is_none() {
            return Ok(None);
        }
        if body.as_ref().is_none_or(|b| b.is_empty()) && !end_of_stream {
            return Ok(None);
        }
        ctx.filters_response_done = end_of_stream;
        let chunk = body.take().map(Vec::from).unwrap_or_default();
        let stream = ctx.filters.as_mut().expect("checked above");
        // pingora calls this phase synchronously: wait for the filter thread in place.
        let started = Instant::now();
        let verdict = stream.response_body_blocking(chunk, end_of_stream);
        self.filter_timed("response_body", started);
        let out = self.filter_stop(ctx, verdict)?;
        *body = out.filter(|b| !b.is_empty()).map(Bytes::from);
        Ok(None)
    }

    async fn response_trailer_filter(
        &self,
        _session: &mut Session,
        trailers: &mut http::HeaderMap,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Bytes>> {
        if let Some(s) = trailers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok())
        {
            ctx.grpc_status = Some(s);
        }
        // gRPC servers send their per-call load report (ORCA) in the trailers.
        if let Some(inf) = ctx.inference.as_ref() {
            if let Some(sample) = load::orca_sample(trailers) {
                inf.lease.endpoint.report(&sample);
            }
        }
        self.trailers_through_filters(Dir::Response, trailers, ctx)
            .await?;
        Ok(None)
    }

    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        ctx.record_result(true);
        self.count_failure(ctx, "connect");
        let retry = self.may_retry(session, ctx, Failure::Connect);
        e.set_retry(retry);
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        if std::mem::take(&mut ctx.retry_next) {
            e.set_retry(true);
            return e;
        }
        if *e.esource() != ErrorSource::Upstream {
            e.set_retry(false);
            return e;
        }
        // A pooled connection the upstream had already closed: the request never reached it,
        // so trying again is safe whatever the policy (pingora's own rule).
        let safe = session.as_downstream().response_written().is_none()
            && !session.as_downstream().retry_buffer_truncated();
        if client_reused && matches!(e.retry, RetryType::ReusedOnly) && safe {
            e.set_retry(true);
            return e;
        }
        let failure = failure_kind(&e);
        ctx.record_result(true);
        self.count_failure(
            ctx,
            if failure == Failure::Timeout {
                "timeout"
            } else {
                "reset"
            },
        );
        let retry = self.may_retry(session, ctx, failure);
        e.set_retry(retry);
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let code = reply::status_for_error(e.etype(), e.esource());
        let written = session.as_downstream().response_written().is_some();
        if let (Some(local), false) = (ctx.local_reply.take(), written) {
            session.set_keepalive(None);
            if let Err(err) = reply::send_local(session, ctx.grpc, &local).await {
                tracing::debug!("could not send a filter's reply: {err}");
            }
            return FailToProxy {
                error_code: local.status,
                can_reuse_downstream: false,
            };
        }
        if code > 0 && !written {
            // pingora closes the downstream connection after a failed proxy attempt; say so,
            // or a keep-alive client may send its next request into the closing socket.
            session.set_keepalive(None);
            let why = reply::reason(code, e.etype());
            if let Err(err) = reply::send(session, ctx.grpc, code, why, &[]).await {
                tracing::debug!("could not send error reply: {err}");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        if let Some(stream) = ctx.filters.as_mut() {
            stream.end();
        }
        let code = match session.as_downstream().response_written() {
            Some(r) => r.status.as_u16(),
            None => e.map_or(0, |e| reply::status_for_error(e.etype(), e.esource())),
        };
        // From here on the status a gRPC client got (metrics, access log, span); none for
        // other requests, whatever trailers their responses carried.
        ctx.grpc_status = ctx.grpc.then(|| grpc_code(session, ctx, code, e));
        let trace = ctx.trace.take();
        let (route, cluster) = match ctx.parts() {
            Some((_, r, c, _)) => (r.name.as_str(), c.name.as_str()),
            None => ("", ""),
        };
        // One clock read for the metrics, the log line and the span.
        let took = ctx.start.elapsed();
        // `StatusCode::as_str` is a static string for every code; 0 (no response) is not one.
        let status_code = http::StatusCode::from_u16(code).ok();
        let code_label = status_code.as_ref().map_or("0", |c| c.as_str());
        self.metrics
            .requests
            .with_label_values(&[self.listener.as_str(), route, cluster, code_label])
            .inc();
        self.metrics
            .duration
            .with_label_values(&[self.listener.as_str(), route, cluster])
            .observe(took.as_secs_f64());
        if let Some(g) = ctx.grpc_status {
            self.metrics
                .grpc_requests
                .with_label_values(&[self.listener.as_str(), route, cluster, grpc::label(g)])
                .inc();
        }
        if let Some(endpoint) = ctx
            .runtime
            .as_deref()
            .zip(ctx.cluster)
            .and_then(|(rt, c)| rt.clusters[c].endpoints.get(*ctx.tried.last()?))
        {
            let series = endpoint
                .series
                .get_or_init(|| EndpointSeries::new(&self.metrics, cluster, endpoint.address));
            series.duration.observe(took.as_secs_f64());
            series.responses(code).inc();
        }
        if let (Some(i), Some(rt)) = (ctx.inference.as_ref(), ctx.runtime.as_deref()) {
            if let Some(u) = i.usage.as_ref().and_then(|u| u.last) {
                let pool = rt.snapshot.pools[i.pool].name.as_str();
                for (kind, n) in [("input", u.input), ("output", u.output)] {
                    self.metrics
                        .usage_tokens
                        .with_label_values(&[pool, i.model.as_str(), kind])
                        .inc_by(n);
                }
            }
        }
        let ended = Ended {
            status: code,
            route,
            cluster,
            took,
        };
        self.access_log(session, e, ctx, &ended);
        self.end_trace(session, e, ctx, trace, &ended);
    }
}

impl WeirProxy {
    /// The attempt's span records the request as it goes upstream.
    fn trace_upstream_request(&self, ctx: &mut RequestCtx, upstream: &RequestHeader) {
        if let (Some(tracer), Some(trace)) = (&self.tracer, ctx.trace.as_mut()) {
            tracer.attempt_request(trace, upstream);
        }
    }

    /// A request's or response's trailers through its filter chain (if any), which may change
    /// them or stop the request.
    async fn trailers_through_filters(
        &self,
        dir: Dir,
        trailers: &mut http::HeaderMap,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let Some(stream) = ctx.filters.as_mut() else {
            return Ok(());
        };
        let started = Instant::now();
        let pairs = filters::map_pairs(trailers);
        let (verdict, phase) = match dir {
            Dir::Request => (stream.request_trailers(pairs).await, "request_trailers"),
            Dir::Response => (stream.response_trailers(pairs).await, "response_trailers"),
        };
        self.filter_timed(phase, started);
        if let Some(pairs) = self.filter_stop(ctx, verdict)? {
            filters::apply_map_pairs(trailers, pairs)?;
        }
        Ok(())
    }

    /// Records one filter phase's time since `started`.
    fn filter_timed(&self, phase: &str, started: Instant) {
        self.metrics
            .filter_time
            .with_label_values(&[phase])
            .observe(started.elapsed().as_secs_f64());
    }

    /// Ends the request's trace: the server span with the OpenTelemetry HTTP, RPC and GenAI
    /// attributes that apply.
    fn end_trace(
        &self,
        session: &Session,
        e: Option<&Error>,
        ctx: &RequestCtx,
        trace: Option<Box<crate::telemetry::RequestTrace>>,
        ended: &Ended,
    ) {
        let &Ended {
            status,
            route,
            took,
            ..
        } = ended;
        let (Some(tracer), Some(mut trace)) = (&self.tracer, trace) else {
            return;
        };
        // An unsampled trace ends with nothing to export.
        if !trace.sampled() {
            return trace.recycle();
        }
        let req = session.req_header();
        let path = req.uri.path();
        // After `server.address`, from routing.
        let attrs = &mut trace.attributes;
        attrs
            .extend(&self.listener_attrs)
            .method(&req.method)
            .str("url.path", path)
            .protocol_version(req.version)
            .status_code(status);
        // The route's and cluster's names, encoded once per config.
        if let (Some((rt, route, cluster, state)), Some(r)) = (ctx.parts(), ctx.route) {
            attrs
                .extend(
                    rt.routes[r]
                        .trace_attrs
                        .get_or_init(|| Attrs::string("weir.route", &route.name)),
                )
                .extend(
                    state
                        .trace_attrs
                        .get_or_init(|| Attrs::string("weir.cluster", &cluster.name)),
                );
        }
        if let Some(addr) = session.client_addr().and_then(|a| a.as_inet()) {
            attrs.ip("client.address", addr.ip());
        }
        let method = req.method.as_str();
        let mut grpc_failed = None;
        let name: &[&str] = if ctx.grpc {
            let rpc = path.trim_start_matches('/');
            let (service, method) = rpc.split_once('/').unwrap_or((path, ""));
            // `logging` has set the status the client got.
            let code = ctx.grpc_status.unwrap_or(grpc::code::UNKNOWN);
            // A server span's error codes (OpenTelemetry's RPC conventions): those that
            // point at the server, not at the caller's request.
            use grpc::code::*;
            grpc_failed = matches!(
                code,
                UNKNOWN | DEADLINE_EXCEEDED | UNIMPLEMENTED | INTERNAL | UNAVAILABLE | DATA_LOSS
            )
            .then_some(code);
            attrs
                .str("rpc.system", "grpc")
                .str("rpc.service", service)
                .str("rpc.method", method)
                .int("rpc.grpc.status_code", i64::from(code));
            &[rpc]
        } else if route.is_empty() {
            &[method]
        } else {
            &[method, " ", route]
        };
        if let Some(i) = &ctx.inference {
            attrs.str("gen_ai.request.model", &i.model);
            if let Some(v) = i.lease.endpoint.version(&i.model).filter(|v| !v.is_empty()) {
                attrs.str("weir.inference.model_version", &v);
            }
            attrs.display("weir.inference.endpoint", i.lease.endpoint.address);
            if let Some(first) = i.first_chunk {
                attrs.double(
                    "gen_ai.server.time_to_first_token",
                    (first - ctx.start).as_secs_f64(),
                );
            }
            attrs.int(
                "weir.inference.response_chunks",
                i64::try_from(i.chunks).unwrap_or(i64::MAX),
            );
            if let Some(u) = i.usage.as_ref().and_then(|u| u.last) {
                let tokens = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
                attrs
                    .int("gen_ai.usage.input_tokens", tokens(u.input))
                    .int("gen_ai.usage.output_tokens", tokens(u.output));
            }
        }
        let failed = status == 0 || status >= 500 || e.is_some() || grpc_failed.is_some();
        let error = e
            .map(|e| e.to_string())
            .or_else(|| grpc_failed.map(|code| format!("gRPC status {code}")));
        tracer.finish(trace, name, error.as_deref(), failed, took);
    }

    /// Feeds an inference stream's response chunk to the TTFT, inter-token and token metrics.
    fn observe_token(&self, ctx: &mut RequestCtx) {
        let start = ctx.start;
        let (Some(i), Some(rt)) = (ctx.inference.as_mut(), ctx.runtime.as_deref()) else {
            return;
        };
        let now = Instant::now();
        i.chunks += 1;
        i.first_chunk.get_or_insert(now);
        let (inter_token, tokens) = i.stream_metrics.get_or_insert_with(|| {
            let labels = [rt.snapshot.pools[i.pool].name.as_str(), i.model.as_str()];
            self.metrics
                .ttft
                .with_label_values(&labels)
                .observe((now - start).as_secs_f64());
            (
                self.metrics.inter_token.with_label_values(&labels),
                self.metrics.tokens.with_label_values(&labels),
            )
        });
        if let Some(before) = i.last_chunk.replace(now) {
            inter_token.observe((now - before).as_secs_f64());
        }
        tokens.inc();
    }

    /// Queues the request's access log line, when the config asks for one.
    fn access_log(&self, session: &Session, e: Option<&Error>, ctx: &RequestCtx, ended: &Ended) {
        let Some(log) = &self.access_log else { return };
        let runtime = ctx
            .runtime
            .clone()
            .unwrap_or_else(|| self.runtime.load_full());
        let Some(config) = runtime.snapshot.source.access_log.as_deref() else {
            return;
        };
        let req = session.req_header();
        let header = |name: &str| req.headers.get(name).and_then(|v| v.to_str().ok());
        let upstream = ctx
            .cluster
            .zip(ctx.tried.last())
            .and_then(|(c, &i)| runtime.snapshot.clusters[c].endpoints.get(i))
            .map(|ep| ep.address.to_string());
        let served = ctx
            .inference
            .as_ref()
            .and_then(|i| i.lease.endpoint.version(&i.model).filter(|v| !v.is_empty()));
        let entry = crate::access_log::Entry {
            listener: &self.listener,
            route: ended.route,
            cluster: ended.cluster,
            upstream,
            tries: ctx.tries,
            downstream: session.client_addr().map(|a| a.to_string()),
            method: req.method.as_str(),
            authority: req
                .uri
                .authority()
                .map(|a| a.as_str())
                .or_else(|| header("host"))
                .unwrap_or(""),
            path: req.uri.path_and_query().map_or("", |p| p.as_str()),
            protocol: match req.version {
                http::Version::HTTP_2 => "HTTP/2",
                http::Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            status: ended.status,
            grpc_status: ctx.grpc_status,
            duration_ms: ended.took.as_secs_f64() * 1e3,
            request_bytes: session.body_bytes_read(),
            response_bytes: session.body_bytes_sent(),
            user_agent: header("user-agent"),
            request_id: header("x-request-id"),
            model: ctx.inference.as_ref().map(|i| i.model.as_str()),
            model_version: served.as_deref(),
            usage: ctx.inference.as_ref().and_then(|i| i.usage.as_ref()?.last),
            error: e.map(|e| e.to_string()),
        };
        log.log(&config.fields, &entry);
    }
}

/// How a request ended, for its metrics, log line and span.
struct Ended<'a> {
    /// The response status the client got, or 0 when it got none.
    status: u16,
    /// The route's and cluster's names; empty when the request was not routed.
    route: &'a str,
    cluster: &'a str,
    /// Since the request started (`RequestCtx::start`).
    took: Duration,
}

/// Which of a request's messages a filter phase is for.
#[derive(Clone, Copy)]
enum Dir {
    Request,
    Response,
}

/// `wait` (a place in an inference pool's queue) unless the client leaves first: `None` then.
/// pingora notices a closed downstream only when it next reads or writes it; a request that
/// waits for a replica does neither, and without this a client that gave up kept its place in
/// the queue (others were shed for it) and, once a replica freed, had it start generating for
/// nobody. Watched: an h2 stream's reset, and an HTTP/1.1 connection's close once the request
/// is read whole (pingora's own proxy loop watches it so, with the same rules for a half-close
/// and for pipelined bytes). An HTTP/1.1 request whose body is still arriving is not watched:
/// that would read its body.
async fn unless_client_leaves<T>(
    downstream: &mut pingora::protocols::http::ServerSession,
    wait: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::pin!(wait);
    // `biased`: the wait first, so a replica free at once costs no read of the client.
    if downstream.is_body_done() {
        tokio::select! {
            biased;
            out = &mut wait => Some(out),
            idle = downstream.read_body_or_idle(false) => match idle {
                Err(_) => None,
                // Not reached once the body is done (the read only ends in an error), but
                // should it end otherwise, the wait goes on unwatched.
                Ok(_) => Some(wait.await),
            },
        }
    } else if let Some(reset) = downstream.watch_h2_stream_close() {
        tokio::select! {
            biased;
            out = &mut wait => Some(out),
            _ = reset => None,
        }
    } else {
        Some(wait.await)
    }
}

/// The gRPC status the client got: the upstream's trailers, else the `grpc-status` of the
/// response header written (a trailers-only answer, weir's own replies included), else what
/// a gRPC client makes of the HTTP status (a call that ended without a status is UNKNOWN), or
/// CANCELLED when the client left (before an answer or during one: error `e`).
fn grpc_code(session: &Session, ctx: &RequestCtx, http_status: u16, e: Option<&Error>) -> u32 {
    ctx.grpc_status
        .or_else(|| {
            session
                .as_downstream()
                .response_written()?
                .headers
                .get("grpc-status")?
                .to_str()
                .ok()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| {
            let client_left = http_status == 0
                || e.is_some_and(|e| reply::status_for_error(e.etype(), e.esource()) == 0);
            if client_left {
                grpc::code::CANCELLED
            } else {
                grpc::status_for_http(http_status)
            }
        })
}
