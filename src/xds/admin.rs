//! The project's own gRPC API, `wasm_ecds.v1.Admin` (`proto/wasm_ecds/v1/admin.proto`), served on
//! the xDS port next to ECDS and ADS, behind the admin endpoints' access rule
//! ([`crate::auth::Access`], checked by an interceptor on the `authorization` metadata).
//!
//! - `WatchEvents`: the engine's events (published by `serve`'s controller into an [`EventHub`],
//!   worded by [`crate::engine::Event::trace_text`] exactly as `sim --trace` words them) merged
//!   with the store's stream events (one event per resource of a push, ACK or NACK).
//! - `ListProxies`: the `/debug/syncz` view ([`super::syncz`]).

use std::sync::Arc;

use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::store::{ResourceStore, StreamEvent, StreamEventKind};
use crate::auth::Access;
use crate::clock::{Clock as _, SystemClock};
use crate::engine::Event;
use crate::plugin::ECDS_RESOURCE_PREFIX;

/// The code generated from `proto/wasm_ecds/v1/admin.proto` by `build.rs`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    tonic::include_proto!("wasm_ecds.v1");
}

/// How many events a slow watcher may fall behind before it loses the oldest (it then gets one
/// `lagged` event saying how many).
pub const EVENT_CAPACITY: usize = 4096;
/// Events queued per `WatchEvents` call.
const WATCH_BUFFER: usize = 256;

/// Where `serve`'s controller publishes the engine's events for `WatchEvents`. Cheap to clone;
/// publishing costs nothing while nobody watches.
#[derive(Clone, Debug)]
pub struct EventHub {
    tx: broadcast::Sender<pb::Event>,
}

impl Default for EventHub {
    fn default() -> Self {
        EventHub {
            tx: broadcast::channel(EVENT_CAPACITY).0,
        }
    }
}

impl EventHub {
    /// Publishes engine events (as `Driver::take_events` returns them).
    pub fn publish(&self, events: &[Event]) {
        if self.tx.receiver_count() == 0 {
            return;
        }
        // A module is named by the URL it was served from (the simulator names it after the
        // scenario's module); one expired from the cache, by its sha256.
        let urls: std::collections::HashMap<&str, &str> = events
            .iter()
            .filter_map(|e| match e {
                Event::ServingChanged {
                    serving: Some(crate::engine::Serving::Module(m)),
                    ..
                } => Some((m.sha256.as_str(), m.url.as_str())),
                _ => None,
            })
            .collect();
        let name = |sha: &str| {
            urls.get(sha).map_or_else(
                || format!("sha256:{}", &sha[..sha.len().min(12)]),
                |url| url.to_string(),
            )
        };
        for e in events {
            let (outcome, detail) = match e {
                Event::Processed {
                    outcome, detail, ..
                } => (outcome.to_string(), detail.clone().unwrap_or_default()),
                _ => (String::new(), String::new()),
            };
            let plugin = e.plugin().map(ToString::to_string).unwrap_or_default();
            let _ = self.tx.send(pb::Event {
                at_unix_ms: e.at().0.as_millis() as u64,
                kind: e.kind().to_string(),
                resource: String::new(),
                plugin,
                version: String::new(),
                node: String::new(),
                outcome,
                detail,
                text: e.trace_text(&name),
            });
        }
    }
}

/// The `ns/name` of a WasmPlugin's ECDS resource name; empty for other names.
fn plugin_of(resource: &str) -> String {
    resource
        .strip_prefix(ECDS_RESOURCE_PREFIX)
        .and_then(|rest| rest.split_once('.'))
        .map(|(ns, name)| format!("{ns}/{name}"))
        .unwrap_or_default()
}

/// One `WatchEvents` event per resource of a stream event (one for connects and disconnects).
fn stream_events(e: &StreamEvent, at_unix_ms: u64) -> Vec<pb::Event> {
    let who = format!("proxy {} ({}/{})", e.node_id, e.api, e.protocol);
    let one = |kind: &str, resource: &str, version: &str, detail: &str, text: String| pb::Event {
        at_unix_ms,
        kind: kind.to_string(),
        plugin: plugin_of(resource),
        resource: resource.to_string(),
        version: version.to_string(),
        node: e.node_id.clone(),
        outcome: String::new(),
        detail: detail.to_string(),
        text,
    };
    let (kind, delivery, message) = match &e.kind {
        StreamEventKind::Connected => {
            return vec![one("connected", "", "", "", format!("{who} connected"))]
        }
        StreamEventKind::Disconnected => {
            return vec![one(
                "disconnected",
                "",
                "",
                "",
                format!("{who} disconnected"),
            )]
        }
        StreamEventKind::Pushed(d) => ("pushed", d, ""),
        StreamEventKind::Acked(d) => ("acked", d, ""),
        StreamEventKind::Nacked { delivery, message } => ("nacked", delivery, message.as_str()),
    };
    delivery
        .resources
        .iter()
        .map(|r| {
            let mut text = format!("{who} {kind} {} version {}", r.name, r.version);
            if !message.is_empty() {
                text.push_str(&format!(": {message}"));
            }
            one(kind, &r.name, &r.version, message, text)
        })
        .collect()
}

