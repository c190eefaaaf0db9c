//! The versioned set of ECDS resources the streams serve, shaped like go-control-plane's
//! `LinearCache` (`pkg/cache/v3/linear.go`) for the single type URL [`ECDS_TYPE_URL`].
//!
//! [`ResourceStore`] owns: the resources (stored once, already encoded as the `Any` every response
//! carries), their per-resource versions, the global revision, the change notification that wakes
//! streams, the stream event feed ([`StreamEvent`]), the counters ([`XdsStats`]) and the registry
//! of open streams. It does not know about gRPC: `server` reads it, the caller (the controller,
//! `sim`, a load tool) writes it.
//!
//! # Open streams
//! Each stream registers itself once, when it opens, as a [`StreamView`] (its own state behind its
//! own lock) and leaves when it closes; nothing is copied into the registry per request or push.
//!
//! Length: about 700 lines (its unit tests are in `store/tests.rs`): the store, its stream
//! registry and its counters share one lock and are kept together.
//! Readers ([`ResourceStore::streams`]: `/debug/syncz`, `ListProxies`) ask every open stream for
//! its [`StreamInfo`] when they read.
//!
//! # Metrics
//! The counters are Prometheus series (`wasm_ecds_xds_*`, [`XdsSeries`]). A store made with
//! [`ResourceStore::with_metrics`] registers them in the process's [`Metrics`], so that one
//! [`Metrics::render`] shows them next to the engine's Istio series; [`ResourceStore::new`] keeps
//! them in a private registry, read through [`ResourceStore::stats`].
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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig;
use prost::Message;
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, watch};

pub use super::report::*;
use super::ECDS_TYPE_URL;
use crate::metrics::Metrics;

/// How many [`StreamEvent`]s a slow [`ResourceStore::events`] receiver may fall behind before it
/// loses the oldest ones (it then gets `RecvError::Lagged`).
pub const EVENT_CAPACITY: usize = 4096;

/// Hex digits of the content digest in a resource version: 48 bits, enough that two different
/// encodings of one resource never share a version in practice.
const VERSION_DIGEST_HEX: usize = 12;

/// One stored resource. Immutable once stored; replaced as a whole on change.
#[derive(Debug)]
pub(crate) struct Entry {
    /// The very `Arc` the store's map is keyed by (and the driver's record of who published it):
    /// a name is held once however many places name it.
    pub(crate) name: Arc<str>,
    /// [`Self::id`] as sent: written once here, referenced by every response.
    pub(crate) version: String,
    /// Revision of the change that stored this entry.
    pub(crate) revision: u64,
    /// The digest part of the version, as a number ([`Version`]).
    digest: u64,
    /// The `google.protobuf.Any` carrying the `TypedExtensionConfig`, encoded once: every response
    /// that carries the resource sends these very bytes (`encode.rs`).
    pub(crate) any: Bytes,
    /// Where the encoded `TypedExtensionConfig` starts in `any` (it is the `Any`'s last field).
    config_at: usize,
}

impl Entry {
    /// The encoded `TypedExtensionConfig`.
    pub(crate) fn config(&self) -> &[u8] {
        &self.any[self.config_at..]
    }

    /// Its version as numbers: what a stream keeps of what it sent and what was ACKed.
    pub(crate) fn id(&self) -> Version {
        Version {
            revision: self.revision,
            digest: self.digest,
        }
    }
}

/// A resource version as numbers: the revision of the change that stored it and the
/// [`VERSION_DIGEST_HEX`] hex digits of its digest; shown (and sent) as `<revision>-<digits>`
/// (module docs, "Versions"). Streams keep these per resource instead of the text, so that
/// recording a push or an ACK is a copy of 16 bytes and comparing two versions is comparing
/// two numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Version {
    revision: u64,
    digest: u64,
}

