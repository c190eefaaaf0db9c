//! `bootstrap`: the Envoy configuration that subscribes one workload to its plugins (docs/cli.md).
//! Reads manifests as `check` does; exit 0 with the configuration on stdout, 1 when a manifest has
//! problems (listed as `check` lists them, nothing printed on stdout), 2 for a bad flag value or an
//! unreadable file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use serde_json::Value;

use super::inspect;
use crate::bootstrap::full::{self, Full, HostPort};
use crate::bootstrap::{self as bs, Filters, Subscription, TrafficMode, Workload};
use crate::config::{self, OptionError};
use crate::plugin::{self, Manifest, ObjectKey, WasmPlugin};

#[derive(Debug, Args)]
#[command(after_help = "\
Prints the http_filters to put before the router of the listener's HTTP connection manager and, for \
type: NETWORK plugins, the network filters to put before the connection manager; with --full, a \
whole Envoy bootstrap. Durations are Go durations (10s, 1m30s, 0). See docs/cli.md.")]
pub struct BootstrapArgs {
    /// Manifest files or directories (every *.yaml, *.yml and *.json below them), read as `check`
    /// reads them. Repeat the flag for several paths.
    #[arg(long = "plugins", value_name = "PATH", required = true)]
    pub plugins: Vec<PathBuf>,
    /// Namespace of the workload.
    #[arg(long, value_name = "NS", default_value = "default")]
    pub namespace: String,
    /// Pod labels of the workload, matched against `selector.matchLabels` (repeatable, or comma
    /// separated).
    #[arg(long, value_name = "K=V,...", value_delimiter = ',')]
    pub labels: Vec<String>,
    /// The workload is this Gateway API gateway: adds the label
    /// gateway.networking.k8s.io/gateway-name=NAME, which `targetRefs` of kind Gateway select.
    #[arg(long, value_name = "NAME")]
    pub gateway_name: Option<String>,
    /// GatewayClass of the gateway, selected by root-namespace `targetRefs` of kind GatewayClass.
    #[arg(long, value_name = "NAME")]
    pub gateway_class: Option<String>,
    /// A service (or ServiceEntry) this proxy is the waypoint of, selected by `targetRefs` of kind
    /// Service or ServiceEntry (repeatable).
    #[arg(long = "service", value_name = "NAME")]
    pub services: Vec<String>,
    /// Namespace whose plugins apply to every namespace.
    #[arg(long, value_name = "NS", default_value = bs::DEFAULT_ROOT_NAMESPACE)]
    pub root_namespace: String,
    /// Traffic side of the listener, for `spec.match` (client: gateway or outbound; server:
    /// inbound). Without --match-mode and --match-port, `spec.match` is not looked at.
    #[arg(long, value_name = "client|server")]
    pub match_mode: Option<String>,
    /// Port of the listener, for `spec.match`.
    #[arg(long, value_name = "PORT")]
    pub match_port: Option<String>,
    /// Envoy cluster that points at wasm-ecds' gRPC address.
    #[arg(long, value_name = "NAME", default_value = bs::DEFAULT_XDS_CLUSTER)]
    pub xds_cluster: String,
    /// Subscribe over the aggregated stream (`config_source: {ads: {}}`) rather than a gRPC
    /// stream per filter.
    #[arg(long)]
    pub ads: bool,
    /// Incremental xDS (DELTA_GRPC) rather than state of the world (GRPC).
    #[arg(long)]
    pub delta: bool,
    /// How long Envoy waits for a filter's first configuration before using its default (RBAC
    /// deny-all for FAIL_CLOSE and FAIL_RELOAD plugins, allow-all for FAIL_OPEN); 0 waits forever.
    #[arg(long, value_name = "DURATION", default_value = "10s")]
    pub initial_fetch_timeout: String,
    /// Print JSON instead of YAML.
    #[arg(long)]
    pub json: bool,
    /// Print a whole Envoy bootstrap: one HTTP listener running the filters then a router to
    /// --upstream, the xDS cluster, and the module cluster for --delivery http.
    #[arg(long)]
    pub full: bool,
    /// With --full: wasm-ecds' gRPC address (`serve --xds-address`), IP or DNS name.
    #[arg(
        long,
        value_name = "HOST:PORT",
        default_value = "127.0.0.1:18000",
        requires = "full"
    )]
    pub xds_address: String,
    /// With --full: the `serve --delivery` mode; http adds the cluster wasm_ecds_modules pointing
    /// at --admin-address.
    #[arg(
        long,
        value_name = "file|inline|http",
        default_value = "file",
        requires = "full"
    )]
    pub delivery: String,
    /// With --full --delivery http: wasm-ecds' admin address (`serve --admin-address`).
    #[arg(
        long,
        value_name = "HOST:PORT",
        default_value = "127.0.0.1:15020",
        requires = "full"
    )]
    pub admin_address: String,
    /// With --full: the listener's address.
    #[arg(
        long,
        value_name = "IP:PORT",
        default_value = "0.0.0.0:10000",
        requires = "full"
    )]
    pub listen_address: String,
    /// With --full: where the router sends every request, IP or DNS name.
    #[arg(
        long,
        value_name = "HOST:PORT",
        default_value = "127.0.0.1:8080",
        requires = "full"
    )]
    pub upstream: String,
    /// With --full: Envoy's own admin address.
    #[arg(
        long,
        value_name = "IP:PORT",
        default_value = "127.0.0.1:9901",
        requires = "full"
    )]
    pub envoy_admin_address: String,
    /// With --full: the node id (and cluster) Envoy presents to wasm-ecds.
    #[arg(long, value_name = "ID", default_value = full::DEFAULT_NODE_ID, requires = "full")]
    pub node_id: String,
    /// With --full: TLS to wasm-ecds' xDS and module clusters, trusting this PEM CA file (as
    /// Envoy will see the path).
    #[arg(long, value_name = "FILE", requires = "full")]
    pub tls_ca: Option<String>,
    /// With --tls-ca: the certificate chain Envoy presents (mTLS: serve --xds-client-ca,
    /// --admin-client-ca).
    #[arg(long, value_name = "FILE", requires_all = ["tls_ca", "tls_key"])]
    pub tls_cert: Option<String>,
    /// The private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<String>,
    /// With --tls-ca: the server name sent and verified (default: the host of --xds-address /
    /// --admin-address when it is a name).
    #[arg(long, value_name = "NAME", requires = "tls_ca")]
    pub tls_sni: Option<String>,
}

