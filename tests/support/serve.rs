//! The one way tests start a real `wasm-ecds serve` process ([`ServeCommand`]): free loopback
//! ports, `RUST_LOG=info` unless told otherwise, `WASM_ECDS_PLUGINS` cleared, stderr collected
//! line by line into the running [`Process`]. [`Process::start`] is the common case: `--delivery
//! inline`, plugin files in `<dir>/plugins`, the cache in `<dir>/cache`. [`in_process`] starts the
//! server inside the test instead, on loopback listeners.

use std::ffi::OsStr;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::timeout;

/// Bounds every wait; reached only when something hangs.
const WAIT: Duration = Duration::from_secs(60);

/// `wasm-ecds serve --xds-address 127.0.0.1:0 --admin-address 127.0.0.1:0`, plus whatever the
/// test adds; [`ServeCommand::start`] runs it until it listens, [`ServeCommand::output`] runs it
/// to the end (start-up errors).
pub struct ServeCommand {
    cmd: Command,
    log: String,
    nofile: Option<u64>,
}

impl Default for ServeCommand {
    fn default() -> Self {
        Self::new()
    }
}

impl ServeCommand {
    pub fn new() -> ServeCommand {
        Self::wrapping(Command::new(env!("CARGO_BIN_EXE_wasm-ecds")))
    }

    /// As the unprivileged user 65534 (through `setpriv`) when the tests run as root, so that
    /// file modes are enforced; as the current user otherwise.
    pub fn unprivileged() -> ServeCommand {
        let bin = env!("CARGO_BIN_EXE_wasm-ecds");
        let root = std::fs::metadata("/proc/self").unwrap().uid() == 0;
        if root {
            let mut c = Command::new("setpriv");
            c.args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--",
                bin,
            ]);
            Self::wrapping(c)
        } else {
            Self::new()
        }
    }

    fn wrapping(mut cmd: Command) -> ServeCommand {
        cmd.args([
            "serve",
            "--xds-address",
            "127.0.0.1:0",
            "--admin-address",
            "127.0.0.1:0",
        ])
        .env_remove("WASM_ECDS_PLUGINS")
        .stdin(Stdio::null());
        ServeCommand {
            cmd,
            log: "info".into(),
            nofile: None,
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.cmd.arg(arg);
        self
    }

    pub fn args<S: AsRef<OsStr>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.cmd.args(args);
        self
    }

    pub fn plugins(self, path: impl AsRef<OsStr>) -> Self {
        self.arg("--plugins").arg(path)
    }

    pub fn cache_dir(self, path: impl AsRef<OsStr>) -> Self {
        self.arg("--cache-dir").arg(path)
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.cmd.env(key, value);
        self
    }

    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.cmd.current_dir(dir);
        self
    }

    /// `RUST_LOG` for [`ServeCommand::start`] (`info` by default).
    pub fn log(mut self, filter: &str) -> Self {
        self.log = filter.into();
        self
    }

    /// Sets both open-files limits of the process.
    pub fn nofile(mut self, n: u64) -> Self {
        self.nofile = Some(n);
        self
    }

    fn apply_nofile(&mut self) {
        if let Some(n) = self.nofile {
            // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                self.cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
    }

    /// Runs to the end; for start-up errors (the environment's `RUST_LOG` is left as it is).
    pub fn output(mut self) -> Output {
        self.apply_nofile();
        self.cmd.output().expect("run wasm-ecds serve")
    }

    /// Starts the process and reads stderr until it says where it listens.
    pub fn start(mut self) -> Process {
        self.apply_nofile();
        let mut child = self
            .cmd
            .env("RUST_LOG", &self.log)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run wasm-ecds serve");
        let mut reader = BufReader::new(child.stderr.take().unwrap());
        let mut startup = Vec::new();
        let (xds, admin) = loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                let _ = child.kill();
                panic!(
                    "serve exited before listening ({:?}):\n{}",
                    child.wait(),
                    startup.join("")
                );
            }
            startup.push(line.trim_end_matches('\n').to_string());
            // "wasm-ecds: xds on ADDR, admin on ADDR"
            if let Some(rest) = line.trim().strip_prefix("wasm-ecds: xds on ") {
                let (x, a) = rest.split_once(", admin on ").unwrap();
                break (x.parse().unwrap(), a.parse().unwrap());
            }
        };
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let sink = stderr.clone();
        let reader = std::thread::spawn(move || {
            for line in reader.lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Process {
            child,
            xds,
            admin,
            startup,
            stderr,
            reader: Some(reader),
        }
    }
}

