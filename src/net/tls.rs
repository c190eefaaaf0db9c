//! TLS on our own ports (docs/security.md): a certificate chain and key, optionally a client CA,
//! re-read when the files change, so that a rotated Kubernetes Secret (its mounted files are
//! symlinks swapped at once) or a cert-manager renewal needs no restart.
//!
//! Every handshake asks [`ReloadingTls::config`] for the configuration; it compares the files'
//! identities (inode, size, modification time) at most once per [`RECHECK`] and rebuilds the
//! whole rustls configuration when one changed. Connections already open keep the session they
//! negotiated: a rotation never drops a stream. A new set that does not load (a half-written
//! file, a key that does not match) is logged once in one line naming the file, and the last good
//! configuration stays in use.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::time::Instant;

/// The files are compared at most this often.
pub const RECHECK: Duration = Duration::from_secs(1);

/// Which files one port's TLS is made of, and the flags that named them (for errors).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// `xds` or `admin`: errors name `--<port>-tls-cert` etc.
    pub port: &'static str,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Clients' certificates are verified against these CA certificates.
    pub client_ca: Option<PathBuf>,
    /// A client without a certificate is refused in the handshake (the xDS port); otherwise it
    /// is accepted but not authenticated by one (the admin port: probes and Prometheus).
    pub client_cert_required: bool,
    /// ALPN protocols offered, most preferred first.
    pub alpn: Vec<Vec<u8>>,
}

/// What a file looked like when it was read; `None` when it could not be looked at.
type Stamp = Option<(u64, u64, SystemTime)>;

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((
        m.ino(),
        m.len(),
        m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
    ))
}

/// A port's TLS configuration, rebuilt when its files change.
#[derive(Debug)]
pub struct ReloadingTls {
    files: TlsFiles,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    config: Arc<ServerConfig>,
    stamps: Vec<Stamp>,
    checked: Instant,
}

impl ReloadingTls {
    /// Loads the files once: anything wrong is a start-up error naming the flag and the file.
    pub fn load(files: TlsFiles) -> Result<ReloadingTls, String> {
        let stamps = stamps(&files);
        let config = build(&files)?;
        Ok(ReloadingTls {
            files,
            state: Mutex::new(State {
                config,
                stamps,
                checked: Instant::now(),
            }),
        })
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The configuration for a new handshake: the files' current one, or the last good one.
    pub fn config(&self) -> Arc<ServerConfig> {
        let mut state = self.state.lock().expect("tls lock");
        if state.checked.elapsed() < RECHECK {
            return state.config.clone();
        }
        state.checked = Instant::now();
        let now = stamps(&self.files);
        if now != state.stamps {
            state.stamps = now;
            match build(&self.files) {
                Ok(config) => {
                    tracing::info!(port = self.files.port, cert = %self.files.cert.display(), "TLS files changed: new certificate in use");
                    state.config = config;
                }
                Err(e) => {
                    tracing::error!("{e}; keeping the previous certificate");
                }
            }
        }
        state.config.clone()
    }
}

fn stamps(files: &TlsFiles) -> Vec<Stamp> {
    [
        Some(&files.cert),
        Some(&files.key),
        files.client_ca.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|p| stamp(p))
    .collect()
}

fn read_certs(flag: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{flag} {}: not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{flag} {}: no PEM certificate in it",
            path.display()
        ));
    }
    Ok(certs)
}

fn build(files: &TlsFiles) -> Result<Arc<ServerConfig>, String> {
    let port = files.port;
    let cert_flag = format!("--{port}-tls-cert");
    let key_flag = format!("--{port}-tls-key");
    let ca_flag = format!("--{port}-client-ca");
    let chain = read_certs(&cert_flag, &files.cert)?;
    let key_bytes = std::fs::read(&files.key)
        .map_err(|e| format!("{key_flag} {}: {e}", files.key.display()))?;
    let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| {
        format!(
            "{key_flag} {}: not a PEM private key: {e}",
            files.key.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("{cert_flag}: {e}"))?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(&ca_flag, ca)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("{ca_flag} {}: {e}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if files.client_cert_required {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| format!("{ca_flag} {}: {e}", ca.display()))?,
            )
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        format!(
            "{cert_flag} {} / {key_flag} {}: {e}",
            files.cert.display(),
            files.key.display()
        )
    })?;
    config.alpn_protocols = files.alpn.clone();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (c, k) = (dir.join("tls.crt"), dir.join("tls.key"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    fn files(cert: PathBuf, key: PathBuf) -> TlsFiles {
        TlsFiles {
            port: "xds",
            cert,
            key,
            client_ca: None,
            client_cert_required: false,
            alpn: vec![b"h2".to_vec()],
        }
    }

    #[test]
    fn bad_files_are_errors_naming_flag_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_pair(dir.path(), "a.test");
        let missing = dir.path().join("missing.key");
        let e = ReloadingTls::load(files(cert.clone(), missing.clone())).unwrap_err();
        assert!(
            e.starts_with("--xds-tls-key ") && e.contains("missing.key"),
            "{e}"
        );
        std::fs::write(dir.path().join("junk"), "not pem").unwrap();
        let e = ReloadingTls::load(files(dir.path().join("junk"), key.clone())).unwrap_err();
        assert!(
            e.starts_with("--xds-tls-cert ") && e.contains("junk"),
            "{e}"
        );
        // A key that is not the certificate's.
        let other = tempfile::tempdir().unwrap();
        let (_, other_key) = write_pair(other.path(), "b.test");
        let e = ReloadingTls::load(files(cert.clone(), other_key)).unwrap_err();
        assert!(
            e.contains("--xds-tls-cert") && e.contains("--xds-tls-key"),
            "{e}"
        );
        assert!(ReloadingTls::load(files(cert, key)).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn changed_files_are_reloaded_and_bad_ones_keep_the_last_good_pair() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_pair(dir.path(), "a.test");
        let tls = ReloadingTls::load(files(cert.clone(), key.clone())).unwrap();
        let first = tls.config();
        // A half-written rotation: the previous configuration stays.
        std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\n").unwrap();
        tokio::time::advance(RECHECK).await;
        assert!(Arc::ptr_eq(&first, &tls.config()));
        // The complete new pair is taken.
        write_pair(dir.path(), "b.test");
        tokio::time::advance(RECHECK).await;
        let second = tls.config();
        assert!(!Arc::ptr_eq(&first, &second));
        // Unchanged files: the same configuration.
        tokio::time::advance(RECHECK).await;
        assert!(Arc::ptr_eq(&second, &tls.config()));
    }
}
