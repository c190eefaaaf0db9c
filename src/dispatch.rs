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

use std::collections::{BTreeMap, HashMap};

use tokio::task::{AbortHandle, JoinSet};

use crate::engine::{run_job, share_result, Begun, Engine, Failure, Obtained, Pending};

/// Identifies one job (one task) for the life of the dispatcher.
type JobId = u64;

/// A finished job: which one, and its result.
pub type Completion = (JobId, Result<Obtained, Failure>);

/// One job in flight.
struct Flight {
    /// Its single-flight key ([`crate::engine::Job::flight_key`]).
    key: String,
    waiters: Vec<Pending>,
    task: AbortHandle,
}

/// Jobs in flight and the processings waiting for each.
pub struct Dispatcher {
    flights: BTreeMap<JobId, Flight>,
    /// Single-flight key → the job in flight under it.
    by_key: BTreeMap<String, JobId>,
    tasks: JoinSet<Completion>,
    /// The job each task runs, to fail its waiters if the task panics.
    task_jobs: HashMap<tokio::task::Id, JobId>,
    last_job: JobId,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("in_flight", &self.flights.len())
            .finish()
    }
}

impl Default for Dispatcher {
    fn default() -> Self {
        Self::new()
    }
}

impl Dispatcher {
    pub fn new() -> Self {
        Dispatcher {
            flights: BTreeMap::new(),
            by_key: BTreeMap::new(),
            tasks: JoinSet::new(),
            task_jobs: HashMap::new(),
            last_job: 0,
        }
    }

    /// Jobs running now.
    pub fn in_flight(&self) -> usize {
        self.flights.len()
    }

    /// Begins every processing the engine queued: results known at once are committed now;
    /// fetches run as tasks (joining an identical one already in flight). Then aborts the jobs no
    /// current processing waits for any more. Returns the ids of the processings left waiting for a
    /// fetch, and of those whose job was aborted (they are over).
    pub fn dispatch(&mut self, engine: &mut Engine) -> Dispatched {
        let mut waiting = Vec::new();
        loop {
            let queue = engine.take_queue();
            if queue.is_empty() {
                break;
            }
            for (key, trigger) in queue {
                match engine.begin(&key, trigger) {
                    None => {}
                    Some(Begun::Done(pending, result)) => engine.finish(pending, result),
                    Some(Begun::Fetch(pending, job)) => {
                        waiting.push(pending.id);
                        let key = job.flight_key();
                        if let Some(flight) = self
                            .by_key
                            .get(&key)
                            .and_then(|id| self.flights.get_mut(id))
                        {
                            flight.waiters.push(pending);
                            continue;
                        }
                        self.last_job += 1;
                        let id = self.last_job;
                        let fetcher = engine.fetcher().clone();
                        let task = self
                            .tasks
                            .spawn(async move { (id, run_job(&fetcher, &job).await) });
                        self.task_jobs.insert(task.id(), id);
                        self.by_key.insert(key.clone(), id);
                        self.flights.insert(
                            id,
                            Flight {
                                key,
                                waiters: vec![pending],
                                task,
                            },
                        );
                    }
                }
            }
        }
        let aborted = self.abort_stale(engine);
        Dispatched { waiting, aborted }
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
                flight.task.abort();
                ids.extend(flight.waiters.iter().map(|p| p.id));
            }
        }
        ids
    }

    fn remove(&mut self, id: JobId) -> Option<Flight> {
        let flight = self.flights.remove(&id)?;
        if self.by_key.get(&flight.key) == Some(&id) {
            self.by_key.remove(&flight.key);
        }
        Some(flight)
    }

    /// The next finished job. Pending forever while nothing is in flight. Cancel-safe.
    pub async fn next_completion(&mut self) -> Completion {
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

    /// A job that has finished already, if any (never waits).
    pub fn try_completion(&mut self) -> Option<Completion> {
        loop {
            let joined = self.tasks.try_join_next_with_id()?;
            if let Some(c) = self.completion(joined) {
                return Some(c);
            }
        }
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
    /// the others are served what it committed. Returns the ids of the processings that finished.
    pub fn complete(&mut self, engine: &mut Engine, (job, result): Completion) -> Vec<u64> {
        let Some(flight) = self.remove(job) else {
            // Aborted meanwhile: its waiters are over already.
            return Vec::new();
        };
        let ids = flight.waiters.iter().map(|p| p.id).collect();
        let (current, stale): (Vec<_>, Vec<_>) = flight
            .waiters
            .into_iter()
            .partition(|p| engine.is_current(p));
        let mut waiters = current.into_iter().chain(stale);
        if let Some(first) = waiters.next() {
            let shared: Vec<_> = waiters.map(|p| (p, share_result(&result))).collect();
            engine.finish(first, result);
            for (p, r) in shared {
                engine.finish(p, r);
            }
        }
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
