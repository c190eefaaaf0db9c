//! Conversion of a plugin's serving state into the ECDS resource Envoy receives (behavior.md §7):
//! a `TypedExtensionConfig` holding the Wasm filter (HTTP or network) with the module delivered
//! by file path, inline bytes or remote URL, or an RBAC allow-all / deny-all fallback.
//!
//! This is the only module that builds Envoy protobuf types from domain types (style guide §1:
//! convert wire ↔ domain once, at the edge).

use std::collections::HashMap;
use std::path::PathBuf;

use envoy_types::pb::envoy::config::core::v3::{
    async_data_source, data_source, AsyncDataSource, BackoffStrategy, DataSource, HttpUri,
    RemoteDataSource, RetryPolicy, TypedExtensionConfig,
};
use envoy_types::pb::envoy::config::rbac::v3::Rbac as RbacRules;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm as HttpWasm;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::extensions::filters::network::wasm::v3::Wasm as NetworkWasm;
use envoy_types::pb::envoy::extensions::wasm::v3::{
    plugin_config, EnvironmentVariables, FailurePolicy, PluginConfig, VmConfig,
};
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration, StringValue, UInt32Value};
use prost::Message;

use crate::extension::{FilterKind, Template};
use crate::plugin::{EnvValueSource, FailStrategy, PluginType, WasmPlugin};

pub const HTTP_WASM_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
pub const NETWORK_WASM_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm";
pub const HTTP_RBAC_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
pub const NETWORK_RBAC_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC";
pub const STRING_VALUE_TYPE_URL: &str = "type.googleapis.com/google.protobuf.StringValue";
/// Name of the Envoy cluster that must point at the admin address for `--delivery http`.
pub const MODULES_CLUSTER: &str = "wasm_ecds_modules";
/// Path prefix of the module endpoint on the admin address.
pub const MODULES_PATH: &str = "/modules/";
/// Retries of Envoy's own fetch of a module from [`MODULES_CLUSTER`] (Envoy's default is 1),
/// spaced by a backoff from [`MODULE_FETCH_BACKOFF`] up to ten times it (docs/behavior.md).
pub const MODULE_FETCH_RETRIES: u32 = 5;
pub const MODULE_FETCH_BACKOFF: std::time::Duration = std::time::Duration::from_secs(1);
pub const WASM_RUNTIME_V8: &str = "envoy.wasm.runtime.v8";
pub const ALLOW_STAT_PREFIX: &str = "wasm-default-allow";
pub const DENY_STAT_PREFIX: &str = "wasm-default-deny";

/// How the module's code reaches the proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Code {
    /// `vm_config.code.local.filename`.
    File(PathBuf),
    /// `vm_config.code.local.inline_bytes`.
    Inline(Vec<u8>),
    /// `vm_config.code.remote`: the server's own module endpoint.
    Remote {
        uri: String,
        cluster: String,
        sha256: String,
    },
}

/// What to build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Filter {
    Wasm(Code),
    AllowAll,
    DenyAll,
}

fn any<M: Message>(type_url: &str, m: &M) -> Any {
    Any {
        type_url: type_url.to_string(),
        value: m.encode_to_vec(),
    }
}

/// The fallback a fail strategy asks for when there is no module (behavior.md §7): allow-all for
/// `FAIL_OPEN`, deny-all otherwise.
pub fn fallback_for(fail: FailStrategy) -> Filter {
    match fail {
        FailStrategy::FailOpen => Filter::AllowAll,
        FailStrategy::FailClose | FailStrategy::FailReload => Filter::DenyAll,
    }
}

/// Builds the ECDS resource for a plugin.
pub fn extension_config(plugin: &WasmPlugin, filter: Filter) -> TypedExtensionConfig {
    if let Some(template) = &plugin.extension {
        return from_template(template, filter);
    }
    let network = plugin.spec.plugin_type == PluginType::Network;
    let typed_config = match filter {
        Filter::Wasm(code) => {
            let config = Some(plugin_config(plugin, code));
            wasm_any(network, config)
        }
        Filter::AllowAll | Filter::DenyAll => fallback(network, filter == Filter::DenyAll),
    };
    TypedExtensionConfig {
        name: plugin.resource_name(),
        typed_config: Some(typed_config),
    }
}

