//! What held up under the hostile probe of issue 10, kept as regression tests against a real
//! `wasm-ecds serve` process (`tests/support/serve.rs`), real HTTP servers on loopback
//! (`tests/support/faults.rs`) and raw sockets: the network side. (The disk side — kills, corrupt
//! caches, read-only and full disks, hostile manifests — is in `held_up_disk.rs`.)
//!
//! - every spelling of a blocked address is refused before any connection is opened;
//! - a body that never ends stops at the size limit without being held in memory;
//! - `/modules/` paths never reach a file outside the modules, however encoded;
//! - huge request heads on the admin port, garbage and stream churn on the xDS port;
//! - a pull-retry storm (200 plugins, module server down or failing) logs one line per plugin.
//!
//! Every wait is bounded and fails with what it last saw; nothing asserts a duration.

mod support;

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

use tokio::time::timeout;

use support::envoy::http_get;
use support::faults::{RawReply, RawServer};
use support::serve::{resource, write_plugin, write_url_plugin, Process};
use support::wasm_module;
use wasm_ecds::xds::client::{self, SotwSession};
use wasm_ecds::xds::Api;

/// Bounds every wait; reached only when something hangs.
const WAIT: Duration = Duration::from_secs(90);
/// The first 8 bytes of a Wasm binary.
const WASM_HEADER: &[u8] = b"\0asm\x01\0\0\0";

/// A port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

// ---------------------------------------------------------------------------------------------
// Blocked addresses

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spelling_of_a_blocked_address_is_refused_before_connecting() {
    let v4 = RawServer::start(|_, _| RawReply::ok(wasm_module("v4"))).await;
    let v6 = RawServer::start_on(IpAddr::V6(Ipv6Addr::LOCALHOST), |_, _| {
        RawReply::ok(wasm_module("v6"))
    })
    .await;
    let (p, q) = (v4.addr().port(), v6.addr().port());
    let urls = [
        // Loopback (blocked by --blocked-cidrs below), as IPv4 numbers in every base and length
        // inet_aton accepts, names and IPv6 forms.
        format!("http://2130706433:{p}/m.wasm"),
        format!("http://0177.0.0.1:{p}/m.wasm"),
        format!("http://0x7f.0.0.1:{p}/m.wasm"),
        format!("http://0x7f000001:{p}/m.wasm"),
        format!("http://127.1:{p}/m.wasm"),
        format!("http://127.000.000.001:{p}/m.wasm"),
        format!("http://0.0.0.0:{p}/m.wasm"),
        format!("http://localhost:{p}/m.wasm"),
        format!("http://localhost.:{p}/m.wasm"),
        format!("http://LOCALHOST:{p}/m.wasm"),
        format!("http://[::ffff:127.0.0.1]:{p}/m.wasm"),
        format!("http://[::ffff:7f00:1]:{p}/m.wasm"),
        format!("http://[::1]:{q}/m.wasm"),
        format!("http://[0:0:0:0:0:0:0:1]:{q}/m.wasm"),
        format!("http://[::]:{q}/m.wasm"),
        format!("https://0x7f000001:{p}/m.wasm"),
        format!("oci://127.0.0.1:{p}/wasm/filter:v1"),
        format!("oci://2130706433:{p}/wasm/filter:v1"),
        format!("oci://localhost.:{p}/wasm/filter:v1"),
        // Always blocked: link-local and cloud metadata addresses, whatever the configuration.
        "http://169.254.169.254/latest/meta-data/".to_string(),
        "http://2852039166/latest/meta-data/".to_string(),
        "http://0xa9.0xfe.0xa9.0xfe/latest/meta-data/".to_string(),
        "http://[::ffff:169.254.169.254]/latest/meta-data/".to_string(),
        "http://[::ffff:a9fe:a9fe]/latest/meta-data/".to_string(),
        "http://100.100.100.200/latest/meta-data/".to_string(),
        "http://[fd00:ec2::254]/latest/meta-data/".to_string(),
        "http://[fe80::1]/m.wasm".to_string(),
        "oci://169.254.169.254/wasm/filter:v1".to_string(),
    ];
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    for (i, url) in urls.iter().enumerate() {
        write_url_plugin(&plugins, &format!("p{i}"), url);
    }
    let serve = Process::start(
        dir.path(),
        &[
            "--blocked-cidrs",
            "127.0.0.0/8,::1/128",
            "--http-request-max-retries",
            "1",
            // Registries over plain HTTP, so that OCI hosts spelled as numbers get to the guard
            // (TLS refuses them as server names before any connection).
            "--insecure-registries",
            "*",
        ],
    );
    let done = serve.settled(urls.len(), WAIT).await;
    for (i, url) in urls.iter().enumerate() {
        let p = &done[&format!("default/p{i}")];
        // A name this machine's resolver does not know (`localhost.` outside /etc/hosts) fails
        // to resolve instead: no connection either.
        let unresolved = p["error"].as_str().unwrap_or("").contains("dns error");
        assert!(
            p["outcome"] == "rejected" && (p["reason"] == "blocked_address" || unresolved),
            "{url}: {p}"
        );
    }
    assert_eq!(v4.connections(), 0, "{:?}", v4.requests());
    assert_eq!(v6.connections(), 0, "{:?}", v6.requests());
    drop(serve);

    // The same spellings without --blocked-cidrs reach the servers: the refusals were the guard's.
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    write_url_plugin(&plugins, "dec", &format!("http://2130706433:{p}/m.wasm"));
    write_url_plugin(&plugins, "oct", &format!("http://0177.0.0.1:{p}/m.wasm"));
    write_url_plugin(&plugins, "v6", &format!("http://[::1]:{q}/m.wasm"));
    let serve = Process::start(dir.path(), &[]);
    let done = serve.settled(3, WAIT).await;
    for p in done.values() {
        assert_eq!(p["outcome"], "pulled", "{p}");
    }
    assert!(v4.connections() >= 1 && v6.connections() >= 1);
}

