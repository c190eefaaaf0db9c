//! Istio `EnvoyFilter` objects (behavior.md §10): each `EXTENSION_CONFIG` `ADD` patch whose value is
//! a Wasm filter with remote code becomes one plugin of the engine, served under the patch value's
//! `name` with everything but the code preserved ([`crate::extension`] reads the filter config).
//!
//! Parsing never fails for a patch: every patch is a [`PatchKind::Plugin`], a note
//! ([`PatchKind::Ignored`]: another `applyTo` or operation, local code, not Wasm) or a refusal
//! naming its field ([`PatchKind::Refused`]), so one bad patch leaves the others working. Only the
//! object as a whole (`spec` or `spec.configPatches` of the wrong type) can be refused.
//!
//! A patch's plugin is keyed `<namespace>/<envoyfilter>/<resource name>` ([`plugin_key`]):
//! `WasmPlugin` names cannot contain `/`, so the two kinds never share a key. Its `object` is the
//! EnvoyFilter reduced to that one patch (metadata and the rest of `spec` kept), which is what
//! resource versions compare: editing one patch is not a change of its siblings.

use serde_json::{Map, Value};

use super::{validate, FieldError, ImagePullPolicy, ObjectKey, WasmPlugin, WasmPluginSpec};
use crate::extension::{
    self, Classified, PullSecretEnv, RemoteCode, Template, ENV_PULL_POLICY, ENV_PULL_SECRET,
    TYPED_STRUCT_UDPA_TYPE_URL, TYPED_STRUCT_XDS_TYPE_URL,
};
use crate::url::ModuleUrl;

pub const ENVOY_FILTER_API_GROUP: &str = "networking.istio.io";
pub const ENVOY_FILTER_KIND: &str = "EnvoyFilter";
/// The one `applyTo` that is served.
pub const EXTENSION_CONFIG: &str = "EXTENSION_CONFIG";
/// The one patch operation that is served.
pub const OPERATION_ADD: &str = "ADD";
/// Why a patch of another kind is ignored (`check` prints it).
pub const IGNORED_KIND: &str = "ignored, only EXTENSION_CONFIG ADD patches are served";

/// A parsed `EnvoyFilter`.
#[derive(Clone, Debug, PartialEq)]
pub struct EnvoyFilter {
    pub key: ObjectKey,
    /// The whole object, normalised like a `WasmPlugin`'s (namespace filled in, server-owned
    /// metadata removed): what an edit patches and what tells an identical object.
    pub object: Value,
    /// Every entry of `spec.configPatches`, in order.
    pub patches: Vec<Patch>,
}

/// One entry of `spec.configPatches`.
#[derive(Clone, Debug, PartialEq)]
pub struct Patch {
    pub index: usize,
    /// `applyTo` as written (empty when missing).
    pub apply_to: String,
    pub kind: PatchKind,
}

/// What a patch is to wasm-ecds.
#[derive(Clone, Debug, PartialEq)]
#[allow(clippy::large_enum_variant)] // short-lived; plugins are the common case
pub enum PatchKind {
    /// A Wasm filter with remote code: served (only its fallback when it has no `http_uri`).
    Plugin(WasmPlugin),
    /// Not served; the text says why.
    Ignored(String),
    /// Refused. `plugin` is the key its plugin would have, when the patch has a name.
    Refused {
        plugin: Option<ObjectKey>,
        error: FieldError,
    },
}

impl Patch {
    /// `spec.configPatches[2]`: the prefix of this patch's field paths.
    pub fn field(&self) -> String {
        format!("spec.configPatches[{}]", self.index)
    }

    /// `configPatches[2] (EXTENSION_CONFIG)`: how notes name the patch.
    pub fn label(&self) -> String {
        let apply_to = if self.apply_to.is_empty() {
            "no applyTo"
        } else {
            &self.apply_to
        };
        format!("configPatches[{}] ({apply_to})", self.index)
    }
}

impl EnvoyFilter {
    /// The one-line notes of the ignored patches: `configPatches[0] (HTTP_FILTER): ignored, …`.
    pub fn notes(&self) -> Vec<String> {
        (self.patches.iter())
            .filter_map(|p| match &p.kind {
                PatchKind::Ignored(why) => Some(format!("{}: {why}", p.label())),
                _ => None,
            })
            .collect()
    }
}

