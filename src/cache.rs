//! The module cache index (behavior.md §5): which modules are stored, who uses them, what each
//! mutable URL last resolved to, and expiry. Bytes live in a [`ModuleStore`]; this type decides.
//!
//! Identity of a module: `(module name, checksum)` ([`ModuleKey`]). The checksum is the manifest
//! digest for OCI and the sha256 of the Wasm binary otherwise; `sha256` of every entry is always the
//! Wasm binary's, which is what restarts verify and what `sim` matches content by.
//!
//! The index (entries, resolutions and HTTP validators) is persisted through the store, so a
//! restarted server knows what it had. At open the files it lists are hashed again by a
//! [`Verifier`] (in the background for a disk): until its file verified, an entry is *pending* —
//! it is kept, persisted and protected, but never served, listed or expired.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::fetch::http::Validators;
use crate::fetch::StagedModule;
use crate::log_gate::LogGate;
use crate::plugin::ObjectKey;

mod key;
pub mod verify;

use crate::store::ModuleStore;
pub use key::{KeyParts, ModuleKey, NameStart};
pub use verify::{ReindexReport, Verifier};

/// One cached module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleEntry {
    pub path: PathBuf,
    pub size: u64,
    /// Hex sha256 of the Wasm binary.
    pub sha256: String,
    /// Last time the module was used; meaningful only while `refs` is empty.
    pub last_used: Timestamp,
    /// Plugins currently serving the module: while any, it never expires.
    pub refs: BTreeSet<ObjectKey>,
    /// Fetched with registry credentials (behavior.md §4.2, improvement): served to another plugin
    /// only after the registry authorized that plugin.
    pub private: bool,
    /// Plugins the registry authorized for a private module (kept in memory only).
    pub authorized: BTreeSet<ObjectKey>,
}

#[derive(Serialize, Deserialize, Default)]
struct PersistedIndex {
    modules: Vec<PersistedModule>,
    /// url → module it last resolved to.
    resolutions: BTreeMap<String, ModuleKey>,
    /// http(s) url → the validators its server sent with that module.
    #[serde(default)]
    validators: BTreeMap<String, Validators>,
    /// `ns/name` of a plugin → the url and module it last served.
    #[serde(default)]
    served: BTreeMap<String, ServedRecord>,
}

/// What a plugin last served: kept across restarts so that a plugin whose pull fails right after a
/// restart keeps serving it (behavior.md §7 keep-serving rule, across restarts).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedRecord {
    pub url: String,
    pub module: ModuleKey,
}

#[derive(Serialize, Deserialize)]
struct PersistedModule {
    name: String,
    checksum: String,
    sha256: String,
    size: u64,
    private: bool,
    last_used_ms: u64,
}

/// The cache index. Not thread-safe by itself: the engine owns it.
pub struct Cache {
    store: Arc<dyn ModuleStore>,
    modules: BTreeMap<ModuleKey, ModuleEntry>,
    /// The key of the module at each path of `modules` (file delivery reads modules by path).
    paths: HashMap<PathBuf, ModuleKey>,
    resolutions: BTreeMap<String, ModuleKey>,
    /// HTTP validators (`ETag`, `Last-Modified`) of the module a url resolves to.
    validators: BTreeMap<String, Validators>,
    /// What each plugin last served (see [`ServedRecord`]).
    served: BTreeMap<String, ServedRecord>,
    /// Where [`Cache::set_served`] writes a plugin's `ns/name` to look it up in `served`, kept
    /// between calls: every commit records what its plugin serves.
    served_id: String,
    /// The latest time the cache was told about: a module still referenced is persisted as used
    /// at this time, so after a restart it ages from when it was last in use, not from when it was
    /// first referenced.
    now: Timestamp,
    /// The index changed since it was last written. Writes are batched by the engine (at most one
    /// per [`INDEX_SAVE_INTERVAL`]): rewriting it on every change made loading N plugins O(N²).
    dirty: bool,
    /// A failing index write (read-only or full disk) is tried again at every save: logged once
    /// per [`INDEX_WARN_INTERVAL`], not once a second.
    warnings: LogGate,
    /// Entries whose file is still being verified.
    pending: BTreeSet<ModuleKey>,
    /// Entries whose file failed that verification and was removed (at most the files found at
    /// open): a cache hit planned on one of them is planned again (`Engine::lost_cache_hit`).
    unverified: BTreeSet<ModuleKey>,
    verifier: Arc<Verifier>,
    /// Re-indexing so far.
    reindex: ReindexReport,
}

