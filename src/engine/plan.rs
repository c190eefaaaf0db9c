//! Phase 1 of a processing: the pull policy applied to the cache decides whether the plugin is
//! served from the cache at once or a [`Job`] must fetch something (behavior.md §2, §4.2, §5).

use super::job::{Failure, Job, Obtained};
use super::state::Trigger;
use super::Engine;
use crate::cache::ModuleKey;
use crate::clock::Timestamp;
use crate::plugin::ObjectKey;
use crate::policy::PullPolicy;
use crate::url::ModuleUrl;

/// A processing that was planned (phase 1) and awaits its result.
#[derive(Clone, Debug)]
pub struct Pending {
    /// Unique per engine, in the order processings began.
    pub id: u64,
    pub key: ObjectKey,
    pub version: u64,
    pub trigger: Trigger,
    pub started: Timestamp,
}

/// What phase 1 decided.
pub enum Begun {
    /// Nothing to fetch: commit this result with [`Engine::finish`].
    Done(Pending, Result<Obtained, Failure>),
    /// Run the job ([`super::run_job`]), then [`Engine::finish`].
    Fetch(Pending, Job),
}

/// What phase 1 found: a job to run, or the result at once.
enum Plan {
    Fetch(Job),
    Known(Result<Obtained, Failure>),
}

impl Engine {
    /// Phase 1 for a current plugin at `now` (the driver reads the clock once for all it begins
    /// and commits at one instant); `None` if it is gone.
    pub fn begin(&mut self, key: &ObjectKey, trigger: Trigger, now: Timestamp) -> Option<Begun> {
        let version = self.plugins.get(key)?.version;
        self.next_id += 1;
        let pending = Pending {
            id: self.next_id,
            key: key.clone(),
            version,
            trigger,
            started: now,
        };
        Some(self.plan_for(pending))
    }

    /// Plans a processing again, under the same id, when the cached module its job waited for
    /// failed verification (see [`Engine::lost_cache_hit`]): it now pulls, as if the module had
    /// never been cached. `None` when it is no longer current.
    pub fn begin_again(&mut self, pending: Pending) -> Option<Begun> {
        self.is_current(&pending).then(|| self.plan_for(pending))
    }

    /// True when `result` serves a cached module (a cache hit, a revalidation) that is not
    /// verified in the cache: its file failed the start-up verification and was removed.
    pub fn lost_cache_hit(&mut self, result: &Result<Obtained, Failure>) -> bool {
        self.cache.settle();
        matches!(result, Ok(Obtained::Cached(k) | Obtained::Revalidated(k)) if self.cache.lost_to_verification(k))
    }

    fn plan_for(&mut self, pending: Pending) -> Begun {
        self.cache.settle();
        match self.plan(&pending.key, pending.trigger) {
            Plan::Known(r) => Begun::Done(pending, r),
            Plan::Fetch(job) => Begun::Fetch(pending, job),
        }
    }

    /// Decides from the policy and the cache whether anything must be fetched.
    fn plan(&self, key: &ObjectKey, trigger: Trigger) -> Plan {
        let st = &self.plugins[key];
        let expected = st.decision.expected_checksum.clone();
        // Only cache lookups by URL need it as text: not an OCI pull that must go to the registry.
        let url_str = || st.url.to_string();
        let reference = match &*st.url {
            ModuleUrl::File(path) => {
                return Plan::Fetch(Job::File {
                    path: path.clone(),
                    expected,
                })
            }
            ModuleUrl::Http(u) => Err(u.clone()),
            ModuleUrl::Oci(r) => Ok(r.clone()),
            ModuleUrl::NoHttpUri => return Plan::Known(Err(Failure::NoHttpUri)),
        };
        let credentials = match &st.plugin.spec.image_pull_secret {
            Some(name) => {
                let secret = ObjectKey::new(&key.namespace, name);
                match self.secrets.get(&secret) {
                    None => return Plan::Known(Err(Failure::MissingSecret(secret))),
                    Some(s) => st
                        .url
                        .host()
                        .and_then(|h| s.config.credentials_for(h))
                        .cloned(),
                }
            }
            None => None,
        };
        let must_pull = trigger == Trigger::Refresh
            || (st.decision.policy == PullPolicy::Always && st.pulled_version != Some(st.version));
        if !must_pull {
            let candidate = match &expected {
                Some(c) => Some(ModuleKey::new(st.url.module_name(), c.clone())),
                None => self.cache.resolution(&url_str()).cloned(),
            };
            if let Some(k) = candidate {
                if self.cache.is_verified(&k) && self.cache.is_authorized(&k, key) {
                    return Plan::Known(Ok(Obtained::Cached(k)));
                }
                // Still being verified since the start: wait for it (moved to the front).
                if self.cache.contains(&k) && self.cache.is_authorized(&k, key) {
                    let verifier = self.cache.verifier().clone();
                    return Plan::Fetch(Job::Verify { key: k, verifier });
                }
            }
        }
        let timeout = st.plugin.pull_timeout();
        Plan::Fetch(match reference {
            Ok(reference) => {
                let name = st.url.module_name();
                // Modules still being verified included: a revalidation waits for it.
                let cached = (self.cache.entries_named(&name))
                    .map(|(k, _)| k.checksum.clone())
                    .collect();
                Job::Oci {
                    name,
                    reference,
                    credentials,
                    expected,
                    cached,
                    timeout,
                }
            }
            Err(url) => {
                let url_str = url_str();
                // A conditional request when the url resolves to a cached module fitting the pin.
                let conditional = self
                    .cache
                    .resolution(&url_str)
                    .filter(|k| expected.as_ref().is_none_or(|e| *e == k.checksum))
                    .and_then(|k| {
                        let v = self.cache.validators(&url_str)?;
                        Some((k.clone(), v.clone()))
                    });
                Job::Http {
                    url,
                    expected,
                    conditional,
                    timeout,
                }
            }
        })
    }
}
