//! behavior.md §2 and §6: under `Always`, an http(s) plugin asks its server again at every new
//! resource version; a real server that answers the conditional request (`If-None-Match` with the
//! `ETag` it sent) with `304 Not Modified` makes the outcome `revalidated`: no body is downloaded
//! and the cached module is served. The validators survive a restart with the cache.
//! Runs the driver `serve` uses over the real transport (hyper), a real disk cache and a wiremock
//! server, on the system clock.

mod support;

use std::sync::Arc;

use serde_json::json;
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use wasm_ecds::clock::{Clock, SystemClock};
use wasm_ecds::config::Config;
use wasm_ecds::driver::{Driver, DriverParts};
use wasm_ecds::engine::EngineParts;
use wasm_ecds::engine::Serving;
use wasm_ecds::fetch::hyper_transport::HyperTransport;
use wasm_ecds::outcome::Outcome;
use wasm_ecds::plugin::ObjectKey;
use wasm_ecds::source::Change;
use wasm_ecds::store::{sha256_hex, DiskStore, OsFiles};

use support::wasm_module;

const PATH: &str = "/filters/etag.wasm";

async fn serve_version(server: &MockServer, etag: &str, body: &[u8]) {
    server.reset().await;
    Mock::given(method("GET"))
        .and(path(PATH))
        .and(header("if-none-match", etag))
        .respond_with(ResponseTemplate::new(304).insert_header("etag", etag))
        .with_priority(1)
        .mount(server)
        .await;
    Mock::given(method("GET"))
        .and(path(PATH))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("etag", etag)
                .set_body_bytes(body.to_vec()),
        )
        .with_priority(5)
        .mount(server)
        .await;
}

fn driver(cache: &std::path::Path) -> Driver {
    let config = Config {
        cache_dir: cache.to_path_buf(),
        ..Config::default()
    };
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let start = clock.now();
    let (driver, _) = Driver::new(DriverParts {
        config: config.clone(),
        engine: EngineParts {
            clock,
            transport: Arc::new(HyperTransport::new(&config, Vec::new()).expect("transport")),
            store: Arc::new(DiskStore::open(cache).expect("cache dir")),
            files: Arc::new(OsFiles),
            jitter_seed: None,
            fetch_config: None,
            purge_epoch: start,
        },
        module_endpoint: "http://127.0.0.1:0".into(),
    })
    .expect("driver");
    driver
}

fn key() -> ObjectKey {
    ObjectKey::new("default", "etag")
}

fn last_outcome(driver: &Driver) -> Outcome {
    driver
        .engine()
        .plugin(&key())
        .and_then(|s| s.last_outcome.clone())
        .expect("processed")
}

async fn apply(driver: &mut Driver, url: &str, label: &str) -> Outcome {
    let applied = driver.apply(&json!({
        "apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin",
        "metadata": {"name": "etag", "labels": {"edit": label}},
        "spec": {"url": url, "imagePullPolicy": "Always"},
    }));
    assert!(
        matches!(
            applied.change,
            Change::PluginCreated(_) | Change::PluginChanged(_)
        ),
        "{:?}",
        applied.change
    );
    driver
        .run_until_done(&applied.ticket)
        .await
        .expect("settles");
    last_outcome(driver)
}

fn served_sha(driver: &Driver) -> String {
    match &driver.engine().plugin(&key()).expect("plugin").serving {
        Serving::Module(m) => m.sha256.clone(),
        other => panic!("serves {other:?}"),
    }
}

async fn gets(server: &MockServer) -> (usize, usize) {
    let reqs = server.received_requests().await.unwrap_or_default();
    let conditional = reqs
        .iter()
        .filter(|r| r.headers.contains_key("if-none-match"))
        .count();
    (reqs.len(), conditional)
}

#[tokio::test]
async fn always_http_plugin_is_revalidated_by_a_304_and_pulled_when_the_etag_changes() {
    let server = MockServer::start().await;
    let url = format!("{}{PATH}", server.uri());
    let (v1, v2) = (wasm_module("etag-v1"), wasm_module("etag-v2"));
    serve_version(&server, "\"v1\"", &v1).await;
    let cache = tempfile::tempdir().unwrap();
    let mut e = driver(cache.path());

    assert_eq!(apply(&mut e, &url, "a").await, Outcome::Pulled);
    assert_eq!(served_sha(&e), sha256_hex(&v1));
    assert_eq!(gets(&server).await, (1, 0), "first pull is unconditional");

    // A label edit under Always asks again, conditionally: 304, nothing downloaded.
    assert_eq!(apply(&mut e, &url, "b").await, Outcome::Revalidated);
    assert_eq!(served_sha(&e), sha256_hex(&v1));

    // The validators are persisted: a restarted server revalidates too.
    let (_, ticket) = e.restart(true).expect("restart");
    e.run_until_done(&ticket).await.expect("settles");
    assert_eq!(last_outcome(&e), Outcome::Revalidated);

    // The server's file changes (new ETag): the next edit downloads it.
    let before = server.received_requests().await.unwrap_or_default().len();
    serve_version(&server, "\"v2\"", &v2).await;
    assert_eq!(apply(&mut e, &url, "c").await, Outcome::Pulled);
    assert_eq!(served_sha(&e), sha256_hex(&v2));
    // `reset` cleared the recorded requests: one conditional GET answered with the new body.
    assert_eq!(gets(&server).await, (1, 1));
    assert!(before >= 3);
    let m = e.engine().metrics().samples();
    assert_eq!(
        m[r#"istio_agent_wasm_remote_fetch_count{result="success"}"#], 1.0,
        "per process: restarted engine"
    );
    assert_eq!(m[r#"istio_agent_wasm_cache_lookup_count{hit="true"}"#], 1.0);
}
