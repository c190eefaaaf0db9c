//! A real Envoy behind `wasm-ecds proxy` whose upstream control plane is the Python xDS server of
//! [`super::upstream`] (`tests/proxy_envoy.rs`): Envoy's bootstrap holds nothing but ADS to the
//! proxy and LDS over ADS; the upstream sends the listener ([`listener`]: an HTTP connection
//! manager whose ECDS filter [`FILTER`] asks for its config over ADS) and remote-load Wasm configs
//! for that filter ([`Remote`], in the forms Istio's control plane uses). [`Fixture`] runs the
//! three; [`Modules`] is a module server whose modules a test changes; [`Probe`] is what a request
//! through the listener got.
//!
//! Every wait is bounded ([`super::envoy::wait_for`]) and fails the test with what was last seen.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use sha2::Digest as _;
use wasm_ecds::config::{Config, Delivery};
use wasm_ecds::proxy::UpstreamOptions;
use wasm_ecds::serve::ServerHandle;

use super::envoy::{wait_for, Envoy, EnvoyConfig, XdsTransport, TYPE_URLS};
use super::faults::{RawReply, RawServer};
use super::upstream::{
    ecds_resource, Upstream, ECDS_TYPE_URL, LDS_TYPE_URL, TYPED_STRUCT_TYPE_URL, WASM_TYPE_URL,
};
use super::wasm::{CONFIG_HEADER, MODULE_HEADER};

/// Bound of every wait for Envoy to converge (a failure, never a threshold).
pub const CONVERGE: Duration = Duration::from_secs(30);

/// The ECDS resource and the HTTP filter asking for it.
pub const FILTER: &str = "istio.basic_auth";
pub const LISTENER: &str = "proxied_in";
pub const STAT_PREFIX: &str = "proxied_http";
pub const PROXY_CLUSTER: &str = "wasm_ecds_proxy";
pub const HCM_TYPE_URL: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
pub const ROUTER_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";

// -------------------------------------------------------------------------------------------------
// What the upstream sends and what Envoy starts from.

/// Envoy's bootstrap: ADS (`GRPC` or `DELTA_GRPC`) to the proxy, LDS over ADS, nothing else.
pub fn bootstrap(transport: XdsTransport, proxy: SocketAddr) -> String {
    let api_type = match transport {
        XdsTransport::DeltaAds => "DELTA_GRPC",
        _ => "GRPC",
    };
    let address =
        |ip: String, port: u16| json!({"socket_address": {"address": ip, "port_value": port}});
    json!({
        "node": {"id": format!("proxied-{}", transport.name()), "cluster": "wasm-ecds-e2e"},
        "admin": {"address": address("127.0.0.1".into(), 0)},
        "dynamic_resources": {
            "ads_config": {
                "api_type": api_type,
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {
                    "cluster_name": PROXY_CLUSTER,
                    "retry_policy": {"retry_back_off": {"base_interval": "0.1s", "max_interval": "1s"}},
                }}],
            },
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {"clusters": [{
            "name": PROXY_CLUSTER,
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {"cluster_name": PROXY_CLUSTER, "endpoints": [{"lb_endpoints": [{
                "endpoint": {"address": address(proxy.ip().to_string(), proxy.port())},
            }]}]},
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                },
            },
        }]},
    })
    .to_string()
}

/// The listener the upstream sends (proto3 JSON, without its `@type`): an HTTP connection manager
/// on a free port whose chain is the ECDS filter (Wasm or its RBAC fallback, over ADS, waiting for
/// its first config), then a router to a direct response.
pub fn listener() -> Value {
    json!({
        "name": LISTENER,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": HCM_TYPE_URL,
                "stat_prefix": STAT_PREFIX,
                "route_config": {"name": "local", "virtual_hosts": [{
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{
                        "match": {"prefix": "/"},
                        "direct_response": {"status": 200, "body": {"inline_string": "ok"}},
                    }],
                }]},
                "http_filters": [
                    {"name": FILTER, "config_discovery": {
                        "config_source": {
                            "ads": {},
                            "initial_fetch_timeout": "0s",
                            "resource_api_version": "V3",
                        },
                        "type_urls": TYPE_URLS,
                    }},
                    {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE_URL}},
                ],
            },
        }]}],
    })
}

pub fn lds_resource() -> Value {
    let mut l = listener();
    l["@type"] = LDS_TYPE_URL.into();
    l
}

