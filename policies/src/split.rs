//! A large policy file parsed in parts, on every CPU: its top-level lists (`routes:`,
//! `clusters:`, ...) are cut between items into parts, each part parsed as a file of its own,
//! and the lists put back together in order.
//!
//! YAML cannot be split correctly without parsing it, so the cut is a guess that is checked:
//! a cut is only made before a line that starts an item of a top-level block list (the
//! list's indent, then `- `). Such a line can only be somewhere else in a well-formed file if
//! it lies inside a quoted scalar or a flow collection (a block scalar or a plain one would
//! end there), and then the part before it ends inside that scalar or collection, which is a
//! parse error. An alias to an anchor in another part is also an error there. Any error, or
//! anything the guess does not cover (directives, several documents, a list key twice), and
//! the caller parses the whole file the usual way: the result is always the one a whole parse
//! gives, only sooner.

use std::collections::HashMap;
use std::sync::Arc;

use crate::model::{Cluster, Config, FilterChain, InferencePool, Listener, Route};

/// Below this, one thread parses the file (~4 ms of YAML here).
const PARALLEL_ABOVE: usize = 128 << 10;

/// The top-level keys whose block lists are cut.
const LISTS: [&str; 5] = [
    "listeners",
    "routes",
    "clusters",
    "filter_chains",
    "inference_pools",
];

/// Text parsed at a time. serde_norway builds a document's whole event list before it
/// deserializes it: for half of 10,000 routes that list grew through ~25 MB of fresh memory,
/// and the page faults were ~18% of the parse. Parts this small reuse what the last one freed
/// (the parse of 10,000 routes in weir-bench xds: medians 41 ms against 47).
const PART_BYTES: usize = 64 << 10;

/// How many parts `bytes` of items are parsed in, on `threads` threads.
fn parts_for(bytes: usize, threads: usize) -> usize {
    threads.max(bytes / PART_BYTES)
}

/// A file over [`PARALLEL_ABOVE`] parsed in parts, on every CPU.
pub(crate) fn parse(text: &str) -> Option<Config> {
    let threads = crate::config_threads();
    (text.len() > PARALLEL_ABOVE)
        .then(|| parse_in_parts(text, parts_for(text.len(), threads), threads))
        .flatten()
}

/// `text` parsed in `parts` parts on `threads` threads, or `None` when it cannot be split or
/// a part does not parse (the caller then parses it whole, which also finds the error).
pub(crate) fn parse_in_parts(text: &str, parts: usize, threads: usize) -> Option<Config> {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let (head, sections) = sections(&lines)?;
    let groups = group(&sections, parts);
    if groups.len() < 2 {
        return None;
    }
    parse_groups(&head, &groups, threads)
}

/// Each list item of a large file as it was parsed last time, so that the file parsed again
/// parses only the items that changed: an endpoint edit in a file of 10,000 routes parses one
/// cluster. Holds the items of one file (the last one parsed with it).
///
/// Items are matched in order from both ends of each list by their text (a memcmp, no
/// hashing), and what lies between by text; an item's text always parses to the same item
/// (files with anchors are not cached).
#[derive(Debug, Default)]
pub struct ItemCache {
    /// The file's text last time (shared with whoever keeps it too: no copy of 1.3 MB).
    text: Arc<String>,
    /// Each list's items.
    lists: Vec<(&'static str, Vec<Placed>)>,
    /// Items parsed (not found in the cache) by the last parse.
    parsed: usize,
    /// Whether the last parse took its routes from the config the one before gave.
    routes_moved: bool,
}

impl ItemCache {
    /// How many list items the last parse with this cache had to parse.
    pub fn last_parsed(&self) -> usize {
        self.parsed
    }

