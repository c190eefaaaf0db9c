//! Runs one scenario through the same [`Driver`] as `serve` (docs/scenarios.md "Time",
//! "Expectations").
//!
//! The runner plugs the virtual clock, the simulated world, the in-memory module store (it survives
//! `restart`) and the simulated local files into the driver, turns steps into source changes and
//! checks `expect` steps. It runs on a current-thread tokio runtime with *paused* time: the clock is
//! tokio's virtual clock, which jumps to the next timer whenever every task waits. A step that
//! causes processing runs until *that* processing has finished ([`Driver::run_until_done`]); a pull
//! waiting for timeouts and backoffs, the background retries of other plugins and the purge passes
//! all happen at their own virtual times, in time order, as in a real server, and background work
//! still in flight when a step ends goes on during the next steps.
//!
//! The trace it records is a pure function of the scenario: times are virtual, collections are
//! ordered, nothing mentions addresses, wall-clock time or temporary paths.
//!
//! Length: a little over 600 lines, kept whole: every step's effect and every check of `expect`
//! read the same runner state.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::Serialize;

use super::scenario::{
    DeleteTarget, EditTarget, Expect, RequestExpect, Scenario, Step, Target, OUTCOME_NONE,
    SERVES_ABSENT, SERVES_ALLOW_ALL, SERVES_DENY_ALL,
};
use super::served::{Decoded, DecodedResources, FileChanges, ServedHashes, WatchedStore};
pub use super::trace::trace_line;
use super::trace::Trace;
use super::world::{SimWorld, WorldEvents};
use crate::clock::{paused_runtime, Clock, PausedClock, Timestamp, TokioClock};
use crate::driver::{Applied, Driver, DriverParts};
use crate::engine::{EngineParts, Event, Serving};
use crate::metrics::normalize_series;
use crate::outcome::Outcome;
use crate::plugin::ObjectKey;
use crate::source::Change;
use crate::store::{sha256_hex, MemFiles, MemStore};

/// The module endpoint named in resources of `delivery: http` scenarios.
pub const SIM_MODULE_ENDPOINT: &str = "http://wasm-ecds.sim";
/// The name given to delivered bytes that match no module of the scenario.
pub const UNKNOWN_MODULE: &str = "<unknown module>";

/// Why a scenario failed: the step, the check, what was expected and what happened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CheckFailure {
    /// 1-based step index.
    pub step: usize,
    /// What was checked, e.g. `plugins.default/p.outcome`; `error` when the step could not run.
    pub check: String,
    pub expected: String,
    pub actual: String,
}

impl std::fmt::Display for CheckFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.check == "error" {
            write!(f, "step {}: error: {}", self.step, self.actual)
        } else {
            write!(
                f,
                "step {}: {}: expected {}, got {}",
                self.step, self.check, self.expected, self.actual
            )
        }
    }
}

/// The result of running one scenario.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScenarioRun {
    /// Every failing check of the step that failed (empty when the scenario passed).
    pub failures: Vec<CheckFailure>,
    /// `[  12.500s] …` lines.
    pub trace: Trace,
}

impl ScenarioRun {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// Runs a loaded scenario to its end or its first failing step. Must not be called from inside a
/// tokio runtime (it starts its own).
pub fn run_scenario(scenario: &Scenario) -> ScenarioRun {
    let (rt, paused) = match paused_runtime() {
        Ok(made) => made,
        Err(e) => {
            return error_run(
                0,
                format!("cannot start the runtime: {e}"),
                Trace::default(),
            )
        }
    };
    rt.block_on(async {
        let mut runner = match Runner::new(scenario, paused) {
            Ok(r) => r,
            Err(e) => return error_run(0, e, Trace::default()),
        };
        let failures = runner.run().await;
        ScenarioRun {
            failures,
            trace: runner.trace,
        }
    })
}

fn error_run(step: usize, message: String, trace: Trace) -> ScenarioRun {
    ScenarioRun {
        failures: vec![step_error(step, message)],
        trace,
    }
}

fn step_error(step: usize, message: String) -> CheckFailure {
    CheckFailure {
        step,
        check: "error".into(),
        expected: "the step to run".into(),
        actual: message,
    }
}

struct Runner<'a> {
    s: &'a Scenario,
    clock: Arc<TokioClock>,
    world: Arc<SimWorld>,
    files: Arc<MemFiles>,
    driver: Driver,
    /// The runtime's clock is paused: steps move it ([`Driver::advance_to`]).
    paused: PausedClock,
    trace: Trace,
    /// The order [`Runner::drain`] writes a step's events in (time, world before engine, index),
    /// kept empty between steps.
    pending: Vec<(Timestamp, u8, usize)>,
    /// The world's events of a step; its buffers are kept between steps.
    world_events: WorldEvents,
    /// Outcome of the last processing of each plugin since the previous `expect`.
    outcomes: BTreeMap<ObjectKey, Outcome>,
    /// Modules that left the cache since the previous `expect`.
    expired: BTreeSet<String>,
    /// Changes of the module files (store and local files), and the sha256 of the delivered ones.
    changes: FileChanges,
    served: ServedHashes,
    /// Published resources decoded for `expect`, emptied at `restart` (a new store counts
    /// revisions afresh).
    delivered: DecodedResources,
}

