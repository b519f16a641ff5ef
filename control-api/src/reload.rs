//! The `WeightReload` service: orchestrators publish weight-reload events, the control plane
//! relays them to every subscribed proxy (late subscribers first get the latest event of each
//! endpoint's model), and `Rollout` reloads a whole pool, `parallel` endpoints at a time,
//! moving on from each drain as soon as every subscribed proxy reports it (`Drained`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use weir_policies::model::{HttpReload, InferencePool, InferenceProtocol};

use crate::kserve::grpc_inference_service_client::GrpcInferenceServiceClient;
use crate::kserve::{ModelMetadataRequest, ModelReadyRequest, RepositoryModelLoadRequest};
use crate::pb::weight_reload_server::WeightReload;
use crate::pb::{
    DrainedReport, DrainedResponse, PublishResponse, ReloadEvent, RolloutProgress, RolloutRequest,
    SubscribeRequest,
};
use crate::server::ControlPlane;

/// Events a slow subscriber may fall behind by before it misses some (it is told to resync by
/// the stream ending).
const BACKLOG: usize = 1024;

type EventKey = (String, String, String);

/// The relay's state; cheap to clone.
#[derive(Clone)]
pub struct Relay {
    cp: ControlPlane,
    tx: broadcast::Sender<ReloadEvent>,
    /// The newest event by (pool, endpoint, model).
    latest: Arc<Mutex<BTreeMap<EventKey, ReloadEvent>>>,
    sequence: Arc<AtomicU64>,
    /// Proxies subscribed now (node id → open streams).
    nodes: Arc<Mutex<HashMap<String, usize>>>,
    drain_reports: Arc<DrainReports>,
}

impl Relay {
    /// Shares `cp`'s token and config.
    pub fn new(cp: ControlPlane) -> Self {
        Self {
            cp,
            tx: broadcast::channel(BACKLOG).0,
            latest: Arc::default(),
            sequence: Arc::default(),
            nodes: Arc::default(),
            drain_reports: Arc::default(),
        }
    }

    /// Checks and relays one event; returns its sequence number.
    pub fn publish(&self, mut ev: ReloadEvent) -> Result<u64, Status> {
        match ev.event.as_str() {
            "start" | "failed" => {}
            "finished" if !ev.version.is_empty() => {}
            "finished" => return Err(Status::invalid_argument("finished needs the new version")),
            other => {
                return Err(Status::invalid_argument(format!(
                    "event {other:?}: expected start, finished or failed"
                )))
            }
        }
        if ev.pool.is_empty() || ev.endpoint.is_empty() || ev.model.is_empty() {
            return Err(Status::invalid_argument(
                "pool, endpoint and model are required",
            ));
        }
        let mut latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        ev.sequence = self.sequence.fetch_add(1, Ordering::Relaxed) + 1;
        latest.insert(
            (ev.pool.clone(), ev.endpoint.clone(), ev.model.clone()),
            ev.clone(),
        );
        tracing::info!(pool = %ev.pool, endpoint = %ev.endpoint, model = %ev.model, event = %ev.event, version = %ev.version, "weight reload");
        // No subscriber is not an error: proxies that connect later get `latest`.
        let _ = self.tx.send(ev.clone());
        Ok(ev.sequence)
    }

    fn event(pool: &str, endpoint: &str, model: &str, event: &str, version: &str) -> ReloadEvent {
        ReloadEvent {
            pool: pool.into(),
            endpoint: endpoint.into(),
            model: model.into(),
            event: event.into(),
            version: version.into(),
            ..Default::default()
        }
    }

    /// Reloads `model` on every endpoint of `pool` that serves it, `req.parallel` at a time,
    /// reporting each step to `progress`. Stops after the first batch with a failure.
    async fn rollout(
        &self,
        pool: InferencePool,
        req: RolloutRequest,
        progress: mpsc::Sender<Result<RolloutProgress, Status>>,
    ) {
        let endpoints: Vec<&str> = pool
            .endpoints
            .iter()
            .filter(|e| e.models.iter().any(|m| m.name == req.model))
            .map(|e| e.address.as_str())
            .collect();
        let progress = Progress(progress);
        for batch in endpoints.chunks(req.parallel.max(1) as usize) {
            let results = futures_util::future::join_all(
                batch
                    .iter()
                    .map(|ep| self.reload_endpoint(&pool, &req, ep, &progress)),
            )
            .await;
            if results.contains(&false) {
                return;
            }
        }
    }

