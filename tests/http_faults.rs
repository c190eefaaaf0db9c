//! The HTTP(S) and OCI fetchers over real sockets (behavior.md §4, §5): [`HyperTransport`] +
//! [`Fetcher`] + a [`DiskStore`] in a temporary directory, against servers run by the test: a
//! hyper server for ordinary pulls, wiremock for statuses, delays and a mock OCI registry, and a
//! raw tokio server for what no well-behaved server does (resets and stalls mid-body, gzip bombs,
//! bodies generated past the size limit).
//!
//! Outcomes are checked through [`FetchError::reason`], request counts on the servers' side. The
//! backoffs between attempts are skipped by [`SkipSleepClock`] (real time otherwise), so no test
//! waits on the wall clock for a retry and none asserts a duration. No external binaries: nothing
//! here skips.
//!
//! Length: a table of fault cases (one test each) over the same real-socket fixtures; splitting it
//! would only scatter the table.

mod support;

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use flate2::write::GzEncoder;
use flate2::Compression;
use serde_json::json;
use tar::EntryType;
use tempfile::TempDir;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use wasm_ecds::config::Config;
use wasm_ecds::fetch::hyper_transport::HyperTransport;
use wasm_ecds::fetch::oci::image::Blob;
use wasm_ecds::fetch::oci::OciResolved;
use wasm_ecds::fetch::{FetchConfig, FetchError, Fetcher, StagedModule};
use wasm_ecds::outcome::Reason;
use wasm_ecds::store::{sha256_hex, DiskStore, ModuleStore, OsFiles};
use wasm_ecds::url::OciRef;

use support::faults::{
    mount_blob, mount_manifest, mount_ping, received, ModuleServer, RawReply, RawServer, Route,
    SkipSleepClock, EVENT_TIMEOUT,
};
use support::image::{
    build_image, gzip, sha256_digest, tar, Image, ImageFormat, ManifestBuilder, OCI_CONFIG,
    OCI_LAYER, OCI_MANIFEST,
};
use support::wasm_module;

const MIB: u64 = 1 << 20;
/// `WASM_MAX_BINARY_SIZE_BYTES` default (behavior.md §4.2 "Size").
const DEFAULT_LIMIT: u64 = 256 * MIB;
/// What the oversized bodies hold (or inflate to).
const HUGE: u64 = 300 * MIB;
/// Attempts per request (`WASM_HTTP_REQUEST_MAX_RETRIES` default).
const ATTEMPTS: usize = 5;
/// The per-attempt timeout of the timeout tests: short, so they are quick, yet long enough for a
/// request to reach a loopback server on a busy machine.
const SHORT_TIMEOUT: Duration = Duration::from_millis(300);
/// The staging directory inside the cache (store.rs).
const STAGING: &str = ".staging";
const REPO: &str = "wasm/filter";
/// The first 8 bytes of a Wasm binary: magic and version.
const WASM_HEADER: &[u8] = b"\0asm\x01\0\0\0";

/// The backoffs before attempts 2..=`attempts` (behavior.md §4.1: 500 ms × 1.5ⁿ; no jitter here).
fn backoffs(attempts: usize) -> Vec<Duration> {
    let mut d = Duration::from_millis(500);
    (1..attempts)
        .map(|_| {
            let this = d;
            d = d.mul_f64(1.5);
            this
        })
        .collect()
}

/// A valid module of about `size` bytes; different tags give different checksums.
fn module_of(tag: &str, size: usize) -> Vec<u8> {
    wasm_module(&format!("{tag}-{}", "x".repeat(size)))
}

/// One fetcher over the real transport, storing into `<tempdir>/cache`. Backoffs are skipped.
struct Pull {
    root: TempDir,
    store: Arc<DiskStore>,
    clock: Arc<SkipSleepClock>,
    fetcher: Fetcher,
}

impl Pull {
    fn new(config: Config) -> Self {
        Self::tuned(config, |_| {})
    }

    /// `tune` adjusts what [`FetchConfig::from`] derived from `config`.
    fn tuned(config: Config, tune: impl FnOnce(&mut FetchConfig)) -> Self {
        let root = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(DiskStore::open(root.path().join("cache")).expect("cache dir"));
        let transport = HyperTransport::new(&config, Vec::new()).expect("transport");
        let clock = Arc::new(SkipSleepClock::default());
        let mut fetch_config = FetchConfig::from(&config);
        tune(&mut fetch_config);
        let fetcher = Fetcher {
            transport: Arc::new(transport),
            clock: clock.clone(),
            store: store.clone(),
            files: Arc::new(OsFiles),
            config: fetch_config,
            jitter: None,
        };
        Pull {
            root,
            store,
            clock,
            fetcher,
        }
    }

