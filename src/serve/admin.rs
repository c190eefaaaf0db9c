//! The admin HTTP server (cli.md): `/metrics`, `/healthz`, `/readyz`, `/debug/plugins`,
//! `/debug/cache`, `/debug/syncz` (per-proxy xDS view, `xds/syncz.rs`), `POST /refresh?plugin=ns/name`, and the module endpoint `/modules/<sha256>.wasm`
//! used by `--delivery http`. It reads what [`Shared`] holds (readiness, the module index) and the
//! shared [`Metrics`](crate::metrics::Metrics) (engine and xDS series, one registry), and sends the
//! controller commands — a refresh, a page of a debug view (`view.rs`), which it streams to the
//! client entry by entry; it never touches the engine.
//!
//! Connections come from the one accept loop of [`crate::net::listen`] (TLS, connection cap).
//! Each is bounded here: its request headers within `--admin-header-timeout` and
//! [`MAX_HEADER_BYTES`], no byte moved for `--admin-idle-timeout` closes it. Everything but the
//! `--admin-open` endpoints needs [`AdminOptions::access`] (docs/security.md); modules fetched with
//! registry credentials go only to authenticated callers. Modules are streamed from disk in
//! [`MODULE_CHUNK`] pieces, so a slow reader holds a few chunks, not the module.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt as _, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::oneshot;

use super::view::{CacheQuery, PluginsQuery};
use super::{Command, Shared};
use crate::auth::Access;
use crate::convert::MODULES_PATH;
use crate::plugin::ObjectKey;

type Body = UnsyncBoxBody<Bytes, io::Error>;

/// Largest request head (request line and headers) accepted.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Module bytes read from disk at a time.
pub const MODULE_CHUNK: usize = 64 * 1024;

/// Who may use which endpoint, and the per-connection bounds.
#[derive(Debug)]
pub struct AdminOptions {
    pub access: Access,
    /// Of `healthz`, `readyz`, `metrics`, `modules`: served without authentication (private
    /// modules never are).
    pub open: BTreeSet<String>,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
}

impl Default for AdminOptions {
    /// Everything open, the default bounds (tests of other parts).
    fn default() -> Self {
        let ports = crate::net::PortOptions::default();
        AdminOptions {
            access: Access::open(),
            open: ports.admin_open,
            header_timeout: ports.admin_header_timeout,
            idle_timeout: ports.admin_idle_timeout,
        }
    }
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(
            Full::new(body.into())
                .map_err(|n| match n {})
                .boxed_unsync(),
        )
        .expect("valid response")
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    reply(status, "text/plain; charset=utf-8", body.into())
}

fn unauthorized(why: &str) -> Response<Body> {
    let mut r = text(StatusCode::UNAUTHORIZED, format!("unauthorized: {why}\n"));
    r.headers_mut()
        .insert("www-authenticate", http::HeaderValue::from_static("Bearer"));
    r
}

