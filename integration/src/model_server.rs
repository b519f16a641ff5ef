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
    /// OpenAI-compatible HTTP (`/v1/models`, `/v1/chat/completions`, `/v1/completions`) and
    /// `/metrics` (vLLM's metric names).
    pub http_addr: SocketAddr,
    pub models: Arc<Mutex<HashMap<String, SimModel>>>,
    /// Requests with `x-sim-gated: 1` wait for a permit before each token after the first, so
    /// a test can prove each token reached it before the next was produced.
    pub gate: Arc<tokio::sync::Semaphore>,
    pub load: Arc<SimLoad>,
    /// Every task serving this server (listeners and connections), for [`ModelServer::kill`].
    tasks: Arc<Mutex<tokio::task::JoinSet<()>>>,
}

/// The simulated server's load, as `/metrics` and ORCA headers report it.
#[derive(Default)]
pub struct SimLoad {
    /// Streams being generated now (`vllm:num_requests_running`).
    pub running: std::sync::atomic::AtomicU32,
    /// `vllm:num_requests_waiting`, set by tests.
    pub waiting: std::sync::atomic::AtomicU32,
    /// `vllm:kv_cache_usage_perc` in thousandths, set by tests.
    pub kv_cache_permille: std::sync::atomic::AtomicU32,
    /// Delay before each streamed token, in microseconds (default 5 ms).
    pub token_delay_us: std::sync::atomic::AtomicU64,
    /// vLLM's sleep mode (`POST /sleep`, `POST /wake_up`, `GET /is_sleeping`): while asleep
    /// the weights are gone and completions fail with 503.
    pub sleeping: std::sync::atomic::AtomicBool,
    /// LoRA adapters in memory (`vllm:lora_requests_info`'s `running_lora_adapters`,
    /// comma-separated), set by tests.
    pub lora_adapters: Mutex<String>,
    /// Lines added to `/metrics` (another server's series), set by tests.
    pub more_metrics: Mutex<String>,
}

impl SimLoad {
    /// The ORCA `endpoint-load-metrics` value vLLM writes when a request asks for one
    /// (`endpoint-load-metrics-format: TEXT` or `JSON`), with vLLM's names.
    fn orca(&self, format: &str) -> Option<String> {
        use std::sync::atomic::Ordering::Relaxed;
        let kv = f64::from(self.kv_cache_permille.load(Relaxed)) / 1000.0;
        let waiting = f64::from(self.waiting.load(Relaxed));
        match format.to_ascii_lowercase().as_str() {
            "text" => Some(format!(
                "TEXT named_metrics.kv_cache_usage_perc={kv:?}, named_metrics.num_requests_waiting={waiting:?}"
            )),
            "json" => Some(format!(
                "JSON {}",
                serde_json::json!({"named_metrics": {"kv_cache_usage_perc": kv, "num_requests_waiting": waiting}})
            )),
            _ => None,
        }
    }

    /// The same as a serialized `OrcaLoadReport` (its `named_metrics`, field 8), as gRPC
    /// servers send it in `endpoint-load-metrics-bin`.
    fn orca_report(&self) -> Vec<u8> {
        use std::sync::atomic::Ordering::Relaxed;
        let metrics: HashMap<String, f64> = HashMap::from([
            (
                "kv_cache_usage_perc".to_string(),
                f64::from(self.kv_cache_permille.load(Relaxed)) / 1000.0,
            ),
            (
                "num_requests_waiting".to_string(),
                f64::from(self.waiting.load(Relaxed)),
            ),
        ]);
        let mut out = Vec::new();
        prost::encoding::hash_map::encode(
            prost::encoding::string::encode,
            prost::encoding::string::encoded_len,
            prost::encoding::double::encode,
            prost::encoding::double::encoded_len,
            8,
            &metrics,
            &mut out,
        );
        out
    }

