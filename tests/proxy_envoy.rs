//! A real Envoy behind `wasm-ecds proxy`, whose upstream control plane is the Python xDS server of
//! `tests/support/upstream_ads.py` (not wasm-ecds). Envoy's bootstrap has nothing but ADS to the
//! proxy: its listener comes from the upstream over LDS, and the listener's HTTP filter
//! `istio.basic_auth` asks for its config over ECDS on the same stream, as with an Istio
//! EnvoyFilter (`tests/support/proxied.rs`). The upstream sends remote-load Wasm configs; the proxy
//! converts them on the way. What Envoy does with real requests is the proof: the test module adds
//! the response headers `x-wasm-plugin-config` (its configuration) and `x-wasm-module` (its build
//! tag); the RBAC fallbacks answer 403 (deny-all) or 200 without those headers (allow-all).
//!
//! Every scenario runs twice, over SotW ADS (`…::ads`) and over delta ADS (`…::delta_ads`), each
//! with its own Envoy, proxy and upstream.
//!
//! Envoy, the Python server and the registry are found as `tests/support/mod.rs` describes: locally
//! a test skips with a loud message when one is missing, under `CI=true` it fails instead. Every
//! wait is bounded and fails the test with what was last seen; nothing asserts a duration.

mod support;

use std::time::Duration;

use serde_json::{json, Value};

use support::envoy::{wait_for, XdsTransport};
use support::faults::{ModuleServer, Route};
use support::proxied::{
    lds_resource, listener, sha256_hex, Fixture, Modules, Probe, Remote, CONVERGE, FILTER,
    LISTENER, PROXY_CLUSTER,
};
use support::upstream::{Upstream, ECDS_TYPE_URL, LDS_TYPE_URL, WASM_TYPE_URL};
use support::{proxy_wasm_test_module_tagged, ImageFormat, Registry, RegistryOptions};

/// Bound of the wait for the proxy's background retry (backing off 1 s, 2 s, 4 s, …).
const RETRY_CONVERGE: Duration = Duration::from_secs(70);
/// How long Envoy is watched while the upstream is down.
const QUIET: Duration = Duration::from_millis(1500);

/// Runs each scenario over SotW ADS and over delta ADS, as two tests.
macro_rules! over_ads_and_delta_ads {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            use super::XdsTransport;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn ads() {
                super::$scenario(XdsTransport::Ads).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn delta_ads() {
                super::$scenario(XdsTransport::DeltaAds).await
            }
        }
    )*};
}

over_ads_and_delta_ads!(
    filter_runs_for_every_form_and_source,
    a_broken_ecds_resource_is_nacked_upstream_and_never_reaches_envoy,
    a_failed_download_falls_back_then_the_retry_serves_the_module,
    the_ack_of_a_push_again_never_acknowledges_a_response_still_converting,
    always_pulls_again_on_a_resource_version_bump_if_not_present_does_not,
    an_upstream_restart_keeps_envoy_serving_and_recovers,
);

