//! The policy folder: every `*.yaml` / `*.yml` file in it, validated together, published when
//! valid, reported (and not published) when not.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use std::collections::HashMap;

use weir_policies::load_many_with;
use weir_policies::model::{Config, Scope};
use weir_policies::{ConfigErrors, ItemCache, Snapshot};

use crate::resources::ResourceSet;
use crate::server::ControlPlane;

/// A validated policy folder: all resources, and each file's resources with its scope. The
/// sets are shared: the folder published and the one kept to check the next edit against are
/// one (at 10,000 routes each copy of a set costs ~0.5 ms of an endpoint edit).
#[derive(Debug, Default, Clone)]
pub struct Folder {
    pub all: Arc<ResourceSet>,
    pub files: Vec<(Option<Scope>, Arc<ResourceSet>)>,
}

impl Folder {
    /// The union of `files`' sets when it takes no work: the one file's set, shared.
    fn union(files: &[(Option<Scope>, Arc<ResourceSet>)]) -> Option<Arc<ResourceSet>> {
        match files {
            [(_, one)] => Some(one.clone()),
            _ => None,
        }
    }
}

/// Reads and validates the folder, or returns every error with file, line and field.
pub fn load(dir: &Path) -> Result<Folder, String> {
    validate(&read(dir)?.0, &mut Parsed::default()).map(|(_, folder)| folder)
}

/// Each file's last parse (its raw model, or why it does not parse), by path, with the text
/// it came from: a reload parses only the files that changed (10,000 routes take ~50 ms to
/// parse, a copy of the parsed model about a third of that). Validation still covers the
/// whole folder.
#[derive(Default)]
pub struct Parsed {
    /// The text, as read (not copied), is shared with the file's [`ItemCache`].
    files: HashMap<String, (Arc<String>, Result<Config, ConfigErrors>)>,
    /// Files actually parsed (not found unchanged), since creation.
    parses: usize,
    /// The large policy files as last read, kept open: a file replaced by a rename (as
    /// editors and config tools save) is then freed when this handle is closed, on the
    /// [`weir_policies::drop_later`] thread, and not by the rename, which held the folder
    /// locked meanwhile (~1.5 ms for 1.3 MB, and reading the folder waited for it).
    open: Vec<std::fs::File>,
    /// Each large file's list items as last parsed: an edit parses only the items it changed.
    items: HashMap<String, ItemCache>,
    /// The folder last published from these files, and its snapshot: an edit that changes
    /// only endpoints is checked against it instead of validating the whole folder again
    /// (at 10,000 routes that took 30-50 ms; an endpoint change should take a few).
    last: Option<(Snapshot, Folder)>,
    /// Edits taken as endpoint changes, since creation.
    endpoint_changes: usize,
}

impl Parsed {
    fn parse(&mut self, file: &str, text: &Arc<String>) -> Result<Config, ConfigErrors> {
        if self.files.get(file).is_none_or(|(was, _)| !same(was, text)) {
            weir_policies::drop_later(self.store(file, text));
        }
        self.files[file].1.clone()
    }

    /// Parses `file` and keeps the result; returns what was kept for it before, and whether
    /// its routes were moved into the new parse (unchanged; it has none left then).
    fn store(
        &mut self,
        file: &str,
        text: &Arc<String>,
    ) -> Option<(Arc<String>, Result<Config, ConfigErrors>, bool)> {
        self.parses += 1;
        let cache = self.items.entry(file.to_string()).or_default();
        let previous = self.files.get_mut(file).and_then(|(_, p)| p.as_mut().ok());
        let parsed = weir_policies::parse_cached(file, text, cache, previous);
        let moved = parsed.is_ok() && cache.routes_moved();
        let (text, was) = self
            .files
            .insert(file.to_string(), (text.clone(), parsed))?;
        Some((text, was, moved))
    }

    /// Which of `files` differ, byte for byte, from the files of the last validation (each
    /// compared once: at 10,000 routes a comparison reads 2.6 MB); `None` when the folder
    /// holds other files.
    fn changed(&self, files: &[(String, Arc<String>)]) -> Option<Vec<usize>> {
        if files.len() != self.files.len() {
            return None;
        }
        let mut changed = Vec::new();
        for (i, (path, text)) in files.iter().enumerate() {
            if !same(&self.files.get(path)?.0, text) {
                changed.push(i);
            }
        }
        Some(changed)
    }

