//! The file source of `serve --plugins`: reads manifest files and directories into the desired set
//! of objects. A file that cannot be read or parsed is reported and its last good content is kept,
//! so one bad file never disturbs what is served (cli.md).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::plugin::{self, ObjectKey};

/// A problem with one file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FileError {
    pub file: String,
    pub message: String,
}

/// The objects the files currently describe.
#[derive(Clone, Debug, Default)]
pub struct Desired {
    /// WasmPlugins, EnvoyFilters and secrets by key, as decoded JSON.
    pub plugins: BTreeMap<ObjectKey, Value>,
    pub envoy_filters: BTreeMap<ObjectKey, Value>,
    pub secrets: BTreeMap<ObjectKey, Value>,
    pub errors: Vec<FileError>,
}

/// Remembers each file's last good content.
#[derive(Debug, Default)]
pub struct FileSource {
    roots: Vec<PathBuf>,
    last_good: BTreeMap<PathBuf, Vec<Value>>,
}

impl FileSource {
    pub fn new(roots: Vec<PathBuf>) -> Self {
        FileSource {
            roots,
            last_good: BTreeMap::new(),
        }
    }

    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// Re-reads every file under the roots.
    pub fn scan(&mut self) -> Desired {
        let mut desired = Desired::default();
        let mut files = Vec::new();
        for root in &self.roots {
            match crate::cli::expand_paths(std::slice::from_ref(root), &["yaml", "yml", "json"]) {
                Ok(f) => files.extend(f),
                Err(e) => desired.errors.push(FileError {
                    file: root.display().to_string(),
                    message: e.to_string(),
                }),
            }
        }
        files.sort();
        files.dedup();
        let mut seen = BTreeMap::new();
        for file in files {
            let objects = match read_objects(&file) {
                Ok(objs) => {
                    self.last_good.insert(file.clone(), objs.clone());
                    objs
                }
                Err(message) => {
                    tracing::warn!(file = %file.display(), error = %message, "skipping bad manifest file");
                    desired.errors.push(FileError {
                        file: file.display().to_string(),
                        message,
                    });
                    self.last_good.get(&file).cloned().unwrap_or_default()
                }
            };
            seen.insert(file, objects);
        }
        // Files that disappeared lose their objects.
        self.last_good.retain(|f, _| seen.contains_key(f));
        for objects in seen.into_values() {
            for v in objects {
                let kind = v
                    .get("kind")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                let meta = v.get("metadata");
                let name = meta
                    .and_then(|m| m.get("name"))
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let ns = meta
                    .and_then(|m| m.get("namespace"))
                    .and_then(Value::as_str)
                    .unwrap_or(plugin::DEFAULT_NAMESPACE);
                let key = ObjectKey::new(ns, name);
                match kind.as_str() {
                    "Secret" => desired.secrets.insert(key, v),
                    plugin::envoyfilter::ENVOY_FILTER_KIND => desired.envoy_filters.insert(key, v),
                    _ => desired.plugins.insert(key, v),
                };
            }
        }
        desired
    }
}

/// Reads a file's documents. Structural errors (unreadable file, malformed YAML, a document that
/// is neither a WasmPlugin, an EnvoyFilter nor a Secret) make the whole file bad; validation
/// problems of a plugin or an EnvoyFilter are left to admission, which refuses that object (or
/// that patch) alone.
fn read_objects(file: &Path) -> Result<Vec<Value>, String> {
    let text = std::fs::read_to_string(file).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for doc in plugin::documents(&text) {
        let (i, v) = doc.map_err(|e| format!("document {}: {}", e.document + 1, e.message))?;
        match plugin::parse_object(i, v.clone()) {
            Ok(_) => out.push(v),
            Err(e)
                if e.object.is_some()
                    && matches!(
                        v.get("kind").and_then(Value::as_str),
                        Some("WasmPlugin" | plugin::envoyfilter::ENVOY_FILTER_KIND)
                    ) =>
            {
                out.push(v)
            }
            Err(e) => return Err(format!("document {}: {e}", i + 1)),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLUGIN: &str = "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: a}\nspec: {url: 'r/a:v1'}\n";

    #[test]
    fn a_list_document_is_read_as_its_items() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("list.yaml");
        let list = format!(
            "apiVersion: v1\nkind: List\nitems:\n- {}\n- {}\n",
            "{apiVersion: extensions.istio.io/v1alpha1, kind: WasmPlugin, metadata: {name: a}, spec: {url: 'r/a:v1'}}",
            "{apiVersion: extensions.istio.io/v1alpha1, kind: WasmPlugin, metadata: {name: b}, spec: {url: 'r/b:v1'}}",
        );
        std::fs::write(&f, list).unwrap();
        let d = FileSource::new(vec![dir.path().to_path_buf()]).scan();
        assert!(d.errors.is_empty(), "{:?}", d.errors);
        let names: Vec<String> = d.plugins.keys().map(|k| k.to_string()).collect();
        assert_eq!(names, ["default/a", "default/b"]);
    }

    #[test]
    fn envoy_filters_are_a_kind_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let ef = "apiVersion: networking.istio.io/v1alpha3\nkind: EnvoyFilter\nmetadata: {name: a}\nspec: {configPatches: []}\n";
        // The same name as the WasmPlugin; and one refused at admission, still read.
        let bad = "apiVersion: networking.istio.io/v1alpha3\nkind: EnvoyFilter\nmetadata: {name: b}\nspec: {configPatches: 1}\n";
        std::fs::write(
            dir.path().join("a.yaml"),
            format!("{PLUGIN}---\n{ef}---\n{bad}"),
        )
        .unwrap();
        let d = FileSource::new(vec![dir.path().to_path_buf()]).scan();
        assert!(d.errors.is_empty(), "{:?}", d.errors);
        assert_eq!(d.plugins.len(), 1);
        let names: Vec<String> = d.envoy_filters.keys().map(|k| k.to_string()).collect();
        assert_eq!(names, ["default/a", "default/b"]);
    }

    #[test]
    fn bad_file_keeps_last_good_content() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.yaml");
        std::fs::write(&f, PLUGIN).unwrap();
        let mut src = FileSource::new(vec![dir.path().to_path_buf()]);
        let d = src.scan();
        assert_eq!(d.plugins.len(), 1);
        assert!(d.errors.is_empty());
        std::fs::write(&f, "kind: [").unwrap();
        let d = src.scan();
        assert_eq!(d.plugins.len(), 1, "last good content kept");
        assert_eq!(d.errors.len(), 1);
        std::fs::remove_file(&f).unwrap();
        assert!(src.scan().plugins.is_empty());
    }
}
