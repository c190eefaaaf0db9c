//! Properties of the pull policy (behavior.md §2), of the engine's pull bookkeeping (§2, §3, §5)
//! and of resource versions (§1, §3), checked with proptest over bounded case counts.
//!
//! - the decision table is total and its precedence is sha256 > digest > explicit > latest tag >
//!   default; an unspecified policy is Always only for an OCI url whose tag is literally `latest`;
//! - a pinned plugin (sha256 or digest) pulls at most once while its module is cached, whatever
//!   metadata edits, pull-secret changes, restarts and time pass;
//! - under Always, one resource version pulls exactly once per server life (re-processing through a
//!   secret change or background work never pulls again) and every new version pulls exactly once
//!   when the source is healthy;
//! - resource versions are monotonic and change exactly when the stored object changes.
//!
//! Length: the policy table, its property tests and their generators belong together.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use serde_json::{json, Map, Value};

use common::{plugin, pull_secret, sha256_hex, Harness};
use wasm_ecds::cache::ModuleKey;
use wasm_ecds::engine::{Event, Serving};
use wasm_ecds::outcome::{Outcome, Reason};
use wasm_ecds::plugin::{ImagePullPolicy, ObjectKey, WasmPluginSpec};
use wasm_ecds::policy::{decide, PolicyRule, PullPolicy};
use wasm_ecds::sim::content::{module_bytes, ImageFormat};
use wasm_ecds::source::{Change, ObjectStore};
use wasm_ecds::url::{ModuleUrl, OciRef};

