//! The gRPC services of the xDS port as tonic routes: `ExtensionConfigDiscoveryService` and
//! `AggregatedDiscoveryService`, routed by method here.
//!
//! Requests go through tonic as usual: [`Streaming`] decodes them, bounded by
//! [`StreamLimits::max_request_size`](super::StreamLimits), and the unary `FetchExtensionConfigs`
//! is tonic's unary path whole. The responses of the streams are written here instead: tonic's
//! encoder copies every message into a buffer of the stream's own (and that buffer keeps its
//! largest size while the stream lives), so an inline module sent to a thousand proxies would be
//! held a thousand times. [`ResponseBody`] sends each response as the chunks `encode.rs` made of
//! it: the gRPC header and the stream's own fields, and the resources' encodings shared with the
//! store, which HTTP/2 writes and lets go of.
//!
//! The sending end of that channel is the stream task's (`server.rs`), which ends when the body
//! is gone or the server shuts down: [`Ends`] waits for both without locking their lists of
//! waiters on every push and ACK.
//!
//! Compressed requests are refused with `UNIMPLEMENTED`, as tonic refuses them when no compression
//! is enabled; responses are never compressed.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use hyper::body::Frame;
use tonic::codec::Codec as _;
use tonic::server::NamedService;
use tonic::{Request, Response, Status, Streaming};

use super::delta::DeltaStream;
use super::encode::Chunks;
use super::server::{Responses, StreamProtocol, XdsServer};
use super::sotw::SotwStream;
use super::store::Api;
use tokio::sync::{mpsc, watch};

type HttpResponse = http::Response<tonic::body::Body>;
type HttpFuture = Pin<Box<dyn Future<Output = Result<HttpResponse, Infallible>> + Send>>;

const ECDS: &str = "envoy.service.extension.v3.ExtensionConfigDiscoveryService";
const ADS: &str = "envoy.service.discovery.v3.AggregatedDiscoveryService";

/// `ExtensionConfigDiscoveryService`: SotW and delta streams, unary fetch.
#[derive(Clone, Debug)]
pub struct EcdsService(XdsServer);

/// `AggregatedDiscoveryService`: SotW and delta streams (ECDS type only).
#[derive(Clone, Debug)]
pub struct AdsService(XdsServer);

impl EcdsService {
    pub(super) fn new(server: XdsServer) -> Self {
        EcdsService(server)
    }
}

impl AdsService {
    pub(super) fn new(server: XdsServer) -> Self {
        AdsService(server)
    }
}

impl NamedService for EcdsService {
    const NAME: &'static str = ECDS;
}

impl NamedService for AdsService {
    const NAME: &'static str = ADS;
}

/// The method a request calls on `service`, if the path names it.
fn method<'a>(request: &'a http::Request<tonic::body::Body>, service: &str) -> Option<&'a str> {
    let path = request.uri().path().strip_prefix('/')?;
    path.strip_prefix(service)?.strip_prefix('/')
}

fn ready(response: HttpResponse) -> HttpFuture {
    Box::pin(std::future::ready(Ok(response)))
}

impl tower_service::Service<http::Request<tonic::body::Body>> for EcdsService {
    type Response = HttpResponse;
    type Error = Infallible;
    type Future = HttpFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> HttpFuture {
        match method(&request, ECDS) {
            Some("StreamExtensionConfigs") => {
                ready(stream::<SotwStream>(&self.0, Api::Ecds, request))
            }
            Some("DeltaExtensionConfigs") => {
                ready(stream::<DeltaStream>(&self.0, Api::Ecds, request))
            }
            Some("FetchExtensionConfigs") => {
                let server = self.0.clone();
                Box::pin(async move {
                    let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default())
                        .apply_max_message_size_config(
                            Some(server.max_request_size()),
                            Some(server.response_size_limit()),
                        );
                    Ok(grpc.unary(Fetch(server), request).await)
                })
            }
            _ => ready(Status::unimplemented("").into_http()),
        }
    }
}

impl tower_service::Service<http::Request<tonic::body::Body>> for AdsService {
    type Response = HttpResponse;
    type Error = Infallible;
    type Future = HttpFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> HttpFuture {
        ready(match method(&request, ADS) {
            Some("StreamAggregatedResources") => stream::<SotwStream>(&self.0, Api::Ads, request),
            Some("DeltaAggregatedResources") => stream::<DeltaStream>(&self.0, Api::Ads, request),
            _ => Status::unimplemented("").into_http(),
        })
    }
}

