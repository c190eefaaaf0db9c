//! What every per-stream state machine keeps, whatever its protocol (`sotw`, `delta`): identity,
//! subscriptions, what the proxy holds and ACKed, nonces and the response awaiting its ACK, and
//! the reports built from them ([`StreamInfo`], [`StreamEvent`]).
//!
//! A push and its ACK allocate nothing here: the nonce is two numbers written where it is sent
//! ([`Nonce`]), the response awaiting its ACK keeps the store's entries it carried
//! ([`Outstanding`], whose list is reused for the next lookup), the versions sent and ACKed are
//! kept as numbers ([`Held`]: the store's [`Version`]), written as text only where they are
//! shown ([`StreamInfo`]: `/debug/syncz`), and the public [`Delivery`] record is built only for
//! an event listener or a NACK.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;

use envoy_types::pb::envoy::config::core::v3::Node;

use super::accepts_type_url;
use std::sync::{Arc, Mutex, PoisonError};

use super::limits::{Grant, LogGate, SendBudget};
use super::store::{
    set_version, Api, Delivery, Entry, Nacked, Protocol, ResourceStore, ResourceVersion,
    StreamEvent, StreamEventKind, StreamId, StreamInfo, StreamView, Version, NACK_MESSAGE_MAX,
};

/// Longest node id kept (longer ones are cut, marked with `…`).
pub(crate) const NODE_ID_MAX: usize = 1024;

/// `text` cut to at most `max` bytes at a character boundary, marked with `…` when cut.
pub(crate) fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// A version a stream knows the proxy holds or ACKed: one this server sent, as numbers; or, for
/// a delta stream, whatever text the proxy said it holds when it connected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Held {
    Served(Version),
    /// A text naming no version of this store ([`Version::parse`]): it equals no served one.
    Other(Box<str>),
}

impl Held {
    /// The version `text` names: a served one when it is one this server writes.
    pub(crate) fn from_text(text: &str) -> Held {
        Version::parse(text).map_or_else(|| Held::Other(text.into()), Held::Served)
    }

    /// Whether this is the served `version`.
    pub(crate) fn is(&self, version: Version) -> bool {
        *self == Held::Served(version)
    }
}

impl fmt::Display for Held {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Held::Served(v) => v.fmt(f),
            Held::Other(text) => f.write_str(text),
        }
    }
}

/// `map[name] = version` (this runs for every push and ACK: a name already there is not touched).
pub(crate) fn set(map: &mut BTreeMap<Arc<str>, Held>, name: &Arc<str>, version: Version) {
    match map.get_mut(&**name) {
        Some(v) => *v = Held::Served(version),
        None => {
            map.insert(name.clone(), Held::Served(version));
        }
    }
}

/// Whether `a` and `b` name the same resource: the same string of the store (one pointer
/// compare, the usual case: every stream keys its maps by the store's own names, which a
/// replaced resource keeps), or equal text.
fn same_name(a: &Arc<str>, b: &Arc<str>) -> bool {
    Arc::ptr_eq(a, b) || a == b
}

/// Whether the names of `map` are exactly those of `entries` (sorted by name), in order: one
/// walk comparing pointers ([`same_name`]), instead of a search of `map` per entry comparing
/// text. This runs for every push and ACK.
fn keys_are(map: &BTreeMap<Arc<str>, Held>, entries: &[Arc<Entry>]) -> bool {
    map.len() == entries.len() && (map.keys().zip(entries)).all(|(k, e)| same_name(k, &e.name))
}

/// Whether `map` holds every one of `entries`' versions (sorted by name).
fn holds_all(map: &BTreeMap<Arc<str>, Held>, entries: &[Arc<Entry>]) -> bool {
    if keys_are(map, entries) {
        return (map.values().zip(entries)).all(|(v, e)| v.is(e.id()));
    }
    (entries.iter()).all(|e| map.get(&*e.name).is_some_and(|h| h.is(e.id())))
}

