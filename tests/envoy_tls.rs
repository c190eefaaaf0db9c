//! Our ports under TLS against a real Envoy (docs/security.md): the server runs in-process with
//! the ports exposed as `serve`'s flags say (parsed by the real CLI), certificates come from an
//! in-test CA ([`support::pki`]), and Envoy subscribes through an `UpstreamTlsContext`.
//!
//! - TLS on the xDS port, then mTLS (`--xds-client-ca`): Envoy gets and runs the plugin; an Envoy
//!   and a rustls client without a client certificate are refused in the handshake.
//! - Rotation as a Kubernetes Secret does it (a `..data` symlink swapped at once) while Envoy's
//!   stream is open: the stream stays, a plugin change still reaches Envoy over it, and a new
//!   connection is handed the new certificate.
//! - `--delivery http` over mTLS with the bootstrap `wasm-ecds bootstrap --full --tls-*` prints:
//!   Envoy downloads a module pulled with a pull secret (a private module) by its client
//!   certificate, while the module endpoint answers 401 to a caller with neither certificate nor
//!   token and serves it with the token.
//!
//! Envoy and the registry are found as `tests/support/mod.rs` says (SKIP locally when missing,
//! failure under `CI=true`). Every wait is bounded and fails with what it last saw; nothing
//! asserts a duration.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use sha2::Digest as _;

use wasm_ecds::cli::{Cli, Command};
use wasm_ecds::config::{Config, Delivery};
use wasm_ecds::net::PortOptions;
use wasm_ecds::serve::ServerHandle;

use support::envoy::{wait_for, Envoy, EnvoyConfig, EnvoyTls, XdsTransport};
use support::pki::{https_get, tls_exchange, Leaf, Pki};
use support::wasm::{CONFIG_HEADER, MODULE_HEADER};
use support::{proxy_wasm_test_module_tagged, ImageFormat, Registry, RegistryOptions};

/// Bound of every wait for the server or Envoy to converge (a failure, never a threshold).
const CONVERGE: Duration = Duration::from_secs(30);
const FILTER: &str = "extensions.istio.io/wasmplugin/default.hello";
const REFUSED_XDS: &str = r#"wasm_ecds_connections_refused_total{port="xds",reason="handshake"}"#;

/// `serve`'s port flags, parsed by the real command line.
fn port_flags(flags: &[String]) -> PortOptions {
    let mut argv = vec!["wasm-ecds".to_string(), "serve".to_string()];
    argv.extend_from_slice(flags);
    let cli = Cli::try_parse_args_from(argv).unwrap_or_else(|e| panic!("{flags:?}: {e}"));
    let Command::Serve(args) = cli.command else {
        unreachable!("serve parses as serve")
    };
    args.port_options()
        .unwrap_or_else(|e| panic!("{flags:?}: {e}"))
}

fn flag(name: &str, path: &Path) -> String {
    format!("--{name}={}", path.display())
}

/// The server on loopback listeners (`admin` already bound when the module URL must name it).
async fn start(
    config: Config,
    plugins: &Path,
    ports: PortOptions,
    admin: Option<tokio::net::TcpListener>,
) -> ServerHandle {
    support::serve::in_process_with(
        config,
        vec![plugins.to_path_buf()],
        None,
        ports,
        Default::default(),
        admin,
    )
    .await
}

fn metric(server: &ServerHandle, series: &str) -> f64 {
    let samples = server.shared.metrics.samples();
    samples.get(series).copied().unwrap_or(0.0)
}

/// Writes plugin `hello` (namespace default) serving `url` with `config`, atomically.
fn write_plugin(dir: &Path, url: &str, config: &Value) {
    let plugin = json!({
        "apiVersion": "extensions.istio.io/v1alpha1",
        "kind": "WasmPlugin",
        "metadata": {"name": "hello", "namespace": "default"},
        "spec": {"url": url, "pluginConfig": config},
    });
    let tmp = dir.join(".hello.yaml.tmp");
    std::fs::write(&tmp, plugin.to_string()).expect("write plugin");
    std::fs::rename(&tmp, dir.join("hello.yaml")).expect("rename plugin");
}

