//! Where proxied streams and the driver meet (behavior.md §11). A remote-load config a stream must
//! convert is reduced to what decides the pull — url, pin, policy, pull secret, resource version,
//! fail strategy, filter type — and that *identity* becomes one plugin of the driver, shared by
//! every stream and resource that has the same one (single flight across streams, one cache entry,
//! one background retry). Streams hold a [`Lease`] on each identity they serve; the controller
//! reads the wanted set ([`Hub::wanted`]) into the driver and writes each identity's result
//! ([`Hub::set_result`]) back, which wakes the streams serving it ([`Hub::epoch`]).
//!
//! An identity no stream holds any more stays wanted for [`LINGER`]: Envoys reconnecting, or an
//! upstream resending the same resources, find it processed instead of pulling again.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::convert::Filter;
use crate::extension::{PullSecretEnv, RemoteCode, Template};
use crate::plugin::{FailStrategy, ObjectKey, PULL_TIMEOUT_ANNOTATION};

/// Namespace of the plugins and secrets standing for proxied configs in the driver.
pub const PROXY_NAMESPACE: &str = "proxied";
/// How long an identity no stream holds stays in the driver.
pub const LINGER: Duration = Duration::from_secs(10 * 60);
/// Secret name given to a config whose pull secret the control plane could not find.
const MISSING_SECRET: &str = "missing-pull-secret";

/// What a proxied config is converted to: the code (or fallback) to put in it.
#[derive(Clone, Debug, PartialEq)]
pub struct Conversion {
    pub filter: Filter,
    /// Why the module is not served (the fallback's reason), if it is not.
    pub error: Option<String>,
}

/// The driver objects standing for one identity.
#[derive(Clone, Debug, PartialEq)]
pub struct Identity {
    pub key: ObjectKey,
    pub plugin: Value,
    pub secret: Option<(ObjectKey, Value)>,
    pub fail: FailStrategy,
}

impl Identity {
    /// The identity of a remote config: the object a `WasmPlugin` with the same pull would be.
    pub fn of(template: &Template, code: &RemoteCode) -> Identity {
        let secret = match &code.pull_secret {
            PullSecretEnv::Given(json) => {
                let name = format!("pull-{}", short_hash(json.as_bytes()));
                let data = base64::engine::general_purpose::STANDARD.encode(json);
                let object = json!({
                    "apiVersion": "v1", "kind": "Secret",
                    "type": "kubernetes.io/dockerconfigjson",
                    "metadata": {"name": name, "namespace": PROXY_NAMESPACE},
                    "data": {".dockerconfigjson": data},
                });
                Some((ObjectKey::new(PROXY_NAMESPACE, name), object))
            }
            PullSecretEnv::Missing | PullSecretEnv::Absent => None,
        };
        let secret_name = match &code.pull_secret {
            PullSecretEnv::Given(_) => secret.as_ref().map(|(k, _)| k.name.clone()),
            PullSecretEnv::Missing => Some(MISSING_SECRET.to_string()),
            PullSecretEnv::Absent => None,
        };
        let spec = code.spec(template, secret_name);
        // The resource version only matters to `Always` (as Istio's `shouldIgnoreResourceVersion`):
        // under any other policy a bump is the same identity, with nothing to do.
        let always = crate::url::ModuleUrl::parse(&spec.url)
            .map(|url| {
                crate::policy::decide(&spec, &url).policy == crate::policy::PullPolicy::Always
            })
            .unwrap_or(false);
        let version = match &code.resource_version {
            Some(v) if always => v.clone(),
            _ => String::new(),
        };
        let spec = serde_json::to_value(spec).expect("spec serializes");
        let timeout = code.timeout.map(|t| t.as_millis()).unwrap_or_default();
        let digest = short_hash(format!("{spec}\n{version}\n{timeout}").as_bytes());
        let name = format!("{}-{digest}", readable(&template.name));
        let mut plugin = json!({
            "apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin",
            "metadata": {
                "name": name, "namespace": PROXY_NAMESPACE,
                "annotations": {"wasm-ecds.io/resource": template.name, "wasm-ecds.io/resource-version": version},
            },
            "spec": spec,
        });
        // `http_uri.timeout` bounds the pull, as it bounds the reference agent's.
        if let Some(t) = code.timeout.filter(|t| !t.is_zero()) {
            plugin["metadata"]["annotations"][PULL_TIMEOUT_ANNOTATION] =
                json!(format!("{}ms", t.as_millis().max(1)));
        }
        Identity {
            key: ObjectKey::new(PROXY_NAMESPACE, name),
            plugin,
            secret,
            fail: template.fail_strategy(),
        }
    }
}

