//! Load tool: start-up of `wasm-ecds serve` with many plugins, against `wasm-ecds check` on the
//! same files.
//!
//! ```text
//! cargo build --release --bin wasm-ecds
//! cargo run --release --example start_scale -- [PLUGINS] [ROUNDS]
//! ```
//!
//! Generates PLUGINS plugin files (default 50000), one WasmPlugin each, all pointing at one small
//! `file://` module (so one pull serves all), in a temporary directory that is removed at the end.
//! Then, alternating for ROUNDS rounds (default 3): `wasm-ecds check` on the directory (the
//! same-run baseline), `wasm-ecds serve` on it as a child process until `/readyz` answers 200, and
//! `serve` with no plugins (the memory baseline). Prints the minimum over the rounds of the wall
//! time and the CPU time (user + system, from `getrusage` / `/proc/<pid>/stat`) of each, the
//! server's resident memory after ready (VmRSS) and its peak (VmHWM) above the empty server's, per
//! plugin, and the ratios against `check` and the issue's targets (≤ 2× `check`, ≤ 5 KiB per
//! plugin). Last, on the ready server: the time, size and resident-memory cost of one
//! `/debug/plugins` answer (its default page) and of `?limit=1000` pages walked to the end.
//!
//! The binary is `target/release/wasm-ecds` beside this example, or `$WASM_ECDS_BIN`. Only
//! loopback is used; every wait is bounded.

#![allow(clippy::disallowed_methods)] // a measuring tool

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "support/serve.rs"]
mod serve;

use serve::{wait_ready, Serve, WAIT};

#[path = "support/procfs.rs"]
mod procfs;

use procfs::{process_cpu, status_kib};

fn binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("WASM_ECDS_BIN") {
        return bin.into();
    }
    let exe = std::env::current_exe().expect("exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/examples")
        .join("wasm-ecds");
    assert!(
        bin.exists(),
        "{} missing: run `cargo build --release --bin wasm-ecds` first (or set WASM_ECDS_BIN)",
        bin.display()
    );
    bin
}

/// A small valid Wasm binary: the header and one custom section.
fn module() -> Vec<u8> {
    let mut m = b"\0asm\x01\0\0\0".to_vec();
    let payload = b"\x0bstart-scale";
    m.push(0);
    m.push(payload.len() as u8);
    m.extend_from_slice(payload);
    m
}

fn generate(dir: &Path, plugins: usize) -> PathBuf {
    let module_path = dir.join("module.wasm");
    std::fs::write(&module_path, module()).expect("module");
    let files = dir.join("plugins");
    std::fs::create_dir_all(&files).expect("plugins dir");
    for i in 0..plugins {
        let text = format!(
            "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata:\n  name: plugin-{i:06}\n  namespace: ns-{}\nspec:\n  url: file://{}\n  phase: AUTHN\n  pluginConfig:\n    header: x-plugin-{i}\n",
            i % 100,
            module_path.display()
        );
        std::fs::write(files.join(format!("plugin-{i:06}.yaml")), text).expect("plugin file");
    }
    files
}

/// User + system CPU time of the children waited for so far.
fn children_cpu() -> Duration {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct it is given.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// One HTTP/1.1 GET; the status and the body.
fn get(addr: &str, path: &str) -> Option<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(WAIT)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..head_end]).ok()?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let mut body = buf[head_end + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Some((status, body))
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(std::str::from_utf8(&b[..eol]).unwrap_or("0").trim(), 16)
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[eol + 2 + n + 2..];
    }
    out
}

struct Server {
    serve: Serve,
    admin: String,
    ready_after: Duration,
    ready_cpu: Duration,
}

impl Server {
    fn start(bin: &Path, plugins: &Path, cache: &Path) -> Server {
        let started = Instant::now();
        let serve = Serve::start(bin, plugins, cache, &[]);
        wait_ready(serve.admin);
        let ready_after = started.elapsed();
        let ready_cpu = process_cpu(serve.child.id());
        let admin = serve.admin.to_string();
        Server {
            serve,
            admin,
            ready_after,
            ready_cpu,
        }
    }

    fn kib(&self, field: &str) -> u64 {
        status_kib(self.serve.child.id(), field)
    }

    fn stop(self) {
        self.serve.stop();
    }
}

