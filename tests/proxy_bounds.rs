//! `proxy`'s xDS port under `serve`'s bounds (docs/behavior.md §11, "Bounds of the xDS port"):
//! streams beyond `--xds-max-streams` refused, a flood of names or a huge node (or an oversized
//! request) ending only its own stream, with the statuses and the `wasm_ecds_xds_limit_count`
//! series of `serve`'s port, and nothing of it forwarded upstream; responses Envoy has not
//! answered held to `--xds-send-budget` and reset at `--xds-ack-timeout`. The upstream is the Python xDS
//! server of tests/support/upstream.rs; the crate's tonic client stands in for Envoy. Every wait
//! is bounded by a generous timeout that only turns a hang into a failure.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value as PbValue};
use serde_json::{json, Value};
use tokio::time::timeout;
use wasm_ecds::config::Config;
use wasm_ecds::net::PortOptions;
use wasm_ecds::proxy::UpstreamOptions;
use wasm_ecds::serve::ServerHandle;
use wasm_ecds::xds::client::{self, DeltaSession, SotwSession};
use wasm_ecds::xds::{Api, Error, ServeOptions, StreamLimits};

use support::upstream::{Upstream, LDS_TYPE_URL};

const WAIT: Duration = Duration::from_secs(30);

struct Proxy {
    handle: ServerHandle,
    _cache: tempfile::TempDir,
}

impl Proxy {
    async fn start(upstream: SocketAddr, limits: StreamLimits) -> Proxy {
        let cache = tempfile::tempdir().unwrap();
        let config = Config {
            cache_dir: cache.path().to_path_buf(),
            ..Config::default()
        };
        let upstream = UpstreamOptions {
            address: upstream.to_string(),
            ..Default::default()
        };
        let options = ServeOptions {
            limits,
            ..ServeOptions::default()
        };
        let handle = support::serve::in_process_with(
            config,
            Vec::new(),
            Some(upstream),
            PortOptions::default(),
            options,
            None,
        )
        .await;
        Proxy {
            handle,
            _cache: cache,
        }
    }

    async fn ads(&self, first: DiscoveryRequest) -> Result<SotwSession, Error> {
        let channel = client::connect(self.handle.xds_address).await.unwrap();
        SotwSession::open(channel, Api::Ads, first).await
    }

    /// An ADS stream subscribed to LDS (wildcard) that got the upstream's listeners.
    async fn lds(&self, node: &str) -> SotwSession {
        let mut s = self.ads(lds_subscribe(node)).await.expect("stream opens");
        let r = next(&mut s).await.expect("LDS served");
        assert_eq!(r.type_url, LDS_TYPE_URL);
        s
    }

    fn metric(&self, series: &str) -> f64 {
        let samples = self.handle.shared.metrics.samples();
        samples.get(series).copied().unwrap_or(0.0)
    }

    fn limit_count(&self, limit: &str) -> f64 {
        self.metric(&format!("wasm_ecds_xds_limit_count{{limit=\"{limit}\"}}"))
    }

    /// A well-behaved Envoy still gets the upstream's listeners through the proxy, and its ACK
    /// reaches the upstream.
    async fn assert_still_serves(&self, up: &Upstream) {
        let mut s = self
            .ads(lds_subscribe("still"))
            .await
            .expect("stream opens");
        let r = next(&mut s).await.expect("LDS served");
        assert_eq!(r.type_url, LDS_TYPE_URL);
        s.send(ack(&r)).await.unwrap();
        let nonce = r.nonce.clone();
        up.wait_event(WAIT, |e| {
            e["event"] == "request" && e["response_nonce"] == nonce.as_str()
        })
        .await;
    }
}

fn ack(r: &DiscoveryResponse) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: r.type_url.clone(),
        version_info: r.version_info.clone(),
        response_nonce: r.nonce.clone(),
        ..Default::default()
    }
}

fn lds_subscribe(node: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: LDS_TYPE_URL.into(),
        ..client::sotw_subscribe(node, &[])
    }
}