/// The listener reaches Envoy as the upstream sent it; remote-load configs of both forms
/// (direct `Wasm` and `TypedStruct`), from an http server and from a registry, pinned by sha256 or
/// not, with Istio's variables or without, run in Envoy: the module answers with its
/// configuration, and Envoy's config shows the root id, the user's variables, a local file
/// holding the module and no `ISTIO_META_*`.
async fn filter_runs_for_every_form_and_source(transport: XdsTransport) {
    let Some(registry) = Registry::start(RegistryOptions::plain()).await else {
        return;
    };
    let module = |tag: &str| proxy_wasm_test_module_tagged(tag);
    let http = ModuleServer::start(vec![
        ("/direct.wasm", Route::Body(module("http-direct"))),
        ("/typed.wasm", Route::Body(module("http-typed"))),
    ])
    .await;
    let docker = registry
        .push(
            "proxied/direct",
            "v1",
            ImageFormat::Docker,
            &module("oci-direct"),
        )
        .await;
    let artifact = module("oci-typed");
    registry
        .push("proxied/typed", "v1", ImageFormat::OciArtifact, &artifact)
        .await;
    let config = |tag: &str| format!("{{\"case\":\"{tag}\"}}");
    let cases = [
        (
            "http-direct",
            Remote::new(&http.url("/direct.wasm"), &config("http-direct"))
                .istio_env("IfNotPresent", "1"),
        ),
        (
            "http-typed",
            Remote::new(&http.url("/typed.wasm"), &config("http-typed"))
                .sha256(&sha256_hex(&module("http-typed")))
                .typed_struct(),
        ),
        (
            "oci-direct",
            Remote::new(
                &registry.oci_url("proxied/direct", "v1"),
                &config("oci-direct"),
            )
            .sha256(docker.digest.trim_start_matches("sha256:"))
            .istio_env("IfNotPresent", "3"),
        ),
        (
            "oci-typed",
            Remote::new(
                &registry.oci_url("proxied/typed", "v1"),
                &config("oci-typed"),
            )
            .istio_env("Always", "4")
            .typed_struct(),
        ),
    ];
    let Some(fx) = Fixture::start(transport, &[registry.host()], &cases[0].1).await else {
        return;
    };

    // LDS passes through: Envoy's listener is the upstream's, at the upstream's version.
    let r = fx.envoy.admin("/config_dump?resource=dynamic_listeners");
    let dump: Value = serde_json::from_slice(&r.await.expect("config_dump").body).expect("JSON");
    let active = (dump["configs"].as_array().into_iter().flatten())
        .find(|c| c["name"] == LISTENER)
        .unwrap_or_else(|| panic!("no active listener {LISTENER}: {dump}"));
    assert_eq!(active["active_state"]["version_info"], "l1", "{active}");
    let mut got = active["active_state"]["listener"].clone();
    assert_eq!(got["@type"], LDS_TYPE_URL);
    got.as_object_mut().expect("a listener").remove("@type");
    assert_eq!(got, listener(), "the listener as the upstream sent it");
    let lds_version = fx.envoy.stats().await;
    assert_eq!(lds_version["listener_manager.lds.version_text"], "l1");

    for (i, (tag, remote)) in cases.iter().enumerate() {
        let version = format!("e{}", i + 1);
        if i > 0 {
            fx.up.set(ECDS_TYPE_URL, &version, vec![remote.resource()]);
        }
        fx.wait_probe(Probe::module(&remote.config, tag), CONVERGE)
            .await;
        fx.wait_ecds_version(&version).await;
        let dump = fx.ecds_dump().await;
        assert!(!dump.to_string().contains("ISTIO_META"), "{tag}: {dump}");
        let typed = &dump["ecds_filter"]["typed_config"];
        assert_eq!(typed["@type"], WASM_TYPE_URL, "{tag}: {dump}");
        let plugin = &typed["config"];
        assert_eq!(plugin["name"], "basic-auth", "{tag}: {dump}");
        assert_eq!(plugin["root_id"], "auth_root", "{tag}: {dump}");
        assert_eq!(plugin["configuration"]["value"], remote.config, "{tag}");
        let vm = &plugin["vm_config"];
        let kept = match remote.env.as_object().is_some_and(|e| !e.is_empty()) {
            true => json!({"KEEP": "me"}),
            false => Value::Null,
        };
        assert_eq!(
            vm["environment_variables"]["key_values"], kept,
            "{tag}: {dump}"
        );
        let file = vm["code"]["local"]["filename"].as_str();
        let file = file.unwrap_or_else(|| panic!("{tag}: not a local file: {dump}"));
        assert_eq!(
            std::fs::read(file).expect("module file"),
            module(tag),
            "{tag}"
        );
    }
    assert_eq!(fx.ecds_counter("update_rejected").await, 0);
    fx.stop().await;
}

