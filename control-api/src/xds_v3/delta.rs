//! Incremental xDS v3 over ADS (`DeltaAggregatedResources`, Envoy's `api_type: DELTA_GRPC`):
//! per type, Envoy subscribes to names (or to everything, `*`, as it does for listeners and
//! clusters) and says on reconnect which versions it has; each response carries only the
//! resources that are new or changed for it, each with its own version, and the names it no
//! longer gets. What the server believes Envoy holds is updated as it sends; an ACK or NACK
//! names the response's nonce. Status as in state of the world: Envoy runs a view once every
//! type's last response is ACKed and it holds exactly what that view gives it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::Any;
use tokio::sync::mpsc;
use tonic::Status;

use super::{translate, Translation, XdsV3};
use crate::pb::Node;
use crate::server::{Published, View};

/// One resource type on one incremental stream.
#[derive(Debug, Default)]
struct Subscription {
    wildcard: bool,
    names: BTreeSet<String>,
    /// What Envoy holds (as far as this server knows): name -> version.
    held: HashMap<String, String>,
    /// The nonce of the last response, until it is answered.
    pending: Option<String>,
    /// Whether the last response was ACKed (and nothing was sent since).
    acked: bool,
    /// Whether this type was ever answered (a first request gets a response even if empty,
    /// so Envoy's initial fetch ends).
    answered: bool,
}

pub(super) struct Session {
    xds: XdsV3,
    node: Node,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    subs: BTreeMap<&'static str, Subscription>,
    nonce: u64,
    view: Option<(Arc<View>, Arc<Translation>)>,
}

impl Session {
    pub(super) fn new(
        xds: XdsV3,
        node: Node,
        tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    ) -> Self {
        Self {
            xds,
            node,
            tx,
            subs: BTreeMap::new(),
            nonce: 0,
            view: None,
        }
    }

    fn take(&mut self, published: &Published) {
        if let Some(v) = self.xds.view_for(&self.node, published) {
            self.view = Some(v);
        }
    }

    /// What the current view gives this subscription: name -> (version, resource).
    fn desired(&self, ty: &str) -> Option<BTreeMap<&str, (&String, &Any)>> {
        let (_, translation) = self.view.as_ref()?;
        let resources = translation.as_ref().as_ref().ok()?;
        let sub = self.subs.get(ty)?;
        Some(
            resources
                .by_type
                .get(ty)
                .map(Vec::as_slice)
                .unwrap_or(&[])
                .iter()
                .filter(|r| sub.wildcard || sub.names.contains(&r.name))
                .map(|r| (r.name.as_str(), (&r.version, &r.resource)))
                .collect(),
        )
    }

    /// Sends what Envoy lacks of type `ty` and what it holds but should not; with `always`,
    /// a type's first answer goes out even when empty (so Envoy's initial fetch ends).
    async fn send(&mut self, ty: &'static str, always: bool) -> bool {
        let Some(desired) = self.desired(ty) else {
            return true;
        };
        let sub = self.subs.get(ty).expect("desired() found it");
        let resources: Vec<Resource> = desired
            .iter()
            .filter(|(name, (version, _))| sub.held.get(**name) != Some(*version))
            .map(|(name, (version, r))| Resource {
                name: name.to_string(),
                version: (*version).clone(),
                resource: Some((*r).clone()),
                ..Default::default()
            })
            .collect();
        let removed: Vec<String> = sub
            .held
            .keys()
            .filter(|n| !desired.contains_key(n.as_str()))
            .cloned()
            .collect();
        let first_answer = always && !sub.answered;
        if resources.is_empty() && removed.is_empty() && !first_answer {
            return true;
        }
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        let sub = self.subs.get_mut(ty).expect("present");
        for r in &resources {
            sub.held.insert(r.name.clone(), r.version.clone());
        }
        for n in &removed {
            sub.held.remove(n);
        }
        sub.pending = Some(nonce.clone());
        sub.acked = false;
        sub.answered = true;
        let version = self
            .view
            .as_ref()
            .map(|(v, _)| v.version.clone())
            .unwrap_or_default();
        let resp = DeltaDiscoveryResponse {
            system_version_info: version,
            resources,
            type_url: ty.to_string(),
            removed_resources: removed,
            nonce,
            ..Default::default()
        };
        self.tx.send(Ok(resp)).await.is_ok()
    }

    async fn push(&mut self) -> bool {
        for ty in translate::TYPES {
            if self.subs.contains_key(ty) && !self.send(ty, false).await {
                return false;
            }
        }
        self.record_acks();
        true
    }

    async fn answer(&mut self, req: DeltaDiscoveryRequest) -> bool {
        let Some(ty) = super::served(&self.node, &req.type_url) else {
            return true;
        };
        let first = !self.subs.contains_key(ty);
        let sub = self.subs.entry(ty).or_default();
        if !req.response_nonce.is_empty() {
            if sub.pending.as_deref() != Some(req.response_nonce.as_str()) {
                // An answer to a response a newer one replaced.
                return true;
            }
            sub.pending = None;
            match &req.error_detail {
                Some(e) => {
                    let version = self.view.as_ref().map(|(v, _)| v.version.as_str());
                    self.xds
                        .nacked(&self.node, ty, version.unwrap_or_default(), &e.message);
                }
                None => {
                    sub.acked = true;
                    self.record_acks();
                }
            }
        }
        let sub = self.subs.get_mut(ty).expect("inserted above");
        if first {
            // Envoy says what it kept from an earlier stream.
            sub.held = req.initial_resource_versions.clone();
            // Legacy wildcard: a first request for listeners or clusters naming nothing.
            sub.wildcard = req.resource_names_subscribe.is_empty()
                && matches!(ty, translate::LISTENER | translate::CLUSTER);
        }
        let mut changed = first;
        for name in req.resource_names_subscribe {
            changed = true;
            if name == "*" {
                sub.wildcard = true;
            } else {
                sub.names.insert(name);
            }
        }
        for name in req.resource_names_unsubscribe {
            changed = true;
            if name == "*" {
                sub.wildcard = false;
            } else {
                sub.names.remove(&name);
            }
            // Envoy dropped it: nothing to remove later.
            sub.held.remove(&name);
        }
        if changed {
            return self.send(ty, true).await;
        }
        true
    }

    fn record_acks(&self) {
        let Some((view, _)) = &self.view else {
            return;
        };
        let running = !self.subs.is_empty()
            && self.subs.iter().all(|(ty, s)| {
                s.acked
                    && self.desired(ty).is_some_and(|d| {
                        d.len() == s.held.len()
                            && d.iter().all(|(n, (v, _))| s.held.get(*n) == Some(*v))
                    })
            });
        if running {
            self.xds.running(&self.node, &view.version);
        }
    }
}

impl super::AdsSession for Session {
    type Request = DeltaDiscoveryRequest;
    fn node(&self) -> &Node {
        &self.node
    }
    fn take(&mut self, published: &Published) {
        Session::take(self, published)
    }
    fn on_request(&mut self, req: DeltaDiscoveryRequest) -> super::BoxFuture<'_, bool> {
        Box::pin(self.answer(req))
    }
    fn on_change(&mut self) -> super::BoxFuture<'_, bool> {
        Box::pin(self.push())
    }
}
