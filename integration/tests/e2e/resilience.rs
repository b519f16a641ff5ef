//! Retries, timeouts, active health checks, outlier ejection and circuit breaking.

use std::time::{Duration, Instant};

use weir_integration::http_backend::HttpBackend;
use weir_integration::weir_process::free_port;

use crate::grpc::wait_until;
use crate::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_move_to_another_endpoint_on_5xx_and_connect_failure() {
    let bad = HttpBackend::start("bad").await;
    let good = HttpBackend::start("good").await;
    bad.fail_with(503);
    let dead: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let rest = format!(
        r#"routes:
  - name: retried
    match: {{ path: {{ prefix: /retried }} }}
    route:
      cluster: mixed
      retry: {{ retries: 2, retry_on: [connect-failure, gateway-error] }}
  - name: not-retried
    route: {{ cluster: mixed }}
clusters:
{}"#,
        cluster("mixed", "http1", &[bad.addr, dead, good.addr], "")
    );
    let s = start(&rest);
    let c = h1_client();
    for _ in 0..12 {
        let r = send(&c, s.listen, "POST", "/retried", &[]).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.backend(), "good");
    }
    assert!(bad.requests() > 0);
    // Without a retry policy the failures reach the client, each with the right status.
    let mut statuses = std::collections::BTreeSet::new();
    for _ in 0..6 {
        statuses.insert(get(&c, s.listen, "/plain").await.status);
    }
    assert_eq!(
        statuses,
        [200, 503].into_iter().collect(),
        "503 from the bad one and for the dead one"
    );
    let (_, metrics) =
        weir_integration::weir_process::admin_get(s.weir.admin, "/stats/prometheus").unwrap();
    assert!(
        metrics.contains("weir_upstream_retries_total{cluster=\"mixed\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn timeouts_give_504_and_per_try_timeout_retries() {
    let slow = HttpBackend::start("slow").await;
    let fast = HttpBackend::start("fast").await;
    slow.delay_all(3000);
    let rest = format!(
        r#"routes:
  - name: short
    match: {{ path: {{ prefix: /short }} }}
    route: {{ cluster: slow, timeout: 300ms }}
  - name: per-try
    route:
      cluster: both
      timeout: 5s
      retry: {{ retries: 1, retry_on: [5xx], per_try_timeout: 300ms }}
clusters:
{}{}"#,
        cluster("slow", "http1", &[slow.addr], ""),
        cluster("both", "http1", &[slow.addr, fast.addr], "")
    );
    let s = start(&rest);
    let c = h1_client();
    let t = Instant::now();
    let r = get(&c, s.listen, "/short").await;
    assert_eq!(r.status, 504, "{r:?}");
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "timed out at ~300ms, took {:?}",
        t.elapsed()
    );
    for _ in 0..4 {
        let r = get(&c, s.listen, "/x").await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.backend(), "fast");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_health_checks_eject_and_restore_endpoints() {
    let a = HttpBackend::start("a").await;
    let b = HttpBackend::start("b").await;
    let hc = "    health_check: { interval: 100ms, timeout: 500ms, unhealthy_threshold: 2, healthy_threshold: 2, http: { path: /healthz } }\n";
    let s = start(&format!(
        "routes:\n  - name: all\n    route: {{ cluster: ab }}\nclusters:\n{}",
        cluster("ab", "http1", &[a.addr, b.addr], hc)
    ));
    let c = h1_client();
    a.set_healthy(false);
    wait_until(|| clusters_json(&s.weir)["clusters"][0]["endpoints"][0]["healthy"] == false).await;
    let before = a.requests();
    for _ in 0..20 {
        assert_eq!(get(&c, s.listen, "/").await.backend(), "b");
    }
    assert_eq!(a.requests(), before, "no traffic to the unhealthy endpoint");
    a.set_healthy(true);
    wait_until(|| clusters_json(&s.weir)["clusters"][0]["endpoints"][0]["healthy"] == true).await;
    for _ in 0..4 {
        get(&c, s.listen, "/").await;
    }
    assert!(a.requests() > before, "traffic returns after recovery");
    let (_, metrics) =
        weir_integration::weir_process::admin_get(s.weir.admin, "/stats/prometheus").unwrap();
    assert!(
        metrics.contains(&format!(
            "weir_upstream_healthy{{cluster=\"ab\",endpoint=\"{}\"}} 1",
            a.addr
        )),
        "{metrics}"
    );

    // Every endpoint unhealthy: a clear 503, not a hang.
    a.set_healthy(false);
    b.set_healthy(false);
    wait_until(|| {
        let j = clusters_json(&s.weir);
        j["clusters"][0]["endpoints"][0]["healthy"] == false
            && j["clusters"][0]["endpoints"][1]["healthy"] == false
    })
    .await;
    let r = get(&c, s.listen, "/").await;
    assert_eq!((r.status, r.body.as_str()), (503, "no healthy upstream\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outlier_detection_ejects_after_consecutive_5xx() {
    let bad = HttpBackend::start("bad").await;
    let good = HttpBackend::start("good").await;
    bad.fail_with(500);
    let od = "    outlier_detection: { consecutive_5xx: 3, base_ejection_time: 30s, max_ejection_percent: 50 }\n";
    let s = start(&format!(
        "routes:\n  - name: all\n    route: {{ cluster: od }}\nclusters:\n{}",
        cluster("od", "http1", &[bad.addr, good.addr], od)
    ));
    let c = h1_client();
    for _ in 0..30 {
        get(&c, s.listen, "/").await;
    }
    assert_eq!(bad.requests(), 3, "ejected after its third consecutive 5xx");
    let j = clusters_json(&s.weir);
    assert_eq!(j["clusters"][0]["endpoints"][0]["ejected"], true, "{j}");
    assert_eq!(j["clusters"][0]["endpoints"][1]["ejected"], false, "{j}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn circuit_breaker_rejects_over_max_requests() {
    let slow = HttpBackend::start("slow").await;
    // Long enough for the metrics to be read while two requests are held.
    slow.delay_all(1000);
    let s = start(&format!(
        "routes:\n  - name: all\n    route: {{ cluster: cb }}\nclusters:\n{}",
        cluster(
            "cb",
            "http1",
            &[slow.addr],
            "    circuit_breaker: { max_requests: 2 }\n"
        )
    ));
    let c = h1_client();
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let c = c.clone();
        let listen = s.listen;
        tasks.push(tokio::spawn(async move { get(&c, listen, "/").await }));
    }
    // While the two slow requests are in flight, the breaker reads open.
    let metric = |name: &str| {
        let (v, text) = metric_value(
            s.weir.admin,
            name,
            &[("cluster", "cb"), ("kind", "requests")],
        );
        v.unwrap_or_else(|| panic!("{name} in {text}"))
    };
    wait_until(|| metric("weir_upstream_cluster_active") == 2.0).await;
    assert_eq!(metric("weir_upstream_circuit_breaker_open"), 1.0);
    let mut ok = 0;
    let mut overflow = 0;
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            200 => ok += 1,
            503 => {
                assert_eq!(r.headers["x-weir-overloaded"], "true");
                overflow += 1
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((ok, overflow), (2, 4));
    // Slots are given back when a request's logging ends, just after its response went out.
    wait_until(|| metric("weir_upstream_cluster_active") == 0.0).await;
    assert_eq!(metric("weir_upstream_circuit_breaker_open"), 0.0);
}
