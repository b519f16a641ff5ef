//! Seccomp sandbox of weir's helper threads, in the style of Firecracker: one allowlist per
//! kind of thread, kept as data in `filters/seccomp/threads.json`, installed by the thread
//! itself as its first act. A syscall off the list fails with EPERM; the process lives on.

use std::collections::HashMap;
use std::sync::OnceLock;

use seccompiler::{BpfProgram, TargetArch};

/// The allowlists, as reviewed data.
const ALLOWLISTS: &str = include_str!("../seccomp/threads.json");

/// Kinds of sandboxed thread; each has its own allowlist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// Runs proxy-wasm filters.
    Filter,
    /// Advances wasmtime's epoch (filter CPU deadlines).
    Ticker,
}

impl ThreadKind {
    fn key(self) -> &'static str {
        match self {
            Self::Filter => "filter",
            Self::Ticker => "ticker",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("seccomp is not supported on {0}")]
    Arch(String),
    #[error("seccomp allowlists do not compile: {0}")]
    Compile(String),
    #[error("no seccomp allowlist for thread kind {0}")]
    Missing(&'static str),
    #[error("installing the seccomp filter failed: {0}")]
    Install(String),
}

fn programs() -> Result<&'static HashMap<String, BpfProgram>, SandboxError> {
    static PROGRAMS: OnceLock<Result<HashMap<String, BpfProgram>, SandboxError>> = OnceLock::new();
    PROGRAMS
        .get_or_init(|| {
            let arch = TargetArch::try_from(std::env::consts::ARCH)
                .map_err(|_| SandboxError::Arch(std::env::consts::ARCH.into()))?;
            seccompiler::compile_from_json(ALLOWLISTS.as_bytes(), arch)
                .map_err(|e| SandboxError::Compile(e.to_string()))
        })
        .as_ref()
        .map_err(|e| match e {
            SandboxError::Arch(a) => SandboxError::Arch(a.clone()),
            other => SandboxError::Compile(other.to_string()),
        })
}

/// Checks that the allowlists compile on this machine, without installing anything.
pub fn check() -> Result<(), SandboxError> {
    programs().map(|_| ())
}

/// Installs `kind`'s allowlist on the calling thread (and sets no_new_privs on it). Irreversible
/// for this thread; other threads are not affected.
pub fn install(kind: ThreadKind) -> Result<(), SandboxError> {
    let program = programs()?
        .get(kind.key())
        .ok_or(SandboxError::Missing(kind.key()))?;
    seccompiler::apply_filter(program).map_err(|e| SandboxError::Install(e.to_string()))
}

/// The `Seccomp:` mode of thread `tid` of this process (0 none, 2 filter), from /proc.
pub fn seccomp_mode(tid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errno() -> i32 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    #[test]
    fn filter_thread_gets_eperm_for_denied_calls_and_keeps_running() {
        let outcome = std::thread::spawn(|| {
            install(ThreadKind::Filter).expect("install");
            let tid = unsafe { libc::gettid() };
            // SAFETY: plain syscalls with valid arguments; each is expected to be refused.
            let socket = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            let socket_errno = errno();
            let open = unsafe { libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY) };
            let open_errno = errno();
            let fork = unsafe { libc::syscall(libc::SYS_fork) };
            let fork_errno = errno();
            let bpf = unsafe { libc::syscall(libc::SYS_bpf, 0, 0, 0) };
            let bpf_errno = errno();
            // Allowed: memory and time keep working.
            let v = vec![7u8; 8 << 20];
            let now = std::time::Instant::now();
            (
                tid,
                [
                    (socket, socket_errno),
                    (open, open_errno),
                    (fork as i32, fork_errno),
                    (bpf as i32, bpf_errno),
                ],
                v[12345],
                now,
            )
        })
        .join()
        .expect("sandboxed thread must not die");
        let (_, denied, byte, _) = outcome;
        for (rc, err) in denied {
            assert_eq!((rc, err), (-1, libc::EPERM));
        }
        assert_eq!(byte, 7);
        // This thread was not sandboxed by the other one.
        let me = unsafe { libc::gettid() };
        assert_eq!(seccomp_mode(me), Some(0));
        let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        assert!(s >= 0);
        unsafe { libc::close(s) };
    }

    #[test]
    fn installed_thread_reports_seccomp_mode_2() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            install(ThreadKind::Ticker).expect("install");
            tx.send(unsafe { libc::gettid() }).unwrap();
            done_rx.recv().ok();
        });
        let tid = rx.recv().unwrap();
        assert_eq!(seccomp_mode(tid), Some(2));
        done_tx.send(()).unwrap();
        t.join().unwrap();
    }
}
