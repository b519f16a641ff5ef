//! `weir-bench sockmap`: app (wrk, or a bulk reader) → weir → nginx, all on loopback, with
//! weir's eBPF sockmap fast path off and then on, in one run: round-trip latency with one
//! connection, requests/s with many, and throughput for one large body. Prints the figures and
//! the change; asserts nothing. Needs root (loading BPF).

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use weir_integration::sockmap_env::TestCgroup;
use weir_integration::weir_process::{admin_get, free_port};

use super::{
    cpu_of, install_tools, pin_to, spawn_weir, start_nginx, wait_port, wrk, Res, WrkResult,
};

pub struct Opts {
    pub duration: String,
    pub connections: u32,
    /// Size of the bulk body, in MiB.
    pub body_mib: u64,
}

struct Mode {
    name: &'static str,
    latency: WrkResult,
    load: WrkResult,
    cpu_us_per_req: f64,
    /// Best of three, in GiB/s.
    bulk_gib_s: f64,
    ebpf: String,
}

/// Downloads `/big` from 127.0.0.1:`port` (HTTP/1.1, reading exactly content-length bytes);
/// GiB/s.
fn bulk(port: u16) -> Res<f64> {
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    let start = Instant::now();
    write!(c, "GET /big HTTP/1.1\r\nhost: bench\r\n\r\n").map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 1 << 20];
    let mut head = Vec::new();
    let (length, mut got) = loop {
        let n = c.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed before the response head".into());
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            let text = String::from_utf8_lossy(&head[..end]).to_ascii_lowercase();
            let length: u64 = text
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| format!("no content-length in {text}"))?;
            break (length, (head.len() - end - 4) as u64);
        }
    };
    while got < length {
        let n = c.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!("closed after {got} of {length} bytes"));
        }
        got += n as u64;
    }
    Ok(length as f64 / (1u64 << 30) as f64 / start.elapsed().as_secs_f64())
}

