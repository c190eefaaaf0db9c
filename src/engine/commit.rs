//! Phase 3 of a processing: records a result in the cache (module, resolution, validators,
//! references, authorizations), the plugin's serving state, the metrics and the retry schedule
//! (behavior.md §2, §5, §6, §7, §8).

use std::path::PathBuf;
use std::sync::Arc;

use super::fallback::{after_failure, AfterFailure, FailedPlugin};
use super::job::{Failure, Obtained};
use super::plan::Pending;
use super::state::{
    displays_as, Event, PluginState, ServedModule, ServedModules, Serving, Trigger,
};
use super::Engine;
use crate::backoff::{Backoff, BACKGROUND_RETRY};
use crate::cache::ModuleKey;
use crate::clock::Timestamp;
use crate::fetch::http::Validators;
use crate::metrics::ConversionResult;
use crate::outcome::Outcome;
use crate::plugin::ObjectKey;
use crate::url::ModuleUrl;

impl Engine {
    /// Whether `pending` is for the plugin's current version (its result would be committed).
    pub fn is_current(&self, pending: &Pending) -> bool {
        self.plugins.get(&pending.key).map(|s| s.version) == Some(pending.version)
    }

    /// Phase 3: commits a result obtained for `pending` at `now` (read once by the driver for all
    /// it commits at one instant). A result for a version that is no longer current is dropped
    /// (the plugin changed or went away while it was fetched).
    pub fn finish(&mut self, pending: Pending, result: Result<Obtained, Failure>, now: Timestamp) {
        let Pending {
            key,
            version,
            trigger,
            started,
            ..
        } = pending;
        let Some(st) = self.plugins.get(&key).filter(|s| s.version == version) else {
            return;
        };
        // Istio's agent looks nothing up for local code, nor for remote code without `http_uri`.
        let remote = matches!(*st.url, ModuleUrl::Oci(_) | ModuleUrl::Http(_));
        self.cache.settle();
        let elapsed_ms = now.since(started).as_secs_f64() * 1000.0;
        // A download shared with another plugin's identical job counts once as a remote fetch.
        let shared = matches!(result, Ok(Obtained::Shared(_)));
        let mut validators = None;
        let obtained = result.and_then(|o| self.store_obtained(&key, o, now, &mut validators));
        let (outcome, detail) = match obtained {
            Ok((outcome, served)) => {
                if remote {
                    self.metrics.record_lookup(outcome != Outcome::Pulled);
                    if outcome == Outcome::Pulled && !shared {
                        self.metrics
                            .record_remote_fetch(crate::outcome::FetchResult::Success);
                    }
                    self.metrics
                        .record_conversion(ConversionResult::Success, elapsed_ms);
                } else {
                    self.metrics
                        .record_conversion(ConversionResult::NoRemoteLoad, elapsed_ms);
                }
                self.commit_success(&key, version, &outcome, served, validators, now);
                (outcome, None)
            }
            Err(failure) => {
                let reason = failure.reason();
                if remote {
                    self.metrics.record_lookup(false);
                    if let Some(r) = reason.fetch_result() {
                        self.metrics.record_remote_fetch(r);
                    }
                }
                let conversion = match failure {
                    Failure::NoHttpUri => ConversionResult::MissRemoteFetchHint,
                    _ => ConversionResult::FetchFailure,
                };
                self.metrics.record_conversion(conversion, elapsed_ms);
                // Nothing but a change of the object can give it something to pull: no retry.
                let retry = !matches!(failure, Failure::NoHttpUri);
                self.commit_failure(&key, trigger, now, retry);
                // Logged by the driver with the processing (one line, repeats gated).
                let message = failure.to_string();
                (Outcome::Rejected(reason), Some(message))
            }
        };
        let st = self.plugins.get_mut(&key).expect("checked above");
        st.last_outcome = Some(outcome.clone());
        st.last_error = detail.clone();
        st.last_processed = Some(now);
        st.processed_version = Some(version);
        self.metrics.record_processing(&outcome);
        self.metrics.set_cache_entries(self.cache.len());
        self.events.push(Event::Processed {
            at: now,
            plugin: key,
            version: Some(version),
            outcome,
            detail,
        });
    }

