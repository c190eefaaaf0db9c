//! The flags of our own ports (docs/security.md, docs/cli.md): TLS and client CAs of the xDS and
//! admin ports, the admin token, which admin endpoints stay open, connection caps and timeouts,
//! and the base URL Envoys fetch modules from. Flattened into `serve` (and so `proxy`); errors
//! name the flag when the value came from one, else the variable, as the other options do.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::config::{self, OptionError};
use crate::net::listen::{DEFAULT_ADMIN_MAX_CONNECTIONS, DEFAULT_XDS_MAX_CONNECTIONS};
use crate::net::{PortOptions, TlsFiles, OPEN_ENDPOINTS};

#[derive(Debug, Args)]
pub struct PortArgs {
    /// PEM certificate chain of the xDS port: TLS on it (with --xds-tls-key). Re-read when the
    /// file changes.
    #[arg(
        long,
        value_name = "FILE",
        env = "WASM_ECDS_XDS_TLS_CERT",
        requires = "xds_tls_key"
    )]
    pub xds_tls_cert: Option<PathBuf>,
    /// PEM private key of --xds-tls-cert.
    #[arg(
        long,
        value_name = "FILE",
        env = "WASM_ECDS_XDS_TLS_KEY",
        requires = "xds_tls_cert"
    )]
    pub xds_tls_key: Option<PathBuf>,
    /// PEM CA certificates: only clients with a certificate from them may connect to the xDS
    /// port (mTLS; needs --xds-tls-cert).
    #[arg(
        long,
        value_name = "FILE",
        env = "WASM_ECDS_XDS_CLIENT_CA",
        requires = "xds_tls_cert"
    )]
    pub xds_client_ca: Option<PathBuf>,
    /// PEM certificate chain of the admin port: HTTPS on it (with --admin-tls-key).
    #[arg(
        long,
        value_name = "FILE",
        env = "WASM_ECDS_ADMIN_TLS_CERT",
        requires = "admin_tls_key"
    )]
    pub admin_tls_cert: Option<PathBuf>,
    /// PEM private key of --admin-tls-cert.
    #[arg(
        long,
        value_name = "FILE",
        env = "WASM_ECDS_ADMIN_TLS_KEY",
        requires = "admin_tls_cert"
    )]
    pub admin_tls_key: Option<PathBuf>,
    /// PEM CA certificates: an admin client presenting a certificate from them is authenticated
    /// (needs --admin-tls-cert). Clients without one still reach the open endpoints.
    #[arg(
        long,
        value_name = "FILE",
        env = "WASM_ECDS_ADMIN_CLIENT_CA",
        requires = "admin_tls_cert"
    )]
    pub admin_client_ca: Option<PathBuf>,
    /// A file holding the bearer token of the protected admin endpoints (POST /refresh, /debug/*,
    /// /modules/*). Re-read when it changes.
    #[arg(long, value_name = "FILE", env = "WASM_ECDS_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Admin endpoints served without authentication (comma separated, from healthz, readyz,
    /// metrics, modules — modules fetched without credentials only; empty for none).
    #[arg(
        long,
        value_name = "LIST",
        env = "WASM_ECDS_ADMIN_OPEN",
        default_value = "healthz,readyz,metrics"
    )]
    pub admin_open: String,
    /// Most connections open at once on the xDS port; more are closed at once.
    #[arg(long, value_name = "N", env = "WASM_ECDS_XDS_MAX_CONNECTIONS", default_value_t = DEFAULT_XDS_MAX_CONNECTIONS.to_string())]
    pub xds_max_connections: String,
    /// Most connections open at once on the admin port; more are closed at once.
    #[arg(long, value_name = "N", env = "WASM_ECDS_ADMIN_MAX_CONNECTIONS", default_value_t = DEFAULT_ADMIN_MAX_CONNECTIONS.to_string())]
    pub admin_max_connections: String,
    /// An admin request's headers must arrive within this (Go duration).
    #[arg(
        long,
        value_name = "DURATION",
        env = "WASM_ECDS_ADMIN_HEADER_TIMEOUT",
        default_value = "10s"
    )]
    pub admin_header_timeout: String,
    /// An admin connection moving no byte for this long is closed (Go duration).
    #[arg(
        long,
        value_name = "DURATION",
        env = "WASM_ECDS_ADMIN_IDLE_TIMEOUT",
        default_value = "60s"
    )]
    pub admin_idle_timeout: String,
    /// The URL Envoys fetch modules from with --delivery http, e.g.
    /// https://wasm-ecds.istio-system.svc:15020 (default: http(s)://<admin address>).
    #[arg(long, value_name = "URL", env = "WASM_ECDS_MODULE_BASE_URL")]
    pub module_base_url: Option<String>,
}

