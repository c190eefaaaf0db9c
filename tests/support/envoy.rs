//! A real Envoy for end-to-end tests (guides/envoy.md): a generated bootstrap whose listeners run
//! ECDS filters under test, started with `--disable-hot-restart`, admin and listeners on port 0
//! (`--admin-address-path`), killed on drop. Helpers read readiness, listener ports and stats, and
//! send plain HTTP requests through a listener.
//!
//! Every listener is an HTTP connection manager whose chain is the given ECDS filters (named after
//! the ECDS resource, `extensions.istio.io/wasmplugin/<ns>.<name>`, accepting the HTTP Wasm and
//! HTTP RBAC type URLs) followed by a router to a direct response (200 `ok`). The xDS cluster
//! `wasm_ecds` is HTTP/2 to the server's xDS address; with `--delivery http` the cluster
//! `wasm_ecds_modules` points at the server's admin address; both may use TLS ([`EnvoyTls`]).
//! Filters subscribe over state of the world, delta, or the aggregated stream ([`XdsTransport`]).
//!
//! Every wait is bounded and fails the test with the Envoy log attached; none is a performance
//! threshold.

use std::collections::BTreeMap;
use std::fs;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::require_envoy;

/// How long Envoy may take to write its admin address.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the listeners may take to warm (every ECDS filter received its first config).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// One HTTP request to the admin endpoint or a listener.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval of every poll in this module.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Name of the xDS cluster in the generated bootstrap.
pub const XDS_CLUSTER: &str = "wasm_ecds";
/// Type URLs every ECDS filter accepts: the Wasm filter and its RBAC fallback (behavior.md §7).
pub const TYPE_URLS: [&str; 2] = [
    "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
    "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
];

/// How the ECDS filters subscribe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum XdsTransport {
    /// `api_type: GRPC`: `StreamExtensionConfigs`.
    Sotw,
    /// `api_type: DELTA_GRPC`: `DeltaExtensionConfigs`.
    Delta,
    /// `ads: {}` with a `GRPC` `ads_config`: `StreamAggregatedResources`.
    Ads,
    /// `ads: {}` with a `DELTA_GRPC` `ads_config`: `DeltaAggregatedResources`.
    DeltaAds,
}

impl XdsTransport {
    pub const ALL: [XdsTransport; 4] = [
        XdsTransport::Sotw,
        XdsTransport::Delta,
        XdsTransport::Ads,
        XdsTransport::DeltaAds,
    ];

    pub fn name(self) -> &'static str {
        match self {
            XdsTransport::Sotw => "sotw",
            XdsTransport::Delta => "delta",
            XdsTransport::Ads => "ads",
            XdsTransport::DeltaAds => "delta-ads",
        }
    }

    fn api_type(self) -> &'static str {
        match self {
            XdsTransport::Sotw | XdsTransport::Ads => "GRPC",
            XdsTransport::Delta | XdsTransport::DeltaAds => "DELTA_GRPC",
        }
    }

    fn is_ads(self) -> bool {
        matches!(self, XdsTransport::Ads | XdsTransport::DeltaAds)
    }
}

/// One listener: a name (for [`Envoy::listener_port`]) and its ECDS filters, in chain order.
#[derive(Clone, Debug)]
pub struct ListenerSpec {
    pub name: String,
    pub filters: Vec<String>,
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct EnvoyConfig {
    pub transport: XdsTransport,
    /// The server's xDS address.
    pub xds: SocketAddr,
    /// The server's admin address, for `--delivery http` (cluster `wasm_ecds_modules`).
    pub modules: Option<SocketAddr>,
    pub listeners: Vec<ListenerSpec>,
    /// `initial_fetch_timeout` of every filter; zero: a listener waits for its first config.
    pub initial_fetch_timeout: Duration,
    /// Reconnect backoff of the xDS stream (`envoy_grpc.retry_policy.retry_back_off`): short, so a
    /// restarted server is found again quickly.
    pub retry_base: Duration,
    pub retry_max: Duration,
    pub node_id: String,
    /// A bootstrap given whole (JSON), e.g. by `wasm-ecds bootstrap --full --json`: used as is
    /// instead of one generated from the fields above.
    pub given: Option<String>,
    /// TLS to the server's ports (the xDS cluster and the module cluster), else plain text.
    pub tls: Option<EnvoyTls>,
}

/// How Envoy's clusters to the server verify it and, for mTLS, present a client certificate.
#[derive(Clone, Debug)]
pub struct EnvoyTls {
    /// PEM CA certificates the server's certificate is verified against.
    pub ca: PathBuf,
    /// PEM certificate chain and key Envoy presents.
    pub client: Option<(PathBuf, PathBuf)>,
}

impl EnvoyTls {
    /// An `UpstreamTlsContext` transport socket offering `alpn`, sending SNI `localhost`.
    fn transport_socket(&self, alpn: &str) -> Value {
        let mut common = json!({
            "validation_context": {"trusted_ca": {"filename": self.ca}},
            "alpn_protocols": [alpn],
        });
        if let Some((cert, key)) = &self.client {
            common["tls_certificates"] = json!([{
                "certificate_chain": {"filename": cert},
                "private_key": {"filename": key},
            }]);
        }
        json!({"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": "localhost",
            "common_tls_context": common,
        }})
    }
}

