//! Assembles the pingora server: one proxy service per listener, the admin service, health
//! checks and config reloads, all reading one shared runtime.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use pingora::apps::HttpServerOptions;
use pingora::proxy::http_proxy_service_with_name;
use pingora::server::configuration::ServerConf;
use pingora::server::{ListenFds, ShutdownWatch};
use pingora::server::{RunArgs, Server};
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use pingora::services::{ServiceReadyNotifier, ServiceWithDependents};
use weir_policies::Snapshot;

use weir_control::client::Applied;

use crate::admin::AdminApp;
use crate::control::{ControlOptions, ControlSync};
use crate::drain::{Drain, DrainSignal};
use crate::fast_path::{FastPathState, ScopeSync};
use crate::filters::Filters;
use crate::health::HealthChecker;
use crate::inference::driver::{Driver, Inference};
use crate::metrics::Metrics;
use crate::proxy::WeirProxy;
use crate::reload::Reloader;
use crate::state::{Runtime, SharedRuntime};

/// Where the config comes from; exactly one source is authoritative.
pub enum Source {
    /// A file reloaded on change and SIGHUP; `None` for the embedded default.
    File(Option<PathBuf>),
    /// The control plane, starting from what was already applied.
    Control(Box<(ControlOptions, Applied)>),
}

/// How `weir run` runs.
pub struct RunOptions {
    pub source: Source,
    /// Worker threads per listener.
    pub threads: usize,
    /// Threads that run proxy-wasm filters (sandboxed).
    pub filter_threads: usize,
    /// Longest drain after SIGTERM.
    pub drain_timeout: Duration,
}

