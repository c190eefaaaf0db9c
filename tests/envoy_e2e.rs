//! End to end against a real Envoy (guides/envoy.md) and a real registry: the server runs
//! in-process ([`serve::start`] on loopback listeners), modules come from an in-test HTTP server
//! and from `docker-registry`, and Envoy subscribes to the plugins over ECDS. What Envoy does with
//! real requests is the proof: the test module adds the response headers `x-wasm-plugin-config`
//! (its configuration) and `x-wasm-module` (its build tag).
//!
//! Envoy and the registry are found as described in `tests/support/mod.rs`; locally the tests skip
//! with a loud message when one is missing, under `CI=true` they fail instead.
//!
//! Every wait is bounded (a hung step fails the test with what was last seen); nothing asserts a
//! duration. The time from a plugin-file edit to Envoy serving the new configuration is measured
//! and printed, not asserted.
//!
//! Length: one suite per real-Envoy scenario family, sharing one Envoy/server fixture; the helpers
//! live in `tests/support/envoy.rs`, what remains is the tests themselves.

#![allow(clippy::disallowed_methods)] // bounded waits and latency figures use wall time

mod support;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::time::Instant;

use wasm_ecds::config::{Config, Delivery};
use wasm_ecds::fetch::hyper_transport::HyperTransport;
use wasm_ecds::serve::{self, ServeSetup, ServerHandle};

use support::envoy::{http_get, wait_for, Envoy, EnvoyConfig, XdsTransport};
use support::wasm::{CONFIG_HEADER, MODULE_HEADER};
use support::{proxy_wasm_test_module_tagged, ImageFormat, Registry, RegistryOptions};

/// Bound of every wait for the server or Envoy to converge (a failure, never a threshold).
const CONVERGE: Duration = Duration::from_secs(30);
/// How long "nothing more happens" is watched for (NACK loops, re-downloads).
const QUIET: Duration = Duration::from_secs(2);
/// Bound of the wait for a background retry: retries back off 1 s, 2 s, 4 s, … so one due after a
/// slow start (up to ~30 s) may come 32 s later.
const RETRY_CONVERGE: Duration = Duration::from_secs(70);

// -------------------------------------------------------------------------------------------------
// In-test HTTP: a module server and a counting proxy in front of the registry.

/// A plain HTTP server that serves registered files and, for other paths, forwards to `upstream`
/// (a counting proxy); it counts every request by `"<METHOD> <path>"`.
#[derive(Clone)]
struct TestHttp {
    addr: SocketAddr,
    state: Arc<HttpState>,
}

struct HttpState {
    files: Mutex<BTreeMap<String, Vec<u8>>>,
    hits: Mutex<BTreeMap<String, u64>>,
    upstream: Option<String>,
    client: Client<HttpConnector, Full<Bytes>>,
}

type HttpReply = hyper::Response<Full<Bytes>>;

impl TestHttp {
    /// A module server (files only).
    async fn files() -> TestHttp {
        Self::start(None).await
    }

    /// A proxy to `upstream` (`http://host:port`).
    async fn proxy(upstream: &str) -> TestHttp {
        Self::start(Some(upstream.to_string())).await
    }

    async fn start(upstream: Option<String>) -> TestHttp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind test http server");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(HttpState {
            files: Mutex::new(BTreeMap::new()),
            hits: Mutex::new(BTreeMap::new()),
            upstream,
            client: Client::builder(TokioExecutor::new()).build_http(),
        });
        let accept_state = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = accept_state.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(state.handle(req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        TestHttp { addr, state }
    }

    fn host(&self) -> String {
        self.addr.to_string()
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Serves `bytes` at `path` from now on.
    fn put(&self, path: &str, bytes: Vec<u8>) {
        self.state
            .files
            .lock()
            .expect("files lock")
            .insert(path.to_string(), bytes);
    }

    /// Requests whose `"<METHOD> <path>"` contains `needle`.
    fn hits(&self, needle: &str) -> u64 {
        self.state
            .hits
            .lock()
            .expect("hits lock")
            .iter()
            .filter(|(k, _)| k.contains(needle))
            .map(|(_, n)| n)
            .sum()
    }

    fn all_hits(&self) -> BTreeMap<String, u64> {
        self.state.hits.lock().expect("hits lock").clone()
    }
}

impl HttpState {
    async fn handle(&self, req: hyper::Request<Incoming>) -> HttpReply {
        let path = req.uri().path().to_string();
        *self
            .hits
            .lock()
            .expect("hits lock")
            .entry(format!("{} {path}", req.method()))
            .or_default() += 1;
        let file = self.files.lock().expect("files lock").get(&path).cloned();
        match (file, &self.upstream) {
            (Some(bytes), _) => reply(200, Bytes::from(bytes)),
            (None, Some(upstream)) => self.forward(upstream, req).await,
            (None, None) => reply(404, Bytes::from_static(b"not found\n")),
        }
    }

    /// Forwards the request (bodies are small: manifests and test modules).
    async fn forward(&self, upstream: &str, req: hyper::Request<Incoming>) -> HttpReply {
        let (parts, body) = req.into_parts();
        let body = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return reply(502, Bytes::from(format!("request body: {e}\n"))),
        };
        let target = format!(
            "{upstream}{}",
            parts.uri.path_and_query().map_or("/", |p| p.as_str())
        );
        let mut out = hyper::Request::builder().method(parts.method).uri(target);
        for (name, value) in parts.headers.iter() {
            if name != http::header::HOST {
                out = out.header(name, value);
            }
        }
        let Ok(out) = out.body(Full::new(body)) else {
            return reply(502, Bytes::from_static(b"bad request\n"));
        };
        let response = match self.client.request(out).await {
            Ok(r) => r,
            Err(e) => return reply(502, Bytes::from(format!("upstream: {e}\n"))),
        };
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let mut back = hyper::Response::builder().status(parts.status);
        for (name, value) in parts.headers.iter() {
            if name != http::header::TRANSFER_ENCODING && name != http::header::CONNECTION {
                back = back.header(name, value);
            }
        }
        back.body(Full::new(body))
            .unwrap_or_else(|_| reply(502, Bytes::from_static(b"bad response\n")))
    }
}

