//! Lists and watches `WasmPlugin`s and `EnvoyFilter`s (all namespaces or the chosen ones,
//! optionally by label selector) and the `kubernetes.io/dockerconfigjson` Secrets of the namespaces
//! that have either, and publishes the whole current set as a [`Snapshot`] on a `watch` channel
//! (the newest one wins; the controller never falls behind a queue).
//!
//! Relists never flap anything (docs/kubernetes.md "Watches"): a list (initial, after `410 Gone`,
//! after a lost connection or an API server restart) is buffered until it completes and then
//! replaces that watch's objects at once, so objects deleted during an outage disappear exactly
//! then, and a relist that returns the same objects publishes nothing. The snapshot is kept up to
//! date event by event ([`Current`]): an event costs the objects it changes, not all of them. Nothing is published before every WasmPlugin and EnvoyFilter watch has
//! listed once and the Secrets of every namespace with plugins are listed (or
//! [`SECRET_LIST_GRACE`] passed), so the first processing sees the Secrets it needs. An EnvoyFilter
//! watch whose first list is refused with 404 (no EnvoyFilter CRD) or 403 (no RBAC for it) counts
//! as listed with no objects, so a cluster without EnvoyFilters still serves its WasmPlugins; the
//! watch keeps retrying and picks the EnvoyFilters up once it may list them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, BoxStream, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DynamicObject};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt as _;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::snapshot::{Current, Kind, Listed, ObjectMeta, Snapshot};
use super::{KubeOptions, KubeSeries};
use crate::backoff::{Backoff, WATCH};
use crate::plugin::secret::DOCKER_CONFIG_JSON_TYPE;
use crate::plugin::{Object, ObjectKey};

/// How long the first snapshot with a new namespace's plugins waits for that namespace's Secrets.
pub const SECRET_LIST_GRACE: Duration = Duration::from_secs(5);

impl Listed {
    /// `v` as listed, sharing `previous`'s view when that is unchanged.
    fn of(v: &Value, previous: Option<&Listed>) -> Listed {
        let view = Object::new(&admission_view(v));
        let view = match previous {
            Some(p) if p.view == view => p.view.clone(),
            _ => view,
        };
        let meta = meta_of(v);
        let meta = match previous {
            Some(p) if *p.meta == meta => p.meta.clone(),
            _ => Arc::new(meta),
        };
        Listed { view, meta }
    }
}

/// One list-and-watch: its objects, and a relist in progress.
#[derive(Default)]
struct Listing {
    objects: BTreeMap<ObjectKey, Listed>,
    relist: Option<BTreeMap<ObjectKey, Listed>>,
    listed: bool,
}

impl Listing {
    /// Applies one event, adding the keys of the objects it changed to `changed` (what they are
    /// now is in `objects`); true when the objects changed or the listing completed its first
    /// list.
    fn apply(&mut self, event: Event<Value>, changed: &mut Vec<ObjectKey>) -> bool {
        match event {
            Event::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            Event::InitApply(v) => {
                if let (Some(buf), Some(k)) = (self.relist.as_mut(), key_of(&v)) {
                    let listed = Listed::of(&v, self.objects.get(&k));
                    buf.insert(k, listed);
                }
                false
            }
            Event::InitDone => {
                let first = !std::mem::replace(&mut self.listed, true);
                let listed = self.relist.take().unwrap_or_default();
                let before = changed.len();
                // A relist is a whole list: comparing it with the objects is work per object once.
                changed.extend(
                    (listed.iter())
                        .filter(|(k, l)| self.objects.get(*k) != Some(*l))
                        .map(|(k, _)| k.clone()),
                );
                changed.extend(
                    (self.objects.keys())
                        .filter(|k| !listed.contains_key(*k))
                        .cloned(),
                );
                self.objects = listed;
                first || changed.len() > before
            }
            Event::Apply(v) => {
                let Some(k) = key_of(&v) else { return false };
                let listed = Listed::of(&v, self.objects.get(&k));
                if self.objects.get(&k) == Some(&listed) {
                    return false;
                }
                self.objects.insert(k.clone(), listed);
                changed.push(k);
                true
            }
            Event::Delete(v) => {
                let Some(k) = key_of(&v).filter(|k| self.objects.remove(k).is_some()) else {
                    return false;
                };
                changed.push(k);
                true
            }
        }
    }
}

