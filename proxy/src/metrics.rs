//! Prometheus metrics. Names and labels are part of weir's interface (README "Metrics"):
//! change them only with a note to users.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::inference::pool::PoolCounters;
use crate::state::{now_ms, Runtime};

/// Every metric weir exports.
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    /// gRPC calls by the status the client got (`requests` has them all as 200).
    pub grpc_requests: IntCounterVec,
    pub duration: HistogramVec,
    pub retries: IntCounterVec,
    pub upstream_failures: IntCounterVec,
    pub reloads: IntCounterVec,
    healthy: IntGaugeVec,
    ejected: IntGaugeVec,
    active: IntGaugeVec,
    config: IntGaugeVec,
    /// Proxy-wasm: one phase's round trip through the filter chain (on the filter threads).
    pub filter_time: HistogramVec,
    /// Request start to the end of the response, by the endpoint that answered it.
    pub endpoint_duration: HistogramVec,
    /// Responses by the endpoint that answered and status class (`2xx` .. `5xx`, `none`).
    pub endpoint_responses: IntCounterVec,
    /// Inference: request start to the first response body byte, by pool and model.
    pub ttft: HistogramVec,
    /// Inference: between consecutive response body chunks of a stream.
    pub inter_token: HistogramVec,
    /// Inference: response body chunks streamed (a streaming server sends each token or
    /// message in its own), by pool and model; its rate is tokens/s.
    pub tokens: IntCounterVec,
    /// Inference: tokens the server reports in its `usage` (OpenAI-compatible), by `type`
    /// (input: the prompt, output: the completion).
    pub usage_tokens: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let requests = counter(
            "weir_requests_total",
            "Downstream requests by listener, route, cluster and response status.",
            &["listener", "route", "cluster", "code"],
        );
        let grpc_requests = counter(
            "weir_grpc_requests_total",
            "Downstream gRPC calls by listener, route, cluster and the gRPC status the client got.",
            &["listener", "route", "cluster", "grpc_code"],
        );
        let retries = counter(
            "weir_upstream_retries_total",
            "Retries sent to a cluster.",
            &["cluster"],
        );
        let upstream_failures = counter(
            "weir_upstream_failures_total",
            "Failed upstream attempts by kind (connect, reset, timeout, status).",
            &["cluster", "kind"],
        );
        let reloads = counter(
            "weir_config_reloads_total",
            "Config reloads by result.",
            &["result"],
        );
        let healthy = gauge(
            "weir_upstream_healthy",
            "1 if the endpoint passes active health checks.",
            &["cluster", "endpoint"],
        );
        let ejected = gauge(
            "weir_upstream_ejected",
            "1 if outlier detection currently ejects the endpoint.",
            &["cluster", "endpoint"],
        );
        let active = gauge(
            "weir_upstream_active_requests",
            "Requests in flight to the endpoint.",
            &["cluster", "endpoint"],
        );
        let config = gauge(
            "weir_config_info",
            "The active config version (value 1).",
            &["version"],
        );
        let histogram = |name: &str, help: &str, buckets: Vec<f64>, labels: &[&str]| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
                .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let ttft = histogram(
            "weir_inference_ttft_seconds",
            "Inference requests: time from the request to the first response byte (time to first token).",
            vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ],
            &["pool", "model"],
        );
        let inter_token = histogram(
            "weir_inference_inter_token_seconds",
            "Inference streams: time between consecutive response chunks (inter-token latency).",
            vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
            ],
            &["pool", "model"],
        );
        let filter_time = histogram(
            "weir_wasm_filter_phase_seconds",
            "Proxy-wasm: wall time of one phase through the filter chain, by phase.",
            vec![
                0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                0.1,
            ],
            &["phase"],
        );
        let endpoint_duration = histogram(
            "weir_upstream_request_duration_seconds",
            "Time from request start to the end of the response, by the endpoint of the last attempt.",
            vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ],
            &["cluster", "endpoint"],
        );
        let endpoint_responses = counter(
            "weir_upstream_responses_total",
            "Requests by the endpoint of the last attempt and response status class (none: no response).",
            &["cluster", "endpoint", "class"],
        );
        let tokens = counter(
            "weir_inference_tokens_total",
            "Inference streams: response chunks streamed (one per token or message from streaming servers).",
            &["pool", "model"],
        );
        let usage_tokens = counter(
            "weir_inference_usage_tokens_total",
            "Inference: tokens as the server's usage reports them, by type (input: prompt, output: completion).",
            &["pool", "model", "type"],
        );
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "weir_request_duration_seconds",
                "Time from request start to the end of the response.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ]),
            &["listener", "route", "cluster"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(duration.clone()))
            .expect("unique metric");
        Self {
            registry,
            requests,
            grpc_requests,
            duration,
            retries,
            upstream_failures,
            reloads,
            healthy,
            ejected,
            active,
            config,
            ttft,
            inter_token,
            tokens,
            usage_tokens,
            endpoint_duration,
            endpoint_responses,
            filter_time,
        }
    }

    /// The Prometheus text exposition, with endpoint gauges read from `runtime` now.
    pub fn render(&self, runtime: &Runtime) -> String {
        self.healthy.reset();
        self.ejected.reset();
        self.active.reset();
        self.config.reset();
        self.config
            .with_label_values(&[runtime.snapshot.version.as_str()])
            .set(1);
        let now = now_ms();
        for c in &runtime.clusters {
            for e in &c.endpoints {
                let addr = e.address.to_string();
                let labels = [c.name.as_str(), addr.as_str()];
                self.healthy
                    .with_label_values(&labels)
                    .set(e.healthy.load(Ordering::Relaxed) as i64);
                self.ejected
                    .with_label_values(&labels)
                    .set(e.is_ejected(now) as i64);
                self.active
                    .with_label_values(&labels)
                    .set(i64::from(e.active.load(Ordering::Relaxed)));
            }
        }
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!("encoding metrics failed: {e}");
        }
        let mut text = String::from_utf8(out).unwrap_or_default();
        render_connections(runtime, &mut text);
        render_circuit_breakers(runtime, &mut text);
        render_pools(runtime, &mut text);
        text
    }
}