/// A TypedExtensionConfig that cannot be read is NACKed upstream by the proxy and never reaches
/// Envoy: Envoy keeps its version and module, rejects nothing, and the next good version is the
/// next thing it applies.
async fn a_broken_ecds_resource_is_nacked_upstream_and_never_reaches_envoy(
    transport: XdsTransport,
) {
    let module = proxy_wasm_test_module_tagged("good");
    let http = ModuleServer::start(vec![("/good.wasm", Route::Body(module))]).await;
    let good = |config: &str| Remote::new(&http.url("/good.wasm"), config).typed_struct();
    let Some(fx) = Fixture::start(transport, &[], &good("first")).await else {
        return;
    };
    fx.wait_probe(Probe::module("first", "good"), CONVERGE)
        .await;
    fx.wait_ecds_version("e1").await;
    let success = fx.ecds_counter("update_success").await;

    let mark = fx.up.mark();
    fx.up
        .set_raw(ECDS_TYPE_URL, "e2", FILTER, &[0xff, 0xff, 0x01]);
    let broken = upstream_response(&fx, mark, "e2").await;
    let is_nack = |e: &Value| {
        e["event"] == "request" && e["type_url"] == ECDS_TYPE_URL && !e["error_detail"].is_null()
    };
    let nack = fx.up.wait_event_after(mark, CONVERGE, is_nack).await;
    assert_eq!(nack["response_nonce"], broken["nonce"], "{nack}");
    if transport == XdsTransport::Ads {
        assert_eq!(
            nack["version_info"], "e1",
            "the version Envoy accepted: {nack}"
        );
    }
    let message = nack["error_detail"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("failed to unmarshal"), "{nack}");
    assert_eq!(fx.ecds_version().await.as_deref(), Some("e1"));
    assert_eq!(fx.probe().await, Ok(Probe::module("first", "good")));

    // Responses reach Envoy in order: had the broken one been sent, Envoy would have handled it
    // before this one.
    fx.up
        .set(ECDS_TYPE_URL, "e3", vec![good("third").resource()]);
    fx.wait_probe(Probe::module("third", "good"), CONVERGE)
        .await;
    fx.wait_ecds_version("e3").await;
    assert_eq!(fx.ecds_counter("update_rejected").await, 0);
    assert_eq!(fx.ecds_counter("update_success").await, success + 1);
    // Envoy's ACK of e3 follows anything it said about e2 on the same stream: no NACK of its own.
    let good = upstream_response(&fx, mark, "e3").await;
    let is_ack = |e: &Value| {
        e["event"] == "request"
            && e["response_nonce"] == good["nonce"]
            && e["error_detail"].is_null()
    };
    fx.up.wait_event_after(mark, CONVERGE, is_ack).await;
    let nacks: Vec<Value> = fx
        .up
        .events_since(mark)
        .into_iter()
        .filter(is_nack)
        .collect();
    assert_eq!(nacks.len(), 1, "only the proxy's NACK: {nacks:?}");
    fx.stop().await;
}

/// A module that cannot be downloaded is served as RBAC deny-all under FAIL_CLOSED and
/// allow-all under FAIL_OPEN; once the module server works, the proxy's background retry brings
/// the real module to Envoy without anything new from the upstream.
async fn a_failed_download_falls_back_then_the_retry_serves_the_module(transport: XdsTransport) {
    let modules = Modules::start().await;
    let closed = Remote::new(&modules.url("/closed.wasm"), "closed").typed_struct();
    let Some(fx) = Fixture::start(transport, &[], &closed).await else {
        return;
    };
    let open = Remote::new(&modules.url("/open.wasm"), "open").fail_open();
    for (version, remote, fallback) in [
        ("e1", &closed, Probe::denied()),
        ("e2", &open, Probe::allowed()),
    ] {
        let path = format!("/{}.wasm", remote.config);
        if version != "e1" {
            fx.up.set(ECDS_TYPE_URL, version, vec![remote.resource()]);
        }
        fx.wait_probe(fallback, CONVERGE).await;
        fx.wait_ecds_version(version).await;
        assert!(modules.hits(&path) >= 1, "{path} was tried");
        let response = upstream_response(&fx, 0, version).await;

        let mark = fx.up.mark();
        modules.put(&path, proxy_wasm_test_module_tagged(&remote.config));
        let module = Probe::module(&remote.config, &remote.config);
        fx.wait_probe(module, RETRY_CONVERGE).await;
        assert_eq!(fx.ecds_version().await.as_deref(), Some(version));
        assert_eq!(
            fx.upstream_responses_since(mark, ECDS_TYPE_URL),
            Vec::<Value>::new()
        );
        // Envoy's ACK of the proxy's own push goes upstream under the upstream's nonce.
        let ack = fx
            .up
            .wait_event_after(mark, CONVERGE, |e| {
                e["event"] == "request" && e["type_url"] == ECDS_TYPE_URL
            })
            .await;
        assert_eq!(ack["response_nonce"], response["nonce"], "{ack}");
        if transport == XdsTransport::Ads {
            assert_eq!(ack["version_info"], version, "{ack}");
        }
        assert!(ack["error_detail"].is_null(), "{ack}");
    }
    assert_eq!(fx.ecds_counter("update_rejected").await, 0);
    fx.stop().await;
}

