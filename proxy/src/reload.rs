//! Config from a file: loaded at start, reloaded on SIGHUP and when the file changes. A file
//! that fails to load is logged and ignored; the running config stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use notify::{RecursiveMode, Watcher};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::signal::unix::{signal, SignalKind};
use weir_policies::validate::content_version;
use weir_policies::{load_str, Snapshot};

use crate::filters::Filters;
use crate::metrics::Metrics;
use crate::state::{Runtime, SharedRuntime};

/// Wait after a change event before reading, so an editor's write-then-rename settles.
const SETTLE: Duration = Duration::from_millis(100);

/// Reads and validates a config file; the error text names file, line and field.
pub fn load_file(path: &Path) -> Result<Snapshot, String> {
    load_text(path, &read_file(path)?)
}

fn read_file(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))
}

fn load_text(path: &Path, text: &str) -> Result<Snapshot, String> {
    load_str(&path.display().to_string(), text).map_err(|e| e.to_string())
}

/// The background service that applies config changes.
pub struct Reloader {
    /// `None` when running the embedded default: SIGHUP is then logged and ignored.
    pub path: Option<PathBuf>,
    pub runtime: SharedRuntime,
    pub metrics: Arc<Metrics>,
    pub filters: Arc<Filters>,
}

impl Reloader {
    /// Loads the file and swaps it in if it is valid and different from the running config.
    /// A file whose text is the running config's is not parsed: any change in the file's
    /// directory (a log written next to it) wakes the reloader, and a 10,000-route file takes
    /// tens of milliseconds to parse.
    pub fn reload(&self) {
        let Some(path) = &self.path else {
            tracing::info!("no config file (embedded default or control plane): nothing to reload");
            return;
        };
        let loaded = read_file(path).and_then(|text| {
            if content_version(&text) == self.runtime.load().snapshot.version {
                return Ok(None);
            }
            load_text(path, &text).map(Some)
        });
        match loaded {
            Ok(None) => {
                self.metrics.reloads.with_label_values(&["unchanged"]).inc();
            }
            Err(e) => {
                self.metrics.reloads.with_label_values(&["error"]).inc();
                tracing::error!(
                    "config reload rejected, keeping version {}:\n{e}",
                    self.runtime.load().snapshot.version
                );
            }
            Ok(Some(snapshot)) => {
                let old = self.runtime.load_full();
                warn_restart_only(&snapshot, &old.snapshot);
                let version = snapshot.version.clone();
                let chains = match self.filters.install(&snapshot, Some(&old)) {
                    Ok(chains) => chains,
                    Err(e) => {
                        self.metrics.reloads.with_label_values(&["error"]).inc();
                        tracing::error!(
                            "config reload rejected, keeping version {}: {}: {e}",
                            old.snapshot.version,
                            path.display()
                        );
                        return;
                    }
                };
                self.runtime.store(Arc::new(Runtime::new(
                    Arc::new(snapshot),
                    Some(&old),
                    chains,
                )));
                self.metrics.reloads.with_label_values(&["ok"]).inc();
                tracing::info!(from = %old.snapshot.version, to = %version, "config reloaded");
            }
        }
    }
}

/// Logs which changes from `old` to `new` wait for a restart (what is bound or opened at
/// start); everything else applies at once.
pub fn warn_restart_only(new: &Snapshot, old: &Snapshot) {
    let (n, o) = (&new.source, &old.source);
    let log_target = |c: &weir_policies::model::Config| {
        c.access_log.as_ref().map(|l| (l.path.clone(), l.buffer))
    };
    let waiting: Vec<&str> = [
        ("listeners", n.listeners != o.listeners),
        ("admin", n.admin != o.admin),
        ("fast_path", n.fast_path != o.fast_path),
        ("access_log path and buffer", log_target(n) != log_target(o)),
    ]
    .into_iter()
    .filter_map(|(what, changed)| changed.then_some(what))
    .collect();
    if !waiting.is_empty() {
        tracing::warn!(
            "changes to {} take effect on restart; the rest applies now",
            waiting.join(", ")
        );
    }
}

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut watcher = match self.path.as_ref().map(|_| {
            notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
                // Any change in the directory: editors replace the file by rename, and a
                // Kubernetes ConfigMap swaps a `..data` symlink, not the file itself. A reload of
                // an unchanged file is a no-op. Reads (ours included) are access events:
                // reacting to them would reload forever.
                if ev.is_ok_and(|ev| !ev.kind.is_access()) {
                    let _ = tx.send(());
                }
            })
        }) {
            None => None,
            Some(Ok(w)) => Some(w),
            Some(Err(e)) => {
                tracing::error!("cannot watch config file, SIGHUP still reloads: {e}");
                None
            }
        };
        let dir = self
            .path
            .as_deref()
            .and_then(|p| p.parent())
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if let Some(w) = watcher.as_mut() {
            if let Err(e) = w.watch(dir, RecursiveMode::NonRecursive) {
                tracing::error!("cannot watch {}: {e}; SIGHUP still reloads", dir.display());
            }
        }
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::error!("cannot install the SIGHUP handler");
            return;
        };
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading");
                    self.reload();
                }
                Some(()) = rx.recv() => {
                    tokio::time::sleep(SETTLE).await;
                    while rx.try_recv().is_ok() {}
                    self.reload();
                }
            }
        }
    }
}
