//! The two xDS variants a proxied stream speaks, SotW and delta, behind one [`Wire`] trait: how
//! to open the upstream stream, read and rewrite messages, remember what Envoy asked for (to
//! replay it on a new upstream stream) and re-push converted ECDS resources whose result changed.

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::envoy::service::extension::v3::extension_config_discovery_service_client::ExtensionConfigDiscoveryServiceClient;
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use futures_util::future::BoxFuture;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

use super::convert::Converting;
use crate::xds::Api;

/// One variant of the protocol.
pub trait Wire: Send + 'static {
    type Req: prost::Message + Clone + Default + Send + 'static;
    type Resp: prost::Message + Clone + Default + Send + 'static;
    /// What Envoy asked for, per type, to replay on a new upstream stream.
    type Memory: Default + Send;
    /// The ECDS resources Envoy was sent, to re-push those whose result changes.
    type Sent: Default + Send;
    /// True when a newer response replaces an older one still converting (SotW: each response is
    /// the whole state); false when every response must be forwarded, in order (delta).
    const SUPERSEDES: bool;

    fn open(
        channel: Channel,
        api: Api,
        max_size: usize,
        requests: UnboundedReceiverStream<Self::Req>,
    ) -> BoxFuture<'static, Result<Streaming<Self::Resp>, Status>>;

    fn req_type(r: &Self::Req) -> &str;
    fn req_node(r: &Self::Req) -> Option<&Node>;
    /// How many names the stream would subscribe to after `r` (at most), every type counting as
    /// one name at least (a wildcard subscription): the bound of `--xds-max-resource-names`
    /// over what the stream remembers to replay.
    fn names_after(m: &Self::Memory, r: &Self::Req) -> usize;
    fn req_nonce(r: &mut Self::Req) -> &mut String;
    /// The version an ACK accepts (`None` for a NACK or a delta request).
    fn req_accepted(r: &Self::Req) -> Option<&str>;
    fn remember_request(m: &mut Self::Memory, r: &Self::Req);
    fn remember_response(m: &mut Self::Memory, r: &Self::Resp);
    fn replay(m: &Self::Memory) -> Vec<Self::Req>;

    fn resp_type(r: &Self::Resp) -> &str;
    fn resp_nonce(r: &Self::Resp) -> &str;
    /// The resources a response carries, in order.
    fn resources(r: &Self::Resp) -> Vec<Any>;
    /// `r` with its resources replaced (same order) and a new nonce.
    fn rebuild(r: &Self::Resp, resources: Vec<Any>, nonce: String) -> Self::Resp;
    /// The NACK of `r`, with the last version Envoy accepted (and, SotW, its subscription).
    fn nack(m: &Self::Memory, r: &Self::Resp, accepted: &str, message: String) -> Self::Req;

    /// Records a converted response as what Envoy now has.
    fn sent(sent: &mut Self::Sent, resp: Self::Resp, converting: Converting);
    /// A response re-pushing the resources whose result changed, if any, rendered with `nonce`.
    fn repush(
        sent: &mut Self::Sent,
        nonce: String,
        max_size: usize,
    ) -> Option<Result<Self::Resp, String>>;
}

fn status(message: String) -> Option<RpcStatus> {
    Some(RpcStatus {
        code: tonic::Code::Internal as i32,
        message,
        details: Vec::new(),
    })
}

/// State of the world.
pub struct Sotw;

/// Per type, Envoy's last request, in the order types were first asked for; and Envoy's node.
#[derive(Default)]
pub struct SotwMemory {
    node: Option<Node>,
    order: Vec<String>,
    last: BTreeMap<String, DiscoveryRequest>,
}

impl Wire for Sotw {
    type Req = DiscoveryRequest;
    type Resp = DiscoveryResponse;
    type Memory = SotwMemory;
    type Sent = Option<(DiscoveryResponse, Converting)>;
    const SUPERSEDES: bool = true;

