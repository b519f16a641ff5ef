//! Client side of the inference tests and `weir-bench inference`: KServe v2 `ModelStreamInfer`
//! streams that check every token, an OpenAI SSE stream reader, and the orchestrator's half of
//! a weight reload (tell weir, reload the backend, tell weir it is done).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tonic::transport::Channel;

use crate::kserve::grpc_inference_service_client::GrpcInferenceServiceClient;
use crate::kserve::*;
use crate::model_server::{sent_at, SENT_PARAM};
use crate::weir_process::{admin_get, admin_post};

pub type KserveClient = GrpcInferenceServiceClient<Channel>;

/// A KServe v2 gRPC client on its own HTTP/2 connection to `addr`.
pub async fn kserve_client(addr: SocketAddr) -> Result<KserveClient, tonic::transport::Error> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await?;
    Ok(GrpcInferenceServiceClient::new(channel))
}

/// A `ModelInferRequest` for `model` asking the simulated server for `tokens` tokens.
pub fn token_request(model: &str, id: &str, tokens: i64) -> ModelInferRequest {
    ModelInferRequest {
        model_name: model.into(),
        id: id.into(),
        parameters: HashMap::from([(
            "max_tokens".to_string(),
            InferParameter {
                parameter_choice: Some(infer_parameter::ParameterChoice::Int64Param(tokens)),
            },
        )]),
        ..Default::default()
    }
}

/// The token a streamed response carries (`v2-token7`), after Triton's 4-byte length.
pub fn token_of(r: &ModelInferResponse) -> String {
    r.raw_output_contents
        .first()
        .and_then(|t| t.get(4..))
        .map(|t| String::from_utf8_lossy(t).into_owned())
        .unwrap_or_default()
}

/// Whether the response carries `triton_final_response: true`.
pub fn is_final(r: &ModelInferResponse) -> bool {
    matches!(
        r.parameters
            .get("triton_final_response")
            .and_then(|p| p.parameter_choice.as_ref()),
        Some(infer_parameter::ParameterChoice::BoolParam(true))
    )
}

/// When the simulated server sent a response (see [`crate::model_server::sent_at`]).
pub fn sent_ns(r: &ModelInferResponse) -> Option<u64> {
    match r
        .parameters
        .get(SENT_PARAM)
        .and_then(|p| p.parameter_choice.as_ref())
    {
        Some(infer_parameter::ParameterChoice::Uint64Param(n)) => Some(*n),
        _ => None,
    }
}

/// Timings of one stream, in nanoseconds.
#[derive(Default, Debug)]
pub struct StreamTimes {
    /// From sending the request to the first token.
    pub first_token: u64,
    /// For each token: from the server's send to its arrival here.
    pub per_message: Vec<u64>,
}

/// One `ModelStreamInfer` stream of `tokens` tokens of model `llama` on `client`; checks they
/// come in order from one version, the last one final, and that the stream then ends cleanly.
/// Returns the version and the stream's timings.
pub async fn stream_on(
    client: &mut KserveClient,
    id: &str,
    tokens: i64,
) -> Result<(String, StreamTimes), String> {
    let start = Instant::now();
    let (tx, mut responses) = open_stream(client, id, tokens)
        .await
        .map_err(|e| format!("{id}: {e}"))?;
    let mut version = None;
    let mut times = StreamTimes {
        first_token: 0,
        per_message: Vec::with_capacity(tokens as usize),
    };
    for i in 0..tokens {
        let r = responses
            .message()
            .await
            .map_err(|e| format!("{id} token {i}: {e}"))?
            .ok_or_else(|| format!("{id}: stream ended after {i} of {tokens} tokens"))?;
        let now = sent_at();
        if i == 0 {
            times.first_token = start.elapsed().as_nanos() as u64;
        }
        if !r.error_message.is_empty() {
            return Err(format!("{id}: server error {}", r.error_message));
        }
        let r = r.infer_response.ok_or("no response")?;
        if let Some(sent) = sent_ns(&r) {
            times.per_message.push(now.saturating_sub(sent));
        }
        let v = version
            .get_or_insert_with(|| r.model_version.clone())
            .clone();
        let want = format!("v{v}-token{i}");
        if token_of(&r) != want || r.model_version != v || is_final(&r) != (i == tokens - 1) {
            return Err(format!(
                "{id}: got {} (v{}), want {want}",
                token_of(&r),
                r.model_version
            ));
        }
    }
    drop(tx);
    match responses.message().await {
        Ok(None) => Ok((version.unwrap_or_default(), times)),
        other => Err(format!("{id}: stream did not end cleanly: {other:?}")),
    }
}

