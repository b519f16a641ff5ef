//! The admin endpoint (loopback only by default): `/ready`, `/stats/prometheus`,
//! `/config_dump`, `/clusters`, `/inference` (pools, each endpoint's models with their reload
//! state and version, and load) and `POST /inference/reload` (a weight-reload signal).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::json;

use crate::drain::Drain;
use crate::filters::Filters;
use crate::inference::driver::{Inference, ReloadEvent};
use crate::metrics::Metrics;
use crate::state::{now_ms, SharedRuntime};

pub struct AdminApp {
    pub runtime: SharedRuntime,
    pub drain: Arc<Drain>,
    pub inference: Arc<Inference>,
    pub fast_path: Arc<crate::fast_path::FastPathState>,
    /// What `/stats/prometheus` shows (also what is exported over OTLP).
    pub exposition: Arc<Exposition>,
}

/// Everything that has metrics, rendered as one Prometheus text exposition.
pub struct Exposition {
    pub runtime: SharedRuntime,
    pub metrics: Arc<Metrics>,
    pub filters: Arc<Filters>,
    pub fast_path: Arc<crate::fast_path::FastPathState>,
    pub access_log: Option<Arc<crate::access_log::AccessLog>>,
    pub tracer: Option<Arc<crate::telemetry::Tracer>>,
    /// The control plane's discovery stream, in `--control-plane` mode.
    pub control: Option<Arc<weir_control::client::StreamStatus>>,
}

impl Exposition {
    /// The Prometheus text exposition of every metric, read now.
    pub fn render(&self) -> String {
        let rt = self.runtime.load();
        let mut text = self.metrics.render(&rt);
        if let Some(host) = self.filters.started() {
            crate::metrics::write_plain(
                &mut text,
                "counter",
                "weir_wasm_filter_failures_total",
                "Filter callbacks that trapped, ran out of CPU time or memory.",
                host.failures(),
            );
            crate::metrics::write_plain(
                &mut text,
                "counter",
                "weir_wasm_vm_restarts_total",
                "Filter VMs recreated after a failure.",
                host.vm_restarts(),
            );
            text += &host.metrics().render();
        }
        self.fast_path.render(&mut text);
        if let Some(log) = &self.access_log {
            log.render(&mut text);
        }
        if let Some(tracer) = &self.tracer {
            tracer.render(&mut text);
        }
        if let Some(control) = &self.control {
            crate::metrics::render_control(&control.get(), &mut text);
        }
        text
    }
}

fn respond(status: u16, content_type: &str, body: String) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("content-length", body.len())
        .body(body.into_bytes())
        .expect("static response parts are valid")
}

impl AdminApp {
    fn clusters(&self) -> serde_json::Value {
        let rt = self.runtime.load();
        let now = now_ms();
        let clusters: Vec<_> = rt
            .snapshot
            .clusters
            .iter()
            .zip(&rt.clusters)
            .map(|(c, s)| {
                let endpoints: Vec<_> = s
                    .endpoints
                    .iter()
                    .zip(&c.endpoints)
                    .map(|(e, cfg)| {
                        json!({
                            "address": e.address.to_string(),
                            "weight": cfg.weight,
                            "healthy": e.healthy.load(Ordering::Relaxed),
                            "ejected": e.is_ejected(now),
                            "ejected_for_ms": e.ejected_for().map(|d| d.as_millis() as u64),
                            "active_requests": e.active.load(Ordering::Relaxed),
                            "open_connections": e.connections_open.load(Ordering::Relaxed),
                        })
                    })
                    .collect();
                json!({
                    "name": c.name,
                    "health_checked": c.health_check.is_some(),
                    "active_requests": s.active_requests.load(Ordering::Relaxed),
                    "endpoints": endpoints,
                })
            })
            .collect();
        json!({ "version": rt.snapshot.version, "clusters": clusters })
    }

