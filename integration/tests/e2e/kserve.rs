//! KServe v2 / Triton gRPC through weir, judged by the real `tritonclient`: readiness, model
//! metadata, unary inference and `ModelStreamInfer` streams (with Triton's
//! `triton_final_response` marker), proxied by a plain gRPC route to the simulated model
//! server.

use std::process::Command;

use weir_integration::envoy::{missing_prerequisite, venv};
use weir_integration::model_server::ModelServer;

use crate::*;

fn triton_client(
    target: std::net::SocketAddr,
    model: &str,
    tokens: u32,
) -> Result<serde_json::Value, String> {
    let script =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/triton_client.py");
    let out = Command::new(venv().join("bin/python"))
        .arg(script)
        .arg(target.to_string())
        .arg(model)
        .arg(tokens.to_string())
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tritonclient_streams_inference_through_weir() {
    if !venv().join("bin/python").exists()
        || !Command::new(venv().join("bin/python"))
            .args(["-c", "import tritonclient.grpc"])
            .status()
            .is_ok_and(|s| s.success())
    {
        return missing_prerequisite(
            "tritonclient[grpc]",
            "not installed in target/bench-venv (.ci/install-deps installs it)",
        );
    }
    let sim = ModelServer::start(&["llama"]).await;
    let s = start(&format!(
        "routes:\n  - name: triton\n    match: {{ grpc: {{ service: inference.GRPCInferenceService }} }}\n    route: {{ cluster: sim }}\nclusters:\n{}",
        cluster("sim", "h2c", &[sim.addr], "")
    ));
    let listen = s.listen;
    let seen = tokio::task::spawn_blocking(move || triton_client(listen, "llama", 4))
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
