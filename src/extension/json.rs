//! The proto3 JSON form of Envoy's Wasm filter config (`envoy.extensions.filters.{http,network}.
//! wasm.v3.Wasm`), decoded into the envoy-types messages: what an `EnvoyFilter` patch writes in
//! YAML and what a `TypedStruct` carries as a `google.protobuf.Struct`.
//!
//! envoy-types has no JSON mapping, so this mirrors the fields of `PluginConfig` and the messages
//! under it, with proto3 JSON's rules: each field by its proto name or its lowerCamelCase JSON name,
//! durations as `"1.5s"`, bytes as base64, enums by name or number, `Any` by `@type`. A field this
//! does not know is an error naming it (a typo must not be dropped silently), as is an `Any` of a
//! type other than the ones a Wasm config uses (`StringValue`, `BytesValue`, `Struct`).

use std::collections::HashMap;

use base64::Engine as _;
use envoy_types::pb::envoy::config::core::v3::{
    async_data_source, data_source, http_uri, AsyncDataSource, BackoffStrategy, DataSource,
    HttpUri, RemoteDataSource, RetryPolicy, WatchedDirectory,
};
use envoy_types::pb::envoy::extensions::wasm::v3::{
    plugin_config, CapabilityRestrictionConfig, EnvironmentVariables, FailurePolicy, PluginConfig,
    ReloadConfig, SanitizationConfig, VmConfig,
};
use envoy_types::pb::google::protobuf::{
    value::Kind, Any, BoolValue, BytesValue, Duration, ListValue, StringValue, Struct, UInt32Value,
    Value as PbValue,
};
use prost::Message;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

const STRING_VALUE: &str = "type.googleapis.com/google.protobuf.StringValue";
const BYTES_VALUE: &str = "type.googleapis.com/google.protobuf.BytesValue";
const STRUCT: &str = "type.googleapis.com/google.protobuf.Struct";

/// Decodes the JSON of a Wasm filter message (`{"config": {...}}`, without `@type`) into its
/// `PluginConfig`. The error names the offending field path.
pub fn plugin_config(value: &Value) -> Result<PluginConfig, String> {
    let wasm: JsonWasm = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        format!("{path}: {}", e.inner())
    })?;
    Ok(wasm
        .config
        .map(JsonPluginConfig::into_pb)
        .unwrap_or_default())
}

/// A `google.protobuf.Struct` as the JSON object it stands for.
pub fn struct_to_json(s: &Struct) -> Value {
    Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value_to_json(v)))
            .collect(),
    )
}

fn value_to_json(v: &PbValue) -> Value {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(*n)
            .map(Value::Number)
            .unwrap_or(Value::Null),
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::StructValue(s)) => struct_to_json(s),
        Some(Kind::ListValue(l)) => Value::Array(l.values.iter().map(value_to_json).collect()),
    }
}

/// A JSON object as a `google.protobuf.Struct`.
pub fn json_to_struct(m: &Map<String, Value>) -> Struct {
    Struct {
        fields: m
            .iter()
            .map(|(k, v)| (k.clone(), json_to_value(v)))
            .collect(),
    }
}

fn json_to_value(v: &Value) -> PbValue {
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => Kind::ListValue(ListValue {
            values: a.iter().map(json_to_value).collect(),
        }),
        Value::Object(m) => Kind::StructValue(json_to_struct(m)),
    };
    PbValue { kind: Some(kind) }
}

// ---------------------------------------------------------------------------------------------
// The JSON mirror of the messages. Each converts into its envoy-types message.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonWasm {
    #[serde(default)]
    config: Option<JsonPluginConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonPluginConfig {
    #[serde(default)]
    name: String,
    #[serde(default, alias = "rootId")]
    root_id: String,
    #[serde(default, alias = "vmConfig")]
    vm_config: Option<JsonVmConfig>,
    #[serde(default)]
    configuration: Option<JsonAny>,
    #[serde(default, alias = "failOpen")]
    fail_open: bool,
    #[serde(default, alias = "failurePolicy")]
    failure_policy: Option<JsonFailurePolicy>,
    #[serde(default, alias = "reloadConfig")]
    reload_config: Option<JsonReloadConfig>,
    #[serde(default, alias = "capabilityRestrictionConfig")]
    capability_restriction_config: Option<JsonCapabilities>,
    #[serde(default, alias = "allowOnHeadersStopIteration")]
    allow_on_headers_stop_iteration: Option<bool>,
}

