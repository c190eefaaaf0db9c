//! The `wasm_ecds.v1.Admin` gRPC service and its command-line clients (docs/cli.md "The admin
//! gRPC API"): `wasm-ecds events` against a real `serve` process printing a processing, a push,
//! the proxy's ACK; `wasm-ecds wait` failing on timeout with its reason; the service refusing
//! callers without the token; both commands over TLS (`--tls-ca`, `--tls-sni`, an `https://`
//! server) with the token, and over mTLS (`--tls-cert`), where a client without a certificate is
//! refused with a one-line error. (`wait` returning on a real Envoy's ACK is in envoy_e2e.rs.)
//! Every wait is bounded by a generous timeout that only turns a hang into a failure.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::time::timeout;
use wasm_ecds::auth::{Access, TokenFile};
use wasm_ecds::net::client::{ClientTls, TlsFlags};
use wasm_ecds::xds::admin::pb;
use wasm_ecds::xds::client::{self, SotwSession};
use wasm_ecds::xds::{serve_with_options, Api, ResourceStore, ServeOptions};

mod support;

use support::pki::Pki;
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

/// A proxy's channel to a TLS xDS port whose certificate is for `localhost`, presenting the
/// client certificate when `mtls`.
async fn tls_channel(
    pki: &Pki,
    addr: std::net::SocketAddr,
    mtls: bool,
) -> tonic::transport::Channel {
    let tls = ClientTls {
        ca: Some(pki.path("ca.crt")),
        identity: mtls.then(|| {
            (
                pki.path("wasm-ecds-client.crt"),
                pki.path("wasm-ecds-client.key"),
            )
        }),
        sni: Some("localhost".into()),
    };
    let flags = TlsFlags {
        address: "addr",
        ca: "ca",
        cert: "cert",
        key: "key",
        sni: "sni",
    };
    tls.endpoint(&format!("https://{addr}"), &flags)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Runs the CLI with `args` off the runtime.
async fn run_cli(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || cli().args(args).output().unwrap())
        .await
        .unwrap()
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// A `serve` process with TLS on its xDS port (and `extra` flags) serving plugin `t`, with one
/// proxy connected over TLS that ACKed it; returns the process, the proxy and the version.
async fn tls_serve_with_an_acked_proxy(
    dir: &std::path::Path,
    pki: &Pki,
    extra: &[&str],
    mtls: bool,
) -> (Process, SotwSession, String) {
    std::fs::create_dir_all(dir.join("plugins")).unwrap();
    let module = dir.join("t.wasm");
    std::fs::write(&module, support::wasm_module("t")).unwrap();
    write_plugin(&dir.join("plugins"), "t", &module);
    let (cert, key) = (pki.arg("server/tls.crt"), pki.arg("server/tls.key"));
    let mut args = vec!["--xds-tls-cert", &cert, "--xds-tls-key", &key];
    args.extend_from_slice(extra);
    let serve = Process::start(dir, &args);
    serve.wait_metric("wasm_ecds_xds_resources", 1.0).await;
    let names = vec![resource("t")];
    let channel = tls_channel(pki, serve.xds, mtls).await;
    let mut proxy = SotwSession::open(
        channel,
        Api::Ecds,
        client::sotw_subscribe("tls-node", &names),
    )
    .await
    .unwrap();
    let r = timeout(WAIT, proxy.recv()).await.unwrap().unwrap().unwrap();
    proxy.send(client::sotw_ack(&names, &r)).await.unwrap();
    serve.wait_metric("wasm_ecds_xds_ack_count", 1.0).await;
    (serve, proxy, r.version_info)
}

/// Reads lines of `events` until one ends with `want` (bounded by [`WAIT`]).
async fn events_until(args: Vec<String>, want: &str) {
    let mut events = cli()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(events.stdout.take().unwrap());
    let want = want.to_string();
    let found = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        for line in stdout.lines().map_while(Result::ok) {
            if line.ends_with(&want) {
                return Ok(());
            }
            seen.push(line);
        }
        Err(seen.join("\n"))
    });
    let result = timeout(WAIT, found).await;
    let _ = events.kill();
    let out = events.wait_with_output().unwrap();
    match result {
        Ok(Ok(Ok(()))) => {}
        other => panic!(
            "events never printed the line ({other:?}); stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_and_wait_over_tls_with_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let pki = test_pki();
    let token = dir.path().join("token");
    std::fs::write(&token, "tls-s3cret\n").unwrap();
    let token = token.display().to_string();
    let (serve, _proxy, version) =
        tls_serve_with_an_acked_proxy(dir.path(), &pki, &["--admin-token-file", &token], false)
            .await;
    let port = serve.xds.port();
    let ca = pki.arg("ca.crt");

    // A bare host:port with --tls-ca is TLS; the certificate is for localhost: --tls-sni.
    let bare = serve.xds.to_string();
    let out = run_cli(strings(&[
        "wait",
        "--server",
        &bare,
        "--tls-ca",
        &ca,
        "--tls-sni",
        "localhost",
        "--token-file",
        &token,
        "--plugin",
        "default/t",
        "--timeout",
        "60s",
    ]))
    .await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("default/t: version {version} ACKed by 1 of 1 subscribed proxies")
    );

    // An https:// URL naming localhost needs no --tls-sni; WatchEvents gets the proxy's ACK
    // again when a second proxy ACKs.
    let https = format!("https://localhost:{port}");
    let args = strings(&[
        "events",
        "--server",
        &https,
        "--tls-ca",
        &ca,
        "--token-file",
        &token,
    ]);
    let names = vec![resource("t")];
    let second = async {
        // Let `events` subscribe first: a proxy that connects and ACKs until the line shows.
        loop {
            let channel = tls_channel(&pki, serve.xds, false).await;
            let mut p =
                SotwSession::open(channel, Api::Ecds, client::sotw_subscribe("second", &names))
                    .await
                    .unwrap();
            let r = timeout(WAIT, p.recv()).await.unwrap().unwrap().unwrap();
            p.send(client::sotw_ack(&names, &r)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    let want = format!(
        "proxy second (ecds/sotw) acked {} version {version}",
        names[0]
    );
    tokio::select! {
        () = events_until(args, &want) => {}
        () = second => unreachable!("the proxy loop never ends"),
    }

    // Over TLS, still no token no access: one line, exit 2.
    let out = run_cli(strings(&[
        "wait",
        "--server",
        &https,
        "--tls-ca",
        &ca,
        "--plugin",
        "default/t",
    ]))
    .await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("Unauthenticated"), "{stderr}");
    // Plain text to a TLS port fails in one line too.
    let out = run_cli(strings(&[
        "wait",
        "--server",
        &bare,
        "--token-file",
        &token,
        "--plugin",
        "default/t",
    ]))
    .await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).lines().count(),
        1,
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_and_wait_over_mtls_and_a_client_without_a_certificate_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = test_pki();
    let token = dir.path().join("token");
    std::fs::write(&token, "mtls-s3cret\n").unwrap();
    let token = token.display().to_string();
    let client_ca = pki.arg("ca.crt");
    let extra = ["--xds-client-ca", &client_ca, "--admin-token-file", &token];
    let (serve, _proxy, version) =
        tls_serve_with_an_acked_proxy(dir.path(), &pki, &extra, true).await;
    let https = format!("https://localhost:{}", serve.xds.port());
    let (ca, cert, key) = (
        pki.arg("ca.crt"),
        pki.arg("wasm-ecds-client.crt"),
        pki.arg("wasm-ecds-client.key"),
    );

    // The files through the environment, as in a Pod.
    let out = tokio::task::spawn_blocking({
        let (https, ca, cert, key, token) = (
            https.clone(),
            ca.clone(),
            cert.clone(),
            key.clone(),
            token.clone(),
        );
        move || {
            cli()
                .args([
                    "wait",
                    "--server",
                    &https,
                    "--plugin",
                    "default/t",
                    "--token-file",
                    &token,
                ])
                .env("WASM_ECDS_TLS_CA", ca)
                .env("WASM_ECDS_TLS_CERT", cert)
                .env("WASM_ECDS_TLS_KEY", key)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("version {version} ACKed by 1")),
        "{out:?}"
    );
    // With the certificate, no token is needed: the port authenticated the caller.
    let want = format!(
        "proxy tls-node (ecds/sotw) acked {} version {version}",
        resource("t")
    );
    let names = vec![resource("t")];
    let args = strings(&[
        "events",
        "--server",
        &https,
        "--tls-ca",
        &ca,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ]);
    let again = async {
        loop {
            let channel = tls_channel(&pki, serve.xds, true).await;
            let mut p = SotwSession::open(
                channel,
                Api::Ecds,
                client::sotw_subscribe("tls-node", &names),
            )
            .await
            .unwrap();
            let r = timeout(WAIT, p.recv()).await.unwrap().unwrap().unwrap();
            p.send(client::sotw_ack(&names, &r)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    tokio::select! {
        () = events_until(args, &want) => {}
        () = again => unreachable!("the proxy loop never ends"),
    }

    // Without a certificate, both commands are refused with one line naming the server and
    // the TLS refusal; the token does not replace the certificate.
    for command in ["wait", "events"] {
        let mut args = strings(&[
            command,
            "--server",
            &https,
            "--tls-ca",
            &ca,
            "--token-file",
            &token,
        ]);
        if command == "wait" {
            args.extend(strings(&["--plugin", "default/t"]));
        }
        let out = run_cli(args).await;
        assert_eq!(out.status.code(), Some(2), "{command}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{command}: {stderr}");
        assert!(stderr.starts_with("error: "), "{command}: {stderr}");
        assert!(
            stderr.to_lowercase().contains("certificate"),
            "{command}: the reason is the missing certificate: {stderr}"
        );
    }
    serve
        .wait_metric(
            r#"wasm_ecds_connections_refused_total{port="xds",reason="handshake"}"#,
            2.0,
        )
        .await;
}

/// The test CA with a server certificate for `localhost` (`server/tls.crt`, `server/tls.key`) and
/// a client certificate (`wasm-ecds-client.crt`, `wasm-ecds-client.key`).
fn test_pki() -> Pki {
    let pki = Pki::new("admin-api test CA");
    pki.server("wasm-ecds").write(&pki.path("server"));
    pki.client("wasm-ecds-client");
    pki
}
