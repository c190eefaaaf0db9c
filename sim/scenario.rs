//! The scenario file format (scenarios.md): parsing and validation of a YAML scenario into a
//! [`Scenario`], and of each step into a [`Step`].
//!
//! Everything that can be checked without running is checked at load time, so a bad file is reported
//! (exit status 2) with the step index and the problem before anything runs. Unknown keys are errors
//! everywhere. Steps are kept as JSON values and re-parsed when they run, after the substitutions
//! `${sha256:NAME}` and `${digest:oci://…}` have been evaluated (a digest depends on what is published
//! at that moment); at load time a digest is replaced by a placeholder so the rest of the step is still
//! validated.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use super::content::{module_bytes, Encoding, ImageFormat};
use super::world::AuthScheme;
use crate::config::{parse_go_duration, parse_size, Config, Delivery};
use crate::metrics::normalize_series;
use crate::outcome::Reason;
use crate::plugin::ObjectKey;
use crate::store::sha256_hex;
use crate::url::{authority, path_and_query, ModuleUrl, OciRef};

/// `serves` values that are not module names.
pub const SERVES_DENY_ALL: &str = "deny-all";
pub const SERVES_ALLOW_ALL: &str = "allow-all";
pub const SERVES_ABSENT: &str = "absent";
/// The `outcome` of a plugin that was not processed since the previous `expect`.
pub const OUTCOME_NONE: &str = "none";
const OUTCOMES: [&str; 6] = [
    "pulled",
    "revalidated",
    "cached",
    "rejected",
    "invalid",
    OUTCOME_NONE,
];
const RESERVED_MODULE_NAMES: [&str; 4] = [
    SERVES_DENY_ALL,
    SERVES_ALLOW_ALL,
    SERVES_ABSENT,
    OUTCOME_NONE,
];
/// The largest module the simulator builds (modules are held in memory).
pub const MAX_MODULE_SIZE: u64 = 512 << 20;
/// The longest duration a scenario may name (100 years): virtual time never overflows.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);
/// Stands in for a manifest digest at load time.
const PLACEHOLDER_DIGEST: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Why a scenario file is not a valid scenario.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadError {
    /// 1-based index of the offending step, if the problem is in a step.
    pub step: Option<usize>,
    pub message: String,
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.step {
            Some(n) => write!(f, "step {n}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

fn top_error(message: impl Into<String>) -> LoadError {
    LoadError {
        step: None,
        message: message.into(),
    }
}

/// A module the world knows: its deterministic bytes and their hex sha256.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Module {
    pub bytes: Vec<u8>,
    pub sha256: String,
}

/// A loaded, validated scenario.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: String,
    pub description: Option<String>,
    pub seed: u64,
    /// The server configuration from `options` (defaults elsewhere).
    pub config: Config,
    pub modules: BTreeMap<String, Module>,
    /// The steps as written (JSON), parsed again when they run.
    pub steps: Vec<Value>,
}

impl Scenario {
    /// The module whose bytes have this sha256.
    pub fn module_by_sha256(&self, sha256: &str) -> Option<&str> {
        self.modules
            .iter()
            .find(|(_, m)| m.sha256 == sha256)
            .map(|(n, _)| n.as_str())
    }

    /// Parses step `index` (0-based) after substituting `${…}` with `digest` resolving
    /// `${digest:REF}` (an error message when the reference is not published).
    pub fn step(
        &self,
        index: usize,
        digest: &dyn Fn(&OciRef) -> Result<String, String>,
    ) -> Result<Step, String> {
        let raw = self
            .steps
            .get(index)
            .ok_or_else(|| format!("no step {}", index + 1))?;
        let substituted = substitute(raw, &mut |expr| self.evaluate(expr, digest))?;
        parse_step(&substituted, &self.modules)
    }

    fn evaluate(
        &self,
        expr: &Substitution,
        digest: &dyn Fn(&OciRef) -> Result<String, String>,
    ) -> Result<String, String> {
        match expr {
            Substitution::Sha256(name) => self
                .modules
                .get(name)
                .map(|m| m.sha256.clone())
                .ok_or_else(|| format!("${{sha256:{name}}}: unknown module {name:?}")),
            Substitution::Digest(r) => digest(r),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Top level

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    seed: u64,
    #[serde(default)]
    options: RawOptions,
    modules: BTreeMap<String, Option<RawModule>>,
    steps: Vec<Value>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawOptions {
    module_expiry: Option<String>,
    purge_interval: Option<String>,
    http_request_timeout: Option<String>,
    http_request_max_retries: Option<u32>,
    insecure_registries: Option<Vec<String>>,
    max_binary_size: Option<Value>,
    delivery: Option<Delivery>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModule {
    #[serde(default)]
    size: Option<Value>,
    #[serde(default)]
    invalid: bool,
}

/// Parses and validates a scenario document.
pub fn parse_scenario(text: &str) -> Result<Scenario, LoadError> {
    if text.trim().is_empty() {
        return Err(top_error(
            "empty file (want a scenario with name, modules and steps)",
        ));
    }
    let de = serde_yaml_ng::Deserializer::from_str(text);
    let raw: RawScenario = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = one_line(&e.into_inner().to_string());
        if path == "." {
            top_error(inner)
        } else {
            top_error(format!("{path}: {inner}"))
        }
    })?;
    if raw.name.trim().is_empty() {
        return Err(top_error("name: must not be empty"));
    }
    let config = build_config(&raw.options)?;
    let mut modules = BTreeMap::new();
    let mut by_bytes: BTreeMap<String, String> = BTreeMap::new();
    for (name, m) in raw.modules {
        let m = m.unwrap_or_default();
        if name.is_empty() || name.contains(['}', '$']) || name.trim() != name {
            return Err(top_error(format!("modules: invalid module name {name:?}")));
        }
        if RESERVED_MODULE_NAMES.contains(&name.as_str()) {
            return Err(top_error(format!(
                "modules.{name}: {name:?} is reserved (it is a value of expect serves/outcome)"
            )));
        }
        let size = match &m.size {
            None => None,
            Some(v) => {
                let size =
                    size_value(v).map_err(|e| top_error(format!("modules.{name}.size: {e}")))?;
                if size > MAX_MODULE_SIZE {
                    return Err(top_error(format!(
                        "modules.{name}.size: at most 512Mi (modules are held in memory)"
                    )));
                }
                Some(size)
            }
        };
        let bytes = module_bytes(&name, size, m.invalid);
        let sha256 = sha256_hex(&bytes);
        if let Some(other) = by_bytes.insert(sha256.clone(), name.clone()) {
            return Err(top_error(format!(
                "modules: {other} and {name} have the same bytes"
            )));
        }
        modules.insert(name, Module { bytes, sha256 });
    }
    let scenario = Scenario {
        name: raw.name,
        description: raw.description,
        seed: raw.seed,
        config,
        modules,
        steps: raw.steps,
    };
    // Validate every step now, with placeholder digests.
    for (i, raw) in scenario.steps.iter().enumerate() {
        let err = |message: String| LoadError {
            step: Some(i + 1),
            message,
        };
        let substituted = substitute(raw, &mut |expr| match expr {
            Substitution::Sha256(name) => scenario
                .modules
                .get(name)
                .map(|m| m.sha256.clone())
                .ok_or_else(|| format!("${{sha256:{name}}}: unknown module {name:?}")),
            Substitution::Digest(_) => Ok(PLACEHOLDER_DIGEST.to_string()),
        })
        .map_err(err)?;
        parse_step(&substituted, &scenario.modules).map_err(err)?;
    }
    Ok(scenario)
}

fn build_config(o: &RawOptions) -> Result<Config, LoadError> {
    let mut c = Config::default();
    let duration =
        |field: &str, v: &Option<String>, slot: &mut Duration| -> Result<(), LoadError> {
            if let Some(s) = v {
                *slot = sim_duration(s).map_err(|e| top_error(format!("options.{field}: {e}")))?;
            }
            Ok(())
        };
    duration("moduleExpiry", &o.module_expiry, &mut c.module_expiry)?;
    duration("purgeInterval", &o.purge_interval, &mut c.purge_interval)?;
    duration(
        "httpRequestTimeout",
        &o.http_request_timeout,
        &mut c.http_request_timeout,
    )?;
    if c.purge_interval < Duration::from_millis(1) {
        return Err(top_error("options.purgeInterval: must be at least 1ms"));
    }
    if let Some(n) = o.http_request_max_retries {
        c.http_request_max_retries = n;
    }
    if let Some(list) = &o.insecure_registries {
        c.insecure_registries = list.clone();
    }
    if let Some(v) = &o.max_binary_size {
        c.max_binary_size =
            size_value(v).map_err(|e| top_error(format!("options.maxBinarySize: {e}")))?;
    }
    if let Some(d) = o.delivery {
        c.delivery = d;
    }
    // Hosts are simulated: nothing is written to the real file system.
    c.cache_dir = crate::store::MEM_ROOT.into();
    Ok(c)
}

/// A Go duration of at most [`MAX_DURATION`]. Numbers are bounded before parsing, so that no
/// input can overflow the conversion to a [`Duration`].
pub fn sim_duration(s: &str) -> Result<Duration, String> {
    let longest_number = s
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map(str::len)
        .max()
        .unwrap_or(0);
    if s.len() > 64 || longest_number > 12 {
        return Err(format!("{s:?} is too long (at most 100 years)"));
    }
    let d = parse_go_duration("duration", s).map_err(|e| e.why)?;
    if d > MAX_DURATION {
        return Err(format!("{s:?} is more than 100 years"));
    }
    Ok(d)
}

/// A size: a number of bytes, or a string such as `2Mi`.
fn size_value(v: &Value) -> Result<u64, String> {
    match v {
        Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| format!("{n} is not a size in bytes")),
        Value::String(s) => parse_size("size", s).map_err(|e| e.why),
        other => Err(format!(
            "want a size such as 1024 or 2Mi, got {}",
            kind_of(other)
        )),
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

// ---------------------------------------------------------------------------------------------
// Substitutions

/// A `${…}` expression.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Substitution {
    Sha256(String),
    Digest(OciRef),
}

const SUB_SHA256: &str = "${sha256:";
const SUB_DIGEST: &str = "${digest:";

/// Replaces every `${sha256:…}` and `${digest:…}` in the strings (and mapping keys) of `v`. Other
/// `${…}` text is left alone (plugin configurations may contain it).
pub fn substitute(
    v: &Value,
    eval: &mut dyn FnMut(&Substitution) -> Result<String, String>,
) -> Result<Value, String> {
    Ok(match v {
        Value::String(s) => Value::String(substitute_str(s, eval)?),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|i| substitute(i, eval))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => {
            let mut out = serde_json::Map::new();
            for (k, val) in map {
                out.insert(substitute_str(k, eval)?, substitute(val, eval)?);
            }
            Value::Object(out)
        }
        other => other.clone(),
    })
}

fn substitute_str(
    s: &str,
    eval: &mut dyn FnMut(&Substitution) -> Result<String, String>,
) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = s;
    loop {
        let next = [SUB_SHA256, SUB_DIGEST]
            .iter()
            .filter_map(|p| rest.find(p).map(|i| (i, *p)))
            .min();
        let Some((at, prefix)) = next else {
            out.push_str(rest);
            return Ok(out);
        };
        out.push_str(&rest[..at]);
        let body_start = at + prefix.len();
        let Some(len) = rest[body_start..].find('}') else {
            return Err(format!("unterminated {prefix}…}} in {s:?}"));
        };
        let arg = &rest[body_start..body_start + len];
        let expr = if prefix == SUB_SHA256 {
            if arg.is_empty() {
                return Err(format!("{prefix}}}: a module name is required"));
            }
            Substitution::Sha256(arg.to_string())
        } else {
            let r = arg.strip_prefix("oci://").unwrap_or(arg);
            let parsed = OciRef::parse(r).map_err(|e| format!("${{digest:{arg}}}: {e}"))?;
            Substitution::Digest(parsed)
        };
        out.push_str(&eval(&expr)?);
        rest = &rest[body_start + len + 1..];
    }
}

// ---------------------------------------------------------------------------------------------
// Steps

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

/// Which counted requests a failure rule applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KindFilter {
    Manifest,
    Blob,
    Get,
    Any,
}

