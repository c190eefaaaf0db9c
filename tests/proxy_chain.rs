//! `serve --delivery remote` (central, pulls nothing) → `proxy` (per node, pulls and converts) →
//! the proxy's client, with a real OCI registry behind basic auth: the pull secret, the pull
//! policy and the resource version travel in the `ISTIO_META_*` variables as with istiod → agent.

mod support;

use std::path::Path;
use std::time::Duration;

use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
use envoy_types::pb::envoy::extensions::wasm::v3::plugin_config::Vm;
use prost::Message;
use tokio::time::timeout;
use wasm_ecds::config::{Config, Delivery};
use wasm_ecds::convert::{decode_code, decode_delivered, Code, Delivered};
use wasm_ecds::proxy::UpstreamOptions;
use wasm_ecds::serve::ServerHandle;
use wasm_ecds::xds::client::{self, SotwSession};
use wasm_ecds::xds::Api;

use support::serve::in_process as start;
use support::{ImageFormat, Registry, RegistryOptions};

const WAIT: Duration = Duration::from_secs(30);
const RESOURCE: &str = "extensions.istio.io/wasmplugin/default.auth";

fn write_plugin(dir: &Path, url: &str, policy: &str, label: &str, secret_json: &str) {
    use base64::Engine as _;
    let secret = base64::engine::general_purpose::STANDARD.encode(secret_json);
    let text = format!(
        "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: auth, labels: {{rev: '{label}'}}}}\n\
         spec: {{url: '{url}', imagePullPolicy: {policy}, imagePullSecret: pull, pluginConfig: {{realm: x}}}}\n---\n\
         apiVersion: v1\nkind: Secret\ntype: kubernetes.io/dockerconfigjson\nmetadata: {{name: pull}}\n\
         data: {{.dockerconfigjson: {secret}}}\n"
    );
    let tmp = dir.join(".plugins.yaml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, dir.join("plugins.yaml")).unwrap();
}

/// Processings of a server that asked the registry: pulled, or revalidated (an `Always` pull
/// finding the same digest).
fn pulls(server: &ServerHandle) -> f64 {
    let samples = server.shared.metrics.samples();
    ["pulled", "revalidated"]
        .iter()
        .map(|o| format!("wasm_ecds_plugin_processing_count{{outcome=\"{o}\"}}"))
        .filter_map(|k| samples.get(&k).copied())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn central_serve_sends_the_url_and_the_node_proxy_pulls_with_the_secret() {
    let options = RegistryOptions::plain().basic_auth("puller", "chain-pass");
    let Some(registry) = Registry::start(options).await else {
        return;
    };
    let module = support::proxy_wasm_test_module();
    registry
        .push("auth", "v1", ImageFormat::OciArtifact, &module)
        .await;
    let url = registry.oci_url("auth", "v1");

    let plugins = tempfile::tempdir().unwrap();
    write_plugin(
        plugins.path(),
        &url,
        "Always",
        "1",
        &registry.docker_config_json(),
    );
    let central_cache = tempfile::tempdir().unwrap();
    let central = start(
        Config {
            cache_dir: central_cache.path().to_path_buf(),
            delivery: Delivery::Remote,
            ..Config::default()
        },
        vec![plugins.path().to_path_buf()],
        None,
    )
    .await;

    // What the central server sends: the url and the agent's variables, no code.
    let channel = client::connect(central.xds_address).await.unwrap();
    let mut direct = SotwSession::open(
        channel,
        Api::Ecds,
        client::sotw_subscribe("central", &[RESOURCE.to_string()]),
    )
    .await
    .unwrap();
    let sent = timeout(WAIT, direct.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let config = client::decode_sotw(&sent).unwrap().remove(0);
    let Some(Code::Remote { uri, cluster, .. }) = decode_code(&config) else {
        panic!("not remote: {config:?}")
    };
    assert_eq!((uri.as_str(), cluster.as_str()), (url.as_str(), "_"));
    let pc = Wasm::decode(config.typed_config.unwrap().value.as_slice())
        .unwrap()
        .config
        .unwrap();
    let Some(Vm::VmConfig(vm)) = pc.vm else {
        panic!()
    };
    let env = vm.environment_variables.unwrap().key_values;
    assert_eq!(env["ISTIO_META_WASM_IMAGE_PULL_POLICY"], "Always");
    assert!(env["ISTIO_META_WASM_IMAGE_PULL_SECRET"].contains("auths"));
    assert!(env.contains_key("ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION"));
    assert_eq!(pulls(&central), 0.0, "the central server pulls nothing");

    // The node proxy converts it with the secret it was sent.
    let proxy_cache = tempfile::tempdir().unwrap();
    let proxy = start(
        Config {
            cache_dir: proxy_cache.path().to_path_buf(),
            ..registry.config()
        },
        Vec::new(),
        Some(UpstreamOptions {
            address: central.xds_address.to_string(),
            ..Default::default()
        }),
    )
    .await;
    let channel = client::connect(proxy.xds_address).await.unwrap();
    let mut s = SotwSession::open(
        channel,
        Api::Ads,
        client::sotw_subscribe("node", &[RESOURCE.to_string()]),
    )
    .await
    .unwrap();
    let first = timeout(WAIT, s.recv()).await.unwrap().unwrap().unwrap();
    let config = client::decode_sotw(&first).unwrap().remove(0);
    let Some(Delivered::Module(Code::File(path))) = decode_delivered(&config) else {
        panic!("not converted: {config:?}")
    };
    assert_eq!(std::fs::read(path).unwrap(), module);
    let pc = Wasm::decode(config.typed_config.unwrap().value.as_slice())
        .unwrap()
        .config
        .unwrap();
    let Some(Vm::VmConfig(vm)) = pc.vm else {
        panic!()
    };
    assert_eq!(vm.environment_variables, None, "ISTIO_META_* stripped");
    assert!(pc.configuration.is_some(), "pluginConfig travels");
    assert_eq!(pulls(&proxy), 1.0);
    s.send(client::sotw_ack(&[RESOURCE.to_string()], &first))
        .await
        .unwrap();

    // A metadata edit is a new resource version: Always pulls again through the chain.
    write_plugin(
        plugins.path(),
        &url,
        "Always",
        "2",
        &registry.docker_config_json(),
    );
    let second = timeout(WAIT, s.recv()).await.unwrap().unwrap().unwrap();
    assert_ne!(second.version_info, first.version_info);
    assert_eq!(pulls(&proxy), 2.0);
    s.send(client::sotw_ack(&[RESOURCE.to_string()], &second))
        .await
        .unwrap();

    // IfNotPresent: a changed pull policy proves its credentials for the cached module once
    // (the registry is asked, nothing is downloaded)…
    write_plugin(
        plugins.path(),
        &url,
        "IfNotPresent",
        "3",
        &registry.docker_config_json(),
    );
    let third = timeout(WAIT, s.recv()).await.unwrap().unwrap().unwrap();
    assert_ne!(third.version_info, second.version_info);
    s.send(client::sotw_ack(&[RESOURCE.to_string()], &third))
        .await
        .unwrap();
    let asked = pulls(&proxy);
    // …and a new resource version after that is served from the node's cache.
    write_plugin(
        plugins.path(),
        &url,
        "IfNotPresent",
        "4",
        &registry.docker_config_json(),
    );
    let fourth = timeout(WAIT, s.recv()).await.unwrap().unwrap().unwrap();
    assert_ne!(fourth.version_info, third.version_info);
    assert_eq!(pulls(&proxy), asked);
    let downloads =
        proxy.shared.metrics.samples()[r#"wasm_ecds_plugin_processing_count{outcome="pulled"}"#];
    assert_eq!(downloads, 1.0, "one download in all");
    proxy.shutdown().await;
    central.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_envoy_runs_the_module_through_the_chain() {
    use support::envoy::{wait_for, Envoy, EnvoyConfig, XdsTransport};
    use support::wasm::{CONFIG_HEADER, MODULE_HEADER};
    let Some(bin) = support::require_envoy() else {
        return;
    };
    let options = RegistryOptions::plain().basic_auth("puller", "chain-pass");
    let Some(registry) = Registry::start(options).await else {
        return;
    };
    let module = support::proxy_wasm_test_module_tagged("chain");
    registry
        .push("auth", "v1", ImageFormat::Docker, &module)
        .await;
    let url = registry.oci_url("auth", "v1");
    let plugins = tempfile::tempdir().unwrap();
    write_plugin(
        plugins.path(),
        &url,
        "IfNotPresent",
        "1",
        &registry.docker_config_json(),
    );
    let central_cache = tempfile::tempdir().unwrap();
    let central = start(
        Config {
            cache_dir: central_cache.path().to_path_buf(),
            delivery: Delivery::Remote,
            ..Config::default()
        },
        vec![plugins.path().to_path_buf()],
        None,
    )
    .await;
    let proxy_cache = tempfile::tempdir().unwrap();
    let proxy = start(
        Config {
            cache_dir: proxy_cache.path().to_path_buf(),
            delivery: Delivery::File,
            ..registry.config()
        },
        Vec::new(),
        Some(UpstreamOptions {
            address: central.xds_address.to_string(),
            ..Default::default()
        }),
    )
    .await;
    for transport in [XdsTransport::Ads, XdsTransport::DeltaAds] {
        let config = EnvoyConfig::new(transport, proxy.xds_address).listener("in", &[RESOURCE]);
        let envoy = Envoy::start_with(&bin, config).await;
        envoy.wait_ready().await;
        let got = wait_for("the module through the chain", WAIT, || async {
            let r = envoy.get("in", "/").await?;
            let headers = (
                r.status,
                r.header(MODULE_HEADER).map(str::to_string),
                r.header(CONFIG_HEADER).map(str::to_string),
            );
            (headers.1.as_deref() == Some("chain"))
                .then_some(headers.clone())
                .ok_or(format!("{headers:?}"))
        })
        .await;
        assert_eq!(got.0, 200);
        assert_eq!(got.2.as_deref(), Some(r#"{"realm":"x"}"#));
        let dump = envoy
            .admin("/config_dump?resource=ecds_filters")
            .await
            .unwrap();
        let dump = String::from_utf8_lossy(&dump.body);
        assert!(
            dump.contains("istio.io"),
            "the resource is in the dump: {dump}"
        );
        assert!(!dump.contains("ISTIO_META"), "{dump}");
    }
    assert_eq!(pulls(&central), 0.0);
    proxy.shutdown().await;
    central.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_proxied_streams_share_one_download() {
    use support::faults::{ModuleServer, Route};
    let module = support::proxy_wasm_test_module();
    let http = ModuleServer::start(vec![("/m.wasm", Route::Body(module))]).await;
    let plugins = tempfile::tempdir().unwrap();
    std::fs::write(
        plugins.path().join("p.yaml"),
        format!(
            "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: auth}}\nspec: {{url: '{}'}}\n",
            http.url("/m.wasm")
        ),
    )
    .unwrap();
    let caches = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let central = start(
        Config {
            cache_dir: caches.0.path().to_path_buf(),
            delivery: Delivery::Remote,
            ..Config::default()
        },
        vec![plugins.path().to_path_buf()],
        None,
    )
    .await;
    let proxy = start(
        Config {
            cache_dir: caches.1.path().to_path_buf(),
            ..Config::default()
        },
        Vec::new(),
        Some(UpstreamOptions {
            address: central.xds_address.to_string(),
            ..Default::default()
        }),
    )
    .await;
    // 1,000 Envoy streams over 20 connections, all opened before any answer is read.
    let mut channels = Vec::new();
    for _ in 0..20 {
        channels.push(client::connect(proxy.xds_address).await.unwrap());
    }
    let mut streams = Vec::new();
    for i in 0..1000 {
        let first = client::sotw_subscribe(&format!("n{i}"), &[RESOURCE.to_string()]);
        let channel = channels[i % channels.len()].clone();
        streams.push(SotwSession::open(channel, Api::Ecds, first).await.unwrap());
    }
    for s in &mut streams {
        let r = timeout(WAIT, s.recv()).await.unwrap().unwrap().unwrap();
        let config = client::decode_sotw(&r).unwrap().remove(0);
        assert!(matches!(
            decode_delivered(&config),
            Some(Delivered::Module(Code::File(_)))
        ));
    }
    assert_eq!(http.hits("/m.wasm"), 1, "one download for 1,000 streams");
    let samples = proxy.shared.metrics.samples();
    assert_eq!(samples["wasm_ecds_proxy_streams"], 1000.0);
    drop(streams);
    proxy.shutdown().await;
    central.shutdown().await;
}
