//! The driver: the one loop around the engine that `serve`, `sim` and the tests share.
//!
//! It owns the [`ObjectStore`] (admission and resource versions), the [`Engine`], the
//! [`Dispatcher`] (concurrent processings, single flight) and the ECDS [`ResourceStore`] it
//! publishes to. Its shells differ only in the effects they plug in ([`DriverParts`]: clock,
//! transport, module store, local files) and in how changes arrive:
//! - `serve` syncs the watched files ([`Driver::sync`]), forwards refreshes and otherwise waits in
//!   [`Driver::next`] beside its command channel;
//! - `sim` and the test harness apply one change at a time and run until the processing it caused
//!   has finished ([`Driver::run_until_done`]) or until a point in virtual time
//!   ([`Driver::advance_to`]), on tokio's paused clock.
//!
//! Source changes and their admission (refusals, resource-name conflicts) are in `changes.rs`.
//! Every source change returns a [`Ticket`]: the processings it caused. Background work — due
//! retries, purge passes, the index save — runs whenever its time comes, whoever is waiting, and
//! is never part of a ticket (docs/scenarios.md "Time").
//!
//! Length: about 700 lines: the loop, publishing (with the record of what each resource was built
//! from) and the module index all read the engine, the dispatcher and the resource store it owns.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig;

use crate::cache::ReindexReport;
use crate::clock::{PausedClock, Timestamp};
use crate::config::{Config, Delivery};
use crate::dispatch::{Completion, Dispatcher, PullLimits};
use crate::engine::{Engine, EngineParts, Event, Serving};
use crate::log_gate::LogGate;
use crate::outcome::Outcome;
mod changes;
pub use changes::ObjectChanges;

use crate::plugin::{FieldError, ObjectKey};
use crate::source::{Change, ObjectStore};
use crate::store::{FileSource, ModuleStore};
use crate::xds::ResourceStore;

/// How many background deadlines one wait may run through before it gives up: a guard against a
/// configuration that would never let time pass (a purge interval of a nanosecond).
pub const MAX_DEADLINES_PER_WAIT: usize = 1_000_000;

/// How many times a wait that ends yields to the other tasks at its last instant (see
/// [`Driver::settle_instant`]): a background job wakes, makes its requests and waits for time to
/// pass again within one or two of them.
const SETTLE_YIELDS: usize = 16;

/// What a driver runs on, kept to build a new engine at every restart.
#[derive(Clone)]
pub struct DriverParts {
    pub config: Config,
    /// The engine's effects: clock, transport, module store, local files, jitter, purge epoch.
    pub engine: EngineParts,
    /// Where proxies fetch modules with `--delivery http`, e.g. `http://127.0.0.1:15020`.
    pub module_endpoint: String,
}

/// The processings a change caused; [`Driver::is_done`] once all of them have finished.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ticket(BTreeSet<u64>);

impl Ticket {
    pub fn join(&mut self, other: Ticket) {
        self.0.extend(other.0);
    }
}

/// What applying one change did.
#[derive(Clone, Debug)]
pub struct Applied {
    pub change: Change,
    /// Plugins that waited for an ECDS resource name the change freed, admitted now
    /// (behavior.md §10 "Conflicts").
    pub followups: Vec<Change>,
    pub ticket: Ticket,
}

/// Where a module offered at the module endpoint is read from.
#[derive(Clone, Debug, PartialEq, Eq)]
enum ModuleLocation {
    Cached(PathBuf),
    File(String),
}

/// The modules proxies may fetch by sha256 (`--delivery http`): every cached module and every
/// `file://` module a plugin serves. A snapshot, readable from any thread.
#[derive(Clone)]
pub struct ModuleIndex {
    /// sha256 → where the module is and whether it was fetched with registry credentials (then
    /// only authenticated callers get it: docs/security.md).
    modules: BTreeMap<String, (ModuleLocation, bool)>,
    store: Arc<dyn ModuleStore>,
    files: Arc<dyn FileSource>,
}

impl std::fmt::Debug for ModuleIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleIndex")
            .field("modules", &self.modules.len())
            .finish()
    }
}

impl ModuleIndex {
    /// The module's bytes, `None` if there is no module with this sha256.
    pub fn read(&self, sha256: &str) -> Option<std::io::Result<Vec<u8>>> {
        let mut buf = Vec::new();
        Some(
            self.open(sha256)?
                .and_then(|mut r| std::io::Read::read_to_end(&mut r, &mut buf))
                .map(|_| buf),
        )
    }