/// Upstream connections per endpoint, read from the endpoints' counters and gauge now.
fn render_connections(runtime: &Runtime, out: &mut String) {
    use std::fmt::Write;
    type Counter = fn(&crate::state::EndpointState) -> &AtomicU64;
    let counters: [(&str, &str, &str, Counter); 3] = [
        (
            "weir_upstream_connections_open",
            "gauge",
            "Upstream connections to the endpoint open now, in use or pooled.",
            |e| &e.connections_open,
        ),
        (
            "weir_upstream_connections_opened_total",
            "counter",
            "Upstream connections opened to the endpoint.",
            |e| &e.connections_opened,
        ),
        (
            "weir_upstream_connections_reused_total",
            "counter",
            "Upstream requests sent on a pooled connection (HTTP/1.1 keep-alive, or another h2 stream).",
            |e| &e.connections_reused,
        ),
    ];
    for (name, kind, help, get) in counters {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for c in &runtime.clusters {
            for e in &c.endpoints {
                let _ = writeln!(
                    out,
                    "{name}{{cluster=\"{}\",endpoint=\"{}\"}} {}",
                    escape(&c.name),
                    e.address,
                    get(e).load(Ordering::Relaxed)
                );
            }
        }
    }
}

/// Each cluster's circuit breaker: requests and retries in flight against their limits, read
/// now.
fn render_circuit_breakers(runtime: &Runtime, out: &mut String) {
    use std::fmt::Write;
    let _ = writeln!(
        out,
        "# HELP weir_upstream_cluster_active Requests and retries in flight to the cluster (what its circuit breaker counts).\n# TYPE weir_upstream_cluster_active gauge"
    );
    let mut open = String::new();
    for (c, state) in runtime.snapshot.clusters.iter().zip(&runtime.clusters) {
        let name = escape(&c.name);
        for (kind, active, max) in [
            (
                "requests",
                &state.active_requests,
                c.circuit_breaker.max_requests,
            ),
            (
                "retries",
                &state.active_retries,
                c.circuit_breaker.max_retries,
            ),
        ] {
            let active = active.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "weir_upstream_cluster_active{{cluster=\"{name}\",kind=\"{kind}\"}} {active}"
            );
            let _ = writeln!(
                open,
                "weir_upstream_circuit_breaker_open{{cluster=\"{name}\",kind=\"{kind}\"}} {}",
                u8::from(active >= max)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP weir_upstream_circuit_breaker_open 1 while the cluster's circuit breaker refuses more (in flight reached max_requests or max_retries).\n# TYPE weir_upstream_circuit_breaker_open gauge"
    );
    out.push_str(&open);
}

/// Inference pool metrics, read from the pools' state now.
fn render_pools(runtime: &Runtime, out: &mut String) {
    use std::fmt::Write;
    if runtime.pools.is_empty() {
        return;
    }
    type Counter = fn(&PoolCounters) -> &AtomicU64;
    let counters: [(&str, &str, Counter); 6] = [
        (
            "weir_inference_queued_total",
            "Requests that waited for a busy pool's replica.",
            |c| &c.queued,
        ),
        (
            "weir_inference_shed_total",
            "Requests refused with 429 / RESOURCE_EXHAUSTED: queue full or wait over.",
            |c| &c.shed,
        ),
        (
            "weir_inference_reload_waits_total",
            "Requests that waited because every replica of their model was reloading.",
            |c| &c.reload_waits,
        ),
        (
            "weir_inference_unknown_model_total",
            "Requests for a model no replica serves.",
            |c| &c.unknown_model,
        ),
        (
            "weir_inference_streams_cut_total",
            "Streams ended by a drain deadline.",
            |c| &c.streams_cut,
        ),
        (
            "weir_inference_abandoned_total",
            "Requests whose client left while they waited for a replica (their place given back).",
            |c| &c.abandoned,
        ),
    ];
    for (name, help, get) in counters {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for p in &runtime.pools {
            let _ = writeln!(
                out,
                "{name}{{pool=\"{}\"}} {}",
                p.name,
                get(&p.counters).load(Ordering::Relaxed)
            );
        }
    }
    let _ = writeln!(out, "# HELP weir_inference_waiting Requests waiting for a replica now.\n# TYPE weir_inference_waiting gauge");
    for p in &runtime.pools {
        let _ = writeln!(
            out,
            "weir_inference_waiting{{pool=\"{}\"}} {}",
            p.name,
            p.waiting.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(out, "# HELP weir_inference_streams Streams open to the endpoint.\n# TYPE weir_inference_streams gauge");
    for p in &runtime.pools {
        for e in &p.endpoints {
            let _ = writeln!(
                out,
                "weir_inference_streams{{pool=\"{}\",endpoint=\"{}\"}} {}",
                p.name,
                e.address,
                e.in_flight()
            );
        }
    }
    let _ = writeln!(out, "# HELP weir_inference_model_state 1 for the state and version each endpoint's model is in (serving, draining, reloading, warming).\n# TYPE weir_inference_model_state gauge");
    for p in &runtime.pools {
        for e in &p.endpoints {
            for m in e.models().iter() {
                let state = format!("{:?}", m.reload.model_state()).to_lowercase();
                let _ = writeln!(
                    out,
                    "weir_inference_model_state{{pool=\"{}\",endpoint=\"{}\",model=\"{}\",version=\"{}\",state=\"{state}\"}} 1",
                    p.name,
                    e.address,
                    escape(&m.name),
                    escape(&m.reload.version)
                );
            }
        }
    }
}

/// A Prometheus label value with `\\`, `"` and newlines escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Appends one unlabelled metric (`kind`: `counter` or `gauge`) in Prometheus text format, for
/// values that live outside the registry.
pub fn write_plain(
    out: &mut String,
    kind: &str,
    name: &str,
    help: &str,
    value: impl std::fmt::Display,
) {
    use std::fmt::Write;
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

/// The control plane's discovery stream: connected, pushes ACKed and NACKed, the version
/// ACKed last and, while the newest push stands refused, its version.
pub fn render_control(s: &weir_control::client::StreamState, out: &mut String) {
    use std::fmt::Write;
    write_plain(
        out,
        "gauge",
        "weir_control_connected",
        "1 while the discovery stream to the control plane is open.",
        u8::from(s.connected),
    );
    write_plain(
        out,
        "counter",
        "weir_control_streams_opened_total",
        "Discovery streams opened (the first and every reconnect).",
        s.streams_opened,
    );
    let _ = writeln!(
        out,
        "# HELP weir_control_pushes_total Control plane pushes by answer (ack: applied, nack: refused and the last good config kept).\n# TYPE weir_control_pushes_total counter\nweir_control_pushes_total{{result=\"ack\"}} {}\nweir_control_pushes_total{{result=\"nack\"}} {}",
        s.acks, s.nacks
    );
    if let Some(v) = &s.acked_version {
        let _ = writeln!(
            out,
            "# HELP weir_control_acked_version_info The version of the last push ACKed (value 1).\n# TYPE weir_control_acked_version_info gauge\nweir_control_acked_version_info{{version=\"{}\"}} 1",
            escape(v)
        );
    }
    if let Some(r) = &s.rejected {
        let _ = writeln!(
            out,
            "# HELP weir_control_rejected_version_info The newest push's version while it stands NACKed (value 1; the reason is on the admin endpoint's /control).\n# TYPE weir_control_rejected_version_info gauge\nweir_control_rejected_version_info{{version=\"{}\"}} 1",
            escape(&r.version)
        );
    }
}
