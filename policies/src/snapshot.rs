//! The validated, compiled form of a config. Immutable: the proxy swaps whole snapshots, and a
//! request reads the one it started with until it ends.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use regex::Regex;

use crate::model::{self, Config, LbPolicy, UpstreamProtocol};

/// A config that passed validation. Cluster references are indices into `clusters`.
#[derive(Debug)]
pub struct Snapshot {
    /// Identifies this config (a content hash unless the caller set one).
    pub version: String,
    /// The config as written, except endpoints, which `clusters` hold (an endpoint-only
    /// update shares this with the previous snapshot). [`Snapshot::config`] has both.
    pub source: Arc<Config>,
    pub admin: Option<SocketAddr>,
    pub listeners: Vec<Listener>,
    /// Shared with later snapshots that change only endpoints.
    pub routes: Arc<Vec<Route>>,
    pub clusters: Vec<Cluster>,
    pub(crate) cluster_index: HashMap<String, usize>,
    /// Filter chains that routes and listeners point at by index.
    pub filter_chains: Arc<Vec<FilterChain>>,
    /// Inference pools; each also has its cluster in `clusters`.
    pub pools: Arc<Vec<InferencePool>>,
}

impl Snapshot {
    /// The index of the cluster called `name`.
    pub fn cluster_id(&self, name: &str) -> Option<usize> {
        self.cluster_index.get(name).copied()
    }

    /// The config this snapshot runs, endpoints included (for `/config_dump` and persisting).
    pub fn config(&self) -> Config {
        let mut config = (*self.source).clone();
        for c in &mut config.clusters {
            if let Some(compiled) = self.cluster_id(&c.name).map(|id| &self.clusters[id]) {
                c.endpoints = compiled
                    .endpoints
                    .iter()
                    .map(|e| model::Endpoint {
                        address: e.address.to_string(),
                        weight: e.weight,
                    })
                    .collect();
            }
        }
        config
    }

    /// The listener called `name`.
    pub fn listener(&self, name: &str) -> Option<&Listener> {
        self.listeners.iter().find(|l| l.name == name)
    }
}

#[derive(Debug, Clone)]
pub struct Listener {
    pub name: String,
    pub address: SocketAddr,
    /// Index into `filter_chains`.
    pub filter_chain: Option<usize>,
    /// Largest request head taken (HTTP/1.1 request line and headers), in bytes.
    pub max_request_headers: usize,
    /// How long a connection waits for a request (and an upgraded one for its client); `None`:
    /// no limit.
    pub idle_timeout: Option<Duration>,
    /// How long an HTTP/1.1 request head may take from its first byte; `None`: no limit.
    pub request_headers_timeout: Option<Duration>,
}

/// A validated filter chain.
#[derive(Debug, Clone, PartialEq)]
pub struct FilterChain {
    pub name: String,
    pub filters: Vec<WasmFilter>,
}

/// A validated proxy-wasm plugin; configs already turned into the bytes the filter reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WasmFilter {
    pub name: String,
    pub module: std::path::PathBuf,
    /// Lowercase hex.
    pub sha256: Option<String>,
    pub root_id: String,
    pub vm_id: String,
    pub vm_config: Vec<u8>,
    pub config: Vec<u8>,
    pub fail_open: bool,
    pub memory_limit_bytes: usize,
    pub callback_deadline: Duration,
}

#[derive(Debug)]
pub struct Route {
    pub name: String,
    pub listener: Option<String>,
    pub host: Option<HostMatch>,
    pub path: Option<PathMatch>,
    pub headers: Vec<HeaderMatch>,
    /// `/service/` or `/service/method`, matched against the path of gRPC requests.
    pub grpc_path: Option<GrpcPathMatch>,
    pub action: RouteAction,
    /// Index into `filter_chains`.
    pub filter_chain: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    Any,
    /// Lowercase.
    Exact(String),
    /// `*.example.com` stored as `.example.com`.
    Suffix(String),
}

#[derive(Debug)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
    /// Shared with the snapshots before and after that use the same pattern, so a new config
    /// neither compiles it again nor starts its per-thread match caches over.
    Regex(Arc<Regex>),
}

#[derive(Debug)]
pub struct HeaderMatch {
    /// Lowercase.
    pub name: String,
    pub rule: HeaderRule,
    pub invert: bool,
}

#[derive(Debug)]
pub enum HeaderRule {
    Exact(String),
    Prefix(String),
    /// Shared like [`PathMatch::Regex`].
    Regex(Arc<Regex>),
    Present(bool),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrpcPathMatch {
    /// `/pkg.Service/`
    Service(String),
    /// `/pkg.Service/Method`
    Method(String),
}

#[derive(Debug)]
pub struct RouteAction {
    /// Non-empty; weights are positive. A pool's route has its pool's cluster.
    pub clusters: Vec<(usize, u32)>,
    /// Index into `pools`: the inference picker, not the cluster's LB, picks the endpoint.
    pub pool: Option<usize>,
    pub total_weight: u64,
    pub timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
    pub prefix_rewrite: Option<String>,
    pub request_headers: HeaderMutation,
    pub response_headers: HeaderMutation,
}

#[derive(Debug, Clone, Default)]
pub struct HeaderMutation {
    /// Names lowercase.
    pub set: Vec<(String, String)>,
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    pub retries: u32,
    pub on: RetryOn,
    pub per_try_timeout: Option<Duration>,
}

/// Which failures a retry policy retries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryOn {
    pub connect_failure: bool,
    /// The upstream reset or closed the connection before any response byte.
    pub reset: bool,
    /// Any 5xx status, plus timeouts and resets.
    pub server_error: bool,
    /// 502, 503, 504.
    pub gateway_error: bool,
    pub statuses: Vec<u16>,
    pub grpc_statuses: Vec<u32>,
}