/// The unary `FetchExtensionConfigs`, for tonic's unary path.
struct Fetch(XdsServer);

impl tonic::server::UnaryService<DiscoveryRequest> for Fetch {
    type Response = DiscoveryResponse;
    type Future = Pin<Box<dyn Future<Output = Result<Response<DiscoveryResponse>, Status>> + Send>>;

    fn call(&mut self, request: Request<DiscoveryRequest>) -> Self::Future {
        Box::pin(std::future::ready(self.0.fetch(request)))
    }
}

/// Opens a stream of protocol `P`: its requests decoded by tonic, its responses sent by a
/// [`ResponseBody`].
fn stream<P: StreamProtocol>(
    server: &XdsServer,
    api: Api,
    request: http::Request<tonic::body::Body>,
) -> HttpResponse {
    if let Some(encoding) = request.headers().get("grpc-encoding") {
        if encoding != "identity" {
            let encoding = String::from_utf8_lossy(encoding.as_bytes()).into_owned();
            return Status::unimplemented(format!(
                "Content is compressed with `{encoding}` which isn't supported"
            ))
            .into_http();
        }
    }
    let max = server.max_request_size();
    let request = Request::from_http(request.map(|body| {
        let decoder = tonic_prost::ProstCodec::<P::Request, P::Request>::default().decoder();
        Streaming::new_request(decoder, body, None, Some(max))
    }));
    match server.spawn::<P>(api, request) {
        Ok(responses) => {
            let body = tonic::body::Body::new(ResponseBody::new(responses));
            let mut response = http::Response::new(body);
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                tonic::metadata::GRPC_CONTENT_TYPE,
            );
            response
        }
        Err(status) => status.into_http(),
    }
}

/// The response body of a stream: every response its task sends, chunk by chunk, then the
/// trailers of the status ending it (`OK` when the task ends without one).
#[derive(Debug)]
pub(super) struct ResponseBody {
    responses: Responses,
    /// The rest of the response being sent.
    chunks: Chunks,
    ended: bool,
}

impl ResponseBody {
    pub(super) fn new(responses: Responses) -> Self {
        ResponseBody {
            responses,
            chunks: Chunks::default(),
            ended: false,
        }
    }
}

/// The trailers telling the client how its stream ended.
fn trailers(status: &Status) -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    if status.add_header(&mut headers).is_err() {
        // Only metadata can be invalid, and these statuses carry none; keep the code anyway.
        headers.insert(Status::GRPC_STATUS, (status.code() as i32).into());
    }
    headers
}

impl hyper::body::Body for ResponseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        loop {
            if let Some(chunk) = this.chunks.next() {
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
            if this.ended {
                return Poll::Ready(None);
            }
            let end = match std::task::ready!(this.responses.poll_recv(cx)) {
                Some(Ok(message)) => {
                    this.chunks = message.into_chunks();
                    continue;
                }
                Some(Err(status)) => status,
                None => Status::ok(""),
            };
            this.ended = true;
            this.responses.close();
            return Poll::Ready(Some(Ok(Frame::trailers(trailers(&end)))));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.chunks.is_empty()
    }
}

/// Why a stream ends from outside its own requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum End {
    Shutdown,
    /// The response body is gone (the transport dropped the HTTP/2 stream).
    Dropped,
}

impl End {
    pub(super) fn log(self, span: &tracing::Span) {
        match self {
            End::Shutdown => tracing::debug!(parent: span, "closing stream: server shutting down"),
            End::Dropped => tracing::debug!(parent: span, "response stream dropped"),
        }
    }
}

/// Whether the server shuts down (its sender gone counts: the server stopped) or the response
/// body is gone: one atomic load each, no lock.
pub(super) fn ended<T>(
    closing: &Option<watch::Receiver<bool>>,
    tx: &mpsc::Sender<T>,
) -> Option<End> {
    if closing
        .as_ref()
        .is_some_and(|rx| rx.has_changed().unwrap_or(true))
    {
        return Some(End::Shutdown);
    }
    tx.is_closed().then_some(End::Dropped)
}

