use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::{
    data_source, http_uri, AsyncDataSource, DataSource, HttpUri, RemoteDataSource,
};
use envoy_types::pb::envoy::extensions::wasm::v3::{EnvironmentVariables, VmConfig};
use envoy_types::pb::google::protobuf::Duration;
use serde_json::json;

use super::*;

fn remote_config(env: &[(&str, &str)], sha: &str) -> PluginConfig {
    PluginConfig {
        name: "basic_auth".into(),
        root_id: "basic_auth_root".into(),
        failure_policy: FailurePolicy::FailOpen as i32,
        vm: Some(plugin_config::Vm::VmConfig(VmConfig {
            vm_id: "basic_auth".into(),
            runtime: "envoy.wasm.runtime.v8".into(),
            code: Some(AsyncDataSource {
                specifier: Some(async_data_source::Specifier::Remote(RemoteDataSource {
                    http_uri: Some(HttpUri {
                        uri: "oci://r/basic-auth:1.0".into(),
                        timeout: Some(Duration {
                            seconds: 30,
                            nanos: 0,
                        }),
                        http_upstream_type: Some(http_uri::HttpUpstreamType::Cluster("_".into())),
                    }),
                    sha256: sha.into(),
                    retry_policy: None,
                })),
            }),
            environment_variables: Some(EnvironmentVariables {
                host_env_keys: vec![],
                key_values: env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<HashMap<_, _>>(),
            }),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn resource(name: &str, type_url: &str, value: Vec<u8>) -> Any {
    let ec = TypedExtensionConfig {
        name: name.into(),
        typed_config: Some(Any {
            type_url: type_url.into(),
            value,
        }),
    };
    Any {
        type_url: crate::xds::ECDS_TYPE_URL.into(),
        value: ec.encode_to_vec(),
    }
}

#[test]
fn istio_variables_are_read_and_stripped() {
    let config = remote_config(
        &[
            (ENV_PULL_SECRET, "{\"auths\":{}}"),
            (ENV_PULL_POLICY, "Always"),
            (ENV_RESOURCE_VERSION, "42"),
            ("ISTIO_META_OTHER", "x"),
            ("USER_VAR", "kept"),
        ],
        "nil",
    );
    let wasm = HttpWasm {
        config: Some(config),
    };
    let r = resource("istio.basic_auth", HTTP_WASM_TYPE_URL, wasm.encode_to_vec());
    let Classified::Remote(t, code) = classify(&r).unwrap() else {
        panic!()
    };
    assert_eq!(t.name, "istio.basic_auth");
    assert_eq!(t.kind, FilterKind::Http);
    assert_eq!(t.fail_strategy(), FailStrategy::FailOpen);
    let Some(plugin_config::Vm::VmConfig(vm)) = &t.config.vm else {
        panic!()
    };
    let env = &vm.environment_variables.as_ref().unwrap().key_values;
    assert_eq!(env.len(), 1, "{env:?}");
    assert_eq!(env["USER_VAR"], "kept");
    assert_eq!(
        code,
        RemoteCode {
            uri: "oci://r/basic-auth:1.0".into(),
            sha256: None,
            timeout: Some(std::time::Duration::from_secs(30)),
            pull_policy: ImagePullPolicy::Always,
            pull_secret: PullSecretEnv::Given("{\"auths\":{}}".into()),
            resource_version: Some("42".into()),
        }
    );
    let spec = code.spec(&t, Some("s".into()));
    assert_eq!(spec.plugin_name.as_deref(), Some("basic_auth_root"));
    assert_eq!(spec.image_pull_secret.as_deref(), Some("s"));
}

#[test]
fn only_istio_variables_leave_no_env_and_empty_secret_is_missing() {
    let config = remote_config(&[(ENV_PULL_SECRET, "")], "abc");
    let r = resource(
        "n",
        NETWORK_WASM_TYPE_URL,
        NetworkWasm {
            config: Some(config),
        }
        .encode_to_vec(),
    );
    let Classified::Remote(t, code) = classify(&r).unwrap() else {
        panic!()
    };
    assert_eq!(t.kind, FilterKind::Network);
    let Some(plugin_config::Vm::VmConfig(vm)) = &t.config.vm else {
        panic!()
    };
    assert_eq!(vm.environment_variables, None);
    assert_eq!(code.pull_secret, PullSecretEnv::Missing);
    assert_eq!(code.sha256.as_deref(), Some("abc"));
}

#[test]
fn typed_struct_resource_is_converted() {
    let value = json!({"config": {"root_id": "r", "vm_config": {"runtime": "envoy.wasm.runtime.v8",
        "code": {"remote": {"http_uri": {"uri": "https://h/m.wasm"}, "sha256": "s"}}}}});
    for url in [TYPED_STRUCT_UDPA_TYPE_URL, TYPED_STRUCT_XDS_TYPE_URL] {
        let ts = TypedStruct {
            type_url: HTTP_WASM_TYPE_URL.into(),
            value: Some(json::json_to_struct(value.as_object().unwrap())),
        };
        let r = resource("x", url, ts.encode_to_vec());
        let Classified::Remote(t, code) = classify(&r).unwrap() else {
            panic!()
        };
        assert_eq!(t.config.root_id, "r");
        assert_eq!(
            (code.uri.as_str(), code.timeout),
            ("https://h/m.wasm", None)
        );
        assert_eq!(t.fail_strategy(), FailStrategy::FailClose);
    }
}

#[test]
fn passthrough_hint_and_errors() {
    // Local code, other filters, other TypedStruct types: passed through.
    let mut local = remote_config(&[], "");
    if let Some(plugin_config::Vm::VmConfig(vm)) = local.vm.as_mut() {
        vm.code = Some(AsyncDataSource {
            specifier: Some(async_data_source::Specifier::Local(DataSource {
                specifier: Some(data_source::Specifier::Filename("/m.wasm".into())),
                ..Default::default()
            })),
        });
    }
    let wasm = HttpWasm {
        config: Some(local),
    };
    let r = resource("l", HTTP_WASM_TYPE_URL, wasm.encode_to_vec());
    assert_eq!(classify(&r).unwrap(), Classified::Passthrough);
    let r = resource("rbac", crate::convert::HTTP_RBAC_TYPE_URL, vec![]);
    assert_eq!(classify(&r).unwrap(), Classified::Passthrough);
    let j = json!({"@type": TYPED_STRUCT_UDPA_TYPE_URL, "type_url": "type.googleapis.com/x.Y", "value": {}});
    assert_eq!(classify_json("x", &j).unwrap(), Classified::Passthrough);

    // Remote without http_uri: the fallback only.
    let mut hint = remote_config(&[], "");
    if let Some(plugin_config::Vm::VmConfig(vm)) = hint.vm.as_mut() {
        vm.code = Some(AsyncDataSource {
            specifier: Some(async_data_source::Specifier::Remote(Default::default())),
        });
    }
    let wasm = HttpWasm { config: Some(hint) };
    let r = resource("h", HTTP_WASM_TYPE_URL, wasm.encode_to_vec());
    assert!(matches!(classify(&r).unwrap(), Classified::MissingHint(_)));

    // Unreadable: garbage, no typed_config, no code at all.
    let garbage = Any {
        type_url: crate::xds::ECDS_TYPE_URL.into(),
        value: vec![0xff, 0xff, 0xff],
    };
    assert!(classify(&garbage)
        .unwrap_err()
        .starts_with("failed to unmarshal"));
    let none = Any {
        type_url: crate::xds::ECDS_TYPE_URL.into(),
        value: TypedExtensionConfig {
            name: "e".into(),
            typed_config: None,
        }
        .encode_to_vec(),
    };
    assert!(classify(&none).unwrap_err().contains("no typed_config"));
    let r = resource("g", HTTP_WASM_TYPE_URL, vec![0xff, 0x01]);
    assert!(classify(&r)
        .unwrap_err()
        .contains("invalid Wasm HTTP filter"));
    let j = json!({"@type": HTTP_WASM_TYPE_URL, "config": {"vm_config": {"runtime": "v8"}}});
    assert!(classify_json("c", &j)
        .unwrap_err()
        .contains("neither remote nor local code"));
}

#[test]
fn envoy_filter_json_forms() {
    // The form of Istio's "Distributing WebAssembly Modules" page: TypedStruct, camel or snake.
    let j = json!({
        "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
        "type_url": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
        "value": {"config": {
            "root_id": "basic_auth_root",
            "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                              "value": "{\"basic_auth_rules\": []}"},
            "vm_config": {"vm_id": "basic_auth", "runtime": "envoy.wasm.runtime.v8",
              "code": {"remote": {"http_uri": {"uri": "https://h/basic-auth.wasm"},
                                  "sha256": "d5f2"}}}}}
    });
    let Classified::Remote(t, code) = classify_json("istio.basic_auth", &j).unwrap() else {
        panic!()
    };
    assert_eq!(t.config.root_id, "basic_auth_root");
    assert!(t.config.configuration.is_some());
    assert_eq!(code.sha256.as_deref(), Some("d5f2"));
    let direct = json!({"@type": HTTP_WASM_TYPE_URL, "config": {"vmConfig": {"code": {"remote":
        {"httpUri": {"uri": "oci://r/m:v1", "timeout": "10s"}}}}}});
    let Classified::Remote(_, code) = classify_json("d", &direct).unwrap() else {
        panic!()
    };
    assert_eq!(code.timeout, Some(std::time::Duration::from_secs(10)));
    let typo = json!({"@type": TYPED_STRUCT_UDPA_TYPE_URL, "type_url": HTTP_WASM_TYPE_URL,
        "value": {"config": {"vm_confg": {}}}});
    let e = classify_json("t", &typo).unwrap_err();
    assert!(e.contains("unknown field `vm_confg`"), "{e}");
}

#[test]
fn conversion_replaces_only_the_code() {
    use crate::convert::{decode_code, decode_delivered, from_template, Code, Delivered, Filter};
    let config = remote_config(&[(ENV_PULL_POLICY, "Always"), ("K", "v")], "");
    let r = resource(
        "istio.basic_auth",
        HTTP_WASM_TYPE_URL,
        HttpWasm {
            config: Some(config.clone()),
        }
        .encode_to_vec(),
    );
    let Classified::Remote(t, _) = classify(&r).unwrap() else {
        panic!()
    };
    let out = from_template(&t, Filter::Wasm(Code::File("/cache/m.wasm".into())));
    assert_eq!(out.name, "istio.basic_auth");
    assert_eq!(decode_code(&out), Some(Code::File("/cache/m.wasm".into())));
    let tc = out.typed_config.unwrap();
    let got = HttpWasm::decode(tc.value.as_slice())
        .unwrap()
        .config
        .unwrap();
    let mut want = config;
    if let (Some(plugin_config::Vm::VmConfig(w)), Some(plugin_config::Vm::VmConfig(g))) =
        (want.vm.as_mut(), got.vm.as_ref())
    {
        w.code = g.code.clone();
        w.environment_variables
            .as_mut()
            .unwrap()
            .key_values
            .remove(ENV_PULL_POLICY);
    }
    assert_eq!(
        got, want,
        "everything but the code and the agent's variables is kept"
    );
    let deny = from_template(&t, Filter::DenyAll);
    assert_eq!(deny.name, "istio.basic_auth");
    assert_eq!(decode_delivered(&deny), Some(Delivered::DenyAll));
}
