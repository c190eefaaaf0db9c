//! The per-stream state of an incremental stream (`DeltaExtensionConfigs`, and the ECDS part of
//! `DeltaAggregatedResources`), free of I/O like `sotw.rs`.
//!
//! Rules (<https://www.envoyproxy.io/docs/envoy/latest/api-docs/xds_protocol>, "Incremental xDS"):
//! - Subscriptions change by `resource_names_subscribe` / `resource_names_unsubscribe`, applied from
//!   every request whatever its nonce (ignoring one would lose it). Wildcard-free: `*` is an ordinary
//!   name and an empty first subscription means no resources.
//! - The stream remembers, per subscribed name, the version the client holds: seeded from
//!   `initial_resource_versions` on the first request (a resource the client already holds at the
//!   current version is not sent again) and updated by every response. Subscribing again to a
//!   subscribed name, or after unsubscribing, forgets it, so the resource is sent again.
//! - A response carries the subscribed resources whose version differs from what the client holds,
//!   and in `removed_resources` the subscribed names the client holds that the store no longer has
//!   (go-control-plane `LinearCache` does the same for `initial_resource_versions`). A subscribed
//!   name that never existed gets nothing until it appears (Envoy waits under
//!   `initial_fetch_timeout`).
//! - `system_version_info` (which Envoy shows as the filter's `version_text`) is the SotW version of
//!   the resources in the response, so a one-resource response carries that resource's version
//!   under every protocol; a response that only removes carries the store revision.
//! - At most one response is outstanding, as in `sotw.rs`. ACK/NACK count only for the latest
//!   nonce; a NACKed version counts as held, so it is not resent in a loop.

use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;

use super::encode::DeltaReply;
use super::store::{Api, Protocol, ResourceStore, StreamEvent, StreamEventKind, StreamId};
use super::stream::{set, Held, Outstanding, StreamCore};

/// An incremental stream (module docs).
#[derive(Debug)]
pub(crate) struct DeltaStream {
    core: StreamCore,
}

impl DeltaStream {
    pub(crate) fn new(id: StreamId, api: Api) -> Self {
        DeltaStream {
            core: StreamCore::new(id, api, Protocol::Delta),
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
    pub(crate) fn on_request(&mut self, req: DeltaDiscoveryRequest, store: &ResourceStore) -> bool {
        let Some(first) = self
            .core
            .begin_request(req.node.as_ref(), &req.type_url, store)
        else {
            return false;
        };
        if !req.response_nonce.is_empty() {
            if self
                .core
                .outstanding
                .as_ref()
                .is_some_and(|o| o.nonce.is(&req.response_nonce))
            {
                let response = self.core.outstanding.take().expect("checked just above");
                self.on_reply(response, &req, store);
            } else {
                tracing::debug!(parent: &self.core.span, nonce = %req.response_nonce, "stale nonce: not an ACK or NACK");
            }
        }
        let mut new = Vec::new();
        for name in req.resource_names_subscribe {
            if self.core.subscribed.contains(name.as_str()) {
                // Explicitly asked again: the client may have dropped it.
                self.core.held.remove(name.as_str());
            } else {
                new.push(name);
            }
        }
        if !new.is_empty() {
            // The store's own strings where it has the resources (`ResourceStore::intern`).
            self.core.subscribed.extend(store.intern(new));
        }
        for name in &req.resource_names_unsubscribe {
            self.core.subscribed.remove(name.as_str());
            self.core.held.remove(name.as_str());
            self.core.acked.remove(name.as_str());
            self.core.nacked.remove(name);
        }
        if first {
            // Only meaningful on the first request of a stream (xDS protocol, "Incremental xDS").
            for (name, version) in req.initial_resource_versions {
                if self.core.subscribed.contains(name.as_str()) {
                    let (name, held) = (Arc::<str>::from(name), Held::from_text(&version));
                    self.core.acked.insert(name.clone(), held.clone());
                    self.core.held.insert(name, held);
                }
            }
        }
        self.push(store)
    }

    fn on_reply(
        &mut self,
        response: Outstanding,
        req: &DeltaDiscoveryRequest,
        store: &ResourceStore,
    ) {
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
                self.core.ack_entries(&response, true);
                for name in &response.removed {
                    self.core.acked.remove(name.as_str());
                    self.core.nacked.remove(name);
                }
                store.emit(|| self.event(StreamEventKind::Acked(response.delivery())));
                self.core.give_back(response.entries);
            }
        }
    }

    /// Handles a store change; returns whether it made a response to send.
    pub(crate) fn on_change(&mut self, store: &ResourceStore) -> bool {
        self.push(store)
    }