/// `map` with its versions as text, as reports show them.
fn texts(map: &BTreeMap<Arc<str>, Held>) -> BTreeMap<String, String> {
    (map.iter())
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

#[derive(Debug)]
pub(crate) struct StreamCore {
    pub(crate) id: StreamId,
    pub(crate) api: Api,
    protocol: Protocol,
    pub(crate) node_id: String,
    pub(crate) started: bool,
    /// The names subscribed to, as the store's own strings of the resources it has
    /// ([`ResourceStore::intern`]): the lookups of every push read memory every stream reads,
    /// not a copy of the stream's own.
    pub(crate) subscribed: BTreeSet<Arc<str>>,
    /// Per resource, the version the proxy holds: the one carried by the last response that had it
    /// (or, for delta, the one the proxy said it holds when it connected). Keyed by the store's
    /// own name of the resource ([`Entry::name`]): one string for every stream, so that looking
    /// a name up here reads memory every stream reads, not a copy of the stream's own.
    pub(crate) held: BTreeMap<Arc<str>, Held>,
    /// Per resource, the version the proxy last ACKed (keyed like [`Self::held`]).
    pub(crate) acked: BTreeMap<Arc<str>, Held>,
    /// Per resource, the last NACK not followed by an ACK of it (`/debug/syncz`).
    pub(crate) nacked: BTreeMap<String, Nacked>,
    /// The proxy's address, when known.
    pub(crate) peer: Option<SocketAddr>,
    nonce_counter: u64,
    /// The last response while it awaits its ACK or NACK (no push until it arrives).
    pub(crate) outstanding: Option<Outstanding>,
    /// An empty list kept for the next lookup of the subscribed entries (the list of the last
    /// response, once ACKed), so that a push allocates none.
    pub(crate) scratch: Vec<Arc<Entry>>,
    /// The stream's `xds_stream` span: the parent of its log lines, entered only to log (an
    /// entered span costs every poll of the stream's task). `Span::none()` in unit tests.
    pub(crate) span: tracing::Span,
    /// Where pushes take their bytes from (`limits.rs`); `None`: unbounded (unit tests).
    pub(crate) budget: Option<SendBudget>,
    /// The grant of the response just built, for the server to send along with it.
    pub(crate) grant: Option<Grant>,
    /// A push is waiting for the send budget (counted there as waiting while this is set).
    pub(crate) deferred: bool,
    /// The server's log gate for repeated lines (NACK loops); `None`: every line (unit tests).
    pub(crate) log: Option<Arc<LogGate>>,
}

impl StreamCore {
    pub(crate) fn new(id: StreamId, api: Api, protocol: Protocol) -> Self {
        StreamCore {
            id,
            api,
            protocol,
            node_id: String::new(),
            started: false,
            subscribed: BTreeSet::new(),
            held: BTreeMap::new(),
            acked: BTreeMap::new(),
            nacked: BTreeMap::new(),
            peer: None,
            nonce_counter: 0,
            outstanding: None,
            scratch: Vec::new(),
            span: tracing::Span::none(),
            budget: None,
            grant: None,
            deferred: false,
            log: None,
        }
    }

    /// The proxy accepted `version` of `name`.
    pub(crate) fn ack_resource(&mut self, name: &Arc<str>, version: Version) {
        set(&mut self.acked, name, version);
        if !self.nacked.is_empty() {
            self.nacked.remove(&**name);
        }
    }

    /// A SotW response carried exactly `entries` (sorted by name): the proxy now holds them, and
    /// only them.
    pub(crate) fn hold(&mut self, entries: &[Arc<Entry>]) {
        if keys_are(&self.held, entries) {
            for (v, e) in self.held.values_mut().zip(entries) {
                *v = Held::Served(e.id());
            }
            return;
        }
        // `entries` is sorted by name.
        self.held
            .retain(|n, _| (entries.binary_search_by(|e| e.name.cmp(n))).is_ok());
        for e in entries {
            set(&mut self.held, &e.name, e.id());
        }
    }

    /// Whether the proxy holds every one of `entries` (sorted by name) at its version.
    pub(crate) fn holds_all(&self, entries: &[Arc<Entry>]) -> bool {
        holds_all(&self.held, entries)
    }

    /// The proxy rejected the resources of `response` with `message`.
    pub(crate) fn nack_resources(&mut self, response: &Outstanding, message: &str) {
        for e in &response.entries {
            let nack = Nacked {
                version: e.version.clone(),
                message: message.to_string(),
            };
            self.nacked.insert(e.name.to_string(), nack);
        }
    }

    /// The proxy accepted `response`: its resources' versions, those still subscribed when
    /// `subscribed_only`, count as ACKed.
    pub(crate) fn ack_entries(&mut self, response: &Outstanding, subscribed_only: bool) {
        if !subscribed_only && self.nacked.is_empty() && keys_are(&self.acked, &response.entries) {
            // The usual ACK: of the same resources as the last one.
            for (v, e) in self.acked.values_mut().zip(&response.entries) {
                *v = Held::Served(e.id());
            }
            return;
        }
        for e in &response.entries {
            if !subscribed_only || self.subscribed.contains(&*e.name) {
                self.ack_resource(&e.name, e.id());
            }
        }
    }

    /// A NACK of `response`: counted, its message (cut, see [`bounded_message`]) kept per
    /// resource and logged at most once per interval per node; returns the message for the
    /// stream's `Nacked` event.
    ///
    /// [`bounded_message`]: Self::bounded_message
    pub(crate) fn nacked(
        &mut self,
        response: &Outstanding,
        status: &envoy_types::pb::google::rpc::Status,
        store: &ResourceStore,
    ) -> String {
        let nacks = store.count_nack();
        let message = Self::bounded_message(&status.message);
        self.nack_resources(response, &message);
        if let Some(suppressed) = self.admit_log(&format!("nack {}", self.node_id)) {
            tracing::warn!(
                parent: &self.span,
                node = %self.node_id,
                version = %response.version(),
                nonce = %response.nonce,
                resources = ?response.entries.iter().map(|e| format!("{}@{}", e.name, e.version)).collect::<Vec<_>>(),
                code = status.code,
                message = %message,
                nacks,
                suppressed,
                "proxy rejected ECDS update (NACK)"
            );
        }
        message
    }

    /// A NACK's error message, cut to [`NACK_MESSAGE_MAX`] bytes: it is logged, kept per resource
    /// and sent to event watchers, and a proxy may send megabytes.
    pub(crate) fn bounded_message(message: &str) -> String {
        cut(message, NACK_MESSAGE_MAX)
    }

    /// Forgets what is known of names no longer subscribed.
    pub(crate) fn forget_unsubscribed(&mut self) {
        let subscribed = &self.subscribed;
        self.held.retain(|n, _| subscribed.contains(&**n));
        self.acked.retain(|n, _| subscribed.contains(&**n));
        self.nacked.retain(|n, _| subscribed.contains(n.as_str()));
    }

    /// `Some(suppressed)` when a line under `key` may be logged now (see `LogGate`).
    pub(crate) fn admit_log(&self, key: &str) -> Option<u64> {
        match &self.log {
            Some(gate) => gate.admit(key),
            None => Some(0),
        }
    }

    /// Whether a response of `bytes` may be built now: takes its grant from the send budget, or
    /// marks the push deferred (counted once per wait) when the budget cannot hold it.
    pub(crate) fn admit(&mut self, bytes: usize, store: &ResourceStore) -> bool {
        let Some(budget) = &self.budget else {
            return true;
        };
        match budget.admit(bytes, &mut self.deferred) {
            Ok(grant) => {
                self.grant = Some(grant);
                true
            }
            Err(started) => {
                if started {
                    store.count_limit("send_budget");
                    tracing::debug!(parent: &self.span, bytes, "push waits for the send budget");
                }
                false
            }
        }
    }

    /// The start of every request: records the proxy's node id, reports the stream as connected on
    /// its first request, and checks the type URL. `None` when the request is for a type this server
    /// does not serve (it is ignored); otherwise whether this was the stream's first request.
    pub(crate) fn begin_request(
        &mut self,
        node: Option<&Node>,
        type_url: &str,
        store: &ResourceStore,
    ) -> Option<bool> {
        if self.node_id.is_empty() {
            if let Some(node) = node {
                // Logged, reported and kept per stream: a hostile id is cut (Envoy's are short).
                self.node_id = cut(&node.id, NODE_ID_MAX);
            }
        }
        let first = !self.started;
        if first {
            self.started = true;
            store.emit(|| self.event(StreamEventKind::Connected));
        }
        if !accepts_type_url(self.api, type_url) {
            tracing::debug!(parent: &self.span, %type_url, "ignoring request for a type this server does not serve");
            return None;
        }
        Some(first)
    }

    /// Whether a response awaits its ACK/NACK (no push until it arrives).
    pub(crate) fn awaiting_ack(&self) -> bool {
        self.outstanding.is_some()
    }

    /// The nonce of the next response ([`Nonce`]).
    pub(crate) fn next_nonce(&mut self) -> Nonce {
        self.nonce_counter += 1;
        Nonce {
            counter: self.nonce_counter,
            random: fastrand::u32(..),
        }
    }

    /// The subscribed entries the store holds, sorted by name, in the stream's reused list
    /// ([`Self::scratch`]); give the list back with [`Self::give_back`] when no response takes
    /// it.
    pub(crate) fn lookup_subscribed(&mut self, store: &ResourceStore) -> Vec<Arc<Entry>> {
        self.lookup_subscribed_at(store).0
    }

    /// [`Self::lookup_subscribed`], and the store revision it read at
    /// ([`ResourceStore::lookup_into`]).
    pub(crate) fn lookup_subscribed_at(&mut self, store: &ResourceStore) -> (Vec<Arc<Entry>>, u64) {
        let mut found = std::mem::take(&mut self.scratch);
        let revision = store.lookup_into(&self.subscribed, &mut found);
        (found, revision)
    }

    /// Keeps `list` (emptied) for the next lookup.
    pub(crate) fn give_back(&mut self, mut list: Vec<Arc<Entry>>) {
        list.clear();
        self.scratch = list;
    }

    pub(crate) fn info(&self) -> StreamInfo {
        StreamInfo {
            id: self.id,
            node_id: self.node_id.clone(),
            peer: self.peer.map(|p| p.to_string()),
            api: self.api,
            protocol: self.protocol,
            subscribed: self.subscribed.iter().map(|n| n.to_string()).collect(),
            sent: texts(&self.held),
            acked: texts(&self.acked),
            nacked: self.nacked.clone(),
        }
    }

    pub(crate) fn event(&self, kind: StreamEventKind) -> StreamEvent {
        StreamEvent {
            stream: self.id,
            node_id: self.node_id.clone(),
            api: self.api,
            protocol: self.protocol,
            kind,
        }
    }
}

/// The nonce of a response: a counter, unique on the stream, and a random part, so that a client
/// cannot ACK a response it has not read (the ACK releases the response's share of the send
/// budget, `limits.rs`). Sent as `<counter>-<8 hex digits>`, written straight where it goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Nonce {
    counter: u64,
    random: u32,
}