/// A plugins dir with `hello` serving a `file://` module tagged `tag`.
fn plugins_with_file_module(dir: &Path, tag: &str, config: &Value) -> (PathBuf, String) {
    let (plugins, module) = (dir.join("plugins"), dir.join("hello.wasm"));
    std::fs::create_dir_all(&plugins).expect("plugins dir");
    std::fs::write(&module, proxy_wasm_test_module_tagged(tag)).expect("write module");
    let url = format!("file://{}", module.display());
    write_plugin(&plugins, &url, config);
    (plugins, url)
}

fn file_config(cache: &Path) -> Config {
    Config {
        cache_dir: cache.to_path_buf(),
        delivery: Delivery::File,
        ..Config::default()
    }
}

/// Waits until a request through `listener` is answered by the module tagged `tag` with `config`.
async fn wait_serving(envoy: &Envoy, listener: &str, config: &Value, tag: &str) {
    let want = (200, Some(config.to_string()), Some(tag.to_string()));
    wait_for(
        &format!("envoy serving {config} from module {tag} through {listener}"),
        CONVERGE,
        || async {
            let r = envoy.get(listener, "/").await?;
            let got = (
                r.status,
                r.header(CONFIG_HEADER).map(str::to_string),
                r.header(MODULE_HEADER).map(str::to_string),
            );
            (got == want).then_some(()).ok_or(format!("{got:?}"))
        },
    )
    .await
}

