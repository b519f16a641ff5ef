//! Turns a parsed [`Config`] into a [`Snapshot`], collecting every problem with the path of the
//! field it concerns.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use regex::Regex;

use crate::model::{self, Config};
use crate::snapshot::*;

/// A problem found by validation: the field path and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub field: String,
    pub message: String,
}

/// Validates and compiles `config`. On failure returns every problem found, not just the first.
/// The snapshot's `version` is left empty for the caller to set.
pub fn compile(config: Config) -> Result<Snapshot, Vec<Problem>> {
    compile_shared(Arc::new(config))
}

/// [`compile`] of a config that others read at the same time (it becomes the snapshot's
/// `source`).
pub fn compile_shared(config: Arc<Config>) -> Result<Snapshot, Vec<Problem>> {
    let previous = lock_cache().clone();
    let mut v = Validator {
        regexes: Regexes::with_capacity_and_hasher(previous.len(), Default::default()),
        previous,
        ..Validator::default()
    };
    let admin = config
        .admin
        .as_ref()
        .and_then(|a| v.socket_addr("admin.address", &a.address));
    let filter_chains = v.filter_chains(&config.filter_chains);
    let chain_index: HashMap<&str, usize> = filter_chains
        .iter()
        .enumerate()
        .map(|(i, c)| (c.name.as_str(), i))
        .collect();
    let mut listeners = v.listeners(&config.listeners, admin);
    for (i, l) in config.listeners.iter().enumerate() {
        let chain = v.chain_ref(
            At::Text("listeners").item(i).field("filter_chain"),
            &l.filter_chain,
            &chain_index,
        );
        if let Some(compiled) = listeners.iter_mut().find(|c| c.name == l.name) {
            compiled.filter_chain = chain;
        }
    }
    let (mut clusters, mut cluster_index) = v.clusters(&config.clusters);
    let pools = v.pools(&config.inference_pools, &mut clusters, &mut cluster_index);
    let pool_index: HashMap<&str, usize> = pools
        .iter()
        .enumerate()
        .map(|(i, p)| (p.name.as_str(), i))
        .collect();
    let mut routes = v.routes(&config, &cluster_index, &clusters, &pools, &pool_index);
    for (i, r) in config.routes.iter().enumerate() {
        let chain = v.chain_ref(
            At::Text("routes").item(i).field("filter_chain"),
            &r.filter_chain,
            &chain_index,
        );
        if let Some(compiled) = routes.get_mut(i) {
            compiled.filter_chain = chain;
        }
    }
    if let Some(out) = config.fast_path.as_ref().and_then(|f| f.outbound()) {
        v.outbound_capture(out, config.fast_path.as_deref(), &listeners);
    }
    if let Some(t) = &config.tracing {
        if !(t.otlp_endpoint.starts_with("http://") || t.otlp_endpoint.starts_with("https://")) {
            v.problem(
                "tracing.otlp_endpoint",
                "expected a URL such as http://127.0.0.1:4317",
            );
        }
        if !(0.0..=1.0).contains(&t.sampling) {
            v.problem("tracing.sampling", "must be between 0 and 1");
        }
        if t.queue == 0 {
            v.problem("tracing.queue", "must be at least 1");
        }
    }
    if let Some(m) = &config.otlp_metrics {
        if !(m.endpoint.starts_with("http://") || m.endpoint.starts_with("https://")) {
            v.problem(
                "otlp_metrics.endpoint",
                "expected a URL such as http://127.0.0.1:4317",
            );
        }
        if m.interval.is_zero() {
            v.problem("otlp_metrics.interval", "must be positive");
        }
    }
    if let Some(log) = &config.access_log {
        if log.path.is_empty() {
            v.problem("access_log.path", "stdout, or a file path");
        }
        if log.buffer == 0 {
            v.problem("access_log.buffer", "must be at least 1");
        }
        if log.fields.is_empty() {
            v.problem("access_log.fields", "name at least one field");
        }
    }
    if !v.problems.is_empty() {
        return Err(v.problems);
    }
    // Keep exactly the live set, so the cache never outgrows one config.
    *lock_cache() = Arc::new(std::mem::take(&mut v.regexes));
    Ok(Snapshot {
        version: String::new(),
        source: config,
        admin,
        listeners,
        routes: Arc::new(routes),
        clusters,
        cluster_index,
        filter_chains: Arc::new(filter_chains),
        pools: Arc::new(pools),
    })
}

