//! `wasm-ecds proxy --upstream ADDR` (behavior.md §11): an xDS proxy between Envoys and any
//! control plane that converts remote-load Wasm configs on their way, as Istio's per-pod agent
//! does, but per node and on the same driver, cache, policy and metrics as `serve`.
//!
//! Envoy's ADS and ECDS streams (SotW and delta) each get their own upstream stream
//! ([`stream`]); the remote-load configs in ECDS responses are reduced to identities that the
//! controller of `serve` processes as plugins ([`hub`]); the converted resources go to Envoy
//! ([`convert`]).

pub mod convert;
pub mod hub;
pub mod stream;
mod unread;
pub mod wire;

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;

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
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

pub use hub::{Conversion, Hub, Wanted};
pub use stream::Context;

use crate::xds::limits::{self, AbortHandle, AbortLayer, LogGate, SendBudget};
use crate::xds::{Api, StreamLimits, MAX_MESSAGE_SIZE};
use wire::{Delta, Sotw, Wire};

/// The proxy's own series (behavior.md §8); the conversions are counted in
/// `istio_agent_wasm_config_conversion_count` as the reference agent does.
#[derive(Clone)]
pub struct ProxySeries {
    /// `wasm_ecds_proxy_streams`: Envoy streams open now.
    pub streams: prometheus::IntGauge,
    /// `wasm_ecds_proxy_upstream_streams{result="opened|lost"}`.
    pub upstream: prometheus::IntCounterVec,
    /// `wasm_ecds_proxy_nacks`: ECDS responses NACKed upstream on Envoy's behalf.
    pub nacks: prometheus::IntCounter,
    /// `wasm_ecds_proxy_repushes`: converted resources pushed again by the proxy.
    pub repushes: prometheus::IntCounter,
}

impl ProxySeries {
    pub fn register(registry: &prometheus::Registry) -> ProxySeries {
        let streams = prometheus::IntGauge::new(
            "wasm_ecds_proxy_streams",
            "Envoy xDS streams the proxy forwards now",
        )
        .expect("valid metric");
        let upstream = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "wasm_ecds_proxy_upstream_streams",
                "Upstream streams opened and lost (each loss is retried with backoff)",
            ),
            &["result"],
        )
        .expect("valid metric");
        let nacks = prometheus::IntCounter::new(
            "wasm_ecds_proxy_nacks",
            "ECDS responses the proxy NACKed upstream because they could not be converted",
        )
        .expect("valid metric");
        let repushes = prometheus::IntCounter::new(
            "wasm_ecds_proxy_repushes",
            "Converted ECDS resources pushed again because their module or fallback changed",
        )
        .expect("valid metric");
        for c in [
            Box::new(streams.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(upstream.clone()),
            Box::new(nacks.clone()),
            Box::new(repushes.clone()),
        ] {
            registry.register(c).expect("unique metric names");
        }
        for r in ["opened", "lost"] {
            upstream.with_label_values(&[r]);
        }
        ProxySeries {
            streams,
            upstream,
            nacks,
            repushes,
        }
    }
}

/// Responses queued per Envoy stream before the stream waits for Envoy to read.
const STREAM_BUFFER: usize = 4;

/// Where the upstream control plane is, and how to trust it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpstreamOptions {
    /// `host:port`, or a URL (`http://…`, `https://…` for TLS).
    pub address: String,
    /// PEM certificates trusted for a TLS upstream instead of the web PKI roots.
    pub ca: Option<std::path::PathBuf>,
    /// PEM certificate chain and key presented to a TLS upstream that asks for one (mTLS).
    pub identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl UpstreamOptions {
    /// The URL of the upstream (`http://` added to a bare `host:port`).
    pub fn url(&self) -> String {
        if self.address.contains("://") {
            self.address.clone()
        } else {
            format!("http://{}", self.address)
        }
    }

    /// A channel connecting (and reconnecting) on demand; every proxied stream shares it.
    pub fn channel(&self) -> anyhow::Result<Channel> {
        let tls = crate::net::client::ClientTls {
            ca: self.ca.clone(),
            identity: self.identity.clone(),
            sni: None,
        };
        Ok(tls.endpoint(&self.url(), &UPSTREAM_FLAGS)?.connect_lazy())
    }
}

/// The flags of [`UpstreamOptions`], named in its errors.
const UPSTREAM_FLAGS: crate::net::client::TlsFlags = crate::net::client::TlsFlags {
    address: "--upstream",
    ca: "--upstream-ca",
    cert: "--upstream-cert",
    key: "--upstream-key",
    // Never named: `proxy` takes the server name from --upstream's host.
    sni: "--upstream",
};

