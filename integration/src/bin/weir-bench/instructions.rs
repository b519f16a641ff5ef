//! `weir-bench instructions`: the user-space instructions a proxy executes per request, every
//! thread counted, under valgrind's callgrind: weir, weir tracing every request, bare pingora
//! and HAProxy (not Envoy: not tried under valgrind). Time per request on this kind of VM
//! moves by 30% between runs; an instruction count by 0.2% at most, so it can compare two
//! builds, tell weir's own work from pingora's, and price tracing. It sees neither the kernel
//! (about half of a request's time here) nor cache misses: it complements `weir-bench http`,
//! it does not replace it.
//!
//! glibc copies and fills of more than a few KiB with `rep movsb` / `rep stosb`, and callgrind
//! counts each byte of those as an instruction: a 10 KiB copy counted 10,031, against 964 as
//! the vector loop glibc uses below the threshold (what the copy costs, within a few times).
//! pingora boxes each request's `process_new_http` future (~10 KiB; `async_trait`), and that
//! copy alone counted ~10,500 of weir's ~78,000 per request. Every target therefore runs with
//! the thresholds out of reach ([`NO_REP_STRINGS`]).

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use weir_integration::weir_process::free_port;

use super::{
    build_pingora_bare, build_weir, haproxy_bin, haproxy_config, install_tools, run, start_nginx,
    weir_bench_config, wrk, Proc, Res,
};

pub struct Opts {
    /// wrk duration of the counted load, e.g. 8s (valgrind runs a proxy ~50x slower).
    pub duration: String,
    pub connections: u32,
    /// Keep callgrind's output files instead of removing them with the run's directory.
    pub keep: bool,
}

struct Counted {
    name: &'static str,
    requests: u64,
    per_request: f64,
}

pub fn run_all(opts: &Opts) -> Res<()> {
    install_tools(&["wrk", "nginx", "haproxy", "valgrind"])?;
    let weir = build_weir()?;
    let bare = build_pingora_bare()?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let d = dir.path();
    let (_nginx, nginx_port) = start_nginx(d)?;
    // A live collector, so the traced weir exports as it would in production.
    let collector = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    let (_spans, otlp) =
        collector.block_on(weir_integration::otlp_receiver::OtlpReceiver::start_counting());

    let mut rows = Vec::new();
    for (name, tracing) in [("weir", false), ("weir + traces (100%)", true)] {
        let port = free_port();
        let mut conf = weir_bench_config(port, free_port(), nginx_port);
        if tracing {
            let _ = writeln!(
                conf,
                "tracing: {{ otlp_endpoint: \"http://{otlp}\", sampling: 1.0 }}"
            );
        }
        let path = d.join(format!("{}.yaml", rows.len()));
        std::fs::write(&path, conf).map_err(|e| e.to_string())?;
        let args = [
            "run".into(),
            "--threads".into(),
            "1".into(),
            "--config".into(),
            path.display().to_string(),
        ];
        rows.push(count(name, &weir, &args, port, d, opts)?);
    }
    let port = free_port();
    let args = [
        format!("127.0.0.1:{port}"),
        format!("127.0.0.1:{nginx_port}"),
        "1".into(),
    ];
    rows.push(count(super::PINGORA_BARE, &bare, &args, port, d, opts)?);
    let port = free_port();
    let cfg = d.join("haproxy.cfg");
    std::fs::write(&cfg, haproxy_config(port, nginx_port)).map_err(|e| e.to_string())?;
    let args = ["-db".into(), "-f".into(), cfg.display().to_string()];
    rows.push(count(
        "haproxy",
        Path::new(&haproxy_bin()),
        &args,
        port,
        d,
        opts,
    )?);
    print!("{}", report(&rows, opts));
    if opts.keep {
        let kept = dir.keep();
        println!(
            "callgrind output kept in {} (callgrind.<port>.<pid>.1, in the order measured)",
            kept.display()
        );
    }
    Ok(())
}

/// glibc's tunables that keep `memcpy` / `memmove` / `memset` off `rep movsb` / `rep stosb`,
/// which callgrind counts one instruction per byte (module doc).
const NO_REP_STRINGS: &str =
    "glibc.cpu.x86_rep_movsb_threshold=4294967295:glibc.cpu.x86_rep_stosb_threshold=4294967295";

