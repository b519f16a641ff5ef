//! The access log: one JSON line per request with the configured fields, written to a file
//! off the request path, and counted in the metrics.

use std::time::{Duration, Instant};

use weir_integration::grpc_backend::GrpcBackend;
use weir_integration::http_backend::HttpBackend;
use weir_integration::weir_process::admin_get;

use crate::*;

/// The lines of `path` once there are at least `n`.
fn lines(path: &std::path::Path, n: usize) -> Vec<serde_json::Value> {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < until,
            "{} of {n} lines: {text}",
            lines.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_request_gets_one_json_line_with_the_configured_fields() {
    let backend = HttpBackend::start("b").await;
    let grpc = GrpcBackend::start("g").await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let s = start(&format!(
        "access_log:\n  path: \"{}\"\n  fields: [method, path, protocol, status, route, cluster, upstream, tries, request_bytes, response_bytes, request_id, error, duration_ms, time, grpc_status]\nroutes:\n  - name: grpc\n    match: {{ grpc: {{ service: weir.test.Echo }} }}\n    route: {{ cluster: g }}\n  - name: gone\n    match: {{ path: {{ prefix: /gone }} }}\n    route: {{ cluster: dead }}\n  - name: api\n    match: {{ path: {{ prefix: /api }} }}\n    route: {{ cluster: b }}\nclusters:\n{}{}{}",
        log.display(),
        cluster("b", "http1", &[backend.addr], ""),
        cluster("dead", "http1", &[dead_addr], ""),
        cluster("g", "h2c", &[grpc.addr], "")
    ));
    let client = h1_client();
    let r = send(
        &client,
        s.listen,
        "GET",
        "/api/one?x=1",
        &[("x-request-id", "req-1")],
    )
    .await;
    assert_eq!(r.status, 200);
    let req = ::http::Request::builder()
        .method("POST")
        .uri(format!("http://{}/api/two", s.listen))
        .body(Full::new(Bytes::from(vec![b'x'; 1000])))
        .unwrap();
    let resp = h2c_client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(get(&client, s.listen, "/nowhere").await.status, 404);
    let failed = get(&client, s.listen, "/gone").await.status;
    assert!(failed >= 500, "{failed}");
    // gRPC: the status the client got, an answer's and a failure's.
    let mut g = crate::grpc::client(s.listen).await;
    g.unary(crate::grpc::msg("hi", 1)).await.expect("unary");
    let e = g
        .unary(crate::grpc::msg("fail:5", 1))
        .await
        .expect_err("asked to fail");
    assert_eq!(e.code(), tonic::Code::NotFound);

    let lines = lines(&log, 6);
    assert_eq!(lines.len(), 6, "one line per request: {lines:?}");
    let keys: Vec<&str> = lines[0]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys.len(), 15, "the configured fields: {keys:?}");
    let first = &lines[0];
    assert_eq!(first["method"], "GET");
    assert_eq!(first["path"], "/api/one?x=1");
    assert_eq!(first["protocol"], "HTTP/1.1");
    assert_eq!(first["status"], 200);
    assert_eq!(first["route"], "api");
    assert_eq!(first["cluster"], "b");
    assert_eq!(first["upstream"], backend.addr.to_string());
    assert_eq!(first["tries"], 1);
    assert_eq!(first["request_id"], "req-1");
    assert!(first["error"].is_null());
    assert!(first["grpc_status"].is_null(), "not a gRPC call: {first}");
    assert!(first["duration_ms"].as_f64().unwrap() > 0.0);
    let second = &lines[1];
    assert_eq!(
        (second["method"].as_str(), second["protocol"].as_str()),
        (Some("POST"), Some("HTTP/2"))
    );
    assert_eq!(second["request_bytes"], 1000);
    assert_eq!(second["response_bytes"], body.len());
    let third = &lines[2];
    assert_eq!(
        (third["status"].as_u64(), third["route"].as_str()),
        (Some(404), Some(""))
    );
    let fourth = &lines[3];
    assert_eq!(fourth["status"], failed);
    assert_eq!(fourth["upstream"], dead_addr.to_string());
    assert!(
        fourth["error"].as_str().is_some_and(|e| !e.is_empty()),
        "the failure is named: {fourth}"
    );
    assert_eq!(
        (lines[4]["route"].as_str(), lines[4]["grpc_status"].as_u64()),
        (Some("grpc"), Some(0))
    );
    assert_eq!(lines[5]["grpc_status"], 5, "{}", lines[5]);
    // The same statuses in the metrics (weir_requests_total has both calls as 200).
    for code in ["0", "5"] {
        let (n, text) = crate::metric_value(
            s.weir.admin,
            "weir_grpc_requests_total",
            &[("route", "grpc"), ("cluster", "g"), ("grpc_code", code)],
        );
        assert_eq!(n, Some(1.0), "grpc_code {code}: {text}");
    }
    let (_, metrics) = admin_get(s.weir.admin, "/stats/prometheus").unwrap();
    assert!(
        metrics.contains("weir_access_log_lines_total 6"),
        "{metrics}"
    );
    assert!(
        metrics.contains("weir_access_log_dropped_total 0"),
        "{metrics}"
    );
}