    /// The next folder when `files` differ from the last published ones only in endpoints:
    /// the endpoints are validated against the last snapshot and replaced in the last folder.
    /// `None` when anything else changed, or the change is invalid (the whole folder is then
    /// validated, which reports where). Changed files' parses are kept either way.
    fn endpoint_change(
        &mut self,
        files: &[(String, Arc<String>)],
        changed: &[usize],
    ) -> Option<(Snapshot, Folder)> {
        self.last.as_ref()?;
        let mut changes = Vec::new();
        for (path, text) in changed.iter().map(|&i| &files[i]) {
            // Kept (not copied) for the whole validation when this is not an endpoint edit.
            let (_, was, routes_moved) = self.store(path, text)?;
            let change = match (&was, &self.files[path].1) {
                (Ok(was), Ok(now)) => was.endpoint_changes(now, routes_moved),
                _ => None,
            };
            weir_policies::drop_later(was);
            changes.extend(change?);
        }
        let (snapshot, folder) = self.last.as_ref()?;
        let snapshot = weir_policies::validate::with_endpoints(snapshot, &changes).ok()?;
        let mut folder = folder.clone();
        for (_, set) in &mut folder.files {
            // Copied only if it holds one of the clusters.
            if changes.iter().any(|(name, _)| set.has_endpoints(name)) {
                Arc::make_mut(set).replace_endpoints(&changes);
            }
        }
        folder.all = Folder::union(&folder.files).unwrap_or_else(|| {
            let mut all = folder.all;
            Arc::make_mut(&mut all).replace_endpoints(&changes);
            all
        });
        self.endpoint_changes += 1;
        Some((snapshot, folder))
    }

    /// Forgets files no longer in the folder.
    fn keep_only(&mut self, files: &[(String, Arc<String>)]) {
        self.files
            .retain(|path, _| files.iter().any(|(p, _)| p == path));
        self.items
            .retain(|path, _| files.iter().any(|(p, _)| p == path));
    }
}

/// Whether two texts are the same, byte for byte.
fn same(a: &Arc<String>, b: &Arc<String>) -> bool {
    Arc::ptr_eq(a, b) || a == b
}

/// Files at least this large stay open after they are read ([`Parsed::open`]).
const KEEP_OPEN_FROM: u64 = 64 << 10;

/// Files kept open at most, whatever their size (file descriptors are limited).
const KEEP_OPEN_AT_MOST: usize = 64;

/// A folder's policy files, `(path, text)` in name order, and the large ones' open files.
type Read = (Vec<(String, Arc<String>)>, Vec<std::fs::File>);

/// The folder's policy files.
fn read(dir: &Path) -> Result<Read, String> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: cannot read the folder: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_policy_file(p))
        .collect();
    paths.sort();
    let mut files = Vec::new();
    let mut open = Vec::new();
    for p in paths {
        let mut text = String::new();
        let file = std::fs::File::open(&p)
            .and_then(|mut f| f.read_to_string(&mut text).map(|_| f))
            .map_err(|e| format!("{}: cannot read: {e}", p.display()))?;
        if text.len() as u64 >= KEEP_OPEN_FROM && open.len() < KEEP_OPEN_AT_MOST {
            open.push(file);
        }
        files.push((p.display().to_string(), Arc::new(text)));
    }
    if files.is_empty() {
        return Err(format!("{}: no .yaml files", dir.display()));
    }
    Ok((files, open))
}

/// Whether `path` names a policy file (by its extension, as [`read`] picks them).
fn is_policy_file(path: &Path) -> bool {
    path.extension().is_some_and(|x| x == "yaml" || x == "yml")
}

/// Whether a folder event may have changed the policy: one about a policy file, the folder
/// itself, or nothing named (the watcher lost track). An editor's swap file, or the temporary
/// file written before a rename, is not: reading 1.3 MB of policy for it delayed the rename
/// that follows by 1-2 ms.
fn may_change_policy(ev: &notify::Event, dir: &Path) -> bool {
    !ev.kind.is_access()
        && (ev.paths.is_empty() || ev.paths.iter().any(|p| p == dir || is_policy_file(p)))
}

