//! xDS protocol tests: the real server on 127.0.0.1 port 0, in process, driven by tonic clients
//! (`wasm_ecds::xds::client`). Every wait is bounded by a generous timeout that only turns a hang
//! into a failure; nothing here measures speed. "No message arrives" is checked under tokio's paused
//! clock (the runtime advances virtual time only when every task is idle), followed by a sentinel
//! update that must be the next message.
//!
//! Length: one test per protocol rule over one in-process server fixture.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use envoy_types::pb::google::protobuf::Any;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use wasm_ecds::xds::client::{self, DeltaSession, SotwSession};
use wasm_ecds::xds::{
    serve_with_options, Api, Error, ResourceStore, ServeOptions, StreamEvent, StreamEventKind,
    ECDS_TYPE_URL,
};

/// Bounds every wait; reached only when something hangs.
const WAIT: Duration = Duration::from_secs(30);

const A: &str = "extensions.istio.io/wasmplugin/default.a";
const B: &str = "extensions.istio.io/wasmplugin/default.b";

fn config(payload: &str) -> TypedExtensionConfig {
    TypedExtensionConfig {
        name: String::new(),
        typed_config: Some(Any {
            type_url: "type.googleapis.com/google.protobuf.StringValue".into(),
            value: payload.as_bytes().to_vec(),
        }),
    }
}

fn payload(c: &TypedExtensionConfig) -> String {
    String::from_utf8(c.typed_config.as_ref().unwrap().value.clone()).unwrap()
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

struct Server {
    addr: SocketAddr,
    store: ResourceStore,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), Error>>,
}

impl Server {
    /// Starts the server; `keepalive: false` for tests under the paused clock.
    async fn start(keepalive: bool) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let store = ResourceStore::new();
        let (tx, rx) = oneshot::channel::<()>();
        let options = if keepalive {
            ServeOptions::default()
        } else {
            ServeOptions {
                keepalive_interval: None,
                keepalive_timeout: None,
                ..ServeOptions::default()
            }
        };
        let task = tokio::spawn(serve_with_options(
            listener,
            store.clone(),
            options,
            async {
                let _ = rx.await;
            },
        ));
        Server {
            addr,
            store,
            shutdown: Some(tx),
            task,
        }
    }

    async fn channel(&self) -> tonic::transport::Channel {
        within(client::connect(self.addr)).await.expect("connect")
    }

    async fn sotw(&self, api: Api, node: &str, subscribe: &[&str]) -> SotwSession {
        within(SotwSession::open(
            self.channel().await,
            api,
            client::sotw_subscribe(node, &names(subscribe)),
        ))
        .await
        .expect("open sotw stream")
    }

    async fn delta(&self, api: Api, first: DeltaDiscoveryRequest) -> DeltaSession {
        within(DeltaSession::open(self.channel().await, api, first))
            .await
            .expect("open delta stream")
    }
}

async fn within<T>(f: impl Future<Output = T>) -> T {
    timeout(WAIT, f)
        .await
        .expect("timed out: the server did not answer")
}

async fn next<Req, Resp>(s: &mut client::Session<Req, Resp>) -> Resp {
    within(s.recv())
        .await
        .expect("rpc error")
        .expect("stream ended")
}

/// Waits for the first event matching `pred`.
async fn event(
    events: &mut broadcast::Receiver<StreamEvent>,
    pred: impl Fn(&StreamEvent) -> bool,
) -> StreamEvent {
    within(async {
        loop {
            let e = events.recv().await.expect("event feed");
            if pred(&e) {
                return e;
            }
        }
    })
    .await
}

fn is_ack(e: &StreamEvent) -> bool {
    matches!(e.kind, StreamEventKind::Acked(_))
}

#[tokio::test]
async fn sotw_initial_subscribe_gets_the_resource() {
    let server = Server::start(true).await;
    server.store.set(A, config("v1"));
    server.store.set(B, config("other"));
    let mut s = server.sotw(Api::Ecds, "node-1", &[A]).await;
    let r = next(&mut s).await;
    assert_eq!(r.type_url, ECDS_TYPE_URL);
    assert!(!r.nonce.is_empty());
    assert_eq!(r.version_info, server.store.version_of(A).unwrap());
    let configs = client::decode_sotw(&r).unwrap();
    assert_eq!(configs.len(), 1, "only the subscribed resource");
    assert_eq!(configs[0].name, A);
    assert_eq!(payload(&configs[0]), "v1");
    let stats = server.store.stats();
    assert_eq!(stats.connected_streams, 1);
    assert_eq!(stats.pushes, 1);
}

