//! What the load examples share (each includes it with `#[path = "support/serve.rs"] mod serve;`):
//! a `wasm-ecds serve` child process on free loopback ports, its log read as it comes (so it never
//! blocks on a full pipe), and `/readyz` waited for.

#![allow(dead_code)] // each example uses part of it

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The longest any wait of the examples lasts.
pub const WAIT: Duration = Duration::from_secs(900);

pub struct Serve {
    pub child: Child,
    lines: mpsc::Receiver<(Instant, String)>,
    /// Lines read so far.
    seen: Vec<(Instant, String)>,
    pub xds: SocketAddr,
    pub admin: SocketAddr,
}

impl Serve {
    /// `BIN serve --plugins PLUGINS --cache-dir CACHE EXTRA…` on free loopback ports; returns once
    /// it says where it listens.
    pub fn start(bin: &Path, plugins: &Path, cache: &Path, extra: &[&str]) -> Serve {
        Serve::start_env(bin, plugins, cache, extra, &[])
    }

    /// [`Serve::start`] with `env` added to the child's environment (e.g. `RUST_LOG`).
    pub fn start_env(
        bin: &Path,
        plugins: &Path,
        cache: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Serve {
        let mut child = Command::new(bin)
            .arg("serve")
            .arg("--plugins")
            .arg(plugins)
            .arg("--cache-dir")
            .arg(cache)
            .args([
                "--xds-address",
                "127.0.0.1:0",
                "--admin-address",
                "127.0.0.1:0",
            ])
            .args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn wasm-ecds serve");
        let stderr = BufReader::new(child.stderr.take().expect("stderr"));
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let _ = tx.send((Instant::now(), line));
            }
        });
        let unset: SocketAddr = "0.0.0.0:0".parse().expect("address");
        let mut serve = Serve {
            child,
            lines,
            seen: Vec::new(),
            xds: unset,
            admin: unset,
        };
        let line = serve.wait_line("xds on").1;
        let addrs: Vec<SocketAddr> = (line.split([' ', ',']))
            .filter_map(|w| w.parse().ok())
            .collect();
        (serve.xds, serve.admin) = (addrs[0], addrs[1]);
        serve
    }

    /// The first log line containing `needle` (already read, or the next one).
    pub fn wait_line(&mut self, needle: &str) -> (Instant, String) {
        if let Some(found) = self.seen.iter().find(|(_, l)| l.contains(needle)) {
            return found.clone();
        }
        loop {
            let (at, line) = (self.lines.recv_timeout(WAIT)).expect("serve's log");
            self.seen.push((at, line.clone()));
            if line.contains(needle) {
                return (at, line);
            }
        }
    }

    /// SIGTERM, and waits for it to exit.
    pub fn stop(mut self) {
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `/readyz` on `admin` answers 200; returns when it did.
pub fn wait_ready(admin: SocketAddr) -> Instant {
    let start = Instant::now();
    while http_status(admin, "/readyz") != Some(200) {
        assert!(start.elapsed() < WAIT, "serve never got ready");
        std::thread::sleep(Duration::from_millis(2));
    }
    Instant::now()
}

/// `GET path` on `addr`; the status code.
pub fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}
