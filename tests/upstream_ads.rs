//! Validates the upstream xDS server of the proxy tests (`tests/support/upstream_ads.py`, driven by
//! `tests/support/upstream.rs`) against the crate's own tonic xDS client: SotW and delta on ADS,
//! plain ECDS, raw malformed resources, nested `Any`s given as JSON, dropped streams and a restart
//! on the same port.
//!
//! Skips with a loud message when its Python venv is missing (fails under `CI=true`); see
//! `scripts/install-test-deps.sh`. "Nothing more is sent" is checked with a sentinel update that
//! must be the next message on the stream.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use envoy_types::pb::envoy::config::listener::v3::filter::ConfigType;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use envoy_types::pb::envoy::extensions::wasm::v3::plugin_config::Vm;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::google::protobuf::{value::Kind, Struct};
use prost::Message;
use serde_json::{json, Value};
use tokio::time::timeout;
use wasm_ecds::xds::client::{self, DeltaSession, Session, SotwSession};
use wasm_ecds::xds::Api;

use support::upstream::{
    ecds_resource, raw_resource, Upstream, ECDS_TYPE_URL, LDS_TYPE_URL, TYPED_STRUCT_TYPE_URL,
    WASM_TYPE_URL,
};

/// Bounds every wait; reached only when something hangs.
const WAIT: Duration = Duration::from_secs(30);

const A: &str = "extensions.istio.io/wasmplugin/default.a";
const B: &str = "extensions.istio.io/wasmplugin/default.b";
const C: &str = "extensions.istio.io/wasmplugin/default.c";

/// `udpa.type.v1.TypedStruct`, which envoy-types does not generate.
#[derive(Clone, PartialEq, Message)]
struct TypedStruct {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(message, optional, tag = "2")]
    value: Option<Struct>,
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn string_value(payload: &str) -> Value {
    json!({"@type": "type.googleapis.com/google.protobuf.StringValue", "value": payload})
}

fn listener_json(name: &str) -> Value {
    json!({
        "@type": LDS_TYPE_URL,
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10000}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "ingress",
                "rds": {"route_config_name": "routes", "config_source": {"ads": {}}},
                "http_filters": [
                    {"name": "rbac", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"}},
                    {"name": "envoy.filters.http.router", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
                ]
            }
        }]}]
    })
}

async fn recv<Req, Resp>(session: &mut Session<Req, Resp>) -> Resp {
    timeout(WAIT, session.recv())
        .await
        .expect("no response in time")
        .expect("stream failed")
        .expect("stream ended")
}

fn payload(config: &envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig) -> String {
    let any = config.typed_config.as_ref().unwrap();
    // StringValue: field 1, length-delimited; payloads here are short.
    String::from_utf8(any.value[2..].to_vec()).unwrap()
}

