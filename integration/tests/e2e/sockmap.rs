//! The eBPF sockmap fast path with the real programs in the kernel: sockets in scope are
//! redirected (counters, and no payload on `lo`), others are not, bytes arrive exact, and
//! detaching leaves accelerated connections working. Each test runs in a cgroup of its own.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::thread;

use weir_ebpf::FastPath;
use weir_integration::sockmap_env::{can_load_bpf, Capture, TestCgroup};
use weir_integration::weir_process::{admin_get, free_port, Weir};

use crate::*;

/// Deterministic, position-dependent bytes: a reordered or lost chunk shows.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[i % 4] ^ seed)
        .collect()
}

/// An echo server on 127.0.0.1: each connection gets back what it sends until it half-closes.
fn echo_server() -> (u16, thread::JoinHandle<()>) {
    echo_server_on("127.0.0.1")
}

/// [`echo_server`] on `ip`.
fn echo_server_on(ip: &str) -> (u16, thread::JoinHandle<()>) {
    let listener = TcpListener::bind((ip, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let h = thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            thread::spawn(move || {
                let mut buf = vec![0u8; 256 << 10];
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => {
                            let _ = conn.shutdown(std::net::Shutdown::Write);
                            return;
                        }
                        Ok(n) => {
                            if conn.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (port, h)
}

/// Reads until EOF. On a socket whose peer redirects into it, Linux's `tcp_bpf_recvmsg` can
/// answer a blocking read at EOF with EAGAIN once (woken by the FIN with no message queued);
/// the next read returns 0. Event-loop clients (epoll, tokio) never notice; a blocking client
/// must read again, as this does. Any other error fails.
fn read_to_eof(conn: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut eagain = 0;
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && eagain < 3 => eagain += 1,
            Err(e) => panic!("read after {} bytes: {e}", out.len()),
        }
    }
}

/// Sends `data` on a new connection to `port` (writing and reading at once), half-closes,
/// and returns everything echoed back until the server closes.
fn echo(conn: TcpStream, data: &[u8]) -> Vec<u8> {
    let mut writer = conn.try_clone().unwrap();
    let data = data.to_vec();
    let w = thread::spawn(move || {
        for chunk in data.chunks(100_003) {
            writer.write_all(chunk).unwrap();
        }
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut conn = conn;
    let back = read_to_eof(&mut conn);
    w.join().unwrap();
    back
}

#[test]
fn sockets_in_scope_are_redirected_byte_exact_and_detach_leaves_them_working() {
    if !can_load_bpf("sockmap redirect") {
        return;
    }
    let cg = TestCgroup::enter("redirect");
    let (port, _server) = echo_server();
    let (other, _server2) = echo_server();
    let mut fast = FastPath::attach(&cg.path).expect("attach the fast path");
    fast.set_ports([port]).unwrap();
    assert_eq!(fast.counters().unwrap(), Default::default());

    let capture = Capture::on_lo();
    let data = pattern(3 << 20, 1);
    let back = echo(TcpStream::connect(("127.0.0.1", port)).unwrap(), &data);
    assert!(
        back == data,
        "3 MiB echoed byte-exact through the fast path (under its 4 MiB bound)"
    );
    let c = fast.counters().unwrap();
    assert_eq!(c.sockets_inserted, 2, "both ends of the connection: {c:?}");
    assert!(c.messages_redirected > 0, "{c:?}");
    assert_eq!(c.bytes_redirected, 2 * data.len() as u64, "{c:?}");
    assert_eq!(
        capture.payload_segments(port),
        0,
        "no payload crossed lo for the accelerated connection"
    );

    // A port not in scope is left alone: its payload goes over lo as usual.
    let back = echo(
        TcpStream::connect(("127.0.0.1", other)).unwrap(),
        &data[..1 << 20],
    );
    assert!(back == data[..1 << 20]);
    assert!(capture.payload_segments(other) > 0, "TCP carried it");
    assert_eq!(fast.counters().unwrap().sockets_inserted, 2, "not inserted");

    // An accelerated connection open across the detach keeps working, byte-exact.
    let kept = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut kept_w = kept.try_clone().unwrap();
    let mut kept_r = kept;
    kept_w.write_all(&data[..4096]).unwrap();
    let mut first = vec![0u8; 4096];
    kept_r.read_exact(&mut first).unwrap();
    assert_eq!(first, data[..4096]);
    drop(fast);
    let capture = Capture::on_lo();
    let rest = echo(kept_r, &data[4096..]);
    assert!(
        rest == data[4096..],
        "the rest arrived exact after the detach"
    );
    assert_eq!(
        capture.payload_segments(port),
        0,
        "still accelerated after the detach"
    );
    drop(kept_w);
    // A new connection after the detach is not accelerated.
    let capture = Capture::on_lo();
    let back = echo(
        TcpStream::connect(("127.0.0.1", port)).unwrap(),
        &data[..1 << 20],
    );
    assert!(back == data[..1 << 20]);
    assert!(
        capture.payload_segments(port) > 0,
        "new connections use TCP again"
    );
}

/// Makes closing `conn` send a reset (SO_LINGER 0).
fn reset_on_close(conn: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: SO_LINGER reads one `struct linger` from the pointer, of the size given.
    let rc = unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
}

/// One accelerated connection on 127.0.0.1, its process in a cgroup of its own named
/// `name`: the cgroup and the fast path (keep both alive), the client and the server side.
/// `None` (said loudly, a failure under `CI=true`) where BPF cannot be loaded.
fn accelerated_pair(name: &str) -> Option<(TestCgroup, FastPath, TcpStream, TcpStream)> {
    if !can_load_bpf(&format!("sockmap {name}")) {
        return None;
    }
    let cg = TestCgroup::enter(name);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut fast = FastPath::attach(&cg.path).expect("attach the fast path");
    fast.set_ports([port]).unwrap();
    let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (server, _) = listener.accept().unwrap();
    Some((cg, fast, client, server))
}

/// The position of the first byte where `got` and `want` differ, if any (lengths included).
fn first_difference(got: &[u8], want: &[u8]) -> Option<usize> {
    got.iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .or((got.len() != want.len()).then(|| got.len().min(want.len())))
}

#[test]
fn a_reader_slower_than_its_writer_gets_every_byte_once_in_order() {
    // Every message goes to the reader's queue, however much waits there: once a connection
    // is accelerated nothing of it takes TCP. weir once sent a direction through TCP when its
    // peer had 4 MiB unread, with an sk_skb verdict putting what TCP delivered into the same
    // queue; Linux hands that verdict each TCP skb whole, so a retransmitted segment that
    // overlapped bytes already received was delivered twice (a corrupted download, and the
    // socket's copied_seq run ahead of rcv_nxt, which made blocking reads fail with EAGAIN;
    // README). The reader here uses blocking reads, which must never fail with WouldBlock,
    // and pauses now and then, so tens of MiB wait for it.
    let Some((_cg, fast, mut reader, writer)) = accelerated_pair("slow-reader") else {
        return;
    };
    const LEN: usize = 96 << 20;
    let data = std::sync::Arc::new(pattern(LEN, 7));
    let w = {
        let data = data.clone();
        let mut writer = writer;
        thread::spawn(move || -> std::io::Result<TcpStream> {
            for chunk in data.chunks(256 << 10) {
                writer.write_all(chunk)?;
            }
            Ok(writer)
        })
    };
    let mut got = Vec::with_capacity(LEN);
    let mut buf = vec![0u8; 64 << 10];
    let mut pause_at = 4 << 20;
    while got.len() < LEN {
        match reader.read(&mut buf) {
            Ok(0) => panic!("EOF after {} bytes", got.len()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("a blocking read failed after {} bytes: {e}", got.len()),
        }
        if got.len() >= pause_at {
            thread::sleep(std::time::Duration::from_millis(20));
            pause_at += 8 << 20;
        }
    }
    let _writer = w.join().unwrap().expect("the writer wrote everything");
    if let Some(at) = first_difference(&got, &data) {
        panic!("byte {at} of {LEN} differs");
    }
    let c = fast.counters().unwrap();
    assert_eq!(
        c.bytes_redirected, LEN as u64,
        "every byte took the fast path: {c:?}"
    );
    assert_eq!(c.messages_missed, 0, "{c:?}");
}

#[test]
fn a_writer_whose_peer_closed_with_bytes_unread_gets_an_error_at_once() {
    // The reader reads nothing of 8 MiB and closes. Its unread bytes wait in its psock queue,
    // which the kernel does not count when it chooses between a reset and a FIN at close: it
    // sends a FIN. The writer's next message finds no peer in the map, goes through TCP to a
    // socket that is gone, and is answered with a reset: its write after that fails.
    let Some((_cg, fast, reader, mut writer)) = accelerated_pair("peer-closed") else {
        return;
    };
    let data = pattern(8 << 20, 11);
    writer
        .set_write_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    writer
        .write_all(&data)
        .expect("the reader's queue takes 8 MiB that it does not read");
    assert_eq!(fast.counters().unwrap().bytes_redirected, 8 << 20);
    let closed = std::time::Instant::now();
    drop(reader);
    let err = loop {
        if let Err(e) = writer.write(&data[..64 << 10]) {
            break e;
        }
        assert!(
            closed.elapsed() < std::time::Duration::from_secs(5),
            "writes still succeed 5 s after the peer closed"
        );
        thread::sleep(std::time::Duration::from_millis(10));
    };
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
        "the write failed with {err} after {:?}",
        closed.elapsed()
    );
}

#[test]
fn a_peer_that_only_half_closed_still_gets_everything() {
    // The reader shuts down only its writing side: the writer sees its end of stream, and
    // must still be able to send it everything.
    let Some((_cg, fast, mut reader, mut writer)) = accelerated_pair("half-closed") else {
        return;
    };
    let data = pattern(32 << 20, 13);
    reader.shutdown(std::net::Shutdown::Write).unwrap();
    let mut end = [0u8; 1];
    assert_eq!(writer.read(&mut end).unwrap(), 0, "the writer sees the FIN");
    let w = {
        let data = data.clone();
        thread::spawn(move || writer.write_all(&data))
    };
    thread::sleep(std::time::Duration::from_millis(200));
    let got = read_to_eof(&mut reader);
    w.join().unwrap().expect("the writer wrote everything");
    if let Some(at) = first_difference(&got, &data) {
        panic!("byte {at} differs ({} bytes arrived)", got.len());
    }
    assert_eq!(fast.counters().unwrap().bytes_redirected, data.len() as u64);
}

#[test]
fn bytes_sent_before_a_reset_can_still_be_read() {
    // A server that answers early and closes with bytes unread (an HTTP 413 before the body,
    // say) sends a reset after its answer. Through TCP, Linux keeps what arrived before the
    // reset readable: so must the fast path.
    let Some((_cg, fast, mut reader, mut writer)) = accelerated_pair("data-then-reset") else {
        return;
    };
    let data = pattern(4 << 20, 5);
    writer.write_all(&data).unwrap();
    assert_eq!(fast.counters().unwrap().bytes_redirected, data.len() as u64);
    reset_on_close(&writer);
    drop(writer);
    thread::sleep(std::time::Duration::from_millis(50));
    let mut got = Vec::new();
    let mut b = vec![0u8; 64 << 10];
    let end = loop {
        match reader.read(&mut b) {
            Ok(0) => break None,
            Ok(n) => got.extend_from_slice(&b[..n]),
            Err(e) => break Some(e),
        }
    };
    assert!(
        first_difference(&got, &data).is_none(),
        "{} of {} bytes read before {end:?}",
        got.len(),
        data.len()
    );
}

/// Set in the environment of a nested run of this test binary: every weir the proxy-core
/// suites start gets the fast path, attached to one cgroup the nested process is in.
pub const SUITES_ENV: &str = "WEIR_E2E_FAST_PATH";

/// The `fast_path:` line [`crate::config_text`] adds under [`SUITES_ENV`]; empty otherwise.
pub fn fast_path_for_suites() -> String {
    static CGROUP: std::sync::OnceLock<TestCgroup> = std::sync::OnceLock::new();
    if std::env::var_os(SUITES_ENV).is_none() {
        return String::new();
    }
    let cg = CGROUP.get_or_init(|| TestCgroup::enter("suites"));
    format!(
        "fast_path: {{ mode: sockmap, cgroup: \"{}\" }}\n",
        cg.path.display()
    )
}

/// Under [`SUITES_ENV`], fails the test unless its weir really attached the fast path.
pub fn check_fast_path_for_suites(weir: &Weir) {
    if std::env::var_os(SUITES_ENV).is_some() {
        let v = ebpf_json(weir);
        assert_eq!(v["attached"], true, "the fast path is on: {v}");
    }
}

fn ebpf_json(weir: &Weir) -> serde_json::Value {
    let (status, body) = admin_get(weir.admin, "/ebpf").expect("admin /ebpf");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("json")
}

/// What `weir ebpf status` prints about `weir` (it must succeed).
fn ebpf_status(weir: &Weir) -> String {
    let out = std::process::Command::new(weir_integration::weir_process::weir_binary())
        .args(["ebpf", "status", "--admin", &weir.admin.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    text
}

fn fast_path_config(cg: &TestCgroup, rest: &str) -> String {
    format!(
        "{rest}fast_path: {{ mode: sockmap, cgroup: \"{}\" }}\n",
        cg.path.display()
    )
}

#[test]
fn an_upstream_given_up_mid_response_is_reset_at_once() {
    upstream_learns_at_once_that_the_client_left("reset", true);
}

#[test]
fn an_upstream_learns_at_once_that_a_client_closed_mid_response() {
    upstream_learns_at_once_that_the_client_left("closed", false);
}

/// The upstream sends a 1 GiB response through weir on the fast path; the client reads 1 MiB
/// and leaves: with a reset (SO_LINGER 0) when `reset`, else with a plain close, which sends
/// a FIN even with bytes unread (they wait in its psock queue, which the kernel does not count
/// at close). weir's next write to the client fails (the message finds no peer in the map,
/// takes TCP, and is answered with a reset), weir gives the upstream up, and closes that
/// connection with a reset too, since the upstream may be waiting on a window that a FIN
/// would leave closed (a FIN_WAIT2 socket ignores window probes until tcp_fin_timeout, 60 s).
/// The upstream's write must fail within seconds.
fn upstream_learns_at_once_that_the_client_left(name: &str, reset: bool) {
    if !can_load_bpf("sockmap: the client left") {
        return;
    }
    let cg = TestCgroup::enter(name);
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let up_addr = upstream.local_addr().unwrap();
    let (failed_tx, failed_rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let (mut conn, _) = upstream.accept().unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = conn.read(&mut b).unwrap();
            assert!(n > 0, "request head");
            head.extend_from_slice(&b[..n]);
        }
        conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1073741824\r\n\r\n")
            .unwrap();
        let chunk = vec![b'x'; 64 << 10];
        let mut sent = 0usize;
        let err = loop {
            match conn.write(&chunk) {
                Ok(n) => sent += n,
                Err(e) => break e,
            }
        };
        let _ = failed_tx.send((std::time::Instant::now(), sent, err.kind()));
    });
    let s = start(&fast_path_config(
        &cg,
        &format!(
            "routes:\n  - name: all\n    route: {{ cluster: up }}\nclusters:\n{}",
            cluster("up", "http1", &[up_addr], "")
        ),
    ));
    let mut client = TcpStream::connect(s.listen).unwrap();
    client
        .write_all(b"GET /big HTTP/1.1\r\nhost: weir\r\n\r\n")
        .unwrap();
    let mut got = 0;
    let mut b = vec![0u8; 64 << 10];
    while got < 1 << 20 {
        let n = client.read(&mut b).unwrap();
        assert!(n > 0, "the response body flows");
        got += n;
    }
    let counters = &ebpf_json(&s.weir)["counters"];
    assert!(
        counters["messages_redirected"].as_u64().unwrap() > 0,
        "on the fast path: {counters}"
    );
    if reset {
        reset_on_close(&client);
    }
    let left = std::time::Instant::now();
    drop(client);
    let (failed_at, sent, kind) = failed_rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the upstream's write failed within 20 s of the client leaving");
    let after = failed_at.saturating_duration_since(left);
    assert!(
        matches!(
            kind,
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
        "{kind:?} after {sent} bytes"
    );
    assert!(
        after < std::time::Duration::from_secs(5),
        "the upstream learned {after:?} after the client left ({sent} bytes sent)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_and_grpc_through_weir_ride_the_fast_path_byte_exact() {
    use weir_integration::grpc_backend::GrpcBackend;
    use weir_integration::http_backend::HttpBackend;
    if !can_load_bpf("sockmap through weir") {
        return;
    }
    let cg = TestCgroup::enter("weir");
    let http = HttpBackend::start("h").await;
    let grpc = GrpcBackend::start("g").await;
    let s = start(&fast_path_config(
        &cg,
        &format!(
            "routes:\n  - name: grpc\n    match: {{ grpc: {{ service: weir.test.Echo }} }}\n    route: {{ cluster: g }}\n  - name: all\n    route: {{ cluster: h }}\nclusters:\n{}{}",
            cluster("h", "http1", &[http.addr], ""),
            cluster("g", "h2c", &[grpc.addr], "")
        ),
    ));
    let v = ebpf_json(&s.weir);
    assert_eq!(v["attached"], true, "{v}");
    let ports: Vec<u64> = v["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap())
        .collect();
    // The listener's port is in scope for everyone; the upstreams' ports are not: weir's own
    // connections to them are known by its process id, other clients' are left alone.
    assert!(ports.contains(&u64::from(s.listen.port())), "{v}");
    for p in [http.addr.port(), grpc.addr.port()] {
        assert!(!ports.contains(&u64::from(p)), "{p} not in scope: {v}");
    }
    let capture = Capture::on_lo();

    // Everything until the capture is checked stays under the fast path's bound (4 MiB
    // unread per direction), so all of it is redirected.
    // 32 clients at once, each POSTing 1 MiB and getting it back.
    let client = h1_client();
    let echo_body = |i: u8, len: usize| {
        let (client, listen) = (client.clone(), s.listen);
        tokio::spawn(async move {
            let body = pattern(len, i);
            let req = ::http::Request::builder()
                .method("POST")
                .uri(format!("http://{listen}/echo-body"))
                .body(Full::new(Bytes::from(body.clone())))
                .unwrap();
            let resp = client.request(req).await.expect("response");
            assert_eq!(resp.status(), 200);
            let got = resp.into_body().collect().await.unwrap().to_bytes();
            assert!(got == body, "client {i}: body echoed byte-exact");
        })
    };
    let tasks: Vec<_> = (0..32u8).map(|i| echo_body(i, 1 << 20)).collect();
    for t in tasks {
        t.await.unwrap();
    }
    // gRPC: 3 MiB messages there and back on one h2 connection.
    let mut g = crate::grpc::client(s.listen).await;
    for i in 0..4u8 {
        let payload = pattern(3 << 20, 100 + i);
        let reply = g
            .unary(weir_integration::pb::Msg {
                text: format!("m{i}"),
                n: i64::from(i),
                payload: payload.clone(),
            })
            .await
            .expect("unary through the fast path")
            .into_inner();
        assert!(reply.payload == payload, "message {i} byte-exact");
    }

    // A gRPC stream the client half-closes: every message, the server's last word after the
    // half-close, and the OK trailers arrive. (TCP half-close is covered by the first test;
    // weir's HTTP/1.1 side answers a client FIN by ending the request, as pingora does.)
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut replies = g
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("bidi opens")
        .into_inner();
    for i in 0..50 {
        tx.send(crate::grpc::msg(&format!("b{i}"), i))
            .await
            .unwrap();
        let r = replies.message().await.unwrap().expect("echo");
        assert_eq!(r.text, format!("g:b{i}"));
    }
    drop(tx);
    let last = replies
        .message()
        .await
        .unwrap()
        .expect("summary after half-close");
    assert_eq!((last.text.as_str(), last.n), ("g:done", 50));
    assert!(replies.message().await.unwrap().is_none(), "OK trailers");
    // Clients that vanish mid-upload leave weir serving.
    for _ in 0..8 {
        let mut c = TcpStream::connect(s.listen).unwrap();
        write!(
            c,
            "POST /echo-body HTTP/1.1\r\nhost: x\r\ncontent-length: 10000000\r\n\r\n"
        )
        .unwrap();
        c.write_all(&pattern(2 << 20, 9)).unwrap();
        drop(c);
    }
    let r = get(&client, s.listen, "/after").await;
    assert_eq!(r.status, 200, "{}", r.body);

    let v = ebpf_json(&s.weir);
    let c = &v["counters"];
    assert!(c["sockets_inserted"].as_u64().unwrap() >= 4, "{v}");
    assert!(
        c["bytes_redirected"].as_u64().unwrap() > 2 * (56 << 20),
        "the bodies went through the fast path: {v}"
    );
    for port in [s.listen.port(), http.addr.port(), grpc.addr.port()] {
        assert_eq!(
            capture.payload_segments(port),
            0,
            "no payload on lo for port {port}"
        );
    }
    // Another local client of the same upstream is not weir's traffic: it takes TCP.
    let inserted = ebpf_json(&s.weir)["counters"]["sockets_inserted"].clone();
    let r = get(&client, http.addr, "/direct").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        capture.payload_segments(http.addr.port()) > 0,
        "a direct connection to the upstream goes over lo"
    );
    let v = ebpf_json(&s.weir);
    assert_eq!(v["counters"]["sockets_inserted"], inserted, "{v}");
    // A 32 MiB body: a writer that runs 4 MiB ahead of its reader goes through TCP until the
    // reader catches up; the bytes arrive in order whichever way each part went.
    echo_body(32, 32 << 20).await.unwrap();
    let (_, metrics) = admin_get(s.weir.admin, "/stats/prometheus").unwrap();
    assert!(metrics.contains("weir_sockmap_attached 1"), "{metrics}");
    assert!(metrics.contains("weir_sockmap_messages_redirected_total "));
    // `weir ebpf status` tells the same, for people.
    let text = ebpf_status(&s.weir);
    assert!(text.contains("attached: yes, to cgroup"), "{text}");
    assert!(text.contains("messages_redirected: "), "{text}");
}

#[test]
fn without_bpf_privileges_weir_says_why_and_serves() {
    if !can_load_bpf("sockmap without privileges") {
        return;
    }
    let cg = TestCgroup::enter("noprivs");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let http = rt.block_on(weir_integration::http_backend::HttpBackend::start("h"));
    let (listen, admin) = (
        std::net::SocketAddr::from(([127, 0, 0, 1], free_port())),
        std::net::SocketAddr::from(([127, 0, 0, 1], free_port())),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weir.yaml");
    std::fs::write(
        &path,
        crate::config_text(
            listen,
            admin,
            &fast_path_config(
                &cg,
                &format!(
                    "routes:\n  - name: all\n    route: {{ cluster: h }}\nclusters:\n{}",
                    cluster("h", "http1", &[http.addr], "")
                ),
            ),
        ),
    )
    .unwrap();
    // Root without the capabilities BPF needs, as in a locked-down container.
    let weir = Weir::spawn_wrapped(
        dir,
        &["--config".into(), path.display().to_string()],
        admin,
        &[
            "capsh",
            "--drop=cap_bpf,cap_sys_admin,cap_net_admin,cap_perfmon",
            "--",
            "-c",
            "exec \"$0\" \"$@\"",
        ],
    );
    let v = ebpf_json(&weir);
    assert_eq!(v["attached"], false, "{v}");
    let reason = v["reason"].as_str().unwrap();
    assert!(reason.contains("CAP_BPF"), "{reason}");
    assert!(
        weir.log().contains("sockmap fast path unavailable"),
        "{}",
        weir.log()
    );
    let r = rt.block_on(get(&h1_client(), listen, "/still-serving"));
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn proxy_core_suites_pass_with_the_fast_path_on() {
    if !can_load_bpf("proxy suites on the fast path") {
        return;
    }
    // This test binary again, with the proxy-core suites (HTTP, gRPC, resilience, bad input)
    // and the streaming inference ones (SSE, KServe gRPC with the real tritonclient), each
    // weir on the fast path.
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "http::",
            "grpc::",
            "resilience::",
            "bad_input::",
            "inference::",
            "kserve::",
            "--test-threads",
            "4",
        ])
        .env(SUITES_ENV, "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let passed = text
        .lines()
        .find_map(|l| l.strip_prefix("test result: ok. "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse::<u32>().ok());
    assert!(
        out.status.success() && passed.is_some_and(|n| n >= 38),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn node_addresses_are_in_scope_only_when_given() {
    if !can_load_bpf("sockmap node addresses") {
        return;
    }
    let node_ip = node_ip();
    let cg = TestCgroup::enter("addrs");
    let listener = TcpListener::bind((node_ip, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    // An echo server on the node's own address (a node proxy's side of a pod connection).
    let listener = TcpListener::bind((node_ip, port)).unwrap();
    thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            thread::spawn(move || {
                let mut conn = conn;
                let mut w = conn.try_clone().unwrap();
                let _ = std::io::copy(&mut conn, &mut w);
                let _ = w.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    let mut fast = FastPath::attach(&cg.path).expect("attach");
    fast.set_ports([port]).unwrap();
    let data = pattern(1 << 20, 3);
    // The port is in scope but the address is not local to the fast path: left to TCP.
    let back = echo(TcpStream::connect((node_ip, port)).unwrap(), &data);
    assert!(back == data);
    assert_eq!(fast.counters().unwrap().sockets_inserted, 0);
    // Once the proxy says the address is the node's, its connections are accelerated.
    fast.set_addresses([node_ip.into()]).unwrap();
    let capture = Capture::on_lo();
    let back = echo(TcpStream::connect((node_ip, port)).unwrap(), &data);
    assert!(back == data, "byte-exact");
    let c = fast.counters().unwrap();
    assert_eq!(c.sockets_inserted, 2, "{c:?}");
    assert_eq!(c.bytes_redirected, 2 * data.len() as u64, "{c:?}");
    assert_eq!(capture.payload_segments(port), 0);
}

/// One of this machine's non-loopback IPv4 addresses.
fn node_ip() -> std::net::Ipv4Addr {
    if_addrs::get_if_addrs()
        .unwrap()
        .into_iter()
        .find_map(|i| match i.ip() {
            std::net::IpAddr::V4(a) if !a.is_loopback() => Some(a),
            _ => None,
        })
        .expect("this test needs a non-loopback IPv4 address on the machine")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_connects_are_captured_and_reach_their_original_destination() {
    use weir_integration::http_backend::HttpBackend;
    if !can_load_bpf("sockmap outbound capture") {
        return;
    }
    let node_ip = node_ip();
    let cg = TestCgroup::enter("outbound");
    // Two services on the node's address; connects to the first one's port are captured.
    let captured = HttpBackend::start_on("captured", node_ip.into()).await;
    let passing = HttpBackend::start_on("passing", node_ip.into()).await;
    let outbound = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let s = start(&format!(
        "  - name: outbound\n    address: \"{outbound}\"\nroutes:\n  - name: passthrough\n    route:\n      cluster: original\n      response_headers: {{ add: [{{ name: x-via, value: weir-outbound }}] }}\nclusters:\n  - name: original\n    original_dst: true\nfast_path: {{ mode: sockmap, cgroup: \"{}\", outbound: {{ listener: \"{outbound}\", ports: [{}] }} }}\n",
        cg.path.display(),
        captured.addr.port()
    ));
    let v = ebpf_json(&s.weir);
    assert_eq!(v["attached"], true, "{v}");
    assert_eq!(v["outbound"]["listener"], outbound.to_string(), "{v}");
    assert!(v["programs"].to_string().contains("cgroup/connect4"), "{v}");

    // No connection reuse: every request is a connect of its own, and each is counted.
    let client: HttpClient =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build_http();
    // The app asks for the node's address; the connect goes to weir, which sends the
    // request where it was going (its own connect there is not captured, or it would loop).
    for i in 0..3 {
        let r = get(&client, captured.addr, &format!("/r{i}")).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.headers["x-backend"], "captured");
        assert_eq!(r.headers["x-via"], "weir-outbound", "went through weir");
    }
    let body = pattern(1 << 20, 7);
    let req = ::http::Request::builder()
        .method("POST")
        .uri(format!("http://{}/echo-body", captured.addr))
        .body(Full::new(Bytes::from(body.clone())))
        .unwrap();
    let resp = client.request(req).await.expect("response");
    assert_eq!(resp.headers()["x-via"], "weir-outbound");
    let got = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(got == body, "1 MiB echoed byte-exact through the capture");
    // The app sees the service as its peer, not weir's listener (cgroup/getpeername4).
    let addr = captured.addr;
    let raw = tokio::task::spawn_blocking(move || {
        let mut c = TcpStream::connect(addr).unwrap();
        assert_eq!(
            c.peer_addr().unwrap(),
            addr,
            "getpeername shows the destination"
        );
        write!(
            c,
            "GET /raw HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
        )
        .unwrap();
        String::from_utf8_lossy(&read_to_eof(&mut c)).into_owned()
    })
    .await
    .unwrap();
    assert!(raw.contains("x-via: weir-outbound"), "{raw}");
    assert_eq!(captured.requests(), 5);
    // A port out of scope is left alone: straight to the service, weir never sees it.
    let r = get(&client, passing.addr, "/direct").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.headers["x-backend"], "passing");
    assert!(r.headers.get("x-via").is_none(), "not through weir");
    // A connection weir did not capture has no original destination to go to.
    let r = get(&client, outbound, "/lost").await;
    assert_eq!(r.status, 503, "{}", r.body);

    let v = ebpf_json(&s.weir);
    let c = &v["counters"];
    assert_eq!(
        c["connects_captured"], 5,
        "the app's 5 connects, none of weir's: {v}"
    );
    assert_eq!(c["capture_failed"], 0, "{v}");
    // A captured connection's destination is forgotten when it closes.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let v = ebpf_json(&s.weir);
        if v["outbound"]["open_connections"] == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "captured connections closed but still on record: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = ebpf_status(&s.weir);
    assert!(
        text.contains(&format!(
            "outbound capture: to {outbound}, destination ports [{}]",
            captured.addr.port()
        )),
        "{text}"
    );
    assert!(text.contains("connects_captured: 5"), "{text}");
}

#[test]
fn ipv6_loopback_connections_are_redirected_byte_exact() {
    if !can_load_bpf("sockmap IPv6") {
        return;
    }
    let cg = TestCgroup::enter("ipv6");
    let (port, _server) = echo_server_on("::1");
    let mut fast = FastPath::attach(&cg.path).expect("attach the fast path");
    fast.set_ports([port]).unwrap();
    let capture = Capture::on_lo();
    let data = pattern(4 << 20, 6);
    let back = echo(TcpStream::connect(("::1", port)).unwrap(), &data);
    assert!(back == data, "4 MiB echoed byte-exact over [::1]");
    let c = fast.counters().unwrap();
    assert_eq!(c.sockets_inserted, 2, "both ends: {c:?}");
    assert_eq!(c.bytes_redirected, 2 * data.len() as u64, "{c:?}");
    assert_eq!(capture.payload_segments(port), 0, "no payload on lo");
    // Out of scope over IPv6: TCP carries it, and the capture sees it.
    let (other, _server2) = echo_server_on("::1");
    let back = echo(
        TcpStream::connect(("::1", other)).unwrap(),
        &data[..1 << 20],
    );
    assert!(back == data[..1 << 20]);
    assert!(capture.payload_segments(other) > 0, "TCP carried it");
    assert_eq!(fast.counters().unwrap().sockets_inserted, 2, "not inserted");
    // Dual stack: an IPv6 socket on a v4-mapped address pairs with the IPv4 socket it talks to.
    let (v4, _server3) = echo_server();
    fast.set_ports([port, v4]).unwrap();
    let mapped = std::net::SocketAddr::from((Ipv4Addr::LOCALHOST.to_ipv6_mapped(), v4));
    let conn = TcpStream::connect(mapped).unwrap();
    assert!(conn.local_addr().unwrap().is_ipv6());
    let back = echo(conn, &data);
    assert!(
        back == data,
        "byte-exact between an IPv6 and an IPv4 socket"
    );
    let c = fast.counters().unwrap();
    assert_eq!(c.sockets_inserted, 4, "{c:?}");
    assert_eq!(c.bytes_redirected, 4 * data.len() as u64, "{c:?}");
    assert_eq!(capture.payload_segments(v4), 0, "no payload on lo");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_on_ipv6_rides_the_fast_path_to_an_ipv6_upstream() {
    use weir_integration::http_backend::HttpBackend;
    if !can_load_bpf("sockmap IPv6 through weir") {
        return;
    }
    let cg = TestCgroup::enter("weir6");
    let backend = HttpBackend::start_on("v6", std::net::Ipv6Addr::LOCALHOST.into()).await;
    let listen = std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, free_port()));
    let s = start(&fast_path_config(
        &cg,
        &format!(
            "  - name: v6\n    address: \"{listen}\"\nroutes:\n  - name: all\n    route: {{ cluster: b }}\nclusters:\n{}",
            cluster("b", "http1", &[backend.addr], "")
        ),
    ));
    let capture = Capture::on_lo();
    let client = h1_client();
    let body = pattern(2 << 20, 8);
    let req = ::http::Request::builder()
        .method("POST")
        .uri(format!("http://{listen}/echo-body"))
        .body(Full::new(Bytes::from(body.clone())))
        .unwrap();
    let resp = client.request(req).await.expect("response");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-backend"], "v6");
    let got = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(got == body, "2 MiB echoed byte-exact");
    let v = ebpf_json(&s.weir);
    assert!(
        v["counters"]["bytes_redirected"].as_u64().unwrap() >= 4 * body.len() as u64,
        "both legs, both ways: {v}"
    );
    for port in [listen.port(), backend.addr.port()] {
        assert_eq!(
            capture.payload_segments(port),
            0,
            "no payload on lo for {port}: {v}"
        );
    }
}