    /// The module for reading in pieces, `None` if there is no module with this sha256.
    pub fn open(&self, sha256: &str) -> Option<std::io::Result<Box<dyn std::io::Read + Send>>> {
        Some(match &self.modules.get(sha256)?.0 {
            ModuleLocation::Cached(path) => self.store.open(path),
            ModuleLocation::File(path) => self.files.open(path),
        })
    }

    /// Whether the module was fetched with registry credentials (a pull secret).
    pub fn is_private(&self, sha256: &str) -> bool {
        self.modules.get(sha256).is_some_and(|m| m.1)
    }
}

/// Who published an ECDS resource, and what from.
struct Published {
    key: ObjectKey,
    /// The plugin (shared with the engine's state) and serving state the resource was built from;
    /// `None` for a remote-delivery resource. A processing that changes neither what the resource
    /// is built from ([`crate::convert::same_resource_inputs`]) nor what is served (a metadata
    /// edit, an `Always` revalidation of the same module) builds and encodes nothing: the store
    /// would find the same bytes and push nothing either.
    built_from: Option<(Arc<crate::plugin::WasmPlugin>, Serving)>,
}

/// The engine, its object source, its dispatcher and the resources it publishes.
pub struct Driver {
    parts: DriverParts,
    engine: Engine,
    dispatcher: Dispatcher,
    objects: ObjectStore,
    resources: ResourceStore,
    /// The plugin each published ECDS resource is from: another plugin may take a name over
    /// (behavior.md §10 "Conflicts"), and the one that left must not remove it then.
    published: BTreeMap<Arc<str>, Published>,
    /// Processings waiting for a fetch.
    outstanding: BTreeSet<u64>,
    /// The last refused object per plugin and why (see [`Driver::sync`]).
    refused: BTreeMap<ObjectKey, changes::Refusal>,
    /// `EnvoyFilter`s refused as a whole, as last seen (see [`Driver::sync`]).
    refused_filters: BTreeMap<ObjectKey, crate::plugin::Object>,
    /// While [`Driver::sync`] runs: a refusal identical to the remembered one is not reported
    /// again.
    quiet_repeats: bool,
    /// Engine events not yet taken by the shell.
    events: Vec<Event>,
    /// Rejections repeating themselves (the same plugin version rejected for the same reason at
    /// every background retry) are logged once per [`REPEAT_LOG_INTERVAL`].
    repeats: LogGate,
}

/// How often a plugin version rejected again and again for the same reason is logged: longer than
/// the longest background retry delay, so a source that stays broken costs a line per plugin per
/// hour, not one per retry (behavior.md §6 "Logs").
pub const REPEAT_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(3600);
/// Plugins the repeat gate tells apart; beyond them, repeats share one line per interval.
const REPEAT_LOG_KEYS: usize = 16 * 1024;

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("engine", &self.engine)
            .field("dispatcher", &self.dispatcher)
            .finish()
    }
}