#[tokio::test]
async fn sotw_ads_serves_lds_wildcard_and_ecds_by_name_then_pushes_and_records_nacks() {
    let Some(up) = Upstream::start() else { return };
    up.set(LDS_TYPE_URL, "l1", vec![listener_json("ingress")]);
    let ecds = |v: &str| {
        vec![
            ecds_resource(A, string_value(&format!("a-{v}"))),
            ecds_resource(B, string_value(&format!("b-{v}"))),
        ]
    };
    up.set(ECDS_TYPE_URL, "e1", ecds("1"));

    let channel = client::connect(up.addr()).await.unwrap();
    let lds_first = DiscoveryRequest {
        type_url: LDS_TYPE_URL.into(),
        ..client::sotw_subscribe("node-1", &[])
    };
    let mut s = SotwSession::open(channel, Api::Ads, lds_first)
        .await
        .unwrap();
    let lds = recv(&mut s).await;
    assert_eq!(
        (lds.type_url.as_str(), lds.version_info.as_str()),
        (LDS_TYPE_URL, "l1")
    );
    let listener = Listener::decode(lds.resources[0].value.as_slice()).unwrap();
    assert_eq!(listener.name, "ingress");
    let filter = listener.filter_chains[0].filters[0].clone();
    let ConfigType::TypedConfig(hcm) = filter.config_type.unwrap() else {
        panic!("no typed_config")
    };
    let hcm = HttpConnectionManager::decode(hcm.value.as_slice()).unwrap();
    let filters: Vec<&str> = hcm.http_filters.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(filters, ["rbac", "envoy.filters.http.router"]);

    let sub = names(&[A]);
    s.send(DiscoveryRequest {
        type_url: LDS_TYPE_URL.into(),
        ..client::sotw_ack(&[], &lds)
    })
    .await
    .unwrap();
    s.send(DiscoveryRequest {
        node: None,
        ..client::sotw_subscribe("node-1", &sub)
    })
    .await
    .unwrap();
    let first = recv(&mut s).await;
    assert_eq!(
        (first.type_url.as_str(), first.version_info.as_str()),
        (ECDS_TYPE_URL, "e1")
    );
    let configs = client::decode_sotw(&first).unwrap();
    assert_eq!(configs.len(), 1, "only the subscribed name");
    assert_eq!(
        (configs[0].name.as_str(), payload(&configs[0]).as_str()),
        (A, "a-1")
    );
    s.send(client::sotw_ack(&sub, &first)).await.unwrap();
    let open = up.wait_event(WAIT, |e| e["event"] == "stream_open").await;
    assert_eq!(
        (open["api"].as_str(), open["node"].as_str()),
        (Some("ads-sotw"), Some("node-1"))
    );
    up.wait_event(WAIT, |e| {
        e["event"] == "request" && e["response_nonce"] == first.nonce
    })
    .await;

    // A change is pushed with the new version; the NACK is recorded and nothing is resent.
    up.set(ECDS_TYPE_URL, "e2", ecds("2"));
    let pushed = recv(&mut s).await;
    assert_eq!(
        (pushed.type_url.as_str(), pushed.version_info.as_str()),
        (ECDS_TYPE_URL, "e2")
    );
    assert_eq!(payload(&client::decode_sotw(&pushed).unwrap()[0]), "a-2");
    assert_ne!(pushed.nonce, first.nonce);
    let mark = up.mark();
    s.send(client::sotw_nack(&sub, "e1", &pushed, "bad config"))
        .await
        .unwrap();
    let nack = up
        .wait_event_after(mark, WAIT, |e| {
            e["event"] == "request" && e["response_nonce"] == pushed.nonce
        })
        .await;
    assert_eq!(nack["version_info"], "e1");
    assert_eq!(nack["error_detail"]["message"], "bad config");
    assert_eq!(nack["error_detail"]["code"], client::NACK_CODE);
    up.set(
        LDS_TYPE_URL,
        "l2",
        vec![listener_json("ingress"), listener_json("second")],
    );
    let sentinel = recv(&mut s).await;
    assert_eq!(
        (sentinel.type_url.as_str(), sentinel.version_info.as_str()),
        (LDS_TYPE_URL, "l2")
    );
    assert_eq!(sentinel.resources.len(), 2, "wildcard: every listener");
    // The push's own `response` event may be reported after the client already has the
    // response (the server writes its event line after sending): only another one is a resend.
    let resent = |e: &Value| {
        e["event"] == "response" && e["type_url"] == ECDS_TYPE_URL && e["nonce"] != pushed.nonce
    };
    assert!(
        !up.events_since(mark).iter().any(resent),
        "{:#?}",
        up.events()
    );
    assert_eq!(up.responses(ECDS_TYPE_URL).len(), 2);
}

#[tokio::test]
async fn delta_ads_sends_changed_resources_with_their_versions_and_removals() {
    let Some(up) = Upstream::start() else { return };
    let with_version = |mut r: Value, v: &str| {
        r["@version"] = v.into();
        r
    };
    up.set(
        ECDS_TYPE_URL,
        "v1",
        vec![
            with_version(ecds_resource(A, string_value("a")), "a1"),
            with_version(ecds_resource(B, string_value("b")), "b1"),
        ],
    );
    let channel = client::connect(up.addr()).await.unwrap();
    let known = HashMap::from([(B.to_string(), "b1".to_string())]);
    let first = client::delta_subscribe("node-d", &names(&[A, B, C]), known);
    let mut s = DeltaSession::open(channel, Api::Ads, first).await.unwrap();
    let r = recv(&mut s).await;
    assert_eq!(r.system_version_info, "v1");
    let sent: Vec<(&str, &str)> = r
        .resources
        .iter()
        .map(|r| (r.name.as_str(), r.version.as_str()))
        .collect();
    assert_eq!(sent, [(A, "a1")], "B is known at b1");
    assert_eq!(r.removed_resources, [C], "C does not exist");
    assert_eq!(client::decode_delta(&r).unwrap()[0].name, A);
    s.send(client::delta_ack(&r)).await.unwrap();
    let request = up
        .wait_event(WAIT, |e| {
            e["event"] == "request" && e["response_nonce"].as_str().is_some_and(|n| !n.is_empty())
        })
        .await;
    assert_eq!(request["api"], "ads-delta");
    let subscribe = up.requests(ECDS_TYPE_URL)[0].clone();
    assert_eq!(subscribe["initial_resource_versions"], json!({B: "b1"}));

    // A unchanged, B changed, then A removed.
    up.set(
        ECDS_TYPE_URL,
        "v2",
        vec![
            with_version(ecds_resource(A, string_value("a")), "a1"),
            with_version(ecds_resource(B, string_value("b2")), "b2"),
        ],
    );
    let r = recv(&mut s).await;
    let sent: Vec<(&str, &str)> = r
        .resources
        .iter()
        .map(|r| (r.name.as_str(), r.version.as_str()))
        .collect();
    assert_eq!(
        (r.system_version_info.as_str(), sent),
        ("v2", vec![(B, "b2")])
    );
    assert!(r.removed_resources.is_empty());
    s.send(client::delta_ack(&r)).await.unwrap();
    up.set(
        ECDS_TYPE_URL,
        "v3",
        vec![with_version(ecds_resource(B, string_value("b2")), "b2")],
    );
    let r = recv(&mut s).await;
    assert_eq!(r.system_version_info, "v3");
    assert!(r.resources.is_empty());
    assert_eq!(r.removed_resources, [A]);
}

