//! The file source of `serve --plugins`: reads manifest files and directories into the desired set
//! of objects. A file that cannot be read or parsed is reported and its last good content is kept,
//! so one bad file never disturbs what is served (cli.md).
//!
//! (A little over 600 lines: the walk, the reads and the bookkeeping of who defines what share
//! the one `FileSource` state; its tests are in `tests.rs`.)

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;

use crate::cli::FileId;
use crate::plugin::{self, Object, ObjectKey};

mod watch;
pub use watch::MAX_PENDING_PATHS;
pub(super) use watch::{spawn_watcher, Watcher};

/// A problem with one file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FileError {
    pub file: String,
    pub message: String,
}

/// The objects the files currently describe.
#[derive(Clone, Debug, Default)]
pub struct Desired {
    /// WasmPlugins, EnvoyFilters and secrets by key, as JSON text (shared with the file
    /// source's last good content and, once admitted, the object store).
    pub plugins: BTreeMap<ObjectKey, Object>,
    pub envoy_filters: BTreeMap<ObjectKey, Object>,
    pub secrets: BTreeMap<ObjectKey, Object>,
    pub errors: Vec<FileError>,
    /// Every directory read (to be watched).
    pub dirs: Vec<PathBuf>,
}

/// The files of the plugin roots and what they define, kept up to date file by file: an edit
/// re-reads and re-parses the files it touched only (work per change independent of the number of
/// files), and a full rescan ([`FileSource::rescan`]) remains for when the watcher cannot say what
/// changed. Each file's last good content is kept: a file that cannot be read or parsed keeps
/// defining what it defined.
#[derive(Debug)]
pub struct FileSource {
    roots: Vec<PathBuf>,
    /// Where relative roots are, for the watcher's absolute paths.
    cwd: PathBuf,
    /// The files of the last walk, by name, and their identity (none for a dangling link or a
    /// missing file: reading it says what is wrong). A name is one [`FileName`] shared by every
    /// map here that holds it.
    found: BTreeMap<FileName, Option<FileId>>,
    /// The absolute form of each name of `found` (the very name when it is absolute already).
    names: HashMap<FileName, FileName>,
    /// The name of each identity of `found`.
    by_id: HashMap<FileId, FileName>,
    /// The directories the last walk read, in walk order, and by absolute path.
    dirs: Vec<PathBuf>,
    abs_dirs: HashMap<PathBuf, PathBuf>,
    /// The last walk's problems (directories that cannot be read, link loops) and the
    /// directories it could not (fully) read.
    walk_errors: Vec<FileError>,
    unreadable: Vec<PathBuf>,
    /// Each file's last good content: its objects with their document index.
    last_good: BTreeMap<FileName, Vec<(usize, Object)>>,
    read_errors: BTreeMap<PathBuf, FileError>,
    /// Who defines each object, in order (sorted; almost always one definition, so a vector,
    /// not a set with its node of eleven); the first wins.
    definers: BTreeMap<ObjectId, Vec<Definition>>,
    /// The ignored later definitions of each object that has some, with their error.
    duplicates: BTreeMap<ObjectId, Vec<(Definition, FileError)>>,
    /// The walk's directories or an error (of the walk, a read or a duplicate) changed since
    /// `Desired::errors` and `dirs` were last written: an edit that changes neither costs no
    /// work per error or directory.
    lists_stale: bool,
    files_read: u64,
}

/// An object: its kind (`WasmPlugin`, `EnvoyFilter`, `Secret`) and key.
pub type ObjectId = (&'static str, ObjectKey);

/// The objects whose definition changed.
pub type ChangedKeys = BTreeSet<ObjectId>;

/// A definition of an object: its file and its position among the file's objects.
type Definition = (FileName, usize);

/// The name of a file of the walk, shared by every map that holds it (at 50,000 files a copy per
/// map costs more than what the file defines).
type FileName = Arc<Path>;

/// What the watcher saw since it was last asked: the paths it reported, or that it could not
/// tell (an overflow of the kernel's queue, a watch error): then everything is read again.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FileChanges {
    pub paths: BTreeSet<PathBuf>,
    pub rescan: bool,
}