fn config(cases: u32) -> ProptestConfig {
    // No regression files: the suite must not write into the source tree.
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// The decision table

/// A url as a user writes it, with the facts the policy depends on known independently of the
/// parser under test.
#[derive(Clone, Debug)]
struct GenUrl {
    text: String,
    is_oci: bool,
    tag: Option<String>,
    digest: Option<String>,
}

fn hex64() -> impl Strategy<Value = String> {
    "[0-9a-f]{64}"
}

fn oci_url() -> impl Strategy<Value = GenUrl> {
    let registry = prop::sample::select(vec![
        "reg.example",
        "localhost:5000",
        "docker.io",
        "registry.test:443",
    ]);
    let repo = prop::sample::select(vec!["a", "ns/filter", "latest", "deep/ns/latest-filter"]);
    let tag = prop::option::of(prop::sample::select(vec![
        "latest",
        "Latest",
        "LATEST",
        "latest1",
        "v1",
        "1.0",
        "latest-rc",
        "_latest",
    ]));
    let digest = prop::option::of(hex64());
    (any::<bool>(), registry, repo, tag, digest).prop_map(
        |(scheme, registry, repo, tag, digest)| {
            let mut text = format!("{}{registry}/{repo}", if scheme { "oci://" } else { "" });
            if let Some(t) = tag {
                text.push(':');
                text.push_str(t);
            }
            if let Some(d) = &digest {
                text.push_str("@sha256:");
                text.push_str(d);
            }
            GenUrl {
                text,
                is_oci: true,
                tag: tag.map(str::to_string),
                digest,
            }
        },
    )
}

fn http_url() -> impl Strategy<Value = GenUrl> {
    let scheme = prop::sample::select(vec!["http", "https"]);
    let host = prop::sample::select(vec!["files.example", "latest.example:8080", "127.0.0.1"]);
    let path = prop::sample::select(vec![
        "/a.wasm",
        "/latest",
        "/m.wasm:latest",
        "/latest/plugin.wasm?tag=latest",
        "",
    ]);
    (scheme, host, path).prop_map(|(s, h, p)| GenUrl {
        text: format!("{s}://{h}{p}"),
        is_oci: false,
        tag: None,
        digest: None,
    })
}

fn any_url() -> impl Strategy<Value = GenUrl> {
    prop_oneof![oci_url(), http_url()]
}

fn any_policy() -> impl Strategy<Value = ImagePullPolicy> {
    prop::sample::select(vec![
        ImagePullPolicy::Unspecified,
        ImagePullPolicy::IfNotPresent,
        ImagePullPolicy::Always,
    ])
}

/// The reference table of behavior.md §2, written out rule by rule.
fn reference_decision(
    url: &GenUrl,
    sha: &Option<String>,
    policy: ImagePullPolicy,
) -> (PullPolicy, PolicyRule, Option<String>) {
    if let Some(s) = sha {
        return (
            PullPolicy::IfNotPresent,
            PolicyRule::Sha256,
            Some(s.clone()),
        );
    }
    if url.is_oci {
        if let Some(d) = &url.digest {
            return (
                PullPolicy::IfNotPresent,
                PolicyRule::Digest,
                Some(d.clone()),
            );
        }
    }
    match policy {
        ImagePullPolicy::Always => (PullPolicy::Always, PolicyRule::Explicit, None),
        ImagePullPolicy::IfNotPresent => (PullPolicy::IfNotPresent, PolicyRule::Explicit, None),
        ImagePullPolicy::Unspecified if url.is_oci && url.tag.as_deref() == Some("latest") => {
            (PullPolicy::Always, PolicyRule::LatestTag, None)
        }
        ImagePullPolicy::Unspecified => (PullPolicy::IfNotPresent, PolicyRule::Default, None),
    }
}

fn spec(url: &GenUrl, sha: &Option<String>, policy: ImagePullPolicy) -> WasmPluginSpec {
    WasmPluginSpec {
        url: url.text.clone(),
        sha256: sha.clone(),
        image_pull_policy: policy,
        ..Default::default()
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// Every combination gets exactly the decision of the first applicable rule.
    #[test]
    fn decision_table_is_total_and_ordered(url in any_url(), sha in prop::option::of(hex64()), policy in any_policy()) {
        let parsed = ModuleUrl::parse(&url.text).expect("generated urls are valid");
        let d = decide(&spec(&url, &sha, policy), &parsed);
        prop_assert_eq!((d.policy, d.rule, d.expected_checksum.clone()), reference_decision(&url, &sha, policy), "url {}", url.text);
        prop_assert_ne!(d.policy, PullPolicy::None, "only file:// urls have no policy");
        prop_assert!(!d.explanation().is_empty());
    }

    /// With no pin and no explicit policy, Always exactly for an OCI url tagged `latest`.
    #[test]
    fn unspecified_policy_is_always_only_for_oci_latest(url in any_url()) {
        let parsed = ModuleUrl::parse(&url.text).expect("generated urls are valid");
        let d = decide(&spec(&url, &None, ImagePullPolicy::Unspecified), &parsed);
        let latest = url.is_oci && url.digest.is_none() && url.tag.as_deref() == Some("latest");
        prop_assert_eq!(d.policy == PullPolicy::Always, latest, "url {}", url.text);
    }

    /// A pin wins over every policy: pinned plugins are IfNotPresent with the pin as checksum.
    #[test]
    fn pins_override_every_policy(url in any_url(), sha in hex64(), policy in any_policy()) {
        let parsed = ModuleUrl::parse(&url.text).expect("generated urls are valid");
        let d = decide(&spec(&url, &Some(sha.clone()), policy), &parsed);
        prop_assert_eq!((d.policy, d.expected_checksum), (PullPolicy::IfNotPresent, Some(sha)));
    }
}

// ---------------------------------------------------------------------------------------------
// Engine properties

const REG: &str = "reg.example";
const FILES: &str = "files.example";
const HTTP_PATH: &str = "/m.wasm";
const FORMAT: ImageFormat = ImageFormat::OciArtifact;

fn key() -> ObjectKey {
    ObjectKey::new("default", "p")
}

fn secret_key() -> ObjectKey {
    ObjectKey::new("default", "pull")
}

fn oci(url: &str) -> OciRef {
    OciRef::parse(url.trim_start_matches("oci://")).expect("a valid reference")
}

/// Publishes module `m<n>` at an OCI reference; returns its manifest digest.
fn publish_oci(h: &Harness, url: &str, n: u8) -> String {
    let name = format!("m{n}");
    h.world
        .publish_oci(&oci(url), &name, &module_bytes(&name, None, false), FORMAT)
}

fn publish_http(h: &Harness, n: u8) -> String {
    let bytes = module_bytes(&format!("m{n}"), None, false);
    h.world.publish_http(FILES, HTTP_PATH, bytes.clone());
    sha256_hex(&bytes)
}

/// Steps that never change a pinned plugin's module.
#[derive(Clone, Debug)]
enum Step {
    /// A metadata-only change (labels).
    Label(u8),
    /// A metadata-only change (annotations).
    Annotate(u8),
    /// A spec change that keeps the url and pin.
    PluginConfig(u8),
    /// Sets `imagePullPolicy` (a pin overrides it).
    Policy(ImagePullPolicy),
    /// Applies the pull secret with this password (a change when the password differs).
    Secret(u8),
    DeleteSecret,
    /// Re-applies the stored object unchanged.
    Reapply,
    /// Moves the tag (and the http body) to module `m<n>`: a registry-side event, not a change.
    Publish(u8),
    Advance(Duration),
    Restart,
}

fn step() -> impl Strategy<Value = Step> {
    let duration = prop::sample::select(vec![
        Duration::from_millis(500),
        Duration::from_secs(3),
        Duration::from_secs(90),
        Duration::from_secs(3600),
        Duration::from_secs(7 * 3600),
        Duration::from_secs(30 * 3600),
    ]);
    prop_oneof![
        (0u8..4).prop_map(Step::Label),
        (0u8..4).prop_map(Step::Annotate),
        (0u8..4).prop_map(Step::PluginConfig),
        any_policy().prop_map(Step::Policy),
        (0u8..3).prop_map(Step::Secret),
        Just(Step::DeleteSecret),
        Just(Step::Reapply),
        (1u8..4).prop_map(Step::Publish),
        duration.prop_map(Step::Advance),
        Just(Step::Restart),
    ]
}

/// Runs one step; returns true when the step made a new server life (a restart).
fn run_step(h: &mut Harness, s: &Step, tag_url: &str) -> bool {
    let k = key();
    match s {
        Step::Label(n) => {
            h.edit(&k, json!({"metadata": {"labels": {"gen": n.to_string()}}}));
        }
        Step::Annotate(n) => {
            h.edit(
                &k,
                json!({"metadata": {"annotations": {"note": format!("n{n}")}}}),
            );
        }
        Step::PluginConfig(n) => {
            h.edit(&k, json!({"spec": {"pluginConfig": {"n": n}}}));
        }
        Step::Policy(p) => {
            let v = match p {
                ImagePullPolicy::Unspecified => Value::Null,
                ImagePullPolicy::IfNotPresent => json!("IfNotPresent"),
                ImagePullPolicy::Always => json!("Always"),
            };
            h.edit(&k, json!({"spec": {"imagePullPolicy": v}}));
        }
        Step::Secret(n) => {
            h.apply(pull_secret(
                "default",
                "pull",
                "elsewhere.example",
                &format!("pw{n}"),
            ));
        }
        Step::DeleteSecret => {
            if h.objects().secrets().contains_key(&secret_key()) {
                h.delete_secret(&secret_key());
            }
        }
        Step::Reapply => {
            let object = h
                .objects()
                .plugin(&k)
                .expect("the plugin exists")
                .plugin
                .object
                .value();
            let change = h.apply(object);
            assert_eq!(change, Change::Unchanged(k));
        }
        Step::Publish(n) => {
            publish_oci(h, tag_url, *n);
            publish_http(h, *n);
        }
        Step::Advance(d) => h.advance(*d),
        Step::Restart => {
            h.restart(true);
            return true;
        }
    }
    false
}

/// How a plugin is pinned.
#[derive(Clone, Copy, Debug)]
enum Pin {
    /// `oci://…@sha256:<digest>`.
    Digest,
    /// A tagged OCI url and `spec.sha256` = the manifest digest.
    TagAndSha(bool),
    /// An http url and `spec.sha256` = the module's sha256.
    HttpSha,
}

fn pin() -> impl Strategy<Value = Pin> {
    prop_oneof![
        Just(Pin::Digest),
        any::<bool>().prop_map(Pin::TagAndSha),
        Just(Pin::HttpSha)
    ]
}

proptest! {
    #![proptest_config(config(64))]

    /// behavior.md §2 rules 1–2 and §5: a pinned plugin is pulled at most once while its module is
    /// cached; no edit, secret change, registry-side change, restart or passing time pulls it again.
    #[test]
    fn pinned_plugin_pulls_at_most_once(
        pin in pin(),
        policy in any_policy(),
        names_secret in any::<bool>(),
        secret_first in any::<bool>(),
        steps in prop::collection::vec(step(), 1..20),
    ) {
        let mut h = Harness::new();
        let tag_url = if matches!(pin, Pin::TagAndSha(true)) { "oci://reg.example/a:latest" } else { "oci://reg.example/a:v1" };
        let digest = publish_oci(&h, tag_url, 1);
        let http_sum = publish_http(&h, 1);
        let (url, sha) = match pin {
            Pin::Digest => (format!("oci://reg.example/a@sha256:{digest}"), None),
            Pin::TagAndSha(_) => (tag_url.to_string(), Some(digest.clone())),
            Pin::HttpSha => (format!("http://{FILES}{HTTP_PATH}"), Some(http_sum.clone())),
        };
        let pinned_sha256 = match pin {
            Pin::HttpSha => http_sum.clone(),
            _ => sha256_hex(&module_bytes("m1", None, false)),
        };
        if secret_first {
            h.apply(pull_secret("default", "pull", "elsewhere.example", "pw0"));
        }
        let mut spec = Map::new();
        spec.insert("url".into(), json!(url));
        if let Some(s) = sha {
            spec.insert("sha256".into(), json!(s));
        }
        match policy {
            ImagePullPolicy::Unspecified => {}
            ImagePullPolicy::IfNotPresent => { spec.insert("imagePullPolicy".into(), json!("IfNotPresent")); }
            ImagePullPolicy::Always => { spec.insert("imagePullPolicy".into(), json!("Always")); }
        }
        if names_secret {
            spec.insert("imagePullSecret".into(), json!("pull"));
        }
        h.apply(plugin("default", "p", Value::Object(spec)));
        let pinned_key = match pin {
            Pin::HttpSha => ModuleKey::new(format!("http://{FILES}{HTTP_PATH}"), &http_sum),
            _ => ModuleKey::new("oci://reg.example/a", &digest),
        };
        // Request counts when the module was first seen in the cache: from then on, none.
        let mut cached_at = None;
        let mut pulls = 0;
        for s in std::iter::once(None).chain(steps.iter().map(Some)) {
            if let Some(s) = s {
                run_step(&mut h, s, tag_url);
            }
            pulls += h.take_events().into_iter().filter(|e| matches!(e, Event::Processed { outcome: Outcome::Pulled, .. })).count();
            prop_assert!(pulls <= 1, "pulled {} times (last step {:?})", pulls, s);
            // Whatever it serves is the pinned module.
            if let Some(Serving::Module(m)) = h.serving(&key()) {
                prop_assert_eq!(&m.sha256, &pinned_sha256);
                prop_assert_eq!(m.key.as_ref(), Some(&pinned_key));
            }
            if h.engine().cache().contains(&pinned_key) {
                let counts = h.counts();
                match &cached_at {
                    None => cached_at = Some(counts),
                    Some(before) => prop_assert_eq!(before, &counts, "requests after {:?} while the module is cached", s),
                }
            }
        }
        // Once it pulled, and the secret it names exists (or it names none), it serves its module.
        let secret_ok = !names_secret || h.objects().secrets().contains_key(&secret_key());
        if pulls == 1 && secret_ok {
            prop_assert_eq!(h.served_key(&key()), Some(pinned_key));
        }
    }
}

/// An Always plugin: an OCI tag with explicit Always, the `latest` tag with no policy, or http with
/// explicit Always.
#[derive(Clone, Copy, Debug)]
enum AlwaysUrl {
    OciTag,
    OciLatest,
    Http,
}

fn always_url() -> impl Strategy<Value = AlwaysUrl> {
    prop::sample::select(vec![
        AlwaysUrl::OciTag,
        AlwaysUrl::OciLatest,
        AlwaysUrl::Http,
    ])
}

/// Steps for the Always property: no secret deletion (the source stays healthy) and no policy edit
/// (the plugin stays Always).
fn always_step() -> impl Strategy<Value = Step> {
    step().prop_filter("healthy, still Always", |s| {
        !matches!(s, Step::DeleteSecret | Step::Policy(_))
    })
}

proptest! {
    #![proptest_config(config(64))]

    /// behavior.md §2 (Always) and §3: every new resource version pulls exactly once; processing the
    /// same version again (a secret change, background work) never pulls; a restart is a new life in
    /// which every plugin is created again.
    #[test]
    fn always_pulls_once_per_resource_version(
        which in always_url(),
        steps in prop::collection::vec(always_step(), 1..25),
    ) {
        let mut h = Harness::new();
        let tag_url = match which { AlwaysUrl::OciLatest => "oci://reg.example/a:latest", _ => "oci://reg.example/a:v1" };
        publish_oci(&h, tag_url, 1);
        publish_http(&h, 1);
        h.apply(pull_secret("default", "pull", "elsewhere.example", "pw0"));
        let spec = match which {
            AlwaysUrl::OciTag => json!({"url": tag_url, "imagePullPolicy": "Always", "imagePullSecret": "pull"}),
            AlwaysUrl::OciLatest => json!({"url": tag_url, "imagePullSecret": "pull"}),
            AlwaysUrl::Http => json!({"url": format!("http://{FILES}{HTTP_PATH}"), "imagePullPolicy": "Always", "imagePullSecret": "pull"}),
        };
        h.apply(plugin("default", "p", spec));
        // (life, resource version) → successful pulls (pulled or revalidated) and processings.
        let mut pulls: BTreeMap<(u32, u64), (u32, u32)> = BTreeMap::new();
        let mut life = 0u32;
        let mut published = 1u8;
        let mut record = |life: u32, events: Vec<Event>| -> Vec<Outcome> {
            let mut out = Vec::new();
            for e in events {
                if let Event::Processed { version: Some(v), outcome, .. } = e {
                    let entry = pulls.entry((life, v)).or_default();
                    entry.1 += 1;
                    if matches!(outcome, Outcome::Pulled | Outcome::Revalidated) {
                        entry.0 += 1;
                    }
                    out.push(outcome);
                }
            }
            out
        };
        let first = record(life, h.take_events());
        prop_assert_eq!(first.len(), 1);
        for s in &steps {
            let version_before = h.plugin(&key()).version;
            let restarted = run_step(&mut h, s, tag_url);
            if restarted {
                life += 1;
            }
            if let Step::Publish(n) = s {
                published = *n;
            }
            let outcomes = record(life, h.take_events());
            prop_assert!(outcomes.iter().all(|o| !matches!(o, Outcome::Rejected(_) | Outcome::Invalid(_))), "{:?}", outcomes);
            let version = h.plugin(&key()).version;
            if version != version_before || restarted {
                // A change (or a new life): the module now served is what the source holds now.
                let want = sha256_hex(&module_bytes(&format!("m{published}"), None, false));
                match h.serving(&key()) {
                    Some(Serving::Module(m)) => prop_assert_eq!(&m.sha256, &want, "after {:?}", s),
                    other => prop_assert!(false, "serves {:?} after {:?}", other, s),
                }
            }
        }
        for ((life, v), (ok, processed)) in &pulls {
            prop_assert_eq!(*ok, 1, "life {} version {}: {} successful pulls in {} processings", life, v, ok, processed);
        }
        // One source request per pull: a manifest for OCI, a GET for http.
        let versions = pulls.len() as u64;
        match which {
            AlwaysUrl::Http => prop_assert_eq!(h.host_counts(FILES).get, versions),
            _ => prop_assert_eq!(h.host_counts(REG).manifest, versions),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Resource versions

/// What a test applies to the object store.
#[derive(Clone, Debug)]
enum SourceOp {
    /// A full object: plugin `name` with url variant `url` and optional label.
    Apply {
        name: u8,
        url: u8,
        label: Option<u8>,
    },
    /// A merge patch setting (or, with `None`, removing) label `k`.
    Label {
        name: u8,
        k: u8,
        v: Option<u8>,
    },
    /// A merge patch setting the url.
    Url {
        name: u8,
        url: u8,
    },
    /// An object that fails validation (a malformed sha256).
    Invalid {
        name: u8,
    },
    /// A patch that makes the stored object invalid.
    InvalidEdit {
        name: u8,
    },
    Delete {
        name: u8,
    },
}

fn source_op() -> impl Strategy<Value = SourceOp> {
    let name = 0u8..3;
    prop_oneof![
        (name.clone(), 0u8..3, prop::option::of(0u8..2))
            .prop_map(|(name, url, label)| SourceOp::Apply { name, url, label }),
        (name.clone(), 0u8..2, prop::option::of(0u8..2)).prop_map(|(name, k, v)| SourceOp::Label {
            name,
            k,
            v
        }),
        (name.clone(), 0u8..3).prop_map(|(name, url)| SourceOp::Url { name, url }),
        name.clone().prop_map(|name| SourceOp::Invalid { name }),
        name.clone().prop_map(|name| SourceOp::InvalidEdit { name }),
        name.prop_map(|name| SourceOp::Delete { name }),
    ]
}

/// `metadata.labels` of a stored object, if it has the field.
type Labels = Option<BTreeMap<String, String>>;

fn url_variant(n: u8) -> String {
    [
        "oci://reg.example/a:v1",
        "oci://reg.example/a:latest",
        "http://files.example/m.wasm",
    ][n as usize % 3]
        .to_string()
}

/// The stored object the model expects, built field by field.
fn model_object(name: u8, url: &str, labels: Option<&BTreeMap<String, String>>) -> Value {
    let mut meta = Map::new();
    meta.insert("name".into(), json!(format!("p{name}")));
    meta.insert("namespace".into(), json!("default"));
    if let Some(l) = labels {
        meta.insert(
            "labels".into(),
            Value::Object(l.iter().map(|(k, v)| (k.clone(), json!(v))).collect()),
        );
    }
    json!({"apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin", "metadata": meta, "spec": {"url": url}})
}

proptest! {
    #![proptest_config(config(256))]

    /// behavior.md §1: every accepted change (spec or metadata) gets a new, larger resource version;
    /// an identical object, a refused object and an edit that leaves the object as it was do not.
    #[test]
    fn resource_versions_are_monotonic_and_change_iff_the_object_changes(ops in prop::collection::vec(source_op(), 1..40)) {
        let mut store = ObjectStore::new();
        // The model: name → (url, labels) and the version the store gave it.
        let mut model: BTreeMap<u8, (String, Labels, u64)> = BTreeMap::new();
        let mut highest = 0u64;
        for op in &ops {
            let name = match op {
                SourceOp::Apply { name, .. } | SourceOp::Label { name, .. } | SourceOp::Url { name, .. }
                | SourceOp::Invalid { name } | SourceOp::InvalidEdit { name } | SourceOp::Delete { name } => *name,
            };
            let key = ObjectKey::new("default", format!("p{name}"));
            let before = model.get(&name).cloned();
            // The object the op asks for, per the model (None: no object after the op).
            let (change, wanted): (Option<Change>, Option<(String, Labels)>) = match op {
                SourceOp::Apply { url, label, .. } => {
                    let labels = label.map(|l| BTreeMap::from([("l".to_string(), format!("v{l}"))]));
                    let obj = model_object(name, &url_variant(*url), labels.as_ref());
                    (Some(store.apply_value(obj)), Some((url_variant(*url), labels)))
                }
                SourceOp::Label { k, v, .. } => {
                    let patch = json!({"metadata": {"labels": {format!("k{k}"): v.map(|v| format!("v{v}"))}}});
                    let wanted = before.clone().map(|(url, labels, _)| {
                        let mut labels = labels.unwrap_or_default();
                        match v {
                            Some(v) => { labels.insert(format!("k{k}"), format!("v{v}")); }
                            None => { labels.remove(&format!("k{k}")); }
                        }
                        (url, Some(labels))
                    });
                    (store.edit_plugin(&key, &patch), wanted)
                }
                SourceOp::Url { url, .. } => {
                    let wanted = before.clone().map(|(_, labels, _)| (url_variant(*url), labels));
                    (store.edit_plugin(&key, &json!({"spec": {"url": url_variant(*url)}})), wanted)
                }
                SourceOp::Invalid { .. } => {
                    let obj = plugin("default", &format!("p{name}"), json!({"url": "oci://reg.example/a:v1", "sha256": "nope"}));
                    (Some(store.apply_value(obj)), before.clone().map(|(u, l, _)| (u, l)))
                }
                SourceOp::InvalidEdit { .. } => {
                    (store.edit_plugin(&key, &json!({"spec": {"url": "ftp://nope"}})), before.clone().map(|(u, l, _)| (u, l)))
                }
                SourceOp::Delete { .. } => (store.delete_plugin(&key), None),
            };
            let stored = store.plugin(&key).cloned();
            match (&before, &wanted, &change) {
                // Refused: nothing changed.
                (_, _, Some(Change::Refused { error, .. })) => {
                    prop_assert!(matches!(op, SourceOp::Invalid { .. } | SourceOp::InvalidEdit { .. }), "{:?} refused: {:?}", op, error);
                    prop_assert_eq!(stored.map(|s| s.version), before.as_ref().map(|b| b.2));
                }
                (None, None, c) => {
                    prop_assert!(c.is_none(), "{:?} on a missing object gave {:?}", op, c);
                    prop_assert!(stored.is_none());
                }
                (Some(_), None, c) => {
                    prop_assert_eq!(c.clone(), Some(Change::PluginDeleted(key.clone())));
                    prop_assert!(stored.is_none());
                    model.remove(&name);
                }
                (b, Some((url, labels)), c) => {
                    let stored = stored.expect("an accepted object is stored");
                    prop_assert_eq!(stored.plugin.object.value(), model_object(name, url, labels.as_ref()));
                    let same = b.as_ref().is_some_and(|(bu, bl, _)| bu == url && bl == labels);
                    if same {
                        prop_assert_eq!(c.clone(), Some(Change::Unchanged(key.clone())));
                        prop_assert_eq!(stored.version, b.as_ref().unwrap().2);
                    } else {
                        let want = if b.is_some() { Change::PluginChanged(key.clone()) } else { Change::PluginCreated(key.clone()) };
                        prop_assert_eq!(c.clone(), Some(want));
                        prop_assert!(stored.version > highest, "version {} after {}", stored.version, highest);
                        highest = stored.version;
                    }
                    model.insert(name, (url.clone(), labels.clone(), stored.version));
                }
            }
            // Other objects keep their versions.
            for (n, (_, _, v)) in &model {
                let k = ObjectKey::new("default", format!("p{n}"));
                prop_assert_eq!(store.plugin(&k).map(|s| s.version), Some(*v));
            }
            prop_assert_eq!(store.plugins().len(), model.len());
        }
    }
}

/// A missing pull secret rejects a pinned plugin without a request (sanity check of the secret
/// steps used above).
#[test]
fn missing_secret_rejects_without_requests() {
    let mut h = Harness::new();
    let digest = publish_oci(&h, "oci://reg.example/a:v1", 1);
    h.apply(plugin(
        "default",
        "p",
        json!({"url": format!("oci://reg.example/a@sha256:{digest}"), "imagePullSecret": "pull"}),
    ));
    assert_eq!(
        h.outcomes(),
        vec![(key(), Outcome::Rejected(Reason::MissingSecret))]
    );
    assert_eq!(h.host_counts(REG).total(), 0);
}
