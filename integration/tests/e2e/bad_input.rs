//! Malformed and hostile requests get a 4xx from weir and never reach the backend; a broken
//! upstream response gets a 5xx.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use weir_integration::http_backend::HttpBackend;

use crate::*;

/// Writes raw bytes and returns the status line weir answers with ("" if it just closed).
fn raw(listen: std::net::SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(listen).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(request);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    text.lines().next().unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_requests_get_400_and_never_reach_the_backend() {
    let backend = HttpBackend::start("b").await;
    let s = start(&format!(
        "routes:\n  - name: all\n    route: {{ cluster: b }}\nclusters:\n{}",
        cluster("b", "http1", &[backend.addr], "")
    ));
    let listen = s.listen;
    let ok = tokio::task::spawn_blocking(move || {
        raw(
            listen,
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
    })
    .await
    .unwrap();
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    // Shorter than the 24-byte h2c preface: must not wait for more bytes (pingora patch).
    let short = tokio::task::spawn_blocking(move || raw(listen, b"GET / HTTP/1.0\r\n\r\n"))
        .await
        .unwrap();
    assert!(
        short.starts_with("HTTP/1.1 200") || short.starts_with("HTTP/1.0 200"),
        "{short:?}"
    );
    assert_eq!(backend.requests(), 2);

    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "CL + TE smuggling",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
        ),
        ("garbage request line", b"HELLO?\r\n\r\n".to_vec()),
        ("space in header name", b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n".to_vec()),
        (
            "invalid content-length",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n".to_vec(),
        ),
        (
            "HTTP/1.1 without Host",
            b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(),
        ),
        (
            "target that is not a path (routed as /, forwarded as sent)",
            b"GET admin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
        ),
        (
            "oversize headers",
            [
                b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec(),
                vec![b'a'; 2 << 20],
                b"\r\n\r\n".to_vec(),
            ]
            .concat(),
        ),
    ];
    for (name, bytes) in cases {
        let line = tokio::task::spawn_blocking(move || raw(listen, &bytes))
            .await
            .unwrap();
        let status: u16 = line.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
        assert!(
            (400..500).contains(&status),
            "{name}: expected a 4xx, got {line:?}"
        );
    }
    // A transfer coding weir does not forward (pingora would re-frame the body as chunked and
    // drop `gzip`, handing the backend coded bytes as plain ones): 501, as Envoy.
    let gzip = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let line = tokio::task::spawn_blocking(move || raw(listen, gzip))
        .await
        .unwrap();
    assert!(line.starts_with("HTTP/1.1 501"), "gzip, chunked: {line:?}");
    assert_eq!(backend.requests(), 2, "no bad request reached the backend");
}

/// A request head over the listener's `max_request_headers_kb` (60 KiB unless set) gets 431
/// and never reaches the backend; one under it is proxied.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_heads_over_the_listener_limit_get_431() {
    let backend = HttpBackend::start("b").await;
    let routes = format!(
        "routes:\n  - name: all\n    route: {{ cluster: b }}\nclusters:\n{}",
        cluster("b", "http1", &[backend.addr], "")
    );
    let with_header = |kib: usize| {
        [
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: ".to_vec(),
            vec![b'a'; kib * 1024],
            b"\r\n\r\n".to_vec(),
        ]
        .concat()
    };
    for (limit, under, over) in [("", 50, 70), ("    max_request_headers_kb: 8\n", 7, 9)] {
        let s = start(&format!("{limit}{routes}"));
        let listen = s.listen;
        let before = backend.requests();
        let (ok, big) = (with_header(under), with_header(over));
        let ok = tokio::task::spawn_blocking(move || raw(listen, &ok))
            .await
            .unwrap();
        assert!(
            ok.starts_with("HTTP/1.1 200"),
            "{limit:?} {under} KiB: {ok}"
        );
        let big = tokio::task::spawn_blocking(move || raw(listen, &big))
            .await
            .unwrap();
        assert!(
            big.starts_with("HTTP/1.1 431"),
            "{limit:?} {over} KiB: {big}"
        );
        assert_eq!(
            backend.requests(),
            before + 1,
            "{limit:?}: only the first passed"
        );
    }
}

