//! OpenTelemetry traces: a server span per request and a client span per upstream attempt
//! (retries show as siblings), W3C `traceparent`/`tracestate` taken from the request or
//! started here, and sent upstream with the attempt's span as parent. Finished spans go
//! through a bounded queue to a background exporter (OTLP over gRPC); a full queue drops
//! spans and counts them, and the request path never waits for export.
//!
//! The API's sampler, id generator and propagator decide and carry the context; a finished
//! span is built straight as its OTLP message, and the exporter sends batches of them with the
//! generated OTLP client. Going through the SDK's `SpanData` and span exporter instead cost a
//! conversion per span and a regrouping by resource and scope per batch.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceState,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_proto::tonic::trace::v1::{span, status, Span, SpanFlags, Status};
use opentelemetry_proto::transform::common::tonic::Attributes;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    IdGenerator, RandomIdGenerator, Sampler, SamplingDecision, ShouldSample,
};
use pingora::http::RequestHeader;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::mpsc;
use weir_policies::model::Tracing as Config;

/// Spans exported in one OTLP request at most.
const BATCH: usize = 512;
/// Longest a finished span waits before it is exported. The exporter sleeps in between
/// (rather than waiting on the queue) so a request never wakes another thread; it is woken
/// early only when the queue is half full.
const FLUSH_EVERY: Duration = Duration::from_millis(200);

/// The tracer shared by every listener.
pub struct Tracer {
    tx: mpsc::Sender<Span>,
    /// Wakes the exporter before its time when the queue is half full.
    half_full: tokio::sync::Notify,
    capacity: usize,
    sampler: Sampler,
    ids: RandomIdGenerator,
    propagator: TraceContextPropagator,
    pub queued: AtomicU64,
    pub dropped: AtomicU64,
    pub exported: AtomicU64,
    pub export_failures: AtomicU64,
}

/// The background service that exports what the tracer queues.
pub struct Exporter {
    config: Config,
    rx: Mutex<Option<mpsc::Receiver<Span>>>,
    tracer: Arc<Tracer>,
}

struct HeaderExtractor<'a>(&'a RequestHeader);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.headers.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.headers.keys().map(|k| k.as_str()).collect()
    }
}

struct HeaderInjector<'a>(&'a mut RequestHeader);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        let _ = self.0.insert_header(key.to_string(), value);
    }
}

/// One request's trace: its server span, and the upstream attempt in progress.
pub struct RequestTrace {
    context: SpanContext,
    /// The caller's span, when the request carried a `traceparent`.
    parent: Option<SpanId>,
    start: SystemTime,
    attempt: Option<Attempt>,
    /// Finished attempts' client spans.
    spans: Vec<Span>,
}

struct Attempt {
    span: SpanId,
    start: SystemTime,
    attributes: Vec<KeyValue>,
    status: Option<u16>,
}

impl RequestTrace {
    pub fn sampled(&self) -> bool {
        self.context.is_sampled()
    }
}

