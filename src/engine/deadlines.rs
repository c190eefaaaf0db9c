//! The plugins' background retry deadlines, kept in time order so that
//! [`Engine::next_deadline`](super::Engine::next_deadline) is O(log n) and
//! [`Engine::run_due`](super::Engine::run_due) visits only the retries that are due, however many
//! plugins there are.
//!
//! [`PluginState::retry`](super::PluginState::retry) stays the per-plugin record (what the admin
//! views show); this index mirrors it. Every change of a plugin's retry goes through
//! [`Engine::set_retry`](super::Engine::set_retry), which hands the old and the new deadline here,
//! so the two never disagree.
//!
//! Order: by due time, then by plugin key — the order of the scan over the (key-ordered) plugin map
//! this replaces, so retries due at the same instant still run in plugin order.

use std::collections::BTreeSet;

use crate::clock::Timestamp;
use crate::plugin::ObjectKey;

/// The retry deadlines, earliest first; ties in plugin key order.
#[derive(Clone, Debug, Default)]
pub struct RetryQueue {
    due: BTreeSet<(Timestamp, ObjectKey)>,
}

impl RetryQueue {
    /// A plugin's deadline moves from `old` to `new` (either may be `None`: none scheduled).
    pub fn reschedule(&mut self, key: &ObjectKey, old: Option<Timestamp>, new: Option<Timestamp>) {
        if old == new {
            return;
        }
        if let Some(old) = old {
            let removed = self.due.remove(&(old, key.clone()));
            debug_assert!(removed, "retry of {key} at {old} was not indexed");
        }
        if let Some(new) = new {
            self.due.insert((new, key.clone()));
        }
    }

    /// The earliest deadline and its plugin.
    pub fn first(&self) -> Option<(Timestamp, &ObjectKey)> {
        self.due.first().map(|(t, k)| (*t, k))
    }

    /// How many plugins have a retry scheduled.
    pub fn len(&self) -> usize {
        self.due.len()
    }

    pub fn is_empty(&self) -> bool {
        self.due.is_empty()
    }

