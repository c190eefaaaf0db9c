//! The xDS services: `ExtensionConfigDiscoveryService` (SotW, delta, unary fetch) and
//! `AggregatedDiscoveryService` (SotW and delta, ECDS type only), and [`serve`].
//!
//! Like go-control-plane's `NewServer` (`pkg/server/v3/server.go`), the server sees only the
//! [`ResourceStore`]. Each stream runs in its own task (tonic `examples/src/streaming/server.rs`)
//! whose log lines are children of a `xds_stream` tracing span carrying the stream id, api,
//! protocol, peer and node id (given as their parent, never entered for a whole poll); the
//! task reads requests, wakes on store changes, runs the I/O-free state machine of `sotw.rs` or
//! `delta.rs`, encodes its reply around the stored resources' bytes (`encode.rs`) and sends it
//! through an mpsc channel whose receiver is the response body (`grpc.rs`). The state machine
//! sits behind a lock of its own, registered once in the store, where `/debug/syncz` reads it.
//!
//! Bounds (`limits.rs`): requests are decoded up to [`StreamLimits::max_request_size`], responses
//! encoded up to [`MAX_MESSAGE_SIZE`]; a stream over [`StreamLimits::max_streams`] is refused with
//! `RESOURCE_EXHAUSTED`, and a stream whose request breaks a bound (names, node size) ends with a
//! status naming the bound. Pushes take their bytes from the [`SendBudget`], and a response left
//! without ACK or NACK past [`StreamLimits::ack_timeout`] ends its stream with
//! `DEADLINE_EXCEEDED`. Connection and refusal lines go through a [`LogGate`].
//!
//! Shutdown: streams never end on their own, and tonic's graceful shutdown waits for them, so
//! [`serve`] tells every stream task to finish when its shutdown future completes; the tasks drop
//! their senders, the response streams end with status OK, and the server returns.
//!
//! Length: about 660 lines: the stream task (its loop, sends, ACK timer and ends, a third of the
//! file) is kept beside the server that spawns it and the two protocols' adapters it drives.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse,
};
use futures_util::StreamExt as _;
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};

use super::admin::{self, EventHub};
use super::delta::DeltaStream;
use super::encode::{encode, Encoded};
use super::grpc::{closed, ended, AdsService, EcdsService, Ends};
use super::limits::{self, AbortHandle, AbortLayer, Grant, LogGate, SendBudget, StreamLimits};
use super::sotw::{fetch_response, SotwStream};
use super::store::{Api, Protocol, ResourceStore, StreamEvent, StreamEventKind, StreamId};
use super::stream::StreamCore;
use super::{accepts_type_url, Error, ECDS_TYPE_URL};
use crate::auth::Access;

/// Largest gRPC response sent: inline modules make ECDS resources tens of MiB. Requests have their
/// own, much smaller bound ([`StreamLimits::max_request_size`]).
pub const MAX_MESSAGE_SIZE: usize = 512 * 1024 * 1024; // 512 MiB
/// HTTP/2 PING interval on idle connections, to notice dead proxies behind silent middleboxes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a PING may go unanswered before the connection is closed.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Responses queued per stream. At most one is outstanding per stream (see `sotw.rs`), so a small
/// buffer suffices; a full one applies back-pressure to that stream only.
const STREAM_BUFFER: usize = 4;

/// The receiving half of a stream task's channel: encoded responses, or the status ending the
/// stream.
pub(super) type Responses = mpsc::Receiver<Result<Encoded, Status>>;

/// Knobs of [`serve_with_options`]; [`Default`] is what [`serve`] uses.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Largest response encoded.
    pub max_message_size: usize,
    /// The bounds of `limits.rs`, request size included.
    pub limits: StreamLimits,
    /// Where the engine's events for `wasm_ecds.v1.Admin/WatchEvents` come from (`admin.rs`).
    pub events: EventHub,
    /// Who may use the `wasm_ecds.v1.Admin` service; open by default (`serve` passes the admin
    /// endpoints' rule).
    pub access: Arc<Access>,
    /// `None` disables HTTP/2 keepalive PINGs (tests under paused time, load tools).
    pub keepalive_interval: Option<Duration>,
    pub keepalive_timeout: Option<Duration>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            max_message_size: MAX_MESSAGE_SIZE,
            limits: StreamLimits::default(),
            events: EventHub::default(),
            access: Arc::new(Access::open()),
            keepalive_interval: Some(KEEPALIVE_INTERVAL),
            keepalive_timeout: Some(KEEPALIVE_TIMEOUT),
        }
    }
}