/// A chunk-size line holding a lone LF or another control byte fails its request with 400.
/// httparse (under pingora) takes any byte in a chunk extension and ends the line at the next
/// CRLF, while many proxies end it at the LF: in front of weir, such a proxy and weir would
/// cut the body in different places, and the bytes one takes for body the other takes for a
/// request of its own (request smuggling, the "TERM.EXT" / "EXT.TERM" pairs). Extensions of
/// tokens, quoted strings and HTAB still pass, the body intact. (weir streams bodies, so the
/// request's head may have reached the backend already; its body then fails there, as with
/// any body cut short.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chunk_lines_with_control_bytes_get_400() {
    let backend = HttpBackend::start("b").await;
    let s = start(&format!(
        "routes:\n  - name: all\n    route: {{ cluster: b }}\nclusters:\n{}",
        cluster("b", "http1", &[backend.addr], "")
    ));
    let listen = s.listen;
    let head = "POST /echo-body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    let fine = format!("{head}3;name=\"v al\"\t;b\r\nabc\r\n0\r\n\r\n");
    let answer = raw_exchange(listen, fine).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.ends_with("\r\n\r\nabc"),
        "the body, intact: {answer:?}"
    );
    for (name, body) in [
        // Before the patch weir took the first `abc` into the line, the second as the data,
        // and answered 200; a proxy that ends the line at the LF takes the first as the data.
        (
            "lone LF in an extension",
            &b"3;x\nabc\r\nabc\r\n0\r\n\r\n"[..],
        ),
        ("lone LF in the last chunk's line", b"0;a\nb\r\n\r\n"),
        ("NUL in an extension", b"3;a\x00b\r\nabc\r\n0\r\n\r\n"),
        ("DEL in an extension", b"3;a\x7fb\r\nabc\r\n0\r\n\r\n"),
    ] {
        let request = [head.as_bytes(), body].concat();
        let line = tokio::task::spawn_blocking(move || raw(listen, &request))
            .await
            .unwrap();
        assert!(line.starts_with("HTTP/1.1 400"), "{name}: {line:?}");
    }
}

/// An HTTP/1.1 upstream whose response body is in a transfer coding other than `chunked`
/// (`gzip`, `gzip, chunked`) gets the client a 502, over HTTP/1.1 and h2c: weir frames a body
/// anew, and an h2 client would otherwise take the coded bytes for the content. `chunked`
/// alone (in any case) passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_transfer_codings_other_than_chunked_get_502() {
    // An upstream that answers by path, then closes.
    let up = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = up.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut c, _)) = up.accept().await {
            tokio::spawn(async move {
                let Some(head) = read_head(&mut c).await else {
                    return;
                };
                let path = head.split(|b| *b == b' ').nth(1).unwrap_or_default();
                let (coding, body): (&str, &[u8]) = match path {
                    b"/gzip" => ("gzip", b"abc"),
                    b"/gzip-chunked" => ("gzip, chunked", b"3\r\nabc\r\n0\r\n\r\n"),
                    _ => ("Chunked", b"3\r\nabc\r\n0\r\n\r\n"),
                };
                let reply = format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: {coding}\r\n\r\n");
                let _ = c.write_all(&[reply.as_bytes(), body].concat()).await;
            });
        }
    });
    let s = start(&format!(
        "routes:\n  - name: all\n    route: {{ cluster: up }}\nclusters:\n{}",
        cluster("up", "http1", &[up_addr], "")
    ));
    let (h1, h2) = (h1_client(), h2c_client());
    for path in ["/gzip", "/gzip-chunked", "/chunked"] {
        let want = if path == "/chunked" { 200 } else { 502 };
        for (client, name) in [(&h1, "HTTP/1.1"), (&h2, "h2c")] {
            let reply = get(client, s.listen, path).await;
            assert_eq!(reply.status, want, "{path} over {name}: {}", reply.body);
            if want == 200 {
                assert_eq!(reply.body, "abc", "{path} over {name}");
            }
        }
    }
}