#[tokio::test]
async fn plain_ecds_serves_sotw_and_delta() {
    let Some(up) = Upstream::start() else { return };
    up.set(
        ECDS_TYPE_URL,
        "1",
        vec![ecds_resource(A, string_value("hello"))],
    );
    let channel = client::connect(up.addr()).await.unwrap();
    let sub = names(&[A]);
    let first = client::sotw_subscribe("n", &sub);
    let mut sotw = SotwSession::open(channel.clone(), Api::Ecds, first)
        .await
        .unwrap();
    let r = recv(&mut sotw).await;
    assert_eq!(
        (
            r.version_info.as_str(),
            payload(&client::decode_sotw(&r).unwrap()[0]).as_str()
        ),
        ("1", "hello")
    );
    let first = client::delta_subscribe("n", &sub, HashMap::new());
    let mut delta = DeltaSession::open(channel, Api::Ecds, first).await.unwrap();
    let r = recv(&mut delta).await;
    assert_eq!(
        (
            r.resources[0].name.as_str(),
            r.resources[0].version.as_str()
        ),
        (A, "1")
    );
    // The server reports its events on its own output, read beside the client's streams: the
    // delta stream's `stream_open` may be read after the client already has its response.
    up.wait_event(WAIT, |e| {
        e["event"] == "stream_open" && e["api"] == "ecds-delta"
    })
    .await;
    let apis: Vec<Value> = up
        .events()
        .into_iter()
        .filter(|e| e["event"] == "stream_open")
        .map(|e| e["api"].clone())
        .collect();
    assert_eq!(apis, [json!("ecds-sotw"), json!("ecds-delta")]);
}

#[tokio::test]
async fn raw_resources_arrive_with_their_exact_bytes() {
    let Some(up) = Upstream::start() else { return };
    let garbage = [0xff, 0xff, 0xff, 0xff, 0x0f];
    up.set(
        ECDS_TYPE_URL,
        "1",
        vec![
            raw_resource(A, ECDS_TYPE_URL, &garbage),
            raw_resource(B, "type.googleapis.com/google.protobuf.Empty", b""),
        ],
    );
    let channel = client::connect(up.addr()).await.unwrap();
    let first = client::sotw_subscribe("n", &names(&[A, B]));
    let mut s = SotwSession::open(channel, Api::Ads, first).await.unwrap();
    let r = recv(&mut s).await;
    let got: Vec<(&str, &[u8])> = r
        .resources
        .iter()
        .map(|a| (a.type_url.as_str(), a.value.as_slice()))
        .collect();
    assert_eq!(
        got,
        [
            (ECDS_TYPE_URL, &garbage[..]),
            ("type.googleapis.com/google.protobuf.Empty", &b""[..])
        ]
    );
    assert!(client::decode_sotw(&r).is_err());
}