pub fn run(weir_bin: &Path, opts: Opts) -> Res<()> {
    if unsafe { libc::geteuid() } != 0 {
        return Err("loading BPF needs root (CAP_BPF and CAP_NET_ADMIN)".into());
    }
    if let Some(why) = weir_ebpf::unavailable_reason() {
        return Err(format!("weir was built without its BPF programs: {why}"));
    }
    install_tools(&["wrk", "nginx"])?;
    // Every process of the benchmark (wrk, nginx, weir, the bulk reader) in one cgroup, the
    // one the fast path attaches to; weir gets a core of its own.
    let cg = TestCgroup::enter("bench");
    let pinned = std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2);
    if pinned {
        pin_to(0)?;
    }
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let d = dir.path();
    std::fs::File::create(d.join("big"))
        .and_then(|f| f.set_len(opts.body_mib << 20))
        .map_err(|e| e.to_string())?;
    let (_nginx, nginx_port) = start_nginx(d)?;

    let mut modes = Vec::new();
    for (name, fast) in [("fast path off", false), ("fast path on", true)] {
        let (port, admin) = (free_port(), free_port());
        let fast_path = if fast {
            format!(
                "fast_path: {{ mode: sockmap, cgroup: \"{}\" }}\n",
                cg.path.display()
            )
        } else {
            String::new()
        };
        let conf = d.join(format!("weir-{fast}.yaml"));
        std::fs::write(
            &conf,
            format!(
                "admin: {{ address: \"127.0.0.1:{admin}\" }}\nlisteners:\n  - {{ name: bench, address: \"127.0.0.1:{port}\" }}\nroutes:\n  - name: all\n    route: {{ cluster: nginx }}\nclusters:\n  - name: nginx\n    endpoints: [{{ address: \"127.0.0.1:{nginx_port}\" }}]\n    circuit_breaker: {{ max_requests: 100000 }}\n{fast_path}"
            ),
        )
        .map_err(|e| e.to_string())?;
        let weir = spawn_weir(weir_bin, &conf, &d.join(format!("weir-{fast}.log")), pinned)?;
        wait_port(port, "weir")?;
        let ebpf = admin_get(([127, 0, 0, 1], admin).into(), "/ebpf")
            .map(|(_, b)| b)
            .unwrap_or_default();
        if fast && !ebpf.contains("\"attached\": true") {
            return Err(format!("the fast path did not attach: {ebpf}"));
        }
        eprintln!("{name}: latency, load, bulk");
        wrk(port, "2s", 1, 1)?;
        let latency = wrk(port, &opts.duration, 1, 1)?;
        let before = cpu_of(weir.0.id());
        let load = wrk(port, &opts.duration, opts.connections, 1)?;
        let cpu_us_per_req = cpu_of(weir.0.id()).saturating_sub(before).as_micros() as f64
            / load.requests.max(1) as f64;
        let mut bulk_gib_s: f64 = 0.0;
        for _ in 0..3 {
            bulk_gib_s = bulk_gib_s.max(bulk(port)?);
        }
        let ebpf = admin_get(([127, 0, 0, 1], admin).into(), "/ebpf")
            .map(|(_, b)| b)
            .unwrap_or_default();
        let counters: serde_json::Value = serde_json::from_str(&ebpf).unwrap_or_default();
        modes.push(Mode {
            name,
            latency,
            load,
            cpu_us_per_req,
            bulk_gib_s,
            ebpf: if fast {
                format!(
                    "{} messages ({:.1} GiB) redirected, {} missed",
                    counters["counters"]["messages_redirected"],
                    counters["counters"]["bytes_redirected"]
                        .as_f64()
                        .unwrap_or(0.0)
                        / (1u64 << 30) as f64,
                    counters["counters"]["messages_missed"]
                )
            } else {
                "-".into()
            },
        });
        drop(weir);
        // Let the detached programs' sockets close before the next mode.
        std::thread::sleep(Duration::from_millis(300));
    }

    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nweir-bench sockmap: wrk → weir (1 worker thread{}) → nginx on loopback; latency: wrk -c1 -d{d}; load: wrk -c{c} -d{d}; bulk: one {} MiB body, best of 3\n",
        if pinned { ", on its own CPU" } else { "" },
        opts.body_mib,
        d = opts.duration,
        c = opts.connections,
    );
    let _ = writeln!(
        out,
        "| mode | -c1 p50 µs | -c1 p99 µs | -c1 req/s | -c{} req/s | -c{} p50 ms | -c{} p99 ms | weir CPU µs/req | bulk GiB/s | errors | eBPF |\n|---|---|---|---|---|---|---|---|---|---|---|",
        opts.connections, opts.connections, opts.connections
    );
    for m in &modes {
        let _ = writeln!(
            out,
            "| {} | {:.1} | {:.1} | {:.0} | {:.0} | {:.2} | {:.2} | {:.1} | {:.2} | {} | {} |",
            m.name,
            m.latency.p50_ms * 1e3,
            m.latency.p99_ms * 1e3,
            m.latency.rps,
            m.load.rps,
            m.load.p50_ms,
            m.load.p99_ms,
            m.cpu_us_per_req,
            m.bulk_gib_s,
            m.latency.errors + m.load.errors,
            m.ebpf
        );
    }
    if let [off, on] = &modes[..] {
        let _ = writeln!(
            out,
            "\nTargets: p50 at least 25% lower with the fast path: {:.0}% lower; bulk at least 30% more: {:+.0}%; (req/s at -c{}: {:+.0}%)",
            100.0 * (1.0 - on.latency.p50_ms / off.latency.p50_ms),
            100.0 * (on.bulk_gib_s / off.bulk_gib_s - 1.0),
            opts.connections,
            100.0 * (on.load.rps / off.load.rps - 1.0),
        );
    }
    print!("{out}");
    Ok(())
}
