//! `status.conditions` of each `WasmPlugin` (docs/kubernetes.md "Status"): what they say is derived
//! from the driver's state by [`desired`] (pure), and the [`spawn_writer`] task writes the ones
//! that differ from what the API server has — only while this replica holds the Lease, at most
//! [`WRITES_PER_SECOND`], with the object's `resourceVersion` as a precondition (a conflict waits
//! for fresher data from the watch), failures retried with the one backoff of the crate.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use serde_json::{json, Value};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::leader::LeaseGuard;
use super::{KubeSeries, Snapshot};
use crate::backoff::{Backoff, BACKGROUND_RETRY};
use crate::clock::Clock as _;
use crate::driver::Driver;
use crate::engine::{PluginState, Serving};
use crate::outcome::Outcome;
use crate::plugin::ObjectKey;

/// The status writer's overall rate limit.
pub const WRITES_PER_SECOND: u32 = 20;
/// How long a write that hit a conflict waits for the watch to bring fresher data before trying
/// again anyway.
const CONFLICT_WAIT: Duration = Duration::from_secs(5);

/// One condition, without its transition time (kept from the stored condition when its status
/// did not change, else the time of the write).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    pub type_: &'static str,
    pub status: &'static str,
    pub reason: String,
    pub message: String,
}

/// The conditions a plugin should have, and the generation they describe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginStatus {
    pub observed_generation: Option<i64>,
    pub conditions: Vec<Condition>,
}

fn cond(type_: &'static str, ok: bool, reason: &str, message: String) -> Condition {
    Condition {
        type_,
        status: if ok { "True" } else { "False" },
        reason: reason.to_string(),
        message,
    }
}

/// The `metadata.generation`s a plugin's status speaks of (admission drops server-owned fields,
/// so the source remembers them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Generations {
    /// Of the object last accepted (the one the engine processes).
    pub accepted: Option<i64>,
    /// Of the object the API server has now.
    pub current: Option<i64>,
}

