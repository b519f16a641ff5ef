//! Config reloads: under load with zero failed requests, in-flight requests finish on the old
//! config, and an invalid file is rejected while the running config stays.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use weir_integration::http_backend::HttpBackend;
use weir_integration::weir_process::admin_get;

use crate::grpc::wait_until;
use crate::*;

fn routed_to(name: &str, a: &HttpBackend, b: &HttpBackend) -> String {
    format!(
        "routes:\n  - name: all\n    route: {{ cluster: {name} }}\nclusters:\n{}{}",
        cluster("a", "http1", &[a.addr], ""),
        cluster("b", "http1", &[b.addr], "")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reload_under_load_drops_no_request() {
    let a = HttpBackend::start("a").await;
    let b = HttpBackend::start("b").await;
    let s = start(&routed_to("a", &a, &b));
    let admin = s.weir.admin;
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for i in 0..4 {
        // Half the workers use h2c, half HTTP/1.1, all on kept-alive connections.
        let c = if i % 2 == 0 {
            h1_client()
        } else {
            h2c_client()
        };
        let (stop, sent, listen) = (stop.clone(), sent.clone(), s.listen);
        load.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let r = get(&c, listen, "/").await;
                sent.fetch_add(1, Ordering::Relaxed);
                if r.status != 200 {
                    failures.push(r.status);
                }
            }
            failures
        }));
    }
    let mut version = s.weir.version();
    for round in 0..6 {
        let target = if round % 2 == 0 { "b" } else { "a" };
        s.weir
            .write_config(&config_text(s.listen, admin, &routed_to(target, &a, &b)));
        version = s.weir.wait_version_change(&version);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in load {
        assert_eq!(
            t.await.unwrap(),
            Vec::<u16>::new(),
            "failed requests during reloads"
        );
    }
    assert!(sent.load(Ordering::Relaxed) > 100, "the load actually ran");
    // The last config routes to a.
    let c = h1_client();
    assert_eq!(get(&c, s.listen, "/").await.backend(), "a");
    assert!(a.requests() > 0 && b.requests() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_flight_request_finishes_on_the_old_config() {
    let a = HttpBackend::start("a").await;
    let b = HttpBackend::start("b").await;
    let s = start(&routed_to("a", &a, &b));
    let c = h1_client();
    let slow = tokio::spawn({
        let c = c.clone();
        let listen = s.listen;
        async move { get(&c, listen, "/delay/800").await }
    });
    wait_until(|| a.requests() == 1).await;
    let old = s.weir.version();
    s.weir.write_config(&config_text(
        s.listen,
        s.weir.admin,
        &routed_to("b", &a, &b),
    ));
    s.weir.wait_version_change(&old);
    assert_eq!(
        get(&c, s.listen, "/").await.backend(),
        "b",
        "new requests use the new config"
    );
    let r = slow.await.unwrap();
    assert_eq!((r.status, r.backend().as_str()), (200, "a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_reload_keeps_the_running_config() {
    let a = HttpBackend::start("a").await;
    let b = HttpBackend::start("b").await;
    let s = start(&routed_to("a", &a, &b));
    let version = s.weir.version();
    let bad = config_text(s.listen, s.weir.admin, &routed_to("missing", &a, &b));
    s.weir.write_config(&bad);
    wait_until(|| {
        admin_get(s.weir.admin, "/stats/prometheus")
            .map(|(_, m)| m.contains("weir_config_reloads_total{result=\"error\"} 1"))
            .unwrap_or(false)
    })
    .await;
    let log = s.weir.log();
    assert!(
        log.contains("weir.yaml:")
            && log.contains("routes[0].route.cluster: unknown cluster \"missing\""),
        "the rejection names file, line and field:\n{log}"
    );
    // SIGHUP re-reads the (still bad) file: still rejected, and the signal does not kill weir.
    s.weir.signal(libc::SIGHUP);
    wait_until(|| {
        admin_get(s.weir.admin, "/stats/prometheus")
            .map(|(_, m)| m.contains("weir_config_reloads_total{result=\"error\"} 2"))
            .unwrap_or(false)
    })
    .await;
    assert_eq!(s.weir.version(), version);
    assert_eq!(get(&h1_client(), s.listen, "/").await.backend(), "a");
}

/// A file written next to the config (a log, an editor's swap file) wakes the reloader, which
/// finds the config's text unchanged and neither parses nor applies it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_written_next_to_the_config_is_no_reload() {
    let a = HttpBackend::start("a").await;
    let b = HttpBackend::start("b").await;
    let s = start(&routed_to("a", &a, &b));
    let version = s.weir.version();
    let metric = |result: &str| -> u64 {
        let (_, m) = admin_get(s.weir.admin, "/stats/prometheus").expect("metrics");
        let series = format!("weir_config_reloads_total{{result=\"{result}\"}} ");
        m.lines()
            .find_map(|l| l.strip_prefix(&series))
            .map_or(0, |v| v.parse().expect("a count"))
    };
    let unchanged = metric("unchanged");
    let neighbour = s.weir.dir.path().join("access.log");
    for i in 0..3 {
        std::fs::write(&neighbour, format!("line {i}\n")).unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    wait_until(|| metric("unchanged") > unchanged).await;
    assert_eq!(metric("ok"), 0, "nothing was applied");
    assert_eq!(s.weir.version(), version);
    // An edit still applies.
    s.weir.write_config(&config_text(
        s.listen,
        s.weir.admin,
        &routed_to("b", &a, &b),
    ));
    s.weir.wait_version_change(&version);
    assert_eq!(metric("ok"), 1);
    assert_eq!(get(&h1_client(), s.listen, "/").await.backend(), "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn follows_a_kubernetes_configmap_symlink_swap() {
    use std::os::unix::fs::symlink;
    let a = HttpBackend::start("a").await;
    let b = HttpBackend::start("b").await;
    let listen: std::net::SocketAddr =
        format!("127.0.0.1:{}", weir_integration::weir_process::free_port())
            .parse()
            .unwrap();
    let admin: std::net::SocketAddr =
        format!("127.0.0.1:{}", weir_integration::weir_process::free_port())
            .parse()
            .unwrap();
    // The layout the kubelet writes: weir.yaml -> ..data/weir.yaml, ..data -> ..v1.
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("config");
    std::fs::create_dir_all(mount.join("..v1")).unwrap();
    std::fs::write(
        mount.join("..v1/weir.yaml"),
        config_text(listen, admin, &routed_to("a", &a, &b)),
    )
    .unwrap();
    symlink("..v1", mount.join("..data")).unwrap();
    symlink("..data/weir.yaml", mount.join("weir.yaml")).unwrap();
    let weir = weir_integration::weir_process::Weir::spawn(
        tempfile::tempdir().unwrap(),
        &[
            "--config".into(),
            mount.join("weir.yaml").display().to_string(),
        ],
        admin,
    );
    let c = h1_client();
    assert_eq!(get(&c, listen, "/").await.backend(), "a");
    let old = weir.version();
    // An update: a new version folder, then an atomic swap of the ..data symlink.
    std::fs::create_dir_all(mount.join("..v2")).unwrap();
    std::fs::write(
        mount.join("..v2/weir.yaml"),
        config_text(listen, admin, &routed_to("b", &a, &b)),
    )
    .unwrap();
    symlink("..v2", mount.join("..data_tmp")).unwrap();
    std::fs::rename(mount.join("..data_tmp"), mount.join("..data")).unwrap();
    weir.wait_version_change(&old);
    assert_eq!(get(&c, listen, "/").await.backend(), "b");
}