/// The ECDS filters of Envoy's `/config_dump`.
async fn ecds_dump(envoy: &Envoy) -> Vec<Value> {
    let r = envoy
        .admin("/config_dump?resource=ecds_filters")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let v: Value = serde_json::from_slice(&r.body).expect("/config_dump is JSON");
    v["configs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("ecds_filter").cloned())
        .collect()
}

/// An Envoy stat as a number (0 when absent).
async fn stat(envoy: &Envoy, name: &str) -> u64 {
    envoy
        .stats()
        .await
        .get(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn envoy_config(server: &ServerHandle, tls: EnvoyTls, node: &str) -> EnvoyConfig {
    EnvoyConfig::new(XdsTransport::Sotw, server.xds_address)
        .listener("hello", &[FILTER])
        .node_id(node)
        .tls(tls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_gets_the_plugin_over_tls_and_mtls_and_clients_without_a_certificate_are_refused() {
    let Some(bin) = support::require_envoy() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let config = json!({"via": "tls"});
    let (plugins, _) = plugins_with_file_module(dir.path(), "tls", &config);
    let pki = Pki::new("envoy-tls test CA");
    let server_leaf = pki.server("wasm-ecds");
    let (cert, key) = server_leaf.write(&dir.path().join("xds"));
    let (envoy_leaf, envoy_cert, envoy_key) = pki.client("envoy");
    let tls_flags = vec![flag("xds-tls-cert", &cert), flag("xds-tls-key", &key)];

    // TLS: Envoy verifies the server by the CA and gets the plugin.
    let server = start(
        file_config(&dir.path().join("cache-tls")),
        &plugins,
        port_flags(&tls_flags),
        None,
    )
    .await;
    let trusting = EnvoyTls {
        ca: pki.path("ca.crt"),
        client: None,
    };
    let envoy = Envoy::start_with(&bin, envoy_config(&server, trusting.clone(), "tls")).await;
    envoy.wait_ready().await;
    wait_serving(&envoy, "hello", &config, "tls").await;
    let dump = ecds_dump(&envoy).await;
    assert_eq!(dump.len(), 1, "{dump:#?}");
    assert_eq!(dump[0]["name"], FILTER);
    let code = &dump[0]["typed_config"]["config"]["vm_config"]["code"];
    assert!(code["local"]["filename"].is_string(), "{code:#}");
    drop(envoy);
    server.shutdown().await;

    // mTLS: only a client with a certificate from --xds-client-ca is served.
    let mut mtls_flags = tls_flags.clone();
    mtls_flags.push(flag("xds-client-ca", &pki.path("ca.crt")));
    let server = start(
        file_config(&dir.path().join("cache-mtls")),
        &plugins,
        port_flags(&mtls_flags),
        None,
    )
    .await;
    let with_cert = EnvoyTls {
        ca: pki.path("ca.crt"),
        client: Some((envoy_cert, envoy_key)),
    };
    let envoy = Envoy::start_with(&bin, envoy_config(&server, with_cert, "mtls")).await;
    envoy.wait_ready().await;
    wait_serving(&envoy, "hello", &config, "tls").await;
    assert_eq!(ecds_dump(&envoy).await.len(), 1);
    assert_eq!(metric(&server, REFUSED_XDS), 0.0);

    // A rustls client with the certificate gets the server's HTTP/2 SETTINGS; without one, the
    // server ends the connection in the handshake and counts it.
    let accepted = tls_exchange(
        server.xds_address,
        pki.client_config(&[b"h2"], Some(&envoy_leaf)),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(accepted.first_read.is_ok(), "{accepted:?}");
    let refused = tls_exchange(server.xds_address, pki.client_config(&[b"h2"], None)).await;
    match &refused {
        Err(e) => assert!(e.contains("handshake"), "{e}"),
        Ok(x) => assert!(x.first_read.is_err(), "served without a certificate: {x:?}"),
    }
    // Counted once the server's side of the handshake has ended, maybe after the client saw it.
    wait_for("the refused handshake counted", CONVERGE, || async {
        let n = metric(&server, REFUSED_XDS);
        (n == 1.0).then_some(()).ok_or(format!("{n} refused"))
    })
    .await;

    // An Envoy without a client certificate never gets the resource: its attempts are refused.
    let stranger = Envoy::start_with(&bin, envoy_config(&server, trusting, "no-cert")).await;
    wait_for("the stranger's handshakes refused", CONVERGE, || async {
        let n = metric(&server, REFUSED_XDS);
        (n >= 3.0).then_some(()).ok_or(format!("{n} refused"))
    })
    .await;
    assert!(ecds_dump(&stranger).await.is_empty());
    let update_success = format!("extension_config_discovery.http_filter.{FILTER}.update_success");
    assert_eq!(stat(&stranger, &update_success).await, 0);
    assert_ne!(
        stranger.admin("/ready").await.map(|r| r.status).ok(),
        Some(200),
        "a listener without its filter's config must not be ready"
    );
    let streams = server.shared.resources.stats();
    assert_eq!(
        streams.connected_streams, 1,
        "only Envoy with a certificate: {streams:?}"
    );
    drop((envoy, stranger));
    server.shutdown().await;
}

/// A TLS Secret as the kubelet mounts it: the files live in a timestamped directory, `..data`
/// links to it, and `tls.crt`/`tls.key`/`ca.crt` link through `..data`; an update writes a new
/// directory and renames a new `..data` link over the old one, so all files change at once.
struct MountedSecret {
    dir: PathBuf,
    generation: u32,
}

impl MountedSecret {
    fn new(dir: &Path, leaf: &Leaf, ca: &Path) -> MountedSecret {
        std::fs::create_dir_all(dir).expect("secret dir");
        let mut secret = MountedSecret {
            dir: dir.to_path_buf(),
            generation: 0,
        };
        secret.update(leaf, ca);
        for name in ["tls.crt", "tls.key", "ca.crt"] {
            std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name))
                .expect("file link");
        }
        secret
    }

    /// Publishes a new certificate and key at once.
    fn update(&mut self, leaf: &Leaf, ca: &Path) {
        self.generation += 1;
        let version = format!(
            "..2025_01_01_00_00_{:02}.{}",
            self.generation, self.generation
        );
        leaf.write(&self.dir.join(&version));
        std::fs::copy(ca, self.dir.join(&version).join("ca.crt")).expect("copy ca.crt");
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&version, &tmp).expect("new ..data link");
        std::fs::rename(&tmp, self.dir.join("..data")).expect("swap ..data");
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_certificate_keeps_envoys_stream_and_new_connections_get_the_new_one() {
    let Some(bin) = support::require_envoy() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let first_config = json!({"rev": 1});
    let (plugins, url) = plugins_with_file_module(dir.path(), "rotate", &first_config);
    let pki = Pki::new("rotation test CA");
    let first = pki.server("wasm-ecds first");
    let mut secret = MountedSecret::new(&dir.path().join("secret"), &first, &pki.path("ca.crt"));
    let (envoy_leaf, envoy_cert, envoy_key) = pki.client("envoy");
    let server = start(
        file_config(&dir.path().join("cache")),
        &plugins,
        port_flags(&[
            flag("xds-tls-cert", &secret.path("tls.crt")),
            flag("xds-tls-key", &secret.path("tls.key")),
            flag("xds-client-ca", &secret.path("ca.crt")),
        ]),
        None,
    )
    .await;
    let tls = EnvoyTls {
        ca: pki.path("ca.crt"),
        client: Some((envoy_cert, envoy_key)),
    };
    let envoy = Envoy::start_with(&bin, envoy_config(&server, tls, "rotate")).await;
    envoy.wait_ready().await;
    wait_serving(&envoy, "hello", &first_config, "rotate").await;
    let presented = || async {
        let x = tls_exchange(
            server.xds_address,
            pki.client_config(&[b"h2"], Some(&envoy_leaf)),
        )
        .await?;
        x.first_read.map_err(|e| format!("not served: {e}"))?;
        Ok::<_, String>(x.presented)
    };
    assert_eq!(
        presented().await.unwrap_or_else(|e| panic!("{e}")),
        first.der
    );
    let connections = "cluster.wasm_ecds.upstream_cx_total";
    let before = (
        stat(&envoy, connections).await,
        server.shared.resources.stats(),
    );
    assert_eq!(before.0, 1, "one connection to the xDS port so far");

    // The Secret is updated under the open stream.
    let second = pki.server("wasm-ecds second");
    secret.update(&second, &pki.path("ca.crt"));
    wait_for(
        "a new connection handed the new certificate",
        CONVERGE,
        || async {
            let got = presented().await?;
            (got == second.der)
                .then_some(())
                .ok_or("still the first certificate".to_string())
        },
    )
    .await;

    // A plugin change still reaches Envoy, over the same stream.
    let second_config = json!({"rev": 2});
    write_plugin(&plugins, &url, &second_config);
    wait_serving(&envoy, "hello", &second_config, "rotate").await;
    let after = (
        stat(&envoy, connections).await,
        server.shared.resources.stats(),
    );
    assert_eq!(after.0, before.0, "Envoy opened another xDS connection");
    assert_eq!(
        (after.1.connected_streams, after.1.streams_total),
        (before.1.connected_streams, before.1.streams_total),
        "the server's streams changed: {:?} -> {:?}",
        before.1,
        after.1
    );
    let states = envoy.xds_connected_states().await;
    assert!(
        !states.is_empty() && states.values().all(|c| *c),
        "{states:?}"
    );
    assert_eq!(metric(&server, REFUSED_XDS), 0.0);
    drop(envoy);
    server.shutdown().await;
}

/// A plain HTTP upstream answering every request 200 (the router's cluster of the full bootstrap).
async fn start_upstream() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().expect("upstream address");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    head.extend_from_slice(&buf[..n]);
                    while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                        head.drain(..end + 4);
                        let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nupstream\n";
                        if s.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// `wasm-ecds bootstrap --full --json ARGS`: the bootstrap, or the error.
fn full_bootstrap(args: &[String]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wasm-ecds"))
        .args(["bootstrap", "--full", "--json"])
        .args(args)
        .output()
        .expect("run wasm-ecds bootstrap");
    assert!(
        out.status.success(),
        "bootstrap: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 bootstrap")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_downloads_a_private_module_over_mtls_and_the_endpoint_wants_authentication() {
    let Some(bin) = support::require_envoy() else {
        return;
    };
    let Some(registry) =
        Registry::start(RegistryOptions::plain().basic_auth("puller", "tls-pass")).await
    else {
        return;
    };
    let module = proxy_wasm_test_module_tagged("private");
    registry
        .push("hello", "v1", ImageFormat::OciArtifact, &module)
        .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).expect("plugins dir");
    // The plugin and its pull secret, as proxy_chain.rs writes them.
    use base64::Engine as _;
    let secret = base64::engine::general_purpose::STANDARD.encode(registry.docker_config_json());
    let config = json!({"via": "mtls"});
    std::fs::write(
        plugins.join("hello.yaml"),
        format!(
            "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: hello, namespace: default}}\n\
             spec: {{url: '{}', imagePullSecret: pull, pluginConfig: {config}}}\n---\n\
             apiVersion: v1\nkind: Secret\ntype: kubernetes.io/dockerconfigjson\nmetadata: {{name: pull, namespace: default}}\n\
             data: {{.dockerconfigjson: {secret}}}\n",
            registry.oci_url("hello", "v1")
        ),
    )
    .expect("write plugins");

    let pki = Pki::new("module endpoint test CA");
    let (cert, key) = pki.server("wasm-ecds").write(&dir.path().join("tls"));
    let (envoy_leaf, envoy_cert, envoy_key) = pki.client("envoy");
    let stranger_leaf = Pki::new("another CA").issue("stranger", &["stranger"]);
    let token = dir.path().join("token");
    std::fs::write(&token, "module-token\n").expect("write token");
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind admin");
    let admin_address = admin.local_addr().expect("admin address");
    let ca = pki.path("ca.crt");
    let server = start(
        Config {
            cache_dir: dir.path().join("cache"),
            delivery: Delivery::Http,
            ..registry.config()
        },
        &plugins,
        port_flags(&[
            flag("xds-tls-cert", &cert),
            flag("xds-tls-key", &key),
            flag("xds-client-ca", &ca),
            flag("admin-tls-cert", &cert),
            flag("admin-tls-key", &key),
            flag("admin-client-ca", &ca),
            flag("admin-token-file", &token),
            // As deploy/ does: modules pulled without credentials are open; this one is not.
            "--admin-open=healthz,readyz,metrics,modules".into(),
            format!(
                "--module-base-url=https://localhost:{}",
                admin_address.port()
            ),
        ]),
        Some(admin),
    )
    .await;
    wait_for("the server ready over HTTPS", CONVERGE, || async {
        let r = https_get(admin_address, "/readyz", &pki, None, None).await?;
        (r.status == 200)
            .then_some(())
            .ok_or(format!("/readyz {}", r.status))
    })
    .await;

    // The module endpoint: a private module needs a verified client certificate or the token.
    let path = format!(
        "/modules/{}.wasm",
        hex::encode(sha2::Sha256::digest(&module))
    );
    let get = |identity: Option<&'static str>, token: Option<&'static str>| {
        let leaf = match identity {
            Some("envoy") => Some(&envoy_leaf),
            Some(_) => Some(&stranger_leaf),
            None => None,
        };
        https_get(admin_address, &path, &pki, leaf, token)
    };
    let anonymous = get(None, None).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(anonymous.status, 401, "{}", anonymous.text());
    assert!(
        anonymous.text().contains("registry credentials"),
        "{}",
        anonymous.text()
    );
    assert_eq!(get(None, Some("wrong")).await.map(|r| r.status), Ok(401));
    let with_token = get(None, Some("module-token"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((with_token.status, &with_token.body), (200, &module));
    let with_cert = get(Some("envoy"), None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((with_cert.status, &with_cert.body), (200, &module));
    // A certificate from another CA authenticates nothing (the handshake refuses it).
    assert!(get(Some("stranger"), None).await.is_err());

    // Envoy, with the bootstrap `bootstrap --full --tls-*` prints, downloads it by its
    // certificate.
    let upstream = start_upstream().await;
    let bootstrap = full_bootstrap(&[
        format!("--plugins={}", plugins.display()),
        "--namespace=default".into(),
        format!("--xds-address=127.0.0.1:{}", server.xds_address.port()),
        "--delivery=http".into(),
        format!("--admin-address=127.0.0.1:{}", admin_address.port()),
        format!("--upstream={upstream}"),
        "--listen-address=127.0.0.1:0".into(),
        "--envoy-admin-address=127.0.0.1:0".into(),
        "--initial-fetch-timeout=0".into(),
        flag("tls-ca", &ca),
        flag("tls-cert", &envoy_cert),
        flag("tls-key", &envoy_key),
        "--tls-sni=localhost".into(),
    ]);
    let envoy = Envoy::start_with(&bin, EnvoyConfig::given(XdsTransport::Sotw, bootstrap)).await;
    envoy.wait_ready().await;
    wait_serving(&envoy, "ingress_http", &config, "private").await;
    let dump = ecds_dump(&envoy).await;
    let remote = &dump[0]["typed_config"]["config"]["vm_config"]["code"]["remote"];
    assert_eq!(
        remote["http_uri"]["uri"],
        format!("https://localhost:{}{path}", admin_address.port()),
        "{remote:#}"
    );
    assert_eq!(
        remote["http_uri"]["cluster"],
        wasm_ecds::serve::MODULES_CLUSTER
    );
    drop(envoy);
    server.shutdown().await;
}
