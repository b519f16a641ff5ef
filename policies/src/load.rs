//! The one config loader: YAML text in, a [`Snapshot`] or every error with file, line and field.

use crate::error::{ConfigError, ConfigErrors};
use crate::model::Config;
use crate::position::PositionIndex;
use crate::snapshot::Snapshot;
use crate::split::{self, ItemCache};
use crate::validate;

/// The config weir runs when started without one: the admin endpoint and a demo route.
pub const EMBEDDED_DEFAULT: &str = include_str!("../examples/default.yaml");

/// Parses and validates `text`, read from `file` (used only in error messages).
pub fn load_str(file: &str, text: &str) -> Result<Snapshot, ConfigErrors> {
    let config = parse(file, text)?;
    if config.scope.is_some() {
        let (line, column) = PositionIndex::new(text).locate("scope");
        return Err(ConfigErrors(vec![ConfigError {
            file: file.to_string(),
            line,
            column,
            field: "scope".into(),
            message: "scope applies only to policy folders served by weir-control".into(),
        }]));
    }
    let mut snapshot = validate::compile(config).map_err(|problems| {
        let index = PositionIndex::new(text);
        ConfigErrors(
            problems
                .into_iter()
                .map(|p| {
                    let (line, column) = index.locate(&p.field);
                    ConfigError {
                        file: file.to_string(),
                        line,
                        column,
                        field: p.field,
                        message: p.message,
                    }
                })
                .collect(),
        )
    })?;
    snapshot.version = validate::content_version(text);
    Ok(snapshot)
}

/// Loads several files as one config (the control plane's policy folder): lists are
/// concatenated in the order given, then validated together, so a route in one file may use a
/// cluster from another. Errors still name the file, line and field where the problem is.
pub fn load_many(files: &[(String, String)]) -> Result<(Snapshot, Vec<FileSpan>), ConfigErrors> {
    load_many_with(files, |f, t| parse(f, t), |_, _| ())
        .map(|(snapshot, spans, ())| (snapshot, spans))
}

/// [`load_many`] with each file's text turned into its raw model by `parse` (given the file's
/// name and text): a caller that watches a folder can hand back what it parsed before for a
/// file that did not change. `alongside` gets the merged config and the files' spans on a
/// thread of its own while validation runs (the control plane splits the config into
/// resources meanwhile); its result is returned with the snapshot.
pub fn load_many_with<T: Send, S: std::ops::Deref<Target: AsRef<str>>>(
    files: &[(String, S)],
    mut parse: impl FnMut(&str, &S) -> Result<Config, ConfigErrors>,
    alongside: impl FnOnce(&Config, &[FileSpan]) -> T + Send,
) -> Result<(Snapshot, Vec<FileSpan>, T), ConfigErrors> {
    let mut merged = Config::default();
    let mut spans = Vec::new();
    let mut errors = Vec::new();
    // Where each file's items start in the merged lists.
    let mut starts: Vec<[usize; 5]> = Vec::new();
    for (name, shared) in files {
        let text = (**shared).as_ref();
        starts.push([
            merged.listeners.len(),
            merged.routes.len(),
            merged.clusters.len(),
            merged.filter_chains.len(),
            merged.inference_pools.len(),
        ]);
        match parse(name, shared) {
            Ok(c) => {
                if c.admin.is_some() {
                    if merged.admin.is_some() {
                        errors.push(ConfigError {
                            file: name.clone(),
                            line: PositionIndex::new(text).locate("admin").0,
                            column: 1,
                            field: "admin".into(),
                            message: "admin is set in more than one file".into(),
                        });
                    }
                    merged.admin = c.admin;
                }
                let start = (
                    merged.listeners.len(),
                    merged.routes.len(),
                    merged.clusters.len(),
                    merged.filter_chains.len(),
                    merged.inference_pools.len(),
                );
                merged.listeners.extend(c.listeners);
                merged.routes.extend(c.routes);
                merged.clusters.extend(c.clusters);
                merged.filter_chains.extend(c.filter_chains);
                merged.inference_pools.extend(c.inference_pools);
                spans.push(FileSpan {
                    scope: c.scope,
                    listeners: start.0..merged.listeners.len(),
                    routes: start.1..merged.routes.len(),
                    clusters: start.2..merged.clusters.len(),
                    filter_chains: start.3..merged.filter_chains.len(),
                    inference_pools: start.4..merged.inference_pools.len(),
                });
            }
            Err(e) => errors.extend(e.0),
        }
    }
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    let merged = std::sync::Arc::new(merged);
    let (compiled, extra) = std::thread::scope(|s| {
        let extra = s.spawn(|| alongside(&merged, &spans));
        let compiled = validate::compile_shared(merged.clone());
        (compiled, extra.join())
    });
    // A panic in `alongside` is its caller's: pass it on.
    let extra = extra.unwrap_or_else(|p| std::panic::resume_unwind(p));
    let mut snapshot = compiled.map_err(|problems| {
        let indexes: Vec<PositionIndex> = files
            .iter()
            .map(|(_, t)| PositionIndex::new((**t).as_ref()))
            .collect();
        ConfigErrors(
            problems
                .into_iter()
                .map(|p| {
                    let (file, field) = locate_in_files(&p.field, &starts);
                    let (line, column) = indexes.get(file).map_or((0, 0), |i| i.locate(&field));
                    ConfigError {
                        file: files.get(file).map_or_else(String::new, |f| f.0.clone()),
                        line,
                        column,
                        field,
                        message: p.message,
                    }
                })
                .collect(),
        )
    })?;
    let mut all = String::new();
    for (name, text) in files {
        all.push_str(name);
        all.push_str((**text).as_ref());
    }
    snapshot.version = validate::content_version(&all);
    Ok((snapshot, spans, extra))
}

