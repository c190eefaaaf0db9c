//! `/debug/plugins` and `/debug/cache`, built on request from the controller's typed state.
//!
//! The admin server parses the query ([`PluginsQuery`], [`CacheQuery`]) and sends it to the
//! controller (`Command::Plugins`, `Command::Cache`), which builds just the page asked for
//! ([`plugins_page`], [`cache_page`]): nothing is built while no one asks, and a change costs the
//! controller no view work. A page holds at most `limit` entries (default [`DEFAULT_LIMIT`], at
//! most [`MAX_LIMIT`]) after the cursor `after`, with `next` the cursor of the following page;
//! its JSON is written entry by entry while the connection reads it ([`json_body`]).

use std::collections::BTreeMap;
use std::io;
use std::ops::Bound;

use bytes::Bytes;
use hyper::body::Frame;
use serde::Serialize;

use super::files::FileError;
use super::sources::{Conflict, Sources};
use crate::cache::ModuleKey;
use crate::driver::Driver;
use crate::engine::Serving;
use crate::plugin::ObjectKey;

/// Entries per page when the query gives no `limit`.
pub const DEFAULT_LIMIT: usize = 1000;
/// The largest `limit` accepted.
pub const MAX_LIMIT: usize = 10_000;
/// The plugins one `/debug/cache` entry lists; the others are paged with
/// `/debug/plugins?module=<sha256>`.
pub const ENTRY_PLUGINS: usize = 100;
/// Bytes of JSON gathered before they are handed to the connection.
const CHUNK: usize = 16 * 1024;

/// `/debug/plugins?plugin=ns/name`, `?limit=N&after=ns/name` (either with `module=<sha256>`),
/// `?fileErrors=FROM&limit=N` or `?conflicts=FROM&limit=N`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginsQuery {
    /// Only this plugin (its entry, refusal and conflicts).
    pub plugin: Option<ObjectKey>,
    /// Only the plugins using a cached module with this sha256 (a `/debug/cache` entry's
    /// `plugins`, all of them).
    pub module: Option<String>,
    /// Plugins after this one (in `ns/name` order).
    pub after: Option<ObjectKey>,
    /// Only the file errors, from this position of their list on.
    pub file_errors: Option<usize>,
    /// Only the conflicts, from this position of their list on.
    pub conflicts: Option<usize>,
    pub limit: usize,
}

/// `/debug/cache?module=URL` or `?limit=N&after=CURSOR`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheQuery {
    /// Only the entries of this module name (every checksum).
    pub module: Option<String>,
    /// Entries after this one (a `next` of an earlier page: `module@checksum`).
    pub after: Option<ModuleKey>,
    pub limit: usize,
}

/// The query's parameters, URL-decoded; an error names the culprit.
fn params(query: &str, known: &[&str]) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        if !known.contains(&k.as_ref()) {
            return Err(format!(
                "unknown parameter {k:?} (want {})",
                known.join(", ")
            ));
        }
        if out.insert(k.to_string(), v.to_string()).is_some() {
            return Err(format!("parameter {k:?} given twice"));
        }
    }
    Ok(out)
}

fn limit(p: &BTreeMap<String, String>) -> Result<usize, String> {
    match p.get("limit") {
        None => Ok(DEFAULT_LIMIT),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            _ => Err(format!("limit {v:?}: want a number from 1 to {MAX_LIMIT}")),
        },
    }
}

fn object_key(name: &str, v: &str) -> Result<ObjectKey, String> {
    ObjectKey::parse(v).ok_or_else(|| format!("{name} {v:?}: want namespace/name"))
}

impl PluginsQuery {
    pub fn parse(query: &str) -> Result<PluginsQuery, String> {
        let known = [
            "plugin",
            "module",
            "after",
            "fileErrors",
            "conflicts",
            "limit",
        ];
        let p = params(query, &known)?;
        let plugin = p
            .get("plugin")
            .map(|v| object_key("plugin", v))
            .transpose()?;
        if plugin.is_some() && (p.contains_key("after") || p.contains_key("limit")) {
            return Err("plugin cannot be combined with after or limit".into());
        }
        let module = match p.get("module") {
            Some(v)
                if v.len() == 64 && v.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) =>
            {
                Some(v.clone())
            }
            Some(v) => {
                return Err(format!(
                    "module {v:?}: want a sha256, 64 lowercase hex digits"
                ))
            }
            None => None,
        };
        // A list paged by position: only with `limit`.
        let position = |name: &str| -> Result<Option<usize>, String> {
            let Some(v) = p.get(name) else {
                return Ok(None);
            };
            let from = v
                .parse::<usize>()
                .map_err(|_| format!("{name} {v:?}: want a position (a {name}Next)"))?;
            if (p.keys()).any(|k| k != name && k != "limit") {
                return Err(format!("{name} can be combined with limit only"));
            }
            Ok(Some(from))
        };
        let (file_errors, conflicts) = (position("fileErrors")?, position("conflicts")?);
        if plugin.is_some() && module.is_some() {
            return Err("plugin cannot be combined with module".into());
        }
        Ok(PluginsQuery {
            plugin,
            module,
            after: p.get("after").map(|v| object_key("after", v)).transpose()?,
            file_errors,
            conflicts,
            limit: limit(&p)?,
        })
    }
}

