//! Load tool: the cost of one plugin-file edit as the number of plugin files grows.
//!
//! ```text
//! cargo build --release && cargo run --release --example edit_latency -- [COUNTS] [EDITS]
//! ```
//!
//! For each N of COUNTS (comma-separated, default `100,10000,50000`) it writes N plugin files (one
//! WasmPlugin per file, all with the same small `file://` module, so one read serves them all),
//! runs the release `wasm-ecds serve --plugins <dir>` as a child process (`WASM_ECDS_BIN` names
//! another binary, e.g. one built from an older commit), waits for `/readyz`, opens one SotW ECDS
//! stream subscribed to the first plugin's resource, then edits that plugin's file EDITS times
//! (default 5; a new `pluginConfig` each time, so a new resource version is pushed). Per edit it
//! measures the time from the write to the push arriving on the stream, and the CPU time the
//! server spent on it (the sum of its threads' run time from `/proc/<pid>/task/*/schedstat`, read
//! before the write and once the server is idle again after the push). Both include the server's
//! 100 ms debounce of file events (latency) and whatever else a change costs (CPU).
//!
//! It prints a table per N and the ratios of the medians to those of the first N, measured in the
//! same run (the issue's target: 50k within 1.5x of 100), and the mean and largest CPU per edit:
//! the median hides the first edits after start-up, which paid for what start-up left to the
//! allocator until the controller released it at readiness. With `WASM_ECDS_BASELINE` naming
//! another binary (e.g. one built from an older commit), each N runs both binaries, alternately,
//! and the ratios of this binary's figures to the baseline's are printed too. The generated tree
//! is removed.

#![allow(clippy::disallowed_methods)] // a measuring tool

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use wasm_ecds::xds::client::{self, SotwSession};
use wasm_ecds::xds::Api;

#[path = "support/serve.rs"]
mod serve;

use serve::{wait_ready, Serve, WAIT};

/// CPU time used by every thread of `pid` so far, in microseconds.
fn cpu_us(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    let mut ns = 0u64;
    for t in tasks.flatten() {
        let text = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        ns += (text.split_whitespace().next()).map_or(0, |v| v.parse().unwrap_or(0));
    }
    ns / 1000
}

/// Waits until `pid` used no CPU for a little while: whatever the last change caused is done.
fn wait_idle(pid: u32) {
    let start = Instant::now();
    let mut last = cpu_us(pid);
    loop {
        std::thread::sleep(Duration::from_millis(150));
        let now = cpu_us(pid);
        if now - last < 2_000 || start.elapsed() > WAIT {
            return;
        }
        last = now;
    }
}

fn plugin(name: &str, module: &Path, edit: Option<usize>) -> String {
    let config = edit.map_or(String::new(), |e| format!(", pluginConfig: {{edit: {e}}}"));
    format!(
        "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: {name}, namespace: default}}\nspec: {{url: 'file://{}'{config}}}\n",
        module.display()
    )
}

