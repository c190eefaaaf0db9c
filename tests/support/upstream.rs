//! An upstream xDS management server that is not wasm-ecds: `upstream_ads.py` beside this file
//! (grpcio and the Envoy protos of xds-protos; SotW and delta on ADS and on plain ECDS), run as a
//! child process and driven by JSON lines. Every event it prints (streams opened and closed,
//! requests, responses) is recorded in order; tests wait on them.
//!
//! The interpreter: `$UPSTREAM_PYTHON`, else the venv `scripts/install-test-deps.sh` makes in
//! `${WASM_ECDS_CACHE:-/var/cache/wasm-ecds}/py-upstream`. Missing, it SKIPs, or panics under
//! `CI=true` (see [`super::require_tool`]).
//!
//! Waits are async (the tonic client or the proxy under test runs on the same runtime) and use
//! tokio's clock, so not under `tokio::time::pause`. Timeouts only bound waiting: a timeout fails
//! the test with every event seen so far.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};
use tokio::sync::Notify;

use super::require_tool;

pub const LDS_TYPE_URL: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const CDS_TYPE_URL: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const RDS_TYPE_URL: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const ECDS_TYPE_URL: &str = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";
pub const WASM_TYPE_URL: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
pub const TYPED_STRUCT_TYPE_URL: &str = "type.googleapis.com/udpa.type.v1.TypedStruct";

/// Bounds the start and each command; reached only when the server hangs.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// The interpreter with grpcio and xds-protos, if installed (see the module docs).
pub fn upstream_python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("UPSTREAM_PYTHON") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "UPSTREAM_PYTHON={} does not exist",
            p.display()
        );
        return Some(p);
    }
    let cache =
        std::env::var_os("WASM_ECDS_CACHE").unwrap_or_else(|| "/var/cache/wasm-ecds".into());
    let p = PathBuf::from(cache).join("py-upstream/bin/python");
    p.is_file().then_some(p)
}

/// A raw resource for [`Upstream::set`]: an `Any` with exactly `type_url` and `bytes`, named
/// `name` (for malformed or mistyped resources).
pub fn raw_resource(name: &str, type_url: &str, bytes: &[u8]) -> Value {
    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
    json!({"@raw": {"name": name, "type_url": type_url, "value_b64": b64}})
}

/// The proto3 JSON of a `TypedExtensionConfig` (an ECDS resource) wrapping `typed_config`, which
/// carries its own `"@type"`.
pub fn ecds_resource(name: &str, typed_config: Value) -> Value {
    json!({"@type": ECDS_TYPE_URL, "name": name, "typed_config": typed_config})
}

#[derive(Default)]
struct Log {
    events: Vec<Value>,
    stderr: String,
    /// stdout reached EOF: the server exited.
    closed: bool,
}

struct Shared {
    log: Mutex<Log>,
    changed: Condvar,
    notify: Notify,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut Log)) {
        f(&mut self.log.lock().unwrap());
        self.changed.notify_all();
        self.notify.notify_waiters();
    }

    /// The first event from index `from` on matching `pred`; panics once the server has exited.
    fn find(&self, from: usize, pred: &dyn Fn(&Value) -> bool) -> Option<Value> {
        let log = self.log.lock().unwrap();
        if let Some(e) = log.events.iter().skip(from).find(|e| pred(e)) {
            return Some(e.clone());
        }
        assert!(
            !log.closed,
            "the upstream xDS server exited\n{}",
            describe(&log)
        );
        None
    }
}

fn describe(log: &Log) -> String {
    let events: Vec<String> = log.events.iter().map(Value::to_string).collect();
    format!(
        "events:\n  {}\nstderr:\n{}",
        events.join("\n  "),
        log.stderr
    )
}

/// The running server; killed when dropped.
pub struct Upstream {
    child: Mutex<Child>,
    stdin: Mutex<ChildStdin>,
    port: u16,
    shared: Arc<Shared>,
    seq: AtomicU64,
}

impl Upstream {
    /// Starts the server on a free loopback port. `None` after a loud SKIP when the venv is
    /// missing, except under `CI=true` where that panics.
    pub fn start() -> Option<Upstream> {
        Upstream::start_on(0)
    }

