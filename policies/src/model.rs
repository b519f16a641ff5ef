//! The YAML schema users write by hand. Every struct denies unknown fields so a typo is an
//! error that names the field, never a silently ignored setting.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A whole config file.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Admin endpoint (`/ready`, `/stats/prometheus`, `/config_dump`, `/clusters`).
    #[serde(default)]
    pub admin: Option<Admin>,
    #[serde(default)]
    pub listeners: Vec<Listener>,
    /// Ordered: the first route whose match accepts the request wins. Shared: a copy of a
    /// config (the control plane's cache of parsed files, the proxy's resources turned back
    /// into a config) costs a reference count per route, not a deep copy of 10,000 routes.
    #[serde(default)]
    pub routes: Vec<Arc<Route>>,
    #[serde(default)]
    pub clusters: Vec<Cluster>,
    /// Proxy-wasm filter chains that listeners and routes name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filter_chains: Vec<FilterChain>,
    /// Pools of model servers that routes send inference requests to (`route: { pool: NAME }`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inference_pools: Vec<InferencePool>,
    /// Policy folders only (`weir-control`): the proxies this file's resources go to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<Scope>,
    /// The eBPF sockmap fast path for local connections: `sockmap`, or
    /// `{ mode: sockmap, cgroup: PATH }`. Attached at start; off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fast_path: Option<Box<FastPath>>,
    /// One JSON line per request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<Box<AccessLog>>,
    /// OpenTelemetry traces exported over OTLP/gRPC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<Box<Tracing>>,
    /// The metrics of `/stats/prometheus`, also pushed over OTLP/gRPC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp_metrics: Option<Box<OtlpMetrics>>,
}

impl Config {
    /// When `newer` differs from `self` only in the endpoints of some clusters: those
    /// clusters' names and new endpoints, in order (empty when nothing differs). `None` when
    /// anything else differs. `routes_moved`: `self`'s routes were moved into `newer` (see
    /// [`crate::ItemCache::routes_moved`]), which has them all: they are not compared.
    pub fn endpoint_changes(
        &self,
        newer: &Config,
        routes_moved: bool,
    ) -> Option<Vec<(String, Vec<Endpoint>)>> {
        let same_routes = || {
            self.routes.len() == newer.routes.len()
                && self
                    .routes
                    .iter()
                    .zip(&newer.routes)
                    .all(|(a, b)| Arc::ptr_eq(a, b) || a == b)
        };
        let same_rest = self.admin == newer.admin
            && self.listeners == newer.listeners
            && self.filter_chains == newer.filter_chains
            && self.inference_pools == newer.inference_pools
            && self.scope == newer.scope
            && self.fast_path == newer.fast_path
            && self.access_log == newer.access_log
            && self.tracing == newer.tracing
            && self.otlp_metrics == newer.otlp_metrics
            && self.clusters.len() == newer.clusters.len()
            && (routes_moved || same_routes());
        if !same_rest {
            return None;
        }
        let mut changes = Vec::new();
        for (a, b) in self.clusters.iter().zip(&newer.clusters) {
            if a.endpoints == b.endpoints {
                if a != b {
                    return None;
                }
                continue;
            }
            let bare = |c: &Cluster| Cluster {
                endpoints: Vec::new(),
                ..c.clone()
            };
            if bare(a) != bare(b) {
                return None;
            }
            changes.push((b.name.clone(), b.endpoints.clone()));
        }
        Some(changes)
    }
}

/// Metrics pushed to an OpenTelemetry collector.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OtlpMetrics {
    /// The collector's OTLP/gRPC endpoint, e.g. `http://127.0.0.1:4317`. Read at start.
    pub endpoint: String,
    /// How often every metric is sent (cumulative values).
    #[serde(default = "default_otlp_interval", with = "crate::duration")]
    pub interval: Duration,
    /// `service.name` of the metrics.
    #[serde(default = "default_service_name")]
    pub service_name: String,
}

fn default_otlp_interval() -> Duration {
    Duration::from_secs(10)
}

