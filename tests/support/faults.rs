//! Servers and a clock for the fetcher tests over real sockets (`tests/http_faults.rs`):
//! - [`RawServer`]: HTTP/1.1 written by hand on a tokio `TcpListener`, for what a real HTTP server
//!   (or wiremock) never does on purpose: bodies cut off by a reset or an early close, bodies that
//!   stall half-way, and huge bodies generated on the fly while counting what the peer accepted;
//! - [`ModuleServer`]: a small, well-behaved hyper server (keep-alive, redirects);
//! - the wiremock routes of an OCI registry ([`mount_ping`], [`mount_manifest`], [`mount_blob`]);
//! - [`SkipSleepClock`]: real time whose sleeps (the backoffs) return at once.
//!
//! Every server serves on `127.0.0.1` (or the address given) port 0 and stops when dropped.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use wasm_ecds::clock::{Clock, SystemClock, Timestamp};

/// How long a test waits for a server-side event before it fails (a hang, not a measurement).
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(60);
/// A request head larger than this is refused (the fetchers send a few hundred bytes).
const MAX_HEAD: usize = 64 * 1024;
/// Bytes per write of a generated body.
const STREAM_CHUNK: usize = 256 * 1024;

// ---------------------------------------------------------------------------------------------
// Raw server

/// What the [`RawServer`] does with one request. Every response carries `Connection: close` and
/// the connection serves that one request, so requests and connections count alike.
#[derive(Clone, Debug)]
pub enum RawReply {
    /// A complete response with `Content-Length`.
    Full {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// A 200 announcing `announced` bytes that sends only `body`, then ends the connection: with a
    /// TCP reset (`SO_LINGER` 0) when `reset`, else with a plain close (FIN).
    CutOff {
        announced: u64,
        body: Vec<u8>,
        reset: bool,
    },
    /// A 200 announcing `announced` bytes that sends only `body`, then sends nothing more and
    /// keeps the connection open until the client closes it (a stalled transfer).
    Stall { announced: u64, body: Vec<u8> },
    /// A 200 whose body is `prefix` followed by zeros up to `total` bytes, generated while it is
    /// written (never held in memory). With `Content-Length` when `announce`, else chunked, so
    /// that only the bytes tell the client how big it is. Reported through
    /// [`RawServer::stream_report`].
    Stream {
        prefix: Vec<u8>,
        total: u64,
        announce: bool,
    },
}

impl RawReply {
    pub fn ok(body: impl Into<Vec<u8>>) -> Self {
        RawReply::Full {
            status: 200,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    pub fn redirect(status: u16, location: &str) -> Self {
        RawReply::Full {
            status,
            headers: vec![("location".into(), location.into())],
            body: Vec::new(),
        }
    }
}

/// How a generated body ([`RawReply::Stream`]) ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamReport {
    /// Body bytes the kernel accepted from the server (sent, or in the socket buffers).
    pub written: u64,
    /// The whole body was written; `false` when the client closed the connection first.
    pub completed: bool,
}

type RawHandler = dyn Fn(&str, usize) -> RawReply + Send + Sync;

struct RawState {
    connections: AtomicUsize,
    /// Paths of the requests, in arrival order.
    requests: Mutex<Vec<String>>,
    reports: mpsc::UnboundedSender<StreamReport>,
}

/// An HTTP/1.1 server written by hand: `handler(path, n)` answers the `n`-th request (from 0).
pub struct RawServer {
    addr: SocketAddr,
    state: Arc<RawState>,
    reports: tokio::sync::Mutex<mpsc::UnboundedReceiver<StreamReport>>,
    task: JoinHandle<()>,
}

impl RawServer {
    /// Serves on `127.0.0.1`.
    pub async fn start(handler: impl Fn(&str, usize) -> RawReply + Send + Sync + 'static) -> Self {
        Self::start_on(IpAddr::V4(Ipv4Addr::LOCALHOST), handler).await
    }

    /// Serves on `ip` (any `127.x.y.z` works on Linux).
    pub async fn start_on(
        ip: IpAddr,
        handler: impl Fn(&str, usize) -> RawReply + Send + Sync + 'static,
    ) -> Self {
        let listener = TcpListener::bind((ip, 0)).await.expect("bind raw server");
        let addr = listener.local_addr().expect("raw server address");
        let (tx, rx) = mpsc::unbounded_channel();
        let state = Arc::new(RawState {
            connections: AtomicUsize::new(0),
            requests: Mutex::new(Vec::new()),
            reports: tx,
        });
        let handler: Arc<RawHandler> = Arc::new(handler);
        let accept_state = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                accept_state.connections.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve_raw(socket, accept_state.clone(), handler.clone()));
            }
        });
        RawServer {
            addr,
            state,
            reports: tokio::sync::Mutex::new(rx),
            task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Paths of the requests received so far, in order.
    pub fn requests(&self) -> Vec<String> {
        self.state.requests.lock().expect("requests lock").clone()
    }

    /// The report of the next generated body to end; fails the test after [`EVENT_TIMEOUT`].
    pub async fn stream_report(&self) -> StreamReport {
        let mut rx = self.reports.lock().await;
        tokio::time::timeout(EVENT_TIMEOUT, rx.recv())
            .await
            .expect("the generated body neither completed nor was abandoned in time")
            .expect("raw server stopped")
    }
}

