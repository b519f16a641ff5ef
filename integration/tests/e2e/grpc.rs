//! gRPC through weir with a real tonic client and server: all four RPC kinds, message by
//! message, with trailers, deadlines and weir's own gRPC errors.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Code;
use weir_integration::grpc_backend::{GrpcBackend, MAX_MESSAGE};
use weir_integration::pb::echo_client::EchoClient;
use weir_integration::pb::{Msg, StreamRequest};

use crate::*;

pub async fn client(listen: SocketAddr) -> EchoClient<Channel> {
    let channel = Channel::from_shared(format!("http://{listen}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to weir");
    EchoClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

pub fn msg(text: &str, n: i64) -> Msg {
    Msg {
        text: text.to_string(),
        n,
        payload: Vec::new(),
    }
}

const WITHIN: Duration = Duration::from_secs(5);

fn grpc_setup(backend: &GrpcBackend, route_extra: &str) -> Setup {
    start(&format!(
        "routes:\n  - name: echo\n    match: {{ grpc: {{ service: weir.test.Echo }} }}\n    route:\n      cluster: echo\n{route_extra}clusters:\n{}",
        cluster("echo", "h2c", &[backend.addr], "")
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unary_and_client_streaming_pass_through() {
    let backend = GrpcBackend::start("g").await;
    let s = grpc_setup(&backend, "");
    let mut c = client(s.listen).await;

    let r = c.unary(msg("hi", 7)).await.expect("unary");
    assert_eq!(r.get_ref().text, "g:hi");
    assert_eq!(r.get_ref().n, 7);

    // Client streaming, incrementally: the server has message k before the client sends k+1.
    let (tx, rx) = mpsc::channel(1);
    let call = tokio::spawn({
        let mut c = c.clone();
        async move { c.client_stream(ReceiverStream::new(rx)).await }
    });
    for i in 1..=3 {
        tx.send(msg("part", i)).await.unwrap();
        let deadline = tokio::time::Instant::now() + WITHIN;
        while backend.state.received.load(Ordering::SeqCst) < i as u64 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "server never got message {i}: request stream buffered"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    drop(tx);
    let r = call.await.unwrap().expect("client stream");
    assert_eq!(r.get_ref().n, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_streaming_is_incremental_and_trailers_arrive() {
    let backend = GrpcBackend::start("g").await;
    let s = grpc_setup(&backend, "");
    let mut c = client(s.listen).await;

    let req = StreamRequest {
        count: 3,
        gated: true,
        final_code: 0,
    };
    let mut stream = c.server_stream(req).await.expect("call").into_inner();
    for i in 0..3 {
        let m = tokio::time::timeout(WITHIN, stream.message())
            .await
            .unwrap_or_else(|_| panic!("message {i} not delivered: response stream buffered"))
            .expect("message")
            .expect("not end");
        assert_eq!(m.n, i);
        backend.state.gate.add_permits(1);
    }
    assert!(stream.message().await.expect("OK status").is_none());

    // A stream ending in an error: the status, message and custom trailer all come through.
    let req = StreamRequest {
        count: 2,
        gated: false,
        final_code: Code::Aborted as i32,
    };
    let mut stream = c.server_stream(req).await.expect("call").into_inner();
    assert_eq!(stream.message().await.unwrap().unwrap().n, 0);
    assert_eq!(stream.message().await.unwrap().unwrap().n, 1);
    let status = stream
        .message()
        .await
        .expect_err("error status in trailers");
    assert_eq!(status.code(), Code::Aborted);
    assert_eq!(status.message(), "stream ended by request");
    assert_eq!(
        status.metadata().get("x-custom-trailer").unwrap(),
        "trailer-value"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bidi_ping_pong_with_half_close() {
    let backend = GrpcBackend::start("g").await;
    let s = grpc_setup(&backend, "");
    let mut c = client(s.listen).await;
    let (tx, rx) = mpsc::channel(1);
    tx.send(msg("ping0", 0)).await.unwrap();
    let mut replies = c
        .bidi(ReceiverStream::new(rx))
        .await
        .expect("bidi")
        .into_inner();
    for i in 0..5 {
        let m = tokio::time::timeout(WITHIN, replies.message())
            .await
            .expect("reply before the next ping: bidi stream buffered")
            .unwrap()
            .unwrap();
        assert_eq!(m.text, format!("g:ping{i}"));
        if i < 4 {
            tx.send(msg(&format!("ping{}", i + 1), i + 1))
                .await
                .unwrap();
        }
    }
    drop(tx); // half-close: the server answers with a summary, then OK trailers
    let done = replies.message().await.unwrap().unwrap();
    assert_eq!((done.text.as_str(), done.n), ("g:done", 5));
    assert!(replies.message().await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn errors_deadlines_and_trailers_only_responses() {
    let backend = GrpcBackend::start("g").await;
    let dead = weir_integration::weir_process::free_port();
    // An upstream that ignores grpc-timeout (tonic servers enforce it themselves).
    let deaf = weir_integration::http_backend::HttpBackend::start("deaf").await;
    deaf.delay_all(2000);
    let rest = format!(
        "routes:\n  - name: deaf\n    match: {{ headers: [{{ name: x-target, exact: deaf }}] }}\n    route: {{ cluster: deaf }}\n  - name: echo\n    match: {{ grpc: {{ service: weir.test.Echo, method: Unary }} }}\n    route: {{ cluster: echo }}\n  - name: dead\n    match: {{ grpc: {{ service: weir.test.Echo }} }}\n    route: {{ cluster: dead }}\nclusters:\n{}{}",
        cluster("echo", "h2c", &[backend.addr], ""),
        cluster("dead", "h2c", &[format!("127.0.0.1:{dead}").parse().unwrap()], "")
    ) + &cluster("deaf", "h2c", &[deaf.addr], "");
    let s = start(&rest.replace(
        "route: { cluster: echo }",
        "route: { cluster: echo, timeout: 500ms }",
    ));
    let mut c = client(s.listen).await;

    // The upstream's own error, trailers-only, with its metadata.
    let e = c
        .unary(msg("fail:7", 0))
        .await
        .expect_err("permission denied");
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(e.metadata().get("x-failure-detail").unwrap(), "asked-for");

    // The route's timeout: DEADLINE_EXCEEDED from weir, not a hang.
    backend.state.unary_delay_ms.store(2000, Ordering::SeqCst);
    let started = std::time::Instant::now();
    let e = c.unary(msg("slow", 0)).await.expect_err("deadline");
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(
        started.elapsed() < Duration::from_millis(1900),
        "cut at the route timeout"
    );

    // The client's own deadline (grpc-timeout) is enforced too, even when the upstream
    // ignores it. tonic clients time calls out themselves, so this one is made by hand to see
    // what weir puts on the wire.
    let started = std::time::Instant::now();
    let r = raw_unary(s.listen, &[("grpc-timeout", "200m"), ("x-target", "deaf")]).await;
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "cut at 200ms"
    );
    assert_eq!(r.status, 200, "gRPC errors are HTTP 200: {r:?}");
    assert_eq!(
        r.headers["grpc-status"], "4",
        "trailers-only DEADLINE_EXCEEDED: {r:?}"
    );
    assert_eq!(r.body, "");
    backend.state.unary_delay_ms.store(0, Ordering::SeqCst);

    // No upstream listening: UNAVAILABLE.
    let e = c
        .server_stream(StreamRequest {
            count: 1,
            gated: false,
            final_code: 0,
        })
        .await
        .expect_err("unavailable");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");

    // No route: UNIMPLEMENTED, still a proper gRPC response.
    let channel = Channel::from_shared(format!("http://{}", s.listen))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let e = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect_err("no route");
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_messages_and_many_concurrent_streams() {
    let backend = GrpcBackend::start("g").await;
    let s = grpc_setup(&backend, "");
    let c = client(s.listen).await;

    let payload: Vec<u8> = (0..16 << 20).map(|i| (i % 251) as u8).collect();
    let r = c
        .clone()
        .unary(Msg {
            text: "big".into(),
            n: 1,
            payload: payload.clone(),
        })
        .await
        .expect("16 MiB message");
    assert!(r.get_ref().payload == payload, "payload intact");

    // 200 server streams at once, multiplexed on the client's one connection.
    let calls_before = backend.state.calls.load(Ordering::SeqCst);
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let req = StreamRequest {
                count: 5,
                gated: false,
                final_code: 0,
            };
            let mut s = c.server_stream(req).await?.into_inner();
            let mut n = 0;
            while s.message().await?.is_some() {
                n += 1;
            }
            Ok::<_, tonic::Status>(n)
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().expect("stream ok"), 5);
    }
    assert_eq!(
        backend.state.calls.load(Ordering::SeqCst) - calls_before,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_status_retries_go_to_another_endpoint() {
    let bad = GrpcBackend::start("bad").await;
    let good = GrpcBackend::start("good").await;
    bad.state
        .unary_fail_code
        .store(Code::Unavailable as i32, Ordering::SeqCst);
    let s = start(&format!(
        "routes:\n  - name: echo\n    match: {{ grpc: {{ service: weir.test.Echo }} }}\n    route:\n      cluster: echo\n      retry: {{ retries: 2, retry_on: [unavailable] }}\nclusters:\n{}",
        cluster("echo", "h2c", &[bad.addr, good.addr], "")
    ));
    let mut c = client(s.listen).await;
    for i in 0..10 {
        let r = c
            .unary(msg("x", i))
            .await
            .expect("retried to the good endpoint");
        assert_eq!(r.get_ref().text, "good:x");
    }
    assert!(
        bad.state.calls.load(Ordering::SeqCst) > 0,
        "round robin tried the bad endpoint"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_health_check_ejects_not_serving_endpoint() {
    let a = GrpcBackend::start("a").await;
    let b = GrpcBackend::start("b").await;
    let hc = "    health_check: { interval: 100ms, timeout: 500ms, unhealthy_threshold: 1, healthy_threshold: 1, grpc: { service: weir.test.Echo } }\n";
    let s = start(&format!(
        "routes:\n  - name: echo\n    route: {{ cluster: echo }}\nclusters:\n{}",
        cluster("echo", "h2c", &[a.addr, b.addr], hc)
    ));
    a.health
        .set_not_serving::<weir_integration::pb::echo_server::EchoServer<weir_integration::grpc_backend::EchoService>>()
        .await;
    wait_until(|| {
        let j = clusters_json(&s.weir);
        j["clusters"][0]["endpoints"][0]["healthy"] == false
    })
    .await;
    let mut c = client(s.listen).await;
    let before = a.state.calls.load(Ordering::SeqCst);
    for i in 0..10 {
        assert_eq!(c.unary(msg("x", i)).await.unwrap().get_ref().text, "b:x");
    }
    assert_eq!(a.state.calls.load(Ordering::SeqCst), before);
    a.health
        .set_serving::<weir_integration::pb::echo_server::EchoServer<weir_integration::grpc_backend::EchoService>>()
        .await;
    wait_until(|| clusters_json(&s.weir)["clusters"][0]["endpoints"][0]["healthy"] == true).await;
}

/// A unary `weir.test.Echo/Unary` call made by hand over h2c, with extra headers.
async fn raw_unary(listen: SocketAddr, headers: &[(&str, &str)]) -> Reply {
    use prost::Message;
    let mut body = vec![0u8];
    let encoded = msg("raw", 0).encode_to_vec();
    body.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
    body.extend_from_slice(&encoded);
    let mut req = ::http::Request::post(format!("http://{listen}/weir.test.Echo/Unary"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let resp = h2c_client().request(req).await.expect("response");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .expect("body")
        .to_bytes();
    Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// Polls `f` for up to 10 s.
pub async fn wait_until(mut f: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            tokio::time::Instant::now() < end,
            "condition not reached in 10s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
