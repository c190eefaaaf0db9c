//! Our own ports under hostile input (docs/security.md), against a real `wasm-ecds serve`
//! process: the admin token, the module endpoint's exact paths and bounded memory with many slow
//! readers, accept errors at the open-files limit, half-sent requests.

mod support;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use serde_json::json;
use sha2::Digest as _;
use support::serve::{Process, ServeCommand};
use support::wasm_module;

/// Starts `serve` on free loopback ports with `args`; `nofile` sets both open-files limits.
fn start(cache: &Path, args: &[&str], nofile: Option<u64>) -> Process {
    let cmd = ServeCommand::new().cache_dir(cache).args(args);
    match nofile {
        Some(n) => cmd.nofile(n),
        None => cmd,
    }
    .start()
}

/// The admin port as these tests use it: any method, an optional bearer token.
trait Admin {
    /// `method path` with an optional bearer token: status and body.
    fn request(&self, method: &str, path: &str, token: Option<&str>) -> (u16, Vec<u8>);
    /// Waits until `path` answers 200.
    fn wait_ok(&self, path: &str, token: Option<&str>);
}

impl Admin for Process {
    fn request(&self, method: &str, path: &str, token: Option<&str>) -> (u16, Vec<u8>) {
        request(self.admin, method, path, token).expect("admin request")
    }

    fn wait_ok(&self, path: &str, token: Option<&str>) {
        for _ in 0..600 {
            if matches!(request(self.admin, "GET", path, token), Ok((200, _))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("{path} never answered 200");
    }
}

fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no response head"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(head.clone()))?;
    let mut body = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Ok((status, body))
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&raw[..line_end]).unwrap(), 16).unwrap();
        raw = &raw[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

/// A plugin file serving the module at `module` (a `file://` module).
fn write_plugin(dir: &Path, name: &str, module: &Path) {
    let plugin = json!({
        "apiVersion": "extensions.istio.io/v1alpha1",
        "kind": "WasmPlugin",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"url": format!("file://{}", module.display())},
    });
    std::fs::write(dir.join(format!("{name}.yaml")), plugin.to_string()).unwrap();
}

/// The value of `series` in `/metrics` text.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn admin_token_guards_refresh_debug_and_modules_and_is_reread_on_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let (plugins, cache) = (dir.path().join("plugins"), dir.path().join("cache"));
    std::fs::create_dir_all(&plugins).unwrap();
    let module = dir.path().join("m.wasm");
    let bytes = wasm_module("token");
    std::fs::write(&module, &bytes).unwrap();
    write_plugin(&plugins, "p", &module);
    let token = dir.path().join("token");
    std::fs::write(&token, "first-token\n").unwrap();
    let serve = start(
        &cache,
        &[
            "--delivery=http",
            "--plugins",
            plugins.to_str().unwrap(),
            "--admin-token-file",
            token.to_str().unwrap(),
        ],
        None,
    );
    // Open endpoints need nothing.
    serve.wait_ok("/readyz", None);
    assert_eq!(serve.request("GET", "/healthz", None).0, 200);
    assert_eq!(serve.request("GET", "/metrics", None).0, 200);
    let module_path = format!(
        "/modules/{}.wasm",
        hex::encode(sha2::Sha256::digest(&bytes))
    );
    for (method, path) in [
        ("GET", "/debug/plugins"),
        ("GET", "/debug/cache"),
        ("POST", "/refresh?plugin=default/p"),
        ("GET", module_path.as_str()),
    ] {
        assert_eq!(serve.request(method, path, None).0, 401, "{path}");
        assert_eq!(serve.request(method, path, Some("wrong")).0, 401, "{path}");
        assert_eq!(
            serve.request(method, path, Some("first-token")).0,
            200,
            "{path}"
        );
    }
    let (_, body) = serve.request("GET", &module_path, Some("first-token"));
    assert_eq!(body, bytes);
    drop(serve);
    // `--admin-open=modules`: modules fetched without credentials go to anyone (an Envoy without
    // a client certificate), the debug pages still need the token.
    let serve = start(
        &cache,
        &[
            "--delivery=http",
            "--plugins",
            plugins.to_str().unwrap(),
            "--admin-token-file",
            token.to_str().unwrap(),
            "--admin-open=healthz,modules",
        ],
        None,
    );
    serve.wait_ok("/healthz", None);
    for _ in 0..600 {
        if serve.request("GET", &module_path, None).0 == 200 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(serve.request("GET", &module_path, None).1, bytes);
    assert_eq!(serve.request("GET", "/debug/plugins", None).0, 401);
    // A rotated Secret: the new token works at once, the old one no longer.
    std::fs::write(&token, "second-token\n").unwrap();
    assert_eq!(
        serve
            .request("GET", "/debug/plugins", Some("first-token"))
            .0,
        401
    );
    assert_eq!(
        serve
            .request("GET", "/debug/plugins", Some("second-token"))
            .0,
        200
    );
}

