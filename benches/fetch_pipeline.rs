//! Pulling a 64 MiB module through the real fetch pipeline, against what bounds it:
//!
//! - `pull_64MiB/sha256_in_memory`: `sha2::Sha256` over the same 64 MiB in memory (the hashing
//!   floor: every pull hashes the module at least once);
//! - `pull_64MiB/plain_download_discard`: a plain hyper GET of the module from an in-process
//!   HTTP/1.1 server on 127.0.0.1, body discarded (the transfer floor);
//! - `pull_64MiB/fetch_http_diskstore`: [`Fetcher::fetch_http`] from the same server with the real
//!   [`HyperTransport`], staged into a [`DiskStore`] in a temporary directory (download to a
//!   staging file, then unpack: read back, verify, hash and copy into the module's staging file);
//! - `registry_64MiB/*`: the real Debian `docker-registry` (tests/support), a 64 MiB single-layer
//!   Wasm OCI artifact pushed to it, pulled with [`Fetcher::oci_resolve`] +
//!   [`Fetcher::oci_download`] (blob streamed to the staging file while hashed), and, for
//!   comparison, the same blob downloaded with a plain hyper GET and discarded. Skipped with a loud
//!   message when the registry binary is missing.
//!
//! Staged modules are dropped (not committed into the cache), so no fsync is measured. Throughput
//! is reported in bytes of module per second.

#[path = "../tests/support/mod.rs"]
mod support;

use std::convert::Infallible;
use std::hint::black_box;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;

use wasm_ecds::clock::SystemClock;
use wasm_ecds::config::Config;
use wasm_ecds::fetch::hyper_transport::HyperTransport;
use wasm_ecds::fetch::{FetchConfig, Fetcher};
use wasm_ecds::store::{DiskStore, OsFiles};
use wasm_ecds::url::OciRef;

use support::{ImageFormat, Registry, RegistryOptions};

const MODULE_SIZE: usize = 64 << 20;
/// Generous: a slow shared machine must not turn a measurement into a retry.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// A valid Wasm binary of exactly `size` bytes: the header, then one custom section named `pad`
/// whose content is deterministic filler.
fn wasm_module_of_size(size: usize) -> Vec<u8> {
    let mut out = b"\0asm\x01\0\0\0".to_vec();
    out.push(0); // custom section
                 // header 8 + id 1 + LEB128(len) + len == size
    let (len, leb) = (1..=5)
        .map(|k| (size - 9 - k, k))
        .find(|(len, k)| leb128(*len as u64).len() == *k)
        .map(|(len, _)| (len, leb128(len as u64)))
        .expect("a section length fits");
    out.extend_from_slice(&leb);
    out.push(3);
    out.extend_from_slice(b"pad");
    let filler = len - 4;
    out.extend((0..filler as u64).map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8));
    assert_eq!(out.len(), size);
    out
}

