//! Runs the engine's queued processings concurrently, with single-flight downloads (behavior.md §5
//! "Concurrent requests for the same module share one download").
//!
//! The owner of the [`Engine`] (the `serve` controller, the simulator's runner) puts the engine in
//! deferred mode, calls [`Dispatcher::dispatch`] after every engine call, and feeds each
//! [`Dispatcher::next_completion`] back through [`Dispatcher::complete`]. Jobs run as tokio tasks that
//! borrow nothing of the engine; only their results come back to it. Identical jobs in flight at
//! the same time (same URL, same expected checksum, same credentials) share one task: the first
//! waiter commits the downloaded module, the others are served it from the cache.

use std::collections::BTreeMap;

use tokio::sync::mpsc;

use crate::engine::{run_job, share_result, Begun, Engine, Failure, Obtained, Pending};

type Completion = (String, Result<Obtained, Failure>);

/// Jobs in flight and the processings waiting for each.
pub struct Dispatcher {
    inflight: BTreeMap<String, Vec<Pending>>,
    tx: mpsc::UnboundedSender<Completion>,
    rx: mpsc::UnboundedReceiver<Completion>,
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
        let (tx, rx) = mpsc::unbounded_channel();
        Dispatcher {
            inflight: BTreeMap::new(),
            tx,
            rx,
        }
    }

    /// Jobs running now.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Starts every processing the engine queued: cache hits and other results known at once are
    /// committed now; fetches run as tasks (joining an identical one already in flight).
    pub fn dispatch(&mut self, engine: &mut Engine) {
        loop {
            let queue = engine.take_queue();
            if queue.is_empty() {
                return;
            }
            for (key, trigger) in queue {
                match engine.begin(&key, trigger) {
                    None => {}
                    Some(Begun::Done(pending, result)) => engine.finish(pending, result),
                    Some(Begun::Fetch(pending, job, cached)) => {
                        let flight = job.flight_key();
                        if let Some(waiters) = self.inflight.get_mut(&flight) {
                            waiters.push(pending);
                            continue;
                        }
                        self.inflight.insert(flight.clone(), vec![pending]);
                        let fetcher = engine.fetcher().clone();
                        let tx = self.tx.clone();
                        tokio::spawn(async move {
                            let result = run_job(&fetcher, &job, &|k| cached.contains(k)).await;
                            // The receiver lives as long as the dispatcher; a closed one means
                            // the owner is shutting down and the result is not needed.
                            let _ = tx.send((flight, result));
                        });
                    }
                }
            }
        }
    }

    /// The next finished job. Pending forever while nothing is in flight.
    pub async fn next_completion(&mut self) -> Completion {
        match self.rx.recv().await {
            Some(c) => c,
            None => std::future::pending().await,
        }
    }

    /// Commits a finished job for every processing waiting on it, then dispatches what that queued.
    pub fn complete(&mut self, engine: &mut Engine, (flight, result): Completion) {
        let waiters = self.inflight.remove(&flight).unwrap_or_default();
        let mut waiters = waiters.into_iter();
        if let Some(first) = waiters.next() {
            let shared: Vec<_> = waiters.map(|p| (p, share_result(&result))).collect();
            engine.finish(first, result);
            for (p, r) in shared {
                engine.finish(p, r);
            }
        }
        self.dispatch(engine);
    }
}
