//! Inference pools end to end: the model read from the request picks a replica (read as the
//! servers read it, or the request is refused), a busy pool queues then sheds, load reports
//! steer requests, a rolling weight reload under a stream of gRPC `ModelStreamInfer` clients
//! breaks no stream, requests wait while every replica reloads, a backend killed mid-stream
//! ends the stream with a gRPC status, and a client that leaves mid-stream ends it at the
//! model server.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use weir_integration::inference_client::{
    kserve_client, open_stream, reload_backend, reload_signal, reload_through_admin, stream_once,
    token_request,
};
use weir_integration::model_server::ModelServer;
use weir_integration::weir_process::{admin_get, Weir};

use crate::*;

/// An `inference_pools` section with one pool `llm`, and a route sending everything to it.
fn pool_config(protocol: &str, endpoints: &[(SocketAddr, &str)], extra: &str) -> String {
    let eps: Vec<String> = endpoints
        .iter()
        .map(|(a, model)| format!("      - {{ address: \"{a}\", models: [{{ name: {model} }}] }}"))
        .collect();
    format!(
        "routes:\n  - name: ai\n    route: {{ pool: llm }}\ninference_pools:\n  - name: llm\n    protocol: {protocol}\n    endpoints:\n{}\n{extra}",
        eps.join("\n")
    )
}

fn pools_json(weir: &Weir) -> serde_json::Value {
    let (status, body) = admin_get(weir.admin, "/inference").expect("admin /inference");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("json")
}

/// The admin view of endpoint `addr` of pool `llm`.
fn endpoint_json(weir: &Weir, addr: SocketAddr) -> serde_json::Value {
    pools_json(weir)["pools"][0]["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .find(|e| e["address"] == addr.to_string())
        .cloned()
        .unwrap_or_else(|| panic!("no endpoint {addr}"))
}

pub(crate) fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let until = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn completion(
    listen: SocketAddr,
    body: serde_json::Value,
    headers: &[(&str, &str)],
) -> (u16, String) {
    post_completion(listen, body.to_string(), headers).await
}

/// `POST /v1/completions` with `body` as written (a `Value` would sort its keys), as JSON
/// unless `headers` name another content type.
async fn post_completion(
    listen: SocketAddr,
    body: impl Into<Bytes>,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut req = ::http::Request::builder()
        .method("POST")
        .uri(format!("http://{listen}/v1/completions"));
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        req = req.header("content-type", "application/json");
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body.into())).expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(20), h1_client().request(req))
        .await
        .expect("reply within 20 s")
        .expect("response");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn openai_requests_reach_a_replica_of_their_model() {
    // Versions tell the servers apart in the tokens they write ("v3-token0").
    let llama = ModelServer::start_with(&["llama"], 3).await;
    // It could serve llama too, but the pool does not say so.
    let mistral = ModelServer::start_with(&["mistral", "llama"], 5).await;
    let s = start(&pool_config(
        "openai",
        &[(llama.http_addr, "llama"), (mistral.http_addr, "mistral")],
        "",
    ));
    let ask = |model: &str, stream: bool| serde_json::json!({"model": model, "prompt": "hello", "max_tokens": 2, "stream": stream});
    let (status, body) = completion(s.listen, ask("mistral", false), &[]).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("v5-token0"),
        "mistral's server answered: {body}"
    );
    let (status, body) = completion(s.listen, ask("llama", true), &[]).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("v3-token1") && body.ends_with("data: [DONE]\n\n"),
        "llama's server streamed: {body}"
    );
    // The header overrides the body for routing (the body goes upstream unchanged).
    let (_, body) = completion(
        s.listen,
        ask("llama", false),
        &[("x-weir-model", "mistral")],
    )
    .await;
    assert!(body.contains("v5-token0"), "{body}");
    // A model no replica serves: 404 with an OpenAI-style error, from weir.
    let (status, body) = completion(s.listen, ask("gpt-5", false), &[]).await;
    assert_eq!(status, 404, "{body}");
    let err: serde_json::Value = serde_json::from_str(&body).expect("json error");
    assert_eq!(err["error"]["type"], "model_not_found", "{body}");
    // The model after a 300 KiB prompt: the whole body is read, found and replayed upstream
    // intact (the server parses it).
    let long = format!(
        "{{\"prompt\": \"{}\", \"max_tokens\": 1, \"model\": \"llama\"}}",
        "x".repeat(300 << 10)
    );
    let (status, body) = post_completion(s.listen, long, &[]).await;
    assert_eq!(status, 200, "{}", &body[..body.len().min(300)]);
    assert!(body.contains("v3-token0"), "{body}");
    // The model list is the pool's (weir answers it), not one replica's: each server here
    // lists its own.
    let r = get(&h1_client(), s.listen, "/v1/models").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let ids: Vec<_> = r.json()["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|m| m["id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(ids, ["llama", "mistral"], "{}", r.body);
    let r = get(&h1_client(), s.listen, "/v1/models/mistral").await;
    assert_eq!((r.status, r.json()["id"].as_str()), (200, Some("mistral")));
    let r = get(&h1_client(), s.listen, "/v1/models/gpt-5").await;
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "model_not_found");
    // The version each server reported (x-weight-version) is what the pool now knows.
    let e = endpoint_json(&s.weir, llama.http_addr);
    assert_eq!(e["models"][0]["version"], "3", "{e}");
    assert_eq!(e["models"][0]["state"], "serving", "{e}");
}

/// The body of [`gated_stream`]: a streamed completion of two tokens.
const GATED_BODY: &str = r#"{"model": "llama", "prompt": "p", "max_tokens": 2, "stream": true}"#;

/// A streamed completion through `listen` that the simulated server holds after its first
/// token until the test adds a permit to its gate (`x-sim-gated`).
fn gated_stream(listen: SocketAddr) -> ::http::Request<Full<Bytes>> {
    ::http::Request::builder()
        .method("POST")
        .uri(format!("http://{listen}/v1/completions"))
        .header("content-type", "application/json")
        .header("x-sim-gated", "1")
        .body(Full::new(Bytes::from(GATED_BODY)))
        .expect("valid request")
}

/// A gated stream ([`gated_stream`]) through `listen`, holding a replica's slot until the
/// test adds a permit to the server's gate.
async fn hold_a_slot(listen: SocketAddr) -> ::http::Response<hyper::body::Incoming> {
    let held = h1_client()
        .request(gated_stream(listen))
        .await
        .expect("the stream holding a slot");
    assert_eq!(held.status(), 200);
    held
}

