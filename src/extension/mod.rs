//! Remote-load Wasm extension configs (behavior.md §10, §11): a `TypedExtensionConfig` whose Wasm filter
//! fetches its module from `vm_config.code.remote.http_uri`, as an `EnvoyFilter` `EXTENSION_CONFIG`
//! patch writes it and as a control plane sends it over ECDS for a per-node agent to convert.
//!
//! [`classify`] and [`classify_json`] read such a config — the Wasm filter directly (`@type` the
//! HTTP or network Wasm type) or wrapped in a `TypedStruct` — into a [`Template`] (the whole filter
//! config, to be preserved) and a [`RemoteCode`] (what to pull and how: url, `sha256`, and the
//! `ISTIO_META_*` VM variables Istio's control plane uses to pass the pull secret, pull policy and
//! resource version). Those variables are stripped from the template: Envoy never sees them.

pub mod json;

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{async_data_source, TypedExtensionConfig};
use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm as HttpWasm;
use envoy_types::pb::envoy::extensions::filters::network::wasm::v3::Wasm as NetworkWasm;
use envoy_types::pb::envoy::extensions::wasm::v3::{plugin_config, FailurePolicy, PluginConfig};
use envoy_types::pb::google::protobuf::{Any, Struct};
use prost::Message;
use serde_json::Value;

use crate::convert::{HTTP_WASM_TYPE_URL, NETWORK_WASM_TYPE_URL};
use crate::plugin::{FailStrategy, ImagePullPolicy, PluginType, WasmPluginSpec};

pub const TYPED_STRUCT_UDPA_TYPE_URL: &str = "type.googleapis.com/udpa.type.v1.TypedStruct";
pub const TYPED_STRUCT_XDS_TYPE_URL: &str = "type.googleapis.com/xds.type.v3.TypedStruct";
/// VM variable carrying the pull secret's docker config JSON (empty: the secret is missing).
pub const ENV_PULL_SECRET: &str = "ISTIO_META_WASM_IMAGE_PULL_SECRET";
/// VM variable carrying the pull policy (`IfNotPresent`, `Always`).
pub const ENV_PULL_POLICY: &str = "ISTIO_META_WASM_IMAGE_PULL_POLICY";
/// VM variable carrying the resource version that `Always` pulls again on.
pub const ENV_RESOURCE_VERSION: &str = "ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION";
/// Every VM variable with this prefix is for the agent, not for Envoy.
pub const ISTIO_META_PREFIX: &str = "ISTIO_META_";

/// `udpa.type.v1.TypedStruct` / `xds.type.v3.TypedStruct` (same fields): a message given as a
/// `Struct` with its type URL. Not part of envoy-types' generated set.
#[derive(Clone, PartialEq, Message)]
pub struct TypedStruct {
    #[prost(string, tag = "1")]
    pub type_url: String,
    #[prost(message, optional, tag = "2")]
    pub value: Option<Struct>,
}

/// Which Wasm filter: HTTP or network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FilterKind {
    Http,
    Network,
}

impl FilterKind {
    pub fn type_url(self) -> &'static str {
        match self {
            FilterKind::Http => HTTP_WASM_TYPE_URL,
            FilterKind::Network => NETWORK_WASM_TYPE_URL,
        }
    }
}

/// A Wasm filter config as it is to reach Envoy, but for its code: the resource name and the whole
/// `PluginConfig` (vm_id, runtime, configuration, root_id, failure policy…) with the `ISTIO_META_*`
/// variables removed. Conversion only replaces `vm_config.code`.
#[derive(Clone, Debug, PartialEq)]
pub struct Template {
    /// The ECDS resource name (`TypedExtensionConfig.name`).
    pub name: String,
    pub kind: FilterKind,
    pub config: PluginConfig,
}

impl Template {
    /// `FAIL_OPEN` → allow-all fallback, else deny-all; `failure_policy` wins over the deprecated
    /// `fail_open`, as in Envoy.
    #[allow(deprecated)] // `fail_open`: still what older control planes set
    pub fn fail_strategy(&self) -> FailStrategy {
        match FailurePolicy::try_from(self.config.failure_policy) {
            Ok(FailurePolicy::FailOpen) => FailStrategy::FailOpen,
            Ok(FailurePolicy::FailReload) => FailStrategy::FailReload,
            Ok(FailurePolicy::FailClosed) => FailStrategy::FailClose,
            _ if self.config.fail_open => FailStrategy::FailOpen,
            _ => FailStrategy::FailClose,
        }
    }
}

