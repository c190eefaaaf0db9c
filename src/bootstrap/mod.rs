//! `wasm-ecds bootstrap` (docs/cli.md): which plugins apply to one workload, in which order, and the
//! Envoy filter entries that subscribe to them over ECDS. Pure: plugins and a workload in, JSON
//! values out; reading files and printing is the CLI's job (`cli/bootstrap.rs`), a whole Envoy
//! bootstrap around the filters is [`full`].
//!
//! Selection follows Istio's `WasmPlugin` rules: a plugin applies to workloads of its own namespace
//! (all namespaces for the root namespace) that its `selector`, `targetRef(s)` and `match` accept.
//! Order follows Istio too: phase, then priority (highest first), then root-namespace plugins
//! before the workload's own, then name.

pub mod full;

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};

use crate::convert::{
    ALLOW_STAT_PREFIX, DENY_STAT_PREFIX, HTTP_RBAC_TYPE_URL, HTTP_WASM_TYPE_URL,
    NETWORK_RBAC_TYPE_URL, NETWORK_WASM_TYPE_URL,
};
use crate::plugin::{FailStrategy, PluginType, PolicyTargetReference, WasmPlugin};

/// Istio's default root namespace: its plugins apply to every namespace.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";
/// The pod label naming the Gateway API gateway a workload implements.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// API group of Gateway API `Gateway` and `GatewayClass` references.
pub const GATEWAY_API_GROUP: &str = "gateway.networking.k8s.io";
/// Name of the xDS cluster (wasm-ecds' gRPC address) when none is given.
pub const DEFAULT_XDS_CLUSTER: &str = "wasm_ecds";
/// `initial_fetch_timeout` of every filter when none is given.
pub const DEFAULT_INITIAL_FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Which side of the traffic the listener handles, for `spec.match[].mode`: Istio's sidecar
/// outbound or gateway listeners are `Client`, sidecar inbound listeners `Server`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrafficMode {
    Client,
    Server,
}

/// The proxy the filters are for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub namespace: String,
    /// Pod labels (a Gateway API gateway's carry [`GATEWAY_NAME_LABEL`]).
    pub labels: BTreeMap<String, String>,
    /// Services this proxy serves as a waypoint: `targetRefs` of kind `Service` or `ServiceEntry`
    /// with one of these names select it.
    pub services: Vec<String>,
    /// The `GatewayClass` of the gateway, for root-namespace `targetRefs` of that kind.
    pub gateway_class: Option<String>,
    /// The listener's traffic side and port, for `spec.match`; with neither, `match` is not
    /// looked at (as Istio does when it asks for every plugin of a proxy).
    pub mode: Option<TrafficMode>,
    pub port: Option<u16>,
}

impl Workload {
    /// A workload of `namespace` without labels, services, class or listener facts.
    pub fn new(namespace: impl Into<String>) -> Self {
        Workload {
            namespace: namespace.into(),
            labels: BTreeMap::new(),
            services: Vec::new(),
            gateway_class: None,
            mode: None,
            port: None,
        }
    }
}

/// Whether `plugin` applies to `workload`.
pub fn applies(plugin: &WasmPlugin, workload: &Workload, root_namespace: &str) -> bool {
    let ns = plugin.key.namespace.as_str();
    let in_root = ns == root_namespace;
    if ns != workload.namespace && !in_root {
        return false;
    }
    let spec = &plugin.spec;
    let refs: Vec<&PolicyTargetReference> = spec
        .target_ref
        .as_deref()
        .into_iter()
        .chain(&spec.target_refs)
        .collect();
    let selected = if let Some(selector) = &spec.selector {
        selector
            .match_labels
            .iter()
            .all(|(k, v)| workload.labels.get(k) == Some(v))
    } else if !refs.is_empty() {
        refs.iter()
            .any(|r| ref_selects(r, in_root, ns == workload.namespace, workload))
    } else {
        true
    };
    selected && traffic_matches(plugin, workload)
}

