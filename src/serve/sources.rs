//! The objects `serve` hands to the driver: the plugin files' and, with `--source kubernetes`, the
//! API server's, merged kind by kind (WasmPlugins, EnvoyFilters, Secrets). A name defined by both is never resolved by silent precedence
//! (docs/kubernetes.md "Files and Kubernetes together"): at start-up it is an error; later, the
//! source that already defined it keeps it and the newcomer is reported, and when both appear at
//! once neither is used until one goes.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

use super::files::{ChangedKeys, Desired};
use crate::driver::ObjectChanges;
use crate::k8s::snapshot::{changed_keys, ObjectMap};
use crate::k8s::Snapshot;
use crate::plugin::{Object, ObjectKey};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    Files,
    Kubernetes,
}

/// The kinds merged, by name.
const WASM_PLUGIN: &str = "WasmPlugin";
const ENVOY_FILTER: &str = crate::plugin::envoyfilter::ENVOY_FILTER_KIND;
const SECRET: &str = "Secret";

/// The objects of both sources, merged.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Merged {
    pub plugins: BTreeMap<ObjectKey, Object>,
    pub envoy_filters: BTreeMap<ObjectKey, Object>,
    pub secrets: BTreeMap<ObjectKey, Object>,
}

/// A name defined by both sources.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Conflict {
    pub object: String,
    pub kind: &'static str,
    pub message: String,
}

