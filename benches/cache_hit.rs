//! The cache hit path, per call: the pure pull-policy decision, and a whole processing of an
//! `IfNotPresent` plugin whose module is cached, queued on the engine and run by the
//! [`Dispatcher`] as the driver runs it (plan, commit, metrics, event), with 1 and with 1,000
//! plugins in the engine, to show the cost does not grow with the plugin count.
//!
//! The engine runs over a [`MemStore`] and a [`ManualClock`]; its transport serves the modules
//! during setup and panics if it is called once the measurement starts, so every measured call is
//! a true cache hit (a cache hit begins and finishes inside `dispatch`: no task, no runtime).

#![allow(clippy::disallowed_methods)] // criterion iter_custom timing uses wall time

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use serde_json::json;

use wasm_ecds::clock::{ManualClock, Timestamp};
use wasm_ecds::config::Config;
use wasm_ecds::dispatch::Dispatcher;
use wasm_ecds::engine::{Engine, EngineParts, Trigger};
use wasm_ecds::fetch::{FullBody, HttpRequest, HttpResponse, Transport, TransportError};
use wasm_ecds::outcome::Outcome;
use wasm_ecds::plugin::{ImagePullPolicy, ObjectKey, WasmPlugin, WasmPluginSpec};
use wasm_ecds::policy;
use wasm_ecds::source::VersionedPlugin;
use wasm_ecds::store::{MemFiles, MemStore};
use wasm_ecds::url::ModuleUrl;

/// Serves in-memory modules by URL while setting up; panics on any request once armed.
#[derive(Default)]
struct SetupOnlyTransport {
    modules: Mutex<BTreeMap<String, Vec<u8>>>,
    armed: AtomicBool,
}

#[async_trait]
impl Transport for SetupOnlyTransport {
    async fn get(
        &self,
        req: &HttpRequest,
        _timeout: Duration,
    ) -> Result<HttpResponse, TransportError> {
        assert!(
            !self.armed.load(Ordering::SeqCst),
            "cache hit bench: the transport was called for {} (not a cache hit)",
            req.url
        );
        let body = self
            .modules
            .lock()
            .expect("modules lock")
            .get(&req.url)
            .cloned();
        Ok(match body {
            Some(bytes) => HttpResponse {
                status: 200,
                headers: vec![("content-length".into(), bytes.len().to_string().into())],
                body: FullBody::boxed(bytes),
            },
            None => HttpResponse {
                status: 404,
                headers: Vec::new(),
                body: FullBody::boxed(Vec::new()),
            },
        })
    }
}

/// A small valid Wasm module, different per `i`.
fn module(i: usize) -> Vec<u8> {
    let payload = format!("\x03benchmark module {i}");
    let mut m = b"\0asm\x01\0\0\0\0".to_vec();
    m.push(u8::try_from(payload.len()).expect("short payload"));
    m.extend_from_slice(payload.as_bytes());
    m
}

fn url(i: usize) -> String {
    format!("http://modules.example/filters/f{i}.wasm")
}

fn plugin(i: usize, policy: ImagePullPolicy) -> VersionedPlugin {
    let key = ObjectKey::new("default", format!("p{i}"));
    let spec = WasmPluginSpec {
        url: url(i),
        image_pull_policy: policy,
        ..Default::default()
    };
    let object = json!({
        "apiVersion": "extensions.istio.io/v1alpha1",
        "kind": "WasmPlugin",
        "metadata": {"name": key.name, "namespace": key.namespace},
        "spec": {"url": spec.url, "imagePullPolicy": "IfNotPresent"},
    });
    VersionedPlugin {
        url: std::sync::Arc::new(ModuleUrl::parse(&spec.url).expect("url")),
        plugin: std::sync::Arc::new(WasmPlugin {
            key,
            object: wasm_ecds::plugin::Object::new(&object),
            spec,
            pull_timeout_annotation: None,
            extension: None,
        }),
        version: 1,
    }
}