/// One target reference. References name objects of the plugin's namespace; only a
/// `GatewayClass` (root namespace only) reaches gateways of other namespaces.
fn ref_selects(r: &PolicyTargetReference, in_root: bool, same_ns: bool, w: &Workload) -> bool {
    let gateway_group = r.group.is_empty() || r.group == GATEWAY_API_GROUP;
    match r.kind.as_str() {
        "Gateway" => same_ns && gateway_group && w.labels.get(GATEWAY_NAME_LABEL) == Some(&r.name),
        "GatewayClass" => in_root && gateway_group && w.gateway_class.as_ref() == Some(&r.name),
        "Service" | "ServiceEntry" => same_ns && w.services.contains(&r.name),
        _ => false,
    }
}

/// `spec.match`, as Istio reads it: no entry, or no listener facts, matches; otherwise one entry
/// must accept the traffic side (no mode or `CLIENT_AND_SERVER`: any side) and the port (no ports:
/// any port).
fn traffic_matches(plugin: &WasmPlugin, w: &Workload) -> bool {
    let selectors = &plugin.spec.match_;
    if selectors.is_empty() || (w.mode.is_none() && w.port.is_none()) {
        return true;
    }
    selectors.iter().any(|s| {
        let mode = match s.mode.as_deref() {
            None | Some("UNDEFINED") | Some("CLIENT_AND_SERVER") => true,
            Some("CLIENT") => w.mode == Some(TrafficMode::Client),
            Some("SERVER") => w.mode == Some(TrafficMode::Server),
            Some(_) => false,
        };
        let port = s.ports.is_empty()
            || s.ports
                .iter()
                .any(|p| w.port.map(i64::from) == Some(p.number));
        mode && port
    })
}

/// Istio's filter order: phase (`AUTHN`, `AUTHZ`, `STATS`, unspecified), priority (highest first;
/// none is 0), root-namespace plugins before the workload namespace's, then name.
pub fn order(a: &WasmPlugin, b: &WasmPlugin, root_namespace: &str) -> Ordering {
    let rank = |p: &WasmPlugin| {
        (
            p.spec.phase,
            std::cmp::Reverse(p.spec.priority.unwrap_or(0)),
            p.key.namespace != root_namespace,
        )
    };
    rank(a)
        .cmp(&rank(b))
        .then_with(|| a.key.name.cmp(&b.key.name))
        .then_with(|| a.key.namespace.cmp(&b.key.namespace))
}

/// The plugins that apply to `workload`, in filter order.
pub fn select<'a>(
    plugins: impl IntoIterator<Item = &'a WasmPlugin>,
    workload: &Workload,
    root_namespace: &str,
) -> Vec<&'a WasmPlugin> {
    let mut out: Vec<&WasmPlugin> = plugins
        .into_iter()
        .filter(|p| applies(p, workload, root_namespace))
        .collect();
    out.sort_by(|a, b| order(a, b, root_namespace));
    out
}

/// How the filters subscribe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscription {
    /// Name of the Envoy cluster pointing at wasm-ecds' gRPC address.
    pub xds_cluster: String,
    /// `config_source: {ads: {}}` (the bootstrap's `ads_config` stream) instead of a stream per
    /// filter.
    pub ads: bool,
    /// `DELTA_GRPC` instead of `GRPC` (state of the world).
    pub delta: bool,
    pub initial_fetch_timeout: Duration,
}

impl Default for Subscription {
    fn default() -> Self {
        Subscription {
            xds_cluster: DEFAULT_XDS_CLUSTER.to_string(),
            ads: false,
            delta: false,
            initial_fetch_timeout: DEFAULT_INITIAL_FETCH_TIMEOUT,
        }
    }
}