    /// Whether the last parse moved the routes of the config given as the previous one into
    /// its own (every route unchanged, in order): they were not compared or copied.
    pub fn routes_moved(&self) -> bool {
        self.routes_moved
    }
}

/// An item: where it is in its file's text, and what it parsed to.
type Placed = (std::ops::Range<usize>, Item);

/// A parsed list item, shared: a pointer wide, so that carrying 10,000 of them from the last
/// parse into this one copies pointers, not the items (moving the items themselves was most
/// of an endpoint edit's 5 ms here).
#[derive(Debug, Clone)]
enum Item {
    Listener(Arc<Listener>),
    Route(Arc<Route>),
    Cluster(Arc<Cluster>),
    FilterChain(Arc<FilterChain>),
    InferencePool(Arc<InferencePool>),
}

impl Item {
    /// The list it is an item of.
    fn list(&self) -> &'static str {
        match self {
            Item::Listener(_) => "listeners",
            Item::Route(_) => "routes",
            Item::Cluster(_) => "clusters",
            Item::FilterChain(_) => "filter_chains",
            Item::InferencePool(_) => "inference_pools",
        }
    }
}

/// Where an item's lines, which lie one after another in `text`, are.
fn range_of(text: &str, item: &[&str]) -> std::ops::Range<usize> {
    let Some(first) = item.first() else {
        return 0..0;
    };
    let start = first.as_ptr() as usize - text.as_ptr() as usize;
    let len: usize = item.iter().map(|l| l.len()).sum();
    start..start + len
}

/// An item's text.
fn text_of<'t>(text: &'t str, item: &[&str]) -> &'t str {
    &text[range_of(text, item)]
}