/// Serves ECDS and ADS on `listener` until `shutdown` completes, then closes every stream and
/// returns. Errors are logged (this is what `serve` mode spawns).
pub async fn serve(
    listener: impl Into<crate::net::Listener>,
    store: ResourceStore,
    shutdown: impl Future<Output = ()> + Send,
) {
    if let Err(e) = serve_with_options(listener, store, ServeOptions::default(), shutdown).await {
        tracing::error!(error = %e, "xds server failed");
    }
}

/// [`serve`] with explicit options, returning the transport error instead of logging it.
/// Connections come through the one accept loop of [`crate::net::listen`] (TLS, connection cap,
/// accept back-off); a bare `TcpListener` is a plain xDS port.
pub async fn serve_with_options(
    listener: impl Into<crate::net::Listener>,
    store: ResourceStore,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let listener = listener.into();
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, tls = listener.is_tls(), "xds server listening");
    }
    let (closing_tx, closing_rx) = watch::channel(false);
    let admin = admin::service(store.clone(), options.events, options.access);
    let server = XdsServer::with_shutdown(store, closing_rx)
        .max_message_size(options.max_message_size)
        .with_limits(options.limits);
    let incoming = listener.incoming();
    tonic::transport::Server::builder()
        .layer(AbortLayer)
        .http2_keepalive_interval(options.keepalive_interval)
        .http2_keepalive_timeout(options.keepalive_timeout)
        .add_service(server.ecds_service())
        .add_service(server.ads_service())
        .add_service(admin)
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.await;
            tracing::info!("xds server shutting down: closing streams");
            let _ = closing_tx.send(true);
        })
        .await?;
    Ok(())
}

/// The implementation of both services over one [`ResourceStore`]. Cheap to clone.
#[derive(Clone, Debug)]
pub struct XdsServer {
    store: ResourceStore,
    /// Becomes `true` (or loses its sender) when streams must end; `None`: never.
    closing: Option<watch::Receiver<bool>>,
    max_message_size: usize,
    limits: Arc<StreamLimits>,
    budget: SendBudget,
    log: Arc<LogGate>,
}

impl XdsServer {
    /// A server whose streams end only when their clients go away.
    pub fn new(store: ResourceStore) -> Self {
        let limits = StreamLimits::default();
        XdsServer {
            budget: SendBudget::new(limits.send_budget, store.unread_bytes_gauge()),
            store,
            closing: None,
            max_message_size: MAX_MESSAGE_SIZE,
            limits: Arc::new(limits),
            log: Arc::new(LogGate::default()),
        }
    }

    /// A server whose streams end when `closing` becomes `true` or its sender is dropped.
    pub fn with_shutdown(store: ResourceStore, closing: watch::Receiver<bool>) -> Self {
        XdsServer {
            closing: Some(closing),
            ..XdsServer::new(store)
        }
    }

    /// Sets the largest response sent by the services built afterwards.
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// Sets the bounds of the services built afterwards (a new send budget of their size).
    pub fn with_limits(mut self, limits: StreamLimits) -> Self {
        self.budget = SendBudget::new(limits.send_budget, self.store.unread_bytes_gauge());
        self.limits = Arc::new(limits);
        self
    }

    pub fn store(&self) -> &ResourceStore {
        &self.store
    }

    /// The ECDS service, for composing into another tonic router.
    pub fn ecds_service(&self) -> EcdsService {
        EcdsService::new(self.clone())
    }

    /// The ADS service, for composing into another tonic router.
    pub fn ads_service(&self) -> AdsService {
        AdsService::new(self.clone())
    }

    /// Requests larger than this are refused ([`StreamLimits::max_request_size`]).
    pub(super) fn max_request_size(&self) -> usize {
        self.limits.max_request_size
    }

    /// Responses larger than this are not sent.
    pub(super) fn response_size_limit(&self) -> usize {
        self.max_message_size
    }

