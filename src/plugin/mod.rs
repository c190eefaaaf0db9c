//! The resource model: Istio `WasmPlugin`, `EnvoyFilter` ([`envoyfilter`], behavior.md §10) and
//! `kubernetes.io/dockerconfigjson` `Secret` manifests (behavior.md §1), parsed from YAML or JSON
//! (several documents per file) into typed structs.
//!
//! Parsing keeps the whole object as compact JSON text ([`Object`]) next to the typed spec: the
//! JSON is what resource versions compare (metadata edits are changes) and what merge patches
//! apply to. Validation lives in [`validate`]; pull secrets in [`secret`].
//!
//! Length: about 730 lines: the typed model, its parsing and the shared ([`Object`]) text it keeps
//! (with [`Mapping`], what the typed spec checks but leaves in it) are read together; the tests
//! take about 115 of them.

pub mod decode;
pub mod envoyfilter;
mod object;
pub mod secret;
pub mod validate;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

pub use envoyfilter::EnvoyFilter;
#[cfg(test)]
pub(crate) use object::DECODES;
pub use object::{Head, Object};
pub use secret::{Credentials, DockerConfig, PullSecret};
pub use validate::{validate, FieldError};

pub const WASM_PLUGIN_API_GROUP: &str = "extensions.istio.io";
/// Prefix of ECDS resource names (behavior.md §1).
pub const ECDS_RESOURCE_PREFIX: &str = "extensions.istio.io/wasmplugin/";
pub const DEFAULT_NAMESPACE: &str = "default";
/// Annotation bounding the time a pull of the plugin's module may take (a Go duration), instead
/// of the 30 s default: how a proxied config's `http_uri.timeout` reaches the engine.
pub const PULL_TIMEOUT_ANNOTATION: &str = "wasm-ecds.io/pull-timeout";

/// `namespace/name` of an object.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// Parses `ns/name` (or a bare `name` in `default`). The name of an `EnvoyFilter` patch's
    /// plugin holds a `/` itself (`ns/envoyfilter/resource`, behavior.md §10).
    pub fn parse(s: &str) -> Option<Self> {
        match s.split_once('/') {
            Some((ns, n)) if !ns.is_empty() && !n.is_empty() => Some(Self::new(ns, n)),
            None if !s.is_empty() => Some(Self::new(DEFAULT_NAMESPACE, s)),
            _ => None,
        }
    }

    /// The ECDS resource name of the plugin with this key:
    /// `extensions.istio.io/wasmplugin/<namespace>.<name>` for a `WasmPlugin`, the patch's own
    /// name for an `EnvoyFilter` patch (key `<namespace>/<envoyfilter>/<resource>`).
    /// Built with one allocation of the exact size and no formatting: the driver and the
    /// simulator ask at every publish and every `serves` check.
    pub fn resource_name(&self) -> String {
        match self.name.split_once('/') {
            Some((_, resource)) => resource.to_string(),
            None => {
                let (ns, name) = (&self.namespace, &self.name);
                let mut s =
                    String::with_capacity(ECDS_RESOURCE_PREFIX.len() + ns.len() + 1 + name.len());
                s.push_str(ECDS_RESOURCE_PREFIX);
                s.push_str(ns);
                s.push('.');
                s.push_str(name);
                s
            }
        }
    }

    /// Writes `ns/name` (as [`Display`](fmt::Display) shows it) into `out`, without formatting.
    pub fn write_id(&self, out: &mut String) {
        out.reserve(self.namespace.len() + 1 + self.name.len());
        out.push_str(&self.namespace);
        out.push('/');
        out.push_str(&self.name);
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A parsed `WasmPlugin`. `object` is the whole manifest as JSON (normalised: namespace filled in,
/// server-owned metadata such as `resourceVersion` removed), `spec` its typed view.
#[derive(Clone, Debug, PartialEq)]
pub struct WasmPlugin {
    pub key: ObjectKey,
    /// Shared with the source that decoded it (file source, Kubernetes snapshot): each plugin's
    /// JSON exists once however many holders it has.
    pub object: Object,
    pub spec: WasmPluginSpec,
    /// The [`PULL_TIMEOUT_ANNOTATION`] as written, when it is a string (read from the object
    /// once, at parsing).
    pub pull_timeout_annotation: Option<Box<str>>,
    /// Set for a plugin that stands for a remote-load extension config (an `EnvoyFilter`
    /// `EXTENSION_CONFIG` patch): its resource name and the filter config to preserve, of which
    /// only the code is replaced. `spec` is derived from it.
    pub extension: Option<std::sync::Arc<crate::extension::Template>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WasmPluginSpec {
    #[serde(default)]
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default)]
    pub image_pull_policy: ImagePullPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_secret: Option<String>,
    /// Whether `pluginConfig` is given (a JSON object: checked here, not copied); its content is
    /// read from the plugin's object ([`WasmPlugin::plugin_config`]).
    #[serde(default, skip_serializing)]
    pub plugin_config: Option<Mapping>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin_name: Option<String>,
    #[serde(default)]
    pub phase: Phase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    #[serde(default)]
    pub fail_strategy: FailStrategy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_config: Option<VmConfig>,
    #[serde(default, rename = "type")]
    pub plugin_type: PluginType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<Box<PolicyTargetReference>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<PolicyTargetReference>,
    #[serde(default, rename = "match", skip_serializing_if = "Vec::is_empty")]
    pub match_: Vec<TrafficSelector>,
}

/// A field that must be a JSON object, whose content the typed spec does not keep (the object it
/// was parsed from holds it, once for all its holders).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mapping;

impl<'de> Deserialize<'de> for Mapping {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Mapping;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Mapping, A::Error> {
                while map
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Mapping)
            }
        }
        d.deserialize_map(Visitor)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ImagePullPolicy {
    #[default]
    #[serde(rename = "UNSPECIFIED_POLICY")]
    Unspecified,
    IfNotPresent,
    Always,
}

