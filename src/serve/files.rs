//! The file source of `serve --plugins`: reads manifest files and directories into the desired set
//! of objects. A file that cannot be read or parsed is reported and its last good content is kept,
//! so one bad file never disturbs what is served (cli.md).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::mpsc;

use super::Command;
use crate::plugin::{self, ObjectKey};

/// A problem with one file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FileError {
    pub file: String,
    pub message: String,
}

/// The objects the files currently describe.
#[derive(Clone, Debug, Default)]
pub struct Desired {
    /// WasmPlugins, EnvoyFilters and secrets by key, as decoded JSON.
    pub plugins: BTreeMap<ObjectKey, Value>,
    pub envoy_filters: BTreeMap<ObjectKey, Value>,
    pub secrets: BTreeMap<ObjectKey, Value>,
    pub errors: Vec<FileError>,
    /// Every directory read (to be watched).
    pub dirs: Vec<PathBuf>,
}

/// Remembers each file's last good content: its objects with their document index.
#[derive(Debug, Default)]
pub struct FileSource {
    roots: Vec<PathBuf>,
    last_good: BTreeMap<PathBuf, Vec<(usize, Value)>>,
}

impl FileSource {
    pub fn new(roots: Vec<PathBuf>) -> Self {
        FileSource {
            roots,
            last_good: BTreeMap::new(),
        }
    }

    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// Re-reads every file under the roots.
    pub fn scan(&mut self) -> Desired {
        let mut desired = Desired::default();
        let found = crate::cli::expand_paths(&self.roots, &["yaml", "yml", "json"]);
        for (path, message) in &found.errors {
            desired.errors.push(file_error(path, message.clone()));
        }
        desired.dirs = found.dirs;
        let mut files = found.files;
        files.sort();
        files.dedup();
        let mut seen = BTreeMap::new();
        for file in files {
            let objects = match read_objects(&file) {
                Ok(objs) => {
                    self.last_good.insert(file.clone(), objs.clone());
                    objs
                }
                Err(message) => {
                    desired.errors.push(file_error(&file, message));
                    self.last_good.get(&file).cloned().unwrap_or_default()
                }
            };
            seen.insert(file, objects);
        }
        // Files that disappeared lose their objects; those under a directory that could not be
        // read may still be there, and keep their last good content.
        self.last_good.retain(|f, _| {
            seen.contains_key(f) || found.unreadable.iter().any(|d| f.starts_with(d))
        });
        for (f, objects) in &self.last_good {
            if !seen.contains_key(f) {
                seen.insert(f.clone(), objects.clone());
            }
        }
        let mut definitions = Definitions::default();
        for (file, objects) in seen {
            for (document, v) in objects {
                let (kind, key) = kind_and_key(&v);
                if let Some(message) = definitions.add(kind, &key, &file, document) {
                    desired.errors.push(file_error(&file, message));
                    continue;
                }
                match kind {
                    "Secret" => desired.secrets.insert(key, v),
                    plugin::envoyfilter::ENVOY_FILTER_KIND => desired.envoy_filters.insert(key, v),
                    _ => desired.plugins.insert(key, v),
                };
            }
        }
        desired
    }
}

/// A file error, logged. Scans happen at start-up and on changes only, so the log stays bounded.
fn file_error(file: &Path, message: String) -> FileError {
    tracing::warn!(file = %file.display(), error = %message, "bad manifest file");
    FileError {
        file: file.display().to_string(),
        message,
    }
}

/// The kind an object is filed under (`WasmPlugin`, `EnvoyFilter` or `Secret`) and its key.
fn kind_and_key(v: &Value) -> (&'static str, ObjectKey) {
    let kind = match v.get("kind").and_then(Value::as_str) {
        Some("Secret") => "Secret",
        Some(plugin::envoyfilter::ENVOY_FILTER_KIND) => plugin::envoyfilter::ENVOY_FILTER_KIND,
        _ => "WasmPlugin",
    };
    let meta = v.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    let ns = meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .unwrap_or(plugin::DEFAULT_NAMESPACE);
    (kind, ObjectKey::new(ns, name))
}