    /// One endpoint's reload: start, wait for every subscribed proxy to drain it (at most the
    /// drain wait), the server's reload call, finished (or failed). Whether it succeeded.
    async fn reload_endpoint(
        &self,
        pool: &InferencePool,
        req: &RolloutRequest,
        ep: &str,
        progress: &Progress,
    ) -> bool {
        let drain = if req.drain_wait_ms > 0 {
            Duration::from_millis(u64::from(req.drain_wait_ms))
        } else {
            pool.reload.drain_deadline
        };
        let publish = |event: &str, version: &str| {
            self.publish(Self::event(&pool.name, ep, &req.model, event, version))
        };
        let start = match publish("start", "") {
            Ok(sequence) => sequence,
            Err(s) => return progress.failed(ep, s.message().to_string()).await,
        };
        progress
            .say(
                ep,
                "draining",
                "",
                format!("waiting up to {drain:?} for proxies to drain"),
            )
            .await;
        let began = Instant::now();
        let (drained, subscribed) = self.wait_drained(start, drain).await;
        progress
            .say(
                ep,
                "reloading",
                "",
                format!(
                    "{drained} of {subscribed} subscribed proxies drained in {:.2} s; asking the server to load new weights",
                    began.elapsed().as_secs_f64()
                ),
            )
            .await;
        let result = match pool.protocol {
            InferenceProtocol::KserveGrpc => kserve_reload(ep, &req.model, pool.reload.max_wait).await,
            InferenceProtocol::Openai => match &pool.reload.http {
                Some(call) => {
                    http_reload(ep, &req.model, &req.version, call, pool.reload.max_wait).await
                }
                None => Err(format!(
                    "pool {:?} has no reload.http call: OpenAI-style servers have no standard reload API (set reload.http, or publish start/finished from your own tooling)",
                    pool.name
                )),
            },
        };
        let result = result.and_then(|v| {
            if req.version.is_empty() || v == req.version {
                Ok(v)
            } else {
                Err(format!(
                    "the server reports version {v}, not {}",
                    req.version
                ))
            }
        });
        let version = match result {
            Ok(v) => v,
            Err(e) => {
                let _ = self.publish(ReloadEvent {
                    reason: e.clone(),
                    ..Self::event(&pool.name, ep, &req.model, "failed", "")
                });
                return progress.failed(ep, e).await;
            }
        };
        if let Err(s) = publish("finished", &version) {
            return progress.failed(ep, s.message().to_string()).await;
        }
        progress
            .say(
                ep,
                "finished",
                &version,
                "back in rotation after the proxies' warm-up".into(),
            )
            .await;
        true
    }

