//! Istio's agent-side cache tests (`istio/istio` `pkg/wasm/cache_test.go`: every case of
//! `TestWasmCache`, and `TestWasmCachePolicyChangesUsingHTTP`) ported onto this server's core: the
//! real [`Engine`](wasm_ecds::engine::Engine) fed by an
//! [`ObjectStore`](wasm_ecds::source::ObjectStore), a [`SimWorld`](wasm_ecds::sim::world::SimWorld)
//! playing Istio's `httptest` server and in-process registry, a virtual clock, and a [`DiskStore`]
//! in a temporary directory so module paths are real files.
//!
//! How Istio's table columns map onto what this core exposes:
//! - `initialCachedModules` / `initialCachedChecksums`: a previous life of the server pulls the
//!   module (through a tagged URL when Istio also remembers the URL's checksum, through a digest URL
//!   when it does not), then the server restarts keeping its cache (behavior.md §5): the new engine
//!   starts with exactly that cache and no plugin state. Istio's fake file contents (`"data/\n"`
//!   under any checksum) cannot exist here because the cache verifies files, so real modules are used.
//! - `resourceName` / `resourceVersion`: the plugin `namespace/resource`; resource versions come from
//!   the object source, so "the same resource version" is a re-processing of an unchanged object and
//!   "another resource version" is any change to it.
//! - `wantCachedModules`: [`Harness::cached`]; `wantCachedChecksums`: the cache's remembered
//!   resolutions; `wantFileName`: the served module's path; `wantErrorMsgPrefix`: the outcome
//!   `rejected`/`invalid` with its reason (and the message's key facts); `wantVisitServer`: the
//!   simulated hosts' request counts; purge/expiry: virtual time and purge passes.
//! - Rules marked improvement in behavior.md are tested as specified, in tests whose name says
//!   `improvement`.
//!
//! Length: the 25 ported cases of Istio's table, one test each, over one fixture; kept together so
//! the port can be read against the original side by side.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use common::{plugin, pull_secret, sha256_hex, Harness};
use wasm_ecds::cache::ModuleKey;
use wasm_ecds::config::Config;
use wasm_ecds::engine::{Event, Serving};
use wasm_ecds::fetch::FetchConfig;
use wasm_ecds::outcome::{Outcome, Reason};
use wasm_ecds::plugin::ObjectKey;
use wasm_ecds::sim::content::ImageFormat;
use wasm_ecds::sim::scenario::{FailMode, FailRule, KindFilter};
use wasm_ecds::source::Change;
use wasm_ecds::store::{DiskStore, ModuleStore};
use wasm_ecds::url::OciRef;

/// Istio's `httptest` server for plain HTTP modules.
const FILES: &str = "files.test";
const TS_URL: &str = "http://files.test";
/// Istio's in-process registry.
const REG: &str = "registry.test";
const OCI_TAG: &str = "oci://registry.test/test/valid/docker:v0.1.0";
const OCI_LATEST: &str = "oci://registry.test/test/valid/docker:latest";
const OCI_NAME: &str = "oci://registry.test/test/valid/docker";
const OCI_INVALID: &str = "oci://registry.test/test/invalid";
/// A second repository holding the same image (the "-purged" module of Istio's purge case).
const OCI_PURGED: &str = "oci://registry.test/test/purged:v0.1.0";

const WASM_HEADER: &[u8] = b"\0asm\x01\0\0\0";

fn wasm(payload: &[u8]) -> Vec<u8> {
    [WASM_HEADER, payload].concat()
}

fn resource() -> ObjectKey {
    ObjectKey::new("namespace", "resource")
}

/// One case's world: the HTTP server and registry of Istio's test, a cache directory, the engine.
struct Fixture {
    h: Harness,
    dir: tempfile::TempDir,
    http_data: Vec<u8>,
    http_sum: String,
    invalid_http_data: Vec<u8>,
    oci_binary: Vec<u8>,
    docker_digest: String,
    invalid_oci_digest: String,
    /// Request counts when the case's own step started.
    base: std::collections::BTreeMap<String, wasm_ecds::sim::world::RequestCounts>,
}

impl Fixture {
    fn new() -> Self {
        Self::with(Config::default(), None)
    }