    /// Opens a stream: registers it, spawns its task and returns the receiver of its responses;
    /// refuses it with `RESOURCE_EXHAUSTED` when [`StreamLimits::max_streams`] are open.
    pub(super) fn spawn<P: StreamProtocol>(
        &self,
        api: Api,
        request: Request<Streaming<P::Request>>,
    ) -> Result<Responses, Status> {
        let peer = request.remote_addr();
        // Present when the service runs under `AbortLayer` (as `serve` runs it).
        let abort = request.extensions().get::<AbortHandle>().cloned();
        let requests = request.into_inner();
        let max = self.limits.max_streams;
        let opened = self.store.try_open_stream(max, |id| {
            let mut state = P::new(id, api);
            state.core_mut().budget = Some(self.budget.clone());
            state.core_mut().log = Some(self.log.clone());
            state.core_mut().peer = peer;
            Mutex::new(state)
        });
        let Some(state) = opened else {
            let count = |limit: &str| self.store.count_limit(limit);
            return Err(limits::refuse_stream(&self.log, count, peer, max));
        };
        let id = lock(&state).core().id;
        let span = tracing::info_span!(
            "xds_stream",
            id,
            %api,
            protocol = %P::PROTOCOL,
            peer = peer.map(|p| p.to_string()).unwrap_or_default(),
            node = tracing::field::Empty,
        );
        // The parent of the stream's log lines, entered only to log (`StreamCore::span`).
        lock(&state).core_mut().span = span.clone();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let task = StreamTask {
            id,
            api,
            state,
            store: self.store.clone(),
            closing: self.closing.clone(),
            limits: self.limits.clone(),
            max_message_size: self.max_message_size,
            budget: self.budget.clone(),
            log: self.log.clone(),
            abort,
            grant: None,
            span,
        };
        tokio::spawn(task.run(requests, tx));
        Ok(rx)
    }

    /// The answer to a unary `FetchExtensionConfigs`.
    pub(super) fn fetch(&self, request: Request<DiscoveryRequest>) -> RpcResult<DiscoveryResponse> {
        let req = request.into_inner();
        if !accepts_type_url(Api::Ecds, &req.type_url) {
            return Err(Status::invalid_argument(format!(
                "type url {} is not served here (only {ECDS_TYPE_URL})",
                req.type_url
            )));
        }
        let node = req.node.as_ref().map(|n| n.id.as_str()).unwrap_or_default();
        tracing::debug!(node, names = ?req.resource_names, "fetch");
        Ok(Response::new(fetch_response(
            &req.resource_names,
            &self.store,
        )))
    }
}

/// The state of a stream, locked for one step of its task or one reading of `/debug/syncz`. A
/// task that panicked left it as it was.
fn lock<P>(state: &Mutex<P>) -> MutexGuard<'_, P> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a stream task needs from the state machines of `sotw.rs` and `delta.rs`.
pub(super) trait StreamProtocol: AsRef<StreamCore> + Send + 'static {
    type Request: prost::Message + Default + Send + 'static;
    const PROTOCOL: Protocol;
    fn new(id: StreamId, api: Api) -> Self;
    /// Whether the request made a response to send ([`encode_reply`](Self::encode_reply)).
    fn on_request(&mut self, req: Self::Request, store: &ResourceStore) -> bool;
    /// Whether the store's change made a response to send.
    fn on_change(&mut self, store: &ResourceStore) -> bool;
    /// The response awaiting its ACK, encoded (`OUT_OF_RANGE` over `max` bytes).
    fn encode_reply(&self, max: usize) -> Result<Encoded, Status>;
    fn core(&self) -> &StreamCore;
    fn core_mut(&mut self) -> &mut StreamCore;
    /// The node of a request, if it carries one.
    fn node(req: &Self::Request) -> Option<&Node>;
    /// How many names the stream would subscribe to after `req` (at most).
    fn names_after(&self, req: &Self::Request) -> usize;
}

/// What `encode_reply` says when there is no response (never: it is called after a push).
fn no_response() -> Status {
    Status::internal("no response to encode")
}

