//! The engine: turns plugin versions into outcomes (behavior.md §2–§7). It owns the cache index,
//! the per-plugin state (what is served, the resource version of the last successful pull, the
//! background retry), the pull secrets, the metrics and the purge schedule.
//!
//! Processing one plugin version has three phases (ztunnel's "phase 1 / phase 2"), one file each:
//! 1. [`plan`] (sync): apply the pull policy to the cache — either a result known at once (a cache
//!    hit, a missing secret) or a [`Job`] describing what must be fetched;
//! 2. [`job`] (async, borrows nothing of the engine): fetch through the [`Fetcher`];
//! 3. [`commit`] (sync): store the module, update resolutions, references, serving state
//!    ([`fallback`] decides what is served after a failure), metrics, and schedule a retry.
//!
//! The engine only *queues* processings (source changes, refreshes, due retries); whoever owns it
//! — the [`Driver`](crate::driver::Driver), for `serve`, `sim` and the tests alike — takes the
//! queue and runs the phases through the [`Dispatcher`](crate::dispatch::Dispatcher), so
//! concurrent pulls of one module share one download.
//!
//! The engine reads time only from its [`Clock`] and reports its next deadline
//! ([`Engine::next_deadline`]); `serve` sleeps until it, `sim` jumps to it.

mod commit;
pub mod deadlines;
pub mod fallback;
pub mod job;
pub mod plan;
pub mod state;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::backoff::{Backoff, BACKGROUND_RETRY};
use crate::cache::{Cache, ReindexReport};
use crate::clock::{Clock, Timestamp};
use crate::config::Config;
use crate::fetch::{FetchConfig, Fetcher, Transport};
use crate::metrics::Metrics;
use crate::outcome::Outcome;
use crate::plugin::{ObjectKey, PullSecret};
use crate::policy;
use crate::source::VersionedPlugin;
use crate::store::{FileSource, ModuleStore};
use deadlines::RetryQueue;

pub use job::{run_job, share_result, Failure, FlightKey, Job, Obtained};
pub use plan::{Begun, Pending};
pub use state::{Event, PluginState, ServedModule, ServedModules, Serving, Trigger};

/// The effects the engine runs on.
#[derive(Clone)]
pub struct EngineParts {
    pub clock: Arc<dyn Clock>,
    pub transport: Arc<dyn Transport>,
    pub store: Arc<dyn ModuleStore>,
    pub files: Arc<dyn FileSource>,
    /// Seed of the backoff jitter; `None` for exact delays (the simulator).
    pub jitter_seed: Option<u64>,
    /// Overrides the fetch options derived from the config (tests).
    pub fetch_config: Option<FetchConfig>,
    /// Purge passes run at every multiple of the purge interval since this time.
    pub purge_epoch: Timestamp,
}

/// The engine. Single-owner (`&mut self`): the [`Driver`](crate::driver::Driver) owns it.
pub struct Engine {
    config: Config,
    fetcher: Arc<Fetcher>,
    files: Arc<dyn FileSource>,
    cache: Cache,
    metrics: Metrics,
    /// Boxed: a state is some 600 bytes, and a B-tree node has room for eleven values, about half
    /// of them used after inserts in key order (so ~1.1 KiB per plugin inline, ~0.7 boxed).
    plugins: BTreeMap<ObjectKey, Box<PluginState>>,
    /// The plugins' retry deadlines in time order (mirrors [`PluginState::retry`]).
    retries: RetryQueue,
    secrets: BTreeMap<ObjectKey, PullSecret>,
    next_purge: Timestamp,
    events: Vec<Event>,
    /// Processings waiting to begin (see [`Engine::take_queue`]).
    queue: Vec<(ObjectKey, Trigger)>,
    /// The id of the last [`Pending`] begun.
    next_id: u64,
    /// When the cache index was last written (see [`crate::cache::INDEX_SAVE_INTERVAL`]).
    last_save: Timestamp,
    /// What the plugins are served, one copy per module.
    served_modules: ServedModules,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("plugins", &self.plugins.len())
            .field("cache", &self.cache)
            .finish()
    }
}

