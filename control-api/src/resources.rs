//! A config as a set of named, individually versioned resources, and back. Shared by the
//! control plane (which diffs sets to push only what changed) and the proxy (which applies
//! pushes to its set and rebuilds the config from it).

use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

use serde::{Deserialize, Serialize};
use weir_policies::model::{self, Config};

use crate::pb::{Resource, ResourceKey};

pub const LISTENER: &str = "listener";
pub const ROUTE: &str = "route";
pub const CLUSTER: &str = "cluster";
pub const ENDPOINTS: &str = "endpoints";

/// A route keeps its place in the ordered route list (first match wins).
#[derive(Serialize, Deserialize)]
struct RouteBody {
    order: usize,
    route: model::Route,
}

/// A cluster's endpoints, pushed apart from the cluster.
#[derive(Serialize, Deserialize)]
struct EndpointsBody {
    endpoints: Vec<model::Endpoint>,
}

/// Resources by `(type, name)`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResourceSet {
    items: BTreeMap<(String, String), Resource>,
}

fn resource<T: Serialize>(kind: &str, name: &str, body: &T) -> Resource {
    let body = serde_json::to_vec(body).expect("model types serialize");
    let mut h = DefaultHasher::new();
    body.hash(&mut h);
    Resource {
        r#type: kind.to_string(),
        name: name.to_string(),
        version: format!("{:016x}", h.finish()),
        body,
    }
}

impl ResourceSet {
    /// Splits `config` into resources (its `admin` section is the proxy's own business and is
    /// not part of it).
    pub fn from_config(config: &Config) -> Self {
        let mut set = Self::default();
        for l in &config.listeners {
            set.insert(resource(LISTENER, &l.name, l));
        }
        for (order, r) in config.routes.iter().enumerate() {
            set.insert(resource(
                ROUTE,
                &r.name,
                &RouteBody {
                    order,
                    route: r.clone(),
                },
            ));
        }
        for c in &config.clusters {
            let mut bare = c.clone();
            let endpoints = std::mem::take(&mut bare.endpoints);
            set.insert(resource(CLUSTER, &c.name, &bare));
            set.insert(resource(ENDPOINTS, &c.name, &EndpointsBody { endpoints }));
        }
        set
    }

    fn insert(&mut self, r: Resource) {
        self.items.insert((r.r#type.clone(), r.name.clone()), r);
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// A version for the whole set: equal sets, equal versions.
    pub fn version(&self) -> String {
        let mut h = DefaultHasher::new();
        for (k, r) in &self.items {
            k.hash(&mut h);
            r.version.hash(&mut h);
        }
        format!("{:016x}", h.finish())
    }

    /// Every resource, for a full-state push.
    pub fn all(&self) -> Vec<Resource> {
        self.items.values().cloned().collect()
    }

    /// What turns `self` into `newer`: resources added or changed, and keys removed.
    pub fn diff(&self, newer: &ResourceSet) -> (Vec<Resource>, Vec<ResourceKey>) {
        let changed = newer
            .items
            .iter()
            .filter(|(k, r)| {
                self.items
                    .get(*k)
                    .is_none_or(|old| old.version != r.version)
            })
            .map(|(_, r)| r.clone())
            .collect();
        let removed = self
            .items
            .keys()
            .filter(|k| !newer.items.contains_key(*k))
            .map(|(t, n)| ResourceKey {
                r#type: t.clone(),
                name: n.clone(),
            })
            .collect();
        (changed, removed)
    }

    /// Applies a push: a full state replaces everything, a delta adds, replaces and removes.
    pub fn apply(&mut self, full_state: bool, resources: Vec<Resource>, removed: &[ResourceKey]) {
        if full_state {
            self.items.clear();
        }
        for k in removed {
            self.items.remove(&(k.r#type.clone(), k.name.clone()));
        }
        for r in resources {
            self.insert(r);
        }
    }

    /// Rebuilds the config. Fails on an unknown type, a body that does not decode, or
    /// endpoints for a cluster that is missing (and vice versa).
    pub fn to_config(&self) -> Result<Config, String> {
        let mut config = Config::default();
        let mut routes: Vec<(usize, model::Route)> = Vec::new();
        let mut endpoints: BTreeMap<&str, Vec<model::Endpoint>> = BTreeMap::new();
        for ((kind, name), r) in &self.items {
            let what = format!("{kind} {name:?}");
            match kind.as_str() {
                LISTENER => config.listeners.push(decode(&what, &r.body)?),
                ROUTE => {
                    let b: RouteBody = decode(&what, &r.body)?;
                    routes.push((b.order, b.route));
                }
                CLUSTER => config.clusters.push(decode(&what, &r.body)?),
                ENDPOINTS => {
                    let b: EndpointsBody = decode(&what, &r.body)?;
                    endpoints.insert(name.as_str(), b.endpoints);
                }
                other => return Err(format!("unknown resource type {other:?} ({name:?})")),
            }
        }
        routes.sort_by_key(|(order, _)| *order);
        config.routes = routes.into_iter().map(|(_, r)| r).collect();
        for c in &mut config.clusters {
            c.endpoints = endpoints
                .remove(c.name.as_str())
                .ok_or_else(|| format!("cluster {:?} has no endpoints resource", c.name))?;
        }
        if let Some(name) = endpoints.keys().next() {
            return Err(format!("endpoints for unknown cluster {name:?}"));
        }
        Ok(config)
    }
}

fn decode<T: for<'de> Deserialize<'de>>(what: &str, body: &[u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("{what}: {e}"))
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
        applied.apply(false, changed, &removed);
        assert_eq!(applied, b);
        assert_ne!(a.version(), b.version());
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
        orphan.apply(
            false,
            vec![],
            &[ResourceKey {
                r#type: CLUSTER.into(),
                name: "c".into(),
            }],
        );
        assert!(orphan
            .to_config()
            .unwrap_err()
            .contains("endpoints for unknown cluster"));
        let mut bad = a;
        bad.apply(false, vec![resource("secret", "x", &1)], &[]);
        assert!(bad
            .to_config()
            .unwrap_err()
            .contains("unknown resource type"));
    }
}