/// Where one file's items sit in the merged config of [`load_many`], and its scope.
#[derive(Debug, Clone, PartialEq)]
pub struct FileSpan {
    pub scope: Option<crate::model::Scope>,
    pub listeners: std::ops::Range<usize>,
    pub routes: std::ops::Range<usize>,
    pub clusters: std::ops::Range<usize>,
    pub filter_chains: std::ops::Range<usize>,
    pub inference_pools: std::ops::Range<usize>,
}

impl FileSpan {
    /// All of `config`, unscoped.
    pub fn whole(config: &crate::model::Config) -> Self {
        Self {
            scope: None,
            listeners: 0..config.listeners.len(),
            routes: 0..config.routes.len(),
            clusters: 0..config.clusters.len(),
            filter_chains: 0..config.filter_chains.len(),
            inference_pools: 0..config.inference_pools.len(),
        }
    }
}

/// Maps a merged path (`routes[7].route.cluster`) to the file it came from and the path
/// within that file (`routes[2].route.cluster`).
fn locate_in_files(field: &str, starts: &[[usize; 5]]) -> (usize, String) {
    for (k, list) in [
        "listeners[",
        "routes[",
        "clusters[",
        "filter_chains[",
        "inference_pools[",
    ]
    .iter()
    .enumerate()
    {
        let Some(rest) = field.strip_prefix(list) else {
            continue;
        };
        let Some((idx, tail)) = rest.split_once(']') else {
            continue;
        };
        let Ok(idx) = idx.parse::<usize>() else {
            continue;
        };
        let file = starts.iter().rposition(|s| s[k] <= idx).unwrap_or(0);
        return (file, format!("{list}{}]{tail}", idx - starts[file][k]));
    }
    (0, field.to_string())
}

/// Parses `text` into the raw model without validating it.
pub fn parse(file: &str, text: &str) -> Result<Config, ConfigErrors> {
    parse_with(file, text, split::parse)
}

/// [`parse`] of a file parsed before with `cache`: list items unchanged since are taken from
/// it, not parsed again (see [`ItemCache`], which keeps `text`). `previous` is the config the
/// last parse with `cache` gave, if the caller kept it: when no route changed, its routes
/// are moved into the new config ([`ItemCache::routes_moved`]).
pub fn parse_cached(
    file: &str,
    text: &std::sync::Arc<String>,
    cache: &mut ItemCache,
    previous: Option<&mut Config>,
) -> Result<Config, ConfigErrors> {
    parse_with(file, text, |_| split::parse_cached(text, cache, previous))
}

fn parse_with(
    file: &str,
    text: &str,
    split: impl FnOnce(&str) -> Option<Config>,
) -> Result<Config, ConfigErrors> {
    if text.trim().is_empty() {
        return Err(ConfigErrors(vec![ConfigError {
            file: file.to_string(),
            line: 0,
            column: 0,
            field: String::new(),
            message: "the file is empty".to_string(),
        }]));
    }
    // The plain deserializer first: tracking the path of every field made the parse of
    // 10,000 routes 67-94 ms instead of 51-56, and only an error needs it. A file that fails
    // is parsed again to say where.
    // The parts a split parses are each checked for nesting before they are parsed (and
    // declined when too deep); a whole parse checks the whole text first.
    let mut config = match split(text) {
        Some(config) => config,
        None => {
            if let Some(at) = too_deep(text) {
                return Err(nested_too_deep(file, text, at));
            }
            serde_norway::from_str::<Config>(text)
                .map_err(|plain| parse_error(file, text, plain))?
        }
    };
    resolve_module_paths(file, &mut config);
    Ok(config)
}

/// Deepest nesting of YAML flow collections (`[...]`, `{...}`) a file may have; weir's model
/// needs under ten. The YAML scanner's time grows with the square of the depth (a file of
/// 100,000 nested brackets took 45 s), and all of it is spent before any limit of the
/// deserializer applies.
const MAX_FLOW_DEPTH: usize = 100;

/// The bytes [`too_deep`] looks at; it skips the rest.
const FLOW_BYTES: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 7 {
        t[b"[]{}#\"'"[i] as usize] = true;
        i += 1;
    }
    t
};