/// What the flags say, parsed.
#[derive(Debug)]
struct Request {
    workload: Workload,
    subscription: Subscription,
    full: Option<Full>,
}

fn bad(flag: &str, kind: &str, value: &str, why: impl Into<String>) -> OptionError {
    OptionError::new(flag, kind, value, why).for_flag(flag)
}

fn ip_port(flag: &str, value: &str) -> Result<SocketAddr, OptionError> {
    value.parse().map_err(|_| {
        bad(
            flag,
            "address",
            value,
            "want IP:PORT such as 127.0.0.1:9901",
        )
    })
}

fn host_port(flag: &str, value: &str) -> Result<HostPort, OptionError> {
    HostPort::parse(value).map_err(|why| bad(flag, "address", value, why))
}

impl BootstrapArgs {
    fn request(&self) -> Result<Request, OptionError> {
        let mut workload = Workload::new(&self.namespace);
        if self.namespace.is_empty() {
            return Err(bad("--namespace", "namespace", "", "must not be empty"));
        }
        for label in self.labels.iter().filter(|l| !l.is_empty()) {
            match label.split_once('=') {
                Some((k, v)) if !k.is_empty() => {
                    workload.labels.insert(k.to_string(), v.to_string());
                }
                _ => return Err(bad("--labels", "label", label, "want key=value")),
            }
        }
        if let Some(name) = &self.gateway_name {
            let label = bs::GATEWAY_NAME_LABEL.to_string();
            match workload.labels.insert(label, name.clone()) {
                Some(other) if other != *name => {
                    let why = format!("--labels sets {} to {other:?}", bs::GATEWAY_NAME_LABEL);
                    return Err(bad("--gateway-name", "name", name, why));
                }
                _ => {}
            }
        }
        workload.services = self.services.clone();
        workload.gateway_class = self.gateway_class.clone();
        workload.mode = match self.match_mode.as_deref() {
            None => None,
            Some("client") => Some(TrafficMode::Client),
            Some("server") => Some(TrafficMode::Server),
            Some(other) => return Err(bad("--match-mode", "mode", other, "want client or server")),
        };
        workload.port =
            match &self.match_port {
                None => None,
                Some(p) => Some(p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
                    bad("--match-port", "port", p, "want a number from 1 to 65535")
                })?),
            };
        let initial_fetch_timeout =
            config::parse_go_duration("--initial-fetch-timeout", &self.initial_fetch_timeout)
                .map_err(|e| e.for_flag("--initial-fetch-timeout"))?;
        if self.xds_cluster.is_empty() {
            return Err(bad("--xds-cluster", "name", "", "must not be empty"));
        }
        let subscription = Subscription {
            xds_cluster: self.xds_cluster.clone(),
            ads: self.ads,
            delta: self.delta,
            initial_fetch_timeout,
        };
        let full = if self.full {
            let modules = match self.delivery.as_str() {
                "http" => Some(host_port("--admin-address", &self.admin_address)?),
                "file" | "inline" => None,
                other => {
                    return Err(bad(
                        "--delivery",
                        "delivery",
                        other,
                        "want file, inline or http",
                    ))
                }
            };
            Some(Full {
                node_id: self.node_id.clone(),
                envoy_admin: ip_port("--envoy-admin-address", &self.envoy_admin_address)?,
                listen: ip_port("--listen-address", &self.listen_address)?,
                upstream: host_port("--upstream", &self.upstream)?,
                xds: host_port("--xds-address", &self.xds_address)?,
                modules,
                tls: self.tls_ca.clone().map(|ca| full::UpstreamTls {
                    ca,
                    client: self.tls_cert.clone().zip(self.tls_key.clone()),
                    sni: self.tls_sni.clone(),
                }),
            })
        } else {
            None
        };
        Ok(Request {
            workload,
            subscription,
            full,
        })
    }
}

