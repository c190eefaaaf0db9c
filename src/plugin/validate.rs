//! Validation of a parsed `WasmPlugin` (behavior.md §1). Every problem names the field path it is
//! about, so `check` can print `file: ns/name: field: message` and the simulator can report the
//! `invalid` reason. Where Istio has a message for a rule, its wording is reused.

use std::collections::BTreeSet;

use serde::Serialize;

use super::{EnvValueSource, PolicyTargetReference, WasmPlugin};
use crate::url::{is_sha256_hex, ModuleUrl};

pub const MAX_IMAGE_PULL_SECRET_LEN: usize = 253;
pub const MAX_PLUGIN_NAME_LEN: usize = 256;
pub const MAX_ENV_NAME_LEN: usize = 256;
const TARGET_KINDS: [&str; 4] = ["Service", "ServiceEntry", "Gateway", "GatewayClass"];

/// One validation problem.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// Field path, e.g. `spec.sha256`: the `reason` of an `invalid` outcome.
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Returns every problem of the plugin, in field order; empty means valid.
pub fn validate(plugin: &WasmPlugin) -> Vec<FieldError> {
    validate_spec(plugin, true)
}

/// [`validate`], where `check_url` false says that `spec.url` is one already accepted (a change of
/// a stored plugin that keeps its url): it is not parsed again.
pub fn validate_spec(plugin: &WasmPlugin, check_url: bool) -> Vec<FieldError> {
    let spec = &plugin.spec;
    let mut errs = Vec::new();
    let mut push = |field: &str, message: String| {
        errs.push(FieldError {
            field: field.to_string(),
            message,
        })
    };

    if let Some(t) = plugin.pull_timeout_annotation.as_deref() {
        match crate::config::go_duration(t) {
            Ok(d) if !d.is_zero() => {}
            Ok(_) => push(
                &format!("metadata.annotations.{}", super::PULL_TIMEOUT_ANNOTATION),
                "must be more than 0".into(),
            ),
            Err(e) => push(
                &format!("metadata.annotations.{}", super::PULL_TIMEOUT_ANNOTATION),
                format!("invalid duration {t:?}: {e}"),
            ),
        }
    }
    if spec.url.trim().is_empty() {
        push("spec.url", "url field needs to be set".into());
    } else if let Some(Err(e)) = check_url.then(|| ModuleUrl::parse(&spec.url)) {
        push("spec.url", e.to_string());
    }
    if let Some(sha) = &spec.sha256 {
        if !is_sha256_hex(sha) {
            push(
                "spec.sha256",
                format!(
                    "must be 64 lowercase hex characters, got {:?}",
                    truncate(sha)
                ),
            );
        }
    }
    if let Some(secret) = &spec.image_pull_secret {
        if secret.len() > MAX_IMAGE_PULL_SECRET_LEN {
            push(
                "spec.imagePullSecret",
                format!(
                    "must be at most {MAX_IMAGE_PULL_SECRET_LEN} characters, got {}",
                    secret.len()
                ),
            );
        }
    }
    if let Some(name) = &spec.plugin_name {
        if name.len() > MAX_PLUGIN_NAME_LEN {
            push(
                "spec.pluginName",
                format!(
                    "must be at most {MAX_PLUGIN_NAME_LEN} characters, got {}",
                    name.len()
                ),
            );
        }
    }

    let selectors = [
        spec.selector.is_some(),
        spec.target_ref.is_some(),
        !spec.target_refs.is_empty(),
    ];
    if selectors.iter().filter(|s| **s).count() > 1 {
        let field = if spec.selector.is_some() {
            "spec.selector"
        } else {
            "spec.targetRef"
        };
        push(
            field,
            "only one of targetRefs, targetRef or selector can be set".into(),
        );
    }
    if let Some(t) = &spec.target_ref {
        if let Some(m) = target_ref_problem(t) {
            push("spec.targetRef", m);
        }
    }
    for (i, t) in spec.target_refs.iter().enumerate() {
        if let Some(m) = target_ref_problem(t) {
            push("spec.targetRefs", format!("[{i}]: {m}"));
        }
    }

    for (i, m) in spec.match_.iter().enumerate() {
        for p in &m.ports {
            if !(1..=65535).contains(&p.number) {
                push(
                    "spec.match",
                    format!(
                        "[{i}]: port number {} must be in the range 1..65535",
                        p.number
                    ),
                );
            }
        }
    }

    if let Some(vm) = &spec.vm_config {
        let mut seen = BTreeSet::new();
        for (i, env) in vm.env.iter().enumerate() {
            let problem = if env.name.is_empty() {
                Some("spec.vmConfig.env.name is required".to_string())
            } else if env.name.len() > MAX_ENV_NAME_LEN {
                Some(format!(
                    "env.name must be at most {MAX_ENV_NAME_LEN} characters"
                ))
            } else if !seen.insert(env.name.as_str()) {
                Some(format!("duplicate env.name {:?}", env.name))
            } else if env.value_from == EnvValueSource::Host && !env.value.is_empty() {
                Some(format!(
                    "env {:?}: value may only be set when valueFrom is INLINE",
                    env.name
                ))
            } else {
                None
            };
            if let Some(m) = problem {
                push("spec.vmConfig.env", format!("[{i}]: {m}"));
            }
        }
    }
    errs
}

