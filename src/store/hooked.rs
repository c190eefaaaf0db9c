//! A module store seen through hooks: the simulator's change counter and the tests' gates and
//! faults wrap a real store in [`HookedStore`] and say only what they add, so every other call —
//! including any method the trait gains later — reaches the wrapped store unchanged.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{ModuleStore, StagedFile, StoredModule};

/// What a [`HookedStore`] adds to the store it wraps. Every hook does nothing by default.
pub trait StoreHooks: Send + Sync {
    /// Before a module file is read or opened (the verifier's and the module endpoint's reads).
    fn before_read(&self, _path: &Path) {}
    /// Before something that may change the module files: a commit, a removal, a wipe. Called
    /// whether or not the change then succeeds (a failed one may have changed something too).
    fn before_change(&self) {}
    /// The verifier threads to report, given the wrapped store's.
    fn verify_threads(&self, inner: usize) -> usize {
        inner
    }
}

/// `inner` with `hooks` called around its operations.
pub struct HookedStore<H> {
    inner: Arc<dyn ModuleStore>,
    hooks: H,
}

impl<H: StoreHooks> HookedStore<H> {
    pub fn new(inner: Arc<dyn ModuleStore>, hooks: H) -> Self {
        HookedStore { inner, hooks }
    }

    pub fn hooks(&self) -> &H {
        &self.hooks
    }
}

impl<H: StoreHooks> ModuleStore for HookedStore<H> {
    fn stage(&self) -> io::Result<Box<dyn StagedFile>> {
        self.inner.stage()
    }

    fn commit(
        &self,
        staged: Box<dyn StagedFile>,
        module_name: &str,
        checksum: &str,
    ) -> io::Result<PathBuf> {
        self.hooks.before_change();
        self.inner.commit(staged, module_name, checksum)
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        self.hooks.before_read(path);
        self.inner.read(path)
    }

    fn open(&self, path: &Path) -> io::Result<Box<dyn Read + Send>> {
        self.hooks.before_read(path);
        self.inner.open(path)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        self.hooks.before_change();
        self.inner.remove(path)
    }

    fn list(&self) -> io::Result<Vec<StoredModule>> {
        self.inner.list()
    }

    fn load_index(&self) -> io::Result<Option<Vec<u8>>> {
        self.inner.load_index()
    }

    fn save_index(&self, bytes: &[u8]) -> io::Result<()> {
        self.inner.save_index(bytes)
    }

    fn wipe(&self) -> io::Result<()> {
        self.hooks.before_change();
        self.inner.wipe()
    }

    fn survives_crash(&self) -> bool {
        self.inner.survives_crash()
    }

    fn verify_threads(&self) -> usize {
        self.hooks.verify_threads(self.inner.verify_threads())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fetch::StagedModule;
    use crate::store::MemStore;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    #[derive(Default)]
    struct Record {
        reads: Mutex<Vec<PathBuf>>,
        changes: AtomicUsize,
    }

    impl StoreHooks for Record {
        fn before_read(&self, path: &Path) {
            self.reads.lock().unwrap().push(path.to_path_buf());
        }
        fn before_change(&self) {
            self.changes.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Reads and changes go through the hooks and then to the wrapped store, whose answers and
    /// properties (crash survival, verifier threads) the wrapper keeps.
    #[test]
    fn hooks_see_reads_and_changes_and_the_wrapped_store_answers() {
        let mem: Arc<dyn ModuleStore> = Arc::new(MemStore::new());
        let store = HookedStore::new(mem.clone(), Record::default());
        let bytes = b"\0asm\x01\0\0\0hooked".to_vec();
        let staged = StagedModule::of_bytes(&store, &bytes).unwrap();
        let path = store
            .commit(staged.file, "m", &staged.sha256)
            .expect("commit");
        assert_eq!(store.read(&path).unwrap(), bytes);
        let mut opened = Vec::new();
        store.open(&path).unwrap().read_to_end(&mut opened).unwrap();
        assert_eq!(opened, bytes);
        assert_eq!(
            mem.list().unwrap().len(),
            1,
            "committed into the wrapped store"
        );
        store.remove(&path).unwrap();
        store.wipe().unwrap();
        let hooks = store.hooks();
        assert_eq!(*hooks.reads.lock().unwrap(), vec![path.clone(), path]);
        assert_eq!(hooks.changes.load(Ordering::Relaxed), 3);
        assert_eq!(store.survives_crash(), mem.survives_crash());
        assert_eq!(store.verify_threads(), mem.verify_threads());
    }
}
