//! The per-stream state of a state-of-the-world stream (`StreamExtensionConfigs`, and the ECDS part of
//! `StreamAggregatedResources`), free of I/O: `server` feeds it requests and store changes and sends
//! what it returns.
//!
//! Rules (<https://www.envoyproxy.io/docs/envoy/latest/api-docs/xds_protocol>):
//! - Subscriptions are the request's `resource_names`, wildcard-free: an empty list means no
//!   resources. Names dropped from the list stop receiving updates and are forgotten, so
//!   subscribing again sends them again.
//! - A response carries every subscribed resource that exists, with a `version_info` that changes
//!   exactly when that set of (name, version) pairs changes, and a fresh nonce. A response is sent
//!   only when some subscribed, existing resource differs from what this stream was last sent: a
//!   name that does not exist yet gets nothing until it appears (Envoy waits for it under
//!   `initial_fetch_timeout`), and a removal alone sends nothing, because Envoy applies a SotW ECDS
//!   response to each filter that subscribed to a name in it and rejects one with no resource for a
//!   lone filter ("Unexpected number of resources in ExtensionConfigDS response").
//! - At most one response is outstanding: the next is sent after the proxy ACKs or NACKs the
//!   previous one, from the store's latest state (updates in between are coalesced; what
//!   go-control-plane's `LinearCache` does by opening a watch only per request).
//! - A request whose `response_nonce` is not the latest nonce sent is stale and ignored entirely,
//!   subscription changes included (go-control-plane `pkg/server/sotw/v3/xds.go`): the proxy sends
//!   its full subscription again with the ACK of the latest response.
//! - ACK: latest nonce, no `error_detail`. NACK: latest nonce with `error_detail`; it is counted and
//!   logged, and the NACKed versions count as sent, so they are not sent again in a loop
//!   (behavior.md §7); the next response goes out when one of the resources changes.
//! - On a new stream, a first request whose `version_info` equals the version this stream would
//!   receive gets nothing: the proxy already holds exactly that (a reconnect).
//!
//! A response is kept as the stream's [`Outstanding`] (its nonce and the stored entries) until
//! its ACK; `encode.rs` writes it ([`SotwReply`]) around the resources' stored encodings.

use std::collections::BTreeSet;

use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf::Any;
use prost::Message as _;

use super::encode::SotwReply;
use super::store::{
    set_version, Api, Protocol, ResourceStore, StreamEvent, StreamEventKind, StreamId,
};
use super::stream::{Nonce, Outstanding, StreamCore};
use super::ECDS_TYPE_URL;

/// A state-of-the-world stream (module docs).
#[derive(Debug)]
pub(crate) struct SotwStream {
    core: StreamCore,
    last_nonce: Option<Nonce>,
    /// The store revision at which the proxy was last known to hold (or to be sent) every
    /// subscribed resource: while the store stays there ([`ResourceStore::revision_now`]) and
    /// the subscription does not change, a lookup would find nothing to send, and is not made.
    /// Every ACK would otherwise look the subscription up again under the store's shared lock
    /// and take and drop a reference to each entry, which every stream shares.
    synced: Option<u64>,
}

impl SotwStream {
    pub(crate) fn new(id: StreamId, api: Api) -> Self {
        SotwStream {
            core: StreamCore::new(id, api, Protocol::Sotw),
            last_nonce: None,
            synced: None,
        }
    }

    /// What this stream shares with streams of the other protocol.
    pub(crate) fn core(&self) -> &StreamCore {
        &self.core
    }

    pub(crate) fn core_mut(&mut self) -> &mut StreamCore {
        &mut self.core
    }

    fn event(&self, kind: StreamEventKind) -> StreamEvent {
        self.core.event(kind)
    }

