//! The per-proxy view of the xDS port (`GET /debug/syncz` on the admin port, `ListProxies` of
//! the `wasm_ecds.v1.Admin` gRPC service): every open stream with its proxy's node id and
//! address, its api and protocol, and per subscribed resource the version served now, the
//! version last sent, the version last ACKed and the last NACK with the proxy's error message.
//! Built from the store's stream records ([`ResourceStore::streams`]).

use serde::Serialize;

use super::store::{Api, Nacked, Protocol, ResourceStore, StreamId};

/// One open stream, as `/debug/syncz` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProxySync {
    /// The proxy's node id (empty until its first request).
    pub node: String,
    pub stream: StreamId,
    pub peer: Option<String>,
    pub api: Api,
    pub protocol: Protocol,
    /// The subscribed resources, sorted by name.
    pub resources: Vec<ResourceSync>,
}

/// One subscribed resource of a stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ResourceSync {
    pub name: String,
    /// The version the server serves now; `None` when it serves no such resource.
    pub current: Option<String>,
    /// The version last sent on this stream.
    pub sent: Option<String>,
    /// The version the proxy last ACKed on this stream.
    pub acked: Option<String>,
    /// The last NACK of this resource not followed by an ACK.
    pub nacked: Option<Nacked>,
    /// The proxy ACKed the version served now.
    pub synced: bool,
}

/// The view of every open stream, sorted by node id then stream id.
pub fn proxies(store: &ResourceStore) -> Vec<ProxySync> {
    let mut out: Vec<ProxySync> = store
        .streams()
        .into_iter()
        .map(|s| ProxySync {
            resources: s
                .subscribed
                .iter()
                .map(|name| {
                    let current = store.version_of(name);
                    let acked = s.acked.get(name).cloned();
                    ResourceSync {
                        name: name.clone(),
                        synced: current.is_some() && current == acked,
                        current,
                        sent: s.sent.get(name).cloned(),
                        acked,
                        nacked: s.nacked.get(name).cloned(),
                    }
                })
                .collect(),
            node: s.node_id,
            stream: s.id,
            peer: s.peer,
            api: s.api,
            protocol: s.protocol,
        })
        .collect();
    out.sort_by(|a, b| (&a.node, a.stream).cmp(&(&b.node, b.stream)));
    out
}

/// The body of `GET /debug/syncz`: `{"proxies": [...]}`, pretty-printed JSON.
pub fn syncz_json(store: &ResourceStore) -> Vec<u8> {
    serde_json::to_vec_pretty(&serde_json::json!({ "proxies": proxies(store) })).unwrap_or_default()
}
