//! Phase 3 of a processing in the model: committing a result with the cache and the plugin as
//! they are at that instant (behavior.md §5, §6, §7, §8).

use super::*;

impl Model<'_> {
    pub(super) fn serving_text(s: &MServing) -> String {
        match s {
            MServing::Nothing => "absent".into(),
            MServing::Module { key, url } => served_text(&key.0, &key.1, url),
            MServing::DenyAll => "deny-all".into(),
            MServing::AllowAll => "allow-all".into(),
        }
    }

    fn set_serving(&mut self, p: u8, serving: MServing) {
        let st = self.plugins.get_mut(&p).expect("a current plugin");
        if st.serving != serving {
            st.serving = serving.clone();
            self.events.push(Ev::Serving {
                at: self.now,
                plugin: pname(p),
                serving: Self::serving_text(&serving),
            });
        }
    }

    /// Commits what a processing of the current version of `p` obtained, with the cache and the
    /// plugin as they are now.
    pub(super) fn commit(&mut self, p: u8, trig: Trig, got: Obtained) {
        // A download enters the cache; anything else must still be there (a purge pass may have
        // taken a module between a job's plan and its end).
        let got = got.and_then(|g| match g {
            Got::Pulled {
                key,
                module,
                shared: false,
            } => {
                let now = self.now;
                self.cache.entry(key.clone()).or_insert(MEntry {
                    module,
                    last_used: now,
                    refs: BTreeSet::new(),
                });
                Ok(Got::Pulled {
                    key,
                    module,
                    shared: false,
                })
            }
            Got::Cached(ref k) | Got::Revalidated(ref k) | Got::Pulled { key: ref k, .. } => {
                if self.cache.contains_key(k) {
                    Ok(g)
                } else {
                    Err("download_failure")
                }
            }
        });
        // §8: one lookup per processing, a hit for cached and revalidated; §6: the fetch result,
        // one success per download (not per processing sharing it).
        let fetch = match &got {
            Ok(Got::Cached(_) | Got::Revalidated(_)) => None,
            Ok(Got::Pulled { shared: true, .. }) => Some(None),
            Ok(Got::Pulled { shared: false, .. }) => Some(Some("success")),
            Err("checksum_mismatch") => Some(Some("checksum_mismatched")),
            Err(reason) => Some(Some(*reason)),
        };
        match fetch {
            None => self.lookups.0 += 1,
            Some(result) => {
                self.lookups.1 += 1;
                if let Some(result) = result {
                    *self.fetches.entry(result).or_default() += 1;
                }
            }
        }
        let outcome = match got {
            Ok(got) => {
                let (outcome, key) = match got {
                    Got::Cached(k) => ("cached", k),
                    Got::Revalidated(k) => ("revalidated", k),
                    Got::Pulled { key, .. } => ("pulled", key),
                };
                self.commit_success(p, outcome, key);
                outcome.to_string()
            }
            Err(reason) => {
                self.commit_failure(p, trig);
                format!("rejected/{reason}")
            }
        };
        let version = Some(self.plugins[&p].version);
        self.events.push(Ev::Processed {
            at: self.now,
            plugin: pname(p),
            version,
            outcome,
        });
    }

    fn commit_success(&mut self, p: u8, outcome: &str, key: MKey) {
        let st = self.plugins[&p].clone();
        let url = self.mods.url(st.obj.url);
        if Self::mutable(st.obj.url) {
            self.resolutions.insert(url.clone(), key.clone());
        }
        self.cache
            .get_mut(&key)
            .expect("obtained modules are cached")
            .last_used = self.now;
        self.set_ref(p, st.referenced.as_ref(), Some(&key));
        self.last_served.insert(p, (url.clone(), key.clone()));
        let st = self.plugins.get_mut(&p).expect("a current plugin");
        st.referenced = Some(key.clone());
        if outcome != "cached" {
            st.pulled = Some(st.version);
        }
        st.retry = None;
        self.set_serving(p, MServing::Module { key, url });
    }

    /// §7: keep the module, restore what was served before a restart, or fall back; then the
    /// next background retry.
    fn commit_failure(&mut self, p: u8, trig: Trig) {
        let st = self.plugins[&p].clone();
        let url = self.mods.url(st.obj.url);
        let old = st.referenced.clone();
        // §7 (improvement): keep serving the module from the same url while it fits the pin.
        let (_, expected) = self.policy(&st.obj);
        let mut keep = match &st.serving {
            MServing::Module { key, url: from } => {
                *from == url && expected.as_ref().is_none_or(|e| *e == key.1)
            }
            _ => false,
        };
        // §7 across a restart: serving nothing yet, the plugin keeps what it served before when
        // that came from the same url, is still cached and fits the pin.
        if st.serving == MServing::Nothing {
            let before = self.last_served.get(&p).cloned().filter(|(from, k)| {
                *from == url
                    && self.cache.contains_key(k)
                    && expected.as_ref().is_none_or(|e| *e == k.1)
            });
            if let Some((from, k)) = before {
                self.set_ref(p, old.as_ref(), Some(&k));
                self.plugins
                    .get_mut(&p)
                    .expect("a current plugin")
                    .referenced = Some(k.clone());
                self.set_serving(p, MServing::Module { key: k, url: from });
                keep = true;
            }
        }
        if !keep {
            self.last_served.remove(&p);
            // §5: the module the url (or pin) still resolves to stays protected.
            let resolved = match &expected {
                Some(e) => Some((self.mods.module_name(st.obj.url), e.clone())),
                None => self.resolutions.get(&url).cloned(),
            }
            .filter(|k| self.cache.contains_key(k));
            self.set_ref(p, old.as_ref(), resolved.as_ref());
            self.plugins
                .get_mut(&p)
                .expect("a current plugin")
                .referenced = resolved;
            self.set_serving(
                p,
                if st.obj.fail_open {
                    MServing::AllowAll
                } else {
                    MServing::DenyAll
                },
            );
        }
        let delay = match trig {
            Trig::Retry(previous) => (previous * 2).min(MAX_RETRY),
            Trig::Version => FIRST_RETRY,
        };
        let due = self.now + delay;
        self.plugins.get_mut(&p).expect("a current plugin").retry = Some((due, delay));
        self.events.push(Ev::Retry {
            at: self.now,
            plugin: pname(p),
            due,
        });
    }
}