fn key_of(v: &Value) -> Option<ObjectKey> {
    let meta = v.get("metadata")?;
    Some(ObjectKey::new(
        meta.get("namespace")?.as_str()?,
        meta.get("name")?.as_str()?,
    ))
}

/// The object without the fields that change with every write of any kind.
fn admission_view(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("status");
        if let Some(m) = o.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("resourceVersion");
            m.remove("managedFields");
        }
    }
    v
}

fn meta_of(v: &Value) -> ObjectMeta {
    let m = v.get("metadata");
    ObjectMeta {
        resource_version: m
            .and_then(|m| m.get("resourceVersion"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        generation: m.and_then(|m| m.get("generation")).and_then(Value::as_i64),
        conditions: v
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default(),
    }
}

enum Input {
    Plugins(usize, Result<Event<Value>, watcher::Error>),
    Filters(usize, Result<Event<Value>, watcher::Error>),
    Secrets(String, Result<Event<Value>, watcher::Error>),
}

/// A first list refused because the kind does not exist or may not be read: 404 or 403.
fn unavailable(e: &watcher::Error) -> bool {
    matches!(e, watcher::Error::InitialListFailed(kube::Error::Api(s)) if s.code == 404 || s.code == 403)
}

/// Starts the watches; the receiver holds `None` until the first complete snapshot.
pub fn spawn(
    client: kube::Client,
    options: &KubeOptions,
    series: KubeSeries,
) -> (watch::Receiver<Option<Arc<Snapshot>>>, JoinHandle<()>) {
    let (tx, rx) = watch::channel(None);
    let mut config = watcher::Config::default();
    if let Some(sel) = &options.selector {
        config = config.labels(sel);
    }
    let apis = |resource: &kube::api::ApiResource| -> Vec<Api<DynamicObject>> {
        if options.namespaces.is_empty() {
            vec![Api::all_with(client.clone(), resource)]
        } else {
            (options.namespaces.iter())
                .map(|ns| Api::namespaced_with(client.clone(), ns, resource))
                .collect()
        }
    };
    let plugin_apis = apis(&super::wasmplugin_resource());
    let filter_apis = apis(&super::envoyfilter_resource());
    let (plugins, filters) = (plugin_apis.len(), filter_apis.len());
    let mut streams: Vec<BoxStream<'static, Input>> = Vec::new();
    for (i, api) in plugin_apis.into_iter().enumerate() {
        let events = watcher::watcher(api, config.clone()).backoff(WatchBackoff::new());
        streams.push(
            events
                .map(move |r| Input::Plugins(i, r.map(event_json)))
                .boxed(),
        );
    }
    for (i, api) in filter_apis.into_iter().enumerate() {
        let events = watcher::watcher(api, config.clone()).backoff(WatchBackoff::new());
        streams.push(
            events
                .map(move |r| Input::Filters(i, r.map(event_json)))
                .boxed(),
        );
    }
    let watches = Watches {
        client,
        series,
        plugins: (0..plugins).map(|_| Listing::default()).collect(),
        filters: (0..filters).map(|_| Listing::default()).collect(),
        secrets: BTreeMap::new(),
        tx,
        current: Current::default(),
        last_error: BTreeMap::new(),
    };
    (rx, tokio::spawn(watches.run(stream::select_all(streams))))
}

/// The event with its object as JSON (admission reads objects as JSON, from files or here).
fn event_json<K: serde::Serialize>(event: Event<K>) -> Event<Value> {
    let json = |o: K| serde_json::to_value(o).unwrap_or(Value::Null);
    match event {
        Event::Apply(o) => Event::Apply(json(o)),
        Event::Delete(o) => Event::Delete(json(o)),
        Event::Init => Event::Init,
        Event::InitApply(o) => Event::InitApply(json(o)),
        Event::InitDone => Event::InitDone,
    }
}

/// A namespace's Secret watch.
struct SecretWatch {
    listing: Listing,
    started: tokio::time::Instant,
    task: JoinHandle<()>,
}

impl Drop for SecretWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Watches {
    client: kube::Client,
    series: KubeSeries,
    plugins: Vec<Listing>,
    filters: Vec<Listing>,
    secrets: BTreeMap<String, SecretWatch>,
    tx: watch::Sender<Option<Arc<Snapshot>>>,
    /// The snapshot as the listings make it now.
    current: Current,
    /// The last error logged per watch (the same error repeating is logged once).
    last_error: BTreeMap<String, String>,
}

impl Watches {
    async fn run(mut self, mut plugin_events: stream::SelectAll<BoxStream<'static, Input>>) {
        let (secret_tx, mut secret_rx) = mpsc::channel::<Input>(256);
        let mut dirty = false;
        loop {
            // Wake when a grace period ends; one that has ended already (a namespace whose Secrets
            // cannot be listed at all) must not wake the loop again and again.
            let now = tokio::time::Instant::now();
            let grace_end = self.secrets_pending_until().filter(|t| *t > now);
            let input = tokio::select! {
                i = plugin_events.next() => match i { Some(i) => Some(i), None => return },
                i = secret_rx.recv() => i,
                _ = tokio::time::sleep_until(grace_end.unwrap_or_else(far_future)), if grace_end.is_some() => None,
            };
            if let Some(input) = input {
                dirty |= self.handle(input);
            }
            // Drain what is already waiting, so a burst (a relist's end, many edits) is one snapshot.
            loop {
                let next = match plugin_events.next().now_or_never_ready() {
                    Some(i) => i,
                    None => match secret_rx.try_recv() {
                        Ok(i) => i,
                        Err(_) => break,
                    },
                };
                dirty |= self.handle(next);
            }
            dirty |= self.follow_namespaces(&secret_tx);
            if dirty && self.complete() {
                dirty = false;
                // A clone of the persistent maps: a few pointers, whatever the object count.
                let snapshot = Arc::new(self.current.snapshot.clone());
                self.tx.send_replace(Some(snapshot));
            }
        }
    }

    /// Applies one input; true when objects changed.
    fn handle(&mut self, input: Input) -> bool {
        let (listing, result, watch, kind) = match input {
            Input::Plugins(i, r) => {
                let l = self.plugins.get_mut(i);
                (l, r, format!("wasmplugins#{i}"), Kind::Plugin)
            }
            Input::Filters(i, r) => {
                let l = self.filters.get_mut(i);
                (l, r, format!("envoyfilters#{i}"), Kind::Filter)
            }
            Input::Secrets(ns, r) => {
                let l = self.secrets.get_mut(&ns).map(|s| &mut s.listing);
                (l, r, format!("secrets in {ns}"), Kind::Secret)
            }
        };
        match result {
            Ok(event) => {
                if watch.starts_with("wasmplugins") && matches!(event, Event::InitDone) {
                    self.series.relists.inc();
                }
                if self.last_error.remove(&watch).is_some() {
                    tracing::info!(watch = %watch, "Kubernetes watch recovered");
                }
                let Some(l) = listing else { return false };
                let mut changed = Vec::new();
                let dirty = l.apply(event, &mut changed);
                for k in &changed {
                    self.current.set(kind, k, l.objects.get(k));
                }
                dirty
            }
            Err(e) => {
                self.series.watch_errors.inc();
                let message = e.to_string();
                // No EnvoyFilter kind, or no right to read it: serve without EnvoyFilters.
                let skipped = watch.starts_with("envoyfilters") && unavailable(&e);
                if let Some(l) = listing.filter(|l| skipped && !l.listed) {
                    tracing::warn!(watch = %watch, error = %message, "EnvoyFilters cannot be listed; serving without them and retrying with backoff");
                    l.listed = true;
                    self.last_error.insert(watch, message);
                    return true;
                }
                if self.last_error.get(&watch) != Some(&message) {
                    tracing::warn!(watch = %watch, error = %message, "Kubernetes watch failed; retrying with backoff, serving the last known objects");
                    self.last_error.insert(watch, message);
                }
                false
            }
        }
    }

    /// Starts a Secret watch for every namespace that has plugins and stops the others (their
    /// Secrets leave the snapshot: true then); work only when a namespace came or went.
    fn follow_namespaces(&mut self, tx: &mpsc::Sender<Input>) -> bool {
        if !std::mem::take(&mut self.current.namespaces_changed) {
            return false;
        }
        let mut removed = false;
        let wanted: BTreeSet<String> = self.current.namespaces().cloned().collect();
        let gone: Vec<String> = (self.secrets.keys())
            .filter(|ns| !wanted.contains(*ns))
            .cloned()
            .collect();
        for ns in gone {
            if let Some(w) = self.secrets.remove(&ns) {
                for k in w.listing.objects.keys() {
                    self.current.set(Kind::Secret, k, None);
                    removed = true;
                }
            }
        }
        (self.last_error).retain(|w, _| {
            w.strip_prefix("secrets in ")
                .is_none_or(|ns| wanted.contains(ns))
        });
        for ns in wanted {
            if self.secrets.contains_key(&ns) {
                continue;
            }
            let api: Api<Secret> = Api::namespaced(self.client.clone(), &ns);
            let config =
                watcher::Config::default().fields(&format!("type={DOCKER_CONFIG_JSON_TYPE}"));
            let tx = tx.clone();
            let name = ns.clone();
            let task = tokio::spawn(async move {
                let mut events = (watcher::watcher(api, config))
                    .backoff(WatchBackoff::new())
                    .boxed();
                while let Some(r) = events.next().await {
                    let input = Input::Secrets(name.clone(), r.map(event_json));
                    if tx.send(input).await.is_err() {
                        return;
                    }
                }
            });
            self.secrets.insert(
                ns,
                SecretWatch {
                    listing: Listing::default(),
                    started: tokio::time::Instant::now(),
                    task,
                },
            );
        }
        removed
    }

    /// When the wait for unlisted Secret namespaces ends, if any is unlisted.
    fn secrets_pending_until(&self) -> Option<tokio::time::Instant> {
        (self.secrets.values())
            .filter(|s| !s.listing.listed)
            .map(|s| s.started + SECRET_LIST_GRACE)
            .min()
    }

    /// Every WasmPlugin and EnvoyFilter watch has listed, and every Secret watch has listed or
    /// waited long enough.
    fn complete(&self) -> bool {
        self.plugins.iter().chain(&self.filters).all(|l| l.listed)
            && self
                .secrets_pending_until()
                .is_none_or(|t| t <= tokio::time::Instant::now())
    }
}

/// The crate's one backoff ([`crate::backoff::WATCH`], jittered) as kube-runtime's watch backoff;
/// kube resets it after every successful event.
struct WatchBackoff(Backoff);

impl WatchBackoff {
    fn new() -> Self {
        WatchBackoff(Backoff::new(WATCH, Some(fastrand::u64(..))))
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(self.0.next_delay())
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.0.reset();
    }
}

fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(3600)
}

/// `now_or_never` for a stream's next item: `Some` only when one is ready at once.
trait NowOrNever {
    fn now_or_never_ready(self) -> Option<Input>;
}

impl<F: std::future::Future<Output = Option<Input>>> NowOrNever for F {
    fn now_or_never_ready(self) -> Option<Input> {
        futures_util::FutureExt::now_or_never(self).flatten()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::k8s::snapshot::changed_meta;

    /// A listing of plugins and the snapshot it makes, as [`Watches::handle`] keeps them.
    #[derive(Default)]
    struct Fed {
        l: Listing,
        cur: Current,
    }

    impl Fed {
        fn feed(&mut self, event: Event<Value>) -> bool {
            let mut changed = Vec::new();
            let dirty = self.l.apply(event, &mut changed);
            for k in &changed {
                self.cur.set(Kind::Plugin, k, self.l.objects.get(k));
            }
            dirty
        }
    }

    fn key(name: &str) -> ObjectKey {
        ObjectKey::new("ns", name)
    }

    fn plugin(name: &str, rv: &str, label: &str) -> Value {
        json!({"apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin",
               "metadata": {"name": name, "namespace": "ns", "resourceVersion": rv, "generation": 1,
                            "labels": {"l": label}, "managedFields": [{"manager": "kubectl"}]},
               "spec": {"url": "oci://r/a:v1"},
               "status": {"conditions": [{"type": "Ready", "status": "True"}]}})
    }

    #[test]
    fn a_relist_replaces_objects_at_its_end_and_same_objects_are_no_change() {
        let mut l = Fed::default();
        l.feed(Event::Init);
        l.feed(Event::InitApply(plugin("a", "1", "x")));
        l.feed(Event::InitApply(plugin("b", "2", "x")));
        assert!(l.l.objects.is_empty(), "nothing until the list completes");
        assert!(l.feed(Event::InitDone));
        assert_eq!(l.l.objects.len(), 2);
        // A relist returning the same objects changes nothing.
        l.feed(Event::Init);
        l.feed(Event::InitApply(plugin("a", "1", "x")));
        l.feed(Event::InitApply(plugin("b", "2", "x")));
        assert_eq!(l.l.objects.len(), 2, "kept while relisting");
        assert!(!l.feed(Event::InitDone));
        // b deleted during an outage: gone when the relist completes.
        l.feed(Event::Init);
        l.feed(Event::InitApply(plugin("a", "1", "x")));
        assert_eq!(l.l.objects.len(), 2);
        assert!(l.feed(Event::InitDone));
        assert_eq!(
            l.l.objects
                .keys()
                .map(|k| k.name.as_str())
                .collect::<Vec<_>>(),
            ["a"]
        );
        assert!(!l.feed(Event::Apply(plugin("a", "1", "x"))));
        assert!(l.feed(Event::Apply(plugin("a", "3", "y"))));
        assert!(l.feed(Event::Delete(plugin("a", "3", "y"))));
        assert!(!l.feed(Event::Delete(plugin("a", "3", "y"))));
    }

    #[test]
    fn an_unchanged_object_keeps_its_arc_across_snapshots() {
        let mut l = Fed::default();
        l.feed(Event::Init);
        l.feed(Event::InitApply(plugin("a", "1", "x")));
        l.feed(Event::InitApply(plugin("b", "2", "x")));
        l.feed(Event::InitDone);
        let first = l.cur.snapshot.clone();
        // b edited, a's status written (a new resourceVersion): a's view is the same object.
        assert!(l.feed(Event::Apply(plugin("b", "3", "y"))));
        assert!(l.feed(Event::Apply(plugin("a", "4", "x"))));
        let second = l.cur.snapshot.clone();
        let (a, b) = (key("a"), key("b"));
        assert!(first.plugins[&a].ptr_eq(&second.plugins[&a]));
        assert!(!first.plugins[&b].ptr_eq(&second.plugins[&b]));
        assert_eq!(second.plugins[&b].value()["metadata"]["labels"]["l"], "y");
        assert_eq!(second.meta[&a].resource_version, "4");
        // A relist returning the same objects shares them too.
        l.feed(Event::Init);
        l.feed(Event::InitApply(plugin("a", "4", "x")));
        l.feed(Event::InitApply(plugin("b", "3", "y")));
        assert!(!l.feed(Event::InitDone));
        let third = l.cur.snapshot.clone();
        assert_eq!(third, second);
        for k in [&a, &b] {
            assert!(second.plugins[k].ptr_eq(&third.plugins[k]));
            assert!(Arc::ptr_eq(&second.meta[k], &third.meta[k]));
        }
        assert!(changed_meta(&second, &third).is_empty());
        // Both written meanwhile (new resourceVersions): their server-managed parts changed.
        assert_eq!(changed_meta(&first, &second), [&a, &b]);
    }

    #[test]
    fn changed_meta_names_added_removed_and_rewritten_plugins_in_order() {
        let mut l = Fed::default();
        for (name, rv) in [("a", "1"), ("c", "2"), ("e", "3")] {
            l.feed(Event::Apply(plugin(name, rv, "x")));
        }
        let before = l.cur.snapshot.clone();
        assert!(changed_meta(&before, &before).is_empty());
        l.feed(Event::Delete(plugin("a", "1", "x")));
        l.feed(Event::Apply(plugin("b", "4", "x")));
        l.feed(Event::Apply(plugin("c", "5", "x"))); // a status write: only the meta changes
        l.feed(Event::Apply(plugin("f", "6", "x")));
        let after = l.cur.snapshot.clone();
        let names: Vec<&str> = (changed_meta(&before, &after).into_iter())
            .map(|k| k.name.as_str())
            .collect();
        assert_eq!(names, ["a", "b", "c", "f"], "e is unchanged");
        assert!(before.plugins[&key("c")].ptr_eq(&after.plugins[&key("c")]));
    }

    #[test]
    fn admission_ignores_status_and_write_bookkeeping() {
        let a = admission_view(&plugin("a", "1", "x"));
        let status_written = admission_view(&plugin("a", "7", "x"));
        assert_eq!(a, status_written, "a status write is not a change");
        assert_ne!(a, admission_view(&plugin("a", "8", "y")), "a label is");
        assert!(a.get("status").is_none());
        let m = meta_of(&plugin("a", "7", "x"));
        assert_eq!(m.resource_version, "7");
        assert_eq!(m.generation, Some(1));
        assert_eq!(m.conditions.len(), 1);
    }
}
