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
    /// Spans received.
    pub count: Arc<std::sync::atomic::AtomicU64>,
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
        let receiver = Self::default();
        let addr = serve(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(receiver.clone()))
                .add_service(MetricsServiceServer::new(receiver.clone())),
        )
        .await;
        (receiver, addr)
    }

    /// A trace collector for benchmarks, which run it on the machine they measure: it counts
    /// the spans of each export request without decoding them (a span stays a slice of the
    /// request), so the proxy being measured does not share its CPUs with a collector's work
    /// that a real deployment does elsewhere. Serves the trace service only. Its HTTP/2
    /// flow-control window grows with the bandwidth-delay product, as a real collector's does
    /// (grpc-go's default): with tonic's fixed 64 KiB, an export of a batch of hundreds of KiB
    /// waits for a window update every 64 KiB, each waking the exporter on the CPU measured.
    pub async fn start_counting() -> (Self, SocketAddr) {
        let receiver = Self::default();
        let addr = serve(
            tonic::transport::Server::builder()
                .http2_adaptive_window(Some(true))
                .add_service(SpanCounter(receiver.count.clone())),
        )
        .await;
        (receiver, addr)
    }

    pub fn spans(&self) -> Vec<Received> {
        self.spans.lock().unwrap().clone()
    }
}

/// Serves `router` on a free port of 127.0.0.1 until the process ends.
async fn serve(router: tonic::transport::server::Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(router.serve_with_incoming(crate::grpc_incoming(listener)));
    addr
}

/// An OTLP trace export request as [`SpanCounter`] reads it: only the nesting down to the
/// spans, each left as its encoded bytes (prost skips the other fields).
#[derive(Clone, PartialEq, prost::Message)]
struct UndecodedExport {
    #[prost(message, repeated, tag = "1")]
    resource_spans: Vec<UndecodedResourceSpans>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct UndecodedResourceSpans {
    #[prost(message, repeated, tag = "2")]
    scope_spans: Vec<UndecodedScopeSpans>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct UndecodedScopeSpans {
    #[prost(bytes = "bytes", repeated, tag = "2")]
    spans: Vec<bytes::Bytes>,
}

/// The `TraceService/Export` method over [`UndecodedExport`]: counts spans, answers success.
#[derive(Clone)]
struct SpanCounter(Arc<std::sync::atomic::AtomicU64>);

impl tonic::server::NamedService for SpanCounter {
    const NAME: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
}

impl tonic::server::UnaryService<UndecodedExport> for SpanCounter {
    type Response = ExportTraceServiceResponse;
    type Future = std::future::Ready<Result<Response<Self::Response>, Status>>;

    fn call(&mut self, req: Request<UndecodedExport>) -> Self::Future {
        let n: usize = req
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|rs| &rs.scope_spans)
            .map(|ss| ss.spans.len())
            .sum();
        self.0
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        std::future::ready(Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        })))
    }
}

impl<B> tonic::codegen::Service<http::Request<B>> for SpanCounter
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let svc = self.clone();
        Box::pin(async move {
            if req.uri().path() != "/opentelemetry.proto.collector.trace.v1.TraceService/Export" {
                return Ok(Status::unimplemented(req.uri().path().to_string()).into_http());
            }
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
            Ok(grpc.unary(svc, req).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans};

    /// The undecoded counter counts what a real OTLP client sends, across resources and scopes.
    #[tokio::test]
    async fn the_undecoded_counter_counts_every_span() {
        let (receiver, addr) = OtlpReceiver::start_counting().await;
        let mut client = TraceServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let scope = |n: usize| ScopeSpans {
            spans: (0..n)
                .map(|i| Span {
                    name: format!("s{i}"),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let req = ExportTraceServiceRequest {
            resource_spans: vec![
                ResourceSpans {
                    scope_spans: vec![scope(3), scope(4)],
                    ..Default::default()
                },
                ResourceSpans {
                    scope_spans: vec![scope(5)],
                    ..Default::default()
                },
            ],
        };
        client.export(req).await.unwrap();
        assert_eq!(
            receiver.count.load(std::sync::atomic::Ordering::Relaxed),
            12
        );
    }
}
