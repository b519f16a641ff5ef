//! A real tonic gRPC backend implementing `weir.test.Echo` (all four RPC kinds) and the
//! standard `grpc.health.v1.Health` service, on 127.0.0.1.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status, Streaming};
use tonic_health::server::HealthReporter;

use crate::pb::echo_server::{Echo, EchoServer};
use crate::pb::{Msg, StreamRequest};

/// Largest message either side accepts (tests send up to tens of MiB).
pub const MAX_MESSAGE: usize = 64 << 20;

/// Handle on a running gRPC backend.
pub struct GrpcBackend {
    pub addr: SocketAddr,
    pub state: Arc<EchoState>,
    pub health: HealthReporter,
}

/// What the test can observe and steer.
pub struct EchoState {
    pub name: String,
    /// Calls received, of any kind.
    pub calls: AtomicU64,
    /// Client-stream messages received so far (lets a test see progress mid-stream).
    pub received: AtomicU64,
    /// Permits for gated server-stream messages.
    pub gate: Semaphore,
    /// Unary calls sleep this long before answering.
    pub unary_delay_ms: AtomicU64,
    /// When non-zero, unary calls fail with this gRPC status code.
    pub unary_fail_code: AtomicI32,
}

impl GrpcBackend {
    pub async fn start(name: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind grpc backend");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(EchoState {
            name: name.to_string(),
            calls: AtomicU64::new(0),
            received: AtomicU64::new(0),
            gate: Semaphore::new(0),
            unary_delay_ms: AtomicU64::new(0),
            unary_fail_code: AtomicI32::new(0),
        });
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<EchoServer<EchoService>>().await;
        let echo = EchoServer::new(EchoService(state.clone()))
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(health_service)
                .add_service(echo)
                .serve_with_incoming(crate::grpc_incoming(listener))
                .await;
        });
        Self {
            addr,
            state,
            health,
        }
    }
}

pub struct EchoService(Arc<EchoState>);

type MsgStream = Pin<Box<dyn Stream<Item = Result<Msg, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(&self, req: Request<Msg>) -> Result<Response<Msg>, Status> {
        self.0.calls.fetch_add(1, Ordering::SeqCst);
        let delay = self.0.unary_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let fail = self.0.unary_fail_code.load(Ordering::SeqCst);
        if fail != 0 {
            return Err(Status::new(
                tonic::Code::from(fail),
                format!("{} fails", self.0.name),
            ));
        }
        let msg = req.into_inner();
        if let Some(code) = msg
            .text
            .strip_prefix("fail:")
            .and_then(|c| c.parse::<i32>().ok())
        {
            let mut status = Status::new(tonic::Code::from(code), "failed on request");
            status
                .metadata_mut()
                .insert("x-failure-detail", MetadataValue::from_static("asked-for"));
            return Err(status);
        }
        Ok(Response::new(Msg {
            text: format!("{}:{}", self.0.name, msg.text),
            n: msg.n,
            payload: msg.payload,
        }))
    }

    async fn client_stream(&self, req: Request<Streaming<Msg>>) -> Result<Response<Msg>, Status> {
        self.0.calls.fetch_add(1, Ordering::SeqCst);
        let mut stream = req.into_inner();
        let (mut sum, mut bytes) = (0, 0);
        while let Some(msg) = stream.next().await {
            let msg = msg?;
            sum += msg.n;
            bytes += msg.payload.len() as i64;
            self.0.received.fetch_add(1, Ordering::SeqCst);
        }
        Ok(Response::new(Msg {
            text: format!("{}:sum", self.0.name),
            n: sum,
            payload: bytes.to_string().into_bytes(),
        }))
    }

    type ServerStreamStream = MsgStream;

    async fn server_stream(
        &self,
        req: Request<StreamRequest>,
    ) -> Result<Response<MsgStream>, Status> {
        self.0.calls.fetch_add(1, Ordering::SeqCst);
        let r = req.into_inner();
        let (tx, rx) = mpsc::channel(1);
        let state = self.0.clone();
        tokio::spawn(async move {
            for i in 0..r.count {
                if r.gated && i > 0 {
                    let Ok(p) = state.gate.acquire().await else {
                        return;
                    };
                    p.forget();
                }
                let msg = Msg {
                    text: format!("{}:{i}", state.name),
                    n: i,
                    payload: Vec::new(),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
            if r.final_code != 0 {
                let mut status =
                    Status::new(tonic::Code::from(r.final_code), "stream ended by request");
                status.metadata_mut().insert(
                    "x-custom-trailer",
                    MetadataValue::from_static("trailer-value"),
                );
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type BidiStream = MsgStream;

    async fn bidi(&self, req: Request<Streaming<Msg>>) -> Result<Response<MsgStream>, Status> {
        self.0.calls.fetch_add(1, Ordering::SeqCst);
        let mut input = req.into_inner();
        let name = self.0.name.clone();
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            let mut count = 0;
            while let Some(msg) = input.next().await {
                let Ok(msg) = msg else { return };
                count += 1;
                let reply = Msg {
                    text: format!("{name}:{}", msg.text),
                    n: msg.n,
                    payload: Vec::new(),
                };
                if tx.send(Ok(reply)).await.is_err() {
                    return;
                }
            }
            // After the client half-closes, one summary message, then OK trailers.
            let _ = tx
                .send(Ok(Msg {
                    text: format!("{name}:done"),
                    n: count,
                    payload: Vec::new(),
                }))
                .await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
