//! A config as a set of named, individually versioned resources, and back. Shared by the
//! control plane (which diffs sets to push only what changed) and the proxy (which applies
//! pushes to its set and rebuilds the config from it).

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hash};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use weir_policies::load::FileSpan;
use weir_policies::model::{self, Config};

use crate::pb::{Resource, ResourceKey};

pub const LISTENER: &str = "listener";
pub const ROUTE: &str = "route";
pub const CLUSTER: &str = "cluster";
pub const ENDPOINTS: &str = "endpoints";
pub const FILTER_CHAIN: &str = "filter_chain";
pub const INFERENCE_POOL: &str = "inference_pool";

/// A route keeps its place in the ordered route list (first match wins).
#[derive(Deserialize)]
struct RouteBody {
    order: usize,
    route: Arc<model::Route>,
}

/// [`RouteBody`] as written: borrowed (the decoded form shares the config's route).
#[derive(Serialize)]
struct RouteBodyRef<'a> {
    order: usize,
    route: &'a model::Route,
}

/// A cluster's endpoints, pushed apart from the cluster.
#[derive(Serialize, Deserialize)]
struct EndpointsBody {
    endpoints: Vec<model::Endpoint>,
}

/// A resource's body, decoded once when it arrives. Small (the large kinds boxed): 10,000
/// routes decoded for one push each copied the size of the largest kind.
#[derive(Debug)]
enum Decoded {
    Listener(Box<model::Listener>),
    Route(usize, Arc<model::Route>),
    Cluster(Box<model::Cluster>),
    Endpoints(Vec<model::Endpoint>),
    FilterChain(Box<model::FilterChain>),
    InferencePool(Box<model::InferencePool>),
}

#[derive(Debug, Clone)]
struct Entry {
    resource: Resource,
    decoded: Arc<Decoded>,
    /// Its part of its set's version ([`digest_of`]), hashed once, where it is decoded.
    digest: u64,
}

/// `(type, name)`, shared between the sets that hold the same resource. Looked up as a
/// `(&str, &str)` ([`KeyRef`]): a lookup that built two `String`s cost two allocations per
/// resource of a push.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Key(Arc<(String, String)>);