impl Drop for RawServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_raw(mut socket: TcpStream, state: Arc<RawState>, handler: Arc<RawHandler>) {
    let Some(path) = read_request_path(&mut socket).await else {
        return;
    };
    let n = {
        let mut requests = state.requests.lock().expect("requests lock");
        requests.push(path.clone());
        requests.len() - 1
    };
    // Write errors mean the client went away: what the fault tests provoke.
    match handler(&path, n) {
        RawReply::Full {
            status,
            headers,
            body,
        } => {
            let mut head = format!(
                "HTTP/1.1 {status} {}\r\ncontent-length: {}\r\nconnection: close\r\n",
                reason_phrase(status),
                body.len()
            );
            for (k, v) in headers {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            head.push_str("\r\n");
            let _ = socket.write_all(head.as_bytes()).await;
            let _ = socket.write_all(&body).await;
            let _ = socket.shutdown().await;
        }
        RawReply::CutOff {
            announced,
            body,
            reset,
        } => {
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {announced}\r\nconnection: close\r\n\r\n"
            );
            let _ = socket.write_all(head.as_bytes()).await;
            let _ = socket.write_all(&body).await;
            let _ = socket.flush().await;
            if reset {
                // Let the head and the partial body reach the client first, so the reset lands
                // while it reads the body (a reset before the head is retried just the same).
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = socket.set_zero_linger();
                drop(socket);
            } else {
                let _ = socket.shutdown().await;
            }
        }
        RawReply::Stall { announced, body } => {
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {announced}\r\nconnection: close\r\n\r\n"
            );
            let _ = socket.write_all(head.as_bytes()).await;
            let _ = socket.write_all(&body).await;
            // The client sends nothing more: the read ends when it closes the connection (a
            // client that never gives up hangs here, and its test fails on its own timeout).
            let mut buf = [0u8; 64];
            let _ = socket.read(&mut buf).await;
        }
        RawReply::Stream {
            prefix,
            total,
            announce,
        } => {
            let report = write_generated(&mut socket, &prefix, total, announce).await;
            let _ = state.reports.send(report);
        }
    }
}

/// Reads the request head and returns its path (`None` when the client left or sent garbage).
async fn read_request_path(socket: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = socket.read(&mut buf).await.ok()?;
        if n == 0 || head.len() + n > MAX_HEAD {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|b| *b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    let (_method, path) = (parts.next()?, parts.next()?);
    Some(path.to_string())
}

/// Writes a 200 with a generated body of `total` bytes; stops at the first write error.
async fn write_generated(
    socket: &mut TcpStream,
    prefix: &[u8],
    total: u64,
    announce: bool,
) -> StreamReport {
    let framing = if announce {
        format!("content-length: {total}")
    } else {
        "transfer-encoding: chunked".to_string()
    };
    let head = format!("HTTP/1.1 200 OK\r\n{framing}\r\nconnection: close\r\n\r\n");
    let mut report = StreamReport {
        written: 0,
        completed: false,
    };
    if socket.write_all(head.as_bytes()).await.is_err() {
        return report;
    }
    let zeros = vec![0u8; STREAM_CHUNK];
    let mut chunk = Vec::with_capacity(STREAM_CHUNK);
    while report.written < total {
        let len = (total - report.written).min(STREAM_CHUNK as u64) as usize;
        chunk.clear();
        let from_prefix = prefix
            .len()
            .saturating_sub(report.written as usize)
            .min(len);
        let start = report.written as usize;
        if from_prefix > 0 {
            chunk.extend_from_slice(&prefix[start..start + from_prefix]);
        }
        chunk.extend_from_slice(&zeros[..len - from_prefix]);
        let ok = if announce {
            socket.write_all(&chunk).await.is_ok()
        } else {
            let size_line = format!("{len:x}\r\n");
            socket.write_all(size_line.as_bytes()).await.is_ok()
                && socket.write_all(&chunk).await.is_ok()
                && socket.write_all(b"\r\n").await.is_ok()
        };
        if !ok {
            return report;
        }
        report.written += len as u64;
    }
    if !announce && socket.write_all(b"0\r\n\r\n").await.is_err() {
        return report;
    }
    report.completed = socket.shutdown().await.is_ok();
    report
}

fn reason_phrase(status: u16) -> &'static str {
    http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Status")
}

// ---------------------------------------------------------------------------------------------
// hyper server

