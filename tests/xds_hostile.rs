//! Hostile xDS clients (docs/behavior.md "Bounds of the xDS port"): an oversized request, a flood
//! of resource names, huge node metadata, more streams than allowed, a response never ACKed,
//! streams that never read a 20 MiB inline module, and a reconnect storm. Each one ends only its
//! own stream with a status naming the bound, memory stays bounded, the log stays short, and the
//! other proxies keep being served. Proxies that do read a 20 MiB inline module share the server's
//! one encoding of it.
//!
//! The bound tests run the real server in process (tonic clients on 127.0.0.1); the memory and
//! log tests run a real `wasm-ecds serve` process and read its RSS from /proc and its stderr.
//! Every wait is bounded by a generous timeout that only turns a hang into a failure.

use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{Node, TypedExtensionConfig};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use envoy_types::pb::google::protobuf::{Any, Struct, Value as PbValue};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::time::timeout;
use wasm_ecds::xds::client::{self, DeltaSession, SotwSession};
use wasm_ecds::xds::{serve_with_options, Api, Error, ResourceStore, ServeOptions, StreamLimits};

mod support;

use support::serve::{resource, write_plugin, Process};

/// Bounds every wait; reached only when something hangs.
const WAIT: Duration = Duration::from_secs(60);

const A: &str = "extensions.istio.io/wasmplugin/default.a";

fn config(payload: &str) -> TypedExtensionConfig {
    TypedExtensionConfig {
        name: String::new(),
        typed_config: Some(Any {
            type_url: "type.googleapis.com/google.protobuf.StringValue".into(),
            value: payload.as_bytes().to_vec(),
        }),
    }
}

/// The in-process server with `limits`, serving resource `A`.
struct Server {
    addr: SocketAddr,
    store: ResourceStore,
    _stop: oneshot::Sender<()>,
}

impl Server {
    async fn start(limits: StreamLimits) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let store = ResourceStore::new();
        store.set(A, config("a1"));
        let (stop, stopped) = oneshot::channel::<()>();
        let options = ServeOptions {
            limits,
            ..ServeOptions::default()
        };
        tokio::spawn(serve_with_options(
            listener,
            store.clone(),
            options,
            async {
                let _ = stopped.await;
            },
        ));
        Server {
            addr,
            store,
            _stop: stop,
        }
    }

    async fn sotw(&self, node: &str, names: &[&str]) -> Result<SotwSession, Error> {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let channel = client::connect(self.addr).await?;
        SotwSession::open(channel, Api::Ecds, client::sotw_subscribe(node, &names)).await
    }

    /// A well-behaved proxy still gets `A` and its ACK counts.
    async fn assert_still_serves(&self) {
        let acks = self.store.stats().acks;
        let mut s = self.sotw("good", &[A]).await.expect("good stream opens");
        let r = next(&mut s).await.expect("good proxy served");
        assert_eq!(r.resources.len(), 1);
        s.send(client::sotw_ack(&[A.to_string()], &r))
            .await
            .unwrap();
        wait_until("the good proxy's ACK", || self.store.stats().acks > acks).await;
    }
}

/// [`support::next_or_status`] within this file's wait.
async fn next(s: &mut SotwSession) -> Result<DiscoveryResponse, tonic::Status> {
    support::next_or_status(s, WAIT).await
}

/// Polls `done` until it holds (bounded by [`WAIT`]).
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    timeout(WAIT, async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

fn small_limits() -> StreamLimits {
    StreamLimits {
        max_request_size: 64 * 1024,
        max_streams: 4,
        max_resource_names: 100,
        max_node_size: 1024,
        ..StreamLimits::default()
    }
}

#[tokio::test]
async fn an_oversized_request_ends_only_its_stream() {
    let server = Server::start(small_limits()).await;
    let huge = "x".repeat(100 * 1024);
    let mut s = server.sotw("big", &[&huge]).await.unwrap();
    let status = next(&mut s).await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("--xds-max-request-size"),
        "{status:?}"
    );
    assert_eq!(server.store.limit_count("request_size"), 1);
    server.assert_still_serves().await;
}

