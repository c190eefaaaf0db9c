//! The one accept loop of every port we listen on (xDS, admin, the proxy's xDS port).
//!
//! - Accept errors (the open-files limit reached: EMFILE/ENFILE) back off from
//!   [`BACKOFF_MIN`] doubling to [`BACKOFF_MAX`] instead of spinning, are counted in
//!   `wasm_ecds_accept_errors_total{port}` and logged at most once per second per kind of trouble
//!   (accept errors, the cap, failed handshakes) through the shared [`LogGate`], with the number of
//!   lines held back (`suppressed`).
//! - At most `max_connections` connections are open per port; one more is accepted and closed at
//!   once, counted in `wasm_ecds_connections_refused_total{port,reason="limit"}`.
//! - TLS handshakes run in the connection's own task under [`HANDSHAKE_TIMEOUT`], never in the
//!   accept loop; failed or timed-out ones are counted (`reason="handshake"`/`"handshake_timeout"`).
//!
//! [`Listener::incoming`] yields the connections as a stream, which tonic serves with
//! `serve_with_incoming_shutdown` and the admin server with hyper; the accept task ends when the
//! stream is dropped (the server stopped), closing the socket.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::log_gate::LogGate;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::tls::ReloadingTls;
use super::NetSeries;

/// First pause after a failed accept.
pub const BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause after failed accepts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// A TLS handshake not finished by then is abandoned.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Repeated warnings of one port are logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(1);
/// Connections handed over but not yet taken by the server.
const QUEUE: usize = 64;

/// How one port accepts connections.
#[derive(Clone, Debug)]
pub struct ListenOptions {
    /// `xds` or `admin`: the `port` label of the series and the logs.
    pub port: &'static str,
    pub max_connections: usize,
    pub tls: Option<Arc<ReloadingTls>>,
}

impl ListenOptions {
    /// Plain TCP with the default cap.
    pub fn plain(port: &'static str, max_connections: usize) -> Self {
        ListenOptions {
            port,
            max_connections,
            tls: None,
        }
    }
}

/// Default `--xds-max-connections`.
pub const DEFAULT_XDS_MAX_CONNECTIONS: usize = 8192;
/// Default `--admin-max-connections`.
pub const DEFAULT_ADMIN_MAX_CONNECTIONS: usize = 512;

/// A bound socket and how to accept on it.
#[derive(Debug)]
pub struct Listener {
    tcp: TcpListener,
    options: ListenOptions,
    series: NetSeries,
}

impl From<TcpListener> for Listener {
    /// An xDS port without TLS, counted in a registry of its own (tests, load tools).
    fn from(tcp: TcpListener) -> Self {
        Listener::new(
            tcp,
            ListenOptions::plain("xds", DEFAULT_XDS_MAX_CONNECTIONS),
            &crate::metrics::Metrics::new(),
        )
    }
}

impl Listener {
    pub fn new(
        tcp: TcpListener,
        options: ListenOptions,
        metrics: &crate::metrics::Metrics,
    ) -> Self {
        let series = metrics.net_series();
        series.init(options.port);
        Listener {
            tcp,
            options,
            series,
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    pub fn is_tls(&self) -> bool {
        self.options.tls.is_some()
    }

    /// Starts accepting; connections (after their handshake) come out of the stream.
    pub fn incoming(self) -> Incoming {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(accept_loop(self, tx));
        Incoming { rx }
    }
}

async fn accept_loop(listener: Listener, tx: mpsc::Sender<Conn>) {
    let Listener {
        tcp,
        options,
        series,
    } = listener;
    let port = options.port;
    let slots = Arc::new(Semaphore::new(options.max_connections));
    // One line per kind of trouble and second, with the count of those held back.
    let quiet = Arc::new(LogGate::new(LOG_EVERY));
    let mut backoff = BACKOFF_MIN;
    loop {
        let accepted = tokio::select! {
            _ = tx.closed() => return,
            accepted = tcp.accept() => accepted,
        };
        let (stream, remote) = match accepted {
            Ok(a) => {
                backoff = BACKOFF_MIN;
                a
            }
            Err(e) => {
                series.accept_errors.with_label_values(&[port]).inc();
                if let Some(suppressed) = quiet.admit("accept") {
                    tracing::warn!(port, error = %e, suppressed, pause_ms = backoff.as_millis() as u64, "accept failed; pausing");
                }
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            series.refused.with_label_values(&[port, "limit"]).inc();
            if let Some(suppressed) = quiet.admit("limit") {
                tracing::warn!(port, %remote, limit = options.max_connections, suppressed, "connection refused: too many open connections");
            }
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().ok();
        let (tls, tx, series, quiet) = (
            options.tls.clone(),
            tx.clone(),
            series.clone(),
            quiet.clone(),
        );
        tokio::spawn(async move {
            let io = match tls {
                None => ConnIo::Plain(stream),
                Some(tls) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
                    let why = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(s)) => Ok(s),
                        Ok(Err(e)) => Err(("handshake", e.to_string())),
                        Err(_) => Err(("handshake_timeout", "timed out".to_string())),
                    };
                    match why {
                        Ok(s) => ConnIo::Tls(Box::new(s)),
                        Err((reason, e)) => {
                            series.refused.with_label_values(&[port, reason]).inc();
                            if let Some(suppressed) = quiet.admit("handshake") {
                                tracing::warn!(port, %remote, error = %e, suppressed, "TLS handshake failed");
                            }
                            return;
                        }
                    }
                }
            };
            let peer_verified = match &io {
                ConnIo::Tls(s) => s.get_ref().1.peer_certificates().is_some(),
                ConnIo::Plain(_) => false,
            };
            let conn = Conn {
                io,
                local,
                remote: Some(remote),
                peer_verified,
                activity: Arc::new(Activity::new()),
                _slot: slot,
            };
            let _ = tx.send(conn).await;
        });
    }
}

/// The accepted connections of a [`Listener`].
#[derive(Debug)]
pub struct Incoming {
    rx: mpsc::Receiver<Conn>,
}

impl futures_util::Stream for Incoming {
    type Item = io::Result<Conn>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|c| c.map(Ok))
    }
}