    async fn http(&self, url: &str) -> Result<StagedModule, FetchError> {
        let pull = self.fetcher.fetch_http(url, self.fetcher.budget());
        tokio::time::timeout(EVENT_TIMEOUT, pull)
            .await
            .unwrap_or_else(|_| panic!("{url}: the pull hung"))
    }

    /// Resolves and downloads `<registry>/wasm/filter:<tag>` (one pull budget, as the engine).
    async fn oci(
        &self,
        registry: &MockServer,
        tag: &str,
    ) -> Result<(OciResolved, StagedModule), FetchError> {
        let r = OciRef::parse(&format!("{}/{REPO}:{tag}", registry.address())).expect("oci ref");
        let pull = async {
            let budget = self.fetcher.budget();
            let resolved = self.fetcher.oci_resolve(&r, None, budget).await?;
            let staged = self.fetcher.oci_download(&resolved, budget).await?;
            Ok((resolved, staged))
        };
        tokio::time::timeout(EVENT_TIMEOUT, pull)
            .await
            .unwrap_or_else(|_| panic!("{r}: the pull hung"))
    }

    fn cache(&self) -> PathBuf {
        self.root.path().join("cache")
    }

    fn staging_files(&self) -> Vec<String> {
        names_in(&self.cache().join(STAGING))
    }

    /// Commits `staged` as `module_name` / `checksum` and checks the file on disk: where it is, and
    /// that its bytes hash to `staged.sha256`, which is the sha256 of `want`.
    fn commit_and_check(
        &self,
        staged: StagedModule,
        module_name: &str,
        checksum: &str,
        want: &[u8],
    ) {
        assert_eq!(staged.sha256, sha256_hex(want), "{module_name}: checksum");
        assert_eq!(staged.size, want.len() as u64, "{module_name}: size");
        let sha256 = staged.sha256.clone();
        let path = self
            .store
            .commit(staged.file, module_name, checksum)
            .expect("commit");
        // behavior.md §5: `<dir>/<hex sha256 of module name>/<checksum>.wasm`.
        let layout = self
            .cache()
            .join(sha256_hex(module_name.as_bytes()))
            .join(format!("{checksum}.wasm"));
        assert_eq!(path, layout);
        let on_disk = std::fs::read(&path).expect("committed file");
        assert_eq!(sha256_hex(&on_disk), sha256, "{}", path.display());
    }

    /// No module committed, no staging file left, nothing but the cache directory in the tempdir.
    fn assert_nothing_stored(&self) {
        assert_eq!(self.store.list().expect("list"), Vec::new());
        assert_eq!(self.staging_files(), Vec::<String>::new());
        assert_eq!(names_in(&self.cache()), [STAGING]);
        assert_eq!(names_in(self.root.path()), ["cache"]);
    }
}