/// [`parse`] that takes unchanged list items from `cache` and leaves this parse's items in it.
/// `None` (and an empty cache) where [`parse`] declines, and for a file with anchors, whose
/// items may depend on each other. `previous`, the config the last parse with `cache` gave,
/// gives up its routes when none changed (10,000 routes shared one by one cost 0.4-0.7 ms,
/// 1.4 after a second idle: each count lies wherever its route does).
pub(crate) fn parse_cached(
    shared: &Arc<String>,
    cache: &mut ItemCache,
    previous: Option<&mut Config>,
) -> Option<Config> {
    let text: &str = shared;
    let ItemCache {
        text: old_text,
        lists: mut old_lists,
        ..
    } = std::mem::take(cache);
    if text.len() <= PARALLEL_ABOVE || has_anchor(text) {
        return None;
    }
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let (head, sections) = sections(&lines)?;
    // Each item: what it was last time if its text is unchanged (`None`: parsed below); and
    // whether the list is the last one, item for item.
    let mut slots: Vec<(&'static str, Vec<Option<Item>>, bool)> =
        Vec::with_capacity(sections.len());
    let mut missing: Vec<Section> = Vec::new();
    let mut left = Vec::new();
    for s in &sections {
        let key = LISTS.into_iter().find(|k| *k == s.key)?;
        let before = old_lists
            .iter_mut()
            .find(|(k, _)| *k == key)
            .map_or(Vec::new(), |(_, items)| std::mem::take(items));
        let was = |i: usize| &old_text[before[i].0.clone()];
        let now = |i: usize| text_of(text, s.items[i]);
        // Unchanged from the front and from the back...
        let most = s.items.len().min(before.len());
        let front = (0..most).take_while(|&i| now(i) == was(i)).count();
        let back = (0..most - front)
            .take_while(|&j| now(s.items.len() - 1 - j) == was(before.len() - 1 - j))
            .count();
        // ...and in between, by text (an item moved, or one edit at each end).
        // foldhash, not SipHash: when every item changed, this hashes the whole list twice.
        let mut between: HashMap<&str, usize, foldhash::fast::RandomState> =
            HashMap::with_capacity_and_hasher(before.len() - back - front, Default::default());
        between.extend((front..before.len() - back).map(|i| (was(i), i)));
        let old_len = before.len();
        // Moved, not cloned: the old items are this parse's to take (an item's reference
        // count lies wherever the item does, and touching 10,000 of them cost ~0.5 ms).
        let mut before: Vec<Option<Item>> = before.into_iter().map(|(_, i)| Some(i)).collect();
        let mut section_slots = Vec::with_capacity(s.items.len());
        let mut absent = Vec::new();
        for (i, item) in s.items.iter().enumerate() {
            let found = if i < front {
                Some(i)
            } else if i >= s.items.len() - back {
                Some(old_len - (s.items.len() - i))
            } else {
                between.get(now(i)).copied()
            };
            // An item whose text appears twice is parsed the second time.
            match found.and_then(|f| before[f].take()) {
                Some(found) if found.list() == key => section_slots.push(Some(found)),
                _ => {
                    absent.push(*item);
                    section_slots.push(None);
                }
            }
        }
        // The old items that changed, freed later with the rest of the last parse.
        left.push(before);
        cache.parsed += absent.len();
        if !absent.is_empty() {
            missing.push(Section {
                key: s.key,
                items: absent,
            });
        }
        let same_list = front == s.items.len() && old_len == s.items.len();
        slots.push((key, section_slots, same_list));
    }
    let threads = crate::config_threads();
    let parts = match bytes(&missing) {
        b if b > PARALLEL_ABOVE => parts_for(b, threads),
        _ => 1,
    };
    let groups = group(&missing, parts);
    let mut config = parse_groups(&head, &[], 1)?;
    let parsed = parse_groups("", &groups, threads)?;
    let mut listeners = parsed.listeners.into_iter();
    let mut routes = parsed.routes.into_iter();
    let mut clusters = parsed.clusters.into_iter();
    let mut filter_chains = parsed.filter_chains.into_iter();
    let mut pools = parsed.inference_pools.into_iter();
    let mut lists = Vec::with_capacity(slots.len());
    // The previous config's routes are this one's when the routes list is the last one (a
    // file holds one list of each kind: `sections` declines a key twice).
    let move_routes = previous.filter(|p| {
        slots
            .iter()
            .any(|(key, items, same)| *key == "routes" && *same && p.routes.len() == items.len())
    });
    for ((key, section_slots, _), s) in slots.into_iter().zip(&sections) {
        if key == "routes" && move_routes.is_some() {
            let kept = section_slots
                .into_iter()
                .zip(&s.items)
                .map(|(slot, lines)| Some((range_of(text, lines), slot?)))
                .collect::<Option<Vec<_>>>()?;
            lists.push((key, kept));
            continue;
        }
        // Each kept route is shared below, an atomic increment of a count that lies wherever
        // the route does. Those increments wait for their cache misses one at a time; plain
        // reads of the counts first let the misses overlap (0.9 -> 0.5 ms at 10,000 routes).
        let counts: usize = section_slots
            .iter()
            .map(|slot| match slot {
                Some(Item::Route(r)) => Arc::strong_count(r),
                _ => 0,
            })
            .sum();
        std::hint::black_box(counts);
        let mut kept = Vec::with_capacity(section_slots.len());
        for (slot, lines) in section_slots.into_iter().zip(&s.items) {
            let item = match slot {
                Some(item) => item,
                // A part's lists hold exactly its items, in order.
                None => match key {
                    "listeners" => Item::Listener(Arc::new(listeners.next()?)),
                    "routes" => Item::Route(routes.next()?),
                    "clusters" => Item::Cluster(Arc::new(clusters.next()?)),
                    "filter_chains" => Item::FilterChain(Arc::new(filter_chains.next()?)),
                    _ => Item::InferencePool(Arc::new(pools.next()?)),
                },
            };
            match &item {
                Item::Listener(l) => config.listeners.push(Listener::clone(l)),
                Item::Route(r) => config.routes.push(r.clone()),
                Item::Cluster(c) => config.clusters.push(Cluster::clone(c)),
                Item::FilterChain(f) => config.filter_chains.push(FilterChain::clone(f)),
                Item::InferencePool(p) => config.inference_pools.push(InferencePool::clone(p)),
            }
            kept.push((range_of(text, lines), item));
        }
        lists.push((key, kept));
    }
    let all_used = listeners.next().is_none()
        && routes.next().is_none()
        && clusters.next().is_none()
        && filter_chains.next().is_none()
        && pools.next().is_none();
    if !all_used {
        return None;
    }
    cache.routes_moved = move_routes.is_some();
    if let Some(previous) = move_routes {
        config.routes = std::mem::take(&mut previous.routes);
    }
    cache.text = shared.clone();
    cache.lists = lists;
    // What is left of the last parse: its text, and the items that changed.
    crate::drop_later((old_text, old_lists, left));
    Some(config)
}

/// Whether `text` may define an anchor (`&name` where a node starts). A `&` inside a scalar
/// can look like one: that only costs the cache.
fn has_anchor(text: &str) -> bool {
    let bytes = text.as_bytes();
    text.match_indices('&').any(|(i, _)| {
        let before = i.checked_sub(1).map(|j| bytes[j]);
        let after = bytes.get(i + 1);
        matches!(
            before,
            None | Some(b' ' | b'\t' | b'\n' | b'[' | b'{' | b',')
        ) && after.is_some_and(|c| !c.is_ascii_whitespace())
    })
}

/// `head` and `groups` (from [`group`]) parsed, the groups in `threads` runs of consecutive
/// groups, a thread each: the head's config with the groups' list items appended in order.
/// `None` if one does not parse or a group holds anything but list items.
fn parse_groups(head: &str, groups: &[String], threads: usize) -> Option<Config> {
    let mut texts = vec![head];
    texts.extend(groups.iter().map(String::as_str));
    let parse = |t: &str| {
        if crate::load::too_deep(t).is_some() {
            // Declined: the whole parse then says where.
            None
        } else if has_content(t) {
            serde_norway::from_str::<Config>(t).ok()
        } else {
            Some(Config::default())
        }
    };
    // A thread is worth starting for a large part only (an edit's few items parse in less
    // time than a thread takes to start).
    let small = texts.iter().map(|t| t.len()).sum::<usize>() < PARALLEL_ABOVE / 4;
    let mut parsed = if small || threads < 2 {
        texts.into_iter().map(parse).collect()
    } else {
        let runs: Vec<&[&str]> = texts.chunks(texts.len().div_ceil(threads)).collect();
        crate::on_threads(runs, |run| run.iter().map(|t| parse(t)).collect::<Vec<_>>())
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
    }
    .into_iter();
    let mut config = parsed.next()??;
    for part in parsed {
        let part = part?;
        // A part holds only list items: anything else means the cut was not what it seemed.
        if part.admin.is_some()
            || part.scope.is_some()
            || part.fast_path.is_some()
            || part.access_log.is_some()
            || part.tracing.is_some()
            || part.otlp_metrics.is_some()
        {
            return None;
        }
        config.listeners.extend(part.listeners);
        config.routes.extend(part.routes);
        config.clusters.extend(part.clusters);
        config.filter_chains.extend(part.filter_chains);
        config.inference_pools.extend(part.inference_pools);
    }
    Some(config)
}

/// One top-level block list: its key and its items, each as its lines (with their endings).
struct Section<'a> {
    key: &'a str,
    items: Vec<&'a [&'a str]>,
}

