//! Exponential backoff, the one mechanism behind every wait for another try (behavior.md §4.1,
//! §7): the retries of one request inside a pull ([`FETCH`]), the background retries of a
//! rejected plugin and of a status write ([`BACKGROUND_RETRY`]), and the reconnects of the
//! Kubernetes watches ([`WATCH`]).
//!
//! Jitter is optional and seeded, so the simulator is reproducible.

use std::time::Duration;

/// Jitter spreads each delay over ±this fraction.
pub const JITTER_FRACTION: f64 = 0.2;

/// The shape of a backoff sequence: `initial`, then each delay `factor` times the previous one,
/// never more than `max`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BackoffPolicy {
    pub initial: Duration,
    pub factor: f64,
    pub max: Duration,
}

/// Between the attempts of one request: 500 ms, ×1.5, at most 60 s (behavior.md §4.1).
pub const FETCH: BackoffPolicy = BackoffPolicy {
    initial: Duration::from_millis(500),
    factor: 1.5,
    max: Duration::from_secs(60),
};

/// Between the background retries of a rejected plugin: 1 s, doubling, at most 5 minutes.
pub const BACKGROUND_RETRY: BackoffPolicy = BackoffPolicy {
    initial: Duration::from_secs(1),
    factor: 2.0,
    max: Duration::from_secs(5 * 60),
};

/// Between the reconnects of a Kubernetes watch (API server restarts, lost connections): 500 ms,
/// doubling, at most 5 s, so serving catches up with the cluster soon after an outage (one list
/// per watch every 5 s at worst is nothing to an API server).
pub const WATCH: BackoffPolicy = BackoffPolicy {
    initial: Duration::from_millis(500),
    factor: 2.0,
    max: Duration::from_secs(5),
};

/// A running backoff sequence; [`Backoff::next_delay`] gives the next wait.
#[derive(Clone, Debug)]
pub struct Backoff {
    policy: BackoffPolicy,
    next: Duration,
    rng: Option<fastrand::Rng>,
}

impl Backoff {
    /// `jitter_seed`: `None` for exact delays.
    pub fn new(policy: BackoffPolicy, jitter_seed: Option<u64>) -> Self {
        Backoff {
            policy,
            next: policy.initial,
            rng: jitter_seed.map(fastrand::Rng::with_seed),
        }
    }

    /// Starts the sequence again from `initial` (after a success).
    pub fn reset(&mut self) {
        self.next = self.policy.initial;
    }

    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = base.mul_f64(self.policy.factor).min(self.policy.max);
        match &mut self.rng {
            Some(rng) => {
                let f = 1.0 + JITTER_FRACTION * (2.0 * rng.f64() - 1.0);
                base.mul_f64(f).min(self.policy.max)
            }
            None => base,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn millis(policy: BackoffPolicy, n: usize) -> Vec<u128> {
        let mut b = Backoff::new(policy, None);
        (0..n).map(|_| b.next_delay().as_millis()).collect()
    }

    #[test]
    fn fetch_delays_grow_by_half_and_cap() {
        assert_eq!(millis(FETCH, 4), vec![500, 750, 1125, 1687]);
        assert_eq!(*millis(FETCH, 40).last().unwrap(), 60_000);
    }

    #[test]
    fn background_retries_double_up_to_five_minutes() {
        assert_eq!(
            millis(BACKGROUND_RETRY, 10),
            vec![1000, 2000, 4000, 8000, 16000, 32000, 64000, 128000, 256000, 300000]
        );
    }

    #[test]
    fn jitter_is_reproducible_and_bounded() {
        let run = |seed| {
            let mut b = Backoff::new(FETCH, Some(seed));
            (0..10).map(|_| b.next_delay()).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        let mut exact = Backoff::new(FETCH, None);
        for d in run(7) {
            let e = exact.next_delay();
            assert!(
                d >= e.mul_f64(1.0 - JITTER_FRACTION)
                    && d <= e.mul_f64(1.0 + JITTER_FRACTION).min(FETCH.max)
            );
        }
    }
}
