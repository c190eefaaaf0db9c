//! The real engine: the shared test [`Harness`] (the production driver on tokio's paused clock)
//! driven by the steps, and what it is observed to do.

use std::collections::BTreeMap;

use serde_json::json;

use super::common::{plugin, sha256_hex, Harness};
use super::world::*;
use wasm_ecds::engine::{Event, Serving};
use wasm_ecds::outcome::Outcome;
use wasm_ecds::plugin::ObjectKey;
use wasm_ecds::sim::scenario::{FailMode, FailRule, KindFilter};
use wasm_ecds::url::OciRef;

pub fn key(p: u8) -> ObjectKey {
    ObjectKey::new("default", format!("p{p}"))
}

pub struct Real<'a> {
    mods: &'a Modules,
    h: Harness,
}

impl<'a> Real<'a> {
    pub fn new(mods: &'a Modules) -> Self {
        let h = Harness::new();
        let mut r = Real { mods, h };
        for (place, module) in INITIAL {
            r.publish(place, module);
        }
        r
    }

    fn publish(&mut self, place: u8, module: u8) {
        let bytes = &self.mods.bytes[module as usize];
        match PLACES[place as usize] {
            Place::Tag(repo, tag) => {
                let r = OciRef::parse(&format!("{REG}/{repo}:{tag}")).expect("a valid reference");
                let digest = self
                    .h
                    .world
                    .publish_oci(&r, &format!("m{module}"), bytes, FORMAT);
                assert_eq!(
                    digest, self.mods.digest[module as usize],
                    "the digest the model knows"
                );
            }
            Place::Path(path) => self.h.world.publish_http(FILES, path, bytes.clone()),
        }
    }

    /// Runs a step; returns the engine's raw events.
    pub fn step(&mut self, index: usize, s: &Step) -> Vec<Event> {
        let exists = |h: &Harness, p: u8| h.objects().plugin(&key(p)).is_some();
        match s {
            Step::Apply { p, obj } => {
                self.h.apply(object_json(self.mods, *p, obj));
            }
            Step::Edit { p } => {
                if exists(&self.h, *p) {
                    self.h.edit(
                        &key(*p),
                        json!({"metadata": {"labels": {"gen": index.to_string()}}}),
                    );
                }
            }
            Step::Delete { p } => {
                if exists(&self.h, *p) {
                    self.h.delete_plugin(&key(*p));
                }
            }
            Step::Invalid { p } => {
                let v = plugin(
                    "default",
                    &format!("p{p}"),
                    json!({"url": self.mods.url(0), "sha256": "not-a-sha256"}),
                );
                self.h.apply(v);
            }
            Step::Publish { place, module } => self.publish(*place, *module),
            Step::Fail { host } => {
                let host = HOSTS[*host as usize].to_string();
                self.h.world.add_rule(FailRule {
                    host,
                    kind: KindFilter::Any,
                    mode: FailMode::Unavailable,
                    times: None,
                });
            }
            Step::Recover { host } => {
                self.h.world.recover(HOSTS[*host as usize]);
            }
            Step::Advance(d) => self.h.advance(*d),
            Step::Restart { keep_cache } => self.h.restart(*keep_cache),
        }
        self.h.take_events()
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut serving = BTreeMap::new();
        for p in 0..PLUGINS {
            let s = match self.h.serving(&key(p)) {
                None | Some(Serving::Nothing) => "absent".to_string(),
                Some(Serving::DenyAll) => "deny-all".to_string(),
                Some(Serving::AllowAll) => "allow-all".to_string(),
                Some(Serving::Module(m)) => match &m.key {
                    Some(k) => served_text(&k.name, &k.checksum, &m.url),
                    None => format!("file module {}", m.path.display()),
                },
            };
            serving.insert(pname(p), s);
        }
        let cache = self
            .h
            .engine()
            .cache()
            .entries()
            .map(|(k, e)| {
                let module = self
                    .mods
                    .by_sha(&e.sha256)
                    .expect("a cached module is one of the world's");
                (
                    (k.name.clone(), k.checksum.clone()),
                    (module, e.refs.iter().map(|r| r.to_string()).collect()),
                )
            })
            .collect();
        let resolutions = self
            .h
            .engine()
            .cache()
            .resolutions()
            .iter()
            .map(|(u, k)| (u.clone(), (k.name.clone(), k.checksum.clone())))
            .collect();
        let counts = HOSTS
            .iter()
            .map(|host| {
                let c = self.h.host_counts(host);
                (host.to_string(), (c.manifest, c.blob, c.get))
            })
            .collect();
        Snapshot {
            now: self.h.now().0,
            serving,
            cache,
            resolutions,
            counts,
            metrics: metric_series()
                .into_iter()
                .map(|m| (m, self.h.metric(m) as u64))
                .collect(),
        }
    }

