//! HTTP/1.1 and h2c through weir: protocol crossing, route features, streaming, balancing.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use weir_integration::http_backend::HttpBackend;

use crate::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h1_and_h2c_clients_reach_h1_and_h2c_upstreams() {
    let backend = HttpBackend::start("b").await;
    let rest = format!(
        "routes:\n  - name: to-h2c\n    match: {{ path: {{ prefix: /h2/ }} }}\n    route: {{ cluster: up-h2c }}\n  - name: to-h1\n    match: {{ path: {{ prefix: / }} }}\n    route: {{ cluster: up-h1 }}\nclusters:\n{}{}",
        cluster("up-h1", "http1", &[backend.addr], ""),
        cluster("up-h2c", "h2c", &[backend.addr], "")
    );
    let s = start(&rest);
    for (client, name) in [(h1_client(), "h1"), (h2c_client(), "h2c")] {
        let r = get(&client, s.listen, "/x?q=1").await;
        assert_eq!(r.status, 200, "{name}: {r:?}");
        assert_eq!(
            r.json()["version"],
            "HTTP/1.1",
            "{name} client to h1 upstream"
        );
        assert_eq!(r.json()["query"], "q=1");
        let r = get(&client, s.listen, "/h2/x").await;
        assert_eq!(r.status, 200, "{name}: {r:?}");
        assert_eq!(
            r.json()["version"],
            "HTTP/2.0",
            "{name} client to h2c upstream"
        );
    }
}

/// HTTP/1.1 pipelining (RFC 9112 9.3.2): requests written before any response, bodies of both
/// framings among them, are each proxied and answered in order on the one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipelined_requests_are_answered_in_order() {
    let backend = HttpBackend::start("b").await;
    let s = start(&format!(
        "routes:\n  - name: all\n    route: {{ cluster: b }}\nclusters:\n{}",
        cluster("b", "http1", &[backend.addr], "")
    ));
    let listen = s.listen;
    let out = raw_exchange(
        listen,
        &b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n\
           POST /echo-body HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
           POST /echo-body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
           3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n\
           GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"[..],
    )
    .await;
    assert_eq!(out.matches("HTTP/1.1 200").count(), 4, "{out}");
    let at = |needle: &str| {
        out.find(needle)
            .unwrap_or_else(|| panic!("{needle:?} missing from {out}"))
    };
    let order = [
        at("\"path\":\"/first\""),
        at("\r\n\r\nhello"),
        at("\r\n\r\nabcde"),
        at("\"path\":\"/last\""),
    ];
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "order {order:?}: {out}"
    );
    assert_eq!(backend.requests(), 4);
}

