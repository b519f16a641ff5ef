//! The control plane's gRPC side: the aggregated discovery stream (full state, then deltas,
//! ACK/NACK tracking) and the status service.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use weir_policies::model::Scope;
use weir_policies::validate;

use crate::pb::discovery_server::Discovery;
use crate::pb::status_server;
use crate::pb::{
    DiscoveryRequest, DiscoveryResponse, Node, ProxyStatus, Resource, ResourceKey, StatusRequest,
    StatusResponse,
};
use crate::policy_dir::Folder;
use crate::resources::ResourceSet;

/// Largest message a proxy may send (they are small: identity and ACKs).
pub const MAX_REQUEST_BYTES: usize = 64 << 10;

/// What one proxy gets: the resources of every file whose scope it is in.
#[derive(Debug, Default)]
pub struct View {
    pub version: String,
    /// Shared with the policy folder it came from (an endpoint edit copies it only once).
    pub resources: Arc<ResourceSet>,
}

/// A proxy's view, or why it is invalid.
type ViewResult = Result<Arc<View>, String>;

/// What is being served.
#[derive(Debug, Default)]
pub struct Published {
    /// Identifies everything below: the version of `all` when no file is scoped.
    pub version: String,
    /// Every resource of the folder.
    pub all: Arc<View>,
    /// Each file's scope and resources, when at least one file is scoped.
    files: Vec<(Option<Scope>, Arc<ResourceSet>)>,
    /// Views already built (and validated), by which files a proxy sees.
    views: Mutex<HashMap<Vec<bool>, ViewResult>>,
}

impl Published {
    /// The view for `node`. A view of only some files is validated on its own: those files
    /// may be consistent only together with others this proxy does not get.
    pub fn view_for(&self, node: &Node) -> Result<Arc<View>, String> {
        let seen: Vec<bool> = self
            .files
            .iter()
            .map(|(scope, _)| {
                scope
                    .as_ref()
                    .is_none_or(|s| s.matches(&node.id, |k| node.labels.get(k).map(String::as_str)))
            })
            .collect();
        if seen.iter().all(|s| *s) {
            return Ok(self.all.clone());
        }
        lock(&self.views)
            .entry(seen.clone())
            .or_insert_with(|| {
                let mut resources = ResourceSet::default();
                for ((_, set), _) in self.files.iter().zip(&seen).filter(|(_, s)| **s) {
                    resources.merge(set);
                }
                let config = resources.to_config()?;
                validate::compile(config).map_err(|problems| {
                    problems
                        .iter()
                        .map(|p| format!("{}: {}", p.field, p.message))
                        .collect::<Vec<_>>()
                        .join("; ")
                })?;
                Ok(Arc::new(View {
                    version: resources.version(),
                    resources: Arc::new(resources),
                }))
            })
            .clone()
    }
}

/// The control plane's shared state; cheap to clone.
#[derive(Clone)]
pub struct ControlPlane {
    shared: Arc<Shared>,
}

struct Shared {
    published: watch::Sender<Arc<Published>>,
    config_error: Mutex<Option<String>>,
    proxies: Mutex<BTreeMap<String, ProxyStatus>>,
    token: Option<String>,
    /// Deltas by (from, to) view version: proxies that ACKed the same version get the same
    /// push, computed once.
    deltas: Mutex<HashMap<(String, String), Arc<Delta>>>,
    /// Marked whenever [`ControlPlane::status`] may have changed.
    status_changed: watch::Sender<()>,
}

/// Resources added or changed, and keys removed.
type Delta = (Vec<Resource>, Vec<ResourceKey>);