/// Traces: a server span per request, a client span per upstream attempt, W3C trace context.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Tracing {
    /// The collector's OTLP/gRPC endpoint, e.g. `http://127.0.0.1:4317`. Read at start.
    pub otlp_endpoint: String,
    /// Share of new traces recorded, 0 to 1; a request that carries a `traceparent` follows
    /// its caller's decision.
    #[serde(default = "default_sampling")]
    pub sampling: f64,
    /// `service.name` of the spans.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// Finished spans held for export; further spans are dropped and counted.
    #[serde(default = "default_trace_queue")]
    pub queue: u32,
}

fn default_sampling() -> f64 {
    1.0
}
fn default_service_name() -> String {
    "weir".into()
}
fn default_trace_queue() -> u32 {
    16384
}

/// The access log: one JSON object per line per request, written off the request path.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AccessLog {
    /// `stdout`, or a file that lines are appended to. Read at start.
    #[serde(default = "default_access_log_path")]
    pub path: String,
    /// The fields of each line, in this order.
    #[serde(default = "default_access_log_fields")]
    pub fields: Vec<AccessLogField>,
    /// Lines held while the writer is behind; further lines are dropped and counted
    /// (`weir_access_log_dropped_total`), never waited for.
    #[serde(default = "default_access_log_buffer")]
    pub buffer: u32,
}

/// What an access log line can carry.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AccessLogField {
    /// When the request ended, RFC 3339 UTC with milliseconds.
    Time,
    Listener,
    Route,
    Cluster,
    /// The upstream endpoint of the last attempt.
    Upstream,
    /// Attempts made (retries + 1).
    Tries,
    /// The client's address.
    Downstream,
    Method,
    Authority,
    /// Path and query.
    Path,
    /// `HTTP/1.1`, `HTTP/2`.
    Protocol,
    /// The response status sent (0: none, the client went away).
    Status,
    /// gRPC calls: the gRPC status the client got (null for other requests).
    GrpcStatus,
    DurationMs,
    RequestBytes,
    ResponseBytes,
    UserAgent,
    /// `x-request-id`.
    RequestId,
    /// Inference requests: the model and the version that served it.
    Model,
    ModelVersion,
    /// OpenAI-compatible inference: prompt and completion tokens, as the server's `usage`
    /// reports them (absent when it sends none).
    InputTokens,
    OutputTokens,
    /// Why the request failed, when it did.
    Error,
}

fn default_access_log_path() -> String {
    "stdout".into()
}
fn default_access_log_fields() -> Vec<AccessLogField> {
    use AccessLogField::*;
    vec![
        Time,
        Listener,
        Route,
        Cluster,
        Upstream,
        Method,
        Authority,
        Path,
        Protocol,
        Status,
        DurationMs,
        RequestBytes,
        ResponseBytes,
        Tries,
        Downstream,
        RequestId,
        Error,
    ]
}
fn default_access_log_buffer() -> u32 {
    8192
}

/// `fast_path:` as written: a mode, or a mode with settings.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum FastPath {
    Mode(FastPathMode),
    Settings(FastPathSettings),
}

