//! Envoy's own xDS v3: `envoy.service.discovery.v3.AggregatedDiscoveryService` over one ADS
//! stream, state of the world (`api_type: GRPC`, here) or incremental (`DELTA_GRPC`,
//! [`delta`]), on the same port as weir's protocol. An Envoy whose bootstrap points its
//! `ads_config` at weir-control gets the policy folder as listeners, routes, clusters and
//! endpoints ([`translate`]), with the same scoping by node, the same token, and the same
//! status: it shows up in `weir-control status` with the version it ACKed or the reason it
//! NACKed.
//!
//! State of the world, per type: Envoy's request names what it wants (every listener and cluster; the route
//! configurations and load assignments its listeners and clusters refer to). A response
//! carries a type version (a hash of what it holds) and a nonce; Envoy answers each with an
//! ACK or a NACK naming that nonce, and an answer to an older nonce is stale and ignored. A
//! new folder is pushed type by type in [`translate::TYPES`] order, each only if what this
//! Envoy gets of it changed. Envoy counts as running a version once every type it asked for
//! is ACKed at that version.

mod delta;
pub mod translate;

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use envoy_types::pb::envoy::config::core::v3::Node as EnvoyNode;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::value::Kind;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

pub use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;

use crate::pb::Node;
use crate::server::{ControlPlane, Published, View};

/// Largest message an Envoy may send: its EDS request names every cluster it has (10,000
/// cluster names are ~150 KB).
pub const ENVOY_REQUEST_BYTES: usize = 4 << 20;

/// Translations kept at most (one per distinct view served); older ones are dropped at once.
const MAX_TRANSLATIONS: usize = 16;

/// The ADS service for Envoy clients of a [`ControlPlane`].
#[derive(Clone)]
pub struct XdsV3 {
    cp: ControlPlane,
    translations: Arc<Mutex<Translations>>,
}

/// Translations by view version, each with the digest of its view's resources but endpoints.
type Translations = HashMap<String, (u64, Arc<Translation>)>;

/// A view as Envoy resources, or why it cannot be one.
type Translation = Result<translate::Resources, String>;

impl XdsV3 {
    pub fn new(cp: ControlPlane) -> Self {
        Self {
            cp,
            translations: Arc::default(),
        }
    }

    fn translation(&self, view: &View) -> Arc<Translation> {
        let mut cache = self.translations.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, t)) = cache.get(&view.version) {
            return t.clone();
        }
        let routing = view.resources.digest_except(crate::resources::ENDPOINTS);
        // A view that differs from one already translated only in endpoints (the common
        // change) takes that one's listeners, routes and clusters and rebuilds only the load
        // assignments: translating 10,000 routes again took ~30 ms per endpoint change.
        let same_routing = cache
            .values()
            .find(|(r, t)| *r == routing && t.is_ok())
            .map(|(_, t)| t.clone());
        let t = Arc::new(match same_routing.as_deref() {
            Some(Ok(like)) => with_endpoints(like, view),
            _ => view.resources.to_config().and_then(|c| {
                let t = translate::translate(&c)?;
                for why in &t.not_translated {
                    tracing::warn!(version = %view.version, "for Envoy: {why}: it answers 503");
                }
                Ok(t)
            }),
        });
        if cache.len() >= MAX_TRANSLATIONS {
            cache.clear();
        }
        cache.insert(view.version.clone(), (routing, t.clone()));
        t
    }
}

impl XdsV3 {
    /// What `node` gets of the folder: its view and the view's translation. `None` (and the
    /// reason in the status) when its view is invalid; a view that does not translate is
    /// returned with its error, and the status says why nothing is sent.
    fn view_for(
        &self,
        node: &Node,
        published: &Published,
    ) -> Option<(Arc<View>, Arc<Translation>)> {
        let refuse = |version: &str, error: String| {
            tracing::error!(node = %node.id, %version, "{error}");
            self.cp.update_proxy(node, |s| {
                s.nacked_version = version.to_string();
                s.nack_error = error;
            });
        };
        match published.view_for(node) {
            Ok(view) => {
                let t = self.translation(&view);
                if let Err(e) = t.as_ref() {
                    refuse(&view.version, format!("not translated for Envoy: {e}"));
                }
                Some((view, t))
            }
            Err(e) => {
                refuse(
                    &published.version,
                    format!("not pushed by the control plane: this proxy's view is invalid: {e}"),
                );
                None
            }
        }
    }
}

