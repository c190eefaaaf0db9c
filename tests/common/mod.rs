//! A small harness shared by `istio_cache`, `policy_props`, `model_props` and `http_conditional`:
//! the same [`Driver`] as `serve` and `sim` (object source, engine, dispatcher with single flight,
//! published resources), with a [`SimWorld`] as every registry and HTTP host, on tokio's paused
//! clock. Every change runs until the processing it caused has finished, exactly like a scenario
//! step; the engine's state is exposed to the test after every step.
//!
//! Nothing here reads the wall clock: time only moves through [`Harness::advance`] and the virtual
//! time the fetchers spend in backoff.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use wasm_ecds::cache::ModuleKey;
use wasm_ecds::clock::{Clock, PausedClock, Timestamp, TokioClock};
use wasm_ecds::config::Config;
use wasm_ecds::driver::{Applied, Driver, DriverParts};
use wasm_ecds::engine::EngineParts;
use wasm_ecds::engine::{Engine, Event, PluginState, Serving};
use wasm_ecds::fetch::FetchConfig;
use wasm_ecds::metrics::normalize_series;
use wasm_ecds::outcome::Outcome;
use wasm_ecds::plugin::ObjectKey;
use wasm_ecds::sim::world::{RequestCounts, SimWorld};
use wasm_ecds::source::{Change, ObjectStore};
use wasm_ecds::store::{MemFiles, MemStore, ModuleStore};
use wasm_ecds::xds::ResourceStore;

/// The driver, its effects and its simulated world.
pub struct Harness {
    pub clock: Arc<TokioClock>,
    pub world: Arc<SimWorld>,
    pub store: Arc<dyn ModuleStore>,
    pub files: Arc<MemFiles>,
    pub driver: Driver,
    /// Events drained from the driver and not yet taken by the test.
    events: Vec<Event>,
    rt: tokio::runtime::Runtime,
    paused: PausedClock,
}

impl Harness {
    /// A harness over an in-memory module store with default options.
    pub fn new() -> Self {
        Self::with(Config::default(), Arc::new(MemStore::new()), None)
    }

    pub fn with(
        config: Config,
        store: Arc<dyn ModuleStore>,
        fetch_config: Option<FetchConfig>,
    ) -> Self {
        let (rt, paused) = wasm_ecds::clock::paused_runtime().expect("a current-thread runtime");
        let _context = rt.enter();
        let clock = Arc::new(TokioClock::new(Timestamp::ZERO));
        let world = Arc::new(SimWorld::new(clock.clone()));
        let files = Arc::new(MemFiles::default());
        let parts = DriverParts {
            config,
            engine: EngineParts {
                clock: clock.clone(),
                transport: world.clone(),
                store: store.clone(),
                files: files.clone(),
                // As the simulator: exact backoff delays.
                jitter_seed: None,
                fetch_config,
                purge_epoch: Timestamp::ZERO,
            },
            module_endpoint: "http://wasm-ecds.test".into(),
        };
        let (driver, _) = Driver::new(parts).expect("the module store opens");
        drop(_context);
        Harness {
            clock,
            world,
            store,
            files,
            driver,
            events: Vec::new(),
            rt,
            paused,
        }
    }

    /// The runtime and the driver, for tests that drive the loop step by step.
    pub fn parts(&mut self) -> (&tokio::runtime::Runtime, &mut Driver) {
        (&self.rt, &mut self.driver)
    }

    /// The virtual time (read inside the runtime: outside it tokio's clock is the real one).
    pub fn now(&self) -> Timestamp {
        let _context = self.rt.enter();
        self.clock.now()
    }

    pub fn engine(&self) -> &Engine {
        self.driver.engine()
    }

    pub fn objects(&self) -> &ObjectStore {
        self.driver.objects()
    }

    pub fn resources(&self) -> &ResourceStore {
        self.driver.resources()
    }

    fn drain(&mut self) {
        let new = self.driver.take_events();
        self.events.extend(new);
    }

    /// Events since the last call, in the order the engine recorded them.
    pub fn take_events(&mut self) -> Vec<Event> {
        self.drain();
        std::mem::take(&mut self.events)
    }

