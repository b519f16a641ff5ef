//! The proxy-wasm host in process, with the real example filters built from the Envoy SDK:
//! lifecycle, host calls, limits and the sandbox, without sockets.

use std::sync::Arc;
use std::time::Duration;

use weir_filters::{FilterHost, Limits, NoCallouts, Pairs, PluginConfig, StreamInfo, Verdict};
use weir_integration::wasm_filters;

fn plugin(name: &str, config: &str) -> PluginConfig {
    PluginConfig {
        name: format!("{name}-plugin"),
        root_id: format!("{name}-root"),
        vm_id: name.into(),
        module: wasm_filters::path(name),
        sha256: Some(wasm_filters::sha256(name)),
        vm_config: Vec::new(),
        plugin_config: config.as_bytes().to_vec(),
        fail_open: false,
        limits: Limits {
            memory_bytes: 32 << 20,
            callback_deadline: Duration::from_millis(50),
        },
    }
}

fn host(threads: usize) -> FilterHost {
    FilterHost::start(threads, Arc::new(NoCallouts)).expect("filter host starts")
}

fn request(path: &str, extra: &[(&str, &str)]) -> Pairs {
    let mut h: Pairs = vec![
        (":method".into(), b"GET".to_vec()),
        (":path".into(), path.as_bytes().to_vec()),
        (":authority".into(), b"example.com".to_vec()),
        (":scheme".into(), b"http".to_vec()),
    ];
    h.extend(
        extra
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())),
    );
    h
}

fn get<'a>(pairs: &'a Pairs, name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| std::str::from_utf8(v).unwrap())
}

fn info() -> StreamInfo {
    StreamInfo {
        source: Some("127.0.0.1:40000".parse().unwrap()),
        destination: Some("127.0.0.1:8080".parse().unwrap()),
        protocol: "HTTP/1.1",
        route: "r".into(),
        cluster: "c".into(),
        listener: "l".into(),
        start: Some(std::time::SystemTime::now()),
    }
}

