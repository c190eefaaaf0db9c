//! What the engine knows and reports: per-plugin state, what a plugin serves, why it is processed,
//! and the events it records for traces and logs.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Serialize, Serializer};

use crate::backoff::Backoff;
use crate::cache::ModuleKey;
use crate::clock::Timestamp;
use crate::outcome::Outcome;
use crate::plugin::{ObjectKey, WasmPlugin};
use crate::policy::Decision;
use crate::url::ModuleUrl;

/// A module served to a plugin.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct ServedModule {
    /// The plugin URL it was obtained from (normalised).
    pub url: String,
    /// Its cache identity; `None` for `file://` modules, which are served from their own path.
    pub key: Option<ModuleKey>,
    pub path: PathBuf,
    /// Hex sha256 of the Wasm binary.
    pub sha256: String,
}

impl ServedModule {
    /// The checksum a pin (`spec.sha256` or an `@sha256:` digest) is compared with: the cache
    /// identity's checksum (the manifest digest for OCI), else the Wasm sha256.
    pub fn checksum(&self) -> &str {
        self.key
            .as_ref()
            .map_or(self.sha256.as_str(), |k| k.checksum.as_str())
    }
}

/// What a proxy subscribing to a plugin receives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Serving {
    /// Not processed yet.
    Nothing,
    /// Shared by the plugins served the same module from the same URL ([`ServedModules`]).
    Module(#[serde(serialize_with = "shared")] Arc<ServedModule>),
    /// RBAC deny-all fallback (`FAIL_CLOSE`).
    DenyAll,
    /// RBAC allow-all fallback (`FAIL_OPEN`).
    AllowAll,
}

impl Serving {
    pub fn describe(&self) -> String {
        match self {
            Serving::Nothing => "nothing".into(),
            Serving::Module(m) => format!("module sha256:{}", &m.sha256[..12.min(m.sha256.len())]),
            Serving::DenyAll => "deny-all".into(),
            Serving::AllowAll => "allow-all".into(),
        }
    }
}

fn shared<S: Serializer>(m: &Arc<ServedModule>, s: S) -> Result<S::Ok, S::Error> {
    m.as_ref().serialize(s)
}

/// One `Arc` per distinct [`ServedModule`] plugins are served: 50,000 plugins of one module from
/// one URL hold one copy of its URL, path and sha256. An entry no plugin holds any more is dropped
/// by a sweep that runs when the set has doubled since the last one (amortised O(1) per module
/// shared; the set stays within twice the modules in use, plus a few).
///
/// Held by a hash of the sha256 and the URL as it displays, so finding the one held formats and
/// allocates nothing (the URL is hashed and compared as it displays, piece by piece); a module is
/// built (its URL formatted) only when none is held. Modules differing only in key or path share
/// a bucket: a handful at most.
#[derive(Debug, Default)]
pub struct ServedModules {
    by_hash: HashMap<u64, Vec<Arc<ServedModule>>>,
    hasher: RandomState,
    len: usize,
    sweep_at: usize,
}

impl ServedModules {
    /// The module with these parts as the `Arc` the plugins served an equal module hold: equal
    /// to the one built from `url.to_string()`, `key`, `path` and `sha256`.
    pub fn share(
        &mut self,
        url: &dyn fmt::Display,
        key: Option<&ModuleKey>,
        path: &Path,
        sha256: &str,
    ) -> Arc<ServedModule> {
        let hash = self.hash(url, sha256);
        let held = (self.by_hash.get(&hash).into_iter().flatten()).find(|m| {
            m.key.as_ref() == key
                && m.sha256 == sha256
                && m.path == path
                && displays_as(url, &m.url)
        });
        if let Some(held) = held {
            return held.clone();
        }
        if self.len >= self.sweep_at {
            self.by_hash.retain(|_, held| {
                held.retain(|m| Arc::strong_count(m) > 1);
                !held.is_empty()
            });
            self.len = self.by_hash.values().map(Vec::len).sum();
            self.sweep_at = 2 * self.len + 16;
        }
        let m = Arc::new(ServedModule {
            url: url.to_string(),
            key: key.cloned(),
            path: path.to_path_buf(),
            sha256: sha256.to_string(),
        });
        self.by_hash.entry(hash).or_default().push(m.clone());
        self.len += 1;
        m
    }