/// The longest nonce: 20 digits, a dash and 8 hex digits.
pub(crate) const NONCE_MAX: usize = 29;

impl Nonce {
    #[cfg(test)]
    pub(crate) fn new(counter: u64, random: u32) -> Self {
        Nonce { counter, random }
    }

    /// The nonce as sent, written into `buf`.
    pub(crate) fn text<'b>(&self, buf: &'b mut [u8; NONCE_MAX]) -> &'b str {
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        let mut n = self.counter;
        loop {
            at -= 1;
            digits[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        let len = digits.len() - at;
        buf[..len].copy_from_slice(&digits[at..]);
        buf[len] = b'-';
        for (i, b) in buf[len + 1..len + 9].iter_mut().enumerate() {
            *b = b"0123456789abcdef"[(self.random >> (28 - 4 * i)) as usize & 0xf];
        }
        std::str::from_utf8(&buf[..len + 9]).expect("digits are ASCII")
    }

    /// Whether `text` is this nonce as sent.
    pub(crate) fn is(&self, text: &str) -> bool {
        text.len() <= NONCE_MAX && self.text(&mut [0; NONCE_MAX]) == text
    }
}

impl fmt::Display for Nonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.text(&mut [0; NONCE_MAX]))
    }
}

/// The response awaiting its ACK or NACK, as the store's entries it carried: the encoder writes
/// it (`encode.rs`), the ACK marks its versions ACKed, and a [`Delivery`] is made of it only for
/// an event listener.
#[derive(Debug)]
pub(crate) struct Outstanding {
    pub(crate) nonce: Nonce,
    /// The resources it carries, sorted by name.
    pub(crate) entries: Vec<Arc<Entry>>,
    /// Delta only: the names it says were removed.
    pub(crate) removed: Vec<String>,
    /// Its version when that is not its only resource's own (several resources: the SotW set
    /// version; a delta response that only removes: the store revision).
    own_version: Option<String>,
}

