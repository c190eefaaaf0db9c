//! The bounds of the xDS port (docs/behavior.md "Bounds of the xDS port"): what one client may
//! make the server hold, so that a hostile or broken proxy cannot exhaust memory or flood the log
//! while the others keep being served.
//!
//! - [`StreamLimits`]: the configured bounds (request size, streams, resource names per stream,
//!   node size, send budget, ACK deadline). `server.rs` checks them per request and per stream.
//! - [`SendBudget`]: bytes of responses handed to streams and not yet read by their proxy. HTTP/2
//!   keeps a response until the proxy opens its flow-control window; responses share the store's
//!   encoding of each resource (`encode.rs`), but a proxy that never reads keeps the versions it
//!   was sent alive after the store replaced them. A push takes a [`Grant`] of its size before
//!   the response is built; the stream task holds the grant until the proxy ACKs or NACKs that
//!   response (it has then read it) or the stream ends. A push that does not fit waits, without
//!   holding a response, until some grant is released. A stream whose response stays
//!   unacknowledged past the ACK deadline (or that breaks a bound meanwhile) is reset through its
//!   [`AbortHandle`] ([`AbortLayer`]): the reset makes HTTP/2 drop the bytes its proxy never read,
//!   so the grant released with it matches memory really freed.
//! - [`LogGate`] (shared with the driver's pull log, `crate::log_gate`): one log line per key and
//!   [`LOG_INTERVAL`]; the lines in between are counted and the count is reported with the next
//!   line let through (reconnect storms, NACK loops, refusals).
//! - [`StreamLimits::breach`], [`refuse`], [`refuse_stream`], [`request_too_large`]: which bound a
//!   request breaks and the status, count and log line that end its stream. `server.rs` and the
//!   proxy's port (`proxy/stream.rs`, `proxy/unread.rs`) both use them, and the send budget
//!   ([`SendBudget::admit`]) and [`AbortLayer`], so a bound reads the same on either.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use futures_util::task::AtomicWaker;
use prost::Message as _;
use std::sync::atomic::{fence, AtomicUsize, Ordering};
use tokio::sync::watch;

pub use crate::log_gate::LogGate;

/// Largest request message accepted (requests carry names and node metadata, never modules).
pub const MAX_REQUEST_SIZE: usize = 4 * 1024 * 1024; // 4 MiB
/// Concurrent xDS streams served; more are refused with `RESOURCE_EXHAUSTED`.
pub const MAX_STREAMS: usize = 10_000;
/// Resource names one stream may subscribe to.
pub const MAX_RESOURCE_NAMES: usize = 10_000;
/// Largest encoded `node` (id, cluster, metadata, ...) a request may carry.
pub const MAX_NODE_SIZE: usize = 256 * 1024; // 256 KiB
/// Bytes of responses handed to streams and not yet read, over all streams.
pub const SEND_BUDGET: usize = 512 * 1024 * 1024; // 512 MiB
/// How long a response may go without ACK or NACK before its stream is closed.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(300);
/// The interval of the xDS port's [`LogGate`]: one line per key per interval.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The configured bounds; [`Default`] holds the documented defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamLimits {
    pub max_request_size: usize,
    pub max_streams: usize,
    pub max_resource_names: usize,
    pub max_node_size: usize,
    pub send_budget: usize,
    pub ack_timeout: Duration,
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits {
            max_request_size: MAX_REQUEST_SIZE,
            max_streams: MAX_STREAMS,
            max_resource_names: MAX_RESOURCE_NAMES,
            max_node_size: MAX_NODE_SIZE,
            send_budget: SEND_BUDGET,
            ack_timeout: ACK_TIMEOUT,
        }
    }
}

/// A bound broken by a request: its name in [`METRIC_LIMIT_COUNT`](super::report::METRIC_LIMIT_COUNT),
/// why (naming the flag), and the status code ending the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Breach {
    pub limit: &'static str,
    pub why: String,
    pub code: tonic::Code,
}

