//! `/stats/prometheus` read by a real Prometheus text parser: every line parses, and the
//! counts match the requests sent.

use prometheus_parse::{Scrape, Value};
use weir_integration::http_backend::HttpBackend;
use weir_integration::otlp_receiver::OtlpReceiver;
use weir_integration::weir_process::admin_get;

use crate::*;

fn sample<'a>(scrape: &'a Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<&'a Value> {
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
    let (status, text) = admin_get(s.weir.admin, "/stats/prometheus").unwrap();
    assert_eq!(status, 200);
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("valid exposition");
    match sample(
        &scrape,
        "weir_requests_total",
        &[("route", "api"), ("code", "200")],
    ) {
        Some(Value::Counter(n)) => assert_eq!(*n, 7.0),
        other => panic!("weir_requests_total for api: {other:?}\n{text}"),
    }
    match sample(
        &scrape,
        "weir_requests_total",
        &[("route", ""), ("code", "404")],
    ) {
        Some(Value::Counter(n)) => assert_eq!(*n, 3.0),
        other => panic!("weir_requests_total for no route: {other:?}\n{text}"),
    }
    match sample(
        &scrape,
        "weir_request_duration_seconds",
        &[("route", "api")],
    ) {
        Some(Value::Histogram(buckets)) => {
            let inf = buckets
                .iter()
                .find(|b| b.less_than.is_infinite())
                .expect("+Inf bucket");
            assert_eq!(inf.count, 7.0);
        }
        other => panic!("duration histogram: {other:?}\n{text}"),
    }
    let backend_addr = backend.addr.to_string();
    match sample(
        &scrape,
        "weir_upstream_responses_total",
        &[("endpoint", backend_addr.as_str()), ("class", "2xx")],
    ) {
        Some(Value::Counter(n)) => assert_eq!(*n, 7.0),
        other => panic!("responses by endpoint: {other:?}\n{text}"),
    }
    match sample(
        &scrape,
        "weir_upstream_request_duration_seconds",
        &[("endpoint", backend_addr.as_str())],
    ) {
        Some(Value::Histogram(buckets)) => {
            let inf = buckets
                .iter()
                .find(|b| b.less_than.is_infinite())
                .expect("+Inf bucket");
            assert_eq!(inf.count, 7.0);
        }
        other => panic!("duration by endpoint: {other:?}\n{text}"),
    }
    match sample(&scrape, "weir_access_log_lines_total", &[]) {
        Some(Value::Counter(n)) => assert_eq!(*n, 10.0),
        other => panic!("access log lines: {other:?}\n{text}"),
    }
    match sample(&scrape, "weir_sockmap_attached", &[]) {
        Some(Value::Gauge(n)) => assert_eq!(*n, 0.0),
        other => panic!("sockmap gauge: {other:?}\n{text}"),
    }
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
