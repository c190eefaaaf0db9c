//! Load tool: what `wasm-ecds proxy` adds to non-ECDS responses, and what a proxied stream costs.
//!
//! ```text
//! cargo run --release --example proxy_load -- [STREAMS] [CONNECTIONS] [ROUNDS] [PERIOD_MS] [REPEATS]
//! ```
//!
//! Three processes of this same binary: the clients (this one), a bare upstream ADS server
//! (`--upstream`: for each LDS request naming listeners it answers at once with those listeners,
//! version and nonce being the name asked for) and the proxy (`--proxy ADDR`: `serve::start` in
//! proxy mode towards the upstream, as `wasm-ecds proxy --upstream ADDR` runs it), so each one's
//! resident memory is read from `/proc/<pid>/status` apart from the others'.
//!
//! STREAMS ADS streams (default 1000) over CONNECTIONS HTTP/2 connections (default 50) are opened
//! directly to the upstream, and as many through the proxy (each with its own upstream stream).
//! Each request ACKs the previous response and subscribes to a fresh listener name, so the
//! upstream answers every request; the response must carry that name. A phase makes every stream
//! of one set do ROUNDS round trips (default 10), one every PERIOD_MS (default 1000; the streams
//! are staggered evenly over the period, so the offered load is STREAMS / PERIOD round trips per
//! second; 0 sends back to back). Direct and proxied phases alternate REPEATS times (default 3)
//! so machine noise hits both; the summary gives min / median over the repeats, and the
//! differences and ratios are taken per repeat (proxied phase minus the direct phase before it).
//! Each phase also gives the CPU time each child used per round trip (`/proc/<pid>/stat`), which
//! other load on the machine moves less than latency, and the proxy's RSS is read idle, with the
//! streams open (one response through) and after all phases.
//! Only loopback is used; every wait is bounded. Figures, not thresholds.

#![allow(clippy::disallowed_methods)] // a measuring tool

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use tokio::task::JoinSet;
use tokio::time::timeout;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use wasm_ecds::xds::client::{self, SotwSession};
use wasm_ecds::xds::Api;

#[path = "support/procfs.rs"]
mod procfs;

const LDS_TYPE_URL: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// Bound of one response, and of opening all streams.
const WAIT: Duration = Duration::from_secs(60);
/// Time for memory to settle before RSS is read.
const SETTLE: Duration = Duration::from_millis(500);

// ---------------------------------------------------------------------------------------------
// Child processes.

/// The upstream: a bare ADS server answering LDS requests that name listeners.
struct Upstream;

type Responses = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
type DeltaResponses = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

