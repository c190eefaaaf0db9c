//! EnvoyFilters through `Driver::sync`, the path of `serve`'s rescans and relists (behavior.md
//! §10): what disappeared goes first, so a renamed EnvoyFilter is no conflict; a resource name
//! defined twice is refused once, not at every sync, and the waiting definition takes over in the
//! sync that removes the first; objects appearing together are admitted WasmPlugins first.

mod common;

use common::Harness;
use serde_json::{json, Value};
use wasm_ecds::outcome::Outcome;
use wasm_ecds::plugin::ObjectKey;

fn filter(ns: &str, name: &str, resource: &str, uri: &str) -> Value {
    json!({"apiVersion": "networking.istio.io/v1alpha3", "kind": "EnvoyFilter",
           "metadata": {"name": name, "namespace": ns},
           "spec": {"configPatches": [{"applyTo": "EXTENSION_CONFIG", "patch": {"operation": "ADD",
               "value": {"name": resource, "typed_config": {
                   "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                   "config": {"vm_config": {"code": {"remote": {"http_uri": {"uri": uri}}}}}}}}}]}})
}

fn key(s: &str) -> ObjectKey {
    ObjectKey::parse(s).unwrap()
}

fn outcome_names(h: &mut Harness) -> Vec<(String, &'static str)> {
    (h.outcomes().into_iter())
        .map(|(k, o)| (k.to_string(), o.name()))
        .collect()
}

#[test]
fn renames_conflicts_and_takeovers_through_sync() {
    let mut h = Harness::new();
    h.world.publish_http(
        "files.example",
        "/m.wasm",
        b"\0asm\x01\0\0\0module".to_vec(),
    );
    let uri = "https://files.example/m.wasm";
    h.sync(&[], &[filter("ns", "a", "x", uri)], &[]);
    assert_eq!(outcome_names(&mut h), [("ns/a/x".into(), "pulled")]);

    // Renamed in one rescan: the old one goes first, the new one is served from the cache.
    h.sync(&[], &[filter("ns", "b", "x", uri)], &[]);
    assert_eq!(outcome_names(&mut h), [("ns/b/x".into(), "cached")]);
    assert_eq!(h.objects().resource_owner("x"), Some(&key("ns/b/x")));

    // A second definition of x: refused once, however many rescans see it.
    let both = [filter("ns", "b", "x", uri), filter("other", "c", "x", uri)];
    h.sync(&[], &both, &[]);
    let o = h.outcomes();
    assert!(
        matches!(o.as_slice(), [(k, Outcome::Invalid(f))] if *k == key("other/c/x") && f == "spec.configPatches[0].patch.value.name"),
        "{o:?}"
    );
    h.sync(&[], &both, &[]);
    h.sync(&[], &both, &[]);
    assert!(h.outcomes().is_empty(), "no new refusal");
    assert!(h.resources().get("x").is_some());

    // The first goes: the waiting one takes the name in the same sync.
    h.sync(&[], &[filter("other", "c", "x", uri)], &[]);
    assert_eq!(outcome_names(&mut h), [("other/c/x".into(), "cached")]);
    assert_eq!(h.objects().resource_owner("x"), Some(&key("other/c/x")));
    assert!(h.resources().get("x").is_some());

    // Appearing together, a WasmPlugin is admitted before a patch taking its resource name.
    let plugin = json!({"apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin",
                        "metadata": {"name": "p", "namespace": "default"}, "spec": {"url": uri}});
    let taker = filter(
        "aaa",
        "first",
        "extensions.istio.io/wasmplugin/default.p",
        uri,
    );
    h.sync(&[plugin], &[filter("other", "c", "x", uri), taker], &[]);
    let mut o = outcome_names(&mut h);
    o.sort();
    assert_eq!(
        o,
        [
            (
                "aaa/first/extensions.istio.io/wasmplugin/default.p".into(),
                "invalid"
            ),
            ("default/p".into(), "cached")
        ]
    );
    // Everything gone: nothing served, no refusal left.
    h.sync(&[], &[], &[]);
    assert!(h.resources().is_empty());
    assert_eq!(h.driver.refused().count(), 0);
}

#[test]
fn applying_the_stored_object_again_clears_its_refusal() {
    let mut h = Harness::new();
    h.world.publish_http(
        "files.example",
        "/m.wasm",
        b"\0asm\x01\0\0\0module".to_vec(),
    );
    let good = filter("ns", "a", "x", "https://files.example/m.wasm");
    h.apply(good.clone());
    h.apply(filter("ns", "a", "x", "ftp://files.example/m.wasm"));
    let refused: Vec<String> = h.driver.refused().map(|k| k.to_string()).collect();
    assert_eq!(refused, ["ns/a/x"]);
    // Back to what is stored: nothing to process, and nothing refused any more.
    h.apply(good);
    assert_eq!(h.driver.refused().count(), 0);
    assert_eq!(h.objects().resource_owner("x"), Some(&key("ns/a/x")));
}
