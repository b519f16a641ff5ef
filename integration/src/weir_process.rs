//! Runs the real `weir` binary on a config written to a temporary folder.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `weir` binary next to this test executable (`target/<profile>/weir`).
pub fn weir_binary() -> PathBuf {
    sibling_binary("weir")
}

/// A binary of this workspace next to this test executable (`target/<profile>/NAME`).
pub fn sibling_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build --workspace --bins` (the README's test command does)",
        bin.display()
    );
    bin
}

/// A port free right now on 127.0.0.1, for a server the test starts later (weir, the control
/// plane). Taken below the kernel's ephemeral range (32768+), where backends bound to port 0
/// and client sockets live, so those cannot grab it in the meantime; random, so parallel tests
/// rarely pick the same one.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    // A port handed out is free until its user binds it: never hand it out twice (a test
    // once got the same port for a listener and the admin endpoint).
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        h.write_u32(std::process::id());
        let port = 20_000 + (h.finish() % 12_000) as u16;
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
}

/// A running weir process, killed on drop.
pub struct Weir {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
}

impl Weir {
    /// Starts weir on `config` (which must set `admin.address` to `admin`) and waits until
    /// `/ready` answers 200.
    pub fn start(config: &str, admin: SocketAddr) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let config_path = dir.path().join("weir.yaml");
        std::fs::write(&config_path, config).expect("write config");
        let args = vec!["--config".into(), config_path.display().to_string()];
        Self::spawn(dir, &args, admin)
    }

    /// Starts `weir run ARGS --drain-timeout 10s` with its log in `dir`, and waits for `/ready`.
    pub fn spawn(dir: tempfile::TempDir, args: &[String], admin: SocketAddr) -> Self {
        Self::spawn_wrapped(dir, args, admin, &[])
    }

    /// [`Weir::spawn`] through `wrapper` (a command that runs the rest of its arguments, such
    /// as `capsh --drop=... --`), when not empty.
    pub fn spawn_wrapped(
        dir: tempfile::TempDir,
        args: &[String],
        admin: SocketAddr,
        wrapper: &[&str],
    ) -> Self {
        let config_path = dir.path().join("weir.yaml");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("weir.log"))
            .expect("log file");
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(weir_binary());
                c
            }
            None => Command::new(weir_binary()),
        };
        let child = cmd
            .arg("run")
            .args(args)
            .args(["--drain-timeout", "10s"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn weir");
        let mut weir = Self {
            child: Some(child),
            dir,
            admin,
            config_path,
        };
        weir.wait_ready();
        weir
    }

    fn wait_ready(&mut self) {
        let end = Instant::now() + Duration::from_secs(15);
        while Instant::now() < end {
            if let Ok((200, _)) = admin_get(self.admin, "/ready") {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "weir exited ({status}) before it was ready; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("weir did not become ready; log:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("weir.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Waits for the process to exit, returning its exit code and how long that took.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<(i32, Duration)> {
        let start = Instant::now();
        let child = self.child.as_mut()?;
        while start.elapsed() < limit {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some((status.code().unwrap_or(-1), start.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// Replaces the config file (atomically, by rename, as editors and Kubernetes do).
    pub fn write_config(&self, config: &str) {
        write_atomically(&self.config_path, config);
    }

    /// The active config version from `/config_dump`.
    pub fn version(&self) -> String {
        let (_, body) = admin_get(self.admin, "/config_dump").expect("config_dump");
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        v["version"].as_str().unwrap_or_default().to_string()
    }

    /// Waits until the active version differs from `old`.
    pub fn wait_version_change(&self, old: &str) -> String {
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            let v = self.version();
            if v != old {
                return v;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("config version stayed {old}; log:\n{}", self.log());
    }
}

impl Drop for Weir {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write temp config");
    std::fs::rename(&tmp, path).expect("rename config");
}

/// A blocking HTTP/1.1 GET to the admin endpoint: (status, body).
pub fn admin_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    admin_request(addr, "GET", path, "")
}

/// A blocking HTTP/1.1 POST of `body` (JSON) to the admin endpoint: (status, body).
pub fn admin_post(addr: SocketAddr, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    admin_request(addr, "POST", path, body)
}

fn admin_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}
