//! The certificate verifier of insecure registries (behavior.md §4.2 `WASM_INSECURE_REGISTRIES`):
//! any certificate is trusted, handshake signatures are still checked.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Trusts any certificate (insecure registries only); handshake signatures are still verified so
/// a broken peer is told apart from an untrusted one.
#[derive(Debug)]
pub(super) struct AcceptAnyCertificate {
    pub(super) provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use rustls::pki_types::PrivateKeyDer;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::TlsAcceptor;

    use super::super::tests::{drain, listener, transport, TIMEOUT};
    use super::super::HyperTransport;
    use super::*;
    use crate::config::Config;
    use crate::fetch::{HttpRequest, Transport, TransportError};

    /// An HTTPS server with a self-signed certificate for 127.0.0.1 that answers every
    /// connection with `200 ok`. Returns the base URL and the certificate.
    async fn https_server() -> (String, CertificateDer<'static>) {
        let key =
            rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).expect("certificate");
        let cert = key.cert.der().clone();
        let private =
            PrivateKeyDer::try_from(key.signing_key.serialize_der()).expect("private key");
        (serve_tls(cert.clone(), private).await, cert)
    }

    /// An HTTPS server for 127.0.0.1 with a certificate issued by `ca` (`200 ok` to everything).
    async fn https_server_of(ca: &rcgen::Issuer<'_, rcgen::KeyPair>) -> String {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .expect("params")
            .signed_by(&key, ca)
            .expect("certificate");
        let private = PrivateKeyDer::try_from(key.serialize_der()).expect("private key");
        serve_tls(cert.der().clone(), private).await
    }

    /// Serves `200 ok` over TLS with `cert`; returns the base URL.
    async fn serve_tls(cert: CertificateDer<'static>, private: PrivateKeyDer<'static>) -> String {
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert], private)
        .expect("server config");
        let acceptor = TlsAcceptor::from(Arc::new(server));
        let (l, _) = listener().await;
        let base = format!("https://{}", l.local_addr().expect("addr"));
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut s) = acceptor.accept(s).await else {
                        return;
                    };
                    let mut buf = vec![0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .await;
                    let _ = s.shutdown().await;
                });
            }
        });
        base
    }

    async fn body_of(t: &HyperTransport, url: &str) -> Result<Vec<u8>, TransportError> {
        let mut resp = t.get(&HttpRequest::get(url), TIMEOUT).await?;
        assert_eq!(resp.status, 200);
        let (body, end) = drain(&mut resp.body).await;
        end.map(|()| body)
    }

    #[tokio::test]
    async fn trusts_extra_roots() {
        let (base, cert) = https_server().await;
        let t = HyperTransport::new(&Config::default(), vec![cert]).expect("transport");
        assert_eq!(body_of(&t, &base).await, Ok(b"ok".to_vec()));
    }

    #[tokio::test]
    async fn untrusted_certificate_is_a_tls_error() {
        let (base, _) = https_server().await;
        let t = transport(Config::default());
        let err = body_of(&t, &base).await.expect_err("untrusted");
        assert!(matches!(err, TransportError::Tls(_)), "{err:?}");
        assert!(!err.is_retryable());
    }

    #[tokio::test]
    async fn insecure_registries_skip_verification() {
        let (base, _) = https_server().await;
        let authority = base.trim_start_matches("https://").to_string();
        for listed in [authority, "*".to_string()] {
            let t = transport(Config {
                insecure_registries: vec![listed],
                ..Config::default()
            });
            assert_eq!(body_of(&t, &base).await, Ok(b"ok".to_vec()));
        }
    }

    /// `--ca-file` and `--host-ca`: a CA made in the test, its PEM read from a real file, real
    /// TLS servers with certificates it issued. Without it: a TLS error naming the unknown
    /// issuer; with it globally: every host; for one host: that host only.
    #[tokio::test]
    async fn custom_cas_are_trusted_globally_or_for_their_host_only() {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
            .expect("ca");
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("ca.pem");
        std::fs::write(&pem, ca.pem()).unwrap();
        let roots = crate::config::load_ca_file("WASM_ECDS_CA_FILE", pem.to_str().unwrap())
            .expect("the bundle loads");
        let (a, b) = (https_server_of(&ca).await, https_server_of(&ca).await);
        let untrusted = |r: Result<Vec<u8>, TransportError>| match r {
            Err(TransportError::Tls(m)) => m.contains("UnknownIssuer"),
            _ => false,
        };

        let t = transport(Config::default());
        assert!(untrusted(body_of(&t, &a).await));

        let t = transport(Config {
            ca_roots: roots.clone(),
            ..Config::default()
        });
        assert_eq!(body_of(&t, &a).await, Ok(b"ok".to_vec()));
        assert_eq!(body_of(&t, &b).await, Ok(b"ok".to_vec()));

        let host_a = a.trim_start_matches("https://").to_string();
        let t = transport(Config {
            host_cas: vec![(host_a, roots)],
            ..Config::default()
        });
        assert_eq!(body_of(&t, &a).await, Ok(b"ok".to_vec()));
        assert!(untrusted(body_of(&t, &b).await), "another host");
    }

    #[test]
    fn garbage_extra_root_is_refused() {
        let err = HyperTransport::new(
            &Config::default(),
            vec![CertificateDer::from(b"not a certificate".to_vec())],
        )
        .expect_err("garbage");
        assert!(matches!(err, TransportError::Tls(_)), "{err:?}");
    }
}