/// `like` with the load assignments of `view`, whose other resources are those `like` was
/// translated from.
fn with_endpoints(like: &translate::Resources, view: &View) -> Translation {
    let mut t = like.clone();
    if let Some(assignments) = t.by_type.get_mut(translate::ENDPOINTS) {
        for assignment in assignments.iter_mut() {
            let name = std::mem::take(&mut assignment.name);
            let endpoints = view
                .resources
                .endpoints(&name)
                .ok_or_else(|| format!("cluster {name} has no endpoints resource"))?;
            let resource = translate::endpoints_of(&name, &endpoints)?;
            *assignment = translate::Named::new(name, resource);
        }
    }
    Ok(t)
}

/// An Envoy node as weir's status shows it: its string metadata fields are its labels (what a
/// file's `scope.labels` matches), and its agent and xDS mode stand for weir's version
/// (`envoy, xDS v3 incremental`).
fn node_of(n: &EnvoyNode, mode: &str) -> Node {
    let labels = n
        .metadata
        .iter()
        .flat_map(|m| &m.fields)
        .filter_map(|(k, v)| match &v.kind {
            Some(Kind::StringValue(s)) => Some((k.clone(), s.clone())),
            _ => None,
        })
        .collect();
    Node {
        id: n.id.clone(),
        cluster: n.cluster.clone(),
        labels,
        weir_version: format!("{}, xDS v3 {mode}", n.user_agent_name),
    }
}

/// A response sent, remembered until it is answered.
#[derive(Debug, Clone, PartialEq)]
struct Sent {
    nonce: String,
    /// The type version: a hash of the resources it carried.
    version: String,
    /// The view (weir config version) it came from.
    view: String,
}

/// One resource type on one stream.
#[derive(Debug, Default)]
struct Subscription {
    /// Asked for by name; empty with `wildcard`.
    names: Vec<String>,
    wildcard: bool,
    /// The type version the current view gives these names: what an ACK must be at for
    /// Envoy to run that view.
    want: String,
    sent: Option<Sent>,
    acked: Option<Sent>,
}

struct Session {
    xds: XdsV3,
    node: Node,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    subs: BTreeMap<&'static str, Subscription>,
    nonce: u64,
    /// The view being served to this Envoy, when its translation is good.
    view: Option<(Arc<View>, Arc<Translation>)>,
}

impl Session {
    fn take(&mut self, published: &Published) {
        if let Some(v) = self.xds.view_for(&self.node, published) {
            self.view = Some(v);
        }
    }

    /// Sends type `ty` as the current view has it, unless this Envoy has exactly that
    /// already (or on its way) and `always` is false.
    async fn send(&mut self, ty: &'static str, always: bool) -> bool {
        let Some((view, translation)) = &self.view else {
            return true;
        };
        let Ok(resources) = translation.as_ref() else {
            return true;
        };
        let Some(sub) = self.subs.get_mut(ty) else {
            return true;
        };
        let all = resources.by_type.get(ty).map(Vec::as_slice).unwrap_or(&[]);
        let chosen: Vec<&translate::Named> = all
            .iter()
            .filter(|r| sub.wildcard || sub.names.binary_search(&r.name).is_ok())
            .collect();
        // The type version: what it holds, by name and resource version.
        let version = format!(
            "{:016x}",
            crate::resources::stable_hash(
                chosen
                    .iter()
                    .map(|r| (&r.name, &r.version))
                    .collect::<Vec<_>>()
            )
        );
        sub.want = version.clone();
        if !always && sub.sent.as_ref().is_some_and(|s| s.version == version) {
            return true;
        }
        let chosen = chosen.into_iter().map(|r| r.resource.clone()).collect();
        self.nonce += 1;
        let sent = Sent {
            nonce: self.nonce.to_string(),
            version: version.clone(),
            view: view.version.clone(),
        };
        let resp = DiscoveryResponse {
            version_info: version,
            resources: chosen,
            type_url: ty.to_string(),
            nonce: sent.nonce.clone(),
            ..Default::default()
        };
        sub.sent = Some(sent);
        self.tx.send(Ok(resp)).await.is_ok()
    }

