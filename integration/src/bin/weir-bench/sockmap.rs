//! `weir-bench sockmap`: app (wrk, or a bulk reader) → weir → nginx, all on loopback, with
//! weir's eBPF sockmap fast path off and on (two weirs side by side, taking turns), in one
//! run: round-trip latency with one connection, requests/s with many, and throughput for one
//! large body. Prints the figures and the change; asserts nothing. Needs root (loading BPF).

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Instant;

use weir_integration::sockmap_env::TestCgroup;
use weir_integration::weir_process::{admin_get, free_port};

use super::{
    cpu_of, halt_poll_line, install_tools, median_and_all, pin_to, spawn_weir, start_nginx,
    wait_port, wrk, HaltPoll, Res, WrkResult,
};

pub struct Opts {
    pub duration: String,
    pub connections: u32,
    /// Size of the bulk body, in MiB.
    pub body_mib: u64,
    /// Rounds of latency and load measurements, the two modes taking turns in each.
    pub rounds: usize,
    /// Idle vCPUs poll this long before they halt, for the run (a KVM guest's haltpoll
    /// cpuidle driver); `None` leaves the machine as it is.
    pub halt_poll_ns: Option<u64>,
}

/// What one mode measured over all rounds.
#[derive(Default)]
struct Mode {
    latency: Vec<WrkResult>,
    load: Vec<WrkResult>,
    cpu_us_per_req: Vec<f64>,
    /// Best of three, in GiB/s.
    bulk_gib_s: f64,
    /// Blocking reads of the bulk downloads that failed with EAGAIN.
    bulk_eagain: u64,
    ebpf: String,
}

/// Downloads `/big` from 127.0.0.1:`port` (HTTP/1.1, reading exactly content-length bytes)
/// with blocking reads: GiB/s, and how many reads failed with EAGAIN (which a blocking read
/// must never do; Linux's sockmap receive path has been seen to, README) and were retried.
fn bulk(port: u16) -> Res<(f64, u64)> {
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port))
        .map_err(|e| format!("bulk: connecting to weir: {e}"))?;
    let start = Instant::now();
    write!(c, "GET /big HTTP/1.1\r\nhost: bench\r\n\r\n")
        .map_err(|e| format!("bulk: writing the request: {e}"))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut head = Vec::new();
    let (length, mut got) = loop {
        let n = c
            .read(&mut buf)
            .map_err(|e| format!("bulk: reading the response head: {e}"))?;
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
    let mut eagain = 0;
    while got < length {
        let n = match c.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                eagain += 1;
                continue;
            }
            Err(e) => return Err(format!("bulk: reading after {got} of {length} bytes: {e}")),
        };
        if n == 0 {
            return Err(format!("closed after {got} of {length} bytes"));
        }
        got += n as u64;
    }
    Ok((
        length as f64 / (1u64 << 30) as f64 / start.elapsed().as_secs_f64(),
        eagain,
    ))
}

