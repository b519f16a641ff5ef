//! `weir`: run the proxy, or validate config files.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use weir_control::client::ClientOptions;
use weir_control::pb::Node;
use weir_policies::{load_str, EMBEDDED_DEFAULT};
use weir_proxy::control::{initial, ControlOptions};
use weir_proxy::reload::load_file;
use weir_proxy::server::{run, RunOptions, Source};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "weir", version, about = "weir: a service-mesh data plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once at start
enum Command {
    /// Run the proxy (on the embedded default config without --config).
    Run {
        /// Config file; reloaded when it changes and on SIGHUP.
        #[arg(long, short, conflicts_with = "control_plane")]
        config: Option<PathBuf>,
        /// Take the config from this control plane instead of a file, e.g. http://127.0.0.1:15010.
        #[arg(long)]
        control_plane: Option<String>,
        /// This proxy's identity towards the control plane.
        #[arg(long, requires = "control_plane")]
        node_id: Option<String>,
        /// The node's cluster (e.g. the workload name).
        #[arg(long, default_value = "", requires = "control_plane")]
        node_cluster: String,
        /// Node labels, KEY=VALUE, repeatable.
        #[arg(long = "label", value_parser = parse_label, requires = "control_plane")]
        labels: Vec<(String, String)>,
        /// File with the control plane token.
        #[arg(long, requires = "control_plane")]
        token_file: Option<PathBuf>,
        /// Where the last good control-plane config is kept for starts without the control plane.
        #[arg(long, default_value = "/var/lib/weir", requires = "control_plane")]
        state_dir: PathBuf,
        /// Admin address in control-plane mode (a config file sets its own).
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: String,
        /// Worker threads per listener.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Sandboxed threads running proxy-wasm filters, pinned round robin to the CPUs weir may
        /// use (default: one per CPU).
        #[arg(long)]
        filter_threads: Option<usize>,
        /// Longest wait for in-flight requests after SIGTERM, e.g. 30s.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        drain_timeout: Duration,
    },
    /// Check config files; prints every error with file, line and field.
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// The eBPF sockmap fast path.
    Ebpf {
        #[command(subcommand)]
        command: EbpfCommand,
    },
}

#[derive(Subcommand)]
enum EbpfCommand {
    /// What a running weir has attached, with its counters (asked on its admin endpoint).
    Status {
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: std::net::SocketAddr,
    },
}

/// Prints `GET /ebpf` of the weir whose admin endpoint is `admin`, for people.
fn ebpf_status(admin: std::net::SocketAddr) -> Result<(), String> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(2))
        .map_err(|e| format!("no weir admin endpoint on {admin}: {e}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(conn, "GET /ebpf HTTP/1.0\r\nHost: {admin}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut text = String::new();
    conn.read_to_string(&mut text).map_err(|e| e.to_string())?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let v: serde_json::Value = serde_json::from_str(body)
        .map_err(|e| format!("{admin}/ebpf did not answer JSON ({e}): {text}"))?;
    println!("mode: {}", v["mode"].as_str().unwrap_or("?"));
    if v["attached"] != true {
        println!("attached: no ({})", v["reason"].as_str().unwrap_or("?"));
        return Ok(());
    }
    println!(
        "attached: yes, to cgroup {}",
        v["cgroup"].as_str().unwrap_or("?")
    );
    for p in v["programs"].as_array().into_iter().flatten() {
        println!("  program {}", p.as_str().unwrap_or("?"));
    }
    println!("ports in scope: {}", v["ports"]);
    println!("local addresses besides loopback: {}", v["addresses"]);
    println!("sockets in the sockhash: {}", v["sockets"]);
    match v["outbound"].as_object() {
        None => println!("outbound capture: off"),
        Some(o) => {
            let ports = match (&o.get("ports"), &o.get("exclude_ports")) {
                (Some(p), _) => format!("destination ports {p}"),
                (None, Some(p)) if p.as_array().is_some_and(|a| !a.is_empty()) => {
                    format!("every destination port but {p}")
                }
                _ => "every destination port".to_string(),
            };
            println!(
                "outbound capture: to {}, {ports}; captured connections open: {}",
                o.get("listener").and_then(|l| l.as_str()).unwrap_or("?"),
                o.get("open_connections")
                    .unwrap_or(&serde_json::Value::Null),
            );
        }
    }
    println!("counters:");
    for (name, value) in v["counters"].as_object().into_iter().flatten() {
        println!("  {name}: {value}");
    }
    Ok(())
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

fn control_start(
    url: String,
    node_id: Option<String>,
    cluster: String,
    labels: Vec<(String, String)>,
    token_file: Option<PathBuf>,
    state_dir: PathBuf,
    admin: String,
) -> Result<(weir_policies::Snapshot, Source), String> {
    let id = node_id.ok_or("--control-plane needs --node-id")?;
    let token = weir_control::auth::read_token_file(token_file.as_deref())?;
    let opts = ControlOptions {
        client: ClientOptions {
            url,
            node: Node {
                id,
                cluster,
                labels: labels.into_iter().collect(),
                weir_version: env!("CARGO_PKG_VERSION").to_string(),
            },
            token,
            max_push_bytes: weir_control::client::MAX_PUSH_BYTES,
        },
        state_dir,
        admin,
    };
    let (snapshot, applied) = initial(&opts)?;
    Ok((snapshot, Source::Control(Box::new((opts, applied)))))
}

fn main() -> ExitCode {
    weir_control::init_logs();
    weir_control::no_transparent_huge_pages();
    match Cli::parse().command {
        Command::Ebpf {
            command: EbpfCommand::Status { admin },
        } => match ebpf_status(admin) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("weir ebpf status: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Validate { files } => {
            let mut ok = true;
            for f in files {
                match load_file(&f) {
                    Ok(s) => {
                        // Filter modules too: present, the right digest, valid wasm.
                        let mut modules_ok = true;
                        for chain in s.filter_chains.iter() {
                            for filter in &chain.filters {
                                if let Err(e) = weir_filters::check_module(
                                    &filter.module,
                                    filter.sha256.as_deref(),
                                ) {
                                    eprintln!(
                                        "{}: filter_chains {:?}, filter {:?}: {e}",
                                        f.display(),
                                        chain.name,
                                        filter.name
                                    );
                                    modules_ok = false;
                                }
                            }
                        }
                        if modules_ok {
                            println!("{}: ok (version {})", f.display(), s.version);
                        } else {
                            ok = false;
                        }
                    }
                    Err(e) => {
                        eprintln!("{e}");
                        ok = false;
                    }
                }
            }
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Run {
            config,
            control_plane,
            node_id,
            node_cluster,
            labels,
            token_file,
            state_dir,
            admin,
            threads,
            filter_threads,
            drain_timeout,
        } => {
            let start = match control_plane {
                Some(url) => control_start(
                    url,
                    node_id,
                    node_cluster,
                    labels,
                    token_file,
                    state_dir,
                    admin,
                ),
                None => match &config {
                    Some(path) => load_file(path),
                    None => {
                        load_str("<embedded default>", EMBEDDED_DEFAULT).map_err(|e| e.to_string())
                    }
                }
                .map(|s| (s, Source::File(config))),
            };
            match start {
                Ok((snapshot, source)) => run(
                    snapshot,
                    RunOptions {
                        source,
                        threads,
                        filter_threads: filter_threads
                            .unwrap_or_else(weir_filters::default_threads),
                        drain_timeout,
                    },
                ),
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
