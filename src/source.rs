//! The object source: the set of current `WasmPlugin`s, `EnvoyFilter`s and pull secrets, and the
//! plugins with their resource versions (behavior.md §1, §3, §10). It plays the part of the
//! Kubernetes API server: it validates on admission (a refused *change* keeps the last accepted
//! object), assigns a new resource version to every accepted change of spec or metadata, and treats
//! re-applying an identical object as a no-op.
//!
//! An `EnvoyFilter` is admitted patch by patch: each served patch is a plugin of its own (created,
//! changed, refused or deleted on its own), and plugins of patches the object no longer has are
//! deleted. One ECDS resource name is served by one plugin: a new plugin whose resource another
//! plugin serves is refused ([`Change::Conflict`]) until that one is gone.
//!
//! `serve` feeds it from watched files, `sim` from scenario steps; both hand its changes to the
//! [`Engine`](crate::engine::Engine).
//!
//! Length: about 620 lines, some 230 of them tests.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::plugin::envoyfilter::{self, PatchKind};
use crate::plugin::{
    self, EnvoyFilter, FieldError, Manifest, Object, ObjectKey, PullSecret, WasmPlugin,
};
use crate::url::ModuleUrl;

/// A plugin with the resource version of its current object.
#[derive(Clone, Debug, PartialEq)]
pub struct VersionedPlugin {
    /// Shared with the engine's state of the plugin: one copy of each accepted object.
    pub plugin: std::sync::Arc<WasmPlugin>,
    pub version: u64,
    /// `spec.url`, parsed once at admission; shared with the engine's state of the plugin.
    pub url: std::sync::Arc<ModuleUrl>,
}

/// What applying an object did.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    PluginCreated(ObjectKey),
    PluginChanged(ObjectKey),
    PluginDeleted(ObjectKey),
    SecretApplied(ObjectKey),
    SecretDeleted(ObjectKey),
    /// Identical to what is stored.
    Unchanged(ObjectKey),
    /// A new plugin whose ECDS resource name another plugin serves: refused (like an invalid
    /// field, `error.field` naming where the name comes from) until that one is gone.
    Conflict {
        key: ObjectKey,
        resource: String,
        error: FieldError,
    },
    /// An `EnvoyFilter` was applied (or, `deleted`, removed): what that did to the plugin of each
    /// of its patches, in patch order, then to the plugins of patches it no longer has; and one
    /// note per patch that is not served.
    EnvoyFilter {
        key: ObjectKey,
        deleted: bool,
        changes: Vec<Change>,
        notes: Vec<String>,
    },
    /// Refused by validation: nothing stored changed. `key` is `None` when the object had no name.
    Refused {
        key: Option<ObjectKey>,
        is_plugin: bool,
        error: FieldError,
    },
}

impl Change {
    /// This change and the ones it is made of (an `EnvoyFilter`'s), depth first.
    pub fn flatten(&self) -> Vec<&Change> {
        match self {
            Change::EnvoyFilter { changes, .. } => std::iter::once(self)
                .chain(changes.iter().flat_map(Change::flatten))
                .collect(),
            _ => vec![self],
        }
    }
}

/// A stored `EnvoyFilter`.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredFilter {
    /// The object as last accepted.
    pub object: Value,
    /// The plugins its patches define now.
    pub plugins: BTreeSet<ObjectKey>,
}

/// Current objects and their versions.
#[derive(Clone, Debug, Default)]
pub struct ObjectStore {
    plugins: BTreeMap<ObjectKey, VersionedPlugin>,
    secrets: BTreeMap<ObjectKey, PullSecret>,
    envoy_filters: BTreeMap<ObjectKey, StoredFilter>,
    /// The `EnvoyFilter` patch plugin serving each ECDS resource name a patch plugin serves. A
    /// `WasmPlugin`'s resource name is its key's: its server is found in `plugins` by that key
    /// ([`resource_owner`](Self::resource_owner)), with no copy of the name per plugin.
    patch_resources: BTreeMap<String, ObjectKey>,
    last_version: u64,
    /// The decoded value of the plugin object last stored from a value
    /// ([`apply_decoded`](Self::apply_decoded), an edit), while it is still the stored object
    /// (the same shared text): an edit of it patches this value instead of decoding the text
    /// again. One object at most; the text written from a value decodes to that value.
    decoded: Option<(Object, Value)>,
}

