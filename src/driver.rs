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
//! Every source change returns a [`Ticket`]: the processings it caused. Background work — due
//! retries, purge passes, the index save — runs whenever its time comes, whoever is waiting, and
//! is never part of a ticket (docs/scenarios.md "Time").

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::Value;

use crate::cache::ReindexReport;
use crate::clock::Timestamp;
use crate::config::Config;
use crate::dispatch::{Completion, Dispatcher};
use crate::engine::{Engine, EngineParts, Event, Serving};
use crate::plugin::envoyfilter;
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

/// The last refused object of a plugin and why.
#[derive(Clone, Debug, PartialEq)]
struct Refusal {
    /// `Null` after an edit; for an `EnvoyFilter` patch, the EnvoyFilter.
    object: Value,
    error: FieldError,
    /// For a conflict: the ECDS resource name it waits for.
    waits_for: Option<String>,
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
    modules: BTreeMap<String, ModuleLocation>,
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
        Some(match self.modules.get(sha256)? {
            ModuleLocation::Cached(path) => self.store.read(path),
            ModuleLocation::File(path) => {
                let mut buf = Vec::new();
                self.files
                    .open(path)
                    .and_then(|mut r| std::io::Read::read_to_end(&mut r, &mut buf))
                    .map(|_| buf)
            }
        })
    }
}