/// The pull secret a config names through `ISTIO_META_WASM_IMAGE_PULL_SECRET`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PullSecretEnv {
    /// No variable: pull anonymously.
    Absent,
    /// The variable is empty: the control plane could not find the secret. The pull fails.
    Missing,
    /// The variable's value: a docker config JSON (or, in a file, a Secret's name).
    Given(String),
}

/// What to pull for a remote-load config, and how.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RemoteCode {
    /// `http_uri.uri`: `oci://…`, `http://…` or `https://…`.
    pub uri: String,
    /// `remote.sha256`, if set (Istio's `"nil"` placeholder counts as unset).
    pub sha256: Option<String>,
    /// `http_uri.timeout`, if set.
    pub timeout: Option<std::time::Duration>,
    pub pull_policy: ImagePullPolicy,
    pub pull_secret: PullSecretEnv,
    /// The resource version `Always` pulls again on, if the control plane sent one.
    pub resource_version: Option<String>,
}

/// What a `TypedExtensionConfig` is, for conversion.
#[derive(Clone, Debug, PartialEq)]
pub enum Classified {
    /// Not a Wasm filter, or a Wasm filter with local code: passed through as is
    /// (`no_remote_load`).
    Passthrough,
    /// Remote code without an `http_uri` (`miss_remote_fetch_hint`): nothing can be pulled, only
    /// the fallback served.
    MissingHint(Arc<Template>),
    /// Remote code to pull.
    Remote(Arc<Template>, RemoteCode),
}

impl RemoteCode {
    /// The WasmPlugin spec standing for a remote config: url, pin, policy, fail strategy, type.
    /// `secret` is the name of the pull Secret to use, if any.
    pub fn spec(&self, template: &Template, secret: Option<String>) -> WasmPluginSpec {
        WasmPluginSpec {
            url: self.uri.clone(),
            sha256: self.sha256.clone(),
            image_pull_policy: self.pull_policy,
            image_pull_secret: secret,
            plugin_name: Some(template.config.root_id.clone()).filter(|r| !r.is_empty()),
            fail_strategy: template.fail_strategy(),
            plugin_type: match template.kind {
                FilterKind::Http => PluginType::Http,
                FilterKind::Network => PluginType::Network,
            },
            ..Default::default()
        }
    }
}

/// Reads an ECDS resource (an `Any` holding a `TypedExtensionConfig`). An error means the
/// resource cannot be understood (`unmarshal_failure`: the response is refused).
pub fn classify(resource: &Any) -> Result<Classified, String> {
    let ec = TypedExtensionConfig::decode(resource.value.as_slice())
        .map_err(|e| format!("failed to unmarshal extension config resource: {e}"))?;
    classify_config(&ec)
}

/// Reads a decoded `TypedExtensionConfig`.
pub fn classify_config(ec: &TypedExtensionConfig) -> Result<Classified, String> {
    let Some(tc) = &ec.typed_config else {
        return Err(format!(
            "extension config {:?} has no typed_config",
            ec.name
        ));
    };
    let (kind, config) = match tc.type_url.as_str() {
        HTTP_WASM_TYPE_URL => (
            FilterKind::Http,
            HttpWasm::decode(tc.value.as_slice())
                .map_err(|e| format!("{:?}: invalid Wasm HTTP filter: {e}", ec.name))?
                .config,
        ),
        NETWORK_WASM_TYPE_URL => (
            FilterKind::Network,
            NetworkWasm::decode(tc.value.as_slice())
                .map_err(|e| format!("{:?}: invalid Wasm network filter: {e}", ec.name))?
                .config,
        ),
        TYPED_STRUCT_UDPA_TYPE_URL | TYPED_STRUCT_XDS_TYPE_URL => {
            let ts = TypedStruct::decode(tc.value.as_slice())
                .map_err(|e| format!("{:?}: invalid TypedStruct: {e}", ec.name))?;
            let value = ts.value.as_ref().map(json::struct_to_json);
            return from_typed_json(&ec.name, &ts.type_url, value.as_ref());
        }
        _ => return Ok(Classified::Passthrough),
    };
    finish(&ec.name, kind, config.unwrap_or_default())
}