    /// The bucket of a module: its sha256, then its URL byte by byte as it displays (so the same
    /// however the URL writes itself out in pieces).
    fn hash(&self, url: &dyn fmt::Display, sha256: &str) -> u64 {
        struct Bytes<H>(H);
        impl<H: Hasher> fmt::Write for Bytes<H> {
            fn write_str(&mut self, s: &str) -> fmt::Result {
                s.bytes().for_each(|b| self.0.write_u8(b));
                Ok(())
            }
        }
        let mut h = self.hasher.build_hasher();
        h.write(sha256.as_bytes());
        let mut bytes = Bytes(h);
        // Writing to a hasher cannot fail; a Display that fails only lands in a wrong bucket.
        let _ = fmt::write(&mut bytes, format_args!("{url}"));
        bytes.0.finish()
    }

    /// How many distinct modules are held (some possibly no longer served, until a sweep).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Whether `value` displays as `text`, without writing it out.
pub(super) fn displays_as(value: &dyn fmt::Display, text: &str) -> bool {
    struct Rest<'a>(&'a str);
    impl fmt::Write for Rest<'_> {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            self.0 = self.0.strip_prefix(s).ok_or(fmt::Error)?;
            Ok(())
        }
    }
    let mut rest = Rest(text);
    fmt::write(&mut rest, format_args!("{value}")).is_ok() && rest.0.is_empty()
}

/// Why a plugin is processed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// Created or changed (a new resource version).
    Version,
    /// A pull secret it names was applied, changed or deleted.
    Secret,
    /// A background retry after a rejection.
    Retry,
    /// `POST /refresh`: pull as if the plugin had changed.
    Refresh,
}

/// Everything the engine knows about one current plugin.
#[derive(Clone, Debug)]
pub struct PluginState {
    /// The object store's copy (the object as accepted, with its typed spec).
    pub plugin: std::sync::Arc<WasmPlugin>,
    pub version: u64,
    /// The object store's parsed `spec.url`, shared as the object is.
    pub url: std::sync::Arc<ModuleUrl>,
    pub decision: Decision,
    pub serving: Serving,
    pub last_outcome: Option<Outcome>,
    pub last_error: Option<String>,
    pub last_processed: Option<Timestamp>,
    pub last_pull: Option<Timestamp>,
    /// The resource version of the last successful pull (Always bookkeeping, behavior.md §2).
    pub pulled_version: Option<u64>,
    /// The resource version the last finished processing was for: `version` once the current
    /// version has an outcome (`last_outcome` may still be the previous version's before).
    pub processed_version: Option<u64>,
    /// The cached module this plugin resolves to, which it protects from expiry (behavior.md §5):
    /// the module it serves, or — after a failure that made it fall back — the module its URL
    /// (or pin) still resolves to in the cache.
    pub referenced: Option<ModuleKey>,
    /// When the next background retry is due, after a rejection.
    pub retry: Option<Timestamp>,
    /// The background retry sequence: restarted by any processing that is not a retry.
    pub retry_backoff: Backoff,
}

/// Something that happened, for traces and logs.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Processed {
        at: Timestamp,
        plugin: ObjectKey,
        version: Option<u64>,
        outcome: Outcome,
        /// The error message of a rejection or refusal.
        detail: Option<String>,
    },
    /// What a plugin serves changed (a push to subscribed proxies); `None` when it is no longer
    /// served.
    ServingChanged {
        at: Timestamp,
        plugin: ObjectKey,
        serving: Option<Serving>,
    },
    Expired {
        at: Timestamp,
        module: ModuleKey,
        sha256: String,
    },
    RetryScheduled {
        at: Timestamp,
        plugin: ObjectKey,
        due: Timestamp,
    },
}

impl Event {
    /// When it happened.
    pub fn at(&self) -> Timestamp {
        match self {
            Event::Processed { at, .. }
            | Event::ServingChanged { at, .. }
            | Event::Expired { at, .. }
            | Event::RetryScheduled { at, .. } => *at,
        }
    }