/// The admin endpoint answers reads to GET and HEAD and its action to POST; any other method
/// gets 405 with `Allow`, not a read served to a mistaken DELETE.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_methods_other_than_the_endpoints_take_get_405() {
    let s = start("");
    let admin = s.weir.admin;
    let answers = tokio::task::spawn_blocking(move || {
        let ask = |method: &str, path: &str| {
            let mut c = TcpStream::connect(admin).expect("connect");
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            write!(
                c,
                "{method} {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let mut out = String::new();
            let _ = c.read_to_string(&mut out);
            out
        };
        [
            ask("GET", "/clusters"),
            ask("HEAD", "/clusters"),
            ask("DELETE", "/clusters"),
            ask("POST", "/config_dump"),
            ask("GET", "/inference/reload"),
        ]
    })
    .await
    .unwrap();
    let status = |a: &str| a.get(9..12).unwrap_or("").to_string();
    assert_eq!(status(&answers[0]), "200", "{}", answers[0]);
    assert_eq!(status(&answers[1]), "200", "{}", answers[1]);
    assert!(
        answers[1].ends_with("\r\n\r\n"),
        "HEAD has no body: {}",
        answers[1]
    );
    for (a, allow) in [
        (&answers[2], "GET, HEAD"),
        (&answers[3], "GET, HEAD"),
        (&answers[4], "POST"),
    ] {
        assert_eq!(status(a), "405", "{a}");
        assert!(
            a.to_ascii_lowercase()
                .contains(&format!("allow: {}", allow.to_ascii_lowercase())),
            "{a}"
        );
    }
}

/// What a raw upstream reads of a request: up to the end of its head (and whatever came with
/// it); `None` if the connection ends first.
async fn read_head(c: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match c.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    Some(head)
}

/// Reads until the peer closes (`Ok(0)` or a reset) and returns how long that took from
/// `since`, or `None` if it stayed open for `limit`. Bytes weir sends before closing (h2
/// SETTINGS, a response) are read and dropped.
fn closed_within(s: &mut TcpStream, since: Instant, limit: Duration) -> Option<Duration> {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 4096];
    while since.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return Some(since.elapsed()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return Some(since.elapsed()),
        }
    }
    None
}