    fn metrics(&self) -> String {
        use std::sync::atomic::Ordering::Relaxed;
        format!(
            "# HELP vllm:num_requests_running Number of requests in model execution batches.\n\
             # TYPE vllm:num_requests_running gauge\n\
             vllm:num_requests_running{{model_name=\"sim\"}} {}\n\
             # HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
             # TYPE vllm:num_requests_waiting gauge\n\
             vllm:num_requests_waiting{{model_name=\"sim\"}} {}\n\
             # HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n\
             # TYPE vllm:kv_cache_usage_perc gauge\n\
             vllm:kv_cache_usage_perc{{model_name=\"sim\"}} {}\n\
             # HELP vllm:lora_requests_info Running stats on lora requests.\n\
             # TYPE vllm:lora_requests_info gauge\n\
             vllm:lora_requests_info{{max_lora=\"4\",running_lora_adapters=\"{}\",waiting_lora_adapters=\"\"}} {}\n{}",
            self.running.load(Relaxed),
            self.waiting.load(Relaxed),
            f64::from(self.kv_cache_permille.load(Relaxed)) / 1000.0,
            self.lora_adapters.lock().unwrap(),
            // vLLM's value: when the label set was last set.
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            self.more_metrics.lock().unwrap(),
        )
    }

    /// Waits the configured delay before a token (no wait at all when it is zero).
    async fn token_delay(&self) {
        let us = self
            .token_delay_us
            .load(std::sync::atomic::Ordering::Relaxed);
        if us > 0 {
            tokio::time::sleep(Duration::from_micros(us)).await;
        }
    }
}

/// Counts a stream in `running` while it lives.
struct Running(Arc<SimLoad>);

impl Running {
    fn new(load: &Arc<SimLoad>) -> Self {
        load.running
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(load.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0
            .running
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The response parameter (gRPC) and JSON field (SSE chunks) with [`sent_at`] of the moment
/// the server handed a token to its transport, so a client in the same process can measure
/// the time each message took to reach it.
pub const SENT_PARAM: &str = "sim_sent_ns";

/// Nanoseconds on a clock shared by everything in this process (the server and clients
/// running beside it).
pub fn sent_at() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    EPOCH
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_nanos() as u64
}

/// How long a simulated reload keeps the model unready.
pub const RELOAD_TIME: Duration = Duration::from_millis(200);

impl ModelServer {
    /// Serves `models` (all ready, version 1) on a free port.
    pub async fn start(models: &[&str]) -> Self {
        Self::start_with(models, 1).await
    }

    /// Serves `models`, all ready at `version`.
    pub async fn start_with(models: &[&str], version: u32) -> Self {
        let state: Arc<Mutex<HashMap<String, SimModel>>> = Arc::new(Mutex::new(
            models
                .iter()
                .map(|m| {
                    (
                        m.to_string(),
                        SimModel {
                            version,
                            ready: true,
                        },
                    )
                })
                .collect(),
        ));
        let load = Arc::new(SimLoad::default());
        load.token_delay_us
            .store(5_000, std::sync::atomic::Ordering::Relaxed);
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let tasks = Arc::new(Mutex::new(tokio::task::JoinSet::new()));
        // Like Triton, it takes gzip and deflate requests (tritonclient's
        // `compression_algorithm`).
        let svc = GrpcInferenceServiceServer::new(Sim(state.clone(), load.clone()))
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
            .accept_compressed(tonic::codec::CompressionEncoding::Deflate);
        let addr = serve(&tasks, true, move |req| {
            use tonic::codegen::Service;
            let mut svc = svc.clone();
            async move { svc.call(req).await }
        })
        .await;
        let (st, g, l) = (state.clone(), gate.clone(), load.clone());
        let http_addr = serve(&tasks, false, move |req| {
            let (st, g, l) = (st.clone(), g.clone(), l.clone());
            async move { Ok::<_, std::convert::Infallible>(openai(st, g, l, req).await) }
        })
        .await;
        Self {
            addr,
            http_addr,
            models: state,
            gate,
            load,
            tasks,
        }
    }

    /// Kills the server as a crash would: its listeners and every connection close at once,
    /// streams in the middle of a response included.
    pub fn kill(&self) {
        self.tasks.lock().unwrap().abort_all();
    }
}

/// Accepts connections on a free port, serving each with `handler` (HTTP/2 only when `h2`)
/// in a task of `tasks`.
async fn serve<F, Fut, B, E>(
    tasks: &Arc<Mutex<tokio::task::JoinSet<()>>>,
    h2: bool,
    handler: F,
) -> SocketAddr
where
    F: Fn(hyper::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<hyper::Response<B>, E>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let all = tasks.clone();
    tasks.lock().unwrap().spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            // As model servers do (uvicorn, Triton): each token goes out when it is written.
            let _ = stream.set_nodelay(true);
            let handler = handler.clone();
            all.lock().unwrap().spawn(async move {
                let svc = hyper::service::service_fn(handler);
                let mut builder = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                );
                if h2 {
                    builder = builder.http2_only();
                }
                let _ = builder
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
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
    load: Arc<SimLoad>,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<HttpBody> {
    use http_body_util::BodyExt;
    let path = req.uri().path().to_string();
    if path == "/metrics" {
        use http_body_util::BodyExt;
        return hyper::Response::builder()
            .header("content-type", "text/plain; version=0.0.4")
            .body(http_body_util::Full::new(bytes::Bytes::from(load.metrics())).boxed())
            .expect("valid response");
    }
    match path.as_str() {
        "/sleep" | "/wake_up" => {
            load.sleeping
                .store(path == "/sleep", std::sync::atomic::Ordering::Relaxed);
            return json_reply(200, serde_json::json!({}));
        }
        "/is_sleeping" => {
            let asleep = load.sleeping.load(std::sync::atomic::Ordering::Relaxed);
            return json_reply(200, serde_json::json!({ "is_sleeping": asleep }));
        }
        _ => {}
    }
    if path == "/v1/models" {
        // Models that are loading are not listed.
        let data: Vec<serde_json::Value> = models
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, m)| m.ready)
            .map(|(name, _)| serde_json::json!({"id": name, "object": "model", "owned_by": "weir-sim"}))
            .collect();
        return json_reply(200, serde_json::json!({"object": "list", "data": data}));
    }
    if path == "/update_weights_from_disk" {
        // SGLang's reload call: every model of the server loads the weights at `model_path`;
        // a path ending in a number names the version.
        let body = req.into_body().collect().await.map(|b| b.to_bytes());
        let v: serde_json::Value = body
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let Some(model_path) = v["model_path"].as_str() else {
            return json_reply(
                400,
                serde_json::json!({"success": false, "message": "model_path is required"}),
            );
        };
        let version = model_path
            .rsplit(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|d| d.parse().ok());
        let names = models.lock().unwrap().keys().cloned().collect();
        reload(&models, names, version);
        return json_reply(
            200,
            serde_json::json!({"success": true, "message": "loading"}),
        );
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
    let orca = req
        .headers()
        .get("endpoint-load-metrics-format")
        .and_then(|f| f.to_str().ok())
        .and_then(|f| load.orca(f));
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
    // As vLLM: a request that names no model gets the served one (here: when there is one).
    let m = {
        let models = models.lock().unwrap();
        match (name.as_str(), models.len()) {
            ("", 1) => models.values().next().cloned(),
            _ => models.get(&name).cloned(),
        }
    };
    let Some(m) = m else {
        return json_reply(
            404,
            serde_json::json!({"error": {"message": format!("model {name:?} not found")}}),
        );
    };
    if !m.ready || load.sleeping.load(std::sync::atomic::Ordering::Relaxed) {
        return json_reply(
            503,
            serde_json::json!({"error": {"message": "model is loading or asleep"}}),
        );
    }
    let n = v["max_tokens"].as_u64().unwrap_or(3).max(1);
    // The prompt's "tokens": its words (the prompt, or every message's content).
    let prompt_tokens = v["messages"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .filter_map(|m| m["content"].as_str())
                .collect::<Vec<_>>()
        })
        .unwrap_or_else(|| v["prompt"].as_str().into_iter().collect())
        .iter()
        .map(|t| t.split_whitespace().count() as u64)
        .sum::<u64>();
    let usage = serde_json::json!({"prompt_tokens": prompt_tokens, "completion_tokens": n,
        "total_tokens": prompt_tokens + n});
    let include_usage = v["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false);
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
            "usage": usage}),
        );
        r.headers_mut()
            .insert("x-weight-version", weight_version.parse().expect("ascii"));
        if let Some(orca) = orca {
            r.headers_mut()
                .insert("endpoint-load-metrics", orca.parse().expect("ascii"));
        }
        return r;
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<
        Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>,
    >(4);
    let running = Running::new(&load);
    tokio::spawn(async move {
        let _running = running;
        for i in 0..n {
            if i > 0 {
                load.token_delay().await;
            }
            if gated && i > 0 {
                match gate.acquire().await {
                    Ok(p) => p.forget(),
                    Err(_) => return,
                }
            }
            let mut chunk = chunk(i, i == n - 1);
            chunk[SENT_PARAM] = sent_at().into();
            let event = format!("data: {chunk}\n\n");
            if tx
                .send(Ok(hyper::body::Frame::data(event.into())))
                .await
                .is_err()
            {
                return;
            }
        }
        if include_usage {
            // As OpenAI does: a last event with no choices and the whole request's usage.
            let event = serde_json::json!({"id": "sim", "choices": [], "usage": usage});
            let _ = tx
                .send(Ok(hyper::body::Frame::data(
                    format!("data: {event}\n\n").into(),
                )))
                .await;
        }
        let _ = tx
            .send(Ok(hyper::body::Frame::data(bytes::Bytes::from_static(
                b"data: [DONE]\n\n",
            ))))
            .await;
    });
    let body = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let mut r = hyper::Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .header("x-weight-version", weight_version);
    if let Some(orca) = orca {
        r = r.header("endpoint-load-metrics", orca);
    }
    r.body(body.boxed()).expect("valid response")
}

#[derive(Clone)]
struct Sim(Arc<Mutex<HashMap<String, SimModel>>>, Arc<SimLoad>);

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
        let mut reply = Response::new(token_response(r.get_ref(), &m, 0, None));
        // Its load, as gRPC servers report it per call (ORCA, binary metadata).
        reply.metadata_mut().insert_bin(
            "endpoint-load-metrics-bin",
            tonic::metadata::MetadataValue::from_bytes(&self.1.orca_report()),
        );
        Ok(reply)
    }

