//! The versioned set of ECDS resources the streams serve, shaped like go-control-plane's
//! `LinearCache` (`pkg/cache/v3/linear.go`) for the single type URL [`ECDS_TYPE_URL`].
//!
//! [`ResourceStore`] owns: the resources (stored once, already encoded as the `Any` every response
//! carries), their per-resource versions, the global revision, the change notification that wakes
//! streams, the stream event feed ([`StreamEvent`]), the counters ([`XdsStats`]) and the registry
//! of open streams ([`StreamInfo`]). It does not know about gRPC: `server` reads it, the caller
//! (the controller, `sim`, a load tool) writes it.
//!
//! # Versions
//! Every effective change bumps the global revision by one. A resource's version is
//! `<revision of its last change>-<first 12 hex digits of the sha256 of its encoding>`: the leading
//! number increases with every change to the resource and is never reused, even across a removal;
//! the digest keeps a version from naming different bytes after a server restart (counters start
//! again from 1), so a delta client's `initial_resource_versions` is only trusted when it really
//! names the bytes we hold.
//!
//! # Change notification
//! A [`tokio::sync::watch`] channel carries the revision. Waking 10,000 streams costs one
//! notification; each stream then takes the read lock, looks up only the names it subscribes to
//! and sends only what differs from what it last sent (`sotw.rs`, `delta.rs`). Intermediate
//! revisions are coalesced: a stream that is slow or waiting for an ACK sees only the latest state.
//!
//! # Thread-safety
//! Every method takes `&self` and may be called from any thread; locks are never held across an
//! `.await` (none of these methods is async). Writers pay the encoding and hashing cost before
//! taking the write lock.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig;
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, watch};

use super::ECDS_TYPE_URL;

/// How many [`StreamEvent`]s a slow [`ResourceStore::events`] receiver may fall behind before it
/// loses the oldest ones (it then gets `RecvError::Lagged`).
pub const EVENT_CAPACITY: usize = 4096;

/// Hex digits of the content digest in a resource version: 48 bits, enough that two different
/// encodings of one resource never share a version in practice.
const VERSION_DIGEST_HEX: usize = 12;

/// Prometheus names of the xDS series rendered by [`ResourceStore::metrics_text`].
pub const METRIC_CONNECTED_STREAMS: &str = "wasm_ecds_xds_connected_streams";
pub const METRIC_STREAM_COUNT: &str = "wasm_ecds_xds_stream_count";
pub const METRIC_PUSH_COUNT: &str = "wasm_ecds_xds_push_count";
pub const METRIC_ACK_COUNT: &str = "wasm_ecds_xds_ack_count";
pub const METRIC_NACK_COUNT: &str = "wasm_ecds_xds_nack_count";
pub const METRIC_RESOURCES: &str = "wasm_ecds_xds_resources";

/// Identifies one gRPC stream for the lifetime of the process (assigned in opening order).
pub type StreamId = u64;

/// Which gRPC service a stream was opened on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Api {
    /// `envoy.service.extension.v3.ExtensionConfigDiscoveryService`.
    Ecds,
    /// `envoy.service.discovery.v3.AggregatedDiscoveryService` (only the ECDS type is served).
    Ads,
}

impl fmt::Display for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Api::Ecds => "ecds",
            Api::Ads => "ads",
        })
    }
}

/// The xDS protocol variant of a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// State of the world: every response carries all subscribed resources.
    Sotw,
    /// Incremental: responses carry what changed and what was removed.
    Delta,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Sotw => "sotw",
            Protocol::Delta => "delta",
        })
    }
}

/// A resource name with the version of it that was sent, ACKed or NACKed.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ResourceVersion {
    pub name: String,
    pub version: String,
}

/// One response sent on a stream, as reported in [`StreamEventKind`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Delivery {
    pub nonce: String,
    /// `version_info` (SotW) or `system_version_info` (delta) of the response.
    pub version: String,
    /// The resources the response carried, sorted by name.
    pub resources: Vec<ResourceVersion>,
    /// Delta only: names sent in `removed_resources`.
    pub removed: Vec<String>,
}

/// What happened on a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamEventKind {
    /// The first request arrived (the node id is known from here on).
    Connected,
    /// A response was handed to the stream.
    Pushed(Delivery),
    /// The proxy accepted a response.
    Acked(Delivery),
    /// The proxy rejected a response with `error_detail`; it keeps what it had before, and the
    /// server does not send the same resources again until they change.
    Nacked { delivery: Delivery, message: String },
    /// The stream ended (client gone, error, or server shutdown).
    Disconnected,
}

