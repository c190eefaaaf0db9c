//! Runs the engine's queued processings concurrently, with single-flight downloads (behavior.md §5
//! "Concurrent requests for the same module share one download").
//!
//! The [`Driver`](crate::driver::Driver) calls [`Dispatcher::dispatch`] after every engine call and
//! feeds each [`Dispatcher::next_completion`] back through [`Dispatcher::complete`]. Jobs run as
//! tokio tasks that borrow nothing of the engine; only their results come back to it. Identical
//! jobs in flight at the same time (same URL, same expected checksum, same credentials) share one
//! task: the first waiter commits the downloaded module, the others are served it from the cache.
//! Dropping the dispatcher aborts the jobs in flight (a restarting server abandons them).

use std::collections::{BTreeMap, HashMap};

use tokio::task::JoinSet;

use crate::engine::{run_job, share_result, Begun, Engine, Failure, Obtained, Pending};

/// A finished job: its flight key and result.
pub type Completion = (String, Result<Obtained, Failure>);

/// Jobs in flight and the processings waiting for each.
pub struct Dispatcher {
    inflight: BTreeMap<String, Vec<Pending>>,
    tasks: JoinSet<Completion>,
    /// The flight each task runs, to fail its waiters if the task panics.
    flights: HashMap<tokio::task::Id, String>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("inflight", &self.inflight.len())
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
            inflight: BTreeMap::new(),
            tasks: JoinSet::new(),
            flights: HashMap::new(),
        }
    }

    /// Jobs running now.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Begins every processing the engine queued: results known at once are committed now;
    /// fetches run as tasks (joining an identical one already in flight). Returns the ids of the
    /// processings left waiting for a fetch.
    pub fn dispatch(&mut self, engine: &mut Engine) -> Vec<u64> {
        let mut waiting = Vec::new();
        loop {
            let queue = engine.take_queue();
            if queue.is_empty() {
                return waiting;
            }
            for (key, trigger) in queue {
                match engine.begin(&key, trigger) {
                    None => {}
                    Some(Begun::Done(pending, result)) => engine.finish(pending, result),
                    Some(Begun::Fetch(pending, job)) => {
                        waiting.push(pending.id);
                        let flight = job.flight_key();
                        if let Some(waiters) = self.inflight.get_mut(&flight) {
                            waiters.push(pending);
                            continue;
                        }
                        self.inflight.insert(flight.clone(), vec![pending]);
                        let fetcher = engine.fetcher().clone();
                        let name = flight.clone();
                        let task = self.tasks.spawn(async move {
                            let result = run_job(&fetcher, &job).await;
                            (name, result)
                        });
                        self.flights.insert(task.id(), flight);
                    }
                }
            }
        }
    }

    /// The next finished job. Pending forever while nothing is in flight. Cancel-safe.
    pub async fn next_completion(&mut self) -> Completion {
        loop {
            match self.tasks.join_next_with_id().await {
                Some(Ok((id, c))) => {
                    self.flights.remove(&id);
                    return c;
                }
                // A job that panicked fails its waiters rather than leaving them waiting forever.
                Some(Err(e)) => {
                    if let Some(c) = self.panicked(&e) {
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
            match self.tasks.try_join_next_with_id()? {
                Ok((id, c)) => {
                    self.flights.remove(&id);
                    return Some(c);
                }
                Err(e) => {
                    if let Some(c) = self.panicked(&e) {
                        return Some(c);
                    }
                }
            }
        }
    }

    /// The completion that fails the waiters of a task that panicked.
    fn panicked(&mut self, e: &tokio::task::JoinError) -> Option<Completion> {
        let flight = self.flights.remove(&e.id())?;
        let failure =
            crate::fetch::FetchError::Download(format!("internal error while fetching: {e}"));
        Some((flight, Err(failure.into())))
    }

    /// Commits a finished job for every processing waiting on it. The download is committed by
    /// the first waiter that is still current (the plugin may have changed or gone while it ran);
    /// the others are served what it committed. Returns the ids of the processings that finished.
    pub fn complete(&mut self, engine: &mut Engine, (flight, result): Completion) -> Vec<u64> {
        let waiters = self.inflight.remove(&flight).unwrap_or_default();
        let ids = waiters.iter().map(|p| p.id).collect();
        let (current, stale): (Vec<_>, Vec<_>) =
            waiters.into_iter().partition(|p| engine.is_current(p));
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
