//! `weir-bench inference`: streamed inference through weir versus straight to the model
//! servers, in one run. Two simulated model servers (KServe v2 gRPC and OpenAI SSE, in this
//! process, so the client and the servers share one clock) stamp every token with the moment
//! they sent it; clients measure time to first token, the time each message took to arrive and
//! tokens/s. Direct and weir take turns, round after round, and the added cost is the median of
//! the rounds' differences: on a noisy machine a single pair of runs can differ by
//! milliseconds at p99 whatever the proxy does. Then a rolling weight reload of both servers
//! under stream load counts failed or truncated streams. Prints the figures and the added
//! cost; asserts nothing.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use weir_integration::inference_client::{
    http_client, kserve_client, reload_through_admin, sse_stream, stream_on, StreamTimes,
};
use weir_integration::model_server::ModelServer;
use weir_integration::weir_process::{admin_get, free_port};

use super::{
    cpu_of, haproxy_bin, install_tools, on_cpu_1, pin_to, spawn_weir, wait_port, Proc, Res,
};

pub struct Opts {
    /// How long each measurement runs (direct and weir each, over all rounds).
    pub duration: Duration,
    /// Rounds of direct-then-weir (or weir-then-direct) per measurement.
    pub rounds: usize,
    /// Concurrent streams in the latency and throughput measurements.
    pub streams: usize,
    /// Delay between tokens in the paced measurement.
    pub token_delay: Duration,
    /// Concurrent streams during the rolling reload.
    pub reload_streams: usize,
    /// weir runs with `fast_path: sockmap`.
    pub fast_path: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum Protocol {
    Grpc,
    Sse,
}

impl Protocol {
    fn name(self) -> &'static str {
        match self {
            Protocol::Grpc => "KServe gRPC",
            Protocol::Sse => "OpenAI SSE",
        }
    }
}

/// What a set of clients saw.
#[derive(Default)]
struct Load {
    tokens: u64,
    streams: u64,
    elapsed: Duration,
    first_token: Vec<u64>,
    per_message: Vec<u64>,
    failures: Vec<String>,
    /// Versions the streams ran on.
    versions: std::collections::BTreeMap<String, u64>,
    /// The proxy's CPU time while the clients ran, when they went through one.
    proxy_cpu: Option<Duration>,
    /// This process's CPU time (clients and servers) while the clients ran.
    own_cpu: Duration,
}

impl Load {
    /// Adds `other`'s counts, samples and time (its CPU too, when both have one).
    fn add(&mut self, other: Load) {
        self.elapsed += other.elapsed;
        self.own_cpu += other.own_cpu;
        self.proxy_cpu = match (self.proxy_cpu, other.proxy_cpu) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        self.tokens += other.tokens;
        self.streams += other.streams;
        self.first_token.extend(other.first_token);
        self.per_message.extend(other.per_message);
        self.failures.extend(other.failures);
        for (v, n) in other.versions {
            *self.versions.entry(v).or_default() += n;
        }
    }

    /// Sorts the samples, for [`quantile_us`].
    fn finish(&mut self) {
        self.first_token.sort_unstable();
        self.per_message.sort_unstable();
    }

    fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The `q` quantile (0..=1) of `v`, which is sorted, in microseconds.
fn quantile_us(v: &[u64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i] as f64 / 1e3
}

/// Runs `streams` clients, spread over `targets`, each running streams of `tokens` tokens one
/// after another until `duration` has passed (or `stop` is set, when given).
async fn load(
    protocol: Protocol,
    targets: Vec<SocketAddr>,
    streams: usize,
    tokens: u64,
    until: Until,
    proxy_pid: Option<u32>,
) -> Load {
    let start = Instant::now();
    let cpu0 = proxy_pid.map(cpu_of);
    let own0 = cpu_of(std::process::id());
    let mut tasks = Vec::new();
    for c in 0..streams {
        let target = targets[c % targets.len()];
        let until = until.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Load::default();
            let mut grpc = None;
            let http = http_client();
            let mut n = 0u64;
            while !until.done(start) {
                let result = match protocol {
                    Protocol::Grpc => {
                        if grpc.is_none() {
                            grpc = kserve_client(target).await.ok();
                        }
                        match grpc.as_mut() {
                            Some(client) => {
                                stream_on(client, &format!("c{c}-{n}"), tokens as i64).await
                            }
                            None => Err(format!("connect to {target} failed")),
                        }
                    }
                    Protocol::Sse => sse_stream(&http, target, tokens).await,
                };
                n += 1;
                match result {
                    Ok((
                        version,
                        StreamTimes {
                            first_token,
                            per_message,
                        },
                    )) => {
                        out.streams += 1;
                        out.tokens += tokens;
                        out.first_token.push(first_token);
                        out.per_message.extend(per_message);
                        *out.versions.entry(version).or_default() += 1;
                    }
                    Err(e) => {
                        out.failures.push(e);
                        // A fresh connection for the next try.
                        grpc = None;
                    }
                }
            }
            out
        }));
    }
    let mut total = Load::default();
    for t in tasks {
        match t.await {
            Ok(l) => total.add(l),
            Err(e) => total.failures.push(format!("client task: {e}")),
        }
    }
    total.elapsed = start.elapsed();
    total.proxy_cpu = proxy_pid.zip(cpu0).map(|(pid, c0)| cpu_of(pid) - c0);
    total.own_cpu = cpu_of(std::process::id()) - own0;
    total.finish();
    total
}

/// When a client stops starting streams.
#[derive(Clone)]
enum Until {
    After(Duration),
    Stopped(Arc<AtomicBool>),
}

impl Until {
    fn done(&self, start: Instant) -> bool {
        match self {
            Until::After(d) => start.elapsed() >= *d,
            Until::Stopped(stop) => stop.load(Ordering::Relaxed),
        }
    }
}

/// What a measurement sends its streams to: the servers themselves, or a proxy in front of
/// them (whose CPU is counted).
struct Target {
    name: &'static str,
    grpc: Vec<SocketAddr>,
    sse: Vec<SocketAddr>,
    pid: Option<u32>,
}

impl Target {
    fn addrs(&self, p: Protocol) -> Vec<SocketAddr> {
        match p {
            Protocol::Grpc => self.grpc.clone(),
            Protocol::Sse => self.sse.clone(),
        }
    }
}

/// The same load to every target (the first is direct, the others proxies), in `rounds`
/// turns of `duration / rounds` each (who goes first rotates); adds the pooled rows to
/// `out`. Returns the pooled loads and, per round, each proxy's figures minus direct's.
#[allow(clippy::too_many_arguments)]
async fn compare(
    p: Protocol,
    targets: &[Target],
    streams: usize,
    tokens: u64,
    duration: Duration,
    rounds: usize,
    out: &mut String,
) -> Pooled {
    let each = duration / rounds as u32;
    let mut pooled = Pooled {
        loads: targets.iter().map(|_| Load::default()).collect(),
        rounds: Vec::new(),
    };
    for r in 0..rounds {
        let mut round: Vec<Load> = targets.iter().map(|_| Load::default()).collect();
        for k in 0..targets.len() {
            let i = (k + r) % targets.len();
            let t = &targets[i];
            round[i] = load(p, t.addrs(p), streams, tokens, Until::After(each), t.pid).await;
        }
        pooled
            .rounds
            .push(round[1..].iter().map(|l| Round::of(&round[0], l)).collect());
        for (all, l) in pooled.loads.iter_mut().zip(round) {
            all.add(l);
        }
    }
    for (t, l) in targets.iter().zip(&mut pooled.loads) {
        l.finish();
        row(out, p, t.name, l);
    }
    pooled
}

/// The loads of all rounds together (one per target), and what each round showed (per
/// round, one per proxy).
struct Pooled {
    loads: Vec<Load>,
    rounds: Vec<Vec<Round>>,
}

