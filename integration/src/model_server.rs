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
    pub addr: SocketAddr,
    pub models: Arc<Mutex<HashMap<String, SimModel>>>,
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
        Self {
            addr,
            models: state,
        }
    }
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