#[derive(Debug, Clone)]
pub struct Cluster {
    pub name: String,
    pub protocol: UpstreamProtocol,
    pub connect_timeout: Duration,
    pub lb: LbPolicy,
    pub endpoints: Vec<Endpoint>,
    /// Requests go to their connection's original destination (`endpoints` is empty).
    pub original_dst: bool,
    pub health_check: Option<HealthCheck>,
    pub circuit_breaker: model::CircuitBreaker,
    pub outlier_detection: Option<model::OutlierDetection>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub address: SocketAddr,
    pub weight: u32,
}

#[derive(Debug, Clone)]
pub struct HealthCheck {
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
    pub kind: HealthCheckKind,
}

#[derive(Debug, Clone)]
pub enum HealthCheckKind {
    Http {
        path: String,
        host: Option<String>,
        expected_statuses: Vec<u16>,
    },
    Grpc {
        service: String,
    },
}

/// A validated inference pool.
#[derive(Debug, Clone, PartialEq)]
pub struct InferencePool {
    pub name: String,
    pub protocol: model::InferenceProtocol,
    /// Index of the pool's cluster in `clusters`; its endpoints are in the same order.
    pub cluster: usize,
    pub endpoints: Vec<PoolEndpoint>,
    pub picker: model::PickerSettings,
    pub queue: model::PoolQueue,
    pub reload: model::PoolReload,
    pub metrics: Option<PoolScrape>,
    pub max_body: usize,
    /// `x-weir-model` picks the model over the body.
    pub model_header: bool,
    /// weir asks each response for an ORCA load report.
    pub load_reports: bool,
    /// model → (version, weight), weights above 0 only.
    pub version_split: BTreeMap<String, Vec<(String, u32)>>,
}

/// A pool's metrics scrape.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolScrape {
    pub path: String,
    pub interval: Duration,
    /// Series read for the queue, where the pool names one (else the servers' known names).
    pub waiting: Option<MetricSpec>,
    /// Series read for KV-cache use, where the pool names one.
    pub kv_cache: Option<MetricSpec>,
}

/// A Prometheus series picked by name and labels: `name` or `name{label="value",...}` (the
/// values quoted or not, as the Gateway API inference extension takes them). A series
/// matches when it has the name and every label given, whatever its other labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricSpec {
    pub name: String,
    pub labels: Vec<(String, String)>,
}

impl MetricSpec {
    /// Whether a series of family `name` whose label `l` has the value `label(l)` is this one.
    pub fn matches<'a>(&self, name: &str, label: impl Fn(&str) -> Option<&'a str>) -> bool {
        self.name == name
            && self
                .labels
                .iter()
                .all(|(k, v)| label(k).is_some_and(|got| got == v))
    }
}

impl std::str::FromStr for MetricSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (name, labels) = match text.split_once('{') {
            Some((name, rest)) => (
                name.trim_end(),
                Some(rest.strip_suffix('}').ok_or("expected `}` at the end")?),
            ),
            None => (text, None),
        };
        // Prometheus names: [a-zA-Z_:][a-zA-Z0-9_:]*; labels: [a-zA-Z_][a-zA-Z0-9_]*.
        let is_name = |n: &str, colon: bool| {
            n.bytes().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic()
                    || c == b'_'
                    || (colon && c == b':')
                    || (i > 0 && c.is_ascii_digit())
            }) && !n.is_empty()
        };
        if !is_name(name, true) {
            return Err(format!("{name:?} is not a Prometheus metric name"));
        }
        let mut out = MetricSpec {
            name: name.to_string(),
            labels: Vec::new(),
        };
        for pair in labels.unwrap_or_default().split(',').map(str::trim) {
            if pair.is_empty() {
                continue;
            }
            let Some((label, value)) = pair.split_once('=') else {
                return Err(format!("expected label=\"value\", got {pair:?}"));
            };
            let (label, value) = (label.trim(), value.trim());
            if !is_name(label, false) {
                return Err(format!("{label:?} is not a Prometheus label name"));
            }
            let value = match value.strip_prefix('"') {
                Some(quoted) => quoted
                    .strip_suffix('"')
                    .ok_or_else(|| format!("unterminated quote in {pair:?}"))?,
                None => value,
            };
            if value.contains('"') {
                return Err(format!("a quote inside the value of {pair:?}"));
            }
            out.labels.push((label.to_string(), value.to_string()));
        }
        Ok(out)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PoolEndpoint {
    pub address: SocketAddr,
    pub metrics_address: SocketAddr,
    /// 0: no limit.
    pub max_in_flight: u32,
    pub models: Vec<model::PoolModel>,
}

impl InferencePool {
    /// The pool's model when all its endpoints serve just one (adapters aside).
    pub fn only_model(&self) -> Option<&str> {
        let mut names = self
            .endpoints
            .iter()
            .flat_map(|e| e.models.iter().map(|m| m.name.as_str()));
        let first = names.next()?;
        names.all(|n| n == first).then_some(first)
    }

    /// Whether any endpoint serves `model`.
    pub fn has_model(&self, model: &str) -> bool {
        self.endpoints
            .iter()
            .any(|e| e.models.iter().any(|m| m.name == model))
    }
}