    fn with(config: Config, fetch_config: Option<FetchConfig>) -> Self {
        let dir = tempfile::tempdir().expect("a temporary cache directory");
        let store: Arc<dyn ModuleStore> =
            Arc::new(DiskStore::open(dir.path()).expect("the cache directory opens"));
        let h = Harness::with(config, store, fetch_config);
        // The HTTP server: `/different-url` serves other bytes, `/invalid-wasm-header` no Wasm.
        let http_data = wasm(b"data");
        let invalid_http_data = b"invalid binary".to_vec();
        h.world.publish_http(FILES, "/", http_data.clone());
        h.world.publish_http(
            FILES,
            "/different-url",
            [http_data.as_slice(), b"different data"].concat(),
        );
        h.world
            .publish_http(FILES, "/invalid-wasm-header", invalid_http_data.clone());
        // The registry: a Docker image tagged v0.1.0 and latest, and an image without a Wasm module.
        let oci_binary = wasm(b"this is wasm plugin");
        let publish = |url: &str, bytes: &[u8], format| {
            let r = OciRef::parse(url.strip_prefix("oci://").unwrap()).unwrap();
            h.world.publish_oci(&r, "plugin", bytes, format)
        };
        let docker_digest = publish(OCI_TAG, &oci_binary, ImageFormat::Docker);
        assert_eq!(
            publish(OCI_LATEST, &oci_binary, ImageFormat::Docker),
            docker_digest
        );
        assert_eq!(
            publish(OCI_PURGED, &oci_binary, ImageFormat::Docker),
            docker_digest
        );
        let invalid_oci_digest = publish(OCI_INVALID, b"not-wasm.txt: a", ImageFormat::OciCompat);
        let http_sum = sha256_hex(&http_data);
        let base = h.counts();
        Fixture {
            h,
            dir,
            http_data,
            http_sum,
            invalid_http_data,
            oci_binary,
            docker_digest,
            invalid_oci_digest,
            base,
        }
    }

    fn oci_digest_url(&self) -> String {
        format!("{OCI_NAME}@sha256:{}", self.docker_digest)
    }

    fn oci_key(&self) -> ModuleKey {
        ModuleKey::new(OCI_NAME, &self.docker_digest)
    }

    fn http_key(&self) -> ModuleKey {
        ModuleKey::new(TS_URL, &self.http_sum)
    }

    /// A previous life of the server: each spec is pulled by a throw-away plugin that is then
    /// deleted, and the server restarts keeping its cache. Request counts start over for the case.
    fn warm(&mut self, specs: &[Value]) {
        for (i, spec) in specs.iter().enumerate() {
            let key = ObjectKey::new("warmup", format!("p{i}"));
            self.h
                .apply(plugin(&key.namespace, &key.name, spec.clone()));
            assert!(
                matches!(
                    self.h.plugin(&key).last_outcome,
                    Some(Outcome::Pulled | Outcome::Revalidated)
                ),
                "warm-up of {spec} failed: {:?}",
                self.h.plugin(&key).last_error
            );
            self.h.delete_plugin(&key);
        }
        self.h.restart(true);
        self.h.take_events();
        self.base = self.h.counts();
    }

    /// Applies `namespace/resource` with `spec` and returns the outcome of its processing.
    fn get(&mut self, spec: Value) -> Option<Outcome> {
        self.h.take_events();
        self.h.apply(plugin("namespace", "resource", spec));
        self.last_outcome()
    }

    /// The outcome of the last processing of `namespace/resource` since events were last taken.
    fn last_outcome(&mut self) -> Option<Outcome> {
        self.h
            .outcomes()
            .into_iter()
            .rev()
            .find(|(k, _)| *k == resource())
            .map(|(_, o)| o)
    }

    /// Requests to `host` since the case's step started.
    fn delta(&self, host: &str) -> (u64, u64, u64) {
        let now = self.h.host_counts(host);
        let before = self.base.get(host).copied().unwrap_or_default();
        (
            now.manifest - before.manifest,
            now.blob - before.blob,
            now.get - before.get,
        )
    }

    /// Istio's `wantVisitServer`: any request reached the HTTP server or the registry.
    fn visited(&self) -> bool {
        [FILES, REG].iter().any(|h| self.delta(h) != (0, 0, 0))
    }

    /// Istio's `generateModulePath`: `<dir>/<hex sha256 of module name>/<checksum>.wasm`.
    fn module_path(&self, name: &str, checksum: &str) -> PathBuf {
        self.dir
            .path()
            .join(sha256_hex(name.as_bytes()))
            .join(format!("{checksum}.wasm"))
    }

    fn served_path(&self, key: &ObjectKey) -> Option<PathBuf> {
        match self.h.serving(key) {
            Some(Serving::Module(m)) => Some(m.path.clone()),
            _ => None,
        }
    }

    fn resolutions(&self) -> Vec<(String, ModuleKey)> {
        self.h
            .engine()
            .cache()
            .resolutions()
            .iter()
            .map(|(u, k)| (u.clone(), k.clone()))
            .collect()
    }

    fn detail(&self) -> String {
        self.h
            .plugin(&resource())
            .last_error
            .clone()
            .unwrap_or_default()
    }
}

/// Every `.wasm` file under `dir`.
fn wasm_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(wasm_files(&p));
        } else if p.extension().is_some_and(|e| e == "wasm") {
            out.push(p);
        }
    }
    out
}

const LOOKUP_HIT: &str = r#"istio_agent_wasm_cache_lookup_count{hit="true"}"#;
const LOOKUP_MISS: &str = r#"istio_agent_wasm_cache_lookup_count{hit="false"}"#;