/// Builds the resource of a remote-load extension config: its own filter config with the code
/// replaced (nothing else changes), or the RBAC fallback under its name.
pub fn from_template(template: &Template, filter: Filter) -> TypedExtensionConfig {
    let network = template.kind == FilterKind::Network;
    let typed_config = match filter {
        Filter::Wasm(code) => {
            let mut config = template.config.clone();
            if let Some(plugin_config::Vm::VmConfig(vm)) = config.vm.as_mut() {
                // Envoy keys a remote module's VM on `vm_id` before fetching it (see
                // `plugin_config`): a config that sets none gets the module's sha256.
                if let Code::Remote { sha256, .. } = &code {
                    if vm.vm_id.is_empty() {
                        vm.vm_id = sha256.clone();
                    }
                }
                vm.code = Some(code_source(code));
            }
            wasm_any(network, Some(config))
        }
        Filter::AllowAll | Filter::DenyAll => fallback(network, filter == Filter::DenyAll),
    };
    TypedExtensionConfig {
        name: template.name.clone(),
        typed_config: Some(typed_config),
    }
}

fn wasm_any(network: bool, config: Option<PluginConfig>) -> Any {
    if network {
        any(NETWORK_WASM_TYPE_URL, &NetworkWasm { config })
    } else {
        any(HTTP_WASM_TYPE_URL, &HttpWasm { config })
    }
}

/// The RBAC allow-all or deny-all filter standing in for a Wasm filter.
fn fallback(network: bool, deny: bool) -> Any {
    // ALLOW with no policies denies everything; no rules at all allows everything.
    let rules = deny.then(RbacRules::default);
    let prefix = if deny {
        DENY_STAT_PREFIX
    } else {
        ALLOW_STAT_PREFIX
    };
    if network {
        any(
            NETWORK_RBAC_TYPE_URL,
            &NetworkRbac {
                rules,
                stat_prefix: prefix.into(),
                ..Default::default()
            },
        )
    } else {
        any(
            HTTP_RBAC_TYPE_URL,
            &HttpRbac {
                rules,
                rules_stat_prefix: prefix.into(),
                ..Default::default()
            },
        )
    }
}

/// `vm_config.code` for a delivery.
fn code_source(code: Code) -> AsyncDataSource {
    let specifier = match code {
        Code::File(path) => async_data_source::Specifier::Local(DataSource {
            specifier: Some(data_source::Specifier::Filename(
                path.to_string_lossy().into_owned(),
            )),
            ..Default::default()
        }),
        Code::Inline(bytes) => async_data_source::Specifier::Local(DataSource {
            specifier: Some(data_source::Specifier::InlineBytes(bytes)),
            ..Default::default()
        }),
        Code::Remote {
            uri,
            cluster,
            sha256,
        } => async_data_source::Specifier::Remote(RemoteDataSource {
            // Only our own module endpoint: a remote-delivery resource is Istio's, converted by
            // a proxy, and keeps Envoy's defaults.
            retry_policy: (cluster == MODULES_CLUSTER).then(module_fetch_retries),
            http_uri: Some(HttpUri {
                uri,
                timeout: Some(PbDuration {
                    seconds: 30,
                    nanos: 0,
                }),
                http_upstream_type: Some(
                    envoy_types::pb::envoy::config::core::v3::http_uri::HttpUpstreamType::Cluster(
                        cluster,
                    ),
                ),
            }),
            sha256,
        }),
    };
    AsyncDataSource {
        specifier: Some(specifier),
    }
}

