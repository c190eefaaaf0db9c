//! The `expect` step (scenarios.md "Expectations"): what a plugin's outcome, reason and served
//! module, the cache, the expired modules, the request counts and the metrics must be.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use serde_json::Value;

use super::step::{de, parse_host, parse_key};
use super::{kind_of, Module, OUTCOMES, SERVES_ABSENT, SERVES_ALLOW_ALL, SERVES_DENY_ALL};
use crate::metrics::normalize_series;
use crate::outcome::Reason;
use crate::plugin::ObjectKey;

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

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawExpect {
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
pub(super) struct RawPluginExpect {
    #[serde(default)]
    outcome: Option<String>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    serves: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKinds {
    #[serde(default)]
    manifest: Option<u64>,
    #[serde(default)]
    blob: Option<u64>,
    #[serde(default)]
    get: Option<u64>,
}

pub(super) fn parse_expect(
    arg: &Value,
    modules: &BTreeMap<String, Module>,
) -> Result<Expect, String> {
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