/// Not `untagged` for reading: serde would then report any mistake inside the settings as
/// "no variant matched" at `fast_path`. A string is the mode, a mapping the settings, read
/// field by field so an error names its field (`fast_path.outbound.listener`).
impl<'de> Deserialize<'de> for FastPath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Form;
        impl<'de> serde::de::Visitor<'de> for Form {
            type Value = FastPath;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("sockmap, off, or { mode: sockmap, cgroup: /path/to/cgroup-v2, addresses: [...], ports: [...], outbound: {...} }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<FastPath, E> {
                FastPathMode::deserialize(serde::de::value::StrDeserializer::new(v))
                    .map(FastPath::Mode)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<FastPath, A::Error> {
                FastPathSettings::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(FastPath::Settings)
            }
        }
        d.deserialize_any(Form)
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FastPathMode {
    Off,
    /// `sock_ops` + `sk_msg` programs in a sockhash move bytes between local sockets.
    Sockmap,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FastPathSettings {
    pub mode: FastPathMode,
    /// The cgroup v2 whose sockets are seen (default: the hierarchy's root). Both ends of a
    /// connection must be in it to be accelerated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<std::path::PathBuf>,
    /// More addresses local to this node, besides loopback and the node's own interface
    /// addresses (IPv4 or IPv6): for a node proxy, the IPs of the pods on the node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<std::net::IpAddr>,
    /// More ports whose local connections are accelerated whoever makes them (app-to-app
    /// traffic that policy allows), besides the listeners' ports and weir's own connections.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// Outbound capture for a sidecar without iptables: apps' TCP connects go to this
    /// proxy's outbound listener instead (a `cgroup/connect4` program).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbound: Option<OutboundCapture>,
}

/// `fast_path.outbound`: which outbound connects are sent to which listener. Never captured:
/// loopback destinations and the proxy's own connections.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OutboundCapture {
    /// The address of one of this config's listeners (IPv4; `0.0.0.0:P` is reached on
    /// 127.0.0.1:P). Its routes usually lead to an `original_dst` cluster.
    pub listener: String,
    /// Only connects to these destination ports (default: every port).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// Never connects to these destination ports. Not together with `ports`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_ports: Vec<u16>,
}

impl FastPath {
    pub fn mode(&self) -> FastPathMode {
        match self {
            FastPath::Mode(m) => *m,
            FastPath::Settings(s) => s.mode,
        }
    }

    pub fn cgroup(&self) -> Option<&std::path::Path> {
        match self {
            FastPath::Mode(_) => None,
            FastPath::Settings(s) => s.cgroup.as_deref(),
        }
    }

    pub fn addresses(&self) -> &[std::net::IpAddr] {
        match self {
            FastPath::Mode(_) => &[],
            FastPath::Settings(s) => &s.addresses,
        }
    }

    pub fn ports(&self) -> &[u16] {
        match self {
            FastPath::Mode(_) => &[],
            FastPath::Settings(s) => &s.ports,
        }
    }

    pub fn outbound(&self) -> Option<&OutboundCapture> {
        match self {
            FastPath::Mode(_) => None,
            FastPath::Settings(s) => s.outbound.as_ref(),
        }
    }
}

/// Which proxies a policy file applies to; every condition given must hold.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Scope {
    /// Proxies with one of these node ids.
    #[serde(default)]
    pub node_ids: Vec<String>,
    /// Proxies carrying all these labels (`weir run --label k=v`).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

impl Scope {
    /// Whether a proxy with this id and these labels is in scope.
    pub fn matches<'a>(
        &self,
        node_id: &str,
        mut label: impl FnMut(&str) -> Option<&'a str>,
    ) -> bool {
        (self.node_ids.is_empty() || self.node_ids.iter().any(|n| n == node_id))
            && self
                .labels
                .iter()
                .all(|(k, v)| label(k) == Some(v.as_str()))
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// Default `127.0.0.1:15000`.
    #[serde(default = "default_admin_address")]
    pub address: String,
}

fn default_admin_address() -> String {
    "127.0.0.1:15000".to_string()
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub name: String,
    /// `ip:port`, e.g. `0.0.0.0:15001`.
    pub address: String,
    #[serde(default)]
    pub protocol: ListenerProtocol,
    /// Filter chain every request on this listener goes through, unless its route names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter_chain: Option<String>,
    /// Largest HTTP/1.1 request head (request line and headers) taken, in KiB; a larger one
    /// gets 431. Envoy's `max_request_headers_kb` and its default; at most 1023.
    #[serde(default = "default_max_request_headers_kb")]
    pub max_request_headers_kb: u32,
    /// A connection with no request in progress is closed after this long: a new one that
    /// sends nothing, an HTTP/1.1 one kept alive between requests, an HTTP/2 one with no open
    /// stream; and so is a WebSocket (upgraded) connection whose client sends nothing for this
    /// long (to the second), and a response whose client reads nothing for this long. Envoy's
    /// `idle_timeout` and its default (1 h); `0s` turns it off.
    #[serde(default = "default_idle_timeout", with = "crate::duration")]
    pub idle_timeout: Duration,
    /// How long an HTTP/1.1 request head may take from its first byte to its end; then the
    /// connection is closed, so a client that sends its head byte by byte cannot hold a
    /// connection. Envoy's `request_headers_timeout` (which is off unless set); the default,
    /// 60 s, is nginx's `client_header_timeout`. `0s` turns it off.
    #[serde(default = "default_request_headers_timeout", with = "crate::duration")]
    pub request_headers_timeout: Duration,
}

fn default_max_request_headers_kb() -> u32 {
    60
}

fn default_idle_timeout() -> Duration {
    Duration::from_secs(3600)
}

fn default_request_headers_timeout() -> Duration {
    Duration::from_secs(60)
}

/// What a listener speaks downstream.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ListenerProtocol {
    /// HTTP/1.1 and h2c with prior knowledge on the same port (detected per connection).
    #[default]
    Http,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub name: String,
    #[serde(default, rename = "match", skip_serializing_if = "RouteMatch::is_any")]
    pub matches: RouteMatch,
    #[serde(rename = "route")]
    pub action: RouteAction,
    /// Filter chain for this route's requests; overrides the listener's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter_chain: Option<String>,
}