impl Tracer {
    /// The tracer and the exporter service it feeds.
    pub fn new(config: &Config) -> (Arc<Self>, Exporter) {
        let (tx, rx) = mpsc::channel(config.queue.max(1) as usize);
        let tracer = Arc::new(Self {
            tx,
            half_full: tokio::sync::Notify::new(),
            capacity: config.queue.max(1) as usize,
            sampler: Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.sampling.clamp(0.0, 1.0),
            ))),
            ids: RandomIdGenerator::default(),
            propagator: TraceContextPropagator::new(),
            queued: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            exported: AtomicU64::new(0),
            export_failures: AtomicU64::new(0),
        });
        let exporter = Exporter {
            config: config.clone(),
            rx: Mutex::new(Some(rx)),
            tracer: tracer.clone(),
        };
        (tracer, exporter)
    }

    /// Starts the trace of a request: continues the caller's (`traceparent`) or starts one;
    /// sampled as the caller decided, otherwise by the configured ratio.
    pub fn start(&self, req: &RequestHeader) -> RequestTrace {
        let parent_cx = self.propagator.extract(&HeaderExtractor(req));
        let parent = parent_cx.span().span_context().clone();
        let (trace_id, parent_span, state) = if parent.is_valid() {
            (
                parent.trace_id(),
                Some(parent.span_id()),
                parent.trace_state().clone(),
            )
        } else {
            (self.ids.new_trace_id(), None, TraceState::default())
        };
        let decision = self
            .sampler
            .should_sample(
                parent.is_valid().then_some(&parent_cx),
                trace_id,
                "",
                &SpanKind::Server,
                &[],
                &[],
            )
            .decision;
        let flags = if decision == SamplingDecision::RecordAndSample {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        RequestTrace {
            context: SpanContext::new(trace_id, self.ids.new_span_id(), flags, false, state),
            parent: parent_span,
            start: SystemTime::now(),
            attempt: None,
            spans: Vec::new(),
        }
    }

    /// Starts a client span for an upstream attempt (ending the previous attempt's).
    pub fn attempt(&self, t: &mut RequestTrace, attributes: Vec<KeyValue>) {
        self.end_attempt(t, None);
        t.attempt = Some(Attempt {
            span: self.ids.new_span_id(),
            start: SystemTime::now(),
            attributes,
            status: None,
        });
    }

    /// Records the attempt's response status.
    pub fn attempt_status(&self, t: &mut RequestTrace, status: u16) {
        if let Some(a) = t.attempt.as_mut() {
            a.status = Some(status);
        }
    }

    fn end_attempt(&self, t: &mut RequestTrace, error: Option<&str>) {
        let Some(a) = t.attempt.take() else { return };
        if !t.sampled() {
            return;
        }
        let mut attributes = a.attributes;
        if let Some(s) = a.status {
            attributes.push(KeyValue::new("http.response.status_code", i64::from(s)));
        }
        let failed = error.is_some() || a.status.is_none_or(|s| s >= 500);
        let status = failed.then(|| error.unwrap_or("upstream attempt failed"));
        t.spans.push(span_message(
            &t.context,
            a.span,
            t.context.span_id(),
            false,
            span::SpanKind::Client,
            "upstream".into(),
            a.start,
            attributes,
            status,
        ));
    }

    /// Sets `traceparent` (and `tracestate`) on the upstream request: the current attempt's
    /// span is the parent of what the upstream does.
    pub fn inject(&self, t: &RequestTrace, upstream: &mut RequestHeader) {
        let span = t.attempt.as_ref().map_or(t.context.span_id(), |a| a.span);
        let sc = SpanContext::new(
            t.context.trace_id(),
            span,
            t.context.trace_flags(),
            true,
            t.context.trace_state().clone(),
        );
        let cx = Context::new().with_remote_span_context(sc);
        self.propagator
            .inject_context(&cx, &mut HeaderInjector(upstream));
    }

    /// Ends the request's spans and queues them for export (dropping them if the queue is
    /// full).
    pub fn finish(
        &self,
        mut t: RequestTrace,
        name: String,
        attributes: Vec<KeyValue>,
        error: Option<&str>,
        failed: bool,
    ) {
        self.end_attempt(&mut t, error);
        if !t.sampled() {
            return;
        }
        let status = failed.then(|| error.unwrap_or("request failed"));
        let server = span_message(
            &t.context,
            t.context.span_id(),
            t.parent.unwrap_or(SpanId::INVALID),
            t.parent.is_some(),
            span::SpanKind::Server,
            name,
            t.start,
            attributes,
            status,
        );
        for span in t.spans.into_iter().chain([server]) {
            match self.tx.try_send(span) {
                Ok(()) => self.queued.fetch_add(1, Ordering::Relaxed),
                Err(_) => self.dropped.fetch_add(1, Ordering::Relaxed),
            };
        }
        if self.tx.capacity() < self.capacity / 2 {
            self.half_full.notify_one();
        }
    }

    /// The tracer's Prometheus metrics.
    pub fn render(&self, out: &mut String) {
        for (name, help, v) in [
            ("queued", "Finished spans queued for export.", &self.queued),
            (
                "dropped",
                "Finished spans dropped because the export queue was full.",
                &self.dropped,
            ),
            ("exported", "Spans the collector accepted.", &self.exported),
            (
                "export_failures",
                "OTLP export calls that failed (their spans are lost).",
                &self.export_failures,
            ),
        ] {
            crate::metrics::write_plain(
                out,
                "counter",
                &format!("weir_trace_spans_{name}_total"),
                help,
                v.load(Ordering::Relaxed),
            );
        }
    }
}