#[tokio::test]
async fn wasm_configs_given_as_json_arrive_intact_direct_and_in_a_typed_struct() {
    let Some(up) = Upstream::start() else { return };
    let wasm = json!({
        "config": {
            "name": "hello",
            "root_id": "root",
            "configuration": string_value("{\"greeting\":\"hi\"}"),
            "vm_config": {"runtime": "envoy.wasm.runtime.v8",
                          "code": {"local": {"inline_bytes": "AGFzbQEAAAA="}}}
        }
    });
    let mut direct = wasm.clone();
    direct["@type"] = WASM_TYPE_URL.into();
    let typed_struct =
        json!({"@type": TYPED_STRUCT_TYPE_URL, "type_url": WASM_TYPE_URL, "value": wasm});
    up.set(
        ECDS_TYPE_URL,
        "1",
        vec![ecds_resource(A, direct), ecds_resource(B, typed_struct)],
    );
    let channel = client::connect(up.addr()).await.unwrap();
    let first = client::sotw_subscribe("n", &names(&[A, B]));
    let mut s = SotwSession::open(channel, Api::Ecds, first).await.unwrap();
    let configs = client::decode_sotw(&recv(&mut s).await).unwrap();

    let any = configs[0].typed_config.as_ref().unwrap();
    assert_eq!(any.type_url, WASM_TYPE_URL);
    let plugin = Wasm::decode(any.value.as_slice()).unwrap().config.unwrap();
    assert_eq!(
        (plugin.name.as_str(), plugin.root_id.as_str()),
        ("hello", "root")
    );
    let configuration = plugin.configuration.unwrap();
    assert_eq!(
        configuration.type_url,
        "type.googleapis.com/google.protobuf.StringValue"
    );
    assert_eq!(&configuration.value[2..], b"{\"greeting\":\"hi\"}");
    let Vm::VmConfig(vm) = plugin.vm.unwrap();
    assert_eq!(vm.runtime, "envoy.wasm.runtime.v8");
    let code = format!("{:?}", vm.code.unwrap());
    assert!(code.contains("[0, 97, 115, 109, 1, 0, 0, 0]"), "{code}");

    let any = configs[1].typed_config.as_ref().unwrap();
    assert_eq!(any.type_url, TYPED_STRUCT_TYPE_URL);
    let ts = TypedStruct::decode(any.value.as_slice()).unwrap();
    assert_eq!(ts.type_url, WASM_TYPE_URL);
    let config = &ts.value.unwrap().fields["config"];
    let Some(Kind::StructValue(config)) = &config.kind else {
        panic!("config: {config:?}")
    };
    assert_eq!(
        config.fields["name"].kind,
        Some(Kind::StringValue("hello".into()))
    );
    let Some(Kind::StructValue(configuration)) = &config.fields["configuration"].kind else {
        panic!("configuration")
    };
    // In a Struct "@type" is only a key: it stays as given.
    assert_eq!(
        configuration.fields["@type"].kind,
        Some(Kind::StringValue(
            "type.googleapis.com/google.protobuf.StringValue".into()
        ))
    );
}

#[tokio::test]
async fn refused_commands_dropped_streams_and_a_restart_on_the_same_port() {
    let Some(up) = Upstream::start() else { return };
    let bogus = json!({"@type": ECDS_TYPE_URL, "name": A, "bogus": 1});
    let message = up.try_set(ECDS_TYPE_URL, "1", vec![bogus]).unwrap_err();
    assert!(message.contains("bogus"), "{message}");

    up.set(
        ECDS_TYPE_URL,
        "1",
        vec![ecds_resource(A, string_value("x"))],
    );
    let channel = client::connect(up.addr()).await.unwrap();
    let mut s = SotwSession::open(channel, Api::Ads, client::sotw_subscribe("n", &names(&[A])))
        .await
        .unwrap();
    recv(&mut s).await;
    up.drop_streams();
    let status = match timeout(WAIT, s.recv()).await.unwrap() {
        Err(wasm_ecds::xds::Error::Status(status)) => status,
        other => panic!("expected UNAVAILABLE, got {other:?}"),
    };
    assert_eq!(status.code(), tonic::Code::Unavailable);
    up.wait_event(WAIT, |e| e["event"] == "stream_close").await;

    let port = up.port();
    up.kill();
    drop(up);
    let up = Upstream::start_on(port).unwrap();
    assert_eq!(up.port(), port);
    up.set(
        ECDS_TYPE_URL,
        "2",
        vec![ecds_resource(A, string_value("y"))],
    );
    let channel = client::connect(up.addr()).await.unwrap();
    let first = client::delta_subscribe("n", &names(&[A]), HashMap::new());
    let mut s = DeltaSession::open(channel, Api::Ads, first).await.unwrap();
    assert_eq!(recv(&mut s).await.system_version_info, "2");
}
