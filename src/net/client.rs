//! The gRPC clients of the crate that reach a server over the network: `proxy`'s upstream
//! (`--upstream-ca`, `--upstream-cert`) and the admin API clients `events` and `wait` (`--tls-ca`,
//! `--tls-cert`, `--tls-sni`). One way to turn an address and TLS files into a tonic endpoint, so
//! both speak TLS alike; errors name the flags of the command that uses it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// How long a connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What a client trusts and presents over TLS.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// PEM certificates trusted instead of the web PKI roots.
    pub ca: Option<PathBuf>,
    /// PEM certificate chain and key presented to a server that asks for one (mTLS).
    pub identity: Option<(PathBuf, PathBuf)>,
    /// The server name sent and verified instead of the URL's host.
    pub sni: Option<String>,
}

/// The flags a command sets a [`ClientTls`] with, named in its errors.
#[derive(Clone, Copy, Debug)]
pub struct TlsFlags {
    pub address: &'static str,
    pub ca: &'static str,
    pub cert: &'static str,
    pub key: &'static str,
    pub sni: &'static str,
}

impl ClientTls {
    /// Whether any TLS option is set.
    pub fn is_set(&self) -> bool {
        self.ca.is_some() || self.identity.is_some() || self.sni.is_some()
    }

    /// An endpoint for `url` (`http://` plain, `https://` TLS), with TCP_NODELAY, a connect
    /// timeout and the xDS port's HTTP/2 keepalive. TLS options with an `http://` URL are an
    /// error: the caller meant TLS.
    pub fn endpoint(&self, url: &str, flags: &TlsFlags) -> anyhow::Result<Endpoint> {
        let mut endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| anyhow::anyhow!("{} {url}: {e}", flags.address))?
            .tcp_nodelay(true)
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(crate::xds::server::KEEPALIVE_INTERVAL)
            .keep_alive_timeout(crate::xds::server::KEEPALIVE_TIMEOUT);
        let https = url.starts_with("https://");
        if self.is_set() && !https {
            let mut used = Vec::new();
            if self.ca.is_some() {
                used.push(flags.ca);
            }
            if self.identity.is_some() {
                used.push(flags.cert);
            }
            if self.sni.is_some() {
                used.push(flags.sni);
            }
            let need = if used.len() == 1 { "needs" } else { "need" };
            anyhow::bail!(
                "{} {url}: {} {need} an https:// URL",
                flags.address,
                used.join(" and ")
            );
        }
        if !https {
            return Ok(endpoint);
        }
        let read = |flag: &str, path: &Path| {
            std::fs::read(path).map_err(|e| anyhow::anyhow!("{flag} {}: {e}", path.display()))
        };
        let mut config = ClientTlsConfig::new();
        config = match &self.ca {
            Some(ca) => config.ca_certificate(Certificate::from_pem(read(flags.ca, ca)?)),
            None => config.with_webpki_roots(),
        };
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(
                read(flags.cert, cert)?,
                read(flags.key, key)?,
            ));
        }
        if let Some(sni) = &self.sni {
            config = config.domain_name(sni.clone());
        }
        endpoint = endpoint
            .tls_config(config)
            .map_err(|e| anyhow::anyhow!("{} {url}: {e}", flags.address))?;
        Ok(endpoint)
    }
}

/// The chain of an error's sources on one line (`a: b: c`), repeated messages said once: tonic's
/// transport errors say only "transport error" at the top and the reason (a refused connection,
/// a TLS alert) below.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(e) = next {
        let text = e.to_string().replace('\n', " ");
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLAGS: TlsFlags = TlsFlags {
        address: "--server",
        ca: "--tls-ca",
        cert: "--tls-cert",
        key: "--tls-key",
        sni: "--tls-sni",
    };

    #[test]
    fn tls_options_need_https_and_readable_files() {
        let plain = ClientTls::default();
        assert!(plain.endpoint("http://127.0.0.1:1", &FLAGS).is_ok());
        let sni = ClientTls {
            sni: Some("x".into()),
            ..ClientTls::default()
        };
        let e = sni.endpoint("http://127.0.0.1:1", &FLAGS).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--server http://127.0.0.1:1: --tls-sni needs an https:// URL"
        );
        let ca = ClientTls {
            ca: Some("/nonexistent.pem".into()),
            ..ClientTls::default()
        };
        let e = ca.endpoint("https://localhost:1", &FLAGS).unwrap_err();
        assert!(
            e.to_string().starts_with("--tls-ca /nonexistent.pem:"),
            "{e}"
        );
        // https without options: the web PKI roots.
        assert!(plain.endpoint("https://localhost:1", &FLAGS).is_ok());
    }

    #[test]
    fn error_chains_are_one_line_without_repeats() {
        let inner = std::io::Error::other("connection refused");
        let outer = anyhow::Error::new(inner).context("transport error");
        let e: &(dyn std::error::Error + 'static) = outer.as_ref();
        assert_eq!(error_chain(e), "transport error: connection refused");
    }
}
