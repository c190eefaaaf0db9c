//! The real [`Transport`]: hyper 1 (hyper-util's pooled client) with rustls (ring provider).
//!
//! What it owns: connecting, TLS, the blocked-address guard and the per-attempt deadline. What it
//! leaves to the fetchers ([`super::http`], [`super::oci`]): the scheme (plain `http://` is sent as
//! is; whether a registry may be reached over plain HTTP is their decision), redirects (never
//! followed here, so that every hop is checked and counted), retries, auth and body limits.
//!
//! - **Certificates:** webpki roots plus the extra roots given to [`HyperTransport::new`] (tests use
//!   a self-signed registry certificate) and those of `--ca-file` ([`Config::ca_roots`]); a host
//!   with its own CA (`--host-ca`, [`Config::host_cas`]) goes through a client of its own that
//!   trusts that CA too, so the CA vouches for no other host. Hosts listed in `WASM_INSECURE_REGISTRIES` (or `*`) go
//!   through a second client whose verifier accepts any certificate (behavior.md §4.2); handshake
//!   signatures are still checked, so only the trust decision is skipped.
//! - **Safety** (behavior.md §4.2): the address of every connection is checked against
//!   [`Config::is_blocked`]. Names are checked by a custom resolver (blocked addresses are dropped;
//!   a name that resolves to nothing else fails with [`TransportError::Blocked`]); IP literals never
//!   reach the resolver, so [`HyperTransport::get`] checks them before connecting.
//! - **Deadline:** one attempt (connect, TLS, headers *and* body) must finish within the timeout
//!   passed to [`Transport::get`]; the returned body fails with [`TransportError::Timeout`] once it
//!   has passed. Bodies are streamed frame by frame, never buffered.
//!
//! The blocked-address guard is in [`guard`], the verifier of insecure registries in [`tls`].

mod guard;
mod tls;

use std::error::Error as StdError;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};
use tokio::time::Instant;

use super::{BodyStream, HttpRequest, HttpResponse, Transport, TransportError};
use crate::config::Config;
use guard::{is_blocked, BlockedAddress, GuardedResolver};
use tls::AcceptAnyCertificate;

type HyperClient = Client<HttpsConnector<HttpConnector<GuardedResolver>>, Empty<Bytes>>;

/// Idle pooled connections are closed after this long (90 seconds, hyper's default, made
/// effective by giving the pool a timer).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// The hyper/rustls [`Transport`] used by `serve`.
///
/// Cheap to share behind an `Arc`; connections are pooled per host (one pool for verified TLS,
/// one for insecure registries).
pub struct HyperTransport {
    config: Arc<Config>,
    /// Verifies certificates against webpki roots + the extra roots.
    secure: HyperClient,
    /// Accepts any certificate: only for hosts in `insecure_registries`.
    insecure: HyperClient,
    /// `host[:port]` → a client that also trusts that host's own CA.
    per_host: Vec<(String, HyperClient)>,
}

impl std::fmt::Debug for HyperTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HyperTransport")
            .field("insecure_registries", &self.config.insecure_registries)
            .field("blocked_cidrs", &self.config.blocked_cidrs)
            .finish_non_exhaustive()
    }
}

