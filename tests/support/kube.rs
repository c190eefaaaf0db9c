//! A real etcd and kube-apiserver for the Kubernetes-source tests (`scripts/kube/`), with the
//! WasmPlugin CRD and the RBAC of `deploy/` applied, and `wasm-ecds serve --source kubernetes`
//! run as a process under the ServiceAccount-like identity that RBAC binds.
//!
//! Binaries: `$KUBE_BIN`, else `/var/cache/wasm-ecds/kube/bin` (what `scripts/kube/install-kube.sh`
//! installs). Missing: SKIP, or a panic under `CI=true`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde_json::Value;

use super::envoy::{http_request, wait_for};
use super::require_tool;

const CRATE: &str = env!("CARGO_MANIFEST_DIR");
/// How long the Kubernetes tests wait for something to converge.
pub const CONVERGE: Duration = Duration::from_secs(40);

fn kube_bin() -> Option<PathBuf> {
    let dir = std::env::var_os("KUBE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/wasm-ecds/kube/bin"));
    (dir.join("kube-apiserver").is_file() && dir.join("etcd").is_file()).then_some(dir)
}

/// A running API server (and its etcd), stopped on drop — or, for the shared one, by a watchdog
/// when the test process ends.
pub struct Cluster {
    state: tempfile::TempDir,
    bin: PathBuf,
    env: BTreeMap<String, String>,
    shared: bool,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("state", &self.state.path())
            .finish()
    }
}

static SHARED: OnceLock<Option<Cluster>> = OnceLock::new();

