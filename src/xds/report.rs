//! What the xDS streams report, apart from the resources themselves: per-stream events ("resource
//! R version V was delivered to / ACKed / NACKed by proxy N"), stream snapshots for `/debug`,
//! counters, and their Prometheus series. [`super::store::ResourceStore`] records them; the
//! admin server, the tests and the load tools read them.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use serde::Serialize;
use tokio::sync::broadcast;

/// Prometheus names of the xDS series ([`XdsSeries`]); counters without a `_total` suffix, like the
/// Istio series of [`crate::metrics`].
pub const METRIC_CONNECTED_STREAMS: &str = "wasm_ecds_xds_connected_streams";
pub const METRIC_STREAM_COUNT: &str = "wasm_ecds_xds_stream_count";
pub const METRIC_PUSH_COUNT: &str = "wasm_ecds_xds_push_count";
pub const METRIC_ACK_COUNT: &str = "wasm_ecds_xds_ack_count";
pub const METRIC_NACK_COUNT: &str = "wasm_ecds_xds_nack_count";
pub const METRIC_RESOURCES: &str = "wasm_ecds_xds_resources";
/// How often each bound of the xDS port was hit, by `limit` (`docs/behavior.md` "Bounds of the
/// xDS port"): `request_size`, `streams`, `resource_names`, `node_size`, `send_budget` (a push
/// waited for the send budget) and `ack_timeout` (a stream closed for want of an ACK).
pub const METRIC_LIMIT_COUNT: &str = "wasm_ecds_xds_limit_count";
/// Bytes of responses handed to streams whose proxy has not read them yet (the send budget in use).
pub const METRIC_UNREAD_BYTES: &str = "wasm_ecds_xds_unread_bytes";

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

/// A receiver of the stream event feed ([`ResourceStore::events`]): the channel's receiver
/// (through `Deref`), counted among the store's listeners while it lives, so that a stream
/// learns whether anyone listens with one atomic load on every push and ACK (asking the
/// channel takes its lock, which every stream shares).
///
/// [`ResourceStore::events`]: super::store::ResourceStore::events
#[derive(Debug)]
pub struct EventReceiver {
    rx: broadcast::Receiver<StreamEvent>,
    listeners: Arc<AtomicUsize>,
}

impl EventReceiver {
    /// A receiver of `tx`, counted in `listeners` from before it exists until it is dropped.
    pub(super) fn new(tx: &broadcast::Sender<StreamEvent>, listeners: Arc<AtomicUsize>) -> Self {
        listeners.fetch_add(1, Ordering::SeqCst);
        EventReceiver {
            rx: tx.subscribe(),
            listeners,
        }
    }
}

impl Deref for EventReceiver {
    type Target = broadcast::Receiver<StreamEvent>;
    fn deref(&self) -> &Self::Target {
        &self.rx
    }
}

impl DerefMut for EventReceiver {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.rx
    }
}

impl Drop for EventReceiver {
    fn drop(&mut self) {
        self.listeners.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A snapshot of the xDS counters (also exported as the Prometheus series [`XdsSeries`]).
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

/// The last NACK of a resource on a stream: the version rejected and the proxy's error message
/// (at most [`NACK_MESSAGE_MAX`] bytes of it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Nacked {
    pub version: String,
    pub message: String,
}

/// How much of a NACK's error message is kept per resource (the rest is cut at a character
/// boundary and marked with `…`).
pub const NACK_MESSAGE_MAX: usize = 4096;

/// What one open stream subscribes to and holds, for `/debug` and for "is this module still sent
/// to a connected proxy" questions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StreamInfo {
    pub id: StreamId,
    pub node_id: String,
    /// The proxy's address as the server saw it (absent for in-process streams without one).
    pub peer: Option<String>,
    pub api: Api,
    pub protocol: Protocol,
    /// Subscribed resource names, sorted.
    pub subscribed: Vec<String>,
    /// Per resource, the version last sent on this stream.
    pub sent: BTreeMap<String, String>,
    /// Per resource, the version the proxy last ACKed on this stream.
    pub acked: BTreeMap<String, String>,
    /// Per resource, the last NACK not followed by an ACK of that resource.
    pub nacked: BTreeMap<String, Nacked>,
}

/// The xDS series of one registry. Handles are shared: clones count into the same series.
#[derive(Clone, Debug)]
pub struct XdsSeries {
    pub(super) connected_streams: IntGauge,
    pub(super) streams_total: IntCounter,
    pub(super) pushes: IntCounter,
    pub(super) acks: IntCounter,
    pub(super) nacks: IntCounter,
    pub(super) resources: IntGauge,
    pub(super) limits: IntCounterVec,
    pub(super) unread_bytes: IntGauge,
}

impl XdsSeries {
    /// Creates the series and registers them in `registry`.
    ///
    /// # Panics
    /// If `registry` already has them: [`Metrics`] registers them once and hands out clones.
    pub(crate) fn register(registry: &Registry) -> Self {
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("valid metric");
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("valid metric");
        let series = XdsSeries {
            connected_streams: gauge(METRIC_CONNECTED_STREAMS, "xDS streams open now."),
            streams_total: counter(METRIC_STREAM_COUNT, "xDS streams opened."),
            pushes: counter(METRIC_PUSH_COUNT, "ECDS responses sent to proxies."),
            acks: counter(METRIC_ACK_COUNT, "ECDS responses ACKed by proxies."),
            nacks: counter(METRIC_NACK_COUNT, "ECDS responses NACKed by proxies."),
            resources: gauge(METRIC_RESOURCES, "ECDS resources served."),
            limits: IntCounterVec::new(
                Opts::new(METRIC_LIMIT_COUNT, "Bounds of the xDS port hit, by limit."),
                &["limit"],
            )
            .expect("valid metric"),
            unread_bytes: gauge(
                METRIC_UNREAD_BYTES,
                "Bytes of responses handed to xDS streams and not yet read by their proxy.",
            ),
        };
        for c in [
            Box::new(series.connected_streams.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(series.streams_total.clone()),
            Box::new(series.pushes.clone()),
            Box::new(series.acks.clone()),
            Box::new(series.nacks.clone()),
            Box::new(series.resources.clone()),
            Box::new(series.limits.clone()),
            Box::new(series.unread_bytes.clone()),
        ] {
            registry
                .register(c)
                .expect("xDS series registered once per registry");
        }
        series
    }

    /// Counts one hit of the bound `limit` ([`METRIC_LIMIT_COUNT`]); `proxy` counts its own
    /// port's hits here too.
    pub(crate) fn count_limit(&self, limit: &str) {
        self.limits.with_label_values(&[limit]).inc();
    }

    /// The gauge of the send budget in use ([`METRIC_UNREAD_BYTES`]); `proxy`'s port counts its
    /// own budget here too.
    pub(crate) fn unread_bytes_gauge(&self) -> IntGauge {
        self.unread_bytes.clone()
    }
}