fn reply(status: u16, body: Bytes) -> HttpReply {
    hyper::Response::builder()
        .status(status)
        .body(Full::new(body))
        .expect("valid response")
}

// -------------------------------------------------------------------------------------------------
// The server under test.

/// A server started by the test, with what its proxies ACKed.
struct Server {
    handle: ServerHandle,
    acked: Acked,
}

/// Per (node id, resource name), the last response that proxy ACKed carrying the resource: the
/// response's version (SotW `version_info`, delta `system_version_info`: what Envoy shows as the
/// filter's `version_text`) and the resource's own version in it. Fed by the store's event feed.
#[derive(Clone, Default)]
struct Acked(Arc<Mutex<BTreeMap<NodeResource, AckedVersions>>>);

/// (node id, resource name).
type NodeResource = (String, String);
/// (response version, resource version).
type AckedVersions = (String, String);

impl Acked {
    fn follow(store: &wasm_ecds::xds::ResourceStore) -> Acked {
        use tokio::sync::broadcast::error::RecvError;
        use wasm_ecds::xds::StreamEventKind;
        let acked = Acked::default();
        let mut events = store.events();
        let map = acked.0.clone();
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(e) => {
                        if let StreamEventKind::Acked(d) = e.kind {
                            let mut map = map.lock().expect("acked lock");
                            for r in d.resources {
                                map.insert(
                                    (e.node_id.clone(), r.name),
                                    (d.version.clone(), r.version),
                                );
                            }
                        }
                    }
                    Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => return,
                }
            }
        });
        acked
    }

    fn get(&self, node: &str, resource: &str) -> Option<(String, String)> {
        self.0
            .lock()
            .expect("acked lock")
            .get(&(node.to_string(), resource.to_string()))
            .cloned()
    }
}

/// Options of [`Server::start`].
struct ServerOptions {
    delivery: Delivery,
    plugins: PathBuf,
    cache: PathBuf,
    /// Plain-HTTP registries (`host:port`).
    insecure: Vec<String>,
    /// Where to listen; `127.0.0.1:0` picks ports.
    xds: SocketAddr,
    admin: SocketAddr,
}

impl ServerOptions {
    fn new(delivery: Delivery, plugins: &Path, cache: &Path) -> Self {
        ServerOptions {
            delivery,
            plugins: plugins.to_path_buf(),
            cache: cache.to_path_buf(),
            insecure: Vec::new(),
            xds: "127.0.0.1:0".parse().expect("address"),
            admin: "127.0.0.1:0".parse().expect("address"),
        }
    }

    fn insecure(mut self, hosts: &[String]) -> Self {
        self.insecure = hosts.to_vec();
        self
    }

    fn addresses(mut self, xds: SocketAddr, admin: SocketAddr) -> Self {
        self.xds = xds;
        self.admin = admin;
        self
    }
}

impl Server {
    async fn start(opts: ServerOptions) -> Server {
        init_tracing();
        let config = Config {
            insecure_registries: opts.insecure.clone(),
            cache_dir: opts.cache.clone(),
            delivery: opts.delivery,
            ..Config::default()
        };
        let xds_listener = bind(opts.xds).await;
        let admin_listener = bind(opts.admin).await;
        let transport = Arc::new(HyperTransport::new(&config, Vec::new()).expect("transport"));
        let handle = serve::start(ServeSetup {
            config,
            plugin_paths: vec![opts.plugins.clone()],
            xds_listener,
            admin_listener,
            transport,
            fetch_config: None,
            kube: None,
            proxy: None,
        })
        .await
        .expect("server starts");
        // Subscribed before any proxy can connect.
        let acked = Acked::follow(&handle.shared.resources);
        let server = Server { handle, acked };
        wait_for("server /readyz", CONVERGE, || async {
            let r = server.admin_get("/readyz").await?;
            (r.status == 200)
                .then_some(())
                .ok_or(format!("/readyz {}", r.status))
        })
        .await;
        server
    }

    async fn stop(self) {
        tokio::time::timeout(Duration::from_secs(10), self.handle.shutdown())
            .await
            .expect("server shuts down within 10s");
    }

    fn xds(&self) -> SocketAddr {
        self.handle.xds_address
    }

    fn admin(&self) -> SocketAddr {
        self.handle.admin_address
    }

    async fn admin_get(&self, path: &str) -> Result<support::envoy::HttpResponse, String> {
        http_get(&format!("http://{}{path}", self.handle.admin_address)).await
    }

    async fn metrics(&self) -> String {
        self.admin_get("/metrics")
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .text()
    }

    /// `GET /debug/syncz`, parsed.
    async fn syncz(&self) -> Value {
        let r = self
            .admin_get("/debug/syncz")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        serde_json::from_slice(&r.body).expect("/debug/syncz is JSON")
    }

    /// The `/debug/plugins` entry of `ns/name`.
    async fn plugin(&self, key: &str) -> Value {
        let r = self
            .admin_get("/debug/plugins")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let v: Value = serde_json::from_slice(&r.body).expect("/debug/plugins is JSON");
        v["plugins"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["plugin"] == key)
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// Waits until the plugin, as it was (`old`, its `/debug/plugins` entry), has a new resource
    /// version *and* that version was processed: until then `outcome` is the old version's.
    async fn wait_processed_after(&self, key: &str, old: &Value) -> Value {
        wait_for(
            &format!("{key} processed at a new resource version"),
            CONVERGE,
            || async {
                let p = self.plugin(key).await;
                let processed = p["processedResourceVersion"] == p["resourceVersion"];
                if !p.is_null() && p["resourceVersion"] != old["resourceVersion"] && processed {
                    Ok(p)
                } else {
                    Err(p.to_string())
                }
            },
        )
        .await
    }

    /// The version of `resource` in the ECDS store.
    fn version_of(&self, resource: &str) -> Option<String> {
        self.handle.shared.resources.version_of(resource)
    }
}

/// Server logs under `RUST_LOG` (captured by libtest unless `--nocapture`).
fn init_tracing() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

async fn bind(addr: SocketAddr) -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind(addr)
        .await
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"))
}