impl PortArgs {
    /// The parsed options; `from_flags` are the option ids given as flags.
    pub fn resolve(&self, from_flags: &BTreeSet<String>) -> Result<PortOptions, OptionError> {
        let named = |id: &str, e: OptionError| {
            if from_flags.contains(id) {
                e.for_flag(format!("--{}", id.replace('_', "-")))
            } else {
                e
            }
        };
        let count = |id: &str, var: &str, value: &str| -> Result<usize, OptionError> {
            match value.parse::<usize>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(named(
                    id,
                    OptionError::new(var, "count", value, "want a whole number of at least 1"),
                )),
            }
        };
        let duration = |id: &str, var: &str, value: &str| -> Result<Duration, OptionError> {
            match config::parse_go_duration(var, value) {
                Ok(d) if d.is_zero() => Err(named(
                    id,
                    OptionError::new(var, "duration", value, "must be more than 0"),
                )),
                Ok(d) => Ok(d),
                Err(e) => Err(named(id, e)),
            }
        };
        let mut admin_open = BTreeSet::new();
        for item in config::parse_list(&self.admin_open) {
            if !OPEN_ENDPOINTS.contains(&item.as_str()) {
                return Err(named(
                    "admin_open",
                    OptionError::new(
                        "WASM_ECDS_ADMIN_OPEN",
                        "endpoint list",
                        &self.admin_open,
                        format!("unknown endpoint {item:?} (healthz, readyz, metrics, modules)"),
                    ),
                ));
            }
            admin_open.insert(item);
        }
        if let Some(url) = &self.module_base_url {
            let ok = url::Url::parse(url)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
            if ok.is_none() {
                return Err(named(
                    "module_base_url",
                    OptionError::new(
                        "WASM_ECDS_MODULE_BASE_URL",
                        "URL",
                        url,
                        "want http(s)://host[:port][/path]",
                    ),
                ));
            }
        }
        let tls = |port: &'static str,
                   cert: &Option<PathBuf>,
                   key: &Option<PathBuf>,
                   ca: &Option<PathBuf>,
                   alpn: &[&[u8]]| {
            cert.clone().zip(key.clone()).map(|(cert, key)| TlsFiles {
                port,
                cert,
                key,
                client_ca: ca.clone(),
                client_cert_required: port == "xds",
                alpn: alpn.iter().map(|p| p.to_vec()).collect(),
            })
        };
        Ok(PortOptions {
            xds_tls: tls(
                "xds",
                &self.xds_tls_cert,
                &self.xds_tls_key,
                &self.xds_client_ca,
                &[b"h2"],
            ),
            admin_tls: tls(
                "admin",
                &self.admin_tls_cert,
                &self.admin_tls_key,
                &self.admin_client_ca,
                &[b"h2", b"http/1.1"],
            ),
            admin_token_file: self.admin_token_file.clone(),
            admin_open,
            xds_max_connections: count(
                "xds_max_connections",
                "WASM_ECDS_XDS_MAX_CONNECTIONS",
                &self.xds_max_connections,
            )?,
            admin_max_connections: count(
                "admin_max_connections",
                "WASM_ECDS_ADMIN_MAX_CONNECTIONS",
                &self.admin_max_connections,
            )?,
            admin_header_timeout: duration(
                "admin_header_timeout",
                "WASM_ECDS_ADMIN_HEADER_TIMEOUT",
                &self.admin_header_timeout,
            )?,
            admin_idle_timeout: duration(
                "admin_idle_timeout",
                "WASM_ECDS_ADMIN_IDLE_TIMEOUT",
                &self.admin_idle_timeout,
            )?,
            module_base_url: self
                .module_base_url
                .as_ref()
                .map(|u| u.trim_end_matches('/').to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::cli::{Cli, Command};

    fn ports(args: &[&str]) -> Result<crate::net::PortOptions, String> {
        let mut argv = vec!["wasm-ecds", "serve"];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_args_from(argv).map_err(|e| e.to_string())?;
        let Command::Serve(a) = cli.command else {
            unreachable!()
        };
        a.port_options().map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_values() {
        let p = ports(&[]).unwrap();
        assert_eq!(p, crate::net::PortOptions::default());
        let p = ports(&[
            "--xds-tls-cert=c",
            "--xds-tls-key=k",
            "--xds-client-ca=ca",
            "--admin-open=healthz",
            "--admin-header-timeout=2s",
            "--module-base-url=https://wasm-ecds.istio-system.svc:15020/",
        ])
        .unwrap();
        let tls = p.xds_tls.unwrap();
        assert!(tls.client_cert_required && tls.client_ca.is_some());
        assert_eq!(p.admin_open.into_iter().collect::<Vec<_>>(), ["healthz"]);
        assert_eq!(p.admin_header_timeout, std::time::Duration::from_secs(2));
        assert_eq!(
            p.module_base_url.as_deref(),
            Some("https://wasm-ecds.istio-system.svc:15020")
        );
    }

    #[test]
    fn bad_values_name_the_flag() {
        let e = ports(&["--admin-open=healthz,debug"]).unwrap_err();
        assert!(e.contains("--admin-open") && e.contains("debug"), "{e}");
        let e = ports(&["--xds-max-connections=0"]).unwrap_err();
        assert!(e.contains("--xds-max-connections"), "{e}");
        let e = ports(&["--admin-idle-timeout=0"]).unwrap_err();
        assert!(e.contains("--admin-idle-timeout"), "{e}");
        let e = ports(&["--module-base-url=wasm-ecds:15020"]).unwrap_err();
        assert!(e.contains("--module-base-url"), "{e}");
        // A key without its certificate is a usage error.
        assert!(ports(&["--xds-tls-key=k"]).is_err());
    }
}
