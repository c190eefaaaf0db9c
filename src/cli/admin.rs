//! `wasm-ecds events` and `wasm-ecds wait`: clients of the `wasm_ecds.v1.Admin` gRPC service on a
//! server's xDS port (docs/cli.md "The admin gRPC API").

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use tonic::transport::Channel;

use crate::clock::Timestamp;
use crate::net::client::{error_chain, ClientTls, TlsFlags};
use crate::plugin::ObjectKey;
use crate::xds::admin::pb;

/// How often `wait` looks again when no event arrives (events wake it earlier).
const WAIT_POLL: Duration = Duration::from_secs(1);

/// Where the server is and how to authenticate, shared by both commands.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// The server's xDS address: `host:port` (TLS when a --tls-* option is given), or an
    /// `http://` or `https://` URL.
    #[arg(long, value_name = "ADDR")]
    pub server: String,
    /// A file holding the admin token (the server's `--admin-token-file`), sent as
    /// `authorization: Bearer <token>`.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// TLS to the server (its --xds-tls-cert), trusting this PEM CA file instead of the web PKI
    /// roots.
    #[arg(long, value_name = "FILE", env = "WASM_ECDS_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// The PEM certificate chain presented to a server that requires one (its --xds-client-ca);
    /// needs --tls-key.
    #[arg(
        long,
        value_name = "FILE",
        env = "WASM_ECDS_TLS_CERT",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(
        long,
        value_name = "FILE",
        env = "WASM_ECDS_TLS_KEY",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
    /// The server name sent and verified (default: the host of --server).
    #[arg(long, value_name = "NAME", env = "WASM_ECDS_TLS_SNI")]
    pub tls_sni: Option<String>,
}

/// The flags of [`ServerArgs`], named in its errors.
const SERVER_FLAGS: TlsFlags = TlsFlags {
    address: "--server",
    ca: "--tls-ca",
    cert: "--tls-cert",
    key: "--tls-key",
    sni: "--tls-sni",
};

impl ServerArgs {
    fn tls(&self) -> ClientTls {
        ClientTls {
            ca: self.tls_ca.clone(),
            identity: self.tls_cert.clone().zip(self.tls_key.clone()),
            sni: self.tls_sni.clone(),
        }
    }

    /// The server's URL: a bare `host:port` is `https://` with TLS options, `http://` without.
    fn url(&self) -> String {
        if self.server.contains("://") {
            self.server.clone()
        } else if self.tls().is_set() {
            format!("https://{}", self.server)
        } else {
            format!("http://{}", self.server)
        }
    }
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Only events about this plugin (`namespace/name`).
    #[arg(long, value_name = "NS/NAME")]
    pub plugin: Option<String>,
    /// One JSON object per line instead of trace lines.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct WaitArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// The plugin (`namespace/name`) whose current version must be ACKed.
    #[arg(long, value_name = "NS/NAME")]
    pub plugin: String,
    /// How many proxies must have ACKed it.
    #[arg(long, value_name = "N", default_value = "1")]
    pub acked_by: usize,
    /// Give up after this long (Go duration), exit status 1.
    #[arg(long, value_name = "DURATION", default_value = "60s")]
    pub timeout: String,
}

type Client = pb::admin_client::AdminClient<
    tonic::service::interceptor::InterceptedService<Channel, Authorization>,
>;

/// Adds the token to every call.
#[derive(Clone)]
pub struct Authorization(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Authorization {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

async fn connect(args: &ServerArgs) -> Result<Client, String> {
    let token = match &args.token_file {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("--token-file {}: {e}", path.display()))?;
            let value = format!("Bearer {}", text.trim())
                .parse()
                .map_err(|_| format!("--token-file {}: not a valid token", path.display()))?;
            Some(value)
        }
    };
    let endpoint = args
        .tls()
        .endpoint(&args.url(), &SERVER_FLAGS)
        .map_err(|e| format!("{e:#}"))?;
    let channel = endpoint.connect().await.map_err(|e| {
        format!(
            "--server {}: cannot connect: {}",
            args.server,
            error_chain(&e)
        )
    })?;
    Ok(pb::admin_client::AdminClient::with_interceptor(
        channel,
        Authorization(token),
    ))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// A failed call on one line: the status's message and, for a transport failure, its reason.
/// A TLS server that requires a client certificate refuses one without it after the handshake
/// (TLS 1.3), and its alert may be lost in the connection's reset: when no --tls-cert was given
/// and the connection was closed under the call, the line says what is likely missing.
fn status_error(args: &ServerArgs, what: &str, s: &tonic::Status) -> String {
    let mut text = s.message().to_string();
    if let Some(source) = std::error::Error::source(s) {
        let reason = error_chain(source);
        text = if reason.contains(&text) {
            reason
        } else {
            format!("{text}: {reason}")
        };
    }
    let transport = matches!(
        s.code(),
        tonic::Code::Cancelled | tonic::Code::Unavailable | tonic::Code::Unknown
    );
    let lower = text.to_lowercase();
    if transport
        && args.url().starts_with("https://")
        && args.tls_cert.is_none()
        && !lower.contains("certificate")
    {
        text.push_str(
            " (the server closed the TLS connection: if it requires client certificates, \
             give --tls-cert and --tls-key)",
        );
    }
    format!(
        "--server {}: {what}: {} ({:?})",
        args.server,
        text.replace('\n', " "),
        s.code()
    )
}

/// `wasm-ecds events`: prints events until the server goes away (exit 0) or fails (exit 2).
pub fn run_events(args: &EventsArgs) -> i32 {
    let result = runtime().block_on(async {
        let mut client = connect(&args.server).await?;
        let request = pb::WatchEventsRequest {
            plugin: args.plugin.clone().unwrap_or_default(),
        };
        let mut events = client
            .watch_events(request)
            .await
            .map_err(|s| status_error(&args.server, "WatchEvents", &s))?
            .into_inner();
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        loop {
            match events.message().await {
                Ok(Some(e)) => {
                    let line = if args.json {
                        event_json(&e).to_string()
                    } else {
                        event_line(&e)
                    };
                    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                        return Ok(()); // stdout closed (a pipe into `head`)
                    }
                }
                Ok(None) => return Ok(()),
                Err(s) => return Err(status_error(&args.server, "WatchEvents", &s)),
            }
        }
    });
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            2
        }
    }
}

