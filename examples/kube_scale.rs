//! Load tool: the work per change of one WasmPlugin with 100 and with N in the cluster, and the
//! cost of a relist of N WasmPlugins after an API server outage.
//!
//! ```text
//! cargo build --release && cargo run --release --example kube_scale -- [PLUGINS] [EDITS]
//! ```
//!
//! Starts a real etcd and kube-apiserver (scripts/kube/, `KUBE_BIN` or the default cache), creates
//! 100 `Always` WasmPlugins sharing one `file://` module, runs the release `wasm-ecds serve
//! --source kubernetes` as a child process and waits until every plugin is processed and its
//! status written. It then edits one plugin's `spec` EDITS times (default 20), each time waiting
//! for its processing and status write, and measures wasm-ecds' CPU per edit; creates the other
//! plugins up to PLUGINS (default 2000; their statuses take PLUGINS / 20 s: the writer's rate
//! limit) and measures the same edits again. Work per change independent of the plugin count
//! shows as a ratio near 1.
//!
//! Then it kills the API server, writes an unrelated etcd key
//! (so the watch's resourceVersion is too old: 410, a full relist), starts the API server again and
//! measures, until wasm-ecds counts the completed relist: wall time after the API server is back,
//! the CPU time wasm-ecds used, and the processings, pushes and status writes it caused (all must
//! be 0). Baselines, measured in the same run: a plain list of the same objects with kube-rs, and
//! wasm-ecds' own CPU from its start until all of them were processed and their statuses written
//! (the edits at 100 plugins included).

#![allow(clippy::disallowed_methods)] // a measuring tool

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kube::api::{Api, DynamicObject, ListParams};

const WAIT: Duration = Duration::from_secs(600);

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn cpu_ms(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(") ").next().unwrap_or("").split(' ').collect();
    let ticks: u64 = fields
        .get(11..13)
        .map_or(0, |f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum());
    ticks * 10 // USER_HZ = 100
}

fn metrics(admin: &str) -> BTreeMap<String, f64> {
    let text = run(Command::new("curl").args(["-sf", &format!("http://{admin}/metrics")]));
    wasm_ecds::metrics::parse_samples(&text)
}

