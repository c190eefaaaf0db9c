//! The world the steps talk about (registry and web server contents, plugin objects), the steps
//! and their generator, and the observations both sides produce.

use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::*;
use serde_json::{json, Map, Value};

use super::common::{plugin, sha256_hex};
use wasm_ecds::sim::content::{build_image, module_bytes, ImageFormat};

pub const REG: &str = "reg.example";
pub const FILES: &str = "files.example";
pub const HOSTS: [&str; 2] = [REG, FILES];
pub const FORMAT: ImageFormat = ImageFormat::OciArtifact;
pub const MODULES: u8 = 4;
pub const PLUGINS: u8 = 3;

// ---------------------------------------------------------------------------------------------
// The world the steps talk about

/// The urls plugins may use.
#[derive(Clone, Copy, Debug)]
pub enum UrlDef {
    Oci {
        repo: &'static str,
        tag: Option<&'static str>,
        pinned: Option<u8>,
    },
    Http {
        path: &'static str,
    },
}

pub const URLS: [UrlDef; 10] = [
    UrlDef::Oci {
        repo: "a",
        tag: Some("v1"),
        pinned: None,
    },
    UrlDef::Oci {
        repo: "a",
        tag: Some("latest"),
        pinned: None,
    },
    // No tag: resolves `latest`, but is not "the latest tag" for the default policy.
    UrlDef::Oci {
        repo: "a",
        tag: None,
        pinned: None,
    },
    UrlDef::Oci {
        repo: "b",
        tag: Some("v1"),
        pinned: None,
    },
    UrlDef::Http { path: "/x.wasm" },
    UrlDef::Http { path: "/y.wasm" },
    UrlDef::Oci {
        repo: "a",
        tag: None,
        pinned: Some(0),
    },
    UrlDef::Oci {
        repo: "a",
        tag: None,
        pinned: Some(1),
    },
    UrlDef::Oci {
        repo: "b",
        tag: None,
        pinned: Some(2),
    },
    // Pinned to an image repository b does not hold until m3 is published there.
    UrlDef::Oci {
        repo: "b",
        tag: None,
        pinned: Some(3),
    },
];

/// Places a publish step may move: an OCI tag or an HTTP path.
#[derive(Clone, Copy, Debug)]
pub enum Place {
    Tag(&'static str, &'static str),
    Path(&'static str),
}

pub const PLACES: [Place; 5] = [
    Place::Tag("a", "v1"),
    Place::Tag("a", "latest"),
    Place::Tag("b", "v1"),
    Place::Path("/x.wasm"),
    Place::Path("/y.wasm"),
];

/// Module contents and their checksums (computed by the simulator's content builder, which is the
/// world, not the code under test).
pub struct Modules {
    pub bytes: Vec<Vec<u8>>,
    pub sha: Vec<String>,
    pub digest: Vec<String>,
}

impl Modules {
    pub fn new() -> Self {
        let bytes: Vec<Vec<u8>> = (0..MODULES)
            .map(|m| module_bytes(&format!("m{m}"), None, false))
            .collect();
        let sha = bytes.iter().map(|b| sha256_hex(b)).collect();
        let digest = (0..MODULES)
            .map(|m| {
                build_image(&format!("m{m}"), &bytes[m as usize], FORMAT)
                    .top()
                    .digest
                    .clone()
            })
            .collect();
        Modules { bytes, sha, digest }
    }

    pub fn by_sha(&self, sha: &str) -> Option<u8> {
        self.sha.iter().position(|s| s == sha).map(|i| i as u8)
    }

    pub fn url(&self, i: u8) -> String {
        match URLS[i as usize] {
            UrlDef::Oci { repo, tag, pinned } => {
                let mut s = format!("oci://{REG}/{repo}");
                if let Some(t) = tag {
                    s.push(':');
                    s.push_str(t);
                }
                if let Some(m) = pinned {
                    s.push_str("@sha256:");
                    s.push_str(&self.digest[m as usize]);
                }
                s
            }
            UrlDef::Http { path } => format!("http://{FILES}{path}"),
        }
    }