impl HyperTransport {
    /// Builds both clients. `extra_roots` are trusted in addition to the webpki roots (e.g. the
    /// self-signed certificate of a test registry). Fails with [`TransportError::Tls`] when a
    /// root certificate cannot be parsed.
    pub fn new(
        config: &Config,
        extra_roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, TransportError> {
        let config = Arc::new(config.clone());
        let provider = Arc::new(rustls::crypto::ring::default_provider());

        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let add = |roots: &mut RootCertStore, certs: &[CertificateDer<'static>]| {
            certs.iter().try_for_each(|cert| {
                roots.add(cert.clone()).map_err(|e| {
                    TransportError::Tls(format!("invalid extra root certificate: {e}"))
                })
            })
        };
        add(&mut roots, &extra_roots)?;
        add(&mut roots, &config.ca_roots)?;
        let verified = |roots: RootCertStore| {
            Ok::<_, TransportError>(
                ClientConfig::builder_with_provider(provider.clone())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| TransportError::Tls(e.to_string()))?
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            )
        };
        let mut per_host = Vec::new();
        for (host, certs) in &config.host_cas {
            let mut own = roots.clone();
            add(&mut own, certs)?;
            per_host.push((host.clone(), build_client(verified(own)?, &config)));
        }
        let secure_tls = verified(roots)?;
        let insecure_tls = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TransportError::Tls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate { provider }))
            .with_no_client_auth();

        Ok(HyperTransport {
            secure: build_client(secure_tls, &config),
            insecure: build_client(insecure_tls, &config),
            per_host,
            config,
        })
    }

    /// The client for `uri`: the insecure one when its `host:port` (or bare host when the URL has
    /// no port) is listed in `insecure_registries`; else the one of its own CA (`--host-ca`,
    /// matched the same way); else the verifying one.
    fn client_for(&self, uri: &http::Uri) -> &HyperClient {
        let Some(authority) = uri.authority() else {
            return &self.secure;
        };
        let default_port = if uri.scheme_str() == Some("http") {
            80
        } else {
            443
        };
        let listed = |is: &dyn Fn(&str) -> bool| {
            is(authority.as_str())
                || (authority.port().is_none()
                    && is(&format!("{}:{default_port}", authority.host())))
        };
        if listed(&|h| self.config.is_insecure(h)) {
            return &self.insecure;
        }
        self.per_host
            .iter()
            .find(|(host, _)| listed(&|h| host.eq_ignore_ascii_case(h)))
            .map_or(&self.secure, |(_, client)| client)
    }

    /// Refuses IP-literal hosts that are blocked (the resolver never sees them).
    fn check_literal(&self, uri: &http::Uri) -> Result<(), TransportError> {
        let host = uri.host().unwrap_or_default();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        match host.parse::<IpAddr>() {
            Ok(ip) if is_blocked(&self.config, ip) => Err(TransportError::Blocked(ip.to_string())),
            _ => Ok(()),
        }
    }
}

fn build_client(tls: ClientConfig, config: &Arc<Config>) -> HyperClient {
    let mut http = HttpConnector::new_with_resolver(GuardedResolver {
        config: config.clone(),
    });
    // The fetchers choose the scheme; the https connector handles `https://` itself.
    http.enforce_http(false);
    http.set_nodelay(true);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .build(connector)
}

#[async_trait]
impl Transport for HyperTransport {
    async fn get(
        &self,
        req: &HttpRequest,
        timeout: Duration,
    ) -> Result<HttpResponse, TransportError> {
        // The network edge: the attempt's deadline comes from tokio's clock, which tests pause.
        #[allow(clippy::disallowed_methods)]
        let deadline = Instant::now() + timeout;
        let uri: http::Uri = req
            .url
            .parse()
            .map_err(|e| TransportError::Connect(format!("invalid url {}: {e}", req.url)))?;
        match uri.scheme_str() {
            Some("http") | Some("https") => {}
            _ => {
                return Err(TransportError::Connect(format!(
                    "unsupported url {} (want http or https)",
                    req.url
                )))
            }
        }
        self.check_literal(&uri)?;

        let mut builder = http::Request::get(uri.clone());
        for (name, value) in &req.headers {
            builder = builder.header(name.as_ref(), value.as_ref());
        }
        let request = builder
            .body(Empty::new())
            .map_err(|e| TransportError::Connect(format!("invalid request to {uri}: {e}")))?;

        let response = tokio::time::timeout_at(deadline, self.client_for(&uri).request(request))
            .await
            .map_err(|_| TransportError::Timeout)?
            .map_err(map_request_error)?;

        let (parts, body) = response.into_parts();
        let headers = parts
            .headers
            .iter()
            .map(|(name, value)| {
                // `HeaderName`s are lowercase already.
                (
                    name.as_str().to_string().into(),
                    String::from_utf8_lossy(value.as_bytes())
                        .into_owned()
                        .into(),
                )
            })
            .collect();
        Ok(HttpResponse {
            status: parts.status.as_u16(),
            headers,
            body: Box::new(HyperBody { body, deadline }),
        })
    }
}

/// A response body read frame by frame under the attempt's deadline.
struct HyperBody {
    body: Incoming,
    deadline: Instant,
}

#[async_trait]
impl BodyStream for HyperBody {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, TransportError> {
        loop {
            let frame = tokio::time::timeout_at(self.deadline, self.body.frame())
                .await
                .map_err(|_| TransportError::Timeout)?;
            match frame {
                None => return Ok(None),
                Some(Err(e)) => return Err(TransportError::Reset(error_chain(&e))),
                // Trailers and empty data frames carry nothing for us.
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => return Ok(Some(data)),
                    _ => continue,
                },
            }
        }
    }
}

/// Maps a client error onto the variant the fetchers act on.
fn map_request_error(e: hyper_util::client::legacy::Error) -> TransportError {
    if let Some(blocked) = find_cause::<BlockedAddress>(&e) {
        return TransportError::Blocked(blocked.to_string());
    }
    if let Some(tls) = find_cause::<rustls::Error>(&e) {
        return TransportError::Tls(tls.to_string());
    }
    let message = match e.source() {
        Some(source) => error_chain(source),
        None => e.to_string(),
    };
    if e.is_connect() {
        TransportError::Connect(message)
    } else {
        // The connection broke before a complete response head arrived.
        TransportError::Reset(message)
    }
}

