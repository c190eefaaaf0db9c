//! Retries (behavior.md §4.1): at most `max_attempts` attempts per request, waiting between them by
//! [`crate::backoff::FETCH`], and one overall deadline per pull.

use std::future::Future;
use std::time::Duration;

use super::{FetchError, Fetcher};
use crate::clock::Timestamp;

pub use crate::backoff::Backoff;

/// The overall deadline of one pull, shared by all its requests.
#[derive(Clone, Copy, Debug)]
pub struct PullBudget {
    pub deadline: Timestamp,
}

impl PullBudget {
    pub fn new(deadline: Timestamp) -> Self {
        PullBudget { deadline }
    }
}

/// The result of one attempt that did not succeed.
#[derive(Debug)]
pub enum AttemptError {
    /// Try again after a backoff (connection errors, 5xx, reset mid-body, digest mismatch of a blob).
    Retry(FetchError),
    /// Give up at once (4xx, too large, blocked address, invalid content).
    Fatal(FetchError),
}

/// Runs `attempt(timeout, started)` until it succeeds, fails fatally, runs out of attempts or hits
/// the pull deadline. Each call of `attempt` is one counted request; `timeout` is the time it may
/// take from `started`, the clock reading it was computed from (so the attempt need not read the
/// clock again).
pub async fn with_retries<T, F, Fut>(
    fetcher: &Fetcher,
    budget: PullBudget,
    mut attempt: F,
) -> Result<T, FetchError>
where
    F: FnMut(Duration, Timestamp) -> Fut,
    Fut: Future<Output = Result<T, AttemptError>>,
{
    let mut backoff = fetcher.backoff();
    let mut attempts = 0;
    loop {
        let now = fetcher.now();
        let timeout = fetcher.config.attempt_timeout(budget.deadline.since(now));
        attempts += 1;
        let err = match attempt(timeout, now).await {
            Ok(v) => return Ok(v),
            Err(AttemptError::Fatal(e)) => return Err(e),
            Err(AttemptError::Retry(e)) => e,
        };
        if attempts >= fetcher.config.max_attempts {
            return Err(err);
        }
        let delay = backoff.next_delay();
        if fetcher.now() + delay >= budget.deadline {
            return Err(err);
        }
        fetcher.clock.sleep(delay).await;
    }
}
