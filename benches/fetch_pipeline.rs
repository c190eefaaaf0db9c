//! Pulling a module through the real fetch pipeline, against what bounds it, measured in the same
//! run. Sizes: `PULL_MIB=64,256 cargo bench --bench fetch_pipeline` (default 64).
//!
//! - `pull_<n>MiB/sha256_in_memory`: `sha2::Sha256` over the module in memory (the hashing floor:
//!   every pull hashes the module once);
//! - `pull_<n>MiB/plain_download_discard`: a plain hyper GET of the module from an in-process
//!   HTTP/1.1 server on 127.0.0.1, body discarded (the transfer floor);
//! - `pull_<n>MiB/curl_to_file` and `pull_<n>MiB/openssl_dgst`: `curl -s -o FILE URL` from the same
//!   server, and `openssl dgst -sha256 FILE` of what it wrote (page cache): the tools a person
//!   would use to download and verify a module (skipped with a message when not installed);
//! - `pull_<n>MiB/fetch_http`: [`Fetcher::fetch_http`] from the same server with the real
//!   [`HyperTransport`] into a [`DiskStore`]: the body hashed while it is written to the staging
//!   file that becomes the module;
//! - `pull_<n>MiB/fetch_http_commit`: the same, then [`ModuleStore::commit`] (fsync, rename into
//!   the cache): served → verified on disk;
//! - `registry_<n>MiB/*`: the real Debian `docker-registry` (tests/support), a single-layer Wasm
//!   OCI artifact pushed to it, pulled with [`Fetcher::oci_resolve`] + [`Fetcher::oci_download`]
//!   (and committed), against a plain hyper GET of the same blob and the in-memory sha256, and,
//!   for reference, `curl -s -o FILE` of the blob. Skipped with a loud message when the registry
//!   binary is missing.
//!
//! Throughput is reported in bytes of module per second. At the end the bench prints, per size,
//! the min / median of every function's samples and the pipeline's ratio against the slower of
//! its same-run floors: `max(curl, openssl)` for HTTP, `max(sha256 in memory, plain blob GET)`
//! for the registry (the README's performance table is made from these lines).

#![allow(clippy::disallowed_methods)] // iter_custom measures wall time

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::hint::black_box;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput};
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
use wasm_ecds::fetch::{FetchConfig, Fetcher, StagedModule};
use wasm_ecds::store::{DiskStore, ModuleStore, OsFiles};
use wasm_ecds::url::OciRef;

use support::{find_on_path, ImageFormat, Registry, RegistryOptions};

const MIB: usize = 1 << 20;
/// Generous: a slow shared machine must not turn a measurement into a retry.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Every sample of every function, `group/function` → per-iteration times, for the summary.
type Samples = Arc<Mutex<BTreeMap<String, Vec<Duration>>>>;

/// Runs `f` once per iteration (its own timing: setup and cleanup may stay outside) and keeps
/// every per-iteration time for the summary.
fn measure(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    samples: &Samples,
    group: &str,
    name: &str,
    mut f: impl FnMut() -> Duration,
) {
    let key = format!("{group}/{name}");
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = f();
                samples
                    .lock()
                    .expect("samples")
                    .entry(key.clone())
                    .or_default()
                    .push(t);
                total += t;
            }
            total
        })
    });
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let v = f();
    (v, start.elapsed())
}

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

fn fetcher(config: &Config, transport: HyperTransport, store: Arc<DiskStore>) -> Fetcher {
    Fetcher {
        transport: Arc::new(transport),
        clock: Arc::new(SystemClock),
        store,
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

fn group<'a>(
    c: &'a mut Criterion,
    name: &str,
    size: usize,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Bytes(size as u64))
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(if size > 64 * MIB { 12 } else { 6 }));
    g
}

/// Commits `staged` (fsync, rename) and returns the time it took; the file is removed after.
fn commit_timed(store: &DiskStore, staged: StagedModule) -> Duration {
    let (path, t) = timed(|| {
        store
            .commit(staged.file, "bench://module", &staged.sha256)
            .expect("commit")
    });
    store.remove(&path).expect("remove");
    t
}

