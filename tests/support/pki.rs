//! An in-test CA (rcgen): a server certificate for `localhost` and a client certificate, as PEM
//! files in a temporary directory (`ca.pem`, `server.pem`/`server.key`, `client.pem`/`client.key`)
//! and as rustls values for in-test TLS servers.

use std::path::PathBuf;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tokio_rustls::rustls;

pub struct Pki {
    dir: tempfile::TempDir,
    pub ca_der: rustls::pki_types::CertificateDer<'static>,
    /// The `localhost` server's chain and key.
    pub server: (
        Vec<rustls::pki_types::CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ),
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |name: &str| {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(vec![name.to_string()])
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            (cert, key)
        };
        let (server_cert, server_key) = leaf("localhost");
        let (client_cert, client_key) = leaf("wasm-ecds-client");
        let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text).unwrap();
        write("ca.pem", ca_cert.pem());
        write("server.pem", server_cert.pem());
        write("server.key", server_key.serialize_pem());
        write("client.pem", client_cert.pem());
        write("client.key", client_key.serialize_pem());
        let server_key =
            rustls::pki_types::PrivateKeyDer::try_from(server_key.serialize_der()).unwrap();
        Pki {
            ca_der: ca_cert.der().clone(),
            server: (vec![server_cert.der().clone()], server_key),
            dir,
        }
    }

    /// One of the PEM files (see the module docs).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The path of [`path`](Self::path) as a string, for command lines.
    pub fn arg(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }
}