    fn open(
        channel: Channel,
        api: Api,
        max_size: usize,
        requests: UnboundedReceiverStream<DiscoveryRequest>,
    ) -> BoxFuture<'static, Result<Streaming<DiscoveryResponse>, Status>> {
        Box::pin(async move {
            let response = match api {
                Api::Ecds => {
                    ExtensionConfigDiscoveryServiceClient::new(channel)
                        .max_decoding_message_size(max_size)
                        .max_encoding_message_size(max_size)
                        .stream_extension_configs(requests)
                        .await?
                }
                Api::Ads => {
                    AggregatedDiscoveryServiceClient::new(channel)
                        .max_decoding_message_size(max_size)
                        .max_encoding_message_size(max_size)
                        .stream_aggregated_resources(requests)
                        .await?
                }
            };
            Ok(response.into_inner())
        })
    }

    fn req_type(r: &DiscoveryRequest) -> &str {
        &r.type_url
    }
    fn req_node(r: &DiscoveryRequest) -> Option<&Node> {
        r.node.as_ref()
    }
    fn names_after(m: &SotwMemory, r: &DiscoveryRequest) -> usize {
        let others: usize = (m.last.iter())
            .filter(|(t, _)| **t != r.type_url)
            .map(|(_, q)| q.resource_names.len().max(1))
            .sum();
        others + r.resource_names.len().max(1)
    }
    fn req_nonce(r: &mut DiscoveryRequest) -> &mut String {
        &mut r.response_nonce
    }
    fn req_accepted(r: &DiscoveryRequest) -> Option<&str> {
        r.error_detail.is_none().then_some(r.version_info.as_str())
    }
    fn remember_request(m: &mut SotwMemory, r: &DiscoveryRequest) {
        if m.node.is_none() {
            m.node = r.node.clone();
        }
        if !m.last.contains_key(&r.type_url) {
            m.order.push(r.type_url.clone());
        }
        m.last.insert(r.type_url.clone(), r.clone());
    }
    fn remember_response(_: &mut SotwMemory, _: &DiscoveryResponse) {}
    fn replay(m: &SotwMemory) -> Vec<DiscoveryRequest> {
        let mut out: Vec<DiscoveryRequest> = (m.order.iter())
            .filter_map(|t| m.last.get(t))
            .map(|r| DiscoveryRequest {
                response_nonce: String::new(),
                error_detail: None,
                node: None,
                ..r.clone()
            })
            .collect();
        if let Some(first) = out.first_mut() {
            first.node = m.node.clone();
        }
        out
    }

    fn resp_type(r: &DiscoveryResponse) -> &str {
        &r.type_url
    }
    fn resp_nonce(r: &DiscoveryResponse) -> &str {
        &r.nonce
    }
    fn resources(r: &DiscoveryResponse) -> Vec<Any> {
        r.resources.clone()
    }
    fn rebuild(r: &DiscoveryResponse, resources: Vec<Any>, nonce: String) -> DiscoveryResponse {
        DiscoveryResponse {
            resources,
            nonce,
            ..r.clone()
        }
    }
    fn nack(
        m: &SotwMemory,
        r: &DiscoveryResponse,
        accepted: &str,
        message: String,
    ) -> DiscoveryRequest {
        // A SotW request always states the whole subscription: a NACK naming nothing would
        // unsubscribe.
        let resource_names = (m.last.get(&r.type_url))
            .map(|q| q.resource_names.clone())
            .unwrap_or_default();
        DiscoveryRequest {
            version_info: accepted.to_string(),
            resource_names,
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            error_detail: status(message),
            ..Default::default()
        }
    }

    fn sent(sent: &mut Self::Sent, resp: DiscoveryResponse, converting: Converting) {
        *sent = Some((resp, converting));
    }
    fn repush(
        sent: &mut Self::Sent,
        nonce: String,
        max_size: usize,
    ) -> Option<Result<DiscoveryResponse, String>> {
        let (resp, converting) = sent.as_mut()?;
        if !converting.changed() {
            return None;
        }
        Some(
            converting
                .render(max_size)
                .map(|resources| Self::rebuild(resp, resources, nonce)),
        )
    }
}

/// Incremental.
pub struct Delta;

/// Per type: the names Envoy subscribed to (`None`: wildcard) and the versions it was sent.
#[derive(Default)]
pub struct DeltaMemory {
    node: Option<Node>,
    order: Vec<String>,
    subscribed: BTreeMap<String, Option<BTreeSet<String>>>,
    versions: BTreeMap<String, BTreeMap<String, String>>,
}

/// A delta ECDS resource Envoy was sent: its envelope and its conversion.
pub type DeltaSent = BTreeMap<String, (Resource, Converting)>;

impl Wire for Delta {
    type Req = DeltaDiscoveryRequest;
    type Resp = DeltaDiscoveryResponse;
    type Memory = DeltaMemory;
    type Sent = (String, DeltaSent);
    const SUPERSEDES: bool = false;

