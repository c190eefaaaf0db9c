//! `serve` flags and their environment variables (docs/behavior.md §9, docs/cli.md): every option
//! is a flag and a variable, a flag wins over the variable, and a bad value is a one-line startup
//! error naming the flag when it came from one (`--module-expiry: invalid duration "1d": ...`),
//! otherwise the variable (`WASM_MODULE_EXPIRY=1d: ...`). Values other than paths are read as
//! plain text by clap and parsed here, so that both kinds of error are ours.
//!
//! Length: one declaration per option, their parsing and its tests; over 600 lines since the pull
//! bounds, and kept whole so that every option is found in one place.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args};

use crate::config::{self, Config, Delivery, OptionError};
use crate::k8s::{KubeOptions, LeaseOptions};

mod xds;
pub use xds::XdsLimitArgs;

/// `--xds-address` when none is given.
pub const DEFAULT_XDS_ADDRESS: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 18000);
/// `--admin-address` when none is given.
pub const DEFAULT_ADMIN_ADDRESS: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 15020);

#[derive(Debug, Args)]
#[command(after_help = "\
Every option is also an environment variable (shown as [env: ...]); a flag wins over its variable. \
Durations are Go durations, as in Istio: 90s, 1h30m, 1.5h, 300ms, 0 (not 1d or 5min). \
Sizes are bytes or a quantity such as 256Mi. See docs/cli.md and docs/behavior.md §9.")]
pub struct ServeArgs {
    /// Manifest files or directories (WasmPlugin, dockerconfigjson Secret), watched for changes.
    /// Repeat the flag for several paths (comma separated in the variable). Without any, nothing
    /// is served. A path missing at startup is a warning, not an error (but its directory must
    /// exist, to be watched): it serves nothing until it appears.
    #[arg(
        long = "plugins",
        value_name = "PATH",
        env = "WASM_ECDS_PLUGINS",
        value_delimiter = ','
    )]
    pub plugins: Vec<PathBuf>,
    /// gRPC listen address for ECDS and ADS (port 0 picks one).
    #[arg(
        long = "xds-address",
        id = "xds_address",
        value_name = "ADDR",
        env = "WASM_ECDS_XDS_ADDRESS",
        default_value = "127.0.0.1:18000"
    )]
    xds_address_text: String,
    /// `--xds-address`, parsed by [`resolve`](Self::resolve).
    #[arg(skip = DEFAULT_XDS_ADDRESS)]
    pub xds_address: SocketAddr,
    /// HTTP admin address: metrics, health, debug, refresh, module endpoint.
    #[arg(
        long = "admin-address",
        id = "admin_address",
        value_name = "ADDR",
        env = "WASM_ECDS_ADMIN_ADDRESS",
        default_value = "127.0.0.1:15020"
    )]
    admin_address_text: String,
    /// `--admin-address`, parsed by [`resolve`](Self::resolve).
    #[arg(skip = DEFAULT_ADMIN_ADDRESS)]
    pub admin_address: SocketAddr,
    /// How module code reaches Envoy: file (a path on this host), inline (the bytes inside the
    /// ECDS resource), http (Envoy downloads it from the admin address) or remote (nothing is
    /// pulled: the module's own URL and pull settings go out for a `wasm-ecds proxy` to convert).
    #[arg(
        long,
        value_name = "file|inline|http|remote",
        env = "WASM_ECDS_DELIVERY",
        default_value = "file"
    )]
    pub delivery: String,
    /// Where modules are stored.
    #[arg(
        long,
        value_name = "DIR",
        env = "WASM_CACHE_DIR",
        default_value_os_t = config::default_cache_dir()
    )]
    pub cache_dir: PathBuf,
    /// Purge modules unused for this long (Go duration).
    #[arg(
        long,
        value_name = "DURATION",
        env = "WASM_MODULE_EXPIRY",
        default_value = "24h"
    )]
    pub module_expiry: String,
    /// How often a purge pass runs (Go duration, more than 0).
    #[arg(
        long,
        value_name = "DURATION",
        env = "WASM_PURGE_INTERVAL",
        default_value = "1h"
    )]
    pub purge_interval: String,
    /// Per-attempt HTTP timeout (Go duration; 0 = no per-attempt limit, the pull deadline still
    /// applies).
    #[arg(
        long,
        value_name = "DURATION",
        env = "WASM_HTTP_REQUEST_TIMEOUT",
        default_value = "15s"
    )]
    pub http_request_timeout: String,
    /// Attempts per request in total (at least 1).
    #[arg(
        long,
        value_name = "N",
        env = "WASM_HTTP_REQUEST_MAX_RETRIES",
        default_value = "5"
    )]
    pub http_request_max_retries: String,
    /// Module pulls running at once, all hosts together (at least 1); more wait their turn.
    #[arg(
        long,
        value_name = "N",
        env = "WASM_ECDS_MAX_CONCURRENT_PULLS",
        default_value = "16"
    )]
    pub max_concurrent_pulls: String,
    /// Module pulls running at once against one host or registry (at least 1).
    #[arg(
        long,
        value_name = "N",
        env = "WASM_ECDS_MAX_PULLS_PER_HOST",
        default_value = "8"
    )]
    pub max_pulls_per_host: String,
    /// Threads hashing the cached modules again at start: `auto` (one per core) or a number; 0
    /// verifies the whole cache before anything is served.
    #[arg(
        long,
        value_name = "N",
        env = "WASM_ECDS_CACHE_VERIFY_THREADS",
        default_value = "auto"
    )]
    pub cache_verify_threads: String,
    /// Registries reached over plain HTTP / without certificate checks (`host:port`, comma
    /// separated, `*` for all).
    #[arg(
        long,
        value_name = "HOSTS",
        env = "WASM_INSECURE_REGISTRIES",
        default_value = ""
    )]
    pub insecure_registries: String,
    /// PEM file of CA certificates trusted for every registry and HTTP host, on top of the
    /// built-in roots.
    #[arg(long, value_name = "FILE", env = "WASM_ECDS_CA_FILE")]
    pub ca_file: Option<String>,
    /// `host[:port]=FILE`: a PEM file of CA certificates trusted for that host only (repeatable;
    /// the variable is comma separated).
    #[arg(
        long,
        value_name = "HOST=FILE",
        env = "WASM_ECDS_HOST_CA",
        value_delimiter = ','
    )]
    pub host_ca: Vec<String>,
    /// CIDRs never connected to (comma separated), besides link-local and metadata addresses.
    #[arg(
        long,
        value_name = "CIDRS",
        env = "BLOCKED_CIDRS_IN_WASM_FETCH",
        default_value = ""
    )]
    pub blocked_cidrs: String,
    /// Largest module accepted, in bytes (or a quantity such as 256Mi).
    #[arg(
        long,
        value_name = "SIZE",
        env = "WASM_MAX_BINARY_SIZE_BYTES",
        default_value = "268435456"
    )]
    pub max_binary_size: String,
    /// Where plugins come from besides `--plugins` files: `files` (only them) or `kubernetes`
    /// (also WasmPlugin resources and pull Secrets from the API server; docs/kubernetes.md).
    #[arg(
        long,
        value_name = "files|kubernetes",
        env = "WASM_ECDS_SOURCE",
        default_value = "files"
    )]
    pub source: String,
    /// Kubernetes: a kubeconfig file. Without it: KUBECONFIG, ~/.kube/config, then the pod's
    /// service account.
    #[arg(long, value_name = "FILE", env = "WASM_ECDS_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubernetes: namespaces whose WasmPlugins are read (comma separated); all when empty.
    #[arg(
        long,
        value_name = "NS",
        env = "WASM_ECDS_NAMESPACES",
        value_delimiter = ','
    )]
    pub namespaces: Vec<String>,
    /// Kubernetes: a label selector WasmPlugins must match, e.g. `istio.io/rev=wasm-ecds`.
    #[arg(long, value_name = "SELECTOR", env = "WASM_ECDS_SELECTOR")]
    pub selector: Option<String>,
    /// Kubernetes: write conditions to WasmPlugin status (the Lease holder only).
    #[arg(
        long,
        value_name = "true|false",
        env = "WASM_ECDS_WRITE_STATUS",
        default_value = "true"
    )]
    pub write_status: String,
    /// Kubernetes: name of the Lease that elects the status writer.
    #[arg(
        long,
        value_name = "NAME",
        env = "WASM_ECDS_LEASE_NAME",
        default_value = "wasm-ecds"
    )]
    pub lease_name: String,
    /// Kubernetes: namespace of the Lease; the client's own namespace when not given.
    #[arg(long, value_name = "NS", env = "WASM_ECDS_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Kubernetes: how long the Lease holds without renewal (Go duration, whole seconds, at
    /// least 2s): the longest a dead leader blocks status writes.
    #[arg(
        long,
        value_name = "DURATION",
        env = "WASM_ECDS_LEASE_DURATION",
        default_value = "15s"
    )]
    pub lease_duration: String,
    /// Kubernetes: this replica's identity in the Lease (default: POD_NAME, else host-pid).
    #[arg(long, value_name = "ID", env = "WASM_ECDS_IDENTITY")]
    pub identity: Option<String>,
    /// TLS, authorization, caps and timeouts of the xDS and admin ports (`cli/ports.rs`).
    #[command(flatten)]
    pub ports: super::ports::PortArgs,
    /// Bounds of the xDS port (`options/xds.rs`).
    #[command(flatten)]
    pub xds_limits: XdsLimitArgs,
    /// Ids of the options given as flags (not variables, not defaults): their errors name the flag.
    #[arg(skip)]
    from_flags: BTreeSet<String>,
}

