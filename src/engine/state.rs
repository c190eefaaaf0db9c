//! What the engine knows and reports: per-plugin state, what a plugin serves, why it is processed,
//! and the events it records for traces and logs.

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
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
#[derive(Debug, Default)]
pub struct ServedModules {
    shared: HashSet<Arc<ServedModule>>,
    sweep_at: usize,
}

impl ServedModules {
    /// `m` as the `Arc` the plugins served an equal module hold.
    pub fn share(&mut self, m: ServedModule) -> Arc<ServedModule> {
        if let Some(held) = self.shared.get(&m) {
            return held.clone();
        }
        if self.shared.len() >= self.sweep_at {
            self.shared.retain(|held| Arc::strong_count(held) > 1);
            self.sweep_at = 2 * self.shared.len() + 16;
        }
        let m = Arc::new(m);
        self.shared.insert(m.clone());
        m
    }

    /// How many distinct modules are held (some possibly no longer served, until a sweep).
    pub fn len(&self) -> usize {
        self.shared.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shared.is_empty()
    }
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

    fn module(url: &str) -> ServedModule {
        ServedModule {
            url: url.into(),
            key: None,
            path: PathBuf::from("/m.wasm"),
            sha256: "aa".into(),
        }
    }

    #[test]
    fn equal_modules_are_one_arc_and_unheld_ones_are_swept() {
        let mut modules = ServedModules::default();
        let a = modules.share(module("file:///m.wasm"));
        let again = modules.share(module("file:///m.wasm"));
        assert!(Arc::ptr_eq(&a, &again), "one copy for equal modules");
        // Another URL is another module (a plugin's served URL is its own).
        let other = modules.share(module("file:///n.wasm"));
        assert!(!Arc::ptr_eq(&a, &other));
        assert_eq!(modules.len(), 2);
        // Modules no plugin holds any more are dropped as new ones come: the set stays within
        // twice the modules held, plus a few.
        drop((again, other));
        for i in 0..1000 {
            drop(modules.share(module(&format!("file:///{i}.wasm"))));
            assert!(modules.len() <= 2 + 16, "{} held", modules.len());
        }
        assert!(Arc::ptr_eq(&a, &modules.share(module("file:///m.wasm"))));
    }
}
