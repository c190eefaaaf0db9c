//! Load tool: fan-out of one ECDS update to many concurrent streams.
//!
//! ```text
//! cargo run --release --example xds_load -- [STREAMS] [CONNECTIONS]
//! ```
//!
//! Runs the xDS server in a child process (this same binary with `--server`), so the server's
//! resident memory can be read from `/proc/<pid>/status` apart from the clients'. Opens STREAMS
//! SotW ECDS streams (default 1000) over CONNECTIONS HTTP/2 connections (default 50), each
//! subscribing to one resource and ACKing it; then updates the resource once and measures the time
//! until every stream has received the update and sent its ACK, and the server's RSS per stream.
//! Only loopback is used; every wait is bounded.

#![allow(clippy::disallowed_methods)] // a measuring tool

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig;
use envoy_types::pb::google::protobuf::Any;
use wasm_ecds::xds::client::{self, SotwSession};
use wasm_ecds::xds::{Api, ResourceStore};

const NAME: &str = "extensions.istio.io/wasmplugin/default.load";
const WAIT: Duration = Duration::from_secs(300);

fn config(tag: &str) -> TypedExtensionConfig {
    TypedExtensionConfig {
        name: NAME.into(),
        typed_config: Some(Any {
            type_url: "type.googleapis.com/google.protobuf.StringValue".into(),
            value: tag.as_bytes().to_vec(),
        }),
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(str::to_string)
        })
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// Child mode: serve the store on a loopback port, print it, then apply one update per stdin line.
async fn server() {
    let store = ResourceStore::new();
    store.set(NAME, config("v0"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    println!("{}", listener.local_addr().expect("addr"));
    let s = store.clone();
    std::thread::spawn(move || {
        for (n, line) in std::io::stdin().lines().enumerate() {
            if line.is_err() {
                break;
            }
            s.set(NAME, config(&format!("v{}", n + 1)));
        }
        std::process::exit(0);
    });
    wasm_ecds::xds::serve(listener, store, std::future::pending()).await;
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--server") {
        return server().await;
    }
    let streams: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1000);
    let connections: usize = args
        .get(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(50)
        .max(1);
    let mut child = Command::new(std::env::current_exe().expect("exe"))
        .arg("--server")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn server");
    let pid = child.id();
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("server address");
    let addr: std::net::SocketAddr = line.trim().parse().expect("address");
    let mut stdin = child.stdin.take().expect("stdin");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_idle = rss_kib(pid);

    let mut channels = Vec::new();
    for _ in 0..connections {
        channels.push(client::connect(addr).await.expect("connect"));
    }
    let names = vec![NAME.to_string()];
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(streams);
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(streams);
    let opened = Instant::now();
    for i in 0..streams {
        let channel = channels[i % connections].clone();
        let (ready, done, names) = (ready_tx.clone(), done_tx.clone(), names.clone());
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
            ready.send(()).await.expect("report");
            let update = s.recv().await.expect("rpc").expect("update");
            s.send(client::sotw_ack(&names, &update))
                .await
                .expect("ack");
            done.send(()).await.expect("report");
            // Keep the stream open until the tool exits.
            let _ = s.recv().await;
        });
    }
    tokio::time::timeout(WAIT, async {
        for _ in 0..streams {
            ready_rx.recv().await.expect("stream failed");
        }
    })
    .await
    .expect("streams opened in time");
    let open_time = opened.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_open = rss_kib(pid);

    let start = Instant::now();
    writeln!(stdin, "update").expect("update");
    tokio::time::timeout(WAIT, async {
        for _ in 0..streams {
            done_rx.recv().await.expect("stream failed");
        }
    })
    .await
    .expect("every stream got the update in time");
    let fanout = start.elapsed();
    let per_stream = (rss_open.saturating_sub(rss_idle)) as f64 / streams as f64;
    println!(
        "streams={streams} connections={connections} open_all={:.0}ms update_to_all_acked={:.1}ms server_rss_idle={}KiB server_rss_open={}KiB rss_per_stream={:.1}KiB",
        open_time.as_secs_f64() * 1e3,
        fanout.as_secs_f64() * 1e3,
        rss_idle,
        rss_open,
        per_stream
    );
    let _ = child.kill();
    let _ = child.wait();
}