/// One round: a proxy minus direct.
struct Round {
    p50_us: f64,
    p99_us: f64,
    ttft_p50_us: f64,
    ttft_p99_us: f64,
    /// The proxy's tokens/s over direct's.
    throughput: f64,
}

impl Round {
    fn of(d: &Load, w: &Load) -> Self {
        let q = |l: &Load, q: f64| quantile_us(&l.per_message, q);
        let t = |l: &Load, q: f64| quantile_us(&l.first_token, q);
        Round {
            p50_us: q(w, 0.5) - q(d, 0.5),
            p99_us: q(w, 0.99) - q(d, 0.99),
            ttft_p50_us: t(w, 0.5) - t(d, 0.5),
            ttft_p99_us: t(w, 0.99) - t(d, 0.99),
            throughput: w.tokens_per_s() / d.tokens_per_s().max(1e-9),
        }
    }
}

/// The median of `f` over the rounds for proxy `i` (0 is the first proxy), and every round's
/// value (for the report).
fn median_of(pooled: &Pooled, i: usize, f: impl Fn(&Round) -> f64) -> (f64, String) {
    super::median_and_all(pooled.rounds.iter().map(|r| f(&r[i])).collect(), |x| {
        format!("{x:+.0}")
    })
}

fn config(listen: SocketAddr, admin: SocketAddr, sims: &[ModelServer], fast_path: bool) -> String {
    let eps = |http: bool| -> String {
        sims.iter()
            .map(|s| {
                let a = if http { s.http_addr } else { s.addr };
                format!("      - {{ address: \"{a}\", models: [{{ name: llama }}] }}\n")
            })
            .collect()
    };
    // No in-flight limit (the clients are the bound); readiness polling off (the benchmark
    // signals reloads itself).
    let settings = "    max_in_flight: 0\n    reload: { drain_deadline: 30s, poll_interval: 0s }\n";
    format!(
        "admin: {{ address: \"{admin}\" }}\n\
         listeners:\n  - {{ name: bench, address: \"{listen}\" }}\n\
         routes:\n\
         \x20 - name: openai\n    match: {{ path: {{ prefix: /v1/ }} }}\n    route: {{ pool: llm-http }}\n\
         \x20 - name: kserve\n    route: {{ pool: llm }}\n\
         inference_pools:\n\
         \x20 - name: llm\n    protocol: kserve_grpc\n    endpoints:\n{}{settings}\
         \x20 - name: llm-http\n    protocol: openai\n    endpoints:\n{}{settings}{}",
        eps(false),
        eps(true),
        if fast_path { "fast_path: sockmap\n" } else { "" },
    )
}

/// HAProxy in front of the same servers as weir: gRPC (h2c) to the KServe servers, paths
/// under `/v1/` to the OpenAI ones; an HTTP/2 client is told by its preface. Configured for
/// streaming as an operator would: `http-no-delay` (without it HAProxy sends with `MSG_MORE`
/// and a streamed token waits ~100 ms for the next).
fn haproxy_config(listen: SocketAddr, grpc: &[SocketAddr], sse: &[SocketAddr]) -> String {
    let servers = |name: &str, addrs: &[SocketAddr], proto: &str| -> String {
        addrs
            .iter()
            .enumerate()
            .map(|(i, a)| format!("  server {name}{i} {a}{proto}\n"))
            .collect()
    };
    format!(
        "global\n  nbthread 1\n  maxconn 8000\n\
         defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  option http-no-delay\n\
         frontend bench\n  bind {listen}\n  use_backend openai if {{ path_beg /v1/ }}\n  default_backend kserve\n\
         backend kserve\n  balance roundrobin\n{}\
         backend openai\n  balance roundrobin\n{}",
        servers("k", grpc, " proto h2"),
        servers("o", sse, ""),
    )
}