/// Deltas kept at most; older ones are dropped all at once (they are cheap to recompute).
const MAX_DELTAS: usize = 64;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ControlPlane {
    /// `token`: when set, streams must carry `authorization: Bearer <token>`.
    pub fn new(token: Option<String>) -> Self {
        let (published, _) = watch::channel(Arc::new(Published::default()));
        Self {
            shared: Arc::new(Shared {
                published,
                config_error: Mutex::new(None),
                proxies: Mutex::new(BTreeMap::new()),
                token,
                deltas: Mutex::default(),
                status_changed: watch::channel(()).0,
            }),
        }
    }

    /// Serves `resources` from now on; connected proxies get the difference. A set equal to
    /// the current one changes nothing.
    pub fn publish(&self, resources: ResourceSet) {
        self.publish_folder(Folder {
            all: Arc::new(resources),
            files: Vec::new(),
        });
    }

    /// Serves a policy folder, whose files may be scoped to some proxies.
    pub fn publish_folder(&self, folder: Folder) {
        let all_version = folder.all.version();
        let scoped = folder.files.iter().any(|(scope, _)| scope.is_some());
        let (version, files) = if scoped {
            let mut h = DefaultHasher::new();
            all_version.hash(&mut h);
            for (scope, set) in &folder.files {
                format!("{scope:?}").hash(&mut h);
                set.version().hash(&mut h);
            }
            (format!("{:016x}", h.finish()), folder.files)
        } else {
            (all_version.clone(), Vec::new())
        };
        let modified = self.shared.published.send_if_modified(|p| {
            if p.version == version {
                return false;
            }
            tracing::info!(%version, resources = folder.all.len(), scoped, "publishing");
            let old = std::mem::replace(
                p,
                Arc::new(Published {
                    version,
                    all: Arc::new(View {
                        version: all_version,
                        resources: folder.all,
                    }),
                    files,
                    views: Mutex::default(),
                }),
            );
            weir_policies::drop_later(old);
            true
        });
        if modified {
            self.shared.status_changed.send_replace(());
        }
    }

    /// Records why the latest config was rejected (`None`: it was accepted).
    pub fn set_config_error(&self, error: Option<String>) {
        *lock(&self.shared.config_error) = error;
        self.shared.status_changed.send_replace(());
    }

    /// Wakes its holder when [`Self::status`] may have changed: a new version published, a
    /// proxy connected, ACKed, NACKed or gone, a config rejected. For waiting on a rollout
    /// without polling.
    pub fn status_changes(&self) -> watch::Receiver<()> {
        self.shared.status_changed.subscribe()
    }

    /// The whole config being served (every file of the folder).
    pub fn config(&self) -> Result<weir_policies::model::Config, String> {
        self.shared.published.borrow().all.resources.to_config()
    }

    /// The folder being served, and each change of it.
    pub(crate) fn published(&self) -> watch::Receiver<Arc<Published>> {
        self.shared.published.subscribe()
    }

    pub fn version(&self) -> String {
        self.shared.published.borrow().version.clone()
    }

    pub fn status(&self) -> StatusResponse {
        StatusResponse {
            version: self.version(),
            config_error: lock(&self.shared.config_error).clone().unwrap_or_default(),
            proxies: lock(&self.shared.proxies).values().cloned().collect(),
        }
    }

    pub(crate) fn check_token<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let Some(token) = &self.shared.token else {
            return Ok(());
        };
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
            Ok(())
        } else {
            Err(Status::unauthenticated("missing or wrong token"))
        }
    }

    fn delta(&self, from: &View, to: &View) -> Arc<Delta> {
        let key = (from.version.clone(), to.version.clone());
        if let Some(d) = lock(&self.shared.deltas).get(&key) {
            return d.clone();
        }
        let delta = Arc::new(from.resources.diff(&to.resources));
        let mut deltas = lock(&self.shared.deltas);
        if deltas.len() >= MAX_DELTAS {
            deltas.clear();
        }
        deltas.insert(key, delta.clone());
        delta
    }

    pub(crate) fn update_proxy(&self, node: &Node, f: impl FnOnce(&mut ProxyStatus)) {
        let mut proxies = lock(&self.shared.proxies);
        let entry = proxies
            .entry(node.id.clone())
            .or_insert_with(|| ProxyStatus {
                node: Some(node.clone()),
                ..Default::default()
            });
        f(entry);
        drop(proxies);
        self.shared.status_changed.send_replace(());
    }
}

