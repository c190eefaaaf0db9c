//! What every per-stream state machine keeps, whatever its protocol (`sotw`, `delta`): identity,
//! subscriptions, what the proxy holds and ACKed, nonces and the response awaiting its ACK, and
//! the reports built from them ([`StreamInfo`], [`StreamEvent`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use envoy_types::pb::envoy::config::core::v3::Node;

use super::accepts_type_url;
use std::sync::{Arc, Mutex, PoisonError};

use super::limits::{Grant, LogGate, SendBudget, Waiting};
use super::store::{
    Api, Delivery, Entry, Nacked, Protocol, ResourceStore, StreamEvent, StreamEventKind, StreamId,
    StreamInfo, StreamView, NACK_MESSAGE_MAX,
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

/// `map[name] = value`, reusing the strings already there (this runs for every push and ACK).
fn set(map: &mut BTreeMap<String, String>, name: &str, value: &str) {
    match map.get_mut(name) {
        Some(v) => {
            if v != value {
                v.clear();
                v.push_str(value);
            }
        }
        None => {
            map.insert(name.to_string(), value.to_string());
        }
    }
}

#[derive(Debug)]
pub(crate) struct StreamCore {
    pub(crate) id: StreamId,
    pub(crate) api: Api,
    protocol: Protocol,
    pub(crate) node_id: String,
    pub(crate) started: bool,
    pub(crate) subscribed: BTreeSet<String>,
    /// Per resource, the version the proxy holds: the one carried by the last response that had it
    /// (or, for delta, the one the proxy said it holds when it connected).
    pub(crate) held: BTreeMap<String, String>,
    /// Per resource, the version the proxy last ACKed.
    pub(crate) acked: BTreeMap<String, String>,
    /// Per resource, the last NACK not followed by an ACK of it (`/debug/syncz`).
    pub(crate) nacked: BTreeMap<String, Nacked>,
    /// The proxy's address, when known.
    pub(crate) peer: Option<SocketAddr>,
    nonce_counter: u64,
    /// The last response while it awaits its ACK or NACK (no push until it arrives).
    pub(crate) outstanding: Option<Delivery>,
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
            budget: None,
            grant: None,
            deferred: false,
            log: None,
        }
    }

    /// The proxy accepted `version` of `name`.
    pub(crate) fn ack_resource(&mut self, name: &str, version: &str) {
        set(&mut self.acked, name, version);
        if !self.nacked.is_empty() {
            self.nacked.remove(name);
        }
    }

    /// A SotW response carried exactly `entries` (sorted by name): the proxy now holds them, and
    /// only them.
    pub(crate) fn hold(&mut self, entries: &[Arc<Entry>]) {
        if self.held.len() != entries.len()
            || !(self.held.keys()).eq(entries.iter().map(|e| &e.name))
        {
            // `entries` is sorted by name.
            self.held
                .retain(|n, _| (entries.binary_search_by(|e| e.name.as_str().cmp(n))).is_ok());
        }
        for e in entries {
            set(&mut self.held, &e.name, &e.version);
        }
    }

    /// The proxy rejected the resources of `delivery` with `message`.
    pub(crate) fn nack_resources(&mut self, delivery: &Delivery, message: &str) {
        for r in &delivery.resources {
            let nack = Nacked {
                version: r.version.clone(),
                message: message.to_string(),
            };
            self.nacked.insert(r.name.clone(), nack);
        }
    }

    /// A NACK of `delivery`: counted, its message (cut, see [`bounded_message`]) kept per
    /// resource and logged at most once per interval per node; returns the message for the
    /// stream's `Nacked` event.
    ///
    /// [`bounded_message`]: Self::bounded_message
    pub(crate) fn nacked(
        &mut self,
        delivery: &Delivery,
        status: &envoy_types::pb::google::rpc::Status,
        store: &ResourceStore,
    ) -> String {
        let nacks = store.count_nack();
        let message = Self::bounded_message(&status.message);
        self.nack_resources(delivery, &message);
        if let Some(suppressed) = self.admit_log(&format!("nack {}", self.node_id)) {
            tracing::warn!(
                node = %self.node_id,
                version = %delivery.version,
                nonce = %delivery.nonce,
                resources = ?delivery.resources.iter().map(|r| format!("{}@{}", r.name, r.version)).collect::<Vec<_>>(),
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
        self.held.retain(|n, _| subscribed.contains(n));
        self.acked.retain(|n, _| subscribed.contains(n));
        self.nacked.retain(|n, _| subscribed.contains(n));
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
        let granted = if self.deferred {
            budget.try_grant(bytes).ok_or(Waiting)
        } else {
            budget.try_grant_or_wait(bytes)
        };
        match granted {
            Ok(grant) => {
                if self.deferred {
                    budget.stop_waiting();
                }
                self.grant = Some(grant);
                self.deferred = false;
                true
            }
            Err(Waiting) => {
                if !self.deferred {
                    store.count_limit("send_budget");
                    tracing::debug!(bytes, "push waits for the send budget");
                }
                self.deferred = true;
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
            tracing::debug!(%type_url, "ignoring request for a type this server does not serve");
            return None;
        }
        Some(first)
    }

    /// Whether a response awaits its ACK/NACK (no push until it arrives).
    pub(crate) fn awaiting_ack(&self) -> bool {
        self.outstanding.is_some()
    }

    /// The nonce of the next response: a counter, unique on the stream, and a random part, so that
    /// a client cannot ACK a response it has not read (the ACK releases the response's share of
    /// the send budget, `limits.rs`).
    pub(crate) fn next_nonce(&mut self) -> String {
        self.nonce_counter += 1;
        format!("{}-{:08x}", self.nonce_counter, fastrand::u32(..))
    }

    pub(crate) fn info(&self) -> StreamInfo {
        StreamInfo {
            id: self.id,
            node_id: self.node_id.clone(),
            peer: self.peer.map(|p| p.to_string()),
            api: self.api,
            protocol: self.protocol,
            subscribed: self.subscribed.iter().cloned().collect(),
            sent: self.held.clone(),
            acked: self.acked.clone(),
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