/// How often a failing index write is logged.
pub const INDEX_WARN_INTERVAL: Duration = Duration::from_secs(600);

/// The longest the persisted index lags behind the cache while the server runs. A crash within it
/// loses no module: files the index does not know yet are removed at start and pulled again. A
/// store that does not survive a crash (the simulator's memory) has its index written only at
/// graceful points ([`Cache::save_due`]).
pub const INDEX_SAVE_INTERVAL: Duration = Duration::from_secs(1);

impl Drop for Cache {
    /// A cache dropped while verifying (a restart, a test) stops its verifier's threads.
    fn drop(&mut self) {
        self.verifier.cancel();
    }
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("modules", &self.modules.len())
            .finish()
    }
}

impl Cache {
    pub fn store(&self) -> &Arc<dyn ModuleStore> {
        &self.store
    }

    /// Cached modules, pending ones included.
    pub fn len(&self) -> usize {
        self.modules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }

    pub fn get(&self, key: &ModuleKey) -> Option<&ModuleEntry> {
        self.modules.get(key)
    }

    pub fn contains(&self, key: &ModuleKey) -> bool {
        self.modules.contains_key(key)
    }

    /// Every cached module, pending ones included.
    pub fn keys(&self) -> impl Iterator<Item = &ModuleKey> {
        self.modules.keys()
    }

