//! `check` and `explain`: read manifests, report validation problems and effective pull policies.
//! Both exit 1 when a plugin is invalid, 2 when a file cannot be read.
//!
//! An `EnvoyFilter` (behavior.md §10) is checked patch by patch: a refused patch is a problem on
//! its field path, a patch that is not served is a note (which does not make `check` fail), and
//! each served patch is explained as a plugin of its own.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::plugin::envoyfilter::PatchKind;
use crate::plugin::{self, Manifest, ObjectKey, WasmPlugin};
use crate::policy;
use crate::url::ModuleUrl;

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    /// `ns/name`, empty when the document has no name.
    pub plugin: String,
    pub field: String,
    pub message: String,
    /// A note, not a problem: an `EnvoyFilter` patch that is not served (`field` names the
    /// patch, `message` says why). Notes do not change the exit status.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub note: bool,
}

/// What `explain` says about one plugin document.
#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Explained {
    Valid(Explanation),
    Invalid(Invalid),
}

/// A plugin that `serve` would refuse: its problems instead of a policy.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Invalid {
    /// `ns/name`, empty when the document has no name.
    pub plugin: String,
    pub file: String,
    /// Every problem, as `check` reports them.
    pub invalid: Vec<FieldProblem>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct FieldProblem {
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

/// Reads every manifest file; a file or directory that cannot be read (or a symbolic link loop)
/// is an `Err` with one line per such path.
pub(super) fn read_all(paths: &[PathBuf]) -> Result<Vec<(PathBuf, String)>, String> {
    let found = super::expand_paths(paths, &["yaml", "yml", "json"]);
    let mut errors: Vec<String> = (found.errors.iter())
        .map(|(p, e)| format!("error: {}: {e}", p.display()))
        .collect();
    let mut files = Vec::new();
    for f in found.files {
        match super::read_manifest(&f, super::MAX_MANIFEST_BYTES) {
            Ok(t) => files.push((f, t)),
            Err(e) => errors.push(format!("error: {}: {e}", f.display())),
        }
    }
    if errors.is_empty() {
        Ok(files)
    } else {
        Err(errors.join("\n"))
    }
}

/// Validation problems (and notes) of one manifest text.
pub fn check_text(file: &Path, text: &str) -> Vec<Problem> {
    let f = file.display().to_string();
    let problem = |plugin: String, field: String, message: String, note: bool| Problem {
        file: f.clone(),
        plugin,
        field,
        message,
        note,
    };
    let mut out = Vec::new();
    for doc in plugin::parse_manifests(text) {
        match doc {
            Ok(Manifest::Plugin(p)) => {
                for e in plugin::validate(&p) {
                    out.push(problem(p.key.to_string(), e.field, e.message, false));
                }
            }
            Ok(Manifest::Secret(_)) => {}
            Ok(Manifest::EnvoyFilter(ef)) => {
                for patch in &ef.patches {
                    match &patch.kind {
                        PatchKind::Plugin(_) => {}
                        PatchKind::Ignored(why) => out.push(problem(
                            ef.key.to_string(),
                            patch.label(),
                            why.clone(),
                            true,
                        )),
                        PatchKind::Refused { error, .. } => out.push(problem(
                            ef.key.to_string(),
                            error.field.clone(),
                            error.message.clone(),
                            false,
                        )),
                    }
                }
            }
            Err(e) => out.push(problem(
                e.object.map(|k| k.to_string()).unwrap_or_default(),
                e.field,
                e.message,
                false,
            )),
        }
    }
    out
}

/// A second definition of one object (same kind and `namespace/name`), in the order `serve` reads
/// them (sorted paths, then documents): `serve` uses the first and reports the others.
pub fn check_duplicates(files: &[(PathBuf, String)]) -> Vec<Problem> {
    let mut sorted: Vec<&(PathBuf, String)> = files.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut definitions = crate::serve::files::Definitions::default();
    let mut out = Vec::new();
    for (file, text) in sorted {
        let parsed = (plugin::documents(text).into_iter().flatten())
            .filter_map(|(i, v)| Some((i, plugin::parse_object(i, v).ok()?)));
        for (document, doc) in parsed {
            if let Some(message) = definitions.add_manifest(&doc, file, document) {
                out.push(Problem {
                    file: file.display().to_string(),
                    plugin: doc.key().to_string(),
                    field: "metadata.name".into(),
                    message,
                    note: false,
                });
            }
        }
    }
    out
}

/// Two definitions of one ECDS resource name among every file (behavior.md §10): the one `serve`
/// admits first (WasmPlugins, then EnvoyFilter patches, each in key order) keeps it, every other
/// one is a problem.
pub fn check_conflicts(files: &[(PathBuf, String)]) -> Vec<Problem> {
    // (plugin, file, field naming the resource, object it belongs to), in admission order.
    let mut plugins: Vec<(WasmPlugin, String, String, ObjectKey)> = Vec::new();
    let mut filters = Vec::new();
    for (file, text) in files {
        for doc in plugin::parse_manifests(text) {
            match doc {
                Ok(Manifest::Plugin(p)) if plugin::validate(&p).is_empty() => {
                    let key = p.key.clone();
                    plugins.push((p, file.display().to_string(), "metadata.name".into(), key));
                }
                Ok(Manifest::EnvoyFilter(ef)) => filters.push((file.display().to_string(), ef)),
                _ => {}
            }
        }
    }
    // In serve's order; a second WasmPlugin of one key is check_duplicates' problem.
    plugins.sort_by(|a, b| (&a.0.key, Path::new(&a.1)).cmp(&(&b.0.key, Path::new(&b.1))));
    plugins.dedup_by(|later, first| later.0.key == first.0.key);
    filters.sort_by(|a, b| a.1.key.cmp(&b.1.key));
    for (file, ef) in filters {
        for patch in ef.patches {
            let field = format!("{}.patch.value.name", patch.field());
            if let PatchKind::Plugin(p) = patch.kind {
                plugins.push((p, file.clone(), field, ef.key.clone()));
            }
        }
    }
    let mut owners: BTreeMap<String, (String, String)> = BTreeMap::new();
    let mut out = Vec::new();
    for (p, file, field, object) in plugins {
        let resource = p.resource_name();
        match owners.get(&resource) {
            Some((owner, owner_file)) => out.push(Problem {
                file,
                plugin: object.to_string(),
                field,
                message: format!(
                    "ECDS resource {resource:?} is also defined by {owner} ({owner_file}), which serve admits first; this definition is not used"
                ),
                note: false,
            }),
            None => {
                owners.insert(resource, (p.key.to_string(), file));
            }
        }
    }
    out
}

/// What `explain` says about every plugin document of one manifest text, in document order:
/// the effective policy of a valid plugin, the problems of an invalid one.
pub fn explain_text(file: &Path, text: &str) -> Vec<Explained> {
    let invalid = |plugin: String, problems: Vec<FieldProblem>| {
        Explained::Invalid(Invalid {
            plugin,
            file: file.display().to_string(),
            invalid: problems,
        })
    };
    plugin::parse_manifests(text)
        .into_iter()
        .flat_map(|d| match d {
            Ok(Manifest::EnvoyFilter(ef)) => (ef.patches.into_iter())
                .filter_map(|patch| match patch.kind {
                    PatchKind::Plugin(p) => Some(explain_plugin(&p)),
                    PatchKind::Ignored(_) => None,
                    PatchKind::Refused { plugin, error } => Some(invalid(
                        plugin.as_ref().unwrap_or(&ef.key).to_string(),
                        vec![FieldProblem {
                            field: error.field,
                            message: error.message,
                        }],
                    )),
                })
                .collect::<Vec<_>>(),
            Ok(Manifest::Plugin(p)) => {
                let problems: Vec<FieldProblem> = plugin::validate(&p)
                    .into_iter()
                    .map(|e| FieldProblem {
                        field: e.field,
                        message: e.message,
                    })
                    .collect();
                if !problems.is_empty() {
                    return vec![invalid(p.key.to_string(), problems)];
                }
                if let Err(e) = ModuleUrl::parse(&p.spec.url) {
                    let problem = FieldProblem {
                        field: "spec.url".into(),
                        message: e.to_string(),
                    };
                    return vec![invalid(p.key.to_string(), vec![problem])];
                }
                vec![explain_plugin(&p)]
            }
            Ok(Manifest::Secret(_)) => Vec::new(),
            Err(e) => vec![invalid(
                e.object.map(|k| k.to_string()).unwrap_or_default(),
                vec![FieldProblem {
                    field: e.field,
                    message: e.message,
                }],
            )],
        })
        .collect()
}

/// The effective policy of a plugin whose url parses.
fn explain_plugin(p: &WasmPlugin) -> Explained {
    let url = p.module_url().unwrap_or(ModuleUrl::NoHttpUri);
    let d = policy::decide(&p.spec, &url);
    let module = match url {
        ModuleUrl::NoHttpUri => url.to_string(),
        _ => url.module_name(),
    };
    Explained::Valid(Explanation {
        plugin: p.key.to_string(),
        policy: d.policy.to_string(),
        rule: d.rule.as_str().to_string(),
        explanation: match p.extension {
            Some(_) => d.patch_explanation(),
            None => d.explanation(),
        },
        module,
        checksum: d.expected_checksum.clone(),
        resource: p.resource_name(),
    })
}

pub fn run_check(paths: &[PathBuf], json: bool) -> i32 {
    let files = match read_all(paths) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    let mut problems: Vec<Problem> = files.iter().flat_map(|(f, t)| check_text(f, t)).collect();
    problems.extend(check_duplicates(&files));
    problems.extend(check_conflicts(&files));
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
    i32::from(problems.iter().any(|p| !p.note))
}

pub fn run_explain(paths: &[PathBuf], json: bool) -> i32 {
    let files = match read_all(paths) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    let all: Vec<Explained> = files.iter().flat_map(|(f, t)| explain_text(f, t)).collect();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&all).expect("serializable")
        );
    } else {
        for e in &all {
            match e {
                Explained::Valid(e) => {
                    println!("{}: {}", e.plugin, e.explanation);
                    println!("  rule:     {}", e.rule);
                    println!("  module:   {}", e.module);
                    println!("  checksum: {}", e.checksum.as_deref().unwrap_or("-"));
                    println!("  resource: {}", e.resource);
                }
                Explained::Invalid(i) => {
                    let who = if i.plugin.is_empty() {
                        i.file.clone()
                    } else {
                        format!("{} ({})", i.plugin, i.file)
                    };
                    println!("{who}: invalid, not served");
                    for p in &i.invalid {
                        println!("  {}: {}", p.field, p.message);
                    }
                }
            }
        }
    }
    i32::from(all.iter().any(|e| matches!(e, Explained::Invalid(_))))
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
            Path::new("a.yaml"),
            "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: x}\nspec: {url: 'oci://r.example/a/b:latest'}\n",
        );
        let e: Vec<&Explanation> = e
            .iter()
            .map(|e| match e {
                Explained::Valid(e) => e,
                Explained::Invalid(i) => panic!("{i:?}"),
            })
            .collect();
        assert_eq!(e.len(), 1);
        assert_eq!(
            (e[0].policy.as_str(), e[0].rule.as_str()),
            ("Always", "latest-tag")
        );
        assert_eq!(e[0].module, "oci://r.example/a/b");
        assert_eq!(e[0].resource, "extensions.istio.io/wasmplugin/default.x");
    }

    #[test]
    fn explain_says_invalid_with_every_problem() {
        let e = explain_text(
            Path::new("a.yaml"),
            "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: x, namespace: n}\nspec: {url: 'oci://r.example/a/b:v1', sha256: bad}\n",
        );
        let [Explained::Invalid(i)] = e.as_slice() else {
            panic!("{e:?}")
        };
        assert_eq!((i.plugin.as_str(), i.file.as_str()), ("n/x", "a.yaml"));
        let fields: Vec<&str> = i.invalid.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["spec.sha256"]);
    }
}