/// A WasmPlugin manifest (JSON is YAML).
fn plugin(ns: &str, name: &str, url: &str, spec: Value) -> Value {
    let mut s = json!({"url": url});
    if let Value::Object(extra) = spec {
        s.as_object_mut().expect("object").extend(extra);
    }
    json!({
        "apiVersion": "extensions.istio.io/v1alpha1",
        "kind": "WasmPlugin",
        "metadata": {"name": name, "namespace": ns},
        "spec": s,
    })
}

/// Writes a plugin file atomically (editors and `kubectl` replace files); the temporary name has an
/// extension the server does not read.
fn write_plugin(dir: &Path, file: &str, plugin: &Value) {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(plugin).expect("json")).expect("write plugin");
    std::fs::rename(&tmp, dir.join(file)).expect("rename plugin");
}

fn resource(ns: &str, name: &str) -> String {
    format!("extensions.istio.io/wasmplugin/{ns}.{name}")
}

/// The value of one Prometheus series (`name{labels}` exactly as rendered), 0 when absent.
fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse::<f64>().ok())?
        })
        .map_or(0, |v| v as u64)
}

/// What a request through `listener` of `envoy` returned: status and the two module headers.
async fn probe(
    envoy: &Envoy,
    listener: &str,
) -> Result<(u16, Option<String>, Option<String>), String> {
    let r = envoy.get(listener, "/").await?;
    Ok((
        r.status,
        r.header(CONFIG_HEADER).map(str::to_string),
        r.header(MODULE_HEADER).map(str::to_string),
    ))
}

/// Waits until requests through `listener` get 200 with configuration `config` from module `tag`.
async fn wait_serving(envoy: &Envoy, listener: &str, config: &Value, tag: &str) {
    wait_serving_within(envoy, listener, config, tag, CONVERGE).await
}

async fn wait_serving_within(
    envoy: &Envoy,
    listener: &str,
    config: &Value,
    tag: &str,
    timeout: Duration,
) {
    let want = (200, Some(config.to_string()), Some(tag.to_string()));
    wait_for(
        &format!(
            "envoy ({}) listener {listener} serving {config} from module {tag}",
            envoy.config.transport.name()
        ),
        timeout,
        || async {
            let got = probe(envoy, listener).await?;
            (got == want).then_some(()).ok_or(format!("{got:?}"))
        },
    )
    .await
}

/// Waits until Envoy's `version_text` of `filter` is the version of the last response it ACKed
/// carrying the resource, and that response carried the resource at the version the server holds
/// now ([`ResourceStore::version_of`](wasm_ecds::xds::ResourceStore::version_of)). Returns the
/// version. (A response carrying one resource has that resource's version; ADS carries all of a
/// proxy's filters in one response, whose version then names the set.)
async fn wait_version_matches(envoy: &Envoy, server: &Server, filter: &str) -> String {
    let node = envoy.config.node_id.clone();
    wait_for(
        &format!(
            "envoy ({}) version_text of {filter} = the version the server sent",
            envoy.config.transport.name()
        ),
        CONVERGE,
        || async {
            let current = server.version_of(filter);
            let acked = server.acked.get(&node, filter);
            let shown = envoy.ecds_stat(filter, "version_text").await;
            match (&current, &acked, &shown) {
                (Some(c), Some((response, resource)), Some(s))
                    if c == resource && s == response =>
                {
                    Ok(s.clone())
                }
                _ => Err(format!(
                    "server holds {current:?}, proxy ACKed (response, resource) {acked:?}, \
                     envoy shows {shown:?}"
                )),
            }
        },
    )
    .await
}

/// ECDS streams an Envoy opens: one per filter subscription, or one in all over ADS.
fn streams_of(config: &EnvoyConfig) -> usize {
    match config.transport {
        XdsTransport::Ads | XdsTransport::DeltaAds => 1,
        XdsTransport::Sotw | XdsTransport::Delta => {
            config.listeners.iter().map(|l| l.filters.len()).sum()
        }
    }
}

/// Waits until every xDS stream of `envoy` is (or is no longer) connected, by its own account.
async fn wait_xds_connected(envoy: &Envoy, connected: bool) {
    let what = format!(
        "envoy ({}) xDS {}",
        envoy.config.transport.name(),
        if connected {
            "connected"
        } else {
            "disconnected"
        }
    );
    wait_for(&what, CONVERGE, || async {
        let states = envoy.xds_connected_states().await;
        (!states.is_empty() && states.values().all(|c| *c == connected))
            .then_some(())
            .ok_or(format!("{states:?}"))
    })
    .await
}

/// Starts Envoys and waits until all are ready; `None` when Envoy is missing (SKIP).
async fn start_envoys(configs: Vec<EnvoyConfig>) -> Option<Vec<Envoy>> {
    let bin = support::require_envoy()?;
    let mut envoys = Vec::new();
    for c in configs {
        envoys.push(Envoy::start_with(&bin, c).await);
    }
    for e in &envoys {
        e.wait_ready().await;
    }
    Some(envoys)
}

const TRANSPORTS: [XdsTransport; 4] = XdsTransport::ALL;

// -------------------------------------------------------------------------------------------------
// Tests.