fn listener() -> Value {
    json!({"@type": LDS_TYPE_URL, "name": "in",
           "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10000}}})
}

/// [`support::next_or_status`] within this file's wait.
async fn next(s: &mut SotwSession) -> Result<DiscoveryResponse, tonic::Status> {
    support::next_or_status(s, WAIT).await
}

/// The status ending a stream (or refusing it outright).
async fn refusal(opened: Result<SotwSession, Error>) -> tonic::Status {
    match opened {
        Err(Error::Status(status)) => status,
        Err(e) => panic!("want a status, got {e}"),
        // tonic may hand back the stream before the status arrives.
        Ok(mut s) => loop {
            match next(&mut s).await {
                Ok(_) => continue,
                Err(status) => break status,
            }
        },
    }
}

fn limits() -> StreamLimits {
    StreamLimits {
        max_request_size: 64 * 1024,
        max_streams: 3,
        max_resource_names: 100,
        max_node_size: 1024,
        ..StreamLimits::default()
    }
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    timeout(WAIT, async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_beyond_the_limit_are_refused_until_one_closes() {
    let Some(up) = Upstream::start() else { return };
    up.set(LDS_TYPE_URL, "l1", vec![listener()]);
    let proxy = Proxy::start(up.addr(), limits()).await;
    let mut open = Vec::new();
    for i in 0..3 {
        open.push(proxy.lds(&format!("p{i}")).await);
    }
    let status = refusal(proxy.ads(lds_subscribe("one-too-many")).await).await;
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert_eq!(
        status.message(),
        "3 xds streams are open, the most this server accepts (--xds-max-streams)"
    );
    assert_eq!(proxy.limit_count("streams"), 1.0);
    // The open streams keep working: a new listener version reaches them.
    up.set(LDS_TYPE_URL, "l2", vec![listener()]);
    for s in &mut open {
        let r = next(s).await.expect("pushed");
        assert_eq!(r.version_info, "l2");
    }
    open.pop();
    wait_until("a stream slot", || {
        proxy.metric("wasm_ecds_proxy_streams") < 3.0
    })
    .await;
    proxy.assert_still_serves(&up).await;
    proxy.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_names_ends_only_that_stream_and_never_goes_upstream() {
    let Some(up) = Upstream::start() else { return };
    up.set(LDS_TYPE_URL, "l1", vec![listener()]);
    let proxy = Proxy::start(up.addr(), limits()).await;
    let mut good = proxy.lds("good").await;

    // SotW: 101 names in one request.
    let names: Vec<String> = (0..101).map(|i| format!("name-{i}")).collect();
    let flood = proxy
        .ads(DiscoveryRequest {
            type_url: LDS_TYPE_URL.into(),
            ..client::sotw_subscribe("flood", &names)
        })
        .await;
    let status = refusal(flood).await;
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert_eq!(
        status.message(),
        "xds stream closed: 101 resource names subscribed, more than 100 (--xds-max-resource-names)"
    );
    // SotW: names add up over types (each type's last request), 60 + 50.
    let s = proxy
        .ads(DiscoveryRequest {
            type_url: LDS_TYPE_URL.into(),
            ..client::sotw_subscribe("types", &names[..60])
        })
        .await
        .unwrap();
    s.send(DiscoveryRequest {
        node: None,
        ..client::sotw_subscribe("types", &names[..50])
    })
    .await
    .unwrap();
    let status = refusal(Ok(s)).await;
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("110 resource names"),
        "{status:?}"
    );

    // Delta: names add up over requests.
    let channel = client::connect(proxy.handle.xds_address).await.unwrap();
    let mut d = DeltaSession::open(
        channel,
        Api::Ecds,
        client::delta_subscribe("flood-delta", &names[..60], Default::default()),
    )
    .await
    .unwrap();
    d.send(client::delta_update(&names[60..], &[]))
        .await
        .unwrap();
    let ended = loop {
        match timeout(WAIT, d.recv()).await.expect("a status") {
            Ok(Some(_)) => continue,
            other => break other,
        }
    };
    match ended {
        Err(Error::Status(status)) => {
            assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
            assert!(
                status.message().contains("--xds-max-resource-names"),
                "{status:?}"
            );
        }
        other => panic!("want RESOURCE_EXHAUSTED, got {other:?}"),
    }
    assert_eq!(proxy.limit_count("resource_names"), 3.0);
    // The good stream was never disturbed.
    up.set(LDS_TYPE_URL, "l2", vec![listener()]);
    assert_eq!(next(&mut good).await.expect("pushed").version_info, "l2");
    // None of the refused requests went upstream (checked after the good stream's push, which
    // came later): no request there named more than the 60 names that were allowed.
    let most = (up.events().iter())
        .filter(|e| e["event"] == "request")
        .map(|e| {
            let sotw = e["resource_names"].as_array().map_or(0, Vec::len);
            let delta = e["resource_names_subscribe"].as_array().map_or(0, Vec::len);
            sotw.max(delta)
        })
        .max();
    assert!(most.unwrap_or(0) <= 60, "{most:?}");
    proxy.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_node_or_request_is_refused_and_others_keep_working() {
    let Some(up) = Upstream::start() else { return };
    up.set(LDS_TYPE_URL, "l1", vec![listener()]);
    let proxy = Proxy::start(up.addr(), limits()).await;
    let mut good = proxy.lds("good").await;

    let mut fields = BTreeMap::new();
    fields.insert(
        "BLOB".to_string(),
        PbValue {
            kind: Some(Kind::StringValue("m".repeat(4096))),
        },
    );
    let huge_node = DiscoveryRequest {
        node: Some(Node {
            id: "meta".into(),
            metadata: Some(Struct {
                fields: fields.into_iter().collect(),
            }),
            ..Default::default()
        }),
        type_url: LDS_TYPE_URL.into(),
        ..client::sotw_subscribe("meta", &["huge-node-marker".to_string()])
    };
    let status = refusal(proxy.ads(huge_node).await).await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with("xds stream closed: node is ")
            && status
                .message()
                .ends_with("bytes encoded, more than 1024 (--xds-max-node-size)"),
        "{status:?}"
    );
    assert_eq!(proxy.limit_count("node_size"), 1.0);
    assert!(
        !(up.events().iter()).any(|e| e["resource_names"].to_string().contains("huge-node-marker")),
        "the huge node's request never went upstream"
    );

    // A request larger than --xds-max-request-size (64 KiB): decoding refuses it.
    let big = "x".repeat(100 * 1024);
    let status = refusal(proxy.ads(lds_subscribe(&big)).await).await;
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("(--xds-max-request-size)"),
        "{status:?}"
    );
    assert_eq!(proxy.limit_count("request_size"), 1.0);

    up.set(LDS_TYPE_URL, "l2", vec![listener()]);
    assert_eq!(next(&mut good).await.expect("pushed").version_info, "l2");
    proxy.assert_still_serves(&up).await;
    proxy.handle.shutdown().await;
}

/// A response Envoy reads but never answers resets its stream at `--xds-ack-timeout` (counted as
/// `ack_timeout`), which gives its share of the send budget back; others keep being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_response_resets_its_stream_at_the_ack_timeout() {
    let Some(up) = Upstream::start() else { return };
    up.set(LDS_TYPE_URL, "l1", vec![listener()]);
    let proxy = Proxy::start(
        up.addr(),
        StreamLimits {
            ack_timeout: Duration::from_secs(1),
            ..limits()
        },
    )
    .await;
    let mut silent = proxy.lds("silent").await;
    assert!(proxy.metric("wasm_ecds_xds_unread_bytes") > 0.0);
    // No ACK: the proxy resets the stream (dropping whatever Envoy left unread).
    let status = next(&mut silent).await.expect_err("reset");
    assert_ne!(status.code(), tonic::Code::Ok, "{status:?}");
    assert_eq!(proxy.limit_count("ack_timeout"), 1.0);
    wait_until("the budget given back", || {
        proxy.metric("wasm_ecds_xds_unread_bytes") == 0.0
    })
    .await;
    proxy.assert_still_serves(&up).await;
    proxy.handle.shutdown().await;
}

/// With a budget smaller than one response, a second Envoy's response waits (counted once as
/// `send_budget`) until the first Envoy answers its own; then it is sent, and once answered
/// nothing is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_send_budget_holds_responses_until_envoy_answers() {
    let Some(up) = Upstream::start() else { return };
    up.set(LDS_TYPE_URL, "l1", vec![listener()]);
    let proxy = Proxy::start(
        up.addr(),
        StreamLimits {
            send_budget: 1,
            ..limits()
        },
    )
    .await;
    let mut first = proxy.ads(lds_subscribe("first")).await.unwrap();
    let r1 = next(&mut first).await.expect("served");
    let mut second = proxy.ads(lds_subscribe("second")).await.unwrap();
    wait_until("the second response to wait", || {
        proxy.limit_count("send_budget") == 1.0
    })
    .await;
    // The first response took the whole budget (a response larger than the budget goes out
    // when nothing else is unanswered).
    assert_eq!(proxy.metric("wasm_ecds_xds_unread_bytes"), 1.0);
    // The first Envoy's ACK gives the budget back: the second Envoy gets its response.
    first.send(ack(&r1)).await.unwrap();
    let r2 = next(&mut second)
        .await
        .expect("served once the first answered");
    assert_eq!(r2.version_info, "l1");
    second.send(ack(&r2)).await.unwrap();
    wait_until("nothing unanswered", || {
        proxy.metric("wasm_ecds_xds_unread_bytes") == 0.0
    })
    .await;
    assert_eq!(proxy.limit_count("send_budget"), 1.0);
    proxy.handle.shutdown().await;
}
