//! `check` and `explain`: read manifests, report validation problems and effective pull policies.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::plugin::{self, Manifest};
use crate::policy;
use crate::url::ModuleUrl;

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    /// `ns/name`, empty when the document has no name.
    pub plugin: String,
    pub field: String,
    pub message: String,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Explanation {
    pub plugin: String,
    pub policy: String,
    pub rule: String,
    pub explanation: String,
    pub module: String,
    pub checksum: Option<String>,
    pub resource: String,
}

/// Reads every manifest file; an unreadable file is an `Err` naming it.
fn read_all(paths: &[PathBuf]) -> Result<Vec<(PathBuf, String)>, String> {
    let files =
        super::expand_paths(paths, &["yaml", "yml", "json"]).map_err(|e| format!("error: {e}"))?;
    files
        .into_iter()
        .map(|f| match std::fs::read_to_string(&f) {
            Ok(t) => Ok((f, t)),
            Err(e) => Err(format!("error: {}: {e}", f.display())),
        })
        .collect()
}

/// Validation problems of one manifest text.
pub fn check_text(file: &Path, text: &str) -> Vec<Problem> {
    let mut out = Vec::new();
    for doc in plugin::parse_manifests(text) {
        match doc {
            Ok(Manifest::Plugin(p)) => {
                for e in plugin::validate(&p) {
                    out.push(Problem {
                        file: file.display().to_string(),
                        plugin: p.key.to_string(),
                        field: e.field,
                        message: e.message,
                    });
                }
            }
            Ok(Manifest::Secret(_)) => {}
            Err(e) => out.push(Problem {
                file: file.display().to_string(),
                plugin: e.object.map(|k| k.to_string()).unwrap_or_default(),
                field: e.field,
                message: e.message,
            }),
        }
    }
    out
}

/// Explanations for every valid plugin of one manifest text.
pub fn explain_text(text: &str) -> Vec<Explanation> {
    plugin::parse_manifests(text)
        .into_iter()
        .filter_map(|d| match d {
            Ok(Manifest::Plugin(p)) => Some(p),
            _ => None,
        })
        .filter_map(|p| {
            let url = ModuleUrl::parse(&p.spec.url).ok()?;
            let d = policy::decide(&p.spec, &url);
            Some(Explanation {
                plugin: p.key.to_string(),
                policy: d.policy.to_string(),
                rule: d.rule.as_str().to_string(),
                explanation: d.explanation(),
                module: url.module_name(),
                checksum: d.expected_checksum.clone(),
                resource: p.resource_name(),
            })
        })
        .collect()
}

pub fn run_check(paths: &[PathBuf], json: bool) -> i32 {
    let files = match read_all(paths) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    let problems: Vec<Problem> = files.iter().flat_map(|(f, t)| check_text(f, t)).collect();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&problems).expect("serializable")
        );
    } else {
        for p in &problems {
            let who = if p.plugin.is_empty() {
                String::new()
            } else {
                format!("{}: ", p.plugin)
            };
            println!("{}: {who}{}: {}", p.file, p.field, p.message);
        }
    }
    i32::from(!problems.is_empty())
}

pub fn run_explain(paths: &[PathBuf], json: bool) -> i32 {
    let files = match read_all(paths) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    let mut all = Vec::new();
    let mut bad = false;
    for (f, t) in &files {
        let problems = check_text(f, t);
        for p in &problems {
            eprintln!("{}: {}: {}: {}", p.file, p.plugin, p.field, p.message);
        }
        bad |= !problems.is_empty();
        all.extend(explain_text(t));
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&all).expect("serializable")
        );
    } else {
        for e in &all {
            println!("{}: {}", e.plugin, e.explanation);
            println!("  rule:     {}", e.rule);
            println!("  module:   {}", e.module);
            println!("  checksum: {}", e.checksum.as_deref().unwrap_or("-"));
            println!("  resource: {}", e.resource);
        }
    }
    i32::from(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_reports_file_plugin_field() {
        let p = check_text(
            Path::new("a.yaml"),
            "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: x, namespace: n}\nspec: {url: 'ftp://h/x', sha256: bad}\n",
        );
        let fields: Vec<_> = p
            .iter()
            .map(|p| (p.plugin.as_str(), p.field.as_str()))
            .collect();
        assert_eq!(fields, vec![("n/x", "spec.url"), ("n/x", "spec.sha256")]);
    }

    #[test]
    fn explain_latest() {
        let e = explain_text(
            "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: x}\nspec: {url: 'oci://r.example/a/b:latest'}\n",
        );
        assert_eq!(e.len(), 1);
        assert_eq!(
            (e[0].policy.as_str(), e[0].rule.as_str()),
            ("Always", "latest-tag")
        );
        assert_eq!(e[0].module, "oci://r.example/a/b");
        assert_eq!(e[0].resource, "extensions.istio.io/wasmplugin/default.x");
    }
}