/// The engine, its object source, its dispatcher and the resources it publishes.
pub struct Driver {
    parts: DriverParts,
    engine: Engine,
    dispatcher: Dispatcher,
    objects: ObjectStore,
    resources: ResourceStore,
    /// Plugins that have an ECDS resource.
    /// The plugin each published ECDS resource is from: another plugin may take a name over
    /// (behavior.md §10 "Conflicts"), and the one that left must not remove it then.
    published: BTreeMap<String, ObjectKey>,
    /// Processings waiting for a fetch.
    outstanding: BTreeSet<u64>,
    /// The last refused object per plugin and why (see [`Driver::sync`]).
    refused: BTreeMap<ObjectKey, Refusal>,
    /// `EnvoyFilter`s refused as a whole, as last seen (see [`Driver::sync`]).
    refused_filters: BTreeMap<ObjectKey, Value>,
    /// While [`Driver::sync`] runs: a refusal identical to the remembered one is not reported
    /// again.
    quiet_repeats: bool,
    /// Engine events not yet taken by the shell.
    events: Vec<Event>,
}

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
        let driver = Driver {
            parts,
            resources: ResourceStore::with_metrics(engine.metrics()),
            engine,
            dispatcher: Dispatcher::new(),
            objects: ObjectStore::new(),
            published: BTreeMap::new(),
            outstanding: BTreeSet::new(),
            refused: BTreeMap::new(),
            refused_filters: BTreeMap::new(),
            quiet_repeats: false,
            events: Vec::new(),
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

    /// The object a plugin was last refused for (`Null` after an edit) and why.
    pub fn refusal(&self, key: &ObjectKey) -> Option<(&Value, &FieldError)> {
        self.refused.get(key).map(|r| (&r.object, &r.error))
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
    // Source changes

    /// Applies one object (a `WasmPlugin`, an `EnvoyFilter` or a pull `Secret`), as the API server
    /// admits it.
    pub fn apply(&mut self, object: Value) -> Applied {
        let change = self.objects.apply_value(object.clone());
        self.hand_over(change, &object)
    }

    /// A JSON merge patch on a stored `WasmPlugin`; `None` if there is no such plugin (the plugin
    /// of an `EnvoyFilter` patch is edited through its EnvoyFilter).
    pub fn edit(&mut self, key: &ObjectKey, patch: &Value) -> Option<Applied> {
        let change = self.objects.edit_plugin(key, patch)?;
        Some(self.hand_over(change, &Value::Null))
    }

    /// A JSON merge patch on a stored `EnvoyFilter`; `None` if there is none.
    pub fn edit_envoy_filter(&mut self, key: &ObjectKey, patch: &Value) -> Option<Applied> {
        let change = self.objects.edit_envoy_filter(key, patch)?;
        let object = self
            .objects
            .envoy_filters()
            .get(key)
            .map(|f| f.object.clone());
        Some(self.hand_over(change, &object.unwrap_or(Value::Null)))
    }

    /// Deletes a `WasmPlugin` (or forgets a refused one); `None` if there is no such plugin. The
    /// plugin of an `EnvoyFilter` patch goes with its EnvoyFilter.
    pub fn delete_plugin(&mut self, key: &ObjectKey) -> Option<Applied> {
        if envoyfilter::filter_of(key).is_some() {
            return None;
        }
        let change = self.objects.delete_plugin(key)?;
        Some(self.hand_over(change, &Value::Null))
    }

    /// Deletes an `EnvoyFilter` and the plugins of its patches; `None` if there is none.
    pub fn delete_envoy_filter(&mut self, key: &ObjectKey) -> Option<Applied> {
        self.refused_filters.remove(key);
        let change = self.objects.delete_envoy_filter(key)?;
        Some(self.hand_over(change, &Value::Null))
    }

    pub fn delete_secret(&mut self, key: &ObjectKey) -> Option<Applied> {
        let change = self.objects.delete_secret(key)?;
        Some(self.hand_over(change, &Value::Null))
    }

    /// Makes the current objects exactly `plugins`, `envoy_filters` and `secrets` (a rescan of the
    /// watched files, a relist): first what disappeared (so that a resource name moving from one
    /// object to another is not a conflict), then secrets, plugins and EnvoyFilters in key order,
    /// then the secrets that disappeared. Objects equal to what is stored change nothing, and a
    /// refusal is reported once, not at every rescan; a plugin refused for a conflict is tried again
    /// at every sync, so it takes over once the resource name is free.
    pub fn sync(
        &mut self,
        plugins: &BTreeMap<ObjectKey, Value>,
        envoy_filters: &BTreeMap<ObjectKey, Value>,
        secrets: &BTreeMap<ObjectKey, Value>,
    ) -> Ticket {
        self.quiet_repeats = true;
        let mut ticket = Ticket::default();
        let gone: Vec<ObjectKey> = (self.objects.plugins().keys())
            .chain(self.refused.keys())
            .filter(|k| envoyfilter::filter_of(k).is_none() && !plugins.contains_key(*k))
            .cloned()
            .collect();
        for k in gone {
            self.refused.remove(&k);
            if let Some(a) = self.delete_plugin(&k) {
                ticket.join(a.ticket);
            }
        }
        let gone: Vec<ObjectKey> = (self.objects.envoy_filters().keys())
            .filter(|k| !envoy_filters.contains_key(*k))
            .cloned()
            .collect();
        for k in gone {
            if let Some(a) = self.delete_envoy_filter(&k) {
                ticket.join(a.ticket);
            }
        }
        (self.refused_filters).retain(|k, _| envoy_filters.contains_key(k));
        (self.refused).retain(|k, _| {
            envoyfilter::filter_of(k).is_none_or(|f| envoy_filters.contains_key(&f))
        });
        for value in secrets.values() {
            ticket.join(self.apply(value.clone()).ticket);
        }
        for (key, value) in plugins {
            let settled = self
                .refused
                .get(key)
                .is_some_and(|r| r.object == *value && r.waits_for.is_none());
            if !settled {
                ticket.join(self.apply(value.clone()).ticket);
            }
        }
        for (key, value) in envoy_filters {
            if self.refused_filters.get(key) != Some(value) {
                ticket.join(self.apply(value.clone()).ticket);
            }
        }
        let gone: Vec<ObjectKey> = (self.objects.secrets().keys())
            .filter(|k| !secrets.contains_key(*k))
            .cloned()
            .collect();
        for k in gone {
            if let Some(a) = self.delete_secret(&k) {
                ticket.join(a.ticket);
            }
        }
        self.quiet_repeats = false;
        ticket
    }

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
        self.dispatcher = Dispatcher::new();
        self.outstanding.clear();
        self.resources = ResourceStore::with_metrics(self.engine.metrics());
        self.published.clear();
        for secret in self.objects.secrets().values() {
            self.engine.upsert_secret(secret.clone());
        }
        for vp in self.objects.plugins().values() {
            self.engine.upsert_plugin(vp);
        }
        Ok((report, self.dispatch()))
    }

    /// Persists the cache index as of now (graceful shutdown).
    pub fn flush(&mut self) {
        self.engine.flush();
    }

    /// Hands an admitted change to the engine, admits the plugins that waited for a resource name
    /// it freed, and begins what that queued. `object` is what was applied (`Null` for an edit or
    /// a deletion).
    fn hand_over(&mut self, change: Change, object: &Value) -> Applied {
        self.take(&change, object);
        let followups = self.admit_waiting();
        let ticket = self.dispatch();
        Applied {
            change,
            followups,
            ticket,
        }
    }

    /// Records what a change did (refusals remembered) and tells the engine.
    fn take(&mut self, change: &Change, object: &Value) {
        match change {
            Change::PluginCreated(k) | Change::PluginChanged(k) => {
                self.refused.remove(k);
                if let Some(vp) = self.objects.plugin(k) {
                    self.engine.upsert_plugin(vp);
                }
            }
            Change::PluginDeleted(k) => {
                self.refused.remove(k);
                self.engine.remove_plugin(k);
            }
            Change::SecretApplied(k) => {
                if let Some(s) = self.objects.secrets().get(k) {
                    self.engine.upsert_secret(s.clone());
                }
            }
            Change::SecretDeleted(k) => self.engine.remove_secret(k),
            Change::Unchanged(_) => {}
            Change::Refused {
                key: Some(k),
                is_plugin: true,
                error,
            } => self.refuse(k, object, error, None),
            Change::Conflict {
                key,
                resource,
                error,
            } => self.refuse(key, object, error, Some(resource.clone())),
            Change::Refused { key, error, .. } => {
                let filter = object.get("kind").and_then(Value::as_str)
                    == Some(envoyfilter::ENVOY_FILTER_KIND);
                if let (Some(k), true) = (key, filter) {
                    if self.quiet_repeats && self.refused_filters.get(k) == Some(object) {
                        return;
                    }
                    self.refused_filters.insert(k.clone(), object.clone());
                }
                tracing::warn!(object = ?key, field = %error.field, error = %error.message, "object refused");
            }
            Change::EnvoyFilter {
                key,
                changes,
                notes,
                ..
            } => {
                self.refused_filters.remove(key);
                for c in changes {
                    self.take(c, object);
                }
                // Refusals of patches the EnvoyFilter no longer has, or no longer refuses.
                let now: BTreeSet<&ObjectKey> = (changes.iter())
                    .filter_map(|c| match c {
                        Change::Refused { key: Some(k), .. } => Some(k),
                        Change::Conflict { key, .. } => Some(key),
                        _ => None,
                    })
                    .collect();
                self.refused.retain(|k, _| {
                    envoyfilter::filter_of(k).as_ref() != Some(key) || now.contains(k)
                });
                for note in notes {
                    tracing::debug!(envoy_filter = %key, "{note}");
                }
            }
        }
    }

    /// Remembers a plugin's refusal and records it as its `invalid` outcome, once per refusal
    /// while syncing.
    fn refuse(
        &mut self,
        k: &ObjectKey,
        object: &Value,
        error: &FieldError,
        waits_for: Option<String>,
    ) {
        let refusal = Refusal {
            object: object.clone(),
            error: error.clone(),
            waits_for,
        };
        let repeat = self.refused.get(k) == Some(&refusal);
        self.refused.insert(k.clone(), refusal);
        if self.quiet_repeats && repeat {
            return;
        }
        tracing::warn!(plugin = %k, field = %error.field, error = %error.message, "plugin refused");
        self.engine.record_invalid(k, &error.field, &error.message);
    }

    /// Admits again the plugins refused for a conflict whose resource name is free now: a
    /// `WasmPlugin` as it was refused, an `EnvoyFilter` patch through its current EnvoyFilter.
    fn admit_waiting(&mut self) -> Vec<Change> {
        let free: Vec<(ObjectKey, Value)> = (self.refused.iter())
            .filter(|(_, r)| {
                (r.waits_for.as_deref()).is_some_and(|n| self.objects.resource_owner(n).is_none())
            })
            .filter_map(|(k, r)| match envoyfilter::filter_of(k) {
                Some(f) => {
                    let object = &self.objects.envoy_filters().get(&f)?.object;
                    Some((f, object.clone()))
                }
                None => Some((k.clone(), r.object.clone())).filter(|(_, o)| !o.is_null()),
            })
            .collect();
        let mut done = BTreeSet::new();
        let mut changes = Vec::new();
        for (key, object) in free {
            if done.insert(key) {
                let change = self.objects.apply_value(object.clone());
                self.take(&change, &object);
                changes.push(change);
            }
        }
        changes
    }

    // -----------------------------------------------------------------------------------------
    // The loop

    /// Begins what the engine queued and publishes what changed.
    fn dispatch(&mut self) -> Ticket {
        let dispatched = self.dispatcher.dispatch(&mut self.engine);
        self.outstanding.extend(dispatched.waiting.iter().copied());
        for id in &dispatched.aborted {
            self.outstanding.remove(id);
        }
        self.publish();
        Ticket(dispatched.waiting.into_iter().collect())
    }

    fn complete(&mut self, completion: Completion) {
        for id in self.dispatcher.complete(&mut self.engine, completion) {
            self.outstanding.remove(&id);
        }
        self.dispatch();
    }

    /// Runs the background work due by now and commits jobs already finished, without letting
    /// time pass. Returns how many things it handled.
    fn run_ready(&mut self) -> usize {
        let mut handled = 0;
        loop {
            if self.engine.next_deadline() <= self.now() {
                self.engine.run_due();
                self.dispatch();
                handled += 1;
            }
            match self.dispatcher.try_completion() {
                Some(c) => {
                    self.complete(c);
                    handled += 1;
                }
                None if self.engine.next_deadline() > self.now() => return handled,
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
    pub async fn advance_to(&mut self, target: Timestamp) -> Result<(), String> {
        let mut rounds = 0;
        while {
            rounds += self.run_ready();
            self.now() < target
        } {
            self.guard(&mut rounds)?;
            self.wait_next(Some(target)).await;
        }
        self.settle_instant().await;
        Ok(())
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
                tracing::info!(plugin = %plugin, version = ?version, outcome = %outcome, detail = detail.as_deref().unwrap_or(""), "plugin processed");
            }
        }
        self.events.extend(events);
    }

    fn publish_plugin(&mut self, key: &ObjectKey) {
        let name = key.resource_name();
        let Some(st) = self.engine.plugin(key) else {
            if self.published.get(&name) == Some(key) {
                self.published.remove(&name);
                self.resources.remove(&name);
            }
            return;
        };
        let endpoint = &self.parts.module_endpoint;
        let resource = crate::convert::resource_for(
            &st.plugin,
            &st.serving,
            self.parts.config.delivery,
            |sha| format!("{endpoint}{}{sha}.wasm", crate::convert::MODULES_PATH),
            |m| self.engine.served_bytes(m),
        );
        match resource {
            Ok(Some(r)) => {
                self.resources.set(name.clone(), r);
                self.published.insert(name, key.clone());
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(plugin = %key, error = %e, "cannot read module for inline delivery")
            }
        }
    }

    /// The modules offered at the module endpoint, as of now.
    pub fn modules(&self) -> ModuleIndex {
        let mut modules: BTreeMap<String, ModuleLocation> = self
            .engine
            .cache()
            .entries()
            .map(|(_, e)| (e.sha256.clone(), ModuleLocation::Cached(e.path.clone())))
            .collect();
        for st in self.engine.plugins().values() {
            if let Serving::Module(m) = &st.serving {
                if m.key.is_none() {
                    modules
                        .entry(m.sha256.clone())
                        .or_insert_with(|| ModuleLocation::File(m.path.to_string_lossy().into()));
                }
            }
        }
        ModuleIndex {
            modules,
            store: self.parts.engine.store.clone(),
            files: self.parts.engine.files.clone(),
        }
    }
}

fn new_engine(parts: &DriverParts) -> std::io::Result<(Engine, ReindexReport)> {
    Engine::new(parts.config.clone(), parts.engine.clone())
}
