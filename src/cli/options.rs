//! `serve` flags and their environment variables (behavior.md §9, cli.md): flags win over env,
//! a bad value is a startup error naming the variable.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::config::{self, Config, Delivery, OptionError};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DeliveryArg {
    File,
    Inline,
    Http,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Manifest files or directories (WasmPlugin, dockerconfigjson Secret); watched.
    #[arg(long = "plugins", value_name = "PATH")]
    pub plugins: Vec<PathBuf>,
    /// gRPC listen address for ECDS and ADS (port 0 picks one).
    #[arg(long, default_value = "127.0.0.1:18000")]
    pub xds_address: SocketAddr,
    /// HTTP admin address: metrics, health, debug, refresh, module endpoint.
    #[arg(long, default_value = "127.0.0.1:15020")]
    pub admin_address: SocketAddr,
    /// How module code reaches Envoy.
    #[arg(long, value_enum, default_value = "file")]
    pub delivery: DeliveryArg,
    /// Where modules are stored.
    #[arg(long, env = "WASM_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Purge modules unused for this long (Go duration).
    #[arg(long, env = "WASM_MODULE_EXPIRY", default_value = "24h")]
    pub module_expiry: String,
    /// How often a purge pass runs (Go duration).
    #[arg(long, env = "WASM_PURGE_INTERVAL", default_value = "1h")]
    pub purge_interval: String,
    /// Per-attempt HTTP timeout (Go duration).
    #[arg(long, env = "WASM_HTTP_REQUEST_TIMEOUT", default_value = "15s")]
    pub http_request_timeout: String,
    /// Attempts per request in total.
    #[arg(long, env = "WASM_HTTP_REQUEST_MAX_RETRIES", default_value = "5")]
    pub http_request_max_retries: String,
    /// Registries reached over plain HTTP / without certificate checks (`host:port`, comma separated, `*`).
    #[arg(long, env = "WASM_INSECURE_REGISTRIES", default_value = "")]
    pub insecure_registries: String,
    /// CIDRs never connected to (comma separated), besides link-local and metadata addresses.
    #[arg(long, env = "BLOCKED_CIDRS_IN_WASM_FETCH", default_value = "")]
    pub blocked_cidrs: String,
    /// Largest module accepted, in bytes (or 256Mi).
    #[arg(long, env = "WASM_MAX_BINARY_SIZE_BYTES", default_value = "268435456")]
    pub max_binary_size: String,
}

impl ServeArgs {
    /// Builds the validated configuration.
    pub fn config(&self) -> Result<Config, OptionError> {
        let retries: u32 =
            self.http_request_max_retries
                .trim()
                .parse()
                .map_err(|_| OptionError {
                    name: "WASM_HTTP_REQUEST_MAX_RETRIES".into(),
                    value: self.http_request_max_retries.clone(),
                    why: "want a positive integer".into(),
                })?;
        if retries == 0 {
            return Err(OptionError {
                name: "WASM_HTTP_REQUEST_MAX_RETRIES".into(),
                value: self.http_request_max_retries.clone(),
                why: "must be at least 1".into(),
            });
        }
        let purge_interval =
            config::parse_go_duration("WASM_PURGE_INTERVAL", &self.purge_interval)?;
        if purge_interval.is_zero() {
            return Err(OptionError {
                name: "WASM_PURGE_INTERVAL".into(),
                value: self.purge_interval.clone(),
                why: "must be positive".into(),
            });
        }
        Ok(Config {
            module_expiry: config::parse_go_duration("WASM_MODULE_EXPIRY", &self.module_expiry)?,
            purge_interval,
            http_request_timeout: config::parse_go_duration(
                "WASM_HTTP_REQUEST_TIMEOUT",
                &self.http_request_timeout,
            )?,
            http_request_max_retries: retries,
            insecure_registries: config::parse_list(&self.insecure_registries),
            blocked_cidrs: config::parse_cidrs("BLOCKED_CIDRS_IN_WASM_FETCH", &self.blocked_cidrs)?,
            max_binary_size: config::parse_size(
                "WASM_MAX_BINARY_SIZE_BYTES",
                &self.max_binary_size,
            )?,
            cache_dir: self
                .cache_dir
                .clone()
                .unwrap_or_else(config::default_cache_dir),
            delivery: match self.delivery {
                DeliveryArg::File => Delivery::File,
                DeliveryArg::Inline => Delivery::Inline,
                DeliveryArg::Http => Delivery::Http,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn parse(args: &[&str]) -> Result<Config, OptionError> {
        let cli = Cli::try_parse_from(["wasm-ecds", "serve"].iter().chain(args)).unwrap();
        let Command::Serve(a) = cli.command else {
            panic!()
        };
        a.config()
    }

    #[test]
    fn defaults_and_flags() {
        let c = parse(&["--module-expiry", "1h30m", "--max-binary-size", "1Mi"]).unwrap();
        assert_eq!(c.module_expiry.as_secs(), 5400);
        assert_eq!(c.max_binary_size, 1 << 20);
        assert_eq!(c.http_request_max_retries, 5);
        let e = parse(&["--purge-interval", "often"]).unwrap_err();
        assert_eq!(e.name, "WASM_PURGE_INTERVAL");
        let e = parse(&["--blocked-cidrs", "10.0.0.0/33"]).unwrap_err();
        assert_eq!(e.name, "BLOCKED_CIDRS_IN_WASM_FETCH");
    }
}