/// The engine key of the plugin a patch defines: `<namespace>/<envoyfilter>/<resource name>`.
pub fn plugin_key(filter: &ObjectKey, resource: &str) -> ObjectKey {
    ObjectKey::new(&filter.namespace, format!("{}/{resource}", filter.name))
}

/// The `EnvoyFilter` a plugin key belongs to, if it is a patch's key.
pub fn filter_of(plugin: &ObjectKey) -> Option<ObjectKey> {
    let (filter, _) = plugin.name.split_once('/')?;
    Some(ObjectKey::new(&plugin.namespace, filter))
}

/// Parses an `EnvoyFilter` whose kind, API group and metadata were checked. The error is a field
/// path and a message.
pub(super) fn parse(key: ObjectKey, object: Value) -> Result<EnvoyFilter, (String, String)> {
    let empty = Value::Object(Map::new());
    let spec = object.get("spec").unwrap_or(&empty);
    let Value::Object(spec) = spec else {
        return Err(("spec".into(), "must be a mapping".into()));
    };
    let raw = match spec.get("configPatches") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(_) => return Err(("spec.configPatches".into(), "must be a list".into())),
    };
    let mut patches: Vec<Patch> = raw
        .iter()
        .enumerate()
        .map(|(index, p)| read_patch(&key, &object, index, p))
        .collect();
    // A resource name is defined once per object: the first patch naming it is the definition.
    let mut first: Vec<(ObjectKey, usize)> = Vec::new();
    for p in &mut patches {
        let named = match &p.kind {
            PatchKind::Plugin(w) => Some(w.key.clone()),
            PatchKind::Refused { plugin, .. } => plugin.clone(),
            PatchKind::Ignored(_) => None,
        };
        let Some(k) = named else { continue };
        match first.iter().find(|(f, _)| *f == k) {
            Some((_, at)) => {
                p.kind = PatchKind::Refused {
                    plugin: None,
                    error: FieldError {
                        field: format!("{}.patch.value.name", p.field()),
                        message: format!(
                            "ECDS resource {:?} is already defined by spec.configPatches[{at}] of this EnvoyFilter; only that one is used",
                            resource_of(&k)
                        ),
                    },
                }
            }
            None => first.push((k, p.index)),
        }
    }
    Ok(EnvoyFilter {
        key,
        object,
        patches,
    })
}

fn resource_of(k: &ObjectKey) -> &str {
    k.name.split_once('/').map_or("", |(_, r)| r)
}

fn read_patch(filter: &ObjectKey, object: &Value, index: usize, raw: &Value) -> Patch {
    let mut patch = Patch {
        index,
        apply_to: String::new(),
        kind: PatchKind::Ignored(String::new()),
    };
    patch.kind = match read_patch_kind(filter, object, &mut patch, raw) {
        Ok(kind) => kind,
        Err((plugin, field, message)) => PatchKind::Refused {
            plugin,
            error: FieldError { field, message },
        },
    };
    patch
}

type Refusal = (Option<ObjectKey>, String, String);

