//! Model-based property test: random step sequences run through the real engine (the
//! [`ObjectStore`](wasm_ecds::source::ObjectStore), [`Engine`](wasm_ecds::engine::Engine) and
//! [`SimWorld`](wasm_ecds::sim::world::SimWorld), driven as `sim/runner.rs` drives them, through the
//! shared test [`Harness`]) and through a small reference model of behavior.md §2 (pull policy),
//! §3 (changes), §4.1 (retries), §5 (cache, expiry, restarts), §6 (outcomes) and §7 (fallbacks,
//! keeping the old module, background retries), written here from the spec and sharing no code with
//! the implementation: its own policy function, its own cache set, its own expiry rule, its own
//! clock.
//!
//! After every step the two must agree on: every event (processing outcome with its time and
//! resource version, what each plugin serves, scheduled retries, expiries), what each plugin serves,
//! the cache (modules, which plugins reference them, remembered url resolutions), the virtual time,
//! the request counts of every host and the Istio metric series of §8. Invariants are also checked on the engine alone: a module
//! whose checksum does not match the plugin's pin is never served, a served module is always in the
//! cache (never purged), and the same input gives the same events.
//!
//! The generator is restricted to keep the model small: no credentials, one image format, failures
//! only `unavailable` until `recover`, small modules, default options.
//!
//! Readings of the spec the model makes where it leaves room: a module is "referenced by a current
//! plugin" while that plugin serves it or, after it fell back to RBAC, while its URL (or pin) still
//! resolves to it in the cache (§5: "a module that some current plugin still resolves to"); what a
//! plugin served is remembered with the cache, so a pull failing right after a restart keeps serving
//! it (§7's keep-serving rule across restarts); a purge pass purges what
//! has been unused for strictly longer than the expiry, at multiples of the purge interval.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use serde_json::{json, Map, Value};

use common::{plugin, sha256_hex, Harness};
use wasm_ecds::engine::{Event, Serving};
use wasm_ecds::outcome::Outcome;
use wasm_ecds::plugin::ObjectKey;
use wasm_ecds::sim::content::{build_image, module_bytes, ImageFormat};
use wasm_ecds::sim::scenario::{FailMode, FailRule, KindFilter};
use wasm_ecds::url::OciRef;

const REG: &str = "reg.example";
const FILES: &str = "files.example";
const HOSTS: [&str; 2] = [REG, FILES];
const FORMAT: ImageFormat = ImageFormat::OciArtifact;
const MODULES: u8 = 4;
const PLUGINS: u8 = 3;

// Spec constants (behavior.md §4.1, §5, §7, §9 defaults), restated for the model.
const ATTEMPTS: u32 = 5;
const FIRST_BACKOFF_US: u64 = 500_000;
const EXPIRY: Duration = Duration::from_secs(24 * 3600);
const PURGE_INTERVAL: Duration = Duration::from_secs(3600);
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(300);

// ---------------------------------------------------------------------------------------------
// The world the steps talk about

/// The urls plugins may use.
#[derive(Clone, Copy, Debug)]
enum UrlDef {
    Oci {
        repo: &'static str,
        tag: Option<&'static str>,
        pinned: Option<u8>,
    },
    Http {
        path: &'static str,
    },
}

