//! The engine: turns plugin versions into outcomes (behavior.md §2–§7). It owns the cache index,
//! the per-plugin state (what is served, the resource version of the last successful pull, the
//! background retry), the metrics, and the purge schedule.
//!
//! Processing one plugin version has three phases (ztunnel's "phase 1 / phase 2"):
//! 1. [`Engine::plan`] (sync): apply the pull policy to the cache — either a cache hit, or a
//!    [`Job`] describing what must be fetched;
//! 2. [`run_job`] (async, borrows nothing of the engine): fetch through the [`Fetcher`];
//! 3. commit (sync): store the module, update resolutions, references, serving state, metrics,
//!    and schedule a retry on failure.
//!
//! The engine reads time only from its [`Clock`] and reports its next deadline
//! ([`Engine::next_deadline`]); `serve` sleeps until it, `sim` jumps to it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use crate::cache::{Cache, ModuleKey, ReindexReport};
use crate::clock::{Clock, Timestamp};
use crate::config::Config;
use crate::fetch::http::{HttpPull, Validators};
use crate::fetch::{FetchConfig, FetchError, Fetcher, StagedModule, Transport};
use crate::metrics::{ConversionResult, Metrics};
use crate::outcome::{FetchResult, Outcome, Reason};
use crate::plugin::{Credentials, FailStrategy, ObjectKey, PullSecret, WasmPlugin};
use crate::policy::{self, Decision, PullPolicy};
use crate::source::VersionedPlugin;
use crate::store::{FileSource, ModuleStore};
use crate::url::{ModuleUrl, OciRef};

/// First background retry after a failed processing.
pub const RETRY_INITIAL: Duration = Duration::from_secs(1);
/// Background retries double up to this interval (5 minutes).
pub const RETRY_MAX: Duration = Duration::from_secs(5 * 60);

/// The effects the engine runs on.
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

/// A module served to a plugin.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServedModule {
    /// The plugin URL it was obtained from (normalised).
    pub url: String,
    /// Its cache identity; `None` for `file://` modules, which are served from their own path.
    pub key: Option<ModuleKey>,
    pub path: PathBuf,
    /// Hex sha256 of the Wasm binary.
    pub sha256: String,
}

/// What a proxy subscribing to a plugin receives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Serving {
    /// Not processed yet.
    Nothing,
    Module(ServedModule),
    /// RBAC deny-all fallback (`FAIL_CLOSE`).
    DenyAll,
    /// RBAC allow-all fallback (`FAIL_OPEN`).
    AllowAll,
}

impl Serving {
    pub fn describe(&self) -> String {
        match self {
            Serving::Nothing => "nothing".into(),
            Serving::Module(m) => format!("module sha256:{}", &m.sha256[..12.min(m.sha256.len())]),
            Serving::DenyAll => "deny-all".into(),
            Serving::AllowAll => "allow-all".into(),
        }
    }
}

/// Why a plugin is processed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// Created or changed (a new resource version).
    Version,
    /// A pull secret it names was applied, changed or deleted.
    Secret,
    /// A background retry after a rejection; `previous` is the delay that preceded it.
    Retry { previous: Duration },
    /// `POST /refresh`: pull as if the plugin had changed.
    Refresh,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryState {
    pub due: Timestamp,
    pub delay: Duration,
}

/// Everything the engine knows about one current plugin.
#[derive(Clone, Debug)]
pub struct PluginState {
    pub plugin: WasmPlugin,
    pub version: u64,
    pub url: ModuleUrl,
    pub decision: Decision,
    pub serving: Serving,
    pub last_outcome: Option<Outcome>,
    pub last_error: Option<String>,
    pub last_processed: Option<Timestamp>,
    pub last_pull: Option<Timestamp>,
    /// The resource version of the last successful pull (Always bookkeeping, behavior.md §2).
    pub pulled_version: Option<u64>,
    /// The cached module this plugin resolves to, which it protects from expiry (behavior.md §5):
    /// the module it serves, or — after a failure that made it fall back — the module its URL
    /// (or pin) still resolves to in the cache.
    pub referenced: Option<ModuleKey>,
    pub retry: Option<RetryState>,
}