    /// Pushes what changed, type by type in xDS order. A view that changes nothing this Envoy
    /// gets is running as soon as everything before it was ACKed.
    async fn push(&mut self) -> bool {
        for ty in translate::TYPES {
            if !self.send(ty, false).await {
                return false;
            }
        }
        self.record_acks();
        true
    }

    async fn answer(&mut self, req: DiscoveryRequest) -> bool {
        let Some(ty) = served(&self.node, &req.type_url) else {
            return true;
        };
        let sub = self.subs.entry(ty).or_default();
        if !req.response_nonce.is_empty() {
            let Some(sent) = sub.sent.clone().filter(|s| s.nonce == req.response_nonce) else {
                // An answer to a response a newer one replaced: the newer answer decides.
                return true;
            };
            match &req.error_detail {
                Some(e) => self.xds.nacked(&self.node, ty, &sent.view, &e.message),
                None => {
                    sub.acked = Some(sent);
                    self.record_acks();
                }
            }
        }
        let sub = self.subs.entry(ty).or_default();
        let mut names = req.resource_names;
        names.sort_unstable();
        names.dedup();
        let wildcard = names.is_empty() && matches!(ty, translate::LISTENER | translate::CLUSTER)
            || names.iter().any(|n| n == "*");
        if sub.sent.is_none() || names != sub.names || wildcard != sub.wildcard {
            sub.names = names;
            sub.wildcard = wildcard;
            return self.send(ty, true).await;
        }
        true
    }

    /// Envoy runs the current view once every type it asked for is ACKed at the version that
    /// view gives it (a type the view did not change needs no new ACK).
    fn record_acks(&self) {
        let Some((view, _)) = &self.view else {
            return;
        };
        let running = !self.subs.is_empty()
            && self
                .subs
                .values()
                .all(|s| s.acked.as_ref().is_some_and(|a| a.version == s.want));
        if running {
            self.xds.running(&self.node, &view.version);
        }
    }
}

/// The served type `type_url` names, if it is one.
fn served(node: &Node, type_url: &str) -> Option<&'static str> {
    let ty = translate::TYPES.into_iter().find(|t| *t == type_url);
    if ty.is_none() {
        tracing::debug!(node = %node.id, %type_url, "type not served");
    }
    ty
}

/// `Cluster` for a type URL, for messages.
fn short(ty: &str) -> &str {
    ty.rsplit('.').next().unwrap_or(ty)
}

type AdsStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
type DeltaStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsV3 {
    type StreamAggregatedResourcesStream = AdsStream;
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn stream_aggregated_resources(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<AdsStream>, Status> {
        self.serve(
            req,
            |r: &DiscoveryRequest| r.node.as_ref().map(|n| node_of(n, "state of the world")),
            |xds, node, tx| Session {
                xds,
                node,
                tx,
                subs: BTreeMap::new(),
                nonce: 0,
                view: None,
            },
        )
        .await
    }

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, Status> {
        self.serve(
            req,
            |r: &DeltaDiscoveryRequest| r.node.as_ref().map(|n| node_of(n, "incremental")),
            delta::Session::new,
        )
        .await
    }
}

type BoxFuture<'a, T> = Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// What both ADS variants do on one stream: take each folder published, answer each request
/// (false: the stream is gone), push each change.
trait AdsSession: Send + 'static {
    type Request: prost::Message + Default + Send + 'static;
    fn node(&self) -> &Node;
    fn take(&mut self, published: &Published);
    fn on_request(&mut self, req: Self::Request) -> BoxFuture<'_, bool>;
    fn on_change(&mut self) -> BoxFuture<'_, bool>;
}

impl AdsSession for Session {
    type Request = DiscoveryRequest;
    fn node(&self) -> &Node {
        &self.node
    }
    fn take(&mut self, published: &Published) {
        Session::take(self, published)
    }
    fn on_request(&mut self, req: DiscoveryRequest) -> BoxFuture<'_, bool> {
        Box::pin(self.answer(req))
    }
    fn on_change(&mut self) -> BoxFuture<'_, bool> {
        Box::pin(self.push())
    }
}