    /// Puts what was obtained into the cache and says what the plugin is served.
    fn store_obtained(
        &mut self,
        plugin: &ObjectKey,
        obtained: Obtained,
        now: Timestamp,
        new_validators: &mut Option<Option<Validators>>,
    ) -> Result<(Outcome, Arc<ServedModule>), Failure> {
        match obtained {
            Obtained::Fetched {
                key,
                staged,
                private,
                validators,
            } => {
                *new_validators = Some(validators);
                self.cache
                    .insert(&key, staged, private, now)
                    .map_err(|e| Failure::Cache(format!("write failed: {e}")))?;
                if private {
                    self.cache.authorize(&key, plugin);
                }
                Ok((Outcome::Pulled, self.served_cached(plugin, key)?))
            }
            Obtained::Cached(k) => Ok((Outcome::Cached, self.served_cached(plugin, k)?)),
            Obtained::Shared(k) => {
                // Same job, same credentials: the registry authorized this plugin too.
                self.cache.authorize(&k, plugin);
                Ok((Outcome::Pulled, self.served_cached(plugin, k)?))
            }
            Obtained::Revalidated(k) => {
                self.cache.authorize(&k, plugin);
                Ok((Outcome::Revalidated, self.served_cached(plugin, k)?))
            }
            Obtained::File { path, sha256 } => {
                let path = PathBuf::from(path);
                Ok((Outcome::Pulled, self.served(plugin, None, &path, &sha256)))
            }
        }
    }

    /// The cached module `k` as `plugin` is served it, if it is cached and verified (a module
    /// fetched just now is).
    fn served_cached(
        &mut self,
        plugin: &ObjectKey,
        k: ModuleKey,
    ) -> Result<Arc<ServedModule>, Failure> {
        let entry = (self.cache.get(&k))
            .filter(|_| self.cache.is_verified(&k))
            .ok_or_else(|| Failure::Cache("module left the cache".to_string()))?;
        let st = &self.plugins[plugin];
        Ok(served_to(
            st,
            &mut self.served_modules,
            Some(&k),
            &entry.path,
            &entry.sha256,
        ))
    }

    /// What `plugin` is served from its current url (see [`served_to`]).
    fn served(
        &mut self,
        plugin: &ObjectKey,
        key: Option<&ModuleKey>,
        path: &std::path::Path,
        sha256: &str,
    ) -> Arc<ServedModule> {
        served_to(
            &self.plugins[plugin],
            &mut self.served_modules,
            key,
            path,
            sha256,
        )
    }

    fn commit_success(
        &mut self,
        key: &ObjectKey,
        version: u64,
        outcome: &Outcome,
        served: Arc<ServedModule>,
        validators: Option<Option<Validators>>,
        now: Timestamp,
    ) {
        let st = self.plugins.get_mut(key).expect("a current plugin");
        if let Some(k) = &served.key {
            if st.url.is_mutable() {
                self.cache.set_resolution(&served.url, k);
                // A fresh download replaces the validators (none when the server sent none).
                if let Some(v) = validators {
                    self.cache.set_validators(&served.url, v);
                }
            }
            self.cache.touch(k, now);
        }
        if matches!(outcome, Outcome::Pulled | Outcome::Revalidated) {
            st.pulled_version = Some(version);
        }
        if *outcome == Outcome::Pulled {
            st.last_pull = Some(now);
        }
        self.set_retry(key, None);
        let record = served.key.as_ref().map(|m| (served.url.as_str(), m));
        self.cache.set_served(key, record);
        self.set_referenced(key, served.key.as_ref(), now);
        self.set_serving(key, Serving::Module(served), now);
    }

