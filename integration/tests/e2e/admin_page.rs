//! The admin page (`GET /` on the admin port) in a real headless Chromium: its script fills in
//! listeners, routes, clusters with endpoint health, inference pools with reload state, and
//! request rates. The screenshot is written under `target/` and named in the test output.

use std::process::Command;

use weir_integration::http_backend::HttpBackend;

use crate::*;

/// The Chromium binary, or why the test cannot run (it fails under `CI=true`).
fn chromium() -> Option<&'static str> {
    let found = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        });
    if found.is_none() {
        let why = "no chromium on PATH (apt-get install chromium; .ci/install-deps does)";
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("the admin page test cannot run under CI=true: {why}");
        }
        eprintln!("\n*** SKIPPED admin page test: {why} ***\n");
    }
    found
}

/// Runs headless Chromium on `url` with `args`, letting the page's script run for a while.
fn headless(bin: &str, url: &str, args: &[&str]) -> std::process::Output {
    Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--run-all-compositor-stages-before-draw",
            "--virtual-time-budget=6000",
        ])
        .args(args)
        .arg(url)
        .output()
        .expect("run chromium")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_admin_page_shows_the_proxy_live() {
    let Some(bin) = chromium() else { return };
    let backend = HttpBackend::start("b").await;
    let s = start(&format!(
        "routes:\n  - name: api-route\n    match: {{ path: {{ prefix: /api }} }}\n    route: {{ cluster: api-backend }}\n  - name: llm-route\n    match: {{ path: {{ prefix: /v1/ }} }}\n    route: {{ pool: llm-pool }}\nclusters:\n{}inference_pools:\n  - name: llm-pool\n    protocol: openai\n    endpoints:\n      - {{ address: \"127.0.0.1:9\", models: [{{ name: llama, version: \"7\" }}] }}\n    reload: {{ poll_interval: 0s }}\n",
        cluster(
            "api-backend",
            "http1",
            &[backend.addr],
            "    health_check: { interval: 100ms, timeout: 500ms, unhealthy_threshold: 1, healthy_threshold: 1, http: { path: /healthz } }\n"
        )
    ));
    let client = h1_client();
    for _ in 0..5 {
        assert_eq!(get(&client, s.listen, "/api/x").await.status, 200);
    }
    let url = format!("http://{}/", s.weir.admin);
    let out = headless(bin, &url, &["--dump-dom"]);
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains("data-loaded=\"true\""),
        "the page's script ran and loaded everything: {dom}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for text in [
        "api-route",
        "path prefix /api",
        "api-backend",
        &backend.addr.to_string(),
        "class=\"ok\">healthy<",
        ">not checked<",
        "llm-pool",
        "llama",
        "serving",
        &s.listen.to_string(),
        "<td>source</td><td>file</td>",
        "<th>connections</th>",
    ] {
        assert!(dom.contains(text), "{text:?} on the page: {dom}");
    }
    // The five requests are counted in the rates table.
    assert!(
        dom.contains("<td>5</td>"),
        "request count on the page: {dom}"
    );

    let shot = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/test-artifacts/admin-page.png");
    std::fs::create_dir_all(shot.parent().unwrap()).unwrap();
    let _ = std::fs::remove_file(&shot);
    let out = headless(
        bin,
        &url,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1280,1100",
        ],
    );
    let png = std::fs::read(&shot).unwrap_or_else(|e| {
        panic!(
            "no screenshot ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real screenshot"
    );
    eprintln!("admin page screenshot: {}", shot.display());
}