impl EnvoyConfig {
    pub fn new(transport: XdsTransport, xds: SocketAddr) -> Self {
        EnvoyConfig {
            transport,
            xds,
            modules: None,
            listeners: Vec::new(),
            initial_fetch_timeout: Duration::ZERO,
            retry_base: Duration::from_millis(100),
            retry_max: Duration::from_secs(1),
            node_id: format!("e2e-{}", transport.name()),
            given: None,
            tls: None,
        }
    }

    /// Envoy runs `bootstrap` (JSON) as is; `transport` only names it in messages.
    pub fn given(transport: XdsTransport, bootstrap: String) -> Self {
        let mut c = Self::new(transport, "127.0.0.1:0".parse().expect("address"));
        c.given = Some(bootstrap);
        c
    }

    /// Points the `wasm_ecds_modules` cluster at the server's admin address (`--delivery http`).
    pub fn modules(mut self, admin: SocketAddr) -> Self {
        self.modules = Some(admin);
        self
    }

    /// TLS (and with a client certificate, mTLS) to the server's ports.
    pub fn tls(mut self, tls: EnvoyTls) -> Self {
        self.tls = Some(tls);
        self
    }

    pub fn node_id(mut self, id: &str) -> Self {
        self.node_id = id.to_string();
        self
    }

    /// Adds a listener running `filters` (ECDS resource names) in order.
    pub fn listener<S: AsRef<str>>(mut self, name: &str, filters: &[S]) -> Self {
        self.listeners.push(ListenerSpec {
            name: name.to_string(),
            filters: filters.iter().map(|f| f.as_ref().to_string()).collect(),
        });
        self
    }

    /// The bootstrap (JSON, which Envoy reads as YAML).
    pub fn bootstrap(&self) -> String {
        if let Some(given) = &self.given {
            return given.clone();
        }
        let secs = |d: Duration| format!("{}s", d.as_secs_f64());
        let grpc_services = json!([{"envoy_grpc": {
            "cluster_name": XDS_CLUSTER,
            "retry_policy": {"retry_back_off": {
                "base_interval": secs(self.retry_base),
                "max_interval": secs(self.retry_max),
            }},
        }}]);
        let api_config_source = json!({
            "api_type": self.transport.api_type(),
            "transport_api_version": "V3",
            "grpc_services": grpc_services,
        });
        let mut config_source = json!({
            "resource_api_version": "V3",
            "initial_fetch_timeout": secs(self.initial_fetch_timeout),
        });
        if self.transport.is_ads() {
            config_source["ads"] = json!({});
        } else {
            config_source["api_config_source"] = api_config_source.clone();
        }
        let listeners: Vec<Value> = self
            .listeners
            .iter()
            .map(|l| {
                let mut filters: Vec<Value> = l
                    .filters
                    .iter()
                    .map(|f| {
                        json!({"name": f, "config_discovery": {
                            "config_source": config_source,
                            "type_urls": TYPE_URLS,
                        }})
                    })
                    .collect();
                filters.push(json!({"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
                }}));
                json!({
                    "name": l.name,
                    "address": socket_address("127.0.0.1", 0),
                    "filter_chains": [{"filters": [{
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": l.name,
                            "route_config": {"name": l.name, "virtual_hosts": [{
                                "name": "all",
                                "domains": ["*"],
                                "routes": [{
                                    "match": {"prefix": "/"},
                                    "direct_response": {"status": 200, "body": {"inline_string": "ok"}},
                                }],
                            }]},
                            "http_filters": filters,
                        },
                    }]}],
                })
            })
            .collect();
        let mut clusters = vec![cluster(XDS_CLUSTER, self.xds, true)];
        if let Some(admin) = self.modules {
            clusters.push(cluster(wasm_ecds::serve::MODULES_CLUSTER, admin, false));
        }
        if let Some(tls) = &self.tls {
            clusters[0]["transport_socket"] = tls.transport_socket("h2");
            if let Some(modules) = clusters.get_mut(1) {
                modules["transport_socket"] = tls.transport_socket("http/1.1");
            }
        }
        let mut bootstrap = json!({
            "node": {"id": self.node_id, "cluster": "wasm-ecds-e2e"},
            "admin": {"address": socket_address("127.0.0.1", 0)},
            "static_resources": {"listeners": listeners, "clusters": clusters},
        });
        if self.transport.is_ads() {
            bootstrap["dynamic_resources"] = json!({"ads_config": api_config_source});
        }
        serde_json::to_string_pretty(&bootstrap).expect("bootstrap serializes")
    }
}