/// Opens a `ModelStreamInfer` call asking for `tokens` tokens of `llama`: the sender of its
/// request stream (still open: dropping it ends the stream) and the responses.
pub async fn open_stream(
    client: &mut KserveClient,
    id: &str,
    tokens: i64,
) -> Result<
    (
        tokio::sync::mpsc::Sender<ModelInferRequest>,
        tonic::Streaming<ModelStreamInferResponse>,
    ),
    tonic::Status,
> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(token_request("llama", id, tokens))
        .await
        .expect("the receiver is alive");
    let responses = client
        .model_stream_infer(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, responses))
}

/// [`stream_on`] over a new connection to `addr`; returns the version.
pub async fn stream_once(addr: SocketAddr, id: &str, tokens: i64) -> Result<String, String> {
    let mut client = kserve_client(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    stream_on(&mut client, id, tokens).await.map(|(v, _)| v)
}

pub type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<bytes::Bytes>,
>;

/// An HTTP/1.1 client with keep-alive and `TCP_NODELAY` (a request's head and body are
/// separate writes: with Nagle's algorithm the body would wait for the server's delayed ACK).
pub fn http_client() -> HttpClient {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(connector)
}

/// One streamed OpenAI completion of `tokens` tokens of `llama` from `addr`, read event by
/// event as it arrives: checks the tokens come in order from one version and the stream ends
/// with `data: [DONE]`. Returns the version and the timings.
pub async fn sse_stream(
    client: &HttpClient,
    addr: SocketAddr,
    tokens: u64,
) -> Result<(String, StreamTimes), String> {
    use http_body_util::BodyExt;
    let body = serde_json::json!({"model": "llama", "prompt": "hello", "max_tokens": tokens,
        "stream": true});
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/v1/completions"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .map_err(|e| e.to_string())?;
    let start = Instant::now();
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    if resp.status() != 200 {
        return Err(format!("status {}", resp.status()));
    }
    let mut body = resp.into_body();
    let (mut buf, mut times, mut version, mut seen, mut done) = (
        Vec::new(),
        StreamTimes::default(),
        None::<String>,
        0u64,
        false,
    );
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("after {seen} tokens: {e}"))?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        let now = sent_at();
        buf.extend_from_slice(data);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            let line = std::str::from_utf8(&event[..end])
                .map_err(|e| e.to_string())?
                .strip_prefix("data: ")
                .ok_or("an SSE event without data")?;
            if line == "[DONE]" {
                done = true;
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
            if seen == 0 {
                times.first_token = start.elapsed().as_nanos() as u64;
            }
            if let Some(sent) = v[SENT_PARAM].as_u64() {
                times.per_message.push(now.saturating_sub(sent));
            }
            let text = v["choices"][0]["text"].as_str().unwrap_or_default();
            let ver = version
                .get_or_insert_with(|| {
                    text.split('-')
                        .next()
                        .unwrap_or_default()
                        .trim_start_matches('v')
                        .to_string()
                })
                .clone();
            if text != format!("v{ver}-token{seen} ") {
                return Err(format!("got {text:?}, want token {seen} of v{ver}"));
            }
            seen += 1;
        }
    }
    if seen != tokens || !done {
        return Err(format!(
            "stream ended after {seen} of {tokens} tokens (done: {done})"
        ));
    }
    Ok((version.unwrap_or_default(), times))
}

