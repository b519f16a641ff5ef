//! What the proxy and the filter host exchange: plugin settings, per-stream facts, callouts
//! and verdicts. Plain data.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use crate::abi::Pairs;

/// One proxy-wasm plugin of a filter chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginConfig {
    /// `plugin_name` as the filter sees it.
    pub name: String,
    /// `plugin_root_id`.
    pub root_id: String,
    /// VMs with the same id share data and queues.
    pub vm_id: String,
    pub module: PathBuf,
    /// Hex sha256 the module must have; checked when it is loaded.
    pub sha256: Option<String>,
    pub vm_config: Vec<u8>,
    pub plugin_config: Vec<u8>,
    /// On a filter failure, let the request through instead of answering 500.
    pub fail_open: bool,
    pub limits: Limits,
}

/// Resource limits of every filter VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Linear memory per VM.
    pub memory_bytes: usize,
    /// CPU time one callback may take before it is stopped.
    pub callback_deadline: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_bytes: 64 << 20,
            callback_deadline: Duration::from_millis(100),
        }
    }
}

/// Facts about a request that filters read as properties.
#[derive(Clone, Debug, Default)]
pub struct StreamInfo {
    pub source: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'static str,
    pub route: String,
    pub cluster: String,
    pub listener: String,
    pub start: Option<SystemTime>,
}

/// A reply a filter sent instead of the upstream's (`proxy_send_local_response`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalResponse {
    pub status: u16,
    pub headers: Pairs,
    pub body: Vec<u8>,
    /// gRPC status for gRPC requests (`-1` in the ABI: none).
    pub grpc_status: Option<u32>,
    pub details: String,
}

/// An HTTP call a filter made (`proxy_http_call`). Headers include `:method`, `:path` and
/// `:authority`.
#[derive(Clone, Debug)]
pub struct HttpCall {
    pub cluster: String,
    pub headers: Pairs,
    pub body: Vec<u8>,
    pub trailers: Pairs,
    pub timeout: Duration,
}

/// The answer to an [`HttpCall`]; `headers` starts with `:status`.
#[derive(Clone, Debug, Default)]
pub struct HttpCallResponse {
    pub headers: Pairs,
    pub body: Vec<u8>,
    pub trailers: Pairs,
}

/// A unary gRPC call a filter made (`proxy_grpc_call`).
#[derive(Clone, Debug)]
pub struct GrpcCall {
    pub cluster: String,
    pub service: String,
    pub method: String,
    pub metadata: Pairs,
    pub message: Vec<u8>,
    pub timeout: Duration,
}

/// The answer to a [`GrpcCall`].
#[derive(Clone, Debug, Default)]
pub struct GrpcCallResponse {
    pub status: u32,
    pub message: String,
    pub initial_metadata: Pairs,
    /// The reply message, when the call succeeded.
    pub body: Option<Vec<u8>>,
    pub trailing_metadata: Pairs,
}

/// A call a filter is waiting on.
#[derive(Clone, Debug)]
pub enum Callout {
    Http(HttpCall),
    Grpc(GrpcCall),
}

/// A callout's result; `Http(None)` is a failed call (reset, timeout, no cluster).
#[derive(Clone, Debug)]
pub enum CalloutResult {
    Http(Option<HttpCallResponse>),
    Grpc(GrpcCallResponse),
}

/// Runs filters' callouts on the proxy's side (filter threads have no sockets).
pub trait Callouts: Send + Sync + 'static {
    /// Whether `cluster` exists, so a call to an unknown one fails at once as in Envoy.
    fn has_cluster(&self, cluster: &str) -> bool;
    fn call(
        &self,
        call: Callout,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = CalloutResult> + Send>>;
}

/// What the proxy does with a phase's outcome.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict<T> {
    /// Go on, with the phase's data as the filters left it.
    Continue(T),
    /// Answer the client with this instead.
    Respond(LocalResponse),
    /// A filter failed (trap, deadline, memory) and is not fail-open: answer 500.
    Fail(String),
    /// A filter closed the stream: reset it.
    Close,
}

/// Callouts for hosts with no clusters (tests, benchmarks): every call fails as an unknown
/// cluster would.
pub struct NoCallouts;

impl Callouts for NoCallouts {
    fn has_cluster(&self, _: &str) -> bool {
        false
    }

    fn call(
        &self,
        _: Callout,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = CalloutResult> + Send>> {
        Box::pin(async { CalloutResult::Http(None) })
    }
}