/// Something that happened, for traces and logs.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Processed {
        at: Timestamp,
        plugin: ObjectKey,
        version: Option<u64>,
        outcome: Outcome,
        /// The error message of a rejection or refusal.
        detail: Option<String>,
    },
    /// What a plugin serves changed (a push to subscribed proxies); `None` when it is no longer
    /// served.
    ServingChanged {
        at: Timestamp,
        plugin: ObjectKey,
        serving: Option<Serving>,
    },
    Expired {
        at: Timestamp,
        module: ModuleKey,
        sha256: String,
    },
    RetryScheduled {
        at: Timestamp,
        plugin: ObjectKey,
        due: Timestamp,
    },
}

/// What must be fetched for one plugin version.
#[derive(Clone, Debug)]
pub enum Job {
    File {
        path: String,
        expected: Option<String>,
    },
    /// `conditional`: the cached module the url resolves to and its validators, for a conditional
    /// request (a `304` makes the outcome `revalidated`).
    Http {
        url: String,
        expected: Option<String>,
        conditional: Option<(ModuleKey, Validators)>,
    },
    Oci {
        reference: OciRef,
        name: String,
        credentials: Option<Credentials>,
        expected: Option<String>,
    },
}

impl Job {
    /// Identity for single-flight: two plugins whose jobs have the same key share one download.
    pub fn flight_key(&self) -> String {
        match self {
            Job::File { path, expected } => format!("file:{path}#{expected:?}"),
            Job::Http { url, expected, .. } => format!("http:{url}#{expected:?}"),
            Job::Oci {
                reference,
                credentials,
                expected,
                ..
            } => {
                // Credentials take part so that a module is never shared across authorizations.
                let who = credentials
                    .as_ref()
                    .map(|c| crate::store::sha256_hex(c.basic_header().as_bytes()));
                format!("oci:{reference}#{expected:?}#{who:?}")
            }
        }
    }
}

/// The result of phase 1 + 2.
pub enum Obtained {
    /// Served from the cache without contacting the source.
    Cached(ModuleKey),
    /// The source was asked; the module was already cached.
    Revalidated(ModuleKey),
    /// Downloaded (`validators`: what an HTTP server sent, for conditional requests later).
    Fetched {
        key: ModuleKey,
        staged: StagedModule,
        private: bool,
        validators: Option<Validators>,
    },
    /// Read from a local file.
    File { path: String, sha256: String },
    /// Downloaded by another plugin's identical job in flight at the same time (single flight):
    /// already committed to the cache under this key.
    Shared(ModuleKey),
}

/// A result handed to the other waiters of a shared job (single flight).
pub fn share_result(result: &Result<Obtained, Failure>) -> Result<Obtained, Failure> {
    match result {
        Ok(Obtained::Fetched { key, .. }) | Ok(Obtained::Shared(key)) => {
            Ok(Obtained::Shared(key.clone()))
        }
        Ok(Obtained::Revalidated(k)) => Ok(Obtained::Revalidated(k.clone())),
        Ok(Obtained::Cached(k)) => Ok(Obtained::Cached(k.clone())),
        Ok(Obtained::File { path, sha256 }) => Ok(Obtained::File {
            path: path.clone(),
            sha256: sha256.clone(),
        }),
        Err(e) => Err(e.clone()),
    }
}

/// A processing that was planned (phase 1) and awaits its result.
#[derive(Clone, Debug)]
pub struct Pending {
    pub key: ObjectKey,
    pub version: u64,
    pub trigger: Trigger,
    pub started: Timestamp,
}

/// What phase 1 decided.
pub enum Begun {
    /// Nothing to fetch: commit this result with [`Engine::finish`].
    Done(Pending, Result<Obtained, Failure>),
    /// Run the job ([`run_job`]) with `cached` as the cache view, then [`Engine::finish`].
    Fetch(Pending, Job, Arc<std::collections::BTreeSet<ModuleKey>>),
}

/// A failed processing: the reason and a message for logs.
pub type Failure = (Reason, String);

enum Plan {
    Done(Result<Obtained, Failure>),
    Fetch(Job),
}

