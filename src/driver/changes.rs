//! Source changes as the driver takes them: objects applied, edited and deleted one at a time
//! (`sim`, the tests), as whole sets ([`Driver::sync`]) or as the objects that changed
//! ([`Driver::sync_changed`]: `serve`'s file edits and relists), handed to
//! the [`ObjectStore`](crate::source::ObjectStore) for admission and then to the engine. Refusals are remembered (and reported
//! once per sync); plugins refused because another one serves their ECDS resource name are admitted
//! by themselves once it is free (behavior.md §10 "Conflicts").

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::{Applied, Driver, Ticket};
use crate::plugin::envoyfilter;
use crate::plugin::{FieldError, Object, ObjectKey};
use crate::source::Change;

/// Objects changed since the last sync, by key: `Some` the object now (shared with its source),
/// `None` gone.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ObjectChanges {
    pub plugins: BTreeMap<ObjectKey, Option<Object>>,
    pub envoy_filters: BTreeMap<ObjectKey, Option<Object>>,
    pub secrets: BTreeMap<ObjectKey, Option<Object>>,
}

impl ObjectChanges {
    pub fn is_empty(&self) -> bool {
        self.plugins.is_empty() && self.envoy_filters.is_empty() && self.secrets.is_empty()
    }
}

/// The plugin a change is about, if any.
fn plugin_of(change: &Change) -> Option<ObjectKey> {
    match change {
        Change::PluginCreated(k)
        | Change::PluginChanged(k)
        | Change::PluginDeleted(k)
        | Change::Unchanged(k)
        | Change::Conflict { key: k, .. }
        | Change::Refused { key: Some(k), .. } => Some(k.clone()),
        _ => None,
    }
}

/// The last refused object of a plugin and why.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Refusal {
    /// None after an edit; for an `EnvoyFilter` patch, the EnvoyFilter.
    pub(super) object: Option<Object>,
    pub(super) error: FieldError,
    /// For a conflict: the ECDS resource name it waits for.
    pub(super) waits_for: Option<String>,
}

impl Driver {
    /// Applies one object (a `WasmPlugin`, an `EnvoyFilter` or a pull `Secret`), as the API server
    /// admits it.
    pub fn apply(&mut self, object: &Value) -> Applied {
        let shared = Object::new(object);
        let change = self.objects.apply_decoded(&shared, object);
        self.hand_over(change, Some(&shared))
    }

    /// [`apply`](Self::apply) on a shared object: a plugin stored keeps it, not a copy.
    pub fn apply_shared(&mut self, object: &Object) -> Applied {
        let change = self.objects.apply_shared(object);
        self.hand_over(change, Some(object))
    }

    /// A JSON merge patch on a stored `WasmPlugin`; `None` if there is no such plugin (the plugin
    /// of an `EnvoyFilter` patch is edited through its EnvoyFilter).
    pub fn edit(&mut self, key: &ObjectKey, patch: &Value) -> Option<Applied> {
        let change = self.objects.edit_plugin(key, patch)?;
        Some(self.hand_over(change, None))
    }

    /// A JSON merge patch on a stored `EnvoyFilter`; `None` if there is none.
    pub fn edit_envoy_filter(&mut self, key: &ObjectKey, patch: &Value) -> Option<Applied> {
        let change = self.objects.edit_envoy_filter(key, patch)?;
        let object = self
            .objects
            .envoy_filters()
            .get(key)
            .map(|f| Object::new(&f.object));
        Some(self.hand_over(change, object.as_ref()))
    }

    /// Deletes a `WasmPlugin` (or forgets a refused one); `None` if there is no such plugin. The
    /// plugin of an `EnvoyFilter` patch goes with its EnvoyFilter.
    pub fn delete_plugin(&mut self, key: &ObjectKey) -> Option<Applied> {
        if envoyfilter::filter_of(key).is_some() {
            return None;
        }
        let change = self.objects.delete_plugin(key)?;
        Some(self.hand_over(change, None))
    }

    /// Deletes an `EnvoyFilter` and the plugins of its patches; `None` if there is none.
    pub fn delete_envoy_filter(&mut self, key: &ObjectKey) -> Option<Applied> {
        self.refused_filters.remove(key);
        let change = self.objects.delete_envoy_filter(key)?;
        Some(self.hand_over(change, None))
    }

    pub fn delete_secret(&mut self, key: &ObjectKey) -> Option<Applied> {
        let change = self.objects.delete_secret(key)?;
        Some(self.hand_over(change, None))
    }

