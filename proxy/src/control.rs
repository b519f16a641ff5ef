//! Config from the control plane (`weir run --control-plane URL`): the first push (or, when the
//! control plane is down, the last good config persisted on disk) starts the proxy; later
//! pushes are applied atomically and ACKed, invalid ones NACKed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde::{Deserialize, Serialize};
use weir_control::client::{self, Applied, ClientOptions, StreamStatus, Update};
use weir_control::resources::ResourceSet;
use weir_policies::model::{Admin, Config};
use weir_policies::{validate, Snapshot};

use crate::filters::Filters;
use crate::inference::driver::{Inference, ReloadEvent};
use crate::metrics::Metrics;
use crate::state::{Runtime, SharedRuntime};

/// How long start-up waits for the control plane before using the persisted config.
const INITIAL_FETCH: Duration = Duration::from_secs(5);

/// Everything `--control-plane` mode needs.
#[derive(Debug, Clone)]
pub struct ControlOptions {
    pub client: ClientOptions,
    /// Where the last good config is kept (`last-good.json`).
    pub state_dir: PathBuf,
    /// The admin address (the control plane does not set it).
    pub admin: String,
}

#[derive(Serialize, Deserialize)]
struct Persisted {
    version: String,
    config: Config,
}

fn state_file(dir: &Path) -> PathBuf {
    dir.join("last-good.json")
}

/// Validates a config from the control plane, with the local admin address.
fn compile(opts: &ControlOptions, version: &str, mut config: Config) -> Result<Snapshot, String> {
    config.admin = Some(Admin {
        address: opts.admin.clone(),
    });
    let mut snapshot = validate::compile(config).map_err(|problems| join(&problems))?;
    snapshot.version = version.to_string();
    Ok(snapshot)
}

fn join(problems: &[validate::Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("{}: {}", p.field, p.message))
        .collect::<Vec<_>>()
        .join("\n")
}

fn persist(opts: &ControlOptions, snapshot: &Snapshot) {
    let mut config = snapshot.config();
    config.admin = None;
    let data = Persisted {
        version: snapshot.version.clone(),
        config,
    };
    let path = state_file(&opts.state_dir);
    let tmp = path.with_extension("tmp");
    let result = std::fs::create_dir_all(&opts.state_dir)
        .and_then(|_| std::fs::write(&tmp, serde_json::to_vec(&data).unwrap_or_default()))
        .and_then(|_| std::fs::rename(&tmp, &path));
    if let Err(e) = result {
        tracing::error!("cannot persist the config to {}: {e}", path.display());
    }
}

/// The config to start with: the control plane's first push, or the persisted last good one
/// if the control plane cannot be reached in time.
pub fn initial(opts: &ControlOptions) -> Result<(Snapshot, Applied), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let fetched = rt.block_on(async {
        tokio::time::timeout(INITIAL_FETCH, client::fetch_initial(&opts.client)).await
    });
    let fetched = match fetched {
        Ok(r) => r,
        Err(_) => Err(format!(
            "no push from {} within {INITIAL_FETCH:?}",
            opts.client.url
        )),
    };
    match fetched.and_then(|(applied, config)| {
        let snapshot = compile(opts, &applied.version, config)?;
        Ok((snapshot, applied))
    }) {
        Ok((snapshot, applied)) => {
            persist(opts, &snapshot);
            Ok((snapshot, applied))
        }
        Err(e) => {
            let path = state_file(&opts.state_dir);
            tracing::warn!(
                "control plane unavailable ({e}); starting from {}",
                path.display()
            );
            let text = std::fs::read(&path).map_err(|err| {
                format!("{e}; and no last good config at {}: {err}", path.display())
            })?;
            let p: Persisted = serde_json::from_slice(&text)
                .map_err(|err| format!("{}: {err}", path.display()))?;
            let applied = Applied {
                version: p.version.clone(),
                resources: ResourceSet::from_config(&p.config),
            };
            let snapshot = compile(opts, &p.version, p.config)?;
            Ok((snapshot, applied))
        }
    }
}

/// The background service following the control plane.
pub struct ControlSync {
    pub opts: ControlOptions,
    pub applied: Applied,
    /// Where the discovery stream stands (metrics, admin `/control`).
    pub status: Arc<StreamStatus>,
    pub runtime: SharedRuntime,
    pub metrics: Arc<Metrics>,
    pub filters: Arc<Filters>,
    pub inference: Arc<Inference>,
}