impl Version {
    /// The version `text` names, if it is one this server writes: exactly the text
    /// [`Display`](fmt::Display) gives (no sign, no leading zero, lower-case digits), so that
    /// two versions are equal exactly when their texts are.
    pub(crate) fn parse(text: &str) -> Option<Version> {
        let (revision, digest) = text.split_once('-')?;
        let decimal = !revision.is_empty()
            && revision.bytes().all(|b| b.is_ascii_digit())
            && (revision == "0" || !revision.starts_with('0'));
        let hex = digest.len() == VERSION_DIGEST_HEX
            && digest
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !(decimal && hex) {
            return None;
        }
        Some(Version {
            revision: revision.parse().ok()?,
            digest: u64::from_str_radix(digest, 16).ok()?,
        })
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}-{:0width$x}",
            self.revision,
            self.digest,
            width = VERSION_DIGEST_HEX
        )
    }
}

/// An open stream in the store's registry: its state stays with the stream, and is asked for only
/// when someone reads the registry.
pub(crate) trait StreamView: Send + Sync {
    fn info(&self) -> StreamInfo;
}

#[derive(Default)]
struct State {
    resources: BTreeMap<Arc<str>, Arc<Entry>>,
    revision: u64,
}

struct Inner {
    state: RwLock<State>,
    /// [`State::revision`], written under the write lock: read without the lock by a stream
    /// asking whether anything changed since its last lookup ([`ResourceStore::revision_now`]).
    /// On a line of its own, away from the lock's word, which every reader writes.
    revision: Padded<AtomicU64>,
    /// Lookups made ([`ResourceStore::lookup_into`]), for tests counting the work a step did.
    #[cfg(test)]
    lookups: AtomicU64,
    revisions: watch::Sender<u64>,
    events: broadcast::Sender<StreamEvent>,
    /// How many [`EventReceiver`]s of `events` live.
    listeners: Arc<AtomicUsize>,
    series: XdsSeries,
    streams: Mutex<BTreeMap<StreamId, Arc<dyn StreamView>>>,
    next_stream: AtomicU64,
}

/// A value alone on its cache line (two, against the adjacent-line prefetcher).
#[repr(align(128))]
#[derive(Default)]
struct Padded<T>(T);

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
    name: Arc<str>,
    /// The `Any` carrying the config, and where the config starts in it.
    any: Vec<u8>,
    config_at: usize,
    /// The first [`VERSION_DIGEST_HEX`] hex digits of the sha256 of the config, as a number.
    digest: u64,
}

/// `config` encoded as the value of a `google.protobuf.Any` of type [`ECDS_TYPE_URL`], in one
/// buffer of the exact size (an inline module is copied nowhere else); returns the buffer and
/// where the config starts in it.
fn encode_any(config: &TypedExtensionConfig) -> (Vec<u8>, usize) {
    use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
    let len = config.encoded_len();
    let header = key_len(1)
        + encoded_len_varint(ECDS_TYPE_URL.len() as u64)
        + ECDS_TYPE_URL.len()
        + key_len(2)
        + encoded_len_varint(len as u64);
    let mut buf = Vec::with_capacity(header + len);
    encode_key(1, WireType::LengthDelimited, &mut buf);
    encode_varint(ECDS_TYPE_URL.len() as u64, &mut buf);
    buf.extend_from_slice(ECDS_TYPE_URL.as_bytes());
    encode_key(2, WireType::LengthDelimited, &mut buf);
    encode_varint(len as u64, &mut buf);
    config
        .encode(&mut buf)
        .expect("the buffer is sized for the message");
    (buf, header)
}

impl ResourceStore {
    /// A store whose counters live in a private registry (tests, load tools): read them with
    /// [`stats`](Self::stats).
    pub fn new() -> Self {
        Self::with_series(XdsSeries::register(&prometheus::Registry::new()))
    }

    /// A store whose counters are series of `metrics`, rendered by its [`Metrics::render`] with
    /// whatever else `metrics` holds (the engine's series). Stores made with the same `metrics`
    /// (or a clone) share the series.
    pub fn with_metrics(metrics: &Metrics) -> Self {
        Self::with_series(metrics.xds_series())
    }