/// An event as one `sim --trace` line: `[<seconds since the epoch>] <text>`.
pub fn event_line(e: &pb::Event) -> String {
    let at = Timestamp(Duration::from_millis(e.at_unix_ms));
    crate::sim::runner::trace_line(at, &e.text)
}

/// An event as one JSON object (empty fields left out).
pub fn event_json(e: &pb::Event) -> serde_json::Value {
    let mut v = serde_json::json!({"atUnixMs": e.at_unix_ms, "kind": e.kind});
    for (key, value) in [
        ("plugin", &e.plugin),
        ("resource", &e.resource),
        ("version", &e.version),
        ("node", &e.node),
        ("outcome", &e.outcome),
        ("detail", &e.detail),
        ("text", &e.text),
    ] {
        if !value.is_empty() {
            v[key] = serde_json::Value::String(value.clone());
        }
    }
    v
}

/// `wasm-ecds wait`: exit 0 once the plugin's current version is ACKed by `--acked-by` proxies,
/// 1 on timeout, 2 on bad usage or a server that cannot be reached.
pub fn run_wait(args: &WaitArgs) -> i32 {
    let timeout = match crate::config::parse_go_duration("--timeout", &args.timeout) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let Some(key) = ObjectKey::parse(&args.plugin) else {
        eprintln!("error: --plugin {}: want namespace/name", args.plugin);
        return 2;
    };
    let resource = key.resource_name();
    let result = runtime().block_on(async {
        let mut client = connect(&args.server).await.map_err(|e| (2, e))?;
        // Watched before the first look, so that no ACK falls between the two.
        let mut events = client
            .watch_events(pb::WatchEventsRequest {
                plugin: key.to_string(),
            })
            .await
            .map_err(|s| (2, status_error(&args.server, "WatchEvents", &s)))?
            .into_inner();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let proxies = client
                .list_proxies(pb::ListProxiesRequest {})
                .await
                .map_err(|s| (2, status_error(&args.server, "ListProxies", &s)))?
                .into_inner()
                .proxies;
            let state = Progress::of(&proxies, &resource);
            if state.current.is_some() && state.synced >= args.acked_by {
                return Ok(format!(
                    "{key}: version {} ACKed by {} of {} subscribed proxies",
                    state.current.unwrap_or_default(),
                    state.synced,
                    state.subscribed
                ));
            }
            let wake = tokio::time::timeout(WAIT_POLL, events.message());
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    return Err((1, format!(
                        "timed out after {}: {}",
                        args.timeout,
                        state.why(&key, args.acked_by)
                    )));
                }
                woke = wake => {
                    if let Ok(Err(s)) = woke {
                        return Err((2, status_error(&args.server, "WatchEvents", &s)));
                    }
                }
            }
        }
    });
    match result {
        Ok(line) => {
            println!("{line}");
            0
        }
        Err((code, e)) => {
            eprintln!("error: {e}");
            code
        }
    }
}

/// Where the proxies stand with one resource.
#[derive(Debug, Default)]
struct Progress {
    /// The version served now, as the server reports it.
    current: Option<String>,
    subscribed: usize,
    synced: usize,
    /// The last NACK seen, with its message.
    nack: Option<(String, String)>,
}

impl Progress {
    fn of(proxies: &[pb::Proxy], resource: &str) -> Progress {
        let mut p = Progress::default();
        for r in proxies
            .iter()
            .flat_map(|p| &p.resources)
            .filter(|r| r.name == resource)
        {
            p.subscribed += 1;
            if !r.current.is_empty() {
                p.current = Some(r.current.clone());
            }
            if r.synced {
                p.synced += 1;
            }
            if !r.nacked_version.is_empty() {
                p.nack = Some((r.nacked_version.clone(), r.nacked_message.clone()));
            }
        }
        p
    }

    fn why(&self, key: &ObjectKey, want: usize) -> String {
        match (&self.current, self.subscribed) {
            (_, 0) => format!("{key}: no connected proxy subscribes to it"),
            (None, _) => format!("{key}: not served (no resource)"),
            (Some(v), n) => {
                let mut s = format!(
                    "{key}: version {v} ACKed by {} of {n} subscribed proxies, want {want}",
                    self.synced
                );
                if let Some((version, message)) = &self.nack {
                    s.push_str(&format!("; NACKed version {version}: {message}"));
                }
                s
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_prints_as_a_trace_line_or_json_without_empty_fields() {
        let e = pb::Event {
            at_unix_ms: 12_500,
            kind: "process".into(),
            plugin: "default/a".into(),
            outcome: "pulled".into(),
            text: "process default/a (resource version 1): pulled".into(),
            ..Default::default()
        };
        assert_eq!(
            event_line(&e),
            "[  12.500s] process default/a (resource version 1): pulled"
        );
        assert_eq!(
            event_json(&e),
            serde_json::json!({
                "atUnixMs": 12500, "kind": "process", "plugin": "default/a",
                "outcome": "pulled", "text": "process default/a (resource version 1): pulled"
            })
        );
    }
}