/// The futures waiting for a stream's [`End`]s, polled once only: that first poll leaves the
/// task's waker in the shutdown channel's list of waiters and in the response channel's, and
/// either wakes the task when it ends; later polls read the states instead
/// ([`ended`]), without locking those lists again. (The task is always polled with its own
/// waker: the one left there stays the one to wake.)
pub(super) struct Ends<S, D> {
    pub(super) shutdown: S,
    pub(super) dropped: D,
    pub(super) registered: bool,
}

impl<S: Future + Unpin, D: Future + Unpin> Ends<S, D> {
    pub(super) fn poll<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        closing: &Option<watch::Receiver<bool>>,
        tx: &mpsc::Sender<T>,
    ) -> std::task::Poll<End> {
        use std::pin::Pin;
        use std::task::Poll;
        if !self.registered {
            self.registered = true;
            if Pin::new(&mut self.shutdown).poll(cx).is_ready() {
                return Poll::Ready(End::Shutdown);
            }
            if Pin::new(&mut self.dropped).poll(cx).is_ready() {
                return Poll::Ready(End::Dropped);
            }
        }
        ended(closing, tx).map_or(Poll::Pending, Poll::Ready)
    }
}

/// Completes when the server shuts down; never for a server without shutdown.
pub(super) async fn closed(closing: &mut Option<watch::Receiver<bool>>) {
    match closing {
        // An error means the sender is gone: the server stopped.
        Some(rx) => {
            let _ = rx.wait_for(|closing| *closing).await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    /// A body yields the chunks of each response in order, then the trailers of the ending
    /// status.
    #[tokio::test]
    async fn responses_then_the_status_in_trailers() {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let store = crate::xds::ResourceStore::new();
        store.set("a", crate::xds::store::tests::config("1"));
        let response = crate::xds::stream::Outstanding::sotw(
            crate::xds::stream::Nonce::new(1, 1),
            store.lookup(&["a".to_string()]),
        );
        let reply = crate::xds::encode::SotwReply(&response);
        let message = crate::xds::encode::encode(&reply, usize::MAX).unwrap();
        let bytes = message.to_vec();
        tx.send(Ok(message)).await.unwrap();
        tx.send(Err(Status::resource_exhausted("too many")))
            .await
            .unwrap();
        let collected = ResponseBody::new(rx).collect().await.unwrap();
        let trailers = collected.trailers().cloned().expect("trailers");
        assert_eq!(collected.to_bytes(), bytes);
        assert_eq!(trailers["grpc-status"], "8");
        assert_eq!(trailers["grpc-message"], "too%20many");

        let (tx, rx) = tokio::sync::mpsc::channel(1);
        drop(tx);
        let collected = ResponseBody::new(rx).collect().await.unwrap();
        assert_eq!(collected.trailers().expect("trailers")["grpc-status"], "0");
    }

    /// A task waiting on [`Ends`] once registered is woken by either end, and reads which one.
    #[tokio::test]
    async fn ends_wake_the_task_that_polled_them_once() {
        for end in [End::Dropped, End::Shutdown] {
            let (tx, rx) = mpsc::channel::<()>(1);
            let (closing_tx, closing_rx) = watch::channel(false);
            let (polled_tx, polled_rx) = tokio::sync::oneshot::channel();
            let task = tokio::spawn(async move {
                let mut closing = Some(closing_rx);
                let seen = closing.clone();
                let shutdown = closed(&mut closing);
                let dropped = tx.closed();
                tokio::pin!(shutdown, dropped);
                let mut ends = Ends {
                    shutdown,
                    dropped,
                    registered: false,
                };
                let mut polled_tx = Some(polled_tx);
                let mut polls = 0;
                let got = std::future::poll_fn(|cx| {
                    polls += 1;
                    let poll = ends.poll(cx, &seen, &tx);
                    if let Some(polled) = polled_tx.take() {
                        let _ = polled.send(());
                    }
                    poll
                })
                .await;
                (got, polls, ends.registered)
            });
            polled_rx.await.expect("polled once");
            match end {
                End::Dropped => drop(rx),
                End::Shutdown => {
                    closing_tx.send(true).unwrap();
                }
            }
            let (got, polls, registered) = task.await.unwrap();
            assert_eq!(got, end);
            assert!(registered);
            assert_eq!(polls, 2, "woken once, by the end");
        }
    }
}