/// All present conditions must hold; an empty match accepts every request.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    /// Only requests arriving on this listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listener: Option<String>,
    /// `example.com`, `*.example.com` or `*`; compared without the port, case-insensitively.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    /// Matches gRPC requests (`content-type: application/grpc*`) by service and method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcMatch>,
}

impl RouteMatch {
    /// Matches every request (no condition set).
    pub fn is_any(&self) -> bool {
        *self == Self::default()
    }
}

/// Exactly one of `exact`, `prefix`, `regex` (anchored: it must match the whole path).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PathMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// One header condition: `name` plus exactly one of `exact`, `prefix`, `regex`, `present`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
    /// Inverts the condition.
    #[serde(default)]
    pub invert: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GrpcMatch {
    /// Fully qualified service, e.g. `helloworld.Greeter`.
    pub service: String,
    /// A method of that service; absent means every method.
    #[serde(default)]
    pub method: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteAction {
    /// The target cluster; exclusive with `weighted_clusters` and `pool`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// An inference pool: the model named by the request picks the replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub weighted_clusters: Vec<WeightedCluster>,
    /// Longest wait for the upstream: for the response to start, and for each later read.
    /// Bounded further by a gRPC client's `grpc-timeout`. Absent: no limit.
    #[serde(
        default,
        with = "crate::duration::opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// Replaces the part of the path that matched `match.path.prefix`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_rewrite: Option<String>,
    #[serde(default, skip_serializing_if = "HeaderMutation::is_empty")]
    pub request_headers: HeaderMutation,
    #[serde(default, skip_serializing_if = "HeaderMutation::is_empty")]
    pub response_headers: HeaderMutation,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WeightedCluster {
    pub cluster: String,
    pub weight: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Retries after the first try (so `retries: 2` means at most 3 tries).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Conditions: `connect-failure`, `reset`, `5xx`, `gateway-error`, `retriable-status-codes`,
    /// and gRPC statuses `cancelled`, `deadline-exceeded`, `internal`, `resource-exhausted`,
    /// `unavailable`.
    pub retry_on: Vec<String>,
    #[serde(default)]
    pub retriable_status_codes: Vec<u16>,
    #[serde(default, with = "crate::duration::opt")]
    pub per_try_timeout: Option<Duration>,
}

fn default_retries() -> u32 {
    1
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HeaderMutation {
    /// Set (replacing any existing value), in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<HeaderValue>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

impl HeaderMutation {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty()
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HeaderValue {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    pub name: String,
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    #[serde(default = "default_connect_timeout", with = "crate::duration")]
    pub connect_timeout: Duration,
    #[serde(default)]
    pub lb: LbPolicy,
    /// Where requests go. An `original_dst` cluster has none: see there.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// Each request goes to where its connection was going before the fast path's outbound
    /// capture sent it to this proxy (Envoy's ORIGINAL_DST cluster). No endpoints, no
    /// health check; a connection that was not captured gets 503.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub original_dst: bool,
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
    #[serde(default)]
    pub circuit_breaker: CircuitBreaker,
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(1)
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    /// HTTP/2 over cleartext with prior knowledge; required for gRPC (trailers).
    H2c,
}

/// `round_robin`, `least_request` or `{ ring_hash: { header: NAME } }`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(
    untagged,
    expecting = "one of round_robin, least_request, { ring_hash: { header: NAME } }"
)]
pub enum LbPolicy {
    Simple(SimpleLb),
    /// Consistent hashing on a request header's value; requests without it go round robin.
    RingHash {
        ring_hash: RingHash,
    },
}

impl Default for LbPolicy {
    fn default() -> Self {
        Self::Simple(SimpleLb::RoundRobin)
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SimpleLb {
    RoundRobin,
    /// Power of two random choices, the one with fewer active requests wins.
    LeastRequest,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RingHash {
    pub header: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// `ip:port`.
    pub address: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    #[serde(default = "default_hc_interval", with = "crate::duration")]
    pub interval: Duration,
    #[serde(default = "default_hc_timeout", with = "crate::duration")]
    pub timeout: Duration,
    /// Failed checks in a row that mark an endpoint unhealthy.
    #[serde(default = "default_unhealthy_threshold")]
    pub unhealthy_threshold: u32,
    /// Passed checks in a row that mark it healthy again.
    #[serde(default = "default_healthy_threshold")]
    pub healthy_threshold: u32,
    /// HTTP/1.1 `GET path`; healthy on a status in `expected_statuses` (default 200).
    #[serde(default)]
    pub http: Option<HttpHealthCheck>,
    /// `grpc.health.v1.Health/Check`; healthy on `SERVING`.
    #[serde(default)]
    pub grpc: Option<GrpcHealthCheck>,
}

fn default_hc_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_hc_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_unhealthy_threshold() -> u32 {
    2
}
fn default_healthy_threshold() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpHealthCheck {
    pub path: String,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default = "default_expected_statuses")]
    pub expected_statuses: Vec<u16>,
}

fn default_expected_statuses() -> Vec<u16> {
    vec![200]
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GrpcHealthCheck {
    /// Service name sent in the request; empty asks about the whole server.
    #[serde(default)]
    pub service: String,
}

/// Limits that fail fast with 503 instead of queueing when a cluster is overloaded.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreaker {
    /// Concurrent requests to the cluster.
    #[serde(default = "default_max_requests")]
    pub max_requests: u32,
    /// Concurrent retries to the cluster.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        Self {
            max_requests: default_max_requests(),
            max_retries: default_max_retries(),
        }
    }
}

fn default_max_requests() -> u32 {
    1024
}
fn default_max_retries() -> u32 {
    3
}

/// Passive health: eject an endpoint after consecutive 5xx (or connect failures).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutlierDetection {
    #[serde(default = "default_consecutive_5xx")]
    pub consecutive_5xx: u32,
    /// Ejection lasts this times the number of times the endpoint was ejected before.
    #[serde(default = "default_base_ejection_time", with = "crate::duration")]
    pub base_ejection_time: Duration,
    /// Never eject more than this share of a cluster's endpoints.
    #[serde(default = "default_max_ejection_percent")]
    pub max_ejection_percent: u32,
}

fn default_consecutive_5xx() -> u32 {
    5
}
fn default_base_ejection_time() -> Duration {
    Duration::from_secs(30)
}
fn default_max_ejection_percent() -> u32 {
    10
}

/// An ordered list of proxy-wasm filters. Request phases run them first to last, response
/// phases last to first (as Envoy does).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FilterChain {
    pub name: String,
    pub filters: Vec<WasmFilter>,
}