/// Response trailers of an HTTP/1.1 upstream (a chunked body's trailer section) reach the
/// client: an HTTP/1.1 client in the last chunk, an h2c client as a trailing HEADERS frame.
/// An upstream body without trailers still ends with a bare last chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http1_upstream_trailers_reach_h1_and_h2c_clients() {
    let backend = HttpBackend::start("b").await;
    let s = start(&format!(
        "routes:\n  - name: all\n    route: {{ cluster: b }}\nclusters:\n{}",
        cluster("b", "http1", &[backend.addr], "")
    ));
    let listen = s.listen;
    let raw = |path: &str| {
        raw_exchange(
            listen,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nTE: trailers\r\nConnection: close\r\n\r\n"),
        )
    };
    let out = raw("/trailers").await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(
        out.ends_with("\r\n5\r\nhello\r\n0\r\nx-checksum: abc123\r\nx-count: 2\r\n\r\n"),
        "{out:?}"
    );
    let out = raw("/gated-chunks/1").await;
    assert!(out.contains("transfer-encoding: chunked\r\n"), "{out:?}");
    assert!(out.ends_with("\r\n7\r\nchunk0;\r\n0\r\n\r\n"), "{out:?}");

    let req = ::http::Request::builder()
        .uri(format!("http://{listen}/trailers"))
        .header("te", "trailers")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = h2c_client().request(req).await.expect("h2c request");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("body");
    let trailers = body.trailers().cloned().expect("trailers over h2c");
    assert_eq!(trailers["x-checksum"], "abc123");
    assert_eq!(trailers["x-count"], "2");
    assert_eq!(body.to_bytes(), "hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_trailers_reach_http1_and_h2c_upstreams() {
    let backend = HttpBackend::start("b").await;
    let s = start(&format!(
        "routes:\n  - name: h2\n    match: {{ path: {{ prefix: /h2/ }} }}\n    route: {{ cluster: h2, prefix_rewrite: / }}\n  - name: all\n    route: {{ cluster: h1 }}\nclusters:\n{}{}",
        cluster("h1", "http1", &[backend.addr], ""),
        cluster("h2", "h2c", &[backend.addr], "")
    ));
    let listen = s.listen;
    // An HTTP/1.1 client's chunked body with a trailer section.
    for path in ["/echo-trailers", "/h2/echo-trailers"] {
        let out = raw_exchange(
            listen,
            format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTrailer: x-checksum, x-count\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: abc123\r\nx-count: 2\r\n\r\n"
            ),
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 200"), "{path}: {out}");
        assert!(
            out.ends_with("11 x-checksum=abc123 x-count=2"),
            "{path}: {out:?}"
        );
        assert!(
            out.contains("x-declared: x-checksum, x-count\r\n"),
            "{path}: {out:?}"
        );
    }
    // An h2c client's body ending with a trailing HEADERS frame. (Through the h2 route's
    // prefix rewrite too, which once dropped an h2 request's authority: 500.)
    for path in ["/echo-trailers", "/h2/echo-trailers"] {
        let frames: Vec<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>> = vec![
            Ok(hyper::body::Frame::data(Bytes::from_static(b"hello"))),
            Ok(hyper::body::Frame::trailers({
                let mut t = ::http::HeaderMap::new();
                t.insert("x-checksum", "abc123".parse().unwrap());
                t
            })),
        ];
        let req = ::http::Request::builder()
            .method("POST")
            .uri(format!("http://{listen}{path}"))
            .body(http_body_util::StreamBody::new(futures_util::stream::iter(
                frames,
            )))
            .unwrap();
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .http2_only(true)
                .build_http();
        let resp = client.request(req).await.expect("h2c request");
        assert_eq!(resp.status(), 200, "{path}");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "5 x-checksum=abc123", "{path}");
    }
    // No trailers: nothing invented.
    let r = send(&h1_client(), listen, "POST", "/echo-trailers", &[]).await;
    assert_eq!(r.body, "0 ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn routes_match_rewrite_and_edit_headers() {
    let a = HttpBackend::start("a").await;
    let b = HttpBackend::start("b").await;
    let rest = format!(
        r#"routes:
  - name: canary
    match:
      path: {{ prefix: /api/ }}
      headers: [{{ name: x-canary, exact: "1" }}]
    route: {{ cluster: b }}
  - name: api
    match:
      host: "*.example.com"
      path: {{ prefix: /api/ }}
    route:
      cluster: a
      prefix_rewrite: /v2/
      request_headers:
        add: [{{ name: x-weir-route, value: api }}]
        remove: [x-debug]
      response_headers:
        add: [{{ name: x-served-by, value: weir }}]
        remove: [x-backend]
  - name: items
    match: {{ path: {{ regex: "/items/[0-9]+" }} }}
    route: {{ cluster: b }}
clusters:
{}{}"#,
        cluster("a", "http1", &[a.addr], ""),
        cluster("b", "http1", &[b.addr], "")
    );
    let s = start(&rest);
    let c = h1_client();
    let r = send(
        &c,
        s.listen,
        "GET",
        "/api/users?id=7",
        &[("host", "shop.example.com"), ("x-debug", "1")],
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let j = r.json();
    assert_eq!(j["backend"], "a");
    assert_eq!(j["path"], "/v2/users");
    assert_eq!(j["query"], "id=7");
    assert_eq!(j["headers"]["x-weir-route"], "api");
    assert!(
        j["headers"].get("x-debug").is_none(),
        "x-debug removed: {j}"
    );
    assert_eq!(r.headers["x-served-by"], "weir");
    assert!(r.headers.get("x-backend").is_none());

    let r = send(
        &c,
        s.listen,
        "GET",
        "/api/users",
        &[("host", "shop.example.com"), ("x-canary", "1")],
    )
    .await;
    assert_eq!(r.json()["backend"], "b");
    assert_eq!(
        r.json()["path"],
        "/api/users",
        "canary route does not rewrite"
    );

    assert_eq!(get(&c, s.listen, "/items/42").await.json()["backend"], "b");
    let r = get(&c, s.listen, "/items/42/more").await;
    assert_eq!(r.status, 404, "anchored regex: {r:?}");
    let r = send(
        &c,
        s.listen,
        "GET",
        "/api/users",
        &[("host", "example.org")],
    )
    .await;
    assert_eq!(r.status, 404, "host mismatch: {r:?}");
    assert_eq!(r.body, "no route\n");
}

/// Reads one body frame with a deadline.
async fn next_chunk(body: &mut hyper::body::Incoming) -> String {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("a chunk within 5s: weir must not buffer the stream")
            .expect("more frames")
            .expect("frame");
        if let Ok(data) = frame.into_data() {
            if !data.is_empty() {
                return String::from_utf8_lossy(&data).into_owned();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn response_bodies_stream_chunk_by_chunk() {
    let backend = HttpBackend::start("s").await;
    let rest = format!(
        "routes:\n  - name: all\n    route: {{ cluster: s }}\nclusters:\n{}",
        cluster("s", "http1", &[backend.addr], "")
    );
    let s = start(&rest);
    for client in [h1_client(), h2c_client()] {
        let req = ::http::Request::get(format!("http://{}/gated-chunks/3", s.listen))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = client.request(req).await.expect("response");
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        // Each chunk after the first is sent only once the test has seen the previous one.
        assert_eq!(next_chunk(&mut body).await, "chunk0;");
        backend.open_gate();
        assert_eq!(next_chunk(&mut body).await, "chunk1;");
        backend.open_gate();
        assert_eq!(next_chunk(&mut body).await, "chunk2;");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn weighted_split_follows_weights() {
    let a = HttpBackend::start("a").await;
    let b = HttpBackend::start("b").await;
    let rest = format!(
        "routes:\n  - name: split\n    route:\n      weighted_clusters: [{{ cluster: a, weight: 80 }}, {{ cluster: b, weight: 20 }}]\nclusters:\n{}{}",
        cluster("a", "http1", &[a.addr], ""),
        cluster("b", "http1", &[b.addr], "")
    );
    let s = start(&rest);
    let c = h1_client();
    for _ in 0..1000 {
        assert_eq!(get(&c, s.listen, "/").await.status, 200);
    }
    // Binomial(1000, 0.8): sd ~12.6; +-6 sd keeps this from flaking.
    let got = a.requests();
    assert_eq!(got + b.requests(), 1000);
    assert!(
        (725..=875).contains(&got),
        "a got {got} of 1000, expected ~800"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn round_robin_and_ring_hash_spread_and_stick() {
    let backends = [
        HttpBackend::start("r0").await,
        HttpBackend::start("r1").await,
        HttpBackend::start("r2").await,
    ];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let rest = format!(
        "routes:\n  - name: sticky\n    match: {{ path: {{ prefix: /sticky }} }}\n    route: {{ cluster: ring }}\n  - name: rr\n    route: {{ cluster: rr }}\nclusters:\n{}{}",
        cluster("rr", "http1", &addrs, ""),
        cluster("ring", "http1", &addrs, "    lb: { ring_hash: { header: x-user } }\n")
    );
    let s = start(&rest);
    let c = h1_client();
    for _ in 0..30 {
        get(&c, s.listen, "/").await;
    }
    for b in &backends {
        assert_eq!(b.requests(), 10, "round robin is exact");
    }
    let mut owner: HashMap<String, String> = HashMap::new();
    for round in 0..3 {
        for user in 0..20 {
            let user = format!("user-{user}");
            let r = send(&c, s.listen, "GET", "/sticky", &[("x-user", &user)]).await;
            let got = r.backend();
            if round == 0 {
                owner.insert(user, got);
            } else {
                assert_eq!(owner[&user], got, "{user} moved");
            }
        }
    }
    let distinct: std::collections::HashSet<_> = owner.values().collect();
    assert!(
        distinct.len() >= 2,
        "20 users all on one backend: {owner:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn least_request_avoids_the_busy_endpoint() {
    let slow = HttpBackend::start("slow").await;
    let fast = HttpBackend::start("fast").await;
    let fast2 = HttpBackend::start("fast2").await;
    // Requests to `slow` hang for the whole test: its in-flight count only grows.
    slow.delay_all(120_000);
    let rest = format!(
        "routes:\n  - name: all\n    route: {{ cluster: lr }}\nclusters:\n{}",
        cluster(
            "lr",
            "http1",
            &[slow.addr, fast.addr, fast2.addr],
            "    lb: least_request\n"
        )
    );
    let s = start(&rest);
    let c = h1_client();
    // One request at a time, so the fast endpoints have nothing in flight when weir picks.
    // Returns the request's task when it went to `slow` (where it stays in flight).
    let send_one = || {
        let c = c.clone();
        let slow = slow.clone();
        let listen = s.listen;
        async move {
            let before = slow.requests();
            let mut answer = tokio::spawn(async move { get(&c, listen, "/").await });
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                tokio::select! {
                    r = &mut answer => {
                        let r = r.expect("request task");
                        assert_eq!(r.status, 200);
                        assert_ne!(r.backend(), "slow");
                        return None;
                    }
                    _ = tokio::time::sleep(Duration::from_millis(1)) => {
                        if slow.requests() > before {
                            return Some(answer);
                        }
                        assert!(tokio::time::Instant::now() < deadline, "request unanswered");
                    }
                }
            }
        }
    };
    // Round robin and random picks send a third of the requests to `slow`, however busy.
    // Warm up until `slow` holds 3 requests.
    let mut held = Vec::new();
    let mut warm_up = 0;
    while slow.requests() < 3 {
        held.extend(send_one().await);
        warm_up += 1;
        assert!(warm_up < 500, "slow got {} of {warm_up}", slow.requests());
    }
    // With `slow` at 3+ in flight and the others at 0 or 1, two random choices pick `slow`
    // only when both land on it: 1 in 9 (22 of 200 expected, standard deviation 4.4), where
    // round robin would give 67.
    let mut to_slow = 0;
    for _ in 0..200 {
        if let Some(task) = send_one().await {
            held.push(task);
            to_slow += 1;
        }
    }
    for task in held {
        task.abort();
    }
    assert!(to_slow <= 45, "busy endpoint got {to_slow} of 200");
    assert_eq!(
        to_slow + 3 + fast.requests() + fast2.requests(),
        200 + warm_up
    );
}

/// `Expect: 100-continue` (curl sends it with large bodies and waits up to a second for the
/// answer before sending them): weir answers `100 Continue` itself once it takes the request,
/// before the body; the upstream request goes without the header; the connection stays open
/// for the next request. A request weir refuses (no route) is answered without the body.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expect_100_continue_is_answered_before_the_body() {
    use std::io::{Read, Write};
    let backend = HttpBackend::start("b").await;
    let s = start(&format!(
        "routes:\n  - name: all\n    match: {{ path: {{ prefix: /in/ }} }}\n    route: {{ cluster: b }}\nclusters:\n{}",
        cluster("b", "http1", &[backend.addr], "")
    ));
    let listen = s.listen;
    tokio::task::spawn_blocking(move || {
        let mut c = std::net::TcpStream::connect(listen).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let read_some = |c: &mut std::net::TcpStream, until: &str| {
            let mut out = Vec::new();
            let mut buf = [0u8; 4096];
            while !String::from_utf8_lossy(&out).contains(until) {
                let n = c.read(&mut buf).unwrap_or_else(|e| {
                    panic!("{until:?} not read ({e}): {}", String::from_utf8_lossy(&out))
                });
                assert!(n > 0, "closed: {}", String::from_utf8_lossy(&out));
                out.extend_from_slice(&buf[..n]);
            }
            String::from_utf8_lossy(&out).into_owned()
        };
        c.write_all(
            b"POST /in/x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
        )
        .unwrap();
        // The body is not sent until the 100 arrives.
        let interim = read_some(&mut c, "\r\n\r\n");
        assert_eq!(interim, "HTTP/1.1 100 Continue\r\n\r\n");
        c.write_all(b"hello").unwrap();
        let reply = read_some(&mut c, "body_len");
        assert!(reply.starts_with("HTTP/1.1 200 "), "{reply}");
        assert!(!reply.contains("100-continue"), "the upstream saw no Expect: {reply}");
        assert!(!reply.to_ascii_lowercase().contains("connection: close"), "{reply}");
        // The connection goes on; a request weir refuses gets no 100 and no wait.
        c.write_all(
            b"POST /elsewhere HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
        )
        .unwrap();
        let refused = read_some(&mut c, "no route");
        assert!(refused.starts_with("HTTP/1.1 404 "), "{refused}");
    })
    .await
    .unwrap();
    // No 100 to an HTTP/1.0 client (RFC 9110 10.1.1): it sends its body at once anyway.
    let old = raw_exchange(
        listen,
        &b"POST /in/y HTTP/1.0
Host: x
Expect: 100-continue
Content-Length: 5

hello"[..],
    )
    .await;
    assert!(
        old.starts_with("HTTP/1.1 200 ") && !old.contains("100 Continue"),
        "{old}"
    );
    assert_eq!(backend.requests(), 2);
}