impl XdsV3 {
    /// Serves one ADS stream: the node from its first request (`node` reads it), then a
    /// session (`start` makes it) fed the requests and the folder's changes until either ends.
    async fn serve<S: AdsSession, R: Send + 'static>(
        &self,
        req: Request<Streaming<S::Request>>,
        node: impl FnOnce(&S::Request) -> Option<Node>,
        start: impl FnOnce(XdsV3, Node, mpsc::Sender<Result<R, Status>>) -> S,
    ) -> Result<Response<Pin<Box<dyn Stream<Item = Result<R, Status>> + Send>>>, Status> {
        self.cp.check_token(&req)?;
        let mut inbound = req.into_inner();
        let first = crate::server::first_message(&mut inbound).await?;
        let node = node(&first)
            .filter(|n| !n.id.is_empty())
            .ok_or_else(|| Status::invalid_argument("the first message must carry node.id"))?;
        let (tx, rx) = mpsc::channel(8);
        let mut session = start(self.clone(), node.clone(), tx);
        self.cp.update_proxy(&node, |s| {
            s.node = Some(node.clone());
            s.connected = true;
        });
        tracing::info!(node = %node.id, cluster = %node.cluster, agent = %node.weir_version, "Envoy connected");
        let mut updates = self.cp.published();
        let cp = self.cp.clone();
        tokio::spawn(async move {
            let current = updates.borrow_and_update().clone();
            if !current.version.is_empty() {
                session.take(&current);
            }
            let mut alive = session.on_request(first).await;
            while alive {
                tokio::select! {
                    msg = inbound.next() => match msg {
                        Some(Ok(m)) => alive = session.on_request(m).await,
                        Some(Err(e)) => {
                            tracing::info!(node = %session.node().id, "stream error: {e}");
                            alive = false;
                        }
                        None => alive = false,
                    },
                    changed = updates.changed() => {
                        let current = updates.borrow_and_update().clone();
                        session.take(&current);
                        alive = changed.is_ok() && session.on_change().await;
                    }
                }
            }
            cp.update_proxy(session.node(), |s| s.connected = false);
            tracing::info!(node = %session.node().id, "Envoy disconnected");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    /// Records that `node` rejected view `version`'s resources of type `ty`, and why.
    fn nacked(&self, node: &Node, ty: &str, version: &str, message: &str) {
        let error = format!("{}: {message}", short(ty));
        tracing::warn!(node = %node.id, %version, %error, "NACK");
        self.cp.update_proxy(node, |s| {
            s.nacked_version = version.to_string();
            s.nack_error = error;
        });
    }

    /// Records that `node` runs view `version` (clearing an earlier NACK).
    fn running(&self, node: &Node, version: &str) {
        tracing::debug!(node = %node.id, %version, "ACK");
        self.cp.update_proxy(node, |s| {
            if s.acked_version != version || !s.nack_error.is_empty() {
                s.acked_version = version.to_string();
                s.nacked_version.clear();
                s.nack_error.clear();
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::ResourceSet;

    fn view(text: &str) -> View {
        let config = weir_policies::load::parse("mesh.yaml", text).expect("valid");
        let resources = ResourceSet::from_config(&config);
        View {
            version: resources.version(),
            resources: Arc::new(resources),
        }
    }

    const MESH: &str = "listeners: [{ name: main, address: \"127.0.0.1:15001\" }]\nroutes:\n  - { name: r, match: { host: \"*.example.com\" }, route: { cluster: c } }\n  - { name: p, match: { path: { prefix: /m/ } }, route: { pool: models } }\n  - { name: o, route: { cluster: d } }\nclusters:\n  - { name: c, endpoints: [{ address: \"10.0.0.1:80\" }] }\n  - { name: d, original_dst: true }\ninference_pools:\n  - { name: models, protocol: openai, endpoints: [{ address: \"10.0.0.9:8000\", models: [{ name: m }] }] }\n";

    #[test]
    fn an_endpoint_change_rebuilds_only_load_assignments_and_equals_a_whole_translation() {
        let xds = XdsV3::new(ControlPlane::new(None));
        let first = xds.translation(&view(MESH));
        let moved = view(&MESH.replace("10.0.0.1:80", "10.0.0.2:80"));
        let incremental = xds.translation(&moved);
        let whole = translate::translate(&moved.resources.to_config().unwrap()).unwrap();
        let (first, incremental) = (
            first.as_ref().as_ref().unwrap(),
            incremental.as_ref().as_ref().unwrap(),
        );
        for ty in translate::TYPES {
            assert_eq!(incremental.by_type[ty], whole.by_type[ty], "{ty}");
        }
        assert_ne!(
            first.by_type[translate::ENDPOINTS],
            incremental.by_type[translate::ENDPOINTS]
        );
        assert_eq!(
            first.by_type[translate::ROUTE],
            incremental.by_type[translate::ROUTE]
        );
        // The original_dst cluster has no load assignment; the pool route is reported.
        let names: Vec<&str> = whole.by_type[translate::ENDPOINTS]
            .iter()
            .map(|r| r.name.as_str())
            .collect();
        assert_eq!(names, ["c"]);
        assert_eq!(whole.not_translated.len(), 2, "{:?}", whole.not_translated);
        assert!(whole.not_translated[0].contains("inference pool models"));
        assert!(whole.not_translated[1].contains("cluster d sends to the original destination"));
    }

    #[test]
    fn a_filter_chain_whose_module_cannot_be_verified_fails_its_routes_closed() {
        let dir = tempfile::tempdir().unwrap();
        let module = dir.path().join("f.wasm");
        std::fs::write(&module, b"\0asm-not-really").unwrap();
        let text = format!(
            "listeners: [{{ name: main, address: \"127.0.0.1:15001\", filter_chain: good }}]\nroutes:\n  - {{ name: guarded, match: {{ path: {{ prefix: /g/ }} }}, route: {{ cluster: c }}, filter_chain: bad }}\n  - {{ name: rest, route: {{ cluster: c }} }}\nclusters:\n  - {{ name: c, endpoints: [{{ address: \"10.0.0.1:80\" }}] }}\nfilter_chains:\n  - {{ name: good, filters: [{{ name: g, module: \"{m}\" }}, {{ name: h, module: \"{m}\" }}, {{ name: i, module: \"{m}\" }}] }}\n  - {{ name: bad, filters: [{{ name: b, module: \"{m}\", sha256: \"{zeros}\" }}] }}\n",
            m = module.display(),
            zeros = "0".repeat(64)
        );
        let config = weir_policies::load::parse("mesh.yaml", &text).expect("valid");
        let t = translate::translate(&config).unwrap();
        assert_eq!(t.not_translated.len(), 1, "{:?}", t.not_translated);
        assert!(
            t.not_translated[0]
                .starts_with("route guarded on listener main: its filter chain bad cannot run")
                && t.not_translated[0].contains("has sha256"),
            "{:?}",
            t.not_translated
        );
        // The listener carries only the chain that can run, disabled until a route enables it.
        use envoy_types::pb::envoy::config::listener::v3::Listener;
        use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
        use prost::Message;
        let l = Listener::decode(&*t.by_type[translate::LISTENER][0].resource.value).unwrap();
        let Some(envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(
            hcm,
        )) = &l.filter_chains[0].filters[0].config_type
        else {
            panic!("no HCM")
        };
        let hcm = HttpConnectionManager::decode(&*hcm.value).unwrap();
        let names: Vec<(&str, bool)> = hcm
            .http_filters
            .iter()
            .map(|f| (f.name.as_str(), f.disabled))
            .collect();
        assert_eq!(
            names,
            [
                ("weir.good.0", true),
                ("weir.good.1", true),
                ("weir.good.2", true),
                ("envoy.filters.http.router", false)
            ]
        );
        // The same config gives the same bytes (routes enabling three filters by name).
        for _ in 0..5 {
            let again = translate::translate(&config).unwrap();
            for ty in translate::TYPES {
                assert_eq!(again.by_type[ty], t.by_type[ty], "{ty}");
            }
        }
    }

    #[test]
    fn host_conditions_keep_weirs_meaning_in_re2() {
        assert_eq!(translate::host_regex("*"), None);
        // Host names are ASCII (RE2 in Envoy folds case the same way for them).
        let anchored = |host: &str| {
            regex::bytes::RegexBuilder::new(&format!(
                "^(?:{})$",
                translate::host_regex(host).unwrap()
            ))
            .unicode(false)
            .build()
            .unwrap()
        };
        let exact = anchored("api.example.com");
        let wild = anchored("*.example.com");
        for (host, e, w) in [
            ("api.example.com", true, true),
            ("API.Example.COM:8080", true, true),
            ("apixexample.com", false, false),
            ("a.b.example.com", false, true),
            ("example.com", false, false),
            (".example.com", false, false),
        ] {
            assert_eq!(exact.is_match(host.as_bytes()), e, "{host} exact");
            assert_eq!(wild.is_match(host.as_bytes()), w, "{host} wildcard");
        }
    }
}