fn leb128(mut n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

/// An HTTP/1.1 server on 127.0.0.1 answering every request with `body`.
async fn serve(body: Bytes) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let body = body.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req| {
                    let body = body.clone();
                    async move { Ok::<_, Infallible>(hyper::Response::new(Full::new(body))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

type PlainClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

/// GETs `url` and discards the body; returns its length.
async fn download_discard(client: &PlainClient, url: &str) -> u64 {
    let resp = client
        .get(url.parse().expect("uri"))
        .await
        .expect("plain GET");
    assert!(resp.status().is_success(), "{url}: {}", resp.status());
    let mut body = resp.into_body();
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("body frame").into_data() {
            n += data.len() as u64;
        }
    }
    n
}

fn fetcher(config: &Config, transport: HyperTransport, cache: &Path) -> Fetcher {
    Fetcher {
        transport: Arc::new(transport),
        clock: Arc::new(SystemClock),
        store: Arc::new(DiskStore::open(cache).expect("cache dir")),
        files: Arc::new(OsFiles),
        config: FetchConfig::from(config),
        jitter: None,
    }
}

fn bench_config(base: Config) -> Config {
    Config {
        http_request_timeout: REQUEST_TIMEOUT,
        max_binary_size: 1 << 30,
        ..base
    }
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn bench_http(c: &mut Criterion) {
    let rt = runtime();
    let wasm = Bytes::from(wasm_module_of_size(MODULE_SIZE));
    let sha256 = hex::encode(Sha256::digest(&wasm));
    let addr = rt.block_on(serve(wasm.clone()));
    let url = format!("http://{addr}/module.wasm");
    let cache = tempfile::tempdir().expect("cache dir");
    let config = bench_config(Config::default());
    let f = {
        let _guard = rt.enter();
        let transport = HyperTransport::new(&config, Vec::new()).expect("transport");
        fetcher(&config, transport, cache.path())
    };
    let plain: PlainClient = {
        let _guard = rt.enter();
        Client::builder(TokioExecutor::new()).build_http()
    };
    // Correctness once, outside the measurement.
    let staged = rt
        .block_on(f.fetch_http(&url, f.budget()))
        .expect("fetch_http");
    assert_eq!(
        (staged.sha256.as_str(), staged.size),
        (sha256.as_str(), MODULE_SIZE as u64)
    );
    drop(staged);
    assert_eq!(
        rt.block_on(download_discard(&plain, &url)),
        MODULE_SIZE as u64
    );

    let mut g = c.benchmark_group("pull_64MiB");
    g.throughput(Throughput::Bytes(MODULE_SIZE as u64))
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(6));
    g.bench_function("sha256_in_memory", |b| {
        b.iter(|| Sha256::digest(black_box(&wasm[..])))
    });
    g.bench_function("plain_download_discard", |b| {
        b.iter(|| rt.block_on(download_discard(&plain, &url)))
    });
    g.bench_function("fetch_http_diskstore", |b| {
        b.iter(|| {
            let staged = rt
                .block_on(f.fetch_http(&url, f.budget()))
                .expect("fetch_http");
            black_box(staged.size)
        })
    });
    g.finish();
}

fn bench_registry(c: &mut Criterion) {
    let rt = runtime();
    let Some(registry) = rt.block_on(Registry::start(RegistryOptions::plain())) else {
        eprintln!(
            "\n*** SKIP: bench group registry_64MiB: docker-registry not found \
             (set REGISTRY_BIN or run scripts/install-test-deps.sh) ***\n"
        );
        return;
    };
    let wasm = wasm_module_of_size(MODULE_SIZE);
    let pushed = rt.block_on(registry.push(
        "bench/module",
        "v1",
        ImageFormat::OciArtifactSingleLayer,
        &wasm,
    ));
    drop(wasm);
    let url = registry.oci_url(&pushed.repo, &pushed.tag);
    let reference = OciRef::parse(url.trim_start_matches("oci://")).expect("oci reference");
    let blob_url = format!(
        "{}/v2/{}/blobs/{}",
        registry.base_url(),
        pushed.repo,
        pushed.module_layer
    );
    let cache = tempfile::tempdir().expect("cache dir");
    let config = bench_config(registry.config());
    let f = {
        let _guard = rt.enter();
        let transport = HyperTransport::new(&config, registry.extra_roots()).expect("transport");
        fetcher(&config, transport, cache.path())
    };
    let plain: PlainClient = {
        let _guard = rt.enter();
        Client::builder(TokioExecutor::new()).build_http()
    };
    let pull = || async {
        let resolved = f
            .oci_resolve(&reference, None, f.budget())
            .await
            .expect("oci_resolve");
        f.oci_download(&resolved, f.budget())
            .await
            .expect("oci_download")
    };
    // Correctness once, outside the measurement.
    let staged = rt.block_on(pull());
    assert_eq!(
        (staged.sha256.as_str(), staged.size),
        (pushed.wasm_sha256.as_str(), MODULE_SIZE as u64)
    );
    drop(staged);
    assert_eq!(
        rt.block_on(download_discard(&plain, &blob_url)),
        MODULE_SIZE as u64
    );

    let mut g = c.benchmark_group("registry_64MiB");
    g.throughput(Throughput::Bytes(MODULE_SIZE as u64))
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8));
    g.bench_function("plain_blob_download_discard", |b| {
        b.iter(|| rt.block_on(download_discard(&plain, &blob_url)))
    });
    g.bench_function("oci_resolve_download_diskstore", |b| {
        b.iter(|| black_box(rt.block_on(pull()).size))
    });
    g.finish();
    drop(registry);
}

criterion_group!(benches, bench_http, bench_registry);
criterion_main!(benches);