impl Engine {
    /// Opens the cache (re-indexing what is on disk) and starts with no plugins.
    pub fn new(config: Config, parts: EngineParts) -> std::io::Result<(Engine, ReindexReport)> {
        let (cache, report) = Cache::open(parts.store.clone())?;
        let fetch_config = parts
            .fetch_config
            .unwrap_or_else(|| FetchConfig::from(&config));
        let fetcher = Arc::new(Fetcher {
            transport: parts.transport,
            clock: parts.clock,
            store: parts.store,
            files: parts.files.clone(),
            config: fetch_config,
            jitter: parts
                .jitter_seed
                .map(|s| Mutex::new(fastrand::Rng::with_seed(s))),
        });
        let now = fetcher.now();
        let interval = config.purge_interval.max(Duration::from_millis(1));
        let next_purge = next_multiple(parts.purge_epoch, interval, now);
        let metrics = Metrics::new();
        metrics.set_cache_entries(cache.len());
        let engine = Engine {
            config,
            fetcher,
            files: parts.files,
            cache,
            metrics,
            plugins: BTreeMap::new(),
            retries: RetryQueue::default(),
            secrets: BTreeMap::new(),
            next_purge,
            events: Vec::new(),
            queue: Vec::new(),
            next_id: 0,
            last_save: now,
            served_modules: ServedModules::default(),
        };
        Ok((engine, report))
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn now(&self) -> Timestamp {
        self.fetcher.now()
    }

    pub fn fetcher(&self) -> &Arc<Fetcher> {
        &self.fetcher
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn plugins(&self) -> &BTreeMap<ObjectKey, Box<PluginState>> {
        &self.plugins
    }

    /// The plugins' background retries in the order they fall due.
    pub fn retries(&self) -> &RetryQueue {
        &self.retries
    }

    pub fn plugin(&self, key: &ObjectKey) -> Option<&PluginState> {
        self.plugins.get(key).map(|s| &**s)
    }

    /// Drains the events recorded since the last call.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Reads a module file delivered by path: a cached module, or a `file://` module.
    pub fn read_path(&self, path: &std::path::Path) -> std::io::Result<Vec<u8>> {
        match self.cache.key_at(path) {
            Some(k) => self.cache.read(k),
            None => self.read_local_file(path),
        }
    }

    fn read_local_file(&self, path: &std::path::Path) -> std::io::Result<Vec<u8>> {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut self.files.open(&path.to_string_lossy())?, &mut buf)?;
        Ok(buf)
    }

    /// The cached module with this Wasm sha256 (the module endpoint of http delivery).
    pub fn module_by_sha256(&self, sha256: &str) -> Option<std::io::Result<Vec<u8>>> {
        let (k, _) = self.cache.entries().find(|(_, e)| e.sha256 == sha256)?;
        Some(self.cache.read(k))
    }

    /// The bytes a plugin's served module has (for inline delivery and the simulator).
    pub fn served_bytes(&self, m: &ServedModule) -> std::io::Result<Vec<u8>> {
        match &m.key {
            Some(k) => self.cache.read(k),
            None => self.read_local_file(&m.path),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Source events

    /// A plugin was created or changed: process the new version.
    pub fn upsert_plugin(&mut self, vp: &VersionedPlugin) {
        let key = vp.plugin.key.clone();
        let url = vp.url.clone();
        let decision = policy::decide(&vp.plugin.spec, &url);
        match self.plugins.get_mut(&key) {
            Some(st) if st.version == vp.version => return,
            Some(st) => {
                st.plugin = vp.plugin.clone();
                st.version = vp.version;
                st.url = url;
                st.decision = decision;
                self.set_retry(&key, None);
            }
            None => {
                self.plugins.insert(
                    key.clone(),
                    Box::new(PluginState {
                        plugin: vp.plugin.clone(),
                        version: vp.version,
                        url,
                        decision,
                        serving: Serving::Nothing,
                        last_outcome: None,
                        last_error: None,
                        last_processed: None,
                        last_pull: None,
                        pulled_version: None,
                        processed_version: None,
                        referenced: None,
                        retry: None,
                        retry_backoff: Backoff::new(BACKGROUND_RETRY, None),
                    }),
                );
            }
        }
        self.queue(&key, Trigger::Version);
    }

    /// A plugin disappeared: it is no longer served and its module starts to age.
    pub fn remove_plugin(&mut self, key: &ObjectKey) {
        if let Some(st) = self.plugins.remove(key) {
            self.retries.reschedule(key, st.retry, None);
            let now = self.now();
            self.cache.set_ref(key, st.referenced.as_ref(), None, now);
            self.cache.set_served(key, None);
            self.events.push(Event::ServingChanged {
                at: now,
                plugin: key.clone(),
                serving: None,
            });
        }
    }

    /// Records a refused object (behavior.md §1): outcome `invalid` with the failing field path.
    pub fn record_invalid(&mut self, key: &ObjectKey, field: &str, message: &str) {
        let at = self.now();
        let version = self.plugins.get(key).map(|s| s.version);
        let outcome = Outcome::Invalid(field.to_string());
        self.metrics.record_processing(&outcome);
        if let Some(st) = self.plugins.get_mut(key) {
            st.last_outcome = Some(outcome);
            st.last_error = Some(format!("{field}: {message}"));
        }
        self.events.push(Event::Processed {
            at,
            plugin: key.clone(),
            version,
            outcome: Outcome::Invalid(field.to_string()),
            detail: Some(format!("{field}: {message}")),
        });
    }

    /// A pull secret was applied or changed: reprocess the plugins naming it (not a plugin change).
    pub fn upsert_secret(&mut self, secret: PullSecret) {
        let key = secret.key.clone();
        self.secrets.insert(key.clone(), secret);
        self.reprocess_secret_users(&key);
    }

    pub fn remove_secret(&mut self, key: &ObjectKey) {
        if self.secrets.remove(key).is_some() {
            self.reprocess_secret_users(key);
        }
    }

    fn reprocess_secret_users(&mut self, secret: &ObjectKey) {
        let users: Vec<ObjectKey> = self
            .plugins
            .iter()
            .filter(|(k, st)| {
                k.namespace == secret.namespace
                    && st.plugin.spec.image_pull_secret.as_deref() == Some(secret.name.as_str())
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in users {
            self.queue(&k, Trigger::Secret);
        }
    }

    /// Forces a pull for a plugin as if it had changed (`POST /refresh`). False if unknown.
    pub fn refresh(&mut self, key: &ObjectKey) -> bool {
        if !self.plugins.contains_key(key) {
            return false;
        }
        self.queue(key, Trigger::Refresh);
        true
    }

    // -----------------------------------------------------------------------------------------
    // Time

    /// The earliest time background work is due: the next purge pass, index save or plugin retry.
    /// O(log n) in the number of plugins (see [`deadlines`]): `serve` asks at every wake-up.
    pub fn next_deadline(&self) -> Timestamp {
        let first = self
            .next_save()
            .map_or(self.next_purge, |t| t.min(self.next_purge));
        self.retries
            .first()
            .map_or(first, |(due, _)| due.min(first))
    }

    /// Schedules (or with `None` cancels) a plugin's background retry, keeping the deadline index
    /// in step with [`PluginState::retry`]. Every change of a retry goes through here.
    fn set_retry(&mut self, key: &ObjectKey, due: Option<Timestamp>) {
        if let Some(st) = self.plugins.get_mut(key) {
            self.retries.reschedule(key, st.retry, due);
            st.retry = due;
        }
    }

    /// When the changed cache index is due to be written.
    fn next_save(&self) -> Option<Timestamp> {
        self.cache
            .save_due()
            .then(|| self.last_save + crate::cache::INDEX_SAVE_INTERVAL)
    }

    /// Runs all background work due at `now` (the clock's current time, read by the caller), in
    /// time order (purge passes before retries due at the same instant; retries in plugin order).
    pub fn run_due(&mut self, now: Timestamp) {
        loop {
            if self.next_save().is_some_and(|t| t <= now) {
                self.cache.save();
                self.last_save = now;
            }
            let retry = self
                .retries
                .first()
                .filter(|(due, _)| *due <= now)
                .map(|(due, k)| (due, k.clone()));
            match retry {
                Some((due, _)) if self.next_purge <= due => self.purge_pass(),
                None if self.next_purge <= now => self.purge_pass(),
                Some((_, key)) => {
                    self.set_retry(&key, None);
                    self.queue(&key, Trigger::Retry);
                }
                None => break,
            }
        }
    }

    /// One purge pass at its scheduled time.
    fn purge_pass(&mut self) {
        let at = self.next_purge;
        self.next_purge = at + self.config.purge_interval.max(Duration::from_millis(1));
        let gone = self.cache.purge(at, self.config.module_expiry);
        self.metrics.record_expired(gone.len());
        self.metrics.set_cache_entries(self.cache.len());
        for (module, entry) in gone {
            tracing::info!(module = %module, "module expired");
            self.events.push(Event::Expired {
                at,
                module,
                sha256: entry.sha256,
            });
        }
        self.cache.flush(at);
    }

    /// Persists the cache index as of now (graceful shutdown or restart).
    pub fn flush(&mut self) {
        let now = self.now();
        self.cache.flush(now);
        self.last_save = now;
    }

    // -----------------------------------------------------------------------------------------
    // Processing

    /// The processings queued since the last call, in order.
    pub fn take_queue(&mut self) -> Vec<(ObjectKey, Trigger)> {
        std::mem::take(&mut self.queue)
    }

    /// Queues a processing of the current version of a plugin; the owner begins it (through the
    /// [`Dispatcher`](crate::dispatch::Dispatcher)).
    pub fn queue(&mut self, key: &ObjectKey, trigger: Trigger) {
        self.queue.push((key.clone(), trigger));
    }
}

/// The first time `epoch + k * interval` (k ≥ 1) strictly after `now`.
fn next_multiple(epoch: Timestamp, interval: Duration, now: Timestamp) -> Timestamp {
    let elapsed = now.since(epoch).as_nanos();
    let step = interval.as_nanos().max(1);
    let k = elapsed / step + 1;
    Timestamp(epoch.0 + Duration::from_nanos((k * step) as u64))
}