fn short_hash(bytes: &[u8]) -> String {
    hex::encode(&Sha256::digest(bytes)[..6])
}

/// The resource name, reduced to what reads well in a plugin name.
fn readable(name: &str) -> String {
    let tail = name.rsplit('/').next().unwrap_or(name);
    let s: String = tail
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    if s.is_empty() {
        "resource".into()
    } else {
        s
    }
}

/// The objects the driver must have for the proxy.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Wanted {
    pub plugins: BTreeMap<ObjectKey, Value>,
    pub secrets: BTreeMap<ObjectKey, Value>,
}

struct Entry {
    identity: Identity,
    holders: usize,
    /// When the last holder let go.
    released: Option<Instant>,
    result: watch::Sender<Option<Arc<Conversion>>>,
}

/// The identities, and those no stream holds by the time they were released: the sweep at every
/// controller wake-up looks at the due ones only, not at every identity.
#[derive(Default)]
struct Table {
    entries: BTreeMap<ObjectKey, Entry>,
    /// `(released, key)` of each entry no stream holds.
    lingering: BTreeSet<(Instant, ObjectKey)>,
}

/// The identities wanted by streams and their results.
pub struct Hub {
    table: Mutex<Table>,
    wanted: watch::Sender<Arc<Wanted>>,
    epoch: watch::Sender<u64>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").finish_non_exhaustive()
    }
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            table: Mutex::new(Table::default()),
            wanted: watch::Sender::new(Arc::default()),
            epoch: watch::Sender::new(0),
        }
    }
}

/// A stream's hold on an identity; letting go of it starts the identity's [`LINGER`].
pub struct Lease {
    hub: Arc<Hub>,
    pub key: ObjectKey,
    result: watch::Receiver<Option<Arc<Conversion>>>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lease({})", self.key)
    }
}

impl Lease {
    /// The identity's result once there is one.
    pub async fn result(&mut self) -> Arc<Conversion> {
        let got = self.result.wait_for(Option::is_some).await;
        match got {
            Ok(r) => r.clone().expect("waited for a result"),
            // The hub lives as long as any lease (each holds it): the sender cannot go first.
            Err(_) => unreachable!("the hub outlives its leases"),
        }
    }

    /// The result now, marking it seen.
    pub fn latest(&mut self) -> Option<Arc<Conversion>> {
        self.result.borrow_and_update().clone()
    }

    /// The result now, without marking it seen.
    pub fn peek(&self) -> Option<Arc<Conversion>> {
        self.result.borrow().clone()
    }

    /// True when the result changed since it was last seen.
    pub fn changed(&self) -> bool {
        self.result.has_changed().unwrap_or(false)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut table = self.hub.table.lock().expect("hub lock");
        let Table { entries, lingering } = &mut *table;
        if let Some(e) = entries.get_mut(&self.key) {
            e.holders -= 1;
            if e.holders == 0 {
                let now = Instant::now();
                e.released = Some(now);
                lingering.insert((now, self.key.clone()));
            }
        }
    }
}

impl Hub {
    pub fn new() -> Arc<Hub> {
        Arc::new(Hub::default())
    }

    /// Holds `identity`, adding it to the wanted set if it is new.
    pub fn acquire(self: &Arc<Self>, identity: Identity) -> Lease {
        let mut table = self.table.lock().expect("hub lock");
        let Table { entries, lingering } = &mut *table;
        let key = identity.key.clone();
        let mut added = false;
        let entry = entries.entry(key.clone()).or_insert_with(|| {
            added = true;
            Entry {
                identity,
                holders: 0,
                released: None,
                result: watch::Sender::new(None),
            }
        });
        entry.holders += 1;
        if let Some(t) = entry.released.take() {
            lingering.remove(&(t, key.clone()));
        }
        let mut result = entry.result.subscribe();
        // A lease sees the current result as new.
        result.mark_changed();
        if added {
            self.publish(entries);
        }
        Lease {
            hub: self.clone(),
            key,
            result,
        }
    }