/// An event of [`ResourceStore::events`]: "resource R version V was delivered to / ACKed by /
/// NACKed by proxy N".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamEvent {
    pub stream: StreamId,
    pub node_id: String,
    pub api: Api,
    pub protocol: Protocol,
    pub kind: StreamEventKind,
}

/// A snapshot of the xDS counters (exported as Prometheus series by [`ResourceStore::metrics_text`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct XdsStats {
    /// Streams open now.
    pub connected_streams: u64,
    /// Streams opened since start.
    pub streams_total: u64,
    /// Responses sent.
    pub pushes: u64,
    /// Responses ACKed.
    pub acks: u64,
    /// Responses NACKed.
    pub nacks: u64,
    /// Resources in the store.
    pub resources: usize,
    /// The store's global revision.
    pub revision: u64,
}

/// What one open stream subscribes to and holds, for `/debug` and for "is this module still sent
/// to a connected proxy" questions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StreamInfo {
    pub id: StreamId,
    pub node_id: String,
    pub api: Api,
    pub protocol: Protocol,
    /// Subscribed resource names, sorted.
    pub subscribed: Vec<String>,
    /// Per resource, the version last sent on this stream.
    pub sent: BTreeMap<String, String>,
    /// Per resource, the version the proxy last ACKed on this stream.
    pub acked: BTreeMap<String, String>,
}

/// One stored resource. Immutable once stored; replaced as a whole on change.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) name: String,
    pub(crate) version: String,
    /// Revision of the change that stored this entry.
    pub(crate) revision: u64,
    /// `TypedExtensionConfig` encoded once, shared by every response that carries it.
    pub(crate) any: Any,
}

#[derive(Default)]
struct State {
    resources: BTreeMap<String, Arc<Entry>>,
    revision: u64,
}

#[derive(Default)]
struct Counters {
    connected_streams: AtomicU64,
    streams_total: AtomicU64,
    pushes: AtomicU64,
    acks: AtomicU64,
    nacks: AtomicU64,
}

struct Inner {
    state: RwLock<State>,
    revisions: watch::Sender<u64>,
    events: broadcast::Sender<StreamEvent>,
    counters: Counters,
    streams: Mutex<BTreeMap<StreamId, StreamInfo>>,
    next_stream: AtomicU64,
}

/// The ECDS resources served to every stream; a cheaply cloneable, thread-safe handle (module docs).
#[derive(Clone)]
pub struct ResourceStore {
    inner: Arc<Inner>,
}

impl Default for ResourceStore {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ResourceStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResourceStore")
            .field("stats", &self.stats())
            .finish()
    }
}

/// An encoded resource, prepared off-lock.
struct Prepared {
    name: String,
    value: Vec<u8>,
    digest: String,
}

impl ResourceStore {
    pub fn new() -> Self {
        let (revisions, _) = watch::channel(0);
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        ResourceStore {
            inner: Arc::new(Inner {
                state: RwLock::new(State::default()),
                revisions,
                events,
                counters: Counters::default(),
                streams: Mutex::new(BTreeMap::new()),
                next_stream: AtomicU64::new(1),
            }),
        }
    }