    /// Waits until every proxy subscribed now has reported the start event `sequence`
    /// drained, for at most `limit`. Returns (drained, subscribed) at the end.
    async fn wait_drained(&self, sequence: u64, limit: Duration) -> (usize, usize) {
        let until = Instant::now() + limit;
        loop {
            let changed = self.drain_reports.notify.notified();
            let counts = {
                let nodes = lock(&self.nodes);
                let reports = lock(&self.drain_reports.by_start);
                let done = reports
                    .get(&sequence)
                    .map_or(0, |d| nodes.keys().filter(|n| d.contains(*n)).count());
                (done, nodes.len())
            };
            let now = Instant::now();
            if counts.0 == counts.1 || now >= until {
                lock(&self.drain_reports.by_start).remove(&sequence);
                return counts;
            }
            let _ =
                tokio::time::timeout((until - now).min(Duration::from_millis(100)), changed).await;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Drain reports from proxies: the node ids that drained each start event, by its sequence.
#[derive(Default)]
struct DrainReports {
    by_start: Mutex<BTreeMap<u64, HashSet<String>>>,
    notify: Notify,
}

/// Where a rollout reports its steps.
struct Progress(mpsc::Sender<Result<RolloutProgress, Status>>);

impl Progress {
    async fn say(&self, endpoint: &str, step: &str, version: &str, message: String) {
        let p = RolloutProgress {
            endpoint: endpoint.into(),
            step: step.into(),
            version: version.into(),
            message,
        };
        let _ = self.0.send(Ok(p)).await;
    }

    /// Reports a failed step; returns false (the endpoint was not reloaded).
    async fn failed(&self, endpoint: &str, message: String) -> bool {
        self.say(endpoint, "failed", "", message).await;
        false
    }
}

/// Counts a proxy's open `Subscribe` stream in `nodes` while it lives.
struct Subscribed {
    nodes: Arc<Mutex<HashMap<String, usize>>>,
    node: String,
}

impl Subscribed {
    fn new(nodes: &Arc<Mutex<HashMap<String, usize>>>, node: String) -> Self {
        *lock(nodes).entry(node.clone()).or_default() += 1;
        Self {
            nodes: nodes.clone(),
            node,
        }
    }
}

impl Drop for Subscribed {
    fn drop(&mut self) {
        let mut nodes = lock(&self.nodes);
        if let Some(n) = nodes.get_mut(&self.node) {
            *n -= 1;
            if *n == 0 {
                nodes.remove(&self.node);
            }
        }
    }
}

/// `RepositoryModelLoad`, then waits (up to `limit`) for `ModelReady` and returns the newest
/// version `ModelMetadata` lists.
async fn kserve_reload(endpoint: &str, model: &str, limit: Duration) -> Result<String, String> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{endpoint}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| format!("{endpoint}: {e}"))?;
    let mut c = GrpcInferenceServiceClient::new(channel);
    c.repository_model_load(RepositoryModelLoadRequest {
        model_name: model.into(),
        ..Default::default()
    })
    .await
    .map_err(|s| format!("RepositoryModelLoad: {}", s.message()))?;
    let until = Instant::now() + limit;
    loop {
        let ready = c
            .model_ready(ModelReadyRequest {
                name: model.into(),
                version: String::new(),
            })
            .await
            .is_ok_and(|r| r.into_inner().ready);
        if ready {
            break;
        }
        if Instant::now() >= until {
            return Err(format!("{model} not ready on {endpoint} after {limit:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let meta = c
        .model_metadata(ModelMetadataRequest {
            name: model.into(),
            version: String::new(),
        })
        .await
        .map_err(|s| format!("ModelMetadata: {}", s.message()))?;
    meta.into_inner()
        .versions
        .last()
        .cloned()
        .ok_or_else(|| "ModelMetadata lists no version".to_string())
}

/// The pool's own HTTP reload call (`{model}`, `{version}` expanded), then waits (up to
/// `limit`) until `ready_path` answers 200 (listing the model, when it is a model list).
/// OpenAI-style servers do not report a weights version: the rollout's `version` is it.
async fn http_reload(
    endpoint: &str,
    model: &str,
    version: &str,
    call: &HttpReload,
    limit: Duration,
) -> Result<String, String> {
    use http_body_util::BodyExt;
    if version.is_empty() {
        return Err(
            "an HTTP reload needs the version being rolled out (--version): OpenAI-style servers do not report one"
                .into(),
        );
    }
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let send = |method: &str, path: &str, body: Option<String>| {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("http://{endpoint}{path}"));
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(http_body_util::Full::new(bytes::Bytes::from(
            body.unwrap_or_default(),
        )));
        let client = client.clone();
        async move {
            let req = req.map_err(|e| e.to_string())?;
            let call = async {
                let resp = client.request(req).await.map_err(|e| e.to_string())?;
                let status = resp.status().as_u16();
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?
                    .to_bytes();
                Ok::<_, String>((status, body))
            };
            tokio::time::timeout(Duration::from_secs(30), call)
                .await
                .map_err(|_| "no answer in 30 s".to_string())?
        }
    };
    let path = HttpReload::expand(&call.path, model, version);
    let body = call
        .body
        .as_deref()
        .map(|b| HttpReload::expand(b, model, version));
    let (status, text) = send(&call.method, &path, body)
        .await
        .map_err(|e| format!("{} {path}: {e}", call.method))?;
    if !(200..300).contains(&status) {
        return Err(format!(
            "{} {path}: {status} {}",
            call.method,
            String::from_utf8_lossy(&text)
        ));
    }
    let until = Instant::now() + limit;
    loop {
        if let Ok((200, body)) = send("GET", &call.ready_path, None).await {
            let listed = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["data"].as_array().cloned());
            let ready = listed.is_none_or(|models| models.iter().any(|m| m["id"] == model));
            if ready {
                return Ok(version.to_string());
            }
        }
        if Instant::now() >= until {
            return Err(format!("{model} not ready on {endpoint} after {limit:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

type Events = Pin<Box<dyn Stream<Item = Result<ReloadEvent, Status>> + Send>>;
type ProgressStream = Pin<Box<dyn Stream<Item = Result<RolloutProgress, Status>> + Send>>;

#[tonic::async_trait]
impl WeightReload for Relay {
    async fn publish(
        &self,
        req: Request<ReloadEvent>,
    ) -> Result<Response<PublishResponse>, Status> {
        self.cp.check_token(&req)?;
        let sequence = Relay::publish(self, req.into_inner())?;
        Ok(Response::new(PublishResponse { sequence }))
    }

    type SubscribeStream = Events;

    async fn subscribe(&self, req: Request<SubscribeRequest>) -> Result<Response<Events>, Status> {
        self.cp.check_token(&req)?;
        let node = req
            .get_ref()
            .node
            .as_ref()
            .map(|n| n.id.clone())
            .filter(|id| !id.is_empty())
            .ok_or_else(|| Status::invalid_argument("node.id is required"))?;
        let subscribed = Subscribed::new(&self.nodes, node);
        let mut rx = self.tx.subscribe();
        let backlog: Vec<ReloadEvent> = {
            let latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
            let mut all: Vec<ReloadEvent> = latest.values().cloned().collect();
            all.sort_by_key(|e| e.sequence);
            all
        };
        let (tx, out) = mpsc::channel(64);
        tokio::spawn(async move {
            let _subscribed = subscribed;
            let mut seen = 0;
            for ev in backlog {
                seen = ev.sequence;
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
            loop {
                // Ends as soon as the proxy goes away, so it no longer counts as subscribed.
                let next = tokio::select! {
                    _ = tx.closed() => return,
                    next = rx.recv() => next,
                };
                match next {
                    // Already sent as part of the backlog.
                    Ok(ev) if ev.sequence <= seen => {}
                    Ok(ev) => {
                        if tx.send(Ok(ev)).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let _ = tx
                            .send(Err(Status::data_loss(format!(
                                "fell {n} events behind: subscribe again"
                            ))))
                            .await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }

    async fn drained(
        &self,
        req: Request<DrainedReport>,
    ) -> Result<Response<DrainedResponse>, Status> {
        self.cp.check_token(&req)?;
        let r = req.into_inner();
        let node = r
            .node
            .map(|n| n.id)
            .filter(|id| !id.is_empty())
            .ok_or_else(|| Status::invalid_argument("node.id is required"))?;
        let mut reports = lock(&self.drain_reports.by_start);
        reports.entry(r.sequence).or_default().insert(node);
        // Reports for starts no rollout waits on (published by other tooling) are not kept
        // forever.
        while reports.len() > 1024 {
            reports.pop_first();
        }
        drop(reports);
        self.drain_reports.notify.notify_waiters();
        Ok(Response::new(DrainedResponse {}))
    }

    type RolloutStream = ProgressStream;

    async fn rollout(
        &self,
        req: Request<RolloutRequest>,
    ) -> Result<Response<ProgressStream>, Status> {
        self.cp.check_token(&req)?;
        let req = req.into_inner();
        let config = self.cp.config().map_err(Status::failed_precondition)?;
        let pool = config
            .inference_pools
            .into_iter()
            .find(|p| p.name == req.pool)
            .ok_or_else(|| Status::not_found(format!("no inference pool {:?}", req.pool)))?;
        if !pool
            .endpoints
            .iter()
            .any(|e| e.models.iter().any(|m| m.name == req.model))
        {
            return Err(Status::not_found(format!(
                "no endpoint of pool {:?} serves {:?}",
                req.pool, req.model
            )));
        }
        let (tx, out) = mpsc::channel(16);
        let relay = self.clone();
        tokio::spawn(async move { relay.rollout(pool, req, tx).await });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }
}