fn names_in(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

fn config() -> Config {
    Config::default()
}

fn limited(max_binary_size: u64) -> Config {
    Config {
        max_binary_size,
        ..Config::default()
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP: a real server

// Multi-threaded: the body is hashed and unpacked on threads of their own while it streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_bodies_in_every_format_are_unpacked_and_committed() {
    let [plain, gzipped, tarred, tar_gz] =
        ["plain", "gzip", "tar", "tar.gz"].map(|tag| module_of(tag, 20_000));
    // (path, served body, module inside)
    let cases = [
        ("/plain.wasm", plain.clone(), plain),
        ("/gzip.wasm.gz", gzip(&gzipped), gzipped),
        ("/module.tar", tar(&[("plugin.wasm", &tarred)]), tarred),
        (
            "/module.tar.gz",
            gzip(&tar(&[("filter.wasm", &tar_gz)])),
            tar_gz,
        ),
    ];
    let server = ModuleServer::start(
        cases
            .iter()
            .map(|(path, body, _)| (*path, Route::Body(body.clone())))
            .collect(),
    )
    .await;
    // One fetcher for all four: the pooled keep-alive connection is reused between pulls.
    let p = Pull::new(config());
    for (path, _, module) in &cases {
        let url = server.url(path);
        let staged = p.http(&url).await.unwrap_or_else(|e| panic!("{path}: {e}"));
        let checksum = staged.sha256.clone();
        p.commit_and_check(staged, &url, &checksum, module);
        assert_eq!(server.hits(path), 1, "{path}");
    }
    assert_eq!(p.store.list().expect("list").len(), cases.len());
    assert_eq!(p.staging_files(), Vec::<String>::new());
    assert_eq!(p.clock.skipped(), backoffs(1), "no retries");
}

#[tokio::test]
async fn http_redirect_to_another_path_is_followed() {
    let module = module_of("redirected", 5_000);
    let server = ModuleServer::start(vec![
        (
            "/old/filter.wasm",
            Route::Redirect(302, "/new/filter.wasm".into()),
        ),
        ("/new/filter.wasm", Route::Body(gzip(&module))),
    ])
    .await;
    let p = Pull::new(config());
    let url = server.url("/old/filter.wasm");
    let staged = p.http(&url).await.expect("pull through the redirect");
    let checksum = staged.sha256.clone();
    // The module keeps the name of the URL the plugin gave, not the redirect target.
    p.commit_and_check(staged, &url, &checksum, &module);
    assert_eq!(server.hits("/old/filter.wasm"), 1);
    assert_eq!(server.hits("/new/filter.wasm"), 1);
    assert_eq!(p.clock.skipped(), backoffs(1));
}

// ---------------------------------------------------------------------------------------------
// HTTP: wiremock statuses and delays

#[tokio::test]
async fn http_503s_are_retried_until_a_200() {
    let module = module_of("after-503", 1_000);
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/filter.wasm"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(3)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/filter.wasm"))
        .respond_with(ResponseTemplate::new(200).set_body_bytes(module.clone()))
        .mount(&server)
        .await;
    let p = Pull::new(config());
    let url = format!("{}/filter.wasm", server.uri());
    let staged = p.http(&url).await.expect("the fourth attempt succeeds");
    let checksum = staged.sha256.clone();
    p.commit_and_check(staged, &url, &checksum, &module);
    assert_eq!(received(&server, None).await, 4);
    assert_eq!(p.clock.skipped(), backoffs(4));
}

#[tokio::test]
async fn http_failing_statuses_are_retried_only_when_transient() {
    // (status, requests, reason): 5xx but 501/505/511 are retried up to the attempt limit;
    // 4xx (401/403 too: no credentials go to web servers) and 501 are final.
    let cases = [
        (503, ATTEMPTS, Reason::DownloadFailure),
        (500, ATTEMPTS, Reason::DownloadFailure),
        (404, 1, Reason::DownloadFailure),
        (403, 1, Reason::DownloadFailure),
        (501, 1, Reason::DownloadFailure),
    ];
    for (status, requests, reason) in cases {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(status))
            .mount(&server)
            .await;
        let p = Pull::new(config());
        let url = format!("{}/filter.wasm", server.uri());
        let err = p.http(&url).await.expect_err("a failing status");
        assert_eq!(err.reason(), reason, "{status}: {err}");
        let message = err.to_string();
        assert!(
            message.contains(&url) && message.contains(&status.to_string()),
            "{status}: {message}"
        );
        assert_eq!(received(&server, None).await, requests, "{status}");
        assert_eq!(p.clock.skipped(), backoffs(requests), "{status}");
        p.assert_nothing_stored();
    }
}

#[tokio::test]
async fn http_slow_server_times_out_on_every_attempt() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_bytes(module_of("slow", 100))
                .set_delay(Duration::from_secs(10)),
        )
        .mount(&server)
        .await;
    let p = Pull::tuned(config(), |c| c.request_timeout = SHORT_TIMEOUT);
    let url = format!("{}/filter.wasm", server.uri());
    let err = p.http(&url).await.expect_err("every attempt times out");
    assert_eq!(err.reason(), Reason::DownloadFailure, "{err}");
    assert!(err.to_string().contains("timed out"), "{err}");
    assert_eq!(received(&server, None).await, ATTEMPTS);
    assert_eq!(p.clock.skipped(), backoffs(ATTEMPTS));
    p.assert_nothing_stored();
}