impl Key {
    fn of(r: &Resource) -> Self {
        Key(Arc::new((r.r#type.clone(), r.name.clone())))
    }
}

/// A key's two parts, borrowed: what [`Key`] is looked up by.
trait KeyRef {
    fn parts(&self) -> (&str, &str);
}

impl KeyRef for Key {
    fn parts(&self) -> (&str, &str) {
        (&self.0 .0, &self.0 .1)
    }
}

impl KeyRef for (&str, &str) {
    fn parts(&self) -> (&str, &str) {
        *self
    }
}

impl<'a> std::borrow::Borrow<dyn KeyRef + 'a> for Key {
    fn borrow(&self) -> &(dyn KeyRef + 'a) {
        self
    }
}

// Ordered as `Key` is: by type, then name.
impl PartialEq for dyn KeyRef + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn KeyRef + '_ {}

impl PartialOrd for dyn KeyRef + '_ {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for dyn KeyRef + '_ {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.parts().cmp(&other.parts())
    }
}

/// What undoes an in-place apply.
#[derive(Debug)]
pub struct Undo(Vec<(Key, Option<Arc<Entry>>)>);

/// Resources by `(type, name)`, each kept both as sent and decoded, so applying a push decodes
/// only what it carries. Keys and entries are shared: a copy of a 10,000-resource set costs
/// reference counts, not 50,000 allocations (the control plane copies its last folder for
/// every endpoint edit).
#[derive(Debug, Clone, Default)]
pub struct ResourceSet {
    items: BTreeMap<Key, Arc<Entry>>,
    /// The XOR of every entry's digest: the set's version, kept up to date as entries come
    /// and go (hashing 10,000 entries for every endpoint edit took ~1 ms).
    digest: u64,
}

/// The hash behind resource versions and set digests: fixed (the same in every process of
/// one weir build) and fast (SipHash over every body of a 10,000-route push was ~2 ms).
pub(crate) fn stable_hash(value: impl Hash) -> u64 {
    foldhash::fast::FixedState::with_seed(0).hash_one(value)
}

/// A resource's part of its set's version: its type, name and version.
fn digest_of(r: &Resource) -> u64 {
    stable_hash((&r.r#type, &r.name, &r.version))
}

impl Entry {
    fn new(resource: Resource, decoded: Decoded) -> Self {
        Entry {
            digest: digest_of(&resource),
            resource,
            decoded: Arc::new(decoded),
        }
    }
}

impl PartialEq for ResourceSet {
    fn eq(&self, other: &Self) -> bool {
        self.items.len() == other.items.len()
            && self
                .items
                .iter()
                .zip(&other.items)
                .all(|((k1, a), (k2, b))| k1 == k2 && same_version(a, b))
    }
}

/// Whether `r` is what the set holds as `e` already (nothing to decode).
fn same_resource(e: &Entry, r: &Resource) -> bool {
    e.resource.version == r.version && e.resource.body == r.body
}

fn same_version(a: &Arc<Entry>, b: &Arc<Entry>) -> bool {
    Arc::ptr_eq(a, b) || a.resource.version == b.resource.version
}

fn entry<T: Serialize>(kind: &str, name: &str, body_of: &T, decoded: Decoded) -> Entry {
    // Room for a typical route at once: growing from empty reallocated ~6 times per body.
    let mut body = Vec::with_capacity(256);
    serde_json::to_writer(&mut body, body_of).expect("model types serialize");
    Entry::new(
        Resource {
            r#type: kind.to_string(),
            name: name.to_string(),
            version: format!("{:016x}", stable_hash(&body)),
            body: body.into(),
        },
        decoded,
    )
}

/// Cluster `name`'s endpoints resource.
fn endpoints_entry(name: &str, endpoints: Vec<model::Endpoint>) -> Entry {
    let body = EndpointsBody { endpoints };
    let decoded = Decoded::Endpoints(body.endpoints.clone());
    entry(ENDPOINTS, name, &body, decoded)
}

fn decode_entry(r: Resource) -> Result<Entry, String> {
    let what = || format!("{} {:?}", r.r#type, r.name);
    let decoded = match r.r#type.as_str() {
        LISTENER => Decoded::Listener(decode(what, &r.body)?),
        ROUTE => {
            let b: RouteBody = decode(what, &r.body)?;
            Decoded::Route(b.order, b.route)
        }
        CLUSTER => Decoded::Cluster(decode(what, &r.body)?),
        ENDPOINTS => Decoded::Endpoints(decode::<EndpointsBody>(what, &r.body)?.endpoints),
        FILTER_CHAIN => Decoded::FilterChain(decode(what, &r.body)?),
        INFERENCE_POOL => Decoded::InferencePool(decode(what, &r.body)?),
        other => return Err(format!("unknown resource type {other:?} ({:?})", r.name)),
    };
    Ok(Entry::new(r, decoded))
}

impl ResourceSet {
    /// Splits `config` into resources (its `admin` section is the proxy's own business and is
    /// not part of it).
    pub fn from_config(config: &Config) -> Self {
        Self::from_span(config, &FileSpan::whole(config))
    }

    /// Only the listeners, routes and clusters in these ranges of `config` (one file of a
    /// policy folder); routes keep their place in the whole config's order.
    pub fn from_span(config: &Config, span: &FileSpan) -> Self {
        let mut entries = Vec::with_capacity(span.routes.len() + 2 * span.clusters.len());
        for f in &config.filter_chains[span.filter_chains.clone()] {
            entries.push(entry(
                FILTER_CHAIN,
                &f.name,
                f,
                Decoded::FilterChain(Box::new(f.clone())),
            ));
        }
        for p in &config.inference_pools[span.inference_pools.clone()] {
            entries.push(entry(
                INFERENCE_POOL,
                &p.name,
                p,
                Decoded::InferencePool(Box::new(p.clone())),
            ));
        }
        let routes = span.routes.clone();
        for l in &config.listeners[span.listeners.clone()] {
            entries.push(entry(
                LISTENER,
                &l.name,
                l,
                Decoded::Listener(Box::new(l.clone())),
            ));
        }
        for (order, r) in config
            .routes
            .iter()
            .enumerate()
            .skip(routes.start)
            .take(routes.len())
        {
            entries.push(entry(
                ROUTE,
                &r.name,
                &RouteBodyRef { order, route: r },
                Decoded::Route(order, r.clone()),
            ));
        }
        for c in &config.clusters[span.clusters.clone()] {
            let mut bare = c.clone();
            let endpoints = std::mem::take(&mut bare.endpoints);
            entries.push(endpoints_entry(&c.name, endpoints));
            entries.push(entry(
                CLUSTER,
                &c.name,
                &bare,
                Decoded::Cluster(Box::new(bare.clone())),
            ));
        }
        Self::from_entries(entries)
    }

    /// A set of `entries`, built at once (inserting 10,000 routes one by one took twice as
    /// long).
    fn from_entries(entries: Vec<Entry>) -> Self {
        Self::from_items(
            entries
                .into_iter()
                .map(|e| (Key::of(&e.resource), Arc::new(e))),
        )
    }

    /// A set of `items`: collecting a `BTreeMap` sorts them (stably: of equal keys the last
    /// wins, as with inserts) and builds the tree in one pass.
    fn from_items(items: impl IntoIterator<Item = (Key, Arc<Entry>)>) -> Self {
        let items: BTreeMap<Key, Arc<Entry>> = items.into_iter().collect();
        let digest = items.values().fold(0, |d, e| d ^ e.digest);
        Self { items, digest }
    }

    /// Applies added or replaced resources in place, returning what undoes it: for the hot
    /// path of small deltas (endpoint churn), where copying the whole set would dominate.
    pub fn apply_in_place(&mut self, resources: Vec<Resource>) -> Result<Undo, String> {
        let mut undo = Undo(Vec::with_capacity(resources.len()));
        for r in resources {
            let e = match decode_entry(r) {
                Ok(e) => e,
                Err(err) => {
                    self.undo(undo);
                    return Err(err);
                }
            };
            let key = Key::of(&e.resource);
            let previous = self.put(key.clone(), Arc::new(e));
            undo.0.push((key, previous));
        }
        Ok(undo)
    }

    /// Reverts an [`ResourceSet::apply_in_place`].
    pub fn undo(&mut self, undo: Undo) {
        for (key, previous) in undo.0.into_iter().rev() {
            match previous {
                Some(e) => self.put(key, e),
                None => self.take(&key),
            };
        }
    }

    /// The endpoints resource of cluster `name`.
    pub fn endpoints(&self, name: &str) -> Option<Vec<model::Endpoint>> {
        match self
            .items
            .get(&(ENDPOINTS, name) as &dyn KeyRef)
            .map(|e| &*e.decoded)
        {
            Some(Decoded::Endpoints(eps)) => Some(eps.clone()),
            _ => None,
        }
    }

    /// The set's digest leaving out resources of type `ty`: equal for two sets that differ
    /// only in those (two configs that differ only in endpoints, for `ENDPOINTS`).
    pub fn digest_except(&self, ty: &str) -> u64 {
        self.items
            .iter()
            .filter(|(k, _)| k.parts().0 != ty)
            .fold(0, |d, (_, e)| d ^ e.digest)
    }

    /// Whether this set holds cluster `name`'s endpoints.
    pub fn has_endpoints(&self, name: &str) -> bool {
        self.items.contains_key(&(ENDPOINTS, name) as &dyn KeyRef)
    }

    /// Replaces the endpoints resources of these clusters where this set has them.
    pub fn replace_endpoints(&mut self, changes: &[(String, Vec<model::Endpoint>)]) {
        for (name, endpoints) in changes {
            if self.has_endpoints(name) {
                self.insert(endpoints_entry(name, endpoints.clone()));
            }
        }
    }

    /// Adds every resource of `other` (which wins on equal keys).
    pub fn merge(&mut self, other: &ResourceSet) {
        if self.items.is_empty() {
            self.clone_from(other);
            return;
        }
        for (k, e) in &other.items {
            self.put(k.clone(), e.clone());
        }
    }

    fn insert(&mut self, e: Entry) {
        self.put(Key::of(&e.resource), Arc::new(e));
    }

    /// Adds or replaces an entry (every change to `items` goes through here or [`Self::take`]).
    fn put(&mut self, key: Key, e: Arc<Entry>) -> Option<Arc<Entry>> {
        self.digest ^= e.digest;
        let previous = self.items.insert(key, e);
        if let Some(p) = &previous {
            self.digest ^= p.digest;
        }
        previous
    }

    fn take(&mut self, key: &dyn KeyRef) -> Option<Arc<Entry>> {
        let (_, e) = self.items.remove_entry(key)?;
        self.digest ^= e.digest;
        Some(e)
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// A version for the whole set: equal sets, equal versions.
    pub fn version(&self) -> String {
        format!("{:016x}", self.digest)
    }

    /// Every resource, for a full-state push.
    pub fn all(&self) -> Vec<Resource> {
        self.items.values().map(|e| e.resource.clone()).collect()
    }

    /// What turns `self` into `newer`: resources added or changed, and keys removed. One walk
    /// over both sorted maps side by side (an endpoint change in a 10,000-route set costs a
    /// pass, not 10,000 lookups).
    pub fn diff(&self, newer: &ResourceSet) -> (Vec<Resource>, Vec<ResourceKey>) {
        use std::cmp::Ordering;
        let key = |Key(k): &Key| ResourceKey {
            r#type: k.0.clone(),
            name: k.1.clone(),
        };
        let (mut changed, mut removed) = (Vec::new(), Vec::new());
        let mut old = self.items.iter().peekable();
        let mut new = newer.items.iter().peekable();
        loop {
            let order = match (old.peek(), new.peek()) {
                (None, None) => break,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some((ko, _)), Some((kn, _))) if Arc::ptr_eq(&ko.0, &kn.0) => Ordering::Equal,
                (Some((ko, _)), Some((kn, _))) => ko.cmp(kn),
            };
            match order {
                Ordering::Less => {
                    if let Some((k, _)) = old.next() {
                        removed.push(key(k));
                    }
                }
                Ordering::Greater => {
                    if let Some((_, e)) = new.next() {
                        changed.push(e.resource.clone());
                    }
                }
                Ordering::Equal => {
                    if let (Some((_, o)), Some((_, n))) = (old.next(), new.next()) {
                        if !same_version(o, n) {
                            changed.push(n.resource.clone());
                        }
                    }
                }
            }
        }
        (changed, removed)
    }

    /// Applies a push: a full state replaces everything, a delta adds, replaces and removes.
    /// Fails, leaving `self` as it was, on an unknown type or a body that does not decode.
    pub fn apply(
        &mut self,
        full_state: bool,
        resources: Vec<Resource>,
        removed: &[ResourceKey],
    ) -> Result<(), String> {
        if full_state || resources.len() + removed.len() >= BULK_FROM.max(self.items.len() / 8) {
            return self.apply_bulk(full_state, resources, removed);
        }
        // What the set holds already is kept as it is; the rest is decoded before anything
        // changes.
        let mut changed = Vec::new();
        // A changed resource's key as this set has it, to use again.
        let mut keys = Vec::new();
        for r in resources {
            match self
                .items
                .get_key_value(&(r.r#type.as_str(), r.name.as_str()) as &dyn KeyRef)
            {
                Some((_, e)) if same_resource(e, &r) => {}
                found => {
                    keys.push(found.map(|(k, _)| k.clone()));
                    changed.push(r);
                }
            }
        }
        let decoded = decode_all(changed)?;
        for k in removed {
            self.take(&(k.r#type.as_str(), k.name.as_str()));
        }
        for (e, key) in decoded.into_iter().zip(keys) {
            let key = key.unwrap_or_else(|| Key::of(&e.resource));
            self.put(key, Arc::new(e));
        }
        Ok(())
    }

    /// [`Self::apply`] of a full state or a large delta: the set is rebuilt in one pass over
    /// itself and the push, both in key order, instead of a lookup and an insert per resource
    /// (~5 ms at 10,000 routes, against ~1).
    fn apply_bulk(
        &mut self,
        full_state: bool,
        mut resources: Vec<Resource>,
        removed: &[ResourceKey],
    ) -> Result<(), String> {
        fn key_of(r: &Resource) -> (&str, &str) {
            (&r.r#type, &r.name)
        }
        // A control plane sends its resources in key order; the stable sort then only checks
        // that. Of equal keys the last wins, as with one insert after the other.
        resources.sort_by(|a, b| key_of(a).cmp(&key_of(b)));
        let mut last_of_each: Vec<Resource> = Vec::with_capacity(resources.len());
        for r in resources {
            match last_of_each.last_mut() {
                Some(prev) if key_of(prev) == key_of(&r) => *prev = r,
                _ => last_of_each.push(r),
            }
        }
        let removed: std::collections::HashSet<(&str, &str), foldhash::fast::RandomState> = removed
            .iter()
            .map(|k| (k.r#type.as_str(), k.name.as_str()))
            .collect();
        // The new set in key order: entries kept as they are, and places for decoded ones.
        enum Slot {
            Kept(Key, Arc<Entry>),
            Decoded(Option<Key>),
        }
        let mut slots = Vec::with_capacity(self.items.len().max(last_of_each.len()));
        let mut changed = Vec::new();
        let mut old = self.items.iter().peekable();
        let keep_untouched = |slots: &mut Vec<Slot>, k: &Key, e: &Arc<Entry>| {
            if !full_state && !removed.contains(&k.parts()) {
                slots.push(Slot::Kept(k.clone(), e.clone()));
            }
        };
        for r in last_of_each {
            while let Some((k, e)) = old.next_if(|(k, _)| k.parts() < key_of(&r)) {
                keep_untouched(&mut slots, k, e);
            }
            match old.next_if(|(k, _)| k.parts() == key_of(&r)) {
                Some((k, e)) if same_resource(e, &r) => {
                    slots.push(Slot::Kept(k.clone(), e.clone()))
                }
                found => {
                    slots.push(Slot::Decoded(found.map(|(k, _)| k.clone())));
                    changed.push(r);
                }
            }
        }
        for (k, e) in old {
            keep_untouched(&mut slots, k, e);
        }
        let mut decoded = decode_all(changed)?.into_iter();
        *self = Self::from_items(slots.into_iter().filter_map(|slot| match slot {
            Slot::Kept(k, e) => Some((k, e)),
            Slot::Decoded(key) => {
                let e = decoded.next()?;
                Some((key.unwrap_or_else(|| Key::of(&e.resource)), Arc::new(e)))
            }
        }));
        Ok(())
    }

    /// Rebuilds the config. Fails on endpoints for a cluster that is missing (and vice versa).
    pub fn to_config(&self) -> Result<Config, String> {
        let mut config = Config::default();
        let mut routes: Vec<(usize, Arc<model::Route>)> = Vec::new();
        let mut endpoints: BTreeMap<&str, &Vec<model::Endpoint>> = BTreeMap::new();
        for (key, e) in &self.items {
            let name = &key.0 .1;
            match &*e.decoded {
                Decoded::Listener(l) => config.listeners.push((**l).clone()),
                Decoded::Route(order, r) => routes.push((*order, r.clone())),
                Decoded::Cluster(c) => config.clusters.push((**c).clone()),
                Decoded::FilterChain(f) => config.filter_chains.push((**f).clone()),
                Decoded::InferencePool(p) => config.inference_pools.push((**p).clone()),
                Decoded::Endpoints(eps) => {
                    endpoints.insert(name.as_str(), eps);
                }
            }
        }
        routes.sort_by_key(|(order, _)| *order);
        config.routes = routes.into_iter().map(|(_, r)| r).collect();
        for c in &mut config.clusters {
            c.endpoints = endpoints
                .remove(c.name.as_str())
                .ok_or_else(|| format!("cluster {:?} has no endpoints resource", c.name))?
                .clone();
        }
        if let Some(name) = endpoints.keys().next() {
            return Err(format!("endpoints for unknown cluster {name:?}"));
        }
        Ok(config)
    }
}

/// From this many resources on (or an eighth of the set, if more) a push rebuilds the set
/// rather than changing it in place.
const BULK_FROM: usize = 64;

/// Below this many resources a push is decoded on the calling thread.
const DECODE_ALONE_BELOW: usize = 512;

/// Decodes `resources` in order, a large push on every CPU (at 10,000 routes, decoding is
/// 15-25 ms of a config change on one thread).
fn decode_all(resources: Vec<Resource>) -> Result<Vec<Entry>, String> {
    let threads = weir_policies::config_threads();
    if resources.len() < DECODE_ALONE_BELOW || threads < 2 {
        return resources.into_iter().map(decode_entry).collect();
    }
    let per_thread = resources.len().div_ceil(threads);
    let mut chunks = Vec::with_capacity(threads);
    let mut rest = resources;
    while rest.len() > per_thread {
        let tail = rest.split_off(per_thread);
        chunks.push(rest);
        rest = tail;
    }
    chunks.push(rest);
    let decoded = weir_policies::on_threads(chunks, |c| {
        c.into_iter()
            .map(decode_entry)
            .collect::<Result<Vec<_>, _>>()
    });
    let mut all = Vec::new();
    for part in decoded {
        all.extend(part?);
    }
    Ok(all)
}

/// Decodes a body; `what` names the resource in the error (formatted only then).
fn decode<T: for<'de> Deserialize<'de>>(
    what: impl FnOnce() -> String,
    body: &[u8],
) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("{}: {e}", what()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
listeners: [{ name: l, address: "127.0.0.1:1" }]
routes:
  - { name: first, match: { path: { prefix: /a } }, route: { cluster: c } }
  - { name: second, route: { cluster: c } }
clusters:
  - { name: c, endpoints: [{ address: "127.0.0.1:2" }] }
"#;

    fn config(text: &str) -> Config {
        weir_policies::parse("t.yaml", text).unwrap()
    }

    #[test]
    fn round_trips_and_keeps_route_order() {
        let c = config(CONFIG);
        let set = ResourceSet::from_config(&c);
        assert_eq!(set.len(), 5);
        assert_eq!(set.to_config().unwrap(), c);
    }

    #[test]
    fn a_large_push_decodes_on_several_threads_in_order_and_fails_whole() {
        let mut text =
            String::from("listeners: [{ name: l, address: \"127.0.0.1:1\" }]\nroutes:\n");
        for i in 0..2 * DECODE_ALONE_BELOW {
            text.push_str(&format!("  - {{ name: r{i}, match: {{ path: {{ prefix: /r{i} }} }}, route: {{ cluster: c }} }}\n"));
        }
        text.push_str("clusters: [{ name: c, endpoints: [{ address: \"127.0.0.1:2\" }] }]\n");
        let c = config(&text);
        let mut pushed = ResourceSet::default();
        pushed
            .apply(true, ResourceSet::from_config(&c).all(), &[])
            .unwrap();
        assert_eq!(pushed.to_config().unwrap(), c);

        // One bad body anywhere fails the push and leaves the set as it was.
        let mut resources = ResourceSet::from_config(&c.clone()).all();
        resources[0].body = b"{".to_vec().into();
        resources[0].version = "broken".into();
        let name = resources[0].name.clone();
        let before = pushed.clone();
        let e = pushed.apply(true, resources, &[]).unwrap_err();
        assert!(e.contains(&name), "{e}");
        assert_eq!(pushed, before);
        assert_eq!(pushed.to_config().unwrap(), c);
    }

    #[test]
    fn a_folder_set_is_the_union_of_its_files_sets() {
        let files = [
            ("a.yaml".to_string(), CONFIG.to_string()),
            (
                "b.yaml".to_string(),
                "routes: [{ name: third, route: { cluster: d } }]\nclusters: [{ name: d, endpoints: [{ address: \"127.0.0.1:4\" }] }]\n"
                    .to_string(),
            ),
        ];
        let (snapshot, spans) = weir_policies::load_many(&files).unwrap();
        let mut union = ResourceSet::default();
        for s in &spans {
            union.merge(&ResourceSet::from_span(&snapshot.source, s));
        }
        let whole = ResourceSet::from_config(&snapshot.source);
        assert_eq!(union.len(), 8);
        assert!(union == whole);
        assert_eq!(union.version(), whole.version());
    }

    #[test]
    fn endpoint_change_diffs_to_one_resource() {
        let a = ResourceSet::from_config(&config(CONFIG));
        let b = ResourceSet::from_config(&config(&CONFIG.replace("127.0.0.1:2", "127.0.0.1:3")));
        let (changed, removed) = a.diff(&b);
        assert_eq!(changed.len(), 1);
        assert_eq!(
            (changed[0].r#type.as_str(), changed[0].name.as_str()),
            (ENDPOINTS, "c")
        );
        assert!(removed.is_empty());
        let mut applied = a.clone();
        applied.apply(false, changed, &removed).unwrap();
        assert_eq!(applied, b);
        assert_ne!(a.version(), b.version());
    }

    #[test]
    fn a_diff_turns_one_set_into_the_other_both_ways() {
        let a = ResourceSet::from_config(&config(CONFIG));
        let b = ResourceSet::from_config(&config(
            &CONFIG
                .replace("name: second", "name: third")
                .replace("127.0.0.1:2", "127.0.0.1:3"),
        ));
        for (from, to) in [(&a, &b), (&b, &a)] {
            let (changed, removed) = from.diff(to);
            assert_eq!(removed.len(), 1, "one route gone");
            assert_eq!(changed.len(), 2, "one route new, one endpoint set changed");
            let mut applied = from.clone();
            applied.apply(false, changed, &removed).unwrap();
            assert!(applied == *to);
        }
        assert_eq!(a.diff(&a), (vec![], vec![]));
    }

    #[test]
    fn a_large_delta_rebuilds_the_set_as_single_changes_would() {
        let routes = |n: usize, edit: &dyn Fn(usize) -> String| {
            let mut text =
                String::from("listeners: [{ name: l, address: \"127.0.0.1:1\" }]\nroutes:\n");
            for i in 0..n {
                text.push_str(&format!(
                    "  - {{ name: r{i}, match: {{ path: {{ prefix: /{} }} }}, route: {{ cluster: c }} }}\n",
                    edit(i)
                ));
            }
            text.push_str("clusters: [{ name: c, endpoints: [{ address: \"127.0.0.1:2\" }] }]\n");
            ResourceSet::from_config(&config(&text))
        };
        let a = routes(300, &|i| format!("a{i}"));
        // Every third route changed, the last 50 gone, none added.
        let b = routes(250, &|i| {
            if i % 3 == 0 {
                format!("b{i}")
            } else {
                format!("a{i}")
            }
        });
        let (mut changed, removed) = a.diff(&b);
        assert_eq!((changed.len(), removed.len()), (84, 50));
        assert!(
            changed.len() + removed.len() >= BULK_FROM,
            "takes the bulk path"
        );
        let mut bulk = a.clone();
        bulk.apply(false, changed.clone(), &removed).unwrap();
        assert!(bulk == b);
        assert_eq!(bulk.version(), b.version());
        assert_eq!(bulk.to_config().unwrap(), b.to_config().unwrap());

        // Out of order, and a resource twice: the later one wins, as one apply after the
        // other gives.
        changed.reverse();
        let mut stale = changed[0].clone();
        stale.body = a
            .items
            .iter()
            .find(|(k, _)| k.parts() == key(&stale))
            .unwrap()
            .1
            .resource
            .body
            .clone();
        stale.version = "stale".into();
        changed.insert(0, stale);
        let mut one_by_one = a.clone();
        for r in &changed {
            one_by_one.apply(false, vec![r.clone()], &[]).unwrap();
        }
        one_by_one.apply(false, vec![], &removed).unwrap();
        let mut bulk = a.clone();
        bulk.apply(false, changed, &removed).unwrap();
        assert!(bulk == one_by_one && bulk == b);
        assert_eq!(bulk.version(), b.version());
    }

    fn key(r: &Resource) -> (&str, &str) {
        (&r.r#type, &r.name)
    }

    #[test]
    fn in_place_apply_can_be_undone() {
        let a = ResourceSet::from_config(&config(CONFIG));
        let b = ResourceSet::from_config(&config(&CONFIG.replace("127.0.0.1:2", "127.0.0.1:3")));
        let (changed, _) = a.diff(&b);
        let mut set = a.clone();
        let undo = set.apply_in_place(changed).unwrap();
        assert_eq!(set, b);
        assert_eq!(set.version(), b.version());
        assert_eq!(set.endpoints("c").unwrap()[0].address, "127.0.0.1:3");
        set.undo(undo);
        assert_eq!(set, a);
        assert_eq!(set.version(), a.version());
        assert_ne!(a.version(), b.version());

        // The version follows every kind of change: as built, it equals a set built anew.
        let mut edited = a.clone();
        edited.replace_endpoints(&[("c".into(), b.endpoints("c").unwrap())]);
        assert_eq!(edited.version(), b.version());
        let (changed, removed) = b.diff(&a);
        let mut full = b.clone();
        full.apply(true, a.all(), &[]).unwrap();
        assert_eq!(full.version(), a.version());
        full.apply(false, changed.clone(), &removed).unwrap();
        assert_eq!(full.version(), a.version(), "{changed:?}");
        let mut merged = ResourceSet::default();
        merged.merge(&b);
        assert_eq!(merged.version(), b.version());
    }

    #[test]
    fn removals_and_bad_sets_are_reported() {
        let a = ResourceSet::from_config(&config(CONFIG));
        let b = ResourceSet::from_config(&config(
            &CONFIG.replace("  - { name: second, route: { cluster: c } }\n", ""),
        ));
        let (_, removed) = a.diff(&b);
        assert_eq!(removed.len(), 1);
        let mut orphan = a.clone();
        let cluster_key = ResourceKey {
            r#type: CLUSTER.into(),
            name: "c".into(),
        };
        orphan.apply(false, vec![], &[cluster_key]).unwrap();
        assert!(orphan
            .to_config()
            .unwrap_err()
            .contains("endpoints for unknown cluster"));
        let mut bad = a;
        let secret = Resource {
            r#type: "secret".into(),
            name: "x".into(),
            version: "1".into(),
            body: b"1".to_vec().into(),
        };
        assert!(bad
            .apply(false, vec![secret], &[])
            .unwrap_err()
            .contains("unknown resource type"));
        let garbage = Resource {
            r#type: ROUTE.into(),
            name: "x".into(),
            version: "1".into(),
            body: b"{not json".to_vec().into(),
        };
        assert!(bad
            .apply(false, vec![garbage], &[])
            .unwrap_err()
            .contains("route \"x\""));
    }
}