impl JsonPluginConfig {
    #[allow(deprecated)] // `fail_open` and the capability config are still what Envoy reads
    fn into_pb(self) -> PluginConfig {
        PluginConfig {
            name: self.name,
            root_id: self.root_id,
            vm: self
                .vm_config
                .map(|v| plugin_config::Vm::VmConfig(v.into_pb())),
            configuration: self.configuration.map(|a| a.0),
            fail_open: self.fail_open,
            failure_policy: self.failure_policy.map_or(0, |p| p.0 as i32),
            reload_config: self.reload_config.map(|r| ReloadConfig {
                backoff: r.backoff.map(JsonBackoff::into_pb),
            }),
            capability_restriction_config: self.capability_restriction_config.map(|c| c.into_pb()),
            allow_on_headers_stop_iteration: self
                .allow_on_headers_stop_iteration
                .map(|value| BoolValue { value }),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonVmConfig {
    #[serde(default, alias = "vmId")]
    vm_id: String,
    #[serde(default)]
    runtime: String,
    #[serde(default)]
    code: Option<JsonAsyncDataSource>,
    #[serde(default)]
    configuration: Option<JsonAny>,
    #[serde(default, alias = "allowPrecompiled")]
    allow_precompiled: bool,
    #[serde(default, alias = "nackOnCodeCacheMiss")]
    nack_on_code_cache_miss: bool,
    #[serde(default, alias = "environmentVariables")]
    environment_variables: Option<JsonEnv>,
    #[serde(default, alias = "capabilityRestrictionConfig")]
    capability_restriction_config: Option<JsonCapabilities>,
}

impl JsonVmConfig {
    fn into_pb(self) -> VmConfig {
        VmConfig {
            vm_id: self.vm_id,
            runtime: self.runtime,
            code: self.code.map(JsonAsyncDataSource::into_pb),
            configuration: self.configuration.map(|a| a.0),
            allow_precompiled: self.allow_precompiled,
            nack_on_code_cache_miss: self.nack_on_code_cache_miss,
            environment_variables: self.environment_variables.map(|e| EnvironmentVariables {
                host_env_keys: e.host_env_keys,
                key_values: e.key_values,
            }),
            capability_restriction_config: self.capability_restriction_config.map(|c| c.into_pb()),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonEnv {
    #[serde(default, alias = "hostEnvKeys")]
    host_env_keys: Vec<String>,
    #[serde(default, alias = "keyValues")]
    key_values: HashMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonCapabilities {
    #[serde(default, alias = "allowedCapabilities")]
    allowed_capabilities: HashMap<String, Empty>,
}

impl JsonCapabilities {
    fn into_pb(self) -> CapabilityRestrictionConfig {
        CapabilityRestrictionConfig {
            allowed_capabilities: self
                .allowed_capabilities
                .into_keys()
                .map(|k| (k, SanitizationConfig {}))
                .collect(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonReloadConfig {
    #[serde(default)]
    backoff: Option<JsonBackoff>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonBackoff {
    #[serde(default, alias = "baseInterval")]
    base_interval: Option<JsonDuration>,
    #[serde(default, alias = "maxInterval")]
    max_interval: Option<JsonDuration>,
}

impl JsonBackoff {
    fn into_pb(self) -> BackoffStrategy {
        BackoffStrategy {
            base_interval: self.base_interval.map(|d| d.0),
            max_interval: self.max_interval.map(|d| d.0),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonAsyncDataSource {
    #[serde(default)]
    local: Option<JsonDataSource>,
    #[serde(default)]
    remote: Option<JsonRemote>,
}

impl JsonAsyncDataSource {
    fn into_pb(self) -> AsyncDataSource {
        // Both set is what a oneof refuses; the remote one is the one that matters here.
        let specifier = match (self.remote, self.local) {
            (Some(r), _) => Some(async_data_source::Specifier::Remote(r.into_pb())),
            (None, Some(l)) => Some(async_data_source::Specifier::Local(l.into_pb())),
            (None, None) => None,
        };
        AsyncDataSource { specifier }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonDataSource {
    #[serde(default)]
    filename: Option<String>,
    #[serde(default, alias = "inlineBytes")]
    inline_bytes: Option<JsonBytes>,
    #[serde(default, alias = "inlineString")]
    inline_string: Option<String>,
    #[serde(default, alias = "environmentVariable")]
    environment_variable: Option<String>,
    #[serde(default, alias = "watchedDirectory")]
    watched_directory: Option<JsonWatchedDirectory>,
}

impl JsonDataSource {
    fn into_pb(self) -> DataSource {
        use data_source::Specifier as S;
        let specifier = (self.filename.map(S::Filename))
            .or(self.inline_bytes.map(|b| S::InlineBytes(b.0)))
            .or(self.inline_string.map(S::InlineString))
            .or(self.environment_variable.map(S::EnvironmentVariable));
        DataSource {
            watched_directory: self.watched_directory.map(|w| WatchedDirectory {
                path: w.path,
                watch_modify: w.watch_modify,
            }),
            specifier,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonWatchedDirectory {
    #[serde(default)]
    path: String,
    #[serde(default, alias = "watchModify")]
    watch_modify: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRemote {
    #[serde(default, alias = "httpUri")]
    http_uri: Option<JsonHttpUri>,
    #[serde(default)]
    sha256: String,
    #[serde(default, alias = "retryPolicy")]
    retry_policy: Option<JsonRetryPolicy>,
}

impl JsonRemote {
    fn into_pb(self) -> RemoteDataSource {
        RemoteDataSource {
            http_uri: self.http_uri.map(|h| HttpUri {
                uri: h.uri,
                timeout: h.timeout.map(|d| d.0),
                http_upstream_type: h.cluster.map(http_uri::HttpUpstreamType::Cluster),
            }),
            sha256: self.sha256,
            retry_policy: self.retry_policy.map(|r| RetryPolicy {
                retry_back_off: r.retry_back_off.map(JsonBackoff::into_pb),
                num_retries: r.num_retries.map(|value| UInt32Value { value }),
                ..Default::default()
            }),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonHttpUri {
    #[serde(default)]
    uri: String,
    #[serde(default)]
    cluster: Option<String>,
    #[serde(default)]
    timeout: Option<JsonDuration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRetryPolicy {
    #[serde(default, alias = "retryBackOff")]
    retry_back_off: Option<JsonBackoff>,
    #[serde(default, alias = "numRetries")]
    num_retries: Option<u32>,
}

/// `FailurePolicy` by name or number.
struct JsonFailurePolicy(FailurePolicy);

impl<'de> Deserialize<'de> for JsonFailurePolicy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let policy = match Value::deserialize(d)? {
            Value::String(s) => FailurePolicy::from_str_name(&s),
            Value::Number(n) => n
                .as_i64()
                .and_then(|n| i32::try_from(n).ok())
                .and_then(|n| FailurePolicy::try_from(n).ok()),
            _ => None,
        };
        policy.map(JsonFailurePolicy).ok_or_else(|| {
            D::Error::custom("unknown failure policy (want FAIL_CLOSED, FAIL_OPEN or FAIL_RELOAD)")
        })
    }
}

/// A proto3 JSON duration: `"10s"`, `"0.5s"`.
struct JsonDuration(Duration);

impl<'de> Deserialize<'de> for JsonDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s)
            .map(JsonDuration)
            .ok_or_else(|| D::Error::custom(format!("invalid duration {s:?} (want e.g. \"10s\")")))
    }
}

fn parse_duration(s: &str) -> Option<Duration> {
    let number = s.strip_suffix('s')?;
    let (negative, number) = match number.strip_prefix('-') {
        Some(n) => (true, n),
        None => (false, number),
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(fraction) || fraction.len() > 9 {
        return None;
    }
    let seconds: i64 = whole.parse().ok()?;
    let nanos: i32 = format!("{fraction:0<9}").parse().ok()?;
    Some(if negative {
        Duration {
            seconds: -seconds,
            nanos: -nanos,
        }
    } else {
        Duration { seconds, nanos }
    })
}

/// Base64 bytes (standard or URL-safe alphabet, padded or not, as proto3 JSON allows).
struct JsonBytes(Vec<u8>);

impl<'de> Deserialize<'de> for JsonBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        decode_base64(&s)
            .map(JsonBytes)
            .ok_or_else(|| D::Error::custom("invalid base64"))
    }
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|e| e.decode(s).ok())
}

/// An `Any` by its `@type`: the wrapper types and `Struct` a Wasm `configuration` uses.
struct JsonAny(Any);

impl<'de> Deserialize<'de> for JsonAny {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut m = Map::<String, Value>::deserialize(d)?;
        let type_url = match m.remove("@type") {
            Some(Value::String(t)) => t,
            _ => return Err(D::Error::custom("an Any needs a string \"@type\"")),
        };
        let only_value = |m: &Map<String, Value>| -> Result<Value, D::Error> {
            match (m.len(), m.get("value")) {
                (1, Some(v)) => Ok(v.clone()),
                (0, None) => Ok(Value::Null),
                _ => Err(D::Error::custom(format!(
                    "{type_url} takes only \"value\" beside \"@type\""
                ))),
            }
        };
        let value = match type_url.as_str() {
            STRING_VALUE => match only_value(&m)? {
                Value::String(value) => StringValue { value }.encode_to_vec(),
                Value::Null => Vec::new(),
                _ => return Err(D::Error::custom("StringValue.value must be a string")),
            },
            BYTES_VALUE => match only_value(&m)? {
                Value::String(s) => BytesValue {
                    value: decode_base64(&s)
                        .ok_or_else(|| D::Error::custom("BytesValue.value: invalid base64"))?,
                }
                .encode_to_vec(),
                Value::Null => Vec::new(),
                _ => return Err(D::Error::custom("BytesValue.value must be base64")),
            },
            STRUCT => match only_value(&m)? {
                Value::Object(o) => json_to_struct(&o).encode_to_vec(),
                Value::Null => Vec::new(),
                _ => return Err(D::Error::custom("Struct.value must be an object")),
            },
            other => {
                return Err(D::Error::custom(format!(
                    "unsupported @type {other:?} (a Wasm configuration is a google.protobuf.StringValue, BytesValue or Struct)"
                )))
            }
        };
        Ok(JsonAny(Any { type_url, value }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_both_field_spellings_and_wrappers() {
        let v: Value = serde_json::from_str(
            r#"{"config": {
                "name": "basic_auth", "rootId": "basic_auth_root",
                "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                  "value": "{\"a\":1}"},
                "failurePolicy": "FAIL_OPEN",
                "vm_config": {"vm_id": "basic_auth", "runtime": "envoy.wasm.runtime.v8",
                  "environmentVariables": {"keyValues": {"K": "v"}},
                  "code": {"remote": {"http_uri": {"uri": "https://h/m.wasm", "timeout": "1.5s"},
                                      "sha256": "abc"}}}}}"#,
        )
        .unwrap();
        let pc = plugin_config(&v).unwrap();
        assert_eq!(
            (pc.name.as_str(), pc.root_id.as_str()),
            ("basic_auth", "basic_auth_root")
        );
        assert_eq!(pc.failure_policy, FailurePolicy::FailOpen as i32);
        let cfg = pc.configuration.unwrap();
        assert_eq!(
            StringValue::decode(cfg.value.as_slice()).unwrap().value,
            "{\"a\":1}"
        );
        let Some(plugin_config::Vm::VmConfig(vm)) = pc.vm else {
            panic!()
        };
        assert_eq!(vm.environment_variables.unwrap().key_values["K"], "v");
        let Some(async_data_source::Specifier::Remote(r)) = vm.code.unwrap().specifier else {
            panic!()
        };
        let h = r.http_uri.unwrap();
        assert_eq!(h.uri, "https://h/m.wasm");
        assert_eq!(
            h.timeout,
            Some(Duration {
                seconds: 1,
                nanos: 500_000_000
            })
        );
        assert_eq!(r.sha256, "abc");
    }

    #[test]
    fn unknown_fields_and_types_are_named() {
        let e = plugin_config(&serde_json::json!({"config": {"vm_config": {"vmid": "x"}}}))
            .unwrap_err();
        assert!(
            e.starts_with("config.vm_config.vmid: unknown field `vmid`"),
            "{e}"
        );
        let e = plugin_config(&serde_json::json!({"config": {"configuration":
            {"@type": "type.googleapis.com/x.Y", "value": 1}}}))
        .unwrap_err();
        assert!(
            e.contains("unsupported @type \"type.googleapis.com/x.Y\""),
            "{e}"
        );
        let e = plugin_config(
            &serde_json::json!({"config": {"vm_config": {"code": {"remote":
            {"http_uri": {"uri": "u", "timeout": "5m"}}}}}}),
        )
        .unwrap_err();
        assert!(e.contains("invalid duration \"5m\""), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0s").unwrap().seconds, 0);
        assert_eq!(parse_duration("-2.000000001s").unwrap().nanos, -1);
        for bad in ["", "s", "1", "1.s.", "1.0000000001s", "a s"] {
            assert!(parse_duration(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn struct_round_trip() {
        let v = serde_json::json!({"a": [1.5, "x", true, null, {"b": {}}]});
        let s = json_to_struct(v.as_object().unwrap());
        assert_eq!(struct_to_json(&s), v);
    }
}
