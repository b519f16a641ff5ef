//! Runs the inference pools' side jobs: lets reload drains time out, scrapes the endpoints'
//! metrics, polls model readiness, sends warm-up requests, and takes reload signals (from the
//! admin endpoint and the control plane) to the right pool state.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tonic::transport::{Channel, Endpoint};
use weir_control::kserve::grpc_inference_service_client::GrpcInferenceServiceClient;
use weir_control::kserve::{ModelMetadataRequest, ModelReadyRequest};
use weir_policies::model::InferenceProtocol;
use weir_policies::snapshot::{InferencePool, PoolScrape};

use super::load;
use super::pool::{Origin, PoolEndpoint};
use super::reload::{Action, Phase, Signal};
use crate::state::SharedRuntime;

const TICK: Duration = Duration::from_millis(50);
/// Longest a scrape, poll or warm-up request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Most bytes of a model server's answer weir reads (a metrics page, a readiness or reload
/// call): a server that sends more (a runaway exporter) is not read at all, rather than held
/// in memory. vLLM's page with histograms for a few models is a few hundred KB.
const MAX_ANSWER_BYTES: usize = 8 << 20;
/// Warm-up tries before the reload is reported as failed to warm up.
const WARMUP_TRIES: u32 = 5;

/// A reload signal as the admin endpoint and the control plane carry it.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize, PartialEq, Eq)]
pub struct ReloadEvent {
    pub pool: String,
    /// `ip:port` of the endpoint, as in the pool's config.
    pub endpoint: String,
    pub model: String,
    /// `start`, `finished` or `failed`.
    pub event: String,
    /// The new weights' version (`finished`).
    #[serde(default)]
    pub version: String,
    /// Why it failed (`failed`).
    #[serde(default)]
    pub reason: String,
}

