use serde_json::json;

use super::*;
use crate::plugin::{parse_object, FailStrategy, Manifest, PluginType};

const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn filter(patches: Value) -> Value {
    json!({"apiVersion": "networking.istio.io/v1alpha3", "kind": "EnvoyFilter",
           "metadata": {"name": "ef", "namespace": "istio-system"},
           "spec": {"configPatches": patches}})
}

fn parse(v: Value) -> EnvoyFilter {
    match parse_object(0, v) {
        Ok(Manifest::EnvoyFilter(f)) => f,
        other => panic!("{other:?}"),
    }
}

/// An `EXTENSION_CONFIG` `ADD` patch of `name` with this `typed_config`.
fn ext(name: &str, typed_config: Value) -> Value {
    json!({"applyTo": "EXTENSION_CONFIG", "match": {"context": "GATEWAY"},
           "patch": {"operation": "ADD", "value": {"name": name, "typed_config": typed_config}}})
}

/// A direct HTTP Wasm filter with remote code at `uri`, plus `env` variables.
fn direct(uri: &str, env: Value) -> Value {
    json!({"@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
           "config": {"root_id": "root", "failure_policy": "FAIL_OPEN",
                      "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                        "value": "{\"a\":1}"},
                      "vm_config": {"vm_id": "vm", "runtime": "envoy.wasm.runtime.v8",
                                    "environment_variables": {"key_values": env},
                                    "code": {"remote": {"http_uri": {"uri": uri}}}}}})
}

fn plugin(p: &Patch) -> &WasmPlugin {
    match &p.kind {
        PatchKind::Plugin(w) => w,
        other => panic!("patch {}: {other:?}", p.index),
    }
}

fn refused(p: &Patch) -> (&Option<ObjectKey>, &str, &str) {
    match &p.kind {
        PatchKind::Refused { plugin, error } => (plugin, &error.field, &error.message),
        other => panic!("patch {}: {other:?}", p.index),
    }
}