#[tokio::test]
async fn sotw_ack_then_update_pushes_the_new_version() {
    let server = Server::start(true).await;
    let mut events = server.store.events();
    server.store.set(A, config("v1"));
    let mut s = server.sotw(Api::Ecds, "node-1", &[A]).await;
    let r1 = next(&mut s).await;
    s.send(client::sotw_ack(&names(&[A]), &r1)).await.unwrap();
    let acked = event(&mut events, is_ack).await;
    assert_eq!(acked.node_id, "node-1");
    let v2 = server.store.set(A, config("v2")).unwrap();
    let r2 = next(&mut s).await;
    assert_eq!(r2.version_info, v2);
    assert_ne!(r2.nonce, r1.nonce);
    assert_eq!(payload(&client::decode_sotw(&r2).unwrap()[0]), "v2");
    assert_eq!(server.store.stats().acks, 1);
    let info = &server.store.streams()[0];
    assert_eq!(info.acked.get(A), Some(&r1.version_info));
    assert_eq!(info.sent.get(A), Some(&v2));
}

#[tokio::test]
async fn sotw_identical_set_is_not_pushed() {
    let server = Server::start(true).await;
    server.store.set(A, config("v1"));
    let mut s = server.sotw(Api::Ecds, "node-1", &[A]).await;
    let r1 = next(&mut s).await;
    s.send(client::sotw_ack(&names(&[A]), &r1)).await.unwrap();
    assert_eq!(server.store.set(A, config("v1")), None);
    // Sentinel: the next message is the next real change, not a repeat of v1.
    server.store.set(A, config("v2"));
    let r2 = next(&mut s).await;
    assert_eq!(payload(&client::decode_sotw(&r2).unwrap()[0]), "v2");
}

#[tokio::test(start_paused = true)]
async fn sotw_nack_is_recorded_and_not_resent() {
    let server = Server::start(false).await;
    let mut events = server.store.events();
    server.store.set(A, config("good"));
    let mut s = server.sotw(Api::Ecds, "node-7", &[A]).await;
    let r1 = next(&mut s).await;
    s.send(client::sotw_ack(&names(&[A]), &r1)).await.unwrap();
    event(&mut events, is_ack).await;

    server.store.set(A, config("bad"));
    let r2 = next(&mut s).await;
    s.send(client::sotw_nack(
        &names(&[A]),
        &r1.version_info,
        &r2,
        "Unable to create Wasm plugin",
    ))
    .await
    .unwrap();
    let nacked = event(&mut events, |e| {
        matches!(e.kind, StreamEventKind::Nacked { .. })
    })
    .await;
    let StreamEventKind::Nacked { delivery, message } = nacked.kind else {
        unreachable!()
    };
    assert_eq!(nacked.node_id, "node-7");
    assert_eq!(message, "Unable to create Wasm plugin");
    assert_eq!(delivery.version, r2.version_info);
    assert_eq!(delivery.resources[0].name, A);
    assert_eq!(server.store.stats().nacks, 1);
    assert_eq!(
        server.store.streams()[0].acked.get(A),
        Some(&r1.version_info),
        "last accepted kept"
    );

    // No resend: nothing arrives while the (virtual) clock runs a whole minute.
    assert!(
        timeout(Duration::from_secs(60), s.recv()).await.is_err(),
        "the NACKed version was sent again"
    );
    // And the next message is the next change.
    let v3 = server.store.set(A, config("fixed")).unwrap();
    let r3 = next(&mut s).await;
    assert_eq!(r3.version_info, v3);
    assert_eq!(server.store.stats().nacks, 1);
}

#[tokio::test]
async fn sotw_stale_nonce_is_ignored() {
    let server = Server::start(true).await;
    let mut events = server.store.events();
    server.store.set(A, config("a1"));
    server.store.set(B, config("b1"));
    let mut s = server.sotw(Api::Ecds, "node-1", &[A]).await;
    let r1 = next(&mut s).await;
    // A request carrying a nonce that is not the latest: neither an ACK nor a subscription change.
    let stale = DiscoveryRequest {
        response_nonce: "stale".into(),
        ..client::sotw_ack(&names(&[A, B]), &r1)
    };
    s.send(stale).await.unwrap();
    s.send(client::sotw_ack(&names(&[A]), &r1)).await.unwrap();
    event(&mut events, is_ack).await;
    assert_eq!(
        server.store.stats().acks,
        1,
        "the stale request was not an ACK"
    );
    assert_eq!(
        server.store.streams()[0].subscribed,
        names(&[A]),
        "nor a subscription change"
    );
    server.store.set(A, config("a2"));
    let r2 = next(&mut s).await;
    let got: Vec<String> = client::decode_sotw(&r2)
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(got, names(&[A]));
}

