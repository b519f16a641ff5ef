//! `weir-control`: serves a policy folder to weir proxies, and reports who runs what.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use weir_control::auth::{authorize, read_token_file};
use weir_control::pb::discovery_server::DiscoveryServer;
use weir_control::pb::status_client::StatusClient;
use weir_control::pb::status_server::StatusServer;
use weir_control::server::{ControlPlane, MAX_REQUEST_BYTES};
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
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match Cli::parse().command {
        Command::Serve {
            policies,
            listen,
            token_file,
        } => serve(policies, listen, token_file).await,
        Command::Status { addr, token_file } => status(addr, token_file).await,
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
    tokio::spawn(policy_dir::watch(policies, cp.clone()));
    tracing::info!(%listen, "serving (gRPC, and GET /status as JSON on the same port)");
    let routes = tonic::service::Routes::new(
        DiscoveryServer::new(cp.clone()).max_decoding_message_size(MAX_REQUEST_BYTES),
    )
    .add_service(StatusServer::new(cp.clone()).max_decoding_message_size(MAX_REQUEST_BYTES))
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

async fn status(addr: SocketAddr, token_file: Option<PathBuf>) -> Result<(), String> {
    let token = read_token_file(token_file.as_deref())?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let mut client = StatusClient::new(channel);
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
