//! Our own listening ports (docs/security.md): the one accept loop every port uses
//! ([`listen`]), TLS with certificate rotation ([`tls`]) and their series; and the one way our
//! gRPC clients connect over TLS ([`client`]).

pub mod client;
pub mod listen;
pub mod tls;

pub use listen::{Conn, Incoming, ListenOptions, Listener};
pub use tls::{ReloadingTls, TlsFiles};

/// The listeners' series (behavior.md §8), registered in the process's one registry.
#[derive(Clone, Debug)]
pub struct NetSeries {
    /// `wasm_ecds_accept_errors_total{port}`: failed `accept()` calls (each followed by a pause).
    pub accept_errors: prometheus::IntCounterVec,
    /// `wasm_ecds_connections_refused_total{port,reason}`: connections closed without being
    /// served: `limit` (the port's connection cap), `handshake` (TLS failed, e.g. no or a wrong
    /// client certificate), `handshake_timeout`.
    pub refused: prometheus::IntCounterVec,
}

impl NetSeries {
    pub fn register(registry: &prometheus::Registry) -> NetSeries {
        let accept_errors = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "wasm_ecds_accept_errors_total",
                "Failed accepts of incoming connections (e.g. the open-files limit), by port",
            ),
            &["port"],
        )
        .expect("valid metric");
        let refused = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "wasm_ecds_connections_refused_total",
                "Incoming connections closed without being served, by port and reason",
            ),
            &["port", "reason"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(accept_errors.clone()))
            .expect("unique metric names");
        registry
            .register(Box::new(refused.clone()))
            .expect("unique metric names");
        NetSeries {
            accept_errors,
            refused,
        }
    }

    /// Shows a port's series at 0 before anything happens.
    pub fn init(&self, port: &str) {
        self.accept_errors.with_label_values(&[port]);
        for reason in ["limit", "handshake", "handshake_timeout"] {
            self.refused.with_label_values(&[port, reason]);
        }
    }
}

/// Admin endpoints `--admin-open` may leave without authentication; `modules` opens only the
/// modules fetched without credentials (the others always need authentication).
pub const OPEN_ENDPOINTS: [&str; 4] = ["healthz", "readyz", "metrics", "modules"];

/// How `serve` (and `proxy`) exposes its ports (the flags of `cli/ports.rs`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortOptions {
    pub xds_tls: Option<TlsFiles>,
    pub admin_tls: Option<TlsFiles>,
    pub admin_token_file: Option<std::path::PathBuf>,
    /// Of [`OPEN_ENDPOINTS`]: served to anyone.
    pub admin_open: std::collections::BTreeSet<String>,
    pub xds_max_connections: usize,
    pub admin_max_connections: usize,
    pub admin_header_timeout: std::time::Duration,
    pub admin_idle_timeout: std::time::Duration,
    /// Where Envoys fetch modules with `--delivery http`, without a trailing `/`.
    pub module_base_url: Option<String>,
}

impl Default for PortOptions {
    fn default() -> Self {
        PortOptions {
            xds_tls: None,
            admin_tls: None,
            admin_token_file: None,
            admin_open: ["healthz", "readyz", "metrics"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            xds_max_connections: listen::DEFAULT_XDS_MAX_CONNECTIONS,
            admin_max_connections: listen::DEFAULT_ADMIN_MAX_CONNECTIONS,
            admin_header_timeout: std::time::Duration::from_secs(10),
            admin_idle_timeout: std::time::Duration::from_secs(60),
            module_base_url: None,
        }
    }
}
