//! Probe: a filter for testing hosts. Request headers pick what it does:
//!
//! - `x-probe-trap`: panics (a wasm trap); `x-probe-loop`: spins forever;
//!   `x-probe-alloc: N`: allocates and touches N MiB.
//! - `x-probe-properties`: answers the properties it reads in `x-prop-*` response headers.
//! - `x-probe-state`: answers ticks seen, requests logged and the last queued message,
//!   from shared data, in `x-probe-*` response headers.
//! - `x-probe-enqueue: MSG`: enqueues MSG on the shared queue `probe`.
//! - `x-probe-grpc-call`: calls `grpc.health.v1.Health/Check` on the cluster named by the
//!   plugin config's `grpc_cluster` and answers 200 with the gRPC status and reply bytes.
//! - `x-probe-unimplemented`: calls `proxy_grpc_stream` raw and answers the status code the
//!   host returned, in `x-probe-status`.
//!
//! VM config `tick` sets a 10 ms tick. With plugin config `root_call_cluster`, the first tick
//! makes an HTTP call from the root context (`GET /status/204` on that cluster) and keeps the
//! answer's status in shared data (`x-probe-root-call` in the state answer).

use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;

#[derive(Default, Deserialize)]
#[serde(default)]
struct Settings {
    grpc_cluster: String,
    root_call_cluster: String,
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| {
        Box::new(Root { queue: 0, grpc_cluster: String::new(), root_call_cluster: String::new() })
    });
}}

#[link(wasm_import_module = "env")]
extern "C" {
    #[link_name = "proxy_grpc_stream"]
    fn raw_grpc_stream(
        upstream: *const u8,
        upstream_size: usize,
        service: *const u8,
        service_size: usize,
        method: *const u8,
        method_size: usize,
        metadata: *const u8,
        metadata_size: usize,
        return_id: *mut u32,
    ) -> u32;
}

fn counter(ctx: &dyn Context, key: &str) -> u64 {
    ctx.get_shared_data(key)
        .0
        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map_or(0, u64::from_le_bytes)
}

fn bump(ctx: &dyn Context, key: &str) {
    loop {
        let (_, cas) = ctx.get_shared_data(key);
        let n = counter(ctx, key) + 1;
        if ctx.set_shared_data(key, Some(&n.to_le_bytes()), cas).is_ok() {
            return;
        }
    }
}

struct Root {
    queue: u32,
    grpc_cluster: String,
    /// Emptied once the root-context call is made.
    root_call_cluster: String,
}

impl Context for Root {
    fn on_http_call_response(&mut self, _token: u32, _headers: usize, _body: usize, _trailers: usize) {
        let status = self.get_http_call_response_header(":status").unwrap_or_else(|| "failed".into());
        let _ = self.set_shared_data("probe/root-call", Some(status.as_bytes()), None);
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        if self.get_vm_configuration().as_deref() == Some(b"tick") {
            self.set_tick_period(Duration::from_millis(10));
        }
        self.queue = self.register_shared_queue("probe");
        true
    }

    fn on_configure(&mut self, _size: usize) -> bool {
        if let Some(bytes) = self.get_plugin_configuration() {
            let s: Settings = serde_json::from_slice(&bytes).unwrap_or_default();
            self.grpc_cluster = s.grpc_cluster;
            self.root_call_cluster = s.root_call_cluster;
        }
        true
    }

    fn on_tick(&mut self) {
        bump(self, "probe/ticks");
        let cluster = std::mem::take(&mut self.root_call_cluster);
        if !cluster.is_empty() {
            let headers = vec![(":method", "GET"), (":path", "/status/204"), (":authority", cluster.as_str())];
            if let Err(status) = self.dispatch_http_call(&cluster, headers, None, vec![], Duration::from_secs(2)) {
                let _ = self.set_shared_data("probe/root-call", Some(format!("{status:?}").as_bytes()), None);
            }
        }
    }

