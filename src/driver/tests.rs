//! The driver against the simulated world: what a processing publishes.

use std::sync::Arc;

use serde_json::{json, Value};

use super::{Driver, DriverParts, Published};
use crate::clock::{Clock, Timestamp, TokioClock};
use crate::engine::{EngineParts, Serving};
use crate::plugin::ObjectKey;
use crate::sim::content::{module_bytes, ImageFormat};
use crate::sim::world::SimWorld;
use crate::store::{MemFiles, MemStore};
use crate::url::OciRef;

/// A driver with default options over `world`, a module store and local files in memory (the
/// unit tests that drive it through the simulated registry).
pub(crate) fn sim_driver(clock: Arc<dyn Clock>, world: Arc<SimWorld>) -> Driver {
    let parts = DriverParts {
        config: crate::config::Config::default(),
        engine: EngineParts {
            clock,
            transport: world,
            store: Arc::new(MemStore::new()),
            files: Arc::new(MemFiles::default()),
            jitter_seed: None,
            fetch_config: None,
            purge_epoch: Timestamp::ZERO,
        },
        module_endpoint: "http://modules.test".into(),
    };
    Driver::new(parts).expect("a driver over memory").0
}

fn plugin(label: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "extensions.istio.io/v1alpha1",
        "kind": "WasmPlugin",
        "metadata": {"name": "p", "namespace": "default", "labels": {"l": label}},
        "spec": spec,
    })
}

fn serving(driver: &Driver, key: &ObjectKey) -> Serving {
    driver.engine().plugin(key).unwrap().serving.clone()
}

/// A change that alters neither what is served nor what the resource is built from (a metadata
/// edit, revalidated by `Always`) keeps the plugin's served module as it was (the same `Arc`) and
/// builds no resource: the resource keeps its version, and the record of what it was built from
/// moves to the current object. A change of the spec, or of `pluginConfig`, with the same module
/// served is built and published again.
#[test]
fn a_change_that_alters_no_input_of_the_resource_builds_none() {
    let (rt, _) = crate::clock::paused_runtime().unwrap();
    rt.block_on(async {
        let clock = Arc::new(TokioClock::new(Timestamp::ZERO));
        let world = Arc::new(SimWorld::new(clock.clone()));
        let reference = OciRef::parse("reg.example/m:v1").unwrap();
        world.publish_oci(
            &reference,
            "m",
            &module_bytes("m", None, false),
            ImageFormat::OciArtifact,
        );
        let mut driver = sim_driver(clock, world);
        let key = ObjectKey::new("default", "p");
        let name = key.resource_name();
        let spec = json!({"url": "oci://reg.example/m:v1", "imagePullPolicy": "Always"});
        let ticket = driver.apply(&plugin("1", spec.clone())).ticket;
        driver.run_until_done(&ticket).await.unwrap();
        let first = serving(&driver, &key);
        let Serving::Module(module) = &first else {
            panic!("{first:?}")
        };
        let version = driver.resources().version_of(&name).unwrap();
        let revision = driver.resources().revision();

        // A new label: revalidated, the same module, nothing built.
        let ticket = driver.apply(&plugin("2", spec.clone())).ticket;
        driver.run_until_done(&ticket).await.unwrap();
        let st = driver.engine().plugin(&key).unwrap();
        assert_eq!(st.last_outcome.as_ref().unwrap().name(), "revalidated");
        let Serving::Module(again) = &st.serving else {
            panic!("{:?}", st.serving)
        };
        assert!(
            Arc::ptr_eq(module, again),
            "the served module is not copied"
        );
        assert_eq!(driver.resources().version_of(&name).unwrap(), version);
        assert_eq!(driver.resources().revision(), revision);
        let Some(Published {
            built_from: Some((from, _)),
            ..
        }) = driver.published.get(name.as_str())
        else {
            panic!("not published")
        };
        assert!(
            Arc::ptr_eq(from, &st.plugin),
            "the record holds the current object, not the one it replaced"
        );

        // The spec changes what the resource holds, not what is served: built again.
        let mut open = spec.clone();
        open["failStrategy"] = json!("FAIL_OPEN");
        let ticket = driver.apply(&plugin("2", open.clone())).ticket;
        driver.run_until_done(&ticket).await.unwrap();
        assert_eq!(serving(&driver, &key), first);
        let failing_open = driver.resources().version_of(&name).unwrap();
        assert_ne!(failing_open, version);

        // So does `pluginConfig`, whose content only the object holds.
        for config in [json!({"a": 1}), json!({"a": 2})] {
            let mut configured = open.clone();
            configured["pluginConfig"] = config;
            let before = driver.resources().version_of(&name).unwrap();
            let ticket = driver.apply(&plugin("2", configured)).ticket;
            driver.run_until_done(&ticket).await.unwrap();
            assert_eq!(serving(&driver, &key), first);
            assert_ne!(driver.resources().version_of(&name).unwrap(), before);
        }
    });
}

/// The simulator's clock, counting its reads.
struct CountingClock {
    inner: TokioClock,
    reads: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl Clock for CountingClock {
    fn now(&self) -> Timestamp {
        (self.reads).fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.now()
    }

    async fn sleep(&self, d: std::time::Duration) {
        self.inner.sleep(d).await
    }
}

/// What happens at one instant reads the clock once: a change whose processing is a cache hit
/// (begun and committed at once) reads it once, for its beginning and its commit alike, and
/// records that instant.
#[test]
fn a_processing_with_nothing_to_fetch_reads_the_clock_once() {
    let (rt, paused) = crate::clock::paused_runtime().unwrap();
    rt.block_on(async {
        let clock = Arc::new(CountingClock {
            inner: TokioClock::new(Timestamp::ZERO),
            reads: Default::default(),
        });
        let world = Arc::new(SimWorld::new(clock.clone()));
        let reference = OciRef::parse("reg.example/m:v1").unwrap();
        let bytes = module_bytes("m", None, false);
        world.publish_oci(&reference, "m", &bytes, ImageFormat::OciArtifact);
        let mut driver = sim_driver(clock.clone(), world);
        let key = ObjectKey::new("default", "p");
        let spec = json!({"url": "oci://reg.example/m:v1", "imagePullPolicy": "IfNotPresent"});
        let ticket = driver.apply(&plugin("1", spec.clone())).ticket;
        driver.run_until_done(&ticket).await.unwrap();
        let at = Timestamp::from_millis(5_000);
        driver.advance_to(at, paused).await.unwrap();

        let reads = clock.reads.load(std::sync::atomic::Ordering::Relaxed);
        let applied = driver.apply(&plugin("2", spec));
        assert!(
            driver.is_done(&applied.ticket),
            "a cache hit waits for nothing"
        );
        assert_eq!(
            clock.reads.load(std::sync::atomic::Ordering::Relaxed) - reads,
            1,
            "one read for the beginning and the commit"
        );
        let st = driver.engine().plugin(&key).unwrap();
        assert_eq!(st.last_outcome.as_ref().unwrap().name(), "cached");
        assert_eq!(st.last_processed, Some(at));
    });
}