    /// Makes the current objects exactly `plugins`, `envoy_filters` and `secrets` (a rescan of the
    /// watched files, a relist): first what disappeared (so that a resource name moving from one
    /// object to another is not a conflict), then secrets, plugins and EnvoyFilters in key order,
    /// then the secrets that disappeared. Objects equal to what is stored change nothing, and a
    /// refusal is reported once, not at every rescan; a plugin refused for a conflict is tried again
    /// at every sync, so it takes over once the resource name is free.
    pub fn sync(
        &mut self,
        plugins: &BTreeMap<ObjectKey, Object>,
        envoy_filters: &BTreeMap<ObjectKey, Object>,
        secrets: &BTreeMap<ObjectKey, Object>,
    ) -> Ticket {
        self.quiet_repeats = true;
        let mut ticket = Ticket::default();
        let gone: Vec<ObjectKey> = (self.objects.plugins().keys())
            .chain(self.refused.keys())
            .filter(|k| envoyfilter::filter_of(k).is_none() && !plugins.contains_key(*k))
            .cloned()
            .collect();
        for k in gone {
            self.refused.remove(&k);
            if let Some(a) = self.delete_plugin(&k) {
                ticket.join(a.ticket);
            }
        }
        let gone: Vec<ObjectKey> = (self.objects.envoy_filters().keys())
            .filter(|k| !envoy_filters.contains_key(*k))
            .cloned()
            .collect();
        for k in gone {
            if let Some(a) = self.delete_envoy_filter(&k) {
                ticket.join(a.ticket);
            }
        }
        (self.refused_filters).retain(|k, _| envoy_filters.contains_key(k));
        (self.refused).retain(|k, _| {
            envoyfilter::filter_of(k).is_none_or(|f| envoy_filters.contains_key(&f))
        });
        for value in secrets.values() {
            ticket.join(self.apply_shared(value).ticket);
        }
        for (key, value) in plugins {
            let settled = self
                .refused
                .get(key)
                .is_some_and(|r| r.object.as_ref() == Some(value) && r.waits_for.is_none());
            if !settled {
                ticket.join(self.apply_shared(value).ticket);
            }
        }
        for (key, value) in envoy_filters {
            if self.refused_filters.get(key) != Some(value) {
                ticket.join(self.apply_shared(value).ticket);
            }
        }
        let gone: Vec<ObjectKey> = (self.objects.secrets().keys())
            .filter(|k| !secrets.contains_key(*k))
            .cloned()
            .collect();
        for k in gone {
            if let Some(a) = self.delete_secret(&k) {
                ticket.join(a.ticket);
            }
        }
        self.quiet_repeats = false;
        ticket
    }

    /// Applies the objects that changed since the last sync (a plugin file edited, a Kubernetes
    /// object changed): `Some` the object now, `None` gone. The same as [`sync`](Self::sync) to
    /// the set of all objects, in the same order, but with work for the changed keys only: a
    /// plugin refused for a conflict is admitted as soon as a change frees its resource name.
    /// Returns what that caused and the plugins whose stored object or refusal it touched.
    pub fn sync_changed(&mut self, changes: &ObjectChanges) -> (Ticket, BTreeSet<ObjectKey>) {
        self.quiet_repeats = true;
        let mut ticket = Ticket::default();
        let mut touched = BTreeSet::new();
        let mut note = |applied: Option<Applied>| {
            if let Some(a) = applied {
                for c in std::iter::once(&a.change).chain(&a.followups) {
                    touched.extend(c.flatten().into_iter().filter_map(plugin_of));
                }
                ticket.join(a.ticket);
            }
        };
        for (k, _) in changes.plugins.iter().filter(|(_, v)| v.is_none()) {
            if envoyfilter::filter_of(k).is_none() {
                self.refused.remove(k);
                note(self.delete_plugin(k));
            }
        }
        for (k, _) in changes.envoy_filters.iter().filter(|(_, v)| v.is_none()) {
            note(self.delete_envoy_filter(k));
            (self.refused).retain(|p, _| envoyfilter::filter_of(p).as_ref() != Some(k));
        }
        for value in changes.secrets.values().flatten() {
            note(Some(self.apply_shared(value)));
        }
        for (key, value) in &changes.plugins {
            let Some(value) = value else { continue };
            let settled = self
                .refused
                .get(key)
                .is_some_and(|r| r.object.as_ref() == Some(value) && r.waits_for.is_none());
            if !settled {
                note(Some(self.apply_shared(value)));
            }
        }
        for (key, value) in &changes.envoy_filters {
            let Some(value) = value else { continue };
            if self.refused_filters.get(key) != Some(value) {
                note(Some(self.apply_shared(value)));
            }
        }
        for (k, _) in changes.secrets.iter().filter(|(_, v)| v.is_none()) {
            note(self.delete_secret(k));
        }
        self.quiet_repeats = false;
        (ticket, touched)
    }