/// The valid plugins of the files, by key (a later file's plugin of the same key replaces an
/// earlier one, as in `serve`), or every problem as `check` prints it.
fn read_plugins(
    files: &[(PathBuf, String)],
) -> Result<BTreeMap<ObjectKey, WasmPlugin>, Vec<String>> {
    let mut problems = Vec::new();
    let mut plugins = BTreeMap::new();
    for (file, text) in files {
        // EnvoyFilters are not selected into filters; their notes are not problems.
        for p in inspect::check_text(file, text)
            .into_iter()
            .filter(|p| !p.note)
        {
            let who = if p.plugin.is_empty() {
                String::new()
            } else {
                format!("{}: ", p.plugin)
            };
            problems.push(format!("{}: {who}{}: {}", p.file, p.field, p.message));
        }
        for doc in plugin::parse_manifests(text) {
            if let Ok(Manifest::Plugin(p)) = doc {
                plugins.insert(p.key.clone(), p);
            }
        }
    }
    if problems.is_empty() {
        Ok(plugins)
    } else {
        Err(problems)
    }
}

/// The output value for the request, and the plugins it names in order (`ns/name`).
fn render(
    plugins: &BTreeMap<ObjectKey, WasmPlugin>,
    args: &BootstrapArgs,
    r: &Request,
) -> (Value, Vec<String>) {
    let selected = bs::select(plugins.values(), &r.workload, &args.root_namespace);
    let names = selected.iter().map(|p| p.key.to_string()).collect();
    let filters = Filters::new(&selected, &r.subscription);
    let value = match &r.full {
        Some(f) => full::bootstrap(&filters, &r.subscription, f),
        None => filters.to_value(),
    };
    (value, names)
}

/// A one-line description of the workload, for the YAML header and the no-plugin warning.
fn describe(w: &Workload) -> String {
    let mut s = format!("namespace {}", w.namespace);
    if !w.labels.is_empty() {
        let labels: Vec<String> = w.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        s.push_str(&format!(", labels {}", labels.join(",")));
    }
    if !w.services.is_empty() {
        s.push_str(&format!(", services {}", w.services.join(",")));
    }
    s
}

pub fn run(args: &BootstrapArgs) -> i32 {
    let request = match args.request() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let mut files = match inspect::read_all(&args.plugins) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    files.sort_by(|a, b| a.0.cmp(&b.0));
    files.dedup_by(|a, b| a.0 == b.0);
    let plugins = match read_plugins(&files) {
        Ok(p) => p,
        Err(problems) => {
            for p in problems {
                eprintln!("{p}");
            }
            eprintln!("error: invalid manifests (as listed above): no configuration printed");
            return 1;
        }
    };
    let (value, names) = render(&plugins, args, &request);
    if names.is_empty() {
        eprintln!(
            "warning: no plugin applies to the workload ({})",
            describe(&request.workload)
        );
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&value).expect("serializable")
        );
    } else {
        println!(
            "# wasm-ecds bootstrap for {}: {}",
            describe(&request.workload),
            if names.is_empty() {
                "no plugin".to_string()
            } else {
                names.join(", ")
            }
        );
        print!(
            "{}",
            serde_yaml_ng::to_string(&value).expect("serializable")
        );
    }
    0
}
