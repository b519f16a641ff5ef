//! The `weir` command line: the embedded default, `validate`, start-up errors and draining on
//! SIGTERM.

use std::process::Command;
use std::time::Duration;

use weir_integration::http_backend::HttpBackend;
use weir_integration::weir_process::{admin_get, weir_binary};

use crate::grpc::wait_until;
use crate::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_default_serves_admin_and_demo_route() {
    let mut child = Command::new(weir_binary())
        .arg("run")
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn weir");
    let admin = "127.0.0.1:15000".parse().unwrap();
    wait_until(|| matches!(admin_get(admin, "/ready"), Ok((200, _)))).await;
    let r = get(&h1_client(), "127.0.0.1:15001".parse().unwrap(), "/demo").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-weir-demo"], "it works");
    assert_eq!(r.body, "LIVE\n");
    let (status, dump) = admin_get(admin, "/config_dump").unwrap();
    assert_eq!(status, 200);
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(dump["config"]["routes"][0]["name"], "demo");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn validate_reports_every_error_with_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.yaml");
    std::fs::write(&good, weir_policies_default()).unwrap();
    let out = Command::new(weir_binary())
        .arg("validate")
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "clusters:\n  - name: c\n    endpoints: [{ address: \"127.0.0.1:1\" }]\nroutes:\n  - name: r\n    route: { cluster: nope }\n  - name: r\n    route: { cluster: c }\n",
    )
    .unwrap();
    let out = Command::new(weir_binary())
        .arg("validate")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let path = bad.display();
    assert!(
        err.contains(&format!("{path}:6:"))
            && err.contains("routes[0].route.cluster: unknown cluster \"nope\""),
        "{err}"
    );
    assert!(
        err.contains(&format!("{path}:7:"))
            && err.contains("routes[1].name: duplicate route name \"r\""),
        "{err}"
    );

    // `run` refuses to start on it, with the same errors.
    let out = Command::new(weir_binary())
        .args(["run", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown cluster"));
}

fn weir_policies_default() -> &'static str {
    include_str!("../../../policies/examples/default.yaml")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_in_flight_requests_then_exits() {
    let backend = HttpBackend::start("b").await;
    let Setup { mut weir, listen } = start(&format!(
        "routes:\n  - name: all\n    route: {{ cluster: b }}\nclusters:\n{}",
        cluster("b", "http1", &[backend.addr], "")
    ));
    let c = h1_client();
    let slow = tokio::spawn({
        let c = c.clone();
        async move { get(&c, listen, "/delay/1000").await }
    });
    wait_until(|| backend.requests() == 1).await;
    weir.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        std::net::TcpStream::connect(listen).is_err(),
        "a draining weir accepts no new connections"
    );
    let r = slow.await.unwrap();
    assert_eq!(r.status, 200, "the in-flight request completed");
    let (code, took) = tokio::task::spawn_blocking(move || {
        let r = weir.wait_exit(Duration::from_secs(8));
        drop(weir);
        r
    })
    .await
    .unwrap()
    .expect("weir exits once drained, well before the 10s drain timeout");
    assert_eq!(code, 0);
    assert!(took < Duration::from_secs(5), "exit took {took:?}");
}

#[test]
fn refuses_to_start_when_a_listener_port_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("weir.yaml");
    std::fs::write(
        &config,
        format!(
            "listeners: [{{ name: main, address: \"127.0.0.1:{port}\" }}]\nclusters: [{{ name: c, endpoints: [{{ address: \"127.0.0.1:1\" }}] }}]\n"
        ),
    )
    .unwrap();
    let out = Command::new(weir_binary())
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{err}"
    );
}

/// `/ready` means every listener takes connections: pingora starts its services on their own
/// threads in no fixed order, so without the admin endpoint waiting for the listeners' sockets
/// a client that saw `/ready` could be refused (CI saw it once). Each of several starts with
/// many listeners checks every listener the instant `/ready` answers.
#[test]
fn ready_answers_only_once_every_listener_accepts() {
    use weir_integration::weir_process::{free_port, Weir};
    for _ in 0..4 {
        let ports: Vec<u16> = (0..8).map(|_| free_port()).collect();
        let admin: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let listeners: String = ports
            .iter()
            .map(|p| format!("  - {{ name: l{p}, address: \"127.0.0.1:{p}\" }}\n"))
            .collect();
        let weir = Weir::start(
            &format!("admin: {{ address: \"{admin}\" }}\nlisteners:\n{listeners}clusters: [{{ name: c, endpoints: [{{ address: \"127.0.0.1:1\" }}] }}]\n"),
            admin,
        );
        for p in &ports {
            std::net::TcpStream::connect(("127.0.0.1", *p)).unwrap_or_else(|e| {
                panic!(
                    "listener 127.0.0.1:{p} refused after /ready: {e}\n{}",
                    weir.log()
                )
            });
        }
    }
}
