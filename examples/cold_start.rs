//! Load tool: a cold start of `wasm-ecds serve` over a cache of many cached modules.
//!
//! ```text
//! cargo build --release && cargo run --release --example cold_start -- [MODULES] [MIB] [ROUNDS]
//! ```
//!
//! Fills a cache of MODULES (default 1000) modules of MIB MiB (default 1) the real way: a real
//! `serve` pulls them from a local HTTP server (one plugin per module), then stops. Then, ROUNDS
//! times (default 3, alternated, page cache dropped before each run when this runs as root):
//! - `cat` of every module file (the baseline of the same run);
//! - `serve` (`--cache-verify-threads auto`) and `serve --cache-verify-threads 0` (every module
//!   verified before anything is served: the start-up of earlier versions), measuring from the
//!   spawn: (b) `/readyz` answering 200, (c) the first plugin's ECDS resource on a stream connected
//!   at once, (d) the `cache verified` log line (every module hashed).
//!
//! Prints min / median of each and the ratios to `cat`. The cache lives under `target/` (a real
//! disk, not a tmpfs) and is removed at the end. Only loopback is used; every wait is bounded.

#![allow(clippy::disallowed_methods)] // a measuring tool

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use wasm_ecds::xds::client::{self, SotwSession};
use wasm_ecds::xds::Api;

#[path = "support/serve.rs"]
mod serve;

use serve::{wait_ready, Serve, WAIT};
const FIRST: &str = "extensions.istio.io/wasmplugin/default.p0";

fn module(i: usize, size: usize) -> Vec<u8> {
    let mut m = b"\0asm\x01\0\0\0".to_vec();
    let seed = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut x = seed;
    while m.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        m.extend_from_slice(&x.to_le_bytes());
    }
    m.truncate(size);
    m
}

/// A plain HTTP/1.1 server on loopback: `GET /m<i>.wasm` answers module `i`.
fn http_server(size: usize) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || serve_connection(conn, size));
        }
    });
    addr
}

fn serve_connection(conn: TcpStream, size: usize) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut out = conn;
    loop {
        let mut request = String::new();
        if reader.read_line(&mut request).unwrap_or(0) == 0 {
            return;
        }
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap_or(0) > 2 {
            line.clear();
        }
        let path = request.split_whitespace().nth(1).unwrap_or("");
        let index = path
            .strip_prefix("/m")
            .and_then(|p| p.strip_suffix(".wasm"))
            .and_then(|i| i.parse().ok());
        let reply = match index {
            Some(i) => {
                let body = module(i, size);
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
                [head.into_bytes(), body].concat()
            }
            None => b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_vec(),
        };
        if out.write_all(&reply).is_err() {
            return;
        }
    }
}

/// Drops the page cache (root only); says whether it did.
fn drop_caches() -> bool {
    let _ = Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "1").is_ok()
}

/// Seconds from `spawn` to (b) ready, (c) first push, (d) everything verified.
async fn timed_start(bin: &Path, dir: &Path, extra: &[&str]) -> [f64; 3] {
    let spawned = Instant::now();
    let mut serve = Serve::start(bin, &dir.join("plugins"), &dir.join("cache"), extra);
    let xds = serve.xds;
    let push = tokio::spawn(async move {
        let channel = client::connect(xds).await.expect("xds connect");
        let names = vec![FIRST.to_string()];
        let first = client::sotw_subscribe("cold-start", &names);
        let mut s = SotwSession::open(channel, Api::Ecds, first)
            .await
            .expect("stream");
        loop {
            let r = s.recv().await.expect("rpc").expect("a response");
            if !r.resources.is_empty() {
                return Instant::now();
            }
        }
    });
    let admin = serve.admin;
    let ready = tokio::task::spawn_blocking(move || wait_ready(admin))
        .await
        .unwrap();
    let pushed = tokio::time::timeout(WAIT, push).await.unwrap().unwrap();
    let verified = serve.wait_line("cache verified").0;
    serve.stop();
    [ready, pushed, verified].map(|t| t.duration_since(spawned).as_secs_f64())
}

fn cat(files: &[PathBuf]) -> f64 {
    let start = Instant::now();
    let ok = Command::new("cat")
        .args(files)
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok, "cat failed");
    start.elapsed().as_secs_f64()
}

fn module_files(cache: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for d in std::fs::read_dir(cache).unwrap().flatten() {
        if d.file_name() == ".staging" || !d.path().is_dir() {
            continue;
        }
        for f in std::fs::read_dir(d.path()).unwrap().flatten() {
            out.push(f.path());
        }
    }
    out.sort();
    out
}

fn min_median(xs: &[f64]) -> (f64, f64) {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2])
}

#[tokio::main]
async fn main() {
    let arg = |i: usize, default: usize| {
        std::env::args()
            .nth(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or(default)
    };
    let (modules, mib, rounds) = (arg(1, 1000), arg(2, 1), arg(3, 3).max(1));
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("wasm-ecds");
    assert!(
        bin.is_file(),
        "build the binary first: cargo build --release ({})",
        bin.display()
    );
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    let dir = tempfile::Builder::new()
        .prefix("cold_start-")
        .tempdir_in(&target)
        .unwrap();
    let server = http_server(mib << 20);
    let mut plugins = String::new();
    for i in 0..modules {
        plugins += &format!(
            "---\napiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: p{i}, namespace: default}}\nspec: {{url: \"http://{server}/m{i}.wasm\"}}\n"
        );
    }
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    std::fs::write(dir.path().join("plugins/all.yaml"), plugins).unwrap();

    println!("filling a cache of {modules} modules of {mib} MiB through a real serve ...");
    let fill = Serve::start(
        &bin,
        &dir.path().join("plugins"),
        &dir.path().join("cache"),
        &[],
    );
    wait_ready(fill.admin);
    fill.stop();
    let files = module_files(&dir.path().join("cache"));
    assert_eq!(files.len(), modules, "every module cached");

    let variants: [(&str, &[&str]); 2] = [
        ("serve (verify threads auto)", &[]),
        (
            "serve --cache-verify-threads 0",
            &["--cache-verify-threads", "0"],
        ),
    ];
    let mut cats = Vec::new();
    let mut runs: Vec<Vec<[f64; 3]>> = vec![Vec::new(); variants.len()];
    let mut dropped = true;
    for round in 0..rounds {
        // Alternated: each round starts with another of the three.
        for k in 0..=variants.len() {
            let which = (round + k) % (variants.len() + 1);
            dropped &= drop_caches();
            if which == variants.len() {
                cats.push(cat(&files));
            } else {
                let t = timed_start(&bin, dir.path(), variants[which].1).await;
                runs[which].push(t);
            }
        }
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "{modules} modules x {mib} MiB, {rounds} rounds, {cpus} cpus, page cache dropped: {dropped}, loadavg {}",
        load.trim()
    );
    let (cat_min, cat_med) = min_median(&cats);
    println!("cat of every module file: {cat_min:.3} s min, {cat_med:.3} s median");
    for (i, (name, _)) in variants.iter().enumerate() {
        for (m, what) in ["/readyz", "first push", "all verified"].iter().enumerate() {
            let xs: Vec<f64> = runs[i].iter().map(|t| t[m]).collect();
            let (min, med) = min_median(&xs);
            println!(
                "{name}: {what}: {min:.3} s min, {med:.3} s median = {:.2}x / {:.2}x cat",
                min / cat_min,
                med / cat_med
            );
        }
    }
}