    fn open(
        channel: Channel,
        api: Api,
        max_size: usize,
        requests: UnboundedReceiverStream<DeltaDiscoveryRequest>,
    ) -> BoxFuture<'static, Result<Streaming<DeltaDiscoveryResponse>, Status>> {
        Box::pin(async move {
            let response = match api {
                Api::Ecds => {
                    ExtensionConfigDiscoveryServiceClient::new(channel)
                        .max_decoding_message_size(max_size)
                        .max_encoding_message_size(max_size)
                        .delta_extension_configs(requests)
                        .await?
                }
                Api::Ads => {
                    AggregatedDiscoveryServiceClient::new(channel)
                        .max_decoding_message_size(max_size)
                        .max_encoding_message_size(max_size)
                        .delta_aggregated_resources(requests)
                        .await?
                }
            };
            Ok(response.into_inner())
        })
    }

    fn req_type(r: &DeltaDiscoveryRequest) -> &str {
        &r.type_url
    }
    fn req_node(r: &DeltaDiscoveryRequest) -> Option<&Node> {
        r.node.as_ref()
    }
    fn names_after(m: &DeltaMemory, r: &DeltaDiscoveryRequest) -> usize {
        let mut n = 0;
        for (t, names) in &m.subscribed {
            let mut len = names.as_ref().map_or(0, BTreeSet::len);
            if *t == r.type_url {
                len += r.resource_names_subscribe.len();
            }
            n += len.max(1);
        }
        if !m.subscribed.contains_key(&r.type_url) {
            n += r.resource_names_subscribe.len().max(1);
        }
        n
    }
    fn req_nonce(r: &mut DeltaDiscoveryRequest) -> &mut String {
        &mut r.response_nonce
    }
    fn req_accepted(_: &DeltaDiscoveryRequest) -> Option<&str> {
        None
    }
    fn remember_request(m: &mut DeltaMemory, r: &DeltaDiscoveryRequest) {
        if m.node.is_none() {
            m.node = r.node.clone();
        }
        let names = match m.subscribed.get_mut(&r.type_url) {
            Some(names) => names,
            None => {
                m.order.push(r.type_url.clone());
                // A first request naming nothing (or `*`) subscribes to everything.
                let wildcard = r.resource_names_subscribe.is_empty()
                    || r.resource_names_subscribe.iter().any(|n| n == "*");
                let initial = (!wildcard).then(BTreeSet::new);
                m.subscribed.entry(r.type_url.clone()).or_insert(initial)
            }
        };
        if let Some(names) = names {
            names.extend(r.resource_names_subscribe.iter().cloned());
            for n in &r.resource_names_unsubscribe {
                names.remove(n);
            }
        }
    }
    fn remember_response(m: &mut DeltaMemory, r: &DeltaDiscoveryResponse) {
        let versions = m.versions.entry(r.type_url.clone()).or_default();
        for res in &r.resources {
            versions.insert(res.name.clone(), res.version.clone());
        }
        for n in &r.removed_resources {
            versions.remove(n);
        }
    }
    fn replay(m: &DeltaMemory) -> Vec<DeltaDiscoveryRequest> {
        let mut out: Vec<DeltaDiscoveryRequest> = (m.order.iter())
            .map(|t| DeltaDiscoveryRequest {
                type_url: t.clone(),
                resource_names_subscribe: match m.subscribed.get(t) {
                    Some(Some(names)) => names.iter().cloned().collect(),
                    _ => Vec::new(),
                },
                initial_resource_versions: m
                    .versions
                    .get(t)
                    .map(|v| v.clone().into_iter().collect())
                    .unwrap_or_default(),
                ..Default::default()
            })
            .collect();
        if let Some(first) = out.first_mut() {
            first.node = m.node.clone();
        }
        out
    }

    fn resp_type(r: &DeltaDiscoveryResponse) -> &str {
        &r.type_url
    }
    fn resp_nonce(r: &DeltaDiscoveryResponse) -> &str {
        &r.nonce
    }
    fn resources(r: &DeltaDiscoveryResponse) -> Vec<Any> {
        (r.resources.iter())
            .map(|res| res.resource.clone().unwrap_or_default())
            .collect()
    }
    fn rebuild(
        r: &DeltaDiscoveryResponse,
        resources: Vec<Any>,
        nonce: String,
    ) -> DeltaDiscoveryResponse {
        let resources = (r.resources.iter().zip(resources))
            .map(|(res, any)| Resource {
                resource: res.resource.as_ref().map(|_| any),
                ..res.clone()
            })
            .collect();
        DeltaDiscoveryResponse {
            resources,
            nonce,
            ..r.clone()
        }
    }
    fn nack(
        _: &DeltaMemory,
        r: &DeltaDiscoveryResponse,
        _: &str,
        message: String,
    ) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            error_detail: status(message),
            ..Default::default()
        }
    }

    fn sent(sent: &mut Self::Sent, resp: DeltaDiscoveryResponse, converting: Converting) {
        let (system_version, by_name) = sent;
        *system_version = resp.system_version_info.clone();
        for n in &resp.removed_resources {
            by_name.remove(n);
        }
        for (res, slot) in resp.resources.into_iter().zip(converting.slots) {
            let one = Converting { slots: vec![slot] };
            by_name.insert(res.name.clone(), (res, one));
        }
    }
    fn repush(
        sent: &mut Self::Sent,
        nonce: String,
        max_size: usize,
    ) -> Option<Result<DeltaDiscoveryResponse, String>> {
        let (system_version, by_name) = sent;
        let mut resources = Vec::new();
        for (res, converting) in by_name.values_mut() {
            if converting.changed() {
                let rendered = match converting.render(max_size) {
                    Ok(mut r) => r.pop(),
                    Err(e) => return Some(Err(e)),
                };
                resources.push(Resource {
                    resource: rendered,
                    ..res.clone()
                });
            }
        }
        if resources.is_empty() {
            return None;
        }
        Some(Ok(DeltaDiscoveryResponse {
            system_version_info: system_version.clone(),
            resources,
            type_url: crate::xds::ECDS_TYPE_URL.to_string(),
            nonce,
            ..Default::default()
        }))
    }
}
