//! The `${sha256:NAME}` and `${digest:oci://…}` substitutions of scenario steps (scenarios.md
//! "Substitutions"): where they are, and what they name. Evaluating them is the [`Scenario`]'s job
//! (a digest depends on what is published when the step runs).
//!
//! [`Scenario`]: super::Scenario

use std::borrow::Cow;

use serde_json::Value;

use crate::url::OciRef;

/// A `${…}` expression.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Substitution {
    Sha256(String),
    Digest(OciRef),
}

const SUB_SHA256: &str = "${sha256:";
const SUB_DIGEST: &str = "${digest:";

/// Replaces every `${sha256:…}` and `${digest:…}` in the strings (and mapping keys) of `v`. Other
/// `${…}` text is left alone (plugin configurations may contain it). A value without any is
/// returned as it is, not copied (most steps have none).
pub fn substitute<'v>(
    v: &'v Value,
    eval: &mut dyn FnMut(&Substitution) -> Result<String, String>,
) -> Result<Cow<'v, Value>, String> {
    if !mentions(v) {
        return Ok(Cow::Borrowed(v));
    }
    copy_substituted(v, eval).map(Cow::Owned)
}

/// True when a string or mapping key of `v` contains `${sha256:` or `${digest:`.
fn mentions(v: &Value) -> bool {
    let has = |s: &str| s.contains("${") && (s.contains(SUB_SHA256) || s.contains(SUB_DIGEST));
    match v {
        Value::String(s) => has(s),
        Value::Array(items) => items.iter().any(mentions),
        Value::Object(map) => map.iter().any(|(k, v)| has(k) || mentions(v)),
        _ => false,
    }
}

fn copy_substituted(
    v: &Value,
    eval: &mut dyn FnMut(&Substitution) -> Result<String, String>,
) -> Result<Value, String> {
    Ok(match v {
        Value::String(s) => Value::String(substitute_str(s, eval)?),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|i| copy_substituted(i, eval))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => {
            let mut out = serde_json::Map::new();
            for (k, val) in map {
                out.insert(substitute_str(k, eval)?, copy_substituted(val, eval)?);
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
