//! Start-up verification of the cached module files (behavior.md §5 "The cache survives
//! restarts"): each file the index knows is hashed again before it is served.
//!
//! Hashing a whole cache before serving anything made a cold start with 1,000 cached 1 MiB modules
//! take a second on one thread. The [`Verifier`] hashes on threads of its own (one per core, from
//! tokio's blocking pool inside a runtime) in an order the cache chooses — the modules plugins
//! served before the restart first — and moves a module to the front of the queue as soon as a
//! plugin needs it ([`Verifier::wait`]), so a plugin waits for its own module, not for the whole
//! cache. A store read from memory (the simulator's)
//! is verified on the caller's thread at open, in index order, so it stays deterministic.
//!
//! A file that does not verify is removed by the verifier itself, under its lock, unless the
//! module was downloaded again meanwhile ([`Verifier::supersede`]): the fresh file under the same
//! name is then never touched. The cache learns the results when it asks ([`Verifier::take`]).
//!
//! (Just over 600 lines with its unit tests: the panicking store they need delegates every
//! method of the store trait.)

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io::{self, Read};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use sha2::{Digest, Sha256};

use super::INDEX_WARN_INTERVAL;
use super::{validators_for, Cache, ModuleEntry, ModuleKey, PersistedIndex, PersistedModule};
use crate::clock::Timestamp;
use crate::log_gate::LogGate;
use crate::store::{sha256_hex, ModuleStore};

/// The read size of the hashing loop: large reads keep a cold disk streaming.
const READ_BUFFER: usize = 1 << 20;

/// One module file to verify: where it is and what the index says it holds.
#[derive(Clone, Debug)]
pub struct Check {
    pub key: ModuleKey,
    pub path: PathBuf,
    pub sha256: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Queued,
    Running,
    /// Verified (`true`) or removed (`false`).
    Done(bool),
    /// Replaced by a fresh download: its result no longer matters.
    Superseded,
}

#[derive(Default)]
struct State {
    /// Modules to verify, front first. A prioritised module is pushed to the front again; a
    /// popped module that is no longer queued is skipped.
    queue: VecDeque<ModuleKey>,
    checks: HashMap<ModuleKey, (Check, Status)>,
    /// Results the cache has not taken yet.
    results: Vec<(ModuleKey, bool)>,
    /// Modules queued or running.
    remaining: usize,
    kept: usize,
    removed: usize,
    /// The cache was dropped: the workers stop.
    cancelled: bool,
}

/// Verifies cached module files, on worker threads or inline. Thread-safe.
pub struct Verifier {
    store: Arc<dyn ModuleStore>,
    state: Mutex<State>,
    /// Signalled whenever a module is done (blocking waiters).
    done: Condvar,
    /// Notified whenever a module is done (async waiters).
    notify: tokio::sync::Notify,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("remaining", &self.lock().remaining)
            .finish()
    }
}

impl Verifier {
    /// Verifies `checks` in this order: on `threads` worker threads started now, or — with no
    /// threads — on the caller's thread before this returns.
    pub fn start(store: Arc<dyn ModuleStore>, checks: Vec<Check>, threads: usize) -> Arc<Self> {
        let mut state = State {
            remaining: checks.len(),
            ..State::default()
        };
        for c in checks {
            state.queue.push_back(c.key.clone());
            state.checks.insert(c.key.clone(), (c, Status::Queued));
        }
        let threads = threads.min(state.remaining);
        let verifier = Arc::new(Verifier {
            store,
            state: Mutex::new(state),
            done: Condvar::new(),
            notify: tokio::sync::Notify::new(),
        });
        if threads == 0 {
            verifier.work();
        }
        for i in 0..threads {
            let v = verifier.clone();
            // On the runtime's blocking pool when there is one: a paused (virtual) clock then does
            // not jump ahead while files are hashed, so time-driven tests stay deterministic.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn_blocking(move || v.work());
                continue;
            }
            let spawned = std::thread::Builder::new()
                .name(format!("cache-verify-{i}"))
                .spawn(move || v.work());
            if let Err(e) = spawned {
                // Fewer threads only slow verification down; with none, it runs here.
                tracing::warn!(error = %e, "cannot start a cache verification thread");
                if i == 0 {
                    verifier.work();
                }
                break;
            }
        }
        verifier
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Modules not verified yet (queued or being hashed).
    pub fn remaining(&self) -> usize {
        self.lock().remaining
    }