/// `haproxy -v`'s version, for the report.
fn haproxy_version() -> String {
    std::process::Command::new(haproxy_bin())
        .arg("-v")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .nth(2)
                .map(str::to_string)
        })
        .unwrap_or_else(|| "(version unknown)".into())
}

fn row(out: &mut String, protocol: Protocol, target: &str, l: &Load) {
    let _ = writeln!(
        out,
        "| {} | {target} | {} | {:.0} | {:.2} | {:.2} | {:.0} | {:.0} | {:.0} | {} | {:.1} | {} |",
        protocol.name(),
        l.streams,
        l.tokens_per_s(),
        quantile_us(&l.first_token, 0.5) / 1e3,
        quantile_us(&l.first_token, 0.99) / 1e3,
        quantile_us(&l.per_message, 0.5),
        quantile_us(&l.per_message, 0.99),
        quantile_us(&l.per_message, 0.999),
        l.failures.len(),
        l.own_cpu.as_secs_f64() * 1e6 / l.tokens.max(1) as f64,
        l.proxy_cpu.map_or("-".into(), |c| format!(
            "{:.1}",
            c.as_secs_f64() * 1e6 / l.tokens.max(1) as f64
        )),
    );
}

const HEADER: &str = "| protocol | target | streams | tokens/s | TTFT p50 ms | TTFT p99 ms | per message p50 µs | p99 µs | p99.9 µs | failed | clients and servers CPU µs/token | proxy CPU µs/token |\n|---|---|---|---|---|---|---|---|---|---|---|---|";

pub fn run(weir_bin: &Path, opts: Opts) -> Res<()> {
    // The proxy gets a core of its own, as it would in production, and the clients and model
    // servers the other, direct or through weir: tokens/s then shows whether weir keeps up.
    install_tools(&["haproxy"])?;
    let pinned = std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2);
    if pinned {
        pin_to(0)?;
    }
    tokio::runtime::Runtime::new()
        .map_err(|e| e.to_string())?
        .block_on(bench(weir_bin, opts, pinned))
}