/// The first definition of each object, in file order (sorted paths) then document order: a
/// later definition of the same kind and key is not used, and says where the first one is.
#[derive(Debug, Default)]
pub struct Definitions {
    first: BTreeMap<(&'static str, ObjectKey), (PathBuf, usize)>,
}

impl Definitions {
    /// Notes a definition (`document` counts from 0); `Some(message)` when it is not the first.
    pub fn add(
        &mut self,
        kind: &'static str,
        key: &ObjectKey,
        file: &Path,
        document: usize,
    ) -> Option<String> {
        match self.first.get(&(kind, key.clone())) {
            Some((first, first_doc)) => Some(format!(
                "document {}: {kind} {key} is already defined by {} (document {}), which is used; \
                 this definition is ignored",
                document + 1,
                first.display(),
                first_doc + 1
            )),
            None => {
                self.first
                    .insert((kind, key.clone()), (file.to_path_buf(), document));
                None
            }
        }
    }

    /// [`add`](Self::add) for a parsed manifest.
    pub fn add_manifest(
        &mut self,
        manifest: &plugin::Manifest,
        file: &Path,
        document: usize,
    ) -> Option<String> {
        let kind = match manifest {
            plugin::Manifest::Plugin(_) => "WasmPlugin",
            plugin::Manifest::Secret(_) => "Secret",
            plugin::Manifest::EnvoyFilter(_) => plugin::envoyfilter::ENVOY_FILTER_KIND,
        };
        self.add(kind, manifest.key(), file, document)
    }
}

/// The watcher of the plugin files: it watches the directory of each file given as a path (so
/// replacements by rename are seen); the directories under a directory path are watched by the
/// controller as scans find them ([`Watcher::update`]), each on its own, so that one that cannot
/// be watched (or a symbolic link loop) leaves the others watched.
pub(super) fn spawn_watcher(
    paths: &[PathBuf],
    tx: mpsc::Sender<Command>,
) -> anyhow::Result<Option<Watcher>> {
    use notify::Watcher as _;
    if paths.is_empty() {
        return Ok(None);
    }
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        // Access events (open, close) say nothing changed, and the rescan's own reads raise them:
        // reacting to them rescanned every debounce period forever after the first change.
        if let Ok(ev) = &res {
            if !matches!(ev.kind, notify::EventKind::Access(_)) {
                tracing::trace!(kind = ?ev.kind, paths = ?ev.paths, "plugin files changed");
                let _ = tx.try_send(Command::Reload);
            }
        }
    })?;
    for p in paths.iter().filter(|p| !p.is_dir()) {
        let target = p
            .parent()
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."));
        watcher
            .watch(&target, notify::RecursiveMode::NonRecursive)
            .with_context(|| format!("cannot watch {}", target.display()))?;
    }
    Ok(Some(Watcher {
        inner: watcher,
        dirs: BTreeSet::new(),
    }))
}

/// The file watcher and the directories it watches.
pub(super) struct Watcher {
    inner: notify::RecommendedWatcher,
    dirs: BTreeSet<PathBuf>,
}

impl Watcher {
    /// Watches exactly `dirs` (the directories the last scan read); true when one was not
    /// watched before. A directory that cannot be watched is a warning, once.
    pub(super) fn update(&mut self, dirs: &[PathBuf]) -> bool {
        use notify::Watcher as _;
        let wanted: BTreeSet<&PathBuf> = dirs.iter().collect();
        for gone in (self.dirs.iter()).filter(|d| !wanted.contains(d)) {
            let _ = self.inner.unwatch(gone);
        }
        self.dirs.retain(|d| wanted.contains(d));
        let mut added = false;
        for dir in wanted {
            if self.dirs.insert(dir.clone()) {
                added = true;
                if let Err(e) = self.inner.watch(dir, notify::RecursiveMode::NonRecursive) {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot watch plugin directory");
                }
            }
        }
        added
    }
}