/// Follows the control plane's weight-reload events (`WeightReload.Subscribe`) and applies
/// each to this proxy's pools; reconnects with backoff.
async fn follow_reloads(opts: ClientOptions, inference: Arc<Inference>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match subscribe_once(&opts, &inference).await {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => tracing::debug!("weight reload events: {e}"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn subscribe_once(opts: &ClientOptions, inference: &Arc<Inference>) -> Result<(), String> {
    use weir_control::pb::weight_reload_client::WeightReloadClient;
    let channel = tonic::transport::Endpoint::from_shared(opts.url.clone())
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", opts.url))?;
    let mut req = tonic::Request::new(weir_control::pb::SubscribeRequest {
        node: Some(opts.node.clone()),
    });
    weir_control::auth::authorize(&mut req, opts.token.as_deref())?;
    let client = WeightReloadClient::new(channel);
    let mut events = client
        .clone()
        .subscribe(req)
        .await
        .map_err(|e| format!("{}: {}", e.code(), e.message()))?
        .into_inner();
    while let Some(ev) = events
        .message()
        .await
        .map_err(|e| format!("{}: {}", e.code(), e.message()))?
    {
        let sequence = ev.sequence;
        let event = ReloadEvent {
            pool: ev.pool,
            endpoint: ev.endpoint,
            model: ev.model,
            event: ev.event,
            version: ev.version,
            reason: ev.reason,
        };
        // Events for pools or endpoints this proxy does not have are not for it.
        if let Err(e) = inference.signal(&event) {
            tracing::debug!("weight reload event ignored: {e}");
        }
        if event.event == "start" {
            // Tell the control plane once no stream of ours is left on the endpoint (at
            // once, when we do not have it), so a rollout need not wait out the deadline.
            let (inference, mut client, opts) = (inference.clone(), client.clone(), opts.clone());
            tokio::spawn(async move {
                inference.wait_drained(&event).await;
                let mut req = tonic::Request::new(weir_control::pb::DrainedReport {
                    node: Some(opts.node.clone()),
                    pool: event.pool,
                    endpoint: event.endpoint,
                    model: event.model,
                    sequence,
                });
                if weir_control::auth::authorize(&mut req, opts.token.as_deref()).is_ok() {
                    if let Err(e) = client.drained(req).await {
                        tracing::debug!("drain report: {e}");
                    }
                }
            });
        }
    }
    Ok(())
}

#[async_trait]
impl BackgroundService for ControlSync {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // Disk writes stay off the apply path: the newest snapshot is persisted at most every
        // 100 ms by a task of its own.
        let (persist_tx, mut persist_rx) = tokio::sync::watch::channel(None::<Arc<Snapshot>>);
        let persist_opts = self.opts.clone();
        tokio::spawn(async move {
            while persist_rx.changed().await.is_ok() {
                let latest = persist_rx.borrow_and_update().clone();
                if let Some(snapshot) = latest {
                    let opts = persist_opts.clone();
                    let _ = tokio::task::spawn_blocking(move || persist(&opts, &snapshot)).await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let opts = self.opts.clone();
        let runtime = self.runtime.clone();
        let metrics = self.metrics.clone();
        let filters = self.filters.clone();
        let apply = move |version: &str, update: Update| {
            let old = runtime.load_full();
            let snapshot = match update {
                Update::Full(config) => compile(&opts, version, config),
                Update::Endpoints(changes) => validate::with_endpoints(&old.snapshot, &changes)
                    .map_err(|problems| join(&problems))
                    .map(|mut s| {
                        s.version = version.to_string();
                        s
                    }),
            }
            .inspect_err(|_| metrics.reloads.with_label_values(&["error"]).inc())?;
            crate::reload::warn_restart_only(&snapshot, &old.snapshot);
            let chains = filters
                .install(&snapshot, Some(&old))
                .inspect_err(|_| metrics.reloads.with_label_values(&["error"]).inc())?;
            let snapshot = Arc::new(snapshot);
            runtime.store(Arc::new(Runtime::new(snapshot.clone(), Some(&old), chains)));
            let _ = persist_tx.send(Some(snapshot));
            metrics.reloads.with_label_values(&["ok"]).inc();
            tracing::info!(from = %old.snapshot.version, to = %version, "control plane config applied");
            client::drop_later(old);
            Ok(())
        };
        tokio::select! {
            _ = client::run(self.opts.client.clone(), self.applied.clone(), self.status.clone(), apply) => {}
            _ = follow_reloads(self.opts.client.clone(), self.inference.clone()) => {}
            _ = shutdown.changed() => {}
        }
    }
}