impl ObjectStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn plugins(&self) -> &BTreeMap<ObjectKey, VersionedPlugin> {
        &self.plugins
    }

    pub fn secrets(&self) -> &BTreeMap<ObjectKey, PullSecret> {
        &self.secrets
    }

    pub fn plugin(&self, key: &ObjectKey) -> Option<&VersionedPlugin> {
        self.plugins.get(key)
    }

    pub fn envoy_filters(&self) -> &BTreeMap<ObjectKey, StoredFilter> {
        &self.envoy_filters
    }

    /// The plugin that serves an ECDS resource name: an `EnvoyFilter` patch's, or the `WasmPlugin`
    /// whose key gives that name (`extensions.istio.io/wasmplugin/<namespace>.<name>`, tried at
    /// each `.` of the rest: names may hold dots; admission lets one plugin at most serve a name).
    pub fn resource_owner(&self, resource: &str) -> Option<&ObjectKey> {
        if let Some(owner) = self.patch_resources.get(resource) {
            return Some(owner);
        }
        let rest = resource.strip_prefix(plugin::ECDS_RESOURCE_PREFIX)?;
        (rest.match_indices('.'))
            .map(|(i, _)| (&rest[..i], &rest[i + 1..]))
            .filter(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains('/'))
            .find_map(|(ns, name)| {
                let (key, p) = self.plugins.get_key_value(&ObjectKey::new(ns, name))?;
                p.plugin.extension.is_none().then_some(key)
            })
    }

    /// Applies one decoded object (a manifest document).
    pub fn apply_value(&mut self, value: Value) -> Change {
        let is_plugin = value.get("kind").and_then(Value::as_str) == Some("WasmPlugin");
        self.admit(is_plugin, plugin::parse_object(0, value))
    }

    /// [`apply_value`](Self::apply_value) on an object's text: a plugin stored keeps it, not a
    /// copy.
    pub fn apply_shared(&mut self, object: &Object) -> Change {
        let value = object.value();
        let is_plugin = value.get("kind").and_then(Value::as_str) == Some("WasmPlugin");
        self.admit(is_plugin, plugin::parse_shared(0, value, object))
    }

    /// [`apply_shared`](Self::apply_shared) when the caller holds the value `object` was written
    /// from: nothing is decoded again.
    pub fn apply_decoded(&mut self, object: &Object, value: &Value) -> Change {
        self.apply_keeping(object, std::borrow::Cow::Borrowed(value))
    }

    /// [`apply_decoded`](Self::apply_decoded), keeping `value` as the decoded stored object when
    /// `object` is stored as it is (see `decoded`).
    fn apply_keeping(&mut self, object: &Object, value: std::borrow::Cow<'_, Value>) -> Change {
        let is_plugin = value.get("kind").and_then(Value::as_str) == Some("WasmPlugin");
        let change = self.admit(is_plugin, plugin::parse_shared_ref(0, &value, object));
        if let Change::PluginCreated(k) | Change::PluginChanged(k) = &change {
            if (self.plugins.get(k)).is_some_and(|vp| vp.plugin.object.ptr_eq(object)) {
                self.decoded = Some((object.clone(), value.into_owned()));
            }
        }
        change
    }

    fn admit(&mut self, is_plugin: bool, parsed: Result<Manifest, plugin::ParseError>) -> Change {
        match parsed {
            Ok(m) => self.apply(m),
            Err(e) => Change::Refused {
                key: e.object.clone(),
                is_plugin,
                error: FieldError {
                    field: e.field,
                    message: e.message,
                },
            },
        }
    }

    /// Applies a parsed manifest.
    pub fn apply(&mut self, manifest: Manifest) -> Change {
        match manifest {
            Manifest::Plugin(p) => self.apply_plugin(p, "metadata.name"),
            Manifest::EnvoyFilter(f) => self.apply_envoy_filter(f),
            Manifest::Secret(s) => {
                let key = s.key.clone();
                if self
                    .secrets
                    .get(&key)
                    .is_some_and(|cur| cur.object == s.object)
                {
                    return Change::Unchanged(key);
                }
                self.secrets.insert(key.clone(), s);
                Change::SecretApplied(key)
            }
        }
    }

    /// Admits one plugin. `name_field` is where its resource name comes from, for a conflict.
    fn apply_plugin(&mut self, p: WasmPlugin, name_field: &str) -> Change {
        let current = self.plugins.get(&p.key);
        // The stored plugin's parsed url, shared (and not checked again), when `spec.url` did not
        // change.
        let same_url = current.filter(|cur| {
            cur.plugin.spec.url == p.spec.url
                && cur.plugin.extension.is_some() == p.extension.is_some()
        });
        // An EnvoyFilter patch's plugin was validated on the patch's own paths when it was parsed.
        let problem = match p.extension {
            Some(_) => None,
            None => plugin::validate::validate_spec(&p, same_url.is_none())
                .into_iter()
                .next(),
        };
        let url = match (problem, same_url) {
            (Some(problem), _) => Err(problem),
            (None, Some(cur)) => Ok(cur.url.clone()),
            (None, None) => p
                .module_url()
                .map(std::sync::Arc::new)
                .map_err(|e| FieldError {
                    field: "spec.url".into(),
                    message: e.to_string(),
                }),
        };
        let url = match url {
            Ok(url) => url,
            Err(error) => {
                return Change::Refused {
                    key: Some(p.key.clone()),
                    is_plugin: true,
                    error,
                }
            }
        };
        let key = p.key.clone();
        // A stored plugin serves its resource name (admission lets one plugin serve a name, and a
        // key gives one name): only a new one may conflict.
        if current.is_none() {
            let resource = p.resource_name();
            match self.resource_owner(&resource) {
                Some(owner) if *owner != key => {
                    let message = format!(
                        "ECDS resource {resource:?} is already served by {} {owner}; this definition is not used until that one is gone",
                        if envoyfilter::filter_of(owner).is_some() {
                            "the EnvoyFilter patch"
                        } else {
                            "the WasmPlugin"
                        }
                    );
                    return Change::Conflict {
                        key,
                        resource,
                        error: FieldError {
                            field: name_field.to_string(),
                            message,
                        },
                    };
                }
                _ => {}
            }
        }
        match self.plugins.get(&key) {
            Some(cur) if cur.plugin.object == p.object => Change::Unchanged(key),
            existing => {
                let created = existing.is_none();
                // An EnvoyFilter patch's plugin (its key's name holds a `/`): its resource name
                // is recorded when it is created (a key gives one name).
                let patch_resource = (created && key.name.contains('/')).then(|| p.resource_name());
                self.last_version += 1;
                self.plugins.insert(
                    key.clone(),
                    VersionedPlugin {
                        plugin: std::sync::Arc::new(p),
                        version: self.last_version,
                        url,
                    },
                );
                if let Some(resource) = patch_resource {
                    self.patch_resources.insert(resource, key.clone());
                }
                if created {
                    Change::PluginCreated(key)
                } else {
                    Change::PluginChanged(key)
                }
            }
        }
    }

    /// Admits an `EnvoyFilter` patch by patch (behavior.md §10).
    fn apply_envoy_filter(&mut self, f: EnvoyFilter) -> Change {
        let key = f.key.clone();
        let stored = self.envoy_filters.get(&key);
        // A patch refused for a conflict is tried again, whether or not the object changed.
        let waiting = f
            .patches
            .iter()
            .any(|p| matches!(&p.kind, PatchKind::Plugin(w) if !self.plugins.contains_key(&w.key)));
        if stored.is_some_and(|s| s.object == f.object) && !waiting {
            return Change::Unchanged(key);
        }
        let notes = f.notes();
        let before = stored.map(|s| s.plugins.clone()).unwrap_or_default();
        let mut changes = Vec::new();
        let mut kept = BTreeSet::new();
        for patch in f.patches {
            let name_field = format!("{}.patch.value.name", patch.field());
            match patch.kind {
                PatchKind::Plugin(p) => {
                    kept.insert(p.key.clone());
                    changes.push(self.apply_plugin(p, &name_field));
                }
                PatchKind::Refused { plugin, error } => {
                    // A refused change keeps the last accepted plugin of the patch.
                    if let Some(k) = plugin.as_ref().filter(|k| before.contains(*k)) {
                        kept.insert(k.clone());
                    }
                    changes.push(Change::Refused {
                        is_plugin: plugin.is_some(),
                        key: plugin,
                        error,
                    });
                }
                PatchKind::Ignored(_) => {}
            }
        }
        for k in before.difference(&kept) {
            changes.extend(self.delete_plugin(k));
        }
        let plugins = (kept.into_iter())
            .filter(|k| self.plugins.contains_key(k))
            .collect();
        self.envoy_filters.insert(
            key.clone(),
            StoredFilter {
                object: f.object,
                plugins,
            },
        );
        Change::EnvoyFilter {
            key,
            deleted: false,
            changes,
            notes,
        }
    }

    /// Applies a JSON merge patch (RFC 7386) to a stored `WasmPlugin` (not to the plugin of an
    /// `EnvoyFilter` patch: edit the EnvoyFilter).
    pub fn edit_plugin(&mut self, key: &ObjectKey, patch: &Value) -> Option<Change> {
        let vp = self.plugins.get(key)?;
        if vp.plugin.extension.is_some() {
            return None;
        }
        let stored = &vp.plugin.object;
        let object = match self.decoded.take() {
            Some((o, value)) if o.ptr_eq(stored) => value,
            _ => stored.value(),
        };
        let value = merged(object, patch, key);
        let object = Object::new(&value);
        Some(self.apply_keeping(&object, std::borrow::Cow::Owned(value)))
    }

    /// Applies a JSON merge patch to a stored `EnvoyFilter`.
    pub fn edit_envoy_filter(&mut self, key: &ObjectKey, patch: &Value) -> Option<Change> {
        let object = self.envoy_filters.get(key)?.object.clone();
        Some(self.apply_value(merged(object, patch, key)))
    }

    pub fn delete_plugin(&mut self, key: &ObjectKey) -> Option<Change> {
        let p = self.plugins.remove(key)?;
        let resource = p.plugin.resource_name();
        if self.patch_resources.get(&resource) == Some(key) {
            self.patch_resources.remove(&resource);
        }
        Some(Change::PluginDeleted(key.clone()))
    }

    /// Deletes an `EnvoyFilter` and the plugins of its patches.
    pub fn delete_envoy_filter(&mut self, key: &ObjectKey) -> Option<Change> {
        let f = self.envoy_filters.remove(key)?;
        let changes = (f.plugins.iter())
            .filter_map(|k| self.delete_plugin(k))
            .collect();
        Some(Change::EnvoyFilter {
            key: key.clone(),
            deleted: true,
            changes,
            notes: Vec::new(),
        })
    }

    pub fn delete_secret(&mut self, key: &ObjectKey) -> Option<Change> {
        self.secrets
            .remove(key)
            .map(|_| Change::SecretDeleted(key.clone()))
    }
}