    /// The objects the driver must have; changes whenever an identity is added or dropped.
    pub fn wanted(&self) -> watch::Receiver<Arc<Wanted>> {
        self.wanted.subscribe()
    }

    /// Bumped whenever a result changes: streams then look at their leases.
    pub fn epoch(&self) -> watch::Receiver<u64> {
        self.epoch.subscribe()
    }

    /// The fallback of an identity (to answer for one the driver refused).
    pub fn fail_strategy(&self, key: &ObjectKey) -> Option<FailStrategy> {
        let table = self.table.lock().expect("hub lock");
        table.entries.get(key).map(|e| e.identity.fail)
    }

    /// The identities now wanted.
    pub fn keys(&self) -> Vec<ObjectKey> {
        let table = self.table.lock().expect("hub lock");
        table.entries.keys().cloned().collect()
    }

    /// Records an identity's result; streams serving it are woken if it changed. Returns whether
    /// it changed.
    pub fn set_result(&self, key: &ObjectKey, conversion: Conversion) -> bool {
        let table = self.table.lock().expect("hub lock");
        let Some(e) = table.entries.get(key) else {
            return false;
        };
        let changed = e.result.send_if_modified(|cur| {
            if cur.as_deref() == Some(&conversion) {
                false
            } else {
                *cur = Some(Arc::new(conversion));
                true
            }
        });
        if changed {
            self.epoch.send_modify(|n| *n += 1);
        }
        changed
    }

    /// True when the identity has a result.
    pub fn has_result(&self, key: &ObjectKey) -> bool {
        let table = self.table.lock().expect("hub lock");
        table
            .entries
            .get(key)
            .is_some_and(|e| e.result.borrow().is_some())
    }

    /// Drops the identities released longer than [`LINGER`] ago; returns when the next one is due.
    /// The work is the dropped identities' (plus a look at the next due one), whatever the number
    /// of identities held: this runs at every wake-up of the controller.
    pub fn sweep(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut table = self.table.lock().expect("hub lock");
        let Table { entries, lingering } = &mut *table;
        let mut dropped = false;
        while let Some((t, _)) = lingering.first().filter(|(t, _)| now >= *t + LINGER) {
            let t = *t;
            let (_, key) = lingering.pop_first().expect("looked at");
            if entries.get(&key).is_some_and(|e| e.released == Some(t)) {
                entries.remove(&key);
                dropped = true;
            }
        }
        if dropped {
            self.publish(entries);
        }
        lingering.first().map(|(t, _)| *t + LINGER)
    }