/// The first error of type `T` in the cause chain. `io::Error` hides its payload from `source()`
/// (it returns the payload's source), so payloads are looked into explicitly.
fn find_cause<'a, T: StdError + 'static>(e: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    let mut current = Some(e);
    while let Some(err) = current {
        if let Some(found) = err.downcast_ref::<T>() {
            return Some(found);
        }
        current = match err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(payload) => Some(payload as &(dyn StdError + 'static)),
            None => err.source(),
        };
    }
    None
}

/// `outer: inner: innermost`, skipping repeated messages.
fn error_chain(e: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current = Some(e);
    while let Some(err) = current {
        let text = err.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        current = err.source();
    }
    parts.join(": ")
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::oneshot;

    /// A generous per-attempt timeout: the tests that expect a timeout pause tokio's clock, so
    /// nothing waits for it on the wall clock.
    pub(super) const TIMEOUT: Duration = Duration::from_secs(30);

    pub(super) fn transport(config: Config) -> HyperTransport {
        HyperTransport::new(&config, Vec::new()).expect("transport")
    }

    pub(super) async fn listener() -> (TcpListener, String) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", l.local_addr().expect("addr"));
        (l, base)
    }

    /// Reads a request head (up to the blank line).
    async fn read_head(s: &mut TcpStream) -> String {
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            if s.read(&mut byte).await.expect("read") == 0 {
                break;
            }
            buf.push(byte[0]);
        }
        String::from_utf8_lossy(&buf).into_owned()
    }

    pub(super) async fn drain(
        body: &mut Box<dyn BodyStream>,
    ) -> (Vec<u8>, Result<(), TransportError>) {
        let mut got = Vec::new();
        loop {
            match body.next_chunk().await {
                Ok(Some(c)) => got.extend_from_slice(&c),
                Ok(None) => return (got, Ok(())),
                Err(e) => return (got, Err(e)),
            }
        }
    }

    #[tokio::test]
    async fn streams_a_200_body_chunk_by_chunk() {
        let (l, base) = listener().await;
        let (more_tx, more_rx) = oneshot::channel::<()>();
        let (head_tx, head_rx) = oneshot::channel::<String>();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let head = read_head(&mut s).await;
            let _ = head_tx.send(head);
            s.write_all(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Test-Header: Yes\r\n\r\n5\r\nhello\r\n",
            )
            .await
            .expect("write");
            // The second chunk only goes out once the client has seen the first one: the
            // transport must not wait for the whole body.
            let _ = more_rx.await;
            s.write_all(b"6\r\n world\r\n0\r\n\r\n")
                .await
                .expect("write");
            let _ = read_head(&mut s).await;
        });

        let t = transport(Config::default());
        let req = HttpRequest::get(format!("{base}/module.wasm")).header("Accept", "x/y");
        let mut resp = t.get(&req, TIMEOUT).await.expect("get");
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("x-test-header"), Some("Yes"));
        assert!(resp.headers.iter().all(|(k, _)| *k == k.to_lowercase()));
        let head = head_rx.await.expect("head").to_lowercase();
        assert!(head.starts_with("get /module.wasm http/1.1\r\n"), "{head}");
        assert!(head.contains("\r\naccept: x/y\r\n"), "{head}");

        assert_eq!(
            resp.body.next_chunk().await.expect("chunk 1").as_deref(),
            Some(&b"hello"[..])
        );
        more_tx.send(()).expect("server alive");
        let (rest, end) = drain(&mut resp.body).await;
        assert_eq!(end, Ok(()));
        assert_eq!(rest, b" world");
    }

    #[tokio::test]
    async fn does_not_follow_redirects() {
        let (l, base) = listener().await;
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let _ = read_head(&mut s).await;
            s.write_all(b"HTTP/1.1 302 Found\r\nLocation: http://169.254.169.254/\r\nContent-Length: 0\r\n\r\n")
                .await
                .expect("write");
            let _ = read_head(&mut s).await;
        });
        let t = transport(Config::default());
        let resp = t.get(&HttpRequest::get(base), TIMEOUT).await.expect("get");
        assert_eq!(resp.status, 302);
        assert_eq!(resp.header("location"), Some("http://169.254.169.254/"));
    }

    #[tokio::test]
    async fn times_out_during_a_slow_body() {
        let (l, base) = listener().await;
        let (_stall_tx, stall_rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let _ = read_head(&mut s).await;
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
                .await
                .expect("write");
            let _ = stall_rx.await; // never sends the other 90 bytes
        });
        let t = transport(Config::default());
        let mut resp = t
            .get(&HttpRequest::get(base), TIMEOUT)
            .await
            .expect("headers arrive");
        let first = resp.body.next_chunk().await.expect("first bytes");
        assert_eq!(first.as_deref(), Some(&b"0123456789"[..]));
        // From here on nothing arrives: with the clock paused, tokio jumps to the deadline.
        tokio::time::pause();
        assert_eq!(resp.body.next_chunk().await, Err(TransportError::Timeout));
    }

    #[tokio::test]
    async fn times_out_waiting_for_headers() {
        let (l, base) = listener().await;
        let (got_request_tx, got_request_rx) = oneshot::channel::<()>();
        let (_stall_tx, stall_rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let _ = read_head(&mut s).await;
            let _ = got_request_tx.send(());
            let _ = stall_rx.await;
        });
        let t = transport(Config::default());
        let attempt =
            tokio::spawn(async move { t.get(&HttpRequest::get(base), TIMEOUT).await.map(|_| ()) });
        got_request_rx.await.expect("request reached the server");
        tokio::time::pause();
        assert_eq!(attempt.await.expect("join"), Err(TransportError::Timeout));
    }

    #[tokio::test]
    async fn connection_refused_is_a_connect_error() {
        let (l, base) = listener().await;
        drop(l);
        let t = transport(Config::default());
        let err = t
            .get(&HttpRequest::get(base), TIMEOUT)
            .await
            .expect_err("nobody listens");
        assert!(matches!(err, TransportError::Connect(_)), "{err:?}");
        assert!(err.is_retryable());
    }

    #[tokio::test]
    async fn connection_closed_mid_body_is_a_reset() {
        let (l, base) = listener().await;
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let _ = read_head(&mut s).await;
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
                .await
                .expect("write");
            // Dropping the socket closes the connection 90 bytes early.
        });
        let t = transport(Config::default());
        let mut resp = t.get(&HttpRequest::get(base), TIMEOUT).await.expect("get");
        let (got, end) = drain(&mut resp.body).await;
        assert!(got.len() <= 10);
        let err = end.expect_err("body is incomplete");
        assert!(matches!(err, TransportError::Reset(_)), "{err:?}");
        assert!(err.is_retryable());
    }

    #[tokio::test]
    async fn connection_closed_before_headers_is_a_reset() {
        let (l, base) = listener().await;
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let _ = read_head(&mut s).await;
        });
        let t = transport(Config::default());
        let err = t
            .get(&HttpRequest::get(base), TIMEOUT)
            .await
            .expect_err("no response");
        assert!(matches!(err, TransportError::Reset(_)), "{err:?}");
    }

    #[tokio::test]
    async fn blocked_addresses_are_never_connected_to() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.set_nonblocking(true).expect("nonblocking");
        let port = l.local_addr().expect("addr").port();
        let config = Config {
            blocked_cidrs: vec![
                "127.0.0.0/8".parse().expect("cidr"),
                "::1/128".parse().expect("cidr"),
            ],
            ..Config::default()
        };
        let t = transport(config);
        for url in [
            // An IP literal: checked before connecting.
            format!("http://127.0.0.1:{port}/x.wasm"),
            format!("http://[::ffff:127.0.0.1]:{port}/x.wasm"),
            // The unspecified address connects to loopback.
            format!("http://0.0.0.0:{port}/x.wasm"),
            format!("http://[::]:{port}/x.wasm"),
            // A name: checked by the resolver.
            format!("http://localhost:{port}/x.wasm"),
            // Always blocked (cloud metadata), whatever the configuration.
            "http://169.254.169.254/latest/meta-data/".to_string(),
        ] {
            let err = t
                .get(&HttpRequest::get(url.clone()), TIMEOUT)
                .await
                .expect_err("blocked");
            assert!(matches!(err, TransportError::Blocked(_)), "{url}: {err:?}");
            assert!(!err.is_retryable());
        }
        let err = t
            .get(
                &HttpRequest::get(format!("http://localhost:{port}/")),
                TIMEOUT,
            )
            .await
            .expect_err("blocked");
        assert!(
            err.to_string()
                .starts_with("blocked address: localhost resolves to "),
            "{err}"
        );
        assert_eq!(
            l.accept().map(|_| ()).map_err(|e| e.kind()),
            Err(std::io::ErrorKind::WouldBlock),
            "a blocked address was connected to"
        );
    }
}