/// Starts `program` under callgrind, warms it up, counts the instructions of `opts.duration`
/// of wrk load (the counters are zeroed just before and dumped just after), and stops it.
fn count(
    name: &'static str,
    program: &Path,
    args: &[String],
    port: u16,
    d: &Path,
    opts: &Opts,
) -> Res<Counted> {
    eprintln!("{name}: under callgrind");
    let out = d.join(format!("callgrind.{port}"));
    let proc = Proc::spawn(
        "valgrind",
        Command::new("valgrind")
            .arg("--tool=callgrind")
            .arg(format!("--callgrind-out-file={}.%p", out.display()))
            .arg(program)
            .args(args)
            .env("RUST_LOG", "warn")
            .env("GLIBC_TUNABLES", NO_REP_STRINGS),
        &d.join(format!("valgrind.{port}.log")),
    )?;
    let pid = proc.0.id().to_string();
    let started = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > started {
            return Err(format!("{name} did not listen on {port} under valgrind"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Pools, caches and lazily built state in steady state first.
    wrk(port, "3s", opts.connections, 1)?;
    run(Command::new("callgrind_control").args(["-z", &pid]))?;
    let load = wrk(port, &opts.duration, opts.connections, 1)?;
    run(Command::new("callgrind_control").args(["-d", &pid]))?;
    let dump = format!("{}.{pid}.1", out.display());
    let total = (0..50)
        .find_map(|_| {
            let text = std::fs::read_to_string(&dump).ok();
            let summary = text.as_deref().and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("summary: "))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            });
            if summary.is_none() {
                std::thread::sleep(Duration::from_millis(100));
            }
            summary
        })
        .ok_or_else(|| format!("no callgrind summary in {dump}"))?;
    drop(proc);
    if load.errors > 0 {
        return Err(format!(
            "{name}: {} failed requests under valgrind",
            load.errors
        ));
    }
    eprintln!("  {} requests", load.requests);
    Ok(Counted {
        name,
        requests: load.requests,
        per_request: total as f64 / load.requests.max(1) as f64,
    })
}

fn report(rows: &[Counted], opts: &Opts) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nweir-bench instructions: user-space instructions per request (every thread, callgrind; large copies and fills as vector loops, not `rep movsb`/`rep stosb`, which callgrind counts per byte), wrk -t1 -c{} -d{} under valgrind, HTTP/1.1 keep-alive GET, one nginx upstream, 1 worker thread\n",
        opts.connections, opts.duration
    );
    let _ = writeln!(
        out,
        "| target | requests counted | instructions / request | vs weir |\n|---|---|---|---|"
    );
    let weir = rows
        .iter()
        .find(|r| r.name == "weir")
        .map(|r| r.per_request);
    for r in rows {
        let vs = weir.map_or("-".into(), |w| {
            format!("{:+.1}%", 100.0 * (r.per_request / w - 1.0))
        });
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {vs} |",
            r.name, r.requests, r.per_request
        );
    }
    let per = |name: &str| rows.iter().find(|r| r.name == name).map(|r| r.per_request);
    if let (Some(w), Some(p)) = (weir, per(super::PINGORA_BARE)) {
        let _ = writeln!(
            out,
            "\nweir's own work over bare pingora: {:+.0} instructions per request ({:+.1}% of pingora's)",
            w - p,
            100.0 * (w / p - 1.0)
        );
    }
    if let (Some(w), Some(p), Some(h)) = (weir, per(super::PINGORA_BARE), per("haproxy")) {
        let _ = writeln!(
            out,
            "Against HAProxy (nbthread 1): weir {:.2}x its instructions per request, bare pingora {:.2}x",
            w / h,
            p / h
        );
    }
    if let (Some(w), Some(t)) = (weir, per("weir + traces (100%)")) {
        let _ = writeln!(
            out,
            "Tracing at 100% with OTLP export: {:+.0} instructions per request ({:+.1}%). The http bench's target is under 5% throughput cost.",
            t - w,
            100.0 * (t / w - 1.0)
        );
    }
    out
}