/// One proxy-wasm plugin: a module built with a proxy-wasm SDK (ABI 0.2.1), as Envoy runs it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WasmFilter {
    /// `plugin_name` as the filter sees it.
    pub name: String,
    /// Path of the `.wasm` file, read by the proxy. A relative path is relative to the config
    /// file's folder.
    pub module: String,
    /// Hex sha256 the module must have; a different file is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// `plugin_root_id`.
    #[serde(default)]
    pub root_id: String,
    /// Plugins with the same `vm_id` share shared data and queues.
    #[serde(default)]
    pub vm_id: String,
    /// VM configuration (`proxy_on_vm_start`): a string is passed as is, anything else as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_config: Option<serde_json::Value>,
    /// Plugin configuration (`proxy_on_configure`): a string is passed as is, anything else as
    /// JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<serde_json::Value>,
    /// On a filter failure (trap, deadline, memory) pass the request on instead of answering
    /// 500.
    #[serde(default)]
    pub fail_open: bool,
    /// Linear memory limit of each VM of this filter, in MiB.
    #[serde(default = "default_memory_limit_mb")]
    pub memory_limit_mb: u32,
    /// CPU time one callback may take before the filter is stopped.
    #[serde(default = "default_callback_deadline", with = "crate::duration")]
    pub callback_deadline: Duration,
}

fn default_memory_limit_mb() -> u32 {
    64
}

