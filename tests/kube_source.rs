//! `serve --source kubernetes` against a real kube-apiserver and etcd (tests/support/kube.rs),
//! running as the ServiceAccount-like identity that deploy/rbac.yaml binds: WasmPlugins applied,
//! patched and deleted with kubectl reach a real Envoy, pull Secrets are watched, status
//! conditions are written (and not rewritten), and the label-selector, namespace and
//! files-versus-Kubernetes rules hold. Restarts, relists and replicas: tests/kube_ha.rs.
//!
//! Length: a little over 600 lines, one test per behaviour of the source (each starts its own
//! server against the shared API server).

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::envoy::{wait_for, Envoy, EnvoyConfig, XdsTransport};
use support::faults::{ModuleServer, Route};
use support::kube::{
    condition, pull_secret, resource, unique, wasm_plugin, Cluster, Serve, CONVERGE,
};
use support::wasm::{CONFIG_HEADER, MODULE_HEADER};
use support::{proxy_wasm_test_module_tagged, Registry, RegistryOptions};
use wasm_ecds::xds::client::{self, DeltaSession};
use wasm_ecds::xds::Api;

/// Starts the product for one test's namespace with its own Lease.
fn serve(cluster: &Cluster, ns: &str, extra: &[&str]) -> Serve {
    let lease = unique("lease");
    let mut args = vec![
        "--namespaces",
        ns,
        "--lease-name",
        &lease,
        "--lease-duration",
        "3s",
    ];
    args.extend_from_slice(extra);
    Serve::start(cluster, &args)
}