/// The answer to one request: the listeners it names, with the name as version and nonce (an ACK
/// naming nothing new would get no answer, but every request of this tool names a fresh one).
fn answer(request: DiscoveryRequest) -> Option<DiscoveryResponse> {
    if request.type_url != LDS_TYPE_URL || request.resource_names.is_empty() {
        return None;
    }
    let marker = request.resource_names.join(",");
    let resources = (request.resource_names.into_iter())
        .map(|name| Any {
            type_url: LDS_TYPE_URL.into(),
            value: Listener {
                name,
                ..Default::default()
            }
            .encode_to_vec(),
        })
        .collect();
    Some(DiscoveryResponse {
        version_info: marker.clone(),
        resources,
        type_url: LDS_TYPE_URL.into(),
        nonce: marker,
        ..Default::default()
    })
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Upstream {
    type StreamAggregatedResourcesStream = Responses;
    type DeltaAggregatedResourcesStream = DeltaResponses;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Responses>, Status> {
        let responses = (request.into_inner()).filter_map(|r| match r {
            Ok(r) => answer(r).map(Ok),
            Err(e) => Some(Err(e)),
        });
        Ok(Response::new(Box::pin(responses)))
    }

    async fn delta_aggregated_resources(
        &self,
        _: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaResponses>, Status> {
        Err(Status::unimplemented("SotW only"))
    }
}

/// Exits (removing `cleanup`, if any) when the parent closes our stdin.
fn exit_with_parent(cleanup: Option<std::path::PathBuf>) {
    std::thread::spawn(move || {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        if let Some(dir) = cleanup {
            let _ = std::fs::remove_dir_all(dir);
        }
        std::process::exit(0);
    });
}

async fn upstream_main() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    println!("{}", listener.local_addr().expect("addr"));
    exit_with_parent(None);
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(AggregatedDiscoveryServiceServer::new(Upstream))
        .serve_with_incoming(incoming)
        .await
        .expect("upstream server");
}

/// The proxy, started as `wasm-ecds proxy --upstream ADDR` starts it.
async fn proxy_main(upstream: String) {
    use wasm_ecds::config::Config;
    use wasm_ecds::serve::{self, ServeSetup};
    let cache = tempfile::tempdir().expect("cache dir").keep();
    let config = Config {
        cache_dir: cache.clone(),
        ..Config::default()
    };
    let transport = Arc::new(
        wasm_ecds::fetch::hyper_transport::HyperTransport::new(&config, Vec::new())
            .expect("transport"),
    );
    let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
    let handle = serve::start(ServeSetup {
        config,
        plugin_paths: Vec::new(),
        xds_listener: bind().await.expect("bind"),
        admin_listener: bind().await.expect("bind"),
        transport,
        fetch_config: None,
        kube: None,
        proxy: Some(wasm_ecds::proxy::UpstreamOptions {
            address: upstream,
            ..Default::default()
        }),
    })
    .await
    .expect("start the proxy");
    println!("{}", handle.xds_address);
    exit_with_parent(Some(cache));
    std::future::pending::<()>().await;
}

/// A child process of this binary and the address it printed.
struct Spawned {
    child: Child,
    addr: SocketAddr,
}

impl Spawned {
    fn start(args: &[&str]) -> Spawned {
        let mut child = Command::new(std::env::current_exe().expect("exe"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("child address");
        let addr = line.trim().parse().expect("child printed its address");
        Spawned { child, addr }
    }

    fn rss_kib(&self) -> u64 {
        procfs::status_kib(self.child.id(), "VmRSS")
    }

    /// CPU time used so far (user + system, all threads).
    fn cpu(&self) -> Duration {
        procfs::process_cpu(self.child.id())
    }

    /// Closes its stdin (it cleans up and exits), killing it if it has not within a second.
    fn stop(mut self) {
        drop(self.child.stdin.take());
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Clients.

/// One ADS stream doing LDS round trips.
struct Client {
    id: usize,
    session: SotwSession,
    round: u64,
    version: String,
    nonce: String,
}

fn listener_name(id: usize, round: u64) -> String {
    format!("s{id}-r{round}")
}

impl Client {
    /// Opens the stream with its first round trip (subscribing with the node).
    async fn open(id: usize, channel: tonic::transport::Channel) -> Client {
        let first = DiscoveryRequest {
            node: Some(client::node(&format!("load-{id}"))),
            resource_names: vec![listener_name(id, 0)],
            type_url: LDS_TYPE_URL.into(),
            ..Default::default()
        };
        let session = SotwSession::open(channel, Api::Ads, first)
            .await
            .expect("open stream");
        let mut c = Client {
            id,
            session,
            round: 0,
            version: String::new(),
            nonce: String::new(),
        };
        c.receive(&listener_name(id, 0)).await;
        c
    }

    /// One round trip: ACK the last response and ask for a fresh listener; returns its time.
    async fn round_trip(&mut self) -> Duration {
        self.round += 1;
        let name = listener_name(self.id, self.round);
        let request = DiscoveryRequest {
            version_info: std::mem::take(&mut self.version),
            resource_names: vec![name.clone()],
            type_url: LDS_TYPE_URL.into(),
            response_nonce: std::mem::take(&mut self.nonce),
            ..Default::default()
        };
        let start = Instant::now();
        self.session.send(request).await.expect("send");
        self.receive(&name).await;
        start.elapsed()
    }

    async fn receive(&mut self, name: &str) {
        let r = timeout(WAIT, self.session.recv())
            .await
            .expect("a response in time")
            .expect("stream failed")
            .expect("stream ended");
        assert!(
            r.type_url == LDS_TYPE_URL && r.nonce == name && r.resources.len() == 1,
            "stream {}: expected the listener {name}, got {} nonce {}",
            self.id,
            r.type_url,
            r.nonce
        );
        self.version = r.version_info;
        self.nonce = r.nonce;
    }
}

/// Opens `streams` streams to `addr` over `connections` connections, all at once.
async fn open_all(addr: SocketAddr, streams: usize, connections: usize) -> Vec<Client> {
    let mut channels = Vec::new();
    for _ in 0..connections {
        channels.push(client::connect(addr).await.expect("connect"));
    }
    let mut set = JoinSet::new();
    for id in 0..streams {
        set.spawn(Client::open(id, channels[id % connections].clone()));
    }
    timeout(WAIT, set.join_all())
        .await
        .expect("every stream opened in time")
}

/// One phase: every client does `rounds` round trips, one per `period`, staggered; returns the
/// clients, the sorted round-trip times and the phase's duration.
async fn phase(
    clients: Vec<Client>,
    rounds: u32,
    period: Duration,
) -> (Vec<Client>, Vec<Duration>, Duration) {
    let n = clients.len().max(1) as f64;
    let t0 = tokio::time::Instant::now() + Duration::from_millis(20);
    let mut set = JoinSet::new();
    for (i, mut c) in clients.into_iter().enumerate() {
        let start = t0 + period.mul_f64(i as f64 / n);
        set.spawn(async move {
            let mut times = Vec::with_capacity(rounds as usize);
            for k in 0..rounds {
                tokio::time::sleep_until(start + period * k).await;
                times.push(c.round_trip().await);
            }
            (c, times)
        });
    }
    let bound = WAIT + period * rounds;
    let done = timeout(bound, set.join_all())
        .await
        .expect("the phase finished in time");
    let elapsed = t0.elapsed();
    let mut clients = Vec::with_capacity(done.len());
    let mut times = Vec::new();
    for (c, t) in done {
        clients.push(c);
        times.extend(t);
    }
    times.sort_unstable();
    (clients, times, elapsed)
}

// ---------------------------------------------------------------------------------------------
// Figures.

/// Nearest-rank percentile of sorted times, in µs.
fn percentile_us(sorted: &[Duration], p: f64) -> f64 {
    let rank = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len().max(1));
    sorted.get(rank - 1).map_or(0.0, |d| d.as_secs_f64() * 1e6)
}

/// (min, median) of `values`.
fn min_median(values: &[f64]) -> (f64, f64) {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    let median = if v.len().is_multiple_of(2) {
        (v[m - 1] + v[m]) / 2.0
    } else {
        v[m]
    };
    (v[0], median)
}

/// One phase's figures: p50 and p99 round trip (µs), and the CPU each child used per round trip
/// (µs).
#[derive(Clone, Copy, Default)]
struct Figures {
    p50: f64,
    p99: f64,
    upstream_cpu: f64,
    proxy_cpu: f64,
}

/// One summary row's value, from a repeat's (direct, proxied) figures.
type Pick = fn(&(Figures, Figures)) -> f64;

fn row(what: &str, values: &[f64], unit: &str) -> String {
    let (min, median) = min_median(values);
    let digits = if unit == "×" { 2 } else { 1 };
    format!("{what:<30}{min:>10.digits$} {unit:<3}{median:>10.digits$} {unit}")
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("--upstream") => return upstream_main().await,
        Some("--proxy") => return proxy_main(args[2].clone()).await,
        _ => {}
    }
    let arg = |i: usize, default: u64| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let streams = arg(1, 1000).max(1) as usize;
    let connections = arg(2, 50).max(1) as usize;
    let rounds = arg(3, 10).max(1) as u32;
    let period = Duration::from_millis(arg(4, 1000));
    let repeats = arg(5, 3).max(1) as usize;

    let upstream = Spawned::start(&["--upstream"]);
    let proxy = Spawned::start(&["--proxy", &upstream.addr.to_string()]);
    tokio::time::sleep(SETTLE).await;
    let (upstream_idle, proxy_idle) = (upstream.rss_kib(), proxy.rss_kib());

    let mut direct = open_all(upstream.addr, streams, connections).await;
    tokio::time::sleep(SETTLE).await;
    let upstream_direct = upstream.rss_kib();
    let mut proxied = open_all(proxy.addr, streams, connections).await;
    tokio::time::sleep(SETTLE).await;
    let proxy_open = proxy.rss_kib();
    let rate = match period.as_millis() {
        0 => "back to back".to_string(),
        ms => format!(
            "{:.0} round trips/s offered",
            streams as f64 * 1e3 / ms as f64
        ),
    };
    println!(
        "streams={streams} connections={connections} rounds={rounds} period={}ms ({rate}) repeats={repeats}",
        period.as_millis()
    );

    let mut results: Vec<(Figures, Figures)> = Vec::new();
    for r in 1..=repeats {
        let mut pair = [Figures::default(); 2];
        for (slot, label) in [(0, "direct"), (1, "proxied")] {
            let set = if slot == 0 { &mut direct } else { &mut proxied };
            let cpu = (upstream.cpu(), proxy.cpu());
            let (back, times, elapsed) = phase(std::mem::take(set), rounds, period).await;
            *set = back;
            let per_rt = |used: Duration| used.as_secs_f64() * 1e6 / times.len() as f64;
            let f = Figures {
                p50: percentile_us(&times, 0.50),
                p99: percentile_us(&times, 0.99),
                upstream_cpu: per_rt(upstream.cpu().saturating_sub(cpu.0)),
                proxy_cpu: per_rt(proxy.cpu().saturating_sub(cpu.1)),
            };
            println!(
                "repeat {r} {label:<8} p50={:>7.1}µs p99={:>8.1}µs max={:>8.1}µs cpu/round trip: upstream {:.1}µs proxy {:.1}µs ({} round trips in {:.2}s)",
                f.p50,
                f.p99,
                percentile_us(&times, 1.0),
                f.upstream_cpu,
                f.proxy_cpu,
                times.len(),
                elapsed.as_secs_f64()
            );
            pair[slot] = f;
        }
        results.push((pair[0], pair[1]));
    }
    tokio::time::sleep(SETTLE).await;
    let (upstream_after, proxy_after) = (upstream.rss_kib(), proxy.rss_kib());

    let col = |f: Pick| results.iter().map(f).collect::<Vec<_>>();
    let per = |from: u64, to: u64, n: usize| to.saturating_sub(from) as f64 / n as f64;
    println!();
    println!("{:<30}{:>10}    {:>10}", "", "min", "median");
    let rows: [(&str, Pick, &str); 10] = [
        ("direct p50", |r| r.0.p50, "µs"),
        ("proxied p50", |r| r.1.p50, "µs"),
        ("proxied - direct p50", |r| r.1.p50 - r.0.p50, "µs"),
        ("proxied / direct p50", |r| r.1.p50 / r.0.p50, "×"),
        ("direct p99", |r| r.0.p99, "µs"),
        ("proxied p99", |r| r.1.p99, "µs"),
        ("proxied - direct p99", |r| r.1.p99 - r.0.p99, "µs"),
        ("proxied / direct p99", |r| r.1.p99 / r.0.p99, "×"),
        ("upstream CPU / rt (direct)", |r| r.0.upstream_cpu, "µs"),
        ("proxy CPU / rt (proxied)", |r| r.1.proxy_cpu, "µs"),
    ];
    for (what, f, unit) in rows {
        println!("{}", row(what, &col(f), unit));
    }
    println!(
        "proxy RSS: idle {proxy_idle} KiB; {streams} streams open {proxy_open} KiB = {:.1} KiB per proxied stream pair; after {} round trips per stream {proxy_after} KiB = {:.1} KiB per pair (it grows with traffic up to ≈60 round trips per stream, then stays)",
        per(proxy_idle, proxy_open, streams),
        repeats as u32 * rounds,
        per(proxy_idle, proxy_after, streams),
    );
    println!(
        "upstream RSS (baseline, a bare tonic ADS server): idle {upstream_idle} KiB; {streams} direct streams {upstream_direct} KiB = {:.1} KiB per stream; {} streams after all rounds {upstream_after} KiB = {:.1} KiB per stream",
        per(upstream_idle, upstream_direct, streams),
        2 * streams,
        per(upstream_idle, upstream_after, 2 * streams),
    );
    println!(
        "How to read: a round trip is request sent → its LDS response received; 'proxied - direct' is what the proxy adds (one more gRPC hop each way, through another process on the same cores), taken per repeat (proxied phase minus the direct phase before it); min/median over the {repeats} repeats; CPU is per round trip of the phase (USER_HZ ticks); machine noise moves every figure, so compare rows of one run only."
    );
    drop((direct, proxied));
    proxy.stop();
    upstream.stop();
}