/// What the [`ModuleServer`] serves at one path.
#[derive(Clone, Debug)]
pub enum Route {
    /// 200 with these bytes.
    Body(Vec<u8>),
    /// A redirect (`status`) to `location`.
    Redirect(u16, String),
}

/// A small, well-behaved HTTP/1.1 server (hyper, keep-alive): fixed routes, 404 elsewhere.
pub struct ModuleServer {
    addr: SocketAddr,
    hits: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl ModuleServer {
    pub async fn start(routes: Vec<(&str, Route)>) -> Self {
        let routes: Arc<BTreeMap<String, Route>> = Arc::new(
            routes
                .into_iter()
                .map(|(p, r)| (p.to_string(), r))
                .collect(),
        );
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind module server");
        let addr = listener.local_addr().expect("module server address");
        let hits = Arc::new(Mutex::new(Vec::new()));
        let accept_hits = hits.clone();
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let (routes, hits) = (routes.clone(), accept_hits.clone());
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let path = req.uri().path().to_string();
                    hits.lock().expect("hits lock").push(path.clone());
                    let response = match routes.get(&path) {
                        Some(Route::Body(bytes)) => hyper::Response::builder()
                            .status(200)
                            .body(Full::new(Bytes::from(bytes.clone()))),
                        Some(Route::Redirect(status, location)) => hyper::Response::builder()
                            .status(*status)
                            .header("location", location.as_str())
                            .body(Full::new(Bytes::new())),
                        None => hyper::Response::builder()
                            .status(404)
                            .body(Full::new(Bytes::from_static(b"not found"))),
                    };
                    async move { Ok::<_, Infallible>(response.expect("response")) }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(socket), service)
                        .await;
                });
            }
        });
        ModuleServer { addr, hits, task }
    }

    /// `http://<addr><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Requests received for `path`.
    pub fn hits(&self, path: &str) -> usize {
        self.hits
            .lock()
            .expect("hits lock")
            .iter()
            .filter(|p| *p == path)
            .count()
    }
}

impl Drop for ModuleServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// wiremock: an OCI registry

/// `GET /v2/` answers 200: an anonymous registry.
pub async fn mount_ping(server: &MockServer) {
    Mock::given(method("GET"))
        .and(path("/v2/"))
        .respond_with(ResponseTemplate::new(200).set_body_string("{}"))
        .mount(server)
        .await;
}

/// Serves `manifest` (with its media type and `Docker-Content-Digest`) at
/// `/v2/<repo>/manifests/<reference>`.
pub async fn mount_manifest(
    server: &MockServer,
    repo: &str,
    reference: &str,
    manifest: &[u8],
    media_type: &str,
) {
    let digest = super::image::sha256_digest(manifest);
    Mock::given(method("GET"))
        .and(path(format!("/v2/{repo}/manifests/{reference}")))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_bytes(manifest.to_vec())
                .insert_header("content-type", media_type)
                .insert_header("docker-content-digest", digest.as_str()),
        )
        .mount(server)
        .await;
}

/// Serves `bytes` at `/v2/<repo>/blobs/<digest>` (`digest` is `sha256:<hex>`; the bytes need not
/// match it).
pub async fn mount_blob(server: &MockServer, repo: &str, digest: &str, bytes: &[u8]) {
    Mock::given(method("GET"))
        .and(path(format!("/v2/{repo}/blobs/{digest}")))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_bytes(bytes.to_vec())
                .insert_header("content-type", "application/octet-stream"),
        )
        .mount(server)
        .await;
}

/// Requests the mock server received for the path `only` (all of them when `None`).
pub async fn received(server: &MockServer, only: Option<&str>) -> usize {
    server
        .received_requests()
        .await
        .expect("wiremock records requests")
        .iter()
        .filter(|r| only.is_none_or(|p| r.url.path() == p))
        .count()
}

// ---------------------------------------------------------------------------------------------
// Clock

/// Real time, except that `sleep` returns at once and moves `now()` forward by the time it
/// skipped. The backoffs between attempts then cost no wall-clock time and the pull deadline still
/// counts them, while sockets and each attempt's timeout (the transport's, on tokio's clock) stay
/// real. tokio's paused time cannot do this: with real sockets it auto-advances to the transport's
/// deadline whenever the runtime waits for the network, so every attempt would time out.
#[derive(Debug, Default)]
pub struct SkipSleepClock {
    skipped: Mutex<Vec<Duration>>,
}

impl SkipSleepClock {
    /// The sleeps skipped so far, in order.
    pub fn skipped(&self) -> Vec<Duration> {
        self.skipped.lock().expect("clock lock").clone()
    }
}

#[async_trait]
impl Clock for SkipSleepClock {
    fn now(&self) -> Timestamp {
        let skipped: Duration = self.skipped().iter().sum();
        SystemClock.now() + skipped
    }

    async fn sleep(&self, d: Duration) {
        self.skipped.lock().expect("clock lock").push(d);
        tokio::task::yield_now().await;
    }
}
