//! The fetch side of a real `wasm-ecds serve` process under hostile input (issue 10): a FIFO as a
//! `file://` module, credentials in module URLs, a relative `--cache-dir`; and many plugins pulling
//! at once within `--max-concurrent-pulls` / `--max-pulls-per-host` (issue 11). Everything is
//! real: the process, its admin port, the file system, HTTP servers on loopback.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use support::serve::{Process, ServeCommand};

/// A valid (empty) Wasm module.
const WASM: &[u8] = b"\0asm\x01\0\0\0";

/// `serve` on free loopback ports with `args`, logging at `info`, in `cwd`.
fn start(cwd: &Path, args: &[&str]) -> Process {
    ServeCommand::new().args(args).current_dir(cwd).start()
}

/// Polls `/debug/plugins` until every plugin has an outcome; returns them by name.
fn settled_plugins(serve: &Process) -> Vec<Value> {
    for _ in 0..200 {
        let v = serve.plugins();
        let plugins = v["plugins"].as_array().cloned().unwrap_or_default();
        if !plugins.is_empty() && plugins.iter().all(|p| !p["outcome"].is_null()) {
            return plugins;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("plugins never settled: {}", serve.plugins());
}

fn plugin(name: &str, url: &str) -> String {
    format!(
        "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\n\
         metadata: {{name: {name}, namespace: default}}\nspec: {{url: '{url}'}}\n"
    )
}

fn by_name<'a>(plugins: &'a [Value], name: &str) -> &'a Value {
    plugins
        .iter()
        .find(|p| p["plugin"] == format!("default/{name}"))
        .unwrap_or_else(|| panic!("no plugin {name} in {plugins:?}"))
}

/// The probe's FIFO as a module: it blocked a worker, readiness and shutdown for good. Now it is
/// refused as not a regular file; the other plugin is served, `/readyz` turns ready, SIGTERM exits.
#[test]
fn a_fifo_as_module_neither_blocks_readiness_nor_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("stuck.wasm");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let good = dir.path().join("good.wasm");
    std::fs::write(&good, WASM).unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    for (name, path) in [("stuck", &fifo), ("good", &good)] {
        let url = format!("file://{}", path.display());
        std::fs::write(plugins.join(format!("{name}.yaml")), plugin(name, &url)).unwrap();
    }
    let cache = dir.path().join("cache");
    let serve = start(
        dir.path(),
        &[
            "--plugins",
            plugins.to_str().unwrap(),
            "--cache-dir",
            cache.to_str().unwrap(),
        ],
    );
    assert!(
        serve.wait_ready(),
        "/readyz never 200: {}",
        serve.stderr_text()
    );
    let all = settled_plugins(&serve);
    let good = by_name(&all, "good");
    assert_eq!(good["outcome"], "pulled", "{good}");
    assert_eq!(good["serves"]["kind"], "module", "{good}");
    let stuck = by_name(&all, "stuck");
    assert_eq!(stuck["reason"], "download_failure", "{stuck}");
    let error = stuck["error"].as_str().unwrap_or_default();
    assert!(error.contains("not a regular file (a FIFO)"), "{stuck}");
    assert_eq!(serve.terminate().0, Some(0));
}

/// A real HTTP/1.1 server on loopback answering every GET with `body`; keeps each request's
/// head (request line and headers) for the test.
struct ModuleHost {
    port: u16,
    heads: Arc<Mutex<Vec<String>>>,
}

impl ModuleHost {
    fn start(body: &'static [u8]) -> ModuleHost {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let seen = heads.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                seen.lock().unwrap().push(head);
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(body);
            }
        });
        ModuleHost { port, heads }
    }
}

