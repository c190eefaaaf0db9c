//! Runs the engine's queued processings concurrently, with single-flight downloads (behavior.md §5
//! "Concurrent requests for the same module share one download").
//!
//! The [`Driver`](crate::driver::Driver) calls [`Dispatcher::dispatch`] after every engine call and
//! feeds each [`Dispatcher::next_completion`] back through [`Dispatcher::complete`]. Jobs run as
//! tokio tasks that borrow nothing of the engine; only their results come back to it. Identical
//! jobs in flight at the same time (same URL, same expected checksum, same credentials) share one
//! task: the first waiter still current commits the downloaded module, the others are served it
//! from the cache. A job no current processing waits for any more (its plugins changed or went
//! away) is aborted at once, and dropping the dispatcher aborts every job (a restarting server
//! abandons them).
//!
//! Pulls are bounded ([`PullLimits`], behavior.md §5 "Concurrent pulls"): at most `overall` run at
//! once, at most `per_host` of them against one host. A pull over either bound waits in its host's
//! queue (first in, first out) without a task; a freed slot goes to the hosts with queued pulls in
//! turn (round robin), so one busy host cannot starve the others. A queued flight holds no slot,
//! so identical jobs join it while it waits (single flight) and nothing ever waits for a slot its
//! own flight holds; a job aborted or finished frees its slot at once. Local files are read, not
//! pulled: they are never queued. All of it happens on the driver's thread, in the order the
//! engine queued the work, so the simulator stays deterministic.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future as _;

use tokio::task::{AbortHandle, JoinSet};

use crate::clock::Timestamp;
use crate::config::Config;
use crate::engine::{
    run_job, share_result, Begun, Engine, Failure, FlightKey, Job, Obtained, Pending,
};

/// Identifies one job (one task) for the life of the dispatcher.
type JobId = u64;

/// A finished job: which one, and its result.
pub type Completion = (JobId, Result<Obtained, Failure>);

/// How many pulls may run at once (`--max-concurrent-pulls`, `--max-pulls-per-host`); both at
/// least 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PullLimits {
    pub overall: usize,
    pub per_host: usize,
}

impl PullLimits {
    pub fn of(config: &Config) -> Self {
        PullLimits {
            overall: config.max_concurrent_pulls.max(1),
            per_host: config.max_pulls_per_host.max(1),
        }
    }
}

impl Default for PullLimits {
    fn default() -> Self {
        PullLimits::of(&Config::default())
    }
}

/// One job in flight: running, or queued for a slot.
struct Flight {
    /// Its single-flight key ([`crate::engine::Job::flight_key`]).
    key: FlightKey,
    waiters: Vec<Pending>,
    /// The host whose slots it takes; `None` for a local file (never queued).
    host: Option<String>,
    state: FlightState,
}

enum FlightState {
    /// Waiting in its host's queue; started by [`Dispatcher::start_queued`].
    Queued(Box<Job>),
    /// Running as a task; `None` once it finished at its first poll, its result waiting in
    /// [`Dispatcher::ready`].
    Running(Option<AbortHandle>),
}

/// Jobs in flight and the processings waiting for each.
pub struct Dispatcher {
    flights: BTreeMap<JobId, Flight>,
    /// Single-flight key → the job in flight under it.
    by_key: BTreeMap<FlightKey, JobId>,
    tasks: JoinSet<Completion>,
    /// The job each task runs, to fail its waiters if the task panics.
    task_jobs: HashMap<tokio::task::Id, JobId>,
    /// On a current-thread runtime (`sim`, the test harness) a job is polled once where it starts
    /// (see [`Dispatcher::spawn`]).
    first_poll_here: bool,
    /// Jobs that finished at that first poll, in the order they finished: handed out by
    /// [`Dispatcher::try_completion`] and [`Dispatcher::next_completion`] before any task's.
    ready: VecDeque<Completion>,
    last_job: JobId,
    limits: PullLimits,
    /// Per host: the queued pulls, oldest first.
    queued: BTreeMap<String, VecDeque<JobId>>,
    /// Hosts with queued pulls, in the order they get the next free slot.
    turn: VecDeque<String>,
    /// Per host: pulls running (hosts with none are absent).
    running: BTreeMap<String, usize>,
    running_total: usize,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("in_flight", &self.flights.len())
            .field("pulls_running", &self.running_total)
            .field("pulls_queued", &self.queued_pulls())
            .finish()
    }
}

