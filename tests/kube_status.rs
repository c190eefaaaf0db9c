//! What the Kubernetes source publishes from the driver, without an API server: the desired status
//! of a plugin (`k8s::status::desired`) waits for the processing of the plugin's *current*
//! version, and `Driver::next` returns for work that finished while its caller was busy — the
//! two halves of a stale `Ready` condition seen once in 20 runs on a real API server — and the
//! `Conflict` reason of a plugin whose ECDS resource name an EnvoyFilter patch serves.

mod common;

use std::time::Duration;

use common::{plugin, Harness};
use serde_json::json;
use wasm_ecds::k8s::status::{self, Generations};
use wasm_ecds::plugin::ObjectKey;

fn module() -> Vec<u8> {
    b"\0asm\x01\0\0\0".to_vec()
}

#[test]
fn status_waits_for_the_current_version_to_be_processed() {
    let mut h = Harness::new();
    h.world.publish_http("mods.test", "/a.wasm", module());
    h.world
        .publish_http("mods.test", "/b.wasm", b"not wasm".to_vec());
    let key = ObjectKey::new("ns", "p");
    let gens = |accepted| Generations {
        accepted: Some(accepted),
        current: Some(accepted),
    };
    h.apply(plugin("ns", "p", json!({"url": "http://mods.test/a.wasm"})));
    let ready = status::desired(&h.driver, &key, gens(1), None).expect("processed");
    assert_eq!(ready.conditions[1].reason, "Pulled");
    assert_eq!(ready.observed_generation, Some(1));

    // A new version whose processing has not finished: nothing to say yet, although the engine
    // still holds the previous version's outcome.
    let (rt, driver) = h.parts();
    let applied = {
        let _context = rt.enter();
        driver.apply(&plugin(
            "ns",
            "p",
            json!({"url": "http://mods.test/b.wasm"}),
        ))
    };
    assert_eq!(
        driver
            .engine()
            .plugin(&key)
            .unwrap()
            .last_outcome
            .as_ref()
            .map(|o| o.name()),
        Some("pulled")
    );
    assert_eq!(status::desired(driver, &key, gens(2), None), None);
    rt.block_on(driver.run_until_done(&applied.ticket)).unwrap();
    let failed = status::desired(driver, &key, gens(2), None).expect("processed");
    assert_eq!(failed.observed_generation, Some(2));
    assert_eq!(failed.conditions[1].status, "False");
    assert_eq!(failed.conditions[1].reason, "InvalidModule");
}

#[test]
fn next_returns_for_work_that_finished_while_the_caller_was_busy() {
    let mut h = Harness::new();
    h.world.publish_http("mods.test", "/a.wasm", module());
    let key = ObjectKey::new("ns", "p");
    let (rt, driver) = h.parts();
    rt.block_on(async {
        driver.apply(&plugin(
            "ns",
            "p",
            json!({"url": "http://mods.test/a.wasm"}),
        ));
        // The job runs to its end while nobody polls the driver (serve's loop handling a command).
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(driver.engine().plugin(&key).unwrap().last_outcome.is_none());
        // The next event is the finished job: `next` commits it and returns, rather than
        // committing it and then waiting for another event (an hour away: the purge pass).
        tokio::time::timeout(Duration::from_secs(1), driver.next())
            .await
            .expect("next returns at once");
        assert_eq!(
            driver
                .engine()
                .plugin(&key)
                .unwrap()
                .last_outcome
                .as_ref()
                .map(|o| o.name()),
            Some("pulled")
        );
    });
}

/// A WasmPlugin whose ECDS resource name an EnvoyFilter patch already serves is refused with
/// reason `Conflict` (behavior.md §10), and accepted once the patch is gone.
#[test]
fn a_resource_name_taken_by_an_envoy_filter_patch_is_a_conflict() {
    let mut h = Harness::new();
    h.world.publish_http("mods.test", "/a.wasm", module());
    let url = "http://mods.test/a.wasm";
    let patch = json!({"applyTo": "EXTENSION_CONFIG", "patch": {"operation": "ADD", "value": {
        "name": "extensions.istio.io/wasmplugin/ns.p", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {"vm_config": {"code": {"remote": {"http_uri": {"uri": url}}}}}}}}});
    h.apply(
        json!({"apiVersion": "networking.istio.io/v1alpha3", "kind": "EnvoyFilter",
                   "metadata": {"name": "taker", "namespace": "other"},
                   "spec": {"configPatches": [patch]}}),
    );
    h.apply(plugin("ns", "p", json!({"url": url})));
    let key = ObjectKey::new("ns", "p");
    let gens = Generations {
        accepted: None,
        current: Some(1),
    };
    let s = status::desired(&h.driver, &key, gens, None).expect("refused");
    let accepted = &s.conditions[0];
    assert_eq!(
        (accepted.status, accepted.reason.as_str()),
        ("False", "Conflict")
    );
    assert!(
        accepted.message.starts_with("metadata.name: "),
        "{}",
        accepted.message
    );
    assert!(
        accepted.message.contains("other/taker/"),
        "{}",
        accepted.message
    );
    h.delete_envoy_filter(&ObjectKey::new("other", "taker"));
    let s = status::desired(&h.driver, &key, gens, None).expect("processed");
    assert_eq!(s.conditions[0].reason, "Accepted");
    assert_eq!(s.conditions[1].reason, "Cached");
}