/// Reads the `typed_config` of an `EnvoyFilter` patch value (proto3 JSON with `@type`).
pub fn classify_json(name: &str, typed_config: &Value) -> Result<Classified, String> {
    let Some(obj) = typed_config.as_object() else {
        return Err("typed_config must be a mapping with \"@type\"".into());
    };
    let Some(type_url) = obj.get("@type").and_then(Value::as_str) else {
        return Err("typed_config needs a string \"@type\"".into());
    };
    match type_url {
        TYPED_STRUCT_UDPA_TYPE_URL | TYPED_STRUCT_XDS_TYPE_URL => {
            let mut rest = obj.clone();
            rest.remove("@type");
            let inner = match rest.remove("type_url").or_else(|| rest.remove("typeUrl")) {
                Some(Value::String(t)) => t,
                _ => return Err("TypedStruct needs a string type_url".into()),
            };
            let value = rest.remove("value");
            if let Some(extra) = rest.keys().next() {
                return Err(format!("TypedStruct: unknown field `{extra}`"));
            }
            from_typed_json(name, &inner, value.as_ref())
        }
        HTTP_WASM_TYPE_URL | NETWORK_WASM_TYPE_URL => {
            let mut rest = obj.clone();
            rest.remove("@type");
            from_typed_json(name, type_url, Some(&Value::Object(rest)))
        }
        _ => Ok(Classified::Passthrough),
    }
}

/// A Wasm filter given as JSON with its type URL; any other type is passed through.
fn from_typed_json(
    name: &str,
    type_url: &str,
    value: Option<&Value>,
) -> Result<Classified, String> {
    let kind = match type_url {
        HTTP_WASM_TYPE_URL => FilterKind::Http,
        NETWORK_WASM_TYPE_URL => FilterKind::Network,
        _ => return Ok(Classified::Passthrough),
    };
    let empty = Value::Object(Default::default());
    let config = json::plugin_config(value.unwrap_or(&empty))
        .map_err(|e| format!("{name:?}: invalid Wasm filter: {e}"))?;
    finish(name, kind, config)
}

fn finish(name: &str, kind: FilterKind, mut config: PluginConfig) -> Result<Classified, String> {
    let Some(plugin_config::Vm::VmConfig(vm)) = config.vm.as_mut() else {
        return Err(format!("{name:?}: Wasm filter without vm_config"));
    };
    let remote = match vm.code.as_ref().and_then(|c| c.specifier.as_ref()) {
        Some(async_data_source::Specifier::Remote(r)) => r.clone(),
        Some(async_data_source::Specifier::Local(_)) => return Ok(Classified::Passthrough),
        None => {
            return Err(format!(
                "{name:?}: Wasm filter has neither remote nor local code"
            ))
        }
    };
    // The agent's variables: read, then removed from what Envoy gets.
    let mut pull_secret = PullSecretEnv::Absent;
    let mut pull_policy = ImagePullPolicy::Unspecified;
    let mut resource_version = None;
    if let Some(env) = vm.environment_variables.as_mut() {
        if let Some(s) = env.key_values.get(ENV_PULL_SECRET) {
            pull_secret = match s.as_str() {
                "" => PullSecretEnv::Missing,
                s => PullSecretEnv::Given(s.to_string()),
            };
        }
        pull_policy = match env.key_values.get(ENV_PULL_POLICY).map(String::as_str) {
            Some("Always") => ImagePullPolicy::Always,
            Some("IfNotPresent") => ImagePullPolicy::IfNotPresent,
            _ => ImagePullPolicy::Unspecified,
        };
        resource_version = env.key_values.get(ENV_RESOURCE_VERSION).cloned();
        env.key_values
            .retain(|k, _| !k.starts_with(ISTIO_META_PREFIX));
        if env.key_values.is_empty() && env.host_env_keys.is_empty() {
            vm.environment_variables = None;
        }
    }
    let template = Arc::new(Template {
        name: name.to_string(),
        kind,
        config,
    });
    let Some(http_uri) = remote.http_uri else {
        return Ok(Classified::MissingHint(template));
    };
    let sha256 = Some(remote.sha256).filter(|s| !s.is_empty() && s != "nil");
    let timeout = http_uri.timeout.and_then(|d| {
        let nanos = u32::try_from(d.nanos).ok()?;
        Some(std::time::Duration::new(
            u64::try_from(d.seconds).ok()?,
            nanos,
        ))
    });
    Ok(Classified::Remote(
        template,
        RemoteCode {
            uri: http_uri.uri,
            sha256,
            timeout,
            pull_policy,
            pull_secret,
            resource_version,
        },
    ))
}

#[cfg(test)]
mod tests;