    /// Hands an admitted change to the engine, admits the plugins that waited for a resource name
    /// it freed, and begins what that queued. `object` is what was applied (none for an edit or
    /// a deletion).
    fn hand_over(&mut self, change: Change, object: Option<&Object>) -> Applied {
        self.take(&change, object);
        let followups = self.admit_waiting();
        let ticket = self.dispatch();
        Applied {
            change,
            followups,
            ticket,
        }
    }

    /// Records what a change did (refusals remembered) and tells the engine.
    fn take(&mut self, change: &Change, object: Option<&Object>) {
        match change {
            Change::PluginCreated(k) | Change::PluginChanged(k) => {
                self.refused.remove(k);
                self.plugin_changed(k);
            }
            Change::PluginDeleted(k) => {
                self.refused.remove(k);
                self.plugin_gone(k);
            }
            Change::SecretApplied(k) | Change::SecretDeleted(k) => self.secret_changed(k),
            // What is stored is what was applied: an earlier refusal no longer stands.
            Change::Unchanged(k) => {
                self.refused.remove(k);
                self.refused_filters.remove(k);
            }
            Change::Refused {
                key: Some(k),
                is_plugin: true,
                error,
            } => self.refuse(k, object, error, None),
            Change::Conflict {
                key,
                resource,
                error,
            } => self.refuse(key, object, error, Some(resource.clone())),
            Change::Refused { key, error, .. } => {
                let filter = object
                    .filter(|o| o.head().kind.as_deref() == Some(envoyfilter::ENVOY_FILTER_KIND));
                if let (Some(k), Some(object)) = (key, filter) {
                    if self.quiet_repeats && self.refused_filters.get(k) == Some(object) {
                        return;
                    }
                    self.refused_filters.insert(k.clone(), object.clone());
                }
                tracing::warn!(object = ?key, field = %error.field, error = %error.message, "object refused");
            }
            Change::EnvoyFilter {
                key,
                changes,
                notes,
                ..
            } => {
                self.refused_filters.remove(key);
                for c in changes {
                    match c {
                        // A patch without a plugin key (no name, or a name given twice).
                        Change::Refused {
                            key: None, error, ..
                        } => {
                            tracing::warn!(envoy_filter = %key, field = %error.field, error = %error.message, "EnvoyFilter patch refused")
                        }
                        c => self.take(c, object),
                    }
                }
                // Refusals of patches the EnvoyFilter no longer has, or no longer refuses.
                let now: BTreeSet<&ObjectKey> = (changes.iter())
                    .filter_map(|c| match c {
                        Change::Refused { key: Some(k), .. } => Some(k),
                        Change::Conflict { key, .. } => Some(key),
                        _ => None,
                    })
                    .collect();
                self.refused.retain(|k, _| {
                    envoyfilter::filter_of(k).as_ref() != Some(key) || now.contains(k)
                });
                for note in notes {
                    tracing::debug!(envoy_filter = %key, "{note}");
                }
            }
        }
    }

    /// Remembers a plugin's refusal and records it as its `invalid` outcome, once per refusal
    /// while syncing.
    fn refuse(
        &mut self,
        k: &ObjectKey,
        object: Option<&Object>,
        error: &FieldError,
        waits_for: Option<String>,
    ) {
        let refusal = Refusal {
            object: object.cloned(),
            error: error.clone(),
            waits_for,
        };
        let repeat = self.refused.get(k) == Some(&refusal);
        self.refused.insert(k.clone(), refusal);
        if self.quiet_repeats && repeat {
            return;
        }
        tracing::warn!(plugin = %k, field = %error.field, error = %error.message, "plugin refused");
        self.engine.record_invalid(k, &error.field, &error.message);
    }

    /// Admits again the plugins refused for a conflict whose resource name is free now: a
    /// `WasmPlugin` as it was refused, an `EnvoyFilter` patch through its current EnvoyFilter.
    fn admit_waiting(&mut self) -> Vec<Change> {
        let free: Vec<(ObjectKey, Object)> = (self.refused.iter())
            .filter(|(_, r)| {
                (r.waits_for.as_deref()).is_some_and(|n| self.objects.resource_owner(n).is_none())
            })
            .filter_map(|(k, r)| match envoyfilter::filter_of(k) {
                Some(f) => {
                    let object = &self.objects.envoy_filters().get(&f)?.object;
                    Some((f, Object::new(object)))
                }
                None => Some((k.clone(), r.object.clone()?)),
            })
            .collect();
        let mut done = BTreeSet::new();
        let mut changes = Vec::new();
        for (key, object) in free {
            if done.insert(key) {
                let change = self.objects.apply_shared(&object);
                self.take(&change, Some(&object));
                changes.push(change);
            }
        }
        changes
    }
}