    /// Takes the results not taken yet: each module verified (`true`) or removed (`false`).
    pub fn take(&self) -> Vec<(ModuleKey, bool)> {
        std::mem::take(&mut self.lock().results)
    }

    /// Moves `key` to the front of the queue (no-op unless it is still queued).
    pub fn prioritize(&self, key: &ModuleKey) {
        let mut st = self.lock();
        if matches!(st.checks.get(key), Some((_, Status::Queued))) {
            st.queue.push_front(key.clone());
        }
    }

    /// The module was downloaded again and its file replaced: whatever the check of the old file
    /// finds, it removes nothing and reports nothing.
    pub fn supersede(&self, key: &ModuleKey) {
        let mut guard = self.lock();
        let st = &mut *guard;
        let mut finished = false;
        if let Some((_, status)) = st.checks.get_mut(key) {
            if matches!(status, Status::Queued | Status::Running) {
                // Kept: under a fresh file.
                (st.remaining, st.kept) = (st.remaining - 1, st.kept + 1);
                finished = st.remaining == 0;
            }
            *status = Status::Superseded;
        }
        let (kept, removed) = (st.kept, st.removed);
        drop(guard);
        self.wake();
        if finished {
            log_verified(kept, removed);
        }
    }

    /// Waits until `key` is no longer waiting for verification, moving it to the front first.
    /// Its result reaches the cache through [`Verifier::take`].
    pub async fn wait(&self, key: &ModuleKey) {
        // Nothing left to verify, the usual case: nothing to wait for, no waiting set up.
        if !self.is_pending(key) {
            return;
        }
        self.prioritize(key);
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.is_pending(key) {
                return;
            }
            notified.await;
        }
    }

    /// [`Verifier::wait`] for a caller that cannot await (it blocks its thread).
    pub fn wait_blocking(&self, key: &ModuleKey) {
        self.prioritize(key);
        let mut st = self.lock();
        while pending(&st, key) {
            st = self.done.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Waits until every module is verified; returns how many were kept and removed.
    pub fn wait_all(&self) -> (usize, usize) {
        let mut st = self.lock();
        while st.remaining > 0 && !st.cancelled {
            st = self.done.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        (st.kept, st.removed)
    }

    fn is_pending(&self, key: &ModuleKey) -> bool {
        pending(&self.lock(), key)
    }

    /// Stops the workers after the file each one is hashing.
    pub fn cancel(&self) {
        self.lock().cancelled = true;
        self.wake();
    }

    fn wake(&self) {
        self.done.notify_all();
        self.notify.notify_waiters();
    }

    /// A worker: verifies queued modules until none is left.
    fn work(&self) {
        let mut buf = vec![0u8; READ_BUFFER];
        while let Some(check) = self.next() {
            let ok = self.verify(&check, &mut buf);
            let mut st = self.lock();
            let Some((_, status)) = st.checks.get_mut(&check.key) else {
                continue;
            };
            if *status != Status::Running {
                continue; // superseded meanwhile
            }
            *status = Status::Done(ok);
            if !ok {
                // Under the lock: a download of the same module (`supersede` first) cannot be
                // renamed into place between the check and the removal.
                let removed = catch_unwind(AssertUnwindSafe(|| self.store.remove(&check.path)));
                if let Err(e) = removed.unwrap_or_else(|p| Err(io::Error::other(panic_text(&p)))) {
                    tracing::warn!(path = %check.path.display(), error = %e, "cannot remove a cached module that failed verification");
                }
            }
            st.results.push((check.key, ok));
            st.remaining -= 1;
            if ok {
                st.kept += 1;
            } else {
                st.removed += 1;
            }
            let (finished, kept, removed) = (st.remaining == 0, st.kept, st.removed);
            drop(st);
            self.wake();
            if finished {
                log_verified(kept, removed);
            }
        }
    }

    /// Whether `check`'s file holds what the index says. A panic while reading it (a store's
    /// bug) counts as a failed verification, logged in one line: the module is removed and pulled
    /// again like any other that failed, its waiters learn that, and this worker goes on with the
    /// next module instead of dying with this one marked running forever.
    fn verify(&self, check: &Check, buf: &mut [u8]) -> bool {
        let store = self.store.as_ref();
        match catch_unwind(AssertUnwindSafe(|| hash_file(store, &check.path, buf))) {
            Ok(hashed) => hashed.ok().as_deref() == Some(check.sha256.as_str()),
            Err(panic) => {
                let error = panic_text(&panic);
                tracing::warn!(module = %check.key.name, path = %check.path.display(), %error, "cache verification panicked: the module counts as failed, is removed and will be pulled again");
                false
            }
        }
    }

    /// The next queued module, marked running; `None` when none is left (or cancelled).
    fn next(&self) -> Option<Check> {
        let mut st = self.lock();
        if st.cancelled {
            return None;
        }
        while let Some(key) = st.queue.pop_front() {
            if let Some((check, status)) = st.checks.get_mut(&key) {
                if *status == Status::Queued {
                    *status = Status::Running;
                    return Some(check.clone());
                }
            }
        }
        None
    }
}

/// What a caught panic said (its message, when it is text), on one line.
fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    let text = (panic.downcast_ref::<&str>().copied())
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message");
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The line saying every cached module found at start was verified (none: no line).
fn log_verified(kept: usize, removed: usize) {
    if kept + removed > 0 {
        tracing::info!(kept, removed, "cache verified");
    }
}

fn pending(st: &State, key: &ModuleKey) -> bool {
    st.remaining > 0
        && !st.cancelled
        && matches!(
            st.checks.get(key),
            Some((_, Status::Queued | Status::Running))
        )
}

/// What re-indexing found at start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReindexReport {
    /// Modules kept: verified, or still being verified.
    pub kept: usize,
    /// Files removed because they did not verify or were unknown, in path order.
    pub removed: Vec<PathBuf>,
    /// Of the kept modules, those whose file is still being verified.
    pub verifying: usize,
}

impl Cache {
    /// Opens the cache over `store`, re-indexing what it holds: files the persisted index does not
    /// know, or whose size differs, are removed at once; the others are verified by a [`Verifier`]
    /// on [`ModuleStore::verify_threads`] threads (on this one, before it returns, for none), the
    /// modules plugins served last first. One that does not verify is removed, as are the
    /// resolutions pointing to modules no longer present.
    pub fn open(store: Arc<dyn ModuleStore>) -> io::Result<(Cache, ReindexReport)> {
        let persisted: PersistedIndex = match store.load_index()? {
            Some(bytes) => serde_json::from_slice(&bytes).unwrap_or_default(),
            None => PersistedIndex::default(),
        };
        let known: BTreeMap<(String, String), &PersistedModule> = persisted
            .modules
            .iter()
            .map(|m| ((sha256_hex(m.name.as_bytes()), m.checksum.clone()), m))
            .collect();
        let mut reindex = ReindexReport::default();
        let mut modules = BTreeMap::new();
        let mut checks = Vec::new();
        for file in store.list()? {
            let name = (file.name_hash.clone(), file.checksum.clone());
            let Some(m) = known.get(&name).filter(|m| m.size == file.size) else {
                store.remove(&file.path)?;
                reindex.removed.push(file.path);
                continue;
            };
            let key = ModuleKey::new(&m.name, &m.checksum);
            checks.push(Check {
                key: key.clone(),
                path: file.path.clone(),
                sha256: m.sha256.clone(),
            });
            modules.insert(
                key,
                ModuleEntry {
                    path: file.path,
                    size: m.size,
                    sha256: m.sha256.clone(),
                    last_used: Timestamp::from_millis(m.last_used_ms),
                    refs: BTreeSet::new(),
                    private: m.private,
                    authorized: BTreeSet::new(),
                },
            );
        }
        // What plugins served before the restart is what they will ask for first.
        let served_before: BTreeSet<&ModuleKey> =
            persisted.served.values().map(|r| &r.module).collect();
        checks.sort_by_key(|c| !served_before.contains(&c.key));
        let pending = checks.iter().map(|c| c.key.clone()).collect();
        (reindex.kept, reindex.verifying) = (checks.len(), checks.len());
        let verifier = Verifier::start(store.clone(), checks, store.verify_threads());
        let served = persisted
            .served
            .into_iter()
            .filter(|(_, r)| modules.contains_key(&r.module))
            .collect();
        let resolutions: BTreeMap<String, ModuleKey> = persisted
            .resolutions
            .into_iter()
            .filter(|(_, k)| modules.contains_key(k))
            .collect();
        let paths = modules
            .iter()
            .map(|(k, e)| (e.path.clone(), k.clone()))
            .collect();
        let mut cache = Cache {
            store,
            modules,
            paths,
            validators: validators_for(persisted.validators, &resolutions),
            served,
            served_id: String::new(),
            resolutions,
            now: Timestamp::default(),
            dirty: true,
            warnings: LogGate::new(INDEX_WARN_INTERVAL),
            pending,
            unverified: BTreeSet::new(),
            verifier,
            reindex,
        };
        cache.settle();
        let last_used = cache.modules.values().map(|e| e.last_used).max();
        cache.now = last_used.unwrap_or_default();
        cache.save();
        let report = cache.reindex_report();
        Ok((cache, report))
    }

    /// Re-indexing as of now (see [`Cache::settle`]).
    pub fn reindex_report(&self) -> ReindexReport {
        let mut report = self.reindex.clone();
        report.removed.sort();
        report
    }

    /// Takes the verifier's results: a verified entry can be served from now on; one that failed
    /// (its file removed already) is forgotten with the resolutions, validators and served records
    /// pointing at it. Cheap once everything is verified.
    pub fn settle(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        for (key, ok) in self.verifier.take() {
            if !self.pending.remove(&key) {
                continue; // downloaded again meanwhile
            }
            self.reindex.verifying -= 1;
            if !ok {
                self.unverified.insert(key.clone());
            }
            if let Some(entry) = (!ok).then(|| self.forget(&key)).flatten() {
                self.reindex.kept -= 1;
                self.reindex.removed.push(entry.path);
            }
        }
    }

    /// Waits until every file is verified (tests, tools); returns the whole re-indexing.
    pub fn wait_verified(&mut self) -> ReindexReport {
        self.verifier.wait_all();
        self.settle();
        self.reindex_report()
    }

    /// True when `key` is cached and its file verified: the only modules served.
    pub fn is_verified(&self, key: &ModuleKey) -> bool {
        self.modules.contains_key(key) && !self.pending.contains(key)
    }

    /// True when `key`'s file failed the start-up verification and it has not been cached again
    /// since. (A module purged meanwhile is not one: that stays a failed revalidation, retried.)
    pub fn lost_to_verification(&self, key: &ModuleKey) -> bool {
        self.unverified.contains(key) && !self.is_verified(key)
    }

    /// The verifier of the files found at open ([`Verifier::wait`] for one of them).
    pub fn verifier(&self) -> &Arc<Verifier> {
        &self.verifier
    }

    /// Makes sure `key`'s file is verified, blocking this thread until it is (for the rare
    /// synchronous path: restoring what a plugin served before a restart). Returns
    /// [`Cache::is_verified`].
    pub fn verify_now(&mut self, key: &ModuleKey) -> bool {
        if self.pending.contains(key) {
            let verifier = self.verifier.clone();
            crate::fetch::cpu_bound(|| verifier.wait_blocking(key));
            self.settle();
        }
        self.is_verified(key)
    }
}

/// Hex sha256 of a stored file, read in pieces of `buf`'s size.
pub fn hash_file(store: &dyn ModuleStore, path: &Path, buf: &mut [u8]) -> io::Result<String> {
    let mut r = store.open(path)?;
    let mut h = Sha256::new();
    loop {
        let n = match r.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fetch::StagedModule;
    use crate::store::{HookedStore, MemStore, StoreHooks};

    /// Reads of one module file panic (a store's bug); verified on one worker thread of its own.
    /// Reads wait until the test opens the gate, so what it sees before does not depend on how
    /// fast that thread is.
    struct PanicOn {
        bad: PathBuf,
        open: std::sync::Mutex<bool>,
        opened: std::sync::Condvar,
    }

    impl PanicOn {
        fn open_gate(&self) {
            *self.open.lock().unwrap() = true;
            self.opened.notify_all();
        }
    }

    impl StoreHooks for PanicOn {
        fn before_read(&self, path: &Path) {
            let mut open = self.open.lock().unwrap();
            while !*open {
                open = self.opened.wait(open).unwrap();
            }
            drop(open); // the panic below must not poison the gate
            assert!(path != self.bad, "reading {}\nfailed", path.display());
        }
        fn verify_threads(&self, _inner: usize) -> usize {
            1
        }
    }

    #[test]
    fn a_panic_while_verifying_fails_that_module_and_the_worker_goes_on() {
        let mem = Arc::new(MemStore::new());
        let store: Arc<dyn ModuleStore> = mem.clone();
        let keys: Vec<ModuleKey> = ["a", "b", "c"]
            .iter()
            .map(|n| ModuleKey::new(format!("http://h/{n}.wasm"), *n))
            .collect();
        let mut paths = Vec::new();
        {
            let (mut cache, _) = Cache::open(store.clone()).unwrap();
            for k in &keys {
                let bytes = format!("\0asm\x01\0\0\0{}", k.name).into_bytes();
                let staged = StagedModule::of_bytes(store.as_ref(), &bytes).unwrap();
                let entry = cache.insert(k, staged, false, Timestamp::ZERO).unwrap();
                paths.push(entry.path.clone());
                cache.set_resolution(&k.name, k);
            }
            cache.flush(Timestamp::ZERO);
        }
        // Reading the file verified first (the store lists in path order) panics, on the one
        // verification thread: the two others come after it.
        let b = (0..3).min_by_key(|&i| &paths[i]).unwrap();
        let hooks = PanicOn {
            bad: paths[b].clone(),
            open: Default::default(),
            opened: Default::default(),
        };
        let panicky = Arc::new(HookedStore::new(store.clone(), hooks));
        let (mut cache, report) = Cache::open(panicky.clone()).unwrap();
        assert_eq!(report.verifying, 3, "no file read yet");
        panicky.hooks().open_gate();
        // A plugin waiting for that module learns a result instead of waiting forever.
        cache.verifier().wait_blocking(&keys[b]);
        let report = cache.wait_verified();
        assert_eq!((report.kept, report.verifying), (2, 0), "{report:?}");
        assert_eq!(report.removed, vec![paths[b].clone()]);
        assert!(cache.lost_to_verification(&keys[b]), "it is pulled again");
        assert!(!cache.contains(&keys[b]) && cache.resolution(&keys[b].name).is_none());
        // The worker survived the panic: the modules after it were verified by it too.
        let others: Vec<usize> = (0..3).filter(|&i| i != b).collect();
        assert!(others.iter().all(|&i| cache.is_verified(&keys[i])));
        let left: Vec<PathBuf> = mem.list().unwrap().into_iter().map(|m| m.path).collect();
        let mut kept: Vec<PathBuf> = others.iter().map(|&i| paths[i].clone()).collect();
        kept.sort();
        assert_eq!(left, kept, "its file removed, the others kept");
    }

    #[test]
    fn waiting_for_a_module_not_being_verified_ends_at_once() {
        use futures_util::FutureExt as _;
        let mem = Arc::new(MemStore::new());
        let store: Arc<dyn ModuleStore> = mem.clone();
        let key = ModuleKey::new("http://h/a.wasm", "a");
        {
            let (mut cache, _) = Cache::open(store.clone()).unwrap();
            let bytes = format!("\0asm\x01\0\0\0{}", key.name).into_bytes();
            let staged = StagedModule::of_bytes(store.as_ref(), &bytes).unwrap();
            cache.insert(&key, staged, false, Timestamp::ZERO).unwrap();
            cache.set_resolution(&key.name, &key);
            cache.flush(Timestamp::ZERO);
        }
        // Verified at start, on the store's worker threads.
        let (cache, _) = Cache::open(store).unwrap();
        let verifier = cache.verifier();
        verifier.wait_blocking(&key);
        assert_eq!(verifier.remaining(), 0);
        // Verified, and never known: both end at their first poll.
        assert_eq!(verifier.wait(&key).now_or_never(), Some(()));
        let other = ModuleKey::new("http://h/b.wasm", "b");
        assert_eq!(verifier.wait(&other).now_or_never(), Some(()));
    }

    #[test]
    fn a_panic_message_is_one_line() {
        let caught = catch_unwind(|| panic!("reading x\nfailed")).unwrap_err();
        assert_eq!(panic_text(&caught), "reading x failed");
        let caught = catch_unwind(|| std::panic::panic_any(7u8)).unwrap_err();
        assert_eq!(panic_text(&caught), "a panic without a message");
    }
}
