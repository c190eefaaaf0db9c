//! The effective pull policy of a plugin (behavior.md §2): a pure function of the spec, with the rule
//! that decided it, so `explain`, `/debug/plugins` and the engine all give the same answer.
//!
//! Mirrors the override order of Istio's `pkg/wasm` (`shouldIgnoreResourceVersion` and the checksum
//! handling of `getOrFetch`): checksum, then digest, then the explicit policy, then the `latest` tag.

use std::fmt;

use serde::Serialize;

use crate::plugin::{ImagePullPolicy, WasmPluginSpec};
use crate::url::ModuleUrl;

/// What the server does when a plugin is created or changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum PullPolicy {
    /// Use the cached module if there is one; pull only on a miss.
    IfNotPresent,
    /// Pull on every new resource version.
    Always,
    /// `file://`: read from the local file system, no pull policy applies.
    None,
}

/// The rule of behavior.md §2 that decided the policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyRule {
    /// 1. `spec.sha256` is set.
    Sha256,
    /// 2. the OCI URL carries a digest.
    Digest,
    /// 3. `imagePullPolicy` is `Always` or `IfNotPresent`.
    Explicit,
    /// 4. unspecified, OCI tag `latest`.
    LatestTag,
    /// 4. unspecified, anything else.
    Default,
    /// `file://` URL.
    File,
    /// Remote code without `http_uri` (behavior.md §10): nothing to pull.
    NoHttpUri,
}

impl fmt::Display for PullPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Always => "Always",
            PullPolicy::None => "None",
        })
    }
}

impl PolicyRule {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyRule::Sha256 => "sha256",
            PolicyRule::Digest => "digest",
            PolicyRule::Explicit => "explicit",
            PolicyRule::LatestTag => "latest-tag",
            PolicyRule::Default => "default",
            PolicyRule::File => "file",
            PolicyRule::NoHttpUri => "no-http-uri",
        }
    }
}

/// The decision with its reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub policy: PullPolicy,
    pub rule: PolicyRule,
    /// The checksum the module must have, if known: `spec.sha256`, else the URL's digest.
    pub expected_checksum: Option<String>,
}

impl Decision {
    /// A human sentence: "Always: tag is `latest` and imagePullPolicy is unspecified".
    pub fn explanation(&self) -> String {
        self.sentence("spec.sha256", "imagePullPolicy", "unspecified")
    }

    /// The sentence in the terms of an `EnvoyFilter` patch (behavior.md §10): `remote.sha256`
    /// and the `ISTIO_META_WASM_IMAGE_PULL_POLICY` VM variable.
    pub fn patch_explanation(&self) -> String {
        self.sentence(
            "remote.sha256",
            "ISTIO_META_WASM_IMAGE_PULL_POLICY",
            "unset",
        )
    }

    fn sentence(&self, sha256: &str, policy: &str, unset: &str) -> String {
        let why = match self.rule {
            PolicyRule::Sha256 => format!("pinned by {sha256}"),
            PolicyRule::Digest => "pinned by the digest in the url".to_string(),
            PolicyRule::Explicit => format!("{policy} is {}", self.policy),
            PolicyRule::LatestTag => format!("tag is `latest` and {policy} is {unset}"),
            PolicyRule::Default => {
                format!("{policy} is {unset} and the url is not an oci `latest` tag")
            }
            PolicyRule::File => "file:// url: read from the local file system".to_string(),
            PolicyRule::NoHttpUri => {
                "remote code without http_uri: nothing to pull, only the fallback is served"
                    .to_string()
            }
        };
        format!("{}: {why}", self.policy)
    }
}