/// Runs a job (phase 2). `is_cached` tells whether a module is already in the cache, so an OCI
/// pull stops after the manifest when it is.
pub async fn run_job(
    fetcher: &Fetcher,
    job: &Job,
    is_cached: &(dyn Fn(&ModuleKey) -> bool + Sync),
) -> Result<Obtained, Failure> {
    let fail = |e: FetchError| (e.reason(), e.to_string());
    let mismatch = |expected: &str, actual: &str| {
        let e = FetchError::Checksum {
            expected: expected.to_string(),
            actual: actual.to_string(),
        };
        (e.reason(), e.to_string())
    };
    match job {
        Job::File { path, expected } => {
            let staged = crate::fetch::cpu_bound(|| fetcher.fetch_file(path)).map_err(fail)?;
            if let Some(exp) = expected.as_deref().filter(|e| *e != staged.sha256) {
                return Err(mismatch(exp, &staged.sha256));
            }
            Ok(Obtained::File {
                path: path.clone(),
                sha256: staged.sha256,
            })
        }
        Job::Http {
            url,
            expected,
            conditional,
        } => {
            let validators = conditional.as_ref().map(|(_, v)| v);
            let pull = fetcher
                .fetch_http_conditional(url, fetcher.budget(), validators)
                .await
                .map_err(fail)?;
            let (staged, validators) = match (pull, conditional) {
                (HttpPull::Fetched(staged, validators), _) => (staged, validators),
                (HttpPull::NotModified, Some((key, _))) => {
                    return Ok(Obtained::Revalidated(key.clone()))
                }
                (HttpPull::NotModified, None) => {
                    return Err((Reason::DownloadFailure, format!("{url}: unexpected 304")))
                }
            };
            if let Some(exp) = expected.as_deref().filter(|e| *e != staged.sha256) {
                return Err(mismatch(exp, &staged.sha256));
            }
            let key = ModuleKey::new(url.clone(), staged.sha256.clone());
            Ok(Obtained::Fetched {
                key,
                staged,
                private: false,
                validators,
            })
        }
        Job::Oci {
            reference,
            name,
            credentials,
            expected,
        } => {
            let budget = fetcher.budget();
            let resolved = fetcher
                .oci_resolve(reference, credentials.as_ref(), budget)
                .await
                .map_err(fail)?;
            // A URL pinned to an image index digest names the index; the module is its child.
            let checksum = match expected.as_deref() {
                Some(exp) if resolved.index_digest.as_deref() == Some(exp) => exp.to_string(),
                Some(exp) if exp != resolved.digest => return Err(mismatch(exp, &resolved.digest)),
                _ => resolved.digest.clone(),
            };
            let key = ModuleKey::new(name.clone(), checksum);
            if is_cached(&key) {
                return Ok(Obtained::Revalidated(key));
            }
            let staged = fetcher
                .oci_download(&resolved, budget)
                .await
                .map_err(fail)?;
            Ok(Obtained::Fetched {
                key,
                staged,
                private: resolved.used_credentials,
                validators: None,
            })
        }
    }
}

/// The engine. Single-owner (`&mut self`); `serve` wraps it in a lock and `sim` drives it directly.
pub struct Engine {
    config: Config,
    fetcher: Arc<Fetcher>,
    files: Arc<dyn FileSource>,
    cache: Cache,
    metrics: Metrics,
    plugins: BTreeMap<ObjectKey, PluginState>,
    secrets: BTreeMap<ObjectKey, PullSecret>,
    next_purge: Timestamp,
    events: Vec<Event>,
    /// `serve` mode: entry points only queue processings; the caller runs them concurrently
    /// through [`Engine::take_queue`], [`Engine::begin`] and [`Engine::finish`].
    deferred: bool,
    queue: Vec<(ObjectKey, Trigger)>,
    /// When the cache index was last written (see [`crate::cache::INDEX_SAVE_INTERVAL`]).
    last_save: Timestamp,
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
            secrets: BTreeMap::new(),
            next_purge,
            events: Vec::new(),
            deferred: false,
            queue: Vec::new(),
            last_save: now,
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

    pub fn plugins(&self) -> &BTreeMap<ObjectKey, PluginState> {
        &self.plugins
    }

    pub fn plugin(&self, key: &ObjectKey) -> Option<&PluginState> {
        self.plugins.get(key)
    }