/// `object` with a JSON merge patch applied; identity cannot be patched away.
fn merged(mut object: Value, patch: &Value, key: &ObjectKey) -> Value {
    json_patch::merge(&mut object, patch);
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("name".into(), Value::String(key.name.clone()));
        meta.insert("namespace".into(), Value::String(key.namespace.clone()));
    }
    object
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn obj(url: &str) -> Value {
        json!({"apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin",
               "metadata": {"name": "p"}, "spec": {"url": url}})
    }

    #[test]
    fn a_normalised_object_is_stored_shared_and_another_one_as_a_normalised_copy() {
        let mut s = ObjectStore::new();
        let key = ObjectKey::new("default", "p");
        let mut given = obj("r/a:v1");
        given["metadata"]["namespace"] = json!("default");
        let shared = Object::new(&given);
        s.apply_shared(&shared);
        let stored = &s.plugin(&key).unwrap().plugin.object;
        assert!(stored.ptr_eq(&shared), "no copy of the object");
        // Without a namespace (and with server-owned metadata): normalised, so a copy.
        let mut raw = obj("r/a:v2");
        raw["metadata"]["resourceVersion"] = json!("7");
        let raw = Object::new(&raw);
        s.apply_shared(&raw);
        let stored = &s.plugin(&key).unwrap().plugin.object;
        assert!(!stored.ptr_eq(&raw));
        assert_eq!(
            stored.value()["metadata"],
            json!({"name": "p", "namespace": "default"})
        );
        assert!(
            raw.value()["metadata"].get("namespace").is_none(),
            "the source's object is untouched"
        );
    }

    #[test]
    fn versions_bump_on_any_change_and_not_on_identical_objects() {
        let mut s = ObjectStore::new();
        let key = ObjectKey::new("default", "p");
        assert_eq!(
            s.apply_value(obj("r/a:v1")),
            Change::PluginCreated(key.clone())
        );
        assert_eq!(s.plugin(&key).unwrap().version, 1);
        assert_eq!(s.apply_value(obj("r/a:v1")), Change::Unchanged(key.clone()));
        let c = s
            .edit_plugin(&key, &json!({"metadata": {"labels": {"a": "b"}}}))
            .unwrap();
        assert_eq!(c, Change::PluginChanged(key.clone()));
        assert_eq!(s.plugin(&key).unwrap().version, 2);
        assert_eq!(
            s.edit_plugin(&key, &json!({"metadata": {"labels": {"a": "b"}}})),
            Some(Change::Unchanged(key.clone()))
        );
    }

    /// An edit of the object last stored from a value patches that value: the stored text is not
    /// decoded again, and the result is that of patching the decoded text (key order included).
    /// Once another object was stored in between, the text is decoded.
    #[test]
    fn an_edit_after_a_change_from_a_value_decodes_nothing() {
        use crate::plugin::DECODES;
        let decodes = || DECODES.with(|d| d.get());
        let key = ObjectKey::new("default", "p");
        let mut given = obj("r/a:v1");
        given["metadata"]["namespace"] = json!("default");
        let patch =
            json!({"metadata": {"labels": {"a": "b"}}, "spec": {"imagePullPolicy": "Always"}});
        // The same edits with the stored text decoded each time.
        let mut plain = ObjectStore::new();
        plain.apply_value(given.clone());
        plain.edit_plugin(&key, &patch).unwrap();
        plain
            .edit_plugin(&key, &json!({"spec": {"url": "r/a:v2"}}))
            .unwrap();

        let mut s = ObjectStore::new();
        s.apply_decoded(&Object::new(&given), &given);
        let before = decodes();
        assert_eq!(
            s.edit_plugin(&key, &patch),
            Some(Change::PluginChanged(key.clone()))
        );
        assert_eq!(
            s.edit_plugin(&key, &json!({"spec": {"url": "r/a:v2"}})),
            Some(Change::PluginChanged(key.clone()))
        );
        assert_eq!(decodes(), before, "the stored text was not decoded");
        let (ours, theirs) = (&s.plugin(&key).unwrap(), &plain.plugin(&key).unwrap());
        assert_eq!(ours.plugin.object.text(), theirs.plugin.object.text());
        assert_eq!(ours.version, theirs.version);

        // Another plugin stored from a value in between: this one's text is decoded once.
        let mut other = given.clone();
        other["metadata"]["name"] = json!("q");
        s.apply_decoded(&Object::new(&other), &other);
        let before = decodes();
        s.edit_plugin(&key, &json!({"metadata": {"labels": {"a": "c"}}}))
            .unwrap();
        assert_eq!(decodes(), before + 1);
        assert_eq!(
            s.plugin(&key).unwrap().plugin.object.value()["metadata"]["labels"],
            json!({"a": "c"})
        );
    }

    fn filter(name: &str, patches: &[(&str, &str)]) -> Value {
        let patches: Vec<Value> = patches
            .iter()
            .map(|(resource, uri)| {
                json!({"applyTo": "EXTENSION_CONFIG", "patch": {"operation": "ADD", "value": {
                    "name": resource, "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                        "config": {"vm_config": {"code": {"remote": {"http_uri": {"uri": uri}}}}}}}}})
            })
            .collect();
        json!({"apiVersion": "networking.istio.io/v1alpha3", "kind": "EnvoyFilter",
               "metadata": {"name": name, "namespace": "ns"}, "spec": {"configPatches": patches}})
    }

    fn inner(c: Change) -> Vec<Change> {
        match c {
            Change::EnvoyFilter { changes, .. } => changes,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_envoy_filter_is_admitted_patch_by_patch() {
        let mut s = ObjectStore::new();
        let a = ObjectKey::new("ns", "ef/a");
        let b = ObjectKey::new("ns", "ef/b");
        let c = s.apply_value(filter(
            "ef",
            &[("a", "oci://r/a:v1"), ("b", "oci://r/b:v1")],
        ));
        assert_eq!(
            inner(c),
            [
                Change::PluginCreated(a.clone()),
                Change::PluginCreated(b.clone())
            ]
        );
        assert_eq!(s.resource_owner("a"), Some(&a));
        let again = filter("ef", &[("a", "oci://r/a:v1"), ("b", "oci://r/b:v1")]);
        assert_eq!(
            s.apply_value(again),
            Change::Unchanged(ObjectKey::new("ns", "ef"))
        );
        // Editing b is not a change of a; dropping b deletes its plugin.
        let c = s.apply_value(filter(
            "ef",
            &[("a", "oci://r/a:v1"), ("b", "oci://r/b:v2")],
        ));
        assert_eq!(
            inner(c),
            [
                Change::Unchanged(a.clone()),
                Change::PluginChanged(b.clone())
            ]
        );
        let c = s.apply_value(filter("ef", &[("a", "oci://r/a:v1")]));
        assert_eq!(
            inner(c),
            [Change::Unchanged(a.clone()), Change::PluginDeleted(b)]
        );
        // A refused patch keeps its last accepted plugin.
        let c = s.apply_value(filter("ef", &[("a", "ftp://r/a")]));
        assert!(matches!(inner(c).as_slice(), [Change::Refused { key: Some(k), .. }] if *k == a));
        assert_eq!(s.plugin(&a).unwrap().plugin.spec.url, "oci://r/a:v1");
        // An edit of a patch's plugin goes through its EnvoyFilter.
        assert!(s
            .edit_plugin(&a, &json!({"metadata": {"labels": {"x": "y"}}}))
            .is_none());
        let k = ObjectKey::new("ns", "ef");
        let c = s
            .edit_envoy_filter(&k, &json!({"metadata": {"labels": {"x": "y"}}}))
            .unwrap();
        assert!(matches!(inner(c).as_slice(), [Change::Refused { .. }]));
        let c = s.delete_envoy_filter(&k).unwrap();
        assert_eq!(inner(c), [Change::PluginDeleted(a)]);
        assert!(s.plugins().is_empty() && s.resource_owner("a").is_none());
    }

    #[test]
    fn a_resource_name_has_one_server_and_the_first_keeps_it() {
        let mut s = ObjectStore::new();
        s.apply_value(filter("one", &[("x", "oci://r/a:v1")]));
        let c = inner(s.apply_value(filter("two", &[("x", "oci://r/b:v1")])));
        let [Change::Conflict {
            key,
            resource,
            error,
        }] = c.as_slice()
        else {
            panic!("{c:?}")
        };
        assert_eq!((key.name.as_str(), resource.as_str()), ("two/x", "x"));
        assert_eq!(error.field, "spec.configPatches[0].patch.value.name");
        assert!(error
            .message
            .contains("already served by the EnvoyFilter patch ns/one/x"));
        // A WasmPlugin's resource name, defined by a patch first.
        let taken = "extensions.istio.io/wasmplugin/ns.p";
        s.apply_value(filter("three", &[(taken, "oci://r/c:v1")]));
        let mut p = obj("r/p:v1");
        p["metadata"]["namespace"] = json!("ns");
        assert!(
            matches!(s.apply_value(p.clone()), Change::Conflict { ref error, .. } if error.field == "metadata.name")
        );
        // Once the first is gone, the next definition is admitted.
        s.delete_envoy_filter(&ObjectKey::new("ns", "three"));
        assert_eq!(
            s.apply_value(p),
            Change::PluginCreated(ObjectKey::new("ns", "p"))
        );
        s.delete_envoy_filter(&ObjectKey::new("ns", "one"));
        let c = inner(s.apply_value(filter("two", &[("x", "oci://r/b:v1")])));
        assert_eq!(c, [Change::PluginCreated(ObjectKey::new("ns", "two/x"))]);
    }

    #[test]
    fn a_wasm_plugin_serves_its_keys_resource_name_whatever_dots_it_holds() {
        let mut s = ObjectStore::new();
        let plugin = |ns: &str, name: &str| {
            json!({"apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin",
                   "metadata": {"name": name, "namespace": ns}, "spec": {"url": "r/a:v1"}})
        };
        let first = ObjectKey::new("a", "b.c");
        assert_eq!(
            s.apply_value(plugin("a", "b.c")),
            Change::PluginCreated(first.clone())
        );
        let name = "extensions.istio.io/wasmplugin/a.b.c";
        assert_eq!(s.resource_owner(name), Some(&first));
        assert_eq!(s.resource_owner("extensions.istio.io/wasmplugin/a.b"), None);
        assert_eq!(s.resource_owner("extensions.istio.io/wasmplugin/abc"), None);
        // Another key giving the same name: refused while the first serves it.
        let c = s.apply_value(plugin("a.b", "c"));
        assert!(
            matches!(&c, Change::Conflict { resource, .. } if resource == name),
            "{c:?}"
        );
        s.delete_plugin(&first);
        assert_eq!(s.resource_owner(name), None);
        assert_eq!(
            s.apply_value(plugin("a.b", "c")),
            Change::PluginCreated(ObjectKey::new("a.b", "c"))
        );
        assert_eq!(s.resource_owner(name), Some(&ObjectKey::new("a.b", "c")));
    }

    #[test]
    fn refused_change_keeps_last_accepted_object() {
        let mut s = ObjectStore::new();
        let key = ObjectKey::new("default", "p");
        s.apply_value(obj("r/a:v1"));
        let c = s
            .edit_plugin(&key, &json!({"spec": {"sha256": "nope"}}))
            .unwrap();
        assert!(matches!(c, Change::Refused { ref error, .. } if error.field == "spec.sha256"));
        assert_eq!(s.plugin(&key).unwrap().version, 1);
        assert!(s.plugin(&key).unwrap().plugin.spec.sha256.is_none());
    }
}
