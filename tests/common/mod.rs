//! A small harness shared by `istio_cache`, `policy_props` and `model_props`: the real [`Engine`]
//! fed by an [`ObjectStore`], with a [`SimWorld`] as every registry and HTTP host, on a
//! [`ManualClock`]. It drives them the way `sim/runner.rs` does (source changes are handed to the
//! engine as they happen, background work runs at its own virtual time, a restart builds a new engine
//! over the same module store), but exposes the engine's state to the test after every step.
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
use wasm_ecds::clock::{Clock, ManualClock, Timestamp};
use wasm_ecds::config::Config;
use wasm_ecds::engine::{Engine, EngineParts, Event, PluginState, Serving};
use wasm_ecds::fetch::FetchConfig;
use wasm_ecds::metrics::normalize_series;
use wasm_ecds::outcome::Outcome;
use wasm_ecds::plugin::ObjectKey;
use wasm_ecds::sim::world::{RequestCounts, SimWorld};
use wasm_ecds::source::{Change, ObjectStore};
use wasm_ecds::store::{MemFiles, MemStore, ModuleStore};

/// A guard against background work that never settles (a bug, not a slow test).
const MAX_ROUNDS: usize = 1_000_000;

/// The engine, its object source and its simulated world.
pub struct Harness {
    pub clock: Arc<ManualClock>,
    pub world: Arc<SimWorld>,
    pub store: Arc<dyn ModuleStore>,
    pub files: Arc<MemFiles>,
    pub objects: ObjectStore,
    pub engine: Engine,
    pub config: Config,
    pub fetch_config: Option<FetchConfig>,
    /// Events drained from the engine and not yet taken by the test.
    events: Vec<Event>,
    rt: tokio::runtime::Runtime,
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
        let clock = Arc::new(ManualClock::new(Timestamp::ZERO));
        let world = Arc::new(SimWorld::new(clock.clone()));
        let files = Arc::new(MemFiles::default());
        let engine = build_engine(
            &config,
            &clock,
            &world,
            &store,
            &files,
            fetch_config.clone(),
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime");
        Harness {
            clock,
            world,
            store,
            files,
            objects: ObjectStore::new(),
            engine,
            config,
            fetch_config,
            events: Vec::new(),
            rt,
        }
    }

    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    fn drain(&mut self) {
        let new = self.engine.take_events();
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

    /// Applies one object (a WasmPlugin or a Secret) and hands the change to the engine.
    pub fn apply(&mut self, object: Value) -> Change {
        let change = self.objects.apply_value(object);
        self.handle(change.clone());
        change
    }

    /// Applies a JSON merge patch to a stored plugin.
    pub fn edit(&mut self, key: &ObjectKey, patch: Value) -> Change {
        let change = self
            .objects
            .edit_plugin(key, &patch)
            .expect("edit: the plugin exists");
        self.handle(change.clone());
        change
    }

    pub fn delete_plugin(&mut self, key: &ObjectKey) -> Change {
        let change = self
            .objects
            .delete_plugin(key)
            .expect("delete: the plugin exists");
        self.handle(change.clone());
        change
    }

    pub fn delete_secret(&mut self, key: &ObjectKey) -> Change {
        let change = self
            .objects
            .delete_secret(key)
            .expect("delete: the secret exists");
        self.handle(change.clone());
        change
    }

    /// What the simulator runner does with a source change, then the background work it made due.
    fn handle(&mut self, change: Change) {
        let objects = &self.objects;
        let engine = &mut self.engine;
        self.rt.block_on(async {
            match change {
                Change::PluginCreated(k) | Change::PluginChanged(k) => {
                    let vp = objects.plugin(&k).cloned().expect("a stored plugin");
                    engine.upsert_plugin(&vp).await;
                }
                Change::PluginDeleted(k) => engine.remove_plugin(&k),
                Change::SecretApplied(k) => {
                    let secret = objects.secrets().get(&k).cloned().expect("a stored secret");
                    engine.upsert_secret(secret).await;
                }
                Change::SecretDeleted(k) => engine.remove_secret(&k).await,
                Change::Unchanged(_) => {}
                Change::Refused {
                    key: Some(k),
                    is_plugin: true,
                    error,
                } => engine.record_invalid(&k, &error.field, &error.message),
                Change::Refused { .. } => {}
            }
        });
        self.drain();
        self.settle();
    }

    /// Runs background work already due (a processing may have moved the clock past a deadline).
    pub fn settle(&mut self) {
        let mut rounds = 0;
        while self.engine.next_deadline() <= self.now() {
            self.rt.block_on(self.engine.run_due());
            self.drain();
            rounds += 1;
            assert!(rounds < MAX_ROUNDS, "background work does not settle");
        }
    }

    /// Moves the clock forward by `d`, running every deadline on the way at its own time.
    pub fn advance(&mut self, d: Duration) {
        let target = self.now() + d;
        let mut rounds = 0;
        loop {
            let deadline = self.engine.next_deadline();
            if deadline > target {
                break;
            }
            self.clock.set(deadline);
            self.rt.block_on(self.engine.run_due());
            self.drain();
            rounds += 1;
            assert!(
                rounds < MAX_ROUNDS,
                "too many background deadlines in one advance"
            );
        }
        self.clock.set(target);
    }

    /// The server restarts: a new engine over the same module store (wiped unless `keep_cache`), fed
    /// the current secrets and then every current plugin as newly created.
    pub fn restart(&mut self, keep_cache: bool) {
        self.drain();
        self.engine.flush();
        if !keep_cache {
            self.store.wipe().expect("wipe the module store");
        }
        self.engine = build_engine(
            &self.config,
            &self.clock,
            &self.world,
            &self.store,
            &self.files,
            self.fetch_config.clone(),
        );
        let secrets: Vec<_> = self.objects.secrets().values().cloned().collect();
        let plugins: Vec<_> = self.objects.plugins().values().cloned().collect();
        let engine = &mut self.engine;
        self.rt.block_on(async {
            for s in secrets {
                engine.upsert_secret(s).await;
            }
            for vp in &plugins {
                engine.upsert_plugin(vp).await;
            }
        });
        self.drain();
        self.settle();
    }

    /// Counted requests per host since the start.
    pub fn counts(&self) -> BTreeMap<String, RequestCounts> {
        self.world.counts()
    }

    pub fn host_counts(&self, host: &str) -> RequestCounts {
        self.counts().get(host).copied().unwrap_or_default()
    }

    pub fn plugin(&self, key: &ObjectKey) -> &PluginState {
        self.engine
            .plugin(key)
            .expect("the engine knows the plugin")
    }

    pub fn serving(&self, key: &ObjectKey) -> Option<&Serving> {
        self.engine.plugin(key).map(|st| &st.serving)
    }

    /// The cache key of the module a plugin serves, if it serves one.
    pub fn served_key(&self, key: &ObjectKey) -> Option<ModuleKey> {
        match self.serving(key) {
            Some(Serving::Module(m)) => m.key.clone(),
            _ => None,
        }
    }

    /// Every cached module.
    pub fn cached(&self) -> Vec<ModuleKey> {
        self.engine
            .cache()
            .entries()
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// One metric sample (0 when absent), e.g. `istio_agent_wasm_cache_lookup_count{hit="true"}`.
    pub fn metric(&self, series: &str) -> f64 {
        self.engine
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

fn build_engine(
    config: &Config,
    clock: &Arc<ManualClock>,
    world: &Arc<SimWorld>,
    store: &Arc<dyn ModuleStore>,
    files: &Arc<MemFiles>,
    fetch_config: Option<FetchConfig>,
) -> Engine {
    let parts = EngineParts {
        clock: clock.clone(),
        transport: world.clone(),
        store: store.clone(),
        files: files.clone(),
        // As the simulator: exact backoff delays.
        jitter_seed: None,
        fetch_config,
        purge_epoch: Timestamp::ZERO,
    };
    Engine::new(config.clone(), parts)
        .expect("the module store opens")
        .0
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