    /// The outcomes of the processings since the last [`Harness::take_events`], per plugin, in order.
    pub fn outcomes(&mut self) -> Vec<(ObjectKey, Outcome)> {
        self.take_events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Processed {
                    plugin, outcome, ..
                } => Some((plugin, outcome)),
                _ => None,
            })
            .collect()
    }

    /// Makes the objects exactly these (as `serve` does after a rescan or a relist: WasmPlugins,
    /// EnvoyFilters, Secrets, each by key) and runs what that caused.
    pub fn sync(&mut self, plugins: &[Value], envoy_filters: &[Value], secrets: &[Value]) {
        let by_key = |objects: &[Value]| -> BTreeMap<ObjectKey, wasm_ecds::plugin::Object> {
            (objects.iter())
                .map(|o| {
                    let m = &o["metadata"];
                    let ns = m["namespace"].as_str().unwrap_or("default");
                    let key = ObjectKey::new(ns, m["name"].as_str().unwrap_or_default());
                    (key, wasm_ecds::plugin::Object::new(o))
                })
                .collect()
        };
        let (plugins, filters, secrets) = (by_key(plugins), by_key(envoy_filters), by_key(secrets));
        let driver = &mut self.driver;
        self.rt.block_on(async {
            let ticket = driver.sync(&plugins, &filters, &secrets);
            driver
                .run_until_done(&ticket)
                .await
                .expect("the sync settles");
        });
        self.drain();
    }

    /// Applies one object (a WasmPlugin or a Secret) and runs what it caused.
    pub fn apply(&mut self, object: Value) -> Change {
        self.change(|d| Some(d.apply(&object)))
            .expect("apply always applies")
    }

    /// Applies a JSON merge patch to a stored plugin.
    pub fn edit(&mut self, key: &ObjectKey, patch: Value) -> Change {
        self.change(|d| d.edit(key, &patch))
            .expect("edit: the plugin exists")
    }

    pub fn delete_plugin(&mut self, key: &ObjectKey) -> Change {
        self.change(|d| d.delete_plugin(key))
            .expect("delete: the plugin exists")
    }

    pub fn delete_envoy_filter(&mut self, key: &ObjectKey) -> Change {
        self.change(|d| d.delete_envoy_filter(key))
            .expect("delete: the EnvoyFilter exists")
    }

    pub fn delete_secret(&mut self, key: &ObjectKey) -> Change {
        self.change(|d| d.delete_secret(key))
            .expect("delete: the secret exists")
    }

    /// Makes a change and runs until the processing it caused has finished, as a scenario step
    /// does. `None` if the change had nothing to change.
    fn change(&mut self, f: impl FnOnce(&mut Driver) -> Option<Applied>) -> Option<Change> {
        let driver = &mut self.driver;
        let change = self.rt.block_on(async {
            let applied = f(driver)?;
            driver
                .run_until_done(&applied.ticket)
                .await
                .expect("the change settles");
            Some(applied.change)
        });
        self.drain();
        change
    }

    /// Runs background work already due (a processing may have moved the clock past a deadline).
    pub fn settle(&mut self) {
        self.advance(Duration::ZERO);
    }

    /// Moves the clock forward by `d`, running every deadline on the way at its own time.
    pub fn advance(&mut self, d: Duration) {
        let target = self.now() + d;
        let driver = &mut self.driver;
        self.rt
            .block_on(driver.advance_to(target, self.paused))
            .expect("background work settles");
        self.drain();
    }

    /// The server restarts: a new engine over the same module store (wiped unless `keep_cache`), fed
    /// the current secrets and then every current plugin as newly created.
    pub fn restart(&mut self, keep_cache: bool) {
        self.drain();
        let driver = &mut self.driver;
        self.rt.block_on(async {
            let (_, ticket) = driver.restart(keep_cache).expect("restart");
            driver
                .run_until_done(&ticket)
                .await
                .expect("the restart settles");
        });
        self.drain();
    }

    /// Counted requests per host since the start.
    pub fn counts(&self) -> BTreeMap<String, RequestCounts> {
        self.world.counts()
    }

    pub fn host_counts(&self, host: &str) -> RequestCounts {
        self.counts().get(host).copied().unwrap_or_default()
    }

    pub fn plugin(&self, key: &ObjectKey) -> &PluginState {
        self.engine()
            .plugin(key)
            .expect("the engine knows the plugin")
    }

    pub fn serving(&self, key: &ObjectKey) -> Option<&Serving> {
        self.engine().plugin(key).map(|st| &st.serving)
    }

    /// The cache key of the module a plugin serves, if it serves one.
    pub fn served_key(&self, key: &ObjectKey) -> Option<ModuleKey> {
        match self.serving(key) {
            Some(Serving::Module(m)) => m.key.clone(),
            _ => None,
        }
    }

    /// Every cached module, those still being verified since a restart included (whether one is
    /// verified yet depends on the verification threads, not on the test).
    pub fn cached(&self) -> Vec<ModuleKey> {
        self.engine().cache().keys().cloned().collect()
    }

    /// One metric sample (0 when absent), e.g. `istio_agent_wasm_cache_lookup_count{hit="true"}`.
    pub fn metric(&self, series: &str) -> f64 {
        self.engine()
            .metrics()
            .samples()
            .get(&normalize_series(series))
            .copied()
            .unwrap_or(0.0)
    }
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

/// A `WasmPlugin` object. `spec` is merged into `{url}`.
pub fn plugin(namespace: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "extensions.istio.io/v1alpha1",
        "kind": "WasmPlugin",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    })
}

/// A `kubernetes.io/dockerconfigjson` pull secret with credentials for `registry`.
pub fn pull_secret(namespace: &str, name: &str, registry: &str, password: &str) -> Value {
    let config = json!({"auths": {registry: {"username": "user", "password": password}}});
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "type": "kubernetes.io/dockerconfigjson",
        "stringData": {".dockerconfigjson": config.to_string()},
    })
}

/// Hex sha256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    wasm_ecds::store::sha256_hex(bytes)
}
