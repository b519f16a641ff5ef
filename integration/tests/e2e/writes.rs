//! How many TCP segments weir sends for what it has at hand at once. An HTTP/1.1 response
//! that arrives whole (a short streamed answer: its header, a chunk, the last chunk) leaves
//! in one write, and so does a request whose body weir read before choosing the upstream
//! (an inference request): each extra write is a syscall and, on loopback, the wake-up of
//! the reader on the other side. Counted with the kernel's per-socket `tcpi_data_segs_in`.
//! Not in the fast-path rerun of the suites: there the bytes skip TCP.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::*;

/// Bytes and data segments a socket received.
type Received = (u64, u32);

/// `tcpi_bytes_received` and `tcpi_data_segs_in` of `s` (from `struct tcp_info`, whose
/// layout Linux only appends to; `libc`'s copy stops before these fields).
fn received(s: &TcpStream) -> Received {
    let mut info = [0u8; 232];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info` and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    assert!(
        len >= 156,
        "this kernel's tcp_info has no tcpi_data_segs_in"
    );
    let u64_at = |o: usize| u64::from_ne_bytes(info[o..o + 8].try_into().unwrap());
    let u32_at = |o: usize| u32::from_ne_bytes(info[o..o + 4].try_into().unwrap());
    (u64_at(128), u32_at(152))
}

/// Reads from `s` until `end` has arrived; returns what was read.
fn read_until(s: &mut TcpStream, end: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !out.windows(end.len()).any(|w| w == end) {
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&out));
        out.extend_from_slice(&buf[..n]);
    }
    out
}

/// An OpenAI-style model server on a raw socket: each completion request is answered with a
/// whole streamed response in one write; other requests (weir's metrics scrape) with an
/// empty 200. Records, for each completion request, the bytes and data segments it came in
/// (weir may send several requests over one connection).
fn model_server(completion: Vec<u8>) -> (SocketAddr, Arc<Mutex<Vec<Received>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { return };
            let record = record.clone();
            let completion = completion.clone();
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut before = (0, 0);
                loop {
                    let mut chunk = [0u8; 4096];
                    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match c.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    while buf.len() < head_end + 4 + len {
                        match c.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.drain(..head_end + 4 + len);
                    let now = received(&c);
                    let this = (now.0 - before.0, now.1 - before.1);
                    before = now;
                    let reply: &[u8] = if head.starts_with("post /v1/completions") {
                        record.lock().unwrap().push(this);
                        &completion
                    } else {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
                    };
                    if c.write_all(reply).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// A streamed completion of `events` SSE events, each its own chunk, written whole.
fn completion(events: usize) -> Vec<u8> {
    let mut out =
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
            .to_vec();
    for i in 0..events {
        let event = format!("data: {{\"text\":\"token {i}\"}}\n\n");
        out.extend_from_slice(format!("{:X}\r\n{event}\r\n", event.len()).as_bytes());
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// weir in front of `server` as an OpenAI pool.
fn pool_of(server: SocketAddr) -> Setup {
    start(&format!(
        "routes:\n  - name: ai\n    route: {{ pool: llm }}\ninference_pools:\n  - name: llm\n    protocol: openai\n    endpoints:\n      - {{ address: \"{server}\", models: [{{ name: llama }}] }}\n    reload: {{ poll_interval: 0s }}\n",
    ))
}

/// Sends one completion request to `listen` and reads the whole streamed answer; returns it
/// with the data segments it came in.
fn complete(listen: SocketAddr, prompt: &str) -> (String, u32) {
    let body = format!(r#"{{"model":"llama","prompt":"{prompt}","stream":true}}"#);
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut c = TcpStream::connect(listen).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(request.as_bytes()).unwrap();
    let response = read_until(&mut c, b"0\r\n\r\n");
    let (bytes, segments) = received(&c);
    assert_eq!(bytes, response.len() as u64, "tcp_info's layout as read");
    let text = String::from_utf8_lossy(&response).into_owned();
    assert!(text.starts_with("HTTP/1.1 200 "), "{text}");
    (text, segments)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_small_chunks_read_at_once_leave_in_one_segment() {
    let (server, _) = model_server(completion(40));
    let s = pool_of(server);
    let listen = s.listen;
    tokio::task::spawn_blocking(move || {
        for i in 0..3 {
            let (text, segments) = complete(listen, &format!("p{i}"));
            // Every token, in order, then the end.
            let mut at = 0;
            for t in 0..40 {
                let token = format!("data: {{\"text\":\"token {t}\"}}");
                at += text[at..]
                    .find(&token)
                    .unwrap_or_else(|| panic!("{token} missing or out of order:\n{text}"));
            }
            assert_eq!(
                segments, 1,
                "40 chunks read at once reached the client in {segments} segments:\n{text}"
            );
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_whole_request_and_a_whole_response_each_leave_in_one_segment() {
    let (server, seen) = model_server(completion(1));
    let s = pool_of(server);
    let listen = s.listen;
    tokio::task::spawn_blocking(move || {
        for i in 0..3 {
            let (text, segments) = complete(listen, &format!("p{i}"));
            assert!(text.contains("data: {\"text\":\"token 0\"}"), "{text}");
            assert_eq!(
                segments, 1,
                "the response (header, chunk, last chunk) came in {segments} segments:\n{text}"
            );
            let upstream = *seen
                .lock()
                .unwrap()
                .last()
                .expect("the server got the request");
            assert_eq!(
                upstream.1, 1,
                "request {i} (header and body, {} bytes) reached the server in {} segments",
                upstream.0, upstream.1
            );
        }
    })
    .await
    .unwrap();
}