impl KindFilter {
    pub fn as_str(self) -> &'static str {
        match self {
            KindFilter::Manifest => "manifest",
            KindFilter::Blob => "blob",
            KindFilter::Get => "get",
            KindFilter::Any => "any",
        }
    }
}

/// How a failed request fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailMode {
    Unavailable,
    Timeout,
    Reset,
    Corrupt,
    Status(u16),
}

impl std::fmt::Display for FailMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FailMode::Unavailable => f.write_str("unavailable"),
            FailMode::Timeout => f.write_str("timeout"),
            FailMode::Reset => f.write_str("reset"),
            FailMode::Corrupt => f.write_str("corrupt"),
            FailMode::Status(s) => write!(f, "status {s}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailRule {
    pub host: String,
    pub kind: KindFilter,
    pub mode: FailMode,
    /// `None`: until `recover`.
    pub times: Option<u32>,
}

/// Expected outcome, reason and served module of one plugin.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PluginExpect {
    pub outcome: Option<String>,
    pub reason: Option<String>,
    pub serves: Option<String>,
}

/// Expected request counts of one host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestExpect {
    Total(u64),
    Kinds {
        manifest: Option<u64>,
        blob: Option<u64>,
        get: Option<u64>,
    },
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Expect {
    pub plugins: BTreeMap<ObjectKey, PluginExpect>,
    pub cache: Option<BTreeSet<String>>,
    pub expired: Option<BTreeSet<String>>,
    /// Keyed by lowercase host.
    pub requests: BTreeMap<String, RequestExpect>,
    /// Keyed by normalised series.
    pub metrics: BTreeMap<String, f64>,
}