fn validate(
    files: &[(String, Arc<String>)],
    parsed: &mut Parsed,
) -> Result<(Snapshot, Folder), String> {
    parsed.keep_only(files);
    // Each file's resources are built while the folder is validated (both take tens of ms at
    // 10,000 routes), and used only if it is valid.
    let (snapshot, _, files) = load_many_with(
        files,
        |file, text| parsed.parse(file, text),
        |config, spans| {
            spans
                .iter()
                .map(|s| (s.scope.clone(), Arc::new(ResourceSet::from_span(config, s))))
                .collect::<Vec<(Option<Scope>, Arc<ResourceSet>)>>()
        },
    )
    .map_err(|e| e.to_string())?;
    // The files' spans cover the whole config: the union of their sets is the whole set,
    // without serializing every resource a second time.
    let all = Folder::union(&files).unwrap_or_else(|| {
        let mut all = ResourceSet::default();
        for (_, set) in &files {
            all.merge(set);
        }
        Arc::new(all)
    });
    Ok((snapshot, Folder { all, files }))
}

/// Loads the folder into `cp` now and again whenever it changes, until the process ends.
pub async fn watch(dir: PathBuf, cp: ControlPlane) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let watched = dir.clone();
    let watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        // Reads (ours included) are access events: reacting to them would reload forever. An
        // error may hide a change: reload.
        if ev
            .as_ref()
            .map_or(true, |ev| may_change_policy(ev, &watched))
        {
            let _ = tx.send(());
        }
    })
    .and_then(|mut w| w.watch(&dir, RecursiveMode::NonRecursive).map(|_| w));
    // The first load only once the watch is in place, so no change slips in between.
    let Some((mut parsed, _)) = reload_blocking(&dir, &cp, Parsed::default()).await else {
        return;
    };
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
        // the rest of a burst of events (an editor, a `cp -r`) into one more reload. An event
        // that changed no policy (a temporary file written before its rename) is not waited
        // after: the rename's event follows within microseconds, and waiting 5 ms for it was
        // most of an endpoint change's time.
        while rx.try_recv().is_ok() {}
        let Some((next, changed)) = reload_blocking(&dir, &cp, parsed).await else {
            return;
        };
        parsed = next;
        if changed {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// [`reload`] on a blocking thread: it takes tens of ms at 10,000 routes, and on a runtime
/// worker it held back the streams that push what it published (a task woken from a worker
/// runs on that worker next), and kept them waiting while it dropped the previous folder.
/// `None` when the runtime is shutting down.
async fn reload_blocking(
    dir: &Path,
    cp: &ControlPlane,
    mut parsed: Parsed,
) -> Option<(Parsed, bool)> {
    let (dir, cp) = (dir.to_path_buf(), cp.clone());
    match tokio::task::spawn_blocking(move || {
        let changed = reload(&dir, &cp, &mut parsed);
        (parsed, changed)
    })
    .await
    {
        Ok(done) => Some(done),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => None,
    }
}

/// Loads the folder into `cp` unless its files are byte for byte the ones validated last:
/// most events (a temporary file written next to a policy before its rename, an editor's
/// swap file, a touch) change no policy, and validating 10,000 routes again costs tens of ms.
/// Says whether the folder had changed.
fn reload(dir: &Path, cp: &ControlPlane, parsed: &mut Parsed) -> bool {
    let files = match read(dir) {
        Ok((files, open)) => {
            weir_policies::drop_later(std::mem::replace(&mut parsed.open, open));
            files
        }
        Err(e) => {
            tracing::error!(
                "policy folder unreadable, still serving version {}:\n{e}",
                cp.version()
            );
            cp.set_config_error(Some(e));
            // The next readable folder is validated again, even if unchanged, to clear this.
            *parsed = Parsed::default();
            return true;
        }
    };
    let changed = parsed.changed(&files);
    if changed.as_ref().is_some_and(Vec::is_empty) {
        return false;
    }
    let next = match changed.and_then(|changed| parsed.endpoint_change(&files, &changed)) {
        Some(next) => Ok(next),
        None => validate(&files, parsed),
    };
    match next {
        Ok((snapshot, folder)) => {
            cp.set_config_error(None);
            cp.publish_folder(folder.clone());
            weir_policies::drop_later(parsed.last.replace((snapshot, folder)));
        }
        Err(e) => {
            parsed.last = None;
            tracing::error!(
                "policy folder rejected, still serving version {}:\n{e}",
                cp.version()
            );
            cp.set_config_error(Some(e));
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_parses_only_the_files_that_changed() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write(
            "routes.yaml",
            "listeners: [{ name: l, address: \"127.0.0.1:1\" }]\nroutes: [{ name: r, route: { cluster: c } }]\n",
        );
        write(
            "clusters.yaml",
            "clusters: [{ name: c, endpoints: [{ address: \"127.0.0.1:2\" }] }]\n",
        );
        let mut parsed = Parsed::default();
        let (_, first) = validate(&read(dir.path()).unwrap().0, &mut parsed).unwrap();
        assert_eq!(parsed.parses, 2);
        assert_eq!(first.all.version(), load(dir.path()).unwrap().all.version());

        write(
            "clusters.yaml",
            "clusters: [{ name: c, endpoints: [{ address: \"127.0.0.1:3\" }] }]\n",
        );
        let (_, second) = validate(&read(dir.path()).unwrap().0, &mut parsed).unwrap();
        assert_eq!(parsed.parses, 3, "only the changed file parsed again");
        assert_eq!(
            second.all.version(),
            load(dir.path()).unwrap().all.version()
        );
        assert_ne!(second.all.version(), first.all.version());

        // A broken file is reported; the next good version of it parses again.
        write("clusters.yaml", "clusters: [{ name: c, endpoints: 7 }]\n");
        let e = validate(&read(dir.path()).unwrap().0, &mut parsed).unwrap_err();
        assert!(e.contains("clusters.yaml"), "{e}");
        write(
            "clusters.yaml",
            "clusters: [{ name: c, endpoints: [{ address: \"127.0.0.1:2\" }] }]\n",
        );
        let (_, again) = validate(&read(dir.path()).unwrap().0, &mut parsed).unwrap();
        assert_eq!(again.all.version(), first.all.version());

        std::fs::remove_file(dir.path().join("clusters.yaml")).unwrap();
        assert!(validate(&read(dir.path()).unwrap().0, &mut parsed).is_err());
        assert_eq!(parsed.files.len(), 1, "a removed file is forgotten");
    }

    #[test]
    fn an_edit_in_a_large_file_parses_only_its_items_and_publishes_what_a_whole_validation_would() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("mesh.yaml");
        let policy = |port: u16, prefix: &str| {
            let mut t =
                String::from("listeners: [{ name: l, address: \"127.0.0.1:1\" }]\nroutes:\n");
            for i in 0..2000 {
                t.push_str(&format!(
                    "  - {{ name: r{i}, match: {{ path: {{ prefix: /{prefix}{i}/ }} }}, route: {{ cluster: c{} }} }}\n",
                    i % 3
                ));
            }
            t.push_str("clusters:\n");
            for c in 0..3 {
                t.push_str(&format!(
                    "  - {{ name: c{c}, endpoints: [{{ address: \"127.0.0.1:{}\" }}] }}\n",
                    if c == 1 { port } else { 8000 }
                ));
            }
            t
        };
        let whole = || {
            let fresh = ControlPlane::new(None);
            fresh.publish_folder(load(dir.path()).unwrap());
            fresh.version()
        };
        std::fs::write(&file, policy(8001, "a")).unwrap();
        assert!(
            std::fs::metadata(&file).unwrap().len() > 128 << 10,
            "large enough"
        );
        let cp = ControlPlane::new(None);
        let mut parsed = Parsed::default();
        reload(dir.path(), &cp, &mut parsed);
        let items = |p: &Parsed| p.items.values().next().unwrap().last_parsed();
        assert_eq!(items(&parsed), 2003);

        // An endpoint: one item parsed, taken as an endpoint change, the same version; the
        // routes moved from the last parse, twice in a row.
        let moved = |p: &Parsed| p.items.values().next().unwrap().routes_moved();
        for (n, port) in [9001, 9003].into_iter().enumerate() {
            std::fs::write(&file, policy(port, "a")).unwrap();
            reload(dir.path(), &cp, &mut parsed);
            assert_eq!(items(&parsed), 1);
            assert!(moved(&parsed));
            assert_eq!(parsed.endpoint_changes, n + 1);
            assert_eq!(cp.version(), whole());
        }

        // Every route: all parsed again, validated whole, the same version.
        std::fs::write(&file, policy(9003, "b")).unwrap();
        reload(dir.path(), &cp, &mut parsed);
        assert_eq!(items(&parsed), 2000);
        assert!(!moved(&parsed));
        assert_eq!(parsed.endpoint_changes, 2);
        assert_eq!(cp.version(), whole());

        // A broken item: nothing published, the error names the route; fixed, served again.
        let good = cp.version();
        std::fs::write(
            &file,
            policy(9003, "b").replace("prefix: /b7/", "prefix: [7]"),
        )
        .unwrap();
        reload(dir.path(), &cp, &mut parsed);
        assert_eq!(cp.version(), good);
        let error = cp.status().config_error;
        assert!(
            error.contains("mesh.yaml") && error.contains("routes[7]"),
            "{error}"
        );
        std::fs::write(&file, policy(9002, "b")).unwrap();
        reload(dir.path(), &cp, &mut parsed);
        assert!(cp.status().config_error.is_empty());
        assert_eq!(cp.version(), whole());
    }

    #[test]
    fn an_endpoint_edit_publishes_what_a_whole_validation_would() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        let clusters = |port: &str, lb: &str| {
            format!(
                "scope: {{ labels: {{ zone: a }} }}\nclusters:\n  - {{ name: c, lb: {lb}, endpoints: [{{ address: \"127.0.0.1:{port}\" }}] }}\n  - {{ name: d, endpoints: [{{ address: \"127.0.0.1:9\" }}] }}\n"
            )
        };
        write(
            "routes.yaml",
            "listeners: [{ name: l, address: \"127.0.0.1:1\" }]\nroutes: [{ name: r, route: { cluster: c } }]\nclusters: [{ name: e, endpoints: [{ address: \"127.0.0.1:5\" }] }]\n",
        );
        write("clusters.yaml", &clusters("2", "round_robin"));
        let cp = ControlPlane::new(None);
        let mut parsed = Parsed::default();
        // What a control plane that validates the whole folder every time publishes.
        let whole = || {
            let fresh = ControlPlane::new(None);
            fresh.publish_folder(load(dir.path()).unwrap());
            fresh.version()
        };
        reload(dir.path(), &cp, &mut parsed);
        assert_eq!(cp.version(), whole());
        assert_eq!(parsed.endpoint_changes, 0);

        // Endpoints only: checked against the last snapshot, the same result.
        write("clusters.yaml", &clusters("3", "round_robin"));
        let before = cp.version();
        reload(dir.path(), &cp, &mut parsed);
        assert_eq!(parsed.endpoint_changes, 1);
        assert_ne!(cp.version(), before);
        assert_eq!(cp.version(), whole());

        // An invalid endpoint is not taken that way: the whole folder is validated and the
        // error names the file; nothing is published.
        write("clusters.yaml", &clusters("x", "round_robin"));
        let good = cp.version();
        reload(dir.path(), &cp, &mut parsed);
        assert_eq!(parsed.endpoint_changes, 1);
        assert_eq!(cp.version(), good);
        let error = cp.status().config_error;
        assert!(
            error.contains("clusters.yaml") && error.contains("endpoints"),
            "{error}"
        );

        // After an error, the next edit is validated whole; the one after can be quick again.
        write("clusters.yaml", &clusters("4", "round_robin"));
        reload(dir.path(), &cp, &mut parsed);
        assert_eq!(parsed.endpoint_changes, 1);
        assert!(cp.status().config_error.is_empty());
        write("clusters.yaml", &clusters("5", "round_robin"));
        reload(dir.path(), &cp, &mut parsed);
        assert_eq!(parsed.endpoint_changes, 2);
        assert_eq!(cp.version(), whole());

        // Anything else about a cluster: validated whole.
        write("clusters.yaml", &clusters("6", "least_request"));
        reload(dir.path(), &cp, &mut parsed);
        assert_eq!(parsed.endpoint_changes, 2);
        assert_eq!(cp.version(), whole());
    }
}
