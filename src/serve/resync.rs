//! How the controller brings the sources' changes to the driver: the plugin files that changed
//! are re-read, the objects that changed merged and synced (all of them at start-up, for the first
//! Kubernetes list and in `proxy` mode), and what the Kubernetes plugins' statuses derive from is
//! noted for them.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::{files, Controller};
use crate::k8s::{self, status};
use crate::plugin::ObjectKey;
use serde_json::Value;

impl Controller {
    /// Re-reads the plugin files that changed (all of them for a rescan) and watches the
    /// directories found (all of them at `startup`); returns the objects whose definition changed.
    pub(super) fn update_files(
        &mut self,
        changes: &files::FileChanges,
        startup: bool,
    ) -> files::ChangedKeys {
        if changes.rescan {
            tracing::debug!("reading every plugin file");
        }
        let desired = &mut self.sources.files;
        let mut changed = self.files.update(desired, changes, &[]);
        let fresh = match &mut self.watcher {
            Some(w) => w.update(&desired.dirs),
            None => Vec::new(),
        };
        if !fresh.is_empty() && !startup {
            // Files written to a new directory before it was watched.
            let none = files::FileChanges::default();
            changed.extend(self.files.update(desired, &none, &fresh));
        }
        changed
    }

    /// Makes the driver's objects what the sources say now; returns what that caused.
    pub(super) fn resync(&mut self) -> crate::driver::Ticket {
        let before: Vec<String> = self
            .sources
            .conflicts
            .values()
            .map(|c| c.message.clone())
            .collect();
        let mut merged = self.sources.merged();
        if let Some(link) = &mut self.proxy {
            let wanted = link.current();
            let shared = |(k, v): (&ObjectKey, &Value)| (k.clone(), crate::plugin::Object::new(v));
            (merged.plugins).extend(wanted.plugins.iter().map(shared));
            (merged.secrets).extend(wanted.secrets.iter().map(shared));
        }
        for c in self.sources.conflicts.values() {
            if !before.contains(&c.message) {
                tracing::error!(object = %c.object, "{}", c.message);
            }
        }
        let ticket = self
            .driver
            .sync(&merged.plugins, &merged.envoy_filters, &merged.secrets);
        self.note_generations(None);
        self.stale_statuses = StaleStatuses::All;
        self.report_stale = true;
        ticket
    }

    /// Makes the driver's objects what the sources say now, `changed` (by kind and key) being
    /// all that changed since the last sync: the work is for those objects only.
    pub(super) fn resync_changed(&mut self, changed: &files::ChangedKeys) -> crate::driver::Ticket {
        if changed.is_empty() {
            return crate::driver::Ticket::default();
        }
        let before: Vec<Option<String>> = (changed.iter())
            .map(|id| self.sources.conflicts.get(id).map(|c| c.message.clone()))
            .collect();
        let objects = self.sources.merge_changed(changed);
        for (id, before) in changed.iter().zip(before) {
            if let Some(c) = self.sources.conflicts.get(id) {
                if before.as_ref() != Some(&c.message) {
                    tracing::error!(object = %c.object, "{}", c.message);
                }
            }
        }
        let (ticket, mut touched) = self.driver.sync_changed(&objects);
        touched.extend(objects.plugins.into_keys());
        self.note_generations(Some(&touched));
        // A conflict between the sources is about the changed key, whichever kind changed.
        let conflicts = changed.iter().map(|(_, k)| k.clone());
        self.stale_statuses
            .mark(touched.into_iter().chain(conflicts));
        self.report_stale = true;
        ticket
    }

    /// Remembers the generation of each Kubernetes plugin object the driver took as a new version:
    /// of the plugins `only` names, or of all.
    pub(super) fn note_generations(&mut self, only: Option<&BTreeSet<ObjectKey>>) {
        let Some(snapshot) = &self.sources.kube else {
            return;
        };
        let objects = self.driver.objects();
        let metas: Vec<(&ObjectKey, &Arc<k8s::ObjectMeta>)> = match only {
            Some(keys) => {
                for k in keys.iter().filter(|k| !snapshot.meta.contains_key(*k)) {
                    self.generations.remove(k);
                }
                (keys.iter())
                    .filter_map(|k| snapshot.meta.get_key_value(k))
                    .collect()
            }
            None => {
                (self.generations).retain(|k, _| snapshot.meta.contains_key(k));
                snapshot.meta.iter().collect()
            }
        };
        for (k, meta) in metas {
            let Some(vp) = objects.plugin(k) else {
                continue;
            };
            if self
                .generations
                .get(k)
                .is_none_or(|(v, _)| *v != vp.version)
            {
                self.generations
                    .insert(k.clone(), (vp.version, meta.generation));
            }
        }
    }

    /// Hands the status writer what the Kubernetes plugins' conditions should be now: of those
    /// whose inputs changed since the last time (of all after a full sync).
    pub(super) fn publish_statuses(&mut self) {
        let stale = std::mem::replace(&mut self.stale_statuses, StaleStatuses::none());
        let (Some(board), Some(snapshot)) = (
            self.kube.as_ref().and_then(|k| k.statuses.as_ref()),
            self.sources.kube.as_ref(),
        ) else {
            return;
        };
        let status_of = |k: &ObjectKey| {
            let meta = snapshot.meta.get(k)?;
            let generations = status::Generations {
                accepted: self.generations.get(k).and_then(|g| g.1),
                current: meta.generation,
            };
            let conflict = self.sources.kube_conflict(k);
            status::desired(&self.driver, k, generations, conflict)
        };
        match stale {
            StaleStatuses::Some(keys) => {
                board.set(keys.into_iter().map(|k| {
                    let s = status_of(&k);
                    (k, s)
                }));
            }
            StaleStatuses::All => {
                // What the board has and the snapshot no longer does goes too.
                let keys: BTreeSet<ObjectKey> = (board.keys().into_iter())
                    .chain(snapshot.meta.keys().cloned())
                    .collect();
                board.set(keys.into_iter().map(|k| {
                    let s = status_of(&k);
                    (k, s)
                }));
            }
        }
    }
}

/// Which Kubernetes plugins' statuses to work out again: those whose inputs changed (the driver's
/// events about them, their objects, refusals, conflicts and generations), or all.
#[derive(Debug)]
pub(super) enum StaleStatuses {
    All,
    Some(BTreeSet<ObjectKey>),
}

impl StaleStatuses {
    pub(super) fn none() -> Self {
        StaleStatuses::Some(BTreeSet::new())
    }

    pub(super) fn mark(&mut self, keys: impl IntoIterator<Item = ObjectKey>) {
        if let StaleStatuses::Some(set) = self {
            set.extend(keys);
        }
    }

    /// The plugins the driver's events are about.
    pub(super) fn mark_events(&mut self, events: &[crate::engine::Event]) {
        self.mark(events.iter().filter_map(|e| e.plugin()).cloned());
    }
}
