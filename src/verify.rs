//! Start-up verification of the cached module files (behavior.md §5 "The cache survives
//! restarts"): each file the index knows is hashed again before it is served.
//!
//! Hashing a whole cache before serving anything made a cold start with 1,000 cached 1 MiB modules
//! take a second on one thread. The [`Verifier`] hashes on threads of its own (one per core) in an
//! order the cache chooses — the modules plugins served before the restart first — and moves a
//! module to the front of the queue as soon as a plugin needs it ([`Verifier::wait`]), so a plugin
//! waits for its own module, not for the whole cache. A store read from memory (the simulator's)
//! is verified on the caller's thread at open, in index order, so it stays deterministic.
//!
//! A file that does not verify is removed by the verifier itself, under its lock, unless the
//! module was downloaded again meanwhile ([`Verifier::supersede`]): the fresh file under the same
//! name is then never touched. The cache learns the results when it asks ([`Verifier::take`]).

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use sha2::{Digest, Sha256};

use crate::cache::ModuleKey;
use crate::store::ModuleStore;

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
        {
            let mut guard = self.lock();
            let st = &mut *guard;
            if let Some((_, status)) = st.checks.get_mut(key) {
                if matches!(status, Status::Queued | Status::Running) {
                    st.remaining -= 1;
                }
                *status = Status::Superseded;
            }
        }
        self.wake();
    }

    /// Waits until `key` is no longer waiting for verification, moving it to the front first.
    /// Its result reaches the cache through [`Verifier::take`].
    pub async fn wait(&self, key: &ModuleKey) {
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
            let hashed = hash_file(self.store.as_ref(), &check.path, &mut buf);
            let ok = hashed.ok().as_deref() == Some(check.sha256.as_str());
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
                if let Err(e) = self.store.remove(&check.path) {
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
            if finished && kept + removed > 0 {
                tracing::info!(kept, removed, "cache verified");
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

fn pending(st: &State, key: &ModuleKey) -> bool {
    !st.cancelled
        && matches!(
            st.checks.get(key),
            Some((_, Status::Queued | Status::Running))
        )
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