/// The text with the cut lists taken out, and the lists; `None` when the file is not one this
/// module cuts.
fn sections<'a>(lines: &'a [&'a str]) -> Option<(String, Vec<Section<'a>>)> {
    let mut head = String::new();
    let mut sections: Vec<Section> = Vec::new();
    let mut seen_content = false;
    let mut keys_seen: Vec<&str> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        // Directives and document markers change how the whole file reads (a leading `---`
        // is harmless and stays in the head).
        if line.starts_with('%') || line.starts_with("...") {
            return None;
        }
        if line.starts_with("---") {
            if seen_content {
                return None;
            }
            head.push_str(line);
            i += 1;
            continue;
        }
        if !is_blank_or_comment(line) {
            seen_content = true;
        }
        // A list key written twice (in any form): the whole parse says it is a duplicate.
        if let Some(k) = LISTS.into_iter().find(|k| {
            line.strip_prefix(k)
                .is_some_and(|r| r.trim_start_matches([' ', '\t']).starts_with(':'))
        }) {
            if keys_seen.contains(&k) {
                return None;
            }
            keys_seen.push(k);
        }
        let Some(key) = list_key(line) else {
            head.push_str(line);
            i += 1;
            continue;
        };
        // The list's indent is that of its first item.
        let mut j = i + 1;
        while j < lines.len() && is_blank_or_comment(lines[j]) {
            j += 1;
        }
        let indent = match lines.get(j).and_then(|l| item_indent(l)) {
            Some(n) => n,
            None => {
                // Not a block list (empty, or written some other way): left whole.
                head.push_str(line);
                i += 1;
                continue;
            }
        };
        // The list runs to the next line at column 0 that is not a comment (or, for a list
        // at column 0, not one of its items).
        let mut end = j;
        while end < lines.len() {
            let l = lines[end];
            let at_column_0 = !l.starts_with(' ') && !is_blank_or_comment(l);
            if at_column_0 && !(indent == 0 && item_indent(l) == Some(0)) {
                break;
            }
            end += 1;
        }
        // Comments between the key and the first item belong to no item.
        let mut items: Vec<&[&str]> = Vec::new();
        let mut start = j;
        for k in j + 1..=end {
            if k == end || item_indent(lines[k]) == Some(indent) {
                items.push(&lines[start..k]);
                start = k;
            }
        }
        sections.push(Section { key, items });
        i = end;
    }
    Some((head, sections))
}

