//! Leader election for status writes on a `coordination.k8s.io/v1` Lease, with the
//! `kube-lease-manager` crate: every replica serves ECDS; only the holder writes status. A holder
//! renews before the lease duration ends; one that cannot (killed, partitioned) loses it when the
//! duration passes, and another takes over. A replica shutting down releases the Lease at once.

use std::future::Future;

use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{KubeSeries, LeaseOptions};
use crate::backoff::{Backoff, BACKGROUND_RETRY};

/// Runs the election until `shutdown` completes; the receiver says whether this replica leads.
pub fn spawn(
    client: kube::Client,
    options: LeaseOptions,
    series: KubeSeries,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> (watch::Receiver<bool>, JoinHandle<()>) {
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        tokio::pin!(shutdown);
        let namespace =
            (options.namespace.clone()).unwrap_or_else(|| client.default_namespace().to_string());
        let secs = options.duration.as_secs().max(2);
        let mut backoff = Backoff::new(BACKGROUND_RETRY, None);
        loop {
            let build = LeaseManagerBuilder::new(client.clone(), &options.name)
                .with_namespace(&namespace)
                .with_identity(&options.identity)
                .with_duration(secs)
                .with_grace((secs / 3).max(1))
                .build();
            let manager = tokio::select! {
                _ = &mut shutdown => return,
                m = build => m,
            };
            let manager = match manager {
                Ok(m) => m,
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(lease = %options.name, %namespace, error = %e, retry_in = ?delay, "cannot use the status Lease");
                    tokio::select! {
                        _ = &mut shutdown => return,
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
            };
            let (mut leading, handle) = manager.watch().await;
            let stopping = loop {
                tokio::select! {
                    _ = &mut shutdown => break true,
                    r = leading.changed() => {
                        if r.is_err() {
                            break false;
                        }
                        let now = *leading.borrow_and_update();
                        tracing::info!(lease = %options.name, identity = %options.identity, leading = now, "status Lease");
                        series.leader.set(now as i64);
                        tx.send_replace(now);
                        backoff = Backoff::new(BACKGROUND_RETRY, None);
                    }
                }
            };
            tx.send_replace(false);
            series.leader.set(0);
            drop(leading);
            match handle.await {
                Ok(Ok(manager)) if stopping => {
                    if let Err(e) = manager.release().await {
                        tracing::debug!(error = %e, "releasing the status Lease");
                    }
                    return;
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "status Lease election stopped; restarting")
                }
                _ => {}
            }
            if stopping {
                return;
            }
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    });
    (rx, task)
}

/// The status writer's own check, before it writes, that this replica still holds the Lease as
/// the API server has it: the holder is this identity and `renewTime + leaseDurationSeconds` is
/// still ahead. The election above keeps saying "leading" while it merely fails to renew (a
/// partition), so without this check a cut-off leader would go on writing; with it, writes stop at
/// the latest when the Lease expires. A confirmation is trusted for at most a second.
pub struct LeaseGuard {
    api: kube::Api<k8s_openapi::api::coordination::v1::Lease>,
    name: String,
    identity: String,
    confirmed_until: Option<tokio::time::Instant>,
}

impl LeaseGuard {
    pub fn new(client: kube::Client, options: &LeaseOptions) -> LeaseGuard {
        let namespace =
            (options.namespace.clone()).unwrap_or_else(|| client.default_namespace().to_string());
        LeaseGuard {
            api: kube::Api::namespaced(client, &namespace),
            name: options.name.clone(),
            identity: options.identity.clone(),
            confirmed_until: None,
        }
    }

    pub async fn holds(&mut self) -> bool {
        use crate::clock::Clock as _;
        let now = tokio::time::Instant::now();
        if self.confirmed_until.is_some_and(|t| t > now) {
            return true;
        }
        self.confirmed_until = None;
        let Ok(lease) = self.api.get(&self.name).await else {
            return false;
        };
        let spec = lease.spec.unwrap_or_default();
        let (Some(renewed), Some(secs)) = (spec.renew_time, spec.lease_duration_seconds) else {
            return false;
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return false;
        }
        let expires = renewed.0.as_millisecond() + i64::from(secs) * 1000;
        let left = expires - crate::clock::SystemClock.now().as_millis() as i64;
        if left <= 0 {
            return false;
        }
        self.confirmed_until = Some(now + std::time::Duration::from_millis(left.min(1000) as u64));
        true
    }
}