    /// The cached modules named `name` (every checksum, pending ones included), in key order: a range of the index, not a
    /// scan of every module (an OCI pull plan asks at every change).
    pub fn entries_named<'a>(
        &'a self,
        name: &'a str,
    ) -> impl Iterator<Item = (&'a ModuleKey, &'a ModuleEntry)> {
        let first: &dyn KeyParts = &NameStart(name);
        self.modules
            .range::<dyn KeyParts, _>((Bound::Included(first), Bound::Unbounded))
            .take_while(move |(k, _)| k.name == name)
    }

    /// The verified modules (the ones that may be served).
    pub fn entries(&self) -> impl Iterator<Item = (&ModuleKey, &ModuleEntry)> {
        self.modules
            .iter()
            .filter(|(k, _)| !self.pending.contains(*k))
    }

    /// The key of the verified module stored at `path`.
    pub fn key_at(&self, path: &Path) -> Option<&ModuleKey> {
        self.paths.get(path).filter(|k| !self.pending.contains(*k))
    }

    /// The module `url` last resolved to, if it is still cached.
    pub fn resolution(&self, url: &str) -> Option<&ModuleKey> {
        self.resolutions
            .get(url)
            .filter(|k| self.modules.contains_key(*k))
    }

    pub fn resolutions(&self) -> &BTreeMap<String, ModuleKey> {
        &self.resolutions
    }

    /// What `plugin` last served, if that module is still cached.
    pub fn last_served(&self, plugin: &ObjectKey) -> Option<&ServedRecord> {
        self.served
            .get(&plugin.to_string())
            .filter(|r| self.modules.contains_key(&r.module))
    }

    /// Records what `plugin` serves now, the url and the module (`None`: nothing from the cache).
    /// The record is copied only when it changed (a revalidation serves what it served).
    pub fn set_served(&mut self, plugin: &ObjectKey, record: Option<(&str, &ModuleKey)>) {
        let mut id = std::mem::take(&mut self.served_id);
        id.clear();
        plugin.write_id(&mut id);
        let changed = match record {
            Some((url, module)) => {
                let new = || ServedRecord {
                    url: url.to_string(),
                    module: module.clone(),
                };
                match self.served.get_mut(id.as_str()) {
                    Some(r) if r.url == url && r.module == *module => false,
                    Some(r) => {
                        *r = new();
                        true
                    }
                    None => {
                        self.served.insert(id.clone(), new());
                        true
                    }
                }
            }
            None => self.served.remove(id.as_str()).is_some(),
        };
        self.served_id = id;
        self.dirty |= changed;
    }

    /// The HTTP validators of the module `url` resolves to, if its server sent any.
    pub fn validators(&self, url: &str) -> Option<&Validators> {
        self.resolution(url).and(self.validators.get(url))
    }

    /// Records the validators sent with the module `url` now resolves to (call after
    /// [`Cache::set_resolution`]).
    pub fn set_validators(&mut self, url: &str, validators: Option<Validators>) {
        let changed = match validators {
            Some(v) => self.validators.insert(url.to_string(), v.clone()) != Some(v),
            None => self.validators.remove(url).is_some(),
        };
        self.dirty |= changed;
    }

    /// Remembers that `url` resolved to `key` (validators of an earlier resolution are dropped).
    pub fn set_resolution(&mut self, url: &str, key: &ModuleKey) {
        if self.resolutions.get(url) != Some(key) {
            self.validators.remove(url);
            self.resolutions.insert(url.to_string(), key.clone());
            self.dirty = true;
        }
    }

    /// Commits a verified module under `key`. If the key is already cached the staged file is
    /// dropped and the existing file kept — unless that file is still pending: the fresh one then
    /// replaces it (its verification no longer matters).
    pub fn insert(
        &mut self,
        key: &ModuleKey,
        staged: StagedModule,
        private: bool,
        now: Timestamp,
    ) -> io::Result<&ModuleEntry> {
        self.now = self.now.max(now);
        if self.pending.contains(key) {
            self.verifier.supersede(key);
            let path = self.store.commit(staged.file, &key.name, &key.checksum)?;
            self.pending.remove(key);
            self.reindex.verifying -= 1;
            let e = self
                .modules
                .get_mut(key)
                .expect("pending entries are cached");
            (e.path, e.size, e.sha256, e.private) = (path, staged.size, staged.sha256, private);
            e.last_used = e.last_used.max(now);
            self.paths.insert(e.path.clone(), key.clone());
            self.dirty = true;
        } else if !self.modules.contains_key(key) {
            let path = self.store.commit(staged.file, &key.name, &key.checksum)?;
            self.paths.insert(path.clone(), key.clone());
            self.modules.insert(
                key.clone(),
                ModuleEntry {
                    path,
                    size: staged.size,
                    sha256: staged.sha256,
                    last_used: now,
                    refs: BTreeSet::new(),
                    private,
                    authorized: BTreeSet::new(),
                },
            );
            self.dirty = true;
        }
        Ok(self.modules.get(key).expect("just inserted"))
    }

    /// Marks `plugin` as served by `key` (or by nothing); the module it leaves starts to age now.
    pub fn set_ref(
        &mut self,
        plugin: &ObjectKey,
        old: Option<&ModuleKey>,
        new: Option<&ModuleKey>,
        now: Timestamp,
    ) {
        self.now = self.now.max(now);
        if old == new {
            if let Some(e) = new.and_then(|k| self.modules.get_mut(k)) {
                e.last_used = now;
            }
            return;
        }
        if let Some(e) = old.and_then(|k| self.modules.get_mut(k)) {
            e.refs.remove(plugin);
            e.last_used = now;
        }
        if let Some(e) = new.and_then(|k| self.modules.get_mut(k)) {
            e.refs.insert(plugin.clone());
            e.last_used = now;
        }
    }

    /// Records a use (a cache hit, a delivery to a proxy).
    pub fn touch(&mut self, key: &ModuleKey, now: Timestamp) {
        self.now = self.now.max(now);
        if let Some(e) = self.modules.get_mut(key) {
            e.last_used = e.last_used.max(now);
        }
    }

    pub fn authorize(&mut self, key: &ModuleKey, plugin: &ObjectKey) {
        // Looked up first: every revalidation authorizes again, and the key is copied only once.
        if let Some(e) = self.modules.get_mut(key) {
            if !e.authorized.contains(plugin) {
                e.authorized.insert(plugin.clone());
            }
        }
    }

    /// True when `plugin` may be served the module without asking the registry.
    pub fn is_authorized(&self, key: &ModuleKey, plugin: &ObjectKey) -> bool {
        self.modules
            .get(key)
            .is_some_and(|e| !e.private || e.authorized.contains(plugin))
    }

    /// One purge pass at `now`: removes every verified module no plugin serves that has been
    /// unused for strictly longer than `expiry`, and the resolutions pointing to it. Returns what
    /// left. A pending module is neither expired nor counted: the first pass after it verified
    /// decides (one that fails verification is removed as such, not as expired).
    pub fn purge(&mut self, now: Timestamp, expiry: Duration) -> Vec<(ModuleKey, ModuleEntry)> {
        self.settle();
        self.now = self.now.max(now);
        let expired: Vec<ModuleKey> = self
            .entries()
            .filter(|(_, e)| e.refs.is_empty() && now.since(e.last_used) > expiry)
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = Vec::new();
        for key in expired {
            let entry = self.forget(&key).expect("listed above");
            if let Err(e) = self.store.remove(&entry.path) {
                tracing::warn!(path = %entry.path.display(), error = %e, "could not remove expired module");
            }
            out.push((key, entry));
        }
        out
    }

    /// Drops `key` from the index with what points at it (resolutions, validators, served
    /// records); its file is the caller's.
    fn forget(&mut self, key: &ModuleKey) -> Option<ModuleEntry> {
        let entry = self.modules.remove(key)?;
        self.paths.remove(&entry.path);
        self.resolutions.retain(|_, k| k != key);
        let resolutions = &self.resolutions;
        self.validators.retain(|u, _| resolutions.contains_key(u));
        self.served.retain(|_, r| r.module != *key);
        self.dirty = true;
        Some(entry)
    }

    /// Reads a verified module's bytes.
    pub fn read(&self, key: &ModuleKey) -> io::Result<Vec<u8>> {
        let e = self
            .modules
            .get(key)
            .filter(|_| !self.pending.contains(key))
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, key.to_string()))?;
        self.store.read(&e.path)
    }

    /// True when the index has changes not yet written.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// True when changes not yet written are to be written within [`INDEX_SAVE_INTERVAL`]: only
    /// for a store that survives a crash ([`ModuleStore::survives_crash`]). An in-memory index is
    /// read only after a graceful point, which writes it ([`Cache::flush`]); writing it every
    /// virtual second cost the simulator a quarter of its time.
    pub fn save_due(&self) -> bool {
        self.dirty && self.store.survives_crash()
    }

    /// Writes the index if it changed; failures are logged, never fatal (the cache still works in
    /// memory, and the next save tries again).
    pub fn save(&mut self) {
        self.settle();
        if self.dirty {
            self.dirty = !self.persist();
        }
    }

    fn persist(&self) -> bool {
        let index = PersistedIndex {
            modules: self
                .modules
                .iter()
                .map(|(k, e)| PersistedModule {
                    name: k.name.clone(),
                    checksum: k.checksum.clone(),
                    sha256: e.sha256.clone(),
                    size: e.size,
                    private: e.private,
                    last_used_ms: if e.refs.is_empty() {
                        e.last_used
                    } else {
                        e.last_used.max(self.now)
                    }
                    .as_millis(),
                })
                .collect(),
            resolutions: self.resolutions.clone(),
            validators: self.validators.clone(),
            served: self.served.clone(),
        };
        let bytes = serde_json::to_vec(&index).expect("index serializes");
        match self.store.save_index(&bytes) {
            Ok(()) => true,
            Err(e) => {
                if let Some(suppressed) = self.warnings.admit("index") {
                    tracing::warn!(error = %e, suppressed, "could not persist the cache index");
                }
                false
            }
        }
    }

    /// Persists usage times as of `now` (called after purge passes and on shutdown, not on every
    /// touch).
    pub fn flush(&mut self, now: Timestamp) {
        self.now = self.now.max(now);
        self.dirty = true;
        self.save();
    }
}

