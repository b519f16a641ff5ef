//! The eBPF sockmap fast path with the real programs in the kernel: sockets in scope are
//! redirected (counters, and no payload on `lo`), others are not, bytes arrive exact, and
//! detaching leaves accelerated connections working. Each test runs in a cgroup of its own.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;

use weir_ebpf::FastPath;
use weir_integration::sockmap_env::{can_load_bpf, Capture, TestCgroup};

/// Deterministic, position-dependent bytes: a reordered or lost chunk shows.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[i % 4] ^ seed)
        .collect()
}

/// An echo server on 127.0.0.1: each connection gets back what it sends until it half-closes.
fn echo_server() -> (u16, thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
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
    let mut back = Vec::new();
    let mut conn = conn;
    conn.read_to_end(&mut back).unwrap();
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
    let data = pattern(8 << 20, 1);
    let back = echo(TcpStream::connect(("127.0.0.1", port)).unwrap(), &data);
    assert!(
        back == data,
        "8 MiB echoed byte-exact through the fast path"
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
