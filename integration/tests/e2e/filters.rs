//! Proxy-wasm filters (the example filters, built from the Envoy SDK) in a running weir:
//! header, body and trailer phases over HTTP/1.1, h2c and gRPC, callouts, shared data,
//! metrics, limits and the seccomp sandbox.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use weir_integration::grpc_backend::GrpcBackend;
use weir_integration::http_backend::HttpBackend;
use weir_integration::pb::StreamRequest;
use weir_integration::wasm_filters;
use weir_integration::weir_process::{admin_get, free_port, Weir};

use crate::grpc::client;
use crate::*;

/// A filter entry of a chain, with its module and digest.
fn filter(kind: &str, name: &str, config: &str, extra: &str) -> String {
    format!(
        "      - name: {name}\n        module: \"{}\"\n        sha256: \"{}\"\n        config: {config}\n{extra}",
        wasm_filters::path(kind).display(),
        wasm_filters::sha256(kind),
    )
}

/// The text of a config with one listener (with an optional chain) and `rest`.
fn config(
    listen: SocketAddr,
    admin: SocketAddr,
    listener_chain: Option<&str>,
    rest: &str,
) -> String {
    let chain = listener_chain.map_or(String::new(), |c| format!("    filter_chain: {c}\n"));
    format!("admin:\n  address: \"{admin}\"\nlisteners:\n  - name: main\n    address: \"{listen}\"\n{chain}{rest}")
}

fn start_with(listener_chain: Option<&str>, rest: &str, args: &[&str]) -> Setup {
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weir.yaml");
    std::fs::write(&path, config(listen, admin, listener_chain, rest)).unwrap();
    let mut a = vec!["--config".to_string(), path.display().to_string()];
    a.extend(args.iter().map(|s| s.to_string()));
    let weir = Weir::spawn(dir, &a, admin);
    Setup { weir, listen }
}