/// A finished span as its OTLP message. `status`: the error's description when it failed.
#[allow(clippy::too_many_arguments)]
fn span_message(
    trace: &SpanContext,
    id: SpanId,
    parent: SpanId,
    parent_remote: bool,
    kind: span::SpanKind,
    name: String,
    start: SystemTime,
    attributes: Vec<KeyValue>,
    status: Option<&str>,
) -> Span {
    // W3C trace flags, plus OTLP's "the parent's remoteness is known" and "it is remote".
    let mut flags =
        u32::from(trace.trace_flags().to_u8()) | SpanFlags::ContextHasIsRemoteMask as u32;
    if parent_remote {
        flags |= SpanFlags::ContextIsRemoteMask as u32;
    }
    Span {
        trace_id: trace.trace_id().to_bytes().to_vec(),
        span_id: id.to_bytes().to_vec(),
        trace_state: trace.trace_state().header(),
        parent_span_id: if parent == SpanId::INVALID {
            Vec::new()
        } else {
            parent.to_bytes().to_vec()
        },
        flags,
        name,
        kind: kind as i32,
        start_time_unix_nano: unix_nanos(start),
        end_time_unix_nano: unix_nanos(SystemTime::now()),
        attributes: Attributes::from(attributes).0,
        status: Some(match status {
            None => Status::default(),
            Some(e) => Status {
                code: status::StatusCode::Error as i32,
                message: e.to_string(),
            },
        }),
        ..Default::default()
    }
}

#[async_trait]
impl BackgroundService for Exporter {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(mut rx) = self.rx.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
        use opentelemetry_proto::tonic::resource::v1::Resource;
        use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans};
        let channel =
            match tonic::transport::Endpoint::from_shared(self.config.otlp_endpoint.clone()) {
                Ok(e) => e.timeout(Duration::from_secs(5)).connect_lazy(),
                Err(e) => {
                    tracing::error!("tracing.otlp_endpoint: {e}; spans will be dropped");
                    return;
                }
            };
        let mut client = TraceServiceClient::new(channel);
        use otlp_metrics::string;
        let resource = Resource {
            attributes: vec![
                string("service.name", &self.config.service_name),
                string("telemetry.sdk.name", "weir"),
                string("telemetry.sdk.language", "rust"),
                string("telemetry.sdk.version", env!("CARGO_PKG_VERSION")),
            ],
            ..Default::default()
        };
        let scope = InstrumentationScope {
            name: "weir".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        };
        loop {
            let done = tokio::select! {
                _ = shutdown.changed() => true,
                _ = tokio::time::sleep(FLUSH_EVERY) => false,
                _ = self.tracer.half_full.notified() => false,
            };
            // Everything queued now, in batches.
            loop {
                let mut batch = Vec::with_capacity(BATCH);
                while batch.len() < BATCH {
                    match rx.try_recv() {
                        Ok(span) => batch.push(span),
                        Err(_) => break,
                    }
                }
                if batch.is_empty() {
                    break;
                }
                let n = batch.len() as u64;
                let request = ExportTraceServiceRequest {
                    resource_spans: vec![ResourceSpans {
                        resource: Some(resource.clone()),
                        scope_spans: vec![ScopeSpans {
                            scope: Some(scope.clone()),
                            spans: batch,
                            schema_url: String::new(),
                        }],
                        schema_url: String::new(),
                    }],
                };
                match client.export(request).await {
                    Ok(answer) => {
                        // A collector may take part of a batch (OTLP partial success).
                        let rejected = answer
                            .into_inner()
                            .partial_success
                            .map_or(0, |p| u64::try_from(p.rejected_spans).unwrap_or(0));
                        self.tracer
                            .exported
                            .fetch_add(n.saturating_sub(rejected), Ordering::Relaxed)
                    }
                    Err(e) => {
                        tracing::debug!("OTLP export of {n} spans failed: {e}");
                        self.tracer.export_failures.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
            if done {
                return;
            }
        }
    }
}

/// Pushes every metric of [`crate::admin::Exposition`] to an OTLP/gRPC collector at an
/// interval: the numbers `/stats/prometheus` shows, as cumulative OTLP sums, gauges and
/// histograms.
pub struct MetricsExport {
    pub config: weir_policies::model::OtlpMetrics,
    pub exposition: Arc<crate::admin::Exposition>,
}

#[async_trait]
impl BackgroundService for MetricsExport {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
        let channel = match tonic::transport::Endpoint::from_shared(self.config.endpoint.clone()) {
            Ok(e) => e.timeout(Duration::from_secs(5)).connect_lazy(),
            Err(e) => {
                tracing::error!("otlp_metrics.endpoint: {e}");
                return;
            }
        };
        let mut client = MetricsServiceClient::new(channel);
        let started = unix_nanos(SystemTime::now());
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(self.config.interval) => {}
            }
            let text = self.exposition.render();
            match otlp_metrics::request(&text, &self.config.service_name, started) {
                Ok(req) => {
                    if let Err(e) = client.export(req).await {
                        tracing::debug!("OTLP metrics export failed: {e}");
                    }
                }
                Err(e) => tracing::warn!("metrics not exported: {e}"),
            }
        }
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Prometheus text exposition → OTLP `ExportMetricsServiceRequest`.
pub mod otlp_metrics {
    use std::collections::BTreeMap;

    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{
        any_value, AnyValue, InstrumentationScope, KeyValue,
    };
    use opentelemetry_proto::tonic::metrics::v1::{
        metric, number_data_point, AggregationTemporality, Gauge, Histogram, HistogramDataPoint,
        Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
    };
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use prometheus_parse::{Scrape, Value};