impl CacheQuery {
    pub fn parse(query: &str) -> Result<CacheQuery, String> {
        let p = params(query, &["module", "after", "limit"])?;
        let module = p.get("module").cloned();
        if module.is_some() && (p.contains_key("after") || p.contains_key("limit")) {
            return Err("module cannot be combined with after or limit".into());
        }
        let after = match p.get("after") {
            None => None,
            Some(v) => match v.rsplit_once('@') {
                Some((name, checksum)) if !name.is_empty() => Some(ModuleKey::new(name, checksum)),
                _ => return Err(format!("after {v:?}: want the next of an earlier page")),
            },
        };
        Ok(CacheQuery {
            module,
            after,
            limit: limit(&p)?,
        })
    }
}

/// What a plugin serves, as `/debug/plugins` shows it.
#[derive(Debug, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
enum Serves {
    Module {
        sha256: String,
        checksum: Option<String>,
        path: std::path::PathBuf,
    },
    DenyAll,
    AllowAll,
    Nothing,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct PluginRow {
    plugin: String,
    resource: String,
    envoy_filter: Option<String>,
    resource_version: String,
    processed_resource_version: Option<String>,
    url: String,
    policy: String,
    rule: &'static str,
    outcome: Option<&'static str>,
    reason: Option<String>,
    error: Option<String>,
    serves: Serves,
    last_pull_unix_ms: Option<u64>,
    last_processed_unix_ms: Option<u64>,
    next_retry_unix_ms: Option<u64>,
}

#[derive(Debug, Serialize)]
struct RefusedRow {
    plugin: String,
    field: String,
    error: String,
}

/// One page of `/debug/plugins`.
#[derive(Debug, Default)]
pub struct PluginsPage {
    plugins: Vec<PluginRow>,
    refused: Vec<RefusedRow>,
    file_errors: Vec<FileError>,
    /// How many file errors there are in all (a page lists at most `limit` of them).
    file_error_count: usize,
    /// The `fileErrors` position of the following file errors, if any.
    file_errors_next: Option<usize>,
    conflicts: Vec<Conflict>,
    /// How many conflicts there are in all (a page lists at most `limit` of them).
    conflict_count: usize,
    /// The `conflicts` position of the following conflicts, if any.
    conflicts_next: Option<usize>,
    next: Option<String>,
}

/// The plugins (processed or refused) of the page `query` asks for, in key order. File errors and
/// conflicts (at most `limit` of each, the others paged with `fileErrors` and `conflicts`) come
/// with the first page (with `plugin`, the plugin's conflicts only).
pub fn plugins_page(driver: &Driver, sources: &Sources, query: &PluginsQuery) -> PluginsPage {
    let mut page = plugins_only(driver, sources, query);
    page.file_error_count = sources.files.errors.len();
    page.conflict_count = sources.conflicts.len();
    page
}

fn plugins_only(driver: &Driver, sources: &Sources, query: &PluginsQuery) -> PluginsPage {
    if query.file_errors.is_some() || query.conflicts.is_some() {
        let mut page = PluginsPage::default();
        if let Some(from) = query.file_errors {
            page.add_file_errors(&sources.files.errors, from, query.limit);
        }
        if let Some(from) = query.conflicts {
            page.add_conflicts(sources, from, query.limit);
        }
        return page;
    }
    if let Some(sha) = &query.module {
        return module_users_page(driver, sha, query);
    }
    let engine = driver.engine();
    let (lower, upper) = match (&query.plugin, &query.after) {
        (Some(k), _) => (Bound::Included(k), Bound::Included(k)),
        (None, Some(a)) => (Bound::Excluded(a), Bound::Unbounded),
        (None, None) => (Bound::Unbounded, Bound::Unbounded),
    };
    let mut states = engine
        .plugins()
        .range::<ObjectKey, _>((lower, upper))
        .peekable();
    let mut refused = driver.refused_in((lower, upper)).peekable();
    let mut page = PluginsPage::default();
    let mut last: Option<&ObjectKey> = None;
    let mut taken = 0;
    loop {
        // The next key of either list; a plugin both processed and refused is one key.
        let key = match (states.peek(), refused.peek()) {
            (Some((s, _)), Some(r)) => (*s).min(*r),
            (Some((s, _)), None) => *s,
            (None, Some(r)) => *r,
            (None, None) => break,
        };
        if taken == query.limit {
            page.next = last.map(ToString::to_string);
            break;
        }
        taken += 1;
        last = Some(key);
        if states.peek().is_some_and(|(s, _)| *s == key) {
            let (k, st) = states.next().expect("peeked");
            page.plugins.push(plugin_row(k, st));
        }
        if refused.peek() == Some(&key) {
            let k = refused.next().expect("peeked");
            let (field, error) = driver
                .refusal(k)
                .map(|(_, e)| (e.field.clone(), e.message.clone()))
                .unwrap_or_default();
            page.refused.push(RefusedRow {
                plugin: k.to_string(),
                field,
                error,
            });
        }
    }
    match &query.plugin {
        Some(k) => {
            let k = k.to_string();
            page.conflicts = (sources.conflicts.values())
                .filter(|c| c.object == k)
                .cloned()
                .collect();
        }
        None if query.after.is_none() => {
            page.add_file_errors(&sources.files.errors, 0, query.limit);
            page.add_conflicts(sources, 0, query.limit);
        }
        None => {}
    }
    page
}

impl PluginsPage {
    /// At most `limit` of `errors` from position `from` on.
    fn add_file_errors(&mut self, errors: &[FileError], from: usize, limit: usize) {
        let end = errors.len().min(from.saturating_add(limit));
        self.file_errors = errors.get(from..end).unwrap_or_default().to_vec();
        self.file_errors_next = (end < errors.len()).then_some(end);
    }