/// The ADS and ECDS services of the proxy.
#[derive(Clone)]
pub struct ProxyServer {
    ctx: Arc<Context>,
    closing: watch::Receiver<bool>,
}

impl ProxyServer {
    /// The proxy's port under `limits` (the `--xds-*` bounds of `serve`'s port).
    pub fn new(
        hub: Arc<Hub>,
        metrics: crate::metrics::Metrics,
        upstream: &UpstreamOptions,
        limits: StreamLimits,
        closing: watch::Receiver<bool>,
    ) -> anyhow::Result<ProxyServer> {
        let xds = metrics.xds_series();
        Ok(ProxyServer {
            ctx: Arc::new(Context {
                hub,
                series: metrics.proxy_series(),
                budget: SendBudget::new(limits.send_budget, xds.unread_bytes_gauge()),
                xds,
                metrics,
                upstream: upstream.channel()?,
                upstream_name: upstream.url(),
                max_message_size: MAX_MESSAGE_SIZE,
                next_stream: AtomicU64::new(1),
                limits,
                log: LogGate::default(),
                open: AtomicUsize::new(0),
            }),
            closing,
        })
    }

    /// Opens a proxied stream, or refuses it with `RESOURCE_EXHAUSTED` when
    /// [`StreamLimits::max_streams`] are open (as `serve`'s port does).
    fn spawn<W: Wire>(
        &self,
        api: Api,
        request: Request<Streaming<W::Req>>,
    ) -> Result<Response<Out<W::Resp>>, Status> {
        let peer = request.remote_addr();
        // Present under `AbortLayer` (as `serve` below runs the services).
        let abort = request.extensions().get::<AbortHandle>().cloned();
        let Some(slot) = stream::OpenStream::try_new(&self.ctx) else {
            let ctx = &self.ctx;
            let count = |limit: &str| ctx.xds.count_limit(limit);
            return Err(limits::refuse_stream(
                &ctx.log,
                count,
                peer,
                ctx.limits.max_streams,
            ));
        };
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let ctx = self.ctx.clone();
        let mut closing = self.closing.clone();
        let requests = request.into_inner();
        tokio::spawn(async move {
            tokio::select! {
                _ = closing.wait_for(|c| *c) => {}
                _ = stream::run::<W>(ctx, slot, api, requests, tx, abort) => {}
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

type Out<T> = ReceiverStream<Result<T, Status>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for ProxyServer {
    type StreamAggregatedResourcesStream = Out<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = Out<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        self.spawn::<Sotw>(Api::Ads, request)
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        self.spawn::<Delta>(Api::Ads, request)
    }
}

#[tonic::async_trait]
impl ExtensionConfigDiscoveryService for ProxyServer {
    type StreamExtensionConfigsStream = Out<DiscoveryResponse>;
    type DeltaExtensionConfigsStream = Out<DeltaDiscoveryResponse>;

    async fn stream_extension_configs(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamExtensionConfigsStream>, Status> {
        self.spawn::<Sotw>(Api::Ecds, request)
    }

    async fn delta_extension_configs(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaExtensionConfigsStream>, Status> {
        self.spawn::<Delta>(Api::Ecds, request)
    }

    async fn fetch_extension_configs(
        &self,
        _request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        Err(Status::unimplemented(
            "the proxy forwards streams only: use StreamExtensionConfigs",
        ))
    }
}

/// Serves the proxy's xDS services on `listener` (the one accept loop of [`crate::net::listen`])
/// until `shutdown` completes.
pub async fn serve(
    listener: crate::net::Listener,
    server: ProxyServer,
    closing: watch::Sender<bool>,
    shutdown: impl Future<Output = ()> + Send,
) {
    let max_request_size = server.ctx.limits.max_request_size;
    let incoming = listener.incoming();
    let result = tonic::transport::Server::builder()
        .layer(AbortLayer)
        .http2_keepalive_interval(Some(crate::xds::server::KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(crate::xds::server::KEEPALIVE_TIMEOUT))
        .add_service(
            AggregatedDiscoveryServiceServer::new(server.clone())
                .max_decoding_message_size(max_request_size)
                .max_encoding_message_size(MAX_MESSAGE_SIZE),
        )
        .add_service(
            ExtensionConfigDiscoveryServiceServer::new(server)
                .max_decoding_message_size(max_request_size)
                .max_encoding_message_size(MAX_MESSAGE_SIZE),
        )
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.await;
            let _ = closing.send(true);
        })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "proxy xds server failed");
    }
}
