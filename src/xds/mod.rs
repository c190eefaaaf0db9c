//! Serving ECDS resources to proxies over gRPC (behavior.md §7): state of the world, incremental and
//! aggregated streams, following the xDS protocol
//! (<https://www.envoyproxy.io/docs/envoy/latest/api-docs/xds_protocol>): versions, nonces, ACK and
//! NACK, per-stream subscriptions, wildcard-free.
//!
//! # Layout
//! The split is go-control-plane's (style guide §1): a cache the rest of the program writes, and a
//! server that only reads it.
//! - [`store`]: [`ResourceStore`], the versioned `TypedExtensionConfig` resources (one type URL,
//!   [`ECDS_TYPE_URL`]), change notification; it records what `report` defines: stream events,
//!   stream snapshots, counters and their Prometheus series;
//! - `sotw` and `delta` (private): the per-stream protocol state machines, free of I/O;
//! - `encode` (private): their replies on the wire, written around the resources' bytes the store
//!   encoded once, so that every stream sends the same bytes;
//! - [`server`]: one task per stream, and [`serve`]; `grpc` (private): the services as tonic
//!   routes, with a response body of their own that sends those shared bytes;
//! - [`limits`]: the bounds of the xDS port (request size, streams, names, node size, send
//!   budget, ACK deadline) and the log gate for repeated lines;
//! - [`admin`]: the project's own gRPC service `wasm_ecds.v1.Admin` (`proto/`): event feed and
//!   per-proxy view, on the xDS port;
//! - [`syncz`]: the per-proxy view (`/debug/syncz`): sent, ACKed and NACKed per resource;
//! - [`client`]: the proxy's side of the protocol, for tests and load tools.
//!
//! What a resource contains (the Wasm filter or its RBAC fallback) is `convert`'s business; when a
//! resource changes is the controller's. This module never looks inside a resource.

use tonic::Status;

pub mod admin;
#[cfg(any(test, feature = "testing"))]
pub mod client;
mod delta;
mod encode;
mod grpc;
pub mod limits;
mod report;
pub mod server;
mod sotw;
pub mod store;
mod stream;
pub mod syncz;

pub use grpc::{AdsService, EcdsService};
pub use limits::StreamLimits;
pub use server::{serve, serve_with_options, ServeOptions, XdsServer, MAX_MESSAGE_SIZE};
pub use store::{
    Api, Delivery, EventReceiver, Nacked, Protocol, ResourceStore, ResourceVersion, StreamEvent,
    StreamEventKind, StreamId, StreamInfo, XdsStats,
};

/// The only resource type served: ECDS resources are `TypedExtensionConfig`s.
pub const ECDS_TYPE_URL: &str = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The gRPC server could not run (accepting connections failed).
    #[error("xds server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// A gRPC call failed (client helpers).
    #[error("xds call: {0}")]
    Status(#[from] Status),
    /// The stream's request channel is closed (client helpers): the stream ended.
    #[error("xds stream closed")]
    StreamClosed,
}

/// Whether a request's `type_url` is one this server answers. The ECDS service implies its type,
/// so an empty one is accepted there; ADS carries many types and requires it (go-control-plane:
/// "type URL is required for ADS").
pub(crate) fn accepts_type_url(api: Api, type_url: &str) -> bool {
    type_url == ECDS_TYPE_URL || (api == Api::Ecds && type_url.is_empty())
}
