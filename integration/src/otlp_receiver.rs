//! An OTLP/gRPC receiver on 127.0.0.1 (the collector side of `TraceService` and
//! `MetricsService`, from the `opentelemetry-proto` types): keeps every span it is sent, with
//! its resource's `service.name`, and the metrics exports, for tests and benchmarks to look at.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

/// A received span and the service that sent it.
#[derive(Clone, Debug)]
pub struct Received {
    pub service: String,
    pub span: Span,
}

impl Received {
    /// The attribute `key` as text (strings, ints, doubles and bools).
    pub fn attr(&self, key: &str) -> Option<String> {
        let v = self
            .span
            .attributes
            .iter()
            .find(|kv| kv.key == key)?
            .value
            .as_ref()?
            .value
            .as_ref()?;
        Some(match v {
            Value::StringValue(s) => s.clone(),
            Value::IntValue(i) => i.to_string(),
            Value::DoubleValue(d) => d.to_string(),
            Value::BoolValue(b) => b.to_string(),
            other => format!("{other:?}"),
        })
    }

    pub fn trace_id(&self) -> String {
        hex::encode(&self.span.trace_id)
    }

    pub fn span_id(&self) -> String {
        hex::encode(&self.span.span_id)
    }

    pub fn parent_id(&self) -> String {
        hex::encode(&self.span.parent_span_id)
    }
}

#[derive(Clone, Default)]
pub struct OtlpReceiver {
    pub spans: Arc<Mutex<Vec<Received>>>,
    /// Spans received, kept or not.
    pub count: Arc<std::sync::atomic::AtomicU64>,
    /// Count only (a benchmark's millions of spans are not kept).
    count_only: bool,
    /// Every metrics export received, in order.
    pub metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
}

#[tonic::async_trait]
impl MetricsService for OtlpReceiver {
    async fn export(
        &self,
        req: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        self.metrics.lock().unwrap().push(req.into_inner());
        Ok(Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl TraceService for OtlpReceiver {
    async fn export(
        &self,
        req: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let req = req.into_inner();
        if self.count_only {
            let n: usize = req
                .resource_spans
                .iter()
                .flat_map(|rs| &rs.scope_spans)
                .map(|ss| ss.spans.len())
                .sum();
            self.count
                .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            return Ok(Response::new(ExportTraceServiceResponse {
                partial_success: None,
            }));
        }
        let mut spans = self.spans.lock().unwrap();
        for rs in req.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                self.count
                    .fetch_add(ss.spans.len() as u64, std::sync::atomic::Ordering::Relaxed);
                for span in ss.spans {
                    spans.push(Received {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl OtlpReceiver {
    /// Serves on a free port until the process ends; returns the receiver and its address.
    pub async fn start() -> (Self, SocketAddr) {
        Self::serve(Self::default()).await
    }

    /// [`OtlpReceiver::start`] that only counts spans.
    pub async fn start_counting() -> (Self, SocketAddr) {
        Self::serve(Self {
            count_only: true,
            ..Self::default()
        })
        .await
    }

    async fn serve(receiver: Self) -> (Self, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let svc = TraceServiceServer::new(receiver.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .add_service(MetricsServiceServer::new(receiver.clone()))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        (receiver, addr)
    }

    pub fn spans(&self) -> Vec<Received> {
        self.spans.lock().unwrap().clone()
    }
}