fn read_patch_kind(
    filter: &ObjectKey,
    object: &Value,
    patch: &mut Patch,
    raw: &Value,
) -> Result<PatchKind, Refusal> {
    let at = patch.field();
    let refuse = |field: String, message: &str| (None, field, message.to_string());
    let Value::Object(m) = raw else {
        return Err(refuse(at, "must be a mapping"));
    };
    patch.apply_to = match m.get("applyTo") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(refuse(format!("{at}.applyTo"), "must be a string")),
    };
    if patch.apply_to != EXTENSION_CONFIG {
        return Ok(PatchKind::Ignored(IGNORED_KIND.into()));
    }
    let Some(Value::Object(p)) = m.get("patch") else {
        return Err(refuse(format!("{at}.patch"), "must be a mapping"));
    };
    let operation = p.get("operation").and_then(Value::as_str).unwrap_or("");
    if operation != OPERATION_ADD {
        let op = if operation.is_empty() {
            "no operation".to_string()
        } else {
            format!("operation {operation}")
        };
        return Ok(PatchKind::Ignored(format!("{IGNORED_KIND} ({op})")));
    }
    let at = format!("{at}.patch.value");
    let Some(Value::Object(value)) = p.get("value") else {
        return Err(refuse(
            at,
            "must be a mapping: a TypedExtensionConfig (name and typed_config)",
        ));
    };
    let name = match value.get("name") {
        Some(Value::String(n)) if !n.is_empty() => n.clone(),
        _ => {
            return Err(refuse(
                format!("{at}.name"),
                "is required: a non-empty string, the ECDS resource name",
            ))
        }
    };
    let key = plugin_key(filter, &name);
    let refuse = |field: String, message: String| (Some(key.clone()), field, message);
    if let Some(other) = value.keys().find(|k| *k != "name" && *k != "typed_config") {
        return Err(refuse(
            format!("{at}.{other}"),
            "unknown field (a TypedExtensionConfig has name and typed_config)".into(),
        ));
    }
    let Some(typed_config) = value.get("typed_config") else {
        return Err(refuse(format!("{at}.typed_config"), "is required".into()));
    };
    let at = format!("{at}.typed_config");
    let classified =
        extension::classify_json(&name, typed_config).map_err(|e| refuse(at.clone(), e))?;
    // Where the Wasm filter's `config` is: beside `@type`, or inside the TypedStruct's `value`.
    let wrapped = matches!(
        typed_config.get("@type").and_then(Value::as_str),
        Some(TYPED_STRUCT_UDPA_TYPE_URL | TYPED_STRUCT_XDS_TYPE_URL)
    );
    let config_at = if wrapped {
        format!("{at}.value.config")
    } else {
        format!("{at}.config")
    };
    let (template, code) = match classified {
        Classified::Passthrough => return Ok(PatchKind::Ignored(passthrough_note(typed_config))),
        Classified::MissingHint(t) => (t, None),
        Classified::Remote(t, code) => (t, Some(code)),
    };
    let config = if wrapped {
        typed_config.get("value").and_then(|v| v.get("config"))
    } else {
        typed_config.get("config")
    };
    let env_at = format!("{config_at}.vm_config.environment_variables.key_values");
    let spec = match &code {
        None => no_http_uri_spec(&template),
        Some(code) => remote_spec(&template, code, config, &config_at, &env_at)
            .map_err(|(f, m)| refuse(f, m))?,
    };
    let mut object = reduced(object, raw);
    // `http_uri.timeout` bounds the pull, as for a proxied config (behavior.md §4.1).
    if let Some(t) = code
        .as_ref()
        .and_then(|c| c.timeout)
        .filter(|t| !t.is_zero())
    {
        object["metadata"]["annotations"][super::PULL_TIMEOUT_ANNOTATION] =
            Value::String(format!("{}ms", t.as_millis().max(1)));
    }
    let pull_timeout_annotation = object["metadata"]["annotations"][super::PULL_TIMEOUT_ANNOTATION]
        .as_str()
        .map(Box::from);
    let plugin = WasmPlugin {
        key: key.clone(),
        object: super::Object::new(&object),
        spec,
        pull_timeout_annotation,
        extension: Some(template),
    };
    Ok(PatchKind::Plugin(plugin))
}

/// Why a Wasm-less or local-code config is not served.
fn passthrough_note(typed_config: &Value) -> String {
    let outer = typed_config.get("@type").and_then(Value::as_str);
    let inner = field(typed_config, &["type_url", "typeUrl"]).and_then(Value::as_str);
    let type_url = match outer {
        Some(TYPED_STRUCT_UDPA_TYPE_URL | TYPED_STRUCT_XDS_TYPE_URL) => inner,
        other => other,
    }
    .unwrap_or_default();
    if type_url == crate::convert::HTTP_WASM_TYPE_URL
        || type_url == crate::convert::NETWORK_WASM_TYPE_URL
    {
        "the Wasm code is local (vm_config.code.local): nothing to pull, ignored (wasm-ecds serves only modules it fetches)".into()
    } else {
        format!("{type_url} is not a Wasm filter: ignored (wasm-ecds serves only Wasm modules it fetches)")
    }
}