#[test]
fn typed_struct_patch_is_a_plugin_under_its_own_name() {
    let f = parse(filter(json!([
        {"applyTo": "HTTP_FILTER", "patch": {"operation": "INSERT_BEFORE",
            "value": {"name": "istio.basic_auth"}}},
        ext("istio.basic_auth", json!({
            "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
            "type_url": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "value": {"config": {"vm_config": {"vm_id": "basic-auth", "runtime": "envoy.wasm.runtime.v8",
                "code": {"remote": {"http_uri": {"uri": "http://modules.example/basic-auth.wasm"},
                                    "sha256": SHA}}}}}})),
    ])));
    assert_eq!(
        f.notes(),
        ["configPatches[0] (HTTP_FILTER): ignored, only EXTENSION_CONFIG ADD patches are served"]
    );
    let p = plugin(&f.patches[1]);
    assert_eq!(p.key.to_string(), "istio-system/ef/istio.basic_auth");
    assert_eq!(p.resource_name(), "istio.basic_auth");
    assert_eq!(p.key.resource_name(), "istio.basic_auth");
    assert_eq!(
        filter_of(&p.key),
        Some(ObjectKey::new("istio-system", "ef"))
    );
    assert_eq!(p.spec.url, "http://modules.example/basic-auth.wasm");
    assert_eq!(p.spec.sha256.as_deref(), Some(SHA));
    assert_eq!(p.spec.fail_strategy, FailStrategy::FailClose);
    assert_eq!(p.extension.as_ref().unwrap().name, "istio.basic_auth");
    // The plugin's object is the EnvoyFilter reduced to its patch.
    assert_eq!(
        p.object.value()["spec"]["configPatches"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(p.object.value()["metadata"]["name"], "ef");
}

#[test]
fn istio_variables_give_policy_and_secret_of_the_namespace() {
    let env = json!({"ISTIO_META_WASM_IMAGE_PULL_POLICY": "Always",
                     "ISTIO_META_WASM_IMAGE_PULL_SECRET": "reg-creds", "USER": "kept"});
    let f = parse(filter(json!([ext(
        "a",
        direct("oci://r.example/f:v1", env)
    )])));
    let p = plugin(&f.patches[0]);
    assert_eq!(p.spec.image_pull_policy, ImagePullPolicy::Always);
    assert_eq!(p.spec.image_pull_secret.as_deref(), Some("reg-creds"));
    assert_eq!(p.spec.plugin_name.as_deref(), Some("root"));
    assert_eq!(p.spec.fail_strategy, FailStrategy::FailOpen);
    assert_eq!(p.spec.plugin_type, PluginType::Http);
    assert!(matches!(p.module_url(), Ok(ModuleUrl::Oci(_))));
}

#[test]
fn other_patches_local_code_and_other_filters_are_notes() {
    let local = json!({"@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
        "config": {"vm_config": {"code": {"local": {"filename": "/m.wasm"}}}}});
    let lua = json!({"@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"});
    let f = parse(filter(json!([
        {"applyTo": "CLUSTER", "patch": {"operation": "MERGE", "value": {}}},
        {"applyTo": "EXTENSION_CONFIG", "patch": {"operation": "MERGE", "value": {}}},
        {"patch": {"operation": "ADD"}},
        ext("local", local),
        ext("lua", lua),
    ])));
    let notes = f.notes();
    assert_eq!(notes.len(), 5, "{notes:?}");
    assert!(notes[0].starts_with("configPatches[0] (CLUSTER): ignored"));
    assert!(notes[1].ends_with("(operation MERGE)"), "{}", notes[1]);
    assert!(notes[2].starts_with("configPatches[2] (no applyTo)"));
    assert!(notes[3].contains("the Wasm code is local"), "{}", notes[3]);
    assert!(
        notes[4].contains("lua.v3.Lua is not a Wasm filter"),
        "{}",
        notes[4]
    );
}

#[test]
fn a_bad_patch_is_refused_on_its_path_and_the_others_still_serve() {
    let ok = direct("http://h.example/ok.wasm", json!({}));
    let f = parse(filter(json!([
        {"applyTo": "EXTENSION_CONFIG", "patch": {"operation": "ADD",
            "value": {"typed_config": ok.clone()}}},
        {"applyTo": "EXTENSION_CONFIG", "patch": {"operation": "ADD",
            "value": {"name": "x", "typed_config": ok.clone(), "disabled": true}}},
        ext("file", direct("file:///m.wasm", json!({}))),
        ext("bare", direct("r.example/f:v1", json!({}))),
        ext("inline-secret", direct("oci://r.example/f", json!({"ISTIO_META_WASM_IMAGE_PULL_SECRET": "{\"auths\":{}}"}))),
        ext("empty-secret", direct("oci://r.example/f", json!({"ISTIO_META_WASM_IMAGE_PULL_SECRET": ""}))),
        ext("policy", direct("oci://r.example/f", json!({"ISTIO_META_WASM_IMAGE_PULL_POLICY": "always"}))),
        ext("typo", json!({"@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                           "config": {"vm_config": {"vmid": "x"}}})),
        ext("ok", ok),
    ])));
    let (k, field, _) = refused(&f.patches[0]);
    assert_eq!(
        (k, field),
        (&None, "spec.configPatches[0].patch.value.name")
    );
    let (k, field, _) = refused(&f.patches[1]);
    assert_eq!(k.as_ref().unwrap().to_string(), "istio-system/ef/x");
    assert_eq!(field, "spec.configPatches[1].patch.value.disabled");
    let uri = "typed_config.config.vm_config.code.remote.http_uri.uri";
    for i in [2, 3] {
        let (_, field, message) = refused(&f.patches[i]);
        assert_eq!(field, format!("spec.configPatches[{i}].patch.value.{uri}"));
        assert!(
            message.contains("want an oci://, http:// or https:// url"),
            "{message}"
        );
    }
    let env = "typed_config.config.vm_config.environment_variables.key_values";
    for (i, var) in [(4, "SECRET"), (5, "SECRET"), (6, "POLICY")] {
        let (_, field, _) = refused(&f.patches[i]);
        let want =
            format!("spec.configPatches[{i}].patch.value.{env}.ISTIO_META_WASM_IMAGE_PULL_{var}");
        assert_eq!(field, want);
    }
    let (_, field, message) = refused(&f.patches[7]);
    assert_eq!(field, "spec.configPatches[7].patch.value.typed_config");
    assert!(
        message.contains("config.vm_config.vmid: unknown field"),
        "{message}"
    );
    assert_eq!(plugin(&f.patches[8]).key.name, "ef/ok");
}

#[test]
fn a_bad_sha256_is_named_on_the_typed_struct_path() {
    let ts = json!({"@type": "type.googleapis.com/xds.type.v3.TypedStruct",
        "type_url": "type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm",
        "value": {"config": {"vm_config": {"code": {"remote": {
            "http_uri": {"uri": "https://h.example/m.wasm"}, "sha256": "ABC"}}}}}});
    let f = parse(filter(json!([ext("n", ts)])));
    let (_, field, message) = refused(&f.patches[0]);
    assert_eq!(
        field,
        "spec.configPatches[0].patch.value.typed_config.value.config.vm_config.code.remote.sha256"
    );
    assert!(message.contains("64 lowercase hex"), "{message}");
}

#[test]
fn without_http_uri_only_the_fallback_can_be_served() {
    let tc = json!({"@type": "type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm",
        "config": {"fail_open": true, "vm_config": {"code": {"remote": {"sha256": SHA}}}}});
    let f = parse(filter(json!([ext("hintless", tc)])));
    let p = plugin(&f.patches[0]);
    assert_eq!(p.spec.url, "");
    assert_eq!(p.module_url(), Ok(ModuleUrl::NoHttpUri));
    assert_eq!(p.spec.fail_strategy, FailStrategy::FailOpen);
    assert_eq!(p.spec.plugin_type, PluginType::Network);
}

#[test]
fn a_resource_name_is_defined_once_per_object() {
    let ok = direct("http://h.example/ok.wasm", json!({}));
    let f = parse(filter(json!([ext("dup", ok.clone()), ext("dup", ok)])));
    assert_eq!(plugin(&f.patches[0]).key.name, "ef/dup");
    let (k, field, message) = refused(&f.patches[1]);
    assert_eq!(
        (k, field),
        (&None, "spec.configPatches[1].patch.value.name")
    );
    assert!(
        message.contains("already defined by spec.configPatches[0]"),
        "{message}"
    );
}

#[test]
fn editing_one_patch_leaves_its_siblings_objects_alone() {
    let a = ext("a", direct("http://h.example/a.wasm", json!({})));
    let b = ext("b", direct("http://h.example/b.wasm", json!({})));
    let b2 = ext("b", direct("http://h.example/b2.wasm", json!({})));
    let before = parse(filter(json!([a.clone(), b])));
    let after = parse(filter(json!([b2, a])));
    let obj = |f: &EnvoyFilter, i: usize| plugin(&f.patches[i]).object.clone();
    assert_eq!(
        obj(&before, 0),
        obj(&after, 1),
        "a moved and did not change"
    );
    assert_ne!(obj(&before, 1), obj(&after, 0));
    let mut labelled = filter(json!([a]));
    labelled["metadata"]["labels"] = json!({"team": "edge"});
    assert_ne!(
        obj(&before, 0),
        obj(&parse(labelled), 0),
        "metadata is every patch's"
    );
}

#[test]
fn object_level_problems_refuse_the_whole_object() {
    let mut v = filter(json!({}));
    let e = parse_object(0, v.clone()).unwrap_err();
    assert_eq!(
        (e.field.as_str(), e.message.as_str()),
        ("spec.configPatches", "must be a list")
    );
    v["apiVersion"] = json!("extensions.istio.io/v1alpha1");
    assert_eq!(parse_object(0, v.clone()).unwrap_err().field, "apiVersion");
    v["apiVersion"] = json!("networking.istio.io/v1beta1");
    v["metadata"]["name"] = json!("a/b");
    assert_eq!(parse_object(0, v).unwrap_err().field, "metadata.name");
    assert!(parse(
        json!({"apiVersion": "networking.istio.io/v1alpha3", "kind": "EnvoyFilter",
                         "metadata": {"name": "empty"}})
    )
    .patches
    .is_empty());
}

#[test]
fn http_uri_timeout_bounds_the_pull() {
    let mut with_timeout = direct("https://h/m.wasm", json!({}));
    with_timeout["config"]["vm_config"]["code"]["remote"]["http_uri"]["timeout"] = json!("2.5s");
    let f = parse(filter(json!([
        ext("a", with_timeout),
        ext("b", direct("https://h/m.wasm", json!({})))
    ])));
    assert_eq!(
        plugin(&f.patches[0]).pull_timeout(),
        Some(std::time::Duration::from_millis(2500))
    );
    assert!(crate::plugin::validate(plugin(&f.patches[0])).is_empty());
    assert_eq!(plugin(&f.patches[1]).pull_timeout(), None);
}
