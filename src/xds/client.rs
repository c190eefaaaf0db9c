//! The proxy's side of the protocol, for tests, the simulator and load tools: connecting, opening
//! SotW and delta streams on ECDS or ADS, and building the requests Envoy sends (subscribe, ACK,
//! NACK). It holds no protocol logic of its own: callers decide when to ACK or NACK.
//!
//! Requests and responses are the envoy-types wire messages; `decode_*` unpack the resources.

use std::collections::HashMap;
use std::net::SocketAddr;

use envoy_types::pb::envoy::config::core::v3::{Node, TypedExtensionConfig};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::extension::v3::extension_config_discovery_service_client::ExtensionConfigDiscoveryServiceClient;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::Streaming;

use super::{Api, Error, ECDS_TYPE_URL, MAX_MESSAGE_SIZE};

/// `google.rpc.Code.INTERNAL`, what Envoy puts in `error_detail.code` when it rejects a config.
pub const NACK_CODE: i32 = 13;
/// Requests queued per stream before `send` waits.
const REQUEST_BUFFER: usize = 8;

/// Opens one HTTP/2 connection to the server at `addr` (plain text). Every stream opened on the
/// returned channel shares that connection; open several channels to spread streams.
pub async fn connect(addr: SocketAddr) -> Result<Channel, Error> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))
        .map_err(Error::Transport)?
        .tcp_nodelay(true)
        .connect()
        .await?)
}

/// An ECDS client over `channel` accepting messages up to [`MAX_MESSAGE_SIZE`].
pub fn ecds_client(channel: Channel) -> ExtensionConfigDiscoveryServiceClient<Channel> {
    ExtensionConfigDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE)
}

/// An ADS client over `channel` accepting messages up to [`MAX_MESSAGE_SIZE`].
pub fn ads_client(channel: Channel) -> AggregatedDiscoveryServiceClient<Channel> {
    AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE)
}

pub fn node(id: &str) -> Node {
    Node {
        id: id.to_string(),
        ..Default::default()
    }
}

/// The first SotW request of a stream: subscribe to `names`.
pub fn sotw_subscribe(node_id: &str, names: &[String]) -> DiscoveryRequest {
    DiscoveryRequest {
        node: Some(node(node_id)),
        resource_names: names.to_vec(),
        type_url: ECDS_TYPE_URL.to_string(),
        ..Default::default()
    }
}

/// The ACK of `response`, keeping the subscription `names`.
pub fn sotw_ack(names: &[String], response: &DiscoveryResponse) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: response.version_info.clone(),
        resource_names: names.to_vec(),
        type_url: ECDS_TYPE_URL.to_string(),
        response_nonce: response.nonce.clone(),
        ..Default::default()
    }
}

/// The NACK of `response`: `accepted_version` is the last version the proxy accepted.
pub fn sotw_nack(
    names: &[String],
    accepted_version: &str,
    response: &DiscoveryResponse,
    message: &str,
) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: accepted_version.to_string(),
        error_detail: Some(RpcStatus {
            code: NACK_CODE,
            message: message.to_string(),
            details: Vec::new(),
        }),
        ..sotw_ack(names, response)
    }
}

/// The first delta request of a stream: subscribe to `names`, declaring the versions already held.
pub fn delta_subscribe(
    node_id: &str,
    names: &[String],
    initial_versions: HashMap<String, String>,
) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: Some(node(node_id)),
        type_url: ECDS_TYPE_URL.to_string(),
        resource_names_subscribe: names.to_vec(),
        initial_resource_versions: initial_versions,
        ..Default::default()
    }
}

/// A later delta request changing the subscription.
pub fn delta_update(subscribe: &[String], unsubscribe: &[String]) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: ECDS_TYPE_URL.to_string(),
        resource_names_subscribe: subscribe.to_vec(),
        resource_names_unsubscribe: unsubscribe.to_vec(),
        ..Default::default()
    }
}