impl FileSource {
    pub fn new(roots: Vec<PathBuf>) -> Self {
        FileSource {
            roots,
            cwd: std::env::current_dir().unwrap_or_default(),
            found: BTreeMap::new(),
            names: HashMap::new(),
            by_id: HashMap::new(),
            dirs: Vec::new(),
            abs_dirs: HashMap::new(),
            walk_errors: Vec::new(),
            unreadable: Vec::new(),
            last_good: BTreeMap::new(),
            read_errors: BTreeMap::new(),
            definers: BTreeMap::new(),
            duplicates: BTreeMap::new(),
            lists_stale: true,
            files_read: 0,
        }
    }

    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// How many times a file was read (and parsed), all in all.
    pub fn files_read(&self) -> u64 {
        self.files_read
    }

    /// Re-reads every file under the roots; what they define now.
    pub fn scan(&mut self) -> Desired {
        let mut desired = Desired::default();
        self.rescan(&mut desired);
        desired
    }

    /// Re-reads every file under the roots into `desired` (what this source made it so far);
    /// returns the objects whose definition changed.
    pub fn rescan(&mut self, desired: &mut Desired) -> ChangedKeys {
        let mut affected: ChangedKeys = self.definers.keys().cloned().collect();
        // `desired` may be a fresh one: every list is written.
        self.lists_stale = true;
        let gone = self.walk();
        let files: Vec<FileName> = self.found.keys().cloned().collect();
        for file in &files {
            self.read(file, &mut affected);
        }
        self.drop_files(gone, &mut affected);
        // Everything, so that a fresh `desired` is complete.
        affected.extend(self.definers.keys().cloned());
        self.write(desired, affected)
    }

    /// Applies what the watcher saw to `desired` (what this source made it so far): re-reads the
    /// files reported changed; walks the roots again when the reported paths may change which files
    /// there are (a file created or removed, a directory or link changed, as a ConfigMap volume's
    /// `..data` swap does), then re-reads the files that are new or now another file.
    /// `fresh_dirs` are directories that were not watched before: everything under them is read.
    /// Returns the objects whose definition changed.
    pub fn update(
        &mut self,
        desired: &mut Desired,
        changes: &FileChanges,
        fresh_dirs: &[PathBuf],
    ) -> ChangedKeys {
        if changes.rescan {
            return self.rescan(desired);
        }
        let mut reread = BTreeSet::new();
        let mut structural = !fresh_dirs.is_empty();
        for path in &changes.paths {
            match self.classify(path) {
                Seen::Reread(name) => {
                    reread.insert(name);
                }
                Seen::Structural => structural = true,
                Seen::Alias(name) => {
                    reread.insert(name);
                    structural = true;
                }
                Seen::Nothing => {}
            }
        }
        let mut affected = ChangedKeys::new();
        if structural {
            let before = self.found.clone();
            let gone = self.walk();
            for (name, id) in &self.found {
                let fresh = fresh_dirs.iter().any(|d| name.starts_with(d));
                if fresh || before.get(name) != Some(id) {
                    reread.insert(name.clone());
                }
            }
            self.drop_files(gone, &mut affected);
        }
        for name in &reread {
            if self.found.contains_key(name) {
                self.read(name, &mut affected);
            }
        }
        tracing::debug!(
            read = reread.len(),
            walked = structural,
            objects = affected.len(),
            "plugin files updated"
        );
        self.write(desired, affected)
    }