    fn with_series(series: XdsSeries) -> Self {
        let (revisions, _) = watch::channel(0);
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        ResourceStore {
            inner: Arc::new(Inner {
                state: RwLock::new(State::default()),
                revision: Padded::default(),
                #[cfg(test)]
                lookups: AtomicU64::new(0),
                revisions,
                events,
                listeners: Arc::new(AtomicUsize::new(0)),
                series,
                streams: Mutex::new(BTreeMap::new()),
                next_stream: AtomicU64::new(1),
            }),
        }
    }

    /// Encodes a resource and, unless the store already holds exactly these bytes, hashes it; all
    /// before the write lock is taken (hashing an inline module costs milliseconds).
    fn prepare(&self, name: Arc<str>, mut config: TypedExtensionConfig) -> Option<Prepared> {
        // Envoy takes a SotW resource's name from the config itself: the key is authoritative.
        config.name.clear();
        config.name.push_str(&name);
        let (any, config_at) = encode_any(&config);
        let value = &any[config_at..];
        if self
            .read()
            .resources
            .get(&*name)
            .is_some_and(|e| e.config() == value)
        {
            return None;
        }
        let sha = Sha256::digest(value);
        let mut digest = [0u8; 8];
        digest[8 - VERSION_DIGEST_HEX / 2..].copy_from_slice(&sha[..VERSION_DIGEST_HEX / 2]);
        Some(Prepared {
            name,
            any,
            config_at,
            digest: u64::from_be_bytes(digest),
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
    ///
    /// A name given as an `Arc<str>` is kept as that very `Arc` (a resource already stored keeps
    /// the one it has), so that a caller keeping the name too holds no copy of its own.
    pub fn set(&self, name: impl Into<Arc<str>>, config: TypedExtensionConfig) -> Option<String> {
        let prepared = self.prepare(name.into(), config)?;
        let mut state = self
            .inner
            .state
            .write()
            .expect("resource store lock poisoned");
        let version = Self::insert(&mut state, prepared);
        if version.is_some() {
            // Sent under the lock so that the watched revision never goes backwards.
            self.publish(state.revision);
            self.count_resources(&state);
        }
        version
    }

    /// [`set`](Self::set) for many resources with one lock and one notification (bulk loads, load
    /// tools). Returns how many resources changed.
    pub fn set_many<N: Into<Arc<str>>>(
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
            self.publish(state.revision);
            self.count_resources(&state);
        }
        changed
    }

    /// Tells the streams that the store is at `revision` (under the write lock): first the atomic
    /// [`revision_now`](Self::revision_now) reads, then the watch that wakes them, so that a
    /// stream that saw the watch move reads the new revision there.
    fn publish(&self, revision: u64) {
        self.inner.revision.0.store(revision, Ordering::SeqCst);
        self.inner.revisions.send_replace(revision);
    }

    /// Stores `p` unless identical bytes got there since `prepare` looked.
    fn insert(state: &mut State, p: Prepared) -> Option<String> {
        let held = state.resources.get_key_value(&*p.name);
        if held.is_some_and(|(_, e)| e.config() == &p.any[p.config_at..]) {
            return None;
        }
        // A replaced resource keeps the name it was stored under: the map keeps its key.
        let name = held.map_or(p.name, |(k, _)| k.clone());
        state.revision += 1;
        let revision = state.revision;
        let version = Version {
            revision,
            digest: p.digest,
        }
        .to_string();
        let entry = Entry {
            name: name.clone(),
            version: version.clone(),
            revision,
            digest: p.digest,
            any: Bytes::from(p.any),
            config_at: p.config_at,
        };
        state.resources.insert(name, Arc::new(entry));
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
        self.publish(state.revision);
        self.count_resources(&state);
        true
    }

    /// Called under the write lock, so that the gauge follows the changes in order.
    fn count_resources(&self, state: &State) {
        self.inner
            .series
            .resources
            .set(state.resources.len() as i64);
    }

    /// The stored resource, decoded.
    pub fn get(&self, name: &str) -> Option<TypedExtensionConfig> {
        let entry = self.read().resources.get(name).cloned()?;
        // Decoded off-lock: inline modules make these tens of MiB.
        Some(
            TypedExtensionConfig::decode(entry.config())
                .expect("the store holds only encoded TypedExtensionConfig"),
        )
    }

    /// Names of all stored resources, sorted.
    pub fn names(&self) -> Vec<String> {
        self.read()
            .resources
            .keys()
            .map(|k| k.to_string())
            .collect()
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
                name: e.name.to_string(),
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
    pub fn events(&self) -> EventReceiver {
        EventReceiver::new(&self.inner.events, self.inner.listeners.clone())
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> XdsStats {
        let c = &self.inner.series;
        let (resources, revision) = {
            let state = self.read();
            (state.resources.len(), state.revision)
        };
        XdsStats {
            connected_streams: c.connected_streams.get().max(0) as u64,
            streams_total: c.streams_total.get(),
            pushes: c.pushes.get(),
            acks: c.acks.get(),
            nacks: c.nacks.get(),
            resources,
            revision,
        }
    }

    /// The open streams, by id: each is asked for its state now (module docs), one at a time and
    /// without holding the registry's lock meanwhile.
    pub fn streams(&self) -> Vec<StreamInfo> {
        let views: Vec<Arc<dyn StreamView>> = self
            .inner
            .streams
            .lock()
            .expect("stream registry lock poisoned")
            .values()
            .cloned()
            .collect();
        views.iter().map(|v| v.info()).collect()
    }

    /// Names of resources some open stream subscribes to, sorted: the "sent to a connected proxy"
    /// half of behavior.md §5's *used*.
    pub fn subscribed_names(&self) -> BTreeSet<String> {
        self.streams()
            .into_iter()
            .flat_map(|s| s.subscribed)
            .collect()
    }

    // ----- used by the stream state machines and the server -----

    /// `names` as a stream keeps its subscription: the store's own string of each resource it
    /// has (one string, which a replaced resource keeps, read by every stream), a string of the
    /// stream's own for the others. One read of the store, when a subscription changes.
    pub(crate) fn intern(&self, names: impl IntoIterator<Item = String>) -> BTreeSet<Arc<str>> {
        let state = self.read();
        (names.into_iter())
            .map(|n| match state.resources.get_key_value(n.as_str()) {
                Some((name, _)) => name.clone(),
                None => Arc::from(n),
            })
            .collect()
    }

    /// The stored entries for `names` that exist, sorted by name (duplicates collapse).
    pub(crate) fn lookup<'a, N: std::borrow::Borrow<str> + ?Sized + 'a>(
        &self,
        names: impl IntoIterator<Item = &'a N>,
    ) -> Vec<Arc<Entry>> {
        let mut found = Vec::new();
        self.lookup_into(names, &mut found);
        found
    }

    /// [`lookup`](Self::lookup) into `found` (cleared first), whose allocation a stream reuses
    /// from push to push. Names already sorted (a stream's subscription) are not sorted again.
    /// Returns the revision the store was at: until [`revision_now`](Self::revision_now) moves
    /// past it, the same lookup finds the same entries.
    pub(crate) fn lookup_into<'a, N: std::borrow::Borrow<str> + ?Sized + 'a>(
        &self,
        names: impl IntoIterator<Item = &'a N>,
        found: &mut Vec<Arc<Entry>>,
    ) -> u64 {
        found.clear();
        #[cfg(test)]
        self.inner.lookups.fetch_add(1, Ordering::Relaxed);
        let state = self.read();
        found.extend(
            names
                .into_iter()
                .filter_map(|n| state.resources.get(n.borrow()).cloned()),
        );
        let revision = state.revision;
        drop(state);
        if !found.is_sorted_by(|a, b| a.name <= b.name) {
            found.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        }
        found.dedup_by(|a, b| a.name == b.name);
        revision
    }

    /// How many lookups were made so far (tests).
    #[cfg(test)]
    pub(crate) fn lookups(&self) -> u64 {
        self.inner.lookups.load(Ordering::Relaxed)
    }

    /// The store's revision, read without its lock (one atomic load of a line that only changes
    /// write): what [`lookup_into`](Self::lookup_into) returned as long as nothing changed.
    pub(crate) fn revision_now(&self) -> u64 {
        self.inner.revision.0.load(Ordering::SeqCst)
    }

    #[cfg(test)]
    pub(crate) fn open_stream(&self, api: Api, protocol: Protocol) -> StreamId {
        let mut opened = 0;
        self.try_open_stream(usize::MAX, |id| {
            opened = id;
            Mutex::new(super::stream::StreamCore::new(id, api, protocol))
        })
        .expect("no stream limit");
        opened
    }

    /// Registers the stream `make` builds for a new id, unless `max_streams` are open already
    /// (checked and registered under one lock, so concurrent opens cannot overshoot); the stream
    /// stays in the registry until [`close_stream`](Self::close_stream).
    pub(crate) fn try_open_stream<V: StreamView + 'static>(
        &self,
        max_streams: usize,
        make: impl FnOnce(StreamId) -> V,
    ) -> Option<Arc<V>> {
        let mut streams = self
            .inner
            .streams
            .lock()
            .expect("stream registry lock poisoned");
        if streams.len() >= max_streams {
            return None;
        }
        let id = self.inner.next_stream.fetch_add(1, Ordering::Relaxed);
        self.inner.series.connected_streams.inc();
        self.inner.series.streams_total.inc();
        let view = Arc::new(make(id));
        streams.insert(id, view.clone());
        Some(view)
    }

    /// Counts one hit of a bound of the xDS port ([`METRIC_LIMIT_COUNT`]).
    pub(crate) fn count_limit(&self, limit: &str) {
        self.inner.series.limits.with_label_values(&[limit]).inc();
    }

    /// How often the bound `limit` was hit ([`METRIC_LIMIT_COUNT`]).
    pub fn limit_count(&self, limit: &str) -> u64 {
        self.inner.series.limits.with_label_values(&[limit]).get()
    }

    /// Bytes of responses handed to streams and not yet ACKed or NACKed: the send budget in use
    /// ([`METRIC_UNREAD_BYTES`]).
    pub fn unread_bytes(&self) -> u64 {
        self.inner.series.unread_bytes.get().max(0) as u64
    }

    /// The gauge of bytes handed to streams and not yet read ([`METRIC_UNREAD_BYTES`]).
    pub(crate) fn unread_bytes_gauge(&self) -> prometheus::IntGauge {
        self.inner.series.unread_bytes.clone()
    }

    pub(crate) fn close_stream(&self, id: StreamId) {
        self.inner.series.connected_streams.dec();
        self.inner
            .streams
            .lock()
            .expect("stream registry lock poisoned")
            .remove(&id);
    }

    pub(crate) fn count_push(&self) {
        self.inner.series.pushes.inc();
    }

    pub(crate) fn count_ack(&self) {
        self.inner.series.acks.inc();
    }

    /// Returns the NACK count including this one (logged with the NACK; concurrent NACKs may make
    /// it larger).
    pub(crate) fn count_nack(&self) -> u64 {
        self.inner.series.nacks.inc();
        self.inner.series.nacks.get()
    }

    /// Publishes an event; `make` runs only when someone listens.
    pub(crate) fn emit(&self, make: impl FnOnce() -> StreamEvent) {
        // Not `receiver_count`: it locks the channel, on every push and ACK of every stream.
        if self.inner.listeners.load(Ordering::SeqCst) > 0 {
            // An error only means every receiver went away meanwhile.
            let _ = self.inner.events.send(make());
        }
    }

    /// The store revision at which the resource last changed, without decoding it: a reader that
    /// keeps what it decoded (the simulator's `expect`) decodes again only when this moves.
    /// Revisions only grow within one store.
    pub fn revision_of(&self, name: &str) -> Option<u64> {
        self.read().resources.get(name).map(|e| e.revision)
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
pub(crate) mod tests;