#[tokio::test]
async fn sotw_unsubscribe_stops_updates() {
    let server = Server::start(true).await;
    let mut events = server.store.events();
    server.store.set(A, config("a1"));
    server.store.set(B, config("b1"));
    let mut s = server.sotw(Api::Ecds, "node-1", &[A, B]).await;
    let r1 = next(&mut s).await;
    assert_eq!(r1.resources.len(), 2);
    // ACK while dropping B.
    s.send(client::sotw_ack(&names(&[A]), &r1)).await.unwrap();
    event(&mut events, is_ack).await;
    server.store.set(B, config("b2"));
    // Sentinel: the next message is A's change, carrying A only.
    server.store.set(A, config("a2"));
    let r2 = next(&mut s).await;
    let got: Vec<(String, String)> = client::decode_sotw(&r2)
        .unwrap()
        .iter()
        .map(|c| (c.name.clone(), payload(c)))
        .collect();
    assert_eq!(got, vec![(A.to_string(), "a2".to_string())]);
}

#[tokio::test]
async fn sotw_missing_resource_is_sent_when_it_appears() {
    let server = Server::start(true).await;
    let mut events = server.store.events();
    let mut s = server.sotw(Api::Ecds, "node-1", &[A]).await;
    event(&mut events, |e| {
        matches!(e.kind, StreamEventKind::Connected)
    })
    .await;
    assert_eq!(server.store.stats().pushes, 0);
    server.store.set(A, config("late"));
    let r = next(&mut s).await;
    assert_eq!(payload(&client::decode_sotw(&r).unwrap()[0]), "late");
}

#[tokio::test]
async fn delta_subscribe_and_updates_carry_only_changes() {
    let server = Server::start(true).await;
    let mut events = server.store.events();
    server.store.set(A, config("a1"));
    let mut s = server
        .delta(
            Api::Ecds,
            client::delta_subscribe("node-d", &names(&[A, B]), HashMap::new()),
        )
        .await;
    let r1 = next(&mut s).await;
    assert_eq!(r1.type_url, ECDS_TYPE_URL);
    assert_eq!(r1.resources.len(), 1);
    assert_eq!(r1.resources[0].name, A);
    assert_eq!(r1.resources[0].version, server.store.version_of(A).unwrap());
    assert!(r1.removed_resources.is_empty());
    assert_eq!(r1.system_version_info, server.store.version_of(A).unwrap());
    s.send(client::delta_ack(&r1)).await.unwrap();
    event(&mut events, is_ack).await;

    server.store.set(B, config("b1"));
    let r2 = next(&mut s).await;
    assert_eq!(
        r2.resources
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>(),
        [B]
    );
    s.send(client::delta_ack(&r2)).await.unwrap();
    server.store.set(A, config("a2"));
    let r3 = next(&mut s).await;
    assert_eq!(
        r3.resources
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>(),
        [A]
    );
    assert_eq!(payload(&client::decode_delta(&r3).unwrap()[0]), "a2");
}

#[tokio::test]
async fn delta_initial_resource_versions_are_not_resent() {
    let server = Server::start(true).await;
    server.store.set(A, config("a1"));
    server.store.set(B, config("b1"));
    let held = HashMap::from([(A.to_string(), server.store.version_of(A).unwrap())]);
    let mut s = server
        .delta(
            Api::Ecds,
            client::delta_subscribe("node-d", &names(&[A, B]), held),
        )
        .await;
    let r = next(&mut s).await;
    assert_eq!(
        r.resources
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>(),
        [B]
    );
}