    /// Starts the server on `port` (0: any free port), e.g. again on the port of one killed.
    pub fn start_on(port: u16) -> Option<Upstream> {
        let python = require_tool(
            "the upstream xDS server's python (grpcio, xds-protos)",
            upstream_python(),
            "set UPSTREAM_PYTHON or run scripts/install-test-deps.sh",
        )?;
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/upstream_ads.py");
        let mut child = Command::new(&python)
            .args([script, "--host", "127.0.0.1", "--port", &port.to_string()])
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
        let shared = Arc::new(Shared {
            log: Mutex::default(),
            changed: Condvar::new(),
            notify: Notify::new(),
        });
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let s = shared.clone();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                let event = serde_json::from_str(&line)
                    .unwrap_or_else(|_| json!({"event": "unparsed", "line": line}));
                s.update(|log| log.events.push(event));
            }
            s.update(|log| log.closed = true);
        });
        let mut stderr = child.stderr.take().unwrap();
        let s = shared.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stderr.read(&mut buf) {
                s.update(|log| log.stderr.push_str(&String::from_utf8_lossy(&buf[..n])));
            }
        });
        let mut upstream = Upstream {
            stdin: Mutex::new(child.stdin.take().unwrap()),
            child: Mutex::new(child),
            port: 0,
            shared,
            seq: AtomicU64::new(0),
        };
        let listening = upstream.wait_blocking(|e| e["event"] == "listening");
        upstream.port = listening["port"].as_u64().unwrap() as u16;
        Some(upstream)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Replaces every resource of `type_url` (see `upstream_ads.py`: proto3 JSON with `"@type"`,
    /// optional `"@version"`, or [`raw_resource`]) and pushes to the subscribed streams. Returns
    /// once the server applied it; panics with its message when it refused.
    pub fn set(&self, type_url: &str, version: &str, resources: Vec<Value>) {
        if let Err(message) = self.try_set(type_url, version, resources) {
            panic!("upstream refused the set of {type_url} {version}: {message}");
        }
    }

    /// [`Upstream::set`], returning the server's message when it refused.
    pub fn try_set(
        &self,
        type_url: &str,
        version: &str,
        resources: Vec<Value>,
    ) -> Result<(), String> {
        let mut cmd = json!({"op": "set", "type_url": type_url, "version": version});
        cmd["resources"] = resources.into();
        self.command(cmd)
    }

    /// [`Upstream::set`] with one raw resource `name` whose `Any` has `type_url` and `bytes`.
    pub fn set_raw(&self, type_url: &str, version: &str, name: &str, bytes: &[u8]) {
        self.set(type_url, version, vec![raw_resource(name, type_url, bytes)]);
    }

    /// Ends every open stream with UNAVAILABLE; the server keeps listening.
    pub fn drop_streams(&self) {
        self.command(json!({"op": "drop_streams"})).unwrap();
    }

    /// Sends `cmd` and waits for its answer: `Err(message)` when the server refused it.
    fn command(&self, mut cmd: Value) -> Result<(), String> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        cmd["seq"] = seq.into();
        let mut stdin = self.stdin.lock().unwrap();
        writeln!(stdin, "{cmd}")
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("the upstream xDS server's stdin: {e}"));
        drop(stdin);
        let answer = self
            .wait_blocking(|e| (e["event"] == "ok" || e["event"] == "error") && e["seq"] == seq);
        match answer["event"] == "ok" {
            true => Ok(()),
            false => Err(answer["message"].as_str().unwrap_or_default().to_string()),
        }
    }

    /// Waits on a plain thread (for the start and commands, which do not depend on the runtime).
    fn wait_blocking(&self, pred: impl Fn(&Value) -> bool) -> Value {
        let log = self.shared.log.lock().unwrap();
        let waiting = |log: &mut Log| !log.closed && !log.events.iter().any(&pred);
        let (log, _) = self
            .shared
            .changed
            .wait_timeout_while(log, COMMAND_TIMEOUT, waiting)
            .unwrap();
        match log.events.iter().find(|e| pred(e)) {
            Some(e) => e.clone(),
            None => panic!("upstream xDS server: no such event\n{}", describe(&log)),
        }
    }

    /// The first event matching `pred`, among those recorded so far and those to come.
    pub async fn wait_event(&self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_event_after(0, timeout, pred).await
    }

    /// The first event matching `pred` recorded at or after `mark` (see [`Upstream::mark`]).
    pub async fn wait_event_after(
        &self,
        mark: usize,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(e) = self.shared.find(mark, &pred) {
                return e;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let log = self.shared.log.lock().unwrap();
                panic!(
                    "upstream xDS server: no matching event in {timeout:?}\n{}",
                    describe(&log)
                );
            }
        }
    }

    /// The number of events recorded so far: a position for [`Upstream::events_since`].
    pub fn mark(&self) -> usize {
        self.shared.log.lock().unwrap().events.len()
    }

    pub fn events_since(&self, mark: usize) -> Vec<Value> {
        self.shared.log.lock().unwrap().events[mark..].to_vec()
    }

    pub fn events(&self) -> Vec<Value> {
        self.events_since(0)
    }

    /// Every `request` event of `type_url` so far, in order.
    pub fn requests(&self, type_url: &str) -> Vec<Value> {
        self.of_kind("request", type_url)
    }

    /// Every `response` event of `type_url` so far, in order.
    pub fn responses(&self, type_url: &str) -> Vec<Value> {
        self.of_kind("response", type_url)
    }

    fn of_kind(&self, event: &str, type_url: &str) -> Vec<Value> {
        let log = self.shared.log.lock().unwrap();
        let matches = |e: &&Value| e["event"] == event && e["type_url"] == type_url;
        log.events.iter().filter(matches).cloned().collect()
    }

    /// SIGKILL, as a crash: streams break without a status. Waits until the process is gone.
    pub fn kill(&self) {
        let mut child = self.child.lock().unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.kill();
    }
}