/// Runs weir until SIGTERM (drain) or SIGINT; does not return.
pub fn run(snapshot: Snapshot, opts: RunOptions) -> ! {
    let mut conf = ServerConf {
        threads: opts.threads.max(1),
        grace_period_seconds: Some(opts.drain_timeout.as_secs().max(1)),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    // Retries are decided per route by weir's policy; this only bounds pingora's loop.
    conf.max_retries = 16;
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let conf = server.configuration.clone();

    let listeners = snapshot.listeners.clone();
    let admin = snapshot.admin;
    // pingora binds inside a service task and only logs a failure there; a proxy missing a
    // listener must not start at all.
    for addr in listeners.iter().map(|l| l.address).chain(admin) {
        if let Err(e) = std::net::TcpListener::bind(addr) {
            eprintln!("weir: cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    }
    let filters = Arc::new(Filters::new(opts.filter_threads));
    let chains = match filters.install(&snapshot, None) {
        Ok(chains) => chains,
        Err(e) => {
            eprintln!("weir: filter chains do not start: {e}");
            std::process::exit(1);
        }
    };
    let fast_path = FastPathState::start(&snapshot);
    let snapshot_otlp_metrics = snapshot.source.otlp_metrics.as_deref().cloned();
    let (tracer, trace_exporter) = match snapshot.source.tracing.as_deref() {
        Some(config) => {
            let (t, e) = crate::telemetry::Tracer::new(config);
            (Some(t), Some(e))
        }
        None => (None, None),
    };
    let access_log = match snapshot.source.access_log.as_deref() {
        None => None,
        Some(config) => match crate::access_log::AccessLog::start(config) {
            Ok(log) => Some(log),
            Err(e) => {
                eprintln!("weir: cannot open the access log {}: {e}", config.path);
                std::process::exit(1);
            }
        },
    };
    let runtime: SharedRuntime = Arc::new(ArcSwap::from_pointee(Runtime::new(
        Arc::new(snapshot),
        None,
        chains,
    )));
    filters.set_runtime(runtime.clone());
    let metrics = Arc::new(Metrics::new());
    let drain = Arc::new(Drain::default());
    let inference = Inference::new(runtime.clone());

    let mut listening = Vec::new();
    for l in &listeners {
        let proxy = WeirProxy {
            filter_chain: l.filter_chain,
            listener: l.name.clone(),
            max_request_headers: l.max_request_headers,
            idle_timeout: l.idle_timeout,
            runtime: runtime.clone(),
            metrics: metrics.clone(),
            drain: drain.clone(),
            access_log: access_log.clone(),
            tracer: tracer.clone(),
            listener_attrs: crate::telemetry::Attrs::listener(&l.name),
            fast_path: fast_path.clone(),
        };
        let mut service =
            http_proxy_service_with_name(&conf, proxy, &format!("listener {}", l.name));
        let mut options = HttpServerOptions::default();
        options.h2c = true;
        options.idle_timeout = l.idle_timeout;
        options.h2_idle_timeout = l.idle_timeout;
        options.request_headers_timeout = l.request_headers_timeout;
        if let Some(app) = service.app_logic_mut() {
            app.server_options = Some(options);
        }
        service.add_tcp(&l.address.to_string());
        listening.push(server.add_service(Bound {
            service,
            address: l.address.to_string(),
        }));
        tracing::info!(listener = %l.name, address = %l.address, "listening");
    }
    let control_status = matches!(opts.source, Source::Control(_))
        .then(|| Arc::new(weir_control::client::StreamStatus::default()));
    let exposition = Arc::new(crate::admin::Exposition {
        control: control_status.clone(),
        runtime: runtime.clone(),
        metrics: metrics.clone(),
        filters: filters.clone(),
        fast_path: fast_path.clone(),
        access_log: access_log.clone(),
        tracer: tracer.clone(),
    });
    if let Some(otlp) = snapshot_otlp_metrics {
        server.add_service(background_service(
            "otlp metrics",
            crate::telemetry::MetricsExport {
                config: otlp,
                exposition: exposition.clone(),
            },
        ));
    }
    if let Some(addr) = admin {
        let app = AdminApp {
            runtime: runtime.clone(),
            drain: drain.clone(),
            inference: inference.clone(),
            fast_path: fast_path.clone(),
            exposition: exposition.clone(),
        };
        let mut service = Service::new("admin".to_string(), app);
        service.add_tcp(&addr.to_string());
        // `/ready` answers once every listener accepts connections, not before.
        server
            .add_service(service)
            .add_dependencies(listening.iter());
        tracing::info!(address = %addr, "admin listening");
    }
    server.add_service(background_service(
        "health checks",
        HealthChecker::new(runtime.clone()),
    ));
    server.add_service(background_service(
        "inference pools",
        Driver(inference.clone()),
    ));
    if let Some(exporter) = trace_exporter {
        server.add_service(background_service("trace export", exporter));
    }
    server.add_service(background_service(
        "sockmap fast path",
        ScopeSync {
            state: fast_path,
            runtime: runtime.clone(),
        },
    ));
    let path = match opts.source {
        Source::File(path) => path,
        Source::Control(control) => {
            let (control, applied) = *control;
            server.add_service(background_service(
                "control plane",
                ControlSync {
                    opts: control,
                    applied,
                    status: control_status.unwrap_or_default(),
                    runtime: runtime.clone(),
                    metrics: metrics.clone(),
                    filters: filters.clone(),
                    inference: inference.clone(),
                },
            ));
            None
        }
    };
    // Also in control-plane mode: it owns SIGHUP, whose default action would kill weir.
    server.add_service(background_service(
        "config reload",
        Reloader {
            path,
            runtime,
            metrics,
            filters,
        },
    ));
    server.run(RunArgs {
        shutdown_signal: Box::new(DrainSignal {
            drain,
            deadline: opts.drain_timeout,
        }),
    });
    std::process::exit(0)
}

/// A listening service that reports itself ready once its socket is bound. pingora's own
/// listening services report ready before they bind (inside their start), so a service that
/// depends on one (the admin endpoint, whose `/ready` says the proxy takes traffic) could
/// start while the listener still refuses connections. pingora records every socket it binds
/// in the shared table of listening fds, keyed by the address given to `add_tcp`.
struct Bound<S> {
    service: S,
    address: String,
}

#[async_trait::async_trait]
impl<S: pingora::services::Service> ServiceWithDependents for Bound<S> {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
        ready: ServiceReadyNotifier,
    ) {
        let bound = match fds.clone() {
            Some(fds) => {
                let address = self.address.clone();
                Some(tokio::spawn(async move {
                    while fds.lock().get(&address).is_none() {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    ready.notify_ready();
                }))
            }
            // No table to watch (not on Unix): ready as pingora's own services are.
            None => {
                ready.notify_ready();
                None
            }
        };
        self.service
            .start_service(fds, shutdown, listeners_per_fd)
            .await;
        // A service that ends (or never bound) must not leave its dependents waiting.
        if let Some(task) = bound {
            task.abort();
        }
    }

    fn name(&self) -> &str {
        self.service.name()
    }

    fn threads(&self) -> Option<usize> {
        self.service.threads()
    }

    fn runtime_opts_override(
        &self,
        global: &pingora::server::RuntimeOpts,
    ) -> Option<pingora::server::RuntimeOpts> {
        self.service.runtime_opts_override(global)
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        self.service.listen_addresses()
    }
}
