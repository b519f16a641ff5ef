//! `/stats/prometheus` read by a real Prometheus text parser: every line parses, and the
//! counts match the requests sent.

use prometheus_parse::{Scrape, Value};
use weir_integration::http_backend::HttpBackend;
use weir_integration::otlp_receiver::OtlpReceiver;

use crate::*;

/// The value of a counter or gauge sample; panics with the exposition when absent.
fn number(scrape: &Scrape, text: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
    match sample(scrape, metric, labels) {
        Some(Value::Counter(n) | Value::Gauge(n) | Value::Untyped(n)) => *n,
        other => panic!("{metric} {labels:?}: {other:?}\n{text}"),
    }
}

/// The observation count of a histogram sample.
fn observations(scrape: &Scrape, text: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
    match sample(scrape, metric, labels) {
        Some(Value::Histogram(buckets)) => {
            buckets
                .iter()
                .find(|b| b.less_than.is_infinite())
                .expect("+Inf bucket")
                .count
        }
        other => panic!("{metric} {labels:?}: {other:?}\n{text}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_prometheus_text_parses_and_counts_match_the_requests() {
    let backend = HttpBackend::start("b").await;
    let (_receiver, otlp) = OtlpReceiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let s = start(&format!(
        "tracing: {{ otlp_endpoint: \"http://{otlp}\" }}\naccess_log: {{ path: \"{}\" }}\nroutes:\n  - name: api\n    match: {{ path: {{ prefix: /api }} }}\n    route: {{ cluster: b }}\nclusters:\n{}",
        dir.path().join("access.log").display(),
        cluster("b", "http1", &[backend.addr], "")
    ));
    let client = h1_client();
    for _ in 0..7 {
        assert_eq!(get(&client, s.listen, "/api/x").await.status, 200);
    }
    for _ in 0..3 {
        assert_eq!(get(&client, s.listen, "/elsewhere").await.status, 404);
    }
    // A request is counted in its logging phase, just after its response went out, before its
    // access log line: wait for the last line, then read again (one exposition renders the
    // request counters before the log's, so the scrape that saw the tenth line may hold a
    // request count from before it; seen once in CI).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (scrape, _) = scrape(s.weir.admin);
        let logged = sample(&scrape, "weir_access_log_lines_total", &[]);
        if matches!(logged, Some(Value::Counter(n)) if *n >= 10.0)
            || std::time::Instant::now() > deadline
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (scrape, text) = scrape(s.weir.admin);
    let endpoint = backend.addr.to_string();
    let endpoint = endpoint.as_str();
    for (metric, labels, want) in [
        (
            "weir_requests_total",
            vec![("route", "api"), ("code", "200")],
            7.0,
        ),
        (
            "weir_requests_total",
            vec![("route", ""), ("code", "404")],
            3.0,
        ),
        (
            "weir_upstream_responses_total",
            vec![("endpoint", endpoint), ("class", "2xx")],
            7.0,
        ),
        ("weir_access_log_lines_total", vec![], 10.0),
        ("weir_sockmap_attached", vec![], 0.0),
    ] {
        assert_eq!(
            number(&scrape, &text, metric, &labels),
            want,
            "{metric} {labels:?}"
        );
    }
    for (metric, labels) in [
        ("weir_request_duration_seconds", ("route", "api")),
        (
            "weir_upstream_request_duration_seconds",
            ("endpoint", endpoint),
        ),
    ] {
        assert_eq!(
            observations(&scrape, &text, metric, &[labels]),
            7.0,
            "{metric}"
        );
    }
    // Every upstream request either opened a connection or reused a pooled one; one client
    // sending one request at a time over keep-alive lets weir reuse its upstream connection.
    let opened = number(
        &scrape,
        &text,
        "weir_upstream_connections_opened_total",
        &[("cluster", "b"), ("endpoint", endpoint)],
    );
    let reused = number(
        &scrape,
        &text,
        "weir_upstream_connections_reused_total",
        &[("cluster", "b"), ("endpoint", endpoint)],
    );
    assert_eq!(opened + reused, 7.0, "{text}");
    assert!(
        (1.0..7.0).contains(&opened),
        "pooled connections reused: {text}"
    );
    assert!(
        sample(&scrape, "weir_control_connected", &[]).is_none(),
        "no control plane metrics for a file config"
    );
    assert!(
        sample(&scrape, "weir_trace_spans_queued_total", &[]).is_some(),
        "{text}"
    );
    // Every HELP and TYPE names a metric that is there.
    for name in scrape.docs.keys() {
        assert!(
            scrape.samples.iter().any(|s| &s.metric == name),
            "HELP for {name} without samples"
        );
    }
}

/// A weir routing everything to cluster `b` (`protocol`: http1 or h2c), one test backend;
/// the backend's address as its endpoint label.
async fn all_to_one_backend(protocol: &str) -> (Setup, String) {
    let backend = HttpBackend::start("b").await;
    let s = start(&format!(
        "routes:\n  - name: all\n    route: {{ cluster: b }}\nclusters:\n{}",
        cluster("b", protocol, &[backend.addr], "")
    ));
    (s, backend.addr.to_string())
}

/// Five requests in flight together (each 300 ms at the backend), all answered 200.
async fn five_at_once(client: &HttpClient, listen: std::net::SocketAddr) {
    let replies =
        futures_util::future::join_all((0..5).map(|_| get(client, listen, "/delay/300"))).await;
    assert!(replies.iter().all(|r| r.status == 200), "{replies:?}");
}

/// `weir_upstream_connections_open` follows pingora's connections: up when weir connects, down
/// when a connection closes, pooled ones included.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_open_upstream_connections_gauge_rises_and_falls_with_the_connections() {
    let (s, endpoint) = all_to_one_backend("http1").await;
    let labels = [("cluster", "b"), ("endpoint", endpoint.as_str())];
    let open = || metric_value(s.weir.admin, "weir_upstream_connections_open", &labels);
    assert_eq!(open().0, Some(0.0), "{}", open().1);
    // Five requests in flight at once need five upstream connections; once answered, all
    // five wait in weir's pool, still open.
    let client = h1_client();
    five_at_once(&client, s.listen).await;
    let (opened, text) = metric_value(
        s.weir.admin,
        "weir_upstream_connections_opened_total",
        &labels,
    );
    assert_eq!(opened, Some(5.0), "{text}");
    assert_eq!(open().0, Some(5.0), "{}", open().1);
    assert_eq!(
        clusters_json(&s.weir)["clusters"][0]["endpoints"][0]["open_connections"],
        5,
        "{}",
        clusters_json(&s.weir)
    );
    // Each `/close` takes a pooled connection, and the backend closes it after replying: the
    // gauge falls to 0 as the pool empties.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut closes = 0;
    while open().0 != Some(0.0) && std::time::Instant::now() < deadline {
        if closes < 10 {
            assert_eq!(get(&client, s.listen, "/close").await.status, 200);
            closes += 1;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(open().0, Some(0.0), "after {closes} closes: {}", open().1);
    assert!(closes >= 5, "only {closes} closes emptied five connections");
}

/// Over h2c, concurrent requests share one upstream connection as streams, and the gauge
/// counts it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h2c_streams_share_one_counted_upstream_connection() {
    let (s, endpoint) = all_to_one_backend("h2c").await;
    let labels = [("cluster", "b"), ("endpoint", endpoint.as_str())];
    let client = h1_client();
    // The first request opens the connection; five at once then ride it as streams.
    assert_eq!(get(&client, s.listen, "/x").await.status, 200);
    five_at_once(&client, s.listen).await;
    for metric in [
        "weir_upstream_connections_open",
        "weir_upstream_connections_opened_total",
    ] {
        let (n, text) = metric_value(s.weir.admin, metric, &labels);
        assert_eq!(n, Some(1.0), "{metric}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_numbers_reach_an_otlp_collector() {
    use opentelemetry_proto::tonic::metrics::v1::{metric::Data, number_data_point};
    let backend = HttpBackend::start("b").await;
    let (receiver, otlp) = OtlpReceiver::start().await;
    let s = start(&format!(
        "otlp_metrics: {{ endpoint: \"http://{otlp}\", interval: 100ms, service_name: weir-m }}\nroutes:\n  - name: api\n    route: {{ cluster: b }}\nclusters:\n{}",
        cluster("b", "http1", &[backend.addr], "")
    ));
    let client = h1_client();
    for _ in 0..4 {
        assert_eq!(get(&client, s.listen, "/x").await.status, 200);
    }
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let exports = receiver.metrics.lock().unwrap().clone();
        let found = exports.last().and_then(|req| {
            let rm = &req.resource_metrics[0];
            let service = rm
                .resource
                .as_ref()?
                .attributes
                .iter()
                .find(|a| a.key == "service.name")?;
            assert!(
                matches!(
                    service.value.as_ref().and_then(|v| v.value.as_ref()),
                    Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s)) if s == "weir-m"
                ),
                "{service:?}"
            );
            let metrics = &rm.scope_metrics[0].metrics;
            let requests = metrics.iter().find(|m| m.name == "weir_requests_total")?;
            let Some(Data::Sum(sum)) = &requests.data else {
                return None;
            };
            let total: f64 = sum
                .data_points
                .iter()
                .filter_map(|p| match p.value {
                    Some(number_data_point::Value::AsDouble(v)) => Some(v),
                    _ => None,
                })
                .sum();
            let duration = metrics
                .iter()
                .find(|m| m.name == "weir_request_duration_seconds")?;
            let Some(Data::Histogram(h)) = &duration.data else {
                return None;
            };
            Some((
                total,
                h.data_points.iter().map(|p| p.count).sum::<u64>(),
                sum.is_monotonic,
            ))
        });
        if let Some((total, count, monotonic)) = found {
            if total == 4.0 {
                assert_eq!(count, 4, "the duration histogram counts the same requests");
                assert!(monotonic, "a counter is a monotonic sum");
                break;
            }
        }
        assert!(
            std::time::Instant::now() < until,
            "no export with 4 requests: {exports:#?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