impl Cluster {
    /// One API server for every test of the process that does not restart it (each test uses its
    /// own namespaces and Lease).
    pub fn shared() -> Option<&'static Cluster> {
        SHARED.get_or_init(|| Cluster::start(true)).as_ref()
    }

    /// An API server of its own (for tests that stop and start it).
    pub fn private() -> Option<Cluster> {
        Cluster::start(false)
    }

    fn start(shared: bool) -> Option<Cluster> {
        let bin = require_tool(
            "kube-apiserver",
            kube_bin(),
            "run scripts/kube/install-kube.sh (scripts/test.sh does)",
        )?;
        let state = tempfile::tempdir().expect("state dir");
        let mut cluster = Cluster {
            state,
            bin,
            env: BTreeMap::new(),
            shared,
        };
        cluster.script("start");
        let env = std::fs::read_to_string(cluster.state.path().join("env")).expect("env file");
        cluster.env = env
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if shared {
            // Statics are never dropped: stop the processes when this test process ends.
            let script = format!(
                "while kill -0 {pid} 2>/dev/null; do sleep 1; done; bash {CRATE}/scripts/kube/start-kube.sh {} stop",
                cluster.state.path().display(),
                pid = std::process::id()
            );
            let mut watchdog = Command::new("sh")
                .args(["-c", &script])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("watchdog");
            std::thread::spawn(move || watchdog.wait());
        }
        cluster.kubectl(&["create", "namespace", "wasm-ecds"]);
        for crd in ["crd-wasmplugin.yaml", "crd-envoyfilter.yaml"] {
            cluster.kubectl(&["apply", "-f", &format!("{CRATE}/deploy/{crd}")]);
        }
        cluster.kubectl(&[
            "-n",
            "wasm-ecds",
            "apply",
            "-f",
            &format!("{CRATE}/deploy/rbac.yaml"),
        ]);
        cluster.kubectl(&[
            "wait",
            "--for",
            "condition=established",
            "--timeout=60s",
            "crd/wasmplugins.extensions.istio.io",
            "crd/envoyfilters.networking.istio.io",
        ]);
        Some(cluster)
    }

    fn script(&self, command: &str) {
        let out = Command::new("bash")
            .arg(format!("{CRATE}/scripts/kube/start-kube.sh"))
            .arg(self.state.path())
            .arg(command)
            .env("KUBE_BIN", &self.bin)
            .stdin(Stdio::null())
            .output()
            .expect("start-kube.sh");
        assert!(
            out.status.success(),
            "start-kube.sh {command}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.apiserver_log_tail()
        );
    }

    fn apiserver_log_tail(&self) -> String {
        let log =
            std::fs::read_to_string(self.state.path().join("apiserver.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// The admin kubeconfig (system:masters).
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.state.path().join("kubeconfig")
    }

    /// The kubeconfig of `system:serviceaccount:wasm-ecds:wasm-ecds`, bound by deploy/rbac.yaml.
    pub fn product_kubeconfig(&self) -> PathBuf {
        self.state.path().join("wasm-ecds.kubeconfig")
    }

    /// Runs kubectl as admin; panics on failure; returns stdout.
    pub fn kubectl(&self, args: &[&str]) -> String {
        self.kubectl_input(args, None)
    }

    /// `kubectl apply -f -` of a YAML text.
    pub fn apply(&self, yaml: &str) -> String {
        self.kubectl_input(&["apply", "-f", "-"], Some(yaml))
    }

    fn kubectl_input(&self, args: &[&str], input: Option<&str>) -> String {
        let mut child = Command::new(self.bin.join("kubectl"))
            .arg("--kubeconfig")
            .arg(self.admin_kubeconfig())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl");
        let mut stdin = child.stdin.take().expect("stdin");
        if let Some(text) = input {
            stdin.write_all(text.as_bytes()).expect("kubectl input");
        }
        drop(stdin);
        let out = child.wait_with_output().expect("kubectl output");
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl patch wasmplugin NAME --type merge -p PATCH` in `namespace`.
    pub fn merge_patch(&self, namespace: &str, name: &str, patch: &str) {
        self.kubectl(&[
            "-n",
            namespace,
            "patch",
            "wasmplugin",
            name,
            "--type",
            "merge",
            "-p",
            patch,
        ]);
    }

    /// An object as JSON.
    pub fn get(&self, namespace: &str, kind: &str, name: &str) -> Value {
        serde_json::from_str(&self.kubectl(&["-n", namespace, "get", kind, name, "-o", "json"]))
            .expect("object JSON")
    }

    /// Successful writes the API server counted (`apiserver_request_total`) of `verb` on
    /// `resource` (and `subresource`, `""` for none).
    pub fn request_count(&self, verb: &str, resource: &str, subresource: &str) -> u64 {
        let text = self.kubectl(&["get", "--raw", "/metrics"]);
        text.lines()
            .filter(|l| l.starts_with("apiserver_request_total{"))
            .filter(|l| {
                l.contains(&format!("verb=\"{verb}\""))
                    && l.contains(&format!("resource=\"{resource}\""))
                    && l.contains(&format!("subresource=\"{subresource}\""))
                    && l.contains("code=\"200\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    /// A kube-rs client with the admin identity.
    pub async fn admin_client(&self) -> kube::Client {
        let options = wasm_ecds::k8s::KubeOptions {
            kubeconfig: Some(self.admin_kubeconfig()),
            namespaces: Vec::new(),
            selector: None,
            write_status: false,
            lease: Default::default(),
        };
        wasm_ecds::k8s::client(&options)
            .await
            .expect("admin client")
    }

    /// Counts, from now on, the writes the API server applies to one WasmPlugin (its `MODIFIED`
    /// watch events): the API server's own account, independent of what wasm-ecds reports.
    pub async fn count_writes(&self, namespace: &str, name: &str) -> WriteCounter {
        use futures_util::StreamExt as _;
        use kube::api::{Api, DynamicObject, WatchEvent, WatchParams};
        let api: Api<DynamicObject> = Api::namespaced_with(
            self.admin_client().await,
            namespace,
            &wasm_ecds::k8s::wasmplugin_resource(),
        );
        let rv = api
            .get(name)
            .await
            .expect("object")
            .metadata
            .resource_version
            .expect("rv");
        let params = WatchParams::default().fields(&format!("metadata.name={name}"));
        let mut events = api.watch(&params, &rv).await.expect("watch").boxed();
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = count.clone();
        let task = tokio::spawn(async move {
            while let Some(Ok(event)) = events.next().await {
                if let WatchEvent::Modified(_) = event {
                    seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
        });
        WriteCounter { count, task }
    }

    /// Stops the API server alone (etcd keeps running).
    pub fn stop_apiserver(&self) {
        self.script("stop-apiserver");
    }

    pub fn start_apiserver(&self) {
        self.script("start-apiserver");
    }

    /// `etcdctl` against this cluster's etcd.
    pub fn etcdctl(&self, args: &[&str]) -> String {
        let out = Command::new(self.bin.join("etcdctl"))
            .arg(format!(
                "--endpoints=http://127.0.0.1:{}",
                self.env["ETCD_PORT"]
            ))
            .args(args)
            .env("ETCDCTL_API", "3")
            .output()
            .expect("etcdctl");
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.shared {
            self.script("stop");
        }
    }
}

/// Writes seen by [`Cluster::count_writes`].
pub struct WriteCounter {
    count: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl WriteCounter {
    pub fn get(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for WriteCounter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A unique lowercase name for a namespace or Lease of one test.
pub fn unique(prefix: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id())
}

/// `wasm-ecds serve --source kubernetes` as a process.
pub struct Serve {
    child: Child,
    pub admin: SocketAddr,
    pub xds: SocketAddr,
    log: Arc<Mutex<String>>,
    _cache: Option<tempfile::TempDir>,
}

impl Serve {
    /// Starts the product with the product kubeconfig, loopback ports, a fresh cache and `args`;
    /// waits until it prints its addresses.
    pub fn start(cluster: &Cluster, args: &[&str]) -> Serve {
        Self::try_start(cluster, args).unwrap_or_else(|log| panic!("serve did not start:\n{log}"))
    }

    /// `Err(log)` when the process exits before serving.
    pub fn try_start(cluster: &Cluster, args: &[&str]) -> Result<Serve, String> {
        let cache = tempfile::tempdir().expect("cache dir");
        let mut child = Command::new(env!("CARGO_BIN_EXE_wasm-ecds"))
            .args([
                "serve",
                "--source",
                "kubernetes",
                "--xds-address",
                "127.0.0.1:0",
            ])
            .args([
                "--admin-address",
                "127.0.0.1:0",
                "--lease-namespace",
                "wasm-ecds",
            ])
            .arg("--kubeconfig")
            .arg(cluster.product_kubeconfig())
            .arg("--cache-dir")
            .arg(cache.path())
            .args(args)
            .env("RUST_LOG", "info,kube=warn,tower=warn,hyper=warn")
            .env_remove("WASM_ECDS_PLUGINS")
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run wasm-ecds");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().expect("stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("wasm-ecds: xds on ") {
                    let _ = tx.send(rest.to_string());
                }
                let mut l = sink.lock().expect("log");
                if l.len() < 4 << 20 {
                    l.push_str(&line);
                    l.push('\n');
                }
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(100));
                return Err(log.lock().expect("log").clone());
            }
        };
        let (xds, admin) = line.split_once(", admin on ").expect("address line");
        Ok(Serve {
            child,
            admin: admin.trim().parse().expect("admin address"),
            xds: xds.trim().parse().expect("xds address"),
            log,
            _cache: Some(cache),
        })
    }

    /// Waits for the process to exit (it must, e.g. on a start-up error); its status and log.
    pub fn wait_exit(mut self, timeout: Duration) -> (Option<i32>, String) {
        let step = Duration::from_millis(50);
        for _ in 0..(timeout.as_millis() / step.as_millis()) {
            if let Ok(Some(status)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                return (status.code(), self.log());
            }
            std::thread::sleep(step);
        }
        (None, self.log())
    }

    pub fn log(&self) -> String {
        self.log.lock().expect("log").clone()
    }

    /// SIGKILL: no graceful release of anything.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub async fn admin_get(&self, path: &str) -> String {
        let r = http_request("GET", &format!("http://{}{path}", self.admin))
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        String::from_utf8_lossy(&r.body).into_owned()
    }

    /// Waits (bounded) until `/readyz` answers 200.
    pub async fn wait_ready(&self) {
        wait_for("/readyz", CONVERGE, || async {
            self.ready()
                .await
                .then_some(())
                .ok_or_else(|| "not ready".to_string())
        })
        .await;
    }

    /// Waits until `/debug/plugins` shows `key` with `outcome`; returns the entry.
    pub async fn wait_outcome(&self, key: &str, outcome: &str) -> Value {
        wait_for(&format!("{key} {outcome}"), CONVERGE, || async {
            let p = self.plugin(key).await.ok_or("absent".to_string())?;
            (p["outcome"] == outcome)
                .then(|| p.clone())
                .ok_or(format!("{p}"))
        })
        .await
    }

    pub async fn ready(&self) -> bool {
        http_request("GET", &format!("http://{}/readyz", self.admin))
            .await
            .is_ok_and(|r| r.status == 200)
    }

    /// `/metrics` samples by normalised series.
    pub async fn metrics(&self) -> BTreeMap<String, f64> {
        wasm_ecds::metrics::parse_samples(&self.admin_get("/metrics").await)
    }

    pub async fn metric(&self, series: &str) -> f64 {
        self.metrics().await.get(series).copied().unwrap_or(0.0)
    }

    /// `/debug/plugins` entry of `ns/name`.
    pub async fn plugin(&self, key: &str) -> Option<Value> {
        let v: Value = serde_json::from_str(&self.admin_get("/debug/plugins").await).ok()?;
        v["plugins"]
            .as_array()?
            .iter()
            .find(|p| p["plugin"] == key)
            .cloned()
    }

    pub async fn debug_plugins(&self) -> Value {
        serde_json::from_str(&self.admin_get("/debug/plugins").await).expect("plugins JSON")
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(60)..].join("\n");
            let _ = std::io::stderr()
                .write_all(format!("\n--- wasm-ecds log tail ---\n{tail}\n---\n").as_bytes());
        }
    }
}

/// The ECDS resource name of plugin `ns/name`.
pub fn resource(ns: &str, name: &str) -> String {
    format!("extensions.istio.io/wasmplugin/{ns}.{name}")
}

/// A WasmPlugin manifest.
pub fn wasm_plugin(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n{}",
        spec.lines().map(|l| format!("  {l}\n")).collect::<String>()
    )
}

/// A Secret manifest of `type` holding `.dockerconfigjson`.
pub fn pull_secret(namespace: &str, name: &str, type_: &str, docker_config: &str) -> String {
    use base64::Engine as _;
    let data = base64::engine::general_purpose::STANDARD.encode(docker_config);
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: {namespace}}}\ntype: {type_}\ndata: {{.dockerconfigjson: {data}}}\n"
    )
}

/// The condition of `type_` in an object's status.
pub fn condition(object: &Value, type_: &str) -> Option<Value> {
    object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
}
