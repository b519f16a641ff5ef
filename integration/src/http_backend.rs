//! A real HTTP/1.1 + h2c (prior knowledge) backend on 127.0.0.1 whose behaviour tests steer.
//!
//! Paths:
//! - `/healthz`: 200, or 503 after `set_healthy(false)`.
//! - `/status/N`: replies N.
//! - `/delay/MS`: replies 200 after MS milliseconds.
//! - `/close`: replies 200 with `connection: close`, then closes the connection.
//! - `/echo-trailers`: the request body's length and trailer fields (`len name=value ...`),
//!   its `trailer` header as `x-declared`.
//! - `/gated-chunks/N`: streams N chunks; each after the first waits for [`HttpBackend::open_gate`].
//! - anything else: 200 with a JSON body describing the request (backend name, method, path,
//!   headers, body length).
//!
//! `fail_with(S)` makes every non-health request answer S; `delay_all(MS)` delays them all.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

type Body = BoxBody<Bytes, Infallible>;

/// Shared state of one backend.
pub struct HttpBackend {
    pub name: String,
    pub addr: SocketAddr,
    requests: AtomicU64,
    healthy: AtomicBool,
    fail_status: AtomicU16,
    delay_ms: AtomicU64,
    gate: Semaphore,
}

impl HttpBackend {
    /// Binds a free port on 127.0.0.1 and serves until the test process ends.
    pub async fn start(name: &str) -> Arc<Self> {
        Self::start_on(name, std::net::Ipv4Addr::LOCALHOST.into()).await
    }

    /// [`HttpBackend::start`] on a free port of `ip`.
    pub async fn start_on(name: &str, ip: std::net::IpAddr) -> Arc<Self> {
        let listener = TcpListener::bind((ip, 0)).await.expect("bind backend");
        let backend = Arc::new(Self {
            name: name.to_string(),
            addr: listener.local_addr().expect("local addr"),
            requests: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            fail_status: AtomicU16::new(0),
            delay_ms: AtomicU64::new(0),
            gate: Semaphore::new(0),
        });
        let b = backend.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let b = b.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let b = b.clone();
                        async move { Ok::<_, Infallible>(b.handle(req).await) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        backend
    }

    /// Requests served, health checks excluded.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::SeqCst);
    }

    /// Answer every request with `status` (0 restores normal behaviour).
    pub fn fail_with(&self, status: u16) {
        self.fail_status.store(status, Ordering::SeqCst);
    }

