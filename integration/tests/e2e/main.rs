//! End-to-end tests: the real `weir` binary between real clients and real backends, all on
//! 127.0.0.1. One test binary for the crate (modules below) keeps CI's link time down.

mod access_log;
mod admin_page;
mod bad_input;
mod control;
mod envoy_compat;
mod filter_host;
mod filters;
mod grpc;
mod http;
mod inference;
mod kserve;
mod kserve_proto;
mod lifecycle;
mod metrics;
mod reload;
mod resilience;
mod sockmap;
mod traces;
mod writes;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use weir_integration::weir_process::{free_port, Weir};

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// An HTTP/1.1 client.
pub fn h1_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// An h2c client (HTTP/2 with prior knowledge).
pub fn h2c_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: ::http::HeaderMap,
    pub body: String,
}

impl Reply {
    /// The JSON the test backend writes for echo requests.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not json ({e}): {}", self.body))
    }

    pub fn backend(&self) -> String {
        self.headers
            .get("x-backend")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    }
}

/// Sends a request through weir and reads the whole reply.
pub async fn send(
    client: &HttpClient,
    listen: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Reply {
    let mut req = ::http::Request::builder()
        .method(method)
        .uri(format!("http://{listen}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::new())).expect("valid request");
    let resp = tokio::time::timeout(Duration::from_secs(20), client.request(req))
        .await
        .expect("reply within 20s")
        .expect("request sent");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

pub async fn get(client: &HttpClient, listen: SocketAddr, path: &str) -> Reply {
    send(client, listen, "GET", path, &[]).await
}

/// Writes `request` as is on a new connection to `listen` and returns all weir answers until
/// it closes the connection (the last request should say `Connection: close`).
pub async fn raw_exchange(listen: SocketAddr, request: impl Into<Vec<u8>>) -> String {
    use std::io::{Read, Write};
    let request = request.into();
    tokio::task::spawn_blocking(move || {
        let mut c = std::net::TcpStream::connect(listen).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        c.write_all(&request).expect("write the request");
        let mut out = Vec::new();
        c.read_to_end(&mut out)
            .expect("weir closes after the response");
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
    .expect("raw exchange")
}

/// A weir with one listener `main`; `rest` is YAML with routes and clusters.
pub struct Setup {
    pub weir: Weir,
    pub listen: SocketAddr,
}

pub fn config_text(listen: SocketAddr, admin: SocketAddr, rest: &str) -> String {
    format!(
        "admin:\n  address: \"{admin}\"\nlisteners:\n  - name: main\n    address: \"{listen}\"\n{rest}{}",
        sockmap::fast_path_for_suites()
    )
}

pub fn start(rest: &str) -> Setup {
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let weir = Weir::start(&config_text(listen, admin, rest), admin);
    sockmap::check_fast_path_for_suites(&weir);
    Setup { weir, listen }
}

/// A cluster block: `name`, protocol, endpoints, and extra indented YAML lines.
pub fn cluster(name: &str, protocol: &str, endpoints: &[SocketAddr], extra: &str) -> String {
    let eps: Vec<String> = endpoints
        .iter()
        .map(|a| format!("{{ address: \"{a}\" }}"))
        .collect();
    format!(
        "  - name: {name}\n    protocol: {protocol}\n    endpoints: [{}]\n{extra}",
        eps.join(", ")
    )
}

/// Admin `/clusters` as JSON.
pub fn clusters_json(weir: &Weir) -> serde_json::Value {
    let (_, body) =
        weir_integration::weir_process::admin_get(weir.admin, "/clusters").expect("clusters");
    serde_json::from_str(&body).expect("json")
}

/// The `/stats/prometheus` of the weir whose admin endpoint is `admin`, read by a real
/// Prometheus parser, and its text (for failure messages).
pub fn scrape(admin: SocketAddr) -> (prometheus_parse::Scrape, String) {
    let (status, text) =
        weir_integration::weir_process::admin_get(admin, "/stats/prometheus").expect("metrics");
    assert_eq!(status, 200, "{text}");
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("valid exposition");
    (scrape, text)
}

/// The sample of `metric` with (at least) these labels.
pub fn sample<'a>(
    scrape: &'a prometheus_parse::Scrape,
    metric: &str,
    labels: &[(&str, &str)],
) -> Option<&'a prometheus_parse::Value> {
    scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == metric
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(k).is_some_and(|x| x == *v))
        })
        .map(|s| &s.value)
}

/// Counter or gauge `metric` with (at least) these labels on the `/stats/prometheus` of the
/// weir whose admin endpoint is `admin`; `None` when absent. The exposition comes along for
/// failure messages.
pub fn metric_value(
    admin: SocketAddr,
    metric: &str,
    labels: &[(&str, &str)],
) -> (Option<f64>, String) {
    let (scrape, text) = scrape(admin);
    let value = sample(&scrape, metric, labels).map(|v| match v {
        prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => *v,
        other => panic!("{metric}: {other:?}"),
    });
    (value, text)
}