fn target_ref_problem(t: &PolicyTargetReference) -> Option<String> {
    if t.name.is_empty() {
        Some("name field must be set".into())
    } else if !t.namespace.is_empty() {
        Some("namespace may not be set; targetRef must be in the plugin's namespace".into())
    } else if !TARGET_KINDS.contains(&t.kind.as_str()) {
        Some(format!(
            "kind {:?} is not supported (want one of {})",
            t.kind,
            TARGET_KINDS.join(", ")
        ))
    } else {
        None
    }
}

fn truncate(s: &str) -> String {
    if s.len() > 80 {
        format!(
            "{}…",
            &s[..s.char_indices().nth(80).map(|x| x.0).unwrap_or(s.len())]
        )
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin(spec: &str) -> WasmPlugin {
        WasmPlugin::from_yaml(&format!(
            "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: p}}\nspec: {spec}"
        ))
        .unwrap()
    }

    fn fields(spec: &str) -> Vec<String> {
        validate(&plugin(spec))
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn table() {
        let long = "x".repeat(257);
        let cases: Vec<(String, Vec<&str>)> = vec![
            ("{url: oci://r/a:v1}".into(), vec![]),
            ("{url: r/a}".into(), vec![]),
            ("{url: ''}".into(), vec!["spec.url"]),
            ("{}".into(), vec!["spec.url"]),
            ("{url: 'ftp://h/x'}".into(), vec!["spec.url"]),
            ("{url: 'oci://'}".into(), vec!["spec.url"]),
            (format!("{{url: r/a, sha256: {SHA}}}"), vec![]),
            (format!("{{url: r/a, sha256: {}}}", &SHA[1..]), vec!["spec.sha256"]),
            (format!("{{url: r/a, sha256: {}}}", SHA.to_uppercase()), vec!["spec.sha256"]),
            (format!("{{url: r/a, imagePullSecret: {}}}", &long[..254]), vec!["spec.imagePullSecret"]),
            (format!("{{url: r/a, imagePullSecret: {}}}", &long[..253]), vec![]),
            (format!("{{url: r/a, pluginName: {long}}}"), vec!["spec.pluginName"]),
            (format!("{{url: r/a, pluginName: {}}}", &long[..256]), vec![]),
            ("{url: r/a, vmConfig: {env: [{name: ''}]}}".into(), vec!["spec.vmConfig.env"]),
            ("{url: r/a, vmConfig: {env: [{name: A}, {name: A}]}}".into(), vec!["spec.vmConfig.env"]),
            (format!("{{url: r/a, vmConfig: {{env: [{{name: {long}}}]}}}}"), vec!["spec.vmConfig.env"]),
            ("{url: r/a, vmConfig: {env: [{name: A, valueFrom: HOST, value: x}]}}".into(), vec!["spec.vmConfig.env"]),
            ("{url: r/a, vmConfig: {env: [{name: A, valueFrom: HOST}, {name: B, value: x}]}}".into(), vec![]),
            ("{url: r/a, match: [{ports: [{number: 0}]}]}".into(), vec!["spec.match"]),
            ("{url: r/a, match: [{ports: [{number: 65536}]}]}".into(), vec!["spec.match"]),
            ("{url: r/a, match: [{mode: SERVER, ports: [{number: 8080}]}]}".into(), vec![]),
            ("{url: r/a, selector: {matchLabels: {a: b}}, targetRef: {kind: Service, name: s}}".into(), vec!["spec.selector"]),
            ("{url: r/a, targetRef: {kind: Service, name: s}, targetRefs: [{kind: Service, name: s}]}".into(), vec!["spec.targetRef"]),
            ("{url: r/a, targetRef: {kind: Service}}".into(), vec!["spec.targetRef"]),
            ("{url: r/a, targetRef: {kind: Service, name: s, namespace: other}}".into(), vec!["spec.targetRef"]),
            ("{url: r/a, targetRefs: [{kind: Pod, name: s}]}".into(), vec!["spec.targetRefs"]),
            ("{url: r/a, targetRefs: [{kind: Gateway, name: g, group: gateway.networking.k8s.io}]}".into(), vec![]),
        ];
        for (spec, want) in cases {
            assert_eq!(fields(&spec), want, "spec {spec}");
        }
    }

    #[test]
    fn pull_timeout_annotation() {
        let with = |t: &str| {
            WasmPlugin::from_yaml(&format!(
                "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: p, annotations: {{wasm-ecds.io/pull-timeout: '{t}'}}}}\nspec: {{url: r/a}}"
            ))
            .unwrap()
        };
        assert!(validate(&with("1m30s")).is_empty());
        assert_eq!(
            with("1m30s").pull_timeout(),
            Some(std::time::Duration::from_secs(90))
        );
        for bad in ["0s", "5 minutes"] {
            let errs = validate(&with(bad));
            assert_eq!(errs.len(), 1, "{bad}");
            assert_eq!(
                errs[0].field,
                "metadata.annotations.wasm-ecds.io/pull-timeout"
            );
        }
    }
}