/// The filter works for http://, OCI artifact and Docker-image plugins, delivered as a file path,
/// inline bytes and over HTTP from the server's module endpoint, to Envoys subscribed over state of
/// the world, delta, ADS and delta ADS; Envoy's `version_text` is the version the server sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_works_for_every_source_delivery_and_transport() {
    let Some(bin) = support::require_envoy() else {
        return;
    };
    let Some(registry) = Registry::start(RegistryOptions::plain()).await else {
        return;
    };
    let modules = TestHttp::files().await;
    modules.put("/m/http.wasm", proxy_wasm_test_module_tagged("http"));
    registry
        .push(
            "e2e/artifact",
            "v1",
            ImageFormat::OciArtifact,
            &proxy_wasm_test_module_tagged("oci-artifact"),
        )
        .await;
    registry
        .push(
            "e2e/docker",
            "v1",
            ImageFormat::Docker,
            &proxy_wasm_test_module_tagged("docker"),
        )
        .await;
    let sources = [
        ("http", modules.url("/m/http.wasm")),
        ("oci-artifact", registry.oci_url("e2e/artifact", "v1")),
        ("docker", registry.oci_url("e2e/docker", "v1")),
    ];

    for delivery in [Delivery::File, Delivery::Inline, Delivery::Http] {
        let ns = format!("{delivery:?}").to_lowercase();
        let dir = tempfile::tempdir().expect("temp dir");
        let (plugins, cache) = (dir.path().join("plugins"), dir.path().join("cache"));
        std::fs::create_dir_all(&plugins).expect("plugins dir");
        for (name, url) in &sources {
            let config = json!({"delivery": ns, "source": name});
            let p = plugin(&ns, name, url, json!({"pluginConfig": config}));
            write_plugin(&plugins, &format!("{name}.yaml"), &p);
        }
        let server = Server::start(
            ServerOptions::new(delivery, &plugins, &cache).insecure(&[registry.host()]),
        )
        .await;
        let mut configs = Vec::new();
        for transport in TRANSPORTS {
            let mut c = EnvoyConfig::new(transport, server.xds());
            if delivery == Delivery::Http {
                c = c.modules(server.admin());
            }
            for (name, _) in &sources {
                c = c.listener(name, &[resource(&ns, name)]);
            }
            configs.push(c);
        }
        let mut envoys = Vec::new();
        for c in configs {
            envoys.push(Envoy::start_with(&bin, c).await);
        }
        for envoy in &envoys {
            envoy.wait_ready().await;
            for (name, _) in &sources {
                let config = json!({"delivery": ns, "source": name});
                wait_serving(envoy, name, &config, name).await;
                let filter = resource(&ns, name);
                let version = wait_version_matches(envoy, &server, &filter).await;
                assert_eq!(
                    envoy.ecds_counter(&filter, "update_rejected").await,
                    0,
                    "{filter} over {} rejected (version {version})",
                    envoy.config.transport.name()
                );
            }
        }
        let stats = server.handle.shared.resources.stats();
        assert_eq!(stats.nacks, 0, "{ns}: no NACK expected: {stats:?}");
        assert_eq!(
            stats.connected_streams as usize,
            envoys.iter().map(|e| streams_of(&e.config)).sum::<usize>(),
            "{ns}: one stream per filter, one per Envoy over ADS: {stats:?}"
        );
        drop(envoys);
        server.stop().await;
    }
    // Three deliveries, each pulled every module once per server.
    assert_eq!(
        modules.hits("GET /m/http.wasm"),
        3,
        "{:?}",
        modules.all_hits()
    );
}

/// Editing `pluginConfig` in a watched plugin file changes what a running Envoy does (no restart,
/// cached module, no pull), over every transport; Envoy's `version_text` follows the server's
/// resource version. Prints the time from the file write to Envoy serving the new configuration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_config_edit_reaches_running_envoy() {
    let modules = TestHttp::files().await;
    modules.put("/m/edit.wasm", proxy_wasm_test_module_tagged("edit"));
    let dir = tempfile::tempdir().expect("temp dir");
    let (plugins, cache) = (dir.path().join("plugins"), dir.path().join("cache"));
    std::fs::create_dir_all(&plugins).expect("plugins dir");
    let url = modules.url("/m/edit.wasm");
    let make = |n: u32| {
        plugin(
            "default",
            "edit",
            &url,
            json!({"pluginConfig": {"edit": n}}),
        )
    };
    write_plugin(&plugins, "edit.yaml", &make(0));
    let server = Server::start(ServerOptions::new(Delivery::File, &plugins, &cache)).await;
    let filter = resource("default", "edit");
    let configs = TRANSPORTS
        .iter()
        .map(|t| EnvoyConfig::new(*t, server.xds()).listener("edit", &[&filter]))
        .collect();
    let Some(mut envoys) = start_envoys(configs).await else {
        return;
    };
    for envoy in &envoys {
        wait_serving(envoy, "edit", &json!({"edit": 0}), "edit").await;
        wait_version_matches(envoy, &server, &filter).await;
    }
    let pids: Vec<u32> = envoys.iter().map(Envoy::pid).collect();
    let pulls = modules.hits("/m/edit.wasm");
    assert_eq!(pulls, 1);

    const EDITS: u32 = 5;
    let mut latencies: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    for n in 1..=EDITS {
        let before = server.plugin("default/edit").await;
        let success: Vec<u64> = {
            let mut v = Vec::new();
            for e in &envoys {
                v.push(e.ecds_counter(&filter, "update_success").await);
            }
            v
        };
        let want = (
            200,
            Some(json!({"edit": n}).to_string()),
            Some("edit".to_string()),
        );
        let written = Instant::now();
        write_plugin(&plugins, "edit.yaml", &make(n));
        let mut pending: Vec<usize> = (0..envoys.len()).collect();
        while !pending.is_empty() {
            assert!(
                written.elapsed() < CONVERGE,
                "edit {n} not served within {CONVERGE:?} by {:?}",
                pending
                    .iter()
                    .map(|i| envoys[*i].config.transport.name())
                    .collect::<Vec<_>>()
            );
            let mut still = Vec::new();
            for i in pending {
                if probe(&envoys[i], "edit").await.ok() == Some(want.clone()) {
                    latencies
                        .entry(envoys[i].config.transport.name())
                        .or_default()
                        .push(written.elapsed());
                } else {
                    still.push(i);
                }
            }
            pending = still;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let p = server.wait_processed_after("default/edit", &before).await;
        assert_eq!(p["outcome"], "cached", "a config edit does not pull: {p}");
        for (e, before) in envoys.iter().zip(success) {
            // One filter per Envoy: the response carried this resource alone, under its version.
            let shown = wait_version_matches(e, &server, &filter).await;
            assert_eq!(Some(shown), server.version_of(&filter));
            assert_eq!(
                e.ecds_counter(&filter, "update_success").await,
                before + 1,
                "one update per edit ({})",
                e.config.transport.name()
            );
        }
    }
    assert_eq!(
        modules.hits("/m/edit.wasm"),
        pulls,
        "cached module, no pull"
    );
    for (e, pid) in envoys.iter_mut().zip(pids) {
        e.assert_running();
        assert_eq!(e.pid(), pid);
        assert_eq!(e.ecds_counter(&filter, "update_rejected").await, 0);
    }
    let mut report =
        String::from("\nplugin-file edit → Envoy serving the new config (cached module):\n");
    for (t, mut l) in latencies {
        l.sort();
        report.push_str(&format!(
            "  {t:>9}: min {:?}  median {:?}  max {:?}  (n={})\n",
            l[0],
            l[l.len() / 2],
            l[l.len() - 1],
            l.len()
        ));
    }
    let _ = std::io::Write::write_all(&mut std::io::stderr(), report.as_bytes());
    server.stop().await;
}