impl Subscription {
    /// `api_type` of the gRPC source (per filter, or of `ads_config`).
    pub fn api_type(&self) -> &'static str {
        if self.delta {
            "DELTA_GRPC"
        } else {
            "GRPC"
        }
    }

    /// An `ApiConfigSource` over gRPC to the xDS cluster (per filter, or `ads_config`).
    pub fn api_config_source(&self) -> Value {
        json!({
            "api_type": self.api_type(),
            "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {
                "cluster_name": self.xds_cluster,
                // Reconnect quickly when wasm-ecds restarts.
                "retry_policy": {"retry_back_off": {"base_interval": "0.5s", "max_interval": "5s"}},
            }}],
        })
    }

    fn config_source(&self) -> Value {
        let mut source = json!({
            "resource_api_version": "V3",
            "initial_fetch_timeout": envoy_duration(self.initial_fetch_timeout),
        });
        if self.ads {
            source["ads"] = json!({});
        } else {
            source["api_config_source"] = self.api_config_source();
        }
        source
    }
}

/// A protobuf JSON `Duration`: seconds with an `s`, fractions only when there are some.
pub fn envoy_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        let fraction = format!("{:09}", d.subsec_nanos());
        format!("{}.{}s", d.as_secs(), fraction.trim_end_matches('0'))
    }
}

/// Whether the plugin is a network filter (`type: NETWORK`); anything else is an HTTP filter.
pub fn is_network(plugin: &WasmPlugin) -> bool {
    plugin.spec.plugin_type == PluginType::Network
}

/// What Envoy runs for the plugin until wasm-ecds' first answer arrives (or if it never does
/// within `initial_fetch_timeout`): the RBAC filter wasm-ecds itself falls back to when it has no
/// module (behavior.md §7), allow-all for `FAIL_OPEN`, deny-all otherwise.
pub fn default_config(plugin: &WasmPlugin) -> Value {
    let deny = plugin.spec.fail_strategy != FailStrategy::FailOpen;
    let prefix = if deny {
        DENY_STAT_PREFIX
    } else {
        ALLOW_STAT_PREFIX
    };
    let mut config = if is_network(plugin) {
        json!({"@type": NETWORK_RBAC_TYPE_URL, "stat_prefix": prefix})
    } else {
        json!({"@type": HTTP_RBAC_TYPE_URL, "rules_stat_prefix": prefix})
    };
    if deny {
        // Rules that allow nothing; no rules at all allow everything.
        config["rules"] = json!({});
    }
    config
}

/// The filter entry (HTTP filter or network filter) subscribing to the plugin's ECDS resource:
/// Envoy asks for the filter's `name`, so that is the resource name wasm-ecds serves it under.
pub fn filter_entry(plugin: &WasmPlugin, sub: &Subscription) -> Value {
    let type_urls = if is_network(plugin) {
        [NETWORK_WASM_TYPE_URL, NETWORK_RBAC_TYPE_URL]
    } else {
        [HTTP_WASM_TYPE_URL, HTTP_RBAC_TYPE_URL]
    };
    json!({
        "name": plugin.resource_name(),
        "config_discovery": {
            "config_source": sub.config_source(),
            "default_config": default_config(plugin),
            "type_urls": type_urls,
        },
    })
}

/// The filter entries of `plugins` (already in order), split by kind.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Filters {
    /// For the HTTP connection manager's `http_filters`, before the router.
    pub http: Vec<Value>,
    /// For the listener filter chain's `filters`, before the HTTP connection manager.
    pub network: Vec<Value>,
}

impl Filters {
    pub fn new(plugins: &[&WasmPlugin], sub: &Subscription) -> Self {
        let mut f = Filters::default();
        for p in plugins {
            let entry = filter_entry(p, sub);
            if is_network(p) {
                f.network.push(entry);
            } else {
                f.http.push(entry);
            }
        }
        f
    }

    /// `{http_filters: [...], filters: [...]}`; `filters` only when there are network plugins.
    pub fn to_value(&self) -> Value {
        let mut v = json!({"http_filters": self.http});
        if !self.network.is_empty() {
            v["filters"] = Value::Array(self.network.clone());
        }
        v
    }
}

#[cfg(test)]
mod tests;