/// A new snapshot with the endpoints of some clusters replaced, sharing everything else with
/// `old` (routes are not rebuilt): the cost is that of the change, not of the config.
pub fn with_endpoints(
    old: &Snapshot,
    changes: &[(String, Vec<model::Endpoint>)],
) -> Result<Snapshot, Vec<Problem>> {
    let mut v = Validator::default();
    let mut clusters = old.clusters.clone();
    for (name, raw) in changes {
        let Some(id) = old.cluster_id(name) else {
            v.problem(
                format!("clusters.{name}"),
                format!("endpoints for unknown cluster {name:?}"),
            );
            continue;
        };
        clusters[id].endpoints = v.endpoints(&format!("clusters[{id}]"), raw);
    }
    if !v.problems.is_empty() {
        return Err(v.problems);
    }
    Ok(Snapshot {
        version: String::new(),
        source: old.source.clone(),
        admin: old.admin,
        listeners: old.listeners.clone(),
        routes: old.routes.clone(),
        clusters,
        cluster_index: old.cluster_index.clone(),
        filter_chains: old.filter_chains.clone(),
        pools: old.pools.clone(),
    })
}

/// A short stable hash of a config's text, so equal files get equal versions.
pub fn content_version(text: &str) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    format!("{:016x}", h.finish())
}

/// Compiled regexes by pattern. foldhash, not SipHash: 10,000 routes look up and insert
/// 10,000 patterns per compile, and SipHash was most of that.
type Regexes = HashMap<Arc<str>, Arc<Regex>, foldhash::fast::RandomState>;

/// What a route may point at: clusters by name, the compiled clusters, and inference pools
/// with their index by name.
type RouteTargets<'a> = (
    &'a HashMap<String, usize>,
    &'a [Cluster],
    (&'a [InferencePool], &'a HashMap<&'a str, usize>),
);

/// The longest listener timeout taken (a longer one would overflow the clock's deadlines).
const MAX_LISTENER_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);

/// The largest `max_request_headers_kb`: pingora refuses request heads over 1 MiB itself.
const MAX_REQUEST_HEADERS_KB: u32 = 1023;

/// Below this many routes one thread compiles them (10,000 take ~10 ms on one).
const COMPILE_ALONE_BELOW: usize = 1024;

#[derive(Default)]
struct Validator {
    problems: Vec<Problem>,
    /// The regexes this config uses.
    regexes: Regexes,
    /// The last compiled config's ([`REGEX_CACHE`]).
    previous: Arc<Regexes>,
}

/// Regexes of the last compiled config. Compiling a regex costs far more than everything else
/// about a route, and a new config mostly repeats the previous one's: reusing them makes a
/// push of 10,000 routes with one change cost about what the change costs.
static REGEX_CACHE: std::sync::LazyLock<std::sync::Mutex<Arc<Regexes>>> =
    std::sync::LazyLock::new(Default::default);

fn lock_cache() -> std::sync::MutexGuard<'static, Arc<Regexes>> {
    REGEX_CACHE.lock().unwrap_or_else(|p| p.into_inner())
}

/// A field's path (`routes[3].match.path`), written out only when a problem is reported:
/// formatting the path of every field of 10,000 routes was a fifth of a compile.
#[derive(Clone, Copy)]
enum At<'a> {
    Text(&'a str),
    Field(&'a At<'a>, &'static str),
    Item(&'a At<'a>, usize),
}

impl<'a> At<'a> {
    fn field(&'a self, name: &'static str) -> At<'a> {
        At::Field(self, name)
    }

    fn item(&'a self, index: usize) -> At<'a> {
        At::Item(self, index)
    }
}

impl std::fmt::Display for At<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            At::Text(text) => f.write_str(text),
            At::Field(parent, name) => write!(f, "{parent}.{name}"),
            At::Item(parent, index) => write!(f, "{parent}[{index}]"),
        }
    }
}

impl Validator {
    fn problem(&mut self, field: impl std::fmt::Display, message: impl Into<String>) {
        self.problems.push(Problem {
            field: field.to_string(),
            message: message.into(),
        });
    }

