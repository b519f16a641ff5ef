//! `weir`: run the proxy, or validate config files.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use weir_policies::{load_str, EMBEDDED_DEFAULT};
use weir_proxy::reload::load_file;
use weir_proxy::server::{run, RunOptions};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "weir", version, about = "weir: a service-mesh data plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (on the embedded default config without --config).
    Run {
        /// Config file; reloaded when it changes and on SIGHUP.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Worker threads per listener.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Longest wait for in-flight requests after SIGTERM, e.g. 30s.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        drain_timeout: Duration,
    },
    /// Check config files; prints every error with file, line and field.
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::Validate { files } => {
            let mut ok = true;
            for f in files {
                match load_file(&f) {
                    Ok(s) => println!("{}: ok (version {})", f.display(), s.version),
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
            threads,
            drain_timeout,
        } => {
            let snapshot = match &config {
                Some(path) => load_file(path),
                None => load_str("<embedded default>", EMBEDDED_DEFAULT).map_err(|e| e.to_string()),
            };
            match snapshot {
                Ok(snapshot) => run(
                    snapshot,
                    RunOptions {
                        config_path: config,
                        threads,
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
