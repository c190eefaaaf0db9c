//! What a plugin serves after a processing that obtained no module (behavior.md §7), as a pure
//! function of what it served, what it served before a restart, its URL, pin and fail strategy.

use super::state::{ServedModule, Serving};
use crate::cache::ServedRecord;
use crate::plugin::FailStrategy;

/// The serving decision after a failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AfterFailure {
    /// Keep serving the current module.
    Keep,
    /// Serve again what was served before a restart (still cached).
    Restore(ServedRecord),
    /// Serve the fail strategy's RBAC fallback.
    Fallback(Serving),
}

/// The facts the rule looks at.
#[derive(Clone, Copy, Debug)]
pub struct FailedPlugin<'a> {
    /// The plugin's (normalised) URL.
    pub url: &'a str,
    /// Its pin, if any: the checksum a module must have.
    pub expected: Option<&'a str>,
    /// What it serves now.
    pub serving: &'a Serving,
    /// What it served before the server restarted, if that module is still cached.
    pub served_before_restart: Option<&'a ServedRecord>,
    pub fail_strategy: FailStrategy,
}

/// 1. A module obtained from the same URL that still fits the pin keeps being served (an
///    improvement over Istio, whose proxies would fall back).
/// 2. Right after a restart the plugin serves nothing yet, but its proxies still run what it
///    served before: that is served again when it is from the same URL and fits the pin.
/// 3. Otherwise the fallback: allow-all for `FAIL_OPEN`, deny-all for `FAIL_CLOSE` and
///    `FAIL_RELOAD` (no module to reload).
pub fn after_failure(p: FailedPlugin<'_>) -> AfterFailure {
    let fits = |checksum: &str| p.expected.is_none_or(|e| e == checksum);
    match p.serving {
        Serving::Module(m) if same_source(m, p.url) && fits(m.checksum()) => AfterFailure::Keep,
        Serving::Nothing => match p.served_before_restart {
            Some(r) if r.url == p.url && fits(&r.module.checksum) => {
                AfterFailure::Restore(r.clone())
            }
            _ => fallback(p.fail_strategy),
        },
        _ => fallback(p.fail_strategy),
    }
}

fn same_source(m: &ServedModule, url: &str) -> bool {
    m.url == url
}

fn fallback(strategy: FailStrategy) -> AfterFailure {
    AfterFailure::Fallback(match strategy {
        FailStrategy::FailOpen => Serving::AllowAll,
        FailStrategy::FailClose | FailStrategy::FailReload => Serving::DenyAll,
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::cache::ModuleKey;

    const URL: &str = "oci://reg.example/ns/f:v1";
    const OTHER: &str = "oci://reg.example/ns/f:v2";

    fn module(url: &str, checksum: &str) -> Serving {
        Serving::Module(std::sync::Arc::new(ServedModule {
            url: url.into(),
            key: Some(ModuleKey::new("reg.example/ns/f", checksum)),
            path: PathBuf::from("/cache/m.wasm"),
            sha256: format!("wasm-{checksum}"),
        }))
    }

    fn record(url: &str, checksum: &str) -> ServedRecord {
        ServedRecord {
            url: url.into(),
            module: ModuleKey::new("reg.example/ns/f", checksum),
        }
    }

    /// Name, serving, pin, served before a restart, fail strategy, wanted decision.
    type Case<'a> = (
        &'a str,
        Serving,
        Option<&'a str>,
        Option<&'a ServedRecord>,
        FailStrategy,
        AfterFailure,
    );

    #[test]
    fn table() {
        use AfterFailure::*;
        use FailStrategy::*;
        let deny = Fallback(Serving::DenyAll);
        let allow = Fallback(Serving::AllowAll);
        let before = record(URL, "aaa");
        let elsewhere = record(OTHER, "aaa");
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            ("same url keeps its module", module(URL, "aaa"), None, None, FailClose, Keep),
            ("same url fitting the pin keeps", module(URL, "aaa"), Some("aaa"), None, FailClose, Keep),
            ("pin changed: fall back", module(URL, "aaa"), Some("bbb"), None, FailClose, deny.clone()),
            ("url changed: fall back", module(OTHER, "aaa"), None, None, FailClose, deny.clone()),
            ("url changed, fail open", module(OTHER, "aaa"), None, None, FailOpen, allow.clone()),
            ("fail reload without a module", module(OTHER, "aaa"), None, None, FailReload, deny.clone()),
            ("fallback stays", Serving::DenyAll, None, Some(&before), FailClose, deny.clone()),
            ("allow-all switches to deny when strategy changes", Serving::AllowAll, None, None, FailClose, deny.clone()),
            ("after restart: restore", Serving::Nothing, None, Some(&before), FailClose, Restore(before.clone())),
            ("after restart: restore fitting the pin", Serving::Nothing, Some("aaa"), Some(&before), FailOpen, Restore(before.clone())),
            ("after restart: pin differs", Serving::Nothing, Some("bbb"), Some(&before), FailOpen, allow.clone()),
            ("after restart: other url", Serving::Nothing, None, Some(&elsewhere), FailClose, deny.clone()),
            ("after restart: nothing before", Serving::Nothing, None, None, FailOpen, allow.clone()),
        ];
        for (name, serving, expected, before, strategy, want) in cases {
            let got = after_failure(FailedPlugin {
                url: URL,
                expected,
                serving: &serving,
                served_before_restart: before,
                fail_strategy: strategy,
            });
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn a_file_module_is_compared_by_its_wasm_sha256() {
        let file = Serving::Module(std::sync::Arc::new(ServedModule {
            url: "file:///m.wasm".into(),
            key: None,
            path: PathBuf::from("/m.wasm"),
            sha256: "ccc".into(),
        }));
        let p = |expected| FailedPlugin {
            url: "file:///m.wasm",
            expected,
            serving: &file,
            served_before_restart: None,
            fail_strategy: FailStrategy::FailClose,
        };
        assert_eq!(after_failure(p(Some("ccc"))), AfterFailure::Keep);
        assert_eq!(
            after_failure(p(Some("ddd"))),
            AfterFailure::Fallback(Serving::DenyAll)
        );
    }
}
