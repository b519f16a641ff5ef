//! What the sockmap fast-path tests need around them: root (or say so loudly, and fail under
//! `CI=true`), a cgroup v2 of their own to attach to (so parallel tests never see each other's
//! sockets), and a packet capture on `lo` that counts TCP segments carrying payload.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

/// Whether the tests can load BPF programs here. When not, prints why (and panics under
/// `CI=true`, where nothing may be skipped).
pub fn can_load_bpf(test: &str) -> bool {
    let why = if unsafe { libc::geteuid() } != 0 {
        Some("not root (loading BPF needs CAP_BPF and CAP_NET_ADMIN)".to_string())
    } else {
        weir_ebpf::unavailable_reason()
            .map(|r| format!("weir was built without its BPF programs: {r}"))
    };
    match why {
        None => true,
        Some(why) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{test} cannot run under CI=true: {why}")
        }
        Some(why) => {
            eprintln!("\n*** SKIPPED {test}: {why} ***\n");
            false
        }
    }
}

/// A fresh cgroup v2 that this test process (and every process it starts from now on) is in,
/// until drop. The fast path attached to it sees only this test's sockets.
pub struct TestCgroup {
    pub path: PathBuf,
    parent: PathBuf,
}

impl TestCgroup {
    pub fn enter(name: &str) -> Self {
        let root = weir_ebpf::default_cgroup();
        let parent = root.join(
            std::fs::read_to_string("/proc/self/cgroup")
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("0::/").map(str::to_string))
                })
                .unwrap_or_default(),
        );
        let path = parent.join(format!("weir-test-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("create cgroup {}: {e}", path.display()));
        std::fs::write(path.join("cgroup.procs"), std::process::id().to_string())
            .unwrap_or_else(|e| panic!("enter cgroup {}: {e}", path.display()));
        Self { path, parent }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(
            self.parent.join("cgroup.procs"),
            std::process::id().to_string(),
        );
        // Fails while children of ours are still in it; they are gone by the end of the test
        // process and the kernel tolerates an empty leftover.
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// A raw packet socket on `lo` that sees every frame from its creation on.
pub struct Capture {
    fd: OwnedFd,
}

impl Capture {
    pub fn on_lo() -> Self {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2); the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `fd` is a fresh socket we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let lo = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
        // SAFETY: a zeroed sockaddr_ll is valid; bind reads `size_of` bytes of it.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = lo as i32;
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "bind to lo: {}", std::io::Error::last_os_error());
        // Room for everything a test sends, so a burst is not dropped before it is counted.
        let size: libc::c_int = 64 << 20;
        // SAFETY: setsockopt reads an int.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                &size as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as u32,
            );
        }
        Self { fd }
    }

    /// Reads every frame captured so far and counts the outgoing TCP segments with payload
    /// from or to `port` (each segment crosses `lo` once out and once in; outgoing only).
    pub fn payload_segments(&self, port: u16) -> usize {
        let mut buf = vec![0u8; 70_000];
        let mut n = 0;
        loop {
            // SAFETY: a zeroed sockaddr_ll is valid; recvfrom writes at most `len` into it.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            let got = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    &mut from as *mut libc::sockaddr_ll as *mut libc::sockaddr,
                    &mut len,
                )
            };
            if got <= 0 {
                return n;
            }
            if from.sll_pkttype == libc::PACKET_OUTGOING
                && tcp_payload(&buf[..got as usize], port) > 0
            {
                n += 1;
            }
        }
    }
}

/// The TCP payload length of an Ethernet-framed IPv4 or IPv6 packet from or to `port`; 0
/// otherwise.
fn tcp_payload(frame: &[u8], port: u16) -> usize {
    let Some(ip) = frame.get(14..) else { return 0 };
    // (header length, the IP packet's length, whether it carries TCP)
    let (head, total, tcp) = match ip.first().map(|b| b >> 4) {
        Some(4) if ip.len() >= 20 => (
            usize::from(ip[0] & 0xf) * 4,
            usize::from(u16::from_be_bytes([ip[2], ip[3]])),
            ip[9] == 6,
        ),
        // IPv6 without extension headers (loopback TCP has none): 40 bytes, then TCP.
        Some(6) if ip.len() >= 40 => (
            40,
            40 + usize::from(u16::from_be_bytes([ip[4], ip[5]])),
            ip[6] == 6,
        ),
        _ => return 0,
    };
    if !tcp {
        return 0;
    }
    let Some(tcp) = ip.get(head..) else { return 0 };
    if tcp.len() < 20 {
        return 0;
    }
    let (sport, dport) = (
        u16::from_be_bytes([tcp[0], tcp[1]]),
        u16::from_be_bytes([tcp[2], tcp[3]]),
    );
    if sport != port && dport != port {
        return 0;
    }
    total.saturating_sub(head + usize::from(tcp[12] >> 4) * 4)
}