impl ServeArgs {
    /// Records which options were given as flags; `matches` are those of the `serve` subcommand.
    pub fn note_flags(&mut self, matches: &ArgMatches) {
        self.from_flags = matches
            .ids()
            .filter(|id| matches.value_source(id.as_str()) == Some(ValueSource::CommandLine))
            .map(|id| id.as_str().to_string())
            .collect();
    }

    /// Parses every value: fills [`xds_address`](Self::xds_address) and
    /// [`admin_address`](Self::admin_address) and returns the validated configuration.
    pub fn resolve(&mut self) -> Result<Config, OptionError> {
        self.xds_address = self.address(
            "xds_address",
            "WASM_ECDS_XDS_ADDRESS",
            &self.xds_address_text,
        )?;
        self.admin_address = self.address(
            "admin_address",
            "WASM_ECDS_ADMIN_ADDRESS",
            &self.admin_address_text,
        )?;
        let retries = self.count(
            "http_request_max_retries",
            "WASM_HTTP_REQUEST_MAX_RETRIES",
            &self.http_request_max_retries,
        )?;
        let retries = u32::try_from(retries).unwrap_or(u32::MAX);
        if let Some(p) = self
            .plugins
            .iter()
            .find(|p| !p.exists() && !parent_exists(p))
        {
            return Err(self.name_source(
                "plugins",
                OptionError::new(
                    "WASM_ECDS_PLUGINS",
                    "path",
                    p.display().to_string(),
                    "neither it nor its directory exists",
                ),
            ));
        }
        let purge_interval = self.duration(
            "purge_interval",
            "WASM_PURGE_INTERVAL",
            &self.purge_interval,
        )?;
        if purge_interval.is_zero() {
            return Err(self.name_source(
                "purge_interval",
                OptionError::new(
                    "WASM_PURGE_INTERVAL",
                    "duration",
                    &self.purge_interval,
                    "must be more than 0",
                ),
            ));
        }
        let delivery = match self.delivery.as_str() {
            "file" => Delivery::File,
            "inline" => Delivery::Inline,
            "http" => Delivery::Http,
            "remote" => Delivery::Remote,
            _ => {
                return Err(self.name_source(
                    "delivery",
                    OptionError::new(
                        "WASM_ECDS_DELIVERY",
                        "delivery",
                        &self.delivery,
                        "want file, inline, http or remote",
                    ),
                ))
            }
        };
        Ok(Config {
            module_expiry: self.duration(
                "module_expiry",
                "WASM_MODULE_EXPIRY",
                &self.module_expiry,
            )?,
            purge_interval,
            http_request_timeout: self.duration(
                "http_request_timeout",
                "WASM_HTTP_REQUEST_TIMEOUT",
                &self.http_request_timeout,
            )?,
            http_request_max_retries: retries,
            insecure_registries: config::parse_list(&self.insecure_registries),
            blocked_cidrs: config::parse_cidrs("BLOCKED_CIDRS_IN_WASM_FETCH", &self.blocked_cidrs)
                .map_err(|e| self.name_source("blocked_cidrs", e))?,
            max_binary_size: config::parse_size(
                "WASM_MAX_BINARY_SIZE_BYTES",
                &self.max_binary_size,
            )
            .map_err(|e| self.name_source("max_binary_size", e))?,
            cache_dir: self.cache_dir.clone(),
            delivery,
            ca_roots: match &self.ca_file {
                Some(f) if !f.is_empty() => config::load_ca_file("WASM_ECDS_CA_FILE", f)
                    .map_err(|e| self.name_source("ca_file", e))?,
                _ => Vec::new(),
            },
            host_cas: config::parse_host_cas("WASM_ECDS_HOST_CA", &self.host_ca)
                .map_err(|e| self.name_source("host_ca", e))?,
            max_concurrent_pulls: self.count(
                "max_concurrent_pulls",
                "WASM_ECDS_MAX_CONCURRENT_PULLS",
                &self.max_concurrent_pulls,
            )?,
            cache_verify_threads: match self.cache_verify_threads.as_str() {
                "auto" => None,
                n => Some(n.parse::<usize>().map_err(|_| {
                    let why = "want auto or a whole number such as 2";
                    let e = OptionError::new("WASM_ECDS_CACHE_VERIFY_THREADS", "count", n, why);
                    self.name_source("cache_verify_threads", e)
                })?),
            },
            max_pulls_per_host: self.count(
                "max_pulls_per_host",
                "WASM_ECDS_MAX_PULLS_PER_HOST",
                &self.max_pulls_per_host,
            )?,
        })
    }