impl Expect {
    pub fn check_count(&self) -> usize {
        self.plugins
            .values()
            .map(|p| {
                usize::from(p.outcome.is_some())
                    + usize::from(p.reason.is_some())
                    + usize::from(p.serves.is_some())
            })
            .sum::<usize>()
            + usize::from(self.cache.is_some())
            + usize::from(self.expired.is_some())
            + self
                .requests
                .values()
                .map(|r| match r {
                    RequestExpect::Total(_) => 1,
                    RequestExpect::Kinds {
                        manifest,
                        blob,
                        get,
                    } => {
                        usize::from(manifest.is_some())
                            + usize::from(blob.is_some())
                            + usize::from(get.is_some())
                    }
                })
                .sum::<usize>()
            + self.metrics.len()
    }
}

/// What `delete` removes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeleteTarget {
    Plugin(ObjectKey),
    /// Extension: deleting a pull secret (behavior.md §3).
    Secret(ObjectKey),
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
        plugin: ObjectKey,
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

const STEP_KINDS: &str = "publish, unpublish, apply, edit, delete, fail, recover, require_auth, advance, restart, expect";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPublish {
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
struct RawRef {
    #[serde(rename = "ref")]
    reference: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEdit {
    plugin: String,
    patch: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDelete {
    #[serde(default)]
    plugin: Option<String>,
    #[serde(default)]
    secret: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFail {
    host: String,
    #[serde(default)]
    kind: Option<KindFilter>,
    error: Value,
    #[serde(default)]
    times: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHost {
    host: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    host: String,
    username: String,
    password: String,
    #[serde(default)]
    scheme: AuthScheme,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRestart {
    #[serde(default = "yes", rename = "keepCache")]
    keep_cache: bool,
}

fn yes() -> bool {
    true
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExpect {
    #[serde(default)]
    plugins: Option<BTreeMap<String, Option<RawPluginExpect>>>,
    #[serde(default)]
    cache: Option<Vec<String>>,
    #[serde(default)]
    expired: Option<Vec<String>>,
    #[serde(default)]
    requests: Option<BTreeMap<String, Value>>,
    #[serde(default)]
    metrics: Option<BTreeMap<String, f64>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPluginExpect {
    #[serde(default)]
    outcome: Option<String>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    serves: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKinds {
    #[serde(default)]
    manifest: Option<u64>,
    #[serde(default)]
    blob: Option<u64>,
    #[serde(default)]
    get: Option<u64>,
}

/// Deserializes a step argument, naming the path of a problem (`publish.format: unknown variant …`).
fn de<T: DeserializeOwned>(kind: &str, v: &Value) -> Result<T, String> {
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
fn or_empty(v: &Value) -> Value {
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
                Some("WasmPlugin") | Some("Secret") => Ok(Step::Apply(arg.clone())),
                Some(other) => Err(format!(
                    "apply.kind: {other:?} is neither WasmPlugin nor Secret"
                )),
                None => Err("apply.kind: missing (want WasmPlugin or Secret)".into()),
            }
        }
        "edit" => {
            let e: RawEdit = de(kind, arg)?;
            let plugin = parse_key(&e.plugin).map_err(|m| format!("edit.plugin: {m}"))?;
            if !e.patch.is_object() {
                return Err(format!(
                    "edit.patch: want a JSON merge patch (a mapping), got {}",
                    kind_of(&e.patch)
                ));
            }
            Ok(Step::Edit {
                plugin,
                patch: e.patch,
            })
        }
        "delete" => {
            let d: RawDelete = de(kind, arg)?;
            match (d.plugin, d.secret) {
                (Some(p), None) => Ok(Step::Delete(DeleteTarget::Plugin(
                    parse_key(&p).map_err(|m| format!("delete.plugin: {m}"))?,
                ))),
                (None, Some(s)) => Ok(Step::Delete(DeleteTarget::Secret(
                    parse_key(&s).map_err(|m| format!("delete.secret: {m}"))?,
                ))),
                _ => Err("delete: want exactly one of plugin or secret".into()),
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

fn parse_expect(arg: &Value, modules: &BTreeMap<String, Module>) -> Result<Expect, String> {
    let raw: RawExpect = de("expect", arg)?;
    let mut e = Expect::default();
    let known = |field: &str, name: &str| -> Result<(), String> {
        if modules.contains_key(name) {
            Ok(())
        } else {
            Err(format!("expect.{field}: unknown module {name:?}"))
        }
    };
    for (key, p) in raw.plugins.unwrap_or_default() {
        let p = p.unwrap_or_default();
        let k = parse_key(&key).map_err(|m| format!("expect.plugins: {m}"))?;
        let at = format!("expect.plugins.{key}");
        if let Some(o) = &p.outcome {
            if !OUTCOMES.contains(&o.as_str()) {
                return Err(format!(
                    "{at}.outcome: unknown outcome {o:?} (want one of {})",
                    OUTCOMES.join(", ")
                ));
            }
        }
        if let Some(r) = &p.reason {
            match p.outcome.as_deref() {
                Some("rejected") => {
                    if Reason::parse(r).is_none() {
                        let all: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
                        return Err(format!(
                            "{at}.reason: unknown reason {r:?} (want one of {})",
                            all.join(", ")
                        ));
                    }
                }
                Some("invalid") | None => {
                    if r.is_empty() {
                        return Err(format!("{at}.reason: must not be empty"));
                    }
                }
                Some(o) => {
                    return Err(format!(
                        "{at}.reason: only with outcome rejected or invalid, not {o}"
                    ))
                }
            }
        }
        if let Some(s) = &p.serves {
            if ![SERVES_DENY_ALL, SERVES_ALLOW_ALL, SERVES_ABSENT].contains(&s.as_str())
                && !modules.contains_key(s)
            {
                return Err(format!(
                    "{at}.serves: {s:?} is neither a module nor deny-all, allow-all or absent"
                ));
            }
        }
        if e.plugins
            .insert(
                k.clone(),
                PluginExpect {
                    outcome: p.outcome,
                    reason: p.reason,
                    serves: p.serves,
                },
            )
            .is_some()
        {
            return Err(format!("expect.plugins: {k} is listed twice"));
        }
    }
    let set =
        |field: &str, list: Option<Vec<String>>| -> Result<Option<BTreeSet<String>>, String> {
            let Some(list) = list else { return Ok(None) };
            let mut s = BTreeSet::new();
            for name in list {
                known(field, &name)?;
                if !s.insert(name.clone()) {
                    return Err(format!("expect.{field}: {name} is listed twice"));
                }
            }
            Ok(Some(s))
        };
    e.cache = set("cache", raw.cache)?;
    e.expired = set("expired", raw.expired)?;
    for (host, v) in raw.requests.unwrap_or_default() {
        let h = parse_host(&host).map_err(|m| format!("expect.requests: {m}"))?;
        let at = format!("expect.requests.{host}");
        let r = match &v {
            Value::Number(n) => RequestExpect::Total(
                n.as_u64()
                    .ok_or_else(|| format!("{at}: want a count, got {n}"))?,
            ),
            Value::Object(_) => {
                let k: RawKinds = de(&at, &v)?;
                RequestExpect::Kinds {
                    manifest: k.manifest,
                    blob: k.blob,
                    get: k.get,
                }
            }
            other => {
                return Err(format!(
                    "{at}: want a count or {{manifest, blob, get}}, got {}",
                    kind_of(other)
                ))
            }
        };
        if e.requests.insert(h.clone(), r).is_some() {
            return Err(format!("expect.requests: {h} is listed twice"));
        }
    }
    for (series, value) in raw.metrics.unwrap_or_default() {
        let norm = normalize_series(&series);
        if norm.is_empty() || norm.contains(char::is_whitespace) {
            return Err(format!("expect.metrics: invalid series {series:?}"));
        }
        if e.metrics.insert(norm, value).is_some() {
            return Err(format!("expect.metrics: {series} is listed twice"));
        }
    }
    Ok(e)
}

fn parse_key(s: &str) -> Result<ObjectKey, String> {
    ObjectKey::parse(s).ok_or_else(|| format!("{s:?} is not namespace/name"))
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

fn parse_fail_mode(v: &Value) -> Result<FailMode, String> {
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &str = "name: t\nmodules: {v1: {}, v2: {size: 2Ki}, junk: {invalid: true}}\n";

    fn load(steps: &str) -> Result<Scenario, LoadError> {
        parse_scenario(&format!("{HEAD}steps:\n{steps}"))
    }

    fn step_err(steps: &str) -> (Option<usize>, String) {
        let e = load(steps).expect_err("should be refused");
        (e.step, e.message)
    }

    #[test]
    fn a_full_scenario_loads() {
        let s = load(
            r#"
- publish: {ref: oci://reg.example/ns/repo:v1, module: v1, format: docker}
- publish: {ref: "https://files.example/m.wasm?x=1", module: v2, encoding: tar.gz}
- publish: {ref: "file:///opt/m.wasm", module: v1}
- apply:
    apiVersion: extensions.istio.io/v1alpha1
    kind: WasmPlugin
    metadata: {name: p}
    spec: {url: "oci://reg.example/ns/repo@sha256:${digest:oci://reg.example/ns/repo:v1}", sha256: "${sha256:v1}"}
- edit: {plugin: default/p, patch: {metadata: {labels: {a: b}}}}
- fail: {host: Reg.Example, kind: blob, error: {status: 503}, times: 2}
- fail: {host: reg.example, error: timeout}
- recover: {host: reg.example}
- require_auth: {host: reg.example, username: u, password: p, scheme: bearer}
- advance: 1h30m
- restart:
- restart: {keepCache: false}
- expect:
    plugins:
      default/p: {outcome: rejected, reason: checksum_mismatch, serves: deny-all}
      q: {outcome: invalid, reason: spec.sha256}
    cache: [v1]
    expired: []
    requests: {reg.example: {manifest: 2}, files.example: 1}
    metrics: {'istio_agent_wasm_remote_fetch_count{result="success"}': 2}
- delete: {plugin: p}
- unpublish: {ref: oci://reg.example/ns/repo:v1}
"#,
        )
        .unwrap();
        assert_eq!(s.steps.len(), 15);
        assert_eq!(
            s.config.purge_interval,
            crate::config::DEFAULT_PURGE_INTERVAL
        );
        let no_digest = |_: &OciRef| Err("unused".to_string());
        match s.step(5, &no_digest).unwrap() {
            Step::Fail(r) => assert_eq!(
                r,
                FailRule {
                    host: "reg.example".into(),
                    kind: KindFilter::Blob,
                    mode: FailMode::Status(503),
                    times: Some(2)
                }
            ),
            other => panic!("{other:?}"),
        }
        match s.step(10, &no_digest).unwrap() {
            Step::Restart { keep_cache } => assert!(keep_cache),
            other => panic!("{other:?}"),
        }
        // The digest is evaluated when the step runs.
        let e = s.step(3, &no_digest).unwrap_err();
        assert_eq!(e, "unused");
        let d = "ab".repeat(32);
        match s.step(3, &|_| Ok(d.clone())).unwrap() {
            Step::Apply(v) => {
                assert_eq!(
                    v["spec"]["url"],
                    format!("oci://reg.example/ns/repo@sha256:{d}")
                );
                assert_eq!(v["spec"]["sha256"], s.modules["v1"].sha256);
            }
            other => panic!("{other:?}"),
        }
        match s.step(12, &no_digest).unwrap() {
            Step::Expect(e) => {
                assert_eq!(e.requests["files.example"], RequestExpect::Total(1));
                assert!(e.plugins.contains_key(&ObjectKey::new("default", "q")));
                assert!(e
                    .metrics
                    .contains_key(r#"istio_agent_wasm_remote_fetch_count{result="success"}"#));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn options_are_parsed_and_validated() {
        let s = parse_scenario(
            "name: t\noptions: {moduleExpiry: 2h, purgeInterval: 10m, httpRequestTimeout: 5s, httpRequestMaxRetries: 2, insecureRegistries: ['*'], maxBinarySize: 1Mi, delivery: inline}\nmodules: {}\nsteps: []\n",
        )
        .unwrap();
        assert_eq!(s.config.module_expiry, Duration::from_secs(7200));
        assert_eq!(s.config.purge_interval, Duration::from_secs(600));
        assert_eq!(s.config.http_request_timeout, Duration::from_secs(5));
        assert_eq!(s.config.http_request_max_retries, 2);
        assert_eq!(s.config.max_binary_size, 1 << 20);
        assert_eq!(s.config.delivery, Delivery::Inline);
        let bad =
            parse_scenario("name: t\noptions: {moduleExpiry: soon}\nmodules: {}\nsteps: []\n")
                .unwrap_err();
        assert_eq!(bad.step, None);
        assert!(bad.message.contains("options.moduleExpiry"), "{bad}");
        let unknown =
            parse_scenario("name: t\noptions: {moduleExpiri: 1h}\nmodules: {}\nsteps: []\n")
                .unwrap_err();
        assert!(unknown.message.contains("moduleExpiri"), "{unknown}");
    }

    #[test]
    fn unknown_keys_are_errors_everywhere() {
        assert!(
            parse_scenario("name: t\nmodules: {}\nsteps: []\nextra: 1\n")
                .unwrap_err()
                .message
                .contains("extra")
        );
        assert!(
            parse_scenario("name: t\nmodules: {v1: {colour: red}}\nsteps: []\n")
                .unwrap_err()
                .message
                .contains("colour")
        );
        let (step, msg) =
            step_err("- advance: 1s\n- publish: {ref: oci://r/a:v1, module: v1, tag: x}\n");
        assert_eq!(step, Some(2));
        assert!(msg.contains("tag"), "{msg}");
        let (step, msg) = step_err("- expect: {plugins: {p: {outcome: pulled, serve: v1}}}\n");
        assert_eq!(step, Some(1));
        assert!(msg.contains("serve"), "{msg}");
        let (_, msg) = step_err("- expect: {requests: {r: {manifests: 1}}}\n");
        assert!(msg.contains("manifests"), "{msg}");
        let (_, msg) = step_err("- expect: {cache: [v1], caches: []}\n");
        assert!(msg.contains("caches"), "{msg}");
    }

    #[test]
    fn bad_values_name_the_step_and_the_problem() {
        let cases: &[(&str, &str)] = &[
            (
                "- publish: {ref: oci://r/a:v1, module: v9}\n",
                "unknown module",
            ),
            (
                "- publish: {ref: oci://r/a:v1, module: v1, format: zip}\n",
                "format",
            ),
            (
                "- publish: {ref: http://h/a, module: v1, format: docker}\n",
                "format",
            ),
            (
                "- publish: {ref: oci://r/a:v1, module: v1, encoding: gzip}\n",
                "encoding",
            ),
            ("- publish: {ref: ftp://h/a, module: v1}\n", "scheme"),
            ("- advance: soon\n", "advance"),
            ("- advance: 90\n", "advance"),
            ("- advance: 99999999999999999999999h\n", "advance"),
            ("- advance: 1000000h\n", "100 years"),
            ("- fail: {host: r, error: explode}\n", "explode"),
            ("- fail: {host: r, error: {status: 5000}}\n", "status"),
            ("- fail: {host: r, error: reset, times: 0}\n", "times"),
            ("- fail: {host: r, kind: head, error: reset}\n", "kind"),
            ("- expect: {plugins: {p: {outcome: fetched}}}\n", "fetched"),
            (
                "- expect: {plugins: {p: {outcome: rejected, reason: bad_luck}}}\n",
                "bad_luck",
            ),
            (
                "- expect: {plugins: {p: {outcome: pulled, reason: too_large}}}\n",
                "only with",
            ),
            ("- expect: {plugins: {p: {serves: v7}}}\n", "v7"),
            ("- expect: {cache: [v1, v1]}\n", "twice"),
            ("- expect: {expired: [nope]}\n", "nope"),
            (
                "- apply: {kind: ConfigMap, metadata: {name: x}}\n",
                "ConfigMap",
            ),
            ("- edit: {plugin: p, patch: [1]}\n", "patch"),
            ("- delete: {}\n", "delete"),
            ("- bogus: {}\n", "unknown step"),
            ("- {advance: 1s, restart: {}}\n", "exactly one key"),
            ("- just a string\n", "mapping"),
            (
                "- publish: {ref: \"oci://r/a:${sha256:zz}\", module: v1}\n",
                "zz",
            ),
            (
                "- apply: {kind: WasmPlugin, spec: {url: \"${digest:not a ref}\"}}\n",
                "digest",
            ),
            (
                "- apply: {kind: WasmPlugin, spec: {url: \"${sha256:v1\"}}\n",
                "unterminated",
            ),
            ("- restart: {keepCache: maybe}\n", "keepCache"),
            (
                "- require_auth: {host: r, username: u, password: p, scheme: digest}\n",
                "scheme",
            ),
        ];
        for (steps, needle) in cases {
            let (step, msg) = step_err(&format!("- advance: 1s\n{steps}"));
            assert_eq!(step, Some(2), "{steps}: {msg}");
            assert!(msg.contains(needle), "{steps}: {msg:?} lacks {needle:?}");
        }
    }

    #[test]
    fn top_level_problems() {
        assert!(parse_scenario("").is_err());
        assert!(parse_scenario("modules: {}\nsteps: []\n")
            .unwrap_err()
            .message
            .contains("name"));
        assert!(parse_scenario("name: t\nsteps: []\n")
            .unwrap_err()
            .message
            .contains("modules"));
        assert!(parse_scenario("name: t\nmodules: {}\n")
            .unwrap_err()
            .message
            .contains("steps"));
        assert!(
            parse_scenario("name: t\nmodules: {deny-all: {}}\nsteps: []\n")
                .unwrap_err()
                .message
                .contains("reserved")
        );
        assert!(
            parse_scenario("name: t\nmodules: {a: {size: lots}}\nsteps: []\n")
                .unwrap_err()
                .message
                .contains("modules.a.size")
        );
        assert!(parse_scenario("name: [\n").is_err());
        let huge = parse_scenario("name: t\nmodules: {a: {size: 100Gi}}\nsteps: []\n");
        assert!(huge.unwrap_err().message.contains("512Mi"));
        let long = parse_scenario(
            "name: t\noptions: {httpRequestTimeout: 999999999999999999999s}\nmodules: {}\nsteps: []\n",
        );
        assert!(long.unwrap_err().message.contains("httpRequestTimeout"));
        assert!(parse_scenario("name: t\nmodules: {}\nsteps: []\n---\nname: u\n").is_err());
        assert!(
            parse_scenario("name: t\noptions: {purgeInterval: '0'}\nmodules: {}\nsteps: []\n")
                .is_err()
        );
    }

    #[test]
    fn other_dollar_braces_are_left_alone() {
        let v = serde_json::json!({"a": "${HOME} and ${sha256:v1}"});
        let out = substitute(&v, &mut |_| Ok("X".into())).unwrap();
        assert_eq!(out["a"], "${HOME} and X");
    }
}