/// An engine with `n` `IfNotPresent` plugins, each serving its own cached module, and the
/// transport armed. Returns the plugin keys.
fn engine_with(rt: &tokio::runtime::Runtime, n: usize) -> (Engine, Dispatcher, Vec<ObjectKey>) {
    let transport = Arc::new(SetupOnlyTransport::default());
    {
        let mut modules = transport.modules.lock().expect("modules lock");
        for i in 0..n {
            modules.insert(url(i), module(i));
        }
    }
    let clock = Arc::new(ManualClock::new(Timestamp::from_millis(1_700_000_000_000)));
    let parts = EngineParts {
        clock: clock.clone(),
        transport: transport.clone(),
        store: Arc::new(MemStore::new()),
        files: Arc::new(MemFiles::default()),
        jitter_seed: None,
        fetch_config: None,
        purge_epoch: Timestamp::ZERO,
    };
    let (mut engine, _) = Engine::new(Config::default(), parts).expect("engine");
    let mut dispatcher = Dispatcher::default();
    let keys: Vec<ObjectKey> = rt.block_on(async {
        let mut keys = Vec::with_capacity(n);
        for i in 0..n {
            let vp = plugin(i, ImagePullPolicy::IfNotPresent);
            engine.upsert_plugin(&vp);
            let now = engine.now();
            dispatcher.dispatch(&mut engine, now);
            let done = dispatcher.next_completion().await;
            let now = engine.now();
            dispatcher.complete(&mut engine, done, now);
            keys.push(vp.plugin.key.clone());
        }
        keys
    });
    for k in &keys {
        let st = engine.plugin(k).expect("plugin");
        assert_eq!(
            st.last_outcome,
            Some(Outcome::Pulled),
            "{k}: {:?}",
            st.last_error
        );
    }
    transport.armed.store(true, Ordering::SeqCst);
    // One call per plugin before measuring: each must be a cache hit.
    for k in &keys {
        process(&mut engine, &mut dispatcher, k);
    }
    for k in &keys {
        let st = engine.plugin(k).expect("plugin");
        assert_eq!(st.last_outcome, Some(Outcome::Cached), "{k}");
    }
    engine.take_events();
    (engine, dispatcher, keys)
}

/// One processing of a plugin whose module is cached: it begins and commits inside `dispatch`
/// (at the instant the clock is read for it, as the driver does).
fn process(engine: &mut Engine, dispatcher: &mut Dispatcher, key: &ObjectKey) {
    engine.queue(key, Trigger::Secret);
    let now = engine.now();
    let dispatched = dispatcher.dispatch(engine, now);
    debug_assert!(dispatched.waiting.is_empty(), "a cache hit fetches nothing");
}

fn bench_policy(c: &mut Criterion) {
    let mut g = c.benchmark_group("cache_hit/policy_decide");
    let digest = "a".repeat(64);
    let cases = [
        (
            "oci_latest_unspecified",
            "oci://registry.example/filters/auth:latest".to_string(),
            None,
            ImagePullPolicy::Unspecified,
        ),
        (
            "http_if_not_present",
            url(7),
            None,
            ImagePullPolicy::IfNotPresent,
        ),
        (
            "oci_digest",
            format!("oci://registry.example/filters/auth@sha256:{digest}"),
            None,
            ImagePullPolicy::Always,
        ),
        (
            "sha256_pinned",
            url(7),
            Some(digest.clone()),
            ImagePullPolicy::Always,
        ),
    ];
    for (name, u, sha, pull) in cases {
        let spec = WasmPluginSpec {
            url: u.clone(),
            sha256: sha,
            image_pull_policy: pull,
            ..Default::default()
        };
        let parsed = ModuleUrl::parse(&u).expect("url");
        g.bench_function(name, |b| {
            b.iter(|| policy::decide(black_box(&spec), black_box(&parsed)))
        });
    }
    g.finish();
}

fn bench_process(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut g = c.benchmark_group("cache_hit/engine_process");
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));

    for n in [1usize, 100, 1_000] {
        let (mut engine, mut dispatcher, keys) = engine_with(&rt, n);
        let middle = keys[n / 2].clone();
        g.bench_with_input(BenchmarkId::new("same_plugin", n), &n, |b, _| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    process(&mut engine, &mut dispatcher, black_box(&middle));
                    black_box(engine.take_events());
                }
                start.elapsed()
            })
        });
        if n > 1 {
            g.bench_with_input(BenchmarkId::new("rotating_plugins", n), &n, |b, _| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    for i in 0..iters {
                        let k = &keys[i as usize % keys.len()];
                        process(&mut engine, &mut dispatcher, black_box(k));
                        black_box(engine.take_events());
                    }
                    start.elapsed()
                })
            });
        }
        for k in &keys {
            let st = engine.plugin(k).expect("plugin");
            assert_eq!(st.last_outcome, Some(Outcome::Cached), "{k}");
        }
    }
    g.finish();
}

criterion_group!(benches, bench_policy, bench_process);
criterion_main!(benches);
