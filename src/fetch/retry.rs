//! Retries and backoff (behavior.md §4.1): at most `max_attempts` attempts per request, exponential
//! backoff from 500 ms by a factor of 1.5 capped at 60 s, and one overall deadline per pull.
//! Jitter is optional and seeded, so the simulator is reproducible.

use std::future::Future;
use std::time::Duration;

use super::{FetchError, Fetcher};
use crate::clock::Timestamp;

pub const INITIAL_BACKOFF: Duration = Duration::from_millis(500);
pub const BACKOFF_FACTOR: f64 = 1.5;
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Jitter spreads each delay over ±this fraction.
pub const JITTER_FRACTION: f64 = 0.2;

/// Exponential backoff; `next()` gives the wait before the next attempt.
#[derive(Clone, Debug)]
pub struct Backoff {
    next: Duration,
    rng: Option<fastrand::Rng>,
}

impl Backoff {
    /// `jitter_seed`: `None` for exact delays.
    pub fn new(jitter_seed: Option<u64>) -> Self {
        Backoff {
            next: INITIAL_BACKOFF,
            rng: jitter_seed.map(fastrand::Rng::with_seed),
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = base.mul_f64(BACKOFF_FACTOR).min(MAX_BACKOFF);
        match &mut self.rng {
            Some(rng) => {
                let f = 1.0 + JITTER_FRACTION * (2.0 * rng.f64() - 1.0);
                base.mul_f64(f).min(MAX_BACKOFF)
            }
            None => base,
        }
    }
}

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

/// Runs `attempt(timeout)` until it succeeds, fails fatally, runs out of attempts or hits the pull
/// deadline. Each call of `attempt` is one counted request; its argument is the time it may take.
pub async fn with_retries<T, F, Fut>(
    fetcher: &Fetcher,
    budget: PullBudget,
    mut attempt: F,
) -> Result<T, FetchError>
where
    F: FnMut(Duration) -> Fut,
    Fut: Future<Output = Result<T, AttemptError>>,
{
    let mut backoff = fetcher.backoff();
    let mut attempts = 0;
    loop {
        let now = fetcher.now();
        let remaining = budget.deadline.since(now);
        let timeout = fetcher.config.request_timeout.min(remaining);
        attempts += 1;
        let err = match attempt(timeout).await {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_delays_grow_by_half_and_cap() {
        let mut b = Backoff::new(None);
        let d: Vec<_> = (0..4).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(d, vec![500, 750, 1125, 1687]);
        for _ in 0..30 {
            b.next_delay();
        }
        assert_eq!(b.next_delay(), MAX_BACKOFF);
    }

    #[test]
    fn jitter_is_reproducible_and_bounded() {
        let run = |seed| {
            let mut b = Backoff::new(Some(seed));
            (0..10).map(|_| b.next_delay()).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        let mut exact = Backoff::new(None);
        for d in run(7) {
            let e = exact.next_delay();
            assert!(
                d >= e.mul_f64(1.0 - JITTER_FRACTION)
                    && d <= e.mul_f64(1.0 + JITTER_FRACTION).min(MAX_BACKOFF)
            );
        }
    }
}
