//! The responses a proxied Envoy stream was sent and has not answered yet, under the send budget
//! and the ACK deadline of `serve`'s port (`xds/limits.rs`, docs/behavior.md §11 "Bounds").
//!
//! `serve` holds one response per stream until its ACK; the proxy forwards every upstream
//! response at once, several per stream and type. So each forwarded response takes its own
//! [`Grant`] of the [`SendBudget`] (its encoded size) and gets its own deadline, and Envoy's ACK
//! or NACK of a response releases it and every response sent before it on the stream: HTTP/2
//! delivers a stream's bytes in order, so Envoy has read those too. A response that does not fit
//! in the budget waits (its stream forwards nothing else meanwhile, and stops reading its
//! upstream stream) until some response is answered anywhere; the oldest unanswered response
//! past its deadline resets the stream.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::xds::limits::{Grant, SendBudget};

/// One response sent and not answered yet.
struct Sent {
    type_url: String,
    nonce: String,
    deadline: Instant,
    /// Released with the entry.
    _grant: Grant,
}

/// The unanswered responses of one Envoy stream (module docs).
pub(super) struct Unread {
    budget: SendBudget,
    timeout: Duration,
    sent: VecDeque<Sent>,
    /// A response waits for the budget (counted there as waiting while this is set).
    waiting: bool,
}

impl Unread {
    pub(super) fn new(budget: SendBudget, timeout: Duration) -> Self {
        Unread {
            budget,
            timeout,
            sent: VecDeque::new(),
            waiting: false,
        }
    }

    /// The budget's grant for a response of `bytes`: `Err(true)` when it does not fit and the
    /// stream starts waiting (count it once), `Err(false)` while it still waits.
    pub(super) fn admit(&mut self, bytes: usize) -> Result<Grant, bool> {
        self.budget.admit(bytes, &mut self.waiting)
    }

    /// A response of `type_url` and `nonce` went to Envoy under `grant`; returns its deadline.
    pub(super) fn sent(&mut self, type_url: &str, nonce: &str, grant: Grant) -> Instant {
        let deadline = Instant::now() + self.timeout;
        self.sent.push_back(Sent {
            type_url: type_url.to_string(),
            nonce: nonce.to_string(),
            deadline,
            _grant: grant,
        });
        deadline
    }

    /// Envoy answered (ACK or NACK) the response of `type_url` and `nonce`: it and every
    /// response sent before it are read. A nonce of no unanswered response changes nothing.
    pub(super) fn answered(&mut self, type_url: &str, nonce: &str) {
        if nonce.is_empty() {
            return;
        }
        if let Some(at) =
            (self.sent.iter()).position(|s| s.nonce == nonce && s.type_url == type_url)
        {
            self.sent.drain(..=at);
        }
    }

    /// Whether some response awaits its answer.
    pub(super) fn is_empty(&self) -> bool {
        self.sent.is_empty()
    }

    /// The deadline of the oldest unanswered response.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.sent.front().map(|s| s.deadline)
    }

    /// Marked changed when a grant is released ([`SendBudget::watch_released`]).
    pub(super) fn watch_released(&self) -> tokio::sync::watch::Receiver<u64> {
        self.budget.watch_released()
    }
}

impl Drop for Unread {
    fn drop(&mut self) {
        if self.waiting {
            self.budget.stop_waiting();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer releases its response and the earlier ones, whatever their type; an unknown
    /// nonce, or a known nonce of another type, releases nothing.
    #[tokio::test]
    async fn an_answer_releases_its_response_and_the_earlier_ones() {
        let gauge = prometheus::IntGauge::new("g", "g").unwrap();
        let mut unread = Unread::new(SendBudget::new(100, gauge.clone()), Duration::from_secs(1));
        for (t, n) in [("lds", "1"), ("cds", "1"), ("lds", "2")] {
            let grant = unread.admit(30).expect("fits");
            unread.sent(t, n, grant);
        }
        assert_eq!(gauge.get(), 90);
        assert_eq!(unread.admit(30).err(), Some(true), "starts waiting");
        assert_eq!(unread.admit(30).err(), Some(false), "still waits");
        unread.answered("lds", "7");
        unread.answered("ecds", "1");
        unread.answered("lds", "");
        assert_eq!(gauge.get(), 90);
        unread.answered("cds", "1");
        assert_eq!(gauge.get(), 30);
        let grant = unread.admit(30).expect("fits again");
        assert!(!unread.waiting);
        unread.sent("ecds", "a", grant);
        unread.answered("ecds", "a");
        assert!(unread.is_empty());
        assert_eq!(gauge.get(), 0);
    }
}