fn socket_address(ip: impl ToString, port: u16) -> Value {
    json!({"socket_address": {"address": ip.to_string(), "port_value": port}})
}

/// A STATIC cluster of one endpoint; HTTP/2 for gRPC (guides/envoy.md: the xDS cluster must be).
fn cluster(name: &str, addr: SocketAddr, http2: bool) -> Value {
    let mut c = json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{
            "endpoint": {"address": socket_address(addr.ip(), addr.port())},
        }]}]},
    });
    if http2 {
        c["typed_extension_protocol_options"] = json!({
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            },
        });
    }
    c
}

pub use super::HttpResponse;

/// `GET url` on a fresh connection (no pooling: every request sees the current filter chain).
pub async fn http_get(url: &str) -> Result<HttpResponse, String> {
    http_request("GET", url).await
}

/// A request without body on a fresh connection, under [`REQUEST_TIMEOUT`].
pub async fn http_request(method: &str, url: &str) -> Result<HttpResponse, String> {
    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http();
    let request = http::Request::builder()
        .method(method)
        .uri(url)
        .body(Empty::new())
        .map_err(|e| format!("{method} {url}: {e}"))?;
    let exchange = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| format!("{method} {url}: {e:?}"))?;
        HttpResponse::read(response, &format!("{method} {url}")).await
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("{method} {url}: no answer within {REQUEST_TIMEOUT:?}"))?
}

/// Polls `check` every [`POLL_INTERVAL`] until it returns `Some`, for at most `timeout`; then
/// panics with `what` and the last `Err` description `check` gave.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let started = Instant::now();
    let mut last;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(e) => last = e,
        }
        if started.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}; last state: {last}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// A running Envoy; killed on drop (its log is printed when the test is panicking).
pub struct Envoy {
    child: Child,
    dir: tempfile::TempDir,
    admin: SocketAddr,
    pub config: EnvoyConfig,
}

impl std::fmt::Debug for Envoy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Envoy")
            .field("admin", &self.admin)
            .field("transport", &self.config.transport)
            .finish_non_exhaustive()
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let tail: String = {
                let lines: Vec<&str> = log.lines().collect();
                lines[lines.len().saturating_sub(60)..].join("\n")
            };
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                format!(
                    "\n--- envoy ({}) log tail ---\n{tail}\n--- end of envoy log ---\n",
                    self.config.transport.name()
                )
                .as_bytes(),
            );
        }
    }
}

impl Envoy {
    /// Writes the bootstrap, starts Envoy and waits for its admin address (not for readiness: see
    /// [`Envoy::wait_ready`]).
    ///
    /// Returns `None`, after a loud SKIP message, when no Envoy binary is found, except under
    /// `CI=true` where that panics. Panics when Envoy exits or does not come up.
    pub async fn start(config: EnvoyConfig) -> Option<Envoy> {
        let bin = require_envoy()?;
        Some(Self::start_with(&bin, config).await)
    }