/// The probe saw `user:secret@` of a module URL in the logs, `/debug/plugins`, `/debug/cache` and
/// `index.json`. Now it is in none of them, and the credentials still reach the server (as a basic
/// `Authorization` header, as Go's client sends them). An `oci://user:secret@…` URL is refused
/// without quoting the secret and without the old "digest must be sha256" message. The cache
/// directory is relative here: the served path is absolute all the same.
#[test]
fn credentials_in_urls_are_never_shown_and_a_relative_cache_dir_is_made_absolute() {
    const SECRET: &str = "s3cr3t-Pa55";
    let host = ModuleHost::start(WASM);
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins.yaml");
    let http = format!(
        "http://alice:{SECRET}@127.0.0.1:{}/private/filter.wasm",
        host.port
    );
    let oci = format!("oci://alice:{SECRET}@127.0.0.1:{}/ns/filter:v1", host.port);
    std::fs::write(
        &plugins,
        format!("{}---\n{}", plugin("web", &http), plugin("reg", &oci)),
    )
    .unwrap();
    // Relative to the process's working directory (the temporary directory).
    let serve = start(
        dir.path(),
        &[
            "--plugins",
            plugins.to_str().unwrap(),
            "--cache-dir",
            "relative-cache",
        ],
    );
    assert!(
        serve.wait_ready(),
        "/readyz never 200: {}",
        serve.stderr_text()
    );
    let all = settled_plugins(&serve);
    let web = by_name(&all, "web");
    assert_eq!(web["outcome"], "pulled", "{web}");
    assert_eq!(
        web["url"],
        format!("http://***@127.0.0.1:{}/private/filter.wasm", host.port)
    );
    let path = web["serves"]["path"].as_str().unwrap();
    let cache = std::fs::canonicalize(dir.path().join("relative-cache")).unwrap();
    assert!(Path::new(path).is_absolute(), "{web}");
    assert!(
        path.starts_with(cache.to_str().unwrap()),
        "{path} not in {cache:?}"
    );
    let heads = host.heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 1, "{heads:?}");
    assert!(
        heads[0].starts_with("GET /private/filter.wasm HTTP/1.1\r\n"),
        "{heads:?}"
    );
    // base64("alice:s3cr3t-Pa55")
    assert!(
        heads[0]
            .to_ascii_lowercase()
            .contains("authorization: basic ywxpy2u6cznjcjn0lvbhntu="),
        "{heads:?}"
    );
    let refused = serve.json("/debug/plugins")["refused"].to_string();
    assert!(refused.contains("credentials in an oci url"), "{refused}");
    assert!(!refused.contains("digest"), "{refused}");

    let debug_plugins = serve.get("/debug/plugins").1;
    let debug_cache = serve.get("/debug/cache").1;
    assert!(
        debug_cache.contains("http://***@127.0.0.1"),
        "{debug_cache}"
    );
    // The index is written within a second of a change, and on shutdown.
    let (code, stderr) = serve.terminate();
    assert_eq!(code, Some(0), "{stderr}");
    let index = std::fs::read_to_string(cache.join("index.json")).unwrap();
    assert!(index.contains("http://***@127.0.0.1"), "{index}");
    assert!(
        stderr.contains("***@127.0.0.1"),
        "the url is logged: {stderr}"
    );
    for (what, text) in [
        ("/debug/plugins", &debug_plugins),
        ("/debug/cache", &debug_cache),
        ("index.json", &index),
        ("stderr", &stderr),
    ] {
        assert!(!text.contains(SECRET), "{what} shows the secret: {text}");
    }
}

/// What the gated hosts of [`GatedHosts`] have seen.
#[derive(Default)]
struct Gate {
    /// Per host: requests being held now.
    active: Vec<usize>,
    /// Per host: plugins whose request has not been answered yet.
    pending: Vec<usize>,
    /// The most requests held at once: per host, and over all hosts.
    max_active: Vec<usize>,
    max_total: usize,
    /// Bumped by every release.
    wave: u64,
    /// While set, nothing is released (the test looks at the server in between).
    paused: bool,
    /// The bounds the server under test was given.
    overall: usize,
    per_host: usize,
}

/// Real HTTP/1.1 servers on loopback (one thread per connection) that hold every request until
/// as many are held as the pull bounds allow: `min(overall, Σ min(per_host, pending))`. Then all
/// of them are answered at once (a wave). A server that let more pulls through would be seen
/// holding more than a bound; one that let fewer through would never complete a wave.
struct GatedHosts {
    ports: Vec<u16>,
    gate: Arc<(Mutex<Gate>, std::sync::Condvar)>,
}

impl GatedHosts {
    fn start(plugins_per_host: &[usize], overall: usize, per_host: usize) -> GatedHosts {
        let hosts = plugins_per_host.len();
        let gate = Arc::new((
            Mutex::new(Gate {
                active: vec![0; hosts],
                pending: plugins_per_host.to_vec(),
                max_active: vec![0; hosts],
                paused: true,
                overall,
                per_host,
                ..Gate::default()
            }),
            std::sync::Condvar::new(),
        ));
        let mut ports = Vec::new();
        for host in 0..hosts {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            ports.push(listener.local_addr().unwrap().port());
            let gate = gate.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    let gate = gate.clone();
                    std::thread::spawn(move || serve_held(conn, host, &gate));
                }
            });
        }
        GatedHosts { ports, gate }
    }

    /// Waits (at most 60 s) until `f` holds of the gate.
    fn wait_for(&self, what: &str, f: impl Fn(&Gate) -> bool) {
        let (lock, cvar) = &*self.gate;
        let state = lock.lock().unwrap();
        let (state, timeout) = cvar
            .wait_timeout_while(state, Duration::from_secs(60), |g| !f(g))
            .unwrap();
        assert!(
            !timeout.timed_out(),
            "{what}: held {:?}, pending {:?}",
            state.active,
            state.pending
        );
    }

    fn resume(&self) {
        let (lock, cvar) = &*self.gate;
        let mut g = lock.lock().unwrap();
        g.paused = false;
        release_if_full(&mut g);
        cvar.notify_all();
    }
}