/// The spec of a config without `http_uri`: nothing to pull, the fail strategy decides the fallback.
fn no_http_uri_spec(template: &Template) -> WasmPluginSpec {
    let code = RemoteCode {
        uri: String::new(),
        sha256: None,
        timeout: None,
        pull_policy: ImagePullPolicy::Unspecified,
        pull_secret: PullSecretEnv::Absent,
        resource_version: None,
    };
    code.spec(template, None)
}

/// The spec of a config with remote code, checked field by field (paths into the patch).
fn remote_spec(
    template: &Template,
    code: &RemoteCode,
    config: Option<&Value>,
    config_at: &str,
    env_at: &str,
) -> Result<WasmPluginSpec, (String, String)> {
    let uri_at = format!("{config_at}.vm_config.code.remote.http_uri.uri");
    match ModuleUrl::parse(&code.uri) {
        Ok(ModuleUrl::Oci(_) | ModuleUrl::Http(_)) if code.uri.contains("://") => {}
        Ok(_) => {
            return Err((
                uri_at,
                format!(
                    "{:?}: want an oci://, http:// or https:// url",
                    code.uri.trim()
                ),
            ))
        }
        Err(e) => return Err((uri_at, e.to_string())),
    }
    let env = |var: &str| -> Option<String> {
        let kv = field(config?, &["vm_config", "vmConfig"])
            .and_then(|v| field(v, &["environment_variables", "environmentVariables"]))
            .and_then(|e| field(e, &["key_values", "keyValues"]))?;
        kv.get(var).and_then(Value::as_str).map(str::to_string)
    };
    if let Some(policy) = env(ENV_PULL_POLICY) {
        if !["Always", "IfNotPresent", "UNSPECIFIED_POLICY"].contains(&policy.as_str()) {
            return Err((
                format!("{env_at}.{ENV_PULL_POLICY}"),
                format!("unknown pull policy {policy:?} (want IfNotPresent or Always)"),
            ));
        }
    }
    let secret = match &code.pull_secret {
        PullSecretEnv::Absent => None,
        PullSecretEnv::Missing => {
            return Err((
                format!("{env_at}.{ENV_PULL_SECRET}"),
                "is empty: name a dockerconfigjson Secret of the EnvoyFilter's namespace, or leave the variable out".into(),
            ))
        }
        PullSecretEnv::Given(name) if is_object_name(name) => Some(name.clone()),
        PullSecretEnv::Given(_) => {
            return Err((
                format!("{env_at}.{ENV_PULL_SECRET}"),
                "must be the name of a dockerconfigjson Secret of the EnvoyFilter's namespace (credentials are not accepted inline)".into(),
            ))
        }
    };
    let spec = code.spec(template, secret);
    // The WasmPlugin rules for what the spec took from the patch, on the patch's own paths.
    let probe = WasmPlugin {
        key: ObjectKey::new("", ""),
        object: super::Object::new(&Value::Null),
        spec: spec.clone(),
        pull_timeout_annotation: None,
        extension: None,
    };
    if let Some(e) = validate(&probe).into_iter().next() {
        let field = match e.field.as_str() {
            "spec.sha256" => format!("{config_at}.vm_config.code.remote.sha256"),
            "spec.pluginName" => format!("{config_at}.root_id"),
            "spec.imagePullSecret" => format!("{env_at}.{ENV_PULL_SECRET}"),
            _ => uri_at,
        };
        return Err((field, e.message));
    }
    Ok(spec)
}

/// A JSON field under its proto name or its lowerCamelCase JSON name.
fn field<'a>(v: &'a Value, names: &[&str]) -> Option<&'a Value> {
    names.iter().find_map(|n| v.get(*n))
}

/// A Kubernetes object name (RFC 1123 subdomain).
fn is_object_name(s: &str) -> bool {
    let ok = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= validate::MAX_IMAGE_PULL_SECRET_LEN
        && ok(b[0])
        && ok(b[b.len() - 1])
        && b.iter().all(|&c| ok(c) || c == b'-' || c == b'.')
}

/// The object with `spec.configPatches` reduced to this one patch.
fn reduced(object: &Value, patch: &Value) -> Value {
    let mut o = object.clone();
    if let Some(spec) = o.get_mut("spec").and_then(Value::as_object_mut) {
        spec.insert("configPatches".into(), Value::Array(vec![patch.clone()]));
    }
    o
}

#[cfg(test)]
mod tests;
