//! The tonic services: `ExtensionConfigDiscoveryService` (SotW, delta, unary fetch) and
//! `AggregatedDiscoveryService` (SotW and delta, ECDS type only), and [`serve`].
//!
//! Like go-control-plane's `NewServer` (`pkg/server/v3/server.go`), the server sees only the
//! [`ResourceStore`]. Each stream runs in its own task (tonic `examples/src/streaming/server.rs`)
//! inside a `xds_stream` tracing span carrying the stream id, api, protocol, peer and node id; the
//! task reads requests, wakes on store changes, runs the I/O-free state machine of `sotw.rs` or
//! `delta.rs` and replies through an mpsc channel whose receiver is the response stream.
//!
//! Shutdown: streams never end on their own, and tonic's graceful shutdown waits for them, so
//! [`serve`] tells every stream task to finish when its shutdown future completes; the tasks drop
//! their senders, the response streams end with status OK, and the server returns.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::extension::v3::extension_config_discovery_service_server::{
    ExtensionConfigDiscoveryService, ExtensionConfigDiscoveryServiceServer,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt as _;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;

use super::delta::DeltaStream;
use super::sotw::{fetch_response, SotwStream};
use super::store::{Api, Protocol, ResourceStore, StreamEvent, StreamEventKind, StreamId};
use super::stream::StreamCore;
use super::{accepts_type_url, Error, ECDS_TYPE_URL};

/// Largest gRPC message accepted or sent: inline modules make ECDS resources tens of MiB.
pub const MAX_MESSAGE_SIZE: usize = 512 * 1024 * 1024; // 512 MiB
/// HTTP/2 PING interval on idle connections, to notice dead proxies behind silent middleboxes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a PING may go unanswered before the connection is closed.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Responses queued per stream. At most one is outstanding per stream (see `sotw.rs`), so a small
/// buffer suffices; a full one applies back-pressure to that stream only.
const STREAM_BUFFER: usize = 4;

/// A response stream: the receiving half of a stream task's channel.
pub type ResponseStream<T> = ReceiverStream<Result<T, Status>>;

/// Knobs of [`serve_with_options`]; [`Default`] is what [`serve`] uses.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub max_message_size: usize,
    /// `None` disables HTTP/2 keepalive PINGs (tests under paused time, load tools).
    pub keepalive_interval: Option<Duration>,
    pub keepalive_timeout: Option<Duration>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            max_message_size: MAX_MESSAGE_SIZE,
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
    let server =
        XdsServer::with_shutdown(store, closing_rx).max_message_size(options.max_message_size);
    let incoming = listener.incoming();
    tonic::transport::Server::builder()
        .http2_keepalive_interval(options.keepalive_interval)
        .http2_keepalive_timeout(options.keepalive_timeout)
        .add_service(server.ecds_service())
        .add_service(server.ads_service())
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
}

impl XdsServer {
    /// A server whose streams end only when their clients go away.
    pub fn new(store: ResourceStore) -> Self {
        XdsServer {
            store,
            closing: None,
            max_message_size: MAX_MESSAGE_SIZE,
        }
    }

    /// A server whose streams end when `closing` becomes `true` or its sender is dropped.
    pub fn with_shutdown(store: ResourceStore, closing: watch::Receiver<bool>) -> Self {
        XdsServer {
            store,
            closing: Some(closing),
            max_message_size: MAX_MESSAGE_SIZE,
        }
    }

    /// Sets the largest message accepted and sent by the services built afterwards.
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    pub fn store(&self) -> &ResourceStore {
        &self.store
    }

    /// The ECDS service, for composing into another tonic router.
    pub fn ecds_service(&self) -> ExtensionConfigDiscoveryServiceServer<XdsServer> {
        ExtensionConfigDiscoveryServiceServer::new(self.clone())
            .max_decoding_message_size(self.max_message_size)
            .max_encoding_message_size(self.max_message_size)
    }

    /// The ADS service, for composing into another tonic router.
    pub fn ads_service(&self) -> AggregatedDiscoveryServiceServer<XdsServer> {
        AggregatedDiscoveryServiceServer::new(self.clone())
            .max_decoding_message_size(self.max_message_size)
            .max_encoding_message_size(self.max_message_size)
    }

    /// Opens a stream: registers it, spawns its task and returns the response stream.
    fn spawn<P: StreamProtocol>(
        &self,
        api: Api,
        peer: Option<SocketAddr>,
        requests: Streaming<P::Request>,
    ) -> ResponseStream<P::Response> {
        let id = self.store.open_stream(api, P::PROTOCOL);
        let span = tracing::info_span!(
            "xds_stream",
            id,
            %api,
            protocol = %P::PROTOCOL,
            peer = peer.map(|p| p.to_string()).unwrap_or_default(),
            node = tracing::field::Empty,
        );
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let task = StreamTask {
            id,
            api,
            state: P::new(id, api),
            store: self.store.clone(),
            closing: self.closing.clone(),
        };
        tokio::spawn(task.run(requests, tx).instrument(span));
        ReceiverStream::new(rx)
    }
}

/// What a stream task needs from the state machines of `sotw.rs` and `delta.rs`.
trait StreamProtocol: Send + 'static {
    type Request: Send + 'static;
    type Response: Send + 'static;
    const PROTOCOL: Protocol;
    fn new(id: StreamId, api: Api) -> Self;
    fn on_request(&mut self, req: Self::Request, store: &ResourceStore) -> Option<Self::Response>;
    fn on_change(&mut self, store: &ResourceStore) -> Option<Self::Response>;
    fn core(&self) -> &StreamCore;
}