/// One N: per edit, the latency to the push and the server's CPU time, in milliseconds.
async fn measure(bin: &Path, n: usize, edits: usize) -> (Vec<f64>, Vec<f64>, f64) {
    let tree = tempfile::tempdir().expect("temporary directory");
    let plugins = tree.path().join("plugins");
    std::fs::create_dir_all(&plugins).expect("plugins directory");
    let module = tree.path().join("m.wasm");
    std::fs::write(&module, b"\0asm\x01\0\0\0").expect("module");
    let name = |i: usize| format!("p{i:05}");
    for i in 0..n {
        let f = plugins.join(format!("{}.yaml", name(i)));
        std::fs::write(f, plugin(&name(i), &module, None)).expect("plugin file");
    }
    let started = Instant::now();
    let server = Serve::start_env(
        bin,
        &plugins,
        &tree.path().join("cache"),
        &[],
        &[("RUST_LOG", "warn")],
    );
    let pid = server.child.id();
    wait_ready(server.admin);
    let ready_s = started.elapsed().as_secs_f64();
    let names = vec![format!(
        "extensions.istio.io/wasmplugin/default.{}",
        name(0)
    )];
    let channel = client::connect(server.xds).await.expect("connect");
    let mut stream = SotwSession::open(channel, Api::Ecds, client::sotw_subscribe("edit", &names))
        .await
        .expect("open stream");
    let mut version = String::new();
    while version.is_empty() {
        let r = stream.recv().await.expect("rpc").expect("response");
        stream
            .send(client::sotw_ack(&names, &r))
            .await
            .expect("ack");
        if !r.resources.is_empty() {
            version = r.version_info;
        }
    }
    wait_idle(pid);
    let (mut latency, mut cpu) = (Vec::new(), Vec::new());
    let file = plugins.join(format!("{}.yaml", name(0)));
    for e in 0..edits {
        let before = cpu_us(pid);
        let wrote = Instant::now();
        std::fs::write(&file, plugin(&name(0), &module, Some(e))).expect("edit");
        loop {
            let r = tokio::time::timeout(WAIT, stream.recv())
                .await
                .expect("push in time")
                .expect("rpc")
                .expect("response");
            stream
                .send(client::sotw_ack(&names, &r))
                .await
                .expect("ack");
            if r.version_info != version {
                version = r.version_info;
                break;
            }
        }
        latency.push(wrote.elapsed().as_secs_f64() * 1e3);
        wait_idle(pid);
        cpu.push((cpu_us(pid) - before) as f64 / 1e3);
    }
    drop(stream);
    drop(server);
    tree.close().expect("remove the generated tree");
    (latency, cpu, ready_s)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One binary's figures at one N.
struct Figures {
    latency: f64,
    cpu: f64,
    cpu_mean: f64,
    cpu_max: f64,
}

/// Measures `bin` at `n` and prints its table.
async fn run(label: &str, bin: &Path, n: usize, edits: usize) -> Figures {
    let (latency, cpu, ready_s) = measure(bin, n, edits).await;
    println!("N={n} {label}(ready after {ready_s:.1}s)");
    println!("  edit  latency_ms  server_cpu_ms");
    for (i, (l, c)) in latency.iter().zip(&cpu).enumerate() {
        println!("  {:>4}  {l:>10.1}  {c:>13.1}", i + 1);
    }
    let f = Figures {
        latency: median(&latency),
        cpu: median(&cpu),
        cpu_mean: cpu.iter().sum::<f64>() / cpu.len() as f64,
        cpu_max: cpu.iter().copied().fold(0.0, f64::max),
    };
    let nl = latency.iter().copied().fold(f64::MAX, f64::min);
    println!(
        "  median {:.1} ms latency, {:.1} ms CPU; min latency {nl:.1} ms; CPU mean {:.1} ms, max {:.1} ms",
        f.latency, f.cpu, f.cpu_mean, f.cpu_max
    );
    f
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let counts: Vec<usize> = (args.get(1).map_or("100,10000,50000", String::as_str))
        .split(',')
        .map(|n| n.trim().parse().expect("COUNTS: comma-separated numbers"))
        .collect();
    let edits: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(5).max(1);
    let bin = std::env::var_os("WASM_ECDS_BIN").map_or_else(
        || {
            let exe = std::env::current_exe().expect("exe");
            exe.parent()
                .and_then(Path::parent)
                .expect("target dir")
                .join("wasm-ecds")
        },
        PathBuf::from,
    );
    assert!(
        bin.is_file(),
        "build the binary first: cargo build --release ({})",
        bin.display()
    );
    let baseline = std::env::var_os("WASM_ECDS_BASELINE").map(PathBuf::from);
    let mut results = Vec::new();
    for &n in &counts {
        let before = match &baseline {
            Some(b) => Some(run("baseline ", b, n, edits).await),
            None => None,
        };
        let now = run("", &bin, n, edits).await;
        results.push((n, now, before));
    }
    let (n0, first, _) = &results[0];
    println!("ratios to N={n0} (medians; CPU mean in brackets):");
    for (n, f, _) in &results {
        println!(
            "  N={n:>6}: latency x{:.2}, CPU x{:.2} (x{:.2})",
            f.latency / first.latency,
            f.cpu / first.cpu.max(0.001),
            f.cpu_mean / first.cpu_mean.max(0.001)
        );
    }
    if baseline.is_some() {
        println!("this binary against the baseline, same N (CPU median / mean / max):");
        for (n, f, b) in &results {
            let b = b.as_ref().expect("measured");
            println!(
                "  N={n:>6}: {:.1}/{:.1}/{:.1} ms against {:.1}/{:.1}/{:.1} ms: x{:.2} / x{:.2} / x{:.2}",
                f.cpu, f.cpu_mean, f.cpu_max, b.cpu, b.cpu_mean, b.cpu_max,
                f.cpu / b.cpu.max(0.001),
                f.cpu_mean / b.cpu_mean.max(0.001),
                f.cpu_max / b.cpu_max.max(0.001)
            );
        }
    }
}