impl Incoming {
    /// The next connection; `None` once the accept task is gone.
    pub async fn next(&mut self) -> Option<Conn> {
        self.rx.recv().await
    }
}

#[derive(Debug)]
enum ConnIo {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// When a connection last moved bytes, for idle timeouts.
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    /// Milliseconds after `start`.
    last: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last.store(ms, Ordering::Relaxed);
    }

    /// Completes once no byte moved for `limit`.
    pub async fn idle(&self, limit: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last.load(Ordering::Relaxed));
            let deadline = last + limit;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// One accepted connection (TLS already negotiated). Holds its slot of the port's cap until
/// dropped.
#[derive(Debug)]
pub struct Conn {
    io: ConnIo,
    local: Option<SocketAddr>,
    remote: Option<SocketAddr>,
    peer_verified: bool,
    activity: Arc<Activity>,
    _slot: OwnedSemaphorePermit,
}

impl Conn {
    /// The client presented a certificate the port's client CA verified.
    pub fn peer_verified(&self) -> bool {
        self.peer_verified
    }

    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.remote
    }

    pub fn activity(&self) -> Arc<Activity> {
        self.activity.clone()
    }
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        TcpConnectInfo {
            local_addr: self.local,
            remote_addr: self.remote,
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = match &mut self.io {
            ConnIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = match &mut self.io {
            ConnIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        };
        if let Poll::Ready(Ok(n)) = &r {
            if *n > 0 {
                self.activity.touch();
            }
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            ConnIo::Plain(s) => Pin::new(s).poll_flush(cx),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            ConnIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Raises the soft open-files limit to the hard one (a process serving thousands of Envoys must
/// not stop at the common soft 1024). Returns the limit now in force.
pub fn raise_nofile_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return Some(raised.rlim_cur);
            }
        }
    }
    Some(lim.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_over_the_cap_are_refused_and_counted() {
        let metrics = crate::metrics::Metrics::new();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let mut incoming =
            Listener::new(tcp, ListenOptions::plain("admin", 2), &metrics).incoming();
        let _a = TcpStream::connect(addr).await.unwrap();
        let _b = TcpStream::connect(addr).await.unwrap();
        let (first, second) = (
            incoming.next().await.unwrap(),
            incoming.next().await.unwrap(),
        );
        let mut c = TcpStream::connect(addr).await.unwrap();
        // The third is closed by the server: the read ends.
        let mut byte = [0u8; 1];
        let n = tokio::io::AsyncReadExt::read(&mut c, &mut byte)
            .await
            .unwrap_or(0);
        assert_eq!(n, 0);
        let samples = metrics.samples();
        assert_eq!(
            samples[r#"wasm_ecds_connections_refused_total{port="admin",reason="limit"}"#],
            1.0
        );
        // A slot freed: the next connection is taken.
        drop((first, second));
        let _d = TcpStream::connect(addr).await.unwrap();
        assert!(incoming.next().await.is_some());
    }
}