impl StreamProtocol for SotwStream {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;
    const PROTOCOL: Protocol = Protocol::Sotw;
    fn new(id: StreamId, api: Api) -> Self {
        SotwStream::new(id, api)
    }
    fn on_request(
        &mut self,
        req: DiscoveryRequest,
        store: &ResourceStore,
    ) -> Option<DiscoveryResponse> {
        SotwStream::on_request(self, req, store)
    }
    fn on_change(&mut self, store: &ResourceStore) -> Option<DiscoveryResponse> {
        SotwStream::on_change(self, store)
    }
    fn core(&self) -> &StreamCore {
        SotwStream::core(self)
    }
}

impl StreamProtocol for DeltaStream {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;
    const PROTOCOL: Protocol = Protocol::Delta;
    fn new(id: StreamId, api: Api) -> Self {
        DeltaStream::new(id, api)
    }
    fn on_request(
        &mut self,
        req: DeltaDiscoveryRequest,
        store: &ResourceStore,
    ) -> Option<DeltaDiscoveryResponse> {
        DeltaStream::on_request(self, req, store)
    }
    fn on_change(&mut self, store: &ResourceStore) -> Option<DeltaDiscoveryResponse> {
        DeltaStream::on_change(self, store)
    }
    fn core(&self) -> &StreamCore {
        DeltaStream::core(self)
    }
}

struct StreamTask<P> {
    id: StreamId,
    api: Api,
    state: P,
    store: ResourceStore,
    closing: Option<watch::Receiver<bool>>,
}

/// Completes when the server shuts down; never for a server without shutdown.
async fn closed(closing: &mut Option<watch::Receiver<bool>>) {
    match closing {
        // An error means the sender is gone: the server stopped.
        Some(rx) => {
            let _ = rx.wait_for(|closing| *closing).await;
        }
        None => std::future::pending().await,
    }
}

impl<P: StreamProtocol> StreamTask<P> {
    async fn run(
        mut self,
        mut requests: Streaming<P::Request>,
        tx: mpsc::Sender<Result<P::Response, Status>>,
    ) {
        let mut revisions = self.store.watch_revision();
        tracing::debug!("stream opened");
        let mut node_recorded = false;
        loop {
            let awaiting = self.state.core().awaiting_ack();
            let reply = tokio::select! {
                _ = closed(&mut self.closing) => {
                    tracing::debug!("closing stream: server shutting down");
                    break;
                }
                _ = tx.closed() => {
                    tracing::debug!("response stream dropped");
                    break;
                }
                req = requests.next() => match req {
                    Some(Ok(req)) => {
                        // Marked seen before the state machine reads the store: a change after this
                        // point wakes us again, so none is lost.
                        revisions.borrow_and_update();
                        let reply = self.state.on_request(req, &self.store);
                        if !node_recorded && !self.state.core().node_id.is_empty() {
                            node_recorded = true;
                            tracing::Span::current().record("node", self.state.core().node_id.as_str());
                            tracing::info!(node = %self.state.core().node_id.as_str(), "proxy connected");
                        }
                        self.store.record_stream(self.state.core().info());
                        reply
                    }
                    Some(Err(status)) => {
                        tracing::debug!(%status, "stream ended with an error");
                        break;
                    }
                    None => {
                        tracing::debug!("stream closed by the proxy");
                        break;
                    }
                },
                changed = revisions.changed(), if !awaiting => {
                    if changed.is_err() {
                        break;
                    }
                    revisions.borrow_and_update();
                    let reply = self.state.on_change(&self.store);
                    if reply.is_some() {
                        self.store.record_stream(self.state.core().info());
                    }
                    reply
                }
            };
            if let Some(response) = reply {
                if tx.send(Ok(response)).await.is_err() {
                    tracing::debug!("response stream dropped");
                    break;
                }
            }
        }
        self.store.close_stream(self.id);
        let (api, protocol, node_id) = (
            self.api,
            P::PROTOCOL,
            self.state.core().node_id.as_str().to_string(),
        );
        if node_recorded {
            tracing::info!(node = %node_id, "proxy disconnected");
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
}

type RpcResult<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl ExtensionConfigDiscoveryService for XdsServer {
    type StreamExtensionConfigsStream = ResponseStream<DiscoveryResponse>;
    type DeltaExtensionConfigsStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_extension_configs(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> RpcResult<Self::StreamExtensionConfigsStream> {
        let peer = request.remote_addr();
        Ok(Response::new(self.spawn::<SotwStream>(
            Api::Ecds,
            peer,
            request.into_inner(),
        )))
    }

    async fn delta_extension_configs(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> RpcResult<Self::DeltaExtensionConfigsStream> {
        let peer = request.remote_addr();
        Ok(Response::new(self.spawn::<DeltaStream>(
            Api::Ecds,
            peer,
            request.into_inner(),
        )))
    }

    async fn fetch_extension_configs(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> RpcResult<DiscoveryResponse> {
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

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsServer {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> RpcResult<Self::StreamAggregatedResourcesStream> {
        let peer = request.remote_addr();
        Ok(Response::new(self.spawn::<SotwStream>(
            Api::Ads,
            peer,
            request.into_inner(),
        )))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> RpcResult<Self::DeltaAggregatedResourcesStream> {
        let peer = request.remote_addr();
        Ok(Response::new(self.spawn::<DeltaStream>(
            Api::Ads,
            peer,
            request.into_inner(),
        )))
    }
}