/// A discovery stream's first message, which carries the node identity.
pub(crate) async fn first_message<M>(inbound: &mut Streaming<M>) -> Result<M, Status> {
    match inbound.next().await {
        Some(Ok(m)) => Ok(m),
        Some(Err(e)) => Err(e),
        None => Err(Status::invalid_argument(
            "stream closed before the node identity",
        )),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

/// One proxy's stream: what it has ACKed and what is in flight.
struct Session {
    cp: ControlPlane,
    node: Node,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    /// What the proxy runs (last ACKed); `None` before its first ACK.
    acked: Option<Arc<View>>,
    /// The last push not yet answered: nonce and what the proxy will run if it ACKs.
    pending: Option<(String, Arc<View>)>,
    nonce: u64,
}

impl Session {
    /// Pushes `published`: everything if the proxy has nothing ACKed, else the difference.
    async fn push(&mut self, published: Arc<Published>) -> bool {
        let published = match published.view_for(&self.node) {
            Ok(view) => view,
            Err(e) => {
                tracing::error!(node = %self.node.id, "not pushed, this proxy's view is invalid: {e}");
                self.cp.update_proxy(&self.node, |s| {
                    s.nacked_version = published.version.clone();
                    s.nack_error = format!(
                        "not pushed by the control plane: this proxy's view is invalid: {e}"
                    );
                });
                return true;
            }
        };
        // Nothing new for this proxy (a scoped view can stay the same while others change).
        if self.pending.is_none()
            && self
                .acked
                .as_ref()
                .is_some_and(|a| a.version == published.version)
        {
            return true;
        }
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        let (full_state, resources, removed) = match &self.acked {
            None => (true, published.resources.all(), Vec::new()),
            Some(acked) => {
                let delta = self.cp.delta(acked, &published);
                (false, delta.0.clone(), delta.1.clone())
            }
        };
        let resp = DiscoveryResponse {
            version_info: published.version.clone(),
            nonce: nonce.clone(),
            full_state,
            resources,
            removed,
        };
        self.pending = Some((nonce, published));
        self.tx.send(Ok(resp)).await.is_ok()
    }

    fn answer(&mut self, req: DiscoveryRequest) {
        let Some((nonce, published)) = self.pending.take_if(|(n, _)| *n == req.response_nonce)
        else {
            // An answer to a push that a newer one replaced: the newer answer decides.
            return;
        };
        match req.error_detail {
            None => {
                tracing::debug!(node = %self.node.id, version = %published.version, "ACK");
                self.cp.update_proxy(&self.node, |s| {
                    s.acked_version = published.version.clone();
                    s.nacked_version.clear();
                    s.nack_error.clear();
                });
                // The view replaced may be the last holder of a whole config.
                weir_policies::drop_later(self.acked.replace(published));
            }
            Some(err) => {
                tracing::warn!(node = %self.node.id, version = %published.version, nonce, error = %err.message, "NACK");
                self.cp.update_proxy(&self.node, |s| {
                    s.nacked_version = published.version.clone();
                    s.nack_error = err.message.clone();
                });
            }
        }
    }
}

#[tonic::async_trait]
impl Discovery for ControlPlane {
    type StreamStream = ResponseStream;

    async fn stream(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        self.check_token(&req)?;
        let mut inbound = req.into_inner();
        let first = first_message(&mut inbound).await?;
        let node = first
            .node
            .filter(|n| !n.id.is_empty())
            .ok_or_else(|| Status::invalid_argument("the first message must carry node.id"))?;
        let (tx, rx) = mpsc::channel(4);
        let mut session = Session {
            cp: self.clone(),
            node: node.clone(),
            tx,
            acked: None,
            pending: None,
            nonce: 0,
        };
        self.update_proxy(&node, |s| {
            s.node = Some(node.clone());
            s.connected = true;
        });
        tracing::info!(node = %node.id, cluster = %node.cluster, "proxy connected");
        let mut updates = self.published();
        let cp = self.clone();
        tokio::spawn(async move {
            let current = updates.borrow_and_update().clone();
            let mut alive = current.version.is_empty() || session.push(current).await;
            while alive {
                tokio::select! {
                    msg = inbound.next() => match msg {
                        Some(Ok(m)) => session.answer(m),
                        Some(Err(e)) => {
                            tracing::info!(node = %session.node.id, "stream error: {e}");
                            alive = false;
                        }
                        None => alive = false,
                    },
                    changed = updates.changed() => {
                        let current = updates.borrow_and_update().clone();
                        alive = changed.is_ok() && session.push(current).await;
                    }
                }
            }
            cp.update_proxy(&session.node, |s| s.connected = false);
            tracing::info!(node = %session.node.id, "proxy disconnected");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[tonic::async_trait]
impl status_server::Status for ControlPlane {
    async fn get(&self, req: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        self.check_token(&req)?;
        Ok(Response::new(self.status()))
    }
}