fn default_callback_deadline() -> Duration {
    Duration::from_millis(100)
}

/// Model servers that serve a set of models, with the endpoint picker's settings and how weight
/// reloads are ridden through. Routes name it with `route: { pool: NAME }`; the request's model
/// comes from its body (the gRPC `model_name`, the JSON `model`) or an `x-weir-model` header.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InferencePool {
    /// Also the name of the cluster it forms (in metrics and `/clusters`): unique among
    /// clusters and pools.
    pub name: String,
    pub protocol: InferenceProtocol,
    pub endpoints: Vec<PoolEndpoint>,
    /// Streams one endpoint takes at once (0: no limit); endpoints may override it.
    #[serde(default = "default_pool_max_in_flight")]
    pub max_in_flight: u32,
    #[serde(default)]
    pub picker: PickerSettings,
    #[serde(default)]
    pub queue: PoolQueue,
    #[serde(default)]
    pub reload: PoolReload,
    /// Scrape each endpoint's Prometheus metrics (vLLM names) for queue depth and KV-cache use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<PoolMetrics>,
    #[serde(default = "default_connect_timeout", with = "crate::duration")]
    pub connect_timeout: Duration,
    /// Most request body bytes read to find the model: an OpenAI JSON body (read whole: it may
    /// name the model after a long prompt) or a gRPC call's first message. A larger one is
    /// refused with 413 / `RESOURCE_EXHAUSTED` unless `x-weir-model` names the model.
    #[serde(default = "default_max_body")]
    pub max_body: u32,
    /// Whether the `x-weir-model` request header picks the model over the body. Turn it off
    /// where clients are not trusted: a header naming one model with a body naming another
    /// would reach a replica picked for the header's.
    #[serde(default = "default_true")]
    pub model_header: bool,
    /// Whether weir asks each response for an ORCA load report
    /// (`endpoint-load-metrics-format: TEXT`; vLLM and Triton report only when asked, and
    /// vLLM reads its metrics for each report). Off: only the scrape, and reports a server
    /// sends unasked, tell weir the replicas' load.
    #[serde(default = "default_true")]
    pub load_reports: bool,
    /// Traffic split by weights version during a rollout: model → version → weight. A new
    /// request that pins no version (`x-weir-model-version`) picks one of the listed versions
    /// some endpoint is serving now, by weight; with none of them serving, any version.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub version_split: BTreeMap<String, BTreeMap<String, u32>>,
}

fn default_pool_max_in_flight() -> u32 {
    64
}
fn default_max_body() -> u32 {
    4 << 20
}

/// What the pool's servers speak.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum InferenceProtocol {
    /// KServe v2 / Triton gRPC (`inference.GRPCInferenceService`) over h2c.
    KserveGrpc,
    /// OpenAI-compatible HTTP/1.1 (`/v1/chat/completions`, `/v1/completions`, SSE streams).
    Openai,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PoolEndpoint {
    /// `ip:port` of the inference API.
    pub address: String,
    pub models: Vec<PoolModel>,
    /// Overrides the pool's `max_in_flight`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,
    /// `ip:port` of its Prometheus metrics, when not the inference address (Triton serves
    /// gRPC and metrics on different ports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_address: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PoolModel {
    pub name: String,
    /// The weights version it serves at start; reloads move it on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// LoRA adapters it can serve on top of the model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub adapters: Vec<String>,
}

/// How much each signal weighs when the picker scores endpoints (lower score wins).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PickerSettings {
    /// Per unit of in-flight fill (streams / max_in_flight).
    pub in_flight: f64,
    /// Per request waiting in the server's own queue (`vllm:num_requests_waiting`).
    pub queue: f64,
    /// Per unit of KV-cache use (`vllm:kv_cache_usage_perc`).
    pub kv_cache: f64,
    /// Bonus for the endpoint that holds the prompt's prefix.
    pub prefix_affinity: f64,
    /// Bonus for an endpoint with the request's LoRA adapter loaded.
    pub lora_affinity: f64,
    /// The prefix's endpoint keeps its bonus while its load is at most this times the average.
    pub bounded_load: f64,
    /// KV-cache use at which an endpoint takes no new request.
    pub kv_cache_full: f64,
    /// Bytes of the prompt hashed for prefix affinity (0: no prefix affinity).
    pub prefix_bytes: u32,
}