    /// The first word of its trace text: `process`, `push`, `purge` or `retry`.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Processed { .. } => "process",
            Event::ServingChanged { .. } => "push",
            Event::Expired { .. } => "purge",
            Event::RetryScheduled { .. } => "retry",
        }
    }

    /// The event as `sim --trace` and `wasm-ecds events` print it (without the time), one
    /// vocabulary for both. `module_name` names a module by its sha256 (the simulator uses the
    /// scenario's module names).
    pub fn trace_text(&self, module_name: &dyn Fn(&str) -> String) -> String {
        let mut text = String::new();
        // Writing into a `String` cannot fail.
        let _ = self.write_trace(&mut text, module_name);
        text
    }

    /// [`Event::trace_text`] written into `out` (the simulator writes it straight into its trace
    /// buffer, without a `String` per event).
    pub fn write_trace<N: fmt::Display>(
        &self,
        out: &mut impl fmt::Write,
        module_name: impl Fn(&str) -> N,
    ) -> fmt::Result {
        match self {
            Event::Processed {
                plugin,
                version,
                outcome,
                detail,
                ..
            } => {
                write!(out, "process {plugin}")?;
                if let Some(v) = version {
                    write!(out, " (resource version {v})")?;
                }
                write!(out, ": {outcome}")?;
                if let Some(d) = detail {
                    write!(out, ": {d}")?;
                }
                Ok(())
            }
            Event::ServingChanged {
                plugin, serving, ..
            } => {
                write!(out, "push {plugin}: ")?;
                match serving {
                    None => out.write_str("removed"),
                    Some(Serving::Module(m)) => write!(
                        out,
                        "module {} (sha256 {})",
                        module_name(&m.sha256),
                        &m.sha256[..m.sha256.len().min(12)]
                    ),
                    Some(other) => out.write_str(&other.describe()),
                }
            }
            Event::Expired { module, sha256, .. } => {
                write!(out, "purge: expired {module} ({})", module_name(sha256))
            }
            Event::RetryScheduled { plugin, due, .. } => {
                write!(out, "retry {plugin} scheduled for {due}")
            }
        }
    }

    /// The plugin the event is about, if any.
    pub fn plugin(&self) -> Option<&ObjectKey> {
        match self {
            Event::Processed { plugin, .. }
            | Event::ServingChanged { plugin, .. }
            | Event::RetryScheduled { plugin, .. } => Some(plugin),
            Event::Expired { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(modules: &mut ServedModules, url: &str) -> Arc<ServedModule> {
        modules.share(&url, None, Path::new("/m.wasm"), "aa")
    }

    #[test]
    fn equal_modules_are_one_arc_and_unheld_ones_are_swept() {
        let mut modules = ServedModules::default();
        let a = module(&mut modules, "file:///m.wasm");
        let again = module(&mut modules, "file:///m.wasm");
        assert!(Arc::ptr_eq(&a, &again), "one copy for equal modules");
        // Another URL is another module (a plugin's served URL is its own).
        let other = module(&mut modules, "file:///n.wasm");
        assert!(!Arc::ptr_eq(&a, &other));
        assert_eq!(modules.len(), 2);
        // Modules no plugin holds any more are dropped as new ones come: the set stays within
        // twice the modules held, plus a few.
        drop((again, other));
        for i in 0..1000 {
            drop(module(&mut modules, &format!("file:///{i}.wasm")));
            assert!(modules.len() <= 2 + 16, "{} held", modules.len());
        }
        assert!(Arc::ptr_eq(&a, &module(&mut modules, "file:///m.wasm")));
    }

    /// The module a plugin is shared is the one built from its formatted URL: found by sha256,
    /// key, path and the URL as it displays, never one differing in any of them.
    #[test]
    fn share_finds_the_module_a_formatted_build_would() {
        let mut served = ServedModules::default();
        let url = ModuleUrl::parse("oci://Registry.example/ns/filter:v1").unwrap();
        let key = ModuleKey::new("registry.example/ns/filter", "sha256:abc");
        let path = Path::new("/cache/a.wasm");
        let a = served.share(&url, Some(&key), path, "aa11");
        assert_eq!(
            *a,
            ServedModule {
                url: url.to_string(),
                key: Some(key.clone()),
                path: path.to_path_buf(),
                sha256: "aa11".into(),
            }
        );
        // The same parts, the URL given as its text: the same `Arc`, nothing added.
        let b = served.share(&url.to_string(), Some(&key), path, "aa11");
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(served.len(), 1);
        // Any part differing is another module, even under the same sha256.
        let other_url = ModuleUrl::parse("oci://registry.example/ns/filter:v2").unwrap();
        let other_key = ModuleKey::new("registry.example/ns/filter", "sha256:def");
        let others = [
            served.share(&other_url, Some(&key), path, "aa11"),
            served.share(&url, Some(&other_key), path, "aa11"),
            served.share(&url, None, path, "aa11"),
            served.share(&url, Some(&key), Path::new("/cache/b.wasm"), "aa11"),
            served.share(&url, Some(&key), path, "bb22"),
        ];
        for (i, m) in others.iter().enumerate() {
            assert!(
                !Arc::ptr_eq(&a, m),
                "variant {i} was shared the first module"
            );
        }
        assert_eq!(served.len(), 6);
        // A URL displaying as a prefix or an extension of the held one is not it.
        let prefix = served.share(&"oci://registry.example/ns/filte", Some(&key), path, "aa11");
        assert!(!Arc::ptr_eq(&a, &prefix));
        assert_eq!(served.len(), 7);
    }
}