/// A remote-load Wasm config as Istio's control plane sends it for [`FILTER`].
#[derive(Clone, Debug)]
pub struct Remote {
    pub url: String,
    pub sha256: String,
    /// The plugin configuration, which the module echoes.
    pub config: String,
    pub env: Value,
    pub typed_struct: bool,
    pub fail_open: bool,
}

impl Remote {
    pub fn new(url: &str, config: &str) -> Remote {
        Remote {
            url: url.to_string(),
            sha256: String::new(),
            config: config.to_string(),
            env: json!({}),
            typed_struct: false,
            fail_open: false,
        }
    }

    pub fn sha256(mut self, hex: &str) -> Remote {
        self.sha256 = hex.to_string();
        self
    }

    /// Istio's variables (pull policy and resource version) and one of the user's own.
    pub fn istio_env(mut self, policy: &str, resource_version: &str) -> Remote {
        self.env = json!({
            "ISTIO_META_WASM_IMAGE_PULL_POLICY": policy,
            "ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION": resource_version,
            "KEEP": "me",
        });
        self
    }

    pub fn typed_struct(mut self) -> Remote {
        self.typed_struct = true;
        self
    }

    pub fn fail_open(mut self) -> Remote {
        self.fail_open = true;
        self
    }

    /// The ECDS resource (proto3 JSON with its `@type`).
    pub fn resource(&self) -> Value {
        let mut code = json!({"http_uri": {"uri": self.url, "cluster": "_", "timeout": "10s"}});
        if !self.sha256.is_empty() {
            code["sha256"] = self.sha256.clone().into();
        }
        let config = json!({
            "name": "basic-auth",
            "root_id": "auth_root",
            "failure_policy": if self.fail_open { "FAIL_OPEN" } else { "FAIL_CLOSED" },
            "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": self.config},
            "vm_config": {
                "vm_id": "auth",
                "runtime": "envoy.wasm.runtime.v8",
                "environment_variables": {"key_values": self.env},
                "code": {"remote": code},
            },
        });
        let typed = if self.typed_struct {
            json!({"@type": TYPED_STRUCT_TYPE_URL, "type_url": WASM_TYPE_URL, "value": {"config": config}})
        } else {
            json!({"@type": WASM_TYPE_URL, "config": config})
        };
        ecds_resource(FILTER, typed)
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

// -------------------------------------------------------------------------------------------------
// Servers.

/// An HTTP module server whose modules a test replaces; a path without a module answers 503.
pub struct Modules {
    server: RawServer,
    replies: Arc<Mutex<BTreeMap<String, RawReply>>>,
}

impl Modules {
    pub async fn start() -> Modules {
        let replies: Arc<Mutex<BTreeMap<String, RawReply>>> = Arc::default();
        let served = replies.clone();
        let server = RawServer::start(move |path, _| {
            let replies = served.lock().expect("modules lock");
            replies.get(path).cloned().unwrap_or(RawReply::Full {
                status: 503,
                headers: Vec::new(),
                body: b"not yet".to_vec(),
            })
        })
        .await;
        Modules { server, replies }
    }

    /// Serves `bytes` at `path` from now on.
    pub fn put(&self, path: &str, bytes: Vec<u8>) {
        self.reply(path, RawReply::ok(bytes));
    }

    /// Answers requests for `path` with a head and then nothing (until the client gives up).
    pub fn stall(&self, path: &str) {
        let stall = RawReply::Stall {
            announced: 1 << 20,
            body: Vec::new(),
        };
        self.reply(path, stall);
    }

    fn reply(&self, path: &str, reply: RawReply) {
        let mut replies = self.replies.lock().expect("modules lock");
        replies.insert(path.to_string(), reply);
    }

    pub fn url(&self, path: &str) -> String {
        self.server.url(path)
    }

    pub fn hits(&self, path: &str) -> usize {
        self.server.requests().iter().filter(|p| *p == path).count()
    }
}

/// The upstream, the proxy in front of it and Envoy behind the proxy.
pub struct Fixture {
    pub envoy: Envoy,
    pub up: Upstream,
    pub proxy: ServerHandle,
    _cache: tempfile::TempDir,
}

impl Fixture {
    /// Starts the upstream holding the listener (`l1`) and `first` (`e1`), the proxy (plain-HTTP
    /// registries: `insecure`) and Envoy, and waits until Envoy is ready (its listener warmed
    /// with the first config). `None` after a SKIP when a tool is missing (never under `CI=true`).
    pub async fn start(
        transport: XdsTransport,
        insecure: &[String],
        first: &Remote,
    ) -> Option<Self> {
        Self::start_with(transport, insecure, first.resource()).await
    }

