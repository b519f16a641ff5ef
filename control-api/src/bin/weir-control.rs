//! `weir-control`: serves a policy folder to weir proxies, and reports who runs what.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

// The same allocator as weir: config pushes are allocation-heavy.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};
use weir_control::auth::{authorize, read_token_file};
use weir_control::pb::discovery_server::DiscoveryServer;
use weir_control::pb::status_client::StatusClient;
use weir_control::pb::status_server::StatusServer;
use weir_control::pb::weight_reload_client::WeightReloadClient;
use weir_control::pb::weight_reload_server::WeightReloadServer;
use weir_control::reload::Relay;
use weir_control::server::{ControlPlane, MAX_REQUEST_BYTES};
use weir_control::xds_v3::{AggregatedDiscoveryServiceServer, XdsV3, ENVOY_REQUEST_BYTES};
use weir_control::{policy_dir, DEFAULT_ADDR};

#[derive(Parser)]
#[command(name = "weir-control", version, about = "weir's control plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve every YAML file of a folder (the `weir run --config` format), pushing changes.
    Serve {
        #[arg(long)]
        policies: PathBuf,
        #[arg(long, default_value = DEFAULT_ADDR)]
        listen: SocketAddr,
        /// File holding the token proxies must present; none: no authentication.
        #[arg(long, env = "WEIR_CONTROL_TOKEN_FILE")]
        token_file: Option<PathBuf>,
    },
    /// Print which proxy ACKed which version, which NACKed and why.
    Status {
        #[arg(long, default_value = DEFAULT_ADDR)]
        addr: SocketAddr,
        #[arg(long, env = "WEIR_CONTROL_TOKEN_FILE")]
        token_file: Option<PathBuf>,
    },
    /// Reload a model's weights on every endpoint of an inference pool, one (or --parallel N)
    /// at a time: drain
    /// it on every proxy, call the server's reload API (KServe `RepositoryModelLoad`; for
    /// OpenAI pools the pool's `reload.http` call), wait until it is ready, return it to
    /// rotation.
    Reload {
        #[arg(long)]
        pool: String,
        #[arg(long)]
        model: String,
        /// The version the servers must report afterwards; default: whatever they report.
        /// Required for OpenAI pools, whose servers report none.
        #[arg(long, default_value = "")]
        version: String,
        /// Longest wait for proxies to drain an endpoint (default: the pool's drain
        /// deadline); the rollout moves on as soon as every subscribed proxy reports it drained.
        #[arg(long, value_parser = humantime::parse_duration)]
        drain_wait: Option<std::time::Duration>,
        /// Endpoints reloaded at once.
        #[arg(long, default_value_t = 1)]
        parallel: u32,
        #[arg(long, default_value = DEFAULT_ADDR)]
        addr: SocketAddr,
        #[arg(long, env = "WEIR_CONTROL_TOKEN_FILE")]
        token_file: Option<PathBuf>,
    },
    /// Publish one weight-reload event (for orchestrators and trainers that reload servers
    /// themselves); every proxy hears it.
    Signal {
        #[arg(long)]
        pool: String,
        /// `ip:port` of the endpoint, as in the pool's config.
        #[arg(long)]
        endpoint: String,
        #[arg(long)]
        model: String,
        /// start, finished or failed.
        #[arg(long)]
        event: String,
        #[arg(long, default_value = "")]
        version: String,
        #[arg(long, default_value = "")]
        reason: String,
        #[arg(long, default_value = DEFAULT_ADDR)]
        addr: SocketAddr,
        #[arg(long, env = "WEIR_CONTROL_TOKEN_FILE")]
        token_file: Option<PathBuf>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    weir_control::init_logs();
    weir_control::no_transparent_huge_pages();
    let result = match Cli::parse().command {
        Command::Serve {
            policies,
            listen,
            token_file,
        } => serve(policies, listen, token_file).await,
        Command::Status { addr, token_file } => status(addr, token_file).await,
        Command::Reload {
            pool,
            model,
            version,
            drain_wait,
            parallel,
            addr,
            token_file,
        } => {
            let req = weir_control::pb::RolloutRequest {
                pool,
                model,
                version,
                drain_wait_ms: drain_wait.map_or(0, |d| d.as_millis().min(u32::MAX as u128) as u32),
                parallel,
            };
            rollout(addr, token_file, req).await
        }
        Command::Signal {
            pool,
            endpoint,
            model,
            event,
            version,
            reason,
            addr,
            token_file,
        } => {
            let ev = weir_control::pb::ReloadEvent {
                pool,
                endpoint,
                model,
                event,
                version,
                reason,
                sequence: 0,
            };
            signal(addr, token_file, ev).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weir-control: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(
    policies: PathBuf,
    listen: SocketAddr,
    token_file: Option<PathBuf>,
) -> Result<(), String> {
    let token = read_token_file(token_file.as_deref())?;
    if token.is_none() {
        tracing::warn!("no --token-file: any client may connect");
    }
    let cp = ControlPlane::new(token);
    let relay = Relay::new(cp.clone());
    tokio::spawn(policy_dir::watch(policies, cp.clone()));
    tracing::info!(%listen, "serving (gRPC, and GET /status as JSON on the same port)");
    let routes = tonic::service::Routes::new(
        DiscoveryServer::new(cp.clone()).max_decoding_message_size(MAX_REQUEST_BYTES),
    )
    .add_service(StatusServer::new(cp.clone()).max_decoding_message_size(MAX_REQUEST_BYTES))
    .add_service(WeightReloadServer::new(relay).max_decoding_message_size(MAX_REQUEST_BYTES))
    .add_service(
        // An Envoy's EDS request names every cluster it has: larger than weir's messages.
        AggregatedDiscoveryServiceServer::new(XdsV3::new(cp.clone()))
            .max_decoding_message_size(ENVOY_REQUEST_BYTES),
    )
    .into_axum_router()
    .route(
        "/status",
        axum::routing::get(move || http_status(cp.clone())),
    );
    tonic::transport::Server::builder()
        .accept_http1(true)
        .add_routes(routes.into())
        .serve_with_shutdown(listen, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .map_err(|e| format!("serving on {listen}: {e}"))
}

/// `GET /status`: the status service's answer as JSON, for curl and dashboards.
async fn http_status(cp: ControlPlane) -> axum::response::Response {
    let s = cp.status();
    let proxies: Vec<_> = s
        .proxies
        .iter()
        .map(|p| {
            let node = p.node.clone().unwrap_or_default();
            serde_json::json!({
                "id": node.id,
                "cluster": node.cluster,
                "labels": node.labels,
                "connected": p.connected,
                "acked_version": p.acked_version,
                "nacked_version": p.nacked_version,
                "nack_error": p.nack_error,
            })
        })
        .collect();
    let body = serde_json::json!({
        "version": s.version,
        "config_error": s.config_error,
        "proxies": proxies,
    });
    axum::response::Response::builder()
        .header("content-type", "application/json")
        .body(axum::body::Body::from(format!("{body:#}\n")))
        .unwrap_or_default()
}

async fn connect(addr: SocketAddr) -> Result<tonic::transport::Channel, String> {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}"))
}

/// A `WeightReload` client for `addr` and `body` as an authorized request.
async fn reload_call<T>(
    addr: SocketAddr,
    token_file: Option<PathBuf>,
    body: T,
) -> Result<
    (
        WeightReloadClient<tonic::transport::Channel>,
        tonic::Request<T>,
    ),
    String,
> {
    let token = read_token_file(token_file.as_deref())?;
    let client = WeightReloadClient::new(connect(addr).await?);
    let mut req = tonic::Request::new(body);
    authorize(&mut req, token.as_deref())?;
    Ok((client, req))
}

async fn rollout(
    addr: SocketAddr,
    token_file: Option<PathBuf>,
    req: weir_control::pb::RolloutRequest,
) -> Result<(), String> {
    let (mut client, req) = reload_call(addr, token_file, req).await?;
    let mut steps = client
        .rollout(req)
        .await
        .map_err(|e| format!("{}: {}", e.code(), e.message()))?
        .into_inner();
    let mut reloaded = 0;
    while let Some(p) = steps
        .message()
        .await
        .map_err(|e| format!("{}: {}", e.code(), e.message()))?
    {
        println!("{} {} {} {}", p.endpoint, p.step, p.version, p.message);
        match p.step.as_str() {
            "failed" => return Err(format!("rollout stopped at {}: {}", p.endpoint, p.message)),
            "finished" => reloaded += 1,
            _ => {}
        }
    }
    println!("rollout done: {reloaded} endpoints reloaded");
    Ok(())
}

async fn signal(
    addr: SocketAddr,
    token_file: Option<PathBuf>,
    ev: weir_control::pb::ReloadEvent,
) -> Result<(), String> {
    let (mut client, req) = reload_call(addr, token_file, ev).await?;
    let r = client
        .publish(req)
        .await
        .map_err(|e| format!("{}: {}", e.code(), e.message()))?;
    println!("published, sequence {}", r.into_inner().sequence);
    Ok(())
}

async fn status(addr: SocketAddr, token_file: Option<PathBuf>) -> Result<(), String> {
    let token = read_token_file(token_file.as_deref())?;
    let mut client = StatusClient::new(connect(addr).await?);
    let mut req = tonic::Request::new(weir_control::pb::StatusRequest {});
    authorize(&mut req, token.as_deref())?;
    let s = client
        .get(req)
        .await
        .map_err(|e| format!("{}: {}", e.code(), e.message()))?
        .into_inner();
    println!(
        "serving version {}",
        if s.version.is_empty() {
            "(none)"
        } else {
            &s.version
        }
    );
    if !s.config_error.is_empty() {
        println!("last policy change REJECTED:\n{}", s.config_error);
    }
    for p in s.proxies {
        let node = p.node.unwrap_or_default();
        let state = if p.connected {
            "connected"
        } else {
            "disconnected"
        };
        print!(
            "{} ({}) {state} acked={}",
            node.id, node.cluster, p.acked_version
        );
        if !p.nacked_version.is_empty() {
            print!(" NACKED {}: {}", p.nacked_version, p.nack_error);
        }
        println!();
    }
    Ok(())
}
