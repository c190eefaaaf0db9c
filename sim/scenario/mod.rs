//! The scenario file format (scenarios.md): parsing and validation of a YAML scenario into a
//! [`Scenario`], and of each step into a [`Step`].
//!
//! Everything that can be checked without running is checked at load time, so a bad file is reported
//! (exit status 2) with the step index and the problem before anything runs. Unknown keys are errors
//! everywhere. Every step is parsed at load time, after the substitution `${sha256:NAME}`; a step
//! naming `${digest:oci://…}` is parsed again when it runs, with the digest of what is published at
//! that moment (at load time a placeholder stands in for it, so the rest of the step is still
//! validated). The others run as parsed at load time, which is what parsing them again would give.
//!
//! # Layout
//! - this file: the top level (name, options, modules) and the [`Scenario`] it loads into;
//! - [`substitute`]: the `${sha256:…}` and `${digest:…}` substitutions;
//! - [`step`]: the steps other than `expect`, and the references and hosts they name;
//! - [`expect`]: the `expect` step.

mod expect;
mod step;
mod substitute;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use super::content::module_bytes;
use crate::config::{parse_go_duration, parse_size, Config, Delivery};
use crate::store::sha256_hex;
use crate::url::OciRef;

pub use super::rules::{FailMode, FailRule, KindFilter};
pub use expect::{Expect, PluginExpect, RequestExpect};
pub use step::{parse_host, parse_step, parse_target, DeleteTarget, EditTarget, Step, Target};
pub use substitute::{substitute, Substitution};

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
    /// The steps as written (JSON).
    pub steps: Vec<Value>,
    /// Each step as parsed at load time and its trace text ([`Step::describe`], made once here:
    /// the runner prints it at every run), `None` for a step naming `${digest:…}` (parsed when it
    /// runs).
    parsed: Vec<Option<(Step, String)>>,
    /// Module names by the hex sha256 of their bytes (unique: two modules never share bytes).
    by_sha256: BTreeMap<String, String>,
}

impl Scenario {
    /// The module whose bytes have this sha256.
    pub fn module_by_sha256(&self, sha256: &str) -> Option<&str> {
        self.by_sha256.get(sha256).map(String::as_str)
    }

    /// Step `index` (0-based): as parsed at load time, or, when it names `${digest:REF}`, parsed
    /// now after substituting `${…}` with `digest` resolving `${digest:REF}` (an error message when
    /// the reference is not published).
    pub fn step(
        &self,
        index: usize,
        digest: &dyn Fn(&OciRef) -> Result<String, String>,
    ) -> Result<Cow<'_, Step>, String> {
        if let Some(Some((step, _))) = self.parsed.get(index) {
            return Ok(Cow::Borrowed(step));
        }
        let raw = self
            .steps
            .get(index)
            .ok_or_else(|| format!("no step {}", index + 1))?;
        let substituted = substitute(raw, &mut |expr| self.evaluate(expr, digest))?;
        parse_step(&substituted, &self.modules).map(Cow::Owned)
    }

    /// The trace text of step `index`, `step` being what [`Scenario::step`] returned for it: made
    /// at load time unless the step names `${digest:…}`.
    pub fn describe(&self, index: usize, step: &Step) -> Cow<'_, str> {
        match self.parsed.get(index) {
            Some(Some((_, text))) => Cow::Borrowed(text),
            _ => Cow::Owned(step.describe()),
        }
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
    // Validate every step now, with placeholder digests; keep those without any.
    let mut parsed = Vec::with_capacity(raw.steps.len());
    for (i, raw) in raw.steps.iter().enumerate() {
        let err = |message: String| LoadError {
            step: Some(i + 1),
            message,
        };
        let mut names_digest = false;
        let substituted = substitute(raw, &mut |expr| match expr {
            Substitution::Sha256(name) => modules
                .get(name)
                .map(|m| m.sha256.clone())
                .ok_or_else(|| format!("${{sha256:{name}}}: unknown module {name:?}")),
            Substitution::Digest(_) => {
                names_digest = true;
                Ok(PLACEHOLDER_DIGEST.to_string())
            }
        })
        .map_err(err)?;
        let step = parse_step(&substituted, &modules).map_err(err)?;
        parsed.push((!names_digest).then(|| {
            let text = step.describe();
            (step, text)
        }));
    }
    Ok(Scenario {
        name: raw.name,
        description: raw.description,
        seed: raw.seed,
        config,
        by_sha256: by_bytes,
        modules,
        steps: raw.steps,
        parsed,
    })
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
        if n == 0 {
            // As for `serve`: a pull makes at least one attempt.
            return Err(top_error(
                "options.httpRequestMaxRetries: must be at least 1",
            ));
        }
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