/// The latest of each source and who owns which name.
#[derive(Debug, Default)]
pub struct Sources {
    pub files: Desired,
    pub kube: Option<Arc<Snapshot>>,
    /// No Kubernetes source (`serve` without `--source kubernetes`): no name can be defined by
    /// both, so the files' objects are used as they are and no owner is recorded (an entry per
    /// object saved).
    files_only: bool,
    origins: BTreeMap<(&'static str, ObjectKey), Origin>,
    /// Conflicts of the last merge, by kind and key.
    pub conflicts: BTreeMap<(&'static str, ObjectKey), Conflict>,
}

impl Sources {
    /// No objects yet; `files_only` when there is no Kubernetes source.
    pub fn new(files_only: bool) -> Self {
        Sources {
            files_only,
            ..Default::default()
        }
    }

    /// The merged plugins, EnvoyFilters and secrets.
    pub fn merged(&mut self) -> Merged {
        self.conflicts.clear();
        if self.files_only && self.kube.is_none() {
            return Merged {
                plugins: self.files.plugins.clone(),
                envoy_filters: self.files.envoy_filters.clone(),
                secrets: self.files.secrets.clone(),
            };
        }
        let empty = ObjectMap::new();
        let kube = self.kube.clone();
        let k = kube.as_deref();
        let (origins, conflicts) = (&mut self.origins, &mut self.conflicts);
        let mut merge = |kind, files, kube: Option<&ObjectMap<Object>>| {
            merge_kind(origins, conflicts, kind, files, kube.unwrap_or(&empty))
        };
        Merged {
            plugins: merge(WASM_PLUGIN, &self.files.plugins, k.map(|s| &s.plugins)),
            envoy_filters: merge(
                ENVOY_FILTER,
                &self.files.envoy_filters,
                k.map(|s| &s.envoy_filters),
            ),
            secrets: merge(SECRET, &self.files.secrets, k.map(|s| &s.secrets)),
        }
    }

    /// What the merge of both sources makes of the objects `changed` (by kind and key) now, for
    /// [`Driver::sync_changed`](crate::driver::Driver::sync_changed); owners and conflicts of
    /// those objects are updated as [`merged`](Self::merged) would.
    pub fn merge_changed(&mut self, changed: &ChangedKeys) -> ObjectChanges {
        let mut out = ObjectChanges::default();
        let kube = self.kube.clone();
        for (kind, key) in changed {
            let (files, kube, to) = match *kind {
                WASM_PLUGIN => (
                    &self.files.plugins,
                    kube.as_ref().map(|s| &s.plugins),
                    &mut out.plugins,
                ),
                ENVOY_FILTER => (
                    &self.files.envoy_filters,
                    kube.as_ref().map(|s| &s.envoy_filters),
                    &mut out.envoy_filters,
                ),
                _ => (
                    &self.files.secrets,
                    kube.as_ref().map(|s| &s.secrets),
                    &mut out.secrets,
                ),
            };
            if self.files_only && kube.is_none() {
                to.insert(key.clone(), files.get(key).cloned());
                continue;
            }
            let (origins, conflicts) = (&mut self.origins, &mut self.conflicts);
            let used = merge_key(
                origins,
                conflicts,
                kind,
                key,
                files.get(key),
                kube.and_then(|m| m.get(key)),
            );
            to.insert(key.clone(), used.cloned());
        }
        out
    }

    /// Why a Kubernetes plugin is not used, if it is not because of a conflict.
    pub fn kube_conflict(&self, key: &ObjectKey) -> Option<&str> {
        let id = (WASM_PLUGIN, key.clone());
        let c = self.conflicts.get(&id)?;
        (self.origins.get(&id) != Some(&Origin::Kubernetes)).then_some(c.message.as_str())
    }
}

/// One kind's merge: what is used, recording owners and conflicts.
fn merge_kind(
    origins: &mut BTreeMap<(&'static str, ObjectKey), Origin>,
    conflicts: &mut BTreeMap<(&'static str, ObjectKey), Conflict>,
    kind: &'static str,
    files: &BTreeMap<ObjectKey, Object>,
    kube: &ObjectMap<Object>,
) -> BTreeMap<ObjectKey, Object> {
    let mut out = BTreeMap::new();
    for k in files
        .keys()
        .chain(kube.keys().filter(|k| !files.contains_key(*k)))
    {
        let v = merge_key(origins, conflicts, kind, k, files.get(k), kube.get(k));
        if let Some(v) = v {
            out.insert(k.clone(), v.clone());
        }
    }
    origins.retain(|(o, k), _| *o != kind || files.contains_key(k) || kube.contains_key(k));
    out
}

/// One object's merge: what is used of its definitions in the files and in Kubernetes, recording
/// its owner and its conflict.
fn merge_key<'a>(
    origins: &mut BTreeMap<(&'static str, ObjectKey), Origin>,
    conflicts: &mut BTreeMap<(&'static str, ObjectKey), Conflict>,
    kind: &'static str,
    k: &ObjectKey,
    files: Option<&'a Object>,
    kube: Option<&'a Object>,
) -> Option<&'a Object> {
    let id = (kind, k.clone());
    conflicts.remove(&id);
    let (fv, v) = match (files, kube) {
        (None, None) => {
            origins.remove(&id);
            return None;
        }
        (Some(fv), None) => {
            origins.insert(id, Origin::Files);
            return Some(fv);
        }
        (None, Some(v)) => {
            origins.insert(id, Origin::Kubernetes);
            return Some(v);
        }
        (Some(fv), Some(v)) => (fv, v),
    };
    let (used, message) = match origins.get(&id) {
        Some(Origin::Files) => (Some(fv), format!("{kind} {k} is defined both in the plugin files and in Kubernetes; the plugin files' object, which came first, is used")),
        Some(Origin::Kubernetes) => (Some(v), format!("{kind} {k} is defined both in the plugin files and in Kubernetes; the Kubernetes object, which came first, is used")),
        None => (None, format!("{kind} {k} is defined both in the plugin files and in Kubernetes; neither is used until one is removed")),
    };
    conflicts.insert(
        id,
        Conflict {
            object: k.to_string(),
            kind,
            message,
        },
    );
    used
}

/// The objects two Kubernetes snapshots differ in (all of `new`'s when there was none before):
/// work per changed object, as snapshots of one watch share what did not change.
pub fn snapshot_changes(old: Option<&Snapshot>, new: Option<&Snapshot>) -> ChangedKeys {
    let empty = Snapshot::default();
    let (old, new) = (old.unwrap_or(&empty), new.unwrap_or(&empty));
    let mut changed = ChangedKeys::new();
    for (kind, a, b) in [
        (WASM_PLUGIN, &old.plugins, &new.plugins),
        (ENVOY_FILTER, &old.envoy_filters, &new.envoy_filters),
        (SECRET, &old.secrets, &new.secrets),
    ] {
        changed.extend(changed_keys(a, b).map(|k| (kind, k.clone())));
    }
    changed
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn key(n: &str) -> ObjectKey {
        ObjectKey::new("default", n)
    }

    fn obj(n: &str, url: &str) -> Object {
        Object::new(&json!({"kind": "WasmPlugin", "metadata": {"name": n}, "spec": {"url": url}}))
    }

    fn kube(plugins: &[(&str, &str)]) -> Option<Arc<Snapshot>> {
        let mut s = Snapshot::default();
        for (n, u) in plugins {
            s.plugins.insert(key(n), obj(n, u));
        }
        Some(Arc::new(s))
    }

    #[test]
    fn files_only_the_files_objects_are_used_as_they_are_with_no_owner_recorded() {
        let mut s = Sources::new(true);
        s.files.plugins.insert(key("a"), obj("a", "file-a"));
        s.files.plugins.insert(key("b"), obj("b", "file-b"));
        let m = s.merged();
        assert_eq!(m.plugins, s.files.plugins);
        assert!(m.plugins[&key("a")].ptr_eq(&s.files.plugins[&key("a")]));
        s.files.plugins.remove(&key("b"));
        let changed = [(WASM_PLUGIN, key("a")), (WASM_PLUGIN, key("b"))].into();
        let c = s.merge_changed(&changed);
        assert_eq!(c.plugins[&key("a")], Some(obj("a", "file-a")));
        assert_eq!(c.plugins[&key("b")], None);
        assert!(s.origins.is_empty() && s.conflicts.is_empty());
        // The same merge as with origins recorded.
        let mut recorded = Sources::default();
        recorded.files.plugins = s.files.plugins.clone();
        assert_eq!(recorded.merged(), s.merged());
        assert_eq!(recorded.origins.len(), 1);
    }

    #[test]
    fn the_first_owner_keeps_a_name_and_simultaneous_newcomers_get_nothing() {
        let mut s = Sources::default();
        s.files.plugins.insert(key("a"), obj("a", "file-a"));
        s.kube = kube(&[("b", "kube-b")]);
        let p = s.merged().plugins;
        assert_eq!(p.len(), 2);
        assert!(s.conflicts.is_empty());
        // Kubernetes adds "a": the files keep it, the Kubernetes object is reported.
        s.kube = kube(&[("a", "kube-a"), ("b", "kube-b")]);
        let p = s.merged().plugins;
        assert_eq!(p[&key("a")].value()["spec"]["url"], "file-a");
        assert!(s
            .kube_conflict(&key("a"))
            .unwrap()
            .contains("plugin files' object"));
        // Files add "b": Kubernetes keeps it; not a conflict of the Kubernetes object.
        s.files.plugins.insert(key("b"), obj("b", "file-b"));
        let p = s.merged().plugins;
        assert_eq!(p[&key("b")].value()["spec"]["url"], "kube-b");
        assert!(s.kube_conflict(&key("b")).is_none());
        assert_eq!(s.conflicts.len(), 2);
        // Both define a new "c" at once: neither.
        s.files.plugins.insert(key("c"), obj("c", "file-c"));
        s.kube = kube(&[("a", "kube-a"), ("b", "kube-b"), ("c", "kube-c")]);
        let p = s.merged().plugins;
        assert!(!p.contains_key(&key("c")));
        assert!(s.kube_conflict(&key("c")).unwrap().contains("neither"));
        // The file goes: Kubernetes gets "c".
        s.files.plugins.remove(&key("c"));
        let p = s.merged().plugins;
        assert_eq!(p[&key("c")].value()["spec"]["url"], "kube-c");
        assert_eq!(s.conflicts.len(), 2);
        // An EnvoyFilter is a kind of its own: the WasmPlugin "a" of the files is no conflict.
        let mut snapshot = (**s.kube.as_ref().unwrap()).clone();
        snapshot
            .envoy_filters
            .insert(key("a"), Object::new(&json!({"kind": "EnvoyFilter"})));
        s.kube = Some(Arc::new(snapshot));
        let m = s.merged();
        assert_eq!(m.envoy_filters.len(), 1);
        assert_eq!(m.plugins[&key("a")].value()["spec"]["url"], "file-a");
        assert_eq!(s.conflicts.len(), 2);
    }
}