    fn socket_addr(&mut self, field: &str, text: &str) -> Option<SocketAddr> {
        match text.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.problem(
                    field,
                    format!("expected ip:port (e.g. 127.0.0.1:8080), got {text:?}; DNS names are not supported"),
                );
                None
            }
        }
    }

    fn regex(&mut self, field: At, text: &str) -> Option<Arc<Regex>> {
        if let Some((pattern, r)) = self.previous.get_key_value(text) {
            self.regexes.insert(pattern.clone(), r.clone());
            return Some(r.clone());
        }
        if let Some(r) = self.regexes.get(text) {
            return Some(r.clone());
        }
        // Anchored: a route regex must match the whole value, as in Envoy.
        match Regex::new(&format!("^(?:{text})$")).map(Arc::new) {
            Ok(r) => {
                self.regexes.insert(text.into(), r.clone());
                Some(r)
            }
            Err(e) => {
                self.problem(field, format!("invalid regex {text:?}: {e}"));
                None
            }
        }
    }

    /// Names must be set and unique; `field` gives the path of the name at an index.
    fn unique<'a>(
        &mut self,
        what: &str,
        field: impl Fn(usize) -> String,
        names: impl Iterator<Item = &'a str>,
    ) {
        let mut seen: HashSet<&str, foldhash::fast::RandomState> =
            HashSet::with_capacity_and_hasher(names.size_hint().0, Default::default());
        for (i, name) in names.enumerate() {
            if name.is_empty() {
                self.problem(field(i), format!("{what} name must not be empty"));
            } else if !seen.insert(name) {
                self.problem(field(i), format!("duplicate {what} name {name:?}"));
            }
        }
    }

    fn listeners(&mut self, raw: &[model::Listener], admin: Option<SocketAddr>) -> Vec<Listener> {
        self.unique(
            "listener",
            |i| format!("listeners[{i}].name"),
            raw.iter().map(|l| l.name.as_str()),
        );
        let mut out: Vec<Listener> = Vec::new();
        for (i, l) in raw.iter().enumerate() {
            let field = format!("listeners[{i}].address");
            let Some(address) = self.socket_addr(&field, &l.address) else {
                continue;
            };
            if let Some(other) = out.iter().find(|o| overlaps(o.address, address)) {
                self.problem(
                    field,
                    format!(
                        "{address} overlaps listener {:?} on {}",
                        other.name, other.address
                    ),
                );
                continue;
            }
            if admin.is_some_and(|a| overlaps(a, address)) {
                self.problem(field, format!("{address} overlaps the admin address"));
                continue;
            }
            if !(1..=MAX_REQUEST_HEADERS_KB).contains(&l.max_request_headers_kb) {
                self.problem(
                    format!("listeners[{i}].max_request_headers_kb"),
                    format!("must be between 1 and {MAX_REQUEST_HEADERS_KB} (KiB)"),
                );
            }
            let mut limit = |what: &str, d: Duration| {
                if d > MAX_LISTENER_TIMEOUT {
                    self.problem(
                        format!("listeners[{i}].{what}"),
                        "must be at most 365 days (0s turns it off)",
                    );
                }
                (!d.is_zero()).then_some(d)
            };
            let idle_timeout = limit("idle_timeout", l.idle_timeout);
            let request_headers_timeout =
                limit("request_headers_timeout", l.request_headers_timeout);
            out.push(Listener {
                name: l.name.clone(),
                address,
                filter_chain: None,
                max_request_headers: l.max_request_headers_kb as usize * 1024,
                idle_timeout,
                request_headers_timeout,
            });
        }
        out
    }

    fn clusters(&mut self, raw: &[model::Cluster]) -> (Vec<Cluster>, HashMap<String, usize>) {
        self.unique(
            "cluster",
            |i| format!("clusters[{i}].name"),
            raw.iter().map(|c| c.name.as_str()),
        );
        let mut out = Vec::new();
        let mut index = HashMap::new();
        for (i, c) in raw.iter().enumerate() {
            let at = format!("clusters[{i}]");
            let endpoints = if c.original_dst {
                if !c.endpoints.is_empty() {
                    self.problem(
                        format!("{at}.endpoints"),
                        "an original_dst cluster sends each request where its connection was going; give it no endpoints",
                    );
                }
                if c.health_check.is_some() {
                    self.problem(
                        format!("{at}.health_check"),
                        "an original_dst cluster has no endpoints to check",
                    );
                }
                Vec::new()
            } else {
                self.endpoints(&at, &c.endpoints)
            };
            if let model::LbPolicy::RingHash {
                ring_hash: model::RingHash { header },
            } = &c.lb
            {
                if http::HeaderName::from_bytes(header.as_bytes()).is_err() {
                    self.problem(
                        format!("{at}.lb.ring_hash.header"),
                        format!("invalid header name {header:?}"),
                    );
                }
            }
            let health_check = c
                .health_check
                .as_ref()
                .and_then(|h| self.health_check(&format!("{at}.health_check"), h));
            if c.circuit_breaker.max_requests == 0 {
                self.problem(
                    format!("{at}.circuit_breaker.max_requests"),
                    "must be at least 1",
                );
            }
            if let Some(o) = &c.outlier_detection {
                if o.consecutive_5xx == 0 {
                    self.problem(
                        format!("{at}.outlier_detection.consecutive_5xx"),
                        "must be at least 1",
                    );
                }
                if o.max_ejection_percent > 100 {
                    self.problem(
                        format!("{at}.outlier_detection.max_ejection_percent"),
                        "must be at most 100",
                    );
                }
            }
            index.entry(c.name.clone()).or_insert(out.len());
            out.push(Cluster {
                name: c.name.clone(),
                protocol: c.protocol,
                connect_timeout: c.connect_timeout,
                lb: c.lb.clone(),
                endpoints,
                original_dst: c.original_dst,
                health_check,
                circuit_breaker: c.circuit_breaker.clone(),
                outlier_detection: c.outlier_detection.clone(),
            });
        }
        (out, index)
    }

    /// `fast_path.outbound`: capture needs the sockmap mode and one of this config's IPv4
    /// listeners to send connections to.
    fn outbound_capture(
        &mut self,
        out: &model::OutboundCapture,
        fast_path: Option<&model::FastPath>,
        listeners: &[Listener],
    ) {
        if fast_path.map(|f| f.mode()) != Some(model::FastPathMode::Sockmap) {
            self.problem("fast_path.outbound", "outbound capture needs mode: sockmap");
        }
        let field = "fast_path.outbound.listener";
        if let Some(address) = self.socket_addr(field, &out.listener) {
            if !address.is_ipv4() {
                self.problem(field, "outbound capture is IPv4 only");
            } else if !listeners.iter().any(|l| {
                l.address.port() == address.port()
                    && (l.address.ip() == address.ip() || l.address.ip().is_unspecified())
            }) {
                self.problem(field, format!("no listener on {address}"));
            }
        }
        if !out.ports.is_empty() && !out.exclude_ports.is_empty() {
            self.problem(
                "fast_path.outbound.exclude_ports",
                "give ports or exclude_ports, not both",
            );
        }
        for (name, ports) in [("ports", &out.ports), ("exclude_ports", &out.exclude_ports)] {
            if let Some(i) = ports.iter().position(|p| *p == 0) {
                self.problem(
                    format!("fast_path.outbound.{name}[{i}]"),
                    "port 0 is no destination",
                );
            }
        }
    }

    fn endpoints(&mut self, at: &str, raw: &[model::Endpoint]) -> Vec<Endpoint> {
        if raw.is_empty() {
            self.problem(
                format!("{at}.endpoints"),
                "a cluster needs at least one endpoint",
            );
        }
        let mut endpoints = Vec::new();
        for (j, e) in raw.iter().enumerate() {
            let field = format!("{at}.endpoints[{j}]");
            if e.weight == 0 {
                self.problem(format!("{field}.weight"), "weight must be at least 1");
            }
            if let Some(address) = self.socket_addr(&format!("{field}.address"), &e.address) {
                if endpoints.iter().any(|x: &Endpoint| x.address == address) {
                    self.problem(
                        format!("{field}.address"),
                        format!("duplicate endpoint {address}"),
                    );
                }
                endpoints.push(Endpoint {
                    address,
                    weight: e.weight.max(1),
                });
            }
        }
        endpoints
    }

    fn health_check(&mut self, at: &str, h: &model::HealthCheck) -> Option<HealthCheck> {
        if h.unhealthy_threshold == 0 || h.healthy_threshold == 0 {
            self.problem(
                at,
                "unhealthy_threshold and healthy_threshold must be at least 1",
            );
        }
        if h.interval.is_zero() || h.timeout.is_zero() {
            self.problem(at, "interval and timeout must be positive");
        }
        let kind = match (&h.http, &h.grpc) {
            (Some(http), None) => {
                if !http.path.starts_with('/') {
                    self.problem(format!("{at}.http.path"), "must start with /");
                }
                HealthCheckKind::Http {
                    path: http.path.clone(),
                    host: http.host.clone(),
                    expected_statuses: http.expected_statuses.clone(),
                }
            }
            (None, Some(grpc)) => HealthCheckKind::Grpc {
                service: grpc.service.clone(),
            },
            _ => {
                self.problem(at, "set exactly one of http or grpc");
                return None;
            }
        };
        Some(HealthCheck {
            interval: h.interval,
            timeout: h.timeout,
            unhealthy_threshold: h.unhealthy_threshold.max(1),
            healthy_threshold: h.healthy_threshold.max(1),
            kind,
        })
    }

    /// A pool's `version_split`: each model must be one the pool serves, each split must give
    /// some version a weight.
    fn version_split(
        &mut self,
        at: &str,
        p: &model::InferencePool,
    ) -> BTreeMap<String, Vec<(String, u32)>> {
        let mut out = BTreeMap::new();
        for (model, split) in &p.version_split {
            let field = format!("{at}.version_split.{model}");
            if !p
                .endpoints
                .iter()
                .any(|e| e.models.iter().any(|m| &m.name == model))
            {
                self.problem(
                    field.clone(),
                    format!("no endpoint of the pool serves {model:?}"),
                );
            }
            if split.keys().any(String::is_empty) {
                self.problem(field.clone(), "a version may not be empty");
            }
            let weighted: Vec<(String, u32)> = split
                .iter()
                .filter(|(_, w)| **w > 0)
                .map(|(v, w)| (v.clone(), *w))
                .collect();
            if weighted.is_empty() {
                self.problem(field, "give at least one version a weight above 0");
            }
            out.insert(model.clone(), weighted);
        }
        out
    }

    /// Validates the pools and adds the cluster each one forms to `clusters`.
    fn pools(
        &mut self,
        raw: &[model::InferencePool],
        clusters: &mut Vec<Cluster>,
        index: &mut HashMap<String, usize>,
    ) -> Vec<InferencePool> {
        self.unique(
            "inference pool",
            |i| format!("inference_pools[{i}].name"),
            raw.iter().map(|p| p.name.as_str()),
        );
        let mut out = Vec::new();
        for (i, p) in raw.iter().enumerate() {
            let at = format!("inference_pools[{i}]");
            if index.contains_key(&p.name) {
                self.problem(
                    format!("{at}.name"),
                    format!(
                        "{:?} is also a cluster's name; a pool forms a cluster of its name",
                        p.name
                    ),
                );
                continue;
            }
            if p.endpoints.is_empty() {
                self.problem(
                    format!("{at}.endpoints"),
                    "a pool needs at least one endpoint",
                );
            }
            let mut endpoints: Vec<PoolEndpoint> = Vec::new();
            for (j, e) in p.endpoints.iter().enumerate() {
                let field = format!("{at}.endpoints[{j}]");
                let Some(address) = self.socket_addr(&format!("{field}.address"), &e.address)
                else {
                    continue;
                };
                if endpoints.iter().any(|x| x.address == address) {
                    self.problem(
                        format!("{field}.address"),
                        format!("duplicate endpoint {address}"),
                    );
                }
                let metrics_address = match &e.metrics_address {
                    Some(m) => self
                        .socket_addr(&format!("{field}.metrics_address"), m)
                        .unwrap_or(address),
                    None => address,
                };
                if e.models.is_empty() {
                    self.problem(
                        format!("{field}.models"),
                        "an endpoint serves at least one model",
                    );
                }
                self.unique(
                    "model",
                    |k| format!("{field}.models[{k}].name"),
                    e.models.iter().map(|m| m.name.as_str()),
                );
                endpoints.push(PoolEndpoint {
                    address,
                    metrics_address,
                    max_in_flight: e.max_in_flight.unwrap_or(p.max_in_flight),
                    models: e.models.clone(),
                });
            }
            let w = &p.picker;
            for (name, value) in [
                ("in_flight", w.in_flight),
                ("queue", w.queue),
                ("kv_cache", w.kv_cache),
                ("prefix_affinity", w.prefix_affinity),
                ("lora_affinity", w.lora_affinity),
                ("bounded_load", w.bounded_load),
            ] {
                if !value.is_finite() || value < 0.0 {
                    self.problem(
                        format!("{at}.picker.{name}"),
                        "must be a number of at least 0",
                    );
                }
            }
            if !(w.kv_cache_full > 0.0 && w.kv_cache_full <= 1.0) {
                self.problem(
                    format!("{at}.picker.kv_cache_full"),
                    "must be above 0 and at most 1",
                );
            }
            let metrics = p.metrics.as_ref().map(|m| {
                if !m.path.starts_with('/') {
                    self.problem(format!("{at}.metrics.path"), "must start with /");
                }
                if m.interval.is_zero() {
                    self.problem(format!("{at}.metrics.interval"), "must be positive");
                }
                let mut spec = |name: &str, text: &Option<String>| {
                    let text = text.as_deref()?;
                    text.parse()
                        .map_err(|e| self.problem(format!("{at}.metrics.{name}"), e))
                        .ok()
                };
                PoolScrape {
                    path: m.path.clone(),
                    interval: m.interval,
                    waiting: spec("waiting", &m.waiting),
                    kv_cache: spec("kv_cache", &m.kv_cache),
                }
            });
            if p.reload.drain_deadline.is_zero() {
                self.problem(format!("{at}.reload.drain_deadline"), "must be positive");
            }
            if let Some(h) = &p.reload.http {
                if p.protocol != model::InferenceProtocol::Openai {
                    self.problem(
                        format!("{at}.reload.http"),
                        "only for openai pools (kserve_grpc pools reload with RepositoryModelLoad)",
                    );
                }
                if !["GET", "POST", "PUT", "PATCH", "DELETE"].contains(&h.method.as_str()) {
                    self.problem(
                        format!("{at}.reload.http.method"),
                        "expected GET, POST, PUT, PATCH or DELETE",
                    );
                }
                for (name, path) in [("path", &h.path), ("ready_path", &h.ready_path)] {
                    if !path.starts_with('/') {
                        self.problem(format!("{at}.reload.http.{name}"), "must start with /");
                    }
                }
            }
            let cluster = clusters.len();
            index.insert(p.name.clone(), cluster);
            clusters.push(Cluster {
                name: p.name.clone(),
                protocol: match p.protocol {
                    model::InferenceProtocol::KserveGrpc => model::UpstreamProtocol::H2c,
                    model::InferenceProtocol::Openai => model::UpstreamProtocol::Http1,
                },
                connect_timeout: p.connect_timeout,
                lb: model::LbPolicy::default(),
                endpoints: endpoints
                    .iter()
                    .map(|e| Endpoint {
                        address: e.address,
                        weight: 1,
                    })
                    .collect(),
                original_dst: false,
                health_check: None,
                // The pool's own limits (max_in_flight, queue) bound it.
                circuit_breaker: model::CircuitBreaker {
                    max_requests: u32::MAX,
                    ..Default::default()
                },
                outlier_detection: None,
            });
            out.push(InferencePool {
                name: p.name.clone(),
                protocol: p.protocol,
                cluster,
                endpoints,
                picker: p.picker,
                queue: p.queue.clone(),
                reload: p.reload.clone(),
                metrics,
                max_body: p.max_body as usize,
                model_header: p.model_header,
                load_reports: p.load_reports,
                version_split: self.version_split(&at, p),
            });
        }
        out
    }

    fn routes(
        &mut self,
        config: &Config,
        clusters: &HashMap<String, usize>,
        compiled: &[Cluster],
        pools: &[InferencePool],
        pool_index: &HashMap<&str, usize>,
    ) -> Vec<Route> {
        self.unique(
            "route",
            |i| format!("routes[{i}].name"),
            config.routes.iter().map(|r| r.name.as_str()),
        );
        let targets = (clusters, compiled, (pools, pool_index));
        let n = config.routes.len();
        let threads = crate::config_threads();
        if n < COMPILE_ALONE_BELOW || threads < 2 {
            return self.route_range(config, 0..n, targets);
        }
        // In parts on every CPU, each with a validator of its own, joined in order: the same
        // routes and problems as one pass.
        let per_part = n.div_ceil(threads);
        let parts: Vec<std::ops::Range<usize>> = (0..n)
            .step_by(per_part)
            .map(|start| start..(start + per_part).min(n))
            .collect();
        let previous = &self.previous;
        let done = crate::on_threads(parts, |range| {
            let mut v = Validator {
                // Sized for a regex per route: growing through a dozen rehashes cost more.
                regexes: Regexes::with_capacity_and_hasher(range.len(), Default::default()),
                previous: previous.clone(),
                ..Validator::default()
            };
            (v.route_range(config, range, targets), v)
        });
        let mut out = Vec::with_capacity(n);
        for (routes, v) in done {
            out.extend(routes);
            self.problems.extend(v.problems);
            self.regexes.extend(v.regexes);
        }
        out
    }

    /// The routes at `range` of `config.routes`.
    fn route_range(
        &mut self,
        config: &Config,
        range: std::ops::Range<usize>,
        (clusters, compiled, (pools, pool_index)): RouteTargets,
    ) -> Vec<Route> {
        let mut out = Vec::with_capacity(range.len());
        let list = At::Text("routes");
        for (i, r) in config.routes[range.clone()].iter().enumerate() {
            let at = list.item(range.start + i);
            if let Some(l) = &r.matches.listener {
                if !config.listeners.iter().any(|x| &x.name == l) {
                    self.problem(
                        format!("{at}.match.listener"),
                        format!("unknown listener {l:?}"),
                    );
                }
            }
            let host = r.matches.host.as_deref().map(compile_host);
            let path = r
                .matches
                .path
                .as_ref()
                .and_then(|p| self.path_match(at.field("match.path"), p));
            let headers = r
                .matches
                .headers
                .iter()
                .enumerate()
                .filter_map(|(j, h)| self.header_match(at.field("match.headers").item(j), h))
                .collect();
            let grpc_path = r.matches.grpc.as_ref().map(|g| {
                if g.service.is_empty() || g.service.contains('/') {
                    self.problem(
                        format!("{at}.match.grpc.service"),
                        "expected a service name like pkg.Service",
                    );
                }
                match &g.method {
                    Some(m) => GrpcPathMatch::Method(format!("/{}/{m}", g.service)),
                    None => GrpcPathMatch::Service(format!("/{}/", g.service)),
                }
            });
            if r.action.prefix_rewrite.is_some() && !matches!(path, Some(PathMatch::Prefix(_))) {
                self.problem(
                    format!("{at}.route.prefix_rewrite"),
                    "needs match.path.prefix",
                );
            }
            let action = self.action(
                at.field("route"),
                &r.action,
                clusters,
                compiled,
                (pools, pool_index),
            );
            if grpc_path.is_some()
                && action
                    .clusters
                    .iter()
                    .any(|(id, _)| compiled[*id].protocol != model::UpstreamProtocol::H2c)
            {
                self.problem(
                    format!("{at}.match.grpc"),
                    "gRPC needs trailers, which HTTP/1.1 cannot carry: route it to h2c clusters",
                );
            }
            out.push(Route {
                name: r.name.clone(),
                listener: r.matches.listener.clone(),
                host,
                path,
                headers,
                grpc_path,
                action,
                filter_chain: None,
            });
        }
        out
    }

    fn path_match(&mut self, at: At, p: &model::PathMatch) -> Option<PathMatch> {
        match (&p.exact, &p.prefix, &p.regex) {
            (Some(s), None, None) | (None, Some(s), None) if !s.starts_with('/') => {
                self.problem(at, format!("path {s:?} must start with /"));
                None
            }
            (Some(s), None, None) => Some(PathMatch::Exact(s.clone())),
            (None, Some(s), None) => Some(PathMatch::Prefix(s.clone())),
            (None, None, Some(s)) => self.regex(at.field("regex"), s).map(PathMatch::Regex),
            _ => {
                self.problem(at, "set exactly one of exact, prefix, regex");
                None
            }
        }
    }

    fn header_match(&mut self, at: At, h: &model::HeaderMatch) -> Option<HeaderMatch> {
        if http::HeaderName::from_bytes(h.name.as_bytes()).is_err() {
            self.problem(
                format!("{at}.name"),
                format!("invalid header name {:?}", h.name),
            );
        }
        let set = [
            h.exact.is_some(),
            h.prefix.is_some(),
            h.regex.is_some(),
            h.present.is_some(),
        ];
        if set.iter().filter(|x| **x).count() != 1 {
            self.problem(at, "set exactly one of exact, prefix, regex, present");
            return None;
        }
        let rule = if let Some(v) = &h.exact {
            HeaderRule::Exact(v.clone())
        } else if let Some(v) = &h.prefix {
            HeaderRule::Prefix(v.clone())
        } else if let Some(v) = &h.regex {
            HeaderRule::Regex(self.regex(at.field("regex"), v)?)
        } else {
            HeaderRule::Present(h.present.unwrap_or(true))
        };
        Some(HeaderMatch {
            name: h.name.to_ascii_lowercase(),
            rule,
            invert: h.invert,
        })
    }

    fn action(
        &mut self,
        at: At,
        a: &model::RouteAction,
        index: &HashMap<String, usize>,
        compiled: &[Cluster],
        (pools, pool_index): (&[InferencePool], &HashMap<&str, usize>),
    ) -> RouteAction {
        let mut clusters = Vec::new();
        let mut pool = None;
        match (&a.cluster, a.weighted_clusters.is_empty(), &a.pool) {
            (None, true, Some(name)) => match pool_index.get(name.as_str()) {
                Some(id) => {
                    pool = Some(*id);
                    clusters.push((pools[*id].cluster, 1));
                }
                None => self.problem(
                    format!("{at}.pool"),
                    format!("unknown inference pool {name:?}"),
                ),
            },
            (Some(name), true, None) => match index.get(name) {
                Some(id) => clusters.push((*id, 1)),
                None => self.problem(format!("{at}.cluster"), format!("unknown cluster {name:?}")),
            },
            (None, false, None) => {
                for (j, w) in a.weighted_clusters.iter().enumerate() {
                    let field = format!("{at}.weighted_clusters[{j}]");
                    if w.weight == 0 {
                        self.problem(format!("{field}.weight"), "weight must be at least 1");
                    }
                    match index.get(&w.cluster) {
                        Some(id) => clusters.push((*id, w.weight.max(1))),
                        None => self.problem(
                            format!("{field}.cluster"),
                            format!("unknown cluster {:?}", w.cluster),
                        ),
                    }
                }
            }
            _ => self.problem(at, "set exactly one of cluster, weighted_clusters or pool"),
        }
        let retry = a
            .retry
            .as_ref()
            .and_then(|r| self.retry(at.field("retry"), r));
        if retry
            .as_ref()
            .is_some_and(|r| !r.on.grpc_statuses.is_empty())
            && clusters
                .iter()
                .any(|(id, _)| compiled[*id].protocol != model::UpstreamProtocol::H2c)
        {
            self.problem(
                format!("{at}.retry.retry_on"),
                "gRPC retry conditions need h2c clusters",
            );
        }
        RouteAction {
            total_weight: clusters.iter().map(|(_, w)| u64::from(*w)).sum(),
            clusters,
            pool,
            timeout: a.timeout,
            retry,
            prefix_rewrite: a.prefix_rewrite.clone(),
            request_headers: self.mutation(at.field("request_headers"), &a.request_headers),
            response_headers: self.mutation(at.field("response_headers"), &a.response_headers),
        }
    }

    fn retry(&mut self, at: At, r: &model::RetryPolicy) -> Option<RetryPolicy> {
        let mut on = RetryOn::default();
        for (j, cond) in r.retry_on.iter().enumerate() {
            match cond.as_str() {
                "connect-failure" => on.connect_failure = true,
                "reset" => on.reset = true,
                "5xx" => on.server_error = true,
                "gateway-error" => on.gateway_error = true,
                "retriable-status-codes" => on.statuses = r.retriable_status_codes.clone(),
                "cancelled" => on.grpc_statuses.push(1),
                "deadline-exceeded" => on.grpc_statuses.push(4),
                "resource-exhausted" => on.grpc_statuses.push(8),
                "internal" => on.grpc_statuses.push(13),
                "unavailable" => on.grpc_statuses.push(14),
                other => self.problem(
                    format!("{at}.retry_on[{j}]"),
                    format!(
                        "unknown retry condition {other:?}; expected connect-failure, reset, 5xx, gateway-error, \
                         retriable-status-codes, cancelled, deadline-exceeded, resource-exhausted, internal, unavailable"
                    ),
                ),
            }
        }
        if !r.retriable_status_codes.is_empty()
            && !r.retry_on.iter().any(|c| c == "retriable-status-codes")
        {
            self.problem(
                format!("{at}.retriable_status_codes"),
                "needs retriable-status-codes in retry_on",
            );
        }
        Some(RetryPolicy {
            retries: r.retries,
            on,
            per_try_timeout: r.per_try_timeout,
        })
    }

    fn mutation(&mut self, at: At, m: &model::HeaderMutation) -> HeaderMutation {
        let mut out = HeaderMutation::default();
        for (j, h) in m.add.iter().enumerate() {
            if http::HeaderName::from_bytes(h.name.as_bytes()).is_err() {
                self.problem(
                    format!("{at}.add[{j}].name"),
                    format!("invalid header name {:?}", h.name),
                );
            } else if http::HeaderValue::from_str(&h.value).is_err() {
                self.problem(format!("{at}.add[{j}].value"), "invalid header value");
            } else {
                out.set.push((h.name.to_ascii_lowercase(), h.value.clone()));
            }
        }
        for (j, name) in m.remove.iter().enumerate() {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                self.problem(
                    format!("{at}.remove[{j}]"),
                    format!("invalid header name {name:?}"),
                );
            } else {
                out.remove.push(name.to_ascii_lowercase());
            }
        }
        out
    }
}