    /// What a path the watcher reported means.
    fn classify(&mut self, path: &Path) -> Seen {
        let abs = self.absolute(path);
        let wanted = has_manifest_extension(&abs);
        if let Some(name) = self.names.get(abs.as_path()).cloned() {
            return match std::fs::metadata(&abs) {
                Ok(md) if md.is_dir() => Seen::Structural,
                Ok(md) => {
                    let id = FileId::of(&md);
                    let known = self.found.get(&name).copied().flatten();
                    if known == Some(id) {
                        Seen::Reread(name)
                    } else if self.by_id.contains_key(&id) {
                        // Now a second name of another file: which name is kept is the walk's.
                        Seen::Structural
                    } else {
                        if let Some(old) = known {
                            self.by_id.remove(&old);
                        }
                        self.by_id.insert(id, name.clone());
                        self.found.insert(name.clone(), Some(id));
                        Seen::Reread(name)
                    }
                }
                // Gone (another name of it may be found now) or unreadable: the walk says.
                Err(_) => Seen::Structural,
            };
        }
        if self.abs_dirs.contains_key(&abs) {
            return Seen::Structural;
        }
        match std::fs::metadata(&abs) {
            Ok(md) if md.is_dir() => Seen::Structural,
            Ok(md) if wanted => {
                let in_read_dir = abs.parent().is_some_and(|p| self.abs_dirs.contains_key(p));
                if !in_read_dir {
                    // Beside a file given by name, or under a directory not read.
                    return Seen::Nothing;
                }
                let id = FileId::of(&md);
                if let Some(name) = self.by_id.get(&id) {
                    // Another name of a file of ours (`..2025_…/a.yaml` behind `a.yaml`): edited
                    // through it, or a new link to it.
                    return Seen::Alias(name.clone());
                }
                // A new file: its name as the walk would give it (the directory's name joined).
                let name = self.name_of(&abs);
                self.by_id.insert(id, name.clone());
                let abs = match *name == *abs {
                    true => name.clone(),
                    false => abs.into(),
                };
                self.names.insert(abs, name.clone());
                self.found.insert(name.clone(), Some(id));
                Seen::Reread(name)
            }
            Ok(_) => Seen::Nothing,
            // A manifest name gone that was not a file of ours: another name of one (a link now
            // dangling, say). Other names gone (editors' temporary files) change nothing.
            Err(_) if wanted => Seen::Structural,
            Err(_) => Seen::Nothing,
        }
    }

