//! The modules the module endpoint offers (`/modules/<sha256>.wasm`), kept by the controller
//! from the engine's events so that the admin server reads a ready [`ModuleIndex`] without going
//! through the controller, and the index is rebuilt only when the set of modules changed: a
//! module entered or left the cache, or a `file://` module gained its first or lost its last
//! plugin. A change that touches neither costs a look at its events, whatever the plugin count.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use crate::driver::{Driver, ModuleIndex};
use crate::engine::{Event, Serving};
use crate::plugin::ObjectKey;

/// The `file://` modules plugins serve, and what the last index was built from.
#[derive(Debug, Default)]
pub struct Offered {
    /// Per plugin serving a `file://` module: its sha256, the very key of `files` (one copy
    /// per module, not per plugin).
    serving: HashMap<ObjectKey, Arc<str>>,
    /// sha256 → a path it is served from (the first plugin's: the bytes are the same) and how
    /// many plugins serve it.
    files: BTreeMap<Arc<str>, (PathBuf, usize)>,
    /// The cache's entry count when the index was last built (`None`: never built).
    cached: Option<usize>,
    /// The set of modules changed since the index was last built.
    stale: bool,
}

impl Offered {
    /// Notes what `events` changed; returns a new index when the set of offered modules did
    /// (always the first time).
    pub fn update(&mut self, driver: &Driver, events: &[Event]) -> Option<ModuleIndex> {
        for e in events {
            match e {
                Event::ServingChanged {
                    plugin, serving, ..
                } => self.serving_changed(plugin, serving.as_ref()),
                Event::Expired { .. } => self.stale = true,
                _ => {}
            }
        }
        let cached = driver.engine().cache().len();
        if !self.stale && self.cached == Some(cached) {
            return None;
        }
        self.stale = false;
        self.cached = Some(cached);
        let files = (self.files.iter()).map(|(sha, (path, _))| (&**sha, path.as_path()));
        Some(driver.module_index(files))
    }

    fn serving_changed(&mut self, plugin: &ObjectKey, serving: Option<&Serving>) {
        if let Some(old) = self.serving.remove(plugin) {
            if let Some((_, count)) = self.files.get_mut(&old) {
                *count -= 1;
                if *count == 0 {
                    self.files.remove(&old);
                    self.stale = true;
                }
            }
        }
        if let Some(Serving::Module(m)) = serving {
            if m.key.is_none() {
                let sha: Arc<str> = match self.files.get_key_value(m.sha256.as_str()) {
                    Some((sha, _)) => sha.clone(),
                    None => m.sha256.as_str().into(),
                };
                let (_, count) =
                    (self.files.entry(sha.clone())).or_insert_with(|| (m.path.clone(), 0));
                *count += 1;
                self.stale |= *count == 1;
                self.serving.insert(plugin.clone(), sha);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ServedModule;

    fn file_module(sha: &str) -> Serving {
        Serving::Module(Arc::new(ServedModule {
            url: "file:///m.wasm".into(),
            key: None,
            path: PathBuf::from("/m.wasm"),
            sha256: sha.into(),
        }))
    }

    #[test]
    fn plugins_serving_one_file_module_share_its_sha256_and_count_it() {
        let mut offered = Offered::default();
        let keys: Vec<ObjectKey> = (0..3)
            .map(|i| ObjectKey::new("ns", format!("p{i}")))
            .collect();
        for k in &keys {
            offered.serving_changed(k, Some(&file_module("aa")));
        }
        assert_eq!(offered.files.len(), 1);
        let (sha, (_, count)) = offered.files.iter().next().unwrap();
        assert_eq!(*count, 3);
        // One copy of the sha256: the key of `files`, held by each plugin's record.
        assert!(offered.serving.values().all(|s| Arc::ptr_eq(s, sha)));
        assert_eq!(Arc::strong_count(sha), 4);
        // A plugin moving to another module, then every plugin gone: nothing is left.
        offered.serving_changed(&keys[0], Some(&file_module("bb")));
        assert_eq!(offered.files["aa"].1, 2);
        for k in &keys {
            offered.serving_changed(k, None);
        }
        assert!(offered.files.is_empty() && offered.serving.is_empty());
    }
}
