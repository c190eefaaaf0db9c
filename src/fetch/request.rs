//! Request plumbing shared by the HTTP(S) and OCI fetchers: redirect following within one
//! attempt's time budget (every hop resolved with [`Url::join`] and sent through
//! [`Fetcher::transport`]), the mapping of transport errors and statuses onto [`AttemptError`]s, and
//! bounded body reading (small bodies into memory; module bodies go through [`super::stream`]).

use std::time::Duration;

use url::Url;

use super::retry::AttemptError;
use super::{BodyStream, FetchError, Fetcher, HttpRequest, HttpResponse, TransportError};
use crate::clock::Timestamp;

/// Redirect hops followed inside one attempt (as Go's `net/http` client).
pub const MAX_REDIRECTS: usize = 10;

/// Builds the error of the step that failed: [`FetchError::Download`] for module bodies,
/// [`FetchError::Manifest`] for OCI manifests and tokens.
pub(crate) type ErrorKind = fn(String) -> FetchError;

impl Fetcher {
    /// Sends `req`, following redirects (301, 302, 303, 307, 308; relative `Location`s resolved
    /// against the request URL; at most [`MAX_REDIRECTS`] hops), all within `timeout` measured from
    /// `started` (the clock reading of the caller, taken just before: the first hop gets the whole
    /// `timeout` without reading the clock again). The `Authorization` header is dropped when a hop
    /// leaves the original scheme and authority. Returns the first non-redirect response, whatever
    /// its status, and its URL.
    pub(crate) async fn send_following_redirects(
        &self,
        mut req: HttpRequest,
        timeout: Duration,
        started: Timestamp,
        kind: ErrorKind,
    ) -> Result<(HttpResponse, String), AttemptError> {
        let mut hops = 0;
        let mut remaining = timeout;
        loop {
            if remaining.is_zero() {
                return Err(transport_failure(&req.url, TransportError::Timeout, kind));
            }
            let resp = self
                .transport
                .get(&req, remaining)
                .await
                .map_err(|e| transport_failure(&req.url, e, kind))?;
            if !is_redirect(resp.status) {
                return Ok((resp, req.url));
            }
            let url = &req.url;
            let status = resp.status;
            let location = resp.header("location").ok_or_else(|| {
                AttemptError::Fatal(kind(format!("{url}: redirect {status} without location")))
            })?;
            let unsupported = || {
                AttemptError::Fatal(kind(format!(
                    "{url}: redirect {status} to unsupported location {location:?}"
                )))
            };
            let current = Url::parse(url).map_err(|_| unsupported())?;
            let next = resolve_location(&current, location).ok_or_else(unsupported)?;
            if hops == MAX_REDIRECTS {
                return Err(AttemptError::Fatal(kind(format!(
                    "{url}: stopped after {MAX_REDIRECTS} redirects"
                ))));
            }
            hops += 1;
            if next.origin() != current.origin() {
                req.headers.retain(|(k, _)| k != "authorization");
            }
            req.url = next.into();
            remaining = timeout.saturating_sub(self.now().since(started));
        }
    }
}

/// Resolves a `Location` against the URL it came from (RFC 3986 §5, by [`Url::join`]). Only
/// http(s) targets with a host are followed; the fragment is dropped (it is never sent).
pub(crate) fn resolve_location(base: &Url, location: &str) -> Option<Url> {
    let mut next = base.join(location.trim()).ok()?;
    if !matches!(next.scheme(), "http" | "https") || next.host_str().is_none_or(str::is_empty) {
        return None;
    }
    next.set_fragment(None);
    Some(next)
}

/// Statuses retried as transient (behavior.md §4.1): 5xx except 501, 505 and 511.
pub fn is_retryable_status(status: u16) -> bool {
    status >= 500 && !matches!(status, 501 | 505 | 511)
}

fn is_redirect(status: u16) -> bool {
    matches!(status, 301 | 302 | 303 | 307 | 308)
}

