//! One log line per key and interval, for whatever a peer or a broken dependency can make repeat
//! without end: the xDS port's reconnect storms, NACK loops and refusals (`crate::xds::limits`),
//! and the same pull failing again at every background retry (`crate::driver`). The lines held
//! back are counted, and the count is reported with the next line let through
//! (`suppressed`). Memory is bounded: past [`LOG_KEYS`] keys (or those given to
//! [`LogGate::with_keys`]), new keys share one line.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Keys a [`LogGate::new`] remembers; beyond them, keys share one line per interval.
pub const LOG_KEYS: usize = 1024;

/// One log line per key and interval (module docs).
#[derive(Debug)]
pub struct LogGate {
    interval: Duration,
    max_keys: usize,
    keys: Mutex<HashMap<String, (Instant, u64)>>,
}

impl LogGate {
    pub fn new(interval: Duration) -> Self {
        Self::with_keys(interval, LOG_KEYS)
    }

    /// A gate telling `max_keys` keys apart (instead of [`LOG_KEYS`]).
    pub fn with_keys(interval: Duration, max_keys: usize) -> Self {
        LogGate {
            interval,
            max_keys,
            keys: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(suppressed)` when a line for `key` may be logged now (`suppressed`: lines held back
    /// since the last one); `None` when it is held back and counted.
    pub fn admit(&self, key: &str) -> Option<u64> {
        let now = Instant::now();
        let mut keys = self.keys.lock().expect("log gate lock");
        if keys.len() >= self.max_keys && !keys.contains_key(key) {
            keys.retain(|_, (at, _)| now.duration_since(*at) < self.interval);
        }
        let key = if keys.len() >= self.max_keys && !keys.contains_key(key) {
            "(other)"
        } else {
            key
        };
        match keys.get_mut(key) {
            Some((at, suppressed)) if now.duration_since(*at) < self.interval => {
                *suppressed += 1;
                None
            }
            Some((at, suppressed)) => {
                *at = now;
                Some(std::mem::take(suppressed))
            }
            None => {
                keys.insert(key.to_string(), (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn log_gate_lets_one_line_per_interval_and_counts_the_rest() {
        let gate = LogGate::new(Duration::from_secs(10));
        assert_eq!(gate.admit("a"), Some(0));
        for _ in 0..5 {
            assert_eq!(gate.admit("a"), None);
        }
        assert_eq!(gate.admit("b"), Some(0), "keys are apart");
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(gate.admit("a"), Some(5));
        assert_eq!(gate.admit("a"), None);
        // Many keys: memory stays bounded, the overflow shares one line.
        for i in 0..(LOG_KEYS * 3) {
            gate.admit(&format!("k{i}"));
        }
        assert!(gate.keys.lock().unwrap().len() <= LOG_KEYS + 1);
    }
}