impl StreamLimits {
    /// The bound a request breaks, if any: a node larger than [`Self::max_node_size`]
    /// (`INVALID_ARGUMENT`), or `names` (what the stream would subscribe to after the request)
    /// beyond [`Self::max_resource_names`] (`RESOURCE_EXHAUSTED`).
    pub fn breach(&self, node: Option<&Node>, names: usize) -> Option<Breach> {
        if let Some(node) = node {
            let size = node.encoded_len();
            if size > self.max_node_size {
                return Some(Breach {
                    limit: "node_size",
                    why: format!(
                        "node is {size} bytes encoded, more than {} (--xds-max-node-size)",
                        self.max_node_size
                    ),
                    code: tonic::Code::InvalidArgument,
                });
            }
        }
        if names > self.max_resource_names {
            return Some(Breach {
                limit: "resource_names",
                why: format!(
                    "{names} resource names subscribed, more than {} (--xds-max-resource-names)",
                    self.max_resource_names
                ),
                code: tonic::Code::ResourceExhausted,
            });
        }
        None
    }
}

/// The breach of a request tonic refused to decode (`OUT_OF_RANGE`: larger than
/// [`StreamLimits::max_request_size`]); `None` for other stream errors.
pub fn request_too_large(status: &tonic::Status) -> Option<Breach> {
    (status.code() == tonic::Code::OutOfRange).then(|| Breach {
        limit: "request_size",
        why: format!("{} (--xds-max-request-size)", status.message()),
        code: tonic::Code::ResourceExhausted,
    })
}

/// The breach of a stream whose response went without ACK or NACK for `timeout`
/// (`DEADLINE_EXCEEDED`).
pub fn ack_timeout(timeout: Duration) -> Breach {
    Breach {
        limit: "ack_timeout",
        why: format!(
            "no ACK or NACK within {} (--xds-ack-timeout)",
            humantime::format_duration(timeout)
        ),
        code: tonic::Code::DeadlineExceeded,
    }
}

/// A node id as logs and reports keep it: cut to 1 KiB (Envoy's are short, a hostile one may
/// not be).
pub fn node_id_for_logs(node: &Node) -> String {
    super::stream::cut(&node.id, super::stream::NODE_ID_MAX)
}

/// Counts (`count`) and logs (through `log`, one line per bound and interval) a stream of `node`
/// ended by `breach`; returns the status telling the proxy why.
pub fn refuse(
    log: &LogGate,
    count: impl FnOnce(&str),
    node: &str,
    breach: &Breach,
) -> tonic::Status {
    let Breach { limit, why, code } = breach;
    count(limit);
    if let Some(suppressed) = log.admit(&format!("limit {limit}")) {
        tracing::warn!(node, limit, suppressed, "xds stream closed: {why}");
    }
    tonic::Status::new(*code, format!("xds stream closed: {why}"))
}

/// Counts, logs and returns the refusal of a stream opened while `max` are open.
pub fn refuse_stream(
    log: &LogGate,
    count: impl FnOnce(&str),
    peer: Option<std::net::SocketAddr>,
    max: usize,
) -> tonic::Status {
    count("streams");
    if let Some(suppressed) = log.admit("limit streams") {
        tracing::warn!(peer = ?peer, max, suppressed, "xds stream refused: stream limit reached");
    }
    tonic::Status::resource_exhausted(format!(
        "{max} xds streams are open, the most this server accepts (--xds-max-streams)"
    ))
}

/// The send budget of one server, shared by its streams (module docs). Cheap to clone.
///
/// The bytes in use are one counter: a grant adds to it unless it would go over the total, its
/// release subtracts (a semaphore's release would take its waiters' lock on every ACK, and a
/// stream waiting for the budget waits on [`watch_released`](Self::watch_released), never in a
/// semaphore's queue). A grant holds the budget by one reference.
#[derive(Clone, Debug)]
pub struct SendBudget {
    shared: Arc<Budget>,
}

#[derive(Debug)]
struct Budget {
    total: usize,
    /// Bytes granted and not released.
    in_use: AtomicUsize,
    released: watch::Sender<u64>,
    /// How many streams wait for the budget: a release tells `released` only when some do (a
    /// watch channel's notification takes its locks, shared by every stream, on each ACK).
    waiting: AtomicUsize,
    gauge: prometheus::IntGauge,
}