    /// The cache's module name of a url (behavior.md §5).
    pub fn module_name(&self, i: u8) -> String {
        match URLS[i as usize] {
            UrlDef::Oci { repo, .. } => format!("oci://{REG}/{repo}"),
            UrlDef::Http { .. } => self.url(i),
        }
    }

    /// `spec.sha256` pinning module `m` for url `i`: the manifest digest for OCI, the Wasm sha256 for
    /// http (behavior.md §1).
    pub fn pin(&self, i: u8, m: u8) -> String {
        match URLS[i as usize] {
            UrlDef::Oci { .. } => self.digest[m as usize].clone(),
            UrlDef::Http { .. } => self.sha[m as usize].clone(),
        }
    }
}

/// A plugin object as the steps write it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Obj {
    pub url: u8,
    /// `spec.sha256` pinning this module.
    pub sha: Option<u8>,
    /// 0 unspecified, 1 IfNotPresent, 2 Always.
    pub policy: u8,
    pub fail_open: bool,
    /// `metadata.labels.gen`.
    pub label: Option<usize>,
}

pub fn object_json(mods: &Modules, p: u8, o: &Obj) -> Value {
    let mut spec = Map::new();
    spec.insert("url".into(), json!(mods.url(o.url)));
    if let Some(m) = o.sha {
        spec.insert("sha256".into(), json!(mods.pin(o.url, m)));
    }
    match o.policy {
        1 => {
            spec.insert("imagePullPolicy".into(), json!("IfNotPresent"));
        }
        2 => {
            spec.insert("imagePullPolicy".into(), json!("Always"));
        }
        _ => {}
    }
    if o.fail_open {
        spec.insert("failStrategy".into(), json!("FAIL_OPEN"));
    }
    let mut v = plugin("default", &format!("p{p}"), Value::Object(spec));
    if let Some(l) = o.label {
        v["metadata"]["labels"] = json!({"gen": l.to_string()});
    }
    v
}

#[derive(Clone, Debug)]
pub enum Step {
    Apply {
        p: u8,
        obj: Obj,
    },
    /// A metadata-only change (a fresh label value).
    Edit {
        p: u8,
    },
    Delete {
        p: u8,
    },
    /// An object that fails validation (`spec.sha256`).
    Invalid {
        p: u8,
    },
    Publish {
        place: u8,
        module: u8,
    },
    Fail {
        host: u8,
    },
    Recover {
        host: u8,
    },
    Advance(Duration),
    Restart {
        keep_cache: bool,
    },
}

pub fn step() -> impl Strategy<Value = Step> {
    let obj = (
        0..URLS.len() as u8,
        prop::option::weighted(0.25, 0..MODULES),
        0u8..3,
        prop::bool::weighted(0.3),
    )
        .prop_map(|(url, sha, policy, fail_open)| Obj {
            url,
            sha,
            policy,
            fail_open,
            label: None,
        });
    // Short advances end while pulls and background retries are in flight (attempts 0.5 s, 0.75 s,
    // 1.125 s, 1.688 s apart; retries 1 s, 2 s, 4 s… apart), so later steps meet them there.
    let duration = prop::sample::select(vec![
        Duration::from_millis(300),
        Duration::from_millis(750),
        Duration::from_secs(2),
        Duration::from_secs(5),
        Duration::from_secs(45),
        Duration::from_secs(10 * 60),
        Duration::from_secs(3600),
        Duration::from_secs(5 * 3600 + 17),
        Duration::from_secs(24 * 3600),
        Duration::from_secs(25 * 3600),
        Duration::from_secs(3 * 24 * 3600),
    ]);
    prop_oneof![
        6 => (0..PLUGINS, obj).prop_map(|(p, obj)| Step::Apply { p, obj }),
        2 => (0..PLUGINS).prop_map(|p| Step::Edit { p }),
        1 => (0..PLUGINS).prop_map(|p| Step::Delete { p }),
        1 => (0..PLUGINS).prop_map(|p| Step::Invalid { p }),
        3 => (0..PLACES.len() as u8, 0..MODULES).prop_map(|(place, module)| Step::Publish { place, module }),
        1 => (0..HOSTS.len() as u8).prop_map(|host| Step::Fail { host }),
        2 => (0..HOSTS.len() as u8).prop_map(|host| Step::Recover { host }),
        3 => duration.prop_map(Step::Advance),
        2 => prop::bool::weighted(0.75).prop_map(|keep_cache| Step::Restart { keep_cache }),
    ]
}