    /// At most `limit` of the conflicts (in the order of the objects) from position `from` on.
    fn add_conflicts(&mut self, sources: &Sources, from: usize, limit: usize) {
        let all = &sources.conflicts;
        let end = all.len().min(from.saturating_add(limit));
        self.conflicts = (all.values().skip(from).take(limit).cloned()).collect();
        self.conflicts_next = (end < all.len()).then_some(end);
    }
}

/// `?module=<sha256>`: the plugins using a cached module with these bytes (under any name), in
/// key order, after `after`: a page of the `plugins` of those `/debug/cache` entries. The work is
/// the page's, whatever the number of users: each entry's users are an ordered set.
fn module_users_page(driver: &Driver, sha: &str, query: &PluginsQuery) -> PluginsPage {
    let engine = driver.engine();
    let lower = query
        .after
        .as_ref()
        .map_or(Bound::Unbounded, Bound::Excluded);
    // The first `limit + 1` users of each entry with these bytes, merged.
    let mut users = std::collections::BTreeSet::new();
    for (_, e) in engine.cache().entries().filter(|(_, e)| e.sha256 == sha) {
        let range = e.refs.range::<ObjectKey, _>((lower, Bound::Unbounded));
        users.extend(range.take(query.limit + 1));
    }
    let mut page = PluginsPage::default();
    let mut users = users.into_iter();
    for k in users.by_ref().take(query.limit) {
        if let Some(st) = engine.plugins().get(k) {
            page.plugins.push(plugin_row(k, st));
        }
        page.next = Some(k.to_string());
    }
    if users.next().is_none() {
        page.next = None;
    }
    page
}

fn plugin_row(k: &ObjectKey, st: &crate::engine::PluginState) -> PluginRow {
    let serves = match &st.serving {
        Serving::Module(m) => Serves::Module {
            sha256: m.sha256.clone(),
            checksum: m.key.as_ref().map(|k| k.checksum.clone()),
            path: m.path.clone(),
        },
        Serving::DenyAll => Serves::DenyAll,
        Serving::AllowAll => Serves::AllowAll,
        Serving::Nothing => Serves::Nothing,
    };
    PluginRow {
        plugin: k.to_string(),
        resource: st.plugin.resource_name(),
        envoy_filter: crate::plugin::envoyfilter::filter_of(k).map(|f| f.to_string()),
        resource_version: st.version.to_string(),
        processed_resource_version: st.processed_version.map(|v| v.to_string()),
        url: st.url.to_string(),
        policy: st.decision.policy.to_string(),
        rule: st.decision.rule.as_str(),
        outcome: st.last_outcome.as_ref().map(|o| o.name()),
        reason: st.last_outcome.as_ref().and_then(|o| o.reason()),
        error: st.last_error.clone(),
        serves,
        last_pull_unix_ms: st.last_pull.map(|t| t.as_millis()),
        last_processed_unix_ms: st.last_processed.map(|t| t.as_millis()),
        next_retry_unix_ms: st.retry.map(|t| t.as_millis()),
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct CacheRow {
    module: String,
    checksum: String,
    sha256: String,
    size: u64,
    path: std::path::PathBuf,
    last_used_unix_ms: u64,
    idle_ms: Option<u64>,
    /// The first [`ENTRY_PLUGINS`] plugins using the module.
    plugins: Vec<String>,
    /// How many plugins use it.
    plugin_count: usize,
    /// When `plugins` is not all of them: the last one listed, the `after` of
    /// `/debug/plugins?module=<sha256>` for the others.
    plugins_next: Option<String>,
}

/// One page of `/debug/cache`.
#[derive(Debug)]
pub struct CachePage {
    modules: Vec<CacheRow>,
    next: Option<String>,
}

/// The cache entries of the page `query` asks for, in (module, checksum) order.
pub fn cache_page(driver: &Driver, query: &CacheQuery) -> CachePage {
    let engine = driver.engine();
    let now = engine.now();
    let mut entries = engine.cache().entries().filter(|(k, _)| {
        query.module.as_ref().is_none_or(|m| k.name == *m)
            && query.after.as_ref().is_none_or(|a| *k > a)
    });
    let mut page = CachePage {
        modules: Vec::new(),
        next: None,
    };
    for (k, e) in entries.by_ref().take(query.limit) {
        let plugins: Vec<String> = (e.refs.iter().take(ENTRY_PLUGINS))
            .map(ToString::to_string)
            .collect();
        let plugins_next = (e.refs.len() > plugins.len()).then(|| plugins.last().cloned());
        page.modules.push(CacheRow {
            module: k.name.clone(),
            checksum: k.checksum.clone(),
            sha256: e.sha256.clone(),
            size: e.size,
            path: e.path.clone(),
            last_used_unix_ms: e.last_used.as_millis(),
            idle_ms: (e.refs.is_empty()).then(|| now.since(e.last_used).as_millis() as u64),
            plugins,
            plugin_count: e.refs.len(),
            plugins_next: plugins_next.flatten(),
        });
    }
    if entries.next().is_some() {
        page.next = page
            .modules
            .last()
            .map(|r| format!("{}@{}", r.module, r.checksum));
    }
    page
}

type Chunks = Box<dyn Iterator<Item = Vec<u8>> + Send>;

/// `"name": [` then one entry per line, each serialized when the body is read.
fn array<T: Serialize + Send + 'static>(name: &'static str, rows: Vec<T>) -> Chunks {
    let head = std::iter::once(format!("\"{name}\": [").into_bytes());
    let items = rows.into_iter().enumerate().map(|(i, row)| {
        let mut out = if i == 0 {
            b"\n".to_vec()
        } else {
            b",\n".to_vec()
        };
        serde_json::to_writer(&mut out, &row).expect("serializable");
        out
    });
    Box::new(head.chain(items).chain(std::iter::once(b"\n]".to_vec())))
}

fn scalar(name: &'static str, value: &impl Serialize) -> Chunks {
    let text = serde_json::to_string(value).expect("serializable");
    Box::new(std::iter::once(format!("\"{name}\": {text}").into_bytes()))
}

/// A JSON object of `fields`, written field by field and entry by entry as the connection reads
/// it, in pieces of about [`CHUNK`] bytes.
fn json_body(
    fields: Vec<Chunks>,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, io::Error>> + Send + 'static {
    let n = fields.len();
    let parts = fields.into_iter().enumerate().flat_map(move |(i, f)| {
        let open: &[u8] = if i == 0 { b"{" } else { b",\n" };
        let close: &[u8] = if i + 1 == n { b"}\n" } else { b"" };
        std::iter::once(open.to_vec())
            .chain(f)
            .chain(std::iter::once(close.to_vec()))
    });
    let mut parts = parts.peekable();
    let chunks = std::iter::from_fn(move || {
        let mut buf = parts.next()?;
        while buf.len() < CHUNK {
            match parts.next() {
                Some(p) => buf.extend_from_slice(&p),
                None => break,
            }
        }
        Some(Ok(Frame::data(Bytes::from(buf))))
    });
    futures_util::stream::iter(chunks)
}

impl PluginsPage {
    pub fn into_body(
        self,
    ) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, io::Error>> + Send + 'static {
        json_body(vec![
            array("plugins", self.plugins),
            array("refused", self.refused),
            array("fileErrors", self.file_errors),
            scalar("fileErrorCount", &self.file_error_count),
            scalar("fileErrorsNext", &self.file_errors_next),
            array("conflicts", self.conflicts),
            scalar("conflictCount", &self.conflict_count),
            scalar("conflictsNext", &self.conflicts_next),
            scalar("next", &self.next),
        ])
    }
}

impl CachePage {
    pub fn into_body(
        self,
    ) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, io::Error>> + Send + 'static {
        json_body(vec![
            array("modules", self.modules),
            scalar("next", &self.next),
        ])
    }
}

#[cfg(test)]
mod tests;