async fn bench(weir_bin: &Path, opts: Opts, pinned: bool) -> Res<()> {
    let sims = [
        ModelServer::start(&["llama"]).await,
        ModelServer::start(&["llama"]).await,
    ];
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let listen: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let conf = dir.path().join("weir.yaml");
    std::fs::write(&conf, config(listen, admin, &sims, opts.fast_path))
        .map_err(|e| e.to_string())?;
    let weir = spawn_weir(weir_bin, &conf, &dir.path().join("weir.log"), pinned)?;
    let ready_by = Instant::now() + Duration::from_secs(20);
    while !matches!(admin_get(admin, "/ready"), Ok((200, _))) {
        if Instant::now() > ready_by {
            return Err(format!(
                "weir did not become ready: {}",
                std::fs::read_to_string(dir.path().join("weir.log")).unwrap_or_default()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = weir.0.id();
    let set_delay = |d: Duration| {
        for s in &sims {
            s.load
                .token_delay_us
                .store(d.as_micros() as u64, Ordering::Relaxed);
        }
    };
    let grpc: Vec<SocketAddr> = sims.iter().map(|s| s.addr).collect();
    let sse: Vec<SocketAddr> = sims.iter().map(|s| s.http_addr).collect();
    // HAProxy in front of the same servers, measured in the same rounds: what a proxy that
    // is no weir adds on this machine.
    let haproxy_listen: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let haproxy_conf = dir.path().join("haproxy.cfg");
    std::fs::write(&haproxy_conf, haproxy_config(haproxy_listen, &grpc, &sse))
        .map_err(|e| e.to_string())?;
    let haproxy = Proc::spawn(
        "haproxy",
        on_cpu_1(haproxy_bin(), pinned)
            .arg("-db")
            .arg("-f")
            .arg(&haproxy_conf),
        &dir.path().join("haproxy.log"),
    )?;
    wait_port(haproxy_listen.port(), "haproxy")?;
    let targets = [
        Target {
            name: "direct",
            grpc: grpc.clone(),
            sse: sse.clone(),
            pid: None,
        },
        Target {
            name: "weir",
            grpc: vec![listen],
            sse: vec![listen],
            pid: Some(pid),
        },
        Target {
            name: "HAProxy",
            grpc: vec![haproxy_listen],
            sse: vec![haproxy_listen],
            pid: Some(haproxy.0.id()),
        },
    ];
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nweir-bench inference: 2 simulated model servers (in the benchmark process), weir with 1 worker thread{} and HAProxy {} (nbthread 1), {:?} per measurement, release build; {}\n",
        if opts.fast_path {
            " and the sockmap fast path"
        } else {
            ""
        },
        haproxy_version(),
        opts.duration,
        if pinned {
            "clients and servers on CPU 0, each proxy on CPU 1"
        } else {
            "one CPU: clients, servers and the proxies share it"
        }
    );
    let mut failed = 0;

    // Paced: tokens every `token_delay`, as a GPU produces them; what a proxy adds per
    // message.
    set_delay(opts.token_delay);
    let paced_tokens = 50;
    let _ = writeln!(
        out,
        "Paced: {} concurrent streams of {paced_tokens} tokens, one token every {:?} per stream\n\n{HEADER}",
        opts.streams, opts.token_delay
    );
    let mut paced = Vec::new();
    for p in [Protocol::Grpc, Protocol::Sse] {
        // Warm-up: connections and pools.
        for t in &targets[1..] {
            load(
                p,
                t.addrs(p),
                opts.streams,
                2,
                Until::After(Duration::from_millis(500)),
                None,
            )
            .await;
        }
        let pooled = compare(
            p,
            &targets,
            opts.streams,
            paced_tokens,
            opts.duration,
            opts.rounds,
            &mut out,
        )
        .await;
        failed += pooled.loads.iter().map(|l| l.failures.len()).sum::<usize>();
        paced.push((p, pooled));
    }
    let _ = writeln!(
        out,
        "\nAdded by each proxy (its figure minus direct's): the median over {} interleaved rounds, then each round's figure\n",
        opts.rounds
    );
    // The worst protocol's added p99, per proxy.
    let mut worst_p99 = vec![f64::NEG_INFINITY; targets.len() - 1];
    for (p, pooled) in &paced {
        for (i, t) in targets[1..].iter().enumerate() {
            let (p50, p50_all) = median_of(pooled, i, |r| r.p50_us);
            let (p99, p99_all) = median_of(pooled, i, |r| r.p99_us);
            let (t50, t50_all) = median_of(pooled, i, |r| r.ttft_p50_us);
            let (t99, t99_all) = median_of(pooled, i, |r| r.ttft_p99_us);
            worst_p99[i] = worst_p99[i].max(p99);
            let _ = writeln!(
                out,
                "- {}, {}: per message p50 {p50:+.0} µs ({p50_all}), p99 {p99:+.0} µs ({p99_all}); TTFT p50 {t50:+.0} µs ({t50_all}), p99 {t99:+.0} µs ({t99_all})",
                p.name(),
                t.name,
            );
        }
    }

    // Unpaced: the servers produce tokens as fast as they can; tokens/s.
    set_delay(Duration::ZERO);
    let fast_tokens = 1000;
    let _ = writeln!(
        out,
        "\nUnpaced: {} concurrent streams of {fast_tokens} tokens, no delay between tokens\n\n{HEADER}",
        opts.streams
    );
    let mut worst_ratio = vec![f64::INFINITY; targets.len() - 1];
    let mut ratios = String::new();
    for p in [Protocol::Grpc, Protocol::Sse] {
        let pooled = compare(
            p,
            &targets,
            opts.streams,
            fast_tokens,
            opts.duration,
            opts.rounds,
            &mut out,
        )
        .await;
        failed += pooled.loads.iter().map(|l| l.failures.len()).sum::<usize>();
        for (i, t) in targets[1..].iter().enumerate() {
            let (ratio, _) = median_of(&pooled, i, |r| r.throughput);
            worst_ratio[i] = worst_ratio[i].min(ratio);
            let _ = write!(
                ratios,
                "\n- {}: tokens/s through {} over direct, median {:.1}% ({})",
                p.name(),
                t.name,
                ratio * 100.0,
                pooled
                    .rounds
                    .iter()
                    .map(|r| format!("{:.1}%", r[i].throughput * 100.0))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
    }
    let _ = writeln!(out, "{ratios}");
    let _ = writeln!(
        out,
        "\n\"clients and servers CPU\" is this process's CPU per token: direct, a client and its server share CPU 0 and wake each other there; through a proxy each message crosses to the proxy's CPU and back, and waking a CPU costs its waker. Unpaced, the clients and servers fill CPU 0, so what they spend more per token is tokens/s lost whatever the proxy's own speed."
    );
    drop(haproxy);

    // A rolling weight reload of both servers, one after the other, under stream load.
    set_delay(opts.token_delay);
    let stop = Arc::new(AtomicBool::new(false));
    let half = opts.reload_streams / 2;
    let grpc = tokio::spawn(load(
        Protocol::Grpc,
        vec![listen],
        opts.reload_streams - half,
        paced_tokens,
        Until::Stopped(stop.clone()),
        None,
    ));
    let sse = tokio::spawn(load(
        Protocol::Sse,
        vec![listen],
        half,
        paced_tokens,
        Until::Stopped(stop.clone()),
        None,
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rollout = Instant::now();
    let mut rollout_error = None;
    for s in &sims {
        let eps = [("llm", s.addr), ("llm-http", s.http_addr)];
        if let Err(e) = reload_through_admin(admin, &eps, s.addr, "2").await {
            rollout_error = Some(e);
            break;
        }
    }
    let rollout = rollout.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut during = grpc.await.map_err(|e| e.to_string())?;
    during.add(sse.await.map_err(|e| e.to_string())?);
    let _ = writeln!(
        out,
        "\nRolling reload of both servers (drain, RepositoryModelLoad, finished) under {} concurrent streams ({} gRPC, {half} SSE) of {paced_tokens} tokens: \
         took {:.2} s, {} streams completed ({}), {} failed or truncated{}",
        opts.reload_streams,
        opts.reload_streams - half,
        rollout.as_secs_f64(),
        during.streams,
        during
            .versions
            .iter()
            .map(|(v, n)| format!("{n} on v{v}"))
            .collect::<Vec<_>>()
            .join(", "),
        during.failures.len(),
        rollout_error.map_or(String::new(), |e| format!("; the rollout stopped: {e}")),
    );
    for f in during.failures.iter().take(5) {
        let _ = writeln!(out, "  failure: {f}");
    }
    let _ = writeln!(
        out,
        "\nTargets (medians over the rounds): added p99 per message < 100 µs: weir {:.0} µs (HAProxy {:.0} µs in the same rounds; worst protocol); throughput within 5% of direct: weir {:.1}% of direct (HAProxy {:.1}%; worst protocol); failed streams during the rolling reload: {} (must be 0); other failed streams: {failed}",
        worst_p99[0],
        worst_p99[1],
        worst_ratio[0] * 100.0,
        worst_ratio[1] * 100.0,
        during.failures.len()
    );
    if opts.fast_path {
        // What the fast path did: its counters from weir's metrics.
        let metrics =
            admin_get(admin, "/stats/prometheus").map_or_else(|e| e.to_string(), |(_, body)| body);
        let sockmap: Vec<&str> = metrics
            .lines()
            .filter(|l| l.starts_with("weir_sockmap_"))
            .collect();
        let _ = writeln!(out, "\nFast path: {}", sockmap.join(", "));
    }
    print!("{out}");
    Ok(())
}