/// A non-success status: retried when transient, otherwise final.
pub(crate) fn status_failure(url: &str, status: u16, kind: ErrorKind) -> AttemptError {
    let e = kind(format!("{url}: status code {status}"));
    if is_retryable_status(status) {
        AttemptError::Retry(e)
    } else {
        AttemptError::Fatal(e)
    }
}

/// A transport failure: connection errors, resets and timeouts are retried; a blocked address is
/// [`FetchError::Blocked`]; TLS errors are final.
pub(crate) fn transport_failure(url: &str, e: TransportError, kind: ErrorKind) -> AttemptError {
    match e {
        TransportError::Blocked(m) => {
            AttemptError::Fatal(FetchError::Blocked(format!("{url}: {m}")))
        }
        e if e.is_retryable() => AttemptError::Retry(kind(format!("{url}: {e}"))),
        e => AttemptError::Fatal(kind(format!("{url}: {e}"))),
    }
}

/// How many bytes one transfer may carry. A body that may be an archive (gzip, tar) may exceed the
/// module limit by the archive overhead: the module inside is held to the limit by unpacking, so a
/// module of exactly the limit is accepted however it is packed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TransferLimit {
    pub bytes: u64,
    pub module: u64,
}

impl TransferLimit {
    /// The body is the module itself.
    pub(crate) fn plain(max: u64) -> Self {
        TransferLimit {
            bytes: max,
            module: max,
        }
    }

    /// The body may be an archive holding the module.
    pub(crate) fn archive(max: u64) -> Self {
        TransferLimit {
            bytes: max.saturating_add(super::unpack::ARCHIVE_OVERHEAD),
            module: max,
        }
    }

    fn exceeded(self) -> AttemptError {
        AttemptError::Fatal(FetchError::TooLarge { limit: self.module })
    }
}

/// Refuses a body whose announced length is already over the limit.
pub(crate) fn check_content_length(
    resp: &HttpResponse,
    limit: TransferLimit,
) -> Result<(), AttemptError> {
    match resp
        .header("content-length")
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        Some(len) if len > limit.bytes => Err(limit.exceeded()),
        _ => Ok(()),
    }
}

/// Reads a small body (manifest, token) into memory; more than `limit` bytes is a final error of
/// the step's kind.
pub(crate) async fn read_small_body(
    url: &str,
    body: &mut dyn BodyStream,
    limit: usize,
    kind: ErrorKind,
) -> Result<Vec<u8>, AttemptError> {
    let mut buf = Vec::new();
    while let Some(chunk) = body
        .next_chunk()
        .await
        .map_err(|e| transport_failure(url, e, kind))?
    {
        if buf.len() + chunk.len() > limit {
            return Err(AttemptError::Fatal(kind(format!(
                "{url}: response larger than {limit} bytes"
            ))));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_locations() {
        let base = Url::parse("https://h.example:8443/a/b/c.wasm?x=1").unwrap();
        let r = |l| resolve_location(&base, l).map(String::from);
        assert_eq!(r("/d").as_deref(), Some("https://h.example:8443/d"));
        assert_eq!(r("d/e").as_deref(), Some("https://h.example:8443/a/b/d/e"));
        assert_eq!(r("../d").as_deref(), Some("https://h.example:8443/a/d"));
        assert_eq!(
            r("./d?q=2").as_deref(),
            Some("https://h.example:8443/a/b/d?q=2")
        );
        assert_eq!(
            r("?y=2").as_deref(),
            Some("https://h.example:8443/a/b/c.wasm?y=2")
        );
        assert_eq!(r("//other/x").as_deref(), Some("https://other/x"));
        assert_eq!(r("HTTP://other/x#f").as_deref(), Some("http://other/x"));
        assert_eq!(r("file:///etc/passwd"), None);
        assert_eq!(r("mailto:x@y"), None);
        let origin = |u: &str| Url::parse(u).unwrap().origin();
        assert_ne!(origin("https://a/x"), origin("https://a:444/x"));
        assert_eq!(origin("https://A/x"), origin("https://a:443/y"));
    }
}