const URLS: [UrlDef; 10] = [
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
enum Place {
    Tag(&'static str, &'static str),
    Path(&'static str),
}

const PLACES: [Place; 5] = [
    Place::Tag("a", "v1"),
    Place::Tag("a", "latest"),
    Place::Tag("b", "v1"),
    Place::Path("/x.wasm"),
    Place::Path("/y.wasm"),
];

/// Module contents and their checksums (computed by the simulator's content builder, which is the
/// world, not the code under test).
struct Modules {
    bytes: Vec<Vec<u8>>,
    sha: Vec<String>,
    digest: Vec<String>,
}

impl Modules {
    fn new() -> Self {
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

    fn by_sha(&self, sha: &str) -> Option<u8> {
        self.sha.iter().position(|s| s == sha).map(|i| i as u8)
    }

    fn url(&self, i: u8) -> String {
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
    fn module_name(&self, i: u8) -> String {
        match URLS[i as usize] {
            UrlDef::Oci { repo, .. } => format!("oci://{REG}/{repo}"),
            UrlDef::Http { .. } => self.url(i),
        }
    }

    /// `spec.sha256` pinning module `m` for url `i`: the manifest digest for OCI, the Wasm sha256 for
    /// http (behavior.md §1).
    fn pin(&self, i: u8, m: u8) -> String {
        match URLS[i as usize] {
            UrlDef::Oci { .. } => self.digest[m as usize].clone(),
            UrlDef::Http { .. } => self.sha[m as usize].clone(),
        }
    }
}

/// A plugin object as the steps write it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Obj {
    url: u8,
    /// `spec.sha256` pinning this module.
    sha: Option<u8>,
    /// 0 unspecified, 1 IfNotPresent, 2 Always.
    policy: u8,
    fail_open: bool,
    /// `metadata.labels.gen`.
    label: Option<usize>,
}

fn object_json(mods: &Modules, p: u8, o: &Obj) -> Value {
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
enum Step {
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

fn step() -> impl Strategy<Value = Step> {
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
    let duration = prop::sample::select(vec![
        Duration::from_millis(300),
        Duration::from_secs(2),
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
const INITIAL: [(u8, u8); 5] = [(0, 0), (1, 1), (2, 2), (3, 0), (4, 3)];

// ---------------------------------------------------------------------------------------------
// Observations both sides produce

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
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
struct Snapshot {
    now: Duration,
    /// Plugin → `absent`, `deny-all`, `allow-all` or `module <name>@<checksum> from <url>`.
    serving: BTreeMap<String, String>,
    /// (module name, checksum) → (module index, referencing plugins).
    cache: BTreeMap<(String, String), (u8, Vec<String>)>,
    resolutions: BTreeMap<String, (String, String)>,
    /// Host → (manifest, blob, get).
    counts: BTreeMap<String, (u64, u64, u64)>,
    /// The Istio series of behavior.md §8 (the engine's registry starts empty with every life).
    metrics: BTreeMap<&'static str, u64>,
}

const LOOKUP_HIT: &str = r#"istio_agent_wasm_cache_lookup_count{hit="true"}"#;
const LOOKUP_MISS: &str = r#"istio_agent_wasm_cache_lookup_count{hit="false"}"#;
const CACHE_ENTRIES: &str = "istio_agent_wasm_cache_entries";
/// `istio_agent_wasm_remote_fetch_count` by `result`.
const FETCH_SERIES: [(&str, &str); 5] = [
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

fn metric_series() -> Vec<&'static str> {
    let mut v = vec![LOOKUP_HIT, LOOKUP_MISS, CACHE_ENTRIES];
    v.extend(FETCH_SERIES.iter().map(|(_, s)| *s));
    v
}

fn served_text(name: &str, checksum: &str, url: &str) -> String {
    format!("module {name}@{checksum} from {url}")
}

// ---------------------------------------------------------------------------------------------
// The reference model

#[derive(Clone, Debug, PartialEq, Eq)]
enum MServing {
    Nothing,
    Module { key: (String, String), url: String },
    DenyAll,
    AllowAll,
}

#[derive(Clone, Debug)]
struct MPlugin {
    obj: Obj,
    version: u64,
    serving: MServing,
    /// The cache key this plugin protects from expiry (§5).
    referenced: Option<(String, String)>,
    /// The resource version whose pull succeeded (Always bookkeeping, §2).
    pulled: Option<u64>,
    /// (due, delay).
    retry: Option<(Duration, Duration)>,
}

#[derive(Clone, Debug)]
struct MEntry {
    module: u8,
    last_used: Duration,
    refs: BTreeSet<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trig {
    Version,
    Retry(Duration),
}

enum Got {
    Cached((String, String)),
    Revalidated((String, String)),
    Pulled((String, String)),
}

struct Model<'a> {
    mods: &'a Modules,
    now: Duration,
    // World.
    tags: BTreeMap<(&'static str, &'static str), u8>,
    manifests: BTreeSet<(&'static str, u8)>,
    paths: BTreeMap<&'static str, u8>,
    failing: BTreeSet<&'static str>,
    counts: BTreeMap<&'static str, (u64, u64, u64)>,
    // Object source.
    objects: BTreeMap<u8, (Obj, u64)>,
    last_version: u64,
    // Server.
    plugins: BTreeMap<u8, MPlugin>,
    cache: BTreeMap<(String, String), MEntry>,
    resolutions: BTreeMap<String, (String, String)>,
    /// What each plugin last served (url, module): survives restarts with the cache (§7).
    last_served: BTreeMap<u8, (String, (String, String))>,
    next_purge: Duration,
    events: Vec<Ev>,
    /// Counters of this server life (behavior.md §6, §8).
    lookups: (u64, u64),
    fetches: BTreeMap<&'static str, u64>,
}

fn pname(p: u8) -> String {
    format!("default/p{p}")
}

/// Virtual time a request that never connects takes: the backoff between its attempts. Timers
/// have millisecond resolution (tokio's, in the server as on the simulator's paused clock): every
/// wait ends at the next whole millisecond, so the 1.6875 s wait lasts 1.688 s.
fn failed_request_time() -> Duration {
    let (mut total, mut delay) = (0u64, FIRST_BACKOFF_US);
    for _ in 1..ATTEMPTS {
        total += delay.div_ceil(1000) * 1000;
        delay = delay * 3 / 2;
    }
    Duration::from_micros(total)
}

/// The first purge pass strictly after `now` (passes run at multiples of the interval).
fn next_pass(now: Duration) -> Duration {
    let k = now.as_nanos() / PURGE_INTERVAL.as_nanos() + 1;
    PURGE_INTERVAL * k as u32
}

impl<'a> Model<'a> {
    fn new(mods: &'a Modules) -> Self {
        Model {
            mods,
            now: Duration::ZERO,
            tags: BTreeMap::new(),
            manifests: BTreeSet::new(),
            paths: BTreeMap::new(),
            failing: BTreeSet::new(),
            counts: HOSTS.iter().map(|h| (*h, (0, 0, 0))).collect(),
            objects: BTreeMap::new(),
            last_version: 0,
            plugins: BTreeMap::new(),
            cache: BTreeMap::new(),
            resolutions: BTreeMap::new(),
            last_served: BTreeMap::new(),
            next_purge: PURGE_INTERVAL,
            events: Vec::new(),
            lookups: (0, 0),
            fetches: BTreeMap::new(),
        }
    }

    fn publish(&mut self, place: u8, module: u8) {
        match PLACES[place as usize] {
            Place::Tag(repo, tag) => {
                self.tags.insert((repo, tag), module);
                self.manifests.insert((repo, module));
            }
            Place::Path(path) => {
                self.paths.insert(path, module);
            }
        }
    }

    /// §2: (Always?, expected checksum).
    fn policy(&self, o: &Obj) -> (bool, Option<String>) {
        if let Some(m) = o.sha {
            return (false, Some(self.mods.pin(o.url, m)));
        }
        match URLS[o.url as usize] {
            UrlDef::Oci {
                pinned: Some(m), ..
            } => (false, Some(self.mods.digest[m as usize].clone())),
            def => {
                let latest = matches!(
                    def,
                    UrlDef::Oci {
                        tag: Some("latest"),
                        ..
                    }
                );
                (o.policy == 2 || (o.policy == 0 && latest), None)
            }
        }
    }

    fn mutable(url: u8) -> bool {
        !matches!(
            URLS[url as usize],
            UrlDef::Oci {
                pinned: Some(_),
                ..
            }
        )
    }

    /// Marks `p` as served by `new` instead of `old`; what it leaves and what it takes are used now.
    fn set_ref(&mut self, p: u8, old: Option<&(String, String)>, new: Option<&(String, String)>) {
        if let Some(e) = old.and_then(|k| self.cache.get_mut(k)) {
            e.refs.remove(&p);
            e.last_used = self.now;
        }
        if let Some(e) = new.and_then(|k| self.cache.get_mut(k)) {
            e.refs.insert(p);
            e.last_used = self.now;
        }
    }

    /// One request that the host answers, or `None` after all attempts failed to connect.
    fn request(&mut self, host: &'static str, kind: usize) -> Option<()> {
        let c = self.counts.get_mut(host).expect("a known host");
        let slot = match kind {
            0 => &mut c.0,
            1 => &mut c.1,
            _ => &mut c.2,
        };
        if self.failing.contains(host) {
            *slot += u64::from(ATTEMPTS);
            self.now += failed_request_time();
            None
        } else {
            *slot += 1;
            Some(())
        }
    }

    /// §2, §4, §5, §6: what processing `p` gives.
    fn obtain(&mut self, p: u8) -> Result<Got, &'static str> {
        let st = &self.plugins[&p];
        let o = st.obj.clone();
        let (always, expected) = self.policy(&o);
        let must_pull = always && st.pulled != Some(st.version);
        let name = self.mods.module_name(o.url);
        let url = self.mods.url(o.url);
        if !must_pull {
            let candidate = match &expected {
                Some(c) => Some((name.clone(), c.clone())),
                None => self.resolutions.get(&url).cloned(),
            };
            if let Some(k) = candidate.filter(|k| self.cache.contains_key(k)) {
                return Ok(Got::Cached(k));
            }
        }
        match URLS[o.url as usize] {
            UrlDef::Oci { repo, tag, pinned } => {
                self.request(REG, 0).ok_or("manifest_failure")?;
                let module = match pinned {
                    Some(m) => self.manifests.contains(&(repo, m)).then_some(m),
                    None => self.tags.get(&(repo, tag.unwrap_or("latest"))).copied(),
                }
                .ok_or("manifest_failure")?;
                let digest = self.mods.digest[module as usize].clone();
                if expected.as_ref().is_some_and(|e| *e != digest) {
                    return Err("checksum_mismatch");
                }
                let key = (name, digest);
                if self.cache.contains_key(&key) {
                    return Ok(Got::Revalidated(key));
                }
                self.request(REG, 1)
                    .expect("the registry answered the manifest");
                self.cache.insert(
                    key.clone(),
                    MEntry {
                        module,
                        last_used: self.now,
                        refs: BTreeSet::new(),
                    },
                );
                Ok(Got::Pulled(key))
            }
            UrlDef::Http { path } => {
                self.request(FILES, 2).ok_or("download_failure")?;
                let module = *self.paths.get(path).ok_or("download_failure")?;
                let sha = self.mods.sha[module as usize].clone();
                if expected.as_ref().is_some_and(|e| *e != sha) {
                    return Err("checksum_mismatch");
                }
                let key = (name, sha);
                self.cache.entry(key.clone()).or_insert(MEntry {
                    module,
                    last_used: self.now,
                    refs: BTreeSet::new(),
                });
                Ok(Got::Pulled(key))
            }
        }
    }

    fn serving_text(s: &MServing) -> String {
        match s {
            MServing::Nothing => "absent".into(),
            MServing::Module { key, url } => served_text(&key.0, &key.1, url),
            MServing::DenyAll => "deny-all".into(),
            MServing::AllowAll => "allow-all".into(),
        }
    }

    fn set_serving(&mut self, p: u8, serving: MServing) {
        let st = self.plugins.get_mut(&p).expect("a current plugin");
        if st.serving != serving {
            st.serving = serving.clone();
            self.events.push(Ev::Serving {
                at: self.now,
                plugin: pname(p),
                serving: Self::serving_text(&serving),
            });
        }
    }

    fn process(&mut self, p: u8, trig: Trig) {
        let got = self.obtain(p);
        let st = self.plugins[&p].clone();
        let url = self.mods.url(st.obj.url);
        let old = st.referenced.clone();
        let outcome = match got {
            Ok(got) => {
                let (outcome, key) = match got {
                    Got::Cached(k) => ("cached", k),
                    Got::Revalidated(k) => ("revalidated", k),
                    Got::Pulled(k) => ("pulled", k),
                };
                if Self::mutable(st.obj.url) {
                    self.resolutions.insert(url.clone(), key.clone());
                }
                self.cache
                    .get_mut(&key)
                    .expect("obtained modules are cached")
                    .last_used = self.now;
                self.set_ref(p, old.as_ref(), Some(&key));
                self.last_served.insert(p, (url.clone(), key.clone()));
                let st = self.plugins.get_mut(&p).expect("a current plugin");
                st.referenced = Some(key.clone());
                if outcome != "cached" {
                    st.pulled = Some(st.version);
                }
                st.retry = None;
                self.set_serving(p, MServing::Module { key, url });
                outcome.to_string()
            }
            Err(reason) => {
                // §7 (improvement): keep serving the module from the same url while it fits the pin.
                let (_, expected) = self.policy(&st.obj);
                let mut keep = match &st.serving {
                    MServing::Module { key, url: from } => {
                        *from == url && expected.as_ref().is_none_or(|e| *e == key.1)
                    }
                    _ => false,
                };
                // §7 across a restart: serving nothing yet, the plugin keeps what it served before
                // when that came from the same url, is still cached and fits the pin.
                if st.serving == MServing::Nothing {
                    let before = self.last_served.get(&p).cloned().filter(|(from, k)| {
                        *from == url
                            && self.cache.contains_key(k)
                            && expected.as_ref().is_none_or(|e| *e == k.1)
                    });
                    if let Some((from, k)) = before {
                        self.set_ref(p, old.as_ref(), Some(&k));
                        self.plugins
                            .get_mut(&p)
                            .expect("a current plugin")
                            .referenced = Some(k.clone());
                        self.set_serving(p, MServing::Module { key: k, url: from });
                        keep = true;
                    }
                }
                if !keep {
                    self.last_served.remove(&p);
                    // §5: the module the url (or pin) still resolves to stays protected.
                    let resolved = match &expected {
                        Some(e) => Some((self.mods.module_name(st.obj.url), e.clone())),
                        None => self.resolutions.get(&url).cloned(),
                    }
                    .filter(|k| self.cache.contains_key(k));
                    self.set_ref(p, old.as_ref(), resolved.as_ref());
                    self.plugins
                        .get_mut(&p)
                        .expect("a current plugin")
                        .referenced = resolved;
                    self.set_serving(
                        p,
                        if st.obj.fail_open {
                            MServing::AllowAll
                        } else {
                            MServing::DenyAll
                        },
                    );
                }
                let delay = match trig {
                    Trig::Retry(previous) => (previous * 2).min(MAX_RETRY),
                    Trig::Version => FIRST_RETRY,
                };
                let due = self.now + delay;
                self.plugins.get_mut(&p).expect("a current plugin").retry = Some((due, delay));
                self.events.push(Ev::Retry {
                    at: self.now,
                    plugin: pname(p),
                    due,
                });
                format!("rejected/{reason}")
            }
        };
        // §8: one lookup per processing, a hit for cached and revalidated; §6: the fetch result.
        let fetch = match outcome.as_str() {
            "cached" | "revalidated" => {
                self.lookups.0 += 1;
                None
            }
            "pulled" => Some("success"),
            "rejected/download_failure" => Some("download_failure"),
            "rejected/manifest_failure" => Some("manifest_failure"),
            "rejected/checksum_mismatch" => Some("checksum_mismatched"),
            other => panic!("the model does not produce {other}"),
        };
        if let Some(result) = fetch {
            self.lookups.1 += 1;
            *self.fetches.entry(result).or_default() += 1;
        }
        let version = Some(self.plugins[&p].version);
        self.events.push(Ev::Processed {
            at: self.now,
            plugin: pname(p),
            version,
            outcome,
        });
    }

    /// The server learns about a new resource version of `p`.
    fn upsert(&mut self, p: u8) {
        let (obj, version) = self.objects[&p].clone();
        match self.plugins.get_mut(&p) {
            Some(st) if st.version == version => return,
            Some(st) => {
                st.obj = obj;
                st.version = version;
                st.retry = None;
            }
            None => {
                self.plugins.insert(
                    p,
                    MPlugin {
                        obj,
                        version,
                        serving: MServing::Nothing,
                        referenced: None,
                        pulled: None,
                        retry: None,
                    },
                );
            }
        }
        self.process(p, Trig::Version);
    }

    fn purge_pass(&mut self) {
        let at = self.next_purge;
        self.next_purge = at + PURGE_INTERVAL;
        let gone: Vec<(String, String)> = self
            .cache
            .iter()
            .filter(|(_, e)| e.refs.is_empty() && at.saturating_sub(e.last_used) > EXPIRY)
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            self.cache.remove(&k);
            self.resolutions.retain(|_, v| *v != k);
            self.last_served.retain(|_, (_, v)| *v != k);
            self.events.push(Ev::Expired { at, module: k });
        }
    }

    /// Background work due now, in time order; purge passes first at equal times.
    fn run_due(&mut self) {
        loop {
            let retry = self
                .plugins
                .iter()
                .filter_map(|(p, st)| st.retry.map(|(due, _)| (due, *p)))
                .filter(|(due, _)| *due <= self.now)
                .min();
            match retry {
                Some((due, _)) if self.next_purge <= due => self.purge_pass(),
                None if self.next_purge <= self.now => self.purge_pass(),
                Some((_, p)) => {
                    let (_, delay) = self
                        .plugins
                        .get_mut(&p)
                        .and_then(|st| st.retry.take())
                        .expect("due retry");
                    self.process(p, Trig::Retry(delay));
                }
                None => break,
            }
        }
    }

    fn next_deadline(&self) -> Duration {
        self.plugins
            .values()
            .filter_map(|st| st.retry.map(|r| r.0))
            .fold(self.next_purge, Duration::min)
    }

    fn settle(&mut self) {
        while self.next_deadline() <= self.now {
            self.run_due();
        }
    }

    fn step(&mut self, index: usize, s: &Step) {
        match s {
            Step::Apply { p, obj } => {
                self.apply(*p, obj.clone());
            }
            Step::Edit { p } => {
                if let Some((obj, _)) = self.objects.get(p) {
                    let obj = Obj {
                        label: Some(index),
                        ..obj.clone()
                    };
                    self.apply(*p, obj);
                }
            }
            Step::Delete { p } => {
                if self.objects.remove(p).is_some() {
                    self.last_served.remove(p);
                    if let Some(st) = self.plugins.remove(p) {
                        if let Some(key) = &st.referenced {
                            if let Some(e) = self.cache.get_mut(key) {
                                e.refs.remove(p);
                                e.last_used = self.now;
                            }
                        }
                        self.events.push(Ev::Serving {
                            at: self.now,
                            plugin: pname(*p),
                            serving: "absent".into(),
                        });
                    }
                }
            }
            Step::Invalid { p } => {
                let version = self.plugins.get(p).map(|st| st.version);
                self.events.push(Ev::Processed {
                    at: self.now,
                    plugin: pname(*p),
                    version,
                    outcome: "invalid/spec.sha256".into(),
                });
            }
            Step::Publish { place, module } => self.publish(*place, *module),
            Step::Fail { host } => {
                self.failing.insert(HOSTS[*host as usize]);
            }
            Step::Recover { host } => {
                self.failing.remove(HOSTS[*host as usize]);
            }
            Step::Advance(d) => {
                let target = self.now + *d;
                while self.next_deadline() <= target {
                    self.now = self.now.max(self.next_deadline());
                    self.run_due();
                }
                self.now = self.now.max(target);
            }
            Step::Restart { keep_cache } => self.restart(*keep_cache),
        }
        self.settle();
    }

    /// §1, §3: a new resource version exactly when the object differs from the stored one.
    fn apply(&mut self, p: u8, obj: Obj) {
        if self.objects.get(&p).is_some_and(|(cur, _)| *cur == obj) {
            return;
        }
        self.last_version += 1;
        self.objects.insert(p, (obj, self.last_version));
        self.upsert(p);
    }

    /// §5: the cache and the remembered resolutions survive; a module in use at shutdown was used
    /// until then (usage times are kept to the millisecond); every plugin is created again.
    fn restart(&mut self, keep_cache: bool) {
        if keep_cache {
            let now = self.now;
            for e in self.cache.values_mut() {
                let used = if e.refs.is_empty() {
                    e.last_used
                } else {
                    e.last_used.max(now)
                };
                e.last_used = Duration::from_millis(used.as_millis() as u64);
                e.refs.clear();
            }
        } else {
            self.cache.clear();
            self.resolutions.clear();
            self.last_served.clear();
        }
        self.plugins.clear();
        self.lookups = (0, 0);
        self.fetches.clear();
        self.next_purge = next_pass(self.now);
        let keys: Vec<u8> = self.objects.keys().copied().collect();
        for p in keys {
            self.upsert(p);
        }
    }

    fn snapshot(&self) -> Snapshot {
        let mut serving = BTreeMap::new();
        for p in 0..PLUGINS {
            let s = self
                .plugins
                .get(&p)
                .map_or("absent".to_string(), |st| Self::serving_text(&st.serving));
            serving.insert(pname(p), s);
        }
        let mut metrics: BTreeMap<&'static str, u64> = BTreeMap::new();
        metrics.insert(LOOKUP_HIT, self.lookups.0);
        metrics.insert(LOOKUP_MISS, self.lookups.1);
        metrics.insert(CACHE_ENTRIES, self.cache.len() as u64);
        for (result, series) in FETCH_SERIES {
            metrics.insert(series, self.fetches.get(result).copied().unwrap_or(0));
        }
        Snapshot {
            now: self.now,
            serving,
            cache: self
                .cache
                .iter()
                .map(|(k, e)| {
                    (
                        k.clone(),
                        (e.module, e.refs.iter().map(|p| pname(*p)).collect()),
                    )
                })
                .collect(),
            resolutions: self.resolutions.clone(),
            counts: self
                .counts
                .iter()
                .map(|(h, c)| (h.to_string(), *c))
                .collect(),
            metrics,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The real engine

fn key(p: u8) -> ObjectKey {
    ObjectKey::new("default", format!("p{p}"))
}

struct Real<'a> {
    mods: &'a Modules,
    h: Harness,
}

impl<'a> Real<'a> {
    fn new(mods: &'a Modules) -> Self {
        let h = Harness::new();
        let mut r = Real { mods, h };
        for (place, module) in INITIAL {
            r.publish(place, module);
        }
        r
    }

    fn publish(&mut self, place: u8, module: u8) {
        let bytes = &self.mods.bytes[module as usize];
        match PLACES[place as usize] {
            Place::Tag(repo, tag) => {
                let r = OciRef::parse(&format!("{REG}/{repo}:{tag}")).expect("a valid reference");
                let digest = self
                    .h
                    .world
                    .publish_oci(&r, &format!("m{module}"), bytes, FORMAT);
                assert_eq!(
                    digest, self.mods.digest[module as usize],
                    "the digest the model knows"
                );
            }
            Place::Path(path) => self.h.world.publish_http(FILES, path, bytes.clone()),
        }
    }

    /// Runs a step; returns the engine's raw events.
    fn step(&mut self, index: usize, s: &Step) -> Vec<Event> {
        let exists = |h: &Harness, p: u8| h.objects().plugin(&key(p)).is_some();
        match s {
            Step::Apply { p, obj } => {
                self.h.apply(object_json(self.mods, *p, obj));
            }
            Step::Edit { p } => {
                if exists(&self.h, *p) {
                    self.h.edit(
                        &key(*p),
                        json!({"metadata": {"labels": {"gen": index.to_string()}}}),
                    );
                }
            }
            Step::Delete { p } => {
                if exists(&self.h, *p) {
                    self.h.delete_plugin(&key(*p));
                }
            }
            Step::Invalid { p } => {
                let v = plugin(
                    "default",
                    &format!("p{p}"),
                    json!({"url": self.mods.url(0), "sha256": "not-a-sha256"}),
                );
                self.h.apply(v);
            }
            Step::Publish { place, module } => self.publish(*place, *module),
            Step::Fail { host } => {
                let host = HOSTS[*host as usize].to_string();
                self.h.world.add_rule(FailRule {
                    host,
                    kind: KindFilter::Any,
                    mode: FailMode::Unavailable,
                    times: None,
                });
            }
            Step::Recover { host } => {
                self.h.world.recover(HOSTS[*host as usize]);
            }
            Step::Advance(d) => self.h.advance(*d),
            Step::Restart { keep_cache } => self.h.restart(*keep_cache),
        }
        self.h.take_events()
    }

    fn snapshot(&self) -> Snapshot {
        let mut serving = BTreeMap::new();
        for p in 0..PLUGINS {
            let s = match self.h.serving(&key(p)) {
                None | Some(Serving::Nothing) => "absent".to_string(),
                Some(Serving::DenyAll) => "deny-all".to_string(),
                Some(Serving::AllowAll) => "allow-all".to_string(),
                Some(Serving::Module(m)) => match &m.key {
                    Some(k) => served_text(&k.name, &k.checksum, &m.url),
                    None => format!("file module {}", m.path.display()),
                },
            };
            serving.insert(pname(p), s);
        }
        let cache = self
            .h
            .engine()
            .cache()
            .entries()
            .map(|(k, e)| {
                let module = self
                    .mods
                    .by_sha(&e.sha256)
                    .expect("a cached module is one of the world's");
                (
                    (k.name.clone(), k.checksum.clone()),
                    (module, e.refs.iter().map(|r| r.to_string()).collect()),
                )
            })
            .collect();
        let resolutions = self
            .h
            .engine()
            .cache()
            .resolutions()
            .iter()
            .map(|(u, k)| (u.clone(), (k.name.clone(), k.checksum.clone())))
            .collect();
        let counts = HOSTS
            .iter()
            .map(|host| {
                let c = self.h.host_counts(host);
                (host.to_string(), (c.manifest, c.blob, c.get))
            })
            .collect();
        Snapshot {
            now: self.h.now().0,
            serving,
            cache,
            resolutions,
            counts,
            metrics: metric_series()
                .into_iter()
                .map(|m| (m, self.h.metric(m) as u64))
                .collect(),
        }
    }

    /// Invariants checked on the engine alone.
    fn check_invariants(&self) -> Result<(), String> {
        for p in 0..PLUGINS {
            let Some(st) = self.h.engine().plugin(&key(p)) else {
                continue;
            };
            let Serving::Module(m) = &st.serving else {
                continue;
            };
            let k = m.key.as_ref().ok_or("a remote module has a cache key")?;
            // Never purged while served.
            let entry = self
                .h
                .engine()
                .cache()
                .get(k)
                .ok_or_else(|| format!("p{p} serves {k}, which is not cached"))?;
            if !entry.refs.contains(&key(p)) {
                return Err(format!("p{p} serves {k} but is not among its references"));
            }
            // The bytes are what the entry says.
            let bytes = self.h.engine().served_bytes(m).map_err(|e| e.to_string())?;
            if sha256_hex(&bytes) != m.sha256 || entry.sha256 != m.sha256 {
                return Err(format!(
                    "p{p} serves bytes that do not match their recorded sha256"
                ));
            }
            // A pinned plugin never serves anything but its pin.
            if let Some(expected) = &st.decision.expected_checksum {
                if k.checksum != *expected {
                    return Err(format!("p{p} is pinned to {expected} but serves {k}"));
                }
            }
            if k.name
                != self
                    .mods
                    .module_name(url_index(self.mods, &st.plugin.spec.url))
            {
                return Err(format!("p{p} serves {k}, a module of another url"));
            }
        }
        Ok(())
    }
}

fn url_index(mods: &Modules, url: &str) -> u8 {
    (0..URLS.len() as u8)
        .find(|i| mods.url(*i) == url)
        .expect("one of the generated urls")
}

fn to_ev(e: &Event) -> Ev {
    let plugin = |k: &ObjectKey| k.to_string();
    match e {
        Event::Processed {
            at,
            plugin: k,
            version,
            outcome,
            ..
        } => {
            let outcome = match outcome {
                Outcome::Rejected(r) => format!("rejected/{r}"),
                Outcome::Invalid(f) => format!("invalid/{f}"),
                o => o.name().to_string(),
            };
            Ev::Processed {
                at: at.0,
                plugin: plugin(k),
                version: *version,
                outcome,
            }
        }
        Event::ServingChanged {
            at,
            plugin: k,
            serving,
        } => {
            let serving = match serving {
                None | Some(Serving::Nothing) => "absent".to_string(),
                Some(Serving::DenyAll) => "deny-all".to_string(),
                Some(Serving::AllowAll) => "allow-all".to_string(),
                Some(Serving::Module(m)) => match &m.key {
                    Some(key) => served_text(&key.name, &key.checksum, &m.url),
                    None => format!("file module {}", m.path.display()),
                },
            };
            Ev::Serving {
                at: at.0,
                plugin: plugin(k),
                serving,
            }
        }
        Event::Expired { at, module, .. } => Ev::Expired {
            at: at.0,
            module: (module.name.clone(), module.checksum.clone()),
        },
        Event::RetryScheduled { at, plugin: k, due } => Ev::Retry {
            at: at.0,
            plugin: plugin(k),
            due: due.0,
        },
    }
}

/// The first position where two event lists differ, with a few events of context.
fn first_difference<T: std::fmt::Debug + PartialEq>(engine: &[T], model: &[T]) -> String {
    let at = engine
        .iter()
        .zip(model)
        .position(|(a, b)| a != b)
        .unwrap_or(engine.len().min(model.len()));
    let window = |v: &[T]| {
        v.iter()
            .skip(at.saturating_sub(2))
            .take(6)
            .map(|e| format!("  {e:?}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    format!(
        "first difference at event {at} (engine has {}, model {}):\nengine:\n{}\nmodel:\n{}",
        engine.len(),
        model.len(),
        window(engine),
        window(model)
    )
}

/// Runs `steps` through the engine (twice, for determinism) and the model, comparing after each
/// step. Returns a description of the first disagreement.
fn run(steps: &[Step]) -> Result<(), String> {
    let mods = Modules::new();
    let mut real = Real::new(&mods);
    let mut again = Real::new(&mods);
    let mut model = Model::new(&mods);
    for (place, module) in INITIAL {
        model.publish(place, module);
    }
    for (i, s) in steps.iter().enumerate() {
        let raw = real.step(i, s);
        let raw_again = again.step(i, s);
        let debug = |v: &[Event]| v.iter().map(|e| format!("{e:?}")).collect::<Vec<_>>();
        if debug(&raw) != debug(&raw_again) {
            let diff = first_difference(&debug(&raw), &debug(&raw_again));
            return Err(format!(
                "step {i} {s:?}: the same input gave different events\n{diff}"
            ));
        }
        model.step(i, s);
        let want = std::mem::take(&mut model.events);
        let got: Vec<Ev> = raw.iter().map(to_ev).collect();
        if got != want {
            return Err(format!(
                "step {i} {s:?}: events differ\n{}",
                first_difference(&got, &want)
            ));
        }
        let (have, expect) = (real.snapshot(), model.snapshot());
        if have != expect {
            return Err(format!(
                "step {i} {s:?}: state differs\nengine: {have:#?}\nmodel:  {expect:#?}"
            ));
        }
        real.check_invariants()
            .map_err(|e| format!("step {i} {s:?}: {e}"))?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn engine_agrees_with_the_reference_model(steps in prop::collection::vec(step(), 1..40)) {
        if let Err(e) = run(&steps) {
            prop_assert!(false, "{}", e);
        }
    }
}

/// A fixed sequence through the interesting corners (tag moves, Always, a failing registry with
/// retries, expiry, a restart), so the model comparison runs on them every time.
#[test]
fn a_scripted_sequence_agrees_with_the_model() {
    let obj = |url, sha, policy, fail_open| Obj {
        url,
        sha,
        policy,
        fail_open,
        label: None,
    };
    let steps = vec![
        Step::Apply {
            p: 0,
            obj: obj(0, None, 0, false),
        },
        Step::Apply {
            p: 1,
            obj: obj(1, None, 0, true),
        },
        Step::Apply {
            p: 2,
            obj: obj(4, Some(0), 2, false),
        },
        Step::Publish {
            place: 1,
            module: 2,
        },
        Step::Edit { p: 1 },
        Step::Fail { host: 0 },
        Step::Edit { p: 1 },
        Step::Advance(Duration::from_secs(10 * 60)),
        Step::Apply {
            p: 0,
            obj: obj(3, Some(1), 0, false),
        },
        Step::Recover { host: 0 },
        Step::Advance(Duration::from_secs(3600)),
        Step::Delete { p: 1 },
        Step::Advance(Duration::from_secs(25 * 3600)),
        Step::Restart { keep_cache: true },
        Step::Apply {
            p: 1,
            obj: obj(2, None, 0, false),
        },
        Step::Invalid { p: 1 },
        Step::Apply {
            p: 2,
            obj: obj(9, None, 0, false),
        },
        Step::Publish {
            place: 2,
            module: 3,
        },
        Step::Advance(Duration::from_secs(3 * 24 * 3600)),
        Step::Restart { keep_cache: false },
    ];
    run(&steps).unwrap();
}

/// behavior.md §5: "a module that some current plugin still resolves to is never purged". After a
/// restart in which its Always plugin cannot reach the registry (it keeps serving what it served
/// before the restart, §7), the module stays in the cache for as long as the outage lasts.
#[test]
fn a_module_a_failing_plugin_still_resolves_to_is_never_purged() {
    let steps = vec![
        Step::Apply {
            p: 0,
            obj: Obj {
                url: 0,
                sha: None,
                policy: 2,
                fail_open: false,
                label: None,
            },
        },
        Step::Advance(Duration::from_secs(10 * 3600)),
        Step::Fail { host: 0 },
        Step::Restart { keep_cache: true },
        Step::Advance(Duration::from_secs(20 * 3600)),
        Step::Advance(Duration::from_secs(5 * 3600)),
        Step::Recover { host: 0 },
        Step::Advance(Duration::from_secs(3600)),
    ];
    run(&steps).unwrap();
    // The model agreed; check the facts the spec states directly too.
    let mods = Modules::new();
    let mut real = Real::new(&mods);
    let mut expired_at = None;
    for (i, s) in steps.iter().enumerate() {
        for e in real.step(i, s) {
            if let Event::Expired { at, .. } = e {
                expired_at.get_or_insert(at.0);
            }
        }
    }
    assert_eq!(
        expired_at, None,
        "a module its plugin still resolves to was purged"
    );
}

/// A purge pass and a retry due at the same instant: the pass runs first.
#[test]
fn purge_passes_run_before_retries_due_at_the_same_time() {
    let obj = |url, sha| Obj {
        url,
        sha,
        policy: 0,
        fail_open: false,
        label: None,
    };
    let steps = vec![
        Step::Apply {
            p: 0,
            obj: obj(0, None),
        },
        Step::Delete { p: 0 },
        Step::Advance(Duration::from_secs(25 * 3600 - 1)),
        // Rejected at once (the tag holds another image), retried 1 s later: at the pass.
        Step::Apply {
            p: 1,
            obj: obj(0, Some(1)),
        },
        Step::Advance(Duration::from_secs(2)),
    ];
    run(&steps).unwrap();
}