/// Filter ordering phase; sorts `Authn < Authz < Stats < Unspecified`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Phase {
    #[serde(rename = "AUTHN")]
    Authn,
    #[serde(rename = "AUTHZ")]
    Authz,
    #[serde(rename = "STATS")]
    Stats,
    #[default]
    #[serde(rename = "UNSPECIFIED_PHASE")]
    Unspecified,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailStrategy {
    #[default]
    #[serde(rename = "FAIL_CLOSE")]
    FailClose,
    #[serde(rename = "FAIL_OPEN")]
    FailOpen,
    #[serde(rename = "FAIL_RELOAD")]
    FailReload,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PluginType {
    #[default]
    #[serde(rename = "HTTP")]
    Http,
    #[serde(rename = "NETWORK")]
    Network,
    #[serde(rename = "UNSPECIFIED_PLUGIN_TYPE")]
    Unspecified,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmConfig {
    #[serde(default)]
    pub env: Vec<EnvVar>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvVar {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub value_from: EnvValueSource,
    #[serde(default)]
    pub value: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnvValueSource {
    #[default]
    #[serde(rename = "INLINE")]
    Inline,
    #[serde(rename = "HOST")]
    Host,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyTargetReference {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficSelector {
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub ports: Vec<PortSelector>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSelector {
    pub number: i64,
}

/// One document of a manifest file.
#[derive(Clone, Debug, PartialEq)]
#[allow(clippy::large_enum_variant)] // short-lived values; plugins are the common case
pub enum Manifest {
    Plugin(WasmPlugin),
    Secret(PullSecret),
    EnvoyFilter(EnvoyFilter),
}

impl Manifest {
    pub fn key(&self) -> &ObjectKey {
        match self {
            Manifest::Plugin(p) => &p.key,
            Manifest::Secret(s) => &s.key,
            Manifest::EnvoyFilter(f) => &f.key,
        }
    }
}

/// A document that could not be turned into a [`Manifest`]. `field` names the offending path.
#[derive(Clone, Debug, Error, PartialEq)]
#[error("{}{field}: {message}", object.as_ref().map(|k| format!("{k}: ")).unwrap_or_default())]
pub struct ParseError {
    /// Index of the document in its file (0-based).
    pub document: usize,
    pub object: Option<ObjectKey>,
    pub field: String,
    pub message: String,
}

/// Parses every document of a YAML or JSON text. Each document yields a manifest or an error of its
/// own, so one bad document does not hide the others. Empty documents are skipped; `kind: List`
/// documents are flattened.
pub fn parse_manifests(text: &str) -> Vec<Result<Manifest, ParseError>> {
    documents(text)
        .into_iter()
        .map(|d| d.and_then(|(index, value)| parse_object(index, value)))
        .collect()
}

/// The objects of a YAML or JSON text, each with the index of its document: empty documents are
/// skipped and `kind: List` documents flattened into their items. A syntax error ends the text
/// (the YAML stream cannot be resynchronised after it), and so does going past the
/// [`decode::Budget`] of what the documents may expand to.
pub fn documents(text: &str) -> Vec<Result<(usize, Value), ParseError>> {
    let mut out = Vec::new();
    if let Some((document, line)) = decode::flow_nesting(text) {
        out.push(Err(ParseError {
            document,
            object: None,
            field: "(document)".into(),
            message: format!(
                "malformed yaml: more than {} levels of [ and {{ nesting at line {line}",
                decode::MAX_FLOW_DEPTH
            ),
        }));
        return out;
    }
    let mut budget = decode::Budget::default();
    for (index, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = match budget.decode(doc) {
            Ok(v) => v,
            Err(e) => {
                let message = if budget.exceeded {
                    decode::Budget::message()
                } else {
                    format!("malformed yaml: {}", one_line(&e.to_string()))
                };
                out.push(Err(ParseError {
                    document: index,
                    object: None,
                    field: "(document)".into(),
                    message,
                }));
                break;
            }
        };
        match value {
            Value::Null => {}
            Value::Object(ref m) if m.get("kind").and_then(Value::as_str) == Some("List") => {
                let items = m.get("items").and_then(Value::as_array);
                out.extend(items.into_iter().flatten().map(|v| Ok((index, v.clone()))));
            }
            v => out.push(Ok((index, v))),
        }
    }
    out
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Server-owned metadata fields: not part of what the user wrote.
const SERVER_OWNED: [&str; 5] = [
    "resourceVersion",
    "generation",
    "uid",
    "creationTimestamp",
    "managedFields",
];

/// Parses one object (already decoded to JSON).
pub fn parse_object(document: usize, value: Value) -> Result<Manifest, ParseError> {
    parse_value(document, Cow::Owned(value), None)
}

/// [`parse_object`] on an object's text and its decoded `value`: a `WasmPlugin` keeps `object`
/// itself when it is already normalised (namespace given, no server-owned metadata), else the
/// text of a normalised copy.
pub fn parse_shared(
    document: usize,
    value: Value,
    object: &Object,
) -> Result<Manifest, ParseError> {
    parse_value(document, Cow::Owned(value), Some(object))
}

/// [`parse_shared`] on a borrowed value (the caller keeps it): copied only if it must be
/// normalised.
pub fn parse_shared_ref(
    document: usize,
    value: &Value,
    object: &Object,
) -> Result<Manifest, ParseError> {
    parse_value(document, Cow::Borrowed(value), Some(object))
}

/// Parses `value`, whose text is `text` when the caller has it.
fn parse_value(
    document: usize,
    mut value: Cow<'_, Value>,
    mut text: Option<&Object>,
) -> Result<Manifest, ParseError> {
    let err = |object: Option<ObjectKey>, field: &str, message: String| ParseError {
        document,
        object,
        field: field.to_string(),
        message,
    };
    let Some(obj) = value.as_object() else {
        return Err(err(
            None,
            "(document)",
            "expected a mapping with apiVersion and kind".into(),
        ));
    };
    let normalised = match obj.get("metadata") {
        None => false,
        Some(Value::Object(meta)) => {
            meta.contains_key("namespace") && !SERVER_OWNED.iter().any(|f| meta.contains_key(*f))
        }
        Some(_) => return Err(err(None, "metadata", "must be a mapping".into())),
    };
    if !normalised {
        text = None;
        if let Value::Object(obj) = value.to_mut() {
            let meta = obj
                .entry("metadata")
                .or_insert_with(|| Value::Object(Default::default()));
            if let Value::Object(meta) = meta {
                if !meta.contains_key("namespace") {
                    meta.insert("namespace".into(), Value::String(DEFAULT_NAMESPACE.into()));
                }
                for owned in SERVER_OWNED {
                    meta.remove(owned);
                }
            }
        }
    }
    let Some(obj) = value.as_object() else {
        return Err(err(None, "(document)", "expected a mapping".into()));
    };
    let kind = obj
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let api_version = obj
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let meta = obj.get("metadata").and_then(Value::as_object);
    let field = |f: &str| {
        (meta.and_then(|m| m.get(f)).and_then(Value::as_str))
            .unwrap_or_default()
            .to_string()
    };
    let (name, namespace) = (field("name"), field("namespace"));
    let key = ObjectKey::new(&namespace, &name);
    if name.is_empty() {
        return Err(err(None, "metadata.name", "is required".into()));
    }
    if namespace.is_empty() {
        return Err(err(
            Some(key),
            "metadata.namespace",
            "must be a non-empty string".into(),
        ));
    }
    // As in Kubernetes: a name is one path segment (patch keys use `/`, behavior.md §10).
    if name.contains('/') || namespace.contains('/') {
        let field = if name.contains('/') {
            "metadata.name"
        } else {
            "metadata.namespace"
        };
        return Err(err(None, field, "may not contain '/'".into()));
    }
    match kind.as_str() {
        "WasmPlugin" => {
            let group = api_version.split('/').next().unwrap_or_default();
            if group != WASM_PLUGIN_API_GROUP {
                return Err(err(
                    Some(key),
                    "apiVersion",
                    format!(
                        "WasmPlugin must be {WASM_PLUGIN_API_GROUP}/v1alpha1, got {api_version:?}"
                    ),
                ));
            }
            let object = text.cloned().unwrap_or_else(|| Object::new(&value));
            let pull_timeout_annotation = value["metadata"]["annotations"][PULL_TIMEOUT_ANNOTATION]
                .as_str()
                .map(Box::from);
            let empty = Value::Object(Default::default());
            let spec_value = value.get("spec").unwrap_or(&empty);
            // Tracking the path costs about as much as the decoding itself: it is done only
            // for a spec that does not decode, to name the failing field (decoding is
            // deterministic, so the second attempt fails where the first did).
            let spec: WasmPluginSpec = WasmPluginSpec::deserialize(spec_value)
                .or_else(|_| serde_path_to_error::deserialize(spec_value))
                .map_err(|e| {
                    let path = e.path().to_string();
                    let field = if path == "." {
                        "spec".to_string()
                    } else {
                        format!("spec.{path}")
                    };
                    err(Some(key.clone()), &field, one_line(&e.inner().to_string()))
                })?;
            Ok(Manifest::Plugin(WasmPlugin {
                key,
                object,
                spec,
                pull_timeout_annotation,
                extension: None,
            }))
        }
        "Secret" => PullSecret::from_object(key.clone(), &value)
            .map(Manifest::Secret)
            .map_err(|(field, message)| err(Some(key), &field, message)),
        envoyfilter::ENVOY_FILTER_KIND => {
            let group = api_version.split('/').next().unwrap_or_default();
            if group != envoyfilter::ENVOY_FILTER_API_GROUP {
                return Err(err(
                    Some(key),
                    "apiVersion",
                    format!(
                        "EnvoyFilter must be {}/v1alpha3, got {api_version:?}",
                        envoyfilter::ENVOY_FILTER_API_GROUP
                    ),
                ));
            }
            envoyfilter::parse(key.clone(), value.into_owned())
                .map(Manifest::EnvoyFilter)
                .map_err(|(field, message)| err(Some(key), &field, message))
        }
        "" => Err(err(None, "kind", "is required".into())),
        other => Err(err(
            Some(key),
            "kind",
            format!("unsupported kind {other:?} (want WasmPlugin, EnvoyFilter or Secret)"),
        )),
    }
}

impl WasmPlugin {
    /// Parses a single WasmPlugin from YAML/JSON text (a convenience for tests and tools).
    pub fn from_yaml(text: &str) -> Result<Self, ParseError> {
        match parse_manifests(text).into_iter().next() {
            Some(Ok(Manifest::Plugin(p))) => Ok(p),
            Some(Ok(other)) => Err(ParseError {
                document: 0,
                object: Some(other.key().clone()),
                field: "kind".into(),
                message: "expected a WasmPlugin".into(),
            }),
            Some(Err(e)) => Err(e),
            None => Err(ParseError {
                document: 0,
                object: None,
                field: "(document)".into(),
                message: "empty document".into(),
            }),
        }
    }

    /// Re-derives the typed spec after `object` changed (e.g. by a merge patch).
    pub fn from_object(object: Value) -> Result<Self, ParseError> {
        match parse_object(0, object)? {
            Manifest::Plugin(p) => Ok(p),
            other => Err(ParseError {
                document: 0,
                object: Some(other.key().clone()),
                field: "kind".into(),
                message: "expected a WasmPlugin".into(),
            }),
        }
    }

    /// The ECDS resource name: the extension config's own name, else
    /// `extensions.istio.io/wasmplugin/<namespace>.<name>`.
    pub fn resource_name(&self) -> String {
        match &self.extension {
            Some(t) => t.name.clone(),
            None => self.key.resource_name(),
        }
    }

    /// The [`PULL_TIMEOUT_ANNOTATION`]: how long obtaining this plugin's module may take, if set
    /// (`None` also when it does not parse: validation refuses that).
    pub fn pull_timeout(&self) -> Option<std::time::Duration> {
        crate::config::go_duration(self.pull_timeout_annotation.as_deref()?).ok()
    }

    /// The parsed `spec.url`. A plugin standing for remote code without `http_uri` (an
    /// `EnvoyFilter` patch, behavior.md §10) has an empty url: [`ModuleUrl::NoHttpUri`].
    pub fn module_url(&self) -> Result<crate::url::ModuleUrl, crate::url::UrlError> {
        if self.extension.is_some() && self.spec.url.is_empty() {
            return Ok(crate::url::ModuleUrl::NoHttpUri);
        }
        crate::url::ModuleUrl::parse(&self.spec.url)
    }

    /// `spec.pluginConfig`, decoded from the object (none for a plugin standing for an extension
    /// config, whose configuration is the template's): read when the plugin's ECDS resource is
    /// built, once per change.
    pub fn plugin_config(&self) -> Option<serde_json::Map<String, Value>> {
        self.spec.plugin_config?;
        match self.object.value() {
            Value::Object(mut o) => match o.remove("spec")? {
                Value::Object(mut spec) => match spec.remove("pluginConfig")? {
                    Value::Object(config) => Some(config),
                    _ => None,
                },
                _ => None,
            },
            _ => None,
        }
    }

    /// `config.name` of the Envoy filter: `<namespace>.<name>`.
    pub fn filter_config_name(&self) -> String {
        format!("{}.{}", self.key.namespace, self.key.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_istio_example_with_defaults() {
        let docs = parse_manifests(
            r#"
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata:
  name: openid-connect
  namespace: istio-ingress
spec:
  selector:
    matchLabels:
      istio: ingressgateway
  url: oci://ghcr.io/istio-ecosystem/wasm-extensions/openid:1.0.0
  imagePullPolicy: IfNotPresent
  imagePullSecret: private-registry-pull-secret
  phase: AUTHN
  pluginConfig:
    openid_server: authn
    openid_realm: ingress
---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {name: b}
spec: {url: "http://x/y.wasm", type: NETWORK, failStrategy: FAIL_OPEN}
"#,
        );
        assert_eq!(docs.len(), 2);
        let Ok(Manifest::Plugin(p)) = &docs[0] else {
            panic!("{docs:?}")
        };
        assert_eq!(p.key.to_string(), "istio-ingress/openid-connect");
        assert_eq!(p.spec.image_pull_policy, ImagePullPolicy::IfNotPresent);
        assert_eq!(p.spec.phase, Phase::Authn);
        assert_eq!(
            p.resource_name(),
            "extensions.istio.io/wasmplugin/istio-ingress.openid-connect"
        );
        let Ok(Manifest::Plugin(b)) = &docs[1] else {
            panic!()
        };
        assert_eq!(b.key.namespace, "default");
        assert_eq!(b.spec.plugin_type, PluginType::Network);
        assert_eq!(b.spec.fail_strategy, FailStrategy::FailOpen);
    }

    /// The names built without formatting are the formatted ones.
    #[test]
    fn resource_names_and_ids_are_the_formatted_ones() {
        for key in [
            ObjectKey::new("ns", "p.q"),
            ObjectKey::new("ns", "ef/istio.basic_auth"),
        ] {
            let mut id = String::from("stale");
            id.clear();
            key.write_id(&mut id);
            assert_eq!(id, key.to_string());
            let expected = match key.name.split_once('/') {
                Some((_, resource)) => resource.to_string(),
                None => format!("{ECDS_RESOURCE_PREFIX}{}.{}", key.namespace, key.name),
            };
            assert_eq!(key.resource_name(), expected);
        }
    }

    #[test]
    fn bad_enum_names_its_field() {
        let e = WasmPlugin::from_yaml(
            "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: a}\nspec: {url: x/y, imagePullPolicy: Sometimes}",
        )
        .unwrap_err();
        assert_eq!(e.field, "spec.imagePullPolicy");
        let e = WasmPlugin::from_yaml(
            "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: a}\nspec: {url: x/y, urll: 1}",
        )
        .unwrap_err();
        assert!(e.message.contains("urll"), "{e}");
    }

    #[test]
    fn plugin_config_must_be_a_mapping_and_is_read_from_the_object() {
        let p = WasmPlugin::from_yaml(
            "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: a}\nspec: {url: x/y, pluginConfig: {k: [1, {v: w}]}}",
        )
        .unwrap();
        assert_eq!(p.spec.plugin_config, Some(Mapping));
        assert_eq!(
            Value::Object(p.plugin_config().unwrap()),
            serde_json::json!({"k": [1, {"v": "w"}]})
        );
        let e = WasmPlugin::from_yaml(
            "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: a}\nspec: {url: x/y, pluginConfig: [1]}",
        )
        .unwrap_err();
        assert_eq!(e.field, "spec.pluginConfig");
        assert!(e.message.contains("expected a map"), "{e}");
        let none = WasmPlugin::from_yaml(
            "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: a}\nspec: {url: x/y}",
        )
        .unwrap();
        assert!(none.plugin_config().is_none());
    }

    #[test]
    fn malformed_yaml_is_one_error() {
        let docs = parse_manifests("kind: [unclosed");
        assert_eq!(docs.len(), 1);
        assert!(docs[0]
            .as_ref()
            .unwrap_err()
            .message
            .starts_with("malformed yaml"));
    }

    #[test]
    fn server_owned_metadata_is_ignored() {
        let a = WasmPlugin::from_yaml(
            "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: a, resourceVersion: '5'}\nspec: {url: x/y}",
        )
        .unwrap();
        let b = WasmPlugin::from_yaml(
            "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: a, namespace: default}\nspec: {url: x/y}",
        )
        .unwrap();
        assert_eq!(a.object, b.object);
    }
}
