//! The sha256 of the module files `expect`'s `serves` checks, hashed again only when a module file
//! may have changed.
//!
//! Delivered modules are files: cached modules in the module store, `file://` modules in the
//! simulated local files. Both change only through the simulator: the store when the engine
//! commits, removes or wipes (seen by [`WatchedStore`], which the engine is given instead of the
//! store itself), the local files when a step publishes or unpublishes one (the runner calls
//! [`FileChanges::bump`]). Between two changes a file's bytes are the ones hashed last time, so
//! reading and hashing them again at every `expect` only repeats the same work; after any change
//! every file is read and hashed again.
//!
//! The resources `serves` looks at are decoded again only after they changed, too
//! ([`DecodedResources`]).

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::convert::{Code, Delivered};
use crate::store::{sha256_hex, HookedStore, StoreHooks};
use crate::xds::ResourceStore;

/// How many times a module file changed (any of them), shared by the store wrapper and the runner.
#[derive(Clone, Debug, Default)]
pub struct FileChanges(Arc<AtomicU64>);

impl FileChanges {
    /// A module file changed.
    pub fn bump(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A module store that counts its changes in a [`FileChanges`].
pub type WatchedStore = HookedStore<FileChanges>;

impl StoreHooks for FileChanges {
    fn before_change(&self) {
        self.bump();
    }
}

/// The sha256 of each module file hashed since the last change of any module file.
#[derive(Debug, Default)]
pub struct ServedHashes {
    changes: FileChanges,
    /// The change count the hashes are of, and the hashes by path. Cleared at the first lookup
    /// after a change, so it never holds more than the files delivered since.
    /// Keyed by the path's bytes (hashing a `Path` walks its components).
    known: RefCell<(u64, HashMap<OsString, String>)>,
}

impl ServedHashes {
    pub fn new(changes: FileChanges) -> Self {
        ServedHashes {
            changes,
            known: RefCell::default(),
        }
    }

    /// The hex sha256 of the file at `path`: the one hashed earlier when no module file changed
    /// since, else the sha256 of what `read` returns now.
    pub fn sha256_of(
        &self,
        path: &Path,
        read: impl FnOnce() -> io::Result<Vec<u8>>,
    ) -> io::Result<String> {
        let now = self.changes.count();
        let mut known = self.known.borrow_mut();
        if known.0 != now {
            *known = (now, HashMap::new());
        }
        if let Some(sha) = known.1.get(path.as_os_str()) {
            return Ok(sha.clone());
        }
        let sha = sha256_hex(&read()?);
        known.1.insert(path.as_os_str().to_owned(), sha.clone());
        Ok(sha)
    }
}

/// What a published resource delivers, as `expect`'s `serves` needs it.
#[derive(Debug)]
pub enum Decoded {
    Undecodable,
    DenyAll,
    AllowAll,
    /// The sha256 of inline bytes.
    Inline(String),
    File(PathBuf),
    /// The sha256 a proxy asks the module endpoint for.
    Remote(String),
}

impl Decoded {
    fn of(delivered: Option<Delivered>) -> Self {
        match delivered {
            None => Decoded::Undecodable,
            Some(Delivered::DenyAll) => Decoded::DenyAll,
            Some(Delivered::AllowAll) => Decoded::AllowAll,
            Some(Delivered::Module(Code::Inline(b))) => Decoded::Inline(sha256_hex(&b)),
            Some(Delivered::Module(Code::File(path))) => Decoded::File(path),
            Some(Delivered::Module(Code::Remote { sha256, .. })) => Decoded::Remote(sha256),
        }
    }
}

/// Published resources decoded, by name, with the store revision each is of: a resource is
/// decoded again only after it changed ([`ResourceStore::revision_of`]). One entry per resource
/// name; [`DecodedResources::clear`] it when the store is replaced (a restart), whose revisions
/// start afresh.
#[derive(Debug, Default)]
pub struct DecodedResources(RefCell<HashMap<String, (u64, Rc<Decoded>)>>);

impl DecodedResources {
    /// What the resource `name` of `resources` delivers; `None` when nothing is published under it.
    pub fn get(&self, resources: &ResourceStore, name: &str) -> Option<Rc<Decoded>> {
        let revision = resources.revision_of(name)?;
        let mut known = self.0.borrow_mut();
        if let Some((r, d)) = known.get(name) {
            if *r == revision {
                return Some(d.clone());
            }
        }
        let resource = resources.get(name)?;
        let decoded = Rc::new(Decoded::of(crate::convert::decode_delivered(&resource)));
        known.insert(name.to_string(), (revision, decoded.clone()));
        Some(decoded)
    }

    pub fn clear(&mut self) {
        self.0.get_mut().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MemStore, ModuleStore};
    use std::io::Write as _;

    fn commit(store: &dyn ModuleStore, name: &str, bytes: &[u8]) -> PathBuf {
        let mut staged = store.stage().unwrap();
        staged.write_all(bytes).unwrap();
        store.commit(staged, name, &sha256_hex(bytes)).unwrap()
    }

    /// Hashes `path` through `hashes`, counting the reads of the store.
    fn hash(
        hashes: &ServedHashes,
        store: &dyn ModuleStore,
        path: &Path,
        reads: &mut u32,
    ) -> String {
        hashes
            .sha256_of(path, || {
                *reads += 1;
                store.read(path)
            })
            .unwrap()
    }

    #[test]
    fn a_file_is_read_again_only_after_a_change() {
        let changes = FileChanges::default();
        let store = WatchedStore::new(Arc::new(MemStore::new()), changes.clone());
        let hashes = ServedHashes::new(changes.clone());
        let a = commit(&store, "a", b"module a");
        let mut reads = 0;
        assert_eq!(
            hash(&hashes, &store, &a, &mut reads),
            sha256_hex(b"module a")
        );
        assert_eq!(
            hash(&hashes, &store, &a, &mut reads),
            sha256_hex(b"module a")
        );
        assert_eq!(reads, 1, "unchanged: hashed once");

        // The store changes under the same path: the new bytes are read and hashed.
        store.remove(&a).unwrap();
        let mut staged = store.stage().unwrap();
        staged.write_all(b"not module a").unwrap();
        let again = store.commit(staged, "a", &sha256_hex(b"module a")).unwrap();
        assert_eq!(again, a);
        assert_eq!(
            hash(&hashes, &store, &a, &mut reads),
            sha256_hex(b"not module a")
        );
        assert_eq!(reads, 2);

        // A local file published by a step counts as a change too.
        changes.bump();
        hash(&hashes, &store, &a, &mut reads);
        assert_eq!(reads, 3);

        // A wipe: the file is gone, and that is what the lookup says.
        store.wipe().unwrap();
        let gone = hashes.sha256_of(&a, || store.read(&a));
        assert_eq!(gone.unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn a_resource_is_decoded_again_only_after_it_changed() {
        use envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig;
        use envoy_types::pb::google::protobuf::Any;
        let config = |value: &[u8]| TypedExtensionConfig {
            name: String::new(),
            typed_config: Some(Any {
                type_url: "type.googleapis.com/not.a.Filter".into(),
                value: value.to_vec(),
            }),
        };
        let mut store = ResourceStore::new();
        let mut decoded = DecodedResources::default();
        assert!(decoded.get(&store, "r").is_none(), "nothing published");

        store.set("r", config(b"one"));
        let first = decoded.get(&store, "r").unwrap();
        assert!(matches!(*first, Decoded::Undecodable));
        let again = decoded.get(&store, "r").unwrap();
        assert!(Rc::ptr_eq(&first, &again), "unchanged: not decoded again");

        // The same content again is no change of the resource either.
        store.set("r", config(b"one"));
        assert!(Rc::ptr_eq(&first, &decoded.get(&store, "r").unwrap()));

        store.set("r", config(b"two"));
        let changed = decoded.get(&store, "r").unwrap();
        assert!(!Rc::ptr_eq(&first, &changed), "changed: decoded again");

        store.remove("r");
        assert!(
            decoded.get(&store, "r").is_none(),
            "removed: nothing delivered"
        );

        // A restart's new store counts revisions afresh: what was decoded is forgotten.
        store = ResourceStore::new();
        store.set("r", config(b"three"));
        decoded.clear();
        let fresh = decoded.get(&store, "r").unwrap();
        assert!(!Rc::ptr_eq(&changed, &fresh));
    }
}