/// The items cut into at most `parts` texts of about the same size, in order, each a file
/// with the keys of the lists its items come from.
fn group(sections: &[Section], parts: usize) -> Vec<String> {
    let per_part = bytes(sections).div_ceil(parts.max(1)).max(1);
    let mut groups: Vec<String> = Vec::new();
    let mut current = String::new();
    let mut current_key = "";
    for s in sections {
        for item in &s.items {
            if current.len() >= per_part {
                groups.push(std::mem::take(&mut current));
                current_key = "";
            }
            if current_key != s.key {
                current.push_str(s.key);
                current.push_str(":\n");
                current_key = s.key;
            }
            for line in *item {
                current.push_str(line);
            }
            if !current.ends_with('\n') {
                current.push('\n');
            }
        }
    }
    if !current.is_empty() {
        groups.push(current);
    }
    groups
}

/// The size of the sections' items.
fn bytes(sections: &[Section]) -> usize {
    sections
        .iter()
        .flat_map(|s| &s.items)
        .flat_map(|i| i.iter())
        .map(|l| l.len())
        .sum()
}

/// `key` when `line` is `key:` for one of [`LISTS`], alone on its line (a comment may follow).
fn list_key(line: &str) -> Option<&'static str> {
    LISTS.into_iter().find(|k| {
        line.strip_prefix(k)
            .and_then(|r| r.strip_prefix(':'))
            .is_some_and(|r| {
                let r = r.trim_start_matches([' ', '\t']);
                r.trim_end().is_empty() || r.starts_with('#')
            })
    })
}

/// The indent of `line` when it starts a block list item (`- ...` or a lone `-`).
fn item_indent(line: &str) -> Option<usize> {
    let rest = line.trim_start_matches(' ');
    let after = rest.strip_prefix('-')?;
    (after.is_empty() || after.starts_with([' ', '\n', '\r'])).then(|| line.len() - rest.len())
}

fn is_blank_or_comment(line: &str) -> bool {
    let t = line.trim_start();
    t.is_empty() || t.starts_with('#')
}

