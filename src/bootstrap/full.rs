//! `wasm-ecds bootstrap --full`: a whole Envoy bootstrap around a workload's filters — one HTTP
//! listener whose connection manager runs the plugins' ECDS filters then a router to one upstream
//! cluster, the xDS cluster pointing at wasm-ecds, and the module cluster for `--delivery http`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde_json::{json, Value};

use super::{Filters, Subscription};
use crate::convert::MODULES_CLUSTER;

/// Name of the listener, its connection manager's stat prefix and route configuration.
pub const LISTENER_NAME: &str = "ingress_http";
/// Name of the cluster the router sends every request to.
pub const UPSTREAM_CLUSTER: &str = "upstream";
pub const DEFAULT_LISTEN_ADDRESS: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 10000);
pub const DEFAULT_ENVOY_ADMIN_ADDRESS: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9901);
pub const DEFAULT_NODE_ID: &str = "wasm-ecds-bootstrap";

/// `host:port` where `host` is an IP address or a DNS name (`[v6]:port` for IPv6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl HostPort {
    /// Parses `host:port`; `Err` says what is wrong (without the value).
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(a.into());
        }
        let (host, port) = s
            .rsplit_once(':')
            .ok_or("want host:port, e.g. 127.0.0.1:18000")?;
        let port = port
            .parse::<u16>()
            .map_err(|_| format!("port {port:?} is not a number from 0 to 65535"))?;
        let valid = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '.';
        if host.is_empty() || !host.chars().all(valid) {
            return Err(format!("host {host:?} is not an IP address or a DNS name"));
        }
        Ok(HostPort {
            host: host.to_string(),
            port,
        })
    }

    fn is_ip(&self) -> bool {
        self.host.parse::<IpAddr>().is_ok()
    }

    fn socket_address(&self) -> Value {
        json!({"socket_address": {"address": self.host, "port_value": self.port}})
    }
}

impl From<SocketAddr> for HostPort {
    fn from(a: SocketAddr) -> Self {
        HostPort {
            host: a.ip().to_string(),
            port: a.port(),
        }
    }
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// What the bootstrap connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Full {
    pub node_id: String,
    /// Envoy's own admin endpoint.
    pub envoy_admin: SocketAddr,
    /// The listener (an IP address: Envoy does not resolve listener addresses).
    pub listen: SocketAddr,
    /// Where the router sends requests.
    pub upstream: HostPort,
    /// wasm-ecds' gRPC address (`serve --xds-address`).
    pub xds: HostPort,
    /// wasm-ecds' admin address (`serve --admin-address`) for `--delivery http`, else `None`.
    pub modules: Option<HostPort>,
    /// TLS to wasm-ecds (its xDS cluster and its module cluster), `None`: plain text.
    pub tls: Option<UpstreamTls>,
}

/// How Envoy verifies wasm-ecds' ports and, for mTLS, proves who it is (docs/security.md):
/// an `UpstreamTlsContext` on the xDS cluster and the module cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamTls {
    /// PEM CA certificates wasm-ecds' certificates are verified against.
    pub ca: String,
    /// PEM certificate chain and key Envoy presents (`serve --xds-client-ca` /
    /// `--admin-client-ca`): the module endpoint accepts Envoy by it, since Envoy's module fetch
    /// cannot send a bearer token.
    pub client: Option<(String, String)>,
    /// The server name sent and verified; without it, the cluster's host when it is a name.
    pub sni: Option<String>,
}

impl UpstreamTls {
    /// The `transport_socket` of a cluster to `to`, offering `alpn`.
    fn transport_socket(&self, to: &HostPort, alpn: &[&str]) -> Value {
        let sni = self
            .sni
            .clone()
            .or_else(|| (!to.is_ip()).then(|| to.host.clone()));
        let mut validation = json!({"trusted_ca": {"filename": self.ca}});
        if let Some(name) = &sni {
            validation["match_typed_subject_alt_names"] =
                json!([{"san_type": "DNS", "matcher": {"exact": name}}]);
        }
        let mut common = json!({"validation_context": validation, "alpn_protocols": alpn});
        if let Some((cert, key)) = &self.client {
            common["tls_certificates"] = json!([{
                "certificate_chain": {"filename": cert},
                "private_key": {"filename": key},
            }]);
        }
        let mut context = json!({
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": common,
        });
        if let Some(name) = sni {
            context["sni"] = json!(name);
        }
        json!({"name": "envoy.transport_sockets.tls", "typed_config": context})
    }
}