impl Driver {
    /// Opens the cache (re-indexing what is in the store) and starts with no objects. Must run
    /// inside a tokio runtime.
    pub fn new(parts: DriverParts) -> std::io::Result<(Driver, ReindexReport)> {
        let (engine, report) = new_engine(&parts)?;
        let limits = PullLimits::of(&parts.config);
        let driver = Driver {
            parts,
            resources: ResourceStore::with_metrics(engine.metrics()),
            engine,
            dispatcher: Dispatcher::new(limits),
            objects: ObjectStore::new(),
            published: BTreeMap::new(),
            outstanding: BTreeSet::new(),
            refused: BTreeMap::new(),
            refused_filters: BTreeMap::new(),
            quiet_repeats: false,
            events: Vec::new(),
            repeats: LogGate::with_keys(REPEAT_LOG_INTERVAL, REPEAT_LOG_KEYS),
        };
        Ok((driver, report))
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn objects(&self) -> &ObjectStore {
        &self.objects
    }

    pub fn config(&self) -> &Config {
        &self.parts.config
    }

    /// The ECDS resources proxies are served. A new store after [`Driver::restart`].
    pub fn resources(&self) -> &ResourceStore {
        &self.resources
    }

    /// Plugins whose last applied object was refused.
    pub fn refused(&self) -> impl Iterator<Item = &ObjectKey> {
        self.refused.keys()
    }

    /// Those of [`Driver::refused`] within `range`, in order (a page of `/debug/plugins`).
    pub fn refused_in<'a>(
        &'a self,
        range: (Bound<&'a ObjectKey>, Bound<&'a ObjectKey>),
    ) -> impl Iterator<Item = &'a ObjectKey> {
        self.refused.range::<ObjectKey, _>(range).map(|(k, _)| k)
    }

    /// The object a plugin was last refused for (none after an edit) and why.
    pub fn refusal(
        &self,
        key: &ObjectKey,
    ) -> Option<(Option<&crate::plugin::Object>, &FieldError)> {
        self.refused.get(key).map(|r| (r.object.as_ref(), &r.error))
    }

    /// The ECDS resource name a refused plugin waits for, when another plugin serves it
    /// (behavior.md §10 "Conflicts").
    pub fn waits_for(&self, key: &ObjectKey) -> Option<&str> {
        self.refused.get(key)?.waits_for.as_deref()
    }

    pub fn now(&self) -> Timestamp {
        self.engine.now()
    }

    /// Engine events since the last call, in the order they were recorded.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// True once every processing of the ticket has finished.
    pub fn is_done(&self, ticket: &Ticket) -> bool {
        ticket.0.is_disjoint(&self.outstanding)
    }

    /// Processings (of any ticket, or background) waiting for a fetch.
    pub fn in_flight(&self) -> usize {
        self.outstanding.len()
    }

    // -----------------------------------------------------------------------------------------
    // Process lifecycle

    /// Pulls a plugin again as if it had changed (`POST /refresh`); `None` if it is unknown.
    pub fn refresh(&mut self, key: &ObjectKey) -> Option<Ticket> {
        self.engine.refresh(key).then(|| self.dispatch())
    }

    /// The server process restarts: memory is lost (in-flight work is abandoned, metrics and
    /// resources start afresh), the module store is kept unless `keep_cache` is false, then every
    /// current secret and plugin is handed to the new engine as newly created.
    pub fn restart(&mut self, keep_cache: bool) -> std::io::Result<(ReindexReport, Ticket)> {
        // A graceful shutdown persists the cache index (usage times included).
        self.engine.flush();
        if !keep_cache {
            self.parts.engine.store.wipe()?;
        }
        let (engine, report) = new_engine(&self.parts)?;
        self.engine = engine;
        self.dispatcher = Dispatcher::new(PullLimits::of(&self.parts.config));
        self.outstanding.clear();
        self.resources = ResourceStore::with_metrics(self.engine.metrics());
        self.published.clear();
        for secret in self.objects.secrets().values() {
            self.engine.upsert_secret(secret.clone());
        }
        if self.parts.config.delivery == Delivery::Remote {
            let keys: Vec<ObjectKey> = self.objects.plugins().keys().cloned().collect();
            for k in keys {
                self.publish_remote(&k);
            }
        } else {
            for vp in self.objects.plugins().values() {
                self.engine.upsert_plugin(vp);
            }
        }
        Ok((report, self.dispatch()))
    }

    /// Persists the cache index as of now (graceful shutdown).
    pub fn flush(&mut self) {
        self.engine.flush();
    }

    // -----------------------------------------------------------------------------------------
    // The loop

    /// Begins what the engine queued and publishes what changed.
    fn dispatch(&mut self) -> Ticket {
        let now = self.now();
        self.dispatch_at(now)
    }

    /// [`dispatch`](Self::dispatch) at `now`, the clock as the caller just read it: what happens
    /// at one instant reads the clock once (on the simulator's clock a read goes through tokio's
    /// thread-local context and a lock).
    fn dispatch_at(&mut self, now: Timestamp) -> Ticket {
        let dispatched = self.dispatcher.dispatch(&mut self.engine, now);
        self.outstanding.extend(dispatched.waiting.iter().copied());
        for id in &dispatched.aborted {
            self.outstanding.remove(id);
        }
        self.publish();
        Ticket(dispatched.waiting.into_iter().collect())
    }

    fn complete(&mut self, completion: Completion) {
        let now = self.now();
        self.complete_at(completion, now);
    }

    /// [`complete`](Self::complete) at `now`, the clock as the caller just read it.
    fn complete_at(&mut self, completion: Completion, now: Timestamp) {
        for id in self.dispatcher.complete(&mut self.engine, completion, now) {
            self.outstanding.remove(&id);
        }
        self.dispatch_at(now);
    }

    /// Runs the background work due by now and commits jobs already finished, without letting
    /// time pass. Returns how many things it handled.
    ///
    /// The clock is read once, on entry (on the simulator's clock a read goes through tokio's
    /// thread-local context and a lock): nothing here waits, so on the paused clock that is the
    /// instant throughout; on a real clock, work falling due meanwhile is run by the next call.
    fn run_ready(&mut self) -> usize {
        let mut handled = 0;
        let now = self.now();
        loop {
            let due = self.engine.next_deadline() <= now;
            if due {
                self.engine.run_due(now);
                self.dispatch_at(now);
                handled += 1;
            }
            match self.dispatcher.try_completion() {
                Some(c) => {
                    self.complete_at(c, now);
                    handled += 1;
                }
                // After due work look again: more may be due at the same instant.
                None if !due => return handled,
                None => {}
            }
        }
    }

    /// Waits for the next finished job or the next deadline (not beyond `limit`) and handles it.
    /// Cancel-safe: nothing is lost when the future is dropped while it waits.
    async fn wait_next(&mut self, limit: Option<Timestamp>) {
        let deadline = self.engine.next_deadline();
        let wake = limit.map_or(deadline, |l| l.min(deadline));
        let sleep = tokio::time::sleep(wake.since(self.now()));
        let busy = self.dispatcher.in_flight() > 0;
        let completed = tokio::select! {
            biased;
            c = self.dispatcher.next_completion(), if busy => Some(c),
            _ = sleep => None,
        };
        if let Some(c) = completed {
            self.complete(c);
        }
        self.run_ready();
    }

    /// Handles the next event (a finished job or a deadline): `serve`'s loop, beside its commands.
    /// Returns as soon as something was handled — also work that finished while the caller was
    /// busy elsewhere (this future is dropped whenever a command wins the caller's `select!`), so
    /// the caller sees every change and publishes what it derives from the driver's state.
    pub async fn next(&mut self) {
        if self.run_ready() > 0 {
            return;
        }
        self.wait_next(None).await;
    }

    /// Runs until every processing of `ticket` has finished; background work falling due meanwhile
    /// runs at its own time. Work finishing at the very instant the ticket is done is committed
    /// too; work still in flight is left running.
    pub async fn run_until_done(&mut self, ticket: &Ticket) -> Result<(), String> {
        let mut rounds = 0;
        while {
            rounds += self.run_ready();
            !self.is_done(ticket)
        } {
            self.guard(&mut rounds)?;
            self.wait_next(None).await;
        }
        self.settle_instant().await;
        Ok(())
    }

    /// Lets the clock reach `target`, running every deadline and committing every job finishing on
    /// the way at its own time. Work still in flight at `target` is left running.
    ///
    /// Only on tokio's paused clock (`sim` and the test harness), which `_paused` stands for: while
    /// nothing runs — no job in flight, no cached file being verified — no task can wake before
    /// the next deadline, so the clock is moved straight to it (or to `target`) with
    /// [`tokio::time::advance`] instead of through a timer and a park of the runtime; the same
    /// instants, at a fraction of the cost.
    pub async fn advance_to(
        &mut self,
        target: Timestamp,
        _paused: PausedClock,
    ) -> Result<(), String> {
        let mut rounds = 0;
        let mut now;
        while {
            rounds += self.run_ready();
            now = self.now();
            now < target
        } {
            self.guard(&mut rounds)?;
            if self.is_idle() {
                let to = self.engine.next_deadline().min(target);
                tokio::time::advance(to.since(now)).await;
            } else {
                self.wait_next(Some(target)).await;
            }
        }
        self.settle_instant().await;
        Ok(())
    }

    /// Nothing can wake by itself: no job in flight, and no cached module file being verified
    /// (its thread holds the paused clock still, see [`crate::cache::Verifier`]).
    fn is_idle(&self) -> bool {
        self.dispatcher.in_flight() == 0 && self.engine.cache().verifier().remaining() == 0
    }

    /// Lets the work running at this instant go as far as it can without time passing: a
    /// background retry that fell due now makes its first request now, not whenever the next step
    /// lets time pass (by which time a host may have recovered). On tokio's paused clock time
    /// only moves when every task waits, so yielding never moves it.
    async fn settle_instant(&mut self) {
        for _ in 0..SETTLE_YIELDS {
            // Without a job in flight no task can run (due work already ran): nothing to wait for.
            if self.dispatcher.in_flight() == 0 {
                return;
            }
            tokio::task::yield_now().await;
            self.run_ready();
        }
    }

    fn guard(&self, rounds: &mut usize) -> Result<(), String> {
        *rounds += 1;
        if *rounds > MAX_DEADLINES_PER_WAIT {
            return Err(format!(
                "more than {MAX_DEADLINES_PER_WAIT} background deadlines in one step (is purgeInterval tiny?)"
            ));
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Publishing

    /// Converts the serving state of every plugin an event touched into its ECDS resource.
    fn publish(&mut self) {
        let events = self.engine.take_events();
        let touched: BTreeSet<&ObjectKey> = events
            .iter()
            .filter(|e| matches!(e, Event::Processed { .. } | Event::ServingChanged { .. }))
            .filter_map(Event::plugin)
            .collect();
        for key in touched {
            self.publish_plugin(key);
        }
        for e in &events {
            if let Event::Processed {
                plugin,
                version,
                outcome,
                detail,
                ..
            } = e
            {
                self.log_processed(plugin, *version, outcome, detail.as_deref().unwrap_or(""));
            }
        }
        self.events.extend(events);
    }

    /// One line per processing, a warning for a rejection. A rejection is a line of its own only
    /// once per [`REPEAT_LOG_INTERVAL`] for the same plugin version and reason: a module server
    /// that stays down makes every rejected plugin retry for ever, and without the gate each retry
    /// of each plugin would add a line. The next line let through says how many were held back.
    fn log_processed(
        &self,
        plugin: &ObjectKey,
        version: Option<u64>,
        outcome: &Outcome,
        detail: &str,
    ) {
        if !matches!(outcome, Outcome::Rejected(_)) {
            tracing::info!(plugin = %plugin, version = ?version, outcome = %outcome, detail, "plugin processed");
            return;
        }
        let key = format!("{plugin} {version:?} {outcome}");
        if let Some(suppressed) = self.repeats.admit(&key) {
            tracing::warn!(plugin = %plugin, version = ?version, outcome = %outcome, detail, suppressed, "plugin processed");
        }
    }

    /// `--delivery remote`: nothing is pulled, each change is published as it is (see
    /// [`crate::convert::remote_resource`]); the engine never sees the plugins.
    fn remote_delivery(&self) -> bool {
        self.parts.config.delivery == Delivery::Remote
    }

    /// A plugin was created or changed: the engine processes it, or with remote delivery it is
    /// published as it is.
    pub(super) fn plugin_changed(&mut self, key: &ObjectKey) {
        if self.remote_delivery() {
            self.publish_remote(key);
        } else if let Some(vp) = self.objects.plugin(key) {
            self.engine.upsert_plugin(vp);
        }
    }

    /// A plugin was deleted.
    pub(super) fn plugin_gone(&mut self, key: &ObjectKey) {
        if self.remote_delivery() {
            self.unpublish(key);
        } else {
            self.engine.remove_plugin(key);
        }
    }

    /// A pull secret was applied or deleted: with remote delivery, the plugins naming it are
    /// published again with its new content.
    pub(super) fn secret_changed(&mut self, key: &ObjectKey) {
        if !self.remote_delivery() {
            match self.objects.secrets().get(key) {
                Some(s) => self.engine.upsert_secret(s.clone()),
                None => self.engine.remove_secret(key),
            }
            return;
        }
        let users: Vec<ObjectKey> = (self.objects.plugins().iter())
            .filter(|(k, vp)| {
                k.namespace == key.namespace
                    && vp.plugin.spec.image_pull_secret.as_deref() == Some(&key.name)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in users {
            self.publish_remote(&k);
        }
    }

    fn publish_remote(&mut self, key: &ObjectKey) {
        use crate::convert::{extension_config, remote_resource, Code, Filter};
        use crate::url::ModuleUrl;
        let Some(vp) = self.objects.plugin(key) else {
            return;
        };
        let plugin = &vp.plugin;
        let resource = match &*vp.url {
            // A local file is named as such, as Istio's control plane does.
            ModuleUrl::File(path) => {
                extension_config(plugin, Filter::Wasm(Code::File(path.into())))
            }
            // Nothing to pull from (an EnvoyFilter patch without http_uri): the fallback.
            ModuleUrl::NoHttpUri => extension_config(
                plugin,
                crate::convert::fallback_for(plugin.spec.fail_strategy),
            ),
            url => {
                let secret = plugin.spec.image_pull_secret.as_ref().map(|name| {
                    let k = ObjectKey::new(&key.namespace, name);
                    self.objects.secrets().get(&k).map(|s| s.config.to_json())
                });
                // The proxy fetches it: the URL as written, credentials included.
                remote_resource(plugin, &url.as_written(), secret, vp.version)
            }
        };
        self.publish_resource(plugin.resource_name(), resource, key, None);
    }

    /// Stores `resource` under `name`, published from `key`. The store and the record of who
    /// published it share one `Arc` of the name: a name already there keeps the one it has in
    /// both (a map keeps its key on insert), a new one is the `Arc` made here.
    fn publish_resource(
        &mut self,
        name: String,
        resource: TypedExtensionConfig,
        key: &ObjectKey,
        built_from: Option<(Arc<crate::plugin::WasmPlugin>, Serving)>,
    ) {
        let name: Arc<str> = name.into();
        self.resources.set(name.clone(), resource);
        let published = Published {
            key: key.clone(),
            built_from,
        };
        self.published.insert(name, published);
    }

    /// Withdraws the resource `key` published, unless another plugin has taken its name over.
    fn unpublish(&mut self, key: &ObjectKey) {
        let name = key.resource_name();
        if self.published.get(name.as_str()).map(|p| &p.key) == Some(key) {
            self.published.remove(name.as_str());
            self.resources.remove(&name);
        }
    }

    fn publish_plugin(&mut self, key: &ObjectKey) {
        let Some(st) = self.engine.plugin(key) else {
            self.unpublish(key);
            return;
        };
        let name = key.resource_name();
        if let Some(Published {
            key: from,
            built_from: Some((plugin, serving)),
        }) = self.published.get_mut(name.as_str())
        {
            if from == key
                && *serving == st.serving
                && crate::convert::same_resource_inputs(plugin, &st.plugin)
            {
                // The current object is what it stands for from now on (the previous one is
                // not kept alive by it).
                *plugin = st.plugin.clone();
                return;
            }
        }
        let endpoint = &self.parts.module_endpoint;
        let resource = crate::convert::resource_for(
            &st.plugin,
            &st.serving,
            self.parts.config.delivery,
            |sha| format!("{endpoint}{}{sha}.wasm", crate::convert::MODULES_PATH),
            |m| self.engine.served_bytes(m),
        );
        let built_from = (st.plugin.clone(), st.serving.clone());
        match resource {
            Ok(Some(r)) => self.publish_resource(name, r, key, Some(built_from)),
            Ok(None) => {}
            Err(e) => {
                tracing::error!(plugin = %key, error = %e, "cannot read module for inline delivery")
            }
        }
    }

    /// The modules offered at the module endpoint, as of now.
    pub fn modules(&self) -> ModuleIndex {
        let files = self
            .engine
            .plugins()
            .values()
            .filter_map(|st| match &st.serving {
                Serving::Module(m) if m.key.is_none() => {
                    Some((m.sha256.as_str(), m.path.as_path()))
                }
                _ => None,
            });
        self.module_index(files)
    }

    /// The modules offered at the module endpoint: every cached module and the `file://` modules
    /// `files` lists (sha256, path) — `serve` keeps that list from the engine's events instead of
    /// looking at every plugin.
    pub fn module_index<'a>(
        &self,
        files: impl IntoIterator<Item = (&'a str, &'a Path)>,
    ) -> ModuleIndex {
        // A module with these bytes fetched with credentials anywhere makes them private.
        let mut modules: BTreeMap<String, (ModuleLocation, bool)> = BTreeMap::new();
        for (_, e) in self.engine.cache().entries() {
            let entry = modules
                .entry(e.sha256.clone())
                .or_insert_with(|| (ModuleLocation::Cached(e.path.clone()), false));
            entry.1 |= e.private;
        }
        for (sha256, path) in files {
            modules
                .entry(sha256.to_string())
                .or_insert_with(|| (ModuleLocation::File(path.to_string_lossy().into()), false));
        }
        ModuleIndex {
            modules,
            store: self.parts.engine.store.clone(),
            files: self.parts.engine.files.clone(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;

fn new_engine(parts: &DriverParts) -> std::io::Result<(Engine, ReindexReport)> {
    Engine::new(parts.config.clone(), parts.engine.clone())
}