/// A label-only edit is a new resource version: under `Always` it pulls again (http: the module is
/// downloaded again; OCI: the manifest is asked, the cached blob is not downloaded — `revalidated`),
/// under `IfNotPresent` nothing is requested (`cached`). What Envoy receives does not change, so
/// nothing is pushed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_only_edit_pulls_under_always_not_under_if_not_present() {
    let Some(registry) = Registry::start(RegistryOptions::plain()).await else {
        return;
    };
    let proxy = TestHttp::proxy(&registry.base_url()).await;
    let modules = TestHttp::files().await;
    modules.put("/m/always.wasm", proxy_wasm_test_module_tagged("always"));
    modules.put("/m/ifnp.wasm", proxy_wasm_test_module_tagged("ifnp"));
    registry
        .push(
            "e2e/pol",
            "v1",
            ImageFormat::OciArtifact,
            &proxy_wasm_test_module_tagged("oci"),
        )
        .await;
    let oci = format!("oci://{}/e2e/pol:v1", proxy.host());
    let plugins_spec = [
        ("http-always", modules.url("/m/always.wasm"), "Always"),
        ("http-ifnp", modules.url("/m/ifnp.wasm"), "IfNotPresent"),
        ("oci-always", oci.clone(), "Always"),
        ("oci-ifnp", oci.clone(), "IfNotPresent"),
    ];
    let dir = tempfile::tempdir().expect("temp dir");
    let (plugins, cache) = (dir.path().join("plugins"), dir.path().join("cache"));
    std::fs::create_dir_all(&plugins).expect("plugins dir");
    let make = |name: &str, url: &str, policy: &str, label: &str| {
        let mut p = plugin(
            "default",
            name,
            url,
            json!({"imagePullPolicy": policy, "pluginConfig": {"p": name}}),
        );
        p["metadata"]["labels"] = json!({"edit": label});
        p
    };
    for (name, url, policy) in &plugins_spec {
        write_plugin(
            &plugins,
            &format!("{name}.yaml"),
            &make(name, url, policy, "one"),
        );
    }
    let server = Server::start(
        ServerOptions::new(Delivery::File, &plugins, &cache).insecure(&[proxy.host()]),
    )
    .await;
    let mut c = EnvoyConfig::new(XdsTransport::Sotw, server.xds());
    for (name, _, _) in &plugins_spec {
        c = c.listener(name, &[resource("default", name)]);
    }
    let Some(envoys) = start_envoys(vec![c]).await else {
        return;
    };
    let envoy = &envoys[0];
    let tag = |name: &str| {
        if name.starts_with("oci") {
            "oci".to_string()
        } else {
            name.trim_start_matches("http-").to_string()
        }
    };
    for (name, _, _) in &plugins_spec {
        wait_serving(envoy, name, &json!({"p": name}), &tag(name)).await;
    }

    let manifests = |p: &TestHttp| p.hits("/manifests/");
    let blobs = |p: &TestHttp| p.hits("/blobs/");
    let before = (
        modules.hits("/m/always.wasm"),
        modules.hits("/m/ifnp.wasm"),
        manifests(&proxy),
        blobs(&proxy),
    );
    assert_eq!((before.0, before.1), (1, 1), "{:?}", modules.all_hits());
    assert!(before.2 >= 1 && before.3 >= 1, "{:?}", proxy.all_hits());
    let metrics = server.metrics().await;
    let fetches = metric(
        &metrics,
        r#"istio_agent_wasm_remote_fetch_count{result="success"}"#,
    );
    let hits = metric(
        &metrics,
        r#"istio_agent_wasm_cache_lookup_count{hit="true"}"#,
    );
    let misses = metric(
        &metrics,
        r#"istio_agent_wasm_cache_lookup_count{hit="false"}"#,
    );
    let pushes = server.handle.shared.resources.stats().pushes;
    let versions: Vec<Option<String>> = plugins_spec
        .iter()
        .map(|(n, _, _)| server.version_of(&resource("default", n)))
        .collect();

    let mut old = BTreeMap::new();
    for (name, url, policy) in &plugins_spec {
        old.insert(*name, server.plugin(&format!("default/{name}")).await);
        write_plugin(
            &plugins,
            &format!("{name}.yaml"),
            &make(name, url, policy, "two"),
        );
    }
    let mut outcomes = BTreeMap::new();
    for (name, _, _) in &plugins_spec {
        let key = format!("default/{name}");
        let p = server.wait_processed_after(&key, &old[name]).await;
        outcomes.insert(*name, p["outcome"].as_str().unwrap_or_default().to_string());
    }
    assert_eq!(outcomes["http-always"], "pulled", "{outcomes:?}");
    assert_eq!(outcomes["http-ifnp"], "cached", "{outcomes:?}");
    assert_eq!(outcomes["oci-always"], "revalidated", "{outcomes:?}");
    assert_eq!(outcomes["oci-ifnp"], "cached", "{outcomes:?}");
    assert_eq!(
        modules.hits("/m/always.wasm"),
        before.0 + 1,
        "Always downloads again"
    );
    assert_eq!(
        modules.hits("/m/ifnp.wasm"),
        before.1,
        "IfNotPresent does not"
    );
    assert_eq!(
        manifests(&proxy),
        before.2 + 1,
        "one manifest request: {:?}",
        proxy.all_hits()
    );
    assert_eq!(
        blobs(&proxy),
        before.3,
        "cached blob not downloaded: {:?}",
        proxy.all_hits()
    );
    let metrics = server.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            r#"istio_agent_wasm_remote_fetch_count{result="success"}"#
        ),
        fetches + 1,
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            r#"istio_agent_wasm_cache_lookup_count{hit="true"}"#
        ),
        hits + 3,
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            r#"istio_agent_wasm_cache_lookup_count{hit="false"}"#
        ),
        misses + 1,
        "{metrics}"
    );
    // Labels are not part of what Envoy receives: same resources, nothing pushed.
    let after: Vec<Option<String>> = plugins_spec
        .iter()
        .map(|(n, _, _)| server.version_of(&resource("default", n)))
        .collect();
    assert_eq!(after, versions);
    assert_eq!(server.handle.shared.resources.stats().pushes, pushes);
    for (name, _, _) in &plugins_spec {
        wait_serving(envoy, name, &json!({"p": name}), &tag(name)).await;
    }
    drop(envoys);
    server.stop().await;
}

