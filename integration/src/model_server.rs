//! A simulated Triton / KServe v2 model server for tests: real gRPC
//! (`inference.GRPCInferenceService`), fake models. Each model "generates" tokens: `ModelInfer`
//! answers one, `ModelStreamInfer` streams `max_tokens` responses per request (default 3), the
//! last marked with the `triton_final_response` parameter as Triton's decoupled models do.
//! `RepositoryModelLoad` simulates a weight reload: the model is not ready for a while, then
//! serves the next version.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::Stream;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::kserve::grpc_inference_service_server::{
    GrpcInferenceService, GrpcInferenceServiceServer,
};
use crate::kserve::*;

/// One model's state on the simulated server.
#[derive(Clone, Debug)]
pub struct SimModel {
    pub version: u32,
    pub ready: bool,
}

pub struct ModelServer {
    /// KServe v2 gRPC.
    pub addr: SocketAddr,
    /// OpenAI-compatible HTTP (`/v1/models`, `/v1/chat/completions`, `/v1/completions`).
    pub http_addr: SocketAddr,
    pub models: Arc<Mutex<HashMap<String, SimModel>>>,
    /// Requests with `x-sim-gated: 1` wait for a permit before each token after the first, so
    /// a test can prove each token reached it before the next was produced.
    pub gate: Arc<tokio::sync::Semaphore>,
}

/// How long a simulated reload keeps the model unready.
pub const RELOAD_TIME: Duration = Duration::from_millis(200);

impl ModelServer {
    /// Serves `models` (all ready, version 1) on a free port.
    pub async fn start(models: &[&str]) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state: Arc<Mutex<HashMap<String, SimModel>>> = Arc::new(Mutex::new(
            models
                .iter()
                .map(|m| {
                    (
                        m.to_string(),
                        SimModel {
                            version: 1,
                            ready: true,
                        },
                    )
                })
                .collect(),
        ));
        let svc = GrpcInferenceServiceServer::new(Sim(state.clone()));
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        });
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let http = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let http_addr = http.local_addr().expect("addr");
        let (st, g) = (state.clone(), gate.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = http.accept().await else {
                    continue;
                };
                let (st, g) = (st.clone(), g.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let (st, g) = (st.clone(), g.clone());
                        async move { Ok::<_, std::convert::Infallible>(openai(st, g, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
                });
            }
        });
        Self {
            addr,
            http_addr,
            models: state,
            gate,
        }
    }
}

type HttpBody = http_body_util::combinators::BoxBody<bytes::Bytes, std::convert::Infallible>;

fn json_reply(status: u16, v: serde_json::Value) -> hyper::Response<HttpBody> {
    use http_body_util::BodyExt;
    hyper::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(v.to_string())).boxed())
        .expect("valid response")
}