    /// How the ports are exposed (TLS, admin authorization, caps, timeouts, module base URL).
    pub fn port_options(&self) -> Result<crate::net::PortOptions, OptionError> {
        self.ports.resolve(&self.from_flags)
    }

    /// A whole number of at least 1 (attempts, pulls at once).
    fn count(&self, id: &str, variable: &str, value: &str) -> Result<usize, OptionError> {
        let error = |why| self.name_source(id, OptionError::new(variable, "count", value, why));
        match value.parse::<usize>() {
            Ok(0) => Err(error("must be at least 1")),
            Ok(n) => Ok(n),
            Err(_) => Err(error("want a whole number such as 5")),
        }
    }

    /// The Kubernetes source's options, `None` with `--source files`.
    pub fn kube_options(&self) -> Result<Option<KubeOptions>, OptionError> {
        match self.source.as_str() {
            "files" => return Ok(None),
            "kubernetes" => {}
            _ => {
                return Err(self.name_source(
                    "source",
                    OptionError::new(
                        "WASM_ECDS_SOURCE",
                        "source",
                        &self.source,
                        "want files or kubernetes",
                    ),
                ))
            }
        }
        let write_status = match self.write_status.as_str() {
            "true" => true,
            "false" => false,
            _ => {
                return Err(self.name_source(
                    "write_status",
                    OptionError::new(
                        "WASM_ECDS_WRITE_STATUS",
                        "boolean",
                        &self.write_status,
                        "want true or false",
                    ),
                ))
            }
        };
        let duration = self.duration(
            "lease_duration",
            "WASM_ECDS_LEASE_DURATION",
            &self.lease_duration,
        )?;
        if duration.as_secs() < 2 || duration.subsec_nanos() != 0 {
            return Err(self.name_source(
                "lease_duration",
                OptionError::new(
                    "WASM_ECDS_LEASE_DURATION",
                    "duration",
                    &self.lease_duration,
                    "want whole seconds, at least 2s",
                ),
            ));
        }
        let namespaces: Vec<String> = (self.namespaces.iter())
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .collect();
        Ok(Some(KubeOptions {
            kubeconfig: self.kubeconfig.clone(),
            namespaces,
            selector: self.selector.clone().filter(|s| !s.trim().is_empty()),
            write_status,
            lease: LeaseOptions {
                name: self.lease_name.clone(),
                namespace: self.lease_namespace.clone().filter(|n| !n.is_empty()),
                duration,
                identity: (self.identity.clone())
                    .filter(|i| !i.is_empty())
                    .unwrap_or_else(crate::k8s::default_identity),
            },
        }))
    }