/// The ACK of a delta response.
pub fn delta_ack(response: &DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: ECDS_TYPE_URL.to_string(),
        response_nonce: response.nonce.clone(),
        ..Default::default()
    }
}

/// The NACK of a delta response.
pub fn delta_nack(response: &DeltaDiscoveryResponse, message: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        error_detail: Some(RpcStatus {
            code: NACK_CODE,
            message: message.to_string(),
            details: Vec::new(),
        }),
        ..delta_ack(response)
    }
}

/// The resources of a SotW response, decoded.
pub fn decode_sotw(
    response: &DiscoveryResponse,
) -> Result<Vec<TypedExtensionConfig>, prost::DecodeError> {
    response
        .resources
        .iter()
        .map(|any| TypedExtensionConfig::decode(any.value.as_slice()))
        .collect()
}

/// The resources of a delta response, decoded.
pub fn decode_delta(
    response: &DeltaDiscoveryResponse,
) -> Result<Vec<TypedExtensionConfig>, prost::DecodeError> {
    response
        .resources
        .iter()
        .filter_map(|r| r.resource.as_ref())
        .map(|any| TypedExtensionConfig::decode(any.value.as_slice()))
        .collect()
}

/// One open stream: a request sender and the response stream.
#[derive(Debug)]
pub struct Session<Req, Resp> {
    requests: mpsc::Sender<Req>,
    responses: Streaming<Resp>,
}

/// A SotW stream (ECDS or ADS).
pub type SotwSession = Session<DiscoveryRequest, DiscoveryResponse>;
/// A delta stream (ECDS or ADS).
pub type DeltaSession = Session<DeltaDiscoveryRequest, DeltaDiscoveryResponse>;

impl<Req, Resp> Session<Req, Resp> {
    /// Sends one request.
    pub async fn send(&self, request: Req) -> Result<(), Error> {
        self.requests
            .send(request)
            .await
            .map_err(|_| Error::StreamClosed)
    }

    /// Ends the request side (an HTTP/2 half-close) and keeps the response stream.
    pub fn close_requests(self) -> Streaming<Resp> {
        self.responses
    }

    /// The next response; `None` when the server ended the stream.
    pub async fn recv(&mut self) -> Result<Option<Resp>, Error> {
        Ok(self.responses.message().await?)
    }
}

impl SotwSession {
    /// Opens a SotW stream on `api` and sends `first`.
    pub async fn open(channel: Channel, api: Api, first: DiscoveryRequest) -> Result<Self, Error> {
        let (tx, rx) = mpsc::channel(REQUEST_BUFFER);
        tx.send(first).await.map_err(|_| Error::StreamClosed)?;
        let requests = ReceiverStream::new(rx);
        let responses = match api {
            Api::Ecds => {
                ecds_client(channel)
                    .stream_extension_configs(requests)
                    .await?
            }
            Api::Ads => {
                ads_client(channel)
                    .stream_aggregated_resources(requests)
                    .await?
            }
        };
        Ok(Session {
            requests: tx,
            responses: responses.into_inner(),
        })
    }
}

impl DeltaSession {
    /// Opens a delta stream on `api` and sends `first`.
    pub async fn open(
        channel: Channel,
        api: Api,
        first: DeltaDiscoveryRequest,
    ) -> Result<Self, Error> {
        let (tx, rx) = mpsc::channel(REQUEST_BUFFER);
        tx.send(first).await.map_err(|_| Error::StreamClosed)?;
        let requests = ReceiverStream::new(rx);
        let responses = match api {
            Api::Ecds => {
                ecds_client(channel)
                    .delta_extension_configs(requests)
                    .await?
            }
            Api::Ads => {
                ads_client(channel)
                    .delta_aggregated_resources(requests)
                    .await?
            }
        };
        Ok(Session {
            requests: tx,
            responses: responses.into_inner(),
        })
    }
}