/// The bootstrap: the filters in one listener, the clusters they need.
pub fn bootstrap(filters: &Filters, sub: &Subscription, full: &Full) -> Value {
    let mut http_filters = filters.http.clone();
    http_filters.push(json!({
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
    }));
    let hcm = json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": LISTENER_NAME,
            "route_config": {
                "name": LISTENER_NAME,
                "virtual_hosts": [{
                    "name": UPSTREAM_CLUSTER,
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": UPSTREAM_CLUSTER}}],
                }],
            },
            "http_filters": http_filters,
        },
    });
    let mut network_filters = filters.network.clone();
    network_filters.push(hcm);
    let listener = json!({
        "name": LISTENER_NAME,
        "address": HostPort::from(full.listen).socket_address(),
        "filter_chains": [{"filters": network_filters}],
    });
    let mut xds = cluster(&sub.xds_cluster, &full.xds, true);
    if let Some(tls) = &full.tls {
        xds["transport_socket"] = tls.transport_socket(&full.xds, &["h2"]);
    }
    let mut clusters = vec![cluster(UPSTREAM_CLUSTER, &full.upstream, false), xds];
    if let Some(modules) = &full.modules {
        let mut c = cluster(MODULES_CLUSTER, modules, false);
        if let Some(tls) = &full.tls {
            c["transport_socket"] = tls.transport_socket(modules, &["http/1.1"]);
        }
        clusters.push(c);
    }
    let mut bootstrap = json!({
        "node": {"id": full.node_id, "cluster": full.node_id},
        "admin": {"address": HostPort::from(full.envoy_admin).socket_address()},
        "static_resources": {"listeners": [listener], "clusters": clusters},
    });
    if sub.ads {
        // `ads: {}` sources need the bootstrap's aggregated stream (Envoy aborts without it).
        bootstrap["dynamic_resources"] = json!({"ads_config": sub.api_config_source()});
    }
    bootstrap
}

