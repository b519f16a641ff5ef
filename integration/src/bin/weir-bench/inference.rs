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

use super::{cpu_of, pin_to, spawn_weir, Res};

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
    /// weir's CPU time while the clients ran, when they went through weir.
    weir_cpu: Option<Duration>,
}

impl Load {
    /// Adds `other`'s counts, samples and time (its CPU too, when both have one).
    fn add(&mut self, other: Load) {
        self.elapsed += other.elapsed;
        self.weir_cpu = match (self.weir_cpu, other.weir_cpu) {
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
    weir_pid: Option<u32>,
) -> Load {
    let start = Instant::now();
    let cpu0 = weir_pid.map(cpu_of);
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
    total.weir_cpu = weir_pid.zip(cpu0).map(|(pid, c0)| cpu_of(pid) - c0);
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

/// The same load straight to the servers (`direct`) and through weir (`listen`, whose CPU
/// is counted), in `rounds` turns of `duration / rounds` each (who goes first alternates);
/// adds the pooled rows to `out`. Returns the pooled loads and each round's pair.
#[allow(clippy::too_many_arguments)]
async fn both(
    p: Protocol,
    direct: Vec<SocketAddr>,
    listen: SocketAddr,
    weir_pid: u32,
    streams: usize,
    tokens: u64,
    duration: Duration,
    rounds: usize,
    out: &mut String,
) -> Pooled {
    let each = duration / rounds as u32;
    let mut pooled = Pooled::default();
    for r in 0..rounds {
        let direct_load = || load(p, direct.clone(), streams, tokens, Until::After(each), None);
        let weir_load = || {
            load(
                p,
                vec![listen],
                streams,
                tokens,
                Until::After(each),
                Some(weir_pid),
            )
        };
        let (d, w) = if r % 2 == 0 {
            let d = direct_load().await;
            (d, weir_load().await)
        } else {
            let w = weir_load().await;
            (direct_load().await, w)
        };
        pooled.rounds.push(Round::of(&d, &w));
        pooled.direct.add(d);
        pooled.weir.add(w);
    }
    pooled.direct.finish();
    pooled.weir.finish();
    row(out, p, "direct", &pooled.direct);
    row(out, p, "weir", &pooled.weir);
    pooled
}

/// The loads of all rounds together, and what each round's pair showed.
#[derive(Default)]
struct Pooled {
    direct: Load,
    weir: Load,
    rounds: Vec<Round>,
}

/// One round: weir minus direct.
struct Round {
    p50_us: f64,
    p99_us: f64,
    ttft_p50_us: f64,
    ttft_p99_us: f64,
    /// weir's tokens/s over direct's.
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

/// The median of `f` over the rounds, and every round's value (for the report).
fn median_of(rounds: &[Round], f: impl Fn(&Round) -> f64) -> (f64, String) {
    super::median_and_all(rounds.iter().map(&f).collect(), |x| format!("{x:+.0}"))
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

fn row(out: &mut String, protocol: Protocol, target: &str, l: &Load) {
    let _ = writeln!(
        out,
        "| {} | {target} | {} | {:.0} | {:.2} | {:.2} | {:.0} | {:.0} | {:.0} | {} | {} |",
        protocol.name(),
        l.streams,
        l.tokens_per_s(),
        quantile_us(&l.first_token, 0.5) / 1e3,
        quantile_us(&l.first_token, 0.99) / 1e3,
        quantile_us(&l.per_message, 0.5),
        quantile_us(&l.per_message, 0.99),
        quantile_us(&l.per_message, 0.999),
        l.failures.len(),
        l.weir_cpu.map_or("-".into(), |c| format!(
            "{:.1}",
            c.as_secs_f64() * 1e6 / l.tokens.max(1) as f64
        )),
    );
}

const HEADER: &str = "| protocol | target | streams | tokens/s | TTFT p50 ms | TTFT p99 ms | per message p50 µs | p99 µs | p99.9 µs | failed | weir CPU µs/token |\n|---|---|---|---|---|---|---|---|---|---|---|";

pub fn run(weir_bin: &Path, opts: Opts) -> Res<()> {
    // The proxy gets a core of its own, as it would in production, and the clients and model
    // servers the other, direct or through weir: tokens/s then shows whether weir keeps up.
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
    let direct = |p: Protocol| -> Vec<SocketAddr> {
        sims.iter()
            .map(|s| {
                if p == Protocol::Grpc {
                    s.addr
                } else {
                    s.http_addr
                }
            })
            .collect()
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nweir-bench inference: 2 simulated model servers (in the benchmark process), weir with 1 worker thread{}, {:?} per measurement, release build; {}\n",
        if opts.fast_path {
            " and the sockmap fast path"
        } else {
            ""
        },
        opts.duration,
        if pinned {
            "clients and servers on CPU 0, weir on CPU 1"
        } else {
            "one CPU: clients, servers and weir share it"
        }
    );
    let mut failed = 0;

    // Paced: tokens every `token_delay`, as a GPU produces them; what weir adds per message.
    set_delay(opts.token_delay);
    let paced_tokens = 50;
    let _ = writeln!(
        out,
        "Paced: {} concurrent streams of {paced_tokens} tokens, one token every {:?} per stream\n\n{HEADER}",
        opts.streams, opts.token_delay
    );
    let mut added = Vec::new();
    for p in [Protocol::Grpc, Protocol::Sse] {
        // Warm-up: connections and pools.
        load(
            p,
            vec![listen],
            opts.streams,
            2,
            Until::After(Duration::from_millis(500)),
            None,
        )
        .await;
        let pooled = both(
            p,
            direct(p),
            listen,
            pid,
            opts.streams,
            paced_tokens,
            opts.duration,
            opts.rounds,
            &mut out,
        )
        .await;
        failed += pooled.direct.failures.len() + pooled.weir.failures.len();
        added.push((p, pooled));
    }
    let _ = writeln!(
        out,
        "\nAdded by weir (weir minus direct): the median over {} interleaved rounds, then each round's figure\n",
        opts.rounds
    );
    let mut worst_p99 = f64::NEG_INFINITY;
    for (p, pooled) in &added {
        let r = &pooled.rounds;
        let (p50, p50_all) = median_of(r, |r| r.p50_us);
        let (p99, p99_all) = median_of(r, |r| r.p99_us);
        let (t50, t50_all) = median_of(r, |r| r.ttft_p50_us);
        let (t99, t99_all) = median_of(r, |r| r.ttft_p99_us);
        worst_p99 = worst_p99.max(p99);
        let _ = writeln!(
            out,
            "- {}: per message p50 {p50:+.0} µs ({p50_all}), p99 {p99:+.0} µs ({p99_all}); TTFT p50 {t50:+.0} µs ({t50_all}), p99 {t99:+.0} µs ({t99_all})",
            p.name(),
        );
    }

    // Unpaced: the servers produce tokens as fast as they can; tokens/s.
    set_delay(Duration::ZERO);
    let fast_tokens = 1000;
    let _ = writeln!(
        out,
        "\nUnpaced: {} concurrent streams of {fast_tokens} tokens, no delay between tokens\n\n{HEADER}",
        opts.streams
    );
    let mut worst_ratio = f64::INFINITY;
    let mut ratios = String::new();
    for p in [Protocol::Grpc, Protocol::Sse] {
        let pooled = both(
            p,
            direct(p),
            listen,
            pid,
            opts.streams,
            fast_tokens,
            opts.duration,
            opts.rounds,
            &mut out,
        )
        .await;
        failed += pooled.direct.failures.len() + pooled.weir.failures.len();
        let (ratio, _) = median_of(&pooled.rounds, |r| r.throughput);
        worst_ratio = worst_ratio.min(ratio);
        let _ = write!(
            ratios,
            "\n- {}: tokens/s through weir over direct, median {:.1}% ({})",
            p.name(),
            ratio * 100.0,
            pooled
                .rounds
                .iter()
                .map(|r| format!("{:.1}%", r.throughput * 100.0))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    let _ = writeln!(out, "{ratios}");

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
        "\nTargets (medians over the rounds): added p99 per message < 100 µs: {worst_p99:.0} µs (worst protocol); throughput within 5% of direct: {:.1}% of direct (worst protocol); failed streams during the rolling reload: {} (must be 0); other failed streams: {failed}",
        worst_ratio * 100.0,
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
