//! The EnvoyFilter example (examples/envoyfilter/basic-auth.yaml, behavior.md §10) against a real
//! Envoy: `serve --plugins` serves its `EXTENSION_CONFIG` patch as the ECDS resource
//! `istio.basic_auth`, in every delivery mode, and Envoy runs the module with the patch's own
//! configuration (the test module echoes it in a response header). The module comes from an
//! in-test HTTP server standing in for the example's 127.0.0.1:18080.
//!
//! Envoy is found as described in `tests/support/mod.rs`; locally the test skips with a loud
//! message when it is missing, under `CI=true` it fails instead. Every wait is bounded.

mod support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use wasm_ecds::config::{Config, Delivery};
use wasm_ecds::fetch::hyper_transport::HyperTransport;
use wasm_ecds::serve::{self, ServeSetup};

use support::envoy::{http_get, wait_for, Envoy, EnvoyConfig, XdsTransport};
use support::faults::{ModuleServer, Route};
use support::proxy_wasm_test_module_tagged;
use support::wasm::{CONFIG_HEADER, MODULE_HEADER};

const EXAMPLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/envoyfilter/basic-auth.yaml"
);
/// Where the example expects its module (examples/envoy/run.sh's module server).
const EXAMPLE_URL: &str = "http://127.0.0.1:18080/module.wasm";
const CONVERGE: Duration = Duration::from_secs(30);
const CONFIGURATION: &str = r#"{"basic_auth_rules": [{"prefix": "/productpage", "request_methods": ["GET", "POST"], "credentials": ["ok:test", "YWRtaW4zOmFkbWluMw=="]}]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_basic_auth_example_reaches_envoy_with_its_configuration() {
    let module = proxy_wasm_test_module_tagged("example");
    let text = std::fs::read_to_string(EXAMPLE).expect("example");
    let sha = wasm_ecds::store::sha256_hex(&module);
    assert!(
        text.contains(&format!("sha256: {sha}")),
        "the example's sha256 is not the example module's ({sha})"
    );
    assert!(text.contains(EXAMPLE_URL));
    let modules = ModuleServer::start(vec![("/module.wasm", Route::Body(module))]).await;
    for delivery in [Delivery::File, Delivery::Inline, Delivery::Http] {
        let dir = tempfile::tempdir().expect("temp dir");
        let plugins = dir.path().join("plugins");
        std::fs::create_dir(&plugins).expect("plugins dir");
        let example = text.replace(EXAMPLE_URL, &modules.url("/module.wasm"));
        std::fs::write(plugins.join("basic-auth.yaml"), example).expect("write example");
        let config = Config {
            cache_dir: dir.path().join("cache"),
            delivery,
            ..Config::default()
        };
        let transport = Arc::new(HyperTransport::new(&config, Vec::new()).expect("transport"));
        let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
        let handle = serve::start(ServeSetup {
            config,
            plugin_paths: vec![plugins],
            xds_listener: bind().await.expect("bind"),
            admin_listener: bind().await.expect("bind"),
            transport,
            fetch_config: None,
            kube: None,
            proxy: None,
        })
        .await
        .expect("server starts");
        let admin = handle.admin_address;
        let plugins: Value = wait_for("the patch is pulled", CONVERGE, || async {
            let r = http_get(&format!("http://{admin}/debug/plugins")).await?;
            let v: Value = serde_json::from_slice(&r.body).map_err(|e| e.to_string())?;
            let pulled = v["plugins"][0]["outcome"] == "pulled";
            pulled.then_some(v.clone()).ok_or(format!("{v}"))
        })
        .await;
        let p = &plugins["plugins"][0];
        assert_eq!(
            p["plugin"],
            "istio-system/basic-auth-config/istio.basic_auth"
        );
        assert_eq!(p["resource"], "istio.basic_auth");
        assert_eq!(p["policy"], "IfNotPresent");
        assert_eq!(p["rule"], "sha256");
        assert_eq!(plugins["plugins"].as_array().map(Vec::len), Some(1));

        // The gateway of the example: the ECDS filter istio.basic_auth over ADS.
        let mut envoy = EnvoyConfig::new(XdsTransport::Ads, handle.xds_address)
            .listener("gateway", &["istio.basic_auth"]);
        if delivery == Delivery::Http {
            envoy = envoy.modules(admin);
        }
        let Some(envoy) = Envoy::start(envoy).await else {
            handle.shutdown().await;
            return;
        };
        wait_for(
            &format!("envoy runs the module ({delivery:?})"),
            CONVERGE,
            || async {
                let r = envoy.get("gateway", "/productpage").await?;
                let got = (r.status, r.header(CONFIG_HEADER), r.header(MODULE_HEADER));
                (got == (200, Some(CONFIGURATION), Some("example")))
                    .then_some(())
                    .ok_or(format!("{got:?}"))
            },
        )
        .await;
        drop(envoy);
        tokio::time::timeout(Duration::from_secs(10), handle.shutdown())
            .await
            .expect("server shuts down");
    }
    assert_eq!(modules.hits("/module.wasm"), 3, "one download per server");
}

/// The same example with a control plane that is not wasm-ecds: it sends the `EXTENSION_CONFIG`
/// patch's value as the ECDS resource `istio.basic_auth` (as istiod does) and the listener with
/// the `HTTP_FILTER` patch's ECDS slot; `wasm-ecds proxy` between it and Envoy converts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_basic_auth_example_through_the_proxy() {
    use support::proxied::{Fixture, Probe, FILTER};
    use support::upstream::ecds_resource;
    let module = proxy_wasm_test_module_tagged("example");
    let modules = ModuleServer::start(vec![("/module.wasm", Route::Body(module))]).await;
    let text = std::fs::read_to_string(EXAMPLE)
        .expect("example")
        .replace(EXAMPLE_URL, &modules.url("/module.wasm"));
    let docs: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("yaml"))
        .collect();
    // The HTTP_FILTER patch names the filter the listener subscribes to.
    let slot = &docs[0]["spec"]["configPatches"][0]["patch"]["value"];
    assert_eq!(slot["name"], FILTER);
    let value = &docs[1]["spec"]["configPatches"][0]["patch"]["value"];
    let resource = ecds_resource(
        value["name"].as_str().unwrap(),
        value["typed_config"].clone(),
    );
    for transport in [XdsTransport::Ads, XdsTransport::DeltaAds] {
        let Some(fixture) = Fixture::start_with(transport, &[], resource.clone()).await else {
            return;
        };
        fixture
            .wait_probe(Probe::module(CONFIGURATION, "example"), CONVERGE)
            .await;
        fixture.stop().await;
    }
    assert_eq!(modules.hits("/module.wasm"), 2, "one download per proxy");
}