impl SendBudget {
    pub(crate) fn new(total: usize, gauge: prometheus::IntGauge) -> Self {
        SendBudget {
            shared: Arc::new(Budget {
                total: total.clamp(1, i64::MAX as usize),
                in_use: AtomicUsize::new(0),
                released: watch::channel(0).0,
                waiting: AtomicUsize::new(0),
                gauge,
            }),
        }
    }

    /// A grant for a response of `bytes`, or `None` when the budget cannot hold it now. A
    /// response larger than the whole budget waits until it is the only one in flight.
    pub(crate) fn try_grant(&self, bytes: usize) -> Option<Grant> {
        let b = &self.shared;
        let n = bytes.clamp(1, b.total);
        (b.in_use)
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                (used <= b.total - n).then_some(used + n)
            })
            .ok()?;
        b.gauge.add(n as i64);
        Some(Grant {
            bytes: n,
            budget: self.shared.clone(),
        })
    }

    /// [`try_grant`](Self::try_grant) for a stream that was not waiting; when the budget cannot
    /// hold `bytes`, the stream is counted as waiting (until [`stop_waiting`](Self::stop_waiting))
    /// and, so that no release goes untold between its attempt and its count, tries once more.
    pub(crate) fn try_grant_or_wait(&self, bytes: usize) -> Result<Grant, Waiting> {
        if let Some(grant) = self.try_grant(bytes) {
            return Ok(grant);
        }
        self.shared.waiting.fetch_add(1, Ordering::SeqCst);
        // Pairs with the fence of `Grant::drop`: either that release sees this count, or this
        // attempt sees its bytes released.
        fence(Ordering::SeqCst);
        match self.try_grant(bytes) {
            Some(grant) => {
                self.stop_waiting();
                Ok(grant)
            }
            None => Err(Waiting),
        }
    }

    /// A grant for a push of `bytes` by a stream that waits for the budget while `*waiting`:
    /// `Err(true)` when the push does not fit and the stream starts waiting (count the wait
    /// once), `Err(false)` when it still waits. The stream tries again when
    /// [`watch_released`](Self::watch_released) changes, and stops waiting with a grant, or when
    /// it goes away with [`stop_waiting`](Self::stop_waiting) if `*waiting`.
    pub(crate) fn admit(&self, bytes: usize, waiting: &mut bool) -> Result<Grant, bool> {
        let granted = if *waiting {
            self.try_grant(bytes).ok_or(Waiting)
        } else {
            self.try_grant_or_wait(bytes)
        };
        match granted {
            Ok(grant) => {
                if *waiting {
                    self.stop_waiting();
                }
                *waiting = false;
                Ok(grant)
            }
            Err(Waiting) => Err(!std::mem::replace(waiting, true)),
        }
    }

    /// A stream counted by [`try_grant_or_wait`](Self::try_grant_or_wait) no longer waits.
    pub(crate) fn stop_waiting(&self) {
        self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
    }

    /// Marked changed whenever a grant is released: a stream whose push did not fit tries again.
    pub(crate) fn watch_released(&self) -> watch::Receiver<u64> {
        self.shared.released.subscribe()
    }
}

/// A part of the [`SendBudget`], held while its response is unread; released on drop.
#[derive(Debug)]
pub struct Grant {
    bytes: usize,
    budget: Arc<Budget>,
}

/// A push that did not fit in the [`SendBudget`]: its stream now counts as waiting.
#[derive(Debug)]
pub(crate) struct Waiting;