/// The proxy pushes a resource again (its module's retry succeeded) while a newer upstream
/// response is still being converted: Envoy's ACK of that push goes upstream under the nonce of a
/// response Envoy has, never under that of the newer one it has not seen (which the upstream would
/// take for accepted).
async fn the_ack_of_a_push_again_never_acknowledges_a_response_still_converting(
    transport: XdsTransport,
) {
    let modules = Modules::start().await;
    let first = Remote::new(&modules.url("/first.wasm"), "first");
    let Some(fx) = Fixture::start(transport, &[], &first).await else {
        return;
    };
    fx.wait_probe(Probe::denied(), CONVERGE).await;
    let e1 = upstream_response(&fx, 0, "e1").await;
    modules.stall("/second.wasm");
    let mark = fx.up.mark();
    let second = Remote::new(&modules.url("/second.wasm"), "second");
    fx.up.set(ECDS_TYPE_URL, "e2", vec![second.resource()]);
    let e2 = upstream_response(&fx, mark, "e2").await;
    wait_for("e2 being converted", CONVERGE, || async {
        let hits = modules.hits("/second.wasm");
        (hits > 0).then_some(()).ok_or(format!("{hits} requests"))
    })
    .await;

    modules.put("/first.wasm", proxy_wasm_test_module_tagged("first"));
    fx.wait_probe(Probe::module("first", "first"), RETRY_CONVERGE)
        .await;
    let is_ack = |e: &Value| {
        e["event"] == "request" && e["type_url"] == ECDS_TYPE_URL && e["error_detail"].is_null()
    };
    let ack = fx.up.wait_event_after(mark, CONVERGE, is_ack).await;
    assert_eq!(ack["response_nonce"], e1["nonce"], "{ack}, e2: {e2}");
    assert_eq!(fx.ecds_version().await.as_deref(), Some("e1"));
    fx.stop().await;
}

/// With Always, a bump of the resource version pulls the module again (Envoy then runs the
/// server's new bytes), the same resource version does not; with IfNotPresent a bump does not.
async fn always_pulls_again_on_a_resource_version_bump_if_not_present_does_not(
    transport: XdsTransport,
) {
    let modules = Modules::start().await;
    let module = |tag: &str| proxy_wasm_test_module_tagged(tag);
    modules.put("/always.wasm", module("always-1"));
    let always = |config: &str, rv: &str| {
        Remote::new(&modules.url("/always.wasm"), config).istio_env("Always", rv)
    };
    let Some(fx) = Fixture::start(transport, &[], &always("a1", "1")).await else {
        return;
    };
    fx.wait_probe(Probe::module("a1", "always-1"), CONVERGE)
        .await;
    assert_eq!(modules.hits("/always.wasm"), 1);
    modules.put("/always.wasm", module("always-2"));
    // A push at the same resource version (a configuration change): nothing pulled.
    fx.up
        .set(ECDS_TYPE_URL, "e2", vec![always("a2", "1").resource()]);
    fx.wait_probe(Probe::module("a2", "always-1"), CONVERGE)
        .await;
    assert_eq!(modules.hits("/always.wasm"), 1, "same resource version");
    fx.up
        .set(ECDS_TYPE_URL, "e3", vec![always("a3", "2").resource()]);
    fx.wait_probe(Probe::module("a3", "always-2"), CONVERGE)
        .await;
    assert_eq!(modules.hits("/always.wasm"), 2, "resource version bumped");

    modules.put("/ifnp.wasm", module("ifnp-1"));
    let ifnp = |config: &str, rv: &str| {
        Remote::new(&modules.url("/ifnp.wasm"), config).istio_env("IfNotPresent", rv)
    };
    fx.up
        .set(ECDS_TYPE_URL, "e4", vec![ifnp("i1", "1").resource()]);
    fx.wait_probe(Probe::module("i1", "ifnp-1"), CONVERGE).await;
    modules.put("/ifnp.wasm", module("ifnp-2"));
    fx.up
        .set(ECDS_TYPE_URL, "e5", vec![ifnp("i2", "2").resource()]);
    fx.wait_probe(Probe::module("i2", "ifnp-1"), CONVERGE).await;
    fx.wait_ecds_version("e5").await;
    assert_eq!(modules.hits("/ifnp.wasm"), 1, "IfNotPresent: cached");
    assert_eq!(fx.ecds_counter("update_rejected").await, 0);
    fx.stop().await;
}