    fn publish(&self, entries: &BTreeMap<ObjectKey, Entry>) {
        let mut wanted = Wanted::default();
        for e in entries.values() {
            let id = &e.identity;
            wanted.plugins.insert(id.key.clone(), id.plugin.clone());
            if let Some((k, v)) = &id.secret {
                wanted.secrets.insert(k.clone(), v.clone());
            }
        }
        self.wanted.send_replace(Arc::new(wanted));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extension::FilterKind;
    use crate::plugin::ImagePullPolicy;

    fn template(name: &str) -> Template {
        Template {
            name: name.into(),
            kind: FilterKind::Http,
            config: Default::default(),
        }
    }

    fn code(rv: &str, secret: PullSecretEnv) -> RemoteCode {
        RemoteCode {
            uri: "oci://r/m:v1".into(),
            sha256: None,
            timeout: None,
            pull_policy: ImagePullPolicy::Always,
            pull_secret: secret,
            resource_version: Some(rv.into()),
        }
    }

    #[test]
    fn identity_names_the_resource_and_depends_on_what_decides_the_pull() {
        let t = template("extensions.istio.io/wasmplugin/ns.auth");
        let a = Identity::of(&t, &code("1", PullSecretEnv::Absent));
        assert!(a.key.name.starts_with("ns.auth-"), "{}", a.key);
        assert_eq!(a, Identity::of(&t, &code("1", PullSecretEnv::Absent)));
        assert_ne!(
            a.key,
            Identity::of(&t, &code("2", PullSecretEnv::Absent)).key
        );
        let s = Identity::of(&t, &code("1", PullSecretEnv::Given("{}".into())));
        assert_ne!(a.key, s.key);
        let (sk, sv) = s.secret.unwrap();
        assert_eq!(s.plugin["spec"]["imagePullSecret"], sk.name.as_str());
        assert_eq!(sv["data"][".dockerconfigjson"], "e30=");
        let m = Identity::of(&t, &code("1", PullSecretEnv::Missing));
        assert_eq!(m.plugin["spec"]["imagePullSecret"], MISSING_SECRET);
        assert!(m.secret.is_none());
    }

    #[tokio::test]
    async fn leases_share_an_identity_and_results_wake_holders() {
        let hub = Hub::new();
        let wanted = hub.wanted();
        let id = Identity::of(&template("a"), &code("1", PullSecretEnv::Absent));
        let mut l1 = hub.acquire(id.clone());
        let l2 = hub.acquire(id.clone());
        assert_eq!(wanted.borrow().plugins.len(), 1);
        let epoch = hub.epoch();
        let c = Conversion {
            filter: Filter::DenyAll,
            error: Some("x".into()),
        };
        hub.set_result(&id.key, c.clone());
        assert_eq!(*l1.result().await, c);
        assert!(epoch.has_changed().unwrap());
        // The same result again wakes nobody.
        let mut epoch = hub.epoch();
        epoch.borrow_and_update();
        hub.set_result(&id.key, c);
        assert!(!epoch.has_changed().unwrap());
        drop((l1, l2));
        // Released, but lingering.
        assert!(hub.sweep().is_some());
        assert_eq!(wanted.borrow().plugins.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn released_identities_go_after_the_linger() {
        let hub = Hub::new();
        let wanted = hub.wanted();
        let id = Identity::of(&template("a"), &code("1", PullSecretEnv::Absent));
        drop(hub.acquire(id.clone()));
        tokio::time::advance(LINGER).await;
        assert_eq!(hub.sweep(), None);
        assert!(wanted.borrow().plugins.is_empty());
        // Taken again before the linger ends: kept.
        let l = hub.acquire(id.clone());
        drop(l);
        tokio::time::advance(LINGER / 2).await;
        let _l = hub.acquire(id);
        tokio::time::advance(LINGER).await;
        assert_eq!(hub.sweep(), None);
        assert_eq!(wanted.borrow().plugins.len(), 1);
    }

    /// The sweep looks only at the identities no stream holds: 500 held ones are never in its
    /// index, a released one leaves it when taken again or dropped.
    #[tokio::test(start_paused = true)]
    async fn the_sweep_visits_released_identities_only() {
        let hub = Hub::new();
        let id = |n: usize| {
            Identity::of(
                &template(&format!("t{n}")),
                &code("1", PullSecretEnv::Absent),
            )
        };
        let _held: Vec<Lease> = (0..500).map(|n| hub.acquire(id(n))).collect();
        let lingering = |hub: &Hub| hub.table.lock().unwrap().lingering.len();
        assert_eq!((lingering(&hub), hub.sweep()), (0, None));
        let start = Instant::now();
        drop(hub.acquire(id(1000)));
        tokio::time::advance(Duration::from_secs(1)).await;
        drop(hub.acquire(id(1001)));
        drop(hub.acquire(id(1002)));
        assert_eq!(lingering(&hub), 3);
        assert_eq!(hub.sweep(), Some(start + LINGER));
        // Taken again: out of the index.
        let again = hub.acquire(id(1002));
        assert_eq!(lingering(&hub), 2);
        tokio::time::advance(LINGER - Duration::from_secs(1)).await;
        // The first is due: dropped; the next is due a second later.
        let next = hub.sweep();
        assert_eq!(next, Some(start + Duration::from_secs(1) + LINGER));
        assert_eq!(lingering(&hub), 1);
        assert_eq!(hub.keys().len(), 502);
        assert!(!hub.keys().contains(&id(1000).key));
        drop(again);
        tokio::time::advance(LINGER).await;
        assert_eq!(hub.sweep(), None);
        assert_eq!((lingering(&hub), hub.keys().len()), (0, 500));
    }
}