#[tokio::test]
async fn a_flood_of_names_ends_the_stream_with_a_status_naming_the_bound() {
    let server = Server::start(small_limits()).await;
    let names: Vec<String> = (0..101).map(|i| format!("name-{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut s = server.sotw("flood", &refs).await.unwrap();
    let status = next(&mut s).await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status
            .message()
            .contains("101 resource names subscribed, more than 100 (--xds-max-resource-names)"),
        "{status:?}"
    );
    // Delta: names add up over requests.
    let channel = client::connect(server.addr).await.unwrap();
    let first: Vec<String> = names[..60].to_vec();
    let mut d = DeltaSession::open(
        channel,
        Api::Ecds,
        client::delta_subscribe("flood-delta", &first, Default::default()),
    )
    .await
    .unwrap();
    d.send(client::delta_update(&names[60..], &[]))
        .await
        .unwrap();
    let ended = timeout(WAIT, d.recv()).await.expect("a status");
    match ended {
        Err(Error::Status(status)) => {
            assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}")
        }
        other => panic!("want RESOURCE_EXHAUSTED, got {other:?}"),
    }
    assert_eq!(server.store.limit_count("resource_names"), 2);
    assert!(server
        .store
        .streams()
        .iter()
        .all(|s| s.subscribed.len() <= 100));
    server.assert_still_serves().await;
}

#[tokio::test]
async fn huge_node_metadata_is_refused() {
    let server = Server::start(small_limits()).await;
    let mut request = client::sotw_subscribe("meta", &[A.to_string()]);
    let mut fields = std::collections::BTreeMap::new();
    fields.insert(
        "BLOB".to_string(),
        PbValue {
            kind: Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(
                "m".repeat(4096),
            )),
        },
    );
    request.node = Some(Node {
        id: "meta".into(),
        metadata: Some(Struct {
            fields: fields.into_iter().collect(),
        }),
        ..Default::default()
    });
    let channel = client::connect(server.addr).await.unwrap();
    let mut s = SotwSession::open(channel, Api::Ecds, request)
        .await
        .unwrap();
    let status = next(&mut s).await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("--xds-max-node-size"),
        "{status:?}"
    );
    assert_eq!(server.store.limit_count("node_size"), 1);
    server.assert_still_serves().await;
}

#[tokio::test]
async fn streams_beyond_the_limit_are_refused_until_one_closes() {
    let server = Server::start(small_limits()).await;
    let mut open = Vec::new();
    for i in 0..4 {
        let mut s = server.sotw(&format!("p{i}"), &[A]).await.unwrap();
        next(&mut s).await.expect("served");
        open.push(s);
    }
    match server.sotw("one-too-many", &[A]).await {
        Err(Error::Status(status)) => {
            assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
            assert!(status.message().contains("--xds-max-streams"), "{status:?}");
        }
        Err(e) => panic!("want RESOURCE_EXHAUSTED, got {e}"),
        Ok(mut s) => {
            // tonic may hand back the stream before the status arrives.
            let status = next(&mut s).await.expect_err("refused");
            assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        }
    }
    assert_eq!(server.store.limit_count("streams"), 1);
    open.pop();
    wait_until("a stream slot", || server.store.streams().len() < 4).await;
    server.assert_still_serves().await;
}

#[tokio::test]
async fn a_response_never_acked_closes_its_stream_at_the_deadline() {
    let server = Server::start(StreamLimits {
        ack_timeout: Duration::from_millis(200),
        ..StreamLimits::default()
    })
    .await;
    let mut s = server.sotw("silent", &[A]).await.unwrap();
    next(&mut s).await.expect("served");
    // No ACK: the server resets the stream (dropping whatever the proxy left unread).
    let status = next(&mut s).await.expect_err("reset");
    assert_ne!(status.code(), tonic::Code::Ok, "{status:?}");
    assert_eq!(server.store.limit_count("ack_timeout"), 1);
    wait_until("the stream closed", || server.store.streams().is_empty()).await;
    server.assert_still_serves().await;
}