fn sum(m: &BTreeMap<String, f64>, prefix: &str) -> f64 {
    m.iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, v)| v)
        .sum()
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2000);
    let edits: usize = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20);
    let small = n.min(100);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let bin = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("wasm-ecds");
    assert!(
        bin.is_file(),
        "build the binary first: cargo build --release ({})",
        bin.display()
    );
    let kube_bin =
        std::env::var("KUBE_BIN").unwrap_or_else(|_| "/var/cache/wasm-ecds/kube/bin".into());
    let state = tempfile::tempdir().unwrap();
    let script = root.join("scripts/kube/start-kube.sh");
    let kube = |cmd: &str| {
        run(Command::new("bash")
            .arg(&script)
            .arg(state.path())
            .arg(cmd)
            .env("KUBE_BIN", &kube_bin));
    };
    kube("start");
    let kubeconfig = state.path().join("kubeconfig");
    let kubectl = |args: &[&str], input: Option<&str>| {
        let mut c = Command::new(Path::new(&kube_bin).join("kubectl"))
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        c.stdin
            .take()
            .unwrap()
            .write_all(input.unwrap_or("").as_bytes())
            .unwrap();
        assert!(c.wait().unwrap().success(), "kubectl {args:?}");
    };
    kubectl(
        &[
            "apply",
            "-f",
            root.join("deploy/crd-wasmplugin.yaml").to_str().unwrap(),
        ],
        None,
    );
    kubectl(
        &[
            "wait",
            "--for",
            "condition=established",
            "crd/wasmplugins.extensions.istio.io",
        ],
        None,
    );
    kubectl(&["create", "namespace", "load"], None);
    let module = state.path().join("m.wasm");
    std::fs::write(&module, b"\0asm\x01\0\0\0").unwrap();
    let create = |range: std::ops::Range<usize>| {
        let items: Vec<String> = range
            .clone()
            .map(|i| format!(
                "{{\"apiVersion\":\"extensions.istio.io/v1alpha1\",\"kind\":\"WasmPlugin\",\"metadata\":{{\"name\":\"p{i}\",\"namespace\":\"load\"}},\"spec\":{{\"url\":\"file://{}\",\"imagePullPolicy\":\"Always\"}}}}",
                module.display()
            ))
            .collect();
        let t = Instant::now();
        kubectl(
            &["create", "-f", "-"],
            Some(&format!(
                "{{\"apiVersion\":\"v1\",\"kind\":\"List\",\"items\":[{}]}}",
                items.join(",")
            )),
        );
        eprintln!("created {} WasmPlugins in {:?}", range.len(), t.elapsed());
    };
    create(0..small);

    let cache = tempfile::tempdir().unwrap();
    let mut child = Command::new(&bin)
        .args([
            "serve",
            "--source",
            "kubernetes",
            "--xds-address",
            "127.0.0.1:0",
            "--admin-address",
            "127.0.0.1:0",
        ])
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--cache-dir")
        .arg(cache.path())
        .env("RUST_LOG", "warn,kube_client=off")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let admin = loop {
        let line = lines.next().expect("serve output").unwrap();
        if let Some((_, a)) = line.split_once(", admin on ") {
            break a.trim().to_string();
        }
    };
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            if std::env::var_os("KUBE_RELIST_LOG").is_some() {
                eprintln!("  serve: {l}");
            }
        }
    });
    let all_done = |count: usize| {
        wait_until("every plugin processed", || {
            sum(&metrics(&admin), "wasm_ecds_plugin_processing_count") >= count as f64
        });
        wait_until("every status written", || {
            metrics(&admin)
                .get("wasm_ecds_kube_status_writes{result=\"ok\"}")
                .copied()
                .unwrap_or(0.0)
                >= count as f64
        });
    };
    // One plugin's spec edited `edits` times, each waited for until processed and its status
    // written: wasm-ecds' CPU per edit and the median time to the status write.
    let mut round = 0;
    let mut edit_cost = |plugins: usize| {
        let cpu0 = cpu_ms(pid);
        let mut times = Vec::new();
        for _ in 0..edits {
            round += 1;
            let before = metrics(&admin);
            let t = Instant::now();
            kubectl(
                &[
                    "patch",
                    "wasmplugin",
                    "p0",
                    "-n",
                    "load",
                    "--type",
                    "merge",
                    "-p",
                    &format!("{{\"spec\":{{\"pluginConfig\":{{\"round\":{round}}}}}}}"),
                ],
                None,
            );
            let count = |m: &BTreeMap<String, f64>| {
                (
                    sum(m, "wasm_ecds_plugin_processing_count"),
                    m.get("wasm_ecds_kube_status_writes{result=\"ok\"}")
                        .copied()
                        .unwrap_or(0.0),
                )
            };
            let (p0, w0) = count(&before);
            wait_until("the edit processed and its status written", || {
                let (p, w) = count(&metrics(&admin));
                p > p0 && w > w0
            });
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let cpu = (cpu_ms(pid) - cpu0) as f64 / edits as f64;
        times.sort_by(f64::total_cmp);
        eprintln!(
            "{plugins} plugins: {edits} edits, {cpu:.1} ms CPU per edit, edit → status written median {:.0} ms",
            times[times.len() / 2]
        );
        (cpu, times[times.len() / 2])
    };
    let t = Instant::now();
    all_done(small);
    eprintln!(
        "start → {small} processed, statuses written: {:?}",
        t.elapsed()
    );
    let (small_cpu, small_ms) = edit_cost(small);
    create(small..n);
    let t = Instant::now();
    all_done(n + edits);
    eprintln!("{n} processed, statuses written after {:?}", t.elapsed());
    let first_cpu = cpu_ms(pid);
    let (big_cpu, big_ms) = edit_cost(n);
    println!(
        "edit of one WasmPlugin → processed and status written: {big_cpu:.1} ms CPU per edit at {n} \
         plugins, {:.2}× the {small_cpu:.1} ms at {small} (CPU ticks are 10 ms: over {edits} edits); \
         median time {big_ms:.0} ms, {:.2}× the {small_ms:.0} ms at {small}",
        big_cpu / small_cpu.max(0.1),
        big_ms / small_ms.max(1.0)
    );

    // Baseline: a plain list of the same objects.
    let options = wasm_ecds::k8s::KubeOptions {
        kubeconfig: Some(kubeconfig.clone()),
        namespaces: Vec::new(),
        selector: None,
        write_status: false,
        lease: Default::default(),
    };
    let client = wasm_ecds::k8s::client(&options).await.unwrap();
    let api: Api<DynamicObject> = Api::all_with(client, &wasm_ecds::k8s::wasmplugin_resource());
    let mut list_ms = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let l = api.list(&ListParams::default()).await.unwrap();
        assert_eq!(l.items.len(), n);
        list_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    list_ms.sort_by(f64::total_cmp);

    // The relist.
    let before = metrics(&admin);
    kube("stop-apiserver");
    run(Command::new(Path::new(&kube_bin).join("etcdctl"))
        .arg(format!(
            "--endpoints=http://127.0.0.1:{}",
            std::fs::read_to_string(state.path().join("env"))
                .unwrap()
                .lines()
                .find_map(|l| l.strip_prefix("ETCD_PORT="))
                .unwrap()
        ))
        .args(["put", "/registry/load/unrelated", "x"]));
    kube("start-apiserver");
    let cpu0 = cpu_ms(pid);
    let t = Instant::now();
    wait_until("the relist", || {
        metrics(&admin)["wasm_ecds_kube_relists"] > before["wasm_ecds_kube_relists"]
    });
    let relist = t.elapsed();
    let cpu = cpu_ms(pid) - cpu0;
    std::thread::sleep(Duration::from_secs(2));
    let after = metrics(&admin);
    let delta = |p: &str| sum(&after, p) - sum(&before, p);
    println!(
        "plain list of {n} WasmPlugins (baseline, median of 3): {:.0} ms",
        list_ms[1]
    );
    println!(
        "relist of {n} after an API server restart: counted {:.0} ms after the API server was back \
         (mostly the new API server starting its WasmPlugin watch cache before it answers 410, and \
         the watch's reconnect backoff); wasm-ecds CPU meanwhile {cpu} ms = {:.2}× its CPU from its \
         start until all were processed and their statuses written ({first_cpu} ms, \
         the edits at {small} plugins included)",
        relist.as_secs_f64() * 1e3,
        cpu as f64 / first_cpu.max(1) as f64
    );
    println!(
        "caused by the relist: processings {}, pushes {}, status writes {}",
        delta("wasm_ecds_plugin_processing_count"),
        delta("wasm_ecds_xds_push_count"),
        delta("wasm_ecds_kube_status_writes")
    );
    let _ = child.kill();
    let _ = child.wait();
    kube("stop");
}