    /// The response awaiting its ACK, to encode.
    pub(crate) fn reply(&self) -> Option<DeltaReply<'_>> {
        self.core.outstanding.as_ref().map(DeltaReply)
    }

    fn push(&mut self, store: &ResourceStore) -> bool {
        if self.core.outstanding.is_some() {
            return false;
        }
        let mut changed = self.core.lookup_subscribed(store);
        let removed: Vec<String> = self
            .core
            .held
            .keys()
            .filter(|n| {
                self.core.subscribed.contains(&***n)
                    && changed.binary_search_by(|e| e.name.cmp(n)).is_err()
            })
            .map(|n| n.to_string())
            .collect();
        changed.retain(|e| !self.core.held.get(&*e.name).is_some_and(|h| h.is(e.id())));
        if changed.is_empty() && removed.is_empty() {
            self.core.give_back(changed);
            return false;
        }
        if !self
            .core
            .admit(changed.iter().map(|e| e.config().len()).sum(), store)
        {
            self.core.give_back(changed);
            return false;
        }
        let nonce = self.core.next_nonce();
        let revision = if changed.is_empty() {
            store.revision()
        } else {
            0
        };
        for e in &changed {
            set(&mut self.core.held, &e.name, e.id());
        }
        for name in &removed {
            self.core.held.remove(name.as_str());
        }
        let response = Outstanding::delta(nonce, changed, removed, revision);
        tracing::debug!(
            parent: &self.core.span,
            nonce = %response.nonce,
            resources = response.entries.len(),
            removed = response.removed.len(),
            "push"
        );
        store.count_push();
        store.emit(|| self.event(StreamEventKind::Pushed(response.delivery())));
        self.core.outstanding = Some(response);
        true
    }
}