/// A module that cannot be obtained is served as RBAC: deny-all (403) under `FAIL_CLOSE`,
/// allow-all under `FAIL_OPEN`. Once the module is published the background retry serves the real
/// filter, without touching the plugin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_module_falls_back_then_retry_serves_it() {
    let Some(registry) = Registry::start(RegistryOptions::plain()).await else {
        return;
    };
    let modules = TestHttp::files().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (plugins, cache) = (dir.path().join("plugins"), dir.path().join("cache"));
    std::fs::create_dir_all(&plugins).expect("plugins dir");
    let closed = plugin(
        "default",
        "closed",
        &registry.oci_url("e2e/later", "v1"),
        json!({"pluginConfig": {"p": "closed"}}),
    );
    let open = plugin(
        "default",
        "open",
        &modules.url("/m/later.wasm"),
        json!({"pluginConfig": {"p": "open"}, "failStrategy": "FAIL_OPEN"}),
    );
    write_plugin(&plugins, "closed.yaml", &closed);
    write_plugin(&plugins, "open.yaml", &open);
    let server = Server::start(
        ServerOptions::new(Delivery::Inline, &plugins, &cache).insecure(&[registry.host()]),
    )
    .await;
    let configs = [XdsTransport::Sotw, XdsTransport::Delta]
        .iter()
        .map(|t| {
            EnvoyConfig::new(*t, server.xds())
                .listener("closed", &[resource("default", "closed")])
                .listener("open", &[resource("default", "open")])
        })
        .collect();
    let Some(envoys) = start_envoys(configs).await else {
        return;
    };
    for envoy in &envoys {
        let (status, config, _) = probe(envoy, "closed").await.expect("request");
        assert_eq!((status, config), (403, None), "FAIL_CLOSE denies");
        let (status, config, _) = probe(envoy, "open").await.expect("request");
        assert_eq!(
            (status, config),
            (200, None),
            "FAIL_OPEN passes without the filter"
        );
    }
    for key in ["default/closed", "default/open"] {
        let p = server.plugin(key).await;
        assert_eq!(p["outcome"], "rejected", "{p}");
        assert!(!p["nextRetryUnixMs"].is_null(), "a retry is scheduled: {p}");
    }

    registry
        .push(
            "e2e/later",
            "v1",
            ImageFormat::Docker,
            &proxy_wasm_test_module_tagged("later-oci"),
        )
        .await;
    modules.put("/m/later.wasm", proxy_wasm_test_module_tagged("later-http"));
    let published = Instant::now();
    for envoy in &envoys {
        let (closed, open) = (json!({"p": "closed"}), json!({"p": "open"}));
        wait_serving_within(envoy, "closed", &closed, "later-oci", RETRY_CONVERGE).await;
        wait_serving_within(envoy, "open", &open, "later-http", RETRY_CONVERGE).await;
    }
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!(
            "\nmodules published → served by the background retry after {:?}\n",
            published.elapsed()
        )
        .as_bytes(),
    );
    for key in ["default/closed", "default/open"] {
        let p = server.plugin(key).await;
        assert_eq!(p["outcome"], "pulled", "{p}");
        assert!(p["nextRetryUnixMs"].is_null(), "no retry left: {p}");
    }
    assert_eq!(server.handle.shared.resources.stats().nacks, 0);
    drop(envoys);
    server.stop().await;
}