    fn on_queue_ready(&mut self, queue: u32) {
        while let Ok(Some(msg)) = self.dequeue_shared_queue(queue) {
            let _ = self.set_shared_data("probe/last-queued", Some(&msg), None);
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Probe {
            grpc_cluster: self.grpc_cluster.clone(),
            answer: Vec::new(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Probe {
    grpc_cluster: String,
    /// Headers to add to the response.
    answer: Vec<(String, String)>,
}

fn text(v: Option<Vec<u8>>) -> String {
    match v {
        None => "<none>".into(),
        Some(b) if b.len() == 8 && !b.iter().all(|c| c.is_ascii_graphic()) => {
            u64::from_le_bytes(b.try_into().unwrap()).to_string()
        }
        Some(b) => String::from_utf8_lossy(&b).into_owned(),
    }
}

impl Context for Probe {
    fn on_grpc_call_response(&mut self, _token: u32, status: u32, size: usize) {
        let body = self.get_grpc_call_response_body(0, size).unwrap_or_default();
        let hex: String = body.iter().map(|b| format!("{b:02x}")).collect();
        let status = status.to_string();
        self.send_http_response(200, vec![("x-probe-grpc-status", &status)], Some(hex.as_bytes()));
    }
}

impl Probe {
    fn has(&self, name: &str) -> bool {
        self.get_http_request_header(name).is_some()
    }
}

impl HttpContext for Probe {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        if self.has("x-probe-trap") {
            panic!("probe: trap requested");
        }
        if self.has("x-probe-loop") {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        if let Some(mib) = self.get_http_request_header("x-probe-alloc") {
            let mib: usize = mib.parse().unwrap_or(0);
            let v = vec![1u8; mib << 20];
            std::hint::black_box(&v);
        }
        if let Some(msg) = self.get_http_request_header("x-probe-enqueue") {
            if let Ok(Some(q)) = hostcalls::resolve_shared_queue("", "probe") {
                let _ = self.enqueue_shared_queue(q, Some(msg.as_bytes()));
            }
        }
        if self.has("x-probe-properties") {
            for (name, path) in [
                ("x-prop-request-path", vec!["request", "path"]),
                ("x-prop-request-url-path", vec!["request", "url_path"]),
                ("x-prop-request-host", vec!["request", "host"]),
                ("x-prop-request-method", vec!["request", "method"]),
                ("x-prop-request-scheme", vec!["request", "scheme"]),
                ("x-prop-request-protocol", vec!["request", "protocol"]),
                ("x-prop-request-query", vec!["request", "query"]),
                ("x-prop-plugin-name", vec!["plugin_name"]),
                ("x-prop-plugin-root-id", vec!["plugin_root_id"]),
                ("x-prop-nonexistent", vec!["no", "such", "property"]),
            ] {
                self.answer.push((name.into(), text(self.get_property(path))));
            }
            let addr = text(self.get_property(vec!["source", "address"]));
            self.answer.push(("x-prop-source-is-loopback".into(), addr.starts_with("127.0.0.1:").to_string()));
        }
        if self.has("x-probe-state") {
            self.answer.push(("x-probe-ticks".into(), counter(self, "probe/ticks").to_string()));
            self.answer.push(("x-probe-logged".into(), counter(self, "probe/logged").to_string()));
            self.answer.push(("x-probe-last-queued".into(), text(self.get_shared_data("probe/last-queued").0)));
            self.answer.push(("x-probe-root-call".into(), text(self.get_shared_data("probe/root-call").0)));
        }
        if self.has("x-probe-unimplemented") {
            let (up, svc, method) = ("grpc", "s", "m");
            let mut id = 0u32;
            let status = unsafe {
                raw_grpc_stream(
                    up.as_ptr(), up.len(), svc.as_ptr(), svc.len(),
                    method.as_ptr(), method.len(), std::ptr::null(), 0, &mut id,
                )
            };
            self.send_http_response(200, vec![("x-probe-status", &status.to_string())], None);
            return Action::Pause;
        }
        if self.has("x-probe-grpc-call") {
            let call = self.dispatch_grpc_call(
                &self.grpc_cluster,
                "grpc.health.v1.Health",
                "Check",
                vec![],
                Some(&[]),
                Duration::from_secs(2),
            );
            return match call {
                Ok(_) => Action::Pause,
                Err(status) => {
                    let s = format!("{status:?}");
                    self.send_http_response(500, vec![("x-probe-dispatch", &s)], None);
                    Action::Pause
                }
            };
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        for (name, value) in std::mem::take(&mut self.answer) {
            self.add_http_response_header(&name, &value);
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        bump(self, "probe/logged");
    }
}
