//! The `serve` flags bounding the xDS port (docs/cli.md "Bounds of the xDS port",
//! [`crate::xds::limits`]), flattened into [`ServeArgs`] and parsed like its other options.

use clap::Args;

use super::ServeArgs;
use crate::config::{self, OptionError};
use crate::xds::StreamLimits;

#[derive(Debug, Args)]
pub struct XdsLimitArgs {
    /// Largest xDS request message accepted, in bytes or a quantity (responses, which may carry
    /// inline modules, are not bounded by it). A larger request ends its stream.
    #[arg(
        long,
        value_name = "SIZE",
        env = "WASM_ECDS_XDS_MAX_REQUEST_SIZE",
        default_value = "4Mi"
    )]
    pub xds_max_request_size: String,
    /// Concurrent xDS streams; more are refused with RESOURCE_EXHAUSTED.
    #[arg(
        long,
        value_name = "N",
        env = "WASM_ECDS_XDS_MAX_STREAMS",
        default_value = "10000"
    )]
    pub xds_max_streams: String,
    /// Resource names one xDS stream may subscribe to; a request asking for more ends its stream
    /// with RESOURCE_EXHAUSTED.
    #[arg(
        long,
        value_name = "N",
        env = "WASM_ECDS_XDS_MAX_RESOURCE_NAMES",
        default_value = "10000"
    )]
    pub xds_max_resource_names: String,
    /// Largest encoded node (id, metadata, ...) a request may carry; a larger one ends its stream
    /// with INVALID_ARGUMENT.
    #[arg(
        long,
        value_name = "SIZE",
        env = "WASM_ECDS_XDS_MAX_NODE_SIZE",
        default_value = "256Ki"
    )]
    pub xds_max_node_size: String,
    /// Bytes of responses handed to xDS streams and not yet read by their proxies, over all
    /// streams; a push that does not fit waits until some are read.
    #[arg(
        long,
        value_name = "SIZE",
        env = "WASM_ECDS_XDS_SEND_BUDGET",
        default_value = "512Mi"
    )]
    pub xds_send_budget: String,
    /// How long a response may go without ACK or NACK before its stream is closed with
    /// DEADLINE_EXCEEDED (Go duration, more than 0).
    #[arg(
        long,
        value_name = "DURATION",
        env = "WASM_ECDS_XDS_ACK_TIMEOUT",
        default_value = "5m"
    )]
    pub xds_ack_timeout: String,
}

impl ServeArgs {
    /// The bounds of the xDS port ([`XdsLimitArgs`]); errors name the flag or the variable.
    pub fn xds_limits(&self) -> Result<StreamLimits, OptionError> {
        let a = &self.xds_limits;
        let size = |id: &str, var: &str, value: &str| -> Result<usize, OptionError> {
            let n = config::parse_size(var, value).map_err(|e| self.name_source(id, e))?;
            self.positive(id, var, "size", value, n)
        };
        let count = |id: &str, var: &str, value: &str| -> Result<usize, OptionError> {
            let n: u64 = value.trim().parse().map_err(|_| {
                self.name_source(
                    id,
                    OptionError::new(var, "count", value, "want a whole number such as 1000"),
                )
            })?;
            self.positive(id, var, "count", value, n)
        };
        let ack_timeout = self.duration(
            "xds_ack_timeout",
            "WASM_ECDS_XDS_ACK_TIMEOUT",
            &a.xds_ack_timeout,
        )?;
        if ack_timeout.is_zero() {
            return Err(self.name_source(
                "xds_ack_timeout",
                OptionError::new(
                    "WASM_ECDS_XDS_ACK_TIMEOUT",
                    "duration",
                    &a.xds_ack_timeout,
                    "must be more than 0",
                ),
            ));
        }
        Ok(StreamLimits {
            max_request_size: size(
                "xds_max_request_size",
                "WASM_ECDS_XDS_MAX_REQUEST_SIZE",
                &a.xds_max_request_size,
            )?,
            max_streams: count(
                "xds_max_streams",
                "WASM_ECDS_XDS_MAX_STREAMS",
                &a.xds_max_streams,
            )?,
            max_resource_names: count(
                "xds_max_resource_names",
                "WASM_ECDS_XDS_MAX_RESOURCE_NAMES",
                &a.xds_max_resource_names,
            )?,
            max_node_size: size(
                "xds_max_node_size",
                "WASM_ECDS_XDS_MAX_NODE_SIZE",
                &a.xds_max_node_size,
            )?,
            send_budget: size(
                "xds_send_budget",
                "WASM_ECDS_XDS_SEND_BUDGET",
                &a.xds_send_budget,
            )?,
            ack_timeout,
        })
    }

    fn positive(
        &self,
        id: &str,
        var: &str,
        kind: &str,
        value: &str,
        n: u64,
    ) -> Result<usize, OptionError> {
        match usize::try_from(n) {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(self.name_source(
                id,
                OptionError::new(var, kind, value, "must be more than 0"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::cli::{Cli, Command};
    use crate::xds::StreamLimits;

    fn limits(args: &[&str]) -> Result<StreamLimits, String> {
        let cli = Cli::try_parse_args_from(["wasm-ecds", "serve"].iter().chain(args)).unwrap();
        let Command::Serve(a) = cli.command else {
            panic!()
        };
        a.xds_limits().map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_the_documented_bounds_and_bad_values_name_the_flag() {
        assert_eq!(limits(&[]).unwrap(), StreamLimits::default());
        let l = limits(&[
            "--xds-max-request-size",
            "1Mi",
            "--xds-max-streams",
            "3",
            "--xds-ack-timeout",
            "90s",
        ])
        .unwrap();
        assert_eq!(
            (l.max_request_size, l.max_streams, l.ack_timeout.as_secs()),
            (1 << 20, 3, 90)
        );
        for (flag, value) in [
            ("--xds-max-request-size", "big"),
            ("--xds-max-streams", "0"),
            ("--xds-max-resource-names", "many"),
            ("--xds-max-node-size", "0"),
            ("--xds-send-budget", "1d"),
            ("--xds-ack-timeout", "0"),
        ] {
            let e = limits(&[flag, value]).unwrap_err();
            assert!(e.starts_with(&format!("{flag}: ")), "{e}");
        }
    }
}