    /// Every deadline in the order they run.
    pub fn iter(&self) -> impl Iterator<Item = (Timestamp, &ObjectKey)> {
        self.due.iter().map(|(t, k)| (*t, k))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;

    fn key(i: usize) -> ObjectKey {
        ObjectKey::new(format!("ns{}", i % 3), format!("p{i}"))
    }

    fn at(s: u64) -> Timestamp {
        Timestamp(Duration::from_secs(s))
    }

    #[test]
    fn a_removed_deadline_disappears() {
        let mut q = RetryQueue::default();
        q.reschedule(&key(1), None, Some(at(5)));
        q.reschedule(&key(2), None, Some(at(9)));
        q.reschedule(&key(1), Some(at(5)), None);
        assert_eq!(q.first(), Some((at(9), &key(2))));
        assert_eq!(q.len(), 1);
        q.reschedule(&key(2), Some(at(9)), None);
        assert!(q.is_empty());
        assert_eq!(q.first(), None);
    }

    #[test]
    fn an_updated_deadline_replaces_the_old_one() {
        let mut q = RetryQueue::default();
        q.reschedule(&key(1), None, Some(at(5)));
        q.reschedule(&key(2), None, Some(at(7)));
        q.reschedule(&key(1), Some(at(5)), Some(at(10)));
        let order: Vec<_> = q.iter().map(|(t, k)| (t, k.clone())).collect();
        assert_eq!(order, vec![(at(7), key(2)), (at(10), key(1))]);
        // The same deadline again is no change.
        q.reschedule(&key(2), Some(at(7)), Some(at(7)));
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn ties_run_in_plugin_key_order() {
        let mut q = RetryQueue::default();
        let keys = [
            ObjectKey::new("b", "a"),
            ObjectKey::new("a", "z"),
            ObjectKey::new("a", "b"),
        ];
        for k in &keys {
            q.reschedule(k, None, Some(at(3)));
        }
        let order: Vec<_> = q.iter().map(|(_, k)| k.clone()).collect();
        assert_eq!(
            order,
            vec![
                ObjectKey::new("a", "b"),
                ObjectKey::new("a", "z"),
                ObjectKey::new("b", "a"),
            ]
        );
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// Plugin `.0`'s retry becomes `.1` (seconds) or none.
        Set(usize, Option<u64>),
        /// The earliest due retry at or before `.0` runs (and is cleared), as `run_due` does.
        RunDue(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..12usize, proptest::option::of(0..20u64)).prop_map(|(k, d)| Op::Set(k, d)),
            1 => (0..20u64).prop_map(Op::RunDue),
        ]
    }

    proptest! {
        /// The queue agrees with the scan it replaces (the minimum `(due, key)` over a key-ordered
        /// map of per-plugin retries) after any sequence of changes.
        #[test]
        fn agrees_with_a_scan_of_every_plugin(ops in proptest::collection::vec(op(), 0..80)) {
            let mut q = RetryQueue::default();
            let mut model: BTreeMap<ObjectKey, Option<Timestamp>> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Set(i, due) => {
                        let k = key(i);
                        let new = due.map(at);
                        let old = model.insert(k.clone(), new).flatten();
                        q.reschedule(&k, old, new);
                    }
                    Op::RunDue(now) => {
                        let scan = model
                            .iter()
                            .filter_map(|(k, d)| d.map(|d| (d, k.clone())))
                            .filter(|(d, _)| *d <= at(now))
                            .min();
                        let queued = q
                            .first()
                            .filter(|(d, _)| *d <= at(now))
                            .map(|(d, k)| (d, k.clone()));
                        prop_assert_eq!(&queued, &scan);
                        if let Some((d, k)) = scan {
                            model.insert(k.clone(), None);
                            q.reschedule(&k, Some(d), None);
                        }
                    }
                }
                let scan_min = model.values().flatten().min().copied();
                prop_assert_eq!(q.first().map(|(d, _)| d), scan_min);
                prop_assert_eq!(q.len(), model.values().flatten().count());
            }
        }
    }

    /// The engine keeps the queue in step with the plugins' retries through rejections, edits and
    /// deletions, driven by the same driver as `serve` against the simulated world.
    #[test]
    fn the_engine_keeps_the_queue_in_step_with_its_plugins() {
        use std::sync::Arc;

        use crate::clock::TokioClock;
        use crate::driver::tests::sim_driver;
        use crate::engine::Engine;
        use crate::sim::world::SimWorld;

        /// The scan the queue replaced.
        fn scan(engine: &Engine) -> Vec<(Timestamp, ObjectKey)> {
            let mut v: Vec<_> = (engine.plugins().iter())
                .filter_map(|(k, s)| s.retry.map(|d| (d, k.clone())))
                .collect();
            v.sort();
            v
        }
        fn queued(engine: &Engine) -> Vec<(Timestamp, ObjectKey)> {
            (engine.retries().iter())
                .map(|(d, k)| (d, k.clone()))
                .collect()
        }
        fn plugin(name: &str, label: &str) -> serde_json::Value {
            serde_json::json!({
                "apiVersion": "extensions.istio.io/v1alpha1",
                "kind": "WasmPlugin",
                "metadata": {"name": name, "namespace": "default", "labels": {"l": label}},
                "spec": {"url": "oci://reg.example/nothing/here:v1"},
            })
        }

        let (rt, paused) = crate::clock::paused_runtime().unwrap();
        rt.block_on(async {
            let clock = Arc::new(TokioClock::new(Timestamp::ZERO));
            let world = Arc::new(SimWorld::new(clock.clone()));
            let mut driver = sim_driver(clock, world);
            let purge_only = driver.engine().next_deadline();
            // Nothing is published: both pulls are rejected and retried in the background.
            for name in ["b", "a"] {
                let ticket = driver.apply(&plugin(name, "1")).ticket;
                driver.run_until_done(&ticket).await.unwrap();
            }
            let (a, b) = (
                ObjectKey::new("default", "a"),
                ObjectKey::new("default", "b"),
            );
            assert_eq!(queued(driver.engine()).len(), 2);
            assert_eq!(queued(driver.engine()), scan(driver.engine()));
            let first = driver.engine().retries().first().unwrap().0;
            assert_eq!(driver.engine().next_deadline(), first.min(purge_only));

            // A change processes `b` again: its new retry replaces the old one.
            let before = driver.engine().plugin(&b).unwrap().retry;
            tokio::time::advance(Duration::from_secs(1)).await;
            let ticket = driver.apply(&plugin("b", "2")).ticket;
            driver.run_until_done(&ticket).await.unwrap();
            assert_ne!(driver.engine().plugin(&b).unwrap().retry, before);
            assert_eq!(queued(driver.engine()).len(), 2);
            assert_eq!(queued(driver.engine()), scan(driver.engine()));

            // A deleted plugin's retry disappears.
            let ticket = driver.delete_plugin(&a).unwrap().ticket;
            driver.run_until_done(&ticket).await.unwrap();
            assert_eq!(queued(driver.engine()), scan(driver.engine()));
            assert_eq!(queued(driver.engine()).len(), 1);
            assert_eq!(driver.engine().retries().first().unwrap().1, &b);

            // Due retries run (and re-schedule) at their time; the queue follows.
            let due = driver.engine().retries().first().unwrap().0;
            driver.advance_to(due, paused).await.unwrap();
            assert_eq!(queued(driver.engine()), scan(driver.engine()));
            assert!(driver.engine().retries().first().unwrap().0 > due);

            let ticket = driver.delete_plugin(&b).unwrap().ticket;
            driver.run_until_done(&ticket).await.unwrap();
            assert!(driver.engine().retries().is_empty());
            assert_eq!(driver.engine().next_deadline(), purge_only);
        });
    }
}