    fn pools(&self) -> serde_json::Value {
        let rt = self.runtime.load();
        let pools: Vec<_> = rt
            .pools
            .iter()
            .map(|p| {
                let endpoints: Vec<_> = p
                    .endpoints
                    .iter()
                    .map(|e| {
                        let reported = e.reported().clone();
                        let models: Vec<_> = e
                            .models()
                            .iter()
                            .map(|m| {
                                json!({
                                    "name": m.name,
                                    "version": m.reload.version,
                                    "state": format!("{:?}", m.reload.model_state()).to_lowercase(),
                                    "last_error": m.reload.last_error,
                                })
                            })
                            .collect();
                        json!({
                            "address": e.address.to_string(),
                            "in_flight": e.in_flight(),
                            "max_in_flight": e.max_in_flight,
                            "queue_depth": reported.queue_depth,
                            "kv_cache": reported.kv_cache,
                            "loaded_adapters": reported.loaded_adapters,
                            "models": models,
                        })
                    })
                    .collect();
                json!({
                    "name": p.name,
                    "waiting": p.waiting.load(Ordering::Relaxed),
                    "endpoints": endpoints,
                })
            })
            .collect();
        json!({ "version": rt.snapshot.version, "pools": pools })
    }

    async fn reload_signal(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            match session.read_request_body().await {
                Ok(Some(chunk)) if body.len() + chunk.len() <= 64 << 10 => {
                    body.extend_from_slice(&chunk)
                }
                Ok(Some(_)) => return respond(413, "text/plain", "body over 64 KiB\n".into()),
                Ok(None) => break,
                Err(e) => return respond(400, "text/plain", format!("{e}\n")),
            }
        }
        let event: ReloadEvent = match serde_json::from_slice(&body) {
            Ok(e) => e,
            Err(e) => {
                return respond(
                    400,
                    "text/plain",
                    format!("expected {{\"pool\", \"endpoint\", \"model\", \"event\": start|finished|failed, \"version\"}}: {e}\n"),
                )
            }
        };
        match self.inference.signal(&event) {
            Ok(()) => respond(200, "application/json", format!("{:#}\n", self.pools())),
            Err(e) => respond(404, "text/plain", format!("{e}\n")),
        }
    }
}

/// The admin paths that read (GET or HEAD); `/inference/reload` is the one action (POST).
const READS: [&str; 8] = [
    "/",
    "/ready",
    "/stats/prometheus",
    "/config_dump",
    "/clusters",
    "/inference",
    "/ebpf",
    "/control",
];

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        // pingora's ServeHttp keeps every connection alive; HTTP/1.0 clients expect a close.
        let req = session.req_header();
        let keep_alive = req
            .headers
            .get("connection")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"keep-alive"));
        if req.version == http::Version::HTTP_10 && !keep_alive {
            session.set_keepalive(None);
        }
        let path = session.req_header().uri.path().to_string();
        // Reads answer GET (and HEAD); the one action, POST. Anything else is 405, as in
        // Envoy's admin, rather than a read served to a mistaken DELETE or a 404 for a GET.
        let method = &session.req_header().method;
        let allow = match path.as_str() {
            "/inference/reload" => "POST",
            p if READS.contains(&p) => "GET, HEAD",
            _ => "",
        };
        if !allow.is_empty() && !allow.split(", ").any(|m| m == method.as_str()) {
            let mut r = respond(405, "text/plain", format!("{path} takes {allow}\n"));
            r.headers_mut()
                .insert(http::header::ALLOW, http::HeaderValue::from_static(allow));
            return r;
        }
        match path.as_str() {
            // The live admin page: static HTML whose script reads the JSON endpoints below.
            "/" => respond(
                200,
                "text/html; charset=utf-8",
                include_str!("admin_page.html").into(),
            ),
            "/ready" if self.drain.is_draining() => respond(503, "text/plain", "DRAINING\n".into()),
            "/ready" => respond(200, "text/plain", "LIVE\n".into()),
            "/stats/prometheus" => {
                respond(200, "text/plain; version=0.0.4", self.exposition.render())
            }
            "/config_dump" => {
                let rt = self.runtime.load();
                let dump =
                    json!({ "version": rt.snapshot.version, "config": rt.snapshot.config() });
                respond(200, "application/json", format!("{dump:#}\n"))
            }
            "/clusters" => respond(200, "application/json", format!("{:#}\n", self.clusters())),
            "/inference" => respond(200, "application/json", format!("{:#}\n", self.pools())),
            "/ebpf" => respond(
                200,
                "application/json",
                format!("{:#}\n", self.fast_path.status()),
            ),
            "/control" => {
                let state = match &self.exposition.control {
                    Some(c) => json!({ "source": "control plane", "stream": c.get() }),
                    None => json!({ "source": "file" }),
                };
                respond(200, "application/json", format!("{state:#}\n"))
            }
            "/inference/reload" => self.reload_signal(session).await,
            _ => respond(
                404,
                "text/plain",
                format!("not found; try {}\n", READS.join(", ")),
            ),
        }
    }
}