impl Outstanding {
    /// A SotW response: `version_info` is the set version of `entries` (sorted by name).
    pub(crate) fn sotw(nonce: Nonce, entries: Vec<Arc<Entry>>) -> Self {
        let own_version = (entries.len() > 1).then(|| set_version(&entries));
        Outstanding {
            nonce,
            entries,
            removed: Vec::new(),
            own_version,
        }
    }

    /// A delta response: `system_version_info` is the set version of `entries`, or `revision`
    /// for a response that only removes.
    pub(crate) fn delta(
        nonce: Nonce,
        entries: Vec<Arc<Entry>>,
        removed: Vec<String>,
        revision: u64,
    ) -> Self {
        let own_version = match entries.len() {
            0 => Some(revision.to_string()),
            1 => None,
            _ => Some(set_version(&entries)),
        };
        Outstanding {
            nonce,
            entries,
            removed,
            own_version,
        }
    }

    /// `version_info` (SotW) or `system_version_info` (delta).
    pub(crate) fn version(&self) -> &str {
        match (&self.own_version, self.entries.as_slice()) {
            (Some(v), _) => v,
            (None, [only]) => &only.version,
            (None, _) => "",
        }
    }

    /// The record of events and reports.
    pub(crate) fn delivery(&self) -> Delivery {
        Delivery {
            nonce: self.nonce.to_string(),
            version: self.version().to_string(),
            resources: (self.entries.iter())
                .map(|e| ResourceVersion {
                    name: e.name.to_string(),
                    version: e.version.clone(),
                })
                .collect(),
            removed: self.removed.clone(),
        }
    }
}

impl Drop for StreamCore {
    fn drop(&mut self) {
        if let (true, Some(budget)) = (self.deferred, &self.budget) {
            budget.stop_waiting();
        }
    }
}

impl AsRef<StreamCore> for StreamCore {
    fn as_ref(&self) -> &StreamCore {
        self
    }
}

/// A stream registers its own state in the store ([`StreamView`]); its report is built only when
/// someone reads the registry.
impl<T: AsRef<StreamCore> + Send> StreamView for Mutex<T> {
    fn info(&self) -> StreamInfo {
        // A stream task that panicked left its state as it was: report that.
        self.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .info()
    }
}