    /// [`Envoy::start`] with a known binary.
    pub async fn start_with(bin: &Path, config: EnvoyConfig) -> Envoy {
        let dir = tempfile::tempdir().expect("temp dir");
        let bootstrap = dir.path().join("bootstrap.json");
        fs::write(&bootstrap, config.bootstrap()).expect("write bootstrap");
        let admin_path = dir.path().join("admin-address");
        let log = fs::File::create(dir.path().join("envoy.log")).expect("envoy log");
        let child = Command::new(bin)
            .arg("-c")
            .arg(&bootstrap)
            .arg("--disable-hot-restart")
            .arg("--admin-address-path")
            .arg(&admin_path)
            .args(["--concurrency", "1", "-l", "warning"])
            .args(["--component-log-level", "wasm:info,config:info"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
        let mut envoy = Envoy {
            child,
            dir,
            admin: "127.0.0.1:0".parse().expect("address"),
            config,
        };
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = envoy.child.try_wait() {
                panic!(
                    "envoy exited with {status} during start; bootstrap:\n{}\nlog:\n{}",
                    envoy.config.bootstrap(),
                    envoy.log()
                );
            }
            let text = fs::read_to_string(&admin_path).unwrap_or_default();
            if let Ok(addr) = text.trim().parse::<SocketAddr>() {
                envoy.admin = addr;
                return envoy;
            }
            if started.elapsed() > START_TIMEOUT {
                panic!(
                    "envoy wrote no admin address within {START_TIMEOUT:?}; log:\n{}",
                    envoy.log()
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Everything Envoy logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("envoy.log")).unwrap_or_default()
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Panics (with the log) when Envoy is no longer running.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("envoy exited with {status}; log:\n{}", self.log());
        }
    }

    pub fn admin_address(&self) -> SocketAddr {
        self.admin
    }

    /// `GET` on the admin endpoint.
    pub async fn admin(&self, path: &str) -> Result<HttpResponse, String> {
        http_get(&format!("http://{}{path}", self.admin)).await
    }

    /// Waits until `/ready` answers 200 (every listener warmed), for at most [`READY_TIMEOUT`].
    pub async fn wait_ready(&self) {
        wait_for(
            &format!("envoy ({}) /ready", self.config.transport.name()),
            READY_TIMEOUT,
            || async {
                let r = self.admin("/ready").await?;
                if r.status == 200 {
                    Ok(())
                } else {
                    Err(format!("/ready: {} {}", r.status, r.text().trim()))
                }
            },
        )
        .await
    }

    /// The bound port of listener `name`, from `/listeners?format=json`.
    pub async fn listener_port(&self, name: &str) -> u16 {
        let r = self
            .admin("/listeners?format=json")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let v: Value = serde_json::from_slice(&r.body).expect("/listeners is JSON");
        v["listener_statuses"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["name"] == name)
            .and_then(|l| l["local_address"]["socket_address"]["port_value"].as_u64())
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or_else(|| panic!("no bound listener {name} in {}", r.text()))
    }

    /// `GET path` through listener `name`.
    pub async fn get(&self, listener: &str, path: &str) -> Result<HttpResponse, String> {
        let port = self.listener_port(listener).await;
        http_get(&format!("http://127.0.0.1:{port}{path}")).await
    }

    /// Every counter, gauge and text readout, by name (values as text: numbers or strings).
    pub async fn stats(&self) -> BTreeMap<String, String> {
        let r = self
            .admin("/stats?format=json")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let v: Value = serde_json::from_slice(&r.body).expect("/stats is JSON");
        v["stats"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| {
                let name = s.get("name")?.as_str()?.to_string();
                let value = match s.get("value")? {
                    Value::String(t) => t.clone(),
                    other => other.to_string(),
                };
                Some((name, value))
            })
            .collect()
    }

    /// Stat `extension_config_discovery.http_filter.<filter>.<stat>` (e.g. `version_text`,
    /// `update_success`, `update_rejected`, `config_fail`); `None` when Envoy has none.
    pub async fn ecds_stat(&self, filter: &str, stat: &str) -> Option<String> {
        let name = format!("extension_config_discovery.http_filter.{filter}.{stat}");
        self.stats().await.remove(&name)
    }

    /// Every `…control_plane.connected_state` gauge: one per ECDS subscription (under its filter's
    /// stats) for `GRPC`/`DELTA_GRPC` sources, one in all (`control_plane.`) over ADS.
    pub async fn xds_connected_states(&self) -> BTreeMap<String, bool> {
        self.stats()
            .await
            .into_iter()
            .filter(|(k, _)| k.ends_with("control_plane.connected_state"))
            .map(|(k, v)| (k, v == "1"))
            .collect()
    }

    /// [`Envoy::ecds_stat`] as a number (0 when absent).
    pub async fn ecds_counter(&self, filter: &str, stat: &str) -> u64 {
        self.ecds_stat(filter, stat)
            .await
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}