impl StreamProtocol for SotwStream {
    type Request = DiscoveryRequest;
    const PROTOCOL: Protocol = Protocol::Sotw;
    fn new(id: StreamId, api: Api) -> Self {
        SotwStream::new(id, api)
    }
    fn on_request(&mut self, req: DiscoveryRequest, store: &ResourceStore) -> bool {
        SotwStream::on_request(self, req, store)
    }
    fn on_change(&mut self, store: &ResourceStore) -> bool {
        SotwStream::on_change(self, store)
    }
    fn encode_reply(&self, max: usize) -> Result<Encoded, Status> {
        encode(&self.reply().ok_or_else(no_response)?, max)
    }
    fn core(&self) -> &StreamCore {
        SotwStream::core(self)
    }
    fn core_mut(&mut self) -> &mut StreamCore {
        SotwStream::core_mut(self)
    }
    fn node(req: &DiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }
    fn names_after(&self, req: &DiscoveryRequest) -> usize {
        req.resource_names.len()
    }
}

impl StreamProtocol for DeltaStream {
    type Request = DeltaDiscoveryRequest;
    const PROTOCOL: Protocol = Protocol::Delta;
    fn new(id: StreamId, api: Api) -> Self {
        DeltaStream::new(id, api)
    }
    fn on_request(&mut self, req: DeltaDiscoveryRequest, store: &ResourceStore) -> bool {
        DeltaStream::on_request(self, req, store)
    }
    fn on_change(&mut self, store: &ResourceStore) -> bool {
        DeltaStream::on_change(self, store)
    }
    fn encode_reply(&self, max: usize) -> Result<Encoded, Status> {
        encode(&self.reply().ok_or_else(no_response)?, max)
    }
    fn core(&self) -> &StreamCore {
        DeltaStream::core(self)
    }
    fn core_mut(&mut self) -> &mut StreamCore {
        DeltaStream::core_mut(self)
    }
    fn node(req: &DeltaDiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }
    fn names_after(&self, req: &DeltaDiscoveryRequest) -> usize {
        self.core().subscribed.len() + req.resource_names_subscribe.len()
    }
}

struct StreamTask<P> {
    id: StreamId,
    api: Api,
    /// The state machine, registered in the store (`/debug/syncz` reads it there).
    state: Arc<Mutex<P>>,
    store: ResourceStore,
    closing: Option<watch::Receiver<bool>>,
    limits: Arc<StreamLimits>,
    max_message_size: usize,
    budget: SendBudget,
    log: Arc<LogGate>,
    /// Resets the HTTP/2 stream (`limits.rs`); `None` outside `AbortLayer`.
    abort: Option<AbortHandle>,
    /// The send budget taken by the response awaiting its ACK.
    grant: Option<Grant>,
    /// The stream's `xds_stream` span, the parent of the task's log lines (never entered for a
    /// whole poll: see `StreamCore::span`).
    span: tracing::Span,
}