/// Waits until the condition `type_` of the object satisfies `check`; returns the object.
async fn wait_condition(
    cluster: &Cluster,
    ns: &str,
    name: &str,
    type_: &str,
    check: impl Fn(&Value, &Value) -> bool,
) -> Value {
    wait_for(&format!("{ns}/{name} {type_}"), CONVERGE, || async {
        let o = cluster.get(ns, "wasmplugin", name);
        let c = condition(&o, type_).ok_or(format!("no {type_}: {}", o["status"]))?;
        check(&o, &c).then_some(o.clone()).ok_or(format!("{c}"))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applied_patched_and_deleted_plugins_reach_envoy() {
    let Some(cluster) = Cluster::shared() else {
        return;
    };
    let ns = unique("apps");
    cluster.kubectl(&["create", "namespace", &ns]);
    let modules = ModuleServer::start(vec![
        (
            "/always.wasm",
            Route::Body(proxy_wasm_test_module_tagged("always")),
        ),
        (
            "/cached.wasm",
            Route::Body(proxy_wasm_test_module_tagged("cached")),
        ),
    ])
    .await;
    let spec = |path: &str, policy: &str| {
        format!(
            "url: {}\nimagePullPolicy: {policy}\npluginConfig: {{greeting: hello}}\n",
            modules.url(path)
        )
    };
    cluster.apply(&wasm_plugin(&ns, "always", &spec("/always.wasm", "Always")));
    cluster.apply(&wasm_plugin(
        &ns,
        "cached",
        &spec("/cached.wasm", "IfNotPresent"),
    ));
    let s = serve(cluster, &ns, &[]);
    s.wait_ready().await;
    let always = format!("{ns}/always");
    let cached = format!("{ns}/cached");
    s.wait_outcome(&always, "pulled").await;
    s.wait_outcome(&cached, "pulled").await;

    // A real Envoy runs both filters, configured over ECDS.
    let config = EnvoyConfig::new(XdsTransport::Delta, s.xds)
        .listener("l", &[resource(&ns, "always"), resource(&ns, "cached")]);
    let Some(envoy) = Envoy::start(config).await else {
        return;
    };
    wait_for("envoy runs the plugins", CONVERGE, || async {
        let r = envoy.get("l", "/").await?;
        let got = (
            r.status,
            r.header(CONFIG_HEADER).map(str::to_string),
            r.header(MODULE_HEADER).map(str::to_string),
        );
        (got.0 == 200 && got.1.as_deref() == Some(r#"{"greeting":"hello"}"#) && got.2.is_some())
            .then_some(())
            .ok_or(format!("{got:?}"))
    })
    .await;

    // A merge patch of a label is a new resourceVersion: Always pulls again, IfNotPresent not.
    let (always_hits, cached_hits) = (modules.hits("/always.wasm"), modules.hits("/cached.wasm"));
    let before = s.plugin(&cached).await.unwrap()["resourceVersion"].clone();
    for name in ["always", "cached"] {
        cluster.merge_patch(&ns, name, r#"{"metadata":{"labels":{"team":"edge"}}}"#);
    }
    wait_for("always pulled again", CONVERGE, || async {
        (modules.hits("/always.wasm") > always_hits)
            .then_some(())
            .ok_or_else(|| "no request".to_string())
    })
    .await;
    let after = wait_for("cached reprocessed", CONVERGE, || async {
        let p = s
            .plugin(&cached)
            .await
            .ok_or_else(|| "absent".to_string())?;
        let processed = p["processedResourceVersion"] == p["resourceVersion"];
        (p["resourceVersion"] != before && processed && p["outcome"] == "cached")
            .then_some(p.clone())
            .ok_or(format!("{p}"))
    })
    .await;
    assert_eq!(
        modules.hits("/cached.wasm"),
        cached_hits,
        "IfNotPresent does not pull: {after}"
    );

    // A spec change reaches the running Envoy.
    cluster.merge_patch(
        &ns,
        "cached",
        r#"{"spec":{"pluginConfig":{"greeting":"bonjour"}}}"#,
    );
    wait_for("envoy sees the new configuration", CONVERGE, || async {
        let r = envoy.get("l", "/").await?;
        let c = r.header(CONFIG_HEADER).map(str::to_string);
        (c.as_deref() == Some(r#"{"greeting":"bonjour"}"#))
            .then_some(())
            .ok_or(format!("{c:?}"))
    })
    .await;

    // Delete: the resource is removed from what proxies are served.
    let channel = client::connect(s.xds).await.unwrap();
    let names = vec![resource(&ns, "always")];
    let mut delta = DeltaSession::open(
        channel,
        Api::Ecds,
        client::delta_subscribe("t", &names, Default::default()),
    )
    .await
    .unwrap();
    let first = delta.recv().await.unwrap().unwrap();
    assert_eq!(first.resources.len(), 1);
    delta.send(client::delta_ack(&first)).await.unwrap();
    cluster.kubectl(&["-n", &ns, "delete", "wasmplugin", "always"]);
    let removed = tokio::time::timeout(CONVERGE, delta.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(removed.removed_resources, names);
    wait_for("gone from /debug/plugins", CONVERGE, || async {
        s.plugin(&always)
            .await
            .is_none()
            .then_some(())
            .ok_or_else(|| "still there".to_string())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_secrets_are_watched_rotated_and_filtered_by_type() {
    let Some(cluster) = Cluster::shared() else {
        return;
    };
    let Some(registry) =
        Registry::start(RegistryOptions::plain().basic_auth("puller", "right")).await
    else {
        return;
    };
    let module = proxy_wasm_test_module_tagged("private");
    registry
        .push(
            "team/filter",
            "v1",
            support::ImageFormat::OciCompat,
            &module,
        )
        .await;
    let ns = unique("secrets");
    cluster.kubectl(&["create", "namespace", &ns]);
    let spec = format!(
        "url: oci://{}/team/filter:v1\nimagePullSecret: pull\nfailStrategy: FAIL_OPEN\n",
        registry.host()
    );
    cluster.apply(&wasm_plugin(&ns, "private", &spec));
    let s = serve(cluster, &ns, &["--insecure-registries", &registry.host()]);
    let key = format!("{ns}/private");
    let p = s.wait_outcome(&key, "rejected").await;
    assert_eq!(p["reason"], "missing_secret");
    let o = wait_condition(cluster, &ns, "private", "Ready", |_, c| {
        c["reason"] == "MissingSecret"
    })
    .await;
    let ready = condition(&o, "Ready").unwrap();
    assert_eq!(ready["status"], "False");
    assert!(
        ready["message"].as_str().unwrap().contains("allow-all"),
        "{ready}"
    );

    // A Secret of another type with that name is not a pull secret.
    let config = support::docker_config_json(&registry.host(), "puller", "right");
    cluster.apply(&pull_secret(&ns, "pull", "Opaque", &config));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(s.plugin(&key).await.unwrap()["reason"], "missing_secret");
    cluster.kubectl(&["-n", &ns, "delete", "secret", "pull"]);

    // The right type with the wrong password: unauthorized; rotated to the right one: pulled.
    let wrong = support::docker_config_json(&registry.host(), "puller", "wrong");
    cluster.apply(&pull_secret(
        &ns,
        "pull",
        "kubernetes.io/dockerconfigjson",
        &wrong,
    ));
    wait_for("unauthorized", CONVERGE, || async {
        let p = s.plugin(&key).await.ok_or_else(|| "absent".to_string())?;
        (p["reason"] == "unauthorized")
            .then_some(())
            .ok_or(format!("{p}"))
    })
    .await;
    cluster.apply(&pull_secret(
        &ns,
        "pull",
        "kubernetes.io/dockerconfigjson",
        &config,
    ));
    s.wait_outcome(&key, "pulled").await;
    let o = wait_condition(cluster, &ns, "private", "Ready", |_, c| {
        c["status"] == "True"
    })
    .await;
    assert!(
        s.log().find("\"right\"").is_none() && !s.log().contains(&config),
        "secrets never logged"
    );
    assert_eq!(condition(&o, "Ready").unwrap()["reason"], "Pulled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_conditions_are_written_once_per_change() {
    let Some(cluster) = Cluster::shared() else {
        return;
    };
    let ns = unique("status");
    cluster.kubectl(&["create", "namespace", &ns]);
    let modules = ModuleServer::start(vec![(
        "/ok.wasm",
        Route::Body(proxy_wasm_test_module_tagged("ok")),
    )])
    .await;
    cluster.apply(&wasm_plugin(
        &ns,
        "good",
        &format!("url: {}\n", modules.url("/ok.wasm")),
    ));
    cluster.apply(&wasm_plugin(
        &ns,
        "invalid",
        &format!("url: {}\nsha256: nope\n", modules.url("/ok.wasm")),
    ));
    cluster.apply(&wasm_plugin(
        &ns,
        "missing",
        &format!(
            "url: {}\nfailStrategy: FAIL_CLOSE\n",
            modules.url("/missing.wasm")
        ),
    ));
    let s = serve(cluster, &ns, &["--http-request-max-retries", "1"]);
    s.wait_ready().await;

    let good = wait_condition(cluster, &ns, "good", "Ready", |_, c| c["status"] == "True").await;
    let accepted = condition(&good, "Accepted").unwrap();
    let ready = condition(&good, "Ready").unwrap();
    assert_eq!(
        (accepted["status"].as_str(), accepted["reason"].as_str()),
        (Some("True"), Some("Accepted"))
    );
    assert_eq!(ready["reason"], "Pulled");
    let sha = s.plugin(&format!("{ns}/good")).await.unwrap()["serves"]["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(ready["message"].as_str().unwrap().contains(&sha), "{ready}");
    assert_eq!(ready["observedGeneration"], good["metadata"]["generation"]);
    assert!(ready["lastTransitionTime"].is_string());

    let invalid = wait_condition(cluster, &ns, "invalid", "Accepted", |_, c| {
        c["status"] == "False"
    })
    .await;
    let c = condition(&invalid, "Accepted").unwrap();
    assert_eq!(c["reason"], "Invalid");
    assert!(
        c["message"].as_str().unwrap().starts_with("spec.sha256: "),
        "{c}"
    );
    assert_eq!(condition(&invalid, "Ready").unwrap()["status"], "False");

    let missing = wait_condition(cluster, &ns, "missing", "Ready", |_, c| {
        c["status"] == "False"
    })
    .await;
    let c = condition(&missing, "Ready").unwrap();
    assert_eq!(c["reason"], "DownloadFailure");
    assert!(c["message"].as_str().unwrap().contains("deny-all"), "{c}");

    // Nothing changes for a while (the failing plugin retries in the background with the same
    // result): the API server applies no write to any of the three.
    let mut counters = Vec::new();
    for name in ["good", "invalid", "missing"] {
        counters.push(cluster.count_writes(&ns, name).await);
    }
    let ours = s
        .metric("wasm_ecds_kube_status_writes{result=\"ok\"}")
        .await;
    let retries = s
        .metric("wasm_ecds_plugin_processing_count{outcome=\"rejected\"}")
        .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        s.metric("wasm_ecds_plugin_processing_count{outcome=\"rejected\"}")
            .await
            > retries,
        "the failing plugin was retried meanwhile"
    );
    assert_eq!(
        counters.iter().map(|c| c.get()).collect::<Vec<_>>(),
        [0, 0, 0],
        "no write without a change"
    );
    assert_eq!(
        s.metric("wasm_ecds_kube_status_writes{result=\"ok\"}")
            .await,
        ours
    );

    // A spec change: a new generation, observed once processed, in exactly one status write (the
    // API server applies two writes in all: the patch and the status).
    cluster.merge_patch(&ns, "good", r#"{"spec":{"pluginConfig":{"v":2}}}"#);
    let o = wait_condition(cluster, &ns, "good", "Ready", |o, c| {
        c["observedGeneration"] == o["metadata"]["generation"] && o["metadata"]["generation"] == 2
    })
    .await;
    let c = condition(&o, "Ready").unwrap();
    assert_eq!(
        c["lastTransitionTime"], ready["lastTransitionTime"],
        "status stayed True"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(counters[0].get(), 2, "the patch and one status write");
    assert_eq!(
        s.metric("wasm_ecds_kube_status_writes{result=\"ok\"}")
            .await
            - ours,
        1.0
    );

    // Fixing the invalid plugin: Accepted turns True.
    cluster.kubectl(&[
        "-n",
        &ns,
        "patch",
        "wasmplugin",
        "invalid",
        "--type",
        "json",
        "-p",
        r#"[{"op":"remove","path":"/spec/sha256"}]"#,
    ]);
    wait_condition(cluster, &ns, "invalid", "Ready", |_, c| {
        c["status"] == "True"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selector_namespaces_and_file_conflicts() {
    let Some(cluster) = Cluster::shared() else {
        return;
    };
    let (ns, other) = (unique("sel"), unique("other"));
    for n in [&ns, &other] {
        cluster.kubectl(&["create", "namespace", n]);
    }
    let modules = ModuleServer::start(vec![(
        "/m.wasm",
        Route::Body(proxy_wasm_test_module_tagged("m")),
    )])
    .await;
    let url = format!("url: {}\n", modules.url("/m.wasm"));
    let labelled = |n: &str, name: &str, rev: &str| {
        wasm_plugin(n, name, &url).replace(
            "metadata:\n",
            &format!("metadata:\n  labels: {{rev: {rev}}}\n"),
        )
    };
    cluster.apply(&labelled(&ns, "mine", "a"));
    cluster.apply(&labelled(&ns, "theirs", "b"));
    cluster.apply(&labelled(&other, "elsewhere", "a"));

    // A name defined both in the plugin files and in Kubernetes at start-up: an error.
    let files = tempfile::tempdir().unwrap();
    std::fs::write(files.path().join("p.yaml"), labelled(&ns, "mine", "a")).unwrap();
    let plugins_arg = files.path().to_str().unwrap().to_string();
    let started = Serve::try_start(
        cluster,
        &[
            "--namespaces",
            &ns,
            "--selector",
            "rev=a",
            "--plugins",
            &plugins_arg,
            "--write-status",
            "false",
        ],
    );
    let (code, log) = started.expect("starts, then stops").wait_exit(CONVERGE);
    assert_eq!(code, Some(2), "{log}");
    assert!(
        log.contains(&format!(
            "WasmPlugin {ns}/mine is defined both in the plugin files and in Kubernetes"
        )),
        "{log}"
    );

    // Selector and namespace: only rev=a plugins of `ns`.
    std::fs::write(files.path().join("p.yaml"), labelled(&ns, "from-file", "a")).unwrap();
    let s = serve(
        cluster,
        &ns,
        &["--selector", "rev=a", "--plugins", &plugins_arg],
    );
    s.wait_ready().await;
    let served: Vec<String> = s.debug_plugins().await["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["plugin"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(served, [format!("{ns}/from-file"), format!("{ns}/mine")]);

    // A Kubernetes plugin later taking a file plugin's name: the file keeps it, the Kubernetes
    // object says why it is not used.
    let file_url = s.plugin(&format!("{ns}/from-file")).await.unwrap()["url"].clone();
    cluster.apply(&labelled(&ns, "from-file", "a").replace("m.wasm", "other.wasm"));
    let o = wait_condition(cluster, &ns, "from-file", "Accepted", |_, c| {
        c["reason"] == "Conflict"
    })
    .await;
    assert!(condition(&o, "Accepted").unwrap()["message"]
        .as_str()
        .unwrap()
        .contains("plugin files' object"));
    let conflicts = s.debug_plugins().await["conflicts"].clone();
    assert_eq!(conflicts.as_array().map(Vec::len), Some(1), "{conflicts}");
    assert_eq!(
        s.plugin(&format!("{ns}/from-file")).await.unwrap()["url"],
        file_url
    );
    assert_eq!(json!(served.len()), json!(2));
}

/// An EnvoyFilter created in the cluster (behavior.md §10): its `EXTENSION_CONFIG` patch is served
/// under its own name with its configuration kept, its `HTTP_FILTER` patch is ignored, a label
/// edit is a new version (Always pulls again), and deleting the EnvoyFilter removes the resource.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_filters_are_served_and_deleting_one_removes_its_resources() {
    use envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig;
    use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
    use envoy_types::pb::google::protobuf::StringValue;
    use prost::Message as _;

    let Some(cluster) = Cluster::shared() else {
        return;
    };
    let ns = unique("filters");
    cluster.kubectl(&["create", "namespace", &ns]);
    let modules = ModuleServer::start(vec![(
        "/auth.wasm",
        Route::Body(proxy_wasm_test_module_tagged("ef")),
    )])
    .await;
    cluster.apply(&format!(
        r#"apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {{name: basic-auth, namespace: {ns}}}
spec:
  configPatches:
  - applyTo: HTTP_FILTER
    patch: {{operation: INSERT_BEFORE, value: {{name: istio.basic_auth}}}}
  - applyTo: EXTENSION_CONFIG
    patch:
      operation: ADD
      value:
        name: istio.basic_auth
        typed_config:
          "@type": type.googleapis.com/udpa.type.v1.TypedStruct
          type_url: type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
          value:
            config:
              root_id: basic_auth_root
              configuration:
                "@type": type.googleapis.com/google.protobuf.StringValue
                value: '{{"greeting":"hello"}}'
              vm_config:
                vm_id: basic-auth
                runtime: envoy.wasm.runtime.v8
                environment_variables:
                  key_values: {{ISTIO_META_WASM_IMAGE_PULL_POLICY: Always}}
                code:
                  remote:
                    http_uri: {{uri: "{}"}}
"#,
        modules.url("/auth.wasm")
    ));
    let s = serve(cluster, &ns, &[]);
    s.wait_ready().await;
    let key = format!("{ns}/basic-auth/istio.basic_auth");
    let p = s.wait_outcome(&key, "pulled").await;
    assert_eq!(p["resource"], "istio.basic_auth", "{p}");
    assert_eq!(p["envoyFilter"], format!("{ns}/basic-auth"), "{p}");
    assert_eq!(p["policy"], "Always", "{p}");
    let plugins = s.debug_plugins().await["plugins"].clone();
    assert_eq!(plugins.as_array().map(Vec::len), Some(1), "{plugins}");

    // Served over ECDS under the patch's name, its configuration and root id kept.
    let channel = client::connect(s.xds).await.unwrap();
    let names = vec!["istio.basic_auth".to_string()];
    let mut delta = DeltaSession::open(
        channel,
        Api::Ecds,
        client::delta_subscribe("t", &names, Default::default()),
    )
    .await
    .unwrap();
    let first = delta.recv().await.unwrap().unwrap();
    let resource = first.resources[0].resource.as_ref().unwrap();
    let ec = TypedExtensionConfig::decode(resource.value.as_slice()).unwrap();
    assert_eq!(ec.name, "istio.basic_auth");
    let config = Wasm::decode(ec.typed_config.unwrap().value.as_slice())
        .unwrap()
        .config
        .unwrap();
    assert_eq!(config.root_id, "basic_auth_root");
    let text = StringValue::decode(config.configuration.unwrap().value.as_slice()).unwrap();
    assert_eq!(text.value, r#"{"greeting":"hello"}"#);
    delta.send(client::delta_ack(&first)).await.unwrap();

    // A label is a new version of the EnvoyFilter: Always pulls again.
    let hits = modules.hits("/auth.wasm");
    cluster.kubectl(&["-n", &ns, "label", "envoyfilter", "basic-auth", "team=edge"]);
    wait_for("pulled again", CONVERGE, || async {
        (modules.hits("/auth.wasm") > hits)
            .then_some(())
            .ok_or_else(|| "no request".to_string())
    })
    .await;

    // Deleting the EnvoyFilter removes what its patches served.
    cluster.kubectl(&["-n", &ns, "delete", "envoyfilter", "basic-auth"]);
    let removed = loop {
        let r = tokio::time::timeout(CONVERGE, delta.recv())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if !r.removed_resources.is_empty() {
            break r;
        }
        delta.send(client::delta_ack(&r)).await.unwrap();
    };
    assert_eq!(removed.removed_resources, names);
    wait_for("gone from /debug/plugins", CONVERGE, || async {
        s.plugin(&key)
            .await
            .is_none()
            .then_some(())
            .ok_or_else(|| "still there".to_string())
    })
    .await;
}