/// Envoy's retries of a fetch from the module endpoint.
fn module_fetch_retries() -> RetryPolicy {
    let secs = MODULE_FETCH_BACKOFF.as_secs() as i64;
    RetryPolicy {
        retry_back_off: Some(BackoffStrategy {
            base_interval: Some(PbDuration {
                seconds: secs,
                nanos: 0,
            }),
            max_interval: Some(PbDuration {
                seconds: secs * 10,
                nanos: 0,
            }),
        }),
        num_retries: Some(UInt32Value {
            value: MODULE_FETCH_RETRIES,
        }),
        ..Default::default()
    }
}

fn plugin_config(plugin: &WasmPlugin, code: Code) -> PluginConfig {
    let spec = &plugin.spec;
    let configuration = plugin.plugin_config().map(|c| {
        let json = serde_json::to_string(&c).expect("a JSON map serializes");
        any(STRING_VALUE_TYPE_URL, &StringValue { value: json })
    });
    // Envoy keys a remote module's VM before fetching it, on `vm_id` and the (still empty) code:
    // without a `vm_id` naming the module, every remote module after the first would run the
    // first one's code (`createWasm` in Envoy's `source/extensions/common/wasm/wasm.cc`).
    let vm_id = match &code {
        Code::Remote { sha256, .. } => sha256.clone(),
        Code::File(_) | Code::Inline(_) => String::new(),
    };
    let env = spec
        .vm_config
        .as_ref()
        .filter(|v| !v.env.is_empty())
        .map(|v| {
            let mut host_env_keys = Vec::new();
            let mut key_values = HashMap::new();
            for e in &v.env {
                match e.value_from {
                    EnvValueSource::Host => host_env_keys.push(e.name.clone()),
                    EnvValueSource::Inline => {
                        key_values.insert(e.name.clone(), e.value.clone());
                    }
                }
            }
            EnvironmentVariables {
                host_env_keys,
                key_values,
            }
        });
    let vm = VmConfig {
        vm_id,
        runtime: WASM_RUNTIME_V8.to_string(),
        code: Some(code_source(code)),
        environment_variables: env,
        ..Default::default()
    };
    let failure_policy = match spec.fail_strategy {
        FailStrategy::FailOpen => FailurePolicy::FailOpen,
        FailStrategy::FailClose => FailurePolicy::FailClosed,
        FailStrategy::FailReload => FailurePolicy::FailReload,
    };
    // Only `failure_policy`, as Istio sets it: Envoy rejects a config that sets it together with
    // the deprecated `fail_open` ("only one of fail_open or failure_policy can be set").
    PluginConfig {
        name: plugin.filter_config_name(),
        root_id: spec.plugin_name.clone().unwrap_or_default(),
        configuration,
        failure_policy: failure_policy as i32,
        vm: Some(plugin_config::Vm::VmConfig(vm)),
        ..Default::default()
    }
}