/// The upstream dies and comes back on the same port: meanwhile Envoy keeps its stream to the
/// proxy and serves the module; afterwards new versions of the new upstream (LDS and ECDS) reach
/// Envoy on that same stream.
async fn an_upstream_restart_keeps_envoy_serving_and_recovers(transport: XdsTransport) {
    let module = |tag: &str| proxy_wasm_test_module_tagged(tag);
    let http = ModuleServer::start(vec![
        ("/before.wasm", Route::Body(module("before"))),
        ("/after.wasm", Route::Body(module("after"))),
    ])
    .await;
    let before = Remote::new(&http.url("/before.wasm"), "before").istio_env("IfNotPresent", "1");
    let Some(mut fx) = Fixture::start(transport, &[], &before).await else {
        return;
    };
    fx.wait_probe(Probe::module("before", "before"), CONVERGE)
        .await;
    let streams = format!("cluster.{PROXY_CLUSTER}.upstream_rq_total");
    let opened = fx.envoy.stats().await[&streams].clone();

    let port = fx.up.port();
    fx.up.kill();
    let quiet_until = tokio::time::Instant::now() + QUIET;
    while tokio::time::Instant::now() < quiet_until {
        assert_eq!(fx.probe().await, Ok(Probe::module("before", "before")));
        let connected = fx.envoy.xds_connected_states().await;
        assert!(connected.values().all(|c| *c), "{connected:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    fx.up = Upstream::start_on(port).expect("the upstream restarts");
    fx.up.set(LDS_TYPE_URL, "l2", vec![lds_resource()]);
    let after = Remote::new(&http.url("/after.wasm"), "after").istio_env("IfNotPresent", "2");
    fx.up.set(ECDS_TYPE_URL, "e2", vec![after.resource()]);
    let open = fx
        .up
        .wait_event(CONVERGE, |e| e["event"] == "stream_open")
        .await;
    assert_eq!(
        open["node"],
        format!("proxied-{}", transport.name()),
        "{open}"
    );
    fx.wait_probe(Probe::module("after", "after"), CONVERGE)
        .await;
    fx.wait_ecds_version("e2").await;
    wait_for("envoy at LDS l2", CONVERGE, || async {
        let v = fx
            .envoy
            .stats()
            .await
            .remove("listener_manager.lds.version_text");
        (v.as_deref() == Some("l2"))
            .then_some(())
            .ok_or(format!("{v:?}"))
    })
    .await;
    assert_eq!(
        fx.envoy.stats().await[&streams],
        opened,
        "Envoy's stream stayed open"
    );
    assert_eq!(fx.ecds_counter("update_rejected").await, 0);
    fx.stop().await;
}

/// The upstream's ECDS response at `version`, sent at or after event `mark`.
async fn upstream_response(fx: &Fixture, mark: usize, version: &str) -> Value {
    let sent = |e: &Value| {
        e["event"] == "response" && e["type_url"] == ECDS_TYPE_URL && e["version"] == version
    };
    fx.up.wait_event_after(mark, CONVERGE, sent).await
}