    /// Handles one request; returns whether it made a response to send (then
    /// [`reply`](Self::reply)).
    pub(crate) fn on_request(&mut self, req: DiscoveryRequest, store: &ResourceStore) -> bool {
        if self
            .core
            .begin_request(req.node.as_ref(), &req.type_url, store)
            .is_none()
        {
            return false;
        }
        if let Some(latest) = &self.last_nonce {
            if !latest.is(&req.response_nonce) {
                // go-control-plane sotw/v3/xds.go: a request for an older response is superseded by
                // the ACK/NACK of the latest one, which repeats the full subscription.
                tracing::debug!(parent: &self.core.span, nonce = %req.response_nonce, latest = %latest, "ignoring request with a stale nonce");
                return false;
            }
        }
        if let Some(response) = self.core.outstanding.take() {
            match &req.error_detail {
                Some(status) => {
                    let message = self.core.nacked(&response, status, store);
                    store.emit(|| {
                        let delivery = response.delivery();
                        self.event(StreamEventKind::Nacked { delivery, message })
                    });
                    self.core.give_back(response.entries);
                }
                None => {
                    store.count_ack();
                    tracing::debug!(parent: &self.core.span, version = %response.version(), nonce = %response.nonce, "ACK");
                    self.core.ack_entries(&response, false);
                    store.emit(|| self.event(StreamEventKind::Acked(response.delivery())));
                    self.core.give_back(response.entries);
                }
            }
        }
        self.subscribe(req.resource_names, store);
        if self.last_nonce.is_none() && !req.version_info.is_empty() {
            let current = self.core.lookup_subscribed(store);
            if !current.is_empty() && set_version(&current) == req.version_info {
                tracing::debug!(parent: &self.core.span, version = %req.version_info, "proxy already holds this version");
                self.core.hold(&current);
                self.core.acked.clone_from(&self.core.held);
                self.core.give_back(current);
                return false;
            }
            self.core.give_back(current);
        }
        self.push(store)
    }

    /// Replaces the subscription; forgets what was sent for names no longer subscribed.
    fn subscribe(&mut self, names: Vec<String>, store: &ResourceStore) {
        // A proxy repeats its subscription with every ACK, in the same order: compare first, and
        // build a new set only when it changed.
        let subscribed = &self.core.subscribed;
        let is_subscribed = |names: &mut dyn ExactSizeIterator<Item = &String>| {
            names.len() == subscribed.len()
                && names
                    .map(String::as_str)
                    .eq(subscribed.iter().map(|n| &**n))
        };
        if is_subscribed(&mut names.iter()) {
            return;
        }
        let names: BTreeSet<String> = names.into_iter().collect();
        if !is_subscribed(&mut names.iter()) {
            // Kept as the store's own strings where it has them (`ResourceStore::intern`).
            let names = store.intern(names);
            tracing::debug!(parent: &self.core.span, subscribed = ?names, "subscription changed");
            self.synced = None;
            self.core.subscribed = names;
            self.core.forget_unsubscribed();
        }
    }

    /// Handles a store change; returns whether it made a response to send.
    pub(crate) fn on_change(&mut self, store: &ResourceStore) -> bool {
        self.push(store)
    }

    /// The response awaiting its ACK, to encode.
    pub(crate) fn reply(&self) -> Option<SotwReply<'_>> {
        self.core.outstanding.as_ref().map(SotwReply)
    }

    fn push(&mut self, store: &ResourceStore) -> bool {
        if self.core.outstanding.is_some() {
            return false;
        }
        if self.synced.is_some_and(|r| r == store.revision_now()) {
            return false;
        }
        let (current, revision) = self.core.lookup_subscribed_at(store);
        if self.core.holds_all(&current) {
            self.core.give_back(current);
            self.synced = Some(revision);
            return false;
        }
        if !self
            .core
            .admit(current.iter().map(|e| e.config().len()).sum(), store)
        {
            self.core.give_back(current);
            self.synced = None;
            return false;
        }
        let nonce = self.core.next_nonce();
        self.core.hold(&current);
        self.synced = Some(revision);
        let response = Outstanding::sotw(nonce, current);
        tracing::debug!(parent: &self.core.span, version = %response.version(), nonce = %nonce, resources = response.entries.len(), "push");
        store.count_push();
        store.emit(|| self.event(StreamEventKind::Pushed(response.delivery())));
        self.last_nonce = Some(nonce);
        self.core.outstanding = Some(response);
        true
    }
}

/// The answer to a unary `FetchExtensionConfigs`: the requested resources that exist, now.
pub(crate) fn fetch_response(names: &[String], store: &ResourceStore) -> DiscoveryResponse {
    let current = store.lookup(names);
    DiscoveryResponse {
        version_info: set_version(&current),
        resources: (current.iter())
            .map(|e| Any::decode(e.any.clone()).expect("the store holds encoded Anys"))
            .collect(),
        type_url: ECDS_TYPE_URL.to_string(),
        ..Default::default()
    }
}