    /// One line each for what is probably a mistake but not an error: no `--plugins` at all, or a
    /// path that does not exist (yet).
    pub fn warnings(&self) -> Vec<String> {
        if self.plugins.is_empty() && self.source == "kubernetes" {
            return Vec::new();
        }
        if self.plugins.is_empty() {
            return vec![
                "no --plugins (or WASM_ECDS_PLUGINS) given: no plugin will be served".to_string(),
            ];
        }
        let source = if self.from_flags.contains("plugins") {
            "--plugins"
        } else {
            "WASM_ECDS_PLUGINS"
        };
        self.plugins
            .iter()
            .filter(|p| !p.exists())
            .map(|p| {
                format!(
                    "{source} {}: no such file or directory: it serves nothing until it appears",
                    p.display()
                )
            })
            .collect()
    }

    /// `error` naming the flag of option `id` when the value came from the command line.
    fn name_source(&self, id: &str, error: OptionError) -> OptionError {
        if self.from_flags.contains(id) {
            error.for_flag(format!("--{}", id.replace('_', "-")))
        } else {
            error
        }
    }

    fn duration(
        &self,
        id: &str,
        var: &str,
        value: &str,
    ) -> Result<std::time::Duration, OptionError> {
        config::parse_go_duration(var, value).map_err(|e| self.name_source(id, e))
    }

