//! Config files a person gets wrong, and the errors they read.

use std::time::Duration;

use weir_policies::{load_str, ConfigError, EMBEDDED_DEFAULT};

fn errors(text: &str) -> Vec<ConfigError> {
    match load_str("weir.yaml", text) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(e) => e.0,
    }
}

fn one_error(text: &str) -> String {
    let errs = errors(text);
    assert_eq!(errs.len(), 1, "expected one error, got {errs:?}");
    errs[0].to_string()
}

const BASE: &str = "clusters:\n  - name: c\n    endpoints: [{ address: \"127.0.0.1:1\" }]\n";

#[test]
fn embedded_default_and_examples_are_valid() {
    load_str("default.yaml", EMBEDDED_DEFAULT).unwrap();
    load_str("mesh.yaml", include_str!("../examples/mesh.yaml")).unwrap();
}

#[test]
fn wrong_type_names_file_line_and_field() {
    let text = format!("{BASE}routes:\n  - name: r\n    match:\n      path: {{ prefix: 5 }}\n    route: {{ cluster: c }}\n  - name: s\n    match:\n      path: {{ exact: [1] }}\n    route: {{ cluster: c }}\n");
    let e = one_error(&text);
    assert!(e.starts_with("weir.yaml:11:"), "{e}");
    assert!(e.contains("routes[1].match.path"), "{e}");
}

#[test]
fn request_head_limit_out_of_range_names_its_line() {
    let text = format!(
        "{BASE}listeners:\n  - name: l\n    address: \"127.0.0.1:8080\"\n    max_request_headers_kb: 2048\n"
    );
    let e = one_error(&text);
    assert!(e.starts_with("weir.yaml:7:5:"), "{e}");
    assert!(
        e.contains("listeners[0].max_request_headers_kb: must be between 1 and 1023"),
        "{e}"
    );
}

#[test]
fn listener_timeouts_are_checked_and_0s_turns_them_off() {
    let listener = "listeners:\n  - name: l\n    address: \"127.0.0.1:8080\"\n";
    let e = one_error(&format!("{BASE}{listener}    idle_timeout: 400d\n"));
    assert!(e.starts_with("weir.yaml:7:5:"), "{e}");
    assert!(
        e.contains("listeners[0].idle_timeout: must be at most 365 days"),
        "{e}"
    );
    let e = one_error(&format!(
        "{BASE}{listener}    request_headers_timeout: soon\n"
    ));
    assert!(e.starts_with("weir.yaml:7:5:"), "{e}");
    assert!(e.contains("invalid duration \"soon\""), "{e}");
    let off = format!("{BASE}{listener}    idle_timeout: 0s\n    request_headers_timeout: 0s\n");
    let snapshot = load_str("weir.yaml", &off).expect("valid");
    let l = &snapshot.listeners[0];
    assert_eq!((l.idle_timeout, l.request_headers_timeout), (None, None));
    let defaults = load_str("weir.yaml", &format!("{BASE}{listener}")).unwrap();
    let l = &defaults.listeners[0];
    assert_eq!(
        (l.idle_timeout, l.request_headers_timeout),
        (
            Some(Duration::from_secs(3600)),
            Some(Duration::from_secs(60))
        )
    );
}