// ---------------------------------------------------------------------------------------------
// HTTP: faults from a raw server

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_bodies_cut_off_mid_way_are_retried_until_complete() {
    let module = module_of("cut", 200_000);
    let announced = module.len() as u64;
    let half = module[..module.len() / 2].to_vec();
    let full = module.clone();
    let server = RawServer::start(move |_, n| match n {
        // A TCP reset, then a plain close, each after half of the announced body.
        0 => RawReply::CutOff {
            announced,
            body: half.clone(),
            reset: true,
        },
        1 => RawReply::CutOff {
            announced,
            body: half.clone(),
            reset: false,
        },
        _ => RawReply::ok(full.clone()),
    })
    .await;
    let p = Pull::new(config());
    let url = server.url("/filter.wasm");
    let staged = p.http(&url).await.expect("the third attempt succeeds");
    let checksum = staged.sha256.clone();
    p.commit_and_check(staged, &url, &checksum, &module);
    assert_eq!(server.requests(), ["/filter.wasm"; 3]);
    assert_eq!(server.connections(), 3);
    assert_eq!(p.clock.skipped(), backoffs(3));
    assert_eq!(p.staging_files(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_body_cut_off_on_every_attempt_is_a_download_failure() {
    let module = module_of("always-cut", 100_000);
    let announced = module.len() as u64;
    let half = module[..module.len() / 2].to_vec();
    let server = RawServer::start(move |_, _| RawReply::CutOff {
        announced,
        body: half.clone(),
        reset: false,
    })
    .await;
    let p = Pull::new(config());
    let url = server.url("/filter.wasm");
    let err = p.http(&url).await.expect_err("never complete");
    assert_eq!(err.reason(), Reason::DownloadFailure, "{err}");
    // The transfer broke while the body was read (not a status, not an unpacking error).
    assert!(err.to_string().contains("connection reset"), "{err}");
    assert_eq!(server.requests().len(), ATTEMPTS);
    assert_eq!(p.clock.skipped(), backoffs(ATTEMPTS));
    p.assert_nothing_stored();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_body_stalling_mid_way_times_out_and_is_retried() {
    // wiremock can delay a response, not stop in the middle of a body: the per-attempt timeout
    // must cover reading the body too.
    let module = module_of("stall", 100_000);
    let announced = module.len() as u64;
    let half = module[..module.len() / 2].to_vec();
    let full = module.clone();
    let server = RawServer::start(move |_, n| match n {
        0 => RawReply::Stall {
            announced,
            body: half.clone(),
        },
        _ => RawReply::ok(full.clone()),
    })
    .await;
    let p = Pull::tuned(config(), |c| c.request_timeout = SHORT_TIMEOUT);
    let url = server.url("/filter.wasm");
    let staged = p.http(&url).await.expect("the second attempt succeeds");
    let checksum = staged.sha256.clone();
    p.commit_and_check(staged, &url, &checksum, &module);
    assert_eq!(server.requests().len(), 2);
    assert_eq!(p.clock.skipped(), backoffs(2));
    assert_eq!(p.staging_files(), Vec::<String>::new());
}

/// A Wasm header followed by 300 MiB of zeros, gzipped (about 300 KiB); built once.
fn gzip_bomb() -> &'static [u8] {
    static BOMB: OnceLock<Vec<u8>> = OnceLock::new();
    BOMB.get_or_init(|| {
        let mut e = GzEncoder::new(Vec::new(), Compression::default());
        e.write_all(WASM_HEADER).expect("gzip");
        let zeros = vec![0u8; MIB as usize];
        for _ in 0..HUGE / MIB {
            e.write_all(&zeros).expect("gzip");
        }
        e.finish().expect("gzip")
    })
}

async fn bomb_is_too_large(limit: u64) {
    let bomb = gzip_bomb();
    assert!((bomb.len() as u64) < MIB, "{} bytes", bomb.len());
    let body = bomb.to_vec();
    let server = RawServer::start(move |_, _| RawReply::ok(body.clone())).await;
    let p = Pull::new(limited(limit));
    let err = p
        .http(&server.url("/bomb.wasm.gz"))
        .await
        .expect_err("inflates past the limit");
    assert_eq!(err, FetchError::TooLarge { limit });
    assert_eq!(err.reason(), Reason::TooLarge);
    assert_eq!(server.requests().len(), 1, "too large is not retried");
    assert_eq!(p.clock.skipped(), backoffs(1));
    p.assert_nothing_stored();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_gzip_bomb_is_too_large() {
    bomb_is_too_large(16 * MIB).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_gzip_bomb_past_the_default_limit_is_too_large() {
    bomb_is_too_large(DEFAULT_LIMIT).await;
}

/// The probe's gzip of 50 MiB of zeros (not Wasm): refused from the first inflated bytes with a
/// clear reason, not retried, and nothing staged afterwards. A plain module is staged once: the
/// body itself is the module (no unpacked copy beside it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_gzip_of_zeros_is_invalid_and_a_plain_body_is_staged_once() {
    let mut e = GzEncoder::new(Vec::new(), Compression::default());
    let zeros = vec![0u8; MIB as usize];
    for _ in 0..50 {
        e.write_all(&zeros).expect("gzip");
    }
    let zeros_gz = e.finish().expect("gzip");
    let module = wasm_module("once");
    let plain = module.clone();
    let server = RawServer::start(move |path, _| {
        RawReply::ok(if path.contains("zeros") {
            zeros_gz.clone()
        } else {
            plain.clone()
        })
    })
    .await;
    let p = Pull::new(config());
    let err = p
        .http(&server.url("/zeros.gz"))
        .await
        .expect_err("not wasm");
    assert_eq!(
        err,
        FetchError::InvalidModule("not a Wasm module (no \\0asm header)".into())
    );
    assert_eq!(server.requests().len(), 1, "invalid content is not retried");
    p.assert_nothing_stored();

    let staged = p.http(&server.url("/plain.wasm")).await.expect("plain");
    assert_eq!(p.staging_files().len(), 1, "{:?}", p.staging_files());
    p.commit_and_check(staged, "http://h/plain.wasm", "c", &module);
    assert_eq!(p.staging_files(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_stream_past_the_default_limit_is_abandoned_early() {
    // Chunked: only the bytes tell the client the body is too large.
    let server = RawServer::start(|_, _| RawReply::Stream {
        prefix: WASM_HEADER.to_vec(),
        total: HUGE,
        announce: false,
    })
    .await;
    let p = Pull::new(config());
    let err = p
        .http(&server.url("/huge.wasm"))
        .await
        .expect_err("past the default limit");
    assert_eq!(
        err,
        FetchError::TooLarge {
            limit: DEFAULT_LIMIT
        }
    );
    let report = server.stream_report().await;
    assert!(!report.completed, "{report:?}");
    // The client read up to the limit, then closed the connection: the server could not send
    // the rest (what it wrote includes what sat in the socket buffers).
    assert!(
        report.written > DEFAULT_LIMIT && report.written < HUGE,
        "{report:?}"
    );
    assert_eq!(server.requests().len(), 1);
    assert_eq!(p.clock.skipped(), backoffs(1));
    p.assert_nothing_stored();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_announced_oversize_body_is_refused_before_reading() {
    let server = RawServer::start(|_, _| RawReply::Stream {
        prefix: WASM_HEADER.to_vec(),
        total: HUGE,
        announce: true,
    })
    .await;
    let p = Pull::new(config());
    let err = p
        .http(&server.url("/huge.wasm"))
        .await
        .expect_err("Content-Length past the limit");
    assert_eq!(
        err,
        FetchError::TooLarge {
            limit: DEFAULT_LIMIT
        }
    );
    let report = server.stream_report().await;
    assert!(!report.completed, "{report:?}");
    // Only what fit in the socket buffers before the client hung up.
    assert!(report.written < 64 * MIB, "{report:?}");
    assert_eq!(server.requests().len(), 1);
    p.assert_nothing_stored();
}

// ---------------------------------------------------------------------------------------------
// Blocked addresses

fn blocking(cidrs: &[&str]) -> Config {
    Config {
        blocked_cidrs: cidrs.iter().map(|c| c.parse().expect("cidr")).collect(),
        ..Config::default()
    }
}

#[tokio::test]
async fn blocked_addresses_are_never_connected() {
    let server = RawServer::start(|_, _| RawReply::ok(wasm_module("blocked"))).await;
    let port = server.addr().port();
    // (config, url): IP literals (checked before connecting; `0.0.0.0` and a v4-mapped address
    // both reach 127.0.0.1) and a name (checked by the resolver; `localhost` may also resolve to
    // ::1, so that is blocked too).
    let cases = [
        (blocking(&["127.0.0.0/8"]), server.url("/m.wasm")),
        (
            blocking(&["127.0.0.0/8"]),
            format!("http://0.0.0.0:{port}/m.wasm"),
        ),
        (
            blocking(&["127.0.0.0/8"]),
            format!("http://[::ffff:127.0.0.1]:{port}/m.wasm"),
        ),
        (
            blocking(&["127.0.0.0/8", "::1/128"]),
            format!("http://localhost:{port}/m.wasm"),
        ),
    ];
    for (config, url) in cases {
        let p = Pull::new(config);
        let err = p.http(&url).await.expect_err("blocked");
        assert_eq!(err.reason(), Reason::BlockedAddress, "{url}: {err}");
        assert_eq!(p.clock.skipped(), backoffs(1), "{url}: not retried");
        p.assert_nothing_stored();
    }
    assert_eq!(server.connections(), 0);

    // Unblocked, the same server serves the module, also through `0.0.0.0`: the refusals above
    // were the guard's.
    let p = Pull::new(config());
    p.http(&server.url("/m.wasm")).await.expect("not blocked");
    p.http(&format!("http://0.0.0.0:{port}/m.wasm"))
        .await
        .expect("0.0.0.0 reaches loopback");
    assert_eq!(server.connections(), 2);
}

#[tokio::test]
async fn redirect_to_a_blocked_address_is_refused() {
    let blocked_ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let inner = RawServer::start_on(blocked_ip, |_, _| RawReply::ok(wasm_module("inner"))).await;
    let target = inner.url("/filter.wasm");
    let outer = RawServer::start(move |_, _| RawReply::redirect(302, &target)).await;
    let p = Pull::new(blocking(&["127.0.0.2/32"]));
    let err = p
        .http(&outer.url("/filter.wasm"))
        .await
        .expect_err("the hop is blocked");
    assert_eq!(err.reason(), Reason::BlockedAddress, "{err}");
    assert_eq!(outer.requests().len(), 1);
    assert_eq!(inner.connections(), 0);
    p.assert_nothing_stored();
}

// ---------------------------------------------------------------------------------------------
// OCI: a registry mocked with wiremock

/// An anonymous registry answering `/v2/`.
async fn registry() -> MockServer {
    let server = MockServer::start().await;
    mount_ping(&server).await;
    server
}

/// Plain HTTP for the mock registry (behavior.md §4.2 `WASM_INSECURE_REGISTRIES`).
fn oci_config(registry: &MockServer) -> Config {
    Config {
        insecure_registries: vec![registry.address().to_string()],
        ..Config::default()
    }
}

fn manifest_path(tag: &str) -> String {
    format!("/v2/{REPO}/manifests/{tag}")
}

fn blob_path(digest: &str) -> String {
    format!("/v2/{REPO}/blobs/{digest}")
}

async fn mount_image(registry: &MockServer, tag: &str, image: &Image) {
    mount_manifest(registry, REPO, tag, &image.manifest, image.media_type).await;
    for blob in &image.blobs {
        mount_blob(registry, REPO, &blob.digest, &blob.bytes).await;
    }
}

/// An OCI "compat" image whose only layer is `layer`.
fn compat_image(layer: Vec<u8>) -> Image {
    let config = serde_json::to_vec(&json!({"architecture": "amd64", "os": "linux", "config": {}}))
        .expect("config json");
    ManifestBuilder::new(OCI_MANIFEST, Blob::new(OCI_CONFIG, config))
        .module_layer(Blob::new(OCI_LAYER, layer), None)
        .build()
        .into()
}

fn hex(digest: &str) -> &str {
    digest.trim_start_matches("sha256:")
}

// Multi-threaded: the body is hashed and unpacked on threads of their own while it streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oci_compat_image_is_pulled_from_the_mock_registry() {
    // The baseline for the failures below: the mock registry serves a pullable image.
    let module = module_of("oci", 10_000);
    let image = build_image(ImageFormat::OciCompat, &module);
    let server = registry().await;
    mount_image(&server, "v1", &image).await;
    let p = Pull::new(oci_config(&server));
    let (resolved, staged) = p.oci(&server, "v1").await.expect("pull");
    assert_eq!(resolved.digest, hex(&image.digest));
    let name = format!("oci://{}/{REPO}", server.address());
    p.commit_and_check(staged, &name, &resolved.digest, &module);
    assert_eq!(received(&server, Some(&manifest_path("v1"))).await, 1);
    assert_eq!(
        received(&server, Some(&blob_path(&image.module_layer))).await,
        1
    );
    // Config and decoy layer are never downloaded: ping + manifest + one blob.
    assert_eq!(received(&server, None).await, 3);
    assert_eq!(p.staging_files(), Vec::<String>::new());
}

// Multi-threaded: the body is hashed and unpacked on threads of their own while it streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oci_blob_not_matching_its_digest_is_retried_then_fails() {
    let module = module_of("corrupted", 10_000);
    let image = build_image(ImageFormat::OciCompat, &module);
    let server = registry().await;
    mount_manifest(&server, REPO, "v1", &image.manifest, image.media_type).await;
    let layer = image
        .blobs
        .iter()
        .find(|b| b.digest == image.module_layer)
        .expect("module layer");
    let mut corrupted = layer.bytes.clone();
    let middle = corrupted.len() / 2;
    corrupted[middle] ^= 0x01;
    mount_blob(&server, REPO, &layer.digest, &corrupted).await;
    let p = Pull::new(oci_config(&server));
    let err = p
        .oci(&server, "v1")
        .await
        .expect_err("digest never matches");
    assert_eq!(err.reason(), Reason::DownloadFailure, "{err}");
    assert!(err.to_string().contains("descriptor"), "{err}");
    assert_eq!(
        received(&server, Some(&blob_path(&layer.digest))).await,
        ATTEMPTS
    );
    assert_eq!(received(&server, Some(&manifest_path("v1"))).await, 1);
    assert_eq!(p.clock.skipped(), backoffs(ATTEMPTS));
    p.assert_nothing_stored();
}

#[tokio::test]
async fn oci_manifest_failures() {
    // (status, manifest requests, reason)
    let cases = [
        (404, 1, Reason::ManifestFailure),
        (401, 1, Reason::Unauthorized),
        (403, 1, Reason::Unauthorized),
        (503, ATTEMPTS, Reason::ManifestFailure),
    ];
    for (status, requests, reason) in cases {
        let server = registry().await;
        Mock::given(method("GET"))
            .and(path(manifest_path("v1")))
            .respond_with(ResponseTemplate::new(status))
            .mount(&server)
            .await;
        let p = Pull::new(oci_config(&server));
        let err = p.oci(&server, "v1").await.expect_err("manifest refused");
        assert_eq!(err.reason(), reason, "{status}: {err}");
        assert_eq!(
            received(&server, Some(&manifest_path("v1"))).await,
            requests,
            "{status}"
        );
        // Ping and manifest requests only: no blob was asked for.
        assert_eq!(received(&server, None).await, 1 + requests, "{status}");
        assert_eq!(p.clock.skipped(), backoffs(requests), "{status}");
        p.assert_nothing_stored();
    }
}

/// A tar with hand-written headers (the tar crate refuses `..` in entry names).
fn raw_tar(entries: &[(&str, EntryType, Option<&str>, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, link, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_entry_type(*kind);
        if let Some(link) = link {
            h.set_link_name(link).expect("link name");
        }
        h.set_cksum();
        b.append(&h, *data).expect("tar entry");
    }
    b.into_inner().expect("tar")
}

// Multi-threaded: the body is hashed and unpacked on threads of their own while it streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oci_layer_with_traversal_and_links_is_invalid_and_writes_nothing() {
    let module = module_of("escape", 1_000);
    let server = registry().await;
    let p = Pull::new(oci_config(&server));
    // A name nothing else uses, to look for next to the cache and above the tempdir.
    let stray = format!(
        "stray-{}.wasm",
        p.root
            .path()
            .file_name()
            .expect("tempdir name")
            .to_string_lossy()
    );
    let up_one = format!("../{stray}");
    let up_two = format!("../../{stray}");
    // No regular file called plugin.wasm inside the archive: links and `..` paths only.
    let layer = gzip(&raw_tar(&[
        ("plugin.wasm", EntryType::Symlink, Some(&up_two), b""),
        ("x/plugin.wasm", EntryType::Link, Some("/etc/passwd"), b""),
        ("../plugin.wasm", EntryType::Regular, None, &module),
        ("a/../../plugin.wasm", EntryType::Regular, None, &module),
        (&up_one, EntryType::Regular, None, &module),
        (&up_two, EntryType::Regular, None, &module),
    ]));
    let image = compat_image(layer);
    mount_image(&server, "v1", &image).await;
    let err = p
        .oci(&server, "v1")
        .await
        .expect_err("no usable plugin.wasm");
    assert_eq!(err.reason(), Reason::InvalidModule, "{err}");
    assert!(err.to_string().contains("no plugin.wasm"), "{err}");
    // Content, not transfer: the blob is asked for once.
    assert_eq!(
        received(&server, Some(&blob_path(&image.module_layer))).await,
        1
    );
    // Nothing in the cache nor next to it (`<tempdir>/cache` is all the tempdir holds) ...
    p.assert_nothing_stored();
    // ... nor above the tempdir (`symlink_metadata`: a dangling link would count too).
    let above = p.root.path().parent().expect("tempdir parent").join(&stray);
    assert!(
        above.symlink_metadata().is_err(),
        "{} was written",
        above.display()
    );
}

/// A registry whose `/v2/` challenge names a Bearer token realm on the mock server itself; the token
/// endpoint wants Basic `alice:s3cret`; manifests and blobs want the token.
async fn bearer_registry(image: &Image) -> MockServer {
    use base64::Engine as _;
    use wiremock::matchers::header;
    let server = MockServer::start().await;
    let realm = format!("http://{}/token", server.address());
    let challenge = format!(r#"Bearer realm="{realm}",service="mock-registry""#);
    Mock::given(method("GET"))
        .and(path("/v2/"))
        .respond_with(
            ResponseTemplate::new(401).insert_header("www-authenticate", challenge.as_str()),
        )
        .mount(&server)
        .await;
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("alice:s3cret")
    );
    Mock::given(method("GET"))
        .and(path("/token"))
        .and(header("authorization", basic.as_str()))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"token": "t0k3n"})))
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/token"))
        .respond_with(ResponseTemplate::new(401))
        .with_priority(10)
        .mount(&server)
        .await;
    let digest = sha256_digest(&image.manifest);
    Mock::given(method("GET"))
        .and(path(manifest_path("v1")))
        .and(header("authorization", "Bearer t0k3n"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_bytes(image.manifest.clone())
                .insert_header("content-type", image.media_type)
                .insert_header("docker-content-digest", digest.as_str()),
        )
        .with_priority(1)
        .mount(&server)
        .await;
    for blob in &image.blobs {
        Mock::given(method("GET"))
            .and(path(blob_path(&blob.digest)))
            .and(header("authorization", "Bearer t0k3n"))
            .respond_with(ResponseTemplate::new(200).set_body_bytes(blob.bytes.clone()))
            .with_priority(1)
            .mount(&server)
            .await;
    }
    // Anything else under /v2/ without the token: the challenge again.
    Mock::given(method("GET"))
        .respond_with(
            ResponseTemplate::new(401).insert_header("www-authenticate", challenge.as_str()),
        )
        .with_priority(10)
        .mount(&server)
        .await;
    server
}

async fn pull_with(
    p: &Pull,
    server: &MockServer,
    creds: Option<&wasm_ecds::plugin::Credentials>,
) -> Result<(OciResolved, StagedModule), FetchError> {
    let r = OciRef::parse(&format!("{}/{REPO}:v1", server.address())).expect("oci ref");
    let budget = p.fetcher.budget();
    let resolved = p.fetcher.oci_resolve(&r, creds, budget).await?;
    let staged = p.fetcher.oci_download(&resolved, budget).await?;
    Ok((resolved, staged))
}

/// behavior.md §4.2 "Authentication": a Bearer-token registry. The token is fetched from the
/// challenge's realm with the pull secret's credentials (uncounted), and the manifest and the blob
/// carry it; wrong credentials are `unauthorized`; a realm on a loopback address is refused unless
/// explicitly allowed (tests only).
#[tokio::test]
async fn bearer_token_registry_pull_with_credentials() {
    let module = module_of("bearer", 5_000);
    let image = build_image(ImageFormat::OciArtifact, &module);
    let server = bearer_registry(&image).await;
    let alice = wasm_ecds::plugin::Credentials {
        username: "alice".into(),
        password: "s3cret".into(),
    };
    let p = Pull::tuned(oci_config(&server), |c| c.allow_private_token_realm = true);
    let (resolved, staged) = pull_with(&p, &server, Some(&alice))
        .await
        .expect("bearer pull");
    assert!(resolved.used_credentials);
    assert_eq!(staged.sha256, sha256_hex(&module));
    assert_eq!(received(&server, Some("/token")).await, 1);
    assert_eq!(received(&server, Some(&manifest_path("v1"))).await, 1);
    assert_eq!(
        received(&server, Some(&blob_path(&image.module_layer))).await,
        1
    );

    // Wrong password: the token endpoint refuses, nothing is pulled.
    let mallory = wasm_ecds::plugin::Credentials {
        username: "alice".into(),
        password: "guess".into(),
    };
    let err = pull_with(&p, &server, Some(&mallory))
        .await
        .expect_err("refused");
    assert_eq!(err.reason(), Reason::Unauthorized, "{err}");
    assert!(
        !err.to_string().contains("guess"),
        "the password leaked: {err}"
    );

    // Anonymous: the registry keeps answering 401.
    let err = pull_with(&p, &server, None).await.expect_err("anonymous");
    assert_eq!(err.reason(), Reason::Unauthorized, "{err}");

    // By default a token realm on a loopback address is refused before any token request.
    let strict = Pull::new(oci_config(&server));
    let before = received(&server, Some("/token")).await;
    let err = pull_with(&strict, &server, Some(&alice))
        .await
        .expect_err("loopback realm");
    assert_eq!(err.reason(), Reason::Unauthorized, "{err}");
    assert_eq!(received(&server, Some("/token")).await, before);
}