/// The OpenAI-compatible side: `/v1/models`, and chat/text completions, streamed as SSE
/// (`data: {chunk}` events, then `data: [DONE]`) when the request says `"stream": true`.
/// Responses carry the serving weights in `x-weight-version`.
async fn openai(
    models: Arc<Mutex<HashMap<String, SimModel>>>,
    gate: Arc<tokio::sync::Semaphore>,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<HttpBody> {
    use http_body_util::BodyExt;
    let path = req.uri().path().to_string();
    if path == "/v1/models" {
        let data: Vec<serde_json::Value> = models
            .lock()
            .unwrap()
            .keys()
            .map(|name| serde_json::json!({"id": name, "object": "model", "owned_by": "weir-sim"}))
            .collect();
        return json_reply(200, serde_json::json!({"object": "list", "data": data}));
    }
    let chat = match path.as_str() {
        "/v1/chat/completions" => true,
        "/v1/completions" => false,
        _ => {
            return json_reply(
                404,
                serde_json::json!({"error": {"message": "no such endpoint"}}),
            )
        }
    };
    let gated = req.headers().get("x-sim-gated").is_some();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return json_reply(
            400,
            serde_json::json!({"error": {"message": "body is not JSON"}}),
        );
    };
    let name = v["model"].as_str().unwrap_or("").to_string();
    let m = models.lock().unwrap().get(&name).cloned();
    let Some(m) = m else {
        return json_reply(
            404,
            serde_json::json!({"error": {"message": format!("model {name:?} not found")}}),
        );
    };
    if !m.ready {
        return json_reply(
            503,
            serde_json::json!({"error": {"message": "model is loading"}}),
        );
    }
    let n = v["max_tokens"].as_u64().unwrap_or(3).max(1);
    let version = m.version.to_string();
    let chunk = move |i: u64, last: bool| {
        let text = format!("v{version}-token{i} ");
        let finish = if last {
            serde_json::json!("stop")
        } else {
            serde_json::Value::Null
        };
        if chat {
            serde_json::json!({"id": "chatcmpl-sim", "object": "chat.completion.chunk", "model": name,
                "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]})
        } else {
            serde_json::json!({"id": "cmpl-sim", "object": "text_completion", "model": name,
                "choices": [{"index": 0, "text": text, "finish_reason": finish}]})
        }
    };
    let weight_version = m.version.to_string();
    if !v["stream"].as_bool().unwrap_or(false) {
        let text: String = (0..n)
            .map(|i| format!("v{}-token{i} ", m.version))
            .collect();
        let mut r = json_reply(
            200,
            serde_json::json!({"object": if chat { "chat.completion" } else { "text_completion" },
            "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
            "usage": {"completion_tokens": n}}),
        );
        r.headers_mut()
            .insert("x-weight-version", weight_version.parse().expect("ascii"));
        return r;
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<
        Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>,
    >(4);
    tokio::spawn(async move {
        for i in 0..n {
            if gated && i > 0 {
                match gate.acquire().await {
                    Ok(p) => p.forget(),
                    Err(_) => return,
                }
            }
            let event = format!("data: {}\n\n", chunk(i, i == n - 1));
            if tx
                .send(Ok(hyper::body::Frame::data(event.into())))
                .await
                .is_err()
            {
                return;
            }
        }
        let _ = tx
            .send(Ok(hyper::body::Frame::data(bytes::Bytes::from_static(
                b"data: [DONE]\n\n",
            ))))
            .await;
    });
    let body = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    hyper::Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .header("x-weight-version", weight_version)
        .body(body.boxed())
        .expect("valid response")
}

struct Sim(Arc<Mutex<HashMap<String, SimModel>>>);

impl Sim {
    fn model(&self, name: &str) -> Result<SimModel, Status> {
        self.0
            .lock()
            .unwrap()
            .get(name)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("unknown model {name:?}")))
    }

    fn ready(&self, name: &str) -> Result<SimModel, Status> {
        let m = self.model(name)?;
        if !m.ready {
            return Err(Status::unavailable(format!("model {name:?} is loading")));
        }
        Ok(m)
    }
}

/// Triton's BYTES tensor encoding: a 4-byte little-endian length, then the bytes.
fn bytes_tensor(text: &str) -> Vec<u8> {
    let mut out = (text.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out
}

fn bool_param(v: bool) -> InferParameter {
    InferParameter {
        parameter_choice: Some(infer_parameter::ParameterChoice::BoolParam(v)),
    }
}

fn token_response(
    req: &ModelInferRequest,
    m: &SimModel,
    i: i64,
    last: Option<bool>,
) -> ModelInferResponse {
    let mut parameters = HashMap::new();
    if let Some(last) = last {
        parameters.insert("triton_final_response".to_string(), bool_param(last));
    }
    ModelInferResponse {
        model_name: req.model_name.clone(),
        model_version: m.version.to_string(),
        id: req.id.clone(),
        parameters,
        outputs: vec![model_infer_response::InferOutputTensor {
            name: "TOKEN".into(),
            datatype: "BYTES".into(),
            shape: vec![1],
            ..Default::default()
        }],
        raw_output_contents: vec![bytes_tensor(&format!("v{}-token{i}", m.version))],
    }
}

fn max_tokens(req: &ModelInferRequest) -> i64 {
    match req
        .parameters
        .get("max_tokens")
        .and_then(|p| p.parameter_choice.as_ref())
    {
        Some(infer_parameter::ParameterChoice::Int64Param(n)) => *n,
        Some(infer_parameter::ParameterChoice::Uint64Param(n)) => *n as i64,
        _ => 3,
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<ModelStreamInferResponse, Status>> + Send>>;

#[tonic::async_trait]
impl GrpcInferenceService for Sim {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse { ready: true }))
    }

    async fn model_ready(
        &self,
        r: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let ready = self.model(&r.get_ref().name).is_ok_and(|m| m.ready);
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: "weir-sim".into(),
            version: "1".into(),
            extensions: vec![],
        }))
    }

    async fn model_metadata(
        &self,
        r: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let m = self.model(&r.get_ref().name)?;
        let tensor = |name: &str| model_metadata_response::TensorMetadata {
            name: name.into(),
            datatype: "BYTES".into(),
            shape: vec![1],
        };
        Ok(Response::new(ModelMetadataResponse {
            name: r.get_ref().name.clone(),
            versions: vec![m.version.to_string()],
            platform: "weir-sim".into(),
            inputs: vec![tensor("PROMPT")],
            outputs: vec![tensor("TOKEN")],
        }))
    }

    async fn model_infer(
        &self,
        r: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let m = self.ready(&r.get_ref().model_name)?;
        Ok(Response::new(token_response(r.get_ref(), &m, 0, None)))
    }

    type ModelStreamInferStream = ResponseStream;

    async fn model_stream_infer(
        &self,
        r: Request<Streaming<ModelInferRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let mut requests = r.into_inner();
        let state = self.0.clone();
        let out = async_stream_responses(move |tx| async move {
            while let Some(Ok(req)) = requests.next().await {
                let m = Sim(state.clone()).ready(&req.model_name);
                let m = match m {
                    Ok(m) => m,
                    Err(e) => {
                        let _ = tx
                            .send(Ok(ModelStreamInferResponse {
                                error_message: e.message().to_string(),
                                infer_response: None,
                            }))
                            .await;
                        continue;
                    }
                };
                let n = max_tokens(&req).max(1);
                for i in 0..n {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    let resp = token_response(&req, &m, i, Some(i == n - 1));
                    if tx
                        .send(Ok(ModelStreamInferResponse {
                            error_message: String::new(),
                            infer_response: Some(resp),
                        }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(out))
    }

    async fn repository_index(
        &self,
        _: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        let models = self
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|(name, m)| repository_index_response::ModelIndex {
                name: name.clone(),
                version: m.version.to_string(),
                state: if m.ready { "READY" } else { "LOADING" }.into(),
                reason: String::new(),
            })
            .collect();
        Ok(Response::new(RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        r: Request<RepositoryModelLoadRequest>,
    ) -> Result<Response<RepositoryModelLoadResponse>, Status> {
        let name = r.get_ref().model_name.clone();
        self.0
            .lock()
            .unwrap()
            .entry(name.clone())
            .or_insert(SimModel {
                version: 0,
                ready: false,
            })
            .ready = false;
        let state = self.0.clone();
        tokio::spawn(async move {
            tokio::time::sleep(RELOAD_TIME).await;
            if let Some(m) = state.lock().unwrap().get_mut(&name) {
                m.version += 1;
                m.ready = true;
            }
        });
        Ok(Response::new(RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        r: Request<RepositoryModelUnloadRequest>,
    ) -> Result<Response<RepositoryModelUnloadResponse>, Status> {
        if let Some(m) = self.0.lock().unwrap().get_mut(&r.get_ref().model_name) {
            m.ready = false;
        }
        Ok(Response::new(RepositoryModelUnloadResponse {}))
    }
}

/// A response stream fed by a task through a bounded channel.
fn async_stream_responses<F, Fut>(f: F) -> ResponseStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<ModelStreamInferResponse, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
