//! An in-test certificate authority (rcgen): a CA, and leaf certificates it signs for servers
//! (`localhost` and `127.0.0.1`) and clients, written as PEM files the way a Kubernetes TLS Secret
//! mounts them (`tls.crt`, `tls.key`, `ca.crt`), plus a rustls client that reports the certificate
//! a server presented.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// The names a server certificate of [`Pki::server`] is valid for.
pub const SERVER_NAMES: [&str; 2] = ["localhost", "127.0.0.1"];

/// One issued certificate: its PEM texts and DER.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

impl Leaf {
    /// Writes `tls.crt` and `tls.key` into `dir` (created if needed); returns their paths.
    pub fn write(&self, dir: &Path) -> (PathBuf, PathBuf) {
        std::fs::create_dir_all(dir).expect("create cert dir");
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        std::fs::write(&cert, &self.cert_pem).expect("write tls.crt");
        std::fs::write(&key, &self.key_pem).expect("write tls.key");
        (cert, key)
    }

    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        vec![self.der.clone()]
    }

    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).expect("PEM key")
    }
}

/// A test CA; its certificate is `ca.crt` in [`Pki::dir`].
pub struct Pki {
    dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
    ca_der: CertificateDer<'static>,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let dir = tempfile::tempdir().expect("temp dir");
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).expect("CA certificate");
        std::fs::write(dir.path().join("ca.crt"), cert.pem()).expect("write ca.crt");
        Pki {
            ca_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
            dir,
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A file in [`Pki::dir`] (`ca.crt`, or one written there).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// [`path`](Self::path) as a string, for command lines.
    pub fn arg(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.ca_der.clone()
    }

    /// A certificate for `names` (DNS names or IP addresses) with common name `subject`.
    pub fn issue(&self, subject: &str, names: &[&str]) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("leaf params");
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, subject);
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    /// A server certificate for [`SERVER_NAMES`].
    pub fn server(&self, subject: &str) -> Leaf {
        self.issue(subject, &SERVER_NAMES)
    }

    /// A client certificate, written to `<name>.crt` and `<name>.key` in [`Pki::dir`].
    pub fn client(&self, name: &str) -> (Leaf, PathBuf, PathBuf) {
        let leaf = self.issue(name, &[name]);
        let (cert, key) = (
            self.path(&format!("{name}.crt")),
            self.path(&format!("{name}.key")),
        );
        std::fs::write(&cert, &leaf.cert_pem).expect("write client cert");
        std::fs::write(&key, &leaf.key_pem).expect("write client key");
        (leaf, cert, key)
    }

    /// A rustls client trusting this CA, offering `alpn`, presenting `identity` if given.
    pub fn client_config(&self, alpn: &[&[u8]], identity: Option<&Leaf>) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der()).expect("CA into roots");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots);
        let mut config = match identity {
            Some(leaf) => builder
                .with_client_auth_cert(leaf.chain(), leaf.key())
                .expect("client identity"),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config
    }
}

/// What a TLS client saw of a server.
#[derive(Debug)]
pub struct Exchange {
    /// The certificate the server presented.
    pub presented: CertificateDer<'static>,
    /// The server's first bytes after the handshake (an HTTP/2 server's SETTINGS), or why none
    /// came (a refused client certificate shows here under TLS 1.3, after the client's side of
    /// the handshake completed).
    pub first_read: Result<usize, String>,
}

/// Connects to `addr` as `localhost` with `config`, completes the handshake and reads once.
pub async fn tls_exchange(
    addr: SocketAddr,
    config: rustls::ClientConfig,
) -> Result<Exchange, String> {
    use tokio::io::AsyncReadExt as _;
    const BOUND: Duration = Duration::from_secs(10);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let name = ServerName::try_from("localhost").expect("server name");
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake with {addr}: {e}"))?;
        let presented = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first().cloned())
            .ok_or("no server certificate")?
            .into_owned();
        let mut buf = [0u8; 64];
        let first_read = match tls.read(&mut buf).await {
            Ok(0) => Err("closed by the server".to_string()),
            Ok(n) => Ok(n),
            Err(e) => Err(e.to_string()),
        };
        Ok(Exchange {
            presented,
            first_read,
        })
    };
    tokio::time::timeout(BOUND, exchange)
        .await
        .map_err(|_| format!("no TLS exchange with {addr} within {BOUND:?}"))?
}

/// `GET path` over HTTPS/1.1 to `addr` (as `localhost`, trusting `pki`), presenting `identity`
/// and `Authorization: Bearer <token>` when given: status and body.
pub async fn https_get(
    addr: SocketAddr,
    path: &str,
    pki: &Pki,
    identity: Option<&Leaf>,
    token: Option<&str>,
) -> Result<super::HttpResponse, String> {
    const BOUND: Duration = Duration::from_secs(10);
    let what = format!("GET https://{addr}{path}");
    let connector =
        tokio_rustls::TlsConnector::from(Arc::new(pki.client_config(&[b"http/1.1"], identity)));
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("{what}: {e}"))?;
        let name = ServerName::try_from("localhost").expect("server name");
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("{what}: TLS: {e}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| format!("{what}: {e}"))?;
        tokio::spawn(conn);
        let mut request =
            http::Request::get(path).header("host", format!("localhost:{}", addr.port()));
        if let Some(t) = token {
            request = request.header("authorization", format!("Bearer {t}"));
        }
        let request = request
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|e| format!("{what}: {e}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("{what}: {e}"))?;
        super::HttpResponse::read(response, &what).await
    };
    tokio::time::timeout(BOUND, exchange)
        .await
        .map_err(|_| format!("{what}: no answer within {BOUND:?}"))?
}