impl AsRef<StreamCore> for SotwStream {
    fn as_ref(&self) -> &StreamCore {
        &self.core
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::store::tests::config;
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::google::rpc::Status as RpcStatus;
    use std::sync::Arc;

    fn request(names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: version.into(),
            node: Some(Node {
                id: "node-1".into(),
                ..Default::default()
            }),
            resource_names: names.iter().map(|n| n.to_string()).collect(),
            type_url: ECDS_TYPE_URL.into(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn ack(names: &[&str], resp: &DiscoveryResponse) -> DiscoveryRequest {
        request(names, &resp.version_info, &resp.nonce)
    }

    fn nack(names: &[&str], accepted: &str, resp: &DiscoveryResponse) -> DiscoveryRequest {
        DiscoveryRequest {
            error_detail: Some(RpcStatus {
                code: 13,
                message: "bad wasm".into(),
                details: vec![],
            }),
            ..request(names, accepted, &resp.nonce)
        }
    }

    /// The state machine's replies, as the proxy decodes them.
    impl SotwStream {
        fn req(
            &mut self,
            req: DiscoveryRequest,
            store: &ResourceStore,
        ) -> Option<DiscoveryResponse> {
            let pushed = self.on_request(req, store);
            pushed.then(|| self.reply().expect("pushed").decode())
        }

        fn change(&mut self, store: &ResourceStore) -> Option<DiscoveryResponse> {
            let pushed = self.on_change(store);
            pushed.then(|| self.reply().expect("pushed").decode())
        }
    }

    fn stream() -> SotwStream {
        SotwStream::new(1, Api::Ecds)
    }

    #[test]
    fn initial_request_gets_existing_subscribed_resources_only() {
        let store = ResourceStore::new();
        store.set("a", config("1"));
        store.set("other", config("x"));
        let mut s = stream();
        let resp = s
            .req(request(&["a", "missing"], "", ""), &store)
            .expect("response");
        assert_eq!(resp.resources.len(), 1);
        assert_eq!(resp.version_info, store.version_of("a").unwrap());
        assert_eq!(resp.type_url, ECDS_TYPE_URL);
        assert!(resp.nonce.starts_with("1-"), "{}", resp.nonce);
        assert_eq!(s.core().node_id, "node-1");
    }

    #[test]
    fn nothing_is_sent_for_missing_or_no_names() {
        let store = ResourceStore::new();
        store.set("a", config("1"));
        let mut s = stream();
        assert!(
            s.req(request(&[], "", ""), &store).is_none(),
            "empty list is not a wildcard"
        );
        assert!(s.req(request(&["missing"], "", ""), &store).is_none());
        store.set("missing", config("now here"));
        let resp = s.change(&store).expect("appears");
        assert_eq!(resp.resources.len(), 1);
    }

    #[test]
    fn no_push_until_ack_then_latest_state() {
        let store = ResourceStore::new();
        store.set("a", config("1"));
        let mut s = stream();
        let r1 = s.req(request(&["a"], "", ""), &store).unwrap();
        store.set("a", config("2"));
        store.set("a", config("3"));
        assert!(s.core().awaiting_ack());
        assert!(
            s.change(&store).is_none(),
            "one response outstanding at a time"
        );
        let r2 = s
            .req(ack(&["a"], &r1), &store)
            .expect("latest state after the ACK");
        assert_eq!(r2.version_info, store.version_of("a").unwrap());
        assert!(r2.nonce.starts_with("2-"), "{}", r2.nonce);
        assert!(s.req(ack(&["a"], &r2), &store).is_none());
        assert_eq!(
            s.core().info().acked.get("a"),
            store.version_of("a").as_ref()
        );
        assert_eq!(store.stats().acks, 2);
    }

    /// An ACK while the store stays where the response was looked up makes no lookup; a change
    /// (of any resource) or a new subscription makes one, and pushes what is new.
    #[test]
    fn an_ack_looks_the_store_up_only_when_something_changed() {
        let store = ResourceStore::new();
        store.set("a", config("1"));
        store.set("b", config("1"));
        let mut s = stream();
        let r1 = s.req(request(&["a"], "", ""), &store).unwrap();
        let before = store.lookups();
        assert!(s.req(ack(&["a"], &r1), &store).is_none());
        assert!(s.change(&store).is_none(), "a wake with nothing new");
        assert_eq!(store.lookups(), before, "nothing changed: no lookup");

        store.set("other", config("x"));
        assert!(
            s.change(&store).is_none(),
            "an unsubscribed change sends nothing"
        );
        assert_eq!(store.lookups(), before + 1);
        assert!(s.change(&store).is_none());
        assert_eq!(
            store.lookups(),
            before + 1,
            "synced again at the new revision"
        );

        // A new subscription at the same revision is looked up and sent.
        let r2 = s.req(ack(&["a", "b"], &r1), &store).expect("b is new");
        assert_eq!(r2.resources.len(), 2);
        assert!(s.req(ack(&["a", "b"], &r2), &store).is_none());
        store.set("b", config("2"));
        let r3 = s.change(&store).expect("b changed");
        // Changed while the response awaited its ACK: the ACK sends the latest.
        store.set("a", config("2"));
        assert!(
            s.change(&store).is_none(),
            "one response outstanding at a time"
        );
        let r4 = s.req(ack(&["a", "b"], &r3), &store).expect("a changed");
        assert_eq!(r4.version_info, set_version(&store.lookup(["a", "b"])));
    }

    #[test]
    fn nack_is_recorded_and_not_resent() {
        let store = ResourceStore::new();
        store.set("a", config("1"));
        let mut s = stream();
        let r1 = s.req(request(&["a"], "", ""), &store).unwrap();
        assert!(s.req(ack(&["a"], &r1), &store).is_none());
        store.set("a", config("bad"));
        let r2 = s.change(&store).unwrap();
        assert!(
            s.req(nack(&["a"], &r1.version_info, &r2), &store).is_none(),
            "no resend"
        );
        assert!(s.change(&store).is_none(), "no resend on an unrelated wake");
        assert_eq!(store.stats().nacks, 1);
        assert_eq!(
            s.core().info().acked.get("a"),
            Some(&r1.version_info),
            "last accepted version kept"
        );
        store.set("a", config("fixed"));
        let r3 = s.change(&store).expect("a new version is sent");
        assert_eq!(r3.version_info, store.version_of("a").unwrap());
    }

    /// Pushes and ACKs of the same resources, over and over (the stream then compares its names
    /// with the store's by pointer, in one walk), record each new version as sent and ACKed; an
    /// ACK after a NACK clears the NACK.
    #[test]
    fn repeated_pushes_and_acks_record_each_version() {
        let store = ResourceStore::new();
        store.set("a", config("1"));
        store.set("b", config("1"));
        let mut s = stream();
        let mut last = s.req(request(&["a", "b"], "", ""), &store).unwrap();
        assert!(s.req(ack(&["a", "b"], &last), &store).is_none());
        for i in 2..5 {
            store.set("b", config(&i.to_string()));
            let r = s.change(&store).expect("b changed");
            assert_eq!(r.resources.len(), 2);
            assert!(s.req(ack(&["a", "b"], &r), &store).is_none());
            let info = s.core().info();
            for name in ["a", "b"] {
                assert_eq!(info.sent.get(name), store.version_of(name).as_ref());
                assert_eq!(info.acked.get(name), store.version_of(name).as_ref());
            }
            assert!(s.change(&store).is_none(), "nothing new");
            last = r;
        }
        store.set("a", config("bad"));
        let r = s.change(&store).expect("a changed");
        assert!(s
            .req(nack(&["a", "b"], &last.version_info, &r), &store)
            .is_none());
        assert_eq!(s.core().info().nacked.len(), 2);
        store.set("a", config("fixed"));
        let r = s.change(&store).expect("a fixed");
        assert!(s.req(ack(&["a", "b"], &r), &store).is_none());
        let info = s.core().info();
        assert!(info.nacked.is_empty(), "{:?}", info.nacked);
        assert_eq!(info.acked.get("a"), store.version_of("a").as_ref());
    }

    #[test]
    fn stale_nonce_is_ignored_entirely() {
        let store = ResourceStore::new();
        store.set("a", config("1"));
        store.set("b", config("1"));
        let mut s = stream();
        let r1 = s.req(request(&["a"], "", ""), &store).unwrap();
        assert!(s.req(request(&["a", "b"], "", "0"), &store).is_none());
        assert!(s.core().awaiting_ack(), "a stale request is no ACK");
        assert_eq!(
            s.core().info().subscribed,
            vec!["a".to_string()],
            "nor a subscription change"
        );
        let r2 = s
            .req(ack(&["a", "b"], &r1), &store)
            .expect("b added with the ACK");
        assert_eq!(r2.resources.len(), 2);
    }

    #[test]
    fn unsubscribe_stops_updates_and_resubscribe_resends() {
        let store = ResourceStore::new();
        store.set("a", config("1"));
        store.set("b", config("1"));
        let mut s = stream();
        let r1 = s.req(request(&["a", "b"], "", ""), &store).unwrap();
        assert!(
            s.req(ack(&["a"], &r1), &store).is_none(),
            "dropping b sends nothing"
        );
        store.set("b", config("2"));
        assert!(s.change(&store).is_none(), "b is no longer subscribed");
        let r2 = s
            .req(request(&["a", "b"], &r1.version_info, &r1.nonce), &store)
            .expect("b again");
        assert_eq!(r2.resources.len(), 2);
    }

    #[test]
    fn removal_alone_sends_nothing() {
        let store = ResourceStore::new();
        store.set("a", config("1"));
        let mut s = stream();
        let r1 = s.req(request(&["a"], "", ""), &store).unwrap();
        s.req(ack(&["a"], &r1), &store);
        store.remove("a");
        assert!(s.change(&store).is_none());
        store.set("a", config("1"));
        assert!(s.change(&store).is_some(), "re-added under a new version");
    }

    #[test]
    fn reconnect_with_current_version_gets_nothing() {
        let store = ResourceStore::new();
        store.set("a", config("1"));
        let version = store.version_of("a").unwrap();
        let mut s = stream();
        assert!(s.req(request(&["a"], &version, "7"), &store).is_none());
        assert_eq!(s.core().info().acked.get("a"), Some(&version));
        store.set("a", config("2"));
        assert!(s.change(&store).is_some());
    }

    #[test]
    fn ads_ignores_other_types_and_requires_a_type() {
        let store = ResourceStore::new();
        store.set("a", config("1"));
        let mut s = SotwStream::new(1, Api::Ads);
        let cds = DiscoveryRequest {
            type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
            ..request(&[], "", "")
        };
        assert!(s.req(cds, &store).is_none());
        let untyped = DiscoveryRequest {
            type_url: String::new(),
            ..request(&["a"], "", "")
        };
        assert!(s.req(untyped, &store).is_none());
        assert!(s.req(request(&["a"], "", ""), &store).is_some());
    }

    #[test]
    fn fetch_returns_what_exists() {
        let store = ResourceStore::new();
        store.set("a", config("1"));
        let resp = fetch_response(&["a".into(), "zz".into()], &store);
        assert_eq!(resp.resources.len(), 1);
        assert_eq!(resp.nonce, "");
    }

    /// A subscription keeps the store's own string of each resource it has (the one a replaced
    /// resource keeps), and text of its own only for names the store does not have.
    #[test]
    fn a_subscription_keeps_the_stores_strings() {
        let store = ResourceStore::new();
        store.set("a", config("1"));
        let mut s = stream();
        let resp = s.req(request(&["missing", "a"], "", ""), &store).unwrap();
        let stored = |name: &str| store.lookup(&[name]).pop().unwrap().name.clone();
        let kept = |s: &SotwStream, name: &str| s.core().subscribed.get(name).unwrap().clone();
        assert!(Arc::ptr_eq(&kept(&s, "a"), &stored("a")));
        assert_eq!(&*kept(&s, "missing"), "missing");
        s.req(
            request(&["missing", "a"], &resp.version_info, &resp.nonce),
            &store,
        );
        store.set("a", config("2"));
        let resp = s.change(&store).expect("pushed");
        assert!(Arc::ptr_eq(&kept(&s, "a"), &stored("a")), "replaced");
        // A new subscription: the names read from the store again.
        store.set("missing", config("1"));
        s.req(
            request(&["a", "missing"], &resp.version_info, &resp.nonce),
            &store,
        );
        assert!(Arc::ptr_eq(&kept(&s, "a"), &stored("a")));
        assert_eq!(s.core().info().subscribed, ["a", "missing"]);
    }
}
