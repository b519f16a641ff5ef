//! KServe v2 / Triton gRPC through weir, judged by the real `tritonclient`: readiness, model
//! metadata, unary inference and `ModelStreamInfer` streams (with Triton's
//! `triton_final_response` marker), proxied by a plain gRPC route to the simulated model
//! server.

use std::process::Command;

use weir_integration::envoy::{missing_prerequisite, venv};
use weir_integration::model_server::ModelServer;

use crate::*;

/// Whether the tritonclient venv is there; says so loudly (fails under CI=true) when not.
pub(crate) fn tritonclient_available() -> bool {
    if !venv().join("bin/python").exists()
        || !Command::new(venv().join("bin/python"))
            .args(["-c", "import tritonclient.grpc"])
            .status()
            .is_ok_and(|s| s.success())
    {
        missing_prerequisite(
            "tritonclient[grpc]",
            "not installed in target/bench-venv (.ci/install-deps installs it)",
        );
        return false;
    }
    true
}

pub(crate) fn triton_client(
    target: std::net::SocketAddr,
    model: &str,
    tokens: u32,
    compression: Option<&str>,
) -> Result<serde_json::Value, String> {
    let script =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/triton_client.py");
    let out = Command::new(venv().join("bin/python"))
        .arg(script)
        .arg(target.to_string())
        .arg(model)
        .arg(tokens.to_string())
        .args(compression)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tritonclient_streams_inference_through_weir() {
    if !tritonclient_available() {
        return;
    }
    let sim = ModelServer::start(&["llama"]).await;
    let s = start(&format!(
        "routes:\n  - name: triton\n    match: {{ grpc: {{ service: inference.GRPCInferenceService }} }}\n    route: {{ cluster: sim }}\nclusters:\n{}",
        cluster("sim", "h2c", &[sim.addr], "")
    ));
    let listen = s.listen;
    let seen = tokio::task::spawn_blocking(move || triton_client(listen, "llama", 4, None))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("tritonclient through weir failed: {e}"));
    assert_eq!(seen["server_ready"], true);
    assert_eq!(seen["model_ready"], true);
    assert_eq!(seen["metadata"]["name"], "llama");
    assert_eq!(seen["metadata"]["versions"][0], "1");
    assert_eq!(seen["unary"]["id"], "unary-1");
    assert_eq!(seen["unary"]["token"], "v1-token0");
    let stream = seen["stream"].as_array().expect("stream responses");
    assert_eq!(stream.len(), 8, "two requests of 4 tokens each: {stream:?}");
    for (k, r) in stream.iter().enumerate() {
        let (request, i) = (k / 4, k % 4);
        assert_eq!(r["id"], format!("stream-{request}"));
        assert_eq!(r["token"], format!("v1-token{i}"));
        assert_eq!(r["final"], i == 3, "only the last response is final");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn openai_sse_streams_through_weir_token_by_token() {
    use http_body_util::BodyExt;
    let sim = ModelServer::start(&["llama"]).await;
    let s = start(&format!(
        "routes:\n  - name: openai\n    match: {{ path: {{ prefix: /v1/ }} }}\n    route: {{ cluster: sim }}\nclusters:\n{}",
        cluster("sim", "http1", &[sim.http_addr], "")
    ));
    let r = get(&h1_client(), s.listen, "/v1/models").await;
    assert_eq!(r.json()["data"][0]["id"], "llama");

    for (client, name) in [(h1_client(), "h1"), (h2c_client(), "h2c")] {
        let body = r#"{"model": "llama", "stream": true, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}"#;
        let req = ::http::Request::builder()
            .method("POST")
            .uri(format!("http://{}/v1/chat/completions", s.listen))
            .header("content-type", "application/json")
            .header("x-sim-gated", "1")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap();
        let resp = client.request(req).await.expect("response");
        assert_eq!(resp.status(), 200, "{name}");
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        assert_eq!(resp.headers()["x-weight-version"], "1");
        let mut body = resp.into_body();
        let mut text = String::new();
        // Token k must arrive before the server may produce token k+1: nothing is buffered.
        for k in 0..4 {
            while !text.contains(&format!("token{k} ")) {
                let frame = tokio::time::timeout(std::time::Duration::from_secs(5), body.frame())
                    .await
                    .unwrap_or_else(|_| panic!("{name}: token {k} held back"))
                    .expect("frame")
                    .expect("ok");
                if let Ok(d) = frame.into_data() {
                    text.push_str(std::str::from_utf8(&d).unwrap());
                }
            }
            if k < 3 {
                sim.gate.add_permits(1);
            }
        }
        while let Some(frame) = body.frame().await {
            if let Ok(d) = frame.expect("ok").into_data() {
                text.push_str(std::str::from_utf8(&d).unwrap());
            }
        }
        let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.len(), 5, "{name}: 4 chunks and [DONE]: {text}");
        assert_eq!(events[4], "data: [DONE]");
        let last: serde_json::Value =
            serde_json::from_str(events[3].strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(last["choices"][0]["finish_reason"], "stop");
    }
}
