//! The modules the module endpoint offers (`/modules/<sha256>.wasm`), kept by the controller
//! from the engine's events so that the admin server reads a ready [`ModuleIndex`] without going
//! through the controller, and the index is rebuilt only when the set of modules changed: a
//! module entered or left the cache, or a `file://` module gained its first or lost its last
//! plugin. A change that touches neither costs a look at its events, whatever the plugin count.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use crate::driver::{Driver, ModuleIndex};
use crate::engine::{Event, Serving};
use crate::plugin::ObjectKey;

/// The `file://` modules plugins serve, and what the last index was built from.
#[derive(Debug, Default)]
pub struct Offered {
    /// Per plugin serving a `file://` module: its sha256.
    serving: HashMap<ObjectKey, String>,
    /// sha256 → a path it is served from (the first plugin's: the bytes are the same) and how
    /// many plugins serve it.
    files: BTreeMap<String, (PathBuf, usize)>,
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
        let files = (self.files.iter()).map(|(sha, (path, _))| (sha.as_str(), path.as_path()));
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
                let (_, count) =
                    (self.files.entry(m.sha256.clone())).or_insert_with(|| (m.path.clone(), 0));
                *count += 1;
                self.stale |= *count == 1;
                self.serving.insert(plugin.clone(), m.sha256.clone());
            }
        }
    }
}
