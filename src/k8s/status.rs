//! `status.conditions` of each `WasmPlugin` (docs/kubernetes.md "Status"): what they say is derived
//! from the driver's state by [`desired`] (pure), and the [`spawn_writer`] task writes the ones
//! that differ from what the API server has — only while this replica holds the Lease, at most
//! [`WRITES_PER_SECOND`], with the object's `resourceVersion` as a precondition (a conflict waits
//! for fresher data from the watch), failures retried with the one backoff of the crate.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use serde_json::{json, Value};
use tokio::sync::watch;
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

/// Desired statuses, published by the controller after each change.
pub type Desired = Arc<BTreeMap<ObjectKey, PluginStatus>>;

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
    desired: watch::Receiver<Desired>,
    snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    leader: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(
        Writer {
            client,
            guard,
            series,
            written: BTreeMap::new(),
            holds: BTreeMap::new(),
            next_write: Instant::now(),
        }
        .run(desired, snapshots, leader),
    )
}

struct Writer {
    client: kube::Client,
    guard: LeaseGuard,
    series: KubeSeries,
    /// What was last written per plugin, and the resource version the write produced: until the
    /// watch shows a newer object, it is not written again.
    written: BTreeMap<ObjectKey, (String, PluginStatus)>,
    holds: BTreeMap<ObjectKey, Hold>,
    next_write: Instant,
}

impl Writer {
    async fn run(
        mut self,
        mut desired: watch::Receiver<Desired>,
        mut snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
        mut leader: watch::Receiver<bool>,
    ) {
        let mut wake: Option<Instant> = None;
        loop {
            tokio::select! {
                r = desired.changed() => if r.is_err() { return },
                r = snapshots.changed() => if r.is_err() { return },
                r = leader.changed() => if r.is_err() { return },
                _ = tokio::time::sleep_until(wake.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))), if wake.is_some() => {}
            }
            wake = None;
            if !*leader.borrow_and_update() {
                continue;
            }
            let want = desired.borrow_and_update().clone();
            let Some(snapshot) = snapshots.borrow_and_update().clone() else {
                continue;
            };
            self.written.retain(|k, _| want.contains_key(k));
            self.holds.retain(|k, _| want.contains_key(k));
            wake = self.pass(&want, &snapshot, &leader).await;
        }
    }

    /// Writes what differs; returns when to look again (a hold ending).
    async fn pass(
        &mut self,
        want: &Desired,
        snapshot: &Snapshot,
        leader: &watch::Receiver<bool>,
    ) -> Option<Instant> {
        let mut wake: Option<Instant> = None;
        for (key, status) in want.iter() {
            let Some(meta) = snapshot.meta.get(key) else {
                continue;
            };
            if up_to_date(&meta.conditions, status) {
                self.holds.remove(key);
                continue;
            }
            if (self.written.get(key))
                .is_some_and(|(rv, s)| *rv == meta.resource_version && s == status)
            {
                continue;
            }
            if let Some(h) = self.holds.get(key) {
                let now = Instant::now();
                if h.until > now && h.resource_version == meta.resource_version {
                    wake = Some(wake.map_or(h.until, |w| w.min(h.until)));
                    continue;
                }
            }
            // Lost the Lease meanwhile: stop at once. Not confirmed by the API server: look again
            // in a second.
            if !*leader.borrow() {
                return None;
            }
            if !self.guard.holds().await {
                return Some(Instant::now() + Duration::from_secs(1));
            }
            tokio::time::sleep_until(self.next_write).await;
            self.next_write = Instant::now() + Duration::from_secs(1) / WRITES_PER_SECOND;
            self.write(key, status, meta).await;
        }
        wake
    }

    async fn write(&mut self, key: &ObjectKey, status: &PluginStatus, meta: &super::ObjectMeta) {
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
                let mut backoff = (self.holds.remove(key))
                    .and_then(|h| h.backoff)
                    .unwrap_or_else(|| Backoff::new(BACKGROUND_RETRY, None));
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
    fn reasons_are_camel_case() {
        assert_eq!(camel("missing_secret"), "MissingSecret");
        assert_eq!(camel("pulled"), "Pulled");
    }
}