    /// Encodes a resource and, unless the store already holds exactly these bytes, hashes it; all
    /// before the write lock is taken (hashing an inline module costs milliseconds).
    fn prepare(&self, name: String, mut config: TypedExtensionConfig) -> Option<Prepared> {
        // Envoy takes a SotW resource's name from the config itself: the key is authoritative.
        config.name.clone_from(&name);
        let value = config.encode_to_vec();
        if self
            .read()
            .resources
            .get(&name)
            .is_some_and(|e| e.any.value == value)
        {
            return None;
        }
        let digest = hex::encode(Sha256::digest(&value));
        Some(Prepared {
            name,
            value,
            digest: digest[..VERSION_DIGEST_HEX].to_string(),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.inner
            .state
            .read()
            .expect("resource store lock poisoned")
    }

    /// Stores `config` under `name` (its `name` field is overwritten with `name`) and notifies the
    /// streams. Returns the new version, or `None` when the encoding is identical to what is stored:
    /// a change that does not alter what a proxy receives is not pushed (behavior.md §7).
    pub fn set(&self, name: impl Into<String>, config: TypedExtensionConfig) -> Option<String> {
        let prepared = self.prepare(name.into(), config)?;
        let mut state = self
            .inner
            .state
            .write()
            .expect("resource store lock poisoned");
        let version = Self::insert(&mut state, prepared);
        if version.is_some() {
            // Sent under the lock so that the watched revision never goes backwards.
            self.inner.revisions.send_replace(state.revision);
        }
        version
    }

    /// [`set`](Self::set) for many resources with one lock and one notification (bulk loads, load
    /// tools). Returns how many resources changed.
    pub fn set_many<N: Into<String>>(
        &self,
        items: impl IntoIterator<Item = (N, TypedExtensionConfig)>,
    ) -> usize {
        let prepared: Vec<Prepared> = items
            .into_iter()
            .filter_map(|(n, c)| self.prepare(n.into(), c))
            .collect();
        if prepared.is_empty() {
            return 0;
        }
        let mut state = self
            .inner
            .state
            .write()
            .expect("resource store lock poisoned");
        let changed = prepared
            .into_iter()
            .filter_map(|p| Self::insert(&mut state, p))
            .count();
        if changed > 0 {
            self.inner.revisions.send_replace(state.revision);
        }
        changed
    }

    /// Stores `p` unless identical bytes got there since `prepare` looked.
    fn insert(state: &mut State, p: Prepared) -> Option<String> {
        if state
            .resources
            .get(&p.name)
            .is_some_and(|e| e.any.value == p.value)
        {
            return None;
        }
        state.revision += 1;
        let revision = state.revision;
        let version = format!("{revision}-{}", p.digest);
        let entry = Entry {
            name: p.name.clone(),
            version: version.clone(),
            revision,
            any: Any {
                type_url: ECDS_TYPE_URL.to_string(),
                value: p.value,
            },
        };
        state.resources.insert(p.name, Arc::new(entry));
        Some(version)
    }

    /// Removes a resource and notifies the streams (delta streams that hold it get it in
    /// `removed_resources`; SotW has no way to say so for ECDS, see `sotw.rs`). Returns whether it
    /// was present.
    pub fn remove(&self, name: &str) -> bool {
        let mut state = self
            .inner
            .state
            .write()
            .expect("resource store lock poisoned");
        if state.resources.remove(name).is_none() {
            return false;
        }
        state.revision += 1;
        self.inner.revisions.send_replace(state.revision);
        true
    }

    /// The stored resource, decoded.
    pub fn get(&self, name: &str) -> Option<TypedExtensionConfig> {
        let entry = self.read().resources.get(name).cloned()?;
        // Decoded off-lock: inline modules make these tens of MiB.
        Some(
            TypedExtensionConfig::decode(entry.any.value.as_slice())
                .expect("the store holds only encoded TypedExtensionConfig"),
        )
    }

    /// Names of all stored resources, sorted.
    pub fn names(&self) -> Vec<String> {
        self.read().resources.keys().cloned().collect()
    }

    /// The current version of a resource.
    pub fn version_of(&self, name: &str) -> Option<String> {
        self.read().resources.get(name).map(|e| e.version.clone())
    }

    /// All resources with their versions, sorted by name.
    pub fn versions(&self) -> Vec<ResourceVersion> {
        self.read()
            .resources
            .values()
            .map(|e| ResourceVersion {
                name: e.name.clone(),
                version: e.version.clone(),
            })
            .collect()
    }

    /// The global revision: bumped by every effective `set`/`remove`.
    pub fn revision(&self) -> u64 {
        self.read().revision
    }

    pub fn len(&self) -> usize {
        self.read().resources.len()
    }

    pub fn is_empty(&self) -> bool {
        self.read().resources.is_empty()
    }

    /// A receiver that is marked changed whenever the revision moves (latest value only).
    pub fn watch_revision(&self) -> watch::Receiver<u64> {
        self.inner.revisions.subscribe()
    }

    /// The stream event feed. Events are only built while at least one receiver exists; a receiver
    /// that falls more than [`EVENT_CAPACITY`] events behind loses the oldest ones.
    pub fn events(&self) -> broadcast::Receiver<StreamEvent> {
        self.inner.events.subscribe()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> XdsStats {
        let c = &self.inner.counters;
        let (resources, revision) = {
            let state = self.read();
            (state.resources.len(), state.revision)
        };
        XdsStats {
            connected_streams: c.connected_streams.load(Ordering::Relaxed),
            streams_total: c.streams_total.load(Ordering::Relaxed),
            pushes: c.pushes.load(Ordering::Relaxed),
            acks: c.acks.load(Ordering::Relaxed),
            nacks: c.nacks.load(Ordering::Relaxed),
            resources,
            revision,
        }
    }

    /// The open streams, by id.
    pub fn streams(&self) -> Vec<StreamInfo> {
        self.inner
            .streams
            .lock()
            .expect("stream registry lock poisoned")
            .values()
            .cloned()
            .collect()
    }

    /// Names of resources some open stream subscribes to, sorted: the "sent to a connected proxy"
    /// half of behavior.md §5's *used*.
    pub fn subscribed_names(&self) -> BTreeSet<String> {
        let streams = self
            .inner
            .streams
            .lock()
            .expect("stream registry lock poisoned");
        streams
            .values()
            .flat_map(|s| s.subscribed.iter().cloned())
            .collect()
    }

    /// The counters as Prometheus text (no `_total` suffix, like the Istio series in `metrics`).
    pub fn metrics_text(&self) -> String {
        let s = self.stats();
        let mut out = String::new();
        let mut series = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        series(
            METRIC_CONNECTED_STREAMS,
            "gauge",
            "xDS streams open now.",
            s.connected_streams,
        );
        series(
            METRIC_STREAM_COUNT,
            "counter",
            "xDS streams opened.",
            s.streams_total,
        );
        series(
            METRIC_PUSH_COUNT,
            "counter",
            "ECDS responses sent to proxies.",
            s.pushes,
        );
        series(
            METRIC_ACK_COUNT,
            "counter",
            "ECDS responses ACKed by proxies.",
            s.acks,
        );
        series(
            METRIC_NACK_COUNT,
            "counter",
            "ECDS responses NACKed by proxies.",
            s.nacks,
        );
        series(
            METRIC_RESOURCES,
            "gauge",
            "ECDS resources served.",
            s.resources as u64,
        );
        out
    }

    // ----- used by the stream state machines and the server -----

    /// The stored entries for `names` that exist, sorted by name (duplicates collapse).
    pub(crate) fn lookup<'a>(
        &self,
        names: impl IntoIterator<Item = &'a String>,
    ) -> Vec<Arc<Entry>> {
        let state = self.read();
        let mut found: Vec<Arc<Entry>> = names
            .into_iter()
            .filter_map(|n| state.resources.get(n).cloned())
            .collect();
        drop(state);
        found.sort_by(|a, b| a.name.cmp(&b.name));
        found.dedup_by(|a, b| a.name == b.name);
        found
    }

    pub(crate) fn open_stream(&self, api: Api, protocol: Protocol) -> StreamId {
        let id = self.inner.next_stream.fetch_add(1, Ordering::Relaxed);
        self.inner
            .counters
            .connected_streams
            .fetch_add(1, Ordering::Relaxed);
        self.inner
            .counters
            .streams_total
            .fetch_add(1, Ordering::Relaxed);
        self.record_stream(StreamInfo {
            id,
            node_id: String::new(),
            api,
            protocol,
            subscribed: Vec::new(),
            sent: BTreeMap::new(),
            acked: BTreeMap::new(),
        });
        id
    }

    pub(crate) fn close_stream(&self, id: StreamId) {
        self.inner
            .counters
            .connected_streams
            .fetch_sub(1, Ordering::Relaxed);
        self.inner
            .streams
            .lock()
            .expect("stream registry lock poisoned")
            .remove(&id);
    }

    pub(crate) fn record_stream(&self, info: StreamInfo) {
        self.inner
            .streams
            .lock()
            .expect("stream registry lock poisoned")
            .insert(info.id, info);
    }

    pub(crate) fn count_push(&self) {
        self.inner.counters.pushes.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_ack(&self) {
        self.inner.counters.acks.fetch_add(1, Ordering::Relaxed);
    }

    /// Returns the NACK count including this one (logged with the NACK).
    pub(crate) fn count_nack(&self) -> u64 {
        self.inner.counters.nacks.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Publishes an event; `make` runs only when someone listens.
    pub(crate) fn emit(&self, make: impl FnOnce() -> StreamEvent) {
        if self.inner.events.receiver_count() > 0 {
            // An error only means every receiver went away meanwhile.
            let _ = self.inner.events.send(make());
        }
    }
}

/// The SotW `version_info` for a set of entries (sorted by name): the entry's own version when there
/// is one, otherwise `<highest revision>-<digest of the name/version pairs>`. It changes exactly when
/// the set of (name, version) pairs changes; empty for no entries.
pub(crate) fn set_version(entries: &[Arc<Entry>]) -> String {
    match entries {
        [] => String::new(),
        [only] => only.version.clone(),
        many => {
            let mut hasher = Sha256::new();
            for e in many {
                hasher.update(e.name.as_bytes());
                hasher.update([0]);
                hasher.update(e.version.as_bytes());
                hasher.update([0]);
            }
            let max = many.iter().map(|e| e.revision).max().unwrap_or_default();
            format!(
                "{max}-{}",
                &hex::encode(hasher.finalize())[..VERSION_DIGEST_HEX]
            )
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::Any;

    /// A resource whose content is `payload`.
    pub(crate) fn config(payload: &str) -> TypedExtensionConfig {
        TypedExtensionConfig {
            name: String::new(),
            typed_config: Some(Any {
                type_url: "type.googleapis.com/google.protobuf.StringValue".into(),
                value: payload.as_bytes().to_vec(),
            }),
        }
    }

    #[test]
    fn set_returns_a_new_version_only_when_the_bytes_change() {
        let store = ResourceStore::new();
        let mut rx = store.watch_revision();
        let v1 = store
            .set("a", config("one"))
            .expect("first set is a change");
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        assert_eq!(
            store.set("a", config("one")),
            None,
            "identical bytes are not a change"
        );
        assert!(!rx.has_changed().unwrap(), "no notification for a no-op");
        let v2 = store
            .set("a", config("two"))
            .expect("new bytes are a change");
        assert_ne!(v1, v2);
        assert_eq!(store.version_of("a"), Some(v2));
        assert_eq!(store.revision(), 2);
    }

    #[test]
    fn versions_increase_and_are_not_reused_after_removal() {
        let store = ResourceStore::new();
        let v1 = store.set("a", config("one")).unwrap();
        assert!(store.remove("a"));
        assert!(!store.remove("a"));
        let v2 = store.set("a", config("one")).unwrap();
        assert_ne!(v1, v2, "same bytes after removal get a new version");
        let rev = |v: &str| v.split('-').next().unwrap().parse::<u64>().unwrap();
        assert!(rev(&v2) > rev(&v1));
        assert_eq!(
            v1.split('-').nth(1),
            v2.split('-').nth(1),
            "same bytes, same digest"
        );
    }

    #[test]
    fn name_field_is_overwritten_and_get_round_trips() {
        let store = ResourceStore::new();
        let mut c = config("x");
        c.name = "wrong".into();
        store.set("right", c);
        let got = store.get("right").unwrap();
        assert_eq!(got.name, "right");
        assert_eq!(got.typed_config, config("x").typed_config);
        assert_eq!(store.names(), vec!["right".to_string()]);
        assert_eq!(store.get("missing"), None);
    }

    #[test]
    fn set_many_notifies_once_and_counts_changes() {
        let store = ResourceStore::new();
        store.set("a", config("1"));
        let mut rx = store.watch_revision();
        rx.borrow_and_update();
        let changed = store.set_many([("a", config("1")), ("b", config("2")), ("c", config("3"))]);
        assert_eq!(changed, 2);
        assert_eq!(*rx.borrow_and_update(), 3);
        assert_eq!(store.len(), 3);
    }

    #[test]
    fn set_version_changes_with_the_set() {
        let store = ResourceStore::new();
        store.set("a", config("1"));
        store.set("b", config("2"));
        let a = store.lookup([&"a".to_string()]);
        assert_eq!(set_version(&a), store.version_of("a").unwrap());
        let ab = store.lookup([&"b".to_string(), &"a".to_string(), &"a".to_string()]);
        assert_eq!(ab.len(), 2);
        let v_ab = set_version(&ab);
        assert!(v_ab.starts_with("2-"));
        store.set("b", config("3"));
        let ab2 = store.lookup([&"a".to_string(), &"b".to_string()]);
        assert_ne!(set_version(&ab2), v_ab);
        assert_eq!(set_version(&[]), "");
    }

    #[test]
    fn metrics_text_names_every_series() {
        let store = ResourceStore::new();
        store.set("a", config("1"));
        let text = store.metrics_text();
        for name in [
            METRIC_CONNECTED_STREAMS,
            METRIC_STREAM_COUNT,
            METRIC_PUSH_COUNT,
            METRIC_ACK_COUNT,
            METRIC_NACK_COUNT,
            METRIC_RESOURCES,
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} missing from {text}"
            );
        }
        assert!(text.contains("wasm_ecds_xds_resources 1\n"));
    }
}