    /// Invariants checked on the engine alone.
    pub fn check_invariants(&self) -> Result<(), String> {
        for p in 0..PLUGINS {
            let Some(st) = self.h.engine().plugin(&key(p)) else {
                continue;
            };
            let Serving::Module(m) = &st.serving else {
                continue;
            };
            let k = m.key.as_ref().ok_or("a remote module has a cache key")?;
            // Never purged while served.
            let entry = self
                .h
                .engine()
                .cache()
                .get(k)
                .ok_or_else(|| format!("p{p} serves {k}, which is not cached"))?;
            if !entry.refs.contains(&key(p)) {
                return Err(format!("p{p} serves {k} but is not among its references"));
            }
            // The bytes are what the entry says.
            let bytes = self.h.engine().served_bytes(m).map_err(|e| e.to_string())?;
            if sha256_hex(&bytes) != m.sha256 || entry.sha256 != m.sha256 {
                return Err(format!(
                    "p{p} serves bytes that do not match their recorded sha256"
                ));
            }
            // A pinned plugin never serves anything but its pin.
            if let Some(expected) = &st.decision.expected_checksum {
                if k.checksum != *expected {
                    return Err(format!("p{p} is pinned to {expected} but serves {k}"));
                }
            }
            if k.name
                != self
                    .mods
                    .module_name(url_index(self.mods, &st.plugin.spec.url))
            {
                return Err(format!("p{p} serves {k}, a module of another url"));
            }
        }
        Ok(())
    }
}

fn url_index(mods: &Modules, url: &str) -> u8 {
    (0..URLS.len() as u8)
        .find(|i| mods.url(*i) == url)
        .expect("one of the generated urls")
}

pub fn to_ev(e: &Event) -> Ev {
    let plugin = |k: &ObjectKey| k.to_string();
    match e {
        Event::Processed {
            at,
            plugin: k,
            version,
            outcome,
            ..
        } => {
            let outcome = match outcome {
                Outcome::Rejected(r) => format!("rejected/{r}"),
                Outcome::Invalid(f) => format!("invalid/{f}"),
                o => o.name().to_string(),
            };
            Ev::Processed {
                at: at.0,
                plugin: plugin(k),
                version: *version,
                outcome,
            }
        }
        Event::ServingChanged {
            at,
            plugin: k,
            serving,
        } => {
            let serving = match serving {
                None | Some(Serving::Nothing) => "absent".to_string(),
                Some(Serving::DenyAll) => "deny-all".to_string(),
                Some(Serving::AllowAll) => "allow-all".to_string(),
                Some(Serving::Module(m)) => match &m.key {
                    Some(key) => served_text(&key.name, &key.checksum, &m.url),
                    None => format!("file module {}", m.path.display()),
                },
            };
            Ev::Serving {
                at: at.0,
                plugin: plugin(k),
                serving,
            }
        }
        Event::Expired { at, module, .. } => Ev::Expired {
            at: at.0,
            module: (module.name.clone(), module.checksum.clone()),
        },
        Event::RetryScheduled { at, plugin: k, due } => Ev::Retry {
            at: at.0,
            plugin: plugin(k),
            due: due.0,
        },
    }
}