impl<'a> Runner<'a> {
    fn new(s: &'a Scenario, paused: PausedClock) -> Result<Self, String> {
        let clock = Arc::new(TokioClock::new(Timestamp::ZERO));
        let world = Arc::new(SimWorld::new(clock.clone()));
        let files = Arc::new(MemFiles::default());
        let changes = FileChanges::default();
        let parts = DriverParts {
            config: s.config.clone(),
            engine: EngineParts {
                clock: clock.clone(),
                transport: world.clone(),
                store: Arc::new(WatchedStore::new(
                    Arc::new(MemStore::new()),
                    changes.clone(),
                )),
                files: files.clone(),
                // The simulator runs without jitter (behavior.md §4.1, §7): delays are exact.
                jitter_seed: None,
                fetch_config: None,
                purge_epoch: Timestamp::ZERO,
            },
            module_endpoint: SIM_MODULE_ENDPOINT.into(),
        };
        let (driver, _) = Driver::new(parts).map_err(|e| format!("cannot open the cache: {e}"))?;
        let mut r = Runner {
            s,
            clock,
            world,
            files,
            driver,
            paused,
            // Two or three lines a step, and one buffer for them all.
            trace: Trace::with_capacity(s.steps.len().saturating_mul(3).saturating_add(16)),
            pending: Vec::new(),
            world_events: WorldEvents::default(),
            outcomes: BTreeMap::new(),
            expired: BTreeSet::new(),
            served: ServedHashes::new(changes.clone()),
            changes,
            delivered: DecodedResources::default(),
        };
        r.log(
            Timestamp::ZERO,
            format!("scenario {:?} (seed {})", s.name, s.seed),
        );
        Ok(r)
    }

    fn now(&self) -> Timestamp {
        self.clock.now()
    }

    fn log(&mut self, at: Timestamp, text: impl std::fmt::Display) {
        self.trace.push(at, text);
    }

