//! Start-up verification of the cache (behavior.md §5 "Verification at start"): the cached files are
//! hashed on threads while the server already runs, and a module is never served, listed, read or
//! expired before its file verified.
//!
//! The cache lives in a real directory ([`DiskStore`]). To look at the cache while files are still
//! waiting for verification, the store is wrapped in a [`Gated`] one whose reads of module files
//! wait until the test opens the gate: progress, not time, decides what the test sees.

mod common;

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use common::{plugin, sha256_hex, Harness};
use wasm_ecds::cache::{Cache, ModuleKey, ReindexReport};
use wasm_ecds::clock::Timestamp;
use wasm_ecds::config::Config;
use wasm_ecds::engine::Serving;
use wasm_ecds::fetch::StagedModule;
use wasm_ecds::outcome::Outcome;
use wasm_ecds::plugin::ObjectKey;
use wasm_ecds::store::{DiskStore, HookedStore, ModuleStore, StoreHooks};

/// A disk store whose module reads (`open`, `read`: what verification does) wait while its
/// [`Gate`] is closed.
type Gated = HookedStore<Gate>;

fn gated(dir: &Path, threads: usize) -> Arc<Gated> {
    let disk = DiskStore::open(dir)
        .unwrap()
        .with_verify_threads(Some(threads));
    let gate = Gate {
        open: Mutex::new(true),
        changed: Condvar::new(),
    };
    Arc::new(HookedStore::new(Arc::new(disk), gate))
}

struct Gate {
    open: Mutex<bool>,
    changed: Condvar,
}

impl Gate {
    fn set(&self, open: bool) {
        *self.open.lock().unwrap() = open;
        self.changed.notify_all();
    }
}

impl StoreHooks for Gate {
    fn before_read(&self, _path: &Path) {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.changed.wait(open).unwrap();
        }
    }
}

fn wasm(payload: &str) -> Vec<u8> {
    [b"\0asm\x01\0\0\0".as_slice(), payload.as_bytes()].concat()
}

fn staged(store: &dyn ModuleStore, bytes: &[u8]) -> StagedModule {
    StagedModule::of_bytes(store, bytes).unwrap()
}

/// Overwrites a file with as many bytes of garbage: only hashing finds it out.
fn corrupt(path: &Path) {
    let len = std::fs::metadata(path).unwrap().len() as usize;
    std::fs::write(path, vec![0xa5; len]).unwrap();
}

/// A cache of 16 modules (resolved from `http://h/mN.wasm`, last used at time 0) of which 3 are
/// overwritten with garbage of the same size and 1 truncated, plus a stray file. Returns the keys.
fn damaged_cache(dir: &Path) -> Vec<ModuleKey> {
    let store: Arc<dyn ModuleStore> = Arc::new(DiskStore::open(dir).unwrap());
    let (mut cache, _) = Cache::open(store.clone()).unwrap();
    let mut keys = Vec::new();
    for i in 0..16 {
        let bytes = wasm(&format!("module {i} ").repeat(1000));
        let key = ModuleKey::new(format!("http://h/m{i}.wasm"), sha256_hex(&bytes));
        let path = cache
            .insert(&key, staged(store.as_ref(), &bytes), false, Timestamp::ZERO)
            .unwrap()
            .path
            .clone();
        cache.set_resolution(&key.name, &key);
        match i {
            3 | 7 | 11 => corrupt(&path),
            5 => std::fs::write(&path, &bytes[..100]).unwrap(),
            _ => {}
        }
        keys.push(key);
    }
    cache.flush(Timestamp::ZERO);
    let stray = dir.join("deadbeef");
    std::fs::create_dir_all(&stray).unwrap();
    std::fs::write(stray.join("00.wasm"), wasm("stray")).unwrap();
    keys
}

/// The report with its paths relative to `root` (two directories compared).
fn relative(mut report: ReindexReport, root: &Path) -> ReindexReport {
    let root = std::fs::canonicalize(root).unwrap();
    for p in &mut report.removed {
        *p = p.strip_prefix(&root).unwrap().to_path_buf();
    }
    report
}

#[test]
fn verification_on_threads_reports_what_verification_on_one_thread_did() {
    let (one, many) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let keys = damaged_cache(one.path());
    assert_eq!(damaged_cache(many.path()), keys);

    // 0 threads: everything verified on this thread before the cache opens (as before).
    let store = DiskStore::open(one.path())
        .unwrap()
        .with_verify_threads(Some(0));
    let (inline, at_open) = Cache::open(Arc::new(store)).unwrap();
    assert_eq!(at_open.verifying, 0);
    assert_eq!(at_open.kept, 12);
    assert_eq!(at_open.removed.len(), 5, "{at_open:?}");

    let store = DiskStore::open(many.path())
        .unwrap()
        .with_verify_threads(Some(4));
    let (mut threaded, _) = Cache::open(Arc::new(store)).unwrap();
    let report = threaded.wait_verified();
    assert_eq!(relative(report, many.path()), relative(at_open, one.path()));
    let listed = |c: &Cache| c.entries().map(|(k, _)| k.clone()).collect::<Vec<_>>();
    assert_eq!(listed(&threaded), listed(&inline));
    assert_eq!(threaded.resolutions(), inline.resolutions());
    for (i, key) in keys.iter().enumerate() {
        let kept = ![3, 5, 7, 11].contains(&i);
        assert_eq!(threaded.is_verified(key), kept, "m{i}");
        assert_eq!(threaded.resolution(&key.name).is_some(), kept, "m{i}");
    }
}

