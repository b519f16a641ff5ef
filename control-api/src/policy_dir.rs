//! The policy folder: every `*.yaml` / `*.yml` file in it, validated together, published when
//! valid, reported (and not published) when not.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use weir_policies::load_many;
use weir_policies::model::Scope;

use crate::resources::ResourceSet;
use crate::server::ControlPlane;

/// A validated policy folder: all resources, and each file's resources with its scope.
#[derive(Debug, Default)]
pub struct Folder {
    pub all: ResourceSet,
    pub files: Vec<(Option<Scope>, ResourceSet)>,
}

/// Reads and validates the folder, or returns every error with file, line and field.
pub fn load(dir: &Path) -> Result<Folder, String> {
    validate(&read(dir)?)
}

/// The folder's policy files, `(path, text)` in name order.
fn read(dir: &Path) -> Result<Vec<(String, String)>, String> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: cannot read the folder: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    paths.sort();
    let mut files = Vec::new();
    for p in paths {
        let text = std::fs::read_to_string(&p)
            .map_err(|e| format!("{}: cannot read: {e}", p.display()))?;
        files.push((p.display().to_string(), text));
    }
    if files.is_empty() {
        return Err(format!("{}: no .yaml files", dir.display()));
    }
    Ok(files)
}

fn validate(files: &[(String, String)]) -> Result<Folder, String> {
    let (snapshot, spans) = load_many(files).map_err(|e| e.to_string())?;
    let config = &snapshot.source;
    let files: Vec<(Option<Scope>, ResourceSet)> = spans
        .into_iter()
        .map(|s| {
            let set = ResourceSet::from_span(config, &s);
            (s.scope, set)
        })
        .collect();
    // The files' spans cover the whole config: the union of their sets is the whole set,
    // without serializing every resource a second time.
    let mut all = ResourceSet::default();
    for (_, set) in &files {
        all.merge(set);
    }
    Ok(Folder { all, files })
}

/// Loads the folder into `cp` now and again whenever it changes, until the process ends.
pub async fn watch(dir: PathBuf, cp: ControlPlane) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        // Reads (ours included) are access events: reacting to them would reload forever.
        if ev.is_ok_and(|ev| !ev.kind.is_access()) {
            let _ = tx.send(());
        }
    })
    .and_then(|mut w| w.watch(&dir, RecursiveMode::NonRecursive).map(|_| w));
    // The first load only once the watch is in place, so no change slips in between.
    let mut last = None;
    reload(&dir, &cp, &mut last);
    let _watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(
                "cannot watch {}: {e}; changes need a restart",
                dir.display()
            );
            return;
        }
    };
    while rx.recv().await.is_some() {
        // React at once (an endpoint change should reach proxies in milliseconds), then fold
        // the rest of a burst of events (an editor, a `cp -r`) into one more reload.
        while rx.try_recv().is_ok() {}
        reload(&dir, &cp, &mut last);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Loads the folder into `cp` unless its files are byte for byte the ones loaded `last`: most
/// events (a temporary file written next to a policy before its rename, an editor's swap
/// file, a touch) change no policy, and parsing 10,000 routes again costs hundreds of ms.
fn reload(dir: &Path, cp: &ControlPlane, last: &mut Option<Vec<(String, String)>>) {
    let files = match read(dir) {
        Ok(files) => files,
        Err(e) => {
            tracing::error!(
                "policy folder unreadable, still serving version {}:\n{e}",
                cp.version()
            );
            cp.set_config_error(Some(e));
            *last = None;
            return;
        }
    };
    if last.as_ref() == Some(&files) {
        return;
    }
    let result = validate(&files);
    *last = Some(files);
    match result {
        Ok(folder) => {
            cp.set_config_error(None);
            cp.publish_folder(folder);
        }
        Err(e) => {
            tracing::error!(
                "policy folder rejected, still serving version {}:\n{e}",
                cp.version()
            );
            cp.set_config_error(Some(e));
        }
    }
}