/// Decides the effective policy for a spec whose url parsed to `url`.
pub fn decide(spec: &WasmPluginSpec, url: &ModuleUrl) -> Decision {
    let decision = |policy, rule, expected_checksum| Decision {
        policy,
        rule,
        expected_checksum,
    };
    match url {
        ModuleUrl::File(_) => {
            return decision(PullPolicy::None, PolicyRule::File, spec.sha256.clone())
        }
        ModuleUrl::NoHttpUri => return decision(PullPolicy::None, PolicyRule::NoHttpUri, None),
        ModuleUrl::Oci(_) | ModuleUrl::Http(_) => {}
    }
    if let Some(sha) = &spec.sha256 {
        return decision(
            PullPolicy::IfNotPresent,
            PolicyRule::Sha256,
            Some(sha.clone()),
        );
    }
    if let ModuleUrl::Oci(r) = url {
        if let Some(d) = &r.digest {
            return decision(
                PullPolicy::IfNotPresent,
                PolicyRule::Digest,
                Some(d.clone()),
            );
        }
    }
    match spec.image_pull_policy {
        ImagePullPolicy::Always => decision(PullPolicy::Always, PolicyRule::Explicit, None),
        ImagePullPolicy::IfNotPresent => {
            decision(PullPolicy::IfNotPresent, PolicyRule::Explicit, None)
        }
        ImagePullPolicy::Unspecified => match url {
            ModuleUrl::Oci(r) if r.tag.as_deref() == Some(crate::url::DEFAULT_OCI_TAG) => {
                decision(PullPolicy::Always, PolicyRule::LatestTag, None)
            }
            _ => decision(PullPolicy::IfNotPresent, PolicyRule::Default, None),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const DIG: &str = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";

    #[test]
    fn table() {
        use ImagePullPolicy as I;
        use PolicyRule as R;
        use PullPolicy as P;
        let digest_url = format!("oci://r/a@sha256:{DIG}");
        let tag_digest_url = format!("oci://r/a:latest@sha256:{DIG}");
        type Case<'a> = (&'a str, Option<&'a str>, I, P, R, Option<&'a str>);
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            // rule 1: sha256 wins over everything
            ("oci://r/a:latest", Some(SHA), I::Always, P::IfNotPresent, R::Sha256, Some(SHA)),
            ("http://h/a.wasm", Some(SHA), I::Always, P::IfNotPresent, R::Sha256, Some(SHA)),
            (&digest_url, Some(SHA), I::Unspecified, P::IfNotPresent, R::Sha256, Some(SHA)),
            // rule 2: digest wins over policy and latest
            (&digest_url, None, I::Always, P::IfNotPresent, R::Digest, Some(DIG)),
            (&tag_digest_url, None, I::Unspecified, P::IfNotPresent, R::Digest, Some(DIG)),
            // rule 3: explicit
            ("oci://r/a:v1", None, I::Always, P::Always, R::Explicit, None),
            ("oci://r/a:latest", None, I::IfNotPresent, P::IfNotPresent, R::Explicit, None),
            ("http://h/a.wasm", None, I::Always, P::Always, R::Explicit, None),
            ("https://h/a.wasm", None, I::IfNotPresent, P::IfNotPresent, R::Explicit, None),
            // rule 4: unspecified
            ("oci://r/a:latest", None, I::Unspecified, P::Always, R::LatestTag, None),
            ("r/a:latest", None, I::Unspecified, P::Always, R::LatestTag, None),
            ("oci://r/a", None, I::Unspecified, P::IfNotPresent, R::Default, None),
            ("oci://r/a:v1", None, I::Unspecified, P::IfNotPresent, R::Default, None),
            ("oci://r/a:latest1", None, I::Unspecified, P::IfNotPresent, R::Default, None),
            ("http://h/latest", None, I::Unspecified, P::IfNotPresent, R::Default, None),
            ("http://h/a.wasm:latest", None, I::Unspecified, P::IfNotPresent, R::Default, None),
            // file
            ("file:///x.wasm", None, I::Always, P::None, R::File, None),
            ("file:///x.wasm", Some(SHA), I::Unspecified, P::None, R::File, Some(SHA)),
        ];
        for (url, sha, ipp, policy, rule, expected) in cases {
            let spec = WasmPluginSpec {
                url: url.to_string(),
                sha256: sha.map(str::to_string),
                image_pull_policy: ipp,
                ..Default::default()
            };
            let parsed = ModuleUrl::parse(url).unwrap();
            let d = decide(&spec, &parsed);
            assert_eq!(
                (d.policy, d.rule, d.expected_checksum.as_deref()),
                (policy, rule, expected),
                "url={url} sha={sha:?} policy={ipp:?}"
            );
        }
    }

    #[test]
    fn explanation_names_the_rule() {
        let spec = WasmPluginSpec {
            url: "oci://r/a:latest".into(),
            ..Default::default()
        };
        let d = decide(&spec, &ModuleUrl::parse(&spec.url).unwrap());
        assert_eq!(
            d.explanation(),
            "Always: tag is `latest` and imagePullPolicy is unspecified"
        );
    }
}