    /// A string attribute.
    pub(super) fn string(key: &str, v: &str) -> KeyValue {
        KeyValue {
            key: key.to_string(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(v.to_string())),
            }),
            ..Default::default()
        }
    }

    /// The request carrying every metric of `text`; `start` is when counting began.
    pub fn request(
        text: &str,
        service: &str,
        start: u64,
    ) -> Result<ExportMetricsServiceRequest, String> {
        let now = super::unix_nanos(std::time::SystemTime::now());
        let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
            .map_err(|e| format!("the exposition does not parse: {e}"))?;
        let labels_key = |l: &prometheus_parse::Labels| {
            let mut v: Vec<(String, String)> =
                l.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            v.sort();
            v
        };
        // Histogram sums arrive as their own `<name>_sum` samples.
        let sums: BTreeMap<(String, Vec<(String, String)>), f64> = scrape
            .samples
            .iter()
            .filter_map(|s| {
                let base = s.metric.strip_suffix("_sum")?;
                let v = match s.value {
                    Value::Untyped(v) | Value::Counter(v) | Value::Gauge(v) => v,
                    _ => return None,
                };
                Some(((base.to_string(), labels_key(&s.labels)), v))
            })
            .collect();
        let histograms: std::collections::HashSet<&str> = scrape
            .samples
            .iter()
            .filter(|s| matches!(s.value, Value::Histogram(_)))
            .map(|s| s.metric.as_str())
            .collect();
        let mut metrics: BTreeMap<String, Metric> = BTreeMap::new();
        for s in &scrape.samples {
            let is_part = ["_sum", "_count"].iter().any(|suffix| {
                s.metric
                    .strip_suffix(suffix)
                    .is_some_and(|b| histograms.contains(b))
            });
            if is_part {
                continue;
            }
            let attributes: Vec<KeyValue> = labels_key(&s.labels)
                .iter()
                .map(|(k, v)| string(k, v))
                .collect();
            let point = |v: f64| NumberDataPoint {
                attributes: attributes.clone(),
                start_time_unix_nano: start,
                time_unix_nano: now,
                value: Some(number_data_point::Value::AsDouble(v)),
                ..Default::default()
            };
            let entry = metrics.entry(s.metric.clone()).or_insert_with(|| Metric {
                name: s.metric.clone(),
                description: scrape.docs.get(&s.metric).cloned().unwrap_or_default(),
                ..Default::default()
            });
            match (&s.value, &mut entry.data) {
                (Value::Counter(v), None) => {
                    entry.data = Some(metric::Data::Sum(Sum {
                        data_points: vec![point(*v)],
                        aggregation_temporality: AggregationTemporality::Cumulative as i32,
                        is_monotonic: true,
                    }))
                }
                (Value::Counter(v), Some(metric::Data::Sum(sum))) => {
                    sum.data_points.push(point(*v))
                }
                (Value::Gauge(v) | Value::Untyped(v), None) => {
                    entry.data = Some(metric::Data::Gauge(Gauge {
                        data_points: vec![point(*v)],
                    }))
                }
                (Value::Gauge(v) | Value::Untyped(v), Some(metric::Data::Gauge(g))) => {
                    g.data_points.push(point(*v))
                }
                (Value::Histogram(buckets), data) => {
                    let mut buckets = buckets.clone();
                    buckets.sort_by(|a, b| a.less_than.total_cmp(&b.less_than));
                    let count = buckets.last().map_or(0.0, |b| b.count) as u64;
                    let mut before = 0.0;
                    let bucket_counts: Vec<u64> = buckets
                        .iter()
                        .map(|b| {
                            let n = (b.count - before).max(0.0) as u64;
                            before = b.count;
                            n
                        })
                        .collect();
                    let dp = HistogramDataPoint {
                        attributes: attributes.clone(),
                        start_time_unix_nano: start,
                        time_unix_nano: now,
                        count,
                        sum: sums
                            .get(&(s.metric.clone(), labels_key(&s.labels)))
                            .copied(),
                        bucket_counts,
                        explicit_bounds: buckets
                            .iter()
                            .map(|b| b.less_than)
                            .filter(|b| b.is_finite())
                            .collect(),
                        ..Default::default()
                    };
                    match data {
                        Some(metric::Data::Histogram(h)) => h.data_points.push(dp),
                        _ => {
                            *data = Some(metric::Data::Histogram(Histogram {
                                data_points: vec![dp],
                                aggregation_temporality: AggregationTemporality::Cumulative as i32,
                            }))
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(Resource {
                    attributes: vec![string("service.name", service)],
                    ..Default::default()
                }),
                scope_metrics: vec![ScopeMetrics {
                    scope: Some(InstrumentationScope {
                        name: "weir".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    metrics: metrics.into_values().collect(),
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        })
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::metrics::v1::metric::Data;

    #[test]
    fn the_exposition_becomes_otlp_sums_gauges_and_histograms() {
        let text = "# HELP c_total A counter.\n# TYPE c_total counter\nc_total{route=\"a\"} 3\nc_total{route=\"b\"} 4\n\
            # HELP g A gauge.\n# TYPE g gauge\ng 7\n\
            # HELP h A histogram.\n# TYPE h histogram\nh_bucket{le=\"0.1\"} 2\nh_bucket{le=\"1\"} 5\nh_bucket{le=\"+Inf\"} 6\nh_sum 2.5\nh_count 6\n";
        let req = super::otlp_metrics::request(text, "weir", 1).unwrap();
        let metrics = &req.resource_metrics[0].scope_metrics[0].metrics;
        let by = |n: &str| metrics.iter().find(|m| m.name == n).unwrap();
        match by("c_total").data.as_ref().unwrap() {
            Data::Sum(s) => {
                assert!(s.is_monotonic);
                assert_eq!(s.data_points.len(), 2);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(by("g").data, Some(Data::Gauge(_))));
        match by("h").data.as_ref().unwrap() {
            Data::Histogram(h) => {
                let p = &h.data_points[0];
                assert_eq!((p.count, p.sum), (6, Some(2.5)));
                assert_eq!(p.explicit_bounds, vec![0.1, 1.0]);
                assert_eq!(p.bucket_counts, vec![2, 3, 1]);
            }
            other => panic!("{other:?}"),
        }
        assert!(
            !metrics
                .iter()
                .any(|m| m.name == "h_sum" || m.name == "h_count"),
            "a histogram's parts are not metrics of their own"
        );
        assert_eq!(by("c_total").description, "A counter.");
    }
}