    /// [`Fixture::start`] with the first ECDS resource given as the upstream's JSON.
    pub async fn start_with(
        transport: XdsTransport,
        insecure: &[String],
        first: Value,
    ) -> Option<Self> {
        let bin = super::require_envoy()?;
        let up = Upstream::start()?;
        up.set(LDS_TYPE_URL, "l1", vec![lds_resource()]);
        up.set(ECDS_TYPE_URL, "e1", vec![first]);
        let cache = tempfile::tempdir().expect("cache dir");
        let config = Config {
            cache_dir: cache.path().to_path_buf(),
            delivery: Delivery::File,
            http_request_max_retries: 1,
            insecure_registries: insecure.to_vec(),
            ..Config::default()
        };
        let proxy = super::serve::in_process(
            config,
            Vec::new(),
            Some(UpstreamOptions {
                address: up.addr().to_string(),
                ..Default::default()
            }),
        )
        .await;
        let given = EnvoyConfig::given(transport, bootstrap(transport, proxy.xds_address));
        let envoy = Envoy::start_with(&bin, given).await;
        envoy.wait_ready().await;
        Some(Fixture {
            envoy,
            up,
            proxy,
            _cache: cache,
        })
    }

    pub async fn stop(self) {
        drop(self.envoy);
        tokio::time::timeout(Duration::from_secs(10), self.proxy.shutdown())
            .await
            .expect("proxy shuts down");
    }

    /// Status and module headers of a request through the listener.
    pub async fn probe(&self) -> Result<Probe, String> {
        let r = self.envoy.get(LISTENER, "/").await?;
        Ok(Probe {
            status: r.status,
            config: r.header(CONFIG_HEADER).map(str::to_string),
            module: r.header(MODULE_HEADER).map(str::to_string),
        })
    }

    /// Waits until requests through the listener get `want`.
    pub async fn wait_probe(&self, want: Probe, timeout: Duration) {
        wait_for(&format!("envoy serving {want:?}"), timeout, || async {
            let got = self.probe().await?;
            (got == want).then_some(()).ok_or(format!("{got:?}"))
        })
        .await
    }

    /// Envoy's `version_text` of the ECDS filter.
    pub async fn ecds_version(&self) -> Option<String> {
        self.envoy.ecds_stat(FILTER, "version_text").await
    }

    pub async fn wait_ecds_version(&self, version: &str) {
        wait_for(&format!("envoy at ECDS {version}"), CONVERGE, || async {
            let v = self.ecds_version().await;
            (v.as_deref() == Some(version))
                .then_some(())
                .ok_or(format!("{v:?}"))
        })
        .await
    }

    /// Envoy's counter `stat` of the ECDS filter (`update_success`, `update_rejected`, …).
    pub async fn ecds_counter(&self, stat: &str) -> u64 {
        self.envoy.ecds_counter(FILTER, stat).await
    }

    /// The ECDS config Envoy holds for [`FILTER`] (`/config_dump?resource=ecds_filters`).
    pub async fn ecds_dump(&self) -> Value {
        let r = self.envoy.admin("/config_dump?resource=ecds_filters").await;
        let dump: Value = serde_json::from_slice(&r.expect("config_dump").body).expect("JSON");
        (dump["configs"].as_array().into_iter().flatten())
            .find(|c| c["ecds_filter"]["name"] == FILTER)
            .cloned()
            .unwrap_or_else(|| panic!("no ECDS config {FILTER} in {dump}"))
    }

    /// Response events of `type_url` the upstream sent since `mark`.
    pub fn upstream_responses_since(&self, mark: usize, type_url: &str) -> Vec<Value> {
        let events = self.up.events_since(mark);
        let of_type = |e: &Value| e["event"] == "response" && e["type_url"] == type_url;
        events.into_iter().filter(of_type).collect()
    }
}

/// What a request through the listener got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub status: u16,
    pub config: Option<String>,
    pub module: Option<String>,
}

impl Probe {
    /// The test module `tag` running with configuration `config`.
    pub fn module(config: &str, tag: &str) -> Probe {
        Probe {
            status: 200,
            config: Some(config.to_string()),
            module: Some(tag.to_string()),
        }
    }

    /// The RBAC deny-all fallback.
    pub fn denied() -> Probe {
        Probe {
            status: 403,
            config: None,
            module: None,
        }
    }

    /// The RBAC allow-all fallback: the route answers, no module runs.
    pub fn allowed() -> Probe {
        Probe {
            status: 200,
            config: None,
            module: None,
        }
    }
}