/// Pool settings (for [`pool_config`]): one stream per replica, `waiting` requests queued at
/// most `max_wait` each.
fn one_slot(waiting: u32, max_wait: &str) -> String {
    format!("    max_in_flight: 1\n    queue: {{ max_waiting: {waiting}, max_wait: {max_wait} }}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_busy_pool_queues_then_sheds_with_429() {
    let sim = ModelServer::start(&["llama"]).await;
    let s = start(&pool_config(
        "openai",
        &[(sim.http_addr, "llama")],
        &one_slot(1, "1s"),
    ));
    let listen = s.listen;
    // One gated stream holds the only slot.
    let held = hold_a_slot(listen).await;
    let ask = serde_json::json!({"model": "llama", "prompt": "p", "max_tokens": 1});
    // The next request waits in the queue...
    let queued = tokio::spawn(completion(listen, ask.clone(), &[]));
    wait_for("a queued request", Duration::from_secs(5), || {
        pools_json(&s.weir)["pools"][0]["waiting"] == 1
    });
    // ...and with the queue full, one more is shed at once.
    let (status, body) = completion(listen, ask.clone(), &[]).await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("rate_limit_exceeded"), "{body}");
    // The held stream ends: the queued request gets the slot.
    sim.gate.add_permits(1);
    let text = held
        .into_body()
        .collect()
        .await
        .expect("held body")
        .to_bytes();
    assert!(String::from_utf8_lossy(&text).contains("[DONE]"));
    let (status, body) = queued.await.unwrap();
    assert_eq!(status, 200, "the queued request was served: {body}");
    // A wait longer than max_wait is shed too.
    let held = hold_a_slot(listen).await;
    let (status, body) = completion(listen, ask.clone(), &[]).await;
    assert_eq!(status, 429, "{body}");
    sim.gate.add_permits(1);
    drop(held);
    let (_, metrics) = admin_get(s.weir.admin, "/stats/prometheus").expect("metrics");
    assert!(
        metrics.contains("weir_inference_shed_total{pool=\"llm\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("weir_inference_queued_total{pool=\"llm\"} 2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_feed_the_ttft_inter_token_and_token_metrics() {
    let sim = ModelServer::start(&["llama"]).await;
    let s = start(&pool_config("kserve_grpc", &[(sim.addr, "llama")], ""));
    for i in 0..2 {
        assert_eq!(
            stream_once(s.listen, &format!("m{i}"), 5).await,
            Ok("1".into())
        );
    }
    let (_, metrics) = admin_get(s.weir.admin, "/stats/prometheus").expect("metrics");
    let value = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{name} in {metrics}"))
    };
    // Two streams of five messages, each sent 5 ms after the one before.
    assert_eq!(
        value("weir_inference_tokens_total{model=\"llama\",pool=\"llm\"}"),
        10.0
    );
    assert_eq!(
        value("weir_inference_ttft_seconds_count{model=\"llama\",pool=\"llm\"}"),
        2.0
    );
    assert_eq!(
        value("weir_inference_inter_token_seconds_count{model=\"llama\",pool=\"llm\"}"),
        8.0
    );
    let gaps = value("weir_inference_inter_token_seconds_sum{model=\"llama\",pool=\"llm\"}");
    assert!(
        gaps >= 8.0 * 0.004,
        "the gaps are the server's pacing: {gaps}"
    );
}

/// Tokens in and out as an OpenAI-compatible server's `usage` reports them: from a JSON
/// reply and from the last event of an SSE stream that asked for it, into the metrics, the
/// access log and nothing for a stream that did not ask.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn usage_tokens_reported_by_the_server_are_counted() {
    let sim = ModelServer::start(&["llama"]).await;
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("access.log");
    let s = start(&pool_config(
        "openai",
        &[(sim.http_addr, "llama")],
        &format!(
            "access_log: {{ path: \"{}\", fields: [path, model, input_tokens, output_tokens] }}\n",
            log_path.display()
        ),
    ));
    let asks = [
        serde_json::json!({"model": "llama", "prompt": "one two three four", "max_tokens": 5,
            "stream": true, "stream_options": {"include_usage": true}}),
        serde_json::json!({"model": "llama", "prompt": "a b", "max_tokens": 2}),
        serde_json::json!({"model": "llama", "prompt": "not counted", "max_tokens": 3, "stream": true}),
    ];
    for ask in asks {
        let (status, body) = completion(s.listen, ask, &[]).await;
        assert_eq!(status, 200, "{body}");
    }
    // Every request's line is written, so its logging phase (which counts the tokens first)
    // has run.
    let lines: Vec<serde_json::Value> = wait_for_lines(&log_path, 3)
        .iter()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let tokens = |kind: &str| {
        let labels = [("model", "llama"), ("type", kind)];
        let (v, text) = metric_value(s.weir.admin, "weir_inference_usage_tokens_total", &labels);
        v.unwrap_or_else(|| panic!("{kind} tokens in {text}"))
    };
    assert_eq!(tokens("input"), 4.0 + 2.0);
    assert_eq!(tokens("output"), 5.0 + 2.0);
    // Lines in any order: each request's logging runs after its response went out.
    let mut usage: Vec<String> = lines
        .iter()
        .map(|l| format!("{} {}", l["input_tokens"], l["output_tokens"]))
        .collect();
    usage.sort();
    assert_eq!(usage, ["2 2", "4 5", "null null"], "{lines:?}");
}

/// The first `n` lines of the file at `path`, once it has them (the access log's writer
/// thread writes them a moment after the requests end).
fn wait_for_lines(path: &std::path::Path, n: usize) -> Vec<String> {
    let end = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(String::from).collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(std::time::Instant::now() < end, "{n} lines in {text:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Two simulated servers of llama (weights versions 1 and 2) behind an OpenAI pool whose
/// settings end with `extra`.
async fn two_replicas(extra: &str) -> (ModelServer, ModelServer, Setup) {
    let a = ModelServer::start_with(&["llama"], 1).await;
    let b = ModelServer::start_with(&["llama"], 2).await;
    let s = start(&pool_config(
        "openai",
        &[(a.http_addr, "llama"), (b.http_addr, "llama")],
        extra,
    ));
    (a, b, s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sleeping_vllm_replica_is_drained_until_it_wakes() {
    let (asleep, _awake, s) = two_replicas("    reload: { poll_interval: 50ms }\n").await;
    let post = |path: &'static str| {
        let addr = asleep.http_addr;
        async move {
            let req = ::http::Request::builder()
                .method("POST")
                .uri(format!("http://{addr}{path}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            assert_eq!(h1_client().request(req).await.expect(path).status(), 200);
        }
    };
    // vLLM's sleep mode: the server stays up and lists its model, but has no weights.
    post("/sleep").await;
    let state = |weir: &Weir| endpoint_json(weir, asleep.http_addr)["models"][0]["state"].clone();
    wait_for("the poll to see the sleep", Duration::from_secs(5), || {
        state(&s.weir) != "serving"
    });
    let ask = serde_json::json!({"model": "llama", "prompt": "p", "max_tokens": 1});
    for _ in 0..6 {
        let (status, body) = completion(s.listen, ask.clone(), &[]).await;
        assert_eq!(status, 200, "{body}");
        assert!(
            body.contains("v2-token0"),
            "only the awake replica serves: {body}"
        );
    }
    post("/wake_up").await;
    wait_for(
        "the replica back in rotation",
        Duration::from_secs(5),
        || state(&s.weir) == "serving",
    );
    let mut seen = std::collections::HashSet::new();
    for _ in 0..20 {
        let (status, body) = completion(s.listen, ask.clone(), &[]).await;
        assert_eq!(status, 200, "{body}");
        seen.insert(body.contains("v1-token0"));
    }
    assert!(seen.contains(&true), "the woken replica serves again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_version_split_shares_requests_between_serving_versions() {
    let old = ModelServer::start_with(&["llama"], 1).await;
    let new = ModelServer::start_with(&["llama"], 2).await;
    let s = start(&format!(
        "routes:\n  - name: ai\n    route: {{ pool: llm }}\ninference_pools:\n  - name: llm\n    protocol: openai\n    endpoints:\n      - {{ address: \"{}\", models: [{{ name: llama, version: \"1\" }}] }}\n      - {{ address: \"{}\", models: [{{ name: llama, version: \"2\" }}] }}\n    reload: {{ poll_interval: 0s }}\n    version_split: {{ llama: {{ \"1\": 3, \"2\": 1 }} }}\n",
        old.http_addr, new.http_addr
    ));
    let ask = serde_json::json!({"model": "llama", "prompt": "p", "max_tokens": 1});
    let count_v2 = |n: usize, headers: &'static [(&'static str, &'static str)]| {
        let (listen, ask) = (s.listen, ask.clone());
        async move {
            let mut v2 = 0;
            for _ in 0..n {
                let (status, body) = completion(listen, ask.clone(), headers).await;
                assert_eq!(status, 200, "{body}");
                v2 += usize::from(body.contains("v2-token0"));
            }
            v2
        }
    };
    // 3:1 — about a quarter of 300 requests on version 2 (the bounds are over 6 sigma wide).
    let v2 = count_v2(300, &[]).await;
    assert!((30..=120).contains(&v2), "{v2} of 300 on version 2");
    // A pinned version wins over the split.
    assert_eq!(count_v2(10, &[("x-weir-model-version", "2")]).await, 10);
    // Version 2's only replica drains for a reload: the split falls back to what serves.
    reload_signal(s.weir.admin, "llm", new.http_addr, "start", "")
        .await
        .unwrap();
    assert_eq!(count_v2(20, &[]).await, 0);
}

/// Replicas `a` (version 1) and `b` (version 2) of llama behind `s`, each made the busy one in
/// turn by `load(busy, idle)`: once weir's view of the two endpoints passes `seen(busy, idle)`,
/// every request goes to the idle one.
async fn requests_avoid_the_busy_replica(
    s: &Setup,
    (a, b): (&ModelServer, &ModelServer),
    load: impl Fn(&ModelServer, &ModelServer),
    seen: impl Fn(&serde_json::Value, &serde_json::Value) -> bool,
) {
    let ask = serde_json::json!({"model": "llama", "prompt": "p", "max_tokens": 1});
    for (busy, idle, tag) in [(a, b, "v2-"), (b, a, "v1-")] {
        load(busy, idle);
        wait_for("the scrape to see the load", Duration::from_secs(5), || {
            seen(
                &endpoint_json(&s.weir, busy.http_addr),
                &endpoint_json(&s.weir, idle.http_addr),
            )
        });
        for _ in 0..10 {
            let (status, body) = completion(s.listen, ask.clone(), &[]).await;
            assert_eq!(status, 200);
            assert!(
                body.contains(tag),
                "every request to the idle replica: {body}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scraped_load_steers_requests_to_the_idle_replica() {
    let (a, b, s) = two_replicas("    metrics: { interval: 50ms }\n").await;
    let load = |busy: &ModelServer, idle: &ModelServer| {
        busy.load.waiting.store(40, Ordering::Relaxed);
        busy.load.kv_cache_permille.store(900, Ordering::Relaxed);
        idle.load.waiting.store(0, Ordering::Relaxed);
        idle.load.kv_cache_permille.store(100, Ordering::Relaxed);
    };
    let seen = |busy: &serde_json::Value, idle: &serde_json::Value| {
        busy["queue_depth"] == 40 && idle["queue_depth"] == 0
    };
    requests_avoid_the_busy_replica(&s, (&a, &b), load, seen).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pool_reads_the_load_series_it_names() {
    // A server weir knows no names of (TGI's queue gauge, a KV-cache gauge per device); its
    // vLLM-named gauges, which the named series replace, say the opposite.
    let (a, b, s) = two_replicas("    metrics: { interval: 50ms, waiting: tgi_queue_size, kv_cache: 'cache_use{kind=\"kv\"}' }\n").await;
    let page = |queue: u32, kv: f64, swap: f64| {
        format!(
            "# TYPE tgi_queue_size gauge\ntgi_queue_size {queue}\n# TYPE cache_use gauge\n\
             cache_use{{kind=\"kv\"}} {kv}\ncache_use{{kind=\"swap\"}} {swap}\n"
        )
    };
    let load = |busy: &ModelServer, idle: &ModelServer| {
        *busy.load.more_metrics.lock().unwrap() = page(40, 0.9, 0.1);
        *idle.load.more_metrics.lock().unwrap() = page(0, 0.1, 0.9);
        busy.load.waiting.store(0, Ordering::Relaxed);
        idle.load.waiting.store(40, Ordering::Relaxed);
    };
    let seen = |busy: &serde_json::Value, idle: &serde_json::Value| {
        busy["queue_depth"] == 40
            && busy["kv_cache"] == 0.9
            && idle["queue_depth"] == 0
            && idle["kv_cache"] == 0.1
    };
    requests_avoid_the_busy_replica(&s, (&a, &b), load, seen).await;
    // A series in percent (here with no TYPE line) is taken as full, and said so.
    *a.load.more_metrics.lock().unwrap() = "cache_use{kind=\"kv\"} 85\n".into();
    wait_for("the warning", Duration::from_secs(5), || {
        s.weir.log().contains("KV-cache use 85 is over 1")
    });
    assert_eq!(endpoint_json(&s.weir, a.http_addr)["kv_cache"], 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tritonclient_streams_through_an_inference_pool() {
    if !crate::kserve::tritonclient_available() {
        return;
    }
    let sim = ModelServer::start(&["llama"]).await;
    let other = ModelServer::start_with(&["mistral"], 5).await;
    let s = start(&pool_config(
        "kserve_grpc",
        &[(other.addr, "mistral"), (sim.addr, "llama")],
        "",
    ));
    let listen = s.listen;
    // Compressed, as tritonclient can send it: weir decodes the first message to read its
    // model (a replica picked without it would be mistral's half the time).
    for compression in ["gzip", "deflate"] {
        let seen = tokio::task::spawn_blocking(move || {
            crate::kserve::triton_client(listen, "llama", 4, Some(compression))
        })
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("tritonclient ({compression}) through the pool failed: {e}"));
        assert_eq!(seen["server_ready"], true, "no model named: any replica");
        assert_eq!(seen["model_ready"], true);
        assert_eq!(
            seen["unary"]["token"], "v1-token0",
            "llama's server: {seen}"
        );
        let stream = seen["stream"].as_array().expect("stream");
        assert_eq!(stream.len(), 8, "{seen}");
        assert!(
            stream
                .iter()
                .all(|r| r["token"].as_str().is_some_and(|t| t.starts_with("v1-"))),
            "{seen}"
        );
    }
    assert_eq!(endpoint_json(&s.weir, sim.addr)["in_flight"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_reload_under_load_breaks_no_stream() {
    let sims = [
        ModelServer::start(&["llama"]).await,
        ModelServer::start(&["llama"]).await,
        ModelServer::start(&["llama"]).await,
    ];
    let eps: Vec<(SocketAddr, &str)> = sims.iter().map(|s| (s.addr, "llama")).collect();
    let s = start(&pool_config(
        "kserve_grpc",
        &eps,
        "    reload: { drain_deadline: 30s, poll_interval: 100ms }\n",
    ));
    let listen = s.listen;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    // 150 clients, each streaming 20 tokens (100 ms) after another on its own connection.
    for c in 0..150 {
        let (stop, done) = (stop.clone(), done.clone());
        clients.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                match stream_once(listen, &format!("c{c}-{n}"), 20).await {
                    Ok(_) => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => failures.push(e),
                }
                n += 1;
            }
            failures
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for sim in &sims {
        reload_through_admin(s.weir.admin, &[("llm", sim.addr)], sim.addr, "2")
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", s.weir.log()));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for c in clients {
        failures.extend(c.await.unwrap());
    }
    let completed = done.load(Ordering::Relaxed);
    assert!(
        failures.is_empty(),
        "{} of {} streams failed during the rollout: {:?}",
        failures.len(),
        completed + failures.len() as u64,
        &failures[..failures.len().min(5)]
    );
    assert!(completed >= 300, "streams kept flowing: {completed}");
    // After the rollout every new stream runs on the new weights.
    for i in 0..6 {
        assert_eq!(
            stream_once(listen, &format!("after-{i}"), 3).await,
            Ok("2".into())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_wait_while_every_replica_reloads() {
    let sim = ModelServer::start(&["llama"]).await;
    let s = start(&pool_config(
        "kserve_grpc",
        &[(sim.addr, "llama")],
        "    reload: { max_wait: 20s, poll_interval: 0s }\n",
    ));
    reload_signal(s.weir.admin, "llm", sim.addr, "start", "")
        .await
        .unwrap();
    let listen = s.listen;
    let waiting = tokio::spawn(async move { stream_once(listen, "patient", 3).await });
    let admin = s.weir.admin;
    tokio::task::spawn_blocking(move || {
        wait_for("the request to wait", Duration::from_secs(10), || {
            let (_, body) = admin_get(admin, "/inference").unwrap();
            serde_json::from_str::<serde_json::Value>(&body).unwrap()["pools"][0]["waiting"] == 1
        })
    })
    .await
    .unwrap();
    assert!(!waiting.is_finished());
    reload_backend(sim.addr).await.unwrap();
    reload_signal(s.weir.admin, "llm", sim.addr, "finished", "2")
        .await
        .unwrap();
    let version = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("served after the reload")
        .unwrap();
    assert_eq!(version, Ok("2".to_string()), "it ran on the new weights");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backend_killed_mid_stream_ends_the_stream_with_a_grpc_status() {
    let sim = ModelServer::start(&["llama"]).await;
    sim.load.token_delay_us.store(50_000, Ordering::Relaxed);
    let s = start(&pool_config("kserve_grpc", &[(sim.addr, "llama")], ""));
    let mut client = kserve_client(s.listen).await.expect("connect");
    let (tx, mut responses) = open_stream(&mut client, "doomed", 200)
        .await
        .expect("stream opens");
    for _ in 0..2 {
        let r = responses.message().await.expect("token").expect("token");
        assert!(r.infer_response.is_some());
    }
    sim.kill();
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match responses.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the client learns of the crash instead of hanging");
    let status = end.expect_err("a crash is not a clean end of stream");
    assert_ne!(status.code(), tonic::Code::Ok, "{status:?}");
    drop(tx);
    // weir keeps serving: a new stream to the dead pool gets a status, not a hang.
    let err = tokio::time::timeout(Duration::from_secs(10), stream_once(s.listen, "after", 2))
        .await
        .expect("no hang");
    assert!(err.is_err(), "{err:?}");
}

/// A client that leaves in the middle of a stream (an HTTP/1.1 SSE client closing its
/// connection, an h2c one resetting its stream, a gRPC client cancelling `ModelStreamInfer`)
/// ends the stream at the model server too, at once (within the server's next token): a GPU
/// stops generating tokens nobody will read, and the replica's slot in the pool (the
/// picker's in-flight count) is given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_leaves_mid_stream_ends_it_at_the_model_server() {
    use std::io::{Read, Write};
    let sim = ModelServer::start(&["llama"]).await;
    // 1,000 tokens 20 ms apart: 20 s, unless the stream ends early.
    sim.load.token_delay_us.store(20_000, Ordering::Relaxed);
    let sse = start(&pool_config("openai", &[(sim.http_addr, "llama")], ""));
    let grpc = start(&pool_config("kserve_grpc", &[(sim.addr, "llama")], ""));
    let gone_within = |what: &str, weir: &Weir, endpoint: SocketAddr| {
        let started = Instant::now();
        wait_for(
            &format!("{what}: the model server's stream to end"),
            Duration::from_secs(5),
            || sim.load.running.load(Ordering::Relaxed) == 0,
        );
        wait_for(
            &format!("{what}: the replica's slot to be given back"),
            Duration::from_secs(5),
            || endpoint_json(weir, endpoint)["in_flight"] == 0,
        );
        started.elapsed()
    };

    // SSE over HTTP/1.1: read the first event, then close the connection.
    let listen = sse.listen;
    let first = tokio::task::spawn_blocking(move || {
        let mut c = std::net::TcpStream::connect(listen).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let body = r#"{"model": "llama", "prompt": "hi", "max_tokens": 1000, "stream": true}"#;
        write!(
            c,
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains("data: ") {
            let n = c.read(&mut buf).expect("read");
            assert!(n > 0, "closed before the first event");
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&got).into_owned()
        // `c` drops here: the client is gone.
    })
    .await
    .unwrap();
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert_eq!(sim.load.running.load(Ordering::Relaxed), 1, "streaming");
    let took = tokio::task::block_in_place(|| gone_within("SSE", &sse.weir, sim.http_addr));
    eprintln!("SSE client gone: the server's stream ended {took:?} later");

    // The same over h2c: read the first event, then drop the response (RST_STREAM CANCEL);
    // weir's upstream is HTTP/1.1, so its connection has to go.
    let req = ::http::Request::builder()
        .method("POST")
        .uri(format!("http://{}/v1/completions", sse.listen))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            r#"{"model": "llama", "prompt": "hi", "max_tokens": 1000, "stream": true}"#,
        )))
        .unwrap();
    let h2 = h2c_client();
    let mut resp = h2.request(req).await.expect("response");
    assert_eq!(resp.status(), 200);
    let frame = resp
        .body_mut()
        .frame()
        .await
        .expect("a frame")
        .expect("data");
    assert!(frame.data_ref().is_some_and(|d| d.starts_with(b"data: ")));
    assert_eq!(sim.load.running.load(Ordering::Relaxed), 1, "streaming");
    drop(resp);
    let took =
        tokio::task::block_in_place(|| gone_within("SSE over h2c", &sse.weir, sim.http_addr));
    eprintln!("h2c SSE stream reset: the server's stream ended {took:?} later");

    // KServe gRPC: take two tokens, then drop the call (RST_STREAM CANCEL).
    let mut client = kserve_client(grpc.listen).await.expect("connect");
    let (tx, mut responses) = open_stream(&mut client, "leaver", 1000)
        .await
        .expect("stream opens");
    for _ in 0..2 {
        let r = responses.message().await.expect("token").expect("token");
        assert!(r.infer_response.is_some());
    }
    assert_eq!(sim.load.running.load(Ordering::Relaxed), 1, "streaming");
    drop(responses);
    drop(tx);
    let took = tokio::task::block_in_place(|| gone_within("gRPC", &grpc.weir, sim.addr));
    eprintln!("gRPC call cancelled: the server's stream ended {took:?} later");
    // The connection stays usable for the next call.
    assert_eq!(stream_once(grpc.listen, "next", 2).await, Ok("1".into()));
    // Counted as their clients saw them: the left call CANCELLED, the next one OK.
    tokio::task::block_in_place(|| {
        for code in ["1", "0"] {
            wait_for(
                &format!("a gRPC call counted with grpc_code {code}"),
                Duration::from_secs(5),
                || {
                    crate::metric_value(
                        grpc.weir.admin,
                        "weir_grpc_requests_total",
                        &[("grpc_code", code)],
                    )
                    .0 == Some(1.0)
                },
            );
        }
    });
}

/// A client that leaves while its request waits in a busy pool's queue (an HTTP/1.1 client
/// closing its connection, an h2c one resetting its stream, a gRPC client cancelling a
/// `ModelStreamInfer` whose request stream is still open) gives its place back at once, is
/// counted in `weir_inference_abandoned_total`, and never reaches a replica when one frees.
/// (pingora notices a closed downstream only when it reads or writes it; a queued request
/// does neither.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_leaves_the_queue_gives_its_place_back() {
    use std::io::Write;
    let sim = ModelServer::start(&["llama"]).await;
    let s = start(&pool_config(
        "openai",
        &[(sim.http_addr, "llama")],
        &one_slot(4, "30s"),
    ));
    let listen = s.listen;
    // Gated: a stream of these holds the server's `running` count at 1 after its first token
    // until a permit comes, so a request that reached the server shows, even if it ended.
    let waiting = || pools_json(&s.weir)["pools"][0]["waiting"].as_u64();
    let held = hold_a_slot(listen).await;

    // HTTP/1.1: the request is read whole, then the connection closes while it waits.
    let leaver = tokio::task::spawn_blocking(move || {
        let mut c = std::net::TcpStream::connect(listen).expect("connect");
        write!(
            c,
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\nx-sim-gated: 1\r\ncontent-length: {}\r\n\r\n{GATED_BODY}",
            GATED_BODY.len()
        )
        .unwrap();
        c
    })
    .await
    .unwrap();
    tokio::task::block_in_place(|| {
        wait_for(
            "the HTTP/1.1 request queued",
            Duration::from_secs(5),
            || waiting() == Some(1),
        )
    });
    drop(leaver);
    tokio::task::block_in_place(|| {
        wait_for("its place given back", Duration::from_secs(2), || {
            waiting() == Some(0)
        })
    });

    // h2c: the stream is reset while it waits.
    let h2 = h2c_client();
    let pending = tokio::spawn(async move {
        let _ = h2.request(gated_stream(listen)).await;
    });
    tokio::task::block_in_place(|| {
        wait_for("the h2c request queued", Duration::from_secs(5), || {
            waiting() == Some(1)
        })
    });
    pending.abort();
    let _ = pending.await;
    tokio::task::block_in_place(|| {
        wait_for("its place given back", Duration::from_secs(2), || {
            waiting() == Some(0)
        })
    });

    // The slot frees: neither reaches the server.
    sim.gate.add_permits(1);
    let text = held
        .into_body()
        .collect()
        .await
        .expect("held body")
        .to_bytes();
    assert!(String::from_utf8_lossy(&text).contains("[DONE]"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        sim.load.running.load(Ordering::Relaxed),
        0,
        "a request whose client had left reached the server"
    );
    let (_, metrics) = admin_get(s.weir.admin, "/stats/prometheus").expect("metrics");
    assert!(
        metrics.contains("weir_inference_abandoned_total{pool=\"llm\"} 2"),
        "{metrics}"
    );
    // The pool still serves.
    let ask = serde_json::json!({"model": "llama", "prompt": "p", "max_tokens": 1});
    let (status, body) = completion(listen, ask, &[]).await;
    assert_eq!(status, 200, "{body}");

    // gRPC `ModelStreamInfer`: its request stream stays open, so the h2 stream's reset is
    // what tells. A slow stream holds the only slot of a KServe pool.
    sim.load.token_delay_us.store(50_000, Ordering::Relaxed);
    let grpc = start(&pool_config(
        "kserve_grpc",
        &[(sim.addr, "llama")],
        &one_slot(4, "30s"),
    ));
    let open = |id: &'static str| {
        let listen = grpc.listen;
        async move {
            let mut client = kserve_client(listen).await.expect("connect");
            open_stream(&mut client, id, 200).await
        }
    };
    let (_holder_tx, mut held) = open("holder").await.expect("the holding stream opens");
    held.message().await.expect("token").expect("token");
    let waiting = || pools_json(&grpc.weir)["pools"][0]["waiting"].as_u64();
    let queued = tokio::spawn(open("queued"));
    tokio::task::block_in_place(|| {
        wait_for("the gRPC stream queued", Duration::from_secs(5), || {
            waiting() == Some(1)
        })
    });
    queued.abort();
    let _ = queued.await;
    tokio::task::block_in_place(|| {
        wait_for("its place given back", Duration::from_secs(2), || {
            waiting() == Some(0)
        })
    });
    let (_, metrics) = admin_get(grpc.weir.admin, "/stats/prometheus").expect("metrics");
    assert!(
        metrics.contains("weir_inference_abandoned_total{pool=\"llm\"} 1"),
        "{metrics}"
    );
}

/// A request whose own deadline (a gRPC client's `grpc-timeout`, the route's `timeout`)
/// passes while it waits for a busy pool's replica gets 504 / DEADLINE_EXCEEDED, as any other
/// timeout of the request, not the 429 / RESOURCE_EXHAUSTED of a full queue (and is not
/// counted as shed).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deadline_that_passes_in_the_queue_is_a_timeout() {
    let sim = ModelServer::start(&["llama"]).await;
    // A stream of 200 tokens 50 ms apart holds the only slot for 10 s.
    sim.load.token_delay_us.store(50_000, Ordering::Relaxed);
    let busy = one_slot(4, "10s");
    let grpc = start(&pool_config("kserve_grpc", &[(sim.addr, "llama")], &busy));
    let mut holder = kserve_client(grpc.listen).await.expect("connect");
    let (tx, mut held) = open_stream(&mut holder, "holder", 200)
        .await
        .expect("stream opens");
    held.message().await.expect("token").expect("token");

    // A gRPC call with `grpc-timeout: 300m`, sent by hand: tonic's client would give up by
    // itself at the deadline and report CANCELLED, hiding what weir answers.
    let message = prost::Message::encode_to_vec(&token_request("llama", "late", 1));
    let started = Instant::now();
    let (status, _, _) = grpc_by_hand(
        grpc.listen,
        "ModelInfer",
        grpc_frame(0, &message),
        &[("grpc-timeout", "300m")],
    )
    .await;
    let took = started.elapsed();
    assert_eq!(status.as_deref(), Some("4"), "DEADLINE_EXCEEDED");
    assert!(took < Duration::from_secs(5), "{took:?}");

    // The route's own timeout, for an OpenAI client.
    let http = start(&format!(
        "routes:\n  - name: ai\n    route: {{ pool: llm, timeout: 300ms }}\ninference_pools:\n  - name: llm\n    protocol: openai\n    endpoints:\n      - {{ address: \"{}\", models: [{{ name: llama }}] }}\n{busy}",
        sim.http_addr
    ));
    let listen = http.listen;
    let hold =
        serde_json::json!({"model": "llama", "prompt": "p", "max_tokens": 200, "stream": true});
    let holding = tokio::spawn(completion(listen, hold, &[]));
    tokio::task::block_in_place(|| {
        wait_for(
            "the HTTP stream to hold the slot",
            Duration::from_secs(5),
            || endpoint_json(&http.weir, sim.http_addr)["in_flight"] == 1,
        )
    });
    let ask = serde_json::json!({"model": "llama", "prompt": "p", "max_tokens": 1});
    let (status, body) = completion(listen, ask, &[]).await;
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("deadline"), "{body}");
    holding.abort();
    for weir in [&grpc.weir, &http.weir] {
        let (_, metrics) = admin_get(weir.admin, "/stats/prometheus").expect("metrics");
        assert!(
            metrics.contains("weir_inference_shed_total{pool=\"llm\"} 0"),
            "{metrics}"
        );
    }
    drop(tx);
}

/// `message` in a gRPC frame with compression flag `flag`.
fn grpc_frame(flag: u8, message: &[u8]) -> Vec<u8> {
    let mut f = vec![flag];
    f.extend_from_slice(&(message.len() as u32).to_be_bytes());
    f.extend_from_slice(message);
    f
}

/// A call to `GRPCInferenceService/{method}` sent by hand over h2c, `frames` as given, with
/// `headers` added (tonic's client frames, compresses and times out by itself). Returns
/// `grpc-status`, `grpc-message` and the response body.
async fn grpc_by_hand(
    listen: SocketAddr,
    method: &str,
    frames: Vec<u8>,
    headers: &[(&str, &str)],
) -> (Option<String>, String, Bytes) {
    let mut call = ::http::Request::builder()
        .method("POST")
        .uri(format!(
            "http://{listen}/inference.GRPCInferenceService/{method}"
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in headers {
        call = call.header(*k, *v);
    }
    let call = call.body(Full::new(Bytes::from(frames))).unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), h2c_client().request(call))
        .await
        .expect("an answer, not a hang")
        .expect("a response");
    let (head, body) = reply.into_parts();
    let body = body.collect().await.expect("body");
    let trailers = body.trailers().cloned();
    let field = |name: &str| {
        head.headers
            .get(name)
            .or_else(|| trailers.as_ref().and_then(|t| t.get(name)))
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (status, message) = (field("grpc-status"), field("grpc-message"));
    (status, message.unwrap_or_default(), body.to_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_json_model_is_read_as_the_server_reads_it_or_the_request_is_refused() {
    let llama = ModelServer::start_with(&["llama"], 3).await;
    let mistral = ModelServer::start_with(&["mistral"], 5).await;
    let s = start(&pool_config(
        "openai",
        &[(llama.http_addr, "llama"), (mistral.http_addr, "mistral")],
        "    max_body: 65536\n    model_header: false\n",
    ));
    // With `model_header: false` the header does not pick the model: the body does.
    let (status, body) = post_completion(
        s.listen,
        r#"{"model": "llama", "prompt": "hi", "max_tokens": 1}"#,
        &[("x-weir-model", "mistral")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("v3-token0"),
        "llama's server answered: {body}"
    );
    // `model` twice: Python's json (vLLM's server) takes the last, and so does weir.
    let (status, body) = post_completion(
        s.listen,
        r#"{"model": "mistral", "prompt": "hi", "max_tokens": 1, "model": "llama"}"#,
        &[],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("v3-token0"),
        "llama's server answered: {body}"
    );

    // What weir cannot read is refused by weir itself (its message), not sent to a replica
    // picked without the model: a body over max_body (declared, or found out when read
    // chunked), JSON weir cannot parse (Python would take NaN), a compressed body.
    let over = format!(
        "{{\"model\": \"llama\", \"max_tokens\": 1, \"prompt\": \"{}\"}}",
        "x".repeat(70 << 10)
    );
    let (status, body) = post_completion(s.listen, over.clone(), &[]).await;
    assert_eq!(status, 413, "{body}");
    let err: serde_json::Value = serde_json::from_str(&body).expect("an OpenAI error");
    assert_eq!(err["error"]["type"], "invalid_request_error", "{body}");
    assert!(
        body.contains("max_body (65536 bytes)") && body.contains("x-weir-model"),
        "{body}"
    );
    let mut chunked = String::from(
        "POST /v1/completions HTTP/1.1\r\nHost: weir\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\n\r\n",
    );
    for part in over.as_bytes().chunks(8 << 10) {
        chunked += &format!("{:x}\r\n{}\r\n", part.len(), String::from_utf8_lossy(part));
    }
    chunked += "0\r\n\r\n";
    let reply = raw_exchange(s.listen, chunked).await;
    assert!(reply.starts_with("HTTP/1.1 413 "), "{reply}");
    assert!(reply.contains("max_body"), "{reply}");
    let (status, body) = post_completion(
        s.listen,
        r#"{"model": "llama", "prompt": "hi", "temperature": NaN}"#,
        &[],
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("weir cannot read the model"), "{body}");
    let (status, body) = post_completion(
        s.listen,
        vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0],
        &[("content-encoding", "gzip")],
    )
    .await;
    assert_eq!(status, 415, "{body}");
    assert!(body.contains("encoded with \\\"gzip\\\""), "{body}");
    // A body that is not JSON names no model weir looks for (a form upload): any replica
    // answers it, as before.
    let (status, body) =
        post_completion(s.listen, "prompt=hi", &[("content-type", "text/plain")]).await;
    assert_ne!(status, 413, "{body}");
    assert!(!body.contains("weir cannot read"), "{body}");
    // Exactly max_body bytes are read whole: the model is found.
    let mut exact = format!(
        "{{\"model\": \"llama\", \"max_tokens\": 1, \"prompt\": \"{}",
        "x".repeat(1000)
    );
    exact += &"y".repeat(65536 - exact.len() - 2);
    exact += "\"}";
    assert_eq!(exact.len(), 65536);
    let (status, body) = post_completion(s.listen, exact, &[]).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("v3-token0"), "{body}");
    // (The slot is given back as weir finishes the request, just after the client has it.)
    wait_for("the replica's slot back", Duration::from_secs(5), || {
        endpoint_json(&s.weir, llama.http_addr)["in_flight"] == 0
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_grpc_model_is_read_as_the_server_reads_it_or_the_call_is_refused() {
    let llama = ModelServer::start_with(&["llama"], 3).await;
    let mistral = ModelServer::start_with(&["mistral"], 5).await;
    let s = start(&pool_config(
        "kserve_grpc",
        &[(llama.addr, "llama"), (mistral.addr, "mistral")],
        "    max_body: 65536\n",
    ));
    let has = |body: &[u8], token: &[u8]| body.windows(token.len()).any(|w| w == token);
    // `model_name` twice: protobuf's last one wins, at the server and at weir.
    let mut twice = prost::Message::encode_to_vec(&token_request("mistral", "twice", 1));
    prost::encoding::string::encode(1, &"llama".to_string(), &mut twice);
    let (status, message, body) =
        grpc_by_hand(s.listen, "ModelInfer", grpc_frame(0, &twice), &[]).await;
    assert_eq!(status.as_deref(), Some("0"), "{message}");
    assert!(has(&body, b"v3-token0"), "llama's server answered");

    // A first message over max_body, one weir cannot parse, one compressed with a coding
    // weir does not decode: refused by weir (its own message), not sent to any replica.
    let mut big = token_request("llama", "big", 1);
    big.raw_input_contents = vec![vec![0; 70 << 10]];
    let refused = [
        (
            grpc_frame(0, &prost::Message::encode_to_vec(&big)),
            None,
            "8",
            "max_body (65536 bytes)",
        ),
        (
            grpc_frame(0, &[0x0a, 0x05, b'l']),
            None,
            "3",
            "weir cannot read",
        ),
        (
            grpc_frame(
                1,
                &prost::Message::encode_to_vec(&token_request("llama", "snappy", 1)),
            ),
            Some("snappy"),
            "12",
            "\"snappy\"",
        ),
    ];
    for (frames, coding, code, says) in refused {
        let headers: Vec<_> = coding.map(|c| ("grpc-encoding", c)).into_iter().collect();
        let (status, message, _) = grpc_by_hand(s.listen, "ModelInfer", frames, &headers).await;
        assert_eq!(status.as_deref(), Some(code), "{message}");
        assert!(message.contains(says), "{message}");
    }
    // Calls that carry no model in field 1 are not read for one: any replica answers.
    let (status, message, _) = grpc_by_hand(s.listen, "ServerReady", grpc_frame(0, &[]), &[]).await;
    assert_eq!(status.as_deref(), Some("0"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_sharing_a_prompt_prefix_keep_to_one_replica() {
    use weir_integration::kserve::model_infer_request::InferInputTensor;
    let sims = [
        ModelServer::start_with(&["llama"], 1).await,
        ModelServer::start_with(&["llama"], 2).await,
        ModelServer::start_with(&["llama"], 3).await,
        ModelServer::start_with(&["llama"], 4).await,
    ];
    for protocol in ["openai", "kserve_grpc"] {
        let grpc = protocol == "kserve_grpc";
        let eps: Vec<_> = sims
            .iter()
            .map(|m| (if grpc { m.addr } else { m.http_addr }, "llama"))
            .collect();
        let s = start(&pool_config(
            protocol,
            &eps,
            "    picker: { prefix_bytes: 24 }\n",
        ));
        let mut client = kserve_client(s.listen).await.expect("connect");
        // Which server (its weights version) answers a prompt.
        let mut ask = async |prompt: String| -> String {
            if grpc {
                // The prompt as tritonclient sends a BYTES input: in raw contents, each
                // element a 4-byte little-endian length and the bytes.
                let mut r = token_request("llama", "prefix", 1);
                r.inputs = vec![InferInputTensor {
                    name: "PROMPT".into(),
                    datatype: "BYTES".into(),
                    shape: vec![1],
                    ..Default::default()
                }];
                let mut raw = (prompt.len() as u32).to_le_bytes().to_vec();
                raw.extend_from_slice(prompt.as_bytes());
                r.raw_input_contents = vec![raw];
                let reply = client.model_infer(r).await.expect("ModelInfer");
                reply.into_inner().model_version
            } else {
                let ask = serde_json::json!({"model": "llama", "prompt": prompt, "max_tokens": 1});
                let (status, body) = completion(s.listen, ask, &[]).await;
                assert_eq!(status, 200, "{body}");
                let at = body.find("-token0").expect("a token");
                body[..at].rsplit('v').next().expect("version").to_string()
            }
        };
        let mut homes = std::collections::BTreeSet::new();
        for p in 0..8 {
            let mut seen = std::collections::BTreeSet::new();
            for q in 0..3 {
                // The first 24 bytes ("prompt 00p of the test, ") are the prefix.
                seen.insert(ask(format!("prompt {p:03} of the test, then question {q}")).await);
            }
            assert_eq!(seen.len(), 1, "{protocol}: prompt {p} went to {seen:?}");
            homes.extend(seen);
        }
        // Without the prefix every request would go to the first idle replica.
        assert!(
            homes.len() >= 2,
            "{protocol}: eight prefixes all on {homes:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_metrics_page_over_the_limit_is_not_read() {
    // A runaway exporter: 10 MB of comments after the gauges (a page weir would parse whole).
    let sim = ModelServer::start(&["llama"]).await;
    sim.load.waiting.store(40, Ordering::Relaxed);
    *sim.load.more_metrics.lock().unwrap() = "# padding\n".repeat(1_000_000);
    let s = start(&pool_config(
        "openai",
        &[(sim.http_addr, "llama")],
        "    metrics: { interval: 50ms }\n",
    ));
    wait_for("the warning", Duration::from_secs(5), || {
        s.weir.log().contains("bytes: not read")
    });
    assert_eq!(endpoint_json(&s.weir, sim.http_addr)["queue_depth"], 0);
    // Back under the limit, the page is read again.
    sim.load.more_metrics.lock().unwrap().clear();
    wait_for("the scrape to see the load", Duration::from_secs(5), || {
        endpoint_json(&s.weir, sim.http_addr)["queue_depth"] == 40
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pool_with_load_reports_off_asks_no_replica_for_one() {
    let sim = ModelServer::start(&["llama"]).await;
    sim.load.waiting.store(40, Ordering::Relaxed);
    for (protocol, addr) in [("openai", sim.http_addr), ("kserve_grpc", sim.addr)] {
        let s = start(&pool_config(
            protocol,
            &[(addr, "llama")],
            "    load_reports: false\n",
        ));
        for _ in 0..3 {
            if protocol == "openai" {
                let ask = serde_json::json!({"model": "llama", "prompt": "p", "max_tokens": 1});
                let (status, body) = completion(s.listen, ask, &[]).await;
                assert_eq!(status, 200, "{body}");
            } else {
                let mut client = kserve_client(s.listen).await.expect("connect");
                client
                    .model_infer(token_request("llama", "quiet", 1))
                    .await
                    .expect("ModelInfer");
            }
        }
        // vLLM-like, the OpenAI server reports only when asked (asked, weir would read 40 from
        // the first response); like gRPC servers with ORCA on, the gRPC one reports every
        // call, asked or not, and what comes unasked is still read.
        let expected = if protocol == "openai" { 0 } else { 40 };
        assert_eq!(
            endpoint_json(&s.weir, addr)["queue_depth"],
            expected,
            "{protocol}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn orca_load_reports_steer_requests_to_the_idle_replica() {
    let a = ModelServer::start_with(&["llama"], 1).await;
    let b = ModelServer::start_with(&["llama"], 2).await;
    for protocol in ["openai", "kserve_grpc"] {
        let grpc = protocol == "kserve_grpc";
        let addr = |m: &ModelServer| if grpc { m.addr } else { m.http_addr };
        // No scrape: what weir knows of the load comes with the responses. vLLM reports it
        // only when asked (weir asks); a gRPC server sends it as binary metadata.
        let s = start(&pool_config(
            protocol,
            &[(addr(&a), "llama"), (addr(&b), "llama")],
            "",
        ));
        let mut client = kserve_client(s.listen).await.expect("connect");
        let mut ask = async |orca_format: Option<&str>| -> (String, Option<String>) {
            if grpc {
                let reply = client
                    .model_infer(token_request("llama", "orca", 1))
                    .await
                    .expect("ModelInfer");
                (reply.into_inner().model_version, None)
            } else {
                let headers: Vec<_> = orca_format
                    .map(|f| ("endpoint-load-metrics-format", f))
                    .into_iter()
                    .collect();
                let ask = serde_json::json!({"model": "llama", "prompt": "p", "max_tokens": 1});
                let req = ::http::Request::builder()
                    .method("POST")
                    .uri(format!("http://{}/v1/completions", s.listen))
                    .header("content-type", "application/json");
                let req = headers
                    .iter()
                    .fold(req, |r, (k, v)| r.header(*k, *v))
                    .body(Full::new(Bytes::from(ask.to_string())))
                    .unwrap();
                let resp = h1_client().request(req).await.expect("response");
                let orca = resp
                    .headers()
                    .get("endpoint-load-metrics")
                    .map(|v| v.to_str().unwrap().to_string());
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                let body = String::from_utf8_lossy(&body);
                let at = body.find("-token0").expect("a token");
                (body[..at].rsplit('v').next().unwrap().to_string(), orca)
            }
        };
        for (busy, idle, version) in [(&a, &b, "2"), (&b, &a, "1")] {
            busy.load.waiting.store(40, Ordering::Relaxed);
            busy.load.kv_cache_permille.store(900, Ordering::Relaxed);
            idle.load.waiting.store(0, Ordering::Relaxed);
            idle.load.kv_cache_permille.store(100, Ordering::Relaxed);
            // Requests reach each replica until weir has heard both reports.
            let mut tries = 0;
            while endpoint_json(&s.weir, addr(busy))["queue_depth"] != 40
                || endpoint_json(&s.weir, addr(idle))["queue_depth"] != 0
            {
                tries += 1;
                assert!(tries <= 10, "{protocol}: no load report reached weir");
                let (_, orca) = ask(None).await;
                assert_eq!(orca, None, "a client that did not ask gets no report");
            }
            for _ in 0..10 {
                assert_eq!(
                    ask(None).await.0,
                    version,
                    "{protocol}: to the idle replica"
                );
            }
        }
        if !grpc {
            // A client that asks for the report gets it, in its format.
            let (_, orca) = ask(Some("JSON")).await;
            assert!(
                orca.as_deref().is_some_and(|o| o.starts_with("JSON {")),
                "{orca:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_for_a_lora_adapter_go_to_the_replica_that_has_it_loaded() {
    let a = ModelServer::start_with(&["llama", "sql-lora"], 1).await;
    let b = ModelServer::start_with(&["llama", "sql-lora"], 2).await;
    let endpoint = |m: &ModelServer| {
        format!(
            "      - {{ address: \"{}\", models: [{{ name: llama, adapters: [sql-lora] }}] }}\n",
            m.http_addr
        )
    };
    let s = start(&format!(
        "routes:\n  - name: ai\n    route: {{ pool: llm }}\ninference_pools:\n  - name: llm\n    protocol: openai\n    metrics: {{ interval: 50ms }}\n    picker: {{ prefix_bytes: 0 }}\n    endpoints:\n{}{}",
        endpoint(&a),
        endpoint(&b)
    ));
    // The adapter is in the pool's model list, with its model.
    let r = get(&h1_client(), s.listen, "/v1/models").await;
    let listed = r.json()["data"].clone();
    assert_eq!(listed[1]["id"], "sql-lora", "{listed}");
    assert_eq!(listed[1]["parent"], "llama", "{listed}");
    // (Prefix affinity off: its pull would outweigh the adapter's.)
    let ask = serde_json::json!({"model": "sql-lora", "prompt": "p", "max_tokens": 1});
    for (loaded, other, tag) in [(&b, &a, "v2-"), (&a, &b, "v1-")] {
        // What vLLM's /metrics says (`vllm:lora_requests_info`), scraped by weir.
        *loaded.load.lora_adapters.lock().unwrap() = "sql-lora".into();
        other.load.lora_adapters.lock().unwrap().clear();
        wait_for(
            "the scrape to see the adapters",
            Duration::from_secs(5),
            || {
                endpoint_json(&s.weir, loaded.http_addr)["loaded_adapters"]
                    == serde_json::json!(["sql-lora"])
                    && endpoint_json(&s.weir, other.http_addr)["loaded_adapters"]
                        == serde_json::json!([])
            },
        );
        for _ in 0..10 {
            let (status, body) = completion(s.listen, ask.clone(), &[]).await;
            assert_eq!(status, 200, "{body}");
            assert!(
                body.contains(tag),
                "to the replica with sql-lora loaded: {body}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_that_names_no_model_is_the_models_in_a_one_model_pool() {
    let sim = ModelServer::start(&["llama"]).await;
    let s = start(&pool_config(
        "openai",
        &[(sim.http_addr, "llama")],
        &one_slot(1, "300ms"),
    ));
    let listen = s.listen;
    // vLLM serves a request without `model` with its model: weir counts it as that model's.
    let unnamed = serde_json::json!({"prompt": "p", "max_tokens": 1});
    let (status, body) = completion(listen, unnamed.clone(), &[]).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("v1-token0"), "{body}");
    let (_, metrics) = admin_get(s.weir.admin, "/stats/prometheus").expect("metrics");
    assert!(
        metrics.contains("weir_inference_ttft_seconds_count{model=\"llama\",pool=\"llm\"} 1"),
        "{metrics}"
    );
    // So it takes the pool's limits: with the only slot held, it waits, then is shed, where
    // it used to go past the queue to the busy replica.
    let held = hold_a_slot(listen).await;
    let (status, body) = completion(listen, unnamed, &[]).await;
    assert_eq!(status, 429, "{body}");
    sim.gate.add_permits(1);
    drop(held);
}