impl<P: StreamProtocol> StreamTask<P> {
    async fn run(
        mut self,
        mut requests: Streaming<P::Request>,
        tx: mpsc::Sender<Result<Encoded, Status>>,
    ) {
        let mut revisions = self.store.watch_revision();
        let mut released = self.budget.watch_released();
        tracing::debug!(parent: &self.span, "stream opened");
        let mut node_recorded = false;
        // The two ends that come from outside, the server's shutdown and the response body gone,
        // are waited for by futures made once per stream: every stream waits on the one
        // shutdown channel, and a future made anew each turn would join and leave its list of
        // waiters (under that list's lock) on every push and every ACK. They are polled once
        // only ([`Ends`]), which leaves the task's waker in both lists; after that, the task
        // reads both states (one atomic load each, no lock) every turn and whenever it is about
        // to sleep, so that a proxy sending requests without pause does not keep the stream from
        // noticing them either.
        let mut closing = self.closing.take();
        let closing_seen = closing.clone();
        let shutdown = closed(&mut closing);
        let dropped = tx.closed();
        // The ACK deadline of the response awaiting its ACK, and one timer per stream: armed
        // when a response goes out and the timer is idle, and when it fires before the deadline
        // of a later response it is armed again for that one. A timer reset on every push
        // would take the timer wheel's lock twice per push.
        let mut ack_deadline = tokio::time::Instant::now();
        let timer = tokio::time::sleep_until(ack_deadline);
        let mut timer_armed = false;
        tokio::pin!(shutdown, dropped, timer);
        let mut ends = Ends {
            shutdown,
            dropped,
            registered: false,
        };
        // What the last step left: a response awaiting its ACK, a push waiting for the send
        // budget. Only this task changes the state, so these are read where it changes it, under
        // the one lock each step takes, and not locked for again at the top of every turn.
        let (mut awaiting, mut deferred) = (false, false);
        // Set when the requests were polled empty in this very poll of the task (another branch
        // won the biased select below, which polls them first): the next select skips them once
        // (their waker, the task's own, stays registered in the transport), instead of taking
        // the connection's lock to find them still empty right after a push. A select that
        // sleeps polls them again on its next wake.
        let mut requests_idle = false;
        loop {
            // The sender gone (`Err`) means the server stopped.
            if let Some(end) = ended(&closing_seen, &tx) {
                end.log(&self.span);
                break;
            }
            let step = tokio::select! {
                biased;
                req = std::future::poll_fn(|cx| {
                    if std::mem::take(&mut requests_idle) {
                        return std::task::Poll::Pending;
                    }
                    requests.poll_next_unpin(cx)
                }) => match req {
                    Some(Ok(req)) => {
                        // Marked seen before the state machine reads the store and the budget: a
                        // change or a release after this point wakes us again, so none is lost.
                        // (`mark_unchanged` reads the version only, not the value under its lock.)
                        revisions.mark_unchanged();
                        released.mark_unchanged();
                        // One lock for the whole request: its bounds, the state machine, the
                        // encoding of the response it made.
                        let mut state = lock(&self.state);
                        let names = state.names_after(&req);
                        if let Some(breach) = self.limits.breach(P::node(&req), names) {
                            let node = state.core().node_id.clone();
                            drop(state);
                            let refusal = self.refuse_for(&node, &breach);
                            self.end_with(&tx, refusal);
                            break;
                        }
                        let pushed = state.on_request(req, &self.store);
                        if !node_recorded && !state.core().node_id.is_empty() {
                            node_recorded = true;
                            let node = state.core().node_id.as_str();
                            self.span.record("node", node);
                            if let Some(suppressed) = self.log.admit(&format!("connected {node}")) {
                                tracing::info!(parent: &self.span, node, suppressed, "proxy connected");
                            }
                        }
                        Step {
                            request: true,
                            ..settle(&mut *state, pushed, &mut self.grant, self.max_message_size)
                        }
                    }
                    Some(Err(status)) => {
                        match limits::request_too_large(&status) {
                            Some(breach) => {
                                let refusal = self.refuse(&breach);
                                self.end_with(&tx, refusal);
                            }
                            None => tracing::debug!(parent: &self.span, %status, "stream ended with an error"),
                        }
                        break;
                    }
                    None => {
                        tracing::debug!(parent: &self.span, "stream closed by the proxy");
                        break;
                    }
                },
                changed = revisions.changed(), if !awaiting => {
                    if changed.is_err() {
                        break;
                    }
                    revisions.mark_unchanged();
                    released.mark_unchanged();
                    self.on_change()
                }
                _ = released.changed(), if deferred && !awaiting => {
                    released.mark_unchanged();
                    self.on_change()
                }
                () = &mut timer, if awaiting && timer_armed => {
                    if tokio::time::Instant::now() < ack_deadline {
                        // Armed for an earlier response, ACKed since.
                        timer.as_mut().reset(ack_deadline);
                        continue;
                    }
                    let refusal = self.refuse(&limits::ack_timeout(self.limits.ack_timeout));
                    self.end_with(&tx, refusal);
                    break;
                }
                end = std::future::poll_fn(|cx| ends.poll(cx, &closing_seen, &tx)) => {
                    end.log(&self.span);
                    break;
                }
            };
            (awaiting, deferred) = (step.awaiting, step.deferred);
            requests_idle = !step.request;
            match step.reply {
                None => {}
                Some(Err(status)) => {
                    // Nothing of it was sent: end with the status, no reset needed.
                    let _ = tx.try_send(Err(status));
                    break;
                }
                Some(Ok(message)) => {
                    let sent = match tx.try_send(Ok(message)) {
                        Ok(()) => Ok(()),
                        Err(mpsc::error::TrySendError::Full(message)) => {
                            // The task may sleep here: the requests are polled again after.
                            requests_idle = false;
                            tx.send(message).await.map_err(drop)
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => Err(()),
                    };
                    if sent.is_err() {
                        tracing::debug!(parent: &self.span, "response stream dropped");
                        break;
                    }
                    ack_deadline = tokio::time::Instant::now() + self.limits.ack_timeout;
                    if !timer_armed {
                        timer.as_mut().reset(ack_deadline);
                        timer_armed = true;
                    }
                }
            }
        }
        if lock(&self.state).core().awaiting_ack() {
            // The proxy may not have read the last response: a status or a plain end would queue
            // behind those bytes and keep them (a client could half-close and reconnect, over
            // and over); a reset drops them (`limits.rs`).
            if let Some(abort) = &self.abort {
                abort.abort();
            }
        }
        self.store.close_stream(self.id);
        let (api, protocol, node_id) = (
            self.api,
            P::PROTOCOL,
            lock(&self.state).core().node_id.clone(),
        );
        if node_recorded {
            if let Some(suppressed) = self.log.admit(&format!("disconnected {node_id}")) {
                tracing::info!(parent: &self.span, node = %node_id, suppressed, "proxy disconnected");
            }
        }
        let stream = self.id;
        self.store.emit(|| StreamEvent {
            stream,
            node_id,
            api,
            protocol,
            kind: StreamEventKind::Disconnected,
        });
    }

    /// Ends the stream with `status`; but while a response awaits its ACK the proxy may not have
    /// read it, and a status would queue behind those bytes and keep them: the stream is reset
    /// instead (`AbortLayer`), which drops them.
    fn end_with(&self, tx: &mpsc::Sender<Result<Encoded, Status>>, status: Status) {
        match &self.abort {
            Some(abort) if lock(&self.state).core().awaiting_ack() => abort.abort(),
            _ => {
                let _ = tx.try_send(Err(status));
            }
        }
    }

    /// A store change (or a release of the send budget), under one lock: the state machine and
    /// the encoding of the response it made.
    fn on_change(&mut self) -> Step {
        let mut state = lock(&self.state);
        let pushed = state.on_change(&self.store);
        settle(&mut *state, pushed, &mut self.grant, self.max_message_size)
    }

    /// Counts and logs (through the log gate) a stream ended by `breach`; returns the status
    /// telling the proxy why.
    fn refuse(&self, breach: &limits::Breach) -> Status {
        let node = lock(&self.state).core().node_id.clone();
        self.refuse_for(&node, breach)
    }

    /// [`refuse`](Self::refuse) for the proxy `node`, read by a caller that holds the lock.
    fn refuse_for(&self, node: &str, breach: &limits::Breach) -> Status {
        let count = |limit: &str| self.store.count_limit(limit);
        self.span
            .in_scope(|| limits::refuse(&self.log, count, node, breach))
    }
}

/// What one step of a stream's state machine left, read under the lock it took.
struct Step {
    /// The step handled a request (else the requests were found empty before it).
    request: bool,
    /// A response awaits its ACK or NACK.
    awaiting: bool,
    /// A push waits for the send budget.
    deferred: bool,
    /// The response the step made, encoded (or the status ending the stream when it cannot be).
    reply: Option<Result<Encoded, Status>>,
}

/// The end of a step, still under the state's lock: the grant of the response it made (kept
/// by the task until the ACK), or none once the proxy ACKed or NACKed; that response encoded
/// (`OUT_OF_RANGE` over `max` bytes: then it is no longer outstanding, none of it was sent).
fn settle<P: StreamProtocol>(
    state: &mut P,
    pushed: bool,
    grant: &mut Option<Grant>,
    max: usize,
) -> Step {
    let reply = if pushed {
        *grant = state.core_mut().grant.take();
        let encoded = state.encode_reply(max);
        if encoded.is_err() {
            state.core_mut().outstanding = None;
        }
        Some(encoded)
    } else {
        if !state.core().awaiting_ack() {
            // ACKed or NACKed: the proxy has read the response.
            *grant = None;
        }
        None
    };
    Step {
        request: false,
        awaiting: state.core().awaiting_ack(),
        deferred: state.core().deferred,
        reply,
    }
}

type RpcResult<T> = Result<Response<T>, Status>;