/// Where `text` opens a flow collection deeper than [`MAX_FLOW_DEPTH`], if it does. Brackets
/// inside quoted scalars, plain scalars and comments do not count. A bound, not a parser: it
/// errs towards counting less (a closing bracket in a plain scalar), not towards refusing a
/// file the parser would take. ~0.5 ns a byte.
pub(crate) fn too_deep(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    let (mut depth, mut i) = (0usize, 0usize);
    while let Some(n) = bytes[i..].iter().position(|&c| FLOW_BYTES[c as usize]) {
        i += n;
        let b = bytes[i];
        match b {
            b'[' | b'{' if may_start(&bytes[..i]) => {
                depth += 1;
                if depth > MAX_FLOW_DEPTH {
                    return Some(i);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'#' if i == 0 || bytes[i - 1].is_ascii_whitespace() => {
                i += bytes[i..]
                    .iter()
                    .position(|&c| c == b'\n')
                    .unwrap_or(bytes.len() - i);
            }
            b'"' | b'\'' if may_start(&bytes[..i]) => {
                i += 1;
                while i < bytes.len() {
                    match bytes[i] {
                        b'\\' if b == b'"' => i += 1,
                        // '' is a quote inside a single-quoted scalar.
                        b'\'' if b == b'\'' && bytes.get(i + 1) == Some(&b'\'') => i += 1,
                        c if c == b => break,
                        _ => {}
                    }
                    i += 1;
                }
            }
            _ => {}
        }
        i += 1;
        if i >= bytes.len() {
            break;
        }
    }
    None
}

/// Whether a node may start after `before` (so a bracket opens a flow collection and a quote
/// a quoted scalar): at a line's start or after `:`, `-`, `,`, `[`, `{` or `?`. Elsewhere
/// they are part of a plain scalar (`regex: ^/a\[`).
fn may_start(before: &[u8]) -> bool {
    matches!(
        before.iter().rev().find(|&&c| c != b' ' && c != b'\t'),
        None | Some(b'\n' | b'\r' | b':' | b'-' | b',' | b'[' | b'{' | b'?')
    )
}

/// The error for a file [`too_deep`] refuses at byte `at`.
fn nested_too_deep(file: &str, text: &str, at: usize) -> ConfigErrors {
    let (line, column) = line_and_column(text, at);
    ConfigErrors(vec![ConfigError {
        file: file.to_string(),
        line,
        column,
        field: String::new(),
        message: format!(
            "more than {MAX_FLOW_DEPTH} [ or {{ inside each other; no weir config nests so deep"
        ),
    }])
}

/// The 1-based line and column of byte `at` of `text`.
fn line_and_column(text: &str, at: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..at];
    let line_start = before
        .iter()
        .rposition(|&c| c == b'\n')
        .map_or(0, |n| n + 1);
    let line = before.iter().filter(|&&c| c == b'\n').count() + 1;
    (line, at - line_start + 1)
}

/// Why `text` does not parse (`plain`, the deserializer's own error), with the path of the
/// field it failed at.
fn parse_error(file: &str, text: &str, plain: serde_norway::Error) -> ConfigErrors {
    let de = serde_norway::Deserializer::from_str(text);
    let (mut field, inner) = match serde_path_to_error::deserialize::<_, Config>(de) {
        Err(e) => (e.path().to_string(), e.into_inner()),
        // Cannot happen (the same input through the same deserializer), but if it did, the
        // plain error is still an answer.
        Ok(_) => (String::new(), plain),
    };
    if field == "." {
        field.clear();
    }
    let (line, column) = inner.location().map_or((0, 0), |l| (l.line(), l.column()));
    // serde_norway's message reads "some.path: what is wrong at line L column C"; keep
    // only "what is wrong": the path and the position are carried separately.
    let full = inner.to_string();
    let mut message = full.split(" at line ").next().unwrap_or(&full);
    if let Some((prefix, rest)) = message.split_once(": ") {
        if !prefix.contains(' ') {
            message = rest;
        }
    }
    // An unknown key is better pointed at than the struct that does not know it.
    if let Some(key) = message
        .strip_prefix("unknown field `")
        .and_then(|m| m.split('`').next())
    {
        if !field.ends_with(key) {
            field = if field.is_empty() {
                key.to_string()
            } else {
                format!("{field}.{key}")
            };
        }
    }
    let (line, column) = match PositionIndex::new(text).locate(&field) {
        (0, _) => (line, column),
        pos => pos,
    };
    ConfigErrors(vec![ConfigError {
        file: file.to_string(),
        line,
        column,
        field,
        message: message.to_string(),
    }])
}

/// Makes relative filter module paths relative to the folder of the file that names them.
fn resolve_module_paths(file: &str, config: &mut Config) {
    let Some(dir) = std::path::Path::new(file).parent() else {
        return;
    };
    if dir.as_os_str().is_empty() {
        return;
    }
    for f in config
        .filter_chains
        .iter_mut()
        .flat_map(|c| c.filters.iter_mut())
    {
        if std::path::Path::new(&f.module).is_relative() && !f.module.is_empty() {
            f.module = dir.join(&f.module).display().to_string();
        }
    }
}