impl Default for Dispatcher {
    fn default() -> Self {
        Self::new(PullLimits::default())
    }
}

impl Dispatcher {
    pub fn new(limits: PullLimits) -> Self {
        Dispatcher {
            flights: BTreeMap::new(),
            by_key: BTreeMap::new(),
            tasks: JoinSet::new(),
            task_jobs: HashMap::new(),
            first_poll_here: tokio::runtime::Handle::try_current()
                .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread),
            ready: VecDeque::new(),
            last_job: 0,
            limits,
            queued: BTreeMap::new(),
            turn: VecDeque::new(),
            running: BTreeMap::new(),
            running_total: 0,
        }
    }

    /// Jobs in flight: running, or queued for a pull slot.
    pub fn in_flight(&self) -> usize {
        self.flights.len()
    }

    /// Pulls waiting for a slot.
    pub fn queued_pulls(&self) -> usize {
        self.queued.values().map(VecDeque::len).sum()
    }

    /// Pulls running now (local file reads not counted).
    pub fn running_pulls(&self) -> usize {
        self.running_total
    }

    /// Begins every processing the engine queued: results known at once are committed now;
    /// fetches run as tasks (joining an identical one already in flight). Then aborts the jobs no
    /// current processing waits for any more. Returns the ids of the processings left waiting for a
    /// fetch, and of those whose job was aborted (they are over). `now` is the instant they begin
    /// (and those with a result at once finish): nothing here waits.
    pub fn dispatch(&mut self, engine: &mut Engine, now: Timestamp) -> Dispatched {
        let mut waiting = Vec::new();
        loop {
            let queue = engine.take_queue();
            if queue.is_empty() {
                break;
            }
            for (key, trigger) in queue {
                match engine.begin(&key, trigger, now) {
                    None => {}
                    Some(Begun::Done(pending, result)) => engine.finish(pending, result, now),
                    Some(Begun::Fetch(pending, job)) => {
                        waiting.push(pending.id);
                        self.join_or_add(engine, pending, job);
                    }
                }
            }
        }
        let aborted = self.abort_stale(engine);
        self.start_queued(engine);
        Dispatched { waiting, aborted }
    }

    /// Makes `pending` wait for `job`: joins the identical job in flight, or adds it (running at
    /// once without a host, queued for a pull slot with one).
    fn join_or_add(&mut self, engine: &Engine, pending: Pending, job: Job) {
        let key = job.flight_key();
        if let Some(flight) = self
            .by_key
            .get(&key)
            .and_then(|id| self.flights.get_mut(id))
        {
            flight.waiters.push(pending);
            return;
        }
        self.last_job += 1;
        let id = self.last_job;
        let host = job.pull_host().map(str::to_string);
        self.by_key.insert(key.clone(), id);
        let state = match &host {
            None => FlightState::Running(self.spawn(engine, id, job)),
            Some(h) => {
                let queue = self.queued.entry(h.clone()).or_default();
                if queue.is_empty() {
                    self.turn.push_back(h.clone());
                }
                queue.push_back(id);
                FlightState::Queued(Box::new(job))
            }
        };
        self.flights.insert(
            id,
            Flight {
                key,
                waiters: vec![pending],
                host,
                state,
            },
        );
    }

    /// Starts a job. On a current-thread runtime, while no other job runs, its task would be the
    /// next thing to run on this thread anyway: the job is polled once here instead, and one that
    /// finishes at once (a simulated host answers without waiting) costs no task; its result is
    /// handed out as a task's would be. Otherwise, and when it must wait, it runs as a task.
    /// `None` when it finished.
    fn spawn(&mut self, engine: &Engine, id: JobId, job: Job) -> Option<AbortHandle> {
        let fetcher = engine.fetcher().clone();
        let verifier = engine.cache().verifier().clone();
        let run = async move {
            let result = run_job(&fetcher, &job).await;
            // A module the source confirmed may still be in its start-up verification: it is
            // served only once verified (see `Engine::lost_cache_hit` for one that failed).
            if let Ok(Obtained::Revalidated(key)) = &result {
                verifier.wait(key).await;
            }
            (id, result)
        };
        // Only while no other job runs: a job's task woken at this instant runs before a task
        // started now would, and its requests must come first.
        let task = if self.first_poll_here && self.tasks.is_empty() {
            let mut run = Box::pin(run);
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            // A panic fails the job's waiters, as a task's would.
            let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run.as_mut().poll(&mut cx)
            }));
            match polled {
                Ok(std::task::Poll::Pending) => {}
                Ok(std::task::Poll::Ready(c)) => {
                    self.ready.push_back(c);
                    return None;
                }
                Err(_) => {
                    let failure = crate::fetch::FetchError::Download(format!(
                        "internal error while fetching: job {id} panicked"
                    ));
                    self.ready.push_back((id, Err(failure.into())));
                    return None;
                }
            }
            // Polled again by its task, which registers the task's waker.
            self.tasks.spawn(run)
        } else {
            self.tasks.spawn(run)
        };
        self.task_jobs.insert(task.id(), id);
        Some(task)
    }

    /// Starts queued pulls while slots are free: each host with queued pulls in turn gets the next
    /// free slot (its oldest pull), unless it runs its maximum already.
    fn start_queued(&mut self, engine: &Engine) {
        let mut passed = 0;
        while self.running_total < self.limits.overall && passed < self.turn.len() {
            let Some(host) = self.turn.pop_front() else {
                break;
            };
            if self.running.get(&host).copied().unwrap_or(0) >= self.limits.per_host {
                self.turn.push_back(host);
                passed += 1;
                continue;
            }
            passed = 0;
            let queue = self
                .queued
                .get_mut(&host)
                .expect("a host in turn has a queue");
            let id = queue.pop_front().expect("a host in turn has a queued pull");
            if queue.is_empty() {
                self.queued.remove(&host);
            } else {
                self.turn.push_back(host.clone());
            }
            let mut flight = self.flights.remove(&id).expect("queued ids are flights");
            let FlightState::Queued(job) = flight.state else {
                unreachable!("queued ids are queued flights");
            };
            flight.state = FlightState::Running(self.spawn(engine, id, *job));
            self.flights.insert(id, flight);
            *self.running.entry(host).or_default() += 1;
            self.running_total += 1;
        }
        engine
            .metrics()
            .set_pulls(self.running_total, self.queued_pulls());
    }

    /// Aborts the jobs whose every waiter is stale: nothing would commit their result, and their
    /// requests would only load the source. Returns the ids of those waiters.
    fn abort_stale(&mut self, engine: &Engine) -> Vec<u64> {
        let stale: Vec<JobId> = self
            .flights
            .iter()
            .filter(|(_, f)| f.waiters.iter().all(|p| !engine.is_current(p)))
            .map(|(id, _)| *id)
            .collect();
        let mut ids = Vec::new();
        for id in stale {
            if let Some(flight) = self.remove(id) {
                if let FlightState::Running(Some(task)) = &flight.state {
                    task.abort();
                }
                ids.extend(flight.waiters.iter().map(|p| p.id));
            }
        }
        ids
    }

    /// Forgets a flight and frees what it held: its slot when running, its queue place when
    /// queued.
    fn remove(&mut self, id: JobId) -> Option<Flight> {
        let flight = self.flights.remove(&id)?;
        if self.by_key.get(&flight.key) == Some(&id) {
            self.by_key.remove(&flight.key);
        }
        if let Some(host) = &flight.host {
            match flight.state {
                FlightState::Running(_) => {
                    let n = self.running.get_mut(host).expect("a running pull counts");
                    *n -= 1;
                    if *n == 0 {
                        self.running.remove(host);
                    }
                    self.running_total -= 1;
                }
                FlightState::Queued(_) => {
                    let queue = self.queued.get_mut(host).expect("a queued pull is queued");
                    queue.retain(|q| *q != id);
                    if queue.is_empty() {
                        self.queued.remove(host);
                        self.turn.retain(|h| h != host);
                    }
                }
            }
        }
        Some(flight)
    }

    /// The next finished job. Pending forever while nothing is in flight. Cancel-safe.
    pub async fn next_completion(&mut self) -> Completion {
        if let Some(c) = self.try_completion() {
            return c;
        }
        loop {
            match self.tasks.join_next_with_id().await {
                Some(joined) => {
                    if let Some(c) = self.completion(joined) {
                        return c;
                    }
                }
                None => std::future::pending().await,
            }
        }
    }

    /// A job that finished at its first poll and is still in flight (not aborted since).
    fn take_ready(&mut self) -> Option<Completion> {
        while let Some(c) = self.ready.pop_front() {
            if self.flights.contains_key(&c.0) {
                return Some(c);
            }
        }
        None
    }

    /// A job that has finished already, if any (never waits): the tasks that finished while the
    /// driver waited, then the jobs that finished at their first poll since.
    pub fn try_completion(&mut self) -> Option<Completion> {
        while let Some(joined) = self.tasks.try_join_next_with_id() {
            if let Some(c) = self.completion(joined) {
                return Some(c);
            }
        }
        self.take_ready()
    }

    /// What a joined task yields: its result; a failure for its waiters if it panicked; nothing if
    /// it was aborted.
    fn completion(
        &mut self,
        joined: Result<(tokio::task::Id, Completion), tokio::task::JoinError>,
    ) -> Option<Completion> {
        match joined {
            Ok((task, c)) => {
                self.task_jobs.remove(&task);
                Some(c)
            }
            Err(e) => {
                let job = self.task_jobs.remove(&e.id())?;
                e.is_panic().then(|| {
                    let failure = crate::fetch::FetchError::Download(format!(
                        "internal error while fetching: {e}"
                    ));
                    (job, Err(failure.into()))
                })
            }
        }
    }

    /// Commits a finished job for every processing waiting on it. The download is committed by
    /// the first waiter that is still current (the plugin may have changed or gone while it ran);
    /// the others are served what it committed; the job's slot goes to the next queued pull.
    /// Returns the ids of the processings that finished, at `now`.
    pub fn complete(
        &mut self,
        engine: &mut Engine,
        (job, result): Completion,
        now: Timestamp,
    ) -> Vec<u64> {
        let Some(flight) = self.remove(job) else {
            // Aborted meanwhile: its waiters are over already.
            return Vec::new();
        };
        if engine.lost_cache_hit(&result) {
            // The cached module failed its start-up verification (and is gone): each waiter is
            // planned again under its own id — a pull now — so whoever waits for it still does.
            let mut ids = Vec::new();
            for p in flight.waiters {
                match engine.begin_again(p.clone()) {
                    Some(Begun::Fetch(p, job)) => self.join_or_add(engine, p, job),
                    Some(Begun::Done(p, r)) => {
                        ids.push(p.id);
                        engine.finish(p, r, now);
                    }
                    None => ids.push(p.id),
                }
            }
            self.start_queued(engine);
            return ids;
        }
        let ids = flight.waiters.iter().map(|p| p.id).collect();
        let (current, stale): (Vec<_>, Vec<_>) = flight
            .waiters
            .into_iter()
            .partition(|p| engine.is_current(p));
        let mut waiters = current.into_iter().chain(stale);
        if let Some(first) = waiters.next() {
            let shared: Vec<_> = waiters.map(|p| (p, share_result(&result))).collect();
            engine.finish(first, result, now);
            for (p, r) in shared {
                engine.finish(p, r, now);
            }
        }
        // Its slot goes to the next queued pull (also when the caller dispatches nothing now).
        self.start_queued(engine);
        ids
    }
}

/// What [`Dispatcher::dispatch`] left running and what it aborted.
#[derive(Debug, Default)]
pub struct Dispatched {
    /// Processings now waiting for a fetch.
    pub waiting: Vec<u64>,
    /// Processings whose job was aborted because none of its waiters was current any more.
    pub aborted: Vec<u64>,
}
