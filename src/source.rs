//! The object source: the set of current `WasmPlugin`s and pull secrets with their resource
//! versions (behavior.md §1, §3). It plays the part of the Kubernetes API server: it validates on
//! admission (a refused *change* keeps the last accepted object), assigns a new resource version to
//! every accepted change of spec or metadata, and treats re-applying an identical object as a no-op.
//!
//! `serve` feeds it from watched files, `sim` from scenario steps; both hand its changes to the
//! [`Engine`](crate::engine::Engine).

use std::collections::BTreeMap;

use serde_json::Value;

use crate::plugin::{self, FieldError, Manifest, ObjectKey, PullSecret, WasmPlugin};
use crate::url::ModuleUrl;

/// A plugin with the resource version of its current object.
#[derive(Clone, Debug, PartialEq)]
pub struct VersionedPlugin {
    pub plugin: WasmPlugin,
    pub version: u64,
    /// `spec.url`, parsed once at admission.
    pub url: ModuleUrl,
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
    /// Refused by validation: nothing stored changed. `key` is `None` when the object had no name.
    Refused {
        key: Option<ObjectKey>,
        is_plugin: bool,
        error: FieldError,
    },
}

/// Current objects and their versions.
#[derive(Clone, Debug, Default)]
pub struct ObjectStore {
    plugins: BTreeMap<ObjectKey, VersionedPlugin>,
    secrets: BTreeMap<ObjectKey, PullSecret>,
    last_version: u64,
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

    /// Applies one decoded object (a manifest document).
    pub fn apply_value(&mut self, value: Value) -> Change {
        let is_plugin = value.get("kind").and_then(Value::as_str) == Some("WasmPlugin");
        match plugin::parse_object(0, value) {
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
            Manifest::Plugin(p) => {
                let url = plugin::validate(&p).into_iter().next().map_or_else(
                    || {
                        ModuleUrl::parse(&p.spec.url).map_err(|e| FieldError {
                            field: "spec.url".into(),
                            message: e.to_string(),
                        })
                    },
                    Err,
                );
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
                match self.plugins.get(&key) {
                    Some(cur) if cur.plugin.object == p.object => Change::Unchanged(key),
                    existing => {
                        let created = existing.is_none();
                        self.last_version += 1;
                        self.plugins.insert(
                            key.clone(),
                            VersionedPlugin {
                                plugin: p,
                                version: self.last_version,
                                url,
                            },
                        );
                        if created {
                            Change::PluginCreated(key)
                        } else {
                            Change::PluginChanged(key)
                        }
                    }
                }
            }
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

    /// Applies a JSON merge patch (RFC 7386) to a stored plugin.
    pub fn edit_plugin(&mut self, key: &ObjectKey, patch: &Value) -> Option<Change> {
        let mut object = self.plugins.get(key)?.plugin.object.clone();
        json_patch::merge(&mut object, patch);
        // Identity cannot be patched away.
        if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("name".into(), Value::String(key.name.clone()));
            meta.insert("namespace".into(), Value::String(key.namespace.clone()));
        }
        Some(self.apply_value(object))
    }

    pub fn delete_plugin(&mut self, key: &ObjectKey) -> Option<Change> {
        self.plugins
            .remove(key)
            .map(|_| Change::PluginDeleted(key.clone()))
    }

    pub fn delete_secret(&mut self, key: &ObjectKey) -> Option<Change> {
        self.secrets
            .remove(key)
            .map(|_| Change::SecretDeleted(key.clone()))
    }
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