impl Drop for Grant {
    fn drop(&mut self) {
        let b = &self.budget;
        b.in_use.fetch_sub(self.bytes, Ordering::SeqCst);
        b.gauge.sub(self.bytes as i64);
        fence(Ordering::SeqCst);
        if b.waiting.load(Ordering::SeqCst) > 0 {
            b.released.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

/// Lets a stream task reset its HTTP/2 stream ([`AbortLayer`]).
#[derive(Clone, Debug, Default)]
pub struct AbortHandle {
    inner: Arc<AbortState>,
}

#[derive(Debug, Default)]
struct AbortState {
    aborted: std::sync::atomic::AtomicBool,
    /// Lock-free: the body registers its waker on every frame it is polled for.
    waker: AtomicWaker,
}

impl AbortHandle {
    /// Resets the stream: its response body fails, and HTTP/2 drops what it still buffers for it.
    pub(crate) fn abort(&self) {
        self.inner
            .aborted
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.inner.waker.wake();
    }

    fn aborted(&self) -> bool {
        self.inner.aborted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether the stream was reset, the waker registered first: for a body about to answer
    /// `Pending` (one that has a frame ready is polled again anyway).
    fn poll_aborted(&self, cx: &Context<'_>) -> bool {
        // The body is polled for every frame by the same connection task: registering keeps its
        // waker rather than clone one and drop the other on every frame.
        self.inner.waker.register(cx.waker());
        self.aborted()
    }
}

/// A layer of the xDS server: every request gets an [`AbortHandle`] in its extensions, and its
/// response body fails once the handle is used, so that the transport resets the stream
/// (RST_STREAM) and drops the response bytes its proxy never read. Ending the stream with a
/// status instead would queue the status behind those bytes and keep them.
#[derive(Clone, Copy, Debug, Default)]
pub struct AbortLayer;

impl<S> tower_layer::Layer<S> for AbortLayer {
    type Service = Abortable<S>;
    fn layer(&self, inner: S) -> Abortable<S> {
        Abortable(inner)
    }
}

/// The service of [`AbortLayer`].
#[derive(Clone, Debug)]
pub struct Abortable<S>(S);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S, B, R> tower_service::Service<http::Request<B>> for Abortable<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<AbortableBody<R>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let handle = AbortHandle::default();
        request.extensions_mut().insert(handle.clone());
        let response = self.0.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|inner| AbortableBody { inner, handle }))
        })
    }
}

/// The response body of [`AbortLayer`].
#[derive(Debug)]
pub struct AbortableBody<R> {
    inner: R,
    handle: AbortHandle,
}

impl<R> hyper::body::Body for AbortableBody<R>
where
    R: hyper::body::Body + Unpin,
    R::Error: Into<BoxError>,
{
    type Data = R::Data;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<R::Data>, BoxError>>> {
        let reset = || Poll::Ready(Some(Err("xds stream reset by the server".into())));
        if self.handle.aborted() {
            return reset();
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            // Nothing to send: the reset must wake this body from now on.
            Poll::Pending if self.handle.poll_aborted(cx) => reset(),
            polled => polled.map(|f| f.map(|r| r.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Default for LogGate {
    /// The xDS port's gate: one line per key per [`LOG_INTERVAL`].
    fn default() -> Self {
        LogGate::new(LOG_INTERVAL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_grants_until_full_and_release_wakes_waiters() {
        let gauge = prometheus::IntGauge::new("g", "g").unwrap();
        let budget = SendBudget::new(100, gauge.clone());
        let mut released = budget.watch_released();
        let a = budget.try_grant(60).unwrap();
        let b = budget.try_grant(40).unwrap();
        assert_eq!(gauge.get(), 100);
        drop(b);
        assert!(
            !released.has_changed().unwrap(),
            "no stream waits: the release is not told"
        );
        let b = budget.try_grant_or_wait(40).expect("fits again");
        assert!(matches!(budget.try_grant_or_wait(60), Err(Waiting)));
        drop(a);
        assert!(released.has_changed().unwrap(), "a waiting stream is told");
        released.borrow_and_update();
        assert_eq!(gauge.get(), 40);
        budget.stop_waiting();
        drop(b);
        assert!(!released.has_changed().unwrap(), "nobody waits any more");
        // Larger than the whole budget: granted once alone.
        let big = budget.try_grant(1000).unwrap();
        assert!(budget.try_grant(1).is_none());
        drop(big);
        assert_eq!(gauge.get(), 0);
    }
}
