//! OpenTelemetry traces through weir, received by a real OTLP/gRPC collector endpoint: a
//! server span per request, a client span per upstream attempt (retries visible), W3C trace
//! context continued from the caller or started, and sent upstream with the right parent.

use std::time::{Duration, Instant};

use weir_integration::grpc_backend::GrpcBackend;
use weir_integration::http_backend::HttpBackend;
use weir_integration::otlp_receiver::{OtlpReceiver, Received};
use weir_integration::weir_process::admin_get;

use crate::*;

const CALLER_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CALLER_SPAN: &str = "b7ad6b7169203331";

/// The spans of trace `trace` once there are at least `n`.
async fn spans_of(receiver: &OtlpReceiver, trace: &str, n: usize) -> Vec<Received> {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let spans: Vec<Received> = receiver
            .spans()
            .into_iter()
            .filter(|s| s.trace_id() == trace)
            .collect();
        if spans.len() >= n {
            return spans;
        }
        assert!(
            Instant::now() < until,
            "{} of {n} spans of {trace}: {:#?}",
            spans.len(),
            receiver.spans()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn kind(s: &Received) -> i32 {
    s.span.kind
}
/// A `traceparent` that makes `trace` the request's trace (sampled).
fn parent_in(trace: &str) -> String {
    format!("00-{trace}-4444444444444444-01")
}

/// A traced gRPC Echo request of `text`, in trace `trace`.
fn traced_msg(text: &str, trace: &str) -> tonic::Request<weir_integration::pb::Msg> {
    let mut req = tonic::Request::new(crate::grpc::msg(text, 1));
    req.metadata_mut()
        .insert("traceparent", parent_in(trace).parse().unwrap());
    req
}

const SERVER: i32 = 2;
const CLIENT: i32 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spans_reach_the_collector_with_parents_links_and_attributes() {
    let (receiver, otlp) = OtlpReceiver::start().await;
    let backend = HttpBackend::start("b").await;
    let grpc = GrpcBackend::start("g").await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let s = start(&format!(
        "tracing: {{ otlp_endpoint: \"http://{otlp}\", sampling: 1.0, service_name: weir-test }}\nroutes:\n  - name: grpc-dead\n    match: {{ headers: [{{ name: x-to, exact: dead }}] }}\n    route: {{ cluster: dead }}\n  - name: grpc\n    match: {{ grpc: {{ service: weir.test.Echo }} }}\n    route: {{ cluster: g }}\n  - name: rewritten\n    match: {{ path: {{ prefix: /old/ }} }}\n    route: {{ cluster: b, prefix_rewrite: /new/ }}\n  - name: flaky\n    match: {{ path: {{ prefix: /flaky }} }}\n    route: {{ cluster: dead, retry: {{ retries: 2, retry_on: [connect-failure] }} }}\n  - name: api\n    route: {{ cluster: b }}\nclusters:\n{}{}{}",
        cluster("b", "http1", &[backend.addr], ""),
        cluster("g", "h2c", &[grpc.addr], ""),
        cluster("dead", "http1", &[dead_addr], "")
    ));
    let client = h1_client();

    // A caller's trace is continued; the upstream sees weir's client span as its parent.
    let traceparent = format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01");
    let r = send(
        &client,
        s.listen,
        "GET",
        "/api/items?x=1",
        &[
            ("traceparent", &traceparent),
            ("tracestate", "vendor=opaque"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    let upstream = r.json()["headers"].clone();
    let up: Vec<&str> = upstream["traceparent"]
        .as_str()
        .expect("traceparent upstream")
        .split('-')
        .collect();
    assert_eq!(
        (up[0], up[1], up[3]),
        ("00", CALLER_TRACE, "01"),
        "{upstream}"
    );
    assert_ne!(up[2], CALLER_SPAN, "weir's span is the upstream's parent");
    assert_eq!(upstream["tracestate"], "vendor=opaque");
    let spans = spans_of(&receiver, CALLER_TRACE, 2).await;
    let server = spans
        .iter()
        .find(|s| kind(s) == SERVER)
        .expect("server span");
    let client_span = spans
        .iter()
        .find(|s| kind(s) == CLIENT)
        .expect("client span");
    assert_eq!(server.service, "weir-test");
    assert_eq!(
        server.parent_id(),
        CALLER_SPAN,
        "child of the caller's span"
    );
    assert_eq!(
        client_span.parent_id(),
        server.span_id(),
        "attempt under the request"
    );
    assert_eq!(
        client_span.span_id(),
        up[2],
        "the upstream's parent is the attempt"
    );
    assert_eq!(server.span.name, "GET api");
    for (k, v) in [
        ("http.request.method", "GET"),
        ("url.path", "/api/items"),
        ("http.response.status_code", "200"),
        ("network.protocol.version", "1.1"),
        ("weir.route", "api"),
        ("weir.cluster", "b"),
        ("server.address", "127.0.0.1"),
        // Encoded once per listener.
        ("url.scheme", "http"),
        ("weir.listener", "main"),
    ] {
        assert_eq!(server.attr(k).as_deref(), Some(v), "{k} on {server:?}");
    }
    // Encoded once per endpoint.
    assert_eq!(
        client_span.attr("server.port"),
        Some(backend.addr.port().to_string())
    );
    for (k, v) in [("server.address", "127.0.0.1"), ("weir.cluster", "b")] {
        assert_eq!(
            client_span.attr(k).as_deref(),
            Some(v),
            "{k} on {client_span:?}"
        );
    }
    assert_eq!(
        client_span.attr("http.response.status_code").as_deref(),
        Some("200")
    );
    // The HTTP client-span conventions' method and full URL, as the upstream got them.
    assert_eq!(
        client_span.attr("http.request.method").as_deref(),
        Some("GET")
    );
    assert_eq!(
        client_span.attr("url.full"),
        Some(format!("http://{}/api/items?x=1", backend.addr))
    );

    // No traceparent: weir starts the trace and passes it on.
    let r = get(&client, s.listen, "/api/new").await;
    let started = r.json()["headers"]["traceparent"]
        .as_str()
        .expect("traceparent started by weir")
        .split('-')
        .nth(1)
        .unwrap()
        .to_string();
    let spans = spans_of(&receiver, &started, 2).await;
    let root = spans.iter().find(|s| kind(s) == SERVER).unwrap();
    assert!(root.span.parent_span_id.is_empty(), "a root span");

    // An IPv6 Host: the address without its port and brackets.
    let v6 = "55555555555555555555555555555555";
    let r = send(
        &client,
        s.listen,
        "GET",
        "/api/v6",
        &[("traceparent", &parent_in(v6)), ("host", "[::1]:8080")],
    )
    .await;
    assert_eq!(r.status, 200);
    let spans = spans_of(&receiver, v6, 2).await;
    let server = spans.iter().find(|s| kind(s) == SERVER).unwrap();
    assert_eq!(server.attr("server.address").as_deref(), Some("::1"));

    // A rewritten path: the client span's URL is the one sent upstream.
    let rewritten = "efefefefefefefefefefefefefefefef";
    let r = send(
        &client,
        s.listen,
        "GET",
        "/old/x?q=1",
        &[("traceparent", &parent_in(rewritten))],
    )
    .await;
    assert_eq!(r.status, 200);
    let spans = spans_of(&receiver, rewritten, 2).await;
    let attempt = spans.iter().find(|s| kind(s) == CLIENT).unwrap();
    assert_eq!(
        attempt.attr("url.full"),
        Some(format!("http://{}/new/x?q=1", backend.addr))
    );

    // An HTTP/1.0 request is reported as 1.0.
    let answer = crate::raw_exchange(
        s.listen,
        "GET /api/v10 HTTP/1.0\r\nHost: x\r\ntraceparent: 00-77777777777777777777777777777777-8888888888888888-01\r\n\r\n",
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200"),
        "{answer}"
    );
    let spans = spans_of(&receiver, "77777777777777777777777777777777", 2).await;
    let server = spans.iter().find(|s| kind(s) == SERVER).unwrap();
    assert_eq!(
        server.attr("network.protocol.version").as_deref(),
        Some("1.0")
    );

    // Retries: one client span per attempt, all under the request's span, which failed.
    let flaky_parent = "00-11111111111111111111111111111111-2222222222222222-01";
    let r = send(
        &client,
        s.listen,
        "GET",
        "/flaky",
        &[("traceparent", flaky_parent)],
    )
    .await;
    assert!(r.status >= 500, "{}", r.status);
    let spans = spans_of(&receiver, "11111111111111111111111111111111", 4).await;
    let server = spans.iter().find(|s| kind(s) == SERVER).unwrap();
    let attempts: Vec<&Received> = spans.iter().filter(|s| kind(s) == CLIENT).collect();
    assert_eq!(attempts.len(), 3, "first try and two retries: {spans:#?}");
    assert!(attempts.iter().all(|a| a.parent_id() == server.span_id()));
    assert_eq!(
        attempts
            .iter()
            .filter_map(|a| a.attr("http.request.resend_count"))
            .collect::<Vec<_>>(),
        vec!["1".to_string(), "2".to_string()]
    );
    let error = 2; // STATUS_CODE_ERROR
    assert_eq!(server.span.status.as_ref().map(|s| s.code), Some(error));

    // gRPC: the RPC attributes.
    let mut g = crate::grpc::client(s.listen).await;
    g.unary(traced_msg("hi", "33333333333333333333333333333333"))
        .await
        .expect("unary");
    let spans = spans_of(&receiver, "33333333333333333333333333333333", 2).await;
    let server = spans.iter().find(|s| kind(s) == SERVER).unwrap();
    assert_eq!(server.span.name, "weir.test.Echo/Unary");
    for (k, v) in [
        ("rpc.system", "grpc"),
        ("rpc.service", "weir.test.Echo"),
        ("rpc.method", "Unary"),
        ("rpc.grpc.status_code", "0"),
        ("network.protocol.version", "2"),
    ] {
        assert_eq!(server.attr(k).as_deref(), Some(v), "{k} on {server:?}");
    }

    // A call weir answers itself (its upstream refuses connections): the status the client
    // got, UNAVAILABLE, not the 0 of a call without trailers from upstream.
    let mut req = traced_msg("hi", "99999999999999999999999999999999");
    req.metadata_mut().insert("x-to", "dead".parse().unwrap());
    let e = g.unary(req).await.expect_err("no upstream");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    let spans = spans_of(&receiver, "99999999999999999999999999999999", 2).await;
    let server = spans.iter().find(|s| kind(s) == SERVER).unwrap();
    assert_eq!(server.attr("rpc.grpc.status_code").as_deref(), Some("14"));

    // A server's error status fails the span; a caller's (NOT_FOUND) does not (OpenTelemetry's
    // RPC conventions for server spans).
    for (trace, text, code, failed) in [
        ("abababababababababababababababab", "fail:13", "13", true),
        ("cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd", "fail:5", "5", false),
    ] {
        g.unary(traced_msg(text, trace))
            .await
            .expect_err("asked to fail");
        let spans = spans_of(&receiver, trace, 2).await;
        let server = spans.iter().find(|s| kind(s) == SERVER).unwrap();
        assert_eq!(server.attr("rpc.grpc.status_code").as_deref(), Some(code));
        let status = server.span.status.as_ref().map_or(0, |s| s.code);
        assert_eq!(status == 2, failed, "{text}: {server:?}");
    }

    let (_, metrics) = admin_get(s.weir.admin, "/stats/prometheus").unwrap();
    assert!(
        metrics.contains("weir_trace_spans_dropped_total 0"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("weir_trace_spans_exported_total 0\n"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unsampled_requests_export_nothing_but_still_propagate() {
    let (receiver, otlp) = OtlpReceiver::start().await;
    let backend = HttpBackend::start("b").await;
    let s = start(&format!(
        "tracing: {{ otlp_endpoint: \"http://{otlp}\", sampling: 0.0 }}\nroutes:\n  - name: api\n    route: {{ cluster: b }}\nclusters:\n{}",
        cluster("b", "http1", &[backend.addr], "")
    ));
    let client = h1_client();
    for _ in 0..5 {
        let r = get(&client, s.listen, "/x").await;
        let tp = r.json()["headers"]["traceparent"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            tp.ends_with("-00"),
            "not sampled, still a trace context: {tp}"
        );
    }
    // A caller that sampled wins over the ratio.
    let parent = "00-55555555555555555555555555555555-6666666666666666-01";
    get_with(&client, s.listen, "/x", &[("traceparent", parent)]).await;
    let spans = spans_of(&receiver, "55555555555555555555555555555555", 2).await;
    assert_eq!(spans.len(), 2);
    assert_eq!(
        receiver.spans().len(),
        2,
        "only the caller-sampled request was recorded"
    );
}

async fn get_with(
    client: &HttpClient,
    listen: std::net::SocketAddr,
    path: &str,
    h: &[(&str, &str)],
) {
    assert_eq!(send(client, listen, "GET", path, h).await.status, 200);
}

/// An inference request's server span carries the GenAI attributes: the model, the time to
/// first token, and the tokens in and out that the server's `usage` reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inference_spans_carry_the_genai_attributes() {
    use http_body_util::{BodyExt, Full};
    let (receiver, otlp) = OtlpReceiver::start().await;
    let sim = weir_integration::model_server::ModelServer::start(&["llama"]).await;
    let s = start(&format!(
        "tracing: {{ otlp_endpoint: \"http://{otlp}\", sampling: 1.0 }}\nroutes:\n  - name: ai\n    route: {{ pool: llm }}\ninference_pools:\n  - name: llm\n    protocol: openai\n    endpoints:\n      - {{ address: \"{}\", models: [{{ name: llama }}] }}\n",
        sim.http_addr
    ));
    let ask = serde_json::json!({"model": "llama", "prompt": "one two three", "max_tokens": 4,
        "stream": true, "stream_options": {"include_usage": true}});
    let req = ::http::Request::builder()
        .method("POST")
        .uri(format!("http://{}/v1/completions", s.listen))
        .header("content-type", "application/json")
        .header("traceparent", format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01"))
        .body(Full::new(bytes::Bytes::from(ask.to_string())))
        .unwrap();
    let resp = h1_client().request(req).await.expect("response");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(body.ends_with(b"data: [DONE]\n\n"), "{body:?}");
    let spans = spans_of(&receiver, CALLER_TRACE, 2).await;
    let server = spans
        .iter()
        .find(|s| kind(s) == SERVER)
        .expect("server span");
    assert_eq!(
        server.attr("gen_ai.request.model").as_deref(),
        Some("llama")
    );
    assert_eq!(
        server.attr("gen_ai.usage.input_tokens").as_deref(),
        Some("3")
    );
    assert_eq!(
        server.attr("gen_ai.usage.output_tokens").as_deref(),
        Some("4")
    );
    let ttft: f64 = server
        .attr("gen_ai.server.time_to_first_token")
        .expect("time to first token")
        .parse()
        .unwrap();
    assert!(ttft > 0.0 && ttft < 10.0, "{ttft}");
}
