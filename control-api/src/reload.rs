//! The `WeightReload` service: orchestrators publish weight-reload events, the control plane
//! relays them to every subscribed proxy (late subscribers first get the latest event of each
//! endpoint's model), and `Rollout` reloads a whole pool one endpoint at a time.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use weir_policies::model::{HttpReload, InferencePool, InferenceProtocol};

use crate::kserve::grpc_inference_service_client::GrpcInferenceServiceClient;
use crate::kserve::{ModelMetadataRequest, ModelReadyRequest, RepositoryModelLoadRequest};
use crate::pb::weight_reload_server::WeightReload;
use crate::pb::{PublishResponse, ReloadEvent, RolloutProgress, RolloutRequest, SubscribeRequest};
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
}

impl Relay {
    /// Shares `cp`'s token and config.
    pub fn new(cp: ControlPlane) -> Self {
        Self {
            cp,
            tx: broadcast::channel(BACKLOG).0,
            latest: Arc::default(),
            sequence: Arc::default(),
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

    /// Reloads `model` on every endpoint of `pool` that serves it, one at a time, reporting
    /// each step to `progress`. Stops at the first failure.
    async fn rollout(
        &self,
        pool: InferencePool,
        req: RolloutRequest,
        progress: mpsc::Sender<Result<RolloutProgress, Status>>,
    ) {
        let say = |endpoint: &str, step: &str, version: &str, message: String| {
            let p = RolloutProgress {
                endpoint: endpoint.into(),
                step: step.into(),
                version: version.into(),
                message,
            };
            let progress = progress.clone();
            async move {
                let _ = progress.send(Ok(p)).await;
            }
        };
        let drain = if req.drain_wait_ms > 0 {
            Duration::from_millis(u64::from(req.drain_wait_ms))
        } else {
            pool.reload.drain_deadline
        };
        let endpoints = pool
            .endpoints
            .iter()
            .filter(|e| e.models.iter().any(|m| m.name == req.model));
        for e in endpoints {
            let ep = e.address.as_str();
            let publish = |event: &str, version: &str| {
                self.publish(Self::event(&pool.name, ep, &req.model, event, version))
            };
            if let Err(s) = publish("start", "") {
                return say(ep, "failed", "", s.message().to_string()).await;
            }
            say(
                ep,
                "draining",
                "",
                format!("waiting {drain:?} for proxies to drain"),
            )
            .await;
            tokio::time::sleep(drain).await;
            say(
                ep,
                "reloading",
                "",
                "asking the server to load new weights".into(),
            )
            .await;
            let result = match pool.protocol {
                InferenceProtocol::KserveGrpc => {
                    kserve_reload(ep, &req.model, pool.reload.max_wait).await
                }
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
                    return say(ep, "failed", "", e).await;
                }
            };
            if let Err(s) = publish("finished", &version) {
                return say(ep, "failed", "", s.message().to_string()).await;
            }
            say(
                ep,
                "finished",
                &version,
                "back in rotation after the proxies' warm-up".into(),
            )
            .await;
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
type Progress = Pin<Box<dyn Stream<Item = Result<RolloutProgress, Status>> + Send>>;

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
        let mut rx = self.tx.subscribe();
        let backlog: Vec<ReloadEvent> = {
            let latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
            let mut all: Vec<ReloadEvent> = latest.values().cloned().collect();
            all.sort_by_key(|e| e.sequence);
            all
        };
        let (tx, out) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut seen = 0;
            for ev in backlog {
                seen = ev.sequence;
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
            loop {
                match rx.recv().await {
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

    type RolloutStream = Progress;

    async fn rollout(&self, req: Request<RolloutRequest>) -> Result<Response<Progress>, Status> {
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