#[test]
fn admin_open_endpoints_can_be_closed_too() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t").unwrap();
    let serve = start(
        &dir.path().join("cache"),
        &[
            "--admin-token-file",
            token.to_str().unwrap(),
            "--admin-open=healthz",
        ],
        None,
    );
    serve.wait_ok("/healthz", None);
    assert_eq!(serve.request("GET", "/metrics", None).0, 401);
    assert_eq!(serve.request("GET", "/readyz", None).0, 401);
    assert_eq!(serve.request("GET", "/metrics", Some("t")).0, 200);
}

/// 20 readers of a 64 MiB module that read a little and then stall: the server holds a few
/// chunks per connection, not the module (it read each whole before: 20 × 64 MiB).
#[test]
fn module_endpoint_streams_exact_paths_with_bounded_memory() {
    const SIZE: usize = 64 << 20;
    const READERS: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let (plugins, cache) = (dir.path().join("plugins"), dir.path().join("cache"));
    std::fs::create_dir_all(&plugins).unwrap();
    let module = dir.path().join("big.wasm");
    let bytes = wasm_module(&"x".repeat(SIZE));
    std::fs::write(&module, &bytes).unwrap();
    let sha = hex::encode(sha2::Sha256::digest(&bytes));
    drop(bytes);
    write_plugin(&plugins, "big", &module);
    let serve = start(
        &cache,
        &["--delivery=http", "--plugins", plugins.to_str().unwrap()],
        None,
    );
    serve.wait_ok("/readyz", None);
    // Only /modules/<64 lowercase hex>.wasm names a module.
    for bad in [
        format!("/modules/{sha}.wasm.wasm"),
        format!("/modules/{sha}"),
        format!("/modules/{}.wasm", sha.to_uppercase()),
    ] {
        assert_eq!(serve.request("GET", &bad, None).0, 404, "{bad}");
    }
    let path = format!("/modules/{sha}.wasm");
    let mut readers = Vec::new();
    for _ in 0..READERS {
        let mut s = TcpStream::connect(serve.admin).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut first = [0u8; 4096];
        let n = s.read(&mut first).unwrap();
        assert!(
            String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&first[..n])
        );
        readers.push(s);
    }
    // Give the server every chance to fill what it buffers for the stalled readers.
    std::thread::sleep(Duration::from_secs(2));
    let rss = serve.rss_kib() * 1024;
    assert!(
        rss < 3 * SIZE as u64,
        "server RSS {} MiB with {READERS} stalled readers of a {} MiB module",
        rss >> 20,
        SIZE >> 20
    );
    drop(readers);
    // A reader that reads everything gets the module's exact bytes.
    let (status, body) = serve.request("GET", &path, None);
    assert_eq!(status, 200);
    assert_eq!(hex::encode(sha2::Sha256::digest(&body)), sha);
}

/// At the open-files limit, accept errors pause the loop instead of spinning: stderr stays
/// small, the errors are counted, and the port serves again once the flood is gone.
#[test]
fn accept_errors_at_the_open_files_limit_back_off_and_recover() {
    let dir = tempfile::tempdir().unwrap();
    let serve = start(&dir.path().join("cache"), &[], Some(64));
    serve.wait_ok("/healthz", None);
    let before = serve.stderr.lock().unwrap().len();
    // Far more connections than the process may have files: the kernel completes them, the
    // server's accepts fail with EMFILE.
    let flood: Vec<TcpStream> = (0..150)
        .filter_map(|_| TcpStream::connect_timeout(&serve.admin, Duration::from_secs(5)).ok())
        .collect();
    assert!(flood.len() > 64, "the flood did not connect");
    std::thread::sleep(Duration::from_secs(3));
    drop(flood);
    serve.wait_ok("/healthz", None);
    let lines = serve.stderr.lock().unwrap().len() - before;
    // One warning per second at most (it spun and logged every retry before: millions of lines).
    assert!(
        lines < 30,
        "{lines} stderr lines: {:?}",
        serve.stderr.lock().unwrap()
    );
    let (_, metrics) = serve.request("GET", "/metrics", None);
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metric(&metrics, r#"wasm_ecds_accept_errors_total{port="admin"}"#) > 0.0,
        "{metrics}"
    );
    assert!(serve
        .stderr
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("accept failed; pausing")));
}

/// Half-sent requests and silent connections are closed by the server (header timeout, idle
/// timeout), not held open.
#[test]
fn half_sent_requests_and_silent_connections_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let serve = start(
        &dir.path().join("cache"),
        &["--admin-header-timeout=1s", "--admin-idle-timeout=2s"],
        None,
    );
    serve.wait_ok("/healthz", None);
    let mut conns = Vec::new();
    for i in 0..200 {
        let mut s = TcpStream::connect(serve.admin).unwrap();
        if i % 2 == 0 {
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .unwrap();
        }
        conns.push(s);
    }
    for mut s in conns {
        // A safety net against a hang, not a measure of speed.
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let mut rest = Vec::new();
        match s.read_to_end(&mut rest) {
            Ok(_) => {}
            Err(e) => assert!(
                !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "connection still open: {e}"
            ),
        }
        assert!(
            !String::from_utf8_lossy(&rest).contains("200 OK"),
            "a half-sent request was answered"
        );
    }
    assert_eq!(serve.request("GET", "/healthz", None).0, 200);
}