/// A valid Wasm binary that is not a proxy-wasm module passes the server's checks but Envoy rejects
/// it: the NACK is recorded once per proxy, the last good config keeps serving, the rejected
/// version is not sent again, and the next good change is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_nack_keeps_last_good_config_without_resend_loop() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (plugins, cache) = (dir.path().join("plugins"), dir.path().join("cache"));
    std::fs::create_dir_all(&plugins).expect("plugins dir");
    let good = dir.path().join("good.wasm");
    let bad = dir.path().join("bad.wasm");
    std::fs::write(&good, proxy_wasm_test_module_tagged("good")).expect("write module");
    std::fs::write(&bad, b"\0asm\x01\0\0\0").expect("write module");
    let make = |path: &Path, n: u32| {
        plugin(
            "default",
            "nack",
            &format!("file://{}", path.display()),
            json!({"pluginConfig": {"n": n}}),
        )
    };
    write_plugin(&plugins, "nack.yaml", &make(&good, 1));
    let server = Server::start(ServerOptions::new(Delivery::File, &plugins, &cache)).await;
    let filter = resource("default", "nack");
    let configs: Vec<EnvoyConfig> = TRANSPORTS
        .iter()
        .map(|t| EnvoyConfig::new(*t, server.xds()).listener("nack", &[&filter]))
        .collect();
    let proxies = configs.len() as u64;
    let Some(envoys) = start_envoys(configs).await else {
        return;
    };
    for envoy in &envoys {
        wait_serving(envoy, "nack", &json!({"n": 1}), "good").await;
    }
    let good_version = server.version_of(&filter).expect("served");

    let before = server.plugin("default/nack").await;
    write_plugin(&plugins, "nack.yaml", &make(&bad, 2));
    let p = server.wait_processed_after("default/nack", &before).await;
    assert_eq!(
        p["outcome"], "pulled",
        "the server accepts a valid Wasm binary: {p}"
    );
    let bad_version = server.version_of(&filter).expect("served");
    assert_ne!(bad_version, good_version);
    let stats = wait_for("one NACK per proxy", CONVERGE, || async {
        let s = server.handle.shared.resources.stats();
        (s.nacks >= proxies).then_some(s).ok_or(format!("{s:?}"))
    })
    .await;
    assert_eq!(stats.nacks, proxies, "{stats:?}");
    for envoy in &envoys {
        let t = envoy.config.transport.name();
        wait_for(
            &format!("envoy ({t}) update_rejected"),
            CONVERGE,
            || async {
                let n = envoy.ecds_counter(&filter, "update_rejected").await;
                (n == 1).then_some(()).ok_or(format!("update_rejected {n}"))
            },
        )
        .await;
        let version = envoy.ecds_stat(&filter, "version_text").await;
        assert_eq!(
            version.as_deref(),
            Some(good_version.as_str()),
            "{t} keeps the last good version"
        );
        wait_serving(envoy, "nack", &json!({"n": 1}), "good").await;
    }
    let metrics = server.metrics().await;
    assert_eq!(
        metric(&metrics, "wasm_ecds_xds_nack_count"),
        proxies,
        "{metrics}"
    );
    // The per-proxy view: each Envoy's stream holds the good version ACKed, the bad one sent and
    // NACKed with Envoy's own error message.
    let syncz = server.syncz().await;
    let streams = syncz["proxies"].as_array().expect("proxies").clone();
    assert_eq!(streams.len() as u64, proxies, "{syncz}");
    let mut transports = std::collections::BTreeSet::new();
    for s in &streams {
        assert!(!s["node"].as_str().unwrap_or("").is_empty(), "{s}");
        assert!(
            s["peer"]
                .as_str()
                .is_some_and(|p| p.starts_with("127.0.0.1:")),
            "{s}"
        );
        transports.insert(format!("{}/{}", s["api"], s["protocol"]));
        let r = &s["resources"][0];
        assert_eq!(r["name"], filter.as_str(), "{s}");
        assert_eq!(r["current"], bad_version.as_str(), "{s}");
        assert_eq!(r["sent"], bad_version.as_str(), "{s}");
        assert_eq!(r["acked"], good_version.as_str(), "{s}");
        assert_eq!(r["nacked"]["version"], bad_version.as_str(), "{s}");
        assert!(
            !r["nacked"]["message"].as_str().unwrap_or("").is_empty(),
            "Envoy's error message: {s}"
        );
        assert_eq!(r["synced"], false, "{s}");
    }
    assert_eq!(
        transports.len() as u64,
        proxies,
        "one stream per transport: {syncz}"
    );
    // No resend loop: nothing more is pushed or NACKed while the resource does not change.
    tokio::time::sleep(QUIET).await;
    let quiet = server.handle.shared.resources.stats();
    assert_eq!(
        (quiet.nacks, quiet.pushes),
        (stats.nacks, stats.pushes),
        "{quiet:?}"
    );
    for envoy in &envoys {
        assert_eq!(envoy.ecds_counter(&filter, "update_rejected").await, 1);
    }

    // The next good change goes through on every stream.
    write_plugin(&plugins, "nack.yaml", &make(&good, 3));
    for envoy in &envoys {
        wait_serving(envoy, "nack", &json!({"n": 3}), "good").await;
        wait_version_matches(envoy, &server, &filter).await;
    }
    assert_eq!(server.handle.shared.resources.stats().nacks, proxies);
    let syncz = wait_for("every proxy synced in /debug/syncz", CONVERGE, || async {
        let v = server.syncz().await;
        let all =
            v["proxies"].as_array().into_iter().flatten().all(|s| {
                s["resources"][0]["synced"] == true && s["resources"][0]["nacked"].is_null()
            });
        all.then_some(v.clone()).ok_or(v.to_string())
    })
    .await;
    assert_eq!(
        syncz["proxies"].as_array().map(Vec::len),
        Some(proxies as usize)
    );
    drop(envoys);
    server.stop().await;
}

/// `wasm-ecds wait`, started before any Envoy runs, returns (exit 0) once every Envoy — one per
/// transport — has ACKed the plugin's current version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_returns_once_every_envoy_acks() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (plugins, cache) = (dir.path().join("plugins"), dir.path().join("cache"));
    std::fs::create_dir_all(&plugins).expect("plugins dir");
    let module = dir.path().join("waited.wasm");
    std::fs::write(&module, proxy_wasm_test_module_tagged("waited")).expect("write module");
    let url = format!("file://{}", module.display());
    write_plugin(
        &plugins,
        "waited.yaml",
        &plugin("default", "waited", &url, json!({})),
    );
    let server = Server::start(ServerOptions::new(Delivery::File, &plugins, &cache)).await;
    let filter = resource("default", "waited");
    let configs: Vec<EnvoyConfig> = TRANSPORTS
        .iter()
        .map(|t| EnvoyConfig::new(*t, server.xds()).listener("waited", &[&filter]))
        .collect();
    let proxies = configs.len();
    if support::require_envoy().is_none() {
        return;
    }
    let wait = std::process::Command::new(env!("CARGO_BIN_EXE_wasm-ecds"))
        .args(["wait", "--server", &server.xds().to_string()])
        .args(["--plugin", "default/waited", "--timeout", "120s"])
        .args(["--acked-by", &proxies.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run wasm-ecds wait");
    let Some(envoys) = start_envoys(configs).await else {
        let mut wait = wait;
        let _ = wait.kill();
        let _ = wait.wait();
        return;
    };
    let out = tokio::task::spawn_blocking(move || wait.wait_with_output().expect("wait output"))
        .await
        .expect("join");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let version = server.version_of(&filter).expect("served");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!(
            "default/waited: version {version} ACKed by {proxies} of {proxies} subscribed proxies"
        )
    );
    for envoy in &envoys {
        assert_eq!(
            envoy.ecds_stat(&filter, "version_text").await.as_deref(),
            Some(version.as_str())
        );
    }
    drop(envoys);
    server.stop().await;
}

