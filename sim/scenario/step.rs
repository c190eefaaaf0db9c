//! The steps of a scenario other than `expect` (scenarios.md "Steps"): parsing and validating each
//! into a [`Step`], with the references (`oci://`, `http(s)://`, `file://`) and hosts they name.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use super::expect::{parse_expect, Expect};
use super::{kind_of, one_line, sim_duration, Module};
use crate::plugin::ObjectKey;
use crate::sim::content::{Encoding, ImageFormat};
use crate::sim::rules::{AuthScheme, FailMode, FailRule, KindFilter};
use crate::url::{authority, path_and_query, ModuleUrl, OciRef};

/// Where `publish`/`unpublish` put a module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Oci(OciRef),
    /// `authority` is lowercase `host[:port]`; `path` includes the query.
    Http {
        url: String,
        authority: String,
        path: String,
    },
    /// `file:///path`: the absolute path.
    File(String),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Oci(r) => write!(f, "oci://{r}"),
            Target::Http { url, .. } => f.write_str(url),
            Target::File(p) => write!(f, "file://{p}"),
        }
    }
}

/// What `delete` removes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeleteTarget {
    Plugin(ObjectKey),
    /// Extension: deleting a pull secret (behavior.md §3).
    Secret(ObjectKey),
    /// An `EnvoyFilter`, with the plugins of its patches (behavior.md §10).
    EnvoyFilter(ObjectKey),
}

/// What `edit` patches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EditTarget {
    Plugin(ObjectKey),
    EnvoyFilter(ObjectKey),
}

impl std::fmt::Display for EditTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EditTarget::Plugin(k) => write!(f, "{k}"),
            EditTarget::EnvoyFilter(k) => write!(f, "EnvoyFilter {k}"),
        }
    }
}

/// One validated step.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    Publish {
        target: Target,
        module: String,
        format: ImageFormat,
        encoding: Encoding,
    },
    Unpublish {
        target: Target,
    },
    Apply(Value),
    Edit {
        target: EditTarget,
        patch: Value,
    },
    Delete(DeleteTarget),
    Fail(FailRule),
    Recover {
        host: String,
    },
    RequireAuth {
        host: String,
        username: String,
        password: String,
        /// Extension: `basic` (default) or `bearer`.
        scheme: AuthScheme,
    },
    Advance(Duration),
    Restart {
        keep_cache: bool,
    },
    Expect(Expect),
}