/// Serves until `shutdown` completes.
pub async fn serve(
    mut incoming: crate::net::Incoming,
    shared: Arc<Shared>,
    options: Arc<AdminOptions>,
    shutdown: impl Future<Output = ()> + Send,
) {
    tokio::pin!(shutdown);
    loop {
        let conn = tokio::select! {
            _ = &mut shutdown => return,
            conn = incoming.next() => match conn {
                Some(c) => c,
                None => return,
            },
        };
        let (shared, options) = (shared.clone(), options.clone());
        tokio::spawn(async move {
            let peer_verified = conn.peer_verified();
            let activity = conn.activity();
            let idle = options.idle_timeout;
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(options.header_timeout)
                .max_buf_size(MAX_HEADER_BYTES);
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_header_list_size(MAX_HEADER_BYTES as u32);
            let svc =
                service_fn(move |req| handle(req, shared.clone(), options.clone(), peer_verified));
            tokio::select! {
                _ = builder.serve_connection(TokioIo::new(conn), svc) => {}
                _ = activity.idle(idle) => {}
            }
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    shared: Arc<Shared>,
    options: Arc<AdminOptions>,
    peer_verified: bool,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("");
    let authorization = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    let allowed = |endpoint: &str| {
        options.open.contains(endpoint) || options.access.allows_peer(peer_verified, authorization)
    };
    let authenticated = options
        .access
        .authenticates_peer(peer_verified, authorization);
    let endpoint = match path.as_str() {
        "/healthz" => "healthz",
        "/readyz" => "readyz",
        "/metrics" => "metrics",
        p if p.starts_with(MODULES_PATH) => "modules",
        _ => "",
    };
    if !allowed(endpoint) {
        return Ok(unauthorized(
            "want a client certificate or Authorization: Bearer <token>",
        ));
    }
    let resp = match (req.method(), path.as_str()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => {
            if shared.ready.load(std::sync::atomic::Ordering::Acquire) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        // One registry: the engine's Istio series and the xDS series, as they are now.
        (&Method::GET, "/metrics") => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            shared.metrics.render(),
        ),
        (&Method::GET, "/debug/plugins") => match PluginsQuery::parse(query) {
            Ok(q) => match ask(&shared, |tx| Command::Plugins(q, tx)).await {
                Ok(page) => json(page.into_body()),
                Err(r) => r,
            },
            Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
        },
        (&Method::GET, "/debug/cache") => match CacheQuery::parse(query) {
            Ok(q) => match ask(&shared, |tx| Command::Cache(q, tx)).await {
                Ok(page) => json(page.into_body()),
                Err(r) => r,
            },
            Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
        },
        (&Method::GET, "/debug/syncz") => reply(
            StatusCode::OK,
            "application/json",
            crate::xds::syncz::syncz_json(&shared.resources),
        ),
        (&Method::POST, "/refresh") => refresh(query, &shared).await,
        (&Method::GET, p) => match module_sha(p) {
            Some(sha) => module(sha, &shared, authenticated).await,
            None => text(StatusCode::NOT_FOUND, "not found\n"),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    };
    Ok(resp)
}

/// The sha256 of a module path: exactly `/modules/<64 lowercase hex>.wasm`.
fn module_sha(path: &str) -> Option<&str> {
    let sha = path.strip_prefix(MODULES_PATH)?.strip_suffix(".wasm")?;
    (sha.len() == 64 && sha.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))).then_some(sha)
}

/// A JSON body written as the client reads it.
fn json(
    body: impl futures_util::Stream<Item = Result<Frame<Bytes>, io::Error>> + Send + 'static,
) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(StreamBody::new(body).boxed_unsync())
        .expect("valid response")
}

/// Sends the controller a request and waits for its answer; `503 shutting down` once it is gone.
async fn ask<T>(
    shared: &Shared,
    command: impl FnOnce(oneshot::Sender<T>) -> Command,
) -> Result<T, Response<Body>> {
    let gone = || text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    let (tx, rx) = oneshot::channel();
    if shared.commands.send(command(tx)).await.is_err() {
        return Err(gone());
    }
    rx.await.map_err(|_| gone())
}

async fn refresh(query: &str, shared: &Shared) -> Response<Body> {
    let plugin = query.split('&').find_map(|kv| kv.strip_prefix("plugin="));
    let Some(key) =
        plugin.and_then(|p| ObjectKey::parse(&p.replace("%2F", "/").replace("%2f", "/")))
    else {
        return text(StatusCode::BAD_REQUEST, "want ?plugin=namespace/name\n");
    };
    match ask(shared, |tx| Command::Refresh(key.clone(), tx)).await {
        Ok(true) => text(StatusCode::OK, format!("refreshed {key}\n")),
        Ok(false) => text(StatusCode::NOT_FOUND, format!("no plugin {key}\n")),
        Err(r) => r,
    }
}

async fn module(sha: &str, shared: &Shared, authenticated: bool) -> Response<Body> {
    let Some(index) = shared.modules.read().expect("module index lock").clone() else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n");
    };
    if index.is_private(sha) && !authenticated {
        return unauthorized("this module was fetched with registry credentials");
    }
    let sha = sha.to_string();
    let opened = tokio::task::spawn_blocking(move || index.open(&sha)).await;
    let reader = match opened.ok().flatten() {
        Some(Ok(reader)) => reader,
        Some(Err(e)) => {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot read module: {e}\n"),
            )
        }
        None => return text(StatusCode::NOT_FOUND, "no such module\n"),
    };
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/wasm")
        .body(StreamBody::new(chunks(reader)).boxed_unsync())
        .expect("valid response")
}

/// The reader's bytes in [`MODULE_CHUNK`] pieces, each read off the runtime's worker threads
/// when the connection asks for it (hyper polls the body only when it can write).
fn chunks(
    reader: Box<dyn io::Read + Send>,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, io::Error>> + Send + 'static {
    futures_util::stream::unfold(Some(reader), |reader| async move {
        let mut reader = reader?;
        let read = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; MODULE_CHUNK];
            let n = reader.read(&mut buf);
            (
                reader,
                n.map(|n| {
                    buf.truncate(n);
                    buf
                }),
            )
        })
        .await;
        match read {
            Ok((_, Ok(buf))) if buf.is_empty() => None,
            Ok((reader, Ok(buf))) => Some((Ok(Frame::data(Bytes::from(buf))), Some(reader))),
            Ok((_, Err(e))) => Some((Err(e), None)),
            Err(e) => Some((Err(io::Error::other(e)), None)),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::module_sha;

    #[test]
    fn only_exact_module_paths_name_a_module() {
        let sha = "0123456789abcdef".repeat(4);
        assert_eq!(
            module_sha(&format!("/modules/{sha}.wasm")),
            Some(sha.as_str())
        );
        for bad in [
            format!("/modules/{sha}.wasm.wasm"),
            format!("/modules/{sha}"),
            format!("/modules/{}.wasm", sha.to_uppercase()),
            format!("/modules/{}.wasm", &sha[1..]),
            format!("/modules/x{sha}.wasm"),
            format!("/modules/../{sha}.wasm"),
            "/modules/.wasm".to_string(),
        ] {
            assert_eq!(module_sha(&bad), None, "{bad}");
        }
    }
}