pub fn run(weir_bin: &Path, opts: Opts) -> Res<()> {
    if unsafe { libc::geteuid() } != 0 {
        return Err("loading BPF needs root (CAP_BPF and CAP_NET_ADMIN)".into());
    }
    if let Some(why) = weir_ebpf::unavailable_reason() {
        return Err(format!("weir was built without its BPF programs: {why}"));
    }
    install_tools(&["wrk", "nginx"])?;
    let _halt_poll = opts.halt_poll_ns.map(HaltPoll::set).transpose()?;
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

    // Both weirs run side by side, and each round measures both, in alternating order: a
    // slow moment of the machine shows in both modes of a round instead of deciding one.
    // The off weir's traffic is not the on weir's (its ports are not in scope, its process
    // is another), so the on weir's programs leave it alone.
    let mut weirs = Vec::new();
    for fast in [false, true] {
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
        wrk(port, "2s", 1, 1)?;
        weirs.push((weir, port, admin));
    }
    let mut modes = [Mode::default(), Mode::default()];
    for round in 0..opts.rounds {
        eprintln!(
            "round {} of {}: latency and load, both modes",
            round + 1,
            opts.rounds
        );
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for m in order {
            let (weir, port, _) = &weirs[m];
            modes[m].latency.push(wrk(*port, &opts.duration, 1, 1)?);
            let before = cpu_of(weir.0.id());
            let load = wrk(*port, &opts.duration, opts.connections, 1)?;
            modes[m].cpu_us_per_req.push(
                cpu_of(weir.0.id()).saturating_sub(before).as_micros() as f64
                    / load.requests.max(1) as f64,
            );
            modes[m].load.push(load);
        }
    }
    eprintln!("bulk: best of 3 per mode, taking turns");
    for _ in 0..3 {
        for (m, (_, port, _)) in weirs.iter().enumerate() {
            let (gib_s, eagain) = bulk(*port)?;
            modes[m].bulk_gib_s = modes[m].bulk_gib_s.max(gib_s);
            modes[m].bulk_eagain += eagain;
        }
    }
    let ebpf = admin_get(([127, 0, 0, 1], weirs[1].2).into(), "/ebpf")
        .map(|(_, b)| b)
        .unwrap_or_default();
    let counters: serde_json::Value = serde_json::from_str(&ebpf).unwrap_or_default();
    modes[0].ebpf = "-".into();
    modes[1].ebpf = format!(
        "{} messages ({:.1} GiB) redirected, {} missed",
        counters["counters"]["messages_redirected"],
        counters["counters"]["bytes_redirected"]
            .as_f64()
            .unwrap_or(0.0)
            / (1u64 << 30) as f64,
        counters["counters"]["messages_missed"]
    );
    drop(weirs);

    let mut out = String::new();
    let median = |v: Vec<f64>| median_and_all(v, |_| String::new()).0;
    let _ = writeln!(
        out,
        "\nweir-bench sockmap: wrk → weir (1 worker thread{}) → nginx on loopback, fast path off and on side by side; {} rounds, each measuring both modes in turn (latency: wrk -c1 -d{d}; load: wrk -c{c} -d{d}); medians of the rounds; bulk: one {} MiB body, best of 3\n",
        if pinned { ", on its own CPU" } else { "" },
        opts.rounds,
        opts.body_mib,
        d = opts.duration,
        c = opts.connections,
    );
    if let Some(line) = halt_poll_line(
        opts.halt_poll_ns,
        "a wake-up across CPUs costs a VM exit, about 50 µs here, four times per -c1 request, which the fast path does not remove.",
    ) {
        let _ = writeln!(out, "{line}\n");
    }
    let _ = writeln!(
        out,
        "| mode | -c1 p50 µs | -c1 p99 µs | -c1 req/s | -c{} req/s | -c{} p50 ms | -c{} p99 ms | weir CPU µs/req | bulk GiB/s | errors | eBPF |\n|---|---|---|---|---|---|---|---|---|---|---|",
        opts.connections, opts.connections, opts.connections
    );
    for (name, m) in ["fast path off", "fast path on"].iter().zip(&modes) {
        let of = |v: &[WrkResult], f: fn(&WrkResult) -> f64| median(v.iter().map(f).collect());
        let errors: u64 = m.latency.iter().chain(&m.load).map(|r| r.errors).sum();
        let _ = writeln!(
            out,
            "| {name} | {:.1} | {:.1} | {:.0} | {:.0} | {:.2} | {:.2} | {:.1} | {:.2} | {errors} | {} |",
            of(&m.latency, |r| r.p50_ms) * 1e3,
            of(&m.latency, |r| r.p99_ms) * 1e3,
            of(&m.latency, |r| r.rps),
            of(&m.load, |r| r.rps),
            of(&m.load, |r| r.p50_ms),
            of(&m.load, |r| r.p99_ms),
            median(m.cpu_us_per_req.clone()),
            m.bulk_gib_s,
            m.ebpf
        );
    }
    let [off, on] = &modes;
    let per_round = |a: &[WrkResult], b: &[WrkResult], f: fn(&WrkResult, &WrkResult) -> f64| {
        median_and_all(a.iter().zip(b).map(|(x, y)| f(x, y)).collect(), |v| {
            format!("{v:.0}%")
        })
    };
    let (p50, p50_rounds) = per_round(&off.latency, &on.latency, |x, y| {
        100.0 * (1.0 - y.p50_ms / x.p50_ms)
    });
    let (rps, rps_rounds) = per_round(&off.load, &on.load, |x, y| 100.0 * (y.rps / x.rps - 1.0));
    let _ = writeln!(
        out,
        "\nTargets: p50 at least 25% lower with the fast path: {p50:.0}% lower (median of the rounds: {p50_rounds}); bulk at least 30% more: {:+.0}%; (req/s at -c{}: {rps:+.0}%, rounds: {rps_rounds})",
        100.0 * (on.bulk_gib_s / off.bulk_gib_s - 1.0),
        opts.connections,
    );
    let eagain: Vec<u64> = modes.iter().map(|m| m.bulk_eagain).collect();
    if eagain.iter().any(|&n| n > 0) {
        let _ = writeln!(
            out,
            "\n!!! blocking reads of the bulk downloads that failed with EAGAIN (retried): fast path off {}, on {} (README: Linux's sockmap receive path)",
            eagain[0], eagain[1]
        );
    }
    print!("{out}");
    Ok(())
}
