//! EnvoyFilters through `Driver::sync`, the path of `serve`'s rescans and relists (behavior.md
//! §10): what disappeared goes first, so a renamed EnvoyFilter is no conflict; a resource name
//! defined twice is refused once, not at every sync, and the waiting definition takes over in the
//! sync that removes the first; objects appearing together are admitted WasmPlugins first. The
//! same through `Driver::sync_changed`, which is handed only the objects that changed.

mod common;

use std::collections::BTreeMap;

use common::Harness;
use serde_json::{json, Value};
use wasm_ecds::driver::ObjectChanges;
use wasm_ecds::outcome::Outcome;
use wasm_ecds::plugin::{Object, ObjectKey};

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

/// A sync of the whole set of objects, as `Harness::sync` or through [`Incremental`].
type Sync<'a> = &'a mut dyn FnMut(&mut Harness, &[Value], &[Value], &[Value]);

/// Hands the driver only the objects that changed since the last sync
/// (`Driver::sync_changed`, the path of `serve`'s file edits and Kubernetes changes).
#[derive(Default)]
struct Incremental {
    last: [BTreeMap<ObjectKey, Value>; 3],
}

impl Incremental {
    fn sync(&mut self, h: &mut Harness, plugins: &[Value], filters: &[Value], secrets: &[Value]) {
        let by_key = |objects: &[Value]| -> BTreeMap<ObjectKey, Value> {
            (objects.iter())
                .map(|o| {
                    let m = &o["metadata"];
                    let ns = m["namespace"].as_str().unwrap_or("default");
                    (ObjectKey::new(ns, m["name"].as_str().unwrap()), o.clone())
                })
                .collect()
        };
        let now = [by_key(plugins), by_key(filters), by_key(secrets)];
        let diff = |i: usize| -> BTreeMap<ObjectKey, Option<Object>> {
            let (old, new) = (&self.last[i], &now[i]);
            let changed = (new.iter()).filter(|(k, v)| old.get(*k) != Some(*v));
            let gone = old.keys().filter(|k| !new.contains_key(*k));
            (changed.map(|(k, v)| (k.clone(), Some(Object::new(v)))))
                .chain(gone.map(|k| (k.clone(), None)))
                .collect()
        };
        let changes = ObjectChanges {
            plugins: diff(0),
            envoy_filters: diff(1),
            secrets: diff(2),
        };
        self.last = now;
        let (rt, driver) = h.parts();
        rt.block_on(async {
            let (ticket, _) = driver.sync_changed(&changes);
            driver
                .run_until_done(&ticket)
                .await
                .expect("the sync settles");
        });
    }
}

#[test]
fn renames_conflicts_and_takeovers_through_sync() {
    takeovers(&mut |h, p, f, s| h.sync(p, f, s));
}

#[test]
fn renames_conflicts_and_takeovers_through_changes_only() {
    let mut incremental = Incremental::default();
    takeovers(&mut |h, p, f, s| incremental.sync(h, p, f, s));
}

#[test]
fn a_removed_plugin_lets_the_one_refused_for_its_name_take_over_through_changes_only() {
    let mut h = Harness::new();
    h.world.publish_http(
        "files.example",
        "/m.wasm",
        b"\0asm\x01\0\0\0module".to_vec(),
    );
    let uri = "https://files.example/m.wasm";
    let plugin = json!({"apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin",
                        "metadata": {"name": "p", "namespace": "default"}, "spec": {"url": uri}});
    let other = json!({"apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin",
                       "metadata": {"name": "q", "namespace": "default"}, "spec": {"url": uri}});
    let taker = filter(
        "aaa",
        "first",
        "extensions.istio.io/wasmplugin/default.p",
        uri,
    );
    let mut sync = Incremental::default();
    sync.sync(
        &mut h,
        &[plugin, other.clone()],
        std::slice::from_ref(&taker),
        &[],
    );
    let refused: Vec<String> = h.driver.refused().map(|k| k.to_string()).collect();
    assert_eq!(
        refused,
        ["aaa/first/extensions.istio.io/wasmplugin/default.p"]
    );
    h.outcomes();
    // Only p goes (q is not touched): the patch waiting for p's resource name takes it over.
    sync.sync(&mut h, &[other], &[taker], &[]);
    assert_eq!(
        outcome_names(&mut h),
        [(
            "aaa/first/extensions.istio.io/wasmplugin/default.p".into(),
            "cached"
        )]
    );
    assert_eq!(h.driver.refused().count(), 0);
    assert_eq!(
        h.objects()
            .resource_owner("extensions.istio.io/wasmplugin/default.p"),
        Some(&key("aaa/first/extensions.istio.io/wasmplugin/default.p"))
    );
}

fn takeovers(sync: Sync) {
    let mut h = Harness::new();
    h.world.publish_http(
        "files.example",
        "/m.wasm",
        b"\0asm\x01\0\0\0module".to_vec(),
    );
    let uri = "https://files.example/m.wasm";
    sync(&mut h, &[], &[filter("ns", "a", "x", uri)], &[]);
    assert_eq!(outcome_names(&mut h), [("ns/a/x".into(), "pulled")]);

    // Renamed in one rescan: the old one goes first, the new one is served from the cache.
    sync(&mut h, &[], &[filter("ns", "b", "x", uri)], &[]);
    assert_eq!(outcome_names(&mut h), [("ns/b/x".into(), "cached")]);
    assert_eq!(h.objects().resource_owner("x"), Some(&key("ns/b/x")));

    // A second definition of x: refused once, however many rescans see it.
    let both = [filter("ns", "b", "x", uri), filter("other", "c", "x", uri)];
    sync(&mut h, &[], &both, &[]);
    let o = h.outcomes();
    assert!(
        matches!(o.as_slice(), [(k, Outcome::Invalid(f))] if *k == key("other/c/x") && f == "spec.configPatches[0].patch.value.name"),
        "{o:?}"
    );
    sync(&mut h, &[], &both, &[]);
    sync(&mut h, &[], &both, &[]);
    assert!(h.outcomes().is_empty(), "no new refusal");
    assert!(h.resources().get("x").is_some());

    // The first goes: the waiting one takes the name in the same sync.
    sync(&mut h, &[], &[filter("other", "c", "x", uri)], &[]);
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
    sync(
        &mut h,
        &[plugin],
        &[filter("other", "c", "x", uri), taker],
        &[],
    );
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
    sync(&mut h, &[], &[], &[]);
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