#[test]
fn a_module_waiting_for_verification_is_neither_served_nor_expired_nor_lost() {
    let dir = tempfile::tempdir().unwrap();
    let keys = damaged_cache(dir.path());
    let (good, bad) = (&keys[0], &keys[3]);
    let store = gated(dir.path(), 2);
    store.hooks().set(false);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _context = runtime.enter();
    let (mut cache, report) = Cache::open(store.clone()).unwrap();
    assert_eq!((report.kept, report.verifying), (15, 15));
    assert_eq!(report.removed.len(), 2, "the truncated and the stray file");

    // Nothing is served, listed or read before it verified...
    let path = cache.get(good).unwrap().path.clone();
    assert!(cache.contains(good) && !cache.is_verified(good));
    assert_eq!(cache.entries().count(), 0);
    assert!(cache.read(good).is_err());
    assert_eq!(cache.key_at(&path), None);
    // ... nor expired, long past its expiry ...
    let day = Duration::from_secs(86400);
    assert!(cache.purge(Timestamp::ZERO + day * 10, day).is_empty());
    assert!(path.exists());
    // ... nor dropped from the index written meanwhile (a crash now loses nothing).
    cache.flush(Timestamp::ZERO + day * 10);
    let index: Value = serde_json::from_slice(&store.load_index().unwrap().unwrap()).unwrap();
    assert_eq!(index["modules"].as_array().unwrap().len(), 15);

    store.hooks().set(true);
    let report = cache.wait_verified();
    assert_eq!((report.kept, report.verifying), (12, 0));
    assert_eq!(report.removed.len(), 5);
    assert!(cache.is_verified(good) && !cache.contains(bad));
    assert_eq!(cache.resolution(&bad.name), None);
    assert!(!report.removed.iter().any(|p| p.exists()));
    // The first pass after verification expires the kept modules, counted once each.
    let gone = cache.purge(Timestamp::ZERO + day * 10, day);
    assert_eq!(gone.len(), 12);
    assert!(!path.exists());
}

#[test]
fn a_corrupt_module_is_never_served_even_to_the_first_plugin_and_is_pulled_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = gated(dir.path(), 1);
    let mut h = Harness::with(Config::default(), store.clone(), None);
    let (a, b) = (wasm("a"), wasm("b"));
    h.world.publish_http("a.test", "/m.wasm", a.clone());
    h.world.publish_http("b.test", "/m.wasm", b.clone());
    let (pa, pb) = (ObjectKey::new("ns", "a"), ObjectKey::new("ns", "b"));
    h.apply(plugin("ns", "a", json!({"url": "http://a.test/m.wasm"})));
    h.apply(plugin("ns", "b", json!({"url": "http://b.test/m.wasm"})));
    let key_a = h.served_key(&pa).unwrap();
    let path_a = h.engine().cache().get(&key_a).unwrap().path.clone();
    corrupt(&path_a);
    let pulls = |h: &Harness, host: &str| h.host_counts(host).get;
    assert_eq!((pulls(&h, "a.test"), pulls(&h, "b.test")), (1, 1));

    h.outcomes();

    // Restart with verification held: both plugins wait for their module; nothing is served.
    store.hooks().set(false);
    let (rt, driver) = h.parts();
    let ticket = rt.block_on(async {
        let (report, ticket) = driver.restart(true).unwrap();
        assert_eq!((report.kept, report.verifying), (2, 2));
        ticket
    });
    for p in [&pa, &pb] {
        assert_eq!(h.serving(p), Some(&Serving::Nothing), "{p}");
    }
    assert!(h.resources().names().is_empty());

    store.hooks().set(true);
    let (rt, driver) = h.parts();
    rt.block_on(driver.run_until_done(&ticket)).unwrap();
    let outcomes: Vec<(ObjectKey, Outcome)> = h.outcomes();
    assert!(
        outcomes.contains(&(pa.clone(), Outcome::Pulled)),
        "{outcomes:?}"
    );
    assert!(
        outcomes.contains(&(pb.clone(), Outcome::Cached)),
        "{outcomes:?}"
    );
    assert_eq!(outcomes.len(), 2, "one processing each: {outcomes:?}");
    assert_eq!((pulls(&h, "a.test"), pulls(&h, "b.test")), (2, 1));
    assert_eq!(h.served_key(&pa), Some(key_a.clone()));
    assert_eq!(std::fs::read(&path_a).unwrap(), a);
    assert_eq!(h.engine().cache().reindex_report().removed, vec![path_a]);
}