    /// The module of the scenario with these bytes' sha256.
    fn module_name(&self, sha256: &str) -> &'a str {
        module_name(self.s, sha256)
    }

    async fn run(&mut self) -> Vec<CheckFailure> {
        for index in 0..self.s.steps.len() {
            let n = index + 1;
            let world = self.world.clone();
            let digest = move |r: &crate::url::OciRef| {
                world.digest(r).ok_or_else(|| {
                    format!("${{digest:oci://{r}}}: nothing is published at oci://{r}")
                })
            };
            let step = match self.s.step(index, &digest) {
                Ok(step) => step,
                Err(e) => {
                    self.log(self.now(), format!("step {n}: error: {e}"));
                    return vec![step_error(n, e)];
                }
            };
            let text = self.s.describe(index, &step);
            self.log(self.now(), format_args!("step {n}: {text}"));
            let result = self.step(n, &step).await;
            self.drain();
            if let Err(failures) = result {
                for f in &failures {
                    self.log(self.now(), format!("FAILED {f}"));
                }
                return failures;
            }
        }
        Vec::new()
    }

    /// Runs the processing a step caused until it has finished.
    async fn settle(&mut self, n: usize, applied: Applied) -> Result<(), Vec<CheckFailure>> {
        self.log_change(&applied.change);
        for c in &applied.followups {
            self.log_change(c);
        }
        let result = self.driver.run_until_done(&applied.ticket).await;
        result.map_err(|e| vec![step_error(n, e)])
    }

    /// Moves the world's and the engine's events into the trace, in time order (requests before the
    /// processing they belong to), and records outcomes and expiries for `expect`. Only the order
    /// is sorted (a stable sort of indices); each event is then written straight into the trace.
    fn drain(&mut self) {
        let mut world = std::mem::take(&mut self.world_events);
        self.world.take_events_into(&mut world);
        let events = self.driver.take_events();
        // One buffer for every step's order, kept between steps.
        let mut order = std::mem::take(&mut self.pending);
        order.extend(world.iter().enumerate().map(|(i, (at, _))| (at, 0, i)));
        order.extend(events.iter().enumerate().map(|(i, e)| (e.at(), 1, i)));
        order.sort_by_key(|(at, from, _)| (*at, *from));
        let s = self.s;
        for &(at, from, i) in &order {
            if from == 0 {
                self.trace.push(at, world.get(i).1);
            } else {
                self.trace.push_with(at, |line| {
                    let _ = events[i].write_trace(line, |sha| module_name(s, sha));
                });
            }
        }
        order.clear();
        self.pending = order;
        self.world_events = world;
        for e in events {
            match e {
                Event::Processed {
                    plugin, outcome, ..
                } => {
                    self.outcomes.insert(plugin, outcome);
                }
                Event::Expired { sha256, .. } => {
                    self.expired.insert(self.module_name(&sha256).to_string());
                }
                Event::ServingChanged { .. } | Event::RetryScheduled { .. } => {}
            }
        }
    }

    async fn step(&mut self, n: usize, step: &Step) -> Result<(), Vec<CheckFailure>> {
        let err = |m: String| vec![step_error(n, m)];
        match step {
            Step::Publish {
                target,
                module,
                format,
                encoding,
            } => {
                let bytes = &self.s.modules[module].bytes;
                match target {
                    Target::Oci(r) => {
                        let digest = self.world.publish_oci(r, module, bytes, *format);
                        self.log(
                            self.now(),
                            format_args!("oci://{r} now points at manifest sha256:{digest}"),
                        );
                    }
                    Target::Http {
                        authority, path, ..
                    } => self
                        .world
                        .publish_http(authority, path, encoding.encode(bytes)),
                    Target::File(path) => {
                        self.files.put(path, encoding.encode(bytes));
                        self.changes.bump();
                    }
                }
            }
            Step::Unpublish { target } => {
                let existed = match target {
                    Target::Oci(r) => self.world.unpublish_oci(r),
                    Target::Http {
                        authority, path, ..
                    } => self.world.unpublish_http(authority, path),
                    Target::File(path) => {
                        let existed =
                            crate::store::FileSource::open(self.files.as_ref(), path).is_ok();
                        self.files.remove(path);
                        self.changes.bump();
                        existed
                    }
                };
                if !existed {
                    self.log(self.now(), format!("{target} was not published"));
                }
            }
            Step::Apply(v) => {
                let applied = self.driver.apply(v);
                self.settle(n, applied).await?;
            }
            Step::Edit {
                target: EditTarget::Plugin(plugin),
                patch,
            } => match self.driver.edit(plugin, patch) {
                Some(applied) => self.settle(n, applied).await?,
                None => return Err(err(format!("edit: {}", self.no_plugin(plugin)))),
            },
            Step::Edit {
                target: EditTarget::EnvoyFilter(k),
                patch,
            } => match self.driver.edit_envoy_filter(k, patch) {
                Some(applied) => self.settle(n, applied).await?,
                None => return Err(err(format!("edit: there is no EnvoyFilter {k}"))),
            },
            Step::Delete(DeleteTarget::Plugin(k)) => match self.driver.delete_plugin(k) {
                Some(applied) => self.settle(n, applied).await?,
                None => return Err(err(format!("delete: {}", self.no_plugin(k)))),
            },
            Step::Delete(DeleteTarget::EnvoyFilter(k)) => {
                match self.driver.delete_envoy_filter(k) {
                    Some(applied) => self.settle(n, applied).await?,
                    None => return Err(err(format!("delete: there is no EnvoyFilter {k}"))),
                }
            }
            Step::Delete(DeleteTarget::Secret(k)) => match self.driver.delete_secret(k) {
                Some(applied) => self.settle(n, applied).await?,
                None => return Err(err(format!("delete: there is no secret {k}"))),
            },
            Step::Fail(rule) => self.world.add_rule(rule.clone()),
            Step::Recover { host } => {
                self.world.recover(host);
            }
            Step::RequireAuth {
                host,
                username,
                password,
                scheme,
            } => self.world.require_auth(host, username, password, *scheme),
            Step::Advance(d) => {
                let target = self.now() + *d;
                self.driver
                    .advance_to(target, self.paused)
                    .await
                    .map_err(err)?;
            }
            Step::Restart { keep_cache } => self.restart(*keep_cache).await.map_err(err)?,
            Step::Expect(e) => {
                let failures = self.expect(n, e);
                self.outcomes.clear();
                self.expired.clear();
                if !failures.is_empty() {
                    return Err(failures);
                }
                self.log(
                    self.now(),
                    format_args!("expect: {} checks passed", e.check_count()),
                );
            }
        }
        Ok(())
    }

    /// Why an `edit` or `delete` of a plugin cannot run.
    fn no_plugin(&self, k: &ObjectKey) -> String {
        match crate::plugin::envoyfilter::filter_of(k) {
            Some(f) => format!(
                "{k} is a patch of EnvoyFilter {f}: edit or delete the EnvoyFilter (envoyFilter: {f})"
            ),
            None => format!("there is no plugin {k}"),
        }
    }

    /// The trace lines of an admitted change (written straight into the trace).
    fn log_change(&mut self, change: &Change) {
        let now = self.now();
        match change {
            Change::EnvoyFilter {
                key,
                deleted,
                changes,
                notes,
            } => {
                let what = if *deleted { "deleted" } else { "applied" };
                self.log(now, format_args!("EnvoyFilter {key} {what}"));
                for note in notes {
                    self.log(now, format_args!("{key}: {note}"));
                }
                for c in changes {
                    self.log_change(c);
                }
            }
            Change::Conflict { key, error, .. } => {
                self.log(now, format_args!("{key} refused: {error}"))
            }
            Change::PluginCreated(k) | Change::PluginChanged(k) => {
                let Some(vp) = self.driver.objects().plugin(k) else {
                    return;
                };
                let version = vp.version;
                self.log(
                    now,
                    format_args!("{k} is now at resource version {version}"),
                )
            }
            Change::PluginDeleted(k) => self.log(now, format_args!("{k} deleted")),
            Change::SecretApplied(k) => self.log(now, format_args!("secret {k} applied")),
            Change::SecretDeleted(k) => self.log(now, format_args!("secret {k} deleted")),
            Change::Unchanged(k) => {
                self.log(now, format_args!("{k} unchanged (no new resource version)"))
            }
            Change::Refused {
                key: Some(k),
                error,
                ..
            } => self.log(now, format_args!("{k} refused: {error}")),
            Change::Refused {
                key: None, error, ..
            } => self.log(now, format_args!("refused: {error}")),
        }
    }

    /// The server restarts: a new engine over the same store (wiped unless `keep_cache`), fed the
    /// current secrets and then every current plugin as newly created; the step runs until all
    /// their processings have finished.
    async fn restart(&mut self, keep_cache: bool) -> Result<(), String> {
        let (report, ticket) = self
            .driver
            .restart(keep_cache)
            .map_err(|e| format!("restart: {e}"))?;
        self.delivered.clear();
        self.log(
            self.now(),
            format!(
                "server restarted: {} cached modules kept, {} files removed",
                report.kept,
                report.removed.len()
            ),
        );
        self.driver.run_until_done(&ticket).await
    }

    /// What a proxy subscribing to the plugin receives now: the resource the driver published,
    /// decoded, and the module bytes read where the proxy would read them.
    fn serves(&self, k: &ObjectKey) -> Cow<'a, str> {
        // Another plugin may serve the resource name (an EnvoyFilter patch, behavior.md §10).
        let name = k.resource_name();
        if self.driver.objects().resource_owner(&name) != Some(k) {
            return Cow::Borrowed(SERVES_ABSENT);
        }
        let Some(delivered) = self.delivered.get(self.driver.resources(), &name) else {
            return Cow::Borrowed(SERVES_ABSENT);
        };
        let sha256 = match &*delivered {
            Decoded::Undecodable => return Cow::Borrowed("<undecodable resource>"),
            Decoded::DenyAll => return Cow::Borrowed(SERVES_DENY_ALL),
            Decoded::AllowAll => return Cow::Borrowed(SERVES_ALLOW_ALL),
            Decoded::Inline(sha256) => Ok(sha256.clone()),
            Decoded::File(path) => {
                let path = path.as_path();
                // Read and hashed again only when a module file changed since (see `served`).
                let sha256 = self
                    .served
                    .sha256_of(path, || self.driver.engine().read_path(path));
                if let (Ok(have), Some(Serving::Module(m))) = (
                    &sha256,
                    self.driver.engine().plugin(k).map(|st| &st.serving),
                ) {
                    if m.path == *path && m.sha256 != *have {
                        return Cow::Owned(format!(
                            "<{} at {}, but the engine serves {}>",
                            self.module_name(have),
                            path.display(),
                            self.module_name(&m.sha256)
                        ));
                    }
                }
                sha256
            }
            Decoded::Remote(sha256) => (self.driver.modules())
                .read(sha256)
                .unwrap_or_else(|| {
                    Err(std::io::Error::other(format!(
                        "no module {sha256} at the module endpoint"
                    )))
                })
                .map(|b| sha256_hex(&b)),
        };
        match sha256 {
            Ok(sha256) => Cow::Borrowed(self.module_name(&sha256)),
            Err(e) => Cow::Owned(format!("<unreadable module: {e}>")),
        }
    }

    fn expect(&self, n: usize, e: &Expect) -> Vec<CheckFailure> {
        let mut failures = Vec::new();
        // The check's name and the values are made into strings only for a failure.
        let mut check = |check: &dyn std::fmt::Display, expected: &str, actual: &str| {
            if expected != actual {
                failures.push(CheckFailure {
                    step: n,
                    check: check.to_string(),
                    expected: expected.to_string(),
                    actual: actual.to_string(),
                });
            }
        };
        for (k, p) in &e.plugins {
            let last = self.outcomes.get(k);
            if let Some(o) = &p.outcome {
                check(
                    &format_args!("plugins.{k}.outcome"),
                    o,
                    last.map_or(OUTCOME_NONE, |o| o.name()),
                );
            }
            if let Some(r) = &p.reason {
                let actual = last
                    .and_then(Outcome::reason)
                    .unwrap_or_else(|| "(no reason)".into());
                check(&format_args!("plugins.{k}.reason"), r, &actual);
            }
            if let Some(s) = &p.serves {
                check(&format_args!("plugins.{k}.serves"), s, &self.serves(k));
            }
        }
        if let Some(want) = &e.cache {
            let have: BTreeSet<String> = self
                .driver
                .engine()
                .cache()
                .entries()
                .map(|(_, entry)| self.module_name(&entry.sha256).to_string())
                .collect();
            check(&"cache", &list(want), &list(&have));
        }
        if let Some(want) = &e.expired {
            check(&"expired", &list(want), &list(&self.expired));
        }
        // Copied only for an expectation that counts requests.
        let counts = if e.requests.is_empty() {
            BTreeMap::new()
        } else {
            self.world.counts()
        };
        for (host, want) in &e.requests {
            let have = counts.get(host).copied().unwrap_or_default();
            match want {
                RequestExpect::Total(t) => check(
                    &format_args!("requests.{host}"),
                    &t.to_string(),
                    &have.total().to_string(),
                ),
                RequestExpect::Kinds {
                    manifest,
                    blob,
                    get,
                } => {
                    for (kind, want, have) in [
                        ("manifest", manifest, have.manifest),
                        ("blob", blob, have.blob),
                        ("get", get, have.get),
                    ] {
                        if let Some(w) = want {
                            check(
                                &format_args!("requests.{host}.{kind}"),
                                &w.to_string(),
                                &have.to_string(),
                            );
                        }
                    }
                }
            }
        }
        if !e.metrics.is_empty() {
            let samples = self.driver.engine().metrics().samples();
            for (series, want) in &e.metrics {
                let have = samples
                    .get(&normalize_series(series))
                    .copied()
                    .unwrap_or(0.0);
                check(
                    &format_args!("metrics.{series}"),
                    &number(*want),
                    &number(have),
                );
            }
        }
        failures
    }
}

/// The module of `s` with these bytes' sha256.
fn module_name<'a>(s: &'a Scenario, sha256: &str) -> &'a str {
    s.module_by_sha256(sha256).unwrap_or(UNKNOWN_MODULE)
}

fn list(set: &BTreeSet<String>) -> String {
    format!("[{}]", set.iter().cloned().collect::<Vec<_>>().join(", "))
}

fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}