/// The server restarts on the same ports while Envoy runs: Envoy keeps serving its last config
/// meanwhile, reconnects, and receives later changes; with the persistent cache, IfNotPresent
/// plugins are served again without a single request to the HTTP server or the registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_reconnects_envoy_and_reuses_the_cache() {
    let Some(registry) = Registry::start(RegistryOptions::plain()).await else {
        return;
    };
    let proxy = TestHttp::proxy(&registry.base_url()).await;
    let modules = TestHttp::files().await;
    modules.put(
        "/m/restart.wasm",
        proxy_wasm_test_module_tagged("restart-http"),
    );
    registry
        .push(
            "e2e/restart",
            "v1",
            ImageFormat::OciArtifact,
            &proxy_wasm_test_module_tagged("restart-oci"),
        )
        .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (plugins, cache) = (dir.path().join("plugins"), dir.path().join("cache"));
    std::fs::create_dir_all(&plugins).expect("plugins dir");
    let http_url = modules.url("/m/restart.wasm");
    let oci_url = format!("oci://{}/e2e/restart:v1", proxy.host());
    let make_http = |n: u32| {
        plugin(
            "default",
            "http",
            &http_url,
            json!({"pluginConfig": {"n": n}}),
        )
    };
    let make_oci = |n: u32| {
        plugin(
            "default",
            "oci",
            &oci_url,
            json!({"pluginConfig": {"n": n}}),
        )
    };
    write_plugin(&plugins, "http.yaml", &make_http(1));
    write_plugin(&plugins, "oci.yaml", &make_oci(1));
    let opts = || ServerOptions::new(Delivery::File, &plugins, &cache).insecure(&[proxy.host()]);
    let server = Server::start(opts()).await;
    let (xds, admin) = (server.xds(), server.admin());
    let configs = TRANSPORTS
        .iter()
        .map(|t| {
            EnvoyConfig::new(*t, xds)
                .listener("http", &[resource("default", "http")])
                .listener("oci", &[resource("default", "oci")])
        })
        .collect();
    let Some(envoys) = start_envoys(configs).await else {
        return;
    };
    for envoy in &envoys {
        wait_serving(envoy, "http", &json!({"n": 1}), "restart-http").await;
        wait_serving(envoy, "oci", &json!({"n": 1}), "restart-oci").await;
    }
    let (http_hits, registry_hits) = (modules.hits("/m/restart.wasm"), proxy.all_hits());
    assert_eq!(http_hits, 1);

    server.stop().await;
    for envoy in &envoys {
        wait_xds_connected(envoy, false).await;
    }
    // Envoy keeps its last config while the server is away.
    for envoy in &envoys {
        for (listener, tag) in [("http", "restart-http"), ("oci", "restart-oci")] {
            let got = probe(envoy, listener).await;
            let want = (
                200,
                Some(json!({"n": 1}).to_string()),
                Some(tag.to_string()),
            );
            assert_eq!(
                got,
                Ok(want),
                "{} while the server is down",
                envoy.config.transport.name()
            );
        }
    }
    let server = Server::start(opts().addresses(xds, admin)).await;
    assert_eq!(server.xds(), xds);
    let streams = wait_for("every Envoy reconnected", CONVERGE, || async {
        let s = server.handle.shared.resources.stats();
        (s.connected_streams as usize
            == envoys.iter().map(|e| streams_of(&e.config)).sum::<usize>())
        .then_some(s)
        .ok_or(format!("{s:?}"))
    })
    .await;
    assert_eq!(streams.nacks, 0);
    for envoy in &envoys {
        wait_xds_connected(envoy, true).await;
    }
    for key in ["default/http", "default/oci"] {
        let p = server.plugin(key).await;
        assert_eq!(p["outcome"], "cached", "IfNotPresent after restart: {p}");
    }
    assert_eq!(
        modules.hits("/m/restart.wasm"),
        http_hits,
        "no re-download over http"
    );
    assert_eq!(
        proxy.all_hits(),
        registry_hits,
        "no request to the registry"
    );
    // A proxy that reconnects holding what the new server would send gets nothing (versions name
    // the bytes, not the process), so its `version_text` is simply still right. Over ADS it names
    // the set of both filters; it is checked after the next change.
    for envoy in envoys.iter().filter(|e| streams_of(&e.config) > 1) {
        for name in ["http", "oci"] {
            let filter = resource("default", name);
            wait_for("version_text after reconnect", CONVERGE, || async {
                let (current, shown) = (
                    server.version_of(&filter),
                    envoy.ecds_stat(&filter, "version_text").await,
                );
                (current.is_some() && current == shown)
                    .then_some(())
                    .ok_or(format!("server {current:?}, envoy {shown:?}"))
            })
            .await;
        }
    }

    // Changes reach the reconnected streams.
    write_plugin(&plugins, "http.yaml", &make_http(2));
    write_plugin(&plugins, "oci.yaml", &make_oci(2));
    for envoy in &envoys {
        wait_serving(envoy, "http", &json!({"n": 2}), "restart-http").await;
        wait_serving(envoy, "oci", &json!({"n": 2}), "restart-oci").await;
        for name in ["http", "oci"] {
            wait_version_matches(envoy, &server, &resource("default", name)).await;
        }
    }
    assert_eq!(modules.hits("/m/restart.wasm"), http_hits);
    assert_eq!(proxy.all_hits(), registry_hits);
    assert_eq!(server.handle.shared.resources.stats().nacks, 0);
    drop(envoys);
    server.stop().await;
}

/// `examples/envoy/module.wat` is the tests' module (tag `example`) as a file: both assemble to the
/// same bytes, so the example shows exactly what these tests exercise.
#[test]
fn example_module_is_the_test_module() {
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/envoy/module.wat");
    let assembled = wat::parse_file(&file).expect("examples/envoy/module.wat assembles");
    assert!(
        assembled == proxy_wasm_test_module_tagged("example"),
        "{} differs from proxy_wasm_test_module_tagged(\"example\"): regenerate it",
        file.display()
    );
}