/// The `wasm_ecds.v1.Admin` service over one store and one event hub.
#[derive(Clone, Debug)]
pub struct AdminService {
    store: ResourceStore,
    hub: EventHub,
}

/// The service behind `access`: callers that `access` does not allow get `UNAUTHENTICATED`.
pub fn service(
    store: ResourceStore,
    hub: EventHub,
    access: Arc<Access>,
) -> tonic::service::interceptor::InterceptedService<
    pb::admin_server::AdminServer<AdminService>,
    impl tonic::service::Interceptor + Clone,
> {
    let check = move |request: Request<()>| {
        let header = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes());
        if access.allows(header) {
            Ok(request)
        } else {
            Err(Status::unauthenticated(
                "wasm_ecds.v1.Admin: send the admin token as 'authorization: Bearer <token>'",
            ))
        }
    };
    pb::admin_server::AdminServer::with_interceptor(AdminService { store, hub }, check)
}

/// Whether `e` passes the `WatchEvents` filter `plugin` (empty: everything).
fn wanted(e: &pb::Event, plugin: &str) -> bool {
    plugin.is_empty() || e.plugin == plugin
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    type WatchEventsStream = ReceiverStream<Result<pb::Event, Status>>;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let plugin = request.into_inner().plugin;
        let mut engine = self.hub.tx.subscribe();
        let mut streams = self.store.events();
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        tokio::spawn(async move {
            let lagged = |n: u64| pb::Event {
                at_unix_ms: SystemClock.now().0.as_millis() as u64,
                kind: "lagged".into(),
                detail: format!("{n} events dropped"),
                text: format!("lagged: {n} events dropped"),
                ..Default::default()
            };
            loop {
                let batch = tokio::select! {
                    _ = tx.closed() => return,
                    e = engine.recv() => match e {
                        Ok(e) => vec![e],
                        Err(broadcast::error::RecvError::Lagged(n)) => vec![lagged(n)],
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    e = streams.recv() => match e {
                        Ok(e) => stream_events(&e, SystemClock.now().0.as_millis() as u64),
                        Err(broadcast::error::RecvError::Lagged(n)) => vec![lagged(n)],
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                };
                for e in batch {
                    if (e.kind == "lagged" || wanted(&e, &plugin)) && tx.send(Ok(e)).await.is_err()
                    {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn list_proxies(
        &self,
        _request: Request<pb::ListProxiesRequest>,
    ) -> Result<Response<pb::ListProxiesResponse>, Status> {
        let proxies = super::syncz::proxies(&self.store)
            .into_iter()
            .map(|p| pb::Proxy {
                node: p.node,
                stream: p.stream,
                peer: p.peer.unwrap_or_default(),
                api: p.api.to_string(),
                protocol: p.protocol.to_string(),
                resources: p
                    .resources
                    .into_iter()
                    .map(|r| {
                        let (nacked_version, nacked_message) =
                            r.nacked.map(|n| (n.version, n.message)).unwrap_or_default();
                        pb::ResourceSync {
                            name: r.name,
                            current: r.current.unwrap_or_default(),
                            sent: r.sent.unwrap_or_default(),
                            acked: r.acked.unwrap_or_default(),
                            nacked_version,
                            nacked_message,
                            synced: r.synced,
                        }
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(pb::ListProxiesResponse { proxies }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::store::{Api, Delivery, Protocol, ResourceVersion};

    #[test]
    fn stream_events_are_one_per_resource_with_the_plugin_and_the_nack_message() {
        let delivery = Delivery {
            nonce: "2-0badc0de".into(),
            version: "7-abc".into(),
            resources: vec![
                ResourceVersion {
                    name: format!("{ECDS_RESOURCE_PREFIX}default.a"),
                    version: "7-abc".into(),
                },
                ResourceVersion {
                    name: "istio.basic_auth".into(),
                    version: "5-def".into(),
                },
            ],
            removed: Vec::new(),
        };
        let e = StreamEvent {
            stream: 1,
            node_id: "n1".into(),
            api: Api::Ads,
            protocol: Protocol::Delta,
            kind: StreamEventKind::Nacked {
                delivery,
                message: "bad wasm".into(),
            },
        };
        let out = stream_events(&e, 42);
        assert_eq!(out.len(), 2);
        assert_eq!(
            (
                out[0].kind.as_str(),
                out[0].plugin.as_str(),
                out[0].detail.as_str()
            ),
            ("nacked", "default/a", "bad wasm")
        );
        assert_eq!(
            out[0].text,
            format!("proxy n1 (ads/delta) nacked {ECDS_RESOURCE_PREFIX}default.a version 7-abc: bad wasm")
        );
        assert_eq!(out[1].plugin, "", "not a WasmPlugin resource");
        assert!(wanted(&out[0], "default/a") && !wanted(&out[1], "default/a"));
        let connected = StreamEvent {
            kind: StreamEventKind::Connected,
            ..e
        };
        assert_eq!(
            stream_events(&connected, 1)[0].text,
            "proxy n1 (ads/delta) connected"
        );
    }
}