fn has_content(text: &str) -> bool {
    text.split_inclusive('\n')
        .any(|l| !is_blank_or_comment(l) && !l.starts_with("---"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parallel parse gives what the whole parse gives, or declines.
    fn same_or_declined(text: &str, parts: usize) -> bool {
        let whole = serde_norway::from_str::<Config>(text).ok();
        match parse_in_parts(text, parts, 2) {
            Some(split) => {
                assert_eq!(Some(&split), whole.as_ref(), "split parse differs:\n{text}");
                true
            }
            None => false,
        }
    }

    const ROUTE_AND_CLUSTER: &str = "routes:\n  - { name: r0, route: { cluster: c } }\n";

    fn many(n: usize, indent: &str) -> String {
        let mut t = String::from("# a policy\nadmin: { address: \"127.0.0.1:9901\" }\nlisteners: [{ name: l, address: \"127.0.0.1:1\" }]\nroutes:\n");
        for i in 0..n {
            t.push_str(&format!(
                "{indent}- name: r{i}\n{indent}  match:\n{indent}    path: {{ prefix: /r{i}/ }}\n{indent}  route: {{ cluster: c{} }}\n",
                i % 3
            ));
            if i % 7 == 0 {
                t.push_str("  # a comment between items\n\n");
            }
        }
        t.push_str("clusters:\n");
        for c in 0..3 {
            t.push_str(&format!(
                "{indent}- name: c{c}\n{indent}  endpoints:\n{indent}  - address: \"127.0.0.1:{}\"\n",
                8000 + c
            ));
        }
        t.push_str("access_log: { path: stdout }\n");
        t
    }

    #[test]
    fn lists_cut_at_any_indent_parse_as_the_whole_file_does() {
        for indent in ["", "  ", "    "] {
            let text = many(50, indent);
            for parts in [2, 3, 7, 100] {
                assert!(same_or_declined(&text, parts), "declined:\n{text}");
            }
            let c = parse_in_parts(&text, 4, 2).unwrap();
            assert_eq!(c.routes.len(), 50);
            assert_eq!(c.routes[49].name, "r49");
            assert_eq!(c.clusters.len(), 3);
            assert!(c.admin.is_some() && c.access_log.is_some());
        }
        // A leading document marker and CRLF line endings.
        let crlf = format!("---\n{}", many(20, "  ")).replace('\n', "\r\n");
        assert!(same_or_declined(&crlf, 3));
    }

    /// A cached parse as the policy folder makes them: the last config (the whole parse's
    /// where the cached one declined) given as the previous one.
    fn chained(text: &str, cache: &mut ItemCache, last: &mut Option<Config>) -> Option<Config> {
        let got = parse_cached(&Arc::new(text.to_string()), cache, last.as_mut());
        *last = got
            .clone()
            .or_else(|| serde_norway::from_str::<Config>(text).ok());
        got
    }

    #[test]
    fn a_cached_parse_parses_only_changed_items_and_gives_the_whole_parse() {
        let whole = |t: &str| serde_norway::from_str::<Config>(t).unwrap();
        let text = many(3000, "  ");
        assert!(text.len() > PARALLEL_ABOVE);
        let mut cache = ItemCache::default();
        let mut last = None;
        assert_eq!(chained(&text, &mut cache, &mut last).unwrap(), whole(&text));
        assert_eq!(
            cache.last_parsed(),
            3003,
            "every route and cluster the first time"
        );

        // One endpoint, then one route, then a route added and one removed, then all back:
        // each parses what it changed.
        let e0 = text.replace("127.0.0.1:8001", "127.0.0.1:9001");
        let e1 = e0.replace("prefix: /r1500/", "prefix: /changed/");
        let e2 = e1
            .replace(
                "  - name: r10\n",
                "  - name: added\n    route: { cluster: c0 }\n  - name: r10\n",
            )
            .replace(
                "  - name: r20\n    match:\n      path: { prefix: /r20/ }\n    route: { cluster: c2 }\n",
                "",
            );
        assert!(!e2.contains("name: r20\n") && e2.contains("name: added\n"));
        // Only where no route changed are the last config's routes moved into this one.
        let edits = [
            (e0, 1, true),
            (e1, 1, false),
            (e2, 1, false),
            (text.clone(), 3, false),
        ];
        for (n, (edited, parsed, moved)) in edits.into_iter().enumerate() {
            assert_eq!(
                chained(&edited, &mut cache, &mut last).unwrap(),
                whole(&edited)
            );
            assert_eq!(cache.last_parsed(), parsed, "edit {n}");
            assert_eq!(cache.routes_moved(), moved, "edit {n}");
        }
        let edited = text.replace("127.0.0.1:8002", "127.0.0.1:9002");
        assert_eq!(
            chained(&edited, &mut cache, &mut last).unwrap(),
            whole(&edited)
        );
        assert_eq!(cache.last_parsed(), 1);
        assert!(cache.routes_moved());
        // The previous config had its routes taken: it is not the last one any more.
        let mut stale = whole(&edited);
        stale.routes.truncate(10);
        let again = text.replace("127.0.0.1:8002", "127.0.0.1:7002");
        assert_eq!(
            parse_cached(&Arc::new(again.clone()), &mut cache, Some(&mut stale)).unwrap(),
            whole(&again),
            "a previous config of another length gives nothing"
        );
        assert!(!cache.routes_moved());

        // Anchors may tie items together: declined, and the cache emptied.
        let anchored = text.replacen("  - name: r0\n", "  - &first\n    name: r0\n", 1);
        assert_eq!(chained(&anchored, &mut cache, &mut last), None);
        assert_eq!(chained(&text, &mut cache, &mut last).unwrap(), whole(&text));
        assert_eq!(cache.last_parsed(), 3003);

        // Two routes swapped: found by text between the unchanged ends, none parsed.
        let item = |i: usize| {
            format!(
                "  - name: r{i}\n    match:\n      path: {{ prefix: /r{i}/ }}\n    route: {{ cluster: c{} }}\n",
                i % 3
            )
        };
        let swapped = text
            .replace(&item(100), "@")
            .replace(&item(2000), &item(100))
            .replace('@', &item(2000));
        assert_ne!(swapped, text);
        assert_eq!(
            chained(&swapped, &mut cache, &mut last).unwrap(),
            whole(&swapped)
        );
        assert_eq!(cache.last_parsed(), 0);

        // The same text twice (a route copied, then edited elsewhere): the last parse's item
        // is taken once, and the copy parsed.
        let copied = swapped.replacen(&item(500), &format!("{}{}", item(500), item(500)), 1);
        let copied = copied.replacen("prefix: /r7/", "prefix: /seven/", 1);
        assert_eq!(
            chained(&copied, &mut cache, &mut last).unwrap(),
            whole(&copied)
        );
        assert_eq!(cache.last_parsed(), 2, "the copy and the edit");
        assert!(!has_anchor("a: \"Tom & Jerry\"\nb: /x?a=1&b=2\n"));
        assert!(has_anchor("a: &x 1\nb: *x\n"));
    }

    #[test]
    fn cuts_inside_scalars_and_flow_collections_are_declined() {
        let cases = [
            // A double-quoted scalar whose second line looks like an item.
            "routes:\n  - { name: \"a\n  - b\", route: { cluster: c } }\n  - { name: x, route: { cluster: c } }\n",
            // The same in single quotes, and a flow mapping over lines.
            "routes:\n  - { name: 'a\n  - b', route: { cluster: c } }\n  - { name: x, route: { cluster: c } }\n",
            "routes:\n  - { name: a,\n  - b: 1, route: { cluster: c } }\n  - { name: x, route: { cluster: c } }\n",
            // An alias to an anchor in an earlier item.
            "routes:\n  - &r { name: a, route: { cluster: c } }\n  - *r\n  - { name: x, route: { cluster: c } }\n",
        ];
        for text in cases {
            // Cut between every two items, so also inside the scalar or collection.
            assert!(!same_or_declined(text, 100), "should decline:\n{text}");
            // Cut elsewhere or not at all: still the whole parse's result.
            same_or_declined(text, 2);
        }
        // A block scalar holding a line that looks like an item, deeper than the list's items
        // (as it must be): cut between the items only, and the same.
        let block = "routes:\n  - name: |\n      a\n      - not an item\n    route: { cluster: c }\n  - { name: b, route: { cluster: c } }\n";
        assert!(same_or_declined(block, 2));
        assert_eq!(
            parse_in_parts(block, 2, 2).unwrap().routes[0].name,
            "a\n- not an item\n"
        );
    }

    #[test]
    fn files_it_does_not_cut_are_declined() {
        let two_docs = format!("{ROUTE_AND_CLUSTER}---\n{ROUTE_AND_CLUSTER}");
        let twice = format!("{ROUTE_AND_CLUSTER}{ROUTE_AND_CLUSTER}");
        let twice_flow = format!("{ROUTE_AND_CLUSTER}routes: []\n");
        let directive = format!("%YAML 1.2\n---\n{ROUTE_AND_CLUSTER}");
        for text in [two_docs, twice, twice_flow, directive] {
            assert!(
                parse_in_parts(&text, 2, 2).is_none(),
                "should decline:\n{text}"
            );
        }
        // A list written in flow style is not cut (nothing to cut: one part).
        assert!(parse_in_parts("routes: [{ name: a, route: { cluster: c } }]\n", 2, 2).is_none());
        // An unknown key inside an item fails its part, so the whole parse reports it.
        let bad = many(10, "  ").replace("name: r5\n", "name: r5\n    nmae: x\n");
        assert!(parse_in_parts(&bad, 2, 2).is_none());
    }
}