/// Validators of urls that still resolve to a cached module.
fn validators_for(
    validators: BTreeMap<String, Validators>,
    resolutions: &BTreeMap<String, ModuleKey>,
) -> BTreeMap<String, Validators> {
    validators
        .into_iter()
        .filter(|(u, _)| resolutions.contains_key(u))
        .collect()
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::store::{DiskStore, MemStore};

    fn staged(store: &dyn ModuleStore, bytes: &[u8]) -> StagedModule {
        StagedModule::of_bytes(store, bytes).unwrap()
    }

    const WASM: &[u8] = b"\0asm\x01\0\0\0hello";

    #[test]
    fn referenced_modules_never_expire_and_unreferenced_age_from_last_use() {
        let store: Arc<dyn ModuleStore> = Arc::new(MemStore::new());
        let (mut cache, _) = Cache::open(store.clone()).unwrap();
        let key = ModuleKey::new("oci://r/a", "d1");
        let p = ObjectKey::new("default", "p");
        cache
            .insert(&key, staged(store.as_ref(), WASM), false, Timestamp::ZERO)
            .unwrap();
        cache.set_resolution("oci://r/a:v1", &key);
        cache.set_ref(&p, None, Some(&key), Timestamp::ZERO);
        let day = Duration::from_secs(86400);
        assert!(cache.purge(Timestamp::ZERO + day * 10, day).is_empty());
        cache.set_ref(&p, Some(&key), None, Timestamp::ZERO + day * 10);
        assert!(
            cache.purge(Timestamp::ZERO + day * 11, day).is_empty(),
            "exactly expiry is not strictly longer"
        );
        let gone = cache.purge(Timestamp::ZERO + day * 11 + Duration::from_millis(1), day);
        assert_eq!(gone.len(), 1);
        assert!(cache.resolution("oci://r/a:v1").is_none());
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn paths_find_their_module_and_only_a_crash_surviving_store_saves_on_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let disk: Arc<dyn ModuleStore> = Arc::new(DiskStore::open(dir.path()).unwrap());
        let (mut cache, _) = Cache::open(Arc::new(MemStore::new())).unwrap();
        let (mut on_disk, _) = Cache::open(disk.clone()).unwrap();
        let key = ModuleKey::new("oci://r/a", "d1");
        let staged = staged(cache.store().as_ref(), WASM);
        let path = cache.insert(&key, staged, false, Timestamp::ZERO);
        let path = path.unwrap().path.clone();
        on_disk.set_resolution("oci://r/a:v1", &key);
        assert_eq!(cache.key_at(&path), Some(&key));
        assert!(cache.is_dirty() && !cache.save_due() && on_disk.save_due());
        let later = Timestamp::ZERO + Duration::from_secs(2);
        assert_eq!(cache.purge(later, Duration::from_secs(1)).len(), 1);
        assert_eq!(cache.key_at(&path), None);
    }

    #[test]
    fn reindex_keeps_verified_files_and_removes_truncated_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ModuleStore> = Arc::new(DiskStore::open(dir.path()).unwrap());
        let (a, b) = (
            ModuleKey::new("http://h/a.wasm", "x"),
            ModuleKey::new("http://h/b.wasm", "y"),
        );
        let path_b;
        {
            let (mut cache, _) = Cache::open(store.clone()).unwrap();
            cache
                .insert(&a, staged(store.as_ref(), WASM), false, Timestamp::ZERO)
                .unwrap();
            path_b = cache
                .insert(&b, staged(store.as_ref(), WASM), false, Timestamp::ZERO)
                .unwrap()
                .path
                .clone();
            cache.set_resolution("http://h/a.wasm", &a);
            cache.set_resolution("http://h/b.wasm", &b);
            cache.flush(Timestamp::ZERO);
        }
        // Truncate b behind the cache's back, and drop a stray file.
        std::fs::write(&path_b, &WASM[..6]).unwrap();
        let stray = dir.path().join("deadbeef");
        std::fs::create_dir_all(&stray).unwrap();
        std::fs::write(stray.join("zz.wasm"), WASM).unwrap();

        let store2: Arc<dyn ModuleStore> = Arc::new(DiskStore::open(dir.path()).unwrap());
        let (cache, report) = Cache::open(store2).unwrap();
        assert_eq!(report.kept, 1);
        assert_eq!(report.removed.len(), 2);
        assert!(cache.contains(&a) && !cache.contains(&b));
        assert_eq!(cache.resolution("http://h/a.wasm"), Some(&a));
        assert_eq!(cache.resolution("http://h/b.wasm"), None);
        assert!(!path_b.exists());
    }
}