/// A running `wasm-ecds serve`, killed on drop.
pub struct Process {
    pub child: Child,
    pub xds: SocketAddr,
    pub admin: SocketAddr,
    /// The stderr lines up to and including "wasm-ecds: xds on …, admin on …".
    pub startup: Vec<String>,
    /// The stderr lines after that one, as they come.
    pub stderr: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Process {
    /// `serve --delivery inline --plugins <dir>/plugins --cache-dir <dir>/cache` plus `extra`.
    pub fn start(dir: &Path, extra: &[&str]) -> Process {
        ServeCommand::new()
            .args(["--delivery", "inline"])
            .plugins(dir.join("plugins"))
            .cache_dir(dir.join("cache"))
            .args(extra)
            .start()
    }

    /// Everything the process wrote to stderr so far, one line each.
    pub fn stderr_text(&self) -> String {
        let mut text = String::new();
        for line in self
            .startup
            .iter()
            .chain(self.stderr.lock().unwrap().iter())
        {
            text.push_str(line);
            text.push('\n');
        }
        text
    }

    /// `(status, body)` of `GET path` on the admin port (HTTP/1.0, 10 s read timeout).
    pub fn try_get(&self, path: &str) -> std::io::Result<(u16, String)> {
        let mut s = std::net::TcpStream::connect(self.admin)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(s, "GET {path} HTTP/1.0\r\n\r\n")?;
        let mut r = String::new();
        s.read_to_string(&mut r)?;
        let status = r
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = r.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        Ok((status, body.to_string()))
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        self.try_get(path).expect("admin port")
    }

    /// `GET path` must answer 200 with JSON.
    pub fn json(&self, path: &str) -> Value {
        let (status, body) = self.get(path);
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    pub fn plugins(&self) -> Value {
        self.json("/debug/plugins")
    }

    /// Polls `/readyz` (at most 200 times, 50 ms apart); true once it answers 200.
    pub fn wait_ready(&self) -> bool {
        (0..200).any(|_| {
            let ok = matches!(self.try_get("/readyz"), Ok((200, _)));
            if !ok {
                std::thread::sleep(Duration::from_millis(50));
            }
            ok
        })
    }

    /// Polls (at most 600 times, 100 ms apart) until `ok` holds; panics with `/debug/plugins`.
    pub fn wait_until(&self, what: &str, ok: impl Fn(&Process) -> bool) {
        for _ in 0..600 {
            if ok(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("{what} never happened: {}", self.plugins());
    }

    /// SIGTERM, then the exit status (polled at most 100 times, 100 ms apart) and everything the
    /// process wrote to stderr.
    pub fn terminate(mut self) -> (Option<i32>, String) {
        let killed = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        for _ in 0..100 {
            if let Some(s) = self.child.try_wait().unwrap() {
                // The pipe is closed now: the reader ends after the last line.
                self.reader.take().unwrap().join().unwrap();
                return (s.code(), self.stderr_text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("serve did not exit within 10 s of SIGTERM");
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

    /// `/debug/plugins` (open, or with no token configured), read without blocking the runtime.
    pub async fn debug_plugins(&self) -> Value {
        let r = super::envoy::http_get(&format!("http://{}/debug/plugins", self.admin))
            .await
            .expect("GET /debug/plugins");
        assert_eq!(r.status, 200, "{}", r.text());
        serde_json::from_slice(&r.body).expect("/debug/plugins is JSON")
    }

    /// Waits (at most `wait`) until `n` plugins have an outcome; returns them by name.
    pub async fn settled(
        &self,
        n: usize,
        wait: Duration,
    ) -> std::collections::BTreeMap<String, Value> {
        super::envoy::wait_for("every plugin processed", wait, || async {
            let view = self.debug_plugins().await;
            let plugins = view["plugins"].as_array().cloned().unwrap_or_default();
            let done: std::collections::BTreeMap<String, Value> = plugins
                .into_iter()
                .filter(|p| !p["outcome"].is_null())
                .map(|p| (p["plugin"].as_str().unwrap().to_string(), p))
                .collect();
            if done.len() == n {
                Ok(done)
            } else {
                Err(format!("{} of {n} processed: {view}", done.len()))
            }
        })
        .await
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

/// `<plugins>/<name>.yaml`: the WasmPlugin `default/<name>` with the module at `url` (the
/// directory is created when missing).
pub fn write_url_plugin(plugins: &Path, name: &str, url: &str) {
    let plugin = json!({
        "apiVersion": "extensions.istio.io/v1alpha1",
        "kind": "WasmPlugin",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"url": url},
    });
    std::fs::create_dir_all(plugins).unwrap();
    std::fs::write(
        plugins.join(format!("{name}.yaml")),
        serde_json::to_vec(&plugin).unwrap(),
    )
    .unwrap();
}

/// [`write_url_plugin`] with the local module file `module`.
pub fn write_plugin(dir: &Path, name: &str, module: &Path) {
    write_url_plugin(dir, name, &format!("file://{}", module.display()));
}

pub fn resource(name: &str) -> String {
    format!("extensions.istio.io/wasmplugin/default.{name}")
}

/// The server inside the test on loopback listeners, with `config`, the plugin files or
/// directories `plugins` and, for `proxy --upstream`, `proxy`.
pub async fn in_process(
    config: wasm_ecds::config::Config,
    plugins: Vec<std::path::PathBuf>,
    proxy: Option<wasm_ecds::proxy::UpstreamOptions>,
) -> wasm_ecds::serve::ServerHandle {
    in_process_with(
        config,
        plugins,
        proxy,
        Default::default(),
        Default::default(),
        None,
    )
    .await
}

/// [`in_process`] with its ports exposed as `ports` says and its xDS port bounded as `xds` says;
/// `admin`, when given, is the admin listener already bound (when the module URL must name its
/// address).
pub async fn in_process_with(
    config: wasm_ecds::config::Config,
    plugins: Vec<std::path::PathBuf>,
    proxy: Option<wasm_ecds::proxy::UpstreamOptions>,
    ports: wasm_ecds::net::PortOptions,
    xds: wasm_ecds::xds::ServeOptions,
    admin: Option<tokio::net::TcpListener>,
) -> wasm_ecds::serve::ServerHandle {
    let transport = std::sync::Arc::new(
        wasm_ecds::fetch::hyper_transport::HyperTransport::new(&config, Vec::new())
            .expect("transport"),
    );
    let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
    let admin_listener = match admin {
        Some(l) => l,
        None => bind().await.expect("bind admin"),
    };
    wasm_ecds::serve::start_with(
        wasm_ecds::serve::ServeSetup {
            config,
            plugin_paths: plugins,
            xds_listener: bind().await.expect("bind xds"),
            admin_listener,
            transport,
            fetch_config: None,
            kube: None,
            proxy,
        },
        ports,
        xds,
    )
    .await
    .unwrap_or_else(|e| panic!("the server did not start: {e:#}"))
}