    fn absolute(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.cwd.join(path)
        }
    }

    /// The name of a file in a directory that was read, as the walk names it.
    fn name_of(&self, abs: &Path) -> FileName {
        let dir = abs.parent().and_then(|p| self.abs_dirs.get(p));
        match (dir, abs.file_name()) {
            (Some(d), Some(f)) => d.join(f).into(),
            _ => abs.into(),
        }
    }

    /// Walks the roots again: which files and directories there are. Returns the files of the
    /// previous walk that are no longer found and may not be kept (not under a directory that
    /// could not be read, where they may still be).
    fn walk(&mut self) -> Vec<FileName> {
        let found = crate::cli::expand_paths(&self.roots, &["yaml", "yml", "json"]);
        let errors: Vec<FileError> = (found.errors.iter())
            .map(|(path, message)| FileError {
                file: path.display().to_string(),
                message: message.clone(),
            })
            .collect();
        for e in errors.iter().filter(|e| !self.walk_errors.contains(e)) {
            log_file_error(e);
        }
        self.walk_errors = errors;
        self.lists_stale = true;
        self.unreadable = found.unreadable;
        self.abs_dirs = (found.dirs.iter())
            .map(|d| (self.absolute(d), d.clone()))
            .collect();
        self.dirs = found.dirs;
        let mut files: BTreeMap<FileName, Option<FileId>> = BTreeMap::new();
        for f in found.files {
            let id = found.ids.get(&f).copied();
            // A file still found keeps the name the other maps hold.
            let name = match self.found.get_key_value(f.as_path()) {
                Some((name, _)) => name.clone(),
                None => f.into(),
            };
            files.entry(name).or_insert(id);
        }
        let previous = std::mem::replace(&mut self.found, files);
        self.names = (self.found.keys())
            .map(|f| {
                let abs = match f.is_absolute() {
                    true => f.clone(),
                    false => self.absolute(f).into(),
                };
                (abs, f.clone())
            })
            .collect();
        self.by_id = (self.found.iter())
            .filter_map(|(f, id)| id.map(|id| (id, f.clone())))
            .collect();
        let kept = |f: &FileName| self.unreadable.iter().any(|d| f.starts_with(d));
        let mut gone: Vec<FileName> = (previous.into_keys())
            .filter(|f| !self.found.contains_key(f) && !kept(f))
            .collect();
        // Files kept from before a directory became unreadable, and no longer under one.
        gone.extend(
            (self.last_good.keys())
                .filter(|f| !self.found.contains_key(*f) && !kept(f))
                .cloned(),
        );
        gone.sort();
        gone.dedup();
        // Errors of files no longer read (kept from under a directory that cannot be read).
        let found = &self.found;
        self.read_errors
            .retain(|f, _| found.contains_key(f.as_path()));
        gone
    }

    /// Reads one file: its objects replace its last good ones, or its error is recorded.
    fn read(&mut self, file: &FileName, affected: &mut ChangedKeys) {
        self.files_read += 1;
        match read_objects(file) {
            Ok(objects) => {
                self.lists_stale |= self.read_errors.remove(&**file).is_some();
                if self.last_good.get(file) != Some(&objects) {
                    let old = self.last_good.insert(file.clone(), objects);
                    self.redefine(file, old, affected);
                }
            }
            Err(message) => {
                let error = FileError {
                    file: file.display().to_string(),
                    message,
                };
                if self.read_errors.get(&**file) != Some(&error) {
                    log_file_error(&error);
                    self.read_errors.insert(file.to_path_buf(), error);
                    self.lists_stale = true;
                }
            }
        }
    }

    /// Files that are gone: what they defined goes.
    fn drop_files(&mut self, gone: Vec<FileName>, affected: &mut ChangedKeys) {
        for file in gone {
            self.lists_stale |= self.read_errors.remove(&*file).is_some();
            let old = self.last_good.remove(&file);
            self.redefine(&file, old, affected);
        }
    }

    /// Moves the definitions of `file` from its `old` objects to its current ones.
    fn redefine(
        &mut self,
        file: &FileName,
        old: Option<Vec<(usize, Object)>>,
        affected: &mut ChangedKeys,
    ) {
        for (i, (_, v)) in old.iter().flatten().enumerate() {
            let id = kind_and_key(v);
            if let Some(set) = self.definers.get_mut(&id) {
                set.retain(|d| d.0 != *file || d.1 != i);
                if set.is_empty() {
                    self.definers.remove(&id);
                }
            }
            affected.insert(id);
        }
        for (i, (_, v)) in self.last_good.get(file).into_iter().flatten().enumerate() {
            let id = kind_and_key(v);
            let set = (self.definers.entry(id.clone())).or_insert_with(|| Vec::with_capacity(1));
            let d = (file.clone(), i);
            if let Err(at) = set.binary_search(&d) {
                set.insert(at, d);
            }
            affected.insert(id);
        }
    }

    /// The document index and object of a definition.
    fn definition(&self, (file, i): &Definition) -> Option<&(usize, Object)> {
        self.last_good.get(file)?.get(*i)
    }

    /// Makes `desired` say what the files define now for the `affected` objects, and lists the
    /// errors; returns the objects whose definition changed.
    fn write(&mut self, desired: &mut Desired, affected: ChangedKeys) -> ChangedKeys {
        let mut changed = ChangedKeys::new();
        for id in affected {
            let (kind, key) = &id;
            let definers: Vec<Definition> = (self.definers.get(&id).into_iter())
                .flatten()
                .cloned()
                .collect();
            let mut duplicates = Vec::new();
            if let Some((first, rest)) = definers.split_first() {
                let first_doc = self.definition(first).map_or(0, |d| d.0);
                for later in rest {
                    let document = self.definition(later).map_or(0, |d| d.0);
                    let message = duplicate_message(kind, key, document, &first.0, first_doc);
                    let error = FileError {
                        file: later.0.display().to_string(),
                        message,
                    };
                    duplicates.push((later.clone(), error));
                }
            }
            let before = self.duplicates.get(&id).map(Vec::as_slice).unwrap_or(&[]);
            for (_, e) in duplicates.iter().filter(|d| !before.contains(d)) {
                log_file_error(e);
            }
            self.lists_stale |= before != duplicates.as_slice();
            if duplicates.is_empty() {
                self.duplicates.remove(&id);
            } else {
                self.duplicates.insert(id.clone(), duplicates);
            }
            let value = definers.first().and_then(|d| self.definition(d));
            let map = match *kind {
                "Secret" => &mut desired.secrets,
                plugin::envoyfilter::ENVOY_FILTER_KIND => &mut desired.envoy_filters,
                _ => &mut desired.plugins,
            };
            let same = map.get(key) == value.map(|v| &v.1);
            if !same {
                match value {
                    Some((_, v)) => map.insert(key.clone(), v.clone()),
                    None => map.remove(key),
                };
                changed.insert(id);
            }
        }
        if !std::mem::take(&mut self.lists_stale) {
            return changed;
        }
        // Walk problems first, then unreadable files, then ignored definitions, each in file
        // order: as one full read of the files lists them.
        let mut duplicates: Vec<&(Definition, FileError)> =
            self.duplicates.values().flatten().collect();
        duplicates.sort_by(|a, b| a.0.cmp(&b.0));
        desired.errors = (self.walk_errors.iter())
            .chain(self.read_errors.values())
            .chain(duplicates.into_iter().map(|d| &d.1))
            .cloned()
            .collect();
        desired.dirs = self.dirs.clone();
        changed
    }
}

