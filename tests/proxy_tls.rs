//! `proxy` to an https:// upstream: the proxy trusts the upstream through `--upstream-ca` and
//! presents `--upstream-cert`/`--upstream-key` to an upstream that requires client certificates.
//! The upstream is `serve --delivery remote` behind a real TLS terminator (rustls, HTTP/2 by ALPN,
//! client certificates checked against a test CA).

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::timeout;
use tokio_rustls::rustls;
use wasm_ecds::config::{Config, Delivery};
use wasm_ecds::convert::{decode_delivered, Code, Delivered};
use wasm_ecds::proxy::UpstreamOptions;
use wasm_ecds::serve::ServerHandle;
use wasm_ecds::xds::client::{self, SotwSession};
use wasm_ecds::xds::Api;

use support::faults::{ModuleServer, Route};
use support::pki::Pki;
use support::serve::in_process as start;

const WAIT: Duration = Duration::from_secs(30);
const RESOURCE: &str = "extensions.istio.io/wasmplugin/default.auth";

/// Terminates TLS (requiring a client certificate from the CA) and forwards the bytes to `to`.
async fn tls_terminator(pki: &Pki, to: SocketAddr) -> SocketAddr {
    let server = pki.server("wasm-ecds-central");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(server.chain(), server.key())
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(socket).await else {
                    return;
                };
                let Ok(mut plain) = tokio::net::TcpStream::connect(to).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    addr
}

fn plugin_dir(url: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("p.yaml"),
        format!("apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: auth}}\nspec: {{url: '{url}'}}\n"),
    )
    .unwrap();
    dir
}

async fn subscribe(proxy: &ServerHandle) -> SotwSession {
    let channel = client::connect(proxy.xds_address).await.unwrap();
    SotwSession::open(
        channel,
        Api::Ads,
        client::sotw_subscribe("tls", &[RESOURCE.to_string()]),
    )
    .await
    .unwrap()
}

fn metric(server: &ServerHandle, series: &str) -> f64 {
    server
        .shared
        .metrics
        .samples()
        .get(series)
        .copied()
        .unwrap_or(0.0)
}

fn cache(dir: &Path) -> Config {
    Config {
        cache_dir: dir.to_path_buf(),
        ..Config::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_upstream_trusted_by_its_ca_with_a_client_certificate() {
    let http = ModuleServer::start(vec![(
        "/m.wasm",
        Route::Body(support::proxy_wasm_test_module()),
    )])
    .await;
    let plugins = plugin_dir(&http.url("/m.wasm"));
    let caches = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let central = start(
        Config {
            delivery: Delivery::Remote,
            ..cache(caches.0.path())
        },
        vec![plugins.path().to_path_buf()],
        None,
    )
    .await;
    let pki = Pki::new("proxy-tls test CA");
    let (_, client_cert, client_key) = pki.client("wasm-ecds-proxy");
    let tls = tls_terminator(&pki, central.xds_address).await;
    let upstream = format!("https://localhost:{}", tls.port());

    let proxy = start(
        cache(caches.1.path()),
        Vec::new(),
        Some(UpstreamOptions {
            address: upstream.clone(),
            ca: Some(pki.path("ca.crt")),
            identity: Some((client_cert, client_key)),
        }),
    )
    .await;
    let mut s = subscribe(&proxy).await;
    let r = timeout(WAIT, s.recv()).await.unwrap().unwrap().unwrap();
    let config = client::decode_sotw(&r).unwrap().remove(0);
    assert!(matches!(
        decode_delivered(&config),
        Some(Delivered::Module(Code::File(_)))
    ));

    // Without a client certificate the upstream refuses the handshake: the stream keeps trying.
    let refused = start(
        cache(caches.2.path()),
        Vec::new(),
        Some(UpstreamOptions {
            address: upstream,
            ca: Some(pki.path("ca.crt")),
            identity: None,
        }),
    )
    .await;
    let _s = subscribe(&refused).await;
    let lost = r#"wasm_ecds_proxy_upstream_streams{result="lost"}"#;
    timeout(WAIT, async {
        while metric(&refused, lost) < 2.0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the refused upstream is retried");
    assert_eq!(
        metric(
            &refused,
            r#"wasm_ecds_proxy_upstream_streams{result="opened"}"#
        ),
        0.0
    );
    refused.shutdown().await;
    proxy.shutdown().await;
    central.shutdown().await;
}

#[test]
fn tls_options_need_an_https_upstream() {
    let options = UpstreamOptions {
        address: "127.0.0.1:1".into(),
        ca: Some("/nonexistent.pem".into()),
        identity: None,
    };
    let e = options.channel().unwrap_err().to_string();
    assert!(e.contains("--upstream-ca needs an https:// URL"), "{e}");
    let options = UpstreamOptions {
        address: "https://localhost:1".into(),
        ca: Some("/nonexistent.pem".into()),
        identity: None,
    };
    let e = options.channel().unwrap_err().to_string();
    assert!(e.starts_with("--upstream-ca /nonexistent.pem:"), "{e}");
}
