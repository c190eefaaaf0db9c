//! Load tool: fan-out of one ECDS update to many concurrent streams, against a bare tonic stream
//! server on the same payload, measured in the same run.
//!
//! ```text
//! cargo run --release --example xds_load -- [STREAMS] [CONNECTIONS] [PAYLOAD_BYTES] [ROUNDS] [UPDATES]
//! ```
//!
//! Every run starts a server in a child process (this same binary with `--server`), so that the
//! server's CPU time (`/proc/<pid>/stat`) and resident memory (`/proc/<pid>/status`) are read
//! apart from the clients'. Two servers take turns, ROUNDS times each (default 3), the order
//! alternating between rounds:
//! - `wasm-ecds`: the xDS server of this crate ([`wasm_ecds::xds::serve`]) over a
//!   [`ResourceStore`];
//! - `bare`: a tonic `ExtensionConfigDiscoveryService` of the same tonic version that keeps no
//!   state per stream: it answers each stream's first request with the current
//!   `DiscoveryResponse` and pushes every update to every stream, ignoring ACKs.
//!
//! Each run opens STREAMS SotW ECDS streams (default 1000) over CONNECTIONS HTTP/2 connections
//! (default 50) with the same client, each subscribing to one resource and ACKing it; then the
//! resource is updated once, and the run measures the time and the server CPU until every stream
//! has received the update and sent its ACK, and the server's RSS per open stream. With UPDATES
//! (default 1) above one, the update is repeated that many times in a row (each once every stream
//! ACKed the previous one) and the fan-out figures are per update: the CPU clock of
//! `/proc/<pid>/stat` ticks every 10 ms, and a longer measure also makes a longer profile. The
//! resource
//! is a `TypedExtensionConfig` whose config is PAYLOAD_BYTES long (default: a few bytes).
//!
//! With PAYLOAD_BYTES of 64 KiB or more (an inline module), every run is followed by the same run
//! with a tiny payload, and the tool prints the RSS the server holds once every stream ACKed the
//! update beyond what the tiny-payload run holds, in module sizes ("copies"): what the server
//! keeps of the module however many streams it sent it to.
//!
//! The summary gives, per measure, the median and the minimum over the rounds and the ratio of
//! `wasm-ecds` to `bare` (medians). Timings are noisy on a shared machine: compare ratios, not
//! absolute figures. Only loopback is used; every wait is bounded.
//!
//! Two environment variables change what the server children do (both kinds alike):
//! - `XDS_LOAD_ALLOCS=1`: the server counts its heap allocations (a counting global allocator,
//!   idle otherwise), and the tool prints the allocations per stream and update of the fan-out
//!   (`allocs_per_push`: the push, its ACK and everything the server does for them).
//! - `XDS_LOAD_LOG=<filter>` (e.g. `info`): the server logs as `wasm-ecds serve` does, through a
//!   `tracing` subscriber with that filter, to stderr; without it, nothing is subscribed.

#![allow(clippy::disallowed_methods)] // a measuring tool

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::extension::v3::extension_config_discovery_service_server::{
    ExtensionConfigDiscoveryService, ExtensionConfigDiscoveryServiceServer,
};
use envoy_types::pb::google::protobuf::Any;
use prost::Message as _;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};
use wasm_ecds::xds::client::{self, SotwSession};
use wasm_ecds::xds::{Api, ResourceStore, ECDS_TYPE_URL, MAX_MESSAGE_SIZE};

#[path = "support/procfs.rs"]
mod procfs;

/// Counts heap allocations (and reallocations) while [`COUNTING`] is set (`XDS_LOAD_ALLOCS`).
struct Counting;

static COUNTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static ALLOCS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn count_alloc() {
    if COUNTING.load(std::sync::atomic::Ordering::Relaxed) {
        ALLOCS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded to the system allocator unchanged.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        count_alloc();
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        count_alloc();
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        count_alloc();
        unsafe { std::alloc::System.realloc(ptr, layout, new) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn counting_allocs() -> bool {
    std::env::var_os("XDS_LOAD_ALLOCS").is_some_and(|v| v == "1")
}

const NAME: &str = "extensions.istio.io/wasmplugin/default.load";
const WAIT: Duration = Duration::from_secs(300);
/// From this payload size on, runs are compared with tiny-payload runs ("copies").
const LARGE: usize = 64 * 1024;

/// The resource at update `n`: its config is `payload` bytes long (at least its tag).
fn config(n: usize, payload: usize) -> TypedExtensionConfig {
    let mut value = format!("v{n}").into_bytes();
    value.resize(value.len().max(payload), b'x');
    TypedExtensionConfig {
        name: NAME.into(),
        typed_config: Some(Any {
            type_url: "type.googleapis.com/google.protobuf.StringValue".into(),
            value,
        }),
    }
}

// ----- server child -----

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    WasmEcds,
    Bare,
}

impl Kind {
    fn arg(self) -> &'static str {
        match self {
            Kind::WasmEcds => "wasm-ecds",
            Kind::Bare => "bare",
        }
    }
}

/// The bare server: no per-stream state beyond its task, no versions, no nonces of its own.
#[derive(Clone)]
struct Bare {
    current: watch::Receiver<Arc<DiscoveryResponse>>,
}

fn bare_response(n: usize, payload: usize) -> DiscoveryResponse {
    DiscoveryResponse {
        version_info: format!("v{n}"),
        resources: vec![Any {
            type_url: ECDS_TYPE_URL.into(),
            value: config(n, payload).encode_to_vec(),
        }],
        type_url: ECDS_TYPE_URL.into(),
        nonce: format!("{n}"),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl ExtensionConfigDiscoveryService for Bare {
    type StreamExtensionConfigsStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaExtensionConfigsStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_extension_configs(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamExtensionConfigsStream>, Status> {
        let mut requests = request.into_inner();
        let mut current = self.current.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            if !matches!(requests.message().await, Ok(Some(_))) {
                return;
            }
            let first = current.borrow_and_update().as_ref().clone();
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    r = requests.message() => if !matches!(r, Ok(Some(_))) { return },
                    c = current.changed() => {
                        if c.is_err() {
                            return;
                        }
                        let next = current.borrow_and_update().as_ref().clone();
                        if tx.send(Ok(next)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_extension_configs(
        &self,
        _: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaExtensionConfigsStream>, Status> {
        Err(Status::unimplemented("bare server: SotW only"))
    }

    async fn fetch_extension_configs(
        &self,
        _: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        Err(Status::unimplemented("bare server: streams only"))
    }
}

/// Child mode: serve on a loopback port, print it, then apply one update per `update` line of
/// stdin and print the allocation count for each `count` line; exit when stdin closes.
async fn server(kind: Kind, payload: usize) {
    COUNTING.store(counting_allocs(), std::sync::atomic::Ordering::Relaxed);
    if let Ok(filter) = std::env::var("XDS_LOAD_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .init();
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    println!("{}", listener.local_addr().expect("addr"));
    let update: Box<dyn Fn(usize) + Send> = match kind {
        Kind::WasmEcds => {
            let store = ResourceStore::new();
            store.set(NAME, config(0, payload));
            let s = store.clone();
            tokio::spawn(wasm_ecds::xds::serve(
                listener,
                store,
                std::future::pending(),
            ));
            Box::new(move |n| {
                s.set(NAME, config(n, payload));
            })
        }
        Kind::Bare => {
            let (tx, rx) = watch::channel(Arc::new(bare_response(0, payload)));
            let service = ExtensionConfigDiscoveryServiceServer::new(Bare { current: rx })
                .max_encoding_message_size(MAX_MESSAGE_SIZE);
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming(TcpListenerStream::new(listener)),
            );
            Box::new(move |n| {
                tx.send_replace(Arc::new(bare_response(n, payload)));
            })
        }
    };
    tokio::task::spawn_blocking(move || {
        let mut n = 0;
        for line in std::io::stdin().lines() {
            match line.as_deref() {
                Ok("count") => {
                    println!("{}", ALLOCS.load(std::sync::atomic::Ordering::Relaxed));
                }
                Ok(_) => {
                    n += 1;
                    update(n);
                }
                Err(_) => break,
            }
        }
        std::process::exit(0);
    })
    .await
    .expect("stdin reader");
}

// ----- measuring parent -----

struct Server {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<std::process::ChildStdout>,
    addr: std::net::SocketAddr,
}

impl Server {
    fn start(kind: Kind, payload: usize) -> Server {
        let mut child = Command::new(std::env::current_exe().expect("exe"))
            .args(["--server", kind.arg(), &payload.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn server");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("server address");
        let addr = line.trim().parse().expect("address");
        let stdin = child.stdin.take().expect("stdin");
        // For a profiler run over the whole tool (`perf report --pid`).
        eprintln!("{} server pid {}", kind.arg(), child.id());
        Server {
            child,
            stdin,
            stdout: out,
            addr,
        }
    }

    /// The server's allocations so far (0 unless `XDS_LOAD_ALLOCS=1`).
    fn allocs(&mut self) -> u64 {
        writeln!(self.stdin, "count").expect("count");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("allocation count");
        line.trim().parse().expect("a count")
    }

    fn rss_kib(&self) -> u64 {
        procfs::status_kib(self.child.id(), "VmRSS")
    }

    /// CPU time used so far (user + system, all threads), in ms.
    fn cpu_ms(&self) -> u64 {
        procfs::process_cpu(self.child.id()).as_millis() as u64
    }

    fn stop(mut self) {
        drop(self.stdin);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one run measured.
#[derive(Clone, Copy, Debug, Default)]
struct Run {
    open_ms: f64,
    open_cpu_ms: f64,
    fanout_ms: f64,
    fanout_cpu_ms: f64,
    /// Server RSS growth per open stream, after every stream ACKed its first response.
    rss_per_stream_kib: f64,
    /// Server RSS growth since before the streams opened, after every stream ACKed the update.
    held_kib: f64,
    /// Server heap allocations per stream and update during the fan-out (`XDS_LOAD_ALLOCS`).
    allocs_per_push: f64,
}

async fn run(
    kind: Kind,
    streams: usize,
    connections: usize,
    payload: usize,
    updates: usize,
) -> Run {
    let mut server = Server::start(kind, payload);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_idle = server.rss_kib();
    let mut channels = Vec::new();
    for _ in 0..connections {
        channels.push(client::connect(server.addr).await.expect("connect"));
    }
    let names = vec![NAME.to_string()];
    let (ready_tx, mut ready_rx) = mpsc::channel::<()>(streams);
    let (done_tx, mut done_rx) = mpsc::channel::<()>(streams);
    let (stop_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let cpu_start = server.cpu_ms();
    let opened = Instant::now();
    for i in 0..streams {
        let channel = channels[i % connections].clone();
        let (ready, done, names) = (ready_tx.clone(), done_tx.clone(), names.clone());
        let mut stop = stop_tx.subscribe();
        tokio::spawn(async move {
            let mut s = SotwSession::open(
                channel,
                Api::Ecds,
                client::sotw_subscribe(&format!("load-{i}"), &names),
            )
            .await
            .expect("open stream");
            let first = s.recv().await.expect("rpc").expect("first response");
            s.send(client::sotw_ack(&names, &first)).await.expect("ack");
            drop(first);
            ready.send(()).await.expect("report");
            for _ in 0..updates {
                let update = s.recv().await.expect("rpc").expect("update");
                s.send(client::sotw_ack(&names, &update))
                    .await
                    .expect("ack");
                drop(update);
                done.send(()).await.expect("report");
            }
            // Keep the stream open until the run ends.
            let _ = stop.recv().await;
        });
    }
    wait_all(&mut ready_rx, streams).await;
    let open_ms = opened.elapsed().as_secs_f64() * 1e3;
    let open_cpu_ms = (server.cpu_ms() - cpu_start) as f64;
    // Let the last ACKs be handled before reading the memory.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_open = server.rss_kib();

    let allocs_before = server.allocs();
    let cpu_before = server.cpu_ms();
    let start = Instant::now();
    for _ in 0..updates {
        writeln!(server.stdin, "update").expect("update");
        wait_all(&mut done_rx, streams).await;
    }
    let fanout_ms = start.elapsed().as_secs_f64() * 1e3 / updates as f64;
    let fanout_cpu_ms = (server.cpu_ms() - cpu_before) as f64 / updates as f64;
    // The last ACKs may still be in the server: counted once they are handled.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let allocs_per_push =
        server.allocs().saturating_sub(allocs_before) as f64 / (streams * updates) as f64;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_acked = server.rss_kib();
    let _ = stop_tx.send(());
    drop(channels);
    server.stop();
    Run {
        open_ms,
        open_cpu_ms,
        fanout_ms,
        fanout_cpu_ms,
        rss_per_stream_kib: rss_open.saturating_sub(rss_idle) as f64 / streams as f64,
        held_kib: rss_acked.saturating_sub(rss_idle) as f64,
        allocs_per_push,
    }
}

/// Waits for `streams` reports on `rx`.
async fn wait_all(rx: &mut mpsc::Receiver<()>, streams: usize) {
    tokio::time::timeout(WAIT, async {
        for _ in 0..streams {
            rx.recv().await.expect("stream failed");
        }
    })
    .await
    .expect("every stream in time");
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--server") {
        let kind = match args.get(2).map(String::as_str) {
            Some("bare") => Kind::Bare,
            _ => Kind::WasmEcds,
        };
        let payload = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(0);
        return server(kind, payload).await;
    }
    let arg =
        |i: usize, default: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let streams = arg(1, 1000).max(1);
    let connections = arg(2, 50).max(1);
    let payload = arg(3, 0);
    let rounds = arg(4, 3).max(1);
    let updates = arg(5, 1).max(1);
    let large = payload >= LARGE;
    println!(
        "streams={streams} connections={connections} payload={payload}B rounds={rounds} updates={updates} cores={}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut runs: Vec<(Kind, Run, Option<Run>)> = Vec::new();
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [Kind::WasmEcds, Kind::Bare]
        } else {
            [Kind::Bare, Kind::WasmEcds]
        };
        for kind in order {
            let r = run(kind, streams, connections, payload, updates).await;
            let tiny = if large {
                Some(run(kind, streams, connections, 0, updates).await)
            } else {
                None
            };
            println!(
                "round {round} {:>9}: open_all={:.0}ms open_cpu={:.0}ms update_to_all_acked={:.1}ms fanout_cpu={:.0}ms allocs_per_push={:.1} rss_per_stream={:.1}KiB held_after_ack={:.0}KiB{}",
                kind.arg(),
                r.open_ms,
                r.open_cpu_ms,
                r.fanout_ms,
                r.fanout_cpu_ms,
                r.allocs_per_push,
                r.rss_per_stream_kib,
                r.held_kib,
                tiny.map(|t| format!(
                    " tiny_held_after_ack={:.0}KiB copies={:.2}",
                    t.held_kib,
                    (r.held_kib - t.held_kib) * 1024.0 / payload as f64
                ))
                .unwrap_or_default()
            );
            runs.push((kind, r, tiny));
        }
    }
    type Measure = (&'static str, fn(&Run, Option<&Run>, usize) -> f64);
    let measures: [Measure; 6] = [
        ("fanout_cpu_ms", |r, _, _| r.fanout_cpu_ms),
        ("allocs_per_push", |r, _, _| r.allocs_per_push),
        ("update_to_all_acked_ms", |r, _, _| r.fanout_ms),
        ("open_cpu_ms", |r, _, _| r.open_cpu_ms),
        ("rss_per_stream_kib", |r, _, _| r.rss_per_stream_kib),
        ("copies_held_after_ack", |r, t, payload| {
            t.map_or(f64::NAN, |t| {
                (r.held_kib - t.held_kib) * 1024.0 / payload as f64
            })
        }),
    ];
    println!(
        "summary (median / min over {rounds} rounds; ratio = wasm-ecds median / bare median):"
    );
    for (name, f) in measures {
        if (name.starts_with("copies") && !large)
            || (name == "allocs_per_push" && !counting_allocs())
        {
            continue;
        }
        let of = |kind: Kind| -> Vec<f64> {
            runs.iter()
                .filter(|(k, ..)| *k == kind)
                .map(|(_, r, t)| f(r, t.as_ref(), payload))
                .collect()
        };
        let (ours, bare) = (of(Kind::WasmEcds), of(Kind::Bare));
        println!(
            "  {name:<24} wasm-ecds {:>9.2} / {:>9.2}   bare {:>9.2} / {:>9.2}   ratio {:.2}",
            median(ours.clone()),
            min(&ours),
            median(bare.clone()),
            min(&bare),
            median(ours) / median(bare)
        );
    }
}