/// The code bytes or path carried by a Wasm resource, for tests and the simulator.
pub fn decode_code(config: &TypedExtensionConfig) -> Option<Code> {
    let any = config.typed_config.as_ref()?;
    let pc = match any.type_url.as_str() {
        HTTP_WASM_TYPE_URL => HttpWasm::decode(any.value.as_slice()).ok()?.config?,
        NETWORK_WASM_TYPE_URL => NetworkWasm::decode(any.value.as_slice()).ok()?.config?,
        _ => return None,
    };
    let plugin_config::Vm::VmConfig(vm) = pc.vm?;
    match vm.code?.specifier? {
        async_data_source::Specifier::Local(ds) => match ds.specifier? {
            data_source::Specifier::InlineBytes(b) => Some(Code::Inline(b)),
            data_source::Specifier::Filename(f) => Some(Code::File(PathBuf::from(f))),
            _ => None,
        },
        async_data_source::Specifier::Remote(r) => {
            let h = r.http_uri?;
            let cluster = match h.http_upstream_type {
                Some(
                    envoy_types::pb::envoy::config::core::v3::http_uri::HttpUpstreamType::Cluster(
                        c,
                    ),
                ) => c,
                _ => String::new(),
            };
            Some(Code::Remote {
                uri: h.uri,
                cluster,
                sha256: r.sha256,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin(spec: &str) -> WasmPlugin {
        WasmPlugin::from_yaml(&format!(
            "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: p, namespace: ns}}\nspec: {spec}"
        ))
        .unwrap()
    }

    #[test]
    fn wasm_filter_fields() {
        let p = plugin("{url: r/a, pluginName: root, pluginConfig: {a: 1}, failStrategy: FAIL_OPEN, vmConfig: {env: [{name: H, valueFrom: HOST}, {name: K, value: v}]}}");
        let c = extension_config(&p, Filter::Wasm(Code::File(PathBuf::from("/c/x.wasm"))));
        assert_eq!(c.name, "extensions.istio.io/wasmplugin/ns.p");
        let any = c.typed_config.clone().unwrap();
        assert_eq!(any.type_url, HTTP_WASM_TYPE_URL);
        let pc = HttpWasm::decode(any.value.as_slice())
            .unwrap()
            .config
            .unwrap();
        #[allow(deprecated)]
        let fail_open = pc.fail_open;
        // Envoy refuses `fail_open` together with `failure_policy`.
        assert_eq!(
            (pc.name.as_str(), pc.root_id.as_str(), fail_open),
            ("ns.p", "root", false)
        );
        assert_eq!(pc.failure_policy, FailurePolicy::FailOpen as i32);
        let cfg = StringValue::decode(pc.configuration.unwrap().value.as_slice()).unwrap();
        assert_eq!(cfg.value, r#"{"a":1}"#);
        let plugin_config::Vm::VmConfig(vm) = pc.vm.unwrap();
        assert_eq!(vm.runtime, WASM_RUNTIME_V8);
        let env = vm.environment_variables.unwrap();
        assert_eq!(env.host_env_keys, vec!["H"]);
        assert_eq!(env.key_values["K"], "v");
        assert_eq!(
            decode_code(&c),
            Some(Code::File(PathBuf::from("/c/x.wasm")))
        );
    }

    #[test]
    fn remote_code_names_its_vm_after_the_module() {
        let p = plugin("{url: r/a}");
        let code = Code::Remote {
            uri: "http://a/m.wasm".into(),
            cluster: "c".into(),
            sha256: "ab".repeat(32),
        };
        let c = extension_config(&p, Filter::Wasm(code.clone()));
        let pc = HttpWasm::decode(c.typed_config.clone().unwrap().value.as_slice())
            .unwrap()
            .config
            .unwrap();
        let plugin_config::Vm::VmConfig(vm) = pc.vm.unwrap();
        assert_eq!(vm.vm_id, "ab".repeat(32));
        assert_eq!(decode_code(&c), Some(code));
        let c = extension_config(&p, Filter::Wasm(Code::File(PathBuf::from("/m.wasm"))));
        let pc = HttpWasm::decode(c.typed_config.unwrap().value.as_slice())
            .unwrap()
            .config
            .unwrap();
        let plugin_config::Vm::VmConfig(vm) = pc.vm.unwrap();
        assert_eq!(vm.vm_id, "", "local code is keyed by its bytes");
    }

    #[test]
    fn module_endpoint_fetches_are_retried_remote_ones_keep_envoys_default() {
        let p = plugin("{url: r/a}");
        let retry = |cluster: &str| {
            let code = Code::Remote {
                uri: "https://m/modules/x.wasm".into(),
                cluster: cluster.into(),
                sha256: "ab".repeat(32),
            };
            let c = extension_config(&p, Filter::Wasm(code));
            let pc = HttpWasm::decode(c.typed_config.unwrap().value.as_slice())
                .unwrap()
                .config
                .unwrap();
            let plugin_config::Vm::VmConfig(vm) = pc.vm.unwrap();
            match vm.code.unwrap().specifier.unwrap() {
                async_data_source::Specifier::Remote(r) => r.retry_policy,
                other => panic!("not remote: {other:?}"),
            }
        };
        let policy = retry(MODULES_CLUSTER).expect("a retry policy");
        assert_eq!(policy.num_retries.unwrap().value, MODULE_FETCH_RETRIES);
        let backoff = policy.retry_back_off.unwrap();
        assert_eq!(backoff.base_interval.unwrap().seconds, 1);
        assert_eq!(backoff.max_interval.unwrap().seconds, 10);
        assert_eq!(retry("_"), None);
    }

    #[test]
    fn fallbacks_and_network() {
        let p = plugin("{url: r/a}");
        let deny = extension_config(&p, Filter::DenyAll).typed_config.unwrap();
        assert_eq!(deny.type_url, HTTP_RBAC_TYPE_URL);
        let r = HttpRbac::decode(deny.value.as_slice()).unwrap();
        assert!(r.rules.is_some_and(|r| r.policies.is_empty()));
        assert_eq!(r.rules_stat_prefix, DENY_STAT_PREFIX);
        let allow = extension_config(&p, Filter::AllowAll).typed_config.unwrap();
        assert!(HttpRbac::decode(allow.value.as_slice())
            .unwrap()
            .rules
            .is_none());

        let n = plugin("{url: r/a, type: NETWORK}");
        let deny = extension_config(&n, Filter::DenyAll).typed_config.unwrap();
        assert_eq!(deny.type_url, NETWORK_RBAC_TYPE_URL);
        assert_eq!(
            NetworkRbac::decode(deny.value.as_slice())
                .unwrap()
                .stat_prefix,
            DENY_STAT_PREFIX
        );
        let w = extension_config(&n, Filter::Wasm(Code::Inline(vec![0, 97, 115, 109])));
        assert_eq!(
            w.typed_config.as_ref().unwrap().type_url,
            NETWORK_WASM_TYPE_URL
        );
        assert_eq!(decode_code(&w), Some(Code::Inline(vec![0, 97, 115, 109])));
    }
}

/// What a proxy receives for a plugin, decoded back from its resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delivered {
    Module(Code),
    AllowAll,
    DenyAll,
}

/// Builds the resource a proxy receives for a plugin's serving state, or `None` when there is
/// nothing to serve yet. `module_url` gives the module endpoint URL of a sha256 (http delivery);
/// `read` gives a module's bytes (inline delivery).
pub fn resource_for(
    plugin: &WasmPlugin,
    serving: &crate::engine::Serving,
    delivery: crate::config::Delivery,
    module_url: impl FnOnce(&str) -> String,
    read: impl FnOnce(&crate::engine::ServedModule) -> std::io::Result<Vec<u8>>,
) -> std::io::Result<Option<TypedExtensionConfig>> {
    let filter = filter_for(serving, delivery, module_url, read)?;
    Ok(filter.map(|f| extension_config(plugin, f)))
}

/// Whether [`resource_for`] builds the same resource for `a` as for `b` under one serving state:
/// the same key, spec and extension template (metadata is not part of a resource). A plugin with a
/// `pluginConfig` is not compared (its content is in the object): `false`, built again.
pub fn same_resource_inputs(a: &WasmPlugin, b: &WasmPlugin) -> bool {
    let same_template = match (&a.extension, &b.extension) {
        (None, None) => true,
        (Some(x), Some(y)) => std::sync::Arc::ptr_eq(x, y) || x == y,
        _ => false,
    };
    std::ptr::eq(a, b)
        || (a.spec.plugin_config.is_none() && same_template && a.key == b.key && a.spec == b.spec)
}

/// What a serving state puts in a resource: the module's code as `delivery` says, or a fallback;
/// `None` when there is nothing to serve yet.
pub fn filter_for(
    serving: &crate::engine::Serving,
    delivery: crate::config::Delivery,
    module_url: impl FnOnce(&str) -> String,
    read: impl FnOnce(&crate::engine::ServedModule) -> std::io::Result<Vec<u8>>,
) -> std::io::Result<Option<Filter>> {
    use crate::config::Delivery;
    use crate::engine::Serving;
    Ok(Some(match serving {
        Serving::Nothing => return Ok(None),
        Serving::DenyAll => Filter::DenyAll,
        Serving::AllowAll => Filter::AllowAll,
        Serving::Module(m) => Filter::Wasm(match delivery {
            Delivery::File => Code::File(m.path.clone()),
            Delivery::Inline => Code::Inline(read(m)?),
            Delivery::Http => Code::Remote {
                uri: module_url(&m.sha256),
                cluster: MODULES_CLUSTER.to_string(),
                sha256: m.sha256.clone(),
            },
            // Nothing is pulled with remote delivery: see `remote_resource`.
            Delivery::Remote => return Ok(None),
        }),
    }))
}

/// The resource of a plugin under `--delivery remote`: its module's own URL and the variables a
/// proxy converting it needs, as Istio's control plane sends them to its agent: the pull secret's
/// docker config JSON (`Some(None)`: named but missing, sent empty), the pull policy when it is
/// set, and the resource version `Always` pulls again on.
pub fn remote_resource(
    plugin: &WasmPlugin,
    url: &str,
    secret: Option<Option<String>>,
    version: u64,
) -> TypedExtensionConfig {
    use crate::extension::{ENV_PULL_POLICY, ENV_PULL_SECRET, ENV_RESOURCE_VERSION};
    use crate::plugin::ImagePullPolicy;
    let code = Code::Remote {
        uri: url.to_string(),
        // Istio's placeholder: the agent fetches the module, no Envoy cluster is involved.
        cluster: "_".to_string(),
        sha256: plugin.spec.sha256.clone().unwrap_or_default(),
    };
    let mut resource = extension_config(plugin, Filter::Wasm(code));
    let mut vars = vec![(ENV_RESOURCE_VERSION, version.to_string())];
    if let Some(s) = secret {
        vars.push((ENV_PULL_SECRET, s.unwrap_or_default()));
    }
    match plugin.spec.image_pull_policy {
        ImagePullPolicy::Always => vars.push((ENV_PULL_POLICY, "Always".into())),
        ImagePullPolicy::IfNotPresent => vars.push((ENV_PULL_POLICY, "IfNotPresent".into())),
        ImagePullPolicy::Unspecified => {}
    }
    if let Some(any) = resource.typed_config.as_mut() {
        let network = any.type_url == NETWORK_WASM_TYPE_URL;
        let config = if network {
            NetworkWasm::decode(any.value.as_slice())
                .ok()
                .and_then(|w| w.config)
        } else {
            HttpWasm::decode(any.value.as_slice())
                .ok()
                .and_then(|w| w.config)
        };
        if let Some(mut config) = config {
            if let Some(plugin_config::Vm::VmConfig(vm)) = config.vm.as_mut() {
                let env = vm
                    .environment_variables
                    .get_or_insert_with(Default::default);
                for (k, v) in vars {
                    env.key_values.insert(k.to_string(), v);
                }
            }
            *any = wasm_any(network, Some(config));
        }
    }
    resource
}

/// Decodes what a resource delivers: the module code, or an RBAC fallback.
pub fn decode_delivered(config: &TypedExtensionConfig) -> Option<Delivered> {
    let any = config.typed_config.as_ref()?;
    let allow_or_deny = |has_rules: bool| {
        if has_rules {
            Delivered::DenyAll
        } else {
            Delivered::AllowAll
        }
    };
    match any.type_url.as_str() {
        HTTP_RBAC_TYPE_URL => Some(allow_or_deny(
            HttpRbac::decode(any.value.as_slice()).ok()?.rules.is_some(),
        )),
        NETWORK_RBAC_TYPE_URL => Some(allow_or_deny(
            NetworkRbac::decode(any.value.as_slice())
                .ok()?
                .rules
                .is_some(),
        )),
        _ => decode_code(config).map(Delivered::Module),
    }
}