/// The send budget counts every unanswered response in full, although each stream sends the
/// store's one encoding of the resource (docs/cli.md, `--xds-send-budget`): two proxies holding
/// the same unanswered module count it twice, and each ACK gives back its own share.
#[tokio::test]
async fn the_send_budget_counts_each_unanswered_response_in_full() {
    let server = Server::start(StreamLimits::default()).await;
    const BIG: &str = "extensions.istio.io/wasmplugin/default.big";
    server.store.set(BIG, config(&"x".repeat(64 * 1024)));
    let size = prost::Message::encoded_len(&server.store.get(BIG).unwrap()) as u64;
    let names = [BIG.to_string()];
    let mut one = server.sotw("one", &[BIG]).await.unwrap();
    let r1 = next(&mut one).await.expect("served");
    let mut two = server.sotw("two", &[BIG]).await.unwrap();
    let r2 = next(&mut two).await.expect("served");
    assert_eq!(server.store.unread_bytes(), 2 * size);
    one.send(client::sotw_ack(&names, &r1)).await.unwrap();
    wait_until("the first ACK", || server.store.unread_bytes() == size).await;
    two.send(client::sotw_ack(&names, &r2)).await.unwrap();
    wait_until("the second ACK", || server.store.unread_bytes() == 0).await;
}

/// Nonces cannot be guessed: an "ACK" of a response the client never read is a stale request,
/// so it does not release the response's share of the send budget.
#[tokio::test]
async fn a_guessed_nonce_is_no_ack() {
    let server = Server::start(StreamLimits::default()).await;
    let s = server.sotw("guesser", &[A]).await.unwrap();
    let version = server.store.version_of(A).unwrap();
    for guess in ["1", "1-00000000", "0"] {
        let mut ack = client::sotw_subscribe("guesser", &[A.to_string()]);
        ack.version_info.clone_from(&version);
        ack.response_nonce = guess.into();
        s.send(ack).await.unwrap();
    }
    wait_until("the push", || server.store.stats().pushes == 1).await;
    // A real ACK on another stream is counted: the guesses above were read and ignored.
    server.assert_still_serves().await;
    assert_eq!(server.store.stats().acks, 1);
    drop(s);
}

// ----- a real `wasm-ecds serve` process -----

/// A valid Wasm module of about `bytes` (one custom section of filler).
fn big_module(bytes: usize) -> Vec<u8> {
    let mut module = b"\0asm\x01\0\0\0".to_vec();
    let name = b"filler";
    let mut payload = vec![name.len() as u8];
    payload.extend_from_slice(name);
    payload.resize(bytes, 0x5a);
    module.push(0);
    let mut n = payload.len();
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            module.push(byte);
            break;
        }
        module.push(byte | 0x80);
    }
    module.extend_from_slice(&payload);
    module
}