fn fetch_count(result: &str) -> String {
    format!(r#"istio_agent_wasm_remote_fetch_count{{result="{result}"}}"#)
}

// ---------------------------------------------------------------------------------------------
// TestWasmCache

#[test]
fn cache_miss() {
    let mut fx = Fixture::new();
    let sum = fx.http_sum.clone();
    assert_eq!(
        fx.get(json!({"url": TS_URL, "sha256": sum})),
        Some(Outcome::Pulled)
    );
    let path = fx.module_path(TS_URL, &sum);
    assert_eq!(fx.served_path(&resource()), Some(path.clone()));
    assert_eq!(std::fs::read(&path).unwrap(), fx.http_data);
    assert_eq!(fx.h.cached(), vec![fx.http_key()]);
    assert_eq!(fx.resolutions(), vec![(TS_URL.to_string(), fx.http_key())]);
    assert_eq!(fx.delta(FILES), (0, 0, 1));
    assert_eq!(fx.h.metric(LOOKUP_MISS), 1.0);
    assert_eq!(fx.h.metric(&fetch_count("success")), 1.0);
}

#[test]
fn cache_hit() {
    let mut fx = Fixture::new();
    let sum = fx.http_sum.clone();
    fx.warm(&[json!({"url": TS_URL, "sha256": sum})]);
    // Istio also checks that a hit refreshes the entry's last use.
    fx.h.advance(Duration::from_secs(90 * 60));
    assert_eq!(
        fx.get(json!({"url": TS_URL, "sha256": sum})),
        Some(Outcome::Cached)
    );
    assert_eq!(
        fx.served_path(&resource()),
        Some(fx.module_path(TS_URL, &sum))
    );
    assert_eq!(fx.h.cached(), vec![fx.http_key()]);
    assert_eq!(
        fx.h.engine().cache().get(&fx.http_key()).unwrap().last_used,
        fx.h.now()
    );
    assert_eq!(fx.resolutions(), vec![(TS_URL.to_string(), fx.http_key())]);
    assert!(!fx.visited());
    assert_eq!(fx.h.metric(LOOKUP_HIT), 1.0);
    assert_eq!(fx.h.metric(&fetch_count("success")), 0.0);
}

#[test]
fn invalid_scheme() {
    let mut fx = Fixture::new();
    let sum = fx.http_sum.clone();
    // Refused at admission (behavior.md §1): outcome `invalid` naming the field, never served.
    let change = fx.h.apply(plugin(
        "namespace",
        "resource",
        json!({"url": "foo://abc", "sha256": sum}),
    ));
    assert!(
        matches!(change, Change::Refused { ref error, .. } if error.field == "spec.url"),
        "{change:?}"
    );
    assert_eq!(fx.last_outcome(), Some(Outcome::Invalid("spec.url".into())));
    assert_eq!(fx.h.serving(&resource()), None);
    assert!(fx.h.cached().is_empty() && fx.resolutions().is_empty());
    assert!(!fx.visited());
}

#[test]
fn download_failure() {
    let mut fx = Fixture::new();
    // Istio's `https://-invalid-url` never resolves: every attempt is a connection error.
    fx.h.world.add_rule(FailRule {
        host: "-invalid-url".into(),
        kind: KindFilter::Any,
        mode: FailMode::Unavailable,
        times: None,
    });
    assert_eq!(
        fx.get(json!({"url": "https://-invalid-url"})),
        Some(Outcome::Rejected(Reason::DownloadFailure))
    );
    // "failed after 5 attempts" (WASM_HTTP_REQUEST_MAX_RETRIES, behavior.md §4.1).
    assert_eq!(fx.delta("-invalid-url"), (0, 0, 5));
    assert!(!fx.visited());
    assert_eq!(fx.h.serving(&resource()), Some(&Serving::DenyAll));
    assert!(fx.h.cached().is_empty() && fx.resolutions().is_empty());
    assert_eq!(fx.h.metric(&fetch_count("download_failure")), 1.0);
}

#[test]
fn wrong_checksum() {
    let mut fx = Fixture::new();
    // Istio's "wrongchecksum\n" is not a sha256 at all: here it is refused at admission.
    fx.h.apply(plugin(
        "namespace",
        "resource",
        json!({"url": TS_URL, "sha256": "wrongchecksum\n"}),
    ));
    assert_eq!(
        fx.last_outcome(),
        Some(Outcome::Invalid("spec.sha256".into()))
    );
    assert!(!fx.visited());
    // A well-formed wrong checksum is downloaded and refused, as in Istio.
    let wrong = sha256_hex(b"something else");
    assert_eq!(
        fx.get(json!({"url": TS_URL, "sha256": wrong})),
        Some(Outcome::Rejected(Reason::ChecksumMismatch))
    );
    assert!(fx.detail().contains(&fx.http_sum), "{}", fx.detail());
    assert_eq!(fx.delta(FILES), (0, 0, 1));
    assert!(fx.h.cached().is_empty() && fx.resolutions().is_empty());
    assert_eq!(fx.h.serving(&resource()), Some(&Serving::DenyAll));
    assert_eq!(fx.h.metric(&fetch_count("checksum_mismatched")), 1.0);
}

#[test]
fn different_url_same_checksum() {
    let mut fx = Fixture::new();
    let sum = fx.http_sum.clone();
    fx.warm(&[json!({"url": TS_URL, "sha256": sum})]);
    // The url changed but not the checksum: the new url is downloaded and refused.
    let url = format!("{TS_URL}/different-url");
    assert_eq!(
        fx.get(json!({"url": url, "sha256": sum})),
        Some(Outcome::Rejected(Reason::ChecksumMismatch))
    );
    assert!(fx.detail().contains(&sum), "{}", fx.detail());
    assert_eq!(fx.delta(FILES), (0, 0, 1));
    assert_eq!(fx.h.cached(), vec![fx.http_key()]);
    assert_eq!(fx.resolutions(), vec![(TS_URL.to_string(), fx.http_key())]);
}

#[test]
fn invalid_wasm_header() {
    let mut fx = Fixture::new();
    let sum = fx.http_sum.clone();
    fx.warm(&[json!({"url": TS_URL, "sha256": sum})]);
    let url = format!("{TS_URL}/invalid-wasm-header");
    let invalid_sum = sha256_hex(&fx.invalid_http_data);
    assert_eq!(
        fx.get(json!({"url": url, "sha256": invalid_sum})),
        Some(Outcome::Rejected(Reason::InvalidModule))
    );
    assert_eq!(fx.delta(FILES), (0, 0, 1));
    assert_eq!(fx.h.cached(), vec![fx.http_key()]);
    assert_eq!(fx.h.metric(&fetch_count("fetch_failure")), 1.0);
}

/// Istio purges the module it just returned once it is 1 ms old. Here a module that a current
/// plugin serves is never purged; it ages from the moment its last plugin goes away (behavior.md §5,
/// improvement). Istio polls the directory for up to 5 s of wall-clock time; this test moves a
/// virtual clock through the purge passes.
#[test]
fn purge_on_expiry_improvement() {
    let config = Config {
        purge_interval: Duration::from_millis(1),
        module_expiry: Duration::from_millis(1),
        ..Config::default()
    };
    let mut fx = Fixture::with(config, None);
    let sum = fx.http_sum.clone();
    assert_eq!(
        fx.get(json!({"url": TS_URL, "sha256": sum})),
        Some(Outcome::Pulled)
    );
    assert!(fx.visited());
    let path = fx.module_path(TS_URL, &sum);
    assert_eq!(fx.served_path(&resource()), Some(path.clone()));

    fx.h.advance(Duration::from_millis(20));
    assert_eq!(
        fx.h.cached(),
        vec![fx.http_key()],
        "a served module is never purged"
    );
    assert_eq!(wasm_files(fx.dir.path()), vec![path.clone()]);
    assert!(fx
        .h
        .take_events()
        .iter()
        .all(|e| !matches!(e, Event::Expired { .. })));

    fx.h.delete_plugin(&resource());
    fx.h.advance(Duration::from_millis(3));
    let expired: Vec<ModuleKey> =
        fx.h.take_events()
            .into_iter()
            .filter_map(|e| {
                if let Event::Expired { module, .. } = e {
                    Some(module)
                } else {
                    None
                }
            })
            .collect();
    assert_eq!(expired, vec![fx.http_key()]);
    assert!(fx.h.cached().is_empty(), "Istio's wantCachedModules: {{}}");
    assert!(
        fx.resolutions().is_empty(),
        "Istio's wantCachedChecksums: {{}}"
    );
    assert!(
        wasm_files(fx.dir.path()).is_empty(),
        "the module file is removed"
    );
}

#[test]
fn fetch_oci_without_digest() {
    let mut fx = Fixture::new();
    assert_eq!(fx.get(json!({"url": OCI_TAG})), Some(Outcome::Pulled));
    let path = fx.module_path(OCI_NAME, &fx.docker_digest);
    assert_eq!(fx.served_path(&resource()), Some(path.clone()));
    assert_eq!(std::fs::read(&path).unwrap(), fx.oci_binary);
    assert_eq!(fx.h.cached(), vec![fx.oci_key()]);
    assert_eq!(fx.resolutions(), vec![(OCI_TAG.to_string(), fx.oci_key())]);
    assert_eq!(fx.delta(REG), (1, 1, 0));
}

#[test]
fn fetch_oci_with_digest() {
    let mut fx = Fixture::new();
    let digest = fx.docker_digest.clone();
    assert_eq!(
        fx.get(json!({"url": OCI_TAG, "sha256": digest})),
        Some(Outcome::Pulled)
    );
    assert_eq!(
        fx.served_path(&resource()),
        Some(fx.module_path(OCI_NAME, &digest))
    );
    assert_eq!(fx.h.cached(), vec![fx.oci_key()]);
    assert_eq!(fx.resolutions(), vec![(OCI_TAG.to_string(), fx.oci_key())]);
    assert_eq!(fx.delta(REG), (1, 1, 0));
}

#[test]
fn cache_hit_for_tagged_oci_url_with_digest() {
    let mut fx = Fixture::new();
    let digest = fx.docker_digest.clone();
    // Cached through a digest url: the module, but no remembered resolution of the tag.
    fx.warm(&[json!({"url": fx.oci_digest_url()})]);
    assert!(fx.resolutions().is_empty());
    assert_eq!(
        fx.get(json!({"url": OCI_TAG, "sha256": digest})),
        Some(Outcome::Cached)
    );
    assert_eq!(
        fx.served_path(&resource()),
        Some(fx.module_path(OCI_NAME, &digest))
    );
    assert_eq!(fx.h.cached(), vec![fx.oci_key()]);
    assert_eq!(fx.resolutions(), vec![(OCI_TAG.to_string(), fx.oci_key())]);
    assert!(!fx.visited());
}

#[test]
fn cache_hit_for_tagged_oci_url_without_digest() {
    let mut fx = Fixture::new();
    fx.warm(&[json!({"url": OCI_TAG})]);
    assert_eq!(
        fx.resolutions(),
        vec![(OCI_TAG.to_string(), fx.oci_key())],
        "resolutions survive the restart"
    );
    assert_eq!(fx.get(json!({"url": OCI_TAG})), Some(Outcome::Cached));
    assert_eq!(
        fx.served_path(&resource()),
        Some(fx.module_path(OCI_NAME, &fx.docker_digest))
    );
    assert_eq!(fx.h.cached(), vec![fx.oci_key()]);
    assert!(!fx.visited());
}

#[test]
fn cache_miss_for_tagged_oci_url_without_digest() {
    let mut fx = Fixture::new();
    fx.warm(&[json!({"url": fx.oci_digest_url()})]);
    // The tag must be resolved (one manifest request); its digest is cached, so no blob is
    // downloaded: `revalidated` (behavior.md §2, §6).
    assert_eq!(fx.get(json!({"url": OCI_TAG})), Some(Outcome::Revalidated));
    assert_eq!(fx.delta(REG), (1, 0, 0));
    assert_eq!(
        fx.served_path(&resource()),
        Some(fx.module_path(OCI_NAME, &fx.docker_digest))
    );
    assert_eq!(fx.h.cached(), vec![fx.oci_key()]);
    assert_eq!(fx.resolutions(), vec![(OCI_TAG.to_string(), fx.oci_key())]);
    assert_eq!(fx.h.metric(LOOKUP_HIT), 1.0);
    assert_eq!(fx.h.metric(&fetch_count("success")), 0.0);
}

#[test]
fn cache_hit_for_oci_url_suffixed_by_digest() {
    let mut fx = Fixture::new();
    let url = fx.oci_digest_url();
    fx.warm(&[json!({"url": url})]);
    assert_eq!(fx.get(json!({"url": url})), Some(Outcome::Cached));
    assert_eq!(
        fx.served_path(&resource()),
        Some(fx.module_path(OCI_NAME, &fx.docker_digest))
    );
    assert_eq!(fx.h.cached(), vec![fx.oci_key()]);
    assert!(
        fx.resolutions().is_empty(),
        "a digest url is not a mutable url: nothing to remember"
    );
    assert!(!fx.visited());
}

#[test]
fn pull_due_to_pull_always_policy_when_cache_hit() {
    let mut fx = Fixture::new();
    fx.warm(&[json!({"url": OCI_TAG})]);
    // A new resource version under Always asks the registry; the digest is cached.
    assert_eq!(
        fx.get(json!({"url": OCI_TAG, "imagePullPolicy": "Always"})),
        Some(Outcome::Revalidated)
    );
    assert!(fx.visited());
    assert_eq!(fx.delta(REG), (1, 0, 0));
    assert_eq!(fx.h.cached(), vec![fx.oci_key()]);
    assert_eq!(fx.resolutions(), vec![(OCI_TAG.to_string(), fx.oci_key())]);
    let st = fx.h.plugin(&resource());
    assert_eq!(st.pulled_version, Some(st.version));
}

#[test]
fn do_not_pull_due_to_resource_version_is_the_same() {
    let mut fx = Fixture::new();
    fx.h.apply(pull_secret("namespace", "pull", "elsewhere.test", "one"));
    let spec = json!({"url": OCI_TAG, "imagePullPolicy": "Always", "imagePullSecret": "pull"});
    assert_eq!(fx.get(spec.clone()), Some(Outcome::Pulled));
    let version = fx.h.plugin(&resource()).version;
    fx.base = fx.h.counts();
    // Re-applying the identical object is not a change: no new resource version, no processing.
    let change = fx.h.apply(plugin("namespace", "resource", spec));
    assert_eq!(change, Change::Unchanged(resource()));
    assert_eq!(fx.last_outcome(), None);
    // A secret change reprocesses the plugin at the same resource version: no pull (behavior.md §3).
    fx.h.apply(pull_secret("namespace", "pull", "elsewhere.test", "two"));
    assert_eq!(fx.last_outcome(), Some(Outcome::Cached));
    // Background work (purge passes) does not pull either.
    fx.h.advance(Duration::from_secs(3 * 3600));
    assert_eq!(fx.last_outcome(), None);
    assert_eq!(fx.h.plugin(&resource()).version, version);
    assert!(!fx.visited());
    assert_eq!(fx.h.cached(), vec![fx.oci_key()]);
    assert_eq!(fx.resolutions(), vec![(OCI_TAG.to_string(), fx.oci_key())]);
}

#[test]
fn pull_due_to_if_not_present_policy_when_cache_hit() {
    // Despite its name, Istio's case expects no visit: IfNotPresent with a remembered resolution.
    let mut fx = Fixture::new();
    fx.warm(&[json!({"url": OCI_TAG})]);
    assert_eq!(
        fx.get(json!({"url": OCI_TAG, "imagePullPolicy": "IfNotPresent"})),
        Some(Outcome::Cached)
    );
    assert_eq!(
        fx.served_path(&resource()),
        Some(fx.module_path(OCI_NAME, &fx.docker_digest))
    );
    assert_eq!(fx.resolutions(), vec![(OCI_TAG.to_string(), fx.oci_key())]);
    assert!(!fx.visited());
}

#[test]
fn do_not_pull_in_spite_of_pull_always_policy_due_to_checksum() {
    let mut fx = Fixture::new();
    let digest = fx.docker_digest.clone();
    fx.warm(&[json!({"url": fx.oci_digest_url()})]);
    let spec = json!({"url": OCI_TAG, "sha256": digest, "imagePullPolicy": "Always"});
    assert_eq!(fx.get(spec), Some(Outcome::Cached));
    assert_eq!(
        fx.served_path(&resource()),
        Some(fx.module_path(OCI_NAME, &digest))
    );
    assert_eq!(fx.resolutions(), vec![(OCI_TAG.to_string(), fx.oci_key())]);
    assert!(!fx.visited());
}

#[test]
fn pull_due_to_latest_tag() {
    let mut fx = Fixture::new();
    fx.warm(&[json!({"url": OCI_LATEST})]);
    // Unspecified policy and tag `latest`: Always (behavior.md §2 rule 4).
    assert_eq!(
        fx.get(json!({"url": OCI_LATEST})),
        Some(Outcome::Revalidated)
    );
    assert_eq!(fx.delta(REG), (1, 0, 0));
    assert_eq!(
        fx.served_path(&resource()),
        Some(fx.module_path(OCI_NAME, &fx.docker_digest))
    );
    assert_eq!(fx.h.cached(), vec![fx.oci_key()]);
    assert_eq!(
        fx.resolutions(),
        vec![(OCI_LATEST.to_string(), fx.oci_key())]
    );
}

#[test]
fn do_not_pull_in_spite_of_latest_tag_due_to_checksum() {
    let mut fx = Fixture::new();
    let digest = fx.docker_digest.clone();
    fx.warm(&[json!({"url": OCI_LATEST})]);
    assert_eq!(
        fx.get(json!({"url": OCI_LATEST, "sha256": digest})),
        Some(Outcome::Cached)
    );
    assert_eq!(
        fx.served_path(&resource()),
        Some(fx.module_path(OCI_NAME, &digest))
    );
    assert_eq!(
        fx.resolutions(),
        vec![(OCI_LATEST.to_string(), fx.oci_key())]
    );
    assert!(!fx.visited());
}

#[test]
fn do_not_pull_in_spite_of_latest_tag_due_to_if_not_present_policy() {
    let mut fx = Fixture::new();
    fx.warm(&[json!({"url": OCI_LATEST})]);
    assert_eq!(
        fx.get(json!({"url": OCI_LATEST, "imagePullPolicy": "IfNotPresent"})),
        Some(Outcome::Cached)
    );
    assert_eq!(
        fx.served_path(&resource()),
        Some(fx.module_path(OCI_NAME, &fx.docker_digest))
    );
    assert_eq!(
        fx.resolutions(),
        vec![(OCI_LATEST.to_string(), fx.oci_key())]
    );
    assert!(!fx.visited());
}

/// Istio starts with an unreferenced module (key suffixed `-purged`) and a remembered resolution
/// pointing to it, fetches a digest url with 1 ms expiry, and expects the cache to end empty with
/// only an unrelated resolution (`test-url`) left. Here the unreferenced module and its resolution
/// go at the first purge pass after they are older than the expiry; the module the plugin has just
/// pulled stays while the plugin serves it (behavior.md §5, improvement) and goes once it is
/// deleted; an unrelated module still served by another plugin keeps its resolution throughout.
#[test]
fn purge_oci_image_on_expiry_improvement() {
    let config = Config {
        purge_interval: Duration::from_millis(1),
        module_expiry: Duration::from_millis(1),
        ..Config::default()
    };
    let mut fx = Fixture::with(config, None);
    let other = ObjectKey::new("namespace", "resource2");
    fx.h.apply(plugin(
        &other.namespace,
        &other.name,
        json!({"url": TS_URL}),
    ));
    let purged_key = ModuleKey::new("oci://registry.test/test/purged", &fx.docker_digest);
    fx.warm(&[json!({"url": OCI_PURGED})]);
    assert_eq!(fx.h.cached(), vec![fx.http_key(), purged_key.clone()]);
    assert_eq!(fx.h.served_key(&other), Some(fx.http_key()));

    assert_eq!(
        fx.get(json!({"url": fx.oci_digest_url()})),
        Some(Outcome::Pulled)
    );
    assert_eq!(fx.delta(REG), (1, 1, 0));
    assert_eq!(
        fx.served_path(&resource()),
        Some(fx.module_path(OCI_NAME, &fx.docker_digest))
    );

    fx.h.advance(Duration::from_millis(5));
    let expired: Vec<ModuleKey> =
        fx.h.take_events()
            .into_iter()
            .filter_map(|e| {
                if let Event::Expired { module, .. } = e {
                    Some(module)
                } else {
                    None
                }
            })
            .collect();
    assert_eq!(expired, vec![purged_key]);
    assert_eq!(fx.h.cached(), vec![fx.http_key(), fx.oci_key()]);
    assert_eq!(
        fx.resolutions(),
        vec![(TS_URL.to_string(), fx.http_key())],
        "the purged module's resolution is forgotten"
    );

    fx.h.delete_plugin(&resource());
    fx.h.advance(Duration::from_millis(5));
    assert_eq!(fx.h.cached(), vec![fx.http_key()]);
    assert_eq!(fx.resolutions(), vec![(TS_URL.to_string(), fx.http_key())]);
    assert_eq!(
        wasm_files(fx.dir.path()),
        vec![fx.module_path(TS_URL, &fx.http_sum)]
    );
}

#[test]
fn fetch_oci_timed_out() {
    // Istio's pull timeout of 0 fails before any request reaches the registry. (A per-attempt
    // timeout of 0 means no per-attempt limit, as in Go's http.Client.)
    let mut fetch = FetchConfig::from(&Config::default());
    fetch.pull_deadline = Duration::ZERO;
    let mut fx = Fixture::with(Config::default(), Some(fetch));
    assert_eq!(
        fx.get(json!({"url": OCI_TAG})),
        Some(Outcome::Rejected(Reason::ManifestFailure))
    );
    assert!(fx.detail().contains("deadline"), "{}", fx.detail());
    assert!(!fx.visited());
    assert!(fx.h.cached().is_empty() && fx.resolutions().is_empty());
    assert_eq!(fx.h.serving(&resource()), Some(&Serving::DenyAll));
    assert_eq!(fx.h.metric(&fetch_count("manifest_failure")), 1.0);
}

#[test]
fn fetch_oci_with_wrong_digest() {
    let mut fx = Fixture::new();
    // Istio's "wrongdigest" is not a sha256: refused at admission here.
    fx.h.apply(plugin(
        "namespace",
        "resource",
        json!({"url": OCI_TAG, "sha256": "wrongdigest"}),
    ));
    assert_eq!(
        fx.last_outcome(),
        Some(Outcome::Invalid("spec.sha256".into()))
    );
    assert!(!fx.visited());
    // A well-formed wrong digest: the manifest is fetched, its digest does not match, no blob.
    let wrong = sha256_hex(b"another image");
    assert_eq!(
        fx.get(json!({"url": OCI_TAG, "sha256": wrong})),
        Some(Outcome::Rejected(Reason::ChecksumMismatch))
    );
    assert!(fx.detail().contains(&fx.docker_digest), "{}", fx.detail());
    assert_eq!(fx.delta(REG), (1, 0, 0));
    assert!(fx.h.cached().is_empty() && fx.resolutions().is_empty());
    assert_eq!(fx.h.metric(&fetch_count("checksum_mismatched")), 1.0);
}

#[test]
fn fetch_invalid_oci() {
    let mut fx = Fixture::new();
    let digest = fx.invalid_oci_digest.clone();
    // The image's layer holds no Wasm binary.
    assert_eq!(
        fx.get(json!({"url": OCI_INVALID, "sha256": digest})),
        Some(Outcome::Rejected(Reason::InvalidModule))
    );
    assert!(fx.visited());
    assert_eq!(fx.delta(REG), (1, 1, 0));
    assert!(fx.h.cached().is_empty() && fx.resolutions().is_empty());
    assert_eq!(fx.h.serving(&resource()), Some(&Serving::DenyAll));
}

// ---------------------------------------------------------------------------------------------
// TestWasmCachePolicyChangesUsingHTTP

/// Istio's server answers binary 1 to the first two requests and binary 2 afterwards; the plugin
/// goes through policies and resource versions. Istio can change the policy while keeping the
/// resource version; here a policy change is a change (behavior.md §3), so "the same resource
/// version under Always" is a re-processing through a pull-secret change instead.
#[test]
fn policy_changes_using_http() {
    let mut fx = Fixture::new();
    let (url1, url2) = (format!("{TS_URL}/one"), format!("{TS_URL}/next"));
    let (binary1, binary2) = (wasm(&[1]), wasm(&[2]));
    fx.h.world.publish_http(FILES, "/one", binary1.clone());
    fx.h.world.publish_http(FILES, "/next", binary1.clone());
    let path1 = fx.module_path(&url1, &sha256_hex(&binary1));
    let path2 = fx.module_path(&url2, &sha256_hex(&binary2));
    fx.h.apply(pull_secret("namespace", "pull", "elsewhere.test", "one"));
    let key = resource();
    let gets = |fx: &Fixture| fx.h.host_counts(FILES).get;

    // 1st: first load of binary 1 (an http url is IfNotPresent by default).
    assert_eq!(
        fx.get(json!({"url": url1, "imagePullSecret": "pull"})),
        Some(Outcome::Pulled)
    );
    assert_eq!((fx.served_path(&key), gets(&fx)), (Some(path1.clone()), 1));
    // 2nd: a new resource version, default policy: cached (the url's checksum is remembered).
    fx.h.edit(&key, json!({"metadata": {"labels": {"rev": "2"}}}));
    assert_eq!(fx.last_outcome(), Some(Outcome::Cached));
    assert_eq!((fx.served_path(&key), gets(&fx)), (Some(path1.clone()), 1));
    // 3rd: IfNotPresent: cached.
    fx.h.edit(&key, json!({"spec": {"imagePullPolicy": "IfNotPresent"}}));
    assert_eq!(fx.last_outcome(), Some(Outcome::Cached));
    assert_eq!((fx.served_path(&key), gets(&fx)), (Some(path1.clone()), 1));
    // Istio's 5th: Always at a new resource version pulls; the body is unchanged, same file.
    fx.h.edit(&key, json!({"spec": {"imagePullPolicy": "Always"}}));
    assert_eq!(fx.last_outcome(), Some(Outcome::Pulled));
    assert_eq!((fx.served_path(&key), gets(&fx)), (Some(path1.clone()), 2));
    assert_eq!(fx.h.cached().len(), 1);
    // Istio's 4th: Always at the same resource version (re-processed by a secret change): no pull.
    fx.h.apply(pull_secret("namespace", "pull", "elsewhere.test", "two"));
    assert_eq!(fx.last_outcome(), Some(Outcome::Cached));
    assert_eq!((fx.served_path(&key), gets(&fx)), (Some(path1.clone()), 2));
    // The server now answers binary 2.
    fx.h.world.publish_http(FILES, "/one", binary2.clone());
    fx.h.world.publish_http(FILES, "/next", binary2.clone());
    // 6th: the url changes under Always: pulled.
    fx.h.edit(&key, json!({"spec": {"url": url2}}));
    assert_eq!(fx.last_outcome(), Some(Outcome::Pulled));
    assert_eq!((fx.served_path(&key), gets(&fx)), (Some(path2.clone()), 3));
    assert_eq!(std::fs::read(&path2).unwrap(), binary2);
}

// ---------------------------------------------------------------------------------------------
// Where behavior.md improves on the reference, next to the Istio cases they touch

/// Istio counts a cache miss of a tagged OCI url twice (once for the tag, once for the digest);
/// here every processing is one lookup (behavior.md §8, improvement).
#[test]
fn tagged_oci_cache_miss_counts_one_lookup_improvement() {
    let mut fx = Fixture::new();
    assert_eq!(fx.get(json!({"url": OCI_TAG})), Some(Outcome::Pulled));
    assert_eq!(
        (fx.h.metric(LOOKUP_MISS), fx.h.metric(LOOKUP_HIT)),
        (1.0, 0.0)
    );
    fx.h.edit(&resource(), json!({"spec": {"imagePullPolicy": "Always"}}));
    assert_eq!(fx.last_outcome(), Some(Outcome::Revalidated));
    assert_eq!(
        (fx.h.metric(LOOKUP_MISS), fx.h.metric(LOOKUP_HIT)),
        (1.0, 1.0)
    );
    assert_eq!(fx.h.metric(&fetch_count("success")), 1.0);
}

/// Istio replaces the module with the RBAC fallback when a pull fails; here a plugin that already
/// serves a module from the same url keeps serving it while its pin (if any) still matches
/// (behavior.md §7, improvement), and falls back once the pin no longer matches.
#[test]
fn failed_pull_keeps_serving_the_module_from_the_same_url_improvement() {
    let mut fx = Fixture::new();
    assert_eq!(
        fx.get(json!({"url": OCI_TAG, "imagePullPolicy": "Always"})),
        Some(Outcome::Pulled)
    );
    let path = fx.module_path(OCI_NAME, &fx.docker_digest);
    fx.h.world.add_rule(FailRule {
        host: REG.into(),
        kind: KindFilter::Any,
        mode: FailMode::Unavailable,
        times: None,
    });
    fx.h.edit(&resource(), json!({"metadata": {"labels": {"rev": "2"}}}));
    assert_eq!(
        fx.last_outcome(),
        Some(Outcome::Rejected(Reason::ManifestFailure))
    );
    assert_eq!(
        fx.served_path(&resource()),
        Some(path.clone()),
        "still the old module, not deny-all"
    );
    // Pinning a checksum the served module does not have: nothing valid to keep.
    fx.h.edit(
        &resource(),
        json!({"spec": {"sha256": sha256_hex(b"another image")}}),
    );
    assert_eq!(
        fx.last_outcome(),
        Some(Outcome::Rejected(Reason::ManifestFailure))
    );
    assert_eq!(fx.h.serving(&resource()), Some(&Serving::DenyAll));
    // With the registry back and a pin the cached module has, it is served again from the cache.
    fx.h.world.recover(REG);
    let digest = fx.docker_digest.clone();
    fx.h.edit(&resource(), json!({"spec": {"sha256": digest}}));
    assert_eq!(fx.last_outcome(), Some(Outcome::Cached));
    assert_eq!(fx.served_path(&resource()), Some(path));
}