/// Runs `tool args...` and checks it succeeded.
fn run_tool(tool: &Path, args: &[&str]) {
    let out = Command::new(tool).args(args).output().expect("run tool");
    assert!(
        out.status.success(),
        "{} {args:?}: {}",
        tool.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn bench_http(c: &mut Criterion, samples: &Samples, size: usize) {
    let rt = runtime();
    let wasm = Bytes::from(wasm_module_of_size(size));
    let sha256 = hex::encode(Sha256::digest(&wasm));
    let addr = rt.block_on(serve(wasm.clone()));
    let url = format!("http://{addr}/module.wasm");
    let dir = tempfile::tempdir().expect("bench dir");
    let config = bench_config(Config::default());
    let store = Arc::new(DiskStore::open(dir.path().join("cache")).expect("cache dir"));
    let f = {
        let _guard = rt.enter();
        let transport = HyperTransport::new(&config, Vec::new()).expect("transport");
        fetcher(&config, transport, store.clone())
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
        (sha256.as_str(), size as u64)
    );
    drop(staged);
    assert_eq!(rt.block_on(download_discard(&plain, &url)), size as u64);

    let name = format!("pull_{}MiB", size / MIB);
    let mut g = group(c, &name, size);
    measure(&mut g, samples, &name, "sha256_in_memory", || {
        timed(|| black_box(Sha256::digest(black_box(&wasm[..])))).1
    });
    measure(&mut g, samples, &name, "plain_download_discard", || {
        timed(|| rt.block_on(download_discard(&plain, &url))).1
    });
    let file: PathBuf = dir.path().join("curl.wasm");
    let file_arg = file.to_str().expect("utf-8 path");
    match (find_on_path("curl"), find_on_path("openssl")) {
        (Some(curl), Some(openssl)) => {
            measure(&mut g, samples, &name, "curl_to_file", || {
                timed(|| run_tool(&curl, &["-s", "-o", file_arg, &url])).1
            });
            measure(&mut g, samples, &name, "openssl_dgst", || {
                timed(|| run_tool(&openssl, &["dgst", "-sha256", file_arg])).1
            });
            let _ = std::fs::remove_file(&file);
        }
        _ => eprintln!(
            "\n*** SKIP: curl_to_file and openssl_dgst: curl or openssl not on PATH ***\n"
        ),
    }
    measure(&mut g, samples, &name, "fetch_http", || {
        let (staged, t) = timed(|| rt.block_on(f.fetch_http(&url, f.budget())));
        drop(staged.expect("fetch_http"));
        t
    });
    measure(&mut g, samples, &name, "fetch_http_commit", || {
        let (staged, t) = timed(|| rt.block_on(f.fetch_http(&url, f.budget())));
        t + commit_timed(&store, staged.expect("fetch_http"))
    });
    g.finish();
}

fn bench_registry(c: &mut Criterion, samples: &Samples, size: usize) {
    let rt = runtime();
    let Some(registry) = rt.block_on(Registry::start(RegistryOptions::plain())) else {
        eprintln!(
            "\n*** SKIP: bench group registry: docker-registry not found \
             (set REGISTRY_BIN or run scripts/install-test-deps.sh) ***\n"
        );
        return;
    };
    let wasm = wasm_module_of_size(size);
    let pushed = rt.block_on(registry.push(
        "bench/module",
        "v1",
        ImageFormat::OciArtifactSingleLayer,
        &wasm,
    ));
    let url = registry.oci_url(&pushed.repo, &pushed.tag);
    let reference = OciRef::parse(url.trim_start_matches("oci://")).expect("oci reference");
    let blob_url = format!(
        "{}/v2/{}/blobs/{}",
        registry.base_url(),
        pushed.repo,
        pushed.module_layer
    );
    let dir = tempfile::tempdir().expect("cache dir");
    let config = bench_config(registry.config());
    let store = Arc::new(DiskStore::open(dir.path()).expect("cache dir"));
    let f = {
        let _guard = rt.enter();
        let transport = HyperTransport::new(&config, registry.extra_roots()).expect("transport");
        fetcher(&config, transport, store.clone())
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
        (pushed.wasm_sha256.as_str(), size as u64)
    );
    drop(staged);
    assert_eq!(
        rt.block_on(download_discard(&plain, &blob_url)),
        size as u64
    );

    let name = format!("registry_{}MiB", size / MIB);
    let mut g = group(c, &name, size);
    measure(&mut g, samples, &name, "sha256_in_memory", || {
        timed(|| black_box(Sha256::digest(black_box(&wasm[..])))).1
    });
    measure(
        &mut g,
        samples,
        &name,
        "plain_blob_download_discard",
        || timed(|| rt.block_on(download_discard(&plain, &blob_url))).1,
    );
    // Not a floor of the target, a reference: the same blob written to a file by curl (what the
    // pipeline's disk write costs on this machine).
    if let Some(curl) = find_on_path("curl") {
        let file = dir.path().join("curl-blob.wasm");
        let file_arg = file.to_str().expect("utf-8 path").to_string();
        measure(&mut g, samples, &name, "curl_blob_to_file", || {
            timed(|| run_tool(&curl, &["-s", "-o", &file_arg, &blob_url])).1
        });
        let _ = std::fs::remove_file(&file);
    }
    measure(&mut g, samples, &name, "oci_resolve_download", || {
        let (staged, t) = timed(|| rt.block_on(pull()));
        drop(staged);
        t
    });
    measure(
        &mut g,
        samples,
        &name,
        "oci_resolve_download_commit",
        || {
            let (staged, t) = timed(|| rt.block_on(pull()));
            t + commit_timed(&store, staged)
        },
    );
    g.finish();
    drop(registry);
}

/// `(min, median)` in milliseconds.
fn min_median(v: &[Duration]) -> (f64, f64) {
    let mut ms: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    (ms[0], ms[ms.len() / 2])
}

/// The summary: every function's min / median, and each pipeline against its floors.
fn summary(samples: &Samples) {
    let samples = samples.lock().expect("samples");
    println!("\nfetch_pipeline summary (ms, min / median of every sample of this run):");
    for (key, v) in samples.iter() {
        let (min, median) = min_median(v);
        println!("  {key:<48} {min:>9.1} / {median:>9.1}");
    }
    let get = |key: &str| samples.get(key).map(|v| min_median(v));
    let floor = |group: &str, names: &[&str]| -> Option<(f64, f64)> {
        names.iter().try_fold((0.0f64, 0.0f64), |(a, b), n| {
            let (min, median) = get(&format!("{group}/{n}"))?;
            Some((a.max(min), b.max(median)))
        })
    };
    let groups: Vec<String> = samples
        .keys()
        .filter_map(|k| k.split_once('/').map(|(g, _)| g.to_string()))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    println!("ratios against the slower floor of the same run (min / median):");
    for g in groups {
        let (floors, pipelines): (&[&str], &[&str]) = if g.starts_with("pull_") {
            (
                &["curl_to_file", "openssl_dgst"],
                &["fetch_http", "fetch_http_commit"],
            )
        } else {
            (
                &["sha256_in_memory", "plain_blob_download_discard"],
                &["oci_resolve_download", "oci_resolve_download_commit"],
            )
        };
        let Some((fmin, fmed)) = floor(&g, floors) else {
            println!("  {g}: no floor measured ({floors:?})");
            continue;
        };
        let reference = get(&format!("{g}/curl_blob_to_file"));
        for p in pipelines {
            if let Some((min, median)) = get(&format!("{g}/{p}")) {
                println!(
                    "  {g}/{p:<32} {min:>7.1} / {median:>7.1} ms = {:.2}× / {:.2}× max({}) {fmin:.1} / {fmed:.1} ms",
                    min / fmin,
                    median / fmed,
                    floors.join(", ")
                );
                if let Some((rmin, rmed)) = reference {
                    println!(
                        "  {:<width$} = {:.2}× / {:.2}× curl_blob_to_file {rmin:.1} / {rmed:.1} ms",
                        "",
                        min / rmin,
                        median / rmed,
                        width = g.len() + 54
                    );
                }
            }
        }
    }
}

fn main() {
    let sizes: Vec<usize> = std::env::var("PULL_MIB")
        .unwrap_or_else(|_| "64".into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse::<usize>()
                .unwrap_or_else(|_| panic!("PULL_MIB: want sizes in MiB such as 64,256, got {s:?}"))
                * MIB
        })
        .collect();
    let samples = Samples::default();
    let mut c = Criterion::default().configure_from_args();
    for &size in &sizes {
        bench_http(&mut c, &samples, size);
        bench_registry(&mut c, &samples, size);
    }
    c.final_summary();
    summary(&samples);
}