#[tokio::test]
async fn delta_removal_gives_removed_resources() {
    let server = Server::start(true).await;
    let mut events = server.store.events();
    server.store.set(A, config("a1"));
    server.store.set(B, config("b1"));
    let mut s = server
        .delta(
            Api::Ecds,
            client::delta_subscribe("node-d", &names(&[A, B]), HashMap::new()),
        )
        .await;
    let r1 = next(&mut s).await;
    s.send(client::delta_ack(&r1)).await.unwrap();
    event(&mut events, is_ack).await;
    assert!(server.store.remove(A));
    let r2 = next(&mut s).await;
    assert!(r2.resources.is_empty());
    assert_eq!(r2.removed_resources, names(&[A]));
}

#[tokio::test]
async fn delta_unsubscribe_stops_updates() {
    let server = Server::start(true).await;
    let mut events = server.store.events();
    server.store.set(A, config("a1"));
    server.store.set(B, config("b1"));
    let mut s = server
        .delta(
            Api::Ecds,
            client::delta_subscribe("node-d", &names(&[A, B]), HashMap::new()),
        )
        .await;
    let r1 = next(&mut s).await;
    let unsubscribe = DeltaDiscoveryRequest {
        response_nonce: r1.nonce.clone(),
        ..client::delta_update(&[], &names(&[B]))
    };
    s.send(unsubscribe).await.unwrap();
    event(&mut events, is_ack).await;
    server.store.set(B, config("b2"));
    server.store.set(A, config("a2"));
    let r2 = next(&mut s).await;
    assert_eq!(
        r2.resources
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>(),
        [A]
    );
}

#[tokio::test(start_paused = true)]
async fn delta_nack_is_recorded_and_not_resent() {
    let server = Server::start(false).await;
    let mut events = server.store.events();
    server.store.set(A, config("bad"));
    let mut s = server
        .delta(
            Api::Ecds,
            client::delta_subscribe("node-d", &names(&[A]), HashMap::new()),
        )
        .await;
    let r1 = next(&mut s).await;
    s.send(client::delta_nack(
        &r1,
        "Failed to parse corrupted Wasm module",
    ))
    .await
    .unwrap();
    event(&mut events, |e| {
        matches!(e.kind, StreamEventKind::Nacked { .. })
    })
    .await;
    assert_eq!(server.store.stats().nacks, 1);
    assert!(
        timeout(Duration::from_secs(60), s.recv()).await.is_err(),
        "the NACKed version was sent again"
    );
    server.store.set(A, config("good"));
    let r2 = next(&mut s).await;
    assert_eq!(payload(&client::decode_delta(&r2).unwrap()[0]), "good");
}

#[tokio::test]
async fn ads_sotw_serves_ecds_and_ignores_other_types() {
    let server = Server::start(true).await;
    server.store.set(A, config("a1"));
    let cds = DiscoveryRequest {
        node: Some(client::node("node-ads")),
        type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
        ..Default::default()
    };
    let mut s = within(SotwSession::open(server.channel().await, Api::Ads, cds))
        .await
        .unwrap();
    s.send(client::sotw_subscribe("node-ads", &names(&[A])))
        .await
        .unwrap();
    // The first message answers the ECDS request: the CDS request got nothing.
    let r = next(&mut s).await;
    assert_eq!(r.type_url, ECDS_TYPE_URL);
    assert_eq!(client::decode_sotw(&r).unwrap()[0].name, A);
    s.send(client::sotw_ack(&names(&[A]), &r)).await.unwrap();
    let v2 = server.store.set(A, config("a2")).unwrap();
    assert_eq!(next(&mut s).await.version_info, v2);
    assert_eq!(server.store.streams()[0].api, Api::Ads);
}

#[tokio::test]
async fn ads_delta_serves_ecds_and_ignores_other_types() {
    let server = Server::start(true).await;
    server.store.set(A, config("a1"));
    let lds = DeltaDiscoveryRequest {
        node: Some(client::node("node-ads")),
        type_url: "type.googleapis.com/envoy.config.listener.v3.Listener".into(),
        resource_names_subscribe: names(&[A]),
        ..Default::default()
    };
    let mut s = server.delta(Api::Ads, lds).await;
    s.send(client::delta_subscribe(
        "node-ads",
        &names(&[A]),
        HashMap::new(),
    ))
    .await
    .unwrap();
    let r = next(&mut s).await;
    assert_eq!(r.type_url, ECDS_TYPE_URL);
    assert_eq!(r.resources.len(), 1);
    s.send(client::delta_ack(&r)).await.unwrap();
    server.store.remove(A);
    assert_eq!(next(&mut s).await.removed_resources, names(&[A]));
}