/// What a path the watcher reported means for the files.
enum Seen {
    /// A file of ours changed: read it again.
    Reread(FileName),
    /// Which files there are may have changed: walk again.
    Structural,
    /// Another name of a file of ours changed: read it again, and walk again.
    Alias(FileName),
    Nothing,
}

fn has_manifest_extension(path: &Path) -> bool {
    (path.extension().and_then(|e| e.to_str()))
        .is_some_and(|e| ["yaml", "yml", "json"].contains(&e))
}

/// Says what is wrong with a definition that is not the first of its object.
fn duplicate_message(
    kind: &str,
    key: &ObjectKey,
    document: usize,
    first: &Path,
    first_doc: usize,
) -> String {
    format!(
        "document {}: {kind} {key} is already defined by {} (document {}), which is used; \
         this definition is ignored",
        document + 1,
        first.display(),
        first_doc + 1
    )
}

/// A file error is logged once, when it is new: a file that stays bad costs one line.
fn log_file_error(e: &FileError) {
    tracing::warn!(file = %e.file, error = %e.message, "bad manifest file");
}

/// The kind an object is filed under (`WasmPlugin`, `EnvoyFilter` or `Secret`) and its key.
fn kind_and_key(v: &Object) -> (&'static str, ObjectKey) {
    let head = v.head();
    let kind = match head.kind.as_deref() {
        Some("Secret") => "Secret",
        Some(plugin::envoyfilter::ENVOY_FILTER_KIND) => plugin::envoyfilter::ENVOY_FILTER_KIND,
        _ => "WasmPlugin",
    };
    let name = head.name.unwrap_or_default();
    let ns = (head.namespace).unwrap_or_else(|| plugin::DEFAULT_NAMESPACE.to_string());
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
            Some((first, first_doc)) => {
                Some(duplicate_message(kind, key, document, first, *first_doc))
            }
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

/// Reads a file's documents. Structural errors (unreadable file, not a regular file, too large,
/// malformed YAML, a document that is neither a WasmPlugin, an EnvoyFilter nor a Secret) make the
/// whole file bad; validation problems of a plugin or an EnvoyFilter are left to admission, which
/// refuses that object (or that patch) alone.
/// A plugin is kept as admission normalises it (namespace filled in), so that the store shares
/// this object rather than holding a normalised copy.
fn read_objects(file: &Path) -> Result<Vec<(usize, Object)>, String> {
    let text = crate::cli::read_manifest(file, crate::cli::MAX_MANIFEST_BYTES)?;
    let docs = plugin::documents(&text);
    let mut out = Vec::with_capacity(docs.len());
    for doc in docs {
        let (i, v) = doc.map_err(|e| format!("document {}: {}", e.document + 1, e.message))?;
        let keep = matches!(
            v.get("kind").and_then(Value::as_str),
            Some("WasmPlugin" | plugin::envoyfilter::ENVOY_FILTER_KIND)
        );
        let object = Object::new(&v);
        match plugin::parse_shared(i, v, &object) {
            Ok(plugin::Manifest::Plugin(p)) => out.push((i, p.object)),
            Ok(_) => out.push((i, object)),
            Err(e) if e.object.is_some() && keep => out.push((i, object)),
            Err(e) => return Err(format!("document {}: {e}", i + 1)),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
