//! The objects `serve` hands to the driver: the plugin files' and, with `--source kubernetes`, the
//! API server's, merged. A name defined by both is never resolved by silent precedence
//! (docs/kubernetes.md "Files and Kubernetes together"): at start-up it is an error; later, the
//! source that already defined it keeps it and the newcomer is reported, and when both appear at
//! once neither is used until one goes.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;

use super::files::Desired;
use crate::k8s::Snapshot;
use crate::plugin::ObjectKey;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    Files,
    Kubernetes,
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
    origins: BTreeMap<(bool, ObjectKey), Origin>,
    /// Conflicts of the last merge, by plugin (secrets: key of the secret).
    pub conflicts: BTreeMap<(bool, ObjectKey), Conflict>,
}

impl Sources {
    /// The merged plugins and secrets.
    pub fn merged(&mut self) -> (BTreeMap<ObjectKey, Value>, BTreeMap<ObjectKey, Value>) {
        self.conflicts.clear();
        let empty = BTreeMap::new();
        let kube = self.kube.clone();
        let (kp, ks) = kube
            .as_deref()
            .map_or((&empty, &empty), |s| (&s.plugins, &s.secrets));
        let (origins, conflicts) = (&mut self.origins, &mut self.conflicts);
        let plugins = merge_kind(origins, conflicts, true, &self.files.plugins, kp);
        let secrets = merge_kind(origins, conflicts, false, &self.files.secrets, ks);
        (plugins, secrets)
    }

    /// Why a Kubernetes plugin is not used, if it is not because of a conflict.
    pub fn kube_conflict(&self, key: &ObjectKey) -> Option<&str> {
        let id = (true, key.clone());
        let c = self.conflicts.get(&id)?;
        (self.origins.get(&id) != Some(&Origin::Kubernetes)).then_some(c.message.as_str())
    }
}

/// One kind's merge: what is used, recording owners and conflicts.
fn merge_kind(
    origins: &mut BTreeMap<(bool, ObjectKey), Origin>,
    conflicts: &mut BTreeMap<(bool, ObjectKey), Conflict>,
    is_plugin: bool,
    files: &BTreeMap<ObjectKey, Value>,
    kube: &BTreeMap<ObjectKey, Value>,
) -> BTreeMap<ObjectKey, Value> {
    let mut out = BTreeMap::new();
    let kind = if is_plugin { "WasmPlugin" } else { "Secret" };
    for (k, v) in files {
        if !kube.contains_key(k) {
            origins.insert((is_plugin, k.clone()), Origin::Files);
            out.insert(k.clone(), v.clone());
        }
    }
    for (k, v) in kube {
        let Some(fv) = files.get(k) else {
            origins.insert((is_plugin, k.clone()), Origin::Kubernetes);
            out.insert(k.clone(), v.clone());
            continue;
        };
        let id = (is_plugin, k.clone());
        let message = match origins.get(&id) {
                Some(Origin::Files) => {
                    out.insert(k.clone(), fv.clone());
                    format!("{kind} {k} is defined both in the plugin files and in Kubernetes; the plugin files' object, which came first, is used")
                }
                Some(Origin::Kubernetes) => {
                    out.insert(k.clone(), v.clone());
                    format!("{kind} {k} is defined both in the plugin files and in Kubernetes; the Kubernetes object, which came first, is used")
                }
                None => format!("{kind} {k} is defined both in the plugin files and in Kubernetes; neither is used until one is removed"),
            };
        conflicts.insert(
            id,
            Conflict {
                object: k.to_string(),
                kind,
                message,
            },
        );
    }
    origins.retain(|(p, k), _| *p != is_plugin || files.contains_key(k) || kube.contains_key(k));
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn key(n: &str) -> ObjectKey {
        ObjectKey::new("default", n)
    }

    fn obj(n: &str, url: &str) -> Value {
        json!({"kind": "WasmPlugin", "metadata": {"name": n}, "spec": {"url": url}})
    }

    fn kube(plugins: &[(&str, &str)]) -> Option<Arc<Snapshot>> {
        let mut s = Snapshot::default();
        for (n, u) in plugins {
            s.plugins.insert(key(n), obj(n, u));
        }
        Some(Arc::new(s))
    }

    #[test]
    fn the_first_owner_keeps_a_name_and_simultaneous_newcomers_get_nothing() {
        let mut s = Sources::default();
        s.files.plugins.insert(key("a"), obj("a", "file-a"));
        s.kube = kube(&[("b", "kube-b")]);
        let (p, _) = s.merged();
        assert_eq!(p.len(), 2);
        assert!(s.conflicts.is_empty());
        // Kubernetes adds "a": the files keep it, the Kubernetes object is reported.
        s.kube = kube(&[("a", "kube-a"), ("b", "kube-b")]);
        let (p, _) = s.merged();
        assert_eq!(p[&key("a")]["spec"]["url"], "file-a");
        assert!(s
            .kube_conflict(&key("a"))
            .unwrap()
            .contains("plugin files' object"));
        // Files add "b": Kubernetes keeps it; not a conflict of the Kubernetes object.
        s.files.plugins.insert(key("b"), obj("b", "file-b"));
        let (p, _) = s.merged();
        assert_eq!(p[&key("b")]["spec"]["url"], "kube-b");
        assert!(s.kube_conflict(&key("b")).is_none());
        assert_eq!(s.conflicts.len(), 2);
        // Both define a new "c" at once: neither.
        s.files.plugins.insert(key("c"), obj("c", "file-c"));
        s.kube = kube(&[("a", "kube-a"), ("b", "kube-b"), ("c", "kube-c")]);
        let (p, _) = s.merged();
        assert!(!p.contains_key(&key("c")));
        assert!(s.kube_conflict(&key("c")).unwrap().contains("neither"));
        // The file goes: Kubernetes gets "c".
        s.files.plugins.remove(&key("c"));
        let (p, _) = s.merged();
        assert_eq!(p[&key("c")]["spec"]["url"], "kube-c");
        assert_eq!(s.conflicts.len(), 2);
    }
}
