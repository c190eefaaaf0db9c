//! The `wasm_ecds.v1.Admin` gRPC service and its command-line clients (docs/cli.md "The admin
//! gRPC API"): `wasm-ecds events` against a real `serve` process printing a processing, a push,
//! the proxy's ACK; `wasm-ecds wait` failing on timeout with its reason; the service refusing
//! callers without the token. (`wait` returning on a real Envoy's ACK is in envoy_e2e.rs.)
//! Every wait is bounded by a generous timeout that only turns a hang into a failure.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::time::timeout;
use wasm_ecds::auth::{Access, TokenFile};
use wasm_ecds::xds::admin::pb;
use wasm_ecds::xds::client::{self, SotwSession};
use wasm_ecds::xds::{serve_with_options, Api, ResourceStore, ServeOptions};

mod support;

use support::serve::{resource, write_plugin, Process};

const WAIT: Duration = Duration::from_secs(60);

fn cli() -> Command {
    Command::new(env!("CARGO_BIN_EXE_wasm-ecds"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_prints_processing_push_and_ack_in_the_trace_format() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    let serve = Process::start(dir.path(), &[]);
    let mut events = cli()
        .args(["events", "--server", &serve.xds.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    let stdout = BufReader::new(events.stdout.take().unwrap());
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    // The watcher is subscribed once it is connected: keep making events until one shows.
    let first = timeout(WAIT, async {
        loop {
            // A proxy stream that connects and goes: an event that needs no plugin change.
            let channel = client::connect(serve.xds).await.unwrap();
            let s = SotwSession::open(channel, Api::Ecds, client::sotw_subscribe("probe", &[]))
                .await
                .unwrap();
            drop(s);
            if let Ok(Some(line)) = timeout(Duration::from_millis(500), lines.recv()).await {
                return line;
            }
        }
    })
    .await
    .expect("events prints something");
    assert!(first.starts_with('['), "{first}");
    let mut seen = vec![first];
    // A plugin appears: its processing and push, in `sim --trace` words.
    let module = dir.path().join("e.wasm");
    std::fs::write(&module, support::wasm_module("e")).unwrap();
    write_plugin(&dir.path().join("plugins"), "e", &module);
    timeout(WAIT, async {
        let has = |seen: &[String], text: &str| seen.iter().any(|l| l.contains(text));
        while !(has(&seen, "] push default/e: module file://")
            && has(&seen, "] process default/e (resource version 1): pulled"))
        {
            seen.push(lines.recv().await.expect("events keeps running"));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no process and push lines in:\n{}", seen.join("\n")));

    let names = vec![resource("e")];
    let channel = client::connect(serve.xds).await.unwrap();
    let mut proxy = SotwSession::open(channel, Api::Ecds, client::sotw_subscribe("node-e", &names))
        .await
        .unwrap();
    let r = timeout(WAIT, proxy.recv()).await.unwrap().unwrap().unwrap();
    proxy.send(client::sotw_ack(&names, &r)).await.unwrap();
    let want_pushed = format!(
        "proxy node-e (ecds/sotw) pushed {} version {}",
        names[0], r.version_info
    );
    let want_acked = format!(
        "proxy node-e (ecds/sotw) acked {} version {}",
        names[0], r.version_info
    );
    timeout(WAIT, async {
        while !seen.iter().any(|l| l.ends_with(&want_acked)) {
            seen.push(lines.recv().await.expect("events keeps running"));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no ACK line in:\n{}", seen.join("\n")));
    let pushed = seen.iter().position(|l| l.ends_with(&want_pushed));
    let acked = seen.iter().position(|l| l.ends_with(&want_acked));
    assert!(pushed.is_some() && pushed < acked, "{}", seen.join("\n"));
    let _ = events.kill();
    let _ = events.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_times_out_with_a_one_line_reason() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    let module = dir.path().join("w.wasm");
    std::fs::write(&module, support::wasm_module("w")).unwrap();
    write_plugin(&dir.path().join("plugins"), "w", &module);
    let serve = Process::start(dir.path(), &[]);
    serve.wait_metric("wasm_ecds_xds_resources", 1.0).await;
    // One proxy ACKs; two are wanted.
    let names = vec![resource("w")];
    let channel = client::connect(serve.xds).await.unwrap();
    let mut proxy = SotwSession::open(channel, Api::Ecds, client::sotw_subscribe("one", &names))
        .await
        .unwrap();
    let r = timeout(WAIT, proxy.recv()).await.unwrap().unwrap().unwrap();
    proxy.send(client::sotw_ack(&names, &r)).await.unwrap();
    serve.wait_metric("wasm_ecds_xds_ack_count", 1.0).await;
    let xds = serve.xds.to_string();
    let out = tokio::task::spawn_blocking(move || {
        cli()
            .args(["wait", "--server", &xds, "--plugin", "default/w"])
            .args(["--acked-by", "2", "--timeout", "300ms"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "default/w: version {} ACKed by 1 of 1 subscribed proxies, want 2",
            r.version_info
        )),
        "{stderr}"
    );
    // And with one wanted, it returns at once.
    let xds = serve.xds.to_string();
    let out = tokio::task::spawn_blocking(move || {
        cli()
            .args([
                "wait",
                "--server",
                &xds,
                "--plugin",
                "default/w",
                "--timeout",
                "60s",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

#[tokio::test]
async fn the_admin_service_wants_the_token_when_there_is_one() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let access = Access {
        mtls: false,
        client_ca: false,
        token: Some(TokenFile::open(&token).unwrap()),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let store = ResourceStore::new();
    let options = ServeOptions {
        access: Arc::new(access),
        ..ServeOptions::default()
    };
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve_with_options(listener, store, options, async {
        let _ = stopped.await;
    }));
    let channel = client::connect(addr).await.unwrap();
    let mut admin = pb::admin_client::AdminClient::new(channel);
    let refused = admin
        .list_proxies(pb::ListProxiesRequest {})
        .await
        .expect_err("no token");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    let mut request = tonic::Request::new(pb::ListProxiesRequest {});
    request
        .metadata_mut()
        .insert("authorization", "Bearer s3cret".parse().unwrap());
    admin.list_proxies(request).await.expect("with the token");

    // The command-line client sends the token file's content.
    let bad = dir.path().join("bad");
    std::fs::write(&bad, "nope").unwrap();
    let server = addr.to_string();
    let run = move |file: std::path::PathBuf| {
        let server = server.clone();
        tokio::task::spawn_blocking(move || {
            cli()
                .args(["wait", "--server", &server, "--plugin", "default/none"])
                .args(["--timeout", "200ms", "--token-file"])
                .arg(file)
                .output()
                .unwrap()
        })
    };
    let out = run(bad).await.unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Unauthenticated"),
        "{out:?}"
    );
    let out = run(token).await.unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "times out, authenticated: {out:?}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no connected proxy subscribes to it"),
        "{out:?}"
    );
}
