//! Phases 1 and 2 of a processing in the model: the plan at the instant it begins, and the fetch
//! jobs with their attempts over time (behavior.md §2, §4.1, §4.2, §5 single flight).

use super::*;

impl Model<'_> {
    /// Begins a processing of the current version of `p` (phase 1 at the current instant): a
    /// cache hit is committed at once; otherwise the processing waits for a job, a new one or an
    /// identical one in flight. Returns the id of a waiting processing.
    pub(super) fn begin(&mut self, p: u8, trig: Trig) -> Option<u64> {
        let st = self.plugins.get(&p)?;
        let (o, version) = (st.obj.clone(), st.version);
        let (always, expected) = self.policy(&o);
        let must_pull = always && st.pulled != Some(version);
        let name = self.mods.module_name(o.url);
        let url = self.mods.url(o.url);
        if !must_pull {
            let candidate = match &expected {
                Some(c) => Some((name.clone(), c.clone())),
                None => self.resolutions.get(&url).cloned(),
            };
            if let Some(k) = candidate.filter(|k| self.cache.contains_key(k)) {
                self.commit(p, trig, Ok(Got::Cached(k)));
                return None;
            }
        }
        self.last_id += 1;
        let waiter = Waiter {
            id: self.last_id,
            p,
            version,
            trig,
        };
        let flight = (url, expected);
        if let Some(job) = self.jobs.iter_mut().find(|j| j.flight == flight) {
            job.waiters.push(waiter);
            return Some(self.last_id);
        }
        let request = match URLS[o.url as usize] {
            UrlDef::Oci { .. } => Request::Manifest,
            UrlDef::Http { .. } => Request::Get,
        };
        let known = self.cache.keys().filter(|k| k.0 == name).cloned().collect();
        self.jobs.push(Job {
            flight,
            url: o.url,
            known,
            request,
            failed: 0,
            next: self.now,
            waiters: vec![waiter],
        });
        Some(self.last_id)
    }

    /// One counted request to `host` (kind 0 manifest, 1 blob, 2 get); false when the host does
    /// not answer (connection refused).
    fn request(&mut self, host: &'static str, kind: usize) -> bool {
        let c = self.counts.get_mut(host).expect("a known host");
        match kind {
            0 => c.0 += 1,
            1 => c.1 += 1,
            _ => c.2 += 1,
        }
        !self.failing.contains(host)
    }

    /// The attempt job `j` makes now (and the blob request right after a manifest, at the same
    /// instant). `Some(result)` when the job ends.
    pub(super) fn attempt(&mut self, j: usize) -> Option<Obtained> {
        loop {
            let job = &self.jobs[j];
            let (url, request) = (job.url, job.request.clone());
            let expected = job.flight.1.clone();
            let (host, kind) = match request {
                Request::Manifest => (REG, 0),
                Request::Blob { .. } => (REG, 1),
                Request::Get => (FILES, 2),
            };
            if !self.request(host, kind) {
                let job = &mut self.jobs[j];
                job.failed += 1;
                if job.failed == ATTEMPTS {
                    return Some(Err(match request {
                        Request::Manifest => "manifest_failure",
                        _ => "download_failure",
                    }));
                }
                job.next = self.now + backoff(job.failed);
                return None;
            }
            let name = self.mods.module_name(url);
            match (request, URLS[url as usize]) {
                (Request::Manifest, UrlDef::Oci { repo, tag, pinned }) => {
                    let module = match pinned {
                        Some(m) => self.manifests.contains(&(repo, m)).then_some(m),
                        None => self.tags.get(&(repo, tag.unwrap_or("latest"))).copied(),
                    };
                    let Some(module) = module else {
                        return Some(Err("manifest_failure"));
                    };
                    let digest = self.mods.digest[module as usize].clone();
                    if expected.as_ref().is_some_and(|e| *e != digest) {
                        return Some(Err("checksum_mismatch"));
                    }
                    let key = (name, digest);
                    let job = &mut self.jobs[j];
                    if job.known.contains(&key) {
                        return Some(Ok(Got::Revalidated(key)));
                    }
                    job.request = Request::Blob { module, key };
                    job.failed = 0;
                }
                (Request::Blob { module, key }, _) => {
                    return Some(Ok(Got::Pulled {
                        key,
                        module,
                        shared: false,
                    }))
                }
                (Request::Get, UrlDef::Http { path }) => {
                    let Some(&module) = self.paths.get(path) else {
                        return Some(Err("download_failure"));
                    };
                    let sha = self.mods.sha[module as usize].clone();
                    if expected.as_ref().is_some_and(|e| *e != sha) {
                        return Some(Err("checksum_mismatch"));
                    }
                    return Some(Ok(Got::Pulled {
                        key: (name, sha),
                        module,
                        shared: false,
                    }));
                }
                (r, u) => unreachable!("{r:?} for {u:?}"),
            }
        }
    }

    /// Job `j` ended with `result`: the first processing still current commits it, the others
    /// waiting for the same job get it too (a download shared, not downloaded again); processings
    /// of a plugin that changed or went away are dropped.
    pub(super) fn end_job(&mut self, j: usize, result: Obtained) {
        let job = self.jobs.remove(j);
        let mut first = true;
        for w in job.waiters {
            let current = self.plugins.get(&w.p).map(|st| st.version) == Some(w.version);
            if !current {
                continue;
            }
            let got = match &result {
                Ok(Got::Pulled { key, module, .. }) if !first => Ok(Got::Pulled {
                    key: key.clone(),
                    module: *module,
                    shared: true,
                }),
                r => r.clone(),
            };
            first = false;
            self.commit(w.p, w.trig, got);
        }
    }
}