impl Default for PickerSettings {
    fn default() -> Self {
        Self {
            in_flight: 1.0,
            queue: 0.5,
            kv_cache: 1.0,
            prefix_affinity: 0.5,
            lora_affinity: 0.3,
            bounded_load: 1.25,
            kv_cache_full: 0.98,
            prefix_bytes: 256,
        }
    }
}

/// Requests no endpoint can take now wait here; past its limits they are shed with 429 (gRPC
/// `RESOURCE_EXHAUSTED`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PoolQueue {
    #[serde(default = "default_max_waiting")]
    pub max_waiting: u32,
    #[serde(default = "default_max_wait", with = "crate::duration")]
    pub max_wait: Duration,
}

impl Default for PoolQueue {
    fn default() -> Self {
        Self {
            max_waiting: default_max_waiting(),
            max_wait: default_max_wait(),
        }
    }
}

fn default_max_waiting() -> u32 {
    256
}
fn default_max_wait() -> Duration {
    Duration::from_secs(5)
}

/// How weight reloads are ridden through.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PoolReload {
    /// In-flight streams of a draining endpoint may run this long; later ones are ended.
    #[serde(default = "default_drain_deadline", with = "crate::duration")]
    pub drain_deadline: Duration,
    /// How long a request waits when every endpoint of its model is reloading.
    #[serde(default = "default_reload_wait", with = "crate::duration")]
    pub max_wait: Duration,
    /// After a reload, check the endpoint serves the model (KServe `ModelReady`; OpenAI a
    /// one-token completion) before it gets traffic again.
    #[serde(default = "default_true")]
    pub warmup: bool,
    /// How often endpoints are asked whether their models are ready (KServe `ModelReady`,
    /// OpenAI `GET /v1/models`); 0 turns polling off.
    #[serde(default = "default_poll_interval", with = "crate::duration")]
    pub poll_interval: Duration,
    /// How `weir-control reload` asks an OpenAI-style server (vLLM, SGLang) to load new
    /// weights; KServe pools use `RepositoryModelLoad`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpReload>,
}

impl Default for PoolReload {
    fn default() -> Self {
        Self {
            drain_deadline: default_drain_deadline(),
            max_wait: default_reload_wait(),
            warmup: true,
            poll_interval: default_poll_interval(),
            http: None,
        }
    }
}

/// One HTTP request to an endpoint that makes it load new weights, for servers whose reload
/// API is their own (SGLang's `POST /update_weights_from_disk`, a vLLM deployment's RPC).
/// `{model}` and `{version}` in `path` and `body` are replaced by the model's name and the
/// version being rolled out.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpReload {
    #[serde(default = "default_reload_method")]
    pub method: String,
    pub path: String,
    /// A JSON body, sent with `content-type: application/json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Polled with GET after the call until it answers 200 (and, when it is an OpenAI model
    /// list, lists the model).
    #[serde(default = "default_ready_path")]
    pub ready_path: String,
}

fn default_reload_method() -> String {
    "POST".into()
}
fn default_ready_path() -> String {
    "/v1/models".into()
}

impl HttpReload {
    /// `text` with `{model}` and `{version}` replaced.
    pub fn expand(text: &str, model: &str, version: &str) -> String {
        text.replace("{model}", model).replace("{version}", version)
    }
}

fn default_drain_deadline() -> Duration {
    Duration::from_secs(30)
}
fn default_reload_wait() -> Duration {
    Duration::from_secs(60)
}
fn default_poll_interval() -> Duration {
    Duration::from_secs(2)
}
fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PoolMetrics {
    #[serde(default = "default_metrics_path")]
    pub path: String,
    #[serde(default = "default_scrape_interval", with = "crate::duration")]
    pub interval: Duration,
    /// The series of requests waiting, for a server whose name weir does not know: `name` or
    /// `name{label="value",...}` (as the Gateway API inference extension's
    /// `--total-queued-requests-metric`); matching series are summed. Instead of the known
    /// names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// The series of KV-cache use (0 to 1), written as `waiting` is; the highest matching
    /// series counts. Instead of the known names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache: Option<String>,
}

fn default_metrics_path() -> String {
    "/metrics".into()
}
fn default_scrape_interval() -> Duration {
    Duration::from_secs(1)
}