#[tokio::test]
async fn fetch_returns_the_requested_resources_now() {
    let server = Server::start(true).await;
    server.store.set(A, config("a1"));
    server.store.set(B, config("b1"));
    let mut ecds = client::ecds_client(server.channel().await);
    let req = client::sotw_subscribe("node-f", &names(&[A, "missing"]));
    let resp = within(ecds.fetch_extension_configs(req))
        .await
        .unwrap()
        .into_inner();
    let got = client::decode_sotw(&resp).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].name, A);
    assert_eq!(resp.version_info, server.store.version_of(A).unwrap());

    let wrong = DiscoveryRequest {
        type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
        ..Default::default()
    };
    let err = within(ecds.fetch_extension_configs(wrong))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn disconnect_is_reported_and_reconnect_starts_a_new_stream() {
    let server = Server::start(true).await;
    let mut events = server.store.events();
    server.store.set(A, config("a1"));
    let mut s = server.sotw(Api::Ecds, "node-r", &[A]).await;
    let r1 = next(&mut s).await;
    drop(s);
    event(&mut events, |e| {
        matches!(e.kind, StreamEventKind::Disconnected)
    })
    .await;
    assert_eq!(server.store.stats().connected_streams, 0);
    assert!(server.store.streams().is_empty());

    // A reconnect declaring the version it holds is not sent it again; later changes are.
    let mut events = server.store.events();
    let resume = DiscoveryRequest {
        version_info: r1.version_info.clone(),
        ..client::sotw_subscribe("node-r", &names(&[A]))
    };
    let mut s = within(SotwSession::open(server.channel().await, Api::Ecds, resume))
        .await
        .unwrap();
    event(&mut events, |e| {
        matches!(e.kind, StreamEventKind::Connected)
    })
    .await;
    let v2 = server.store.set(A, config("a2")).unwrap();
    assert_eq!(next(&mut s).await.version_info, v2);
    assert_eq!(server.store.stats().streams_total, 2);
}

#[tokio::test]
async fn shutdown_closes_streams_and_returns() {
    let mut server = Server::start(true).await;
    server.store.set(A, config("a1"));
    let mut s = server.sotw(Api::Ecds, "node-s", &[A]).await;
    next(&mut s).await;
    server.shutdown.take().unwrap().send(()).unwrap();
    let end = within(s.recv()).await;
    assert!(matches!(end, Ok(None) | Err(_)), "stream ended: {end:?}");
    within(&mut server.task)
        .await
        .expect("join")
        .expect("serve");
    assert_eq!(server.store.stats().connected_streams, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_sotw_streams_each_receive_one_update() {
    const STREAMS: usize = 1000;
    const CONNECTIONS: usize = 20;
    let server = Server::start(true).await;
    let v1 = server.store.set(A, config("v1")).unwrap();
    let mut channels = Vec::new();
    for _ in 0..CONNECTIONS {
        channels.push(server.channel().await);
    }
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(STREAMS);
    let mut tasks = Vec::new();
    for i in 0..STREAMS {
        let channel = channels[i % CONNECTIONS].clone();
        let ready = ready_tx.clone();
        let v1 = v1.clone();
        tasks.push(tokio::spawn(async move {
            let first = client::sotw_subscribe(&format!("node-{i}"), &names(&[A]));
            let mut s = SotwSession::open(channel, Api::Ecds, first)
                .await
                .expect("open");
            let r1 = s.recv().await.expect("rpc").expect("first response");
            assert_eq!(r1.version_info, v1);
            s.send(client::sotw_ack(&names(&[A]), &r1))
                .await
                .expect("ack");
            ready.send(()).await.unwrap();
            let r2 = s.recv().await.expect("rpc").expect("update");
            payload(&client::decode_sotw(&r2).unwrap()[0])
        }));
    }
    drop(ready_tx);
    timeout(Duration::from_secs(120), async {
        for _ in 0..STREAMS {
            ready_rx.recv().await.expect("a stream task failed");
        }
    })
    .await
    .expect("all streams opened");
    assert_eq!(server.store.stats().connected_streams, STREAMS as u64);
    server.store.set(A, config("v2"));
    let results = timeout(Duration::from_secs(120), async {
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("stream task"));
        }
        out
    })
    .await
    .expect("every stream received the update");
    assert!(results.iter().all(|p| p == "v2"));
    assert_eq!(server.store.stats().pushes, 2 * STREAMS as u64);
}