async fn send_body(
    client: &HttpClient,
    listen: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, ::http::HeaderMap, Bytes) {
    let mut req = ::http::Request::builder()
        .method("POST")
        .uri(format!("http://{listen}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(20),
        client.request(req.body(Full::new(Bytes::from(body))).unwrap()),
    )
    .await
    .expect("reply in time")
    .expect("request sent");
    let (parts, body) = resp.into_parts();
    (
        parts.status.as_u16(),
        parts.headers,
        body.collect().await.unwrap().to_bytes(),
    )
}

fn metric(weir: &Weir, name: &str) -> f64 {
    let (_, text) = admin_get(weir.admin, "/stats/prometheus").expect("metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn filters_see_and_set_request_and_response_trailers() {
    let backend = HttpBackend::start("b").await;
    let rest = format!(
        "filter_chains:\n  - name: edge\n    filters:\n{}routes:\n  - name: all\n    route: {{ cluster: b }}\nclusters:\n{}",
        filter("header_rewrite", "trailers", r#"{"request_trailers_set": {"x-filtered": "in"}, "response_trailers_set": {"x-count": "3"}}"#, ""),
        cluster("b", "http1", &[backend.addr], "")
    );
    let s = start_with(Some("edge"), &rest, &[]);
    let raw = |head: &'static str| raw_exchange(s.listen, head);
    // The request's trailer section, with the filter's field added, reaches the backend.
    let out = raw("POST /echo-trailers HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\nx-checksum: abc123\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(
        out.ends_with("5 x-checksum=abc123 x-filtered=in"),
        "{out:?}"
    );
    // The response's trailers, with the filter's value, reach the client.
    let out =
        raw("GET /trailers HTTP/1.1\r\nHost: x\r\nTE: trailers\r\nConnection: close\r\n\r\n").await;
    assert!(
        out.ends_with("\r\n0\r\nx-checksum: abc123\r\nx-count: 3\r\n\r\n"),
        "{out:?}"
    );
    for phase in ["request_trailers", "response_trailers"] {
        assert_eq!(
            metric(
                &s.weir,
                &format!("weir_wasm_filter_phase_seconds_count{{phase=\"{phase}\"}}")
            ),
            1.0,
            "{phase}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn header_filters_on_listener_and_route_chains() {
    let backend = HttpBackend::start("b").await;
    let rest = format!(
        "filter_chains:\n  - name: edge\n    filters:\n{}  - name: special\n    filters:\n{}routes:\n  - name: special\n    match: {{ path: {{ prefix: /special/ }} }}\n    route: {{ cluster: b }}\n    filter_chain: special\n  - name: all\n    route: {{ cluster: b }}\nclusters:\n{}",
        filter("header_rewrite", "edge-rewrite", r#"{"request_set": {"x-filter": "edge"}, "request_remove": ["x-secret"], "response_set": {"x-served-by": "weir-edge"}}"#, ""),
        filter("header_rewrite", "special-rewrite", r#"{"request_set": {"x-filter": "special"}, "response_remove": ["x-backend"]}"#, ""),
        cluster("b", "http1", &[backend.addr], "")
    );
    let s = start_with(Some("edge"), &rest, &[]);
    for (client, name) in [(h1_client(), "h1"), (h2c_client(), "h2c")] {
        let r = send(
            &client,
            s.listen,
            "GET",
            "/x",
            &[("x-secret", "s"), ("x-keep", "k")],
        )
        .await;
        assert_eq!(r.status, 200, "{name}: {r:?}");
        let h = &r.json()["headers"];
        assert_eq!(h["x-filter"], "edge", "{name}");
        assert_eq!(h["x-keep"], "k", "{name}");
        assert!(h.get("x-secret").is_none(), "{name}: removed by the filter");
        assert_eq!(r.headers["x-served-by"], "weir-edge", "{name}");
        assert_eq!(r.backend(), "b");

        let r = get(&client, s.listen, "/special/y").await;
        assert_eq!(r.status, 200, "{name}");
        assert_eq!(
            r.json()["headers"]["x-filter"],
            "special",
            "route chain overrides the listener's"
        );
        assert!(
            r.headers.get("x-backend").is_none(),
            "{name}: response header removed"
        );
        assert!(
            r.headers.get("x-served-by").is_none(),
            "{name}: the listener chain did not run"
        );
    }
    // Four requests went through a chain: each one's header phases were timed.
    for phase in ["request_headers", "response_headers"] {
        assert_eq!(
            metric(
                &s.weir,
                &format!("weir_wasm_filter_phase_seconds_count{{phase=\"{phase}\"}}")
            ),
            4.0,
            "{phase}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn authz_filter_holds_requests_until_its_http_callout_answers() {
    let backend = HttpBackend::start("app").await;
    let authz = HttpBackend::start("authz").await;
    let rest = format!(
        "filter_chains:\n  - name: authz\n    filters:\n{}routes:\n  - name: all\n    route: {{ cluster: app }}\nclusters:\n{}{}",
        filter("authz", "authz", r#"{"cluster": "authz", "path": "/authz/check", "timeout_ms": 2000}"#, ""),
        cluster("app", "http1", &[backend.addr], ""),
        cluster("authz", "http1", &[authz.addr], "")
    );
    let s = start_with(Some("authz"), &rest, &[]);
    for (client, name) in [(h1_client(), "h1"), (h2c_client(), "h2c")] {
        let r = send(&client, s.listen, "GET", "/data", &[("x-user", "alice")]).await;
        assert_eq!(r.status, 200, "{name}: {r:?}");
        assert_eq!(
            r.json()["headers"]["x-authz-subject"],
            "user:alice",
            "{name}"
        );
        let r = send(&client, s.listen, "GET", "/data", &[("x-user", "mallory")]).await;
        assert_eq!(r.status, 403, "{name}: {r:?}");
        assert_eq!(r.body, "user \"mallory\" may not pass\n");
        assert_eq!(r.headers["x-authz"], "denied");
    }
    assert_eq!(authz.requests(), 4, "one callout per request");
    assert_eq!(
        backend.requests(),
        2,
        "denied requests never reached the app"
    );
    // Concurrent held requests each get their own answer.
    let client = h1_client();
    let mut tasks = Vec::new();
    for i in 0..40 {
        let c = client.clone();
        let user = if i % 2 == 0 { "carol" } else { "eve" };
        tasks.push(tokio::spawn(async move {
            (
                user,
                send(&c, s.listen, "GET", "/c", &[("x-user", user)])
                    .await
                    .status,
            )
        }));
    }
    for t in tasks {
        let (user, status) = t.await.unwrap();
        assert_eq!(status, if user == "carol" { 200 } else { 403 }, "{user}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_limit_filter_shares_its_budget_across_filter_threads() {
    let backend = HttpBackend::start("b").await;
    let rest = format!(
        "filter_chains:\n  - name: rl\n    filters:\n{}routes:\n  - name: all\n    route: {{ cluster: b }}\nclusters:\n{}",
        filter("rate_limit", "rl", r#"{"requests": 10, "key_header": "x-client"}"#, ""),
        cluster("b", "http1", &[backend.addr], "")
    );
    let s = start_with(
        Some("rl"),
        &rest,
        &["--threads", "2", "--filter-threads", "3"],
    );
    let mut ok = 0;
    let mut limited = 0;
    for i in 0..25 {
        // A fresh connection each time, so requests spread over workers and filter threads.
        let r = send(
            &h1_client(),
            s.listen,
            "GET",
            &format!("/{i}"),
            &[("x-client", "a")],
        )
        .await;
        match r.status {
            200 => ok += 1,
            429 => {
                assert_eq!(r.headers["x-rate-limited"], "true");
                assert_eq!(r.body, "rate limited\n");
                limited += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((ok, limited), (10, 15), "one budget for all threads");
    let r = send(&h1_client(), s.listen, "GET", "/", &[("x-client", "b")]).await;
    assert_eq!(r.status, 200, "another client has its own budget");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn body_filter_rewrites_request_and_response_bodies() {
    let backend = HttpBackend::start("b").await;
    let rest = format!(
        "filter_chains:\n  - name: body\n    filters:\n{}routes:\n  - name: h2\n    match: {{ path: {{ prefix: /h2/ }} }}\n    route: {{ cluster: b2, prefix_rewrite: / }}\n  - name: all\n    route: {{ cluster: b }}\nclusters:\n{}{}",
        // The deadline is wall time: on 2 shared cores under a full test run, a debug build
        // moving 1 MB through the ABI went past the 100 ms default (500, seen twice).
        filter("body_transform", "body", r#"{"request": {"find": "cat", "replace": "dog"}, "response": {"find": "dog", "replace": "DOG"}}"#, "        callback_deadline: 5s\n"),
        cluster("b", "http1", &[backend.addr], ""),
        cluster("b2", "h2c", &[backend.addr], "")
    );
    let s = start_with(Some("body"), &rest, &[]);
    let big: Vec<u8> = "a cat, ".repeat(150_000).into_bytes();
    let want: Vec<u8> = "a DOG, ".repeat(150_000).into_bytes();
    for (client, name) in [(h1_client(), "h1"), (h2c_client(), "h2c")] {
        for path in ["/echo-body", "/h2/echo-body"] {
            let (status, headers, body) = send_body(
                &client,
                s.listen,
                path,
                &[("content-type", "text/plain")],
                b"the cat sat".to_vec(),
            )
            .await;
            assert_eq!(status, 200, "{name} {path}");
            assert_eq!(&body[..], b"the DOG sat", "{name} {path}");
            assert_eq!(headers["content-type"], "text/plain");
            let (status, _, body) = send_body(&client, s.listen, path, &[], big.clone()).await;
            assert_eq!(status, 200, "{name} {path}");
            assert_eq!(body.len(), want.len(), "{name} {path}");
            assert!(
                body[..] == want[..],
                "{name} {path}: 1 MB body rewritten byte for byte"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn token_counter_watches_sse_and_grpc_streams_without_holding_them() {
    let http = HttpBackend::start("llm").await;
    let grpc = GrpcBackend::start("g").await;
    let rest = format!(
        "filter_chains:\n  - name: tokens\n    filters:\n{}routes:\n  - name: echo\n    match: {{ grpc: {{ service: weir.test.Echo }} }}\n    route: {{ cluster: g }}\n  - name: llm\n    route: {{ cluster: llm }}\nclusters:\n{}{}",
        filter("token_counter", "tokens", "\"\"", ""),
        cluster("llm", "http1", &[http.addr], ""),
        cluster("g", "h2c", &[grpc.addr], "")
    );
    let s = start_with(Some("tokens"), &rest, &[]);
    for (client, name) in [(h1_client(), "h1"), (h2c_client(), "h2c")] {
        let r = get(&client, s.listen, "/sse/7").await;
        assert_eq!(r.status, 200, "{name}");
        assert_eq!(r.headers["x-token-counter"], "on");
        assert_eq!(
            r.body.matches("data: ").count(),
            8,
            "{name}: the stream passes intact"
        );
        assert!(r.body.ends_with("data: [DONE]\n\n"));
    }
    assert_eq!(metric(&s.weir, "weir_wasm_inference_tokens_out"), 14.0);

    // A gated gRPC server stream: each message reaches the client before the next is sent,
    // so the filter does not hold the stream back, and the trailers still arrive.
    let mut c = client(s.listen).await;
    let req = StreamRequest {
        count: 5,
        gated: true,
        final_code: 0,
    };
    let mut stream = c.server_stream(req).await.expect("call").into_inner();
    for i in 0..5 {
        let m = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .unwrap_or_else(|_| panic!("message {i} held back by the filter"))
            .expect("message")
            .expect("not end");
        assert_eq!(m.n, i);
        grpc.state.gate.add_permits(1);
    }
    assert!(stream
        .message()
        .await
        .expect("OK status in trailers")
        .is_none());
    assert_eq!(metric(&s.weir, "weir_wasm_inference_tokens_out"), 19.0);
    assert_eq!(metric(&s.weir, "weir_wasm_inference_streams"), 3.0);

    // Bidirectional ping-pong: request messages are not held by the filter chain either.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(crate::grpc::msg("ping0", 0)).await.unwrap();
    let mut replies = c
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("bidi")
        .into_inner();
    for i in 0..4 {
        let m = tokio::time::timeout(Duration::from_secs(5), replies.message())
            .await
            .expect("reply before the next ping: the chain buffered the stream")
            .unwrap()
            .unwrap();
        assert_eq!(m.text, format!("g:ping{i}"));
        if i < 3 {
            tx.send(crate::grpc::msg(&format!("ping{}", i + 1), i + 1))
                .await
                .unwrap();
        }
    }
    drop(tx);
    assert_eq!(replies.message().await.unwrap().unwrap().text, "g:done");
    assert!(replies.message().await.unwrap().is_none(), "OK trailers");
    assert_eq!(
        metric(&s.weir, "weir_wasm_inference_tokens_out"),
        24.0,
        "4 replies + done"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failing_filters_fail_only_their_own_request() {
    let backend = HttpBackend::start("b").await;
    let rest = format!(
        "filter_chains:\n  - name: strict\n    filters:\n{}  - name: lenient\n    filters:\n{}routes:\n  - name: open\n    match: {{ path: {{ prefix: /open/ }} }}\n    route: {{ cluster: b }}\n    filter_chain: lenient\n  - name: all\n    route: {{ cluster: b }}\nclusters:\n{}",
        filter("probe", "strict", "{}", "        memory_limit_mb: 16\n        callback_deadline: 50ms\n"),
        filter("probe", "lenient", "{}", "        fail_open: true\n        callback_deadline: 50ms\n"),
        cluster("b", "http1", &[backend.addr], "")
    );
    let s = start_with(Some("strict"), &rest, &[]);
    let client = h1_client();
    for (header, value) in [
        ("x-probe-trap", "1"),
        ("x-probe-loop", "1"),
        ("x-probe-alloc", "64"),
    ] {
        let started = Instant::now();
        let r = send(&client, s.listen, "GET", "/x", &[(header, value)]).await;
        assert_eq!(r.status, 500, "{header}: {r:?}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{header}: stopped at its deadline"
        );
        let r = get(&client, s.listen, "/x").await;
        assert_eq!(r.status, 200, "after {header}: the VM was recreated");
        let r = send(&client, s.listen, "GET", "/open/x", &[(header, value)]).await;
        assert_eq!(r.status, 200, "{header}: fail_open passes the request on");
    }
    let grpc_reply = send(
        &h2c_client(),
        s.listen,
        "POST",
        "/weir.test.Echo/Unary",
        &[("content-type", "application/grpc"), ("x-probe-trap", "1")],
    )
    .await;
    assert_eq!(grpc_reply.status, 200);
    assert_eq!(
        grpc_reply.headers["grpc-status"], "2",
        "gRPC clients get UNKNOWN (HTTP 500)"
    );
    assert!(metric(&s.weir, "weir_wasm_filter_failures_total") >= 6.0);
    assert!(metric(&s.weir, "weir_wasm_vm_restarts_total") >= 3.0);
    assert_eq!(
        backend.requests(),
        6,
        "failed requests never reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_callout_and_unimplemented_host_calls() {
    let backend = HttpBackend::start("b").await;
    let grpc = GrpcBackend::start("g").await;
    let rest = format!(
        "filter_chains:\n  - name: probe\n    filters:\n{}routes:\n  - name: all\n    route: {{ cluster: b }}\nclusters:\n{}{}",
        filter("probe", "probe", r#"{"grpc_cluster": "g"}"#, ""),
        cluster("b", "http1", &[backend.addr], ""),
        cluster("g", "h2c", &[grpc.addr], "")
    );
    let s = start_with(Some("probe"), &rest, &[]);
    let client = h1_client();
    let r = send(&client, s.listen, "GET", "/", &[("x-probe-grpc-call", "1")]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.headers["x-probe-grpc-status"], "0");
    assert_eq!(
        r.body, "0801",
        "grpc.health.v1 HealthCheckResponse{{status: SERVING}}"
    );
    let r = send(
        &client,
        s.listen,
        "GET",
        "/",
        &[("x-probe-unimplemented", "1")],
    )
    .await;
    assert_eq!(
        r.headers["x-probe-status"], "12",
        "proxy_grpc_stream is Unimplemented"
    );
    let r = get(&client, s.listen, "/").await;
    assert_eq!(r.status, 200, "the proxy and the filter keep working");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn root_context_callouts_from_on_tick_get_their_answer() {
    let backend = HttpBackend::start("b").await;
    let rest = format!(
        "filter_chains:\n  - name: probe\n    filters:\n{}routes:\n  - name: all\n    route: {{ cluster: b }}\nclusters:\n{}",
        filter("probe", "probe", r#"{"root_call_cluster": "b"}"#, "        vm_config: tick\n"),
        cluster("b", "http1", &[backend.addr], "")
    );
    let s = start_with(Some("probe"), &rest, &["--filter-threads", "2"]);
    let client = h1_client();
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let r = send(&client, s.listen, "GET", "/", &[("x-probe-state", "1")]).await;
        // Every answer is the probe's (a failure here once showed only as a missing header).
        assert_eq!(r.status, 200, "{r:?}");
        if r.headers
            .get("x-probe-root-call")
            .is_some_and(|v| v == "204")
        {
            break;
        }
        assert!(
            Instant::now() < end,
            "no answer to the root-context call: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Threads of process `pid` whose name starts with `prefix`, with their `Seccomp:` mode.
fn threads_named(pid: i32, prefix: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = entry.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim().starts_with(prefix) {
            let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
            let mode = status
                .lines()
                .find_map(|l| l.strip_prefix("Seccomp:"))
                .unwrap_or("")
                .trim()
                .to_string();
            out.push((comm.trim().to_string(), mode));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn weir_filter_threads_run_under_seccomp() {
    let backend = HttpBackend::start("b").await;
    let rest = format!(
        "filter_chains:\n  - name: edge\n    filters:\n{}routes:\n  - name: all\n    route: {{ cluster: b }}\nclusters:\n{}",
        filter("header_rewrite", "edge", "{}", ""),
        cluster("b", "http1", &[backend.addr], "")
    );
    let s = start_with(Some("edge"), &rest, &["--filter-threads", "2"]);
    let pid = s.weir.pid();
    let filters = threads_named(pid, "weir-filter-");
    assert_eq!(filters.len(), 2, "{filters:?}");
    for (name, mode) in filters.iter().chain(&threads_named(pid, "weir-epoch")) {
        assert_eq!(mode, "2", "{name} runs with a seccomp filter");
    }
    let (_, main_mode) = threads_named(pid, "weir")
        .into_iter()
        .find(|(n, _)| n == "weir")
        .expect("main thread");
    assert_eq!(main_mode, "0", "the rest of the proxy is not sandboxed");
    assert_eq!(get(&h1_client(), s.listen, "/").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_filter_configs_are_refused_and_the_good_one_keeps_serving() {
    let backend = HttpBackend::start("b").await;
    let good = format!(
        "filter_chains:\n  - name: edge\n    filters:\n{}routes:\n  - name: all\n    route: {{ cluster: b }}\nclusters:\n{}",
        filter("header_rewrite", "edge", r#"{"response_set": {"x-v": "1"}}"#, ""),
        cluster("b", "http1", &[backend.addr], "")
    );
    let s = start_with(Some("edge"), &good, &[]);
    let client = h1_client();
    assert_eq!(get(&client, s.listen, "/").await.headers["x-v"], "1");
    let version = s.weir.version();

    // A module whose digest differs from the config's, then a config the filter rejects.
    let wrong_digest = good.replace(&wasm_filters::sha256("header_rewrite"), &"0".repeat(64));
    let rejected = good.replace(r#"{"response_set": {"x-v": "1"}}"#, r#""not json""#);
    let listen = s.listen;
    let admin = s.weir.admin;
    for (bad, why) in [
        (wrong_digest, "sha256"),
        (rejected, "proxy_on_configure returned false"),
    ] {
        s.weir
            .write_config(&config(listen, admin, Some("edge"), &bad));
        let end = Instant::now() + Duration::from_secs(10);
        while !s.weir.log().contains(why) {
            assert!(
                Instant::now() < end,
                "no rejection logged; log:\n{}",
                s.weir.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(s.weir.version(), version, "the good config stays");
        assert_eq!(get(&client, s.listen, "/").await.headers["x-v"], "1");
    }

    // `weir validate` names file, line and field of a dangling chain reference.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, config(listen, admin, Some("nope"), &good)).unwrap();
    let out = std::process::Command::new(weir_integration::weir_process::weir_binary())
        .args(["validate", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.yaml:6:")
            && err.contains("listeners[0].filter_chain")
            && err.contains("unknown filter chain \"nope\""),
        "{err}"
    );

    // `weir validate` also checks the modules: present, the configured digest, valid wasm.
    let validate = |text: &str| {
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(weir_integration::weir_process::weir_binary())
            .args(["validate", path.to_str().unwrap()])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = validate(&config(listen, admin, Some("edge"), &good));
    assert!(ok, "{err}");
    let wrong = good.replace(&wasm_filters::sha256("header_rewrite"), &"0".repeat(64));
    let (ok, err) = validate(&config(listen, admin, Some("edge"), &wrong));
    assert!(
        !ok && err.contains("bad.yaml") && err.contains("sha256"),
        "{err}"
    );
    let not_wasm = dir.path().join("not.wasm");
    std::fs::write(&not_wasm, b"not wasm").unwrap();
    let garbage = good
        .replace(
            &wasm_filters::path("header_rewrite").display().to_string(),
            &not_wasm.display().to_string(),
        )
        .replace(
            &format!(
                "        sha256: \"{}\"\n",
                wasm_filters::sha256("header_rewrite")
            ),
            "",
        );
    let (ok, err) = validate(&config(listen, admin, Some("edge"), &garbage));
    assert!(!ok && err.contains("not.wasm"), "{err}");

    // At start, a filter chain that cannot load stops weir with the reason.
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    std::fs::write(
        &path,
        config(
            listen,
            admin,
            Some("edge"),
            &good.replace(&wasm_filters::sha256("header_rewrite"), &"0".repeat(64)),
        ),
    )
    .unwrap();
    let out = std::process::Command::new(weir_integration::weir_process::weir_binary())
        .args(["run", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("sha256"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