fn check(bin: &Path, plugins: &Path) -> (Duration, Duration) {
    let cpu = children_cpu();
    let started = Instant::now();
    let status = Command::new(bin)
        .arg("check")
        .arg(plugins)
        .stdout(Stdio::null())
        .status()
        .expect("check");
    let wall = started.elapsed();
    assert!(status.success(), "check found problems: {status}");
    (wall, children_cpu() - cpu)
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(50_000);
    let rounds: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(3).max(1);
    let bin = binary();
    let tmp = tempfile::tempdir().expect("tempdir");
    let plugins = generate(tmp.path(), n);
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).expect("empty dir");
    println!("{n} plugin files in {}; {rounds} rounds", plugins.display());

    let min = |v: &[Duration]| v.iter().min().copied().unwrap_or_default();
    let (mut check_wall, mut check_cpu) = (Vec::new(), Vec::new());
    let (mut ready_wall, mut ready_cpu) = (Vec::new(), Vec::new());
    let (mut rss, mut hwm, mut rss0, mut hwm0) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut last = None;
    for round in 0..rounds {
        let (w, c) = check(&bin, &plugins);
        check_wall.push(w);
        check_cpu.push(c);
        let base = Server::start(&bin, &empty, &tmp.path().join(format!("cache0-{round}")));
        rss0.push(base.kib("VmRSS"));
        hwm0.push(base.kib("VmHWM"));
        base.stop();
        let server = Server::start(&bin, &plugins, &tmp.path().join(format!("cache-{round}")));
        ready_wall.push(server.ready_after);
        ready_cpu.push(server.ready_cpu);
        rss.push(server.kib("VmRSS"));
        hwm.push(server.kib("VmHWM"));
        println!(
            "round {round}: check {:.3} s ({:.3} s CPU); serve ready {:.3} s ({:.3} s CPU), VmRSS {} KiB, VmHWM {} KiB; empty serve VmRSS {} KiB",
            secs(w), secs(c), secs(server.ready_after), secs(server.ready_cpu),
            rss[round], hwm[round], rss0[round],
        );
        if round + 1 == rounds {
            last = Some(server);
        } else {
            server.stop();
        }
    }
    let per = |v: &[u64], base: &[u64]| {
        let m = *v.iter().min().unwrap_or(&0) as f64;
        let b = *base.iter().min().unwrap_or(&0) as f64;
        (m - b) / n.max(1) as f64
    };
    let (cw, cc, rw, rc) = (
        min(&check_wall),
        min(&check_cpu),
        min(&ready_wall),
        min(&ready_cpu),
    );
    println!(
        "check (min):              {:.3} s wall, {:.3} s CPU",
        secs(cw),
        secs(cc)
    );
    println!(
        "serve to /readyz (min):   {:.3} s wall, {:.3} s CPU",
        secs(rw),
        secs(rc)
    );
    println!(
        "ratio serve/check:        {:.2}× wall, {:.2}× CPU (target ≤ 2×)",
        secs(rw) / secs(cw).max(1e-9),
        secs(rc) / secs(cc).max(1e-9)
    );
    let (kr, kh) = (per(&rss, &rss0), per(&hwm, &hwm0));
    println!("memory per plugin:        {kr:.2} KiB after ready (VmRSS), {kh:.2} KiB peak (VmHWM) (target ≤ 5 KiB)");

    let server = last.expect("a round ran");
    let before = (server.kib("VmRSS"), server.kib("VmHWM"));
    let started = Instant::now();
    let (status, body) = get(&server.admin, "/debug/plugins").expect("/debug/plugins");
    let took = started.elapsed();
    let after = (server.kib("VmRSS"), server.kib("VmHWM"));
    println!(
        "GET /debug/plugins:       {status}, {} bytes in {:.3} s; VmRSS +{} KiB, VmHWM +{} KiB",
        body.len(),
        secs(took),
        after.0.saturating_sub(before.0),
        after.1.saturating_sub(before.1)
    );
    let started = Instant::now();
    let (mut pages, mut seen, mut bytes) = (0, 0, 0);
    let mut query = "/debug/plugins?limit=1000".to_string();
    loop {
        let (status, body) = get(&server.admin, &query).expect("page");
        pages += 1;
        bytes += body.len();
        let v: serde_json::Value = match serde_json::from_slice(&body) {
            Ok(v) if status == 200 => v,
            _ => {
                println!(
                    "paging: answered {status}: {}",
                    String::from_utf8_lossy(&body).lines().next().unwrap_or("")
                );
                break;
            }
        };
        seen += v["plugins"].as_array().map_or(0, Vec::len);
        match v["next"].as_str() {
            Some(next) => query = format!("/debug/plugins?limit=1000&after={next}"),
            None => break,
        }
    }
    let after2 = (server.kib("VmRSS"), server.kib("VmHWM"));
    println!(
        "paged ?limit=1000:        {pages} pages, {seen} plugins, {bytes} bytes in {:.3} s; VmRSS +{} KiB, VmHWM +{} KiB",
        secs(started.elapsed()),
        after2.0.saturating_sub(after.0),
        after2.1.saturating_sub(after.1)
    );
    server.stop();
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average: {}", loadavg.trim());
    drop(tmp);
}