/// 24 proxies subscribe to a 20 MiB inline module and never read: with a 64 MiB budget only a few
/// of them are sent it (the others wait, holding nothing), the server's memory grows by a bounded
/// amount, and a proxy subscribing to a small plugin is still served and ACKs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_reading_proxies_leave_memory_bounded_and_others_served() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    let (big, small) = (dir.path().join("big.wasm"), dir.path().join("small.wasm"));
    std::fs::write(&big, big_module(20 << 20)).unwrap();
    std::fs::write(&small, support::wasm_module("small")).unwrap();
    write_plugin(&dir.path().join("plugins"), "big", &big);
    write_plugin(&dir.path().join("plugins"), "small", &small);
    let serve = Process::start(dir.path(), &["--xds-send-budget", "64Mi"]);
    serve.wait_metric("wasm_ecds_xds_resources", 2.0).await;

    let names = vec![resource("big")];
    // One proxy reads and ACKs first: the module's own copies (store, cache) are counted in the
    // baseline.
    let baseline = rss_after_one_ack(&serve, &names).await;

    let mut hostile = Vec::new();
    for i in 0..24 {
        let channel = client::connect(serve.xds).await.unwrap();
        // Opened and never read: the response stays in the server's HTTP/2 send buffer.
        let s = SotwSession::open(
            channel,
            Api::Ecds,
            client::sotw_subscribe(&format!("hostile-{i}"), &names),
        )
        .await
        .unwrap();
        hostile.push(s);
    }
    serve
        .wait_metric("wasm_ecds_xds_limit_count{limit=\"send_budget\"}", 1.0)
        .await;
    let unread = serve.metric("wasm_ecds_xds_unread_bytes").await;
    assert!(unread <= (64 << 20) as f64, "unread bytes {unread}");

    // Another proxy, for the small plugin, is served while the budget is full of unread bytes.
    let small_names = vec![resource("small")];
    let channel = client::connect(serve.xds).await.unwrap();
    let mut good = SotwSession::open(
        channel,
        Api::Ecds,
        client::sotw_subscribe("good", &small_names),
    )
    .await
    .unwrap();
    let r = timeout(WAIT, good.recv()).await.unwrap().unwrap().unwrap();
    assert_eq!(r.resources.len(), 1);
    let acks = serve.metric("wasm_ecds_xds_ack_count").await;
    good.send(client::sotw_ack(&small_names, &r)).await.unwrap();
    serve
        .wait_metric("wasm_ecds_xds_ack_count", acks + 1.0)
        .await;

    let grown_mib = serve.rss_kib().saturating_sub(baseline) / 1024;
    eprintln!("RSS grew by {grown_mib} MiB with 24 never-reading proxies");
    // 64 MiB of budget plus the transient copies of the responses being built and encoded; 24
    // private copies would be 480 MiB and more.
    assert!(
        grown_mib < 240,
        "RSS grew by {grown_mib} MiB with 24 never-reading proxies (budget 64 MiB)"
    );
    drop(hostile);
}

/// 24 proxies read and ACK a 20 MiB inline module and keep their streams open: every response is
/// written from the bytes the store encoded once, so the server holds a few copies of the module
/// however many proxies took it (when each stream encoded its own response, each kept a buffer as
/// large as the module: 480 MiB more).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_proxies_share_one_encoding_of_an_inline_module() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    let big = dir.path().join("big.wasm");
    std::fs::write(&big, big_module(20 << 20)).unwrap();
    write_plugin(&dir.path().join("plugins"), "big", &big);
    let serve = Process::start(dir.path(), &[]);
    serve.wait_metric("wasm_ecds_xds_resources", 1.0).await;
    let names = vec![resource("big")];
    let baseline = rss_after_one_ack(&serve, &names).await;
    let mut readers = Vec::new();
    for i in 0..24 {
        let channel = client::connect(serve.xds).await.unwrap();
        let mut s = SotwSession::open(
            channel,
            Api::Ecds,
            client::sotw_subscribe(&format!("reader-{i}"), &names),
        )
        .await
        .unwrap();
        let r = timeout(WAIT, s.recv()).await.unwrap().unwrap().unwrap();
        assert_eq!(r.resources.len(), 1);
        s.send(client::sotw_ack(&names, &r)).await.unwrap();
        readers.push(s);
    }
    serve.wait_metric("wasm_ecds_xds_ack_count", 25.0).await;
    let grown_mib = serve.rss_kib().saturating_sub(baseline) / 1024;
    eprintln!("RSS grew by {grown_mib} MiB with 24 proxies holding a 20 MiB module");
    assert!(
        grown_mib <= 4 * 20,
        "RSS grew by {grown_mib} MiB with 24 proxies holding a 20 MiB module: more than 4 copies"
    );
    drop(readers);
}