/// The inference side jobs, shared by the background service, the admin endpoint and the
/// control-plane client.
pub struct Inference {
    runtime: SharedRuntime,
    http: Client<HttpConnector, Full<Bytes>>,
    grpc: Mutex<HashMap<SocketAddr, Channel>>,
    /// Jobs in progress, by (kind, endpoint), so a slow endpoint never piles them up.
    busy: Mutex<HashSet<(&'static str, SocketAddr)>>,
    /// When each endpoint is next scraped or polled.
    due: Mutex<HashMap<(&'static str, SocketAddr), Instant>>,
}

impl Inference {
    pub fn new(runtime: SharedRuntime) -> Arc<Self> {
        Arc::new(Self {
            runtime,
            http: Client::builder(TokioExecutor::new()).build_http(),
            grpc: Mutex::default(),
            busy: Mutex::default(),
            due: Mutex::default(),
        })
    }

    /// Applies a reload signal to every pool state it names.
    pub fn signal(self: &Arc<Self>, ev: &ReloadEvent) -> Result<(), String> {
        let rt = self.runtime.load_full();
        let signal = match ev.event.as_str() {
            "start" => None,
            "finished" if !ev.version.is_empty() => Some(Signal::Finished {
                version: ev.version.clone(),
            }),
            "finished" => return Err("a finished reload needs the new version".into()),
            "failed" => Some(Signal::Failed {
                reason: if ev.reason.is_empty() {
                    "reload failed".into()
                } else {
                    ev.reason.clone()
                },
            }),
            other => {
                return Err(format!(
                    "unknown event {other:?}: expected start, finished or failed"
                ))
            }
        };
        let (id, cfg) = rt
            .snapshot
            .pools
            .iter()
            .enumerate()
            .find(|(_, p)| p.name == ev.pool)
            .ok_or_else(|| format!("no inference pool {:?}", ev.pool))?;
        let address: SocketAddr = ev
            .endpoint
            .parse()
            .map_err(|_| format!("endpoint {:?} is not ip:port", ev.endpoint))?;
        let index = cfg
            .endpoints
            .iter()
            .position(|e| e.address == address)
            .ok_or_else(|| format!("pool {:?} has no endpoint {address}", ev.pool))?;
        let signal = signal.unwrap_or(Signal::Start {
            drain: cfg.reload.drain_deadline,
        });
        self.apply(id, index, &ev.model, signal, Origin::Explicit)
    }

    /// Waits until this proxy has no stream left on the endpoint and model `ev` names, that
    /// is until the model is no longer draining there (or this proxy does not have it), for at
    /// most the pool's drain deadline and a little more.
    pub async fn wait_drained(&self, ev: &ReloadEvent) {
        let until = Instant::now()
            + Duration::from_secs(2)
            + self
                .runtime
                .load()
                .snapshot
                .pools
                .iter()
                .find(|p| p.name == ev.pool)
                .map_or(Duration::ZERO, |p| p.reload.drain_deadline);
        while Instant::now() < until {
            let rt = self.runtime.load_full();
            let draining = rt
                .snapshot
                .pools
                .iter()
                .position(|p| p.name == ev.pool)
                .and_then(|id| {
                    rt.pools[id]
                        .endpoints
                        .iter()
                        .find(|e| e.address.to_string() == ev.endpoint)
                })
                .is_some_and(|e| {
                    e.models().iter().any(|m| {
                        m.name == ev.model && matches!(m.reload.phase, Phase::Draining { .. })
                    })
                });
            if !draining {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Applies `signal` to pool `id`'s endpoint `index` in the current runtime and starts
    /// what it asks for.
    fn apply(
        self: &Arc<Self>,
        id: usize,
        index: usize,
        model: &str,
        signal: Signal,
        origin: Origin,
    ) -> Result<(), String> {
        let rt = self.runtime.load_full();
        let (cfg, pool) = (&rt.snapshot.pools[id], &rt.pools[id]);
        let actions = pool.signal(index, model, signal, origin)?;
        if actions.contains(&Action::SendWarmup) {
            let endpoint = pool.endpoints[index].clone();
            let (this, cfg, model) = (self.clone(), cfg.clone(), model.to_string());
            tokio::spawn(async move {
                let ok = this.warm_up(&cfg, &endpoint, &model).await;
                // Find the pool again: the config may have changed meanwhile.
                let rt = this.runtime.load_full();
                let found = rt.snapshot.pools.iter().position(|p| p.name == cfg.name);
                let index = found.and_then(|id| {
                    rt.pools[id]
                        .endpoints
                        .iter()
                        .position(|e| e.address == endpoint.address)
                        .map(|i| (id, i))
                });
                if let Some((id, i)) = index {
                    if let Err(e) = this.apply(id, i, &model, Signal::Warmup { ok }, origin) {
                        tracing::warn!("warm-up result not applied: {e}");
                    }
                }
            });
        }
        Ok(())
    }

    /// Checks a reloaded endpoint serves `model`: KServe `ModelReady` (then its version from
    /// `ModelMetadata`), OpenAI a one-token completion. Tries a few times.
    async fn warm_up(&self, cfg: &InferencePool, e: &PoolEndpoint, model: &str) -> bool {
        if !cfg.reload.warmup {
            return true;
        }
        for attempt in 0..WARMUP_TRIES {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(100 << attempt.min(4))).await;
            }
            let ok = match cfg.protocol {
                InferenceProtocol::KserveGrpc => {
                    matches!(self.kserve_ready(e.address, model).await, Some(true))
                }
                InferenceProtocol::Openai => {
                    let body = serde_json::json!({
                        "model": model, "prompt": "warm-up", "max_tokens": 1, "stream": false
                    });
                    matches!(
                        self.http_call(
                            e.address,
                            "POST",
                            "/v1/completions",
                            Some(body.to_string())
                        )
                        .await,
                        Some((200, _))
                    )
                }
            };
            if ok {
                return true;
            }
        }
        tracing::warn!(endpoint = %e.address, model, "warm-up failed");
        false
    }

    fn channel(&self, addr: SocketAddr) -> Option<Channel> {
        let mut channels = self.grpc.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = channels.get(&addr) {
            return Some(c.clone());
        }
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .ok()?
            .connect_timeout(REQUEST_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .connect_lazy();
        channels.insert(addr, channel.clone());
        Some(channel)
    }

    /// `ModelReady`: `None` when the server did not answer.
    async fn kserve_ready(&self, addr: SocketAddr, model: &str) -> Option<bool> {
        let mut client = GrpcInferenceServiceClient::new(self.channel(addr)?);
        let r = client
            .model_ready(ModelReadyRequest {
                name: model.to_string(),
                version: String::new(),
            })
            .await
            .ok()?;
        Some(r.into_inner().ready)
    }

    /// The newest version `ModelMetadata` lists.
    async fn kserve_version(&self, addr: SocketAddr, model: &str) -> Option<String> {
        let mut client = GrpcInferenceServiceClient::new(self.channel(addr)?);
        let r = client
            .model_metadata(ModelMetadataRequest {
                name: model.to_string(),
                version: String::new(),
            })
            .await
            .ok()?;
        r.into_inner().versions.last().cloned()
    }

    /// One HTTP/1.1 request; `None` on any transport failure or timeout.
    async fn http_call(
        &self,
        addr: SocketAddr,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> Option<(u16, Bytes)> {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"))
            .header(http::header::USER_AGENT, "weir-inference");
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .ok()?;
        let call = async {
            let resp = self.http.request(req).await.ok()?;
            let status = resp.status().as_u16();
            let body = match http_body_util::Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
            {
                Ok(body) => body.to_bytes(),
                Err(e) => {
                    if e.is::<http_body_util::LengthLimitError>() {
                        tracing::warn!(endpoint = %addr, path, "answer over {MAX_ANSWER_BYTES} bytes: not read");
                    }
                    return None;
                }
            };
            Some((status, body))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, call).await.ok()?
    }

    /// Whether `kind`'s job for `addr` is due now (and marks it running).
    fn claim(&self, kind: &'static str, addr: SocketAddr, every: Duration) -> bool {
        let now = Instant::now();
        let mut due = self.due.lock().unwrap_or_else(|p| p.into_inner());
        if due.get(&(kind, addr)).is_some_and(|t| now < *t) {
            return false;
        }
        if !self
            .busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((kind, addr))
        {
            return false;
        }
        due.insert((kind, addr), now + every);
        true
    }

    fn release(&self, kind: &'static str, addr: SocketAddr) {
        self.busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(kind, addr));
    }

    fn tick(self: &Arc<Self>) {
        let rt = self.runtime.load_full();
        for (id, (cfg, pool)) in rt.snapshot.pools.iter().zip(&rt.pools).enumerate() {
            pool.tick();
            if let Some(m) = &cfg.metrics {
                for e in &pool.endpoints {
                    if !self.claim("scrape", e.metrics_address, m.interval) {
                        continue;
                    }
                    let (this, e, m) = (self.clone(), e.clone(), m.clone());
                    tokio::spawn(async move {
                        this.scrape(&e, &m).await;
                        this.release("scrape", e.metrics_address);
                    });
                }
            }
            if !cfg.reload.poll_interval.is_zero() {
                for (index, e) in pool.endpoints.iter().enumerate() {
                    if !self.claim("poll", e.address, cfg.reload.poll_interval) {
                        continue;
                    }
                    let (this, e, protocol) = (self.clone(), e.clone(), cfg.protocol);
                    tokio::spawn(async move {
                        this.poll(id, index, &e, protocol).await;
                        this.release("poll", e.address);
                    });
                }
            }
        }
    }

    async fn scrape(&self, e: &PoolEndpoint, m: &PoolScrape) {
        match self
            .http_call(e.metrics_address, "GET", &m.path, None)
            .await
        {
            Some((200, body)) => {
                match load::from_prometheus(&String::from_utf8_lossy(&body), Some(m)) {
                    Ok(sample) => {
                        // Taken as full: the picker would avoid the replica, or wait for it.
                        if let Some(k) = sample.kv_cache.filter(|k| *k > 1.0) {
                            tracing::warn!(endpoint = %e.metrics_address, "KV-cache use {k} is over 1 (taken as full): the series must report a fraction");
                        }
                        e.report(&sample)
                    }
                    // Said: the picker goes without this replica's load meanwhile.
                    Err(err) => tracing::warn!(endpoint = %e.metrics_address, "metrics: {err}"),
                }
            }
            other => {
                tracing::debug!(endpoint = %e.metrics_address, status = ?other.map(|o| o.0), "metrics scrape failed")
            }
        }
    }

    /// Asks the endpoint whether each of its models is ready; a model that went unready while
    /// serving is drained as if a reload had started, and returns when it is ready again.
    async fn poll(
        self: &Arc<Self>,
        id: usize,
        index: usize,
        e: &PoolEndpoint,
        protocol: InferenceProtocol,
    ) {
        let models: Vec<(String, Phase)> = e
            .models()
            .iter()
            .map(|m| (m.name.clone(), m.reload.phase.clone()))
            .collect();
        let listed = match protocol {
            InferenceProtocol::Openai => {
                match self.http_call(e.address, "GET", "/v1/models", None).await {
                    // vLLM's sleep mode: a sleeping server still lists its models but has
                    // released its weights. Servers without it answer 404: ignored.
                    Some((200, body)) => {
                        match self.http_call(e.address, "GET", "/is_sleeping", None).await {
                            Some((200, s)) if is_sleeping(&s) => Some(HashSet::new()),
                            _ => Some(openai_models(&body)),
                        }
                    }
                    _ => None,
                }
            }
            InferenceProtocol::KserveGrpc => None,
        };
        for (model, phase) in models {
            let ready = match protocol {
                InferenceProtocol::KserveGrpc => self.kserve_ready(e.address, &model).await,
                InferenceProtocol::Openai => listed.as_ref().map(|l| l.contains(&model)),
            };
            let signal = match (ready, phase) {
                (Some(false), Phase::Serving) => Signal::Start {
                    drain: self.runtime.load().snapshot.pools[id].reload.drain_deadline,
                },
                (Some(true), Phase::Draining { .. } | Phase::Reloading) => {
                    let version = match protocol {
                        InferenceProtocol::KserveGrpc => {
                            self.kserve_version(e.address, &model).await
                        }
                        InferenceProtocol::Openai => None,
                    };
                    Signal::Finished {
                        version: version.or_else(|| e.version(&model)).unwrap_or_default(),
                    }
                }
                _ => continue,
            };
            // The runtime may have changed since: only apply to the same pool.
            let rt = self.runtime.load();
            if rt.snapshot.pools.get(id).is_none_or(|p| {
                p.endpoints
                    .get(index)
                    .is_none_or(|x| x.address != e.address)
            }) {
                return;
            }
            if let Err(err) = self.apply(id, index, &model, signal, Origin::Poll) {
                tracing::debug!("poll signal: {err}");
            }
        }
    }
}

/// The model ids an OpenAI `GET /v1/models` answer lists.
fn openai_models(body: &[u8]) -> HashSet<String> {
    #[derive(serde::Deserialize)]
    struct List {
        data: Vec<Item>,
    }
    #[derive(serde::Deserialize)]
    struct Item {
        id: String,
    }
    serde_json::from_slice::<List>(body)
        .map(|l| l.data.into_iter().map(|i| i.id).collect())
        .unwrap_or_default()
}

/// Whether a vLLM `GET /is_sleeping` answer says `{"is_sleeping": true}`.
fn is_sleeping(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .is_ok_and(|v| v["is_sleeping"] == serde_json::Value::Bool(true))
}

/// The background service: ticks every pool.
pub struct Driver(pub Arc<Inference>);

#[async_trait]
impl BackgroundService for Driver {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(TICK) => self.0.tick(),
            }
        }
    }
}