/// `missing_secret` → `MissingSecret`.
fn camel(snake: &str) -> String {
    snake
        .split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

fn serving(s: &Serving) -> String {
    match s {
        Serving::Nothing => "nothing is served".into(),
        Serving::Module(m) => format!("module sha256:{} is served", m.sha256),
        Serving::DenyAll => "the deny-all RBAC fallback is served".into(),
        Serving::AllowAll => "the allow-all RBAC fallback is served".into(),
    }
}

/// The status of a plugin the source has, or `None` while its current version is still being
/// processed (nothing is written until there is something to say). `conflict`: why the object is
/// not used because another source defines the same plugin.
pub fn desired(
    driver: &Driver,
    key: &ObjectKey,
    generations: Generations,
    conflict: Option<&str>,
) -> Option<PluginStatus> {
    if let Some(why) = conflict {
        return Some(PluginStatus {
            observed_generation: generations.current,
            conditions: vec![
                cond("Accepted", false, "Conflict", why.to_string()),
                cond("Ready", false, "Conflict", why.to_string()),
            ],
        });
    }
    let stored = driver.objects().plugin(key);
    let state = driver.engine().plugin(key);
    if let Some((_, error)) = driver.refusal(key) {
        // Another plugin (an EnvoyFilter patch) serves its resource name (behavior.md §10).
        let reason = match driver.waits_for(key) {
            Some(_) => "Conflict",
            None => "Invalid",
        };
        let ready = match (stored, state, generations.accepted) {
            (Some(_), Some(st), Some(g)) => format!(
                "the last accepted version (generation {g}) is still in effect: {}",
                serving(&st.serving)
            ),
            (Some(_), Some(st), None) => format!(
                "the last accepted version is still in effect: {}",
                serving(&st.serving)
            ),
            _ => "nothing is served".into(),
        };
        return Some(PluginStatus {
            observed_generation: generations.current,
            conditions: vec![
                cond(
                    "Accepted",
                    false,
                    reason,
                    format!("{}: {}", error.field, error.message),
                ),
                cond("Ready", false, reason, ready),
            ],
        });
    }
    if driver.config().delivery == crate::config::Delivery::Remote {
        // Nothing is pulled here: whether the module works is for the node proxies to find out.
        stored?;
        return Some(PluginStatus {
            observed_generation: generations.accepted,
            conditions: vec![cond("Accepted", true, "Accepted", String::new())],
        });
    }
    let (vp, st) = (stored?, state?);
    if st.version != vp.version || st.processed_version != Some(vp.version) {
        return None;
    }
    Some(PluginStatus {
        observed_generation: generations.accepted,
        conditions: vec![
            cond("Accepted", true, "Accepted", String::new()),
            ready(st)?,
        ],
    })
}

fn ready(st: &PluginState) -> Option<Condition> {
    Some(match st.last_outcome.as_ref()? {
        o @ (Outcome::Pulled | Outcome::Revalidated | Outcome::Cached) => {
            let message = match &st.serving {
                Serving::Module(m) if m.checksum() != m.sha256 => {
                    format!("module sha256:{} (checksum {})", m.sha256, m.checksum())
                }
                Serving::Module(m) => format!("module sha256:{}", m.sha256),
                other => serving(other),
            };
            cond("Ready", true, &camel(o.name()), message)
        }
        Outcome::Rejected(r) => {
            let error = st.last_error.clone().unwrap_or_else(|| r.to_string());
            let message = format!("{error}; {}", serving(&st.serving));
            cond("Ready", false, &camel(r.as_str()), message)
        }
        Outcome::Invalid(field) => cond("Ready", false, "Invalid", field.clone()),
    })
}

/// Whether the stored conditions already say what `want` says.
fn up_to_date(stored: &[Value], want: &PluginStatus) -> bool {
    want.conditions.iter().all(|c| {
        stored.iter().any(|s| {
            s.get("type").and_then(Value::as_str) == Some(c.type_)
                && s.get("status").and_then(Value::as_str) == Some(c.status)
                && s.get("reason").and_then(Value::as_str) == Some(c.reason.as_str())
                && s.get("message").and_then(Value::as_str).unwrap_or("") == c.message
                && s.get("observedGeneration").and_then(Value::as_i64) == want.observed_generation
        })
    })
}

/// The conditions to write: ours, with transition times kept where the status did not change,
/// and any condition types others wrote, untouched.
fn conditions_json(stored: &[Value], want: &PluginStatus, now: &str) -> Vec<Value> {
    let mut out: Vec<Value> = stored
        .iter()
        .filter(|s| {
            let t = s.get("type").and_then(Value::as_str);
            !want.conditions.iter().any(|c| Some(c.type_) == t)
        })
        .cloned()
        .collect();
    for c in &want.conditions {
        let before = stored
            .iter()
            .find(|s| s.get("type").and_then(Value::as_str) == Some(c.type_));
        let since = before
            .filter(|s| s.get("status").and_then(Value::as_str) == Some(c.status))
            .and_then(|s| s.get("lastTransitionTime").cloned())
            .unwrap_or_else(|| Value::String(now.to_string()));
        let mut v = json!({"type": c.type_, "status": c.status, "reason": c.reason,
                           "message": c.message, "lastTransitionTime": since});
        if let Some(g) = want.observed_generation {
            v["observedGeneration"] = json!(g);
        }
        out.push(v);
    }
    out
}

/// The statuses the plugins should have, kept by the controller and read by the writer. The
/// controller works out again only the statuses whose inputs changed ([`Board::set`]); the board
/// notes which differ from before, and the writer looks at those, not at every plugin.
#[derive(Debug, Default)]
pub struct Board {
    state: Mutex<BoardState>,
    changed: Notify,
}

#[derive(Debug, Default)]
struct BoardState {
    desired: BTreeMap<ObjectKey, PluginStatus>,
    /// Set since the writer last took them.
    changed: BTreeSet<ObjectKey>,
}

impl Board {
    /// Sets what each of `statuses` should be (`None`: nothing to say, or no such plugin);
    /// wakes the writer if one differs from before.
    pub fn set(&self, statuses: impl IntoIterator<Item = (ObjectKey, Option<PluginStatus>)>) {
        let mut st = self.state.lock().expect("status board lock");
        let mut any = false;
        for (key, want) in statuses {
            let differs = match &want {
                Some(w) => st.desired.get(&key) != Some(w),
                None => st.desired.contains_key(&key),
            };
            if !differs {
                continue;
            }
            match want {
                Some(w) => st.desired.insert(key.clone(), w),
                None => st.desired.remove(&key),
            };
            st.changed.insert(key);
            any = true;
        }
        drop(st);
        if any {
            self.changed.notify_one();
        }
    }

    /// The plugins that have a status to say (all of them: for a full pass of the writer).
    pub fn keys(&self) -> Vec<ObjectKey> {
        let st = self.state.lock().expect("status board lock");
        st.desired.keys().cloned().collect()
    }

    /// What `key` should say now.
    pub fn get(&self, key: &ObjectKey) -> Option<PluginStatus> {
        let st = self.state.lock().expect("status board lock");
        st.desired.get(key).cloned()
    }

    fn take_changed(&self) -> BTreeSet<ObjectKey> {
        std::mem::take(&mut self.state.lock().expect("status board lock").changed)
    }
}

/// Why a plugin's write waits.
struct Hold {
    /// The object version the hold is about: fresher data from the watch lifts it.
    resource_version: String,
    until: Instant,
    backoff: Option<Backoff>,
}

/// Starts the status writer.
pub fn spawn_writer(
    client: kube::Client,
    guard: LeaseGuard,
    series: KubeSeries,
    board: Arc<Board>,
    snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    leader: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(
        Writer {
            client,
            guard,
            series,
            board,
            seen: None,
            leading: false,
            pending: BTreeSet::new(),
            written: BTreeMap::new(),
            holds: BTreeMap::new(),
            next_write: Instant::now(),
        }
        .run(snapshots, leader),
    )
}

struct Writer {
    client: kube::Client,
    guard: LeaseGuard,
    series: KubeSeries,
    board: Arc<Board>,
    /// The snapshot the pending plugins were found in: a newer one adds the plugins whose
    /// server-managed part changed (a write landed, someone else wrote, an edit).
    seen: Option<Arc<Snapshot>>,
    /// Whether this replica led at the last look: on taking the lead, every plugin is looked at.
    leading: bool,
    /// The plugins to look at, in key order; a write that must wait puts its plugin back.
    pending: BTreeSet<ObjectKey>,
    /// What was last written per plugin, and the resource version the write produced: until the
    /// watch shows a newer object, it is not written again.
    written: BTreeMap<ObjectKey, (String, PluginStatus)>,
    holds: BTreeMap<ObjectKey, Hold>,
    next_write: Instant,
}

impl Writer {
    async fn run(
        mut self,
        mut snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
        mut leader: watch::Receiver<bool>,
    ) {
        let board = self.board.clone();
        let mut wake: Option<Instant> = None;
        loop {
            tokio::select! {
                () = board.changed.notified() => {}
                r = snapshots.changed() => if r.is_err() { return },
                r = leader.changed() => if r.is_err() { return },
                _ = tokio::time::sleep_until(wake.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))), if wake.is_some() => {}
            }
            wake = self.work(&mut snapshots, &mut leader).await;
        }
    }

    /// Looks at the pending plugins, one at a time, taking in what changed before each: writes
    /// what differs; returns when to look again (a hold ending, the Lease to be confirmed).
    async fn work(
        &mut self,
        snapshots: &mut watch::Receiver<Option<Arc<Snapshot>>>,
        leader: &mut watch::Receiver<bool>,
    ) -> Option<Instant> {
        loop {
            let snapshot = self.refresh(snapshots, leader)?;
            let Some(key) = self.pending.pop_first() else {
                return self.holds.values().map(|h| h.until).min();
            };
            let Some(status) = self.board.get(&key) else {
                // Nothing to say about it any more.
                self.written.remove(&key);
                self.holds.remove(&key);
                continue;
            };
            if let Some(h) = self.holds.get(&key) {
                let meta = snapshot.meta.get(&key);
                if h.until > Instant::now()
                    && meta.is_some_and(|m| h.resource_version == m.resource_version)
                {
                    // Looked at again when the hold ends or fresher data comes.
                    continue;
                }
            }
            // A hold that ended, or is about older data, is over now unless the write below
            // fails again (left in place, an ended hold would bring its plugin back at once).
            let Some(meta) = snapshot.meta.get(&key) else {
                self.holds.remove(&key);
                continue;
            };
            let written = (self.written.get(&key))
                .is_some_and(|(rv, s)| *rv == meta.resource_version && *s == status);
            if written || up_to_date(&meta.conditions, &status) {
                self.holds.remove(&key);
                continue;
            }
            // Not confirmed by the API server: look again in a second.
            if !self.guard.holds().await {
                self.pending.insert(key);
                return Some(Instant::now() + Duration::from_secs(1));
            }
            let backoff = self.holds.remove(&key).and_then(|h| h.backoff);
            tokio::time::sleep_until(self.next_write).await;
            self.next_write = Instant::now() + Duration::from_secs(1) / WRITES_PER_SECOND;
            self.write(&key, &status, meta, backoff).await;
        }
    }

    /// Takes in what changed since the last look: the plugins whose status changed, whose object
    /// changed in a newer snapshot and whose hold ended are pending; on taking the lead, all are.
    /// `None` while this replica does not lead or nothing is listed yet (lost the Lease: stop at
    /// once).
    fn refresh(
        &mut self,
        snapshots: &mut watch::Receiver<Option<Arc<Snapshot>>>,
        leader: &mut watch::Receiver<bool>,
    ) -> Option<Arc<Snapshot>> {
        let changed = self.board.take_changed();
        if !*leader.borrow_and_update() {
            self.leading = false;
            self.pending.clear();
            return None;
        }
        let snapshot = snapshots.borrow_and_update().clone()?;
        let seen = self.seen.replace(snapshot.clone());
        match seen.filter(|_| self.leading) {
            Some(seen) if Arc::ptr_eq(&seen, &snapshot) => {}
            Some(seen) => {
                let keys = super::snapshot::changed_meta(&seen, &snapshot);
                self.pending.extend(keys.into_iter().cloned());
            }
            None => self.pending.extend(self.board.keys()),
        }
        self.leading = true;
        self.pending.extend(changed);
        let now = Instant::now();
        let due = (self.holds.iter()).filter(|(_, h)| h.until <= now);
        self.pending.extend(due.map(|(k, _)| k.clone()));
        Some(snapshot)
    }

    /// Writes `status`; a failure holds the plugin, its retry delay continuing `backoff` (the
    /// failed writes' before it).
    async fn write(
        &mut self,
        key: &ObjectKey,
        status: &PluginStatus,
        meta: &super::ObjectMeta,
        backoff: Option<Backoff>,
    ) {
        let api: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            &key.namespace,
            &super::wasmplugin_resource(),
        );
        let now = crate::clock::SystemClock.now().as_millis();
        let now = std::time::UNIX_EPOCH + Duration::from_millis(now);
        let now = humantime::format_rfc3339_seconds(now).to_string();
        let patch = json!({
            "metadata": {"resourceVersion": meta.resource_version},
            "status": {"conditions": conditions_json(&meta.conditions, status, &now)},
        });
        match api
            .patch_status(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(obj) => {
                self.series.status_writes.with_label_values(&["ok"]).inc();
                let rv = obj.metadata.resource_version.unwrap_or_default();
                tracing::debug!(plugin = %key, "status written");
                self.written.insert(key.clone(), (rv, status.clone()));
                self.holds.remove(key);
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                self.series
                    .status_writes
                    .with_label_values(&["conflict"])
                    .inc();
                tracing::debug!(plugin = %key, "status write conflict; waiting for fresh data");
                self.holds.insert(
                    key.clone(),
                    Hold {
                        resource_version: meta.resource_version.clone(),
                        until: Instant::now() + CONFLICT_WAIT,
                        backoff: None,
                    },
                );
            }
            Err(e) => {
                self.series
                    .status_writes
                    .with_label_values(&["error"])
                    .inc();
                let mut backoff = backoff.unwrap_or_else(|| Backoff::new(BACKGROUND_RETRY, None));
                let delay = backoff.next_delay();
                tracing::warn!(plugin = %key, error = %e, retry_in = ?delay, "cannot write plugin status");
                self.holds.insert(
                    key.clone(),
                    Hold {
                        resource_version: meta.resource_version.clone(),
                        until: Instant::now() + delay,
                        backoff: Some(backoff),
                    },
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(ready: bool, reason: &str, gen: i64) -> PluginStatus {
        PluginStatus {
            observed_generation: Some(gen),
            conditions: vec![
                cond("Accepted", true, "Accepted", String::new()),
                cond("Ready", ready, reason, "m".into()),
            ],
        }
    }

    #[test]
    fn transition_times_move_only_when_status_changes_and_other_types_are_kept() {
        let want = status(true, "Pulled", 1);
        let first = conditions_json(&[], &want, "T1");
        assert!(up_to_date(&first, &want));
        assert!(
            !up_to_date(&first, &status(true, "Pulled", 2)),
            "generation counts"
        );
        let mut stored = first.clone();
        stored.push(json!({"type": "Reconciled", "status": "True", "lastTransitionTime": "T0"}));
        // Same status, other reason: the time stays.
        let again = conditions_json(&stored, &status(true, "Cached", 1), "T2");
        let ready = again.iter().find(|c| c["type"] == "Ready").unwrap();
        assert_eq!(ready["lastTransitionTime"], "T1");
        assert_eq!(ready["reason"], "Cached");
        assert!(again.iter().any(|c| c["type"] == "Reconciled"), "{again:?}");
        // Status flips: the time moves.
        let failed = conditions_json(&stored, &status(false, "DownloadFailure", 1), "T3");
        let ready = failed.iter().find(|c| c["type"] == "Ready").unwrap();
        assert_eq!(
            (
                ready["status"].as_str(),
                ready["lastTransitionTime"].as_str()
            ),
            (Some("False"), Some("T3"))
        );
        assert_eq!(ready["observedGeneration"], 1);
    }

    #[test]
    fn the_board_notes_only_statuses_that_differ() {
        let board = Board::default();
        let (a, b) = (ObjectKey::new("ns", "a"), ObjectKey::new("ns", "b"));
        board.set([
            (a.clone(), Some(status(true, "Pulled", 1))),
            (b.clone(), None),
        ]);
        assert_eq!(
            board.take_changed(),
            BTreeSet::from([a.clone()]),
            "b had nothing to say"
        );
        // The same again is no change; another reason is.
        board.set([(a.clone(), Some(status(true, "Pulled", 1)))]);
        assert!(board.take_changed().is_empty());
        board.set([
            (a.clone(), Some(status(true, "Cached", 1))),
            (b.clone(), Some(status(false, "DownloadFailure", 2))),
        ]);
        assert_eq!(board.take_changed(), BTreeSet::from([a.clone(), b.clone()]));
        assert_eq!(board.get(&a), Some(status(true, "Cached", 1)));
        // Nothing to say any more: gone from the board, and noted for the writer to forget.
        board.set([(a.clone(), None)]);
        assert_eq!(board.take_changed(), BTreeSet::from([a.clone()]));
        assert_eq!(board.keys(), [b]);
        assert_eq!(board.get(&a), None);
    }

    #[test]
    fn reasons_are_camel_case() {
        assert_eq!(camel("missing_secret"), "MissingSecret");
        assert_eq!(camel("pulled"), "Pulled");
    }
}
