//! The objects as last listed and watched ([`Snapshot`]), kept up to date change by change: its
//! maps are persistent (`imbl::OrdMap`), so publishing one is a clone of a few pointers, an event
//! costs an insert or a removal, and two snapshots of one lineage are compared by walking only
//! what differs (`OrdMap::diff` skips the subtrees they share). A change of one object among
//! 50,000 costs the same as among 100.

use std::collections::BTreeMap;
use std::sync::Arc;

use imbl::ordmap::DiffItem;
use serde_json::Value;

use crate::plugin::{Object, ObjectKey};

/// Objects by key, as snapshots hold them.
pub type ObjectMap<V> = imbl::OrdMap<ObjectKey, V>;

/// The objects as last listed and watched.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Plugins as admission sees them: without `status`, `metadata.resourceVersion` and
    /// `metadata.managedFields`, which change with every status write (a status write is not a
    /// change of the plugin: under `Always` it would pull again after every one).
    /// Shared with the object store once admitted.
    pub plugins: ObjectMap<Object>,
    /// `EnvoyFilter`s, likewise stripped (behavior.md §10).
    pub envoy_filters: ObjectMap<Object>,
    /// Pull Secrets, likewise stripped.
    pub secrets: ObjectMap<Object>,
    /// What the status writer needs of each plugin object, one `Arc` kept while it does not
    /// change (so two snapshots are compared by pointer: [`changed_meta`]).
    pub meta: ObjectMap<Arc<ObjectMeta>>,
}

/// The server-managed part of a plugin object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjectMeta {
    pub resource_version: String,
    pub generation: Option<i64>,
    /// `status.conditions` as stored.
    pub conditions: Vec<Value>,
}

/// The keys whose values differ between two maps of one lineage (present in one only, or
/// another value: an `Arc` compared by pointer first), in key order.
pub fn changed_keys<'a, V: PartialEq + Clone>(
    old: &'a ObjectMap<V>,
    new: &'a ObjectMap<V>,
) -> impl Iterator<Item = &'a ObjectKey> {
    old.diff(new).map(|d| match d {
        DiffItem::Add(k, _) | DiffItem::Remove(k, _) => k,
        DiffItem::Update { new: (k, _), .. } => k,
    })
}

/// The plugins whose server-managed part differs between two snapshots (present in one only, or
/// another `Arc`: a listing keeps the `Arc` of an unchanged object), in key order.
pub fn changed_meta<'a>(old: &'a Snapshot, new: &'a Snapshot) -> Vec<&'a ObjectKey> {
    changed_keys(&old.meta, &new.meta).collect()
}

/// One listed object as snapshots hold it: its admission view, one shared text kept for as long as the
/// view does not change (every snapshot and the object store share it, so an event re-allocates
/// nothing of the objects it does not change), and its server-managed part, likewise one `Arc`
/// while it does not change. The raw object is not kept: every write changes
/// `metadata.resourceVersion`, so two events with equal views and metadata are the same object.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Listed {
    pub(super) view: Object,
    pub(super) meta: Arc<ObjectMeta>,
}

/// Which kind of object a listing holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Plugin,
    Filter,
    Secret,
}

/// The current snapshot, changed object by object, and how many plugins and EnvoyFilters each
/// namespace has (whose Secrets are watched).
#[derive(Debug, Default)]
pub(super) struct Current {
    pub(super) snapshot: Snapshot,
    namespaces: BTreeMap<String, usize>,
    /// A namespace got its first plugin or EnvoyFilter or lost its last since this was reset.
    pub(super) namespaces_changed: bool,
}

impl Current {
    /// `key` of a listing of `kind` is `now` (`None`: gone).
    pub(super) fn set(&mut self, kind: Kind, key: &ObjectKey, now: Option<&Listed>) {
        let s = &mut self.snapshot;
        let (existed, exists) = match kind {
            Kind::Plugin => {
                match now {
                    Some(l) => s.meta.insert(key.clone(), l.meta.clone()),
                    None => s.meta.remove(key),
                };
                (put(&mut s.plugins, key, now), now.is_some())
            }
            Kind::Filter => (put(&mut s.envoy_filters, key, now), now.is_some()),
            Kind::Secret => {
                put(&mut s.secrets, key, now);
                return;
            }
        };
        match (existed, exists) {
            (false, true) => {
                let n = self.namespaces.entry(key.namespace.clone()).or_default();
                *n += 1;
                self.namespaces_changed |= *n == 1;
            }
            (true, false) => {
                if let Some(n) = self.namespaces.get_mut(&key.namespace) {
                    *n -= 1;
                    if *n == 0 {
                        self.namespaces.remove(&key.namespace);
                        self.namespaces_changed = true;
                    }
                }
            }
            _ => {}
        }
    }

    /// The namespaces with plugins or EnvoyFilters.
    pub(super) fn namespaces(&self) -> impl Iterator<Item = &String> {
        self.namespaces.keys()
    }
}

/// Puts `key`'s view into `map` (or removes it); whether it was there before.
fn put(map: &mut ObjectMap<Object>, key: &ObjectKey, now: Option<&Listed>) -> bool {
    match now {
        Some(l) => map.insert(key.clone(), l.view.clone()).is_some(),
        None => map.remove(key).is_some(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn listed(rv: &str) -> Listed {
        Listed {
            view: Object::new(&json!({"rv": rv})),
            meta: Arc::new(ObjectMeta {
                resource_version: rv.into(),
                ..ObjectMeta::default()
            }),
        }
    }

    #[test]
    fn namespaces_are_counted_and_changes_are_found_between_snapshots() {
        let mut cur = Current::default();
        let key = |ns: &str, n: &str| ObjectKey::new(ns, n);
        for i in 0..1000 {
            cur.set(
                Kind::Plugin,
                &key("a", &format!("p{i:04}")),
                Some(&listed("1")),
            );
        }
        cur.set(Kind::Filter, &key("b", "f"), Some(&listed("1")));
        cur.set(Kind::Secret, &key("c", "s"), Some(&listed("1")));
        assert!(std::mem::take(&mut cur.namespaces_changed));
        let names: Vec<&str> = cur.namespaces().map(String::as_str).collect();
        assert_eq!(names, ["a", "b"], "Secrets do not make a namespace watched");

        let before = cur.snapshot.clone();
        // Another plugin in a namespace that has some: no namespace change.
        cur.set(Kind::Plugin, &key("a", "p0500"), Some(&listed("2")));
        cur.set(Kind::Plugin, &key("a", "zz"), Some(&listed("1")));
        cur.set(Kind::Filter, &key("b", "f"), None);
        assert!(cur.namespaces_changed, "b lost its last object");
        let after = &cur.snapshot;
        let plugins: Vec<String> = (changed_keys(&before.plugins, &after.plugins))
            .map(ToString::to_string)
            .collect();
        assert_eq!(plugins, ["a/p0500", "a/zz"]);
        let metas: Vec<String> = (changed_meta(&before, after).into_iter())
            .map(ToString::to_string)
            .collect();
        assert_eq!(metas, plugins);
        assert_eq!(
            changed_keys(&before.envoy_filters, &after.envoy_filters).count(),
            1
        );
        assert_eq!(changed_keys(&before.secrets, &after.secrets).count(), 0);
        let names: Vec<&str> = cur.namespaces().map(String::as_str).collect();
        assert_eq!(names, ["a"]);
        // The old snapshot is untouched by the changes made after it.
        assert_eq!(before.plugins.len(), 1000);
        assert_eq!(before.plugins[&key("a", "p0500")].value()["rv"], "1");
    }
}