/// Reads a file's documents. Structural errors (unreadable file, not a regular file, too large,
/// malformed YAML, a document that is neither a WasmPlugin, an EnvoyFilter nor a Secret) make the
/// whole file bad; validation problems of a plugin or an EnvoyFilter are left to admission, which
/// refuses that object (or that patch) alone.
fn read_objects(file: &Path) -> Result<Vec<(usize, Value)>, String> {
    let text = crate::cli::read_manifest(file, crate::cli::MAX_MANIFEST_BYTES)?;
    let mut out = Vec::new();
    for doc in plugin::documents(&text) {
        let (i, v) = doc.map_err(|e| format!("document {}: {}", e.document + 1, e.message))?;
        match plugin::parse_object(i, v.clone()) {
            Ok(_) => out.push((i, v)),
            Err(e)
                if e.object.is_some()
                    && matches!(
                        v.get("kind").and_then(Value::as_str),
                        Some("WasmPlugin" | plugin::envoyfilter::ENVOY_FILTER_KIND)
                    ) =>
            {
                out.push((i, v))
            }
            Err(e) => return Err(format!("document {}: {e}", i + 1)),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLUGIN: &str = "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: a}\nspec: {url: 'r/a:v1'}\n";

    #[test]
    fn a_list_document_is_read_as_its_items() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("list.yaml");
        let list = format!(
            "apiVersion: v1\nkind: List\nitems:\n- {}\n- {}\n",
            "{apiVersion: extensions.istio.io/v1alpha1, kind: WasmPlugin, metadata: {name: a}, spec: {url: 'r/a:v1'}}",
            "{apiVersion: extensions.istio.io/v1alpha1, kind: WasmPlugin, metadata: {name: b}, spec: {url: 'r/b:v1'}}",
        );
        std::fs::write(&f, list).unwrap();
        let d = FileSource::new(vec![dir.path().to_path_buf()]).scan();
        assert!(d.errors.is_empty(), "{:?}", d.errors);
        let names: Vec<String> = d.plugins.keys().map(|k| k.to_string()).collect();
        assert_eq!(names, ["default/a", "default/b"]);
    }

    #[test]
    fn envoy_filters_are_a_kind_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let ef = "apiVersion: networking.istio.io/v1alpha3\nkind: EnvoyFilter\nmetadata: {name: a}\nspec: {configPatches: []}\n";
        // The same name as the WasmPlugin; and one refused at admission, still read.
        let bad = "apiVersion: networking.istio.io/v1alpha3\nkind: EnvoyFilter\nmetadata: {name: b}\nspec: {configPatches: 1}\n";
        std::fs::write(
            dir.path().join("a.yaml"),
            format!("{PLUGIN}---\n{ef}---\n{bad}"),
        )
        .unwrap();
        let d = FileSource::new(vec![dir.path().to_path_buf()]).scan();
        assert!(d.errors.is_empty(), "{:?}", d.errors);
        assert_eq!(d.plugins.len(), 1);
        let names: Vec<String> = d.envoy_filters.keys().map(|k| k.to_string()).collect();
        assert_eq!(names, ["default/a", "default/b"]);
    }

    fn plugin(name: &str, url: &str) -> String {
        format!("apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: {name}}}\nspec: {{url: '{url}'}}\n")
    }

    fn error_of<'a>(d: &'a Desired, file: &Path) -> &'a str {
        let f = file.display().to_string();
        match d.errors.iter().find(|e| e.file == f) {
            Some(e) => &e.message,
            None => panic!("no error for {f}: {:?}", d.errors),
        }
    }

    fn names(d: &Desired) -> Vec<String> {
        d.plugins.keys().map(|k| k.to_string()).collect()
    }

    #[test]
    fn symbolic_link_loops_are_errors_and_the_rest_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("a.yaml"), plugin("a", "r/a:v1")).unwrap();
        std::fs::create_dir(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/b.yaml"), plugin("b", "r/b:v1")).unwrap();
        std::os::unix::fs::symlink(root, root.join("l1")).unwrap();
        std::os::unix::fs::symlink(root, root.join("sub/l2")).unwrap();
        // Not a loop: a second way to a directory already read adds nothing.
        std::os::unix::fs::symlink(root.join("sub"), root.join("again")).unwrap();
        let d = FileSource::new(vec![root.to_path_buf()]).scan();
        assert_eq!(names(&d), ["default/a", "default/b"]);
        assert_eq!(d.errors.len(), 2, "{:?}", d.errors);
        for link in [root.join("l1"), root.join("sub/l2")] {
            assert!(
                error_of(&d, &link).starts_with("symbolic link loop"),
                "{:?}",
                d.errors
            );
        }
        assert_eq!(d.dirs, [root.to_path_buf(), root.join("sub")]);
    }

    #[test]
    fn a_kubernetes_volume_is_read_once_under_the_names_it_shows() {
        // A ConfigMap volume: files are links through `..data` to a timestamped directory.
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("..2025_01_01_00_00_00.1")).unwrap();
        std::fs::write(root.join("..2025_01_01_00_00_00.1/a.yaml"), PLUGIN).unwrap();
        std::os::unix::fs::symlink("..2025_01_01_00_00_00.1", root.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/a.yaml", root.join("a.yaml")).unwrap();
        let mut src = FileSource::new(vec![root.to_path_buf()]);
        let d = src.scan();
        assert!(d.errors.is_empty(), "{:?}", d.errors);
        assert_eq!(names(&d), ["default/a"]);
        // A bad update keeps the content under the stable name.
        std::fs::write(root.join("..2025_01_01_00_00_00.1/a.yaml"), "kind: [").unwrap();
        let d = src.scan();
        assert_eq!(names(&d), ["default/a"]);
        assert!(error_of(&d, &root.join("a.yaml")).starts_with("document 1: malformed yaml"));
    }

    #[test]
    fn only_regular_files_within_the_size_limit_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("a.yaml"), PLUGIN).unwrap();
        let fifo = root.join("x.yaml");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        std::os::unix::fs::symlink("/dev/zero", root.join("z.yaml")).unwrap();
        let big = root.join("big.yaml");
        let f = std::fs::File::create(&big).unwrap();
        f.set_len(crate::cli::MAX_MANIFEST_BYTES + 1).unwrap();
        let d = FileSource::new(vec![root.to_path_buf()]).scan();
        assert_eq!(names(&d), ["default/a"]);
        assert_eq!(
            error_of(&d, &fifo),
            "not a regular file (a FIFO): only regular files are read"
        );
        assert!(error_of(&d, &root.join("z.yaml"))
            .starts_with("not a regular file (a character device)"));
        assert_eq!(
            error_of(&d, &big),
            "4194305 bytes, more than the 4194304-byte limit of a manifest file"
        );
        assert_eq!(d.errors.len(), 3, "{:?}", d.errors);
    }

    #[test]
    fn a_directory_that_cannot_be_read_keeps_what_was_read_under_it() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("a.yaml"), plugin("a", "r/a:v1")).unwrap();
        std::fs::create_dir(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/b.yaml"), plugin("b", "r/b:v1")).unwrap();
        let mut src = FileSource::new(vec![root.to_path_buf()]);
        assert_eq!(names(&src.scan()), ["default/a", "default/b"]);
        // Make `sub` impossible to look into, even for root: a link to itself (ELOOP). The
        // EACCES case runs as an unprivileged user in tests/hostile_files.rs.
        let elsewhere = tempfile::tempdir().unwrap();
        std::fs::rename(root.join("sub"), elsewhere.path().join("sub")).unwrap();
        std::os::unix::fs::symlink("sub", root.join("sub")).unwrap();
        std::fs::write(root.join("c.yaml"), plugin("c", "r/c:v1")).unwrap();
        let d = src.scan();
        assert!(
            error_of(&d, &root.join("sub")).starts_with("cannot read: "),
            "{:?}",
            d.errors
        );
        assert_eq!(d.errors.len(), 1, "{:?}", d.errors);
        // b is kept from before (it may still be there), c is new.
        assert_eq!(names(&d), ["default/a", "default/b", "default/c"]);
        assert_eq!(
            d.plugins[&ObjectKey::new("default", "b")]["spec"]["url"],
            "r/b:v1"
        );
    }

    #[test]
    fn an_alias_bomb_is_an_error_of_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("a.yaml"), PLUGIN).unwrap();
        let list = vec!["1"; 100_000].join(",");
        let bomb = format!(
            "{PLUGIN}---\na: &a [{list}]\nb: [{}]\n",
            vec!["*a"; 50].join(",")
        );
        std::fs::write(root.join("bomb.yaml"), bomb).unwrap();
        let d = FileSource::new(vec![root.to_path_buf()]).scan();
        assert_eq!(names(&d), ["default/a"]);
        assert_eq!(
            error_of(&d, &root.join("bomb.yaml")),
            format!("document 2: {}", plugin::decode::Budget::message())
        );
    }

    #[test]
    fn a_second_definition_is_an_error_and_the_first_is_served() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let ef = "apiVersion: networking.istio.io/v1alpha3\nkind: EnvoyFilter\nmetadata: {name: a}\nspec: {configPatches: []}\n";
        let secret = "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\ntype: kubernetes.io/dockerconfigjson\ndata: {.dockerconfigjson: e30=}\n";
        std::fs::write(
            root.join("1.yaml"),
            format!("{}---\n{ef}---\n{secret}", plugin("a", "r/a:v1")),
        )
        .unwrap();
        std::fs::write(
            root.join("2.yaml"),
            format!(
                "{}---\n{}---\n{ef}---\n{secret}",
                plugin("b", "r/b:v1"),
                plugin("a", "r/a:v2")
            ),
        )
        .unwrap();
        std::fs::write(
            root.join("3.yaml"),
            format!("{}---\n{}", plugin("c", "r/c:v1"), plugin("c", "r/c:v2")),
        )
        .unwrap();
        let d = FileSource::new(vec![root.to_path_buf()]).scan();
        assert_eq!(names(&d), ["default/a", "default/b", "default/c"]);
        assert_eq!(
            d.plugins[&ObjectKey::new("default", "a")]["spec"]["url"],
            "r/a:v1"
        );
        assert_eq!(
            d.plugins[&ObjectKey::new("default", "c")]["spec"]["url"],
            "r/c:v1"
        );
        assert_eq!(d.envoy_filters.len(), 1);
        assert_eq!(d.secrets.len(), 1);
        let first = root.join("1.yaml").display().to_string();
        let messages: Vec<(String, String)> = (d.errors.iter())
            .map(|e| (e.file.clone(), e.message.clone()))
            .collect();
        let two = root.join("2.yaml").display().to_string();
        let three = root.join("3.yaml").display().to_string();
        assert_eq!(
            messages,
            [
                (two.clone(), format!("document 2: WasmPlugin default/a is already defined by {first} (document 1), which is used; this definition is ignored")),
                (two.clone(), format!("document 3: EnvoyFilter default/a is already defined by {first} (document 2), which is used; this definition is ignored")),
                (two, format!("document 4: Secret default/s is already defined by {first} (document 3), which is used; this definition is ignored")),
                (three.clone(), format!("document 2: WasmPlugin default/c is already defined by {three} (document 1), which is used; this definition is ignored")),
            ]
        );
    }

    #[test]
    fn bad_file_keeps_last_good_content() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.yaml");
        std::fs::write(&f, PLUGIN).unwrap();
        let mut src = FileSource::new(vec![dir.path().to_path_buf()]);
        let d = src.scan();
        assert_eq!(d.plugins.len(), 1);
        assert!(d.errors.is_empty());
        std::fs::write(&f, "kind: [").unwrap();
        let d = src.scan();
        assert_eq!(d.plugins.len(), 1, "last good content kept");
        assert_eq!(d.errors.len(), 1);
        std::fs::remove_file(&f).unwrap();
        assert!(src.scan().plugins.is_empty());
    }
}