pub(super) const STEP_KINDS: &str = "publish, unpublish, apply, edit, delete, fail, recover, require_auth, advance, restart, expect";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPublish {
    #[serde(rename = "ref")]
    reference: String,
    module: String,
    #[serde(default)]
    format: Option<ImageFormat>,
    #[serde(default)]
    encoding: Option<Encoding>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRef {
    #[serde(rename = "ref")]
    reference: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEdit {
    #[serde(default)]
    plugin: Option<String>,
    #[serde(default, rename = "envoyFilter")]
    envoy_filter: Option<String>,
    patch: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDelete {
    #[serde(default)]
    plugin: Option<String>,
    #[serde(default)]
    secret: Option<String>,
    #[serde(default, rename = "envoyFilter")]
    envoy_filter: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFail {
    host: String,
    #[serde(default)]
    kind: Option<KindFilter>,
    error: Value,
    #[serde(default)]
    times: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHost {
    host: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    host: String,
    username: String,
    password: String,
    #[serde(default)]
    scheme: AuthScheme,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRestart {
    #[serde(default = "yes", rename = "keepCache")]
    keep_cache: bool,
}

pub(super) fn yes() -> bool {
    true
}

/// Deserializes a step argument, naming the path of a problem (`publish.format: unknown variant …`).
pub(super) fn de<T: DeserializeOwned>(kind: &str, v: &Value) -> Result<T, String> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = one_line(&e.into_inner().to_string());
        if path == "." {
            format!("{kind}: {inner}")
        } else {
            format!("{kind}.{path}: {inner}")
        }
    })
}

/// A null argument (`- restart:`) means an empty mapping.
pub(super) fn or_empty(v: &Value) -> Value {
    if v.is_null() {
        Value::Object(Default::default())
    } else {
        v.clone()
    }
}

/// Parses one step (substitutions already applied).
pub fn parse_step(v: &Value, modules: &BTreeMap<String, Module>) -> Result<Step, String> {
    let Value::Object(map) = v else {
        return Err(format!(
            "a step is a mapping with exactly one key ({STEP_KINDS}), got {}",
            kind_of(v)
        ));
    };
    if map.len() != 1 {
        let keys: Vec<&str> = map.keys().map(String::as_str).collect();
        return Err(format!(
            "a step has exactly one key, got {} ({})",
            keys.len(),
            keys.join(", ")
        ));
    }
    let (kind, arg) = map.iter().next().expect("one entry");
    let kind = kind.as_str();
    match kind {
        "publish" => {
            let p: RawPublish = de(kind, arg)?;
            let target = parse_target(&p.reference).map_err(|e| format!("publish.ref: {e}"))?;
            if !modules.contains_key(&p.module) {
                return Err(format!(
                    "publish.module: unknown module {:?} (declare it under modules)",
                    p.module
                ));
            }
            match &target {
                Target::Oci(r) => {
                    if r.digest.is_some() {
                        return Err("publish.ref: cannot publish at a digest; use a tag".into());
                    }
                    if p.encoding.is_some() {
                        return Err("publish.encoding: only for http(s) and file references (use format for oci)".into());
                    }
                }
                Target::Http { .. } | Target::File(_) => {
                    if p.format.is_some() {
                        return Err(
                            "publish.format: only for oci references (use encoding for http(s))"
                                .into(),
                        );
                    }
                }
            }
            Ok(Step::Publish {
                target,
                module: p.module,
                format: p.format.unwrap_or(ImageFormat::OciArtifact),
                encoding: p.encoding.unwrap_or(Encoding::Plain),
            })
        }
        "unpublish" => {
            let p: RawRef = de(kind, arg)?;
            let target = parse_target(&p.reference).map_err(|e| format!("unpublish.ref: {e}"))?;
            Ok(Step::Unpublish { target })
        }
        "apply" => {
            let Value::Object(obj) = arg else {
                return Err(format!(
                    "apply: want a Kubernetes manifest (a mapping), got {}",
                    kind_of(arg)
                ));
            };
            match obj.get("kind").and_then(Value::as_str) {
                Some("WasmPlugin" | "Secret" | "EnvoyFilter") => Ok(Step::Apply(arg.clone())),
                Some(other) => Err(format!(
                    "apply.kind: {other:?} is none of WasmPlugin, EnvoyFilter, Secret"
                )),
                None => Err("apply.kind: missing (want WasmPlugin, EnvoyFilter or Secret)".into()),
            }
        }
        "edit" => {
            let e: RawEdit = de(kind, arg)?;
            let target = match (e.plugin, e.envoy_filter) {
                (Some(p), None) => {
                    EditTarget::Plugin(parse_key(&p).map_err(|m| format!("edit.plugin: {m}"))?)
                }
                (None, Some(f)) => EditTarget::EnvoyFilter(
                    parse_object_key(&f).map_err(|m| format!("edit.envoyFilter: {m}"))?,
                ),
                _ => return Err("edit: want exactly one of plugin or envoyFilter".into()),
            };
            if !e.patch.is_object() {
                return Err(format!(
                    "edit.patch: want a JSON merge patch (a mapping), got {}",
                    kind_of(&e.patch)
                ));
            }
            Ok(Step::Edit {
                target,
                patch: e.patch,
            })
        }
        "delete" => {
            let d: RawDelete = de(kind, arg)?;
            match (d.plugin, d.secret, d.envoy_filter) {
                (Some(p), None, None) => Ok(Step::Delete(DeleteTarget::Plugin(
                    parse_key(&p).map_err(|m| format!("delete.plugin: {m}"))?,
                ))),
                (None, Some(s), None) => Ok(Step::Delete(DeleteTarget::Secret(
                    parse_object_key(&s).map_err(|m| format!("delete.secret: {m}"))?,
                ))),
                (None, None, Some(f)) => Ok(Step::Delete(DeleteTarget::EnvoyFilter(
                    parse_object_key(&f).map_err(|m| format!("delete.envoyFilter: {m}"))?,
                ))),
                _ => Err("delete: want exactly one of plugin, envoyFilter or secret".into()),
            }
        }
        "fail" => {
            let f: RawFail = de(kind, arg)?;
            let host = parse_host(&f.host).map_err(|m| format!("fail.host: {m}"))?;
            let mode = parse_fail_mode(&f.error).map_err(|m| format!("fail.error: {m}"))?;
            if f.times == Some(0) {
                return Err(
                    "fail.times: must be at least 1 (leave it out for all requests until recover)"
                        .into(),
                );
            }
            Ok(Step::Fail(FailRule {
                host,
                kind: f.kind.unwrap_or(KindFilter::Any),
                mode,
                times: f.times,
            }))
        }
        "recover" => {
            let h: RawHost = de(kind, arg)?;
            Ok(Step::Recover {
                host: parse_host(&h.host).map_err(|m| format!("recover.host: {m}"))?,
            })
        }
        "require_auth" => {
            let a: RawAuth = de(kind, arg)?;
            let host = parse_host(&a.host).map_err(|m| format!("require_auth.host: {m}"))?;
            if a.username.is_empty() || a.username.contains(':') {
                return Err("require_auth.username: must be non-empty and contain no ':'".into());
            }
            Ok(Step::RequireAuth {
                host,
                username: a.username,
                password: a.password,
                scheme: a.scheme,
            })
        }
        "advance" => match arg {
            Value::String(s) => sim_duration(s)
                .map(Step::Advance)
                .map_err(|e| format!("advance: {e}")),
            other => Err(format!(
                "advance: want a duration such as 90s or 25h, got {}",
                kind_of(other)
            )),
        },
        "restart" => {
            let r: RawRestart = de(kind, &or_empty(arg))?;
            Ok(Step::Restart {
                keep_cache: r.keep_cache,
            })
        }
        "expect" => parse_expect(&or_empty(arg), modules).map(Step::Expect),
        other => Err(format!("unknown step {other:?} (want one of {STEP_KINDS})")),
    }
}

/// A plugin key: `namespace/name` of a WasmPlugin, `namespace/envoyfilter/resource` of an
/// EnvoyFilter patch (or a bare `name` in `default`).
pub(super) fn parse_key(s: &str) -> Result<ObjectKey, String> {
    ObjectKey::parse(s).ok_or_else(|| format!("{s:?} is not namespace/name"))
}

/// An object key: `namespace/name` or a bare `name` in `default`.
fn parse_object_key(s: &str) -> Result<ObjectKey, String> {
    ObjectKey::parse(s)
        .filter(|k| !k.name.contains('/'))
        .ok_or_else(|| format!("{s:?} is not namespace/name"))
}

/// A host as `fail`, `recover`, `require_auth` and `requests` name it: `host[:port]`, lowercase.
pub fn parse_host(s: &str) -> Result<String, String> {
    let h = s.trim();
    if h.is_empty()
        || h.contains("://")
        || h.contains(['/', '@', '?', '#'])
        || h.contains(char::is_whitespace)
    {
        return Err(format!("{s:?} is not a host (want host or host:port)"));
    }
    Ok(h.to_ascii_lowercase())
}

pub(super) fn parse_fail_mode(v: &Value) -> Result<FailMode, String> {
    match v {
        Value::String(s) => match s.as_str() {
            "unavailable" => Ok(FailMode::Unavailable),
            "timeout" => Ok(FailMode::Timeout),
            "reset" => Ok(FailMode::Reset),
            "corrupt" => Ok(FailMode::Corrupt),
            other => Err(format!("unknown error {other:?} (want unavailable, timeout, reset, corrupt or {{status: N}})")),
        },
        Value::Object(m) => {
            if m.len() != 1 || !m.contains_key("status") {
                let keys: Vec<&str> = m.keys().map(String::as_str).collect();
                return Err(format!("want {{status: N}}, got keys {}", keys.join(", ")));
            }
            let n = m["status"].as_u64().filter(|n| (100..=599).contains(n)).ok_or("status: want an HTTP status between 100 and 599")?;
            Ok(FailMode::Status(n as u16))
        }
        other => Err(format!("want unavailable, timeout, reset, corrupt or {{status: N}}, got {}", kind_of(other))),
    }
}

/// Parses a `publish`/`unpublish` reference: `oci://…`, `http(s)://…` or `file:///…`.
pub fn parse_target(s: &str) -> Result<Target, String> {
    if !s.contains("://") {
        return Err(format!(
            "{s:?}: want oci://, http://, https:// or file:// reference"
        ));
    }
    Ok(match ModuleUrl::parse(s).map_err(|e| e.to_string())? {
        ModuleUrl::Oci(r) => Target::Oci(r),
        ModuleUrl::Http(u) => Target::Http {
            authority: authority(u.url()).to_string(),
            path: path_and_query(u.url()).to_string(),
            url: u.as_str().to_string(),
        },
        ModuleUrl::File(path) => Target::File(path),
        ModuleUrl::NoHttpUri => return Err(format!("{s:?}: not a reference")),
    })
}

impl Step {
    /// One line describing the step for the trace (credentials left out).
    pub fn describe(&self) -> String {
        match self {
            Step::Publish {
                target,
                module,
                format,
                encoding,
            } => match target {
                Target::Oci(_) => format!("publish {module} at {target} ({})", format.as_str()),
                _ => format!("publish {module} at {target} ({})", encoding.as_str()),
            },
            Step::Unpublish { target } => format!("unpublish {target}"),
            Step::Apply(v) => {
                let kind = v.get("kind").and_then(Value::as_str).unwrap_or("?");
                let meta = v.get("metadata");
                let name = meta
                    .and_then(|m| m.get("name"))
                    .and_then(Value::as_str)
                    .unwrap_or("?");
                let ns = meta
                    .and_then(|m| m.get("namespace"))
                    .and_then(Value::as_str)
                    .unwrap_or(crate::plugin::DEFAULT_NAMESPACE);
                format!("apply {kind} {ns}/{name}")
            }
            Step::Edit { target, patch } => format!("edit {target} {patch}"),
            Step::Delete(DeleteTarget::Plugin(k)) => format!("delete plugin {k}"),
            Step::Delete(DeleteTarget::Secret(k)) => format!("delete secret {k}"),
            Step::Delete(DeleteTarget::EnvoyFilter(k)) => format!("delete EnvoyFilter {k}"),
            Step::Fail(r) => {
                let times = r
                    .times
                    .map_or_else(|| "until recover".to_string(), |t| format!("{t} times"));
                format!(
                    "fail {} {} requests with {} ({times})",
                    r.host,
                    r.kind.as_str(),
                    r.mode
                )
            }
            Step::Recover { host } => format!("recover {host}"),
            Step::RequireAuth {
                host,
                username,
                scheme,
                ..
            } => format!("require_auth {host} ({}, user {username})", scheme.as_str()),
            Step::Advance(d) => format!("advance {}", humantime::format_duration(*d)),
            Step::Restart { keep_cache } => format!("restart (keepCache: {keep_cache})"),
            Step::Expect(e) => format!("expect ({} checks)", e.check_count()),
        }
    }
}