/// Releases the held requests once as many are held as the bounds allow.
fn release_if_full(g: &mut Gate) {
    let allowed: usize = g.pending.iter().map(|p| (*p).min(g.per_host)).sum();
    let held: usize = g.active.iter().sum();
    if !g.paused && held > 0 && held >= allowed.min(g.overall) {
        for h in 0..g.active.len() {
            g.pending[h] -= g.active[h];
            g.active[h] = 0;
        }
        g.wave += 1;
    }
}

fn serve_held(conn: std::net::TcpStream, host: usize, gate: &(Mutex<Gate>, std::sync::Condvar)) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
    }
    let (lock, cvar) = gate;
    {
        let mut g = lock.lock().unwrap();
        g.active[host] += 1;
        g.max_active[host] = g.max_active[host].max(g.active[host]);
        let total = g.active.iter().sum();
        g.max_total = g.max_total.max(total);
        let wave = g.wave;
        release_if_full(&mut g);
        cvar.notify_all();
        let _g = cvar.wait_while(g, |g| g.wave == wave).unwrap();
    }
    let mut conn = conn;
    let _ = write!(
        conn,
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        WASM.len()
    );
    let _ = conn.write_all(WASM);
}

/// 1,000 plugins with distinct modules started 1,000 downloads at once (issue 11). Now 200
/// plugins on two hosts (150 and 50) pull at most 6 modules at once, at most 4 from one host:
/// the servers never hold more, they do hold that many (the bounds are used), the metrics show
/// the running and queued pulls, the smaller host is not starved, and every plugin is pulled.
#[test]
fn concurrent_pulls_are_bounded_overall_and_per_host() {
    const OVERALL: usize = 6;
    const PER_HOST: usize = 4;
    const PLUGINS: [usize; 2] = [150, 50];
    let hosts = GatedHosts::start(&PLUGINS, OVERALL, PER_HOST);
    let dir = tempfile::tempdir().unwrap();
    let mut manifests = Vec::new();
    for (host, n) in PLUGINS.iter().enumerate() {
        for i in 0..*n {
            let url = format!("http://127.0.0.1:{}/m/{i}.wasm", hosts.ports[host]);
            manifests.push(plugin(&format!("p{host}-{i}"), &url));
        }
    }
    let plugins = dir.path().join("plugins.yaml");
    std::fs::write(&plugins, manifests.join("---\n")).unwrap();
    let cache = dir.path().join("cache");
    let serve = start(
        dir.path(),
        &[
            "--plugins",
            plugins.to_str().unwrap(),
            "--cache-dir",
            cache.to_str().unwrap(),
            "--max-concurrent-pulls",
            &OVERALL.to_string(),
            "--max-pulls-per-host",
            &PER_HOST.to_string(),
        ],
    );
    // The first wave is held until the test has looked at it.
    hosts.wait_for("the first pulls arrive", |g| {
        g.active.iter().sum::<usize>() == OVERALL
    });
    {
        let g = hosts.gate.0.lock().unwrap();
        // Round robin: the smaller host has its share of the first slots.
        assert!(g.active.iter().all(|a| *a >= 2), "{:?}", g.active);
    }
    let metrics = serve.get("/metrics").1;
    let sample = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {name} in {metrics}"))
    };
    assert_eq!(sample("wasm_ecds_pulls_in_progress "), OVERALL as f64);
    assert_eq!(
        sample("wasm_ecds_pulls_queued "),
        (PLUGINS.iter().sum::<usize>() - OVERALL) as f64
    );
    hosts.resume();
    hosts.wait_for("every module is served", |g| {
        g.pending.iter().all(|p| *p == 0)
    });
    let all = settled_plugins(&serve);
    assert_eq!(all.len(), PLUGINS.iter().sum::<usize>());
    for p in &all {
        assert_eq!(p["outcome"], "pulled", "{p}");
    }
    {
        let g = hosts.gate.0.lock().unwrap();
        assert_eq!(g.max_total, OVERALL, "most requests held at once");
        assert!(
            g.max_active.iter().all(|m| *m <= PER_HOST),
            "{:?}",
            g.max_active
        );
        // Alone at the end, the bigger host has all of its slots.
        assert_eq!(g.max_active[0], PER_HOST, "{:?}", g.max_active);
    }
    let metrics = serve.get("/metrics").1;
    assert!(
        metrics.contains("\nwasm_ecds_pulls_queued 0\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("\nwasm_ecds_pulls_in_progress 0\n"),
        "{metrics}"
    );
    assert_eq!(serve.terminate().0, Some(0));
}