#[test]
fn deep_flow_nesting_is_refused_where_it_starts_not_scanned() {
    // 100,000 nested brackets kept the YAML scanner busy for 45 s (its time grows with the
    // square of the depth); the file is refused at the 101st.
    let text = format!(
        "{BASE}routes: {}{}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let e = one_error(&text);
    assert!(e.starts_with("weir.yaml:4:109:"), "{e}");
    assert!(e.contains("more than 100 [ or { inside each other"), "{e}");
    // Brackets in quoted scalars and comments are text, not nesting.
    let deep = "[".repeat(150);
    let quoted = format!(
        "{BASE}# {deep}\nroutes:\n  - name: \"{deep}\"\n    match: {{ headers: [{{ name: x, exact: '{deep}''s' }}] }}\n    route: {{ cluster: c }}\n"
    );
    load_str("weir.yaml", &quoted).unwrap();
    // Nor are unbalanced brackets inside plain scalars (a regex for a literal `[`).
    let mut plain = format!("{BASE}routes:\n");
    for i in 0..150 {
        plain.push_str(&format!(
            "  - name: r{i}\n    match:\n      path:\n        regex: ^/a{i}\\[x\n    route: {{ cluster: c }}\n"
        ));
    }
    load_str("weir.yaml", &plain).unwrap();
    // A file large enough to be parsed in parts: the part holding the nest declines, and the
    // error is the same.
    let mut large = format!("{BASE}routes:\n");
    for i in 0..3000 {
        large.push_str(&format!(
            "  - {{ name: r{i}, match: {{ path: {{ prefix: /r{i}/ }} }}, route: {{ cluster: c }} }}\n"
        ));
    }
    large.push_str(&format!("  - {}\n", "[".repeat(100_000)));
    let e = one_error(&large);
    assert!(e.starts_with("weir.yaml:3005:105:"), "{e}");
}

#[test]
fn unknown_field_is_an_error_not_ignored() {
    let text = format!("{BASE}routes:\n  - name: r\n    route: {{ cluster: c, timout: 1s }}\n");
    let e = one_error(&text);
    assert!(e.starts_with("weir.yaml:6:"), "{e}");
    assert!(
        e.contains("routes[0].route.timout: unknown field `timout`"),
        "{e}"
    );
}

#[test]
fn dangling_cluster_points_at_its_line() {
    let text = format!("{BASE}routes:\n  - name: r\n    route:\n      cluster: nope\n");
    let e = one_error(&text);
    assert_eq!(
        e,
        "weir.yaml:7:7: routes[0].route.cluster: unknown cluster \"nope\""
    );
}

#[test]
fn all_semantic_problems_are_reported_together() {
    let text = r#"
listeners:
  - { name: l, address: "0.0.0.0:8080" }
  - { name: l, address: "127.0.0.1:8080" }
clusters:
  - { name: c, endpoints: [{ address: "localhost:80" }] }
  - { name: c, endpoints: [] }
routes:
  - name: r
    match: { path: { regex: "(unclosed" } }
    route: { weighted_clusters: [{ cluster: c, weight: 1 }, { cluster: d, weight: 1 }] }
"#;
    let errs: Vec<String> = errors(text).iter().map(|e| e.to_string()).collect();
    let want = [
        (
            "weir.yaml:4:",
            "listeners[1].name: duplicate listener name \"l\"",
        ),
        (
            "weir.yaml:4:",
            "listeners[1].address: 127.0.0.1:8080 overlaps listener \"l\"",
        ),
        (
            "weir.yaml:7:",
            "clusters[1].name: duplicate cluster name \"c\"",
        ),
        (
            "weir.yaml:6:",
            "clusters[0].endpoints[0].address: expected ip:port",
        ),
        (
            "weir.yaml:7:",
            "clusters[1].endpoints: a cluster needs at least one endpoint",
        ),
        ("weir.yaml:10:", "routes[0].match.path.regex: invalid regex"),
        (
            "weir.yaml:11:",
            "routes[0].route.weighted_clusters[1].cluster: unknown cluster \"d\"",
        ),
    ];
    for (pos, msg) in want {
        assert!(
            errs.iter().any(|e| e.starts_with(pos) && e.contains(msg)),
            "missing {pos} {msg} in {errs:#?}"
        );
    }
    assert_eq!(errs.len(), want.len(), "{errs:#?}");
}

#[test]
fn nested_route_fields_are_named_with_their_indexes() {
    let text = format!(
        "{BASE}routes:\n  - {{ name: a, route: {{ cluster: c }} }}\n  - name: b\n    match:\n      headers: [{{ name: x, exact: y }}, {{ name: \"bad name\", exact: y }}, {{ name: z, regex: \"(\" }}]\n    route:\n      cluster: c\n      response_headers: {{ add: [{{ name: ok, value: v }}, {{ name: \"no good\", value: v }}], remove: [\"b@d\"] }}\n"
    );
    let all = errors(&text)
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    for want in [
        "routes[1].match.headers[1].name: invalid header name \"bad name\"",
        "routes[1].match.headers[2].regex: invalid regex",
        "routes[1].route.response_headers.add[1].name: invalid header name",
        "routes[1].route.response_headers.remove[0]: invalid header name",
    ] {
        assert!(all.contains(want), "missing {want:?} in:\n{all}");
    }
}

#[test]
fn bad_duration_and_unknown_retry_condition() {
    let text =
        format!("{BASE}routes:\n  - name: r\n    route:\n      cluster: c\n      timeout: soon\n");
    let e = one_error(&text);
    assert!(
        e.contains("routes[0].route.timeout: invalid duration \"soon\""),
        "{e}"
    );
    assert!(e.starts_with("weir.yaml:8:"), "{e}");
    let text = format!("{BASE}routes:\n  - name: r\n    route:\n      cluster: c\n      retry: {{ retry_on: [5xx, sometimes] }}\n");
    let e = one_error(&text);
    assert!(
        e.contains("routes[0].route.retry.retry_on[1]: unknown retry condition \"sometimes\""),
        "{e}"
    );
}

#[test]
fn syntax_error_and_empty_file() {
    let e = one_error("routes: [\n");
    assert!(e.starts_with("weir.yaml:"), "{e}");
    assert_eq!(one_error("  \n"), "weir.yaml: the file is empty");
}

#[test]
fn lb_policy_forms_parse() {
    let text = "clusters:\n  - { name: a, lb: least_request, endpoints: [{ address: \"127.0.0.1:1\" }] }\n  - { name: b, lb: { ring_hash: { header: x-user } }, endpoints: [{ address: \"127.0.0.1:2\" }] }\n";
    let snap = load_str("weir.yaml", text).unwrap();
    assert_eq!(snap.clusters.len(), 2);
    let e = one_error(
        "clusters:\n  - { name: a, lb: random, endpoints: [{ address: \"127.0.0.1:1\" }] }\n",
    );
    assert!(
        e.contains("clusters[0].lb: ") && e.contains("round_robin"),
        "{e}"
    );
}

#[test]
fn same_content_same_version() {
    let a = load_str("a.yaml", EMBEDDED_DEFAULT).unwrap();
    let b = load_str("b.yaml", EMBEDDED_DEFAULT).unwrap();
    assert_eq!(a.version, b.version);
    let c = load_str("c.yaml", BASE).unwrap();
    assert_ne!(a.version, c.version);
}

#[test]
fn grpc_routes_need_h2c_clusters() {
    let text = format!("{BASE}routes:\n  - name: r\n    match:\n      grpc: {{ service: a.B }}\n    route: {{ cluster: c }}\n");
    let e = one_error(&text);
    assert!(
        e.starts_with("weir.yaml:7:") && e.contains("routes[0].match.grpc: gRPC needs trailers"),
        "{e}"
    );
}

#[test]
fn many_files_validate_together_and_errors_name_the_right_file() {
    let clusters = ("clusters.yaml".to_string(), BASE.to_string());
    let routes = (
        "routes.yaml".to_string(),
        "routes:\n  - name: ok\n    route: { cluster: c }\n  - name: bad\n    route:\n      cluster: missing\n".to_string(),
    );
    let errs = weir_policies::load_many(&[clusters.clone(), routes])
        .unwrap_err()
        .0;
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(
        errs[0].to_string(),
        "routes.yaml:6:7: routes[1].route.cluster: unknown cluster \"missing\""
    );
    let good = (
        "routes.yaml".to_string(),
        "routes:\n  - name: ok\n    route: { cluster: c }\n".to_string(),
    );
    let (snap, spans) = weir_policies::load_many(&[clusters, good]).unwrap();
    assert_eq!(snap.routes.len(), 1);
    assert_eq!(
        (spans[0].clusters.clone(), spans[1].routes.clone()),
        (0..1, 0..1)
    );
}

#[test]
fn scope_is_refused_outside_policy_folders() {
    let e = one_error(&format!("{BASE}scope: {{ labels: {{ app: x }} }}\n"));
    assert!(
        e.starts_with("weir.yaml:4:1: scope: scope applies only to policy folders"),
        "{e}"
    );
}

#[test]
fn endpoint_update_shares_routes_and_validates_the_change() {
    let text = format!("{BASE}routes:\n  - name: r\n    match: {{ path: {{ regex: \"/a/[0-9]+\" }} }}\n    route: {{ cluster: c }}\n");
    let old = load_str("weir.yaml", &text).unwrap();
    let new_eps = vec![weir_policies::model::Endpoint {
        address: "127.0.0.1:9".into(),
        weight: 3,
    }];
    let new = weir_policies::validate::with_endpoints(&old, &[("c".into(), new_eps)]).unwrap();
    assert!(
        std::sync::Arc::ptr_eq(&old.routes, &new.routes),
        "routes are shared, not rebuilt"
    );
    assert_eq!(
        new.clusters[0].endpoints[0].address.to_string(),
        "127.0.0.1:9"
    );
    assert_eq!(new.config().clusters[0].endpoints[0].weight, 3);
    assert_eq!(old.config().clusters[0].endpoints[0].address, "127.0.0.1:1");

    let bad = vec![weir_policies::model::Endpoint {
        address: "nowhere".into(),
        weight: 1,
    }];
    let problems = weir_policies::validate::with_endpoints(&old, &[("c".into(), bad)]).unwrap_err();
    assert!(
        problems[0].message.contains("expected ip:port"),
        "{problems:?}"
    );
    let problems =
        weir_policies::validate::with_endpoints(&old, &[("zzz".into(), vec![])]).unwrap_err();
    assert!(
        problems[0].message.contains("unknown cluster"),
        "{problems:?}"
    );
}

#[test]
fn filter_chains_compile_with_configs_as_bytes_and_paths_next_to_the_file() {
    let text = format!(
        "{BASE}filter_chains:\n  - name: edge\n    filters:\n      - name: rewrite\n        module: filters/rewrite.wasm\n        config: {{ request_set: {{ x-a: \"1\" }} }}\n        vm_config: tick\n      - name: abs\n        module: /opt/f.wasm\n        sha256: \"{}\"\n        fail_open: true\n        callback_deadline: 20ms\nlisteners:\n  - name: l\n    address: \"127.0.0.1:8080\"\n    filter_chain: edge\nroutes:\n  - name: r\n    route: {{ cluster: c }}\n    filter_chain: edge\n",
        "AB".repeat(32)
    );
    let s = load_str("/etc/weir/weir.yaml", &text).unwrap();
    let chain = &s.filter_chains[0];
    assert_eq!(s.listeners[0].filter_chain, Some(0));
    assert_eq!(s.routes[0].filter_chain, Some(0));
    let (a, b) = (&chain.filters[0], &chain.filters[1]);
    assert_eq!(
        a.module,
        std::path::Path::new("/etc/weir/filters/rewrite.wasm")
    );
    assert_eq!(
        a.config,
        br#"{"request_set":{"x-a":"1"}}"#.to_vec(),
        "maps become JSON"
    );
    assert_eq!(a.vm_config, b"tick".to_vec(), "strings pass as they are");
    assert_eq!(
        (a.memory_limit_bytes, a.callback_deadline.as_millis()),
        (64 << 20, 100)
    );
    assert_eq!(b.module, std::path::Path::new("/opt/f.wasm"));
    assert_eq!(b.sha256.as_deref(), Some("ab".repeat(32).as_str()));
    assert!(b.fail_open);
    assert_eq!(b.callback_deadline.as_millis(), 20);
}

#[test]
fn filter_chain_mistakes_name_their_field() {
    let text = format!(
        "{BASE}filter_chains:\n  - name: edge\n    filters:\n      - name: f\n        module: f.wasm\n        sha256: nothex\n        memory_limit_mb: 0\n  - name: edge\n    filters: []\nroutes:\n  - name: r\n    route: {{ cluster: c }}\n    filter_chain: missing\n"
    );
    let errs: Vec<String> = errors(&text).iter().map(|e| e.to_string()).collect();
    let all = errs.join("\n");
    for want in [
        "filter_chains[0].filters[0].sha256: expected 64 hex digits",
        "filter_chains[0].filters[0].memory_limit_mb: expected 1 to 4096",
        "filter_chains[1].name: duplicate filter chain",
        "filter_chains[1].filters: a filter chain needs at least one filter",
        "routes[0].filter_chain: unknown filter chain \"missing\"",
    ] {
        assert!(all.contains(want), "missing {want:?} in:\n{all}");
    }
    assert!(errs.iter().any(|e| e.starts_with("weir.yaml:9:")), "{all}");
    let e = one_error(&format!("{BASE}filter_chains:\n  - name: x\n    filters:\n      - {{ name: f, module: f.wasm, fail_opn: true }}\n"));
    assert!(e.contains("unknown field `fail_opn`"), "{e}");
}

const POOL: &str = "inference_pools:\n  - name: llm\n    protocol: kserve_grpc\n    endpoints:\n      - address: \"127.0.0.1:9001\"\n        models: [{ name: llama, version: \"3\", adapters: [sql-lora] }]\n      - { address: \"127.0.0.1:9002\", models: [{ name: llama }], max_in_flight: 8 }\n    queue: { max_waiting: 10, max_wait: 2s }\n    reload: { drain_deadline: 1m }\n";

#[test]
fn an_inference_pool_compiles_into_a_cluster_and_a_route_target() {
    let text = format!("{POOL}routes:\n  - name: ai\n    route: {{ pool: llm }}\n");
    let s = load_str("weir.yaml", &text).expect("valid");
    let pool = &s.pools[0];
    assert_eq!(s.routes[0].action.pool, Some(0));
    assert_eq!(s.routes[0].action.clusters, vec![(pool.cluster, 1)]);
    let cluster = &s.clusters[pool.cluster];
    assert_eq!(cluster.name, "llm");
    assert_eq!(
        cluster.protocol,
        weir_policies::model::UpstreamProtocol::H2c
    );
    assert_eq!(cluster.endpoints.len(), 2);
    assert_eq!(
        (
            pool.endpoints[0].max_in_flight,
            pool.endpoints[1].max_in_flight
        ),
        (64, 8),
        "pool default, then the endpoint's own"
    );
    assert_eq!(pool.queue.max_wait, std::time::Duration::from_secs(2));
    assert_eq!(
        pool.reload.drain_deadline,
        std::time::Duration::from_secs(60)
    );
    assert!(pool.has_model("llama") && !pool.has_model("sql-lora"));
}

#[test]
fn inference_pool_mistakes_name_their_field() {
    let e = one_error(&format!(
        "{POOL}routes:\n  - name: ai\n    route: {{ pool: lm }}\n"
    ));
    assert!(
        e.contains("routes[0].route.pool: unknown inference pool \"lm\""),
        "{e}"
    );
    let e = one_error(&format!("{BASE}{}", POOL.replace("name: llm", "name: c")));
    assert!(e.contains("inference_pools[0].name"), "{e}");
    assert!(e.contains("also a cluster's name"), "{e}");
    let e = one_error(&POOL.replace("127.0.0.1:9002", "localhost:9002"));
    assert!(e.starts_with("weir.yaml:7:"), "{e}");
    assert!(e.contains("inference_pools[0].endpoints[1].address"), "{e}");
    let e = one_error(&POOL.replace("kserve_grpc", "grpc"));
    assert!(e.contains("inference_pools[0].protocol"), "{e}");
    let errs = errors(&format!(
        "{POOL}    picker: {{ kv_cache_full: 2 }}\nroutes:\n  - name: ai\n    route: {{ pool: llm, cluster: llm }}\n"
    ));
    let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
    assert_eq!(text.len(), 2, "{text:?}");
    assert!(
        text[0].contains("weir.yaml:10:15: inference_pools[0].picker.kv_cache_full"),
        "{text:?}"
    );
    assert!(
        text[1].contains("routes[0].route: set exactly one of cluster, weighted_clusters or pool"),
        "{text:?}"
    );
    // An HTTP reload call is for OpenAI-style servers only, and must be a sane request.
    let errs = errors(&POOL.replace(
        "drain_deadline: 1m }",
        "drain_deadline: 1m, http: { method: FETCH, path: update } }",
    ));
    let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
    assert_eq!(text.len(), 3, "{text:?}");
    assert!(text[0].contains("inference_pools[0].reload.http: only for openai pools"));
    assert!(text[1].contains("inference_pools[0].reload.http.method: expected GET, POST"));
    assert!(text[2].contains("inference_pools[0].reload.http.path: must start with /"));
}

#[test]
fn a_pool_names_the_load_series_of_a_server_weir_does_not_know() {
    use weir_policies::snapshot::MetricSpec;
    let spec = |name: &str, labels: &[(&str, &str)]| MetricSpec {
        name: name.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    let s = load_str(
        "weir.yaml",
        &format!(
            "{POOL}    metrics: {{ interval: 5s, waiting: tgi_queue_size, kv_cache: 'nv_trt_llm_kv_cache_block_metrics{{kv_cache_block_type=\"fraction\", model=tensorrt_llm}}' }}\n"
        ),
    )
    .expect("valid");
    let m = s.pools[0].metrics.as_ref().expect("scraped");
    assert_eq!(
        (m.path.as_str(), m.interval),
        ("/metrics", Duration::from_secs(5))
    );
    assert_eq!(m.waiting, Some(spec("tgi_queue_size", &[])));
    assert_eq!(
        m.kv_cache,
        Some(spec(
            "nv_trt_llm_kv_cache_block_metrics",
            &[
                ("kv_cache_block_type", "fraction"),
                ("model", "tensorrt_llm")
            ]
        ))
    );
    // Not named: the servers' known names are read.
    let s = load_str("weir.yaml", &format!("{POOL}    metrics: {{}}\n")).expect("valid");
    let m = s.pools[0].metrics.as_ref().expect("scraped");
    assert_eq!((&m.waiting, &m.kv_cache), (&None, &None));
    // What is not a series is refused where it is written.
    for (bad, why) in [
        ("'queue size'", "is not a Prometheus metric name"),
        ("'9queue'", "is not a Prometheus metric name"),
        ("'q{kind=waiting'", "expected `}` at the end"),
        ("'q{kind}'", "expected label=\"value\""),
        ("'q{my-label=\"x\"}'", "is not a Prometheus label name"),
        ("'q{kind=\"x}'", "unterminated quote"),
    ] {
        let e = one_error(&format!("{POOL}    metrics: {{ waiting: {bad} }}\n"));
        assert!(
            e.starts_with("weir.yaml:10:") && e.contains("inference_pools[0].metrics.waiting"),
            "{bad}: {e}"
        );
        assert!(e.contains(why), "{bad}: {e}");
    }
}

#[test]
fn a_version_split_names_models_the_pool_serves() {
    let s = load_str(
        "weir.yaml",
        &format!("{POOL}    version_split: {{ llama: {{ \"3\": 9, \"4\": 1, \"5\": 0 }} }}\n"),
    )
    .expect("valid");
    assert_eq!(
        s.pools[0].version_split["llama"],
        vec![("3".to_string(), 9), ("4".to_string(), 1)],
        "versions with weight 0 take no traffic"
    );
    let errs = errors(&format!(
        "{POOL}    version_split: {{ mistral: {{ \"1\": 1 }}, llama: {{ \"3\": 0 }} }}\n"
    ));
    let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
    assert_eq!(text.len(), 2, "{text:?}");
    assert!(
        text.iter().any(|t| t.contains("weir.yaml:10:")
            && t.contains("inference_pools[0].version_split.mistral: no endpoint of the pool serves \"mistral\"")),
        "{text:?}"
    );
    assert!(
        text.iter()
            .any(|t| t.contains("version_split.llama: give at least one version a weight")),
        "{text:?}"
    );
}

#[test]
fn an_openai_pool_takes_an_http_reload_call() {
    let text = POOL.replace("kserve_grpc", "openai").replace(
        "drain_deadline: 1m }",
        "drain_deadline: 1m, http: { path: /update_weights_from_disk, body: '{\"model_path\": \"/w/{model}/{version}\"}' } }",
    );
    let s = load_str("weir.yaml", &text).expect("valid");
    let h = s.pools[0].reload.http.as_ref().expect("http reload");
    assert_eq!(
        (h.method.as_str(), h.ready_path.as_str()),
        ("POST", "/v1/models")
    );
    assert_eq!(
        weir_policies::model::HttpReload::expand(h.body.as_deref().unwrap(), "llama", "7"),
        r#"{"model_path": "/w/llama/7"}"#
    );
}

#[test]
fn fast_path_takes_a_mode_or_settings() {
    use weir_policies::model::FastPathMode;
    let s = load_str("weir.yaml", "fast_path: sockmap\n").expect("valid");
    let f = s.source.fast_path.as_ref().expect("fast_path");
    assert_eq!((f.mode(), f.cgroup()), (FastPathMode::Sockmap, None));
    let s = load_str(
        "weir.yaml",
        "fast_path: { mode: sockmap, cgroup: /sys/fs/cgroup/unified, addresses: [10.0.0.5] }\n",
    )
    .expect("valid");
    let f = s.source.fast_path.as_ref().expect("fast_path");
    assert_eq!(
        f.cgroup(),
        Some(std::path::Path::new("/sys/fs/cgroup/unified"))
    );
    assert_eq!(
        f.addresses(),
        &["10.0.0.5".parse::<std::net::IpAddr>().unwrap()]
    );
    let e = one_error("admin: { address: \"127.0.0.1:15000\" }\nfast_path: fastest\n");
    assert!(e.starts_with("weir.yaml:2:"), "{e}");
    assert!(e.contains("fast_path"), "{e}");
    assert!(
        e.contains("unknown variant `fastest`, expected `off` or `sockmap`"),
        "{e}"
    );
}

#[test]
fn access_log_fields_are_named_and_checked() {
    use weir_policies::model::AccessLogField;
    let s = load_str(
        "weir.yaml",
        "access_log: { path: /tmp/a.log, fields: [time, status, model], buffer: 16 }\n",
    )
    .expect("valid");
    let log = s.source.access_log.as_ref().expect("access_log");
    assert_eq!(
        log.fields,
        vec![
            AccessLogField::Time,
            AccessLogField::Status,
            AccessLogField::Model
        ]
    );
    let e = one_error("access_log: { fields: [time, staus] }\n");
    assert!(e.starts_with("weir.yaml:1:"), "{e}");
    assert!(e.contains("access_log.fields"), "{e}");
    assert!(e.contains("unknown variant `staus`"), "{e}");
    let e = one_error("access_log: { buffer: 0 }\n");
    assert!(e.contains("access_log.buffer: must be at least 1"), "{e}");
}

/// `n` routes, one per line (line of route `i` is `i + 3`), big enough to be parsed in parts.
fn big(n: usize, route: impl Fn(usize) -> String) -> String {
    let mut text = String::from(
        "clusters: [{ name: c, endpoints: [{ address: \"127.0.0.1:1\" }] }]\nroutes:\n",
    );
    for i in 0..n {
        text.push_str(&route(i));
        text.push('\n');
    }
    text
}

fn plain_route(i: usize) -> String {
    format!("  - {{ name: r{i}, match: {{ path: {{ prefix: /r{i}/ }}, headers: [{{ name: x-t, regex: \"t{i}-.*\" }}] }}, route: {{ cluster: c }} }}")
}

#[test]
fn a_large_file_loads_in_order_and_its_errors_name_their_lines() {
    let text = big(3000, plain_route);
    assert!(
        text.len() > 256 << 10,
        "big enough to be cut: {}",
        text.len()
    );
    let snapshot = load_str("big.yaml", &text).unwrap();
    let names: Vec<&str> = snapshot.routes.iter().map(|r| r.name.as_str()).collect();
    let expected: Vec<String> = (0..3000).map(|i| format!("r{i}")).collect();
    assert_eq!(names, expected);

    // Problems in routes parsed and compiled in different parts: all reported, in route order.
    let text = big(3000, |i| match i {
        3 => plain_route(i).replace("t3-.*", "t3-(("),
        2900 => plain_route(i).replace("cluster: c", "cluster: nope"),
        _ => plain_route(i),
    });
    let errs = errors(&text);
    let got: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
    assert_eq!(errs.len(), 2, "{got:?}");
    assert!(
        got[0].starts_with("weir.yaml:6:") && got[0].contains("routes[3].match.headers[0].regex"),
        "{got:?}"
    );
    assert!(
        got[1].starts_with("weir.yaml:2903:")
            && got[1].contains("routes[2900].route.cluster: unknown cluster \"nope\""),
        "{got:?}"
    );

    // A type error deep in the file (a part fails, the whole parse says where).
    let text = big(3000, |i| match i {
        2000 => plain_route(i).replace("prefix: /r2000/", "prefix: [1]"),
        _ => plain_route(i),
    });
    let e = one_error(&text);
    assert!(
        e.starts_with("weir.yaml:2003:") && e.contains("routes[2000].match.path"),
        "{e}"
    );
}

#[test]
fn outbound_capture_and_original_dst_clusters_are_checked() {
    const GOOD: &str = "listeners:\n  - name: outbound\n    address: \"0.0.0.0:15001\"\nroutes:\n  - name: out\n    route: { cluster: original }\nclusters:\n  - name: original\n    original_dst: true\nfast_path:\n  mode: sockmap\n  outbound: { listener: \"127.0.0.1:15001\", exclude_ports: [22] }\n";
    let s = load_str("weir.yaml", GOOD).expect("valid");
    assert!(s.clusters[0].original_dst && s.clusters[0].endpoints.is_empty());
    let out = s.source.fast_path.as_ref().unwrap().outbound().unwrap();
    assert_eq!(out.exclude_ports, vec![22]);
    // An original_dst cluster takes no endpoints and no health check.
    let errs = errors(&GOOD.replace(
        "original_dst: true\n",
        "original_dst: true\n    endpoints: [{ address: \"127.0.0.1:1\" }]\n    health_check: { http: { path: /h } }\n",
    ));
    let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
    assert_eq!(text.len(), 2, "{text:?}");
    assert!(
        text[0].contains("weir.yaml:10:")
            && text[0].contains("clusters[0].endpoints: an original_dst cluster"),
        "{text:?}"
    );
    assert!(
        text[1].contains("clusters[0].health_check: an original_dst cluster has no endpoints"),
        "{text:?}"
    );
    // The listener must be one of the config's; ports or exclude_ports, not both.
    let errs = errors(
        &GOOD
            .replace("127.0.0.1:15001", "127.0.0.1:15002")
            .replace("exclude_ports: [22]", "ports: [80, 0], exclude_ports: [22]"),
    );
    let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
    assert_eq!(text.len(), 3, "{text:?}");
    assert!(
        text[0].contains("weir.yaml:12:")
            && text[0].contains("fast_path.outbound.listener: no listener on 127.0.0.1:15002"),
        "{text:?}"
    );
    assert!(
        text[1].contains("fast_path.outbound.exclude_ports: give ports or exclude_ports, not both"),
        "{text:?}"
    );
    assert!(
        text[2].contains("fast_path.outbound.ports[1]: port 0 is no destination"),
        "{text:?}"
    );
    // Capture is part of the sockmap fast path.
    let e = one_error(&GOOD.replace("mode: sockmap", "mode: off"));
    assert!(
        e.contains("fast_path.outbound: outbound capture needs mode: sockmap"),
        "{e}"
    );
    let e = one_error(&GOOD.replace("[22] }", "[22], colour: red }"));
    assert!(
        e.contains("weir.yaml:12:") && e.contains("fast_path.outbound.colour: unknown field"),
        "{e}"
    );
    let e = one_error(&GOOD.replace("mode: sockmap", "mode: turbo"));
    assert!(
        e.contains("weir.yaml:11:") && e.contains("fast_path.mode"),
        "{e}"
    );
    let e = one_error("fast_path: [sockmap]\n");
    assert!(e.contains("sockmap, off, or {"), "{e}");
}