impl Validator {
    fn chain_ref(
        &mut self,
        field: At,
        name: &Option<String>,
        chains: &HashMap<&str, usize>,
    ) -> Option<usize> {
        let name = name.as_deref()?;
        let id = chains.get(name).copied();
        if id.is_none() {
            self.problem(field, format!("unknown filter chain {name:?}"));
        }
        id
    }

    fn filter_chains(&mut self, raw: &[model::FilterChain]) -> Vec<FilterChain> {
        self.unique(
            "filter chain",
            |i| format!("filter_chains[{i}].name"),
            raw.iter().map(|c| c.name.as_str()),
        );
        let mut out = Vec::new();
        for (i, c) in raw.iter().enumerate() {
            let at = format!("filter_chains[{i}]");
            if c.filters.is_empty() {
                self.problem(
                    format!("{at}.filters"),
                    "a filter chain needs at least one filter",
                );
            }
            let mut filters = Vec::new();
            for (j, f) in c.filters.iter().enumerate() {
                let at = format!("{at}.filters[{j}]");
                if f.module.trim().is_empty() {
                    self.problem(format!("{at}.module"), "expected the path of a .wasm file");
                }
                let sha256 = f.sha256.as_ref().map(|h| h.to_ascii_lowercase());
                if let Some(h) = &sha256 {
                    if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                        self.problem(format!("{at}.sha256"), "expected 64 hex digits");
                    }
                }
                if !(1..=4096).contains(&f.memory_limit_mb) {
                    self.problem(format!("{at}.memory_limit_mb"), "expected 1 to 4096");
                }
                if f.callback_deadline.is_zero() {
                    self.problem(format!("{at}.callback_deadline"), "must be more than 0");
                }
                let bytes = |v: &Option<serde_json::Value>| match v {
                    None => Vec::new(),
                    Some(serde_json::Value::String(s)) => s.clone().into_bytes(),
                    Some(other) => other.to_string().into_bytes(),
                };
                filters.push(WasmFilter {
                    name: f.name.clone(),
                    module: f.module.clone().into(),
                    sha256,
                    root_id: f.root_id.clone(),
                    vm_id: f.vm_id.clone(),
                    vm_config: bytes(&f.vm_config),
                    config: bytes(&f.config),
                    fail_open: f.fail_open,
                    memory_limit_bytes: (f.memory_limit_mb as usize) << 20,
                    callback_deadline: f.callback_deadline,
                });
            }
            out.push(FilterChain {
                name: c.name.clone(),
                filters,
            });
        }
        out
    }
}

fn compile_host(h: &str) -> HostMatch {
    let h = h.to_ascii_lowercase();
    if h == "*" {
        HostMatch::Any
    } else if let Some(rest) = h.strip_prefix('*') {
        HostMatch::Suffix(rest.to_string())
    } else {
        HostMatch::Exact(h)
    }
}

/// Two listen addresses collide if they share a port and either is a wildcard or both are equal.
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}