impl AsRef<StreamCore> for DeltaStream {
    fn as_ref(&self) -> &StreamCore {
        &self.core
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::store::tests::config;
    use crate::xds::ECDS_TYPE_URL;
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse;
    use envoy_types::pb::google::rpc::Status as RpcStatus;

    /// The state machine's replies, as the proxy decodes them.
    impl DeltaStream {
        fn req(
            &mut self,
            req: DeltaDiscoveryRequest,
            store: &ResourceStore,
        ) -> Option<DeltaDiscoveryResponse> {
            let pushed = self.on_request(req, store);
            pushed.then(|| self.reply().expect("pushed").decode())
        }

        fn change(&mut self, store: &ResourceStore) -> Option<DeltaDiscoveryResponse> {
            let pushed = self.on_change(store);
            pushed.then(|| self.reply().expect("pushed").decode())
        }
    }

    fn subscribe(names: &[&str]) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            node: Some(Node {
                id: "node-1".into(),
                ..Default::default()
            }),
            type_url: ECDS_TYPE_URL.into(),
            resource_names_subscribe: names.iter().map(|n| n.to_string()).collect(),
            ..Default::default()
        }
    }

    fn ack(resp: &DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: ECDS_TYPE_URL.into(),
            response_nonce: resp.nonce.clone(),
            ..Default::default()
        }
    }

    fn names(resp: &DeltaDiscoveryResponse) -> Vec<&str> {
        resp.resources.iter().map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn subscribe_sends_existing_then_updates_only_changes() {
        let store = ResourceStore::new();
        store.set("a", config("1"));
        store.set("b", config("1"));
        let mut s = DeltaStream::new(1, Api::Ecds);
        let r1 = s.req(subscribe(&["a", "b", "missing"]), &store).unwrap();
        assert_eq!(names(&r1), ["a", "b"]);
        assert_eq!(r1.resources[0].version, store.version_of("a").unwrap());
        assert!(
            r1.removed_resources.is_empty(),
            "a name that never existed is not reported removed"
        );
        assert!(s.req(ack(&r1), &store).is_none());
        store.set("b", config("2"));
        let r2 = s.change(&store).unwrap();
        assert_eq!(names(&r2), ["b"]);
        assert_eq!(r2.system_version_info, store.version_of("b").unwrap());
    }

    /// Names subscribed to are kept as the store's own strings where it has the resources.
    #[test]
    fn subscribed_names_are_the_stores_strings() {
        let store = ResourceStore::new();
        store.set("a", config("1"));
        let mut s = DeltaStream::new(1, Api::Ecds);
        s.req(subscribe(&["a", "missing", "a"]), &store).unwrap();
        let stored = store.lookup(["a"]).pop().unwrap().name.clone();
        assert!(Arc::ptr_eq(s.core().subscribed.get("a").unwrap(), &stored));
        assert_eq!(s.core().info().subscribed, ["a", "missing"]);
    }

    #[test]
    fn initial_resource_versions_skip_what_the_client_holds() {
        let store = ResourceStore::new();
        store.set("a", config("1"));
        store.set("b", config("1"));
        let mut req = subscribe(&["a", "b", "gone"]);
        req.initial_resource_versions
            .insert("a".into(), store.version_of("a").unwrap());
        req.initial_resource_versions
            .insert("b".into(), "0-stale".into());
        req.initial_resource_versions
            .insert("gone".into(), "3-abc".into());
        let mut s = DeltaStream::new(1, Api::Ecds);
        let r = s.req(req, &store).unwrap();
        assert_eq!(names(&r), ["b"]);
        assert_eq!(r.removed_resources, ["gone"]);
    }

    /// The versions a proxy says it holds are kept as it wrote them: one naming the current
    /// version in another spelling is another version (sent again), and the per-proxy view
    /// shows each as its text until the push replaces it.
    #[test]
    fn initial_versions_match_only_as_written() {
        let store = ResourceStore::new();
        store.set("a", config("1"));
        store.set("b", config("1"));
        let (a, b) = (
            store.version_of("a").unwrap(),
            store.version_of("b").unwrap(),
        );
        let shouting = b.to_uppercase();
        let padded = format!("0{a}");
        assert_ne!(shouting, b, "the digest has a letter");
        let mut req = subscribe(&["a", "b"]);
        req.initial_resource_versions
            .insert("a".into(), padded.clone());
        req.initial_resource_versions
            .insert("b".into(), shouting.clone());
        let mut s = DeltaStream::new(1, Api::Ecds);
        let r = s.req(req, &store).unwrap();
        assert_eq!(
            names(&r),
            ["a", "b"],
            "neither spelling is the version served"
        );
        let info = s.core().info();
        assert_eq!(info.sent.get("a"), Some(&a));
        assert_eq!(info.acked.get("a"), Some(&padded), "as the proxy wrote it");
        assert_eq!(info.acked.get("b"), Some(&shouting));
        assert!(s.req(ack(&r), &store).is_none());
        let info = s.core().info();
        assert_eq!(
            (info.acked.get("a"), info.acked.get("b")),
            (Some(&a), Some(&b))
        );
    }

    #[test]
    fn removal_and_unsubscribe() {
        let store = ResourceStore::new();
        store.set("a", config("1"));
        store.set("b", config("1"));
        let mut s = DeltaStream::new(1, Api::Ecds);
        let r1 = s.req(subscribe(&["a", "b"]), &store).unwrap();
        s.req(ack(&r1), &store);
        store.remove("a");
        let r2 = s.change(&store).unwrap();
        assert!(r2.resources.is_empty());
        assert_eq!(r2.removed_resources, ["a"]);
        s.req(ack(&r2), &store);
        assert!(s.change(&store).is_none(), "removal reported once");
        let unsub = DeltaDiscoveryRequest {
            resource_names_unsubscribe: vec!["b".into()],
            ..subscribe(&[])
        };
        assert!(s.req(unsub, &store).is_none());
        store.set("b", config("2"));
        assert!(s.change(&store).is_none(), "b unsubscribed");
        let r3 = s
            .req(subscribe(&["b"]), &store)
            .expect("resubscribe sends b");
        assert_eq!(names(&r3), ["b"]);
    }

    #[test]
    fn nack_is_not_resent_and_stale_nonce_is_no_ack() {
        let store = ResourceStore::new();
        store.set("a", config("1"));
        let mut s = DeltaStream::new(1, Api::Ecds);
        let r1 = s.req(subscribe(&["a"]), &store).unwrap();
        let stale = DeltaDiscoveryRequest {
            response_nonce: "99".into(),
            ..ack(&r1)
        };
        assert!(s.req(stale, &store).is_none());
        assert!(s.core().awaiting_ack());
        let nack = DeltaDiscoveryRequest {
            error_detail: Some(RpcStatus {
                code: 13,
                message: "bad".into(),
                details: vec![],
            }),
            ..ack(&r1)
        };
        assert!(s.req(nack, &store).is_none());
        assert!(s.change(&store).is_none());
        assert_eq!(store.stats().nacks, 1);
        assert_eq!(store.stats().acks, 0);
    }

    #[test]
    fn subscription_with_stale_nonce_still_applies() {
        let store = ResourceStore::new();
        store.set("a", config("1"));
        store.set("b", config("1"));
        let mut s = DeltaStream::new(1, Api::Ecds);
        let r1 = s.req(subscribe(&["a"]), &store).unwrap();
        let mut more = subscribe(&["b"]);
        more.response_nonce = "0".into();
        assert!(s.req(more, &store).is_none(), "deferred until the ACK");
        let r2 = s.req(ack(&r1), &store).unwrap();
        assert_eq!(names(&r2), ["b"]);
    }

    #[test]
    fn ads_ignores_other_types() {
        let store = ResourceStore::new();
        store.set("a", config("1"));
        let mut s = DeltaStream::new(1, Api::Ads);
        let other = DeltaDiscoveryRequest {
            type_url: "type.googleapis.com/envoy.config.listener.v3.Listener".into(),
            ..subscribe(&["a"])
        };
        assert!(s.req(other, &store).is_none());
        assert!(s.core().info().subscribed.is_empty());
        assert!(s.req(subscribe(&["a"]), &store).is_some());
    }
}
