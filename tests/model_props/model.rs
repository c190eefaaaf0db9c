//! The reference model: behavior.md §2–§8 and scenarios.md "Time" as a small discrete-event
//! simulation, written from the spec and sharing no code with the implementation (its own policy
//! function, cache, expiry rule, fetch jobs and clock).
//!
//! A processing *begins* by planning: the pull policy (§2) applied to the cache as it is at that
//! instant either gives the result at once (`cached`, no request) or a fetch job. Jobs run
//! concurrently, each with the time of its next attempt; a processing whose job is identical to
//! one in flight (same url, same expected checksum) waits for that one (§5 single flight). A job
//! ends with its result, which is committed to every processing waiting for it (dropped for a
//! plugin that changed or went away meanwhile). A job none of whose processings is current any more
//! (every plugin waiting for it changed or went away) is abandoned at that instant: it makes no
//! further request.
//!
//! Time moves from one instant to the next. At each instant: first the background deadlines
//! (purge passes before retries due at the same time, retries in plugin order, each beginning a
//! processing), then the attempts of the jobs due, in the order the jobs began. Deadlines first
//! matters when a retry's plan meets a job ending at the same instant; it is what the driver does
//! (it handles its due deadlines before the job tasks woken at that instant run). The order among
//! jobs does not change anything that is compared. A step ends when its own processings have
//! finished (apply, edit, restart) or the clock reached its target (advance), after everything at
//! that last instant has run; jobs still in flight go on in later steps.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::world::*;

mod commit;
mod fetch;

// Spec constants (behavior.md §4.1, §5, §7, §9 defaults), restated for the model.
const ATTEMPTS: u32 = 5;
const FIRST_BACKOFF_US: u64 = 500_000;
const EXPIRY: Duration = Duration::from_secs(24 * 3600);
const PURGE_INTERVAL: Duration = Duration::from_secs(3600);
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(300);

/// (module name, checksum): a cache identity (§5).
type MKey = (String, String);

#[derive(Clone, Debug, PartialEq, Eq)]
enum MServing {
    Nothing,
    Module { key: MKey, url: String },
    DenyAll,
    AllowAll,
}

#[derive(Clone, Debug)]
struct MPlugin {
    obj: Obj,
    version: u64,
    serving: MServing,
    /// The cache key this plugin protects from expiry (§5).
    referenced: Option<MKey>,
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

/// Why a processing began: a new resource version, or a background retry after `delay`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trig {
    Version,
    Retry(Duration),
}

/// What a processing obtained.
#[derive(Clone, Debug)]
enum Got {
    Cached(MKey),
    Revalidated(MKey),
    /// Downloaded; `shared` for the processings that waited for another one's identical job.
    Pulled {
        key: MKey,
        module: u8,
        shared: bool,
    },
}

/// A result, or the rejection reason.
type Obtained = Result<Got, &'static str>;

/// A processing waiting for a job.
#[derive(Clone, Debug)]
struct Waiter {
    id: u64,
    p: u8,
    version: u64,
    trig: Trig,
}

/// The request a job makes next (§4.2: a manifest, then the blob unless its digest was cached
/// when the job was planned; §4.1: one GET).
#[derive(Clone, Debug)]
enum Request {
    Manifest,
    Blob { module: u8, key: MKey },
    Get,
}

/// A fetch in flight.
#[derive(Debug)]
struct Job {
    /// Identity for single flight: (url, expected checksum).
    flight: (String, Option<String>),
    url: u8,
    /// The cache's keys of this module name when the job was planned.
    known: BTreeSet<MKey>,
    request: Request,
    /// Failed attempts of the current request.
    failed: u32,
    /// When the next attempt is made.
    next: Duration,
    waiters: Vec<Waiter>,
}

/// When a step ends.
enum Until {
    /// These processings have finished.
    Done(BTreeSet<u64>),
    /// The clock reached this time.
    Time(Duration),
}

pub struct Model<'a> {
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
    cache: BTreeMap<MKey, MEntry>,
    resolutions: BTreeMap<String, MKey>,
    /// What each plugin last served (url, module): survives restarts with the cache (§7).
    last_served: BTreeMap<u8, (String, MKey)>,
    next_purge: Duration,
    /// Jobs in flight, in the order they began.
    jobs: Vec<Job>,
    /// The id of the last processing that began waiting for a job.
    last_id: u64,
    pub events: Vec<Ev>,
    /// Counters of this server life (behavior.md §6, §8).
    lookups: (u64, u64),
    fetches: BTreeMap<&'static str, u64>,
}

/// The wait after the `failed`-th failed attempt of a request (§4.1: 500 ms, ×1.5). Timers have
/// millisecond resolution (tokio's, in the server as on the simulator's paused clock): every wait
/// ends at the next whole millisecond, so the 1.6875 s wait lasts 1.688 s.
fn backoff(failed: u32) -> Duration {
    let mut us = FIRST_BACKOFF_US;
    for _ in 1..failed {
        us = us * 3 / 2;
    }
    Duration::from_millis(us.div_ceil(1000))
}

/// The first purge pass strictly after `now` (passes run at multiples of the interval).
fn next_pass(now: Duration) -> Duration {
    let k = now.as_nanos() / PURGE_INTERVAL.as_nanos() + 1;
    PURGE_INTERVAL * k as u32
}