/// What the world holds at the start of every case.
pub const INITIAL: [(u8, u8); 5] = [(0, 0), (1, 1), (2, 2), (3, 0), (4, 3)];

// ---------------------------------------------------------------------------------------------
// Observations both sides produce

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Ev {
    Processed {
        at: Duration,
        plugin: String,
        version: Option<u64>,
        outcome: String,
    },
    Serving {
        at: Duration,
        plugin: String,
        serving: String,
    },
    Expired {
        at: Duration,
        module: (String, String),
    },
    Retry {
        at: Duration,
        plugin: String,
        due: Duration,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub now: Duration,
    /// Plugin → `absent`, `deny-all`, `allow-all` or `module <name>@<checksum> from <url>`.
    pub serving: BTreeMap<String, String>,
    /// (module name, checksum) → (module index, referencing plugins).
    pub cache: BTreeMap<(String, String), (u8, Vec<String>)>,
    pub resolutions: BTreeMap<String, (String, String)>,
    /// Host → (manifest, blob, get).
    pub counts: BTreeMap<String, (u64, u64, u64)>,
    /// The Istio series of behavior.md §8 (the engine's registry starts empty with every life).
    pub metrics: BTreeMap<&'static str, u64>,
}

pub const LOOKUP_HIT: &str = r#"istio_agent_wasm_cache_lookup_count{hit="true"}"#;
pub const LOOKUP_MISS: &str = r#"istio_agent_wasm_cache_lookup_count{hit="false"}"#;
pub const CACHE_ENTRIES: &str = "istio_agent_wasm_cache_entries";
/// `istio_agent_wasm_remote_fetch_count` by `result`.
pub const FETCH_SERIES: [(&str, &str); 5] = [
    (
        "success",
        r#"istio_agent_wasm_remote_fetch_count{result="success"}"#,
    ),
    (
        "download_failure",
        r#"istio_agent_wasm_remote_fetch_count{result="download_failure"}"#,
    ),
    (
        "manifest_failure",
        r#"istio_agent_wasm_remote_fetch_count{result="manifest_failure"}"#,
    ),
    (
        "checksum_mismatched",
        r#"istio_agent_wasm_remote_fetch_count{result="checksum_mismatched"}"#,
    ),
    (
        "fetch_failure",
        r#"istio_agent_wasm_remote_fetch_count{result="fetch_failure"}"#,
    ),
];

pub fn metric_series() -> Vec<&'static str> {
    let mut v = vec![LOOKUP_HIT, LOOKUP_MISS, CACHE_ENTRIES];
    v.extend(FETCH_SERIES.iter().map(|(_, s)| *s));
    v
}

pub fn served_text(name: &str, checksum: &str, url: &str) -> String {
    format!("module {name}@{checksum} from {url}")
}

pub fn pname(p: u8) -> String {
    format!("default/p{p}")
}

impl Ev {
    /// Where the event sorts in a step's canonical order (see main.rs): by time; at one instant
    /// expiries (by module) before plugin events (by plugin); the sort is stable, so each plugin's
    /// own events keep the order they were recorded in.
    pub fn order(&self) -> (Duration, u8, String) {
        match self {
            Ev::Expired { at, module } => (*at, 0, format!("{}@{}", module.0, module.1)),
            Ev::Processed { at, plugin, .. }
            | Ev::Serving { at, plugin, .. }
            | Ev::Retry { at, plugin, .. } => (*at, 1, plugin.clone()),
        }
    }
}