    type ModelStreamInferStream = ResponseStream;

    async fn model_stream_infer(
        &self,
        r: Request<Streaming<ModelInferRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let mut requests = r.into_inner();
        let sim = self.clone();
        let out = async_stream_responses(move |tx| async move {
            while let Some(Ok(req)) = requests.next().await {
                let _running = Running::new(&sim.1);
                let m = sim.ready(&req.model_name);
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
                    sim.1.token_delay().await;
                    let mut resp = token_response(&req, &m, i, Some(i == n - 1));
                    resp.parameters.insert(
                        SENT_PARAM.to_string(),
                        InferParameter {
                            parameter_choice: Some(infer_parameter::ParameterChoice::Uint64Param(
                                sent_at(),
                            )),
                        },
                    );
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
        reload(&self.0, vec![r.get_ref().model_name.clone()], None);
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

/// Simulates loading new weights for `names`: unready for [`RELOAD_TIME`], then serving
/// `version` (default: the next one).
fn reload(
    models: &Arc<Mutex<HashMap<String, SimModel>>>,
    names: Vec<String>,
    version: Option<u32>,
) {
    for name in &names {
        models
            .lock()
            .unwrap()
            .entry(name.clone())
            .or_insert(SimModel {
                version: 0,
                ready: false,
            })
            .ready = false;
    }
    let models = models.clone();
    tokio::spawn(async move {
        tokio::time::sleep(RELOAD_TIME).await;
        let mut models = models.lock().unwrap();
        for name in names {
            if let Some(m) = models.get_mut(&name) {
                m.version = version.unwrap_or(m.version + 1);
                m.ready = true;
            }
        }
    });
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