    fn address(&self, id: &str, var: &str, value: &str) -> Result<SocketAddr, OptionError> {
        value.parse().map_err(|_| {
            self.name_source(
                id,
                OptionError::new(
                    var,
                    "address",
                    value,
                    "want IP:PORT such as 127.0.0.1:18000",
                ),
            )
        })
    }
}

/// Whether the directory holding `path` exists (the current directory for a bare name).
fn parent_exists(path: &std::path::Path) -> bool {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.is_dir(),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};

    fn args(args: &[&str]) -> ServeArgs {
        let cli = Cli::try_parse_args_from(["wasm-ecds", "serve"].iter().chain(args)).unwrap();
        let Command::Serve(a) = cli.command else {
            panic!()
        };
        *a
    }

    fn parse(a: &[&str]) -> Result<Config, OptionError> {
        args(a).resolve()
    }

    #[test]
    fn defaults_and_flags() {
        let mut a = args(&["--module-expiry", "1h30m", "--max-binary-size", "1Mi"]);
        let c = a.resolve().unwrap();
        assert_eq!(c.module_expiry.as_secs(), 5400);
        assert_eq!(c.max_binary_size, 1 << 20);
        assert_eq!(c.http_request_max_retries, 5);
        assert_eq!((c.max_concurrent_pulls, c.max_pulls_per_host), (16, 8));
        let c = parse(&["--max-concurrent-pulls", "3", "--max-pulls-per-host", "1"]).unwrap();
        assert_eq!((c.max_concurrent_pulls, c.max_pulls_per_host), (3, 1));
        assert_eq!(c.cache_dir, config::default_cache_dir());
        assert_eq!(c.delivery, Delivery::File);
        assert_eq!(a.xds_address, DEFAULT_XDS_ADDRESS);
        assert_eq!(a.admin_address, DEFAULT_ADMIN_ADDRESS);
        // 0 is "no per-attempt timeout" (Go), not an error.
        let c = parse(&["--http-request-timeout", "0"]).unwrap();
        assert_eq!(c.http_request_timeout, std::time::Duration::ZERO);
        let mut a = args(&["--xds-address", "0.0.0.0:0", "--delivery", "inline"]);
        assert_eq!(a.resolve().unwrap().delivery, Delivery::Inline);
        assert_eq!(a.xds_address, "0.0.0.0:0".parse().unwrap());
    }

    #[test]
    fn flag_errors_name_the_flag() {
        let e = parse(&["--purge-interval", "often"]).unwrap_err();
        assert_eq!(
            (e.name.as_str(), e.flag.as_deref()),
            ("WASM_PURGE_INTERVAL", Some("--purge-interval"))
        );
        let e = parse(&["--module-expiry", "1d"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"--module-expiry: invalid duration "1d": unknown unit "d" (ns, us, µs, ms, s, m, h)"#
        );
        for (flag, value) in [
            ("--blocked-cidrs", "10.0.0.0/33"),
            ("--purge-interval", "0"),
            ("--http-request-max-retries", "0"),
            ("--http-request-max-retries", "many"),
            ("--xds-address", "localhost"),
            ("--admin-address", ":80"),
            ("--delivery", "carrier-pigeon"),
            ("--max-binary-size", "big"),
            ("--http-request-timeout", "5min"),
            ("--http-request-timeout", "5d"),
            ("--ca-file", "/does/not/exist.pem"),
            ("--host-ca", "reg.test"),
            ("--http-request-timeout", "15"),
            ("--max-concurrent-pulls", "0"),
            ("--max-pulls-per-host", "many"),
        ] {
            let e = parse(&[flag, value]).unwrap_err();
            assert_eq!(e.flag.as_deref(), Some(flag), "{e}");
            assert!(e.to_string().starts_with(&format!("{flag}: ")), "{e}");
        }
    }

    #[test]
    fn warns_about_missing_plugin_paths() {
        assert_eq!(args(&[]).warnings().len(), 1);
        let here = env!("CARGO_MANIFEST_DIR");
        assert!(args(&["--plugins", here]).warnings().is_empty());
        let missing = format!("{here}/does-not-exist.yaml");
        let w = args(&["--plugins", here, "--plugins", &missing]).warnings();
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("does-not-exist.yaml"), "{w:?}");
        let e = parse(&["--plugins", "/does/not/exist"]).unwrap_err();
        assert_eq!(e.flag.as_deref(), Some("--plugins"), "{e}");
        assert!(args(&["--plugins", "nothing-here.yaml"]).resolve().is_ok());
        assert!(args(&["--source", "kubernetes"]).warnings().is_empty());
    }

    #[test]
    fn kubernetes_options() {
        assert_eq!(args(&[]).kube_options().unwrap(), None);
        let k = args(&[
            "--source",
            "kubernetes",
            "--namespaces",
            "a,b",
            "--selector",
            "istio.io/rev=x",
            "--lease-duration",
            "4s",
            "--identity",
            "r1",
        ])
        .kube_options()
        .unwrap()
        .unwrap();
        assert_eq!(k.namespaces, ["a", "b"]);
        assert_eq!(k.selector.as_deref(), Some("istio.io/rev=x"));
        assert_eq!(k.lease.duration.as_secs(), 4);
        assert_eq!(k.lease.identity, "r1");
        assert!(k.write_status);
        let e = args(&["--source", "etcd"]).kube_options().unwrap_err();
        assert!(e.to_string().starts_with("--source: "), "{e}");
        for (flag, value) in [
            ("--write-status", "yes"),
            ("--lease-duration", "1s"),
            ("--lease-duration", "2500ms"),
        ] {
            let e = args(&["--source", "kubernetes", flag, value])
                .kube_options()
                .unwrap_err();
            assert!(e.to_string().starts_with(&format!("{flag}: ")), "{e}");
        }
    }
}