    /// Drains the events recorded since the last call.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Reads a module file delivered by path: a cached module, or a `file://` module.
    pub fn read_path(&self, path: &std::path::Path) -> std::io::Result<Vec<u8>> {
        match self.cache.entries().find(|(_, e)| e.path == path) {
            Some((k, _)) => self.cache.read(k),
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
    pub async fn upsert_plugin(&mut self, vp: &VersionedPlugin) {
        let key = vp.plugin.key.clone();
        let url = match ModuleUrl::parse(&vp.plugin.spec.url) {
            Ok(u) => u,
            Err(e) => {
                // The source validates before admission; this is a defensive refusal.
                self.record_invalid(&key, "spec.url", &e.to_string());
                return;
            }
        };
        let decision = policy::decide(&vp.plugin.spec, &url);
        match self.plugins.get_mut(&key) {
            Some(st) if st.version == vp.version => return,
            Some(st) => {
                st.plugin = vp.plugin.clone();
                st.version = vp.version;
                st.url = url;
                st.decision = decision;
                st.retry = None;
            }
            None => {
                self.plugins.insert(
                    key.clone(),
                    PluginState {
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
                        referenced: None,
                        retry: None,
                    },
                );
            }
        }
        self.process(&key, Trigger::Version).await;
    }

    /// A plugin disappeared: it is no longer served and its module starts to age.
    pub fn remove_plugin(&mut self, key: &ObjectKey) {
        if let Some(st) = self.plugins.remove(key) {
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
        self.metrics.record_processing("invalid");
        if let Some(st) = self.plugins.get_mut(key) {
            st.last_outcome = Some(Outcome::Invalid(field.to_string()));
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
    pub async fn upsert_secret(&mut self, secret: PullSecret) {
        let key = secret.key.clone();
        self.secrets.insert(key.clone(), secret);
        self.reprocess_secret_users(&key).await;
    }

    pub async fn remove_secret(&mut self, key: &ObjectKey) {
        if self.secrets.remove(key).is_some() {
            self.reprocess_secret_users(key).await;
        }
    }

    async fn reprocess_secret_users(&mut self, secret: &ObjectKey) {
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
            self.process(&k, Trigger::Secret).await;
        }
    }

    /// Forces a pull for a plugin as if it had changed (`POST /refresh`). False if unknown.
    pub async fn refresh(&mut self, key: &ObjectKey) -> bool {
        if !self.plugins.contains_key(key) {
            return false;
        }
        self.process(key, Trigger::Refresh).await;
        true
    }

    // -----------------------------------------------------------------------------------------
    // Time

    /// The earliest time background work is due: the next purge pass or plugin retry.
    pub fn next_deadline(&self) -> Timestamp {
        let first = self
            .next_save()
            .map_or(self.next_purge, |t| t.min(self.next_purge));
        self.plugins
            .values()
            .filter_map(|s| s.retry.map(|r| r.due))
            .fold(first, Timestamp::min)
    }

    /// When the changed cache index is due to be written.
    fn next_save(&self) -> Option<Timestamp> {
        self.cache
            .is_dirty()
            .then(|| self.last_save + crate::cache::INDEX_SAVE_INTERVAL)
    }

    /// Runs all background work due at the clock's current time, in time order (purge passes before
    /// retries due at the same instant; retries in plugin order).
    pub async fn run_due(&mut self) {
        loop {
            let now = self.now();
            if self.next_save().is_some_and(|t| t <= now) {
                self.cache.save();
                self.last_save = now;
            }
            let retry = self
                .plugins
                .iter()
                .filter_map(|(k, s)| s.retry.map(|r| (r.due, k.clone())))
                .filter(|(due, _)| *due <= now)
                .min();
            match retry {
                Some((due, _)) if self.next_purge <= due => self.purge_pass(),
                None if self.next_purge <= now => self.purge_pass(),
                Some((_, key)) => {
                    let previous = self
                        .plugins
                        .get_mut(&key)
                        .and_then(|st| st.retry.take())
                        .map_or(RETRY_INITIAL, |r| r.delay);
                    self.process(&key, Trigger::Retry { previous }).await;
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

    /// Switches to deferred processing (see [`Engine::take_queue`]).
    pub fn set_deferred(&mut self, deferred: bool) {
        self.deferred = deferred;
    }

    /// The processings queued in deferred mode, in order.
    pub fn take_queue(&mut self) -> Vec<(ObjectKey, Trigger)> {
        std::mem::take(&mut self.queue)
    }

    /// Processes the current version of a plugin to completion (all three phases); in deferred
    /// mode only queues it.
    pub async fn process(&mut self, key: &ObjectKey, trigger: Trigger) {
        if self.deferred {
            self.queue.push((key.clone(), trigger));
            return;
        }
        let result = match self.begin(key, trigger) {
            None => return,
            Some(Begun::Done(p, r)) => (p, r),
            Some(Begun::Fetch(p, job, _)) => {
                let fetcher = self.fetcher.clone();
                let cache = &self.cache;
                let r = run_job(&fetcher, &job, &|k| cache.contains(k)).await;
                (p, r)
            }
        };
        self.finish(result.0, result.1);
    }

    /// Phase 1 for a current plugin; `None` if it is gone.
    pub fn begin(&mut self, key: &ObjectKey, trigger: Trigger) -> Option<Begun> {
        let version = self.plugins.get(key)?.version;
        let pending = Pending {
            key: key.clone(),
            version,
            trigger,
            started: self.now(),
        };
        Some(match self.plan(key, trigger) {
            Plan::Done(r) => Begun::Done(pending, r),
            Plan::Fetch(job) => {
                let name = match &job {
                    Job::Oci { name, .. } => Some(name.clone()),
                    _ => None,
                };
                let cached = self
                    .cache
                    .entries()
                    .map(|(k, _)| k)
                    .filter(|k| Some(&k.name) == name.as_ref())
                    .cloned()
                    .collect();
                Begun::Fetch(pending, job, Arc::new(cached))
            }
        })
    }

    /// Phase 3: commits a result obtained for `pending`. A result for a version that is no longer
    /// current is dropped.
    pub fn finish(&mut self, pending: Pending, result: Result<Obtained, Failure>) {
        self.commit(
            &pending.key,
            pending.version,
            pending.trigger,
            pending.started,
            result,
        );
    }

    /// Phase 1: decide from the policy and the cache whether anything must be fetched.
    fn plan(&self, key: &ObjectKey, trigger: Trigger) -> Plan {
        let st = &self.plugins[key];
        let expected = st.decision.expected_checksum.clone();
        let url_str = st.url.to_string();
        let reference = match &st.url {
            ModuleUrl::File(path) => {
                return Plan::Fetch(Job::File {
                    path: path.clone(),
                    expected,
                })
            }
            ModuleUrl::Http(_) => None,
            ModuleUrl::Oci(r) => Some(r.clone()),
        };
        let credentials = match &st.plugin.spec.image_pull_secret {
            Some(name) => match self.secrets.get(&ObjectKey::new(&key.namespace, name)) {
                None => {
                    return Plan::Done(Err((
                        Reason::MissingSecret,
                        format!("pull secret {}/{name} not found", key.namespace),
                    )))
                }
                Some(s) => st
                    .url
                    .host()
                    .and_then(|h| s.config.credentials_for(h))
                    .cloned(),
            },
            None => None,
        };
        let must_pull = trigger == Trigger::Refresh
            || (st.decision.policy == PullPolicy::Always && st.pulled_version != Some(st.version));
        if !must_pull {
            let name = st.url.module_name();
            let candidate = match &expected {
                Some(c) => Some(ModuleKey::new(name, c.clone())),
                None => self.cache.resolution(&url_str).cloned(),
            };
            if let Some(k) = candidate {
                if self.cache.contains(&k) && self.cache.is_authorized(&k, key) {
                    return Plan::Done(Ok(Obtained::Cached(k)));
                }
            }
        }
        Plan::Fetch(match reference {
            Some(reference) => Job::Oci {
                name: st.url.module_name(),
                reference,
                credentials,
                expected,
            },
            None => {
                // A conditional request when the url resolves to a cached module fitting the pin.
                let conditional = self
                    .cache
                    .resolution(&url_str)
                    .filter(|k| expected.as_ref().is_none_or(|e| *e == k.checksum))
                    .and_then(|k| {
                        let v = self.cache.validators(&url_str)?;
                        Some((k.clone(), v.clone()))
                    });
                Job::Http {
                    url: url_str,
                    expected,
                    conditional,
                }
            }
        })
    }

    /// Phase 3: record the result.
    fn commit(
        &mut self,
        key: &ObjectKey,
        version: u64,
        trigger: Trigger,
        started: Timestamp,
        result: Result<Obtained, Failure>,
    ) {
        let now = self.now();
        // The plugin may have changed or gone while fetching (only possible in `serve`).
        if self.plugins.get(key).map(|s| s.version) != Some(version) {
            return;
        }
        let st = self.plugins.get_mut(key).expect("checked above");
        let remote = !matches!(st.url, ModuleUrl::File(_));
        let url_str = st.url.to_string();
        let old_key = st.referenced.clone();
        // A download shared with another plugin's identical job counts once as a remote fetch.
        let shared = matches!(result, Ok(Obtained::Shared(_)));
        let mut new_validators = None;
        let obtained = result.and_then(|o| match o {
            Obtained::Fetched {
                key: k,
                staged,
                private,
                validators,
            } => {
                new_validators = Some(validators);
                let entry = self
                    .cache
                    .insert(&k, staged, private, now)
                    .map_err(|e| (Reason::DownloadFailure, format!("cache write failed: {e}")))?;
                let served = ServedModule {
                    url: url_str.clone(),
                    key: Some(k.clone()),
                    path: entry.path.clone(),
                    sha256: entry.sha256.clone(),
                };
                if private {
                    self.cache.authorize(&k, key);
                }
                Ok((Outcome::Pulled, served))
            }
            Obtained::Cached(k) => served_from_cache(&self.cache, &url_str, k, Outcome::Cached),
            Obtained::Shared(k) => {
                // Same job, same credentials: the registry authorized this plugin too.
                self.cache.authorize(&k, key);
                served_from_cache(&self.cache, &url_str, k, Outcome::Pulled)
            }
            Obtained::Revalidated(k) => {
                self.cache.authorize(&k, key);
                served_from_cache(&self.cache, &url_str, k, Outcome::Revalidated)
            }
            Obtained::File { path, sha256 } => Ok((
                Outcome::Pulled,
                ServedModule {
                    url: url_str.clone(),
                    key: None,
                    path: PathBuf::from(path),
                    sha256,
                },
            )),
        });
        let st = self.plugins.get_mut(key).expect("checked above");
        let elapsed_ms = now.since(started).as_secs_f64() * 1000.0;
        let (outcome, detail) = match obtained {
            Ok((outcome, served)) => {
                if let Some(k) = &served.key {
                    if st.url.is_mutable() {
                        self.cache.set_resolution(&url_str, k);
                        // A fresh download replaces the validators (none when the server sent none).
                        if let Some(v) = new_validators {
                            self.cache.set_validators(&url_str, v);
                        }
                    }
                    self.cache.touch(k, now);
                }
                if matches!(outcome, Outcome::Pulled | Outcome::Revalidated) {
                    st.pulled_version = Some(version);
                }
                if outcome == Outcome::Pulled {
                    st.last_pull = Some(now);
                }
                if remote {
                    self.metrics.record_lookup(outcome != Outcome::Pulled);
                    if outcome == Outcome::Pulled && !shared {
                        self.metrics.record_remote_fetch(FetchResult::Success);
                    }
                    self.metrics
                        .record_conversion(ConversionResult::Success, elapsed_ms);
                } else {
                    self.metrics
                        .record_conversion(ConversionResult::NoRemoteLoad, elapsed_ms);
                }
                self.cache
                    .set_ref(key, old_key.as_ref(), served.key.as_ref(), now);
                st.referenced = served.key.clone();
                st.retry = None;
                let record = served.key.clone().map(|module| crate::cache::ServedRecord {
                    url: served.url.clone(),
                    module,
                });
                self.cache.set_served(key, record);
                let serving = Serving::Module(served);
                if st.serving != serving {
                    st.serving = serving.clone();
                    self.events.push(Event::ServingChanged {
                        at: now,
                        plugin: key.clone(),
                        serving: Some(serving),
                    });
                }
                (outcome, None)
            }
            Err((reason, message)) => {
                if remote {
                    self.metrics.record_lookup(false);
                    if let Some(r) = reason.fetch_result() {
                        self.metrics.record_remote_fetch(r);
                    }
                }
                self.metrics
                    .record_conversion(ConversionResult::FetchFailure, elapsed_ms);
                // Keep serving the module from the same URL while its checksum still fits
                // (behavior.md §7, improvement); otherwise fall back.
                let expected = st.decision.expected_checksum.as_deref();
                let mut keep = match &st.serving {
                    Serving::Module(m) => {
                        m.url == url_str
                            && expected.is_none_or(|e| {
                                m.key
                                    .as_ref()
                                    .map_or(m.sha256.as_str(), |k| k.checksum.as_str())
                                    == e
                            })
                    }
                    _ => false,
                };
                // After a restart the plugin serves nothing yet, but its proxies still run what it
                // served before: keep serving that (same URL, still cached, fitting the pin).
                if st.serving == Serving::Nothing {
                    let before = self.cache.last_served(key).filter(|r| {
                        r.url == url_str && expected.is_none_or(|e| e == r.module.checksum)
                    });
                    if let Some(r) = before.cloned() {
                        let entry = self.cache.get(&r.module).expect("last_served is cached");
                        let served = ServedModule {
                            url: r.url.clone(),
                            key: Some(r.module.clone()),
                            path: entry.path.clone(),
                            sha256: entry.sha256.clone(),
                        };
                        self.cache
                            .set_ref(key, old_key.as_ref(), Some(&r.module), now);
                        st.referenced = Some(r.module);
                        st.serving = Serving::Module(served.clone());
                        self.events.push(Event::ServingChanged {
                            at: now,
                            plugin: key.clone(),
                            serving: Some(Serving::Module(served)),
                        });
                        keep = true;
                    }
                }
                if !keep {
                    let fallback = match st.plugin.spec.fail_strategy {
                        FailStrategy::FailOpen => Serving::AllowAll,
                        FailStrategy::FailClose | FailStrategy::FailReload => Serving::DenyAll,
                    };
                    // The module the URL (or pin) still resolves to stays protected (§5).
                    let resolved = match expected {
                        Some(c) => Some(ModuleKey::new(st.url.module_name(), c)),
                        None => self.cache.resolution(&url_str).cloned(),
                    }
                    .filter(|k| self.cache.contains(k));
                    self.cache
                        .set_ref(key, old_key.as_ref(), resolved.as_ref(), now);
                    st.referenced = resolved;
                    self.cache.set_served(key, None);
                    if st.serving != fallback {
                        st.serving = fallback.clone();
                        self.events.push(Event::ServingChanged {
                            at: now,
                            plugin: key.clone(),
                            serving: Some(fallback),
                        });
                    }
                }
                // 1 s after a failed processing, doubling per failed retry up to 5 minutes; any
                // other trigger (a change, a secret, a refresh) restarts the sequence.
                let delay = match trigger {
                    Trigger::Retry { previous } => (previous * 2).min(RETRY_MAX),
                    _ => RETRY_INITIAL,
                };
                let due = now + delay;
                st.retry = Some(RetryState { due, delay });
                self.events.push(Event::RetryScheduled {
                    at: now,
                    plugin: key.clone(),
                    due,
                });
                tracing::warn!(plugin = %key, reason = %reason, error = %message, "plugin rejected");
                (Outcome::Rejected(reason), Some(message))
            }
        };
        st.last_outcome = Some(outcome.clone());
        st.last_error = detail.clone();
        st.last_processed = Some(now);
        self.metrics.record_processing(outcome.name());
        self.metrics.set_cache_entries(self.cache.len());
        self.events.push(Event::Processed {
            at: now,
            plugin: key.clone(),
            version: Some(version),
            outcome,
            detail,
        });
    }
}

fn served_from_cache(
    cache: &Cache,
    url: &str,
    k: ModuleKey,
    outcome: Outcome,
) -> Result<(Outcome, ServedModule), Failure> {
    let entry = cache
        .get(&k)
        .ok_or_else(|| (Reason::DownloadFailure, "module left the cache".to_string()))?;
    let served = ServedModule {
        url: url.to_string(),
        path: entry.path.clone(),
        sha256: entry.sha256.clone(),
        key: Some(k),
    };
    Ok((outcome, served))
}

/// The first time `epoch + k * interval` (k ≥ 1) strictly after `now`.
fn next_multiple(epoch: Timestamp, interval: Duration, now: Timestamp) -> Timestamp {
    let elapsed = now.since(epoch).as_nanos();
    let step = interval.as_nanos().max(1);
    let k = elapsed / step + 1;
    Timestamp(epoch.0 + Duration::from_nanos((k * step) as u64))
}