/// A listener's `idle_timeout` closes connections with no request in progress (a new silent
/// one, HTTP/1.1 kept alive, h2c with no stream), a WebSocket whose client is quiet, and a
/// response its client does not read;
/// `request_headers_timeout` closes a connection whose head trickles in (slowloris), and that
/// request never reaches the backend. A request slower than both is not cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_and_slow_clients_are_closed_by_the_listener_timeouts() {
    let backend = HttpBackend::start("b").await;
    // An upstream that accepts a WebSocket upgrade and echoes what follows.
    let ws = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ws_addr = ws.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut c, _)) = ws.accept().await {
            tokio::spawn(async move {
                if read_head(&mut c).await.is_none() {
                    return;
                }
                let reply = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
                if c.write_all(reply).await.is_err() {
                    return;
                }
                let mut buf = [0u8; 4096];
                while let Ok(n) = c.read(&mut buf).await {
                    if n == 0 || c.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let s = start(&format!(
        "    idle_timeout: 1s\n    request_headers_timeout: 2s\nroutes:\n  - name: ws\n    match: {{ path: {{ prefix: /ws }} }}\n    route: {{ cluster: ws }}\n  - name: all\n    route: {{ cluster: b }}\nclusters:\n{}{}",
        cluster("b", "http1", &[backend.addr], ""),
        cluster("ws", "http1", &[ws_addr], "")
    ));
    let listen = s.listen;
    let limit = Duration::from_secs(10);
    let results = tokio::task::spawn_blocking(move || {
        std::thread::scope(|scope| {
            let silent = scope.spawn(|| {
                let mut c = TcpStream::connect(listen).unwrap();
                closed_within(&mut c, Instant::now(), limit)
            });
            let kept_alive = scope.spawn(|| {
                let mut c = TcpStream::connect(listen).unwrap();
                c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
                let mut buf = [0u8; 4096];
                let n = c.read(&mut buf).unwrap();
                let answer = String::from_utf8_lossy(&buf[..n]).to_string();
                assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
                closed_within(&mut c, Instant::now(), limit)
            });
            let h2c = scope.spawn(|| {
                let mut c = TcpStream::connect(listen).unwrap();
                // The preface and an empty SETTINGS frame: an HTTP/2 connection, no stream.
                c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
                    .unwrap();
                closed_within(&mut c, Instant::now(), limit)
            });
            let slowloris = scope.spawn(|| {
                let mut c = TcpStream::connect(listen).unwrap();
                let start = Instant::now();
                c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
                // A header line every 300 ms: never idle for 1 s, never done.
                for i in 0.. {
                    if let Some(t) = closed_within(&mut c, start, start.elapsed() + Duration::from_millis(300)) {
                        return Some(t);
                    }
                    if start.elapsed() > limit || c.write_all(format!("X-{i}: 1\r\n").as_bytes()).is_err() {
                        return closed_within(&mut c, start, limit);
                    }
                }
                None
            });
            let websocket = scope.spawn(|| {
                let mut c = TcpStream::connect(listen).unwrap();
                c.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
                    .unwrap();
                c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut buf = [0u8; 4096];
                let n = c.read(&mut buf).unwrap();
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                assert!(head.starts_with("HTTP/1.1 101"), "{head}");
                // Quiet for less than the idle timeout: still open and echoing.
                std::thread::sleep(Duration::from_millis(400));
                c.write_all(b"ping").unwrap();
                let n = c.read(&mut buf).unwrap();
                assert_eq!(&buf[..n], b"ping");
                closed_within(&mut c, Instant::now(), limit)
            });
            let stalled_reader = scope.spawn(|| {
                // 32 MiB echoed back to a client that reads nothing for 4 s: weir's write waits
                // on it at most the idle timeout, then the connection closes and what was
                // already in the socket buffers is all the client gets.
                let mut c = TcpStream::connect(listen).unwrap();
                c.set_write_timeout(Some(limit)).unwrap();
                let body = vec![b'x'; ECHOED];
                let head = format!(
                    "POST /echo-body HTTP/1.1\r\nHost: x\r\nContent-Length: {ECHOED}\r\n\r\n"
                );
                c.write_all(head.as_bytes()).unwrap();
                let _ = c.write_all(&body);
                std::thread::sleep(Duration::from_secs(4));
                c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let (mut got, mut buf) = (0, vec![0u8; 1 << 16]);
                while let Ok(n @ 1..) = c.read(&mut buf) {
                    got += n;
                }
                got
            });
            let slow_answer = scope.spawn(|| {
                // The backend takes 2.5 s, longer than both timeouts: a request in progress.
                let mut c = TcpStream::connect(listen).unwrap();
                c.set_read_timeout(Some(limit)).unwrap();
                c.write_all(b"GET /delay/2500 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .unwrap();
                let mut out = Vec::new();
                let _ = c.read_to_end(&mut out);
                String::from_utf8_lossy(&out).lines().next().unwrap_or("").to_string()
            });
            let closed = [
                ("silent new connection", silent.join().unwrap(), 0.9),
                ("HTTP/1.1 kept alive", kept_alive.join().unwrap(), 0.9),
                ("h2c with no stream", h2c.join().unwrap(), 0.9),
                ("request head trickling in", slowloris.join().unwrap(), 1.9),
                ("quiet WebSocket client", websocket.join().unwrap(), 0.9),
            ];
            (
                closed,
                stalled_reader.join().unwrap(),
                slow_answer.join().unwrap(),
            )
        })
    })
    .await
    .unwrap();
    let (closed, stalled_got, slow_answer) = results;
    if std::env::var_os(crate::sockmap::SUITES_ENV).is_some() {
        // With the sockmap fast path, weir's writes go straight into the client socket's
        // receive queue (sk_msg redirect to ingress) and do not wait on a client that reads
        // nothing, so there is no stalled write to time out.
        eprintln!(
            "fast path on: the stalled reader got {stalled_got} of {ECHOED} bytes; \
             not checked (redirected writes do not wait on the reader)"
        );
    } else {
        assert!(
            stalled_got < ECHOED,
            "a client reading nothing for 4 s still got the whole {ECHOED}-byte answer"
        );
    }
    for (what, after, at_least) in closed {
        let after = after.unwrap_or_else(|| panic!("{what}: still open after {limit:?}"));
        assert!(
            after.as_secs_f64() >= at_least,
            "{what}: closed after {after:?}, before its timeout"
        );
    }
    assert!(slow_answer.starts_with("HTTP/1.1 200"), "{slow_answer:?}");
    assert_eq!(
        backend.requests(),
        3,
        "the kept-alive GET, the echo and the slow one; not the trickled head"
    );
}

/// The body the stalled reader of `idle_and_slow_clients_are_closed_by_the_listener_timeouts`
/// has echoed back.
const ECHOED: usize = 32 << 20;
