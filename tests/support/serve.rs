//! A real `wasm-ecds serve` process for tests that need one (memory, logs, the admin API's
//! command-line clients): free loopback ports, `--delivery inline`, plugin files in
//! `<dir>/plugins`, the cache in `<dir>/cache`, stderr collected line by line.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::json;
use tokio::time::timeout;

/// Bounds every wait; reached only when something hangs.
const WAIT: Duration = Duration::from_secs(60);

/// `wasm-ecds serve` with `--delivery inline` on free loopback ports, serving the plugin files
/// in `plugins`; stderr is read line by line into a shared buffer.
pub struct Process {
    pub child: Child,
    pub xds: SocketAddr,
    pub admin: SocketAddr,
    pub stderr: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Process {
    pub fn start(dir: &std::path::Path, extra: &[&str]) -> Process {
        let mut child = Command::new(env!("CARGO_BIN_EXE_wasm-ecds"))
            .args([
                "serve",
                "--xds-address",
                "127.0.0.1:0",
                "--admin-address",
                "127.0.0.1:0",
                "--delivery",
                "inline",
            ])
            .arg("--plugins")
            .arg(dir.join("plugins"))
            .arg("--cache-dir")
            .arg(dir.join("cache"))
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run wasm-ecds serve");
        let mut reader = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        let (xds, admin) = loop {
            line.clear();
            assert!(reader.read_line(&mut line).unwrap() > 0, "serve exited");
            if let Some(rest) = line.trim().strip_prefix("wasm-ecds: xds on ") {
                let (x, a) = rest.split_once(", admin on ").unwrap();
                break (x.parse().unwrap(), a.parse().unwrap());
            }
        };
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in reader.lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Process {
            child,
            xds,
            admin,
            stderr,
        }
    }

    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }

    pub async fn metrics(&self) -> String {
        let r = super::envoy::http_get(&format!("http://{}/metrics", self.admin))
            .await
            .expect("GET /metrics");
        r.text()
    }

    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or(0.0)
    }

    /// Waits until `/metrics` shows `series` at `min` or more.
    pub async fn wait_metric(&self, series: &str, min: f64) {
        self.wait_metric_where(series, |v| v >= min).await
    }

    pub async fn wait_metric_where(&self, series: &str, ok: impl Fn(f64) -> bool) {
        timeout(WAIT, async {
            while !ok(self.metric(series).await) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .unwrap_or_else(|_| {
            let text = futures_block(self.metrics());
            panic!("timed out waiting for {series}:\n{text}")
        });
    }
}

fn futures_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn write_plugin(dir: &std::path::Path, name: &str, module: &std::path::Path) {
    let plugin = json!({
        "apiVersion": "extensions.istio.io/v1alpha1",
        "kind": "WasmPlugin",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"url": format!("file://{}", module.display())},
    });
    std::fs::write(
        dir.join(format!("{name}.yaml")),
        serde_json::to_vec(&plugin).unwrap(),
    )
    .unwrap();
}

pub fn resource(name: &str) -> String {
    format!("extensions.istio.io/wasmplugin/default.{name}")
}
