//! Malformed and hostile requests get a 4xx from weir and never reach the backend.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

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
