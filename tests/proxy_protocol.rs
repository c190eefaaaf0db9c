//! `proxy` mode against a real upstream that is not wasm-ecds (the Python xDS server of
//! `tests/support/upstream_ads.py`) and real HTTP module servers, with the crate's tonic client in
//! Envoy's place: conversion of remote-load configs (direct and TypedStruct), other types passed
//! through, NACKs upstream for unreadable resources, fallbacks pushed again once a background
//! retry succeeds, Always and IfNotPresent on resource-version bumps, delta, upstream restarts and
//! one download shared by many streams.
//!
//! Over 600 lines: one protocol scenario per test, all sharing the setup at the top.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig;
use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
use envoy_types::pb::envoy::extensions::wasm::v3::plugin_config::Vm;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use prost::Message;
use serde_json::{json, Value};
use tokio::time::timeout;
use wasm_ecds::config::{Config, Delivery};
use wasm_ecds::convert::{decode_delivered, Code, Delivered};
use wasm_ecds::proxy::UpstreamOptions;
use wasm_ecds::serve::ServerHandle;
use wasm_ecds::xds::client::{self, SotwSession};
use wasm_ecds::xds::Api;

use support::faults::{ModuleServer, RawReply, RawServer, Route};
use support::upstream::{ecds_resource, Upstream, ECDS_TYPE_URL, LDS_TYPE_URL};

const WAIT: Duration = Duration::from_secs(30);
const AUTH: &str = "istio.basic_auth";
const WASM: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";

struct Proxy {
    handle: ServerHandle,
    _cache: tempfile::TempDir,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        Self::start_with(upstream, |_| {}).await
    }

    async fn start_with(upstream: SocketAddr, tune: impl FnOnce(&mut Config)) -> Proxy {
        let cache = tempfile::tempdir().unwrap();
        let mut config = Config {
            cache_dir: cache.path().to_path_buf(),
            delivery: Delivery::File,
            http_request_max_retries: 1,
            ..Config::default()
        };
        tune(&mut config);
        let handle = support::serve::in_process(
            config,
            Vec::new(),
            Some(UpstreamOptions {
                address: upstream.to_string(),
                ..Default::default()
            }),
        )
        .await;
        Proxy {
            handle,
            _cache: cache,
        }
    }

    async fn ads(&self, first: DiscoveryRequest) -> SotwSession {
        let channel = client::connect(self.handle.xds_address).await.unwrap();
        SotwSession::open(channel, Api::Ads, first).await.unwrap()
    }

    fn metric(&self, series: &str) -> f64 {
        self.handle
            .shared
            .metrics
            .samples()
            .get(series)
            .copied()
            .unwrap_or(0.0)
    }
}

/// A remote-load config as Istio's control plane sends it: TypedStruct-wrapped or direct.
fn remote(url: &str, sha: &str, env: Value, typed_struct: bool, fail_open: bool) -> Value {
    let config = json!({
        "root_id": "auth_root",
        "failure_policy": if fail_open { "FAIL_OPEN" } else { "FAIL_CLOSED" },
        "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": "{\"users\":1}"},
        "vm_config": {"vm_id": "auth", "runtime": "envoy.wasm.runtime.v8",
            "environment_variables": {"key_values": env},
            "code": {"remote": {"http_uri": {"uri": url, "cluster": "_", "timeout": "10s"}, "sha256": sha}}}
    });
    let typed = if typed_struct {
        json!({"@type": "type.googleapis.com/udpa.type.v1.TypedStruct", "type_url": WASM, "value": {"config": config}})
    } else {
        json!({"@type": WASM, "config": config})
    };
    ecds_resource(AUTH, typed)
}