    pub fn delay_all(&self, ms: u64) {
        self.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Lets one gated chunk go.
    pub fn open_gate(&self) {
        self.gate.add_permits(1);
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let mut resp = self.clone().respond(req).await;
        resp.headers_mut()
            .insert("x-backend", self.name.parse().expect("ascii name"));
        resp
    }

    async fn respond(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        if path == "/healthz" {
            let status = if self.healthy.load(Ordering::SeqCst) {
                200
            } else {
                503
            };
            return text(status, "health");
        }
        self.requests.fetch_add(1, Ordering::SeqCst);
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let fail = self.fail_status.load(Ordering::SeqCst);
        if fail != 0 {
            return text(fail, "configured failure");
        }
        if path == "/echo-body" {
            let ct = req
                .headers()
                .get("content-type")
                .cloned()
                .unwrap_or_else(|| "application/octet-stream".parse().expect("valid"));
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return Response::builder()
                .header("content-type", ct)
                .body(Full::new(body).boxed())
                .expect("valid response");
        }
        if path == "/echo-trailers" {
            // The request body's length and its trailer fields, as `len name=value ...`
            // (sorted), with the request's `trailer` header echoed as `x-declared`.
            let declared = req.headers().get("trailer").cloned();
            let collected = req.into_body().collect().await;
            let Ok(collected) = collected else {
                return text(400, "body read failed");
            };
            let mut fields: Vec<String> = collected
                .trailers()
                .map(|t| {
                    t.iter()
                        .map(|(k, v)| format!("{k}={}", v.to_str().unwrap_or("?")))
                        .collect()
                })
                .unwrap_or_default();
            fields.sort();
            let mut resp = text(
                200,
                &format!("{} {}", collected.to_bytes().len(), fields.join(" ")),
            );
            if let Some(d) = declared {
                resp.headers_mut().insert("x-declared", d);
            }
            return resp;
        }
        if path == "/trailers" {
            // A chunked body ending with trailer fields (HTTP/1.1 chunked trailer section, or
            // an HTTP/2 trailing HEADERS frame).
            let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
                Ok(Frame::data(Bytes::from_static(b"hello"))),
                Ok(Frame::trailers({
                    let mut t = hyper::HeaderMap::new();
                    t.insert("x-checksum", "abc123".parse().expect("valid"));
                    t.insert("x-count", "2".parse().expect("valid"));
                    t
                })),
            ];
            return Response::builder()
                .header("trailer", "x-checksum, x-count")
                .body(BodyExt::boxed(StreamBody::new(tokio_stream::iter(frames))))
                .expect("valid response");
        }
        if path == "/authz/check" {
            // A tiny authorization service: alice and carol may pass, anyone else may not.
            let user = req
                .headers()
                .get("x-user")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            if user == "alice" || user == "carol" {
                return Response::builder()
                    .header("x-authz-subject", format!("user:{user}"))
                    .body(Full::new(Bytes::new()).boxed())
                    .expect("valid response");
            }
            return text(403, &format!("user {user:?} may not pass\n"));
        }
        if let Some(n) = path
            .strip_prefix("/sse/")
            .and_then(|c| c.parse::<usize>().ok())
        {
            // An OpenAI-style stream: one `data:` event per token, then [DONE].
            let mut events: Vec<Result<Frame<Bytes>, Infallible>> = (0..n)
                .map(|i| {
                    Ok(Frame::data(Bytes::from(format!(
                        "data: {{\"choices\":[{{\"delta\":{{\"content\":\"t{i}\"}}}}]}}\n\n"
                    ))))
                })
                .collect();
            events.push(Ok(Frame::data(Bytes::from_static(b"data: [DONE]\n\n"))));
            let body = StreamBody::new(futures_util::stream::iter(events));
            return Response::builder()
                .header("content-type", "text/event-stream")
                .body(BodyExt::boxed(body))
                .expect("valid response");
        }
        if path == "/close" {
            // Answers, then closes the connection.
            let mut resp = text(200, "closing");
            resp.headers_mut()
                .insert("connection", "close".parse().expect("valid"));
            return resp;
        }
        if let Some(code) = path.strip_prefix("/status/").and_then(|c| c.parse().ok()) {
            return text(code, "status");
        }
        if let Some(ms) = path.strip_prefix("/delay/").and_then(|c| c.parse().ok()) {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            return text(200, "delayed");
        }
        if let Some(n) = path
            .strip_prefix("/gated-chunks/")
            .and_then(|c| c.parse::<usize>().ok())
        {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
            let me = self.clone();
            tokio::spawn(async move {
                for i in 0..n {
                    if i > 0 {
                        let Ok(p) = me.gate.acquire().await else {
                            return;
                        };
                        p.forget();
                    }
                    if tx
                        .send(Ok(Frame::data(Bytes::from(format!("chunk{i};")))))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
            let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
            return Response::builder()
                .body(BodyExt::boxed(body))
                .expect("valid response");
        }
        let method = req.method().to_string();
        let query = req.uri().query().map(str::to_string);
        let headers: serde_json::Map<String, serde_json::Value> = req
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").into()))
            .collect();
        let version = format!("{:?}", req.version());
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes().len())
            .unwrap_or(0);
        let json = serde_json::json!({
            "backend": self.name,
            "method": method,
            "path": path,
            "query": query,
            "version": version,
            "headers": headers,
            "body_len": body,
        });
        let mut resp = text(200, &json.to_string());
        resp.headers_mut()
            .insert("content-type", "application/json".parse().expect("valid"));
        resp
    }
}

fn text(status: u16, body: &str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("valid response")
}