    /// Keeps, restores or falls back (see [`after_failure`]) and schedules the next background
    /// retry.
    fn commit_failure(&mut self, key: &ObjectKey, trigger: Trigger, now: Timestamp, retry: bool) {
        let st = &self.plugins[key];
        let url = st.url.to_string();
        let expected = st.decision.expected_checksum.clone();
        // Restoring a module still being verified since the start waits for its verification.
        if let Some(m) = self.cache.last_served(key).map(|r| r.module.clone()) {
            self.cache.verify_now(&m);
        }
        let st = &self.plugins[key];
        let before = self
            .cache
            .last_served(key)
            .filter(|r| self.cache.is_verified(&r.module));
        let decision = after_failure(FailedPlugin {
            url: &url,
            expected: expected.as_deref(),
            serving: &st.serving,
            served_before_restart: before,
            fail_strategy: st.plugin.spec.fail_strategy,
        });
        match decision {
            AfterFailure::Keep => {}
            AfterFailure::Restore(r) => {
                let entry =
                    (self.cache.get(&r.module)).filter(|_| self.cache.is_verified(&r.module));
                if let Some(entry) = entry {
                    let served = (self.served_modules).share(
                        &r.url,
                        Some(&r.module),
                        &entry.path,
                        &entry.sha256,
                    );
                    self.set_referenced(key, Some(&r.module), now);
                    self.set_serving(key, Serving::Module(served), now);
                }
            }
            AfterFailure::Fallback(fallback) => {
                // The module the URL (or pin) still resolves to stays protected (§5).
                let resolved = match &expected {
                    Some(c) => Some(ModuleKey::new(self.plugins[key].url.module_name(), c)),
                    None => self.cache.resolution(&url).cloned(),
                }
                .filter(|k| self.cache.contains(k));
                self.set_referenced(key, resolved.as_ref(), now);
                self.cache.set_served(key, None);
                self.set_serving(key, fallback, now);
            }
        }
        // Any trigger other than a retry (a change, a secret, a refresh) restarts the sequence.
        if !retry {
            self.set_retry(key, None);
            return;
        }
        let st = self.plugins.get_mut(key).expect("a current plugin");
        if trigger != Trigger::Retry {
            st.retry_backoff = Backoff::new(BACKGROUND_RETRY, None);
        }
        let due = now + st.retry_backoff.next_delay();
        self.set_retry(key, Some(due));
        self.events.push(Event::RetryScheduled {
            at: now,
            plugin: key.clone(),
            due,
        });
    }

    /// Moves the plugin's reference (expiry protection) to `module`, copied only when it changes.
    fn set_referenced(&mut self, key: &ObjectKey, module: Option<&ModuleKey>, now: Timestamp) {
        let st = self.plugins.get_mut(key).expect("a current plugin");
        self.cache.set_ref(key, st.referenced.as_ref(), module, now);
        if st.referenced.as_ref() != module {
            st.referenced = module.cloned();
        }
    }

    /// Records what the plugin serves; a change is an event (a push).
    fn set_serving(&mut self, key: &ObjectKey, serving: Serving, now: Timestamp) {
        let st = self.plugins.get_mut(key).expect("a current plugin");
        if st.serving != serving {
            st.serving = serving.clone();
            self.events.push(Event::ServingChanged {
                at: now,
                plugin: key.clone(),
                serving: Some(serving),
            });
        }
    }
}

/// What the plugin `st` is served from its current url: the `Arc` it holds already when that is
/// the same module (a revalidation, a cache hit: nothing is copied, formatted or hashed), else
/// the one shared by the plugins served it ([`super::ServedModules`]).
fn served_to(
    st: &PluginState,
    modules: &mut ServedModules,
    key: Option<&ModuleKey>,
    path: &std::path::Path,
    sha256: &str,
) -> Arc<ServedModule> {
    match &st.serving {
        Serving::Module(m)
            if m.key.as_ref() == key
                && m.sha256 == sha256
                && m.path == path
                && displays_as(&*st.url, &m.url) =>
        {
            m.clone()
        }
        _ => modules.share(&*st.url, key, path, sha256),
    }
}