fn listener() -> Value {
    json!({"@type": LDS_TYPE_URL, "name": "in",
           "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10000}}})
}

async fn recv(s: &mut SotwSession) -> DiscoveryResponse {
    timeout(WAIT, s.recv())
        .await
        .expect("no response in time")
        .expect("stream failed")
        .expect("stream ended")
}

fn first_config(r: &DiscoveryResponse) -> TypedExtensionConfig {
    TypedExtensionConfig::decode(r.resources[0].value.as_slice()).unwrap()
}

/// Subscribes an ADS stream to LDS (wildcard) and the auth resource; returns the ECDS response.
async fn subscribe(proxy: &Proxy) -> (SotwSession, DiscoveryResponse) {
    let mut s = proxy
        .ads(DiscoveryRequest {
            type_url: LDS_TYPE_URL.into(),
            ..client::sotw_subscribe("n1", &[])
        })
        .await;
    let lds = recv(&mut s).await;
    assert_eq!(lds.type_url, LDS_TYPE_URL);
    s.send(DiscoveryRequest {
        node: None,
        ..client::sotw_subscribe("n1", &[AUTH.to_string()])
    })
    .await
    .unwrap();
    let ecds = recv(&mut s).await;
    assert_eq!(ecds.type_url, ECDS_TYPE_URL);
    (s, ecds)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converts_remote_configs_keeping_the_rest_and_passes_other_types() {
    let Some(up) = Upstream::start() else { return };
    let module = support::proxy_wasm_test_module();
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&module));
    let http = ModuleServer::start(vec![("/auth.wasm", Route::Body(module.clone()))]).await;
    let env = json!({"ISTIO_META_WASM_IMAGE_PULL_POLICY": "IfNotPresent",
                     "ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION": "7", "KEEP": "me"});
    for typed_struct in [true, false] {
        up.set(LDS_TYPE_URL, "l1", vec![listener()]);
        let url = http.url("/auth.wasm");
        up.set(
            ECDS_TYPE_URL,
            "e1",
            vec![remote(&url, &sha, env.clone(), typed_struct, false)],
        );
        let proxy = Proxy::start(up.addr()).await;
        let (s, ecds) = subscribe(&proxy).await;
        assert_eq!(ecds.version_info, "e1");
        let config = first_config(&ecds);
        assert_eq!(config.name, AUTH);
        let Some(Delivered::Module(Code::File(path))) = decode_delivered(&config) else {
            panic!("not converted to a file: {config:?}")
        };
        assert_eq!(std::fs::read(&path).unwrap(), module);
        let tc = config.typed_config.unwrap();
        assert_eq!(
            tc.type_url, WASM,
            "TypedStruct unwrapped to the real message"
        );
        let pc = Wasm::decode(tc.value.as_slice()).unwrap().config.unwrap();
        assert_eq!(pc.root_id, "auth_root");
        assert!(pc.configuration.is_some());
        let Some(Vm::VmConfig(vm)) = pc.vm else {
            panic!()
        };
        assert_eq!(vm.vm_id, "auth");
        let env = vm.environment_variables.unwrap().key_values;
        assert_eq!(env.len(), 1, "ISTIO_META_* stripped: {env:?}");
        assert_eq!(env["KEEP"], "me");
        // The ACK reaches the upstream as Envoy sent it.
        s.send(client::sotw_ack(&[AUTH.to_string()], &ecds))
            .await
            .unwrap();
        let nonce = ecds.nonce.clone();
        up.wait_event(WAIT, |e| {
            e["event"] == "request"
                && e["type_url"] == ECDS_TYPE_URL
                && e["response_nonce"] == nonce.as_str()
                && e["version_info"] == "e1"
                && e["error_detail"].is_null()
        })
        .await;
        assert_eq!(
            proxy.metric(r#"istio_agent_wasm_config_conversion_count{result="success"}"#),
            1.0
        );
        proxy.handle.shutdown().await;
    }
    assert_eq!(http.hits("/auth.wasm"), 2, "one pull per fresh cache");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_resources_are_nacked_upstream_and_never_reach_envoy() {
    let Some(up) = Upstream::start() else { return };
    let module = support::proxy_wasm_test_module();
    let http = ModuleServer::start(vec![("/auth.wasm", Route::Body(module))]).await;
    let url = http.url("/auth.wasm");
    up.set(LDS_TYPE_URL, "l1", vec![listener()]);
    up.set(
        ECDS_TYPE_URL,
        "e1",
        vec![remote(&url, "", json!({}), true, false)],
    );
    let proxy = Proxy::start(up.addr()).await;
    let (mut s, ecds) = subscribe(&proxy).await;
    s.send(client::sotw_ack(&[AUTH.to_string()], &ecds))
        .await
        .unwrap();
    let nonce = ecds.nonce.clone();
    up.wait_event(WAIT, |e| {
        e["event"] == "request"
            && e["response_nonce"] == nonce.as_str()
            && e["version_info"] == "e1"
    })
    .await;
    // A garbage TypedExtensionConfig: NACKed upstream with the version Envoy accepted.
    up.set_raw(ECDS_TYPE_URL, "e2", AUTH, &[0xff, 0xff, 0x01]);
    let nack = up
        .wait_event(WAIT, |e| {
            e["event"] == "request"
                && e["type_url"] == ECDS_TYPE_URL
                && !e["error_detail"].is_null()
        })
        .await;
    assert_eq!(nack["version_info"], "e1", "{nack}");
    assert!(
        nack["error_detail"]["message"]
            .as_str()
            .unwrap()
            .contains("failed to unmarshal"),
        "{nack}"
    );
    // Envoy's next message is the next good version, not the broken one.
    up.set(
        ECDS_TYPE_URL,
        "e3",
        vec![remote(&url, "", json!({}), false, false)],
    );
    let next = recv(&mut s).await;
    assert_eq!(next.version_info, "e3");
    assert_eq!(
        proxy.metric(r#"istio_agent_wasm_config_conversion_count{result="unmarshal_failure"}"#),
        1.0
    );
    assert_eq!(proxy.metric("wasm_ecds_proxy_nacks"), 1.0);
    assert_eq!(proxy.metric("wasm_ecds_proxy_streams"), 1.0);
    proxy.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_download_serves_the_fallback_then_the_module_once_a_retry_succeeds() {
    let Some(up) = Upstream::start() else { return };
    let module = support::proxy_wasm_test_module();
    let up_now = Arc::new(AtomicBool::new(false));
    let flag = up_now.clone();
    let body = module.clone();
    let http = RawServer::start(move |_, _| {
        if flag.load(Ordering::SeqCst) {
            RawReply::ok(body.clone())
        } else {
            RawReply::Full {
                status: 503,
                headers: Vec::new(),
                body: Vec::new(),
            }
        }
    })
    .await;
    up.set(LDS_TYPE_URL, "l1", vec![listener()]);
    for (fail_open, fallback) in [(false, Delivered::DenyAll), (true, Delivered::AllowAll)] {
        let path = format!("/m-{fail_open}.wasm");
        up_now.store(false, Ordering::SeqCst);
        up.set(
            ECDS_TYPE_URL,
            "e1",
            vec![remote(&http.url(&path), "", json!({}), true, fail_open)],
        );
        let proxy = Proxy::start(up.addr()).await;
        let (mut s, ecds) = subscribe(&proxy).await;
        assert_eq!(decode_delivered(&first_config(&ecds)), Some(fallback));
        s.send(client::sotw_ack(&[AUTH.to_string()], &ecds))
            .await
            .unwrap();
        // The server comes back: the background retry pulls, the proxy pushes on its own.
        up_now.store(true, Ordering::SeqCst);
        let again = recv(&mut s).await;
        assert!(
            again.nonce.starts_with("wasm-ecds-proxy/"),
            "{}",
            again.nonce
        );
        assert_eq!(again.version_info, "e1");
        let Some(Delivered::Module(Code::File(_))) = decode_delivered(&first_config(&again)) else {
            panic!("no module after the retry")
        };
        // Envoy's ACK of the proxy's own push goes upstream under the upstream's nonce.
        let mark = up.mark();
        s.send(client::sotw_ack(&[AUTH.to_string()], &again))
            .await
            .unwrap();
        let ack = up
            .wait_event_after(mark, WAIT, |e| {
                e["event"] == "request" && e["type_url"] == ECDS_TYPE_URL
            })
            .await;
        assert_eq!(ack["response_nonce"], ecds.nonce.as_str(), "{ack}");
        assert!(ack["error_detail"].is_null());
        assert_eq!(proxy.metric("wasm_ecds_proxy_repushes"), 1.0);
        proxy.handle.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn always_pulls_again_on_a_resource_version_bump_if_not_present_does_not() {
    let Some(up) = Upstream::start() else { return };
    let module = support::proxy_wasm_test_module();
    let http = ModuleServer::start(vec![
        ("/always.wasm", Route::Body(module.clone())),
        ("/ifnp.wasm", Route::Body(module)),
    ])
    .await;
    up.set(LDS_TYPE_URL, "l1", vec![listener()]);
    for (policy, path, pulls) in [
        ("Always", "/always.wasm", 2),
        ("IfNotPresent", "/ifnp.wasm", 1),
    ] {
        let env = |rv: &str| {
            json!({"ISTIO_META_WASM_IMAGE_PULL_POLICY": policy,
                   "ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION": rv})
        };
        let url = http.url(path);
        up.set(
            ECDS_TYPE_URL,
            "e1",
            vec![remote(&url, "", env("1"), true, false)],
        );
        let proxy = Proxy::start(up.addr()).await;
        let (mut s, ecds) = subscribe(&proxy).await;
        s.send(client::sotw_ack(&[AUTH.to_string()], &ecds))
            .await
            .unwrap();
        // The same resource version again (an unrelated push): no pull whatever the policy.
        up.set(
            ECDS_TYPE_URL,
            "e2",
            vec![remote(&url, "", env("1"), true, false)],
        );
        let same = recv(&mut s).await;
        s.send(client::sotw_ack(&[AUTH.to_string()], &same))
            .await
            .unwrap();
        assert_eq!(http.hits(path), 1, "{policy}: same resource version");
        up.set(
            ECDS_TYPE_URL,
            "e3",
            vec![remote(&url, "", env("2"), true, false)],
        );
        let bumped = recv(&mut s).await;
        assert_eq!(bumped.version_info, "e3");
        assert_eq!(http.hits(path), pulls, "{policy}: resource version bumped");
        proxy.handle.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_restart_keeps_the_envoy_stream_and_resumes() {
    let Some(up) = Upstream::start() else { return };
    let port = up.port();
    let module = support::proxy_wasm_test_module();
    let http = ModuleServer::start(vec![("/auth.wasm", Route::Body(module))]).await;
    let url = http.url("/auth.wasm");
    up.set(LDS_TYPE_URL, "l1", vec![listener()]);
    up.set(
        ECDS_TYPE_URL,
        "e1",
        vec![remote(&url, "", json!({}), true, false)],
    );
    let proxy = Proxy::start(up.addr()).await;
    let (mut s, ecds) = subscribe(&proxy).await;
    s.send(client::sotw_ack(&[AUTH.to_string()], &ecds))
        .await
        .unwrap();
    up.kill();
    drop(up);
    let up = Upstream::start_on(port).expect("upstream restarts");
    up.set(LDS_TYPE_URL, "l2", vec![listener()]);
    up.set(
        ECDS_TYPE_URL,
        "e2",
        vec![remote(&url, "", json!({}), true, false)],
    );
    // The proxy reconnects on its own and replays the subscriptions, the node first.
    let open = up.wait_event(WAIT, |e| e["event"] == "stream_open").await;
    assert_eq!(open["node"], "n1", "{open}");
    let mut got = Vec::new();
    while got.len() < 2 {
        let r = recv(&mut s).await;
        got.push((r.type_url.clone(), r.version_info.clone()));
    }
    got.sort();
    assert_eq!(
        got,
        [
            (ECDS_TYPE_URL.to_string(), "e2".to_string()),
            (LDS_TYPE_URL.to_string(), "l2".to_string())
        ]
    );
    assert_eq!(http.hits("/auth.wasm"), 1, "the converted module is reused");
    assert!(proxy.metric(r#"wasm_ecds_proxy_upstream_streams{result="lost"}"#) >= 1.0);
    assert!(proxy.metric(r#"wasm_ecds_proxy_upstream_streams{result="opened"}"#) >= 2.0);
    proxy.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_streams_share_one_download() {
    let Some(up) = Upstream::start() else { return };
    let module = support::proxy_wasm_test_module();
    let http = ModuleServer::start(vec![("/auth.wasm", Route::Body(module))]).await;
    let url = http.url("/auth.wasm");
    up.set(
        ECDS_TYPE_URL,
        "e1",
        vec![remote(&url, "", json!({}), true, false)],
    );
    let proxy = Proxy::start(up.addr()).await;
    let channel = client::connect(proxy.handle.xds_address).await.unwrap();
    let mut streams = Vec::new();
    for i in 0..200 {
        let first = client::sotw_subscribe(&format!("n{i}"), &[AUTH.to_string()]);
        streams.push(
            SotwSession::open(channel.clone(), Api::Ecds, first)
                .await
                .unwrap(),
        );
    }
    for s in &mut streams {
        let r = recv(s).await;
        let Some(Delivered::Module(Code::File(_))) = decode_delivered(&first_config(&r)) else {
            panic!("not converted")
        };
    }
    assert_eq!(http.hits("/auth.wasm"), 1);
    proxy.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_response_is_never_overtaken_by_an_older_one_converting_longer() {
    let Some(up) = Upstream::start() else { return };
    let module = support::proxy_wasm_test_module();
    let http = ModuleServer::start(vec![("/fast.wasm", Route::Body(module))]).await;
    // The slow module: headers and a few bytes, then nothing until the request times out.
    let slow = RawServer::start(|_, _| RawReply::Stall {
        announced: 1000,
        body: b"\0asm".to_vec(),
    })
    .await;
    up.set(LDS_TYPE_URL, "l1", vec![listener()]);
    up.set(
        ECDS_TYPE_URL,
        "e1",
        vec![remote(&http.url("/fast.wasm"), "", json!({}), true, false)],
    );
    let proxy = Proxy::start_with(up.addr(), |c| {
        c.http_request_timeout = Duration::from_millis(500);
    })
    .await;
    let (mut s, ecds) = subscribe(&proxy).await;
    s.send(client::sotw_ack(&[AUTH.to_string()], &ecds))
        .await
        .unwrap();
    // e2 waits for the stalled download; e3, sent right after, converts at once.
    up.set(
        ECDS_TYPE_URL,
        "e2",
        vec![remote(&slow.url("/slow.wasm"), "", json!({}), true, false)],
    );
    up.wait_event(WAIT, |e| e["event"] == "response" && e["version"] == "e2")
        .await;
    up.set(
        ECDS_TYPE_URL,
        "e3",
        vec![remote(
            &http.url("/fast.wasm"),
            "",
            json!({"X": "3"}),
            true,
            false,
        )],
    );
    let next = recv(&mut s).await;
    assert_eq!(next.version_info, "e3");
    s.send(client::sotw_ack(&[AUTH.to_string()], &next))
        .await
        .unwrap();
    // The stalled download ends (timed out) after e3 was forwarded; e2 must not follow it.
    wait_metric(
        &proxy,
        r#"istio_agent_wasm_remote_fetch_count{result="download_failure"}"#,
    )
    .await;
    up.set(
        ECDS_TYPE_URL,
        "e4",
        vec![remote(
            &http.url("/fast.wasm"),
            "",
            json!({"X": "4"}),
            true,
            false,
        )],
    );
    assert_eq!(
        recv(&mut s).await.version_info,
        "e4",
        "nothing came between e3 and e4"
    );
    proxy.handle.shutdown().await;
}

async fn wait_metric(proxy: &Proxy, series: &str) {
    timeout(WAIT, async {
        while proxy.metric(series) < 1.0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{series} stayed 0: {:?}",
            proxy.handle.shared.metrics.samples()
        )
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_converts_per_resource_keeps_versions_and_passes_removals() {
    use wasm_ecds::xds::client::DeltaSession;
    let Some(up) = Upstream::start() else { return };
    let module = support::proxy_wasm_test_module();
    let http = ModuleServer::start(vec![("/auth.wasm", Route::Body(module))]).await;
    let url = http.url("/auth.wasm");
    let other = |v: &str| {
        ecds_resource(
            "other",
            json!({"@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
                   "rules_stat_prefix": v}),
        )
    };
    let mut auth = remote(&url, "", json!({}), true, false);
    auth["@version"] = json!("a1");
    let mut o1 = other("o1");
    o1["@version"] = json!("o1");
    up.set(ECDS_TYPE_URL, "s1", vec![auth, o1]);
    let proxy = Proxy::start(up.addr()).await;
    let channel = client::connect(proxy.handle.xds_address).await.unwrap();
    let names = [AUTH.to_string(), "other".to_string()];
    let first = client::delta_subscribe("d1", &names, Default::default());
    let mut s = DeltaSession::open(channel, Api::Ads, first).await.unwrap();
    let r = timeout(WAIT, s.recv()).await.unwrap().unwrap().unwrap();
    let mut versions: Vec<(String, String)> = (r.resources.iter())
        .map(|x| (x.name.clone(), x.version.clone()))
        .collect();
    versions.sort();
    assert_eq!(
        versions,
        [(AUTH.into(), "a1".into()), ("other".into(), "o1".into())]
    );
    for (res, config) in r.resources.iter().zip(client::decode_delta(&r).unwrap()) {
        match res.name.as_str() {
            AUTH => assert!(matches!(
                decode_delivered(&config),
                Some(Delivered::Module(Code::File(_)))
            )),
            _ => assert_eq!(
                decode_delivered(&config),
                Some(Delivered::AllowAll),
                "passed as is"
            ),
        }
    }
    s.send(client::delta_ack(&r)).await.unwrap();
    // Only `other` changes, then goes: the auth resource is neither resent nor converted again.
    let mut o2 = other("o2");
    o2["@version"] = json!("o2");
    let mut auth = remote(&url, "", json!({}), true, false);
    auth["@version"] = json!("a1");
    up.set(ECDS_TYPE_URL, "s2", vec![auth.clone(), o2]);
    let r = timeout(WAIT, s.recv()).await.unwrap().unwrap().unwrap();
    let changed: Vec<&str> = r.resources.iter().map(|x| x.name.as_str()).collect();
    assert_eq!(
        (changed, r.resources[0].version.as_str()),
        (vec!["other"], "o2")
    );
    s.send(client::delta_ack(&r)).await.unwrap();
    up.set(ECDS_TYPE_URL, "s3", vec![auth]);
    let r = timeout(WAIT, s.recv()).await.unwrap().unwrap().unwrap();
    assert_eq!(r.removed_resources, ["other"]);
    assert_eq!(http.hits("/auth.wasm"), 1);
    proxy.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_uri_timeout_bounds_the_pull() {
    let Some(up) = Upstream::start() else { return };
    let slow = RawServer::start(|_, _| RawReply::Stall {
        announced: 1000,
        body: b"\0asm".to_vec(),
    })
    .await;
    up.set(LDS_TYPE_URL, "l1", vec![listener()]);
    let mut r = remote(&slow.url("/slow.wasm"), "", json!({}), true, false);
    // http_uri.timeout of 300 ms, against a per-request timeout longer than any wait here: only
    // the former can end the stalled pull.
    let typed = &mut r["typed_config"]["value"]["config"]["vm_config"]["code"]["remote"];
    typed["http_uri"]["timeout"] = json!("0.3s");
    up.set(ECDS_TYPE_URL, "e1", vec![r]);
    let proxy = Proxy::start_with(up.addr(), |c| {
        c.http_request_timeout = Duration::from_secs(3600);
    })
    .await;
    let (_s, ecds) = subscribe(&proxy).await;
    assert_eq!(
        decode_delivered(&first_config(&ecds)),
        Some(Delivered::DenyAll)
    );
    proxy.handle.shutdown().await;
}
