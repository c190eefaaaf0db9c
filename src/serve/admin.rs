//! The admin HTTP server (cli.md): `/metrics`, `/healthz`, `/readyz`, `/debug/plugins`,
//! `/debug/cache`, `/debug/syncz` (per-proxy xDS view, `xds/syncz.rs`), `POST /refresh?plugin=ns/name`, and the module endpoint `/modules/<sha256>.wasm`
//! used by `--delivery http`. It only reads the controller's [`AdminView`](super::AdminView) and
//! the shared [`Metrics`](crate::metrics::Metrics) (engine and xDS series, one registry), and
//! sends the controller commands; it never touches the engine.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::oneshot;

use super::{Command, Shared};
use crate::convert::MODULES_PATH;
use crate::plugin::ObjectKey;

type Body = Full<Bytes>;

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .expect("valid response")
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    reply(status, "text/plain; charset=utf-8", body.into())
}

/// Serves until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()> + Send,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    continue;
                }
            },
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(req, shared.clone()));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn handle(req: Request<Incoming>, shared: Arc<Shared>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let resp = match (req.method(), path.as_str()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => {
            if shared.view.read().expect("view lock").ready {
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
        (&Method::GET, "/debug/plugins") => {
            let v = shared.view.read().expect("view lock").plugins.clone();
            reply(
                StatusCode::OK,
                "application/json",
                serde_json::to_vec_pretty(&v).unwrap_or_default(),
            )
        }
        (&Method::GET, "/debug/cache") => {
            let v = shared.view.read().expect("view lock").cache.clone();
            reply(
                StatusCode::OK,
                "application/json",
                serde_json::to_vec_pretty(&v).unwrap_or_default(),
            )
        }
        (&Method::GET, "/debug/syncz") => reply(
            StatusCode::OK,
            "application/json",
            crate::xds::syncz::syncz_json(&shared.resources),
        ),
        (&Method::POST, "/refresh") => refresh(req.uri().query().unwrap_or(""), &shared).await,
        (&Method::GET, p) if p.starts_with(MODULES_PATH) => module(p, &shared).await,
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    };
    Ok(resp)
}

async fn refresh(query: &str, shared: &Shared) -> Response<Body> {
    let plugin = query.split('&').find_map(|kv| kv.strip_prefix("plugin="));
    let Some(key) =
        plugin.and_then(|p| ObjectKey::parse(&p.replace("%2F", "/").replace("%2f", "/")))
    else {
        return text(StatusCode::BAD_REQUEST, "want ?plugin=namespace/name\n");
    };
    let (tx, rx) = oneshot::channel();
    if shared
        .commands
        .send(Command::Refresh(key.clone(), tx))
        .await
        .is_err()
    {
        return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    }
    match rx.await {
        Ok(true) => text(StatusCode::OK, format!("refreshed {key}\n")),
        Ok(false) => text(StatusCode::NOT_FOUND, format!("no plugin {key}\n")),
        Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"),
    }
}

async fn module(path: &str, shared: &Shared) -> Response<Body> {
    let sha = path
        .trim_start_matches(MODULES_PATH)
        .trim_end_matches(".wasm");
    let Some(index) = shared.view.read().expect("view lock").modules.clone() else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n");
    };
    let sha = sha.to_string();
    // Modules may be hundreds of MiB: read off the runtime's worker threads.
    let read = tokio::task::spawn_blocking(move || index.read(&sha)).await;
    match read.ok().flatten() {
        Some(Ok(bytes)) => reply(StatusCode::OK, "application/wasm", bytes),
        Some(Err(e)) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot read module: {e}\n"),
        ),
        None => text(StatusCode::NOT_FOUND, "no such module\n"),
    }
}