/// Proxies that subscribe to a 20 MiB inline module, never read and half-close their request
/// side: their streams end, and each is reset, so the bytes HTTP/2 held for them are dropped
/// rather than kept behind a final status; 48 of them, in waves, leave memory bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_closing_never_reading_proxies_leave_memory_bounded() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    let big = dir.path().join("big.wasm");
    std::fs::write(&big, big_module(20 << 20)).unwrap();
    write_plugin(&dir.path().join("plugins"), "big", &big);
    let serve = Process::start(dir.path(), &["--xds-send-budget", "64Mi"]);
    serve.wait_metric("wasm_ecds_xds_resources", 1.0).await;
    let names = vec![resource("big")];
    let baseline = rss_after_one_ack(&serve, &names).await;
    let mut kept = Vec::new();
    for wave in 0..4 {
        for i in 0..12 {
            let channel = client::connect(serve.xds).await.unwrap();
            let s = SotwSession::open(
                channel.clone(),
                Api::Ecds,
                client::sotw_subscribe(&format!("half-{wave}-{i}"), &names),
            )
            .await
            .unwrap();
            // The connection stays open; only the request side ends.
            kept.push((channel, s.close_requests()));
        }
        // Every stream of the wave was pushed to (or waited for the budget) and has ended.
        serve
            .wait_metric("wasm_ecds_xds_stream_count", 1.0 + 12.0 * (wave + 1) as f64)
            .await;
        serve
            .wait_metric_where("wasm_ecds_xds_connected_streams", |v| v == 0.0)
            .await;
    }
    let grown_mib = serve.rss_kib().saturating_sub(baseline) / 1024;
    eprintln!("RSS grew by {grown_mib} MiB with 48 half-closed never-reading proxies");
    assert!(
        grown_mib < 240,
        "RSS grew by {grown_mib} MiB with 48 half-closed never-reading proxies"
    );
    drop(kept);
}

/// 300 reconnects of one proxy leave a few log lines, not 600.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_leaves_the_log_bounded() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    let module = dir.path().join("m.wasm");
    std::fs::write(&module, support::wasm_module("m")).unwrap();
    write_plugin(&dir.path().join("plugins"), "m", &module);
    let serve = Process::start(dir.path(), &[]);
    serve.wait_metric("wasm_ecds_xds_resources", 1.0).await;
    let before = serve.stderr.lock().unwrap().len();
    let names = vec![resource("m")];
    let channel = client::connect(serve.xds).await.unwrap();
    for _ in 0..300 {
        let mut s = SotwSession::open(
            channel.clone(),
            Api::Ecds,
            client::sotw_subscribe("storm", &names),
        )
        .await
        .unwrap();
        timeout(WAIT, s.recv()).await.unwrap().unwrap().unwrap();
    }
    serve.wait_metric("wasm_ecds_xds_stream_count", 300.0).await;
    serve
        .wait_metric_where("wasm_ecds_xds_connected_streams", |v| v == 0.0)
        .await;
    let lines: Vec<String> = serve.stderr.lock().unwrap()[before..].to_vec();
    let connected = lines
        .iter()
        .filter(|l| l.contains("proxy connected"))
        .count();
    assert!(
        (1..=6).contains(&connected),
        "{connected} 'proxy connected' lines:\n{}",
        lines.join("\n")
    );
    assert!(
        lines.len() <= 20,
        "{} lines:\n{}",
        lines.len(),
        lines.join("\n")
    );
}

/// The server's RSS (KiB) once one proxy has read and ACKed `names` and gone: the module's own
/// copies (store, cache, one encoding) are in this baseline.
async fn rss_after_one_ack(serve: &Process, names: &[String]) -> u64 {
    let channel = client::connect(serve.xds).await.unwrap();
    let mut reader = SotwSession::open(channel, Api::Ecds, client::sotw_subscribe("reader", names))
        .await
        .unwrap();
    let r = timeout(WAIT, reader.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    reader.send(client::sotw_ack(names, &r)).await.unwrap();
    serve.wait_metric("wasm_ecds_xds_ack_count", 1.0).await;
    drop(reader);
    serve.rss_kib()
}
