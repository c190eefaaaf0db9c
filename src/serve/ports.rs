//! How `serve` exposes its two ports, from [`PortOptions`]: the listeners' TLS and caps, the
//! admin port's access rule and bounds, and the module endpoint URL Envoys are told to fetch
//! from. Everything is checked here at start, so a bad certificate or token file is a start-up
//! error naming its flag.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;

use super::admin::AdminOptions;
use crate::auth::{Access, TokenFile};
use crate::metrics::Metrics;
use crate::net::{ListenOptions, Listener, PortOptions, ReloadingTls};

/// The ports' settings, checked.
pub(super) struct Exposure {
    xds: ListenOptions,
    admin_listen: ListenOptions,
    pub admin: Arc<AdminOptions>,
    /// Who may use the `wasm_ecds.v1.Admin` gRPC service on the xDS port: everyone connected
    /// when the port requires client certificates, else the admin token's holders.
    pub xds_access: Arc<Access>,
    /// `--module-base-url`, else `http(s)://<admin address>`.
    pub module_endpoint: String,
}

impl Exposure {
    pub fn new(
        ports: &PortOptions,
        xds_address: SocketAddr,
        admin_address: SocketAddr,
    ) -> anyhow::Result<Exposure> {
        let tls = |files: &Option<crate::net::TlsFiles>| -> anyhow::Result<_> {
            files
                .clone()
                .map(|f| ReloadingTls::load(f).map(Arc::new))
                .transpose()
                .map_err(anyhow::Error::msg)
        };
        let (xds_tls, admin_tls) = (tls(&ports.xds_tls)?, tls(&ports.admin_tls)?);
        let token = || {
            ports
                .admin_token_file
                .as_deref()
                .map(TokenFile::open)
                .transpose()
                .map_err(anyhow::Error::msg)
                .context("admin token")
        };
        let xds_access = Arc::new(Access {
            mtls: ports
                .xds_tls
                .as_ref()
                .is_some_and(|t| t.client_ca.is_some()),
            client_ca: false,
            token: token()?,
        });
        let access = Access {
            mtls: false,
            client_ca: ports
                .admin_tls
                .as_ref()
                .is_some_and(|t| t.client_ca.is_some()),
            token: token()?,
        };
        if access.is_open() && !admin_address.ip().is_loopback() {
            tracing::warn!(%admin_address, "the admin port is not loopback and has no --admin-token-file or --admin-client-ca: anyone reaching it may refresh plugins, read /debug/* and download modules (docs/security.md)");
        }
        if xds_tls.is_none() && !xds_address.ip().is_loopback() {
            tracing::warn!(%xds_address, "the xDS port is not loopback and has no --xds-tls-cert: plugin configurations go out in clear text to anyone connecting (docs/security.md)");
        }
        let scheme = if admin_tls.is_some() { "https" } else { "http" };
        let module_endpoint = ports
            .module_base_url
            .clone()
            .unwrap_or_else(|| format!("{scheme}://{admin_address}"));
        Ok(Exposure {
            xds: ListenOptions {
                port: "xds",
                max_connections: ports.xds_max_connections,
                tls: xds_tls,
            },
            admin_listen: ListenOptions {
                port: "admin",
                max_connections: ports.admin_max_connections,
                tls: admin_tls,
            },
            admin: Arc::new(AdminOptions {
                access,
                open: ports.admin_open.clone(),
                header_timeout: ports.admin_header_timeout,
                idle_timeout: ports.admin_idle_timeout,
            }),
            module_endpoint,
            xds_access,
        })
    }

    pub fn xds_listener(&self, tcp: tokio::net::TcpListener, metrics: &Metrics) -> Listener {
        Listener::new(tcp, self.xds.clone(), metrics)
    }

    pub fn admin_listener(&self, tcp: tokio::net::TcpListener, metrics: &Metrics) -> Listener {
        Listener::new(tcp, self.admin_listen.clone(), metrics)
    }
}