impl<'a> Model<'a> {
    pub fn new(mods: &'a Modules) -> Self {
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
            jobs: Vec::new(),
            last_id: 0,
            events: Vec::new(),
            lookups: (0, 0),
            fetches: BTreeMap::new(),
        }
    }

    pub fn publish(&mut self, place: u8, module: u8) {
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
    fn set_ref(&mut self, p: u8, old: Option<&MKey>, new: Option<&MKey>) {
        if let Some(e) = old.and_then(|k| self.cache.get_mut(k)) {
            e.refs.remove(&p);
            e.last_used = self.now;
        }
        if let Some(e) = new.and_then(|k| self.cache.get_mut(k)) {
            e.refs.insert(p);
            e.last_used = self.now;
        }
    }

    // -----------------------------------------------------------------------------------------
    // Time

    fn purge_pass(&mut self) {
        let at = self.next_purge;
        self.next_purge = at + PURGE_INTERVAL;
        let gone: Vec<MKey> = self
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

    /// Background deadlines due now, in time order (purge passes first at equal times, retries in
    /// plugin order), then the processings the retries begin. False if nothing was due.
    fn run_due(&mut self) -> bool {
        let mut retries = Vec::new();
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
                    let st = self.plugins.get_mut(&p).expect("a current plugin");
                    let (_, delay) = st.retry.take().expect("due retry");
                    retries.push((p, delay));
                }
                None => break,
            }
        }
        let any = !retries.is_empty();
        for (p, delay) in retries {
            self.begin(p, Trig::Retry(delay));
        }
        any
    }

    /// Everything that happens at the current instant: deadlines, then job attempts.
    fn run_instant(&mut self) {
        loop {
            let begun = self.run_due();
            match self.jobs.iter().position(|j| j.next <= self.now) {
                Some(j) => {
                    if let Some(result) = self.attempt(j) {
                        self.end_job(j, result);
                    }
                }
                None if !begun => return,
                None => {}
            }
        }
    }

    /// The next instant something is due: a purge pass, a retry or a job's attempt.
    fn next_time(&self) -> Duration {
        let retries = self.plugins.values().filter_map(|st| st.retry.map(|r| r.0));
        let jobs = self.jobs.iter().map(|j| j.next);
        retries.chain(jobs).fold(self.next_purge, Duration::min)
    }

    fn run_until(&mut self, until: Until) {
        loop {
            self.run_instant();
            let mut next = self.next_time();
            match &until {
                Until::Done(ids) => {
                    let waiting = self
                        .jobs
                        .iter()
                        .flat_map(|j| &j.waiters)
                        .any(|w| ids.contains(&w.id));
                    if !waiting {
                        return;
                    }
                }
                Until::Time(t) if self.now >= *t => return,
                Until::Time(t) => next = next.min(*t),
            }
            self.now = next;
        }
    }

    // -----------------------------------------------------------------------------------------
    // Steps

    /// A job whose every waiting processing is stale makes no further request.
    fn abandon_stale_jobs(&mut self) {
        let plugins = &self.plugins;
        self.jobs.retain(|j| {
            j.waiters
                .iter()
                .any(|w| plugins.get(&w.p).is_some_and(|st| st.version == w.version))
        });
    }

    pub fn step(&mut self, index: usize, s: &Step) {
        match s {
            Step::Apply { p, obj } => {
                let ticket = self.apply(*p, obj.clone());
                self.abandon_stale_jobs();
                self.run_until(Until::Done(ticket));
            }
            Step::Edit { p } => {
                if let Some((obj, _)) = self.objects.get(p) {
                    let obj = Obj {
                        label: Some(index),
                        ..obj.clone()
                    };
                    let ticket = self.apply(*p, obj);
                    self.abandon_stale_jobs();
                    self.run_until(Until::Done(ticket));
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
                    self.abandon_stale_jobs();
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
            Step::Advance(d) => self.run_until(Until::Time(self.now + *d)),
            Step::Restart { keep_cache } => {
                let ticket = self.restart(*keep_cache);
                self.run_until(Until::Done(ticket));
            }
        }
    }

    /// §1, §3: a new resource version exactly when the object differs from the stored one.
    /// Returns the processing it began, if it waits for a job.
    fn apply(&mut self, p: u8, obj: Obj) -> BTreeSet<u64> {
        if self.objects.get(&p).is_some_and(|(cur, _)| *cur == obj) {
            return BTreeSet::new();
        }
        self.last_version += 1;
        self.objects.insert(p, (obj, self.last_version));
        self.upsert(p).into_iter().collect()
    }

    /// The server learns about a new resource version of `p`.
    fn upsert(&mut self, p: u8) -> Option<u64> {
        let (obj, version) = self.objects[&p].clone();
        match self.plugins.get_mut(&p) {
            Some(st) if st.version == version => return None,
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
        self.begin(p, Trig::Version)
    }

    /// §5: jobs in flight are abandoned; the cache and the remembered resolutions survive; a
    /// module in use at shutdown was used until then (usage times are kept to the millisecond);
    /// every plugin is created again, all beginning now. Returns the processings left waiting.
    fn restart(&mut self, keep_cache: bool) -> BTreeSet<u64> {
        self.jobs.clear();
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
        keys.into_iter().filter_map(|p| self.upsert(p)).collect()
    }

    pub fn snapshot(&self) -> Snapshot {
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