/// A proxy thread waits for its filter thread by blocking. One task may run many phases in a
/// row without returning to the scheduler (a long body read in one poll); the wait must not
/// depend on the scheduler (tokio's oneshot did: after 128 polls its cooperative budget ran out
/// and it left its wake-up to the scheduler, so the thread slept forever).
#[tokio::test(flavor = "current_thread")]
async fn many_phases_in_one_task_poll_all_complete() {
    let host = host(weir_filters::default_threads());
    let chain = host
        .install(
            "c",
            &[plugin(
                "header_rewrite",
                r#"{"response_set": {"x-n": "1"}}"#,
            )],
            None,
        )
        .expect("install");
    let mut s = chain.stream();
    let v = s.request_headers(info(), request("/", &[]), false).await;
    assert!(matches!(v, Verdict::Continue(_)), "{v:?}");
    let mut body = 0;
    // Every phase completes at once: this future never returns Pending to the runtime.
    for i in 0..1000u32 {
        let chunk = i.to_be_bytes().to_vec();
        let Verdict::Continue(Some(out)) = s.request_body(chunk.clone(), i == 999).await else {
            panic!("body chunk {i} held or failed")
        };
        assert_eq!(out, chunk);
        body += out.len();
    }
    assert_eq!(body, 4000);
    s.end();
    host.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_rewrite_filter_edits_request_and_response_headers() {
    let host = host(2);
    let chain = host
        .install(
            "c",
            &[plugin(
                "header_rewrite",
                r#"{"request_set": {"x-added": "yes"}, "request_remove": ["x-drop"],
                    "response_set": {"x-resp": "1"}, "response_remove": ["server"]}"#,
            )],
            None,
        )
        .expect("install");
    for _ in 0..4 {
        let mut s = chain.stream();
        let v = s
            .request_headers(
                info(),
                request("/a", &[("x-drop", "1"), ("x-keep", "2")]),
                true,
            )
            .await;
        let Verdict::Continue(Some(h)) = v else {
            panic!("{v:?}")
        };
        assert_eq!(get(&h, "x-added"), Some("yes"));
        assert_eq!(get(&h, "x-drop"), None);
        assert_eq!(get(&h, "x-keep"), Some("2"));
        let resp: Pairs = vec![
            (":status".into(), b"200".to_vec()),
            ("server".into(), b"x".to_vec()),
        ];
        let Verdict::Continue(Some(h)) = s.response_headers(resp, false).await else {
            panic!("response headers unchanged")
        };
        assert_eq!(get(&h, "x-resp"), Some("1"));
        assert_eq!(get(&h, "server"), None);
        assert_eq!(
            s.response_body(b"abc".to_vec(), true).await,
            Verdict::Continue(Some(b"abc".to_vec()))
        );
        s.end();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_filter_buffers_until_end_of_stream_then_rewrites() {
    let host = host(1);
    let chain = host
        .install(
            "c",
            &[plugin(
                "body_transform",
                r#"{"request": {"find": "cat", "replace": "dog"}}"#,
            )],
            None,
        )
        .expect("install");
    let mut s = chain.stream();
    let v = s
        .request_headers(info(), request("/", &[("content-length", "11")]), false)
        .await;
    let Verdict::Continue(Some(h)) = v else {
        panic!("{v:?}")
    };
    assert_eq!(
        get(&h, "content-length"),
        None,
        "the filter drops content-length"
    );
    assert_eq!(
        s.request_body(b"a ca".to_vec(), false).await,
        Verdict::Continue(None)
    );
    assert_eq!(
        s.request_body(b"t, a c".to_vec(), false).await,
        Verdict::Continue(None)
    );
    assert_eq!(
        s.request_body(b"at".to_vec(), true).await,
        Verdict::Continue(Some(b"a dog, a dog".to_vec()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trapping_looping_and_greedy_filters_fail_only_their_request() {
    let host = host(1);
    let chain = host
        .install("c", &[plugin("probe", "{}")], None)
        .expect("install");
    for (header, value, why) in [
        ("x-probe-trap", "1", "trapped"),
        ("x-probe-loop", "1", "CPU deadline"),
        ("x-probe-alloc", "100", "trapped"),
    ] {
        let mut s = chain.stream();
        let v = s
            .request_headers(info(), request("/", &[(header, value)]), true)
            .await;
        match v {
            Verdict::Fail(msg) => assert!(msg.contains(why), "{header}: {msg}"),
            other => panic!("{header}: expected a failure, got {other:?}"),
        }
        // The next request on the same thread gets a fresh VM.
        let mut s = chain.stream();
        let v = s.request_headers(info(), request("/", &[]), true).await;
        assert_eq!(v, Verdict::Continue(None), "after {header}");
    }
    assert_eq!(host.vm_restarts(), 3);
    assert!(host.failures() >= 3);
    // Within the limit, allocation works.
    let mut s = chain.stream();
    let v = s
        .request_headers(info(), request("/", &[("x-probe-alloc", "4")]), true)
        .await;
    assert_eq!(v, Verdict::Continue(None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_filter_lets_the_request_through() {
    let host = host(1);
    let mut p = plugin("probe", "{}");
    p.fail_open = true;
    let chain = host.install("c", &[p], None).expect("install");
    let mut s = chain.stream();
    let v = s
        .request_headers(info(), request("/", &[("x-probe-trap", "1")]), true)
        .await;
    assert_eq!(v, Verdict::Continue(None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn properties_shared_data_queues_ticks_and_unimplemented_calls() {
    let host = host(2);
    let mut p = plugin("probe", "{}");
    p.vm_config = b"tick".to_vec();
    let chain = host.install("c", &[p], None).expect("install");

    let mut s = chain.stream();
    let v = s
        .request_headers(
            info(),
            request("/p/q?x=1", &[("x-probe-properties", "1")]),
            true,
        )
        .await;
    assert_eq!(v, Verdict::Continue(None));
    let Verdict::Continue(Some(h)) = s
        .response_headers(vec![(":status".into(), b"200".to_vec())], true)
        .await
    else {
        panic!("no answer headers")
    };
    assert_eq!(get(&h, "x-prop-request-path"), Some("/p/q?x=1"));
    assert_eq!(get(&h, "x-prop-request-url-path"), Some("/p/q"));
    assert_eq!(get(&h, "x-prop-request-query"), Some("x=1"));
    assert_eq!(get(&h, "x-prop-request-host"), Some("example.com"));
    assert_eq!(get(&h, "x-prop-request-method"), Some("GET"));
    assert_eq!(get(&h, "x-prop-request-protocol"), Some("HTTP/1.1"));
    assert_eq!(get(&h, "x-prop-plugin-name"), Some("probe-plugin"));
    assert_eq!(get(&h, "x-prop-plugin-root-id"), Some("probe-root"));
    assert_eq!(get(&h, "x-prop-nonexistent"), Some("<none>"));
    assert_eq!(get(&h, "x-prop-source-is-loopback"), Some("true"));
    s.end();

    let mut s = chain.stream();
    let v = s
        .request_headers(info(), request("/", &[("x-probe-enqueue", "hello")]), true)
        .await;
    assert_eq!(v, Verdict::Continue(None));
    s.end();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut s = chain.stream();
    s.request_headers(info(), request("/", &[("x-probe-state", "1")]), true)
        .await;
    let Verdict::Continue(Some(h)) = s
        .response_headers(vec![(":status".into(), b"200".to_vec())], true)
        .await
    else {
        panic!("no answer headers")
    };
    let ticks: u64 = get(&h, "x-probe-ticks").unwrap().parse().unwrap();
    assert!(ticks > 2, "on_tick ran on both threads' VMs: {ticks}");
    assert_eq!(
        get(&h, "x-probe-logged"),
        Some("2"),
        "on_log ran for both earlier streams"
    );
    assert_eq!(get(&h, "x-probe-last-queued"), Some("hello"));

    let mut s = chain.stream();
    let v = s
        .request_headers(
            info(),
            request("/", &[("x-probe-unimplemented", "1")]),
            true,
        )
        .await;
    let Verdict::Respond(r) = v else {
        panic!("{v:?}")
    };
    assert_eq!(
        get(&r.headers, "x-probe-status"),
        Some("12"),
        "Unimplemented"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_threads_are_sandboxed_with_seccomp() {
    let host = host(2);
    let tids = host.thread_ids();
    assert_eq!(tids.len(), 3, "two filter threads and the epoch ticker");
    for tid in &tids {
        assert_eq!(
            weir_filters::sandbox::seccomp_mode(*tid),
            Some(2),
            "thread {tid}"
        );
    }
    let results = host.exec_on_filter_threads(|| {
        let errno = || std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        // SAFETY: plain syscalls the sandbox must refuse.
        let socket = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        let socket_errno = errno();
        let open = unsafe { libc::open(c"/etc/passwd".as_ptr(), libc::O_RDONLY) };
        let open_errno = errno();
        let exec =
            unsafe { libc::execve(c"/bin/true".as_ptr(), std::ptr::null(), std::ptr::null()) };
        let exec_errno = errno();
        [
            (socket, socket_errno),
            (open, open_errno),
            (exec, exec_errno),
        ]
    });
    assert_eq!(results.len(), 2);
    for r in results {
        for (rc, errno) in r {
            assert_eq!((rc, errno), (-1, libc::EPERM));
        }
    }
    // The filter threads still work after the denied calls.
    let chain = host
        .install("c", &[plugin("header_rewrite", "{}")], None)
        .expect("install");
    let mut s = chain.stream();
    assert_eq!(
        s.request_headers(info(), request("/", &[]), true).await,
        Verdict::Continue(None)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_modules_and_configs_are_refused_with_the_reason() {
    let host = host(1);
    let mut p = plugin("header_rewrite", "{}");
    p.sha256 = Some("00".repeat(32));
    let e = host
        .install("c", &[p], None)
        .err()
        .expect("digest mismatch")
        .to_string();
    assert!(e.contains("sha256"), "{e}");
    let e = host
        .install("c", &[plugin("header_rewrite", "{not json")], None)
        .err()
        .expect("bad config")
        .to_string();
    assert!(e.contains("proxy_on_configure returned false"), "{e}");
    let mut p = plugin("header_rewrite", "{}");
    p.module = "/nonexistent.wasm".into();
    p.sha256 = None;
    let e = host
        .install("c", &[p], None)
        .err()
        .expect("missing")
        .to_string();
    assert!(e.contains("/nonexistent.wasm"), "{e}");
}
