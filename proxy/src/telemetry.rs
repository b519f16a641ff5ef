//! OpenTelemetry traces: a server span per request and a client span per upstream attempt
//! (retries show as siblings), W3C `traceparent`/`tracestate` taken from the request or
//! started here, and sent upstream with the attempt's span as parent. Finished spans go
//! through a bounded queue to a background exporter (OTLP over gRPC); a full queue drops
//! spans and counts them, and the request path never waits for export.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{Context, InstrumentationScope, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    IdGenerator, RandomIdGenerator, Sampler, SamplingDecision, ShouldSample, SpanData, SpanExporter,
};
use pingora::http::RequestHeader;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::mpsc;
use weir_policies::model::Tracing as Config;

/// Spans exported in one OTLP request at most.
const BATCH: usize = 512;
/// Longest a finished span waits before it is exported.
const FLUSH_EVERY: Duration = Duration::from_millis(500);

/// The tracer shared by every listener.
pub struct Tracer {
    tx: mpsc::Sender<SpanData>,
    sampler: Sampler,
    ids: RandomIdGenerator,
    propagator: TraceContextPropagator,
    scope: InstrumentationScope,
    pub queued: AtomicU64,
    pub dropped: AtomicU64,
    pub exported: AtomicU64,
    pub export_failures: AtomicU64,
}

/// The background service that exports what the tracer queues.
pub struct Exporter {
    config: Config,
    rx: Mutex<Option<mpsc::Receiver<SpanData>>>,
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
    spans: Vec<SpanData>,
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

    pub fn trace_id(&self) -> TraceId {
        self.context.trace_id()
    }
}

impl Tracer {
    /// The tracer and the exporter service it feeds.
    pub fn new(config: &Config) -> (Arc<Self>, Exporter) {
        let (tx, rx) = mpsc::channel(config.queue.max(1) as usize);
        let tracer = Arc::new(Self {
            tx,
            sampler: Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.sampling.clamp(0.0, 1.0),
            ))),
            ids: RandomIdGenerator::default(),
            propagator: TraceContextPropagator::new(),
            scope: InstrumentationScope::builder("weir")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
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
        let status = match (failed, error) {
            (false, _) => Status::Unset,
            (true, Some(e)) => Status::error(e.to_string()),
            (true, None) => Status::error("upstream attempt failed"),
        };
        t.spans.push(self.span(
            SpanContext::new(
                t.context.trace_id(),
                a.span,
                t.context.trace_flags(),
                false,
                t.context.trace_state().clone(),
            ),
            t.context.span_id(),
            false,
            SpanKind::Client,
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
        let status = match (failed, error) {
            (false, _) => Status::Unset,
            (true, Some(e)) => Status::error(e.to_string()),
            (true, None) => Status::error("request failed"),
        };
        let server = self.span(
            t.context.clone(),
            t.parent.unwrap_or(SpanId::INVALID),
            t.parent.is_some(),
            SpanKind::Server,
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
    }

    #[allow(clippy::too_many_arguments)]
    fn span(
        &self,
        context: SpanContext,
        parent: SpanId,
        parent_remote: bool,
        kind: SpanKind,
        name: String,
        start: SystemTime,
        attributes: Vec<KeyValue>,
        status: Status,
    ) -> SpanData {
        SpanData {
            span_context: context,
            parent_span_id: parent,
            parent_span_is_remote: parent_remote,
            span_kind: kind,
            name: name.into(),
            start_time: start,
            end_time: SystemTime::now(),
            attributes,
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status,
            instrumentation_scope: self.scope.clone(),
        }
    }

    /// The tracer's Prometheus metrics.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
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
            let _ = writeln!(
                out,
                "# HELP weir_trace_spans_{name}_total {help}\n# TYPE weir_trace_spans_{name}_total counter\nweir_trace_spans_{name}_total {}",
                v.load(Ordering::Relaxed)
            );
        }
    }
}

#[async_trait]
impl BackgroundService for Exporter {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(mut rx) = self.rx.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        let mut exporter = match opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(self.config.otlp_endpoint.clone())
            .with_timeout(Duration::from_secs(5))
            .build()
        {
            Ok(e) => e,
            Err(e) => {
                tracing::error!("OTLP trace exporter: {e}; spans will be dropped");
                return;
            }
        };
        exporter.set_resource(
            &opentelemetry_sdk::Resource::builder()
                .with_service_name(self.config.service_name.clone())
                .build(),
        );
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            let mut done = false;
            tokio::select! {
                _ = shutdown.changed() => done = true,
                got = rx.recv() => match got {
                    Some(span) => {
                        batch.push(span);
                        // Take what else is there, up to a batch, then wait a little for more.
                        while batch.len() < BATCH {
                            match rx.try_recv() {
                                Ok(span) => batch.push(span),
                                Err(_) => break,
                            }
                        }
                        if batch.len() < BATCH {
                            let until = tokio::time::Instant::now() + FLUSH_EVERY;
                            while batch.len() < BATCH {
                                match tokio::time::timeout_at(until, rx.recv()).await {
                                    Ok(Some(span)) => batch.push(span),
                                    _ => break,
                                }
                            }
                        }
                    }
                    None => done = true,
                },
            }
            if !batch.is_empty() {
                let n = batch.len() as u64;
                match exporter.export(std::mem::take(&mut batch)).await {
                    Ok(()) => self.tracer.exported.fetch_add(n, Ordering::Relaxed),
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