/// Tells a simulated server to load new weights (as an orchestrator would) and waits until
/// it serves them.
pub async fn reload_backend(addr: SocketAddr) -> Result<(), String> {
    let mut c = kserve_client(addr)
        .await
        .map_err(|e| format!("connect to the model server: {e}"))?;
    c.repository_model_load(RepositoryModelLoadRequest {
        model_name: "llama".into(),
        ..Default::default()
    })
    .await
    .map_err(|e| format!("load: {e}"))?;
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let ready = c
            .model_ready(ModelReadyRequest {
                name: "llama".into(),
                version: String::new(),
            })
            .await
            .map(|r| r.into_inner().ready)
            .unwrap_or(false);
        if ready {
            return Ok(());
        }
        if Instant::now() > until {
            return Err("model server never came back".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Posts a weight reload event for model `llama` of `endpoint` in `pool` to weir's admin.
pub async fn reload_signal(
    admin: SocketAddr,
    pool: &str,
    endpoint: SocketAddr,
    event: &str,
    version: &str,
) -> Result<(), String> {
    let body = serde_json::json!({"pool": pool, "endpoint": endpoint.to_string(), "model": "llama",
        "event": event, "version": version});
    let (status, text) = tokio::task::spawn_blocking(move || {
        admin_post(admin, "/inference/reload", &body.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("{event}: {status} {text}"));
    }
    Ok(())
}

/// Weir's admin view of `endpoint` in `pool`.
pub async fn endpoint_view(
    admin: SocketAddr,
    pool: &str,
    endpoint: SocketAddr,
) -> Result<serde_json::Value, String> {
    let (_, body) = tokio::task::spawn_blocking(move || admin_get(admin, "/inference"))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    v["pools"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["name"] == pool)
        .flat_map(|p| p["endpoints"].as_array().cloned().unwrap_or_default())
        .find(|e| e["address"] == endpoint.to_string())
        .ok_or_else(|| format!("weir has no endpoint {endpoint} in pool {pool}"))
}

/// Polls `endpoint_view` until `ok` holds, for at most `limit`.
async fn wait_endpoint(
    admin: SocketAddr,
    pool: &str,
    endpoint: SocketAddr,
    what: &str,
    limit: Duration,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> Result<(), String> {
    let until = Instant::now() + limit;
    loop {
        let e = endpoint_view(admin, pool, endpoint).await?;
        if ok(&e) {
            return Ok(());
        }
        if Instant::now() > until {
            return Err(format!("timed out waiting for {what} of {endpoint}: {e}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The orchestrator's side of one backend's weight reload through weir's admin, the way a
/// trainer or rollout controller drives it: `start` for each `(pool, endpoint)` that is this
/// backend (one server may be an endpoint of a KServe pool and of an OpenAI pool), wait until
/// weir has drained them all, reload the backend (`RepositoryModelLoad` on `backend`, wait for
/// `ModelReady`), `finished` with `version`, and wait until weir serves it again everywhere.
pub async fn reload_through_admin(
    admin: SocketAddr,
    endpoints: &[(&str, SocketAddr)],
    backend: SocketAddr,
    version: &str,
) -> Result<(), String> {
    for &(pool, endpoint) in endpoints {
        reload_signal(admin, pool, endpoint, "start", "").await?;
    }
    for &(pool, endpoint) in endpoints {
        wait_endpoint(
            admin,
            pool,
            endpoint,
            "the drain",
            Duration::from_secs(30),
            |e| e["models"][0]["state"] == "reloading" && e["in_flight"] == 0,
        )
        .await?;
    }
    reload_backend(backend).await?;
    for &(pool, endpoint) in endpoints {
        reload_signal(admin, pool, endpoint, "finished", version).await?;
    }
    for &(pool, endpoint) in endpoints {
        wait_endpoint(
            admin,
            pool,
            endpoint,
            "serving the new version",
            Duration::from_secs(10),
            |e| e["models"][0]["state"] == "serving" && e["models"][0]["version"] == version,
        )
        .await?;
    }
    Ok(())
}