/// A cluster of one endpoint: `STATIC` for an IP address, `STRICT_DNS` for a name; HTTP/2 for
/// gRPC.
fn cluster(name: &str, to: &HostPort, http2: bool) -> Value {
    let mut c = json!({
        "name": name,
        "type": if to.is_ip() { "STATIC" } else { "STRICT_DNS" },
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{
            "endpoint": {"address": to.socket_address()},
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bootstrap::{select, Workload};
    use crate::plugin::WasmPlugin;

    fn plugin(name: &str, spec: &str) -> WasmPlugin {
        WasmPlugin::from_yaml(&format!(
            "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: {name}}}\nspec: {spec}"
        ))
        .unwrap()
    }

    fn full() -> Full {
        Full {
            node_id: "n".into(),
            envoy_admin: DEFAULT_ENVOY_ADMIN_ADDRESS,
            listen: DEFAULT_LISTEN_ADDRESS,
            upstream: HostPort::parse("backend.default.svc:8080").unwrap(),
            xds: HostPort::parse("127.0.0.1:18000").unwrap(),
            modules: None,
            tls: None,
        }
    }

    #[test]
    fn tls_to_wasm_ecds_on_both_of_its_clusters() {
        let filters = Filters::default();
        let sub = Subscription {
            xds_cluster: "xds".into(),
            ..Subscription::default()
        };
        let mut f = full();
        f.xds = HostPort::parse("wasm-ecds.istio-system.svc:18000").unwrap();
        f.modules = Some(HostPort::parse("10.0.0.1:15020").unwrap());
        f.tls = Some(UpstreamTls {
            ca: "/etc/wasm-ecds/ca.crt".into(),
            client: Some(("/etc/envoy/tls.crt".into(), "/etc/envoy/tls.key".into())),
            sni: None,
        });
        let b = bootstrap(&filters, &sub, &f);
        let clusters = b["static_resources"]["clusters"].as_array().unwrap();
        let by_name = |n: &str| clusters.iter().find(|c| c["name"] == n).unwrap();
        let xds = &by_name("xds")["transport_socket"]["typed_config"];
        assert_eq!(xds["sni"], "wasm-ecds.istio-system.svc");
        let common = &xds["common_tls_context"];
        assert_eq!(common["alpn_protocols"], json!(["h2"]));
        assert_eq!(
            common["validation_context"]["trusted_ca"]["filename"],
            "/etc/wasm-ecds/ca.crt"
        );
        assert_eq!(
            common["tls_certificates"][0]["private_key"]["filename"],
            "/etc/envoy/tls.key"
        );
        let modules = &by_name(MODULES_CLUSTER)["transport_socket"]["typed_config"];
        // An IP endpoint: no name to send or match unless --tls-sni gives one.
        assert!(modules.get("sni").is_none());
        assert_eq!(
            modules["common_tls_context"]["alpn_protocols"],
            json!(["http/1.1"])
        );
        assert!(by_name(UPSTREAM_CLUSTER).get("transport_socket").is_none());
    }

    #[test]
    fn host_port() {
        let h = HostPort::parse("wasm-ecds.istio-system.svc:18000").unwrap();
        assert_eq!(
            (h.host.as_str(), h.port),
            ("wasm-ecds.istio-system.svc", 18000)
        );
        let v6 = HostPort::parse("[::1]:15020").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 15020));
        assert_eq!(v6.to_string(), "[::1]:15020");
        assert!(HostPort::parse("localhost").is_err());
        assert!(HostPort::parse("localhost:99999").is_err());
        assert!(HostPort::parse(":80").is_err());
        assert!(HostPort::parse("a b:80").is_err());
    }

    #[test]
    fn listener_chain_and_clusters() {
        let plugins = [
            plugin("tcp", "{url: r/t, type: NETWORK}"),
            plugin("web", "{url: r/w}"),
        ];
        let selected = select(&plugins, &Workload::new("default"), "istio-system");
        let sub = Subscription::default();
        let b = bootstrap(&Filters::new(&selected, &sub), &sub, &full());
        let listener = &b["static_resources"]["listeners"][0];
        assert_eq!(listener["address"]["socket_address"]["port_value"], 10000);
        let chain = listener["filter_chains"][0]["filters"].as_array().unwrap();
        let names: Vec<&str> = chain.iter().map(|f| f["name"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            [
                "extensions.istio.io/wasmplugin/default.tcp",
                "envoy.filters.network.http_connection_manager"
            ]
        );
        let hcm = &chain[1]["typed_config"];
        let http: Vec<&str> = hcm["http_filters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            http,
            [
                "extensions.istio.io/wasmplugin/default.web",
                "envoy.filters.http.router"
            ]
        );
        let route = &hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"];
        assert_eq!(route["cluster"], UPSTREAM_CLUSTER);
        let clusters = b["static_resources"]["clusters"].as_array().unwrap();
        let kinds: Vec<(&str, &str)> = clusters
            .iter()
            .map(|c| (c["name"].as_str().unwrap(), c["type"].as_str().unwrap()))
            .collect();
        assert_eq!(kinds, [("upstream", "STRICT_DNS"), ("wasm_ecds", "STATIC")]);
        assert!(clusters[1]["typed_extension_protocol_options"].is_object());
        assert!(clusters[0]
            .get("typed_extension_protocol_options")
            .is_none());
        assert!(b.get("dynamic_resources").is_none());
    }

    #[test]
    fn ads_and_http_delivery() {
        let sub = Subscription {
            ads: true,
            delta: true,
            xds_cluster: "xds".into(),
            ..Subscription::default()
        };
        let mut f = full();
        f.modules = Some(HostPort::parse("10.0.0.7:15020").unwrap());
        let b = bootstrap(&Filters::default(), &sub, &f);
        let ads = &b["dynamic_resources"]["ads_config"];
        assert_eq!(ads["api_type"], "DELTA_GRPC");
        assert_eq!(ads["grpc_services"][0]["envoy_grpc"]["cluster_name"], "xds");
        let clusters = b["static_resources"]["clusters"].as_array().unwrap();
        let names: Vec<&str> = clusters
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["upstream", "xds", MODULES_CLUSTER]);
        let endpoint = &clusters[2]["load_assignment"]["endpoints"][0]["lb_endpoints"][0];
        assert_eq!(
            endpoint["endpoint"]["address"]["socket_address"],
            json!({"address": "10.0.0.7", "port_value": 15020})
        );
    }
}