// ---------------------------------------------------------------------------------------------
// Bodies past the size limit

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_gib_body_stops_at_the_limit_without_being_held_in_memory() {
    const LIMIT: u64 = 96 << 20;
    // Chunked: only the bytes tell the client how big it is.
    let server = RawServer::start(|_, _| RawReply::Stream {
        prefix: WASM_HEADER.to_vec(),
        total: 2 << 30,
        announce: false,
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    write_url_plugin(
        &dir.path().join("plugins"),
        "huge",
        &server.url("/huge.wasm"),
    );
    let limit = LIMIT.to_string();
    let serve = Process::start(
        dir.path(),
        &[
            "--max-binary-size",
            &limit,
            "--http-request-max-retries",
            "1",
        ],
    );
    let done = serve.settled(1, WAIT).await;
    let p = &done["default/huge"];
    assert_eq!(p["reason"], "too_large", "{p}");
    assert!(
        p["error"].as_str().unwrap().contains(&limit),
        "the error names the limit: {p}"
    );
    let report = server.stream_report().await;
    assert!(!report.completed, "{report:?}");
    assert!(report.written < 2 * LIMIT, "{report:?}");
    assert_eq!(
        server.requests().len(),
        1,
        "too large is not retried at once"
    );
    // Streamed to a staging file, never held: the peak RSS stays below the limit itself.
    let status = std::fs::read_to_string(format!("/proc/{}/status", serve.child.id())).unwrap();
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    assert!(
        peak_kib * 1024 < LIMIT,
        "peak RSS {} MiB for a {} MiB limit",
        peak_kib >> 10,
        LIMIT >> 20
    );
    let staging: Vec<_> = std::fs::read_dir(dir.path().join("cache/.staging"))
        .unwrap()
        .collect();
    assert!(staging.is_empty(), "{staging:?}");
}

// ---------------------------------------------------------------------------------------------
// The admin port

/// Sends `raw` to `addr` and reads the answer until the server closes (or 10 s of silence).
fn exchange(addr: SocketAddr, raw: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The server may answer and close before reading everything: a failed write is an answer.
    let _ = s.write_all(raw);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

fn status_of(answer: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(answer);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn module_paths_never_leave_the_modules_however_encoded() {
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("m.wasm");
    let bytes = wasm_module("traversal");
    std::fs::write(&module, &bytes).unwrap();
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    write_plugin(&dir.path().join("plugins"), "m", &module);
    // A file next to the cache, one a traversal from /modules/ could reach.
    std::fs::write(dir.path().join("secret.txt"), "root:x:0:0:SECRET").unwrap();
    let serve = Process::start(dir.path(), &[]);
    serve.settled(1, WAIT).await;
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
    let targets = [
        "/modules/../../etc/passwd".to_string(),
        "/modules/../../../../../../etc/passwd".to_string(),
        "/modules/..%2f..%2fetc%2fpasswd".to_string(),
        "/modules/%2e%2e/%2e%2e/etc/passwd".to_string(),
        "/modules/%2e%2e%2f%2e%2e%2fsecret.txt".to_string(),
        "/modules/%252e%252e%252fsecret.txt".to_string(),
        "/modules/..%5c..%5csecret.txt".to_string(),
        "/modules/....//....//secret.txt".to_string(),
        "/modules/../cache/index.json".to_string(),
        "/modules/../index.json".to_string(),
        "/modules//etc/passwd".to_string(),
        "/modules/%2fetc%2fpasswd".to_string(),
        format!("/modules/{sha}.wasm/../../secret.txt"),
        format!("/modules/{sha}.wasm%00.txt"),
        format!("/modules/../modules/{sha}.wasm/../../../etc/passwd"),
        "/../../etc/passwd".to_string(),
        "http://localhost/modules/../../etc/passwd".to_string(),
    ];
    for target in &targets {
        let answer = exchange(
            serve.admin,
            format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        let text = String::from_utf8_lossy(&answer);
        let status = status_of(&answer);
        assert!(
            matches!(status, Some(400..=499)),
            "{target}: {}",
            text.lines().next().unwrap_or("(closed)")
        );
        assert!(
            !text.contains("root:") && !text.contains("\"modules\""),
            "{target} leaked a file: {text}"
        );
    }
    // The exact path still serves the module's bytes.
    let r = http_get(&format!("http://{}/modules/{sha}.wasm", serve.admin))
        .await
        .unwrap();
    assert_eq!((r.status, r.body), (200, bytes));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_request_heads_on_the_admin_port_are_refused_and_it_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    let serve = Process::start(dir.path(), &[]);
    let big = "a".repeat(1 << 20);
    let many: String = (0..20_000).map(|i| format!("x-h{i}: v\r\n")).collect();
    let heads = [
        (
            "a 1 MiB header value",
            format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n"),
        ),
        (
            "20,000 headers",
            format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{many}\r\n"),
        ),
        (
            "a 1 MiB path",
            format!("GET /{big} HTTP/1.1\r\nHost: x\r\n\r\n"),
        ),
        (
            "a head that never ends",
            format!("GET /healthz HTTP/1.1\r\n{}", "X: y\r\n".repeat(200_000)),
        ),
    ];
    for (what, head) in &heads {
        let answer = exchange(serve.admin, head.as_bytes());
        // Refused with a status, or the connection closed without one; never a 200.
        let status = status_of(&answer);
        assert!(
            status.is_none() || matches!(status, Some(400..=499)),
            "{what}: {}",
            String::from_utf8_lossy(&answer[..answer.len().min(200)])
        );
        assert!(
            answer.len() < 64 * 1024,
            "{what}: {} bytes back",
            answer.len()
        );
    }
    let r = http_get(&format!("http://{}/healthz", serve.admin))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(
        serve.rss_kib() < 256 * 1024,
        "RSS {} MiB after the huge heads",
        serve.rss_kib() >> 10
    );
}

// ---------------------------------------------------------------------------------------------
// The xDS port

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_stream_churn_on_the_xds_port_leave_other_proxies_served() {
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("m.wasm");
    std::fs::write(&module, wasm_module("xds")).unwrap();
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    write_plugin(&dir.path().join("plugins"), "m", &module);
    let mut serve = Process::start(dir.path(), &[]);
    serve.wait_metric("wasm_ecds_xds_resources", 1.0).await;
    let names = vec![resource("m")];
    // A proxy connected before the garbage, and kept.
    let channel = client::connect(serve.xds).await.unwrap();
    let mut kept = SotwSession::open(channel, Api::Ecds, client::sotw_subscribe("kept", &names))
        .await
        .unwrap();
    timeout(WAIT, kept.recv()).await.unwrap().unwrap().unwrap();
    let before = serve.stderr.lock().unwrap().len();

    let mut noise: Vec<u8> = (0..64 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    noise[..4].copy_from_slice(b"\x16\x03\x01\x02"); // a TLS ClientHello's first bytes
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    let garbage: Vec<(&str, Vec<u8>)> = vec![
        ("random bytes", noise),
        (
            "an HTTP/1.1 request",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        ("half a preface", preface[..10].to_vec()),
        (
            "a preface and garbage frames",
            [preface.clone(), vec![0xff; 4096]].concat(),
        ),
        // A frame header announcing 16 MiB - 1 of SETTINGS.
        (
            "a preface and a huge frame",
            [preface.clone(), vec![0xff, 0xff, 0xff, 4, 0, 0, 0, 0, 0]].concat(),
        ),
    ];
    for _ in 0..50 {
        for (_, bytes) in &garbage {
            let mut s = TcpStream::connect(serve.xds).unwrap();
            let _ = s.write_all(bytes);
        }
    }
    for (what, bytes) in &garbage {
        // Each connection ends: the server closes it instead of waiting for sense.
        let answer = exchange(serve.xds, bytes);
        assert!(
            answer.len() < 64 * 1024,
            "{what}: {} bytes back",
            answer.len()
        );
    }
    // Stream churn: 2,000 streams opened on 20 connections and dropped, half before reading.
    for _ in 0..20 {
        let channel = client::connect(serve.xds).await.unwrap();
        for i in 0..100 {
            let mut s = SotwSession::open(
                channel.clone(),
                Api::Ecds,
                client::sotw_subscribe("churn", &names),
            )
            .await
            .unwrap();
            if i % 2 == 0 {
                timeout(WAIT, s.recv()).await.unwrap().unwrap().unwrap();
            }
        }
    }
    serve
        .wait_metric_where("wasm_ecds_xds_connected_streams", |v| v == 1.0)
        .await;
    // The kept proxy and a new one are still served.
    let channel = client::connect(serve.xds).await.unwrap();
    let mut fresh = SotwSession::open(channel, Api::Ecds, client::sotw_subscribe("fresh", &names))
        .await
        .unwrap();
    let r = timeout(WAIT, fresh.recv()).await.unwrap().unwrap().unwrap();
    assert_eq!(r.resources.len(), 1);
    assert!(serve.child.try_wait().unwrap().is_none(), "serve exited");
    let lines: Vec<String> = serve.stderr.lock().unwrap()[before..].to_vec();
    assert!(
        lines.len() <= 40,
        "{} lines:\n{}",
        lines.len(),
        lines.join("\n")
    );
    drop(kept);
}

// ---------------------------------------------------------------------------------------------
// A pull-retry storm

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_retry_storm_logs_one_line_per_plugin() {
    const PLUGINS: usize = 200;
    const PROCESSINGS_EACH: usize = 4;
    let failing = RawServer::start(|_, _| RawReply::Full {
        status: 500,
        headers: Vec::new(),
        body: b"down".to_vec(),
    })
    .await;
    let down = closed_port();
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    for i in 0..PLUGINS {
        let url = if i % 2 == 0 {
            failing.url(&format!("/m{i}.wasm"))
        } else {
            format!("http://127.0.0.1:{down}/m{i}.wasm")
        };
        write_url_plugin(&plugins, &format!("p{i}"), &url);
    }
    let serve = Process::start(dir.path(), &["--http-request-max-retries", "1"]);
    // Every plugin processed, then retried in the background (1 s, 2 s, 4 s…) at least
    // PROCESSINGS_EACH - 1 times on average.
    serve
        .wait_metric(
            "wasm_ecds_plugin_processing_count{outcome=\"rejected\"}",
            (PLUGINS * PROCESSINGS_EACH) as f64,
        )
        .await;
    assert!(
        failing.requests().len() >= PLUGINS / 2 * 2,
        "the storm reached the server"
    );
    let lines = serve.stderr.lock().unwrap().clone();
    for i in 0..PLUGINS {
        let needle = format!("plugin=default/p{i} ");
        let n = lines.iter().filter(|l| l.contains(&needle)).count();
        assert_eq!(
            n, 1,
            "default/p{i}: {n} lines after {PROCESSINGS_EACH}+ processings"
        );
    }
    assert!(
        lines.len() <= PLUGINS + 20,
        "{} lines for {PLUGINS} plugins:\n{}",
        lines.len(),
        lines[..lines.len().min(50)].join("\n")
    );
    // Every processing is still visible in /debug/plugins.
    let view = serve.debug_plugins().await;
    assert_eq!(view["plugins"].as_array().unwrap().len(), PLUGINS);
}
