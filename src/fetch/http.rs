//! The HTTP(S) fetcher (behavior.md §4.1), mirroring Istio's `pkg/wasm/httpfetcher.go`: one GET per
//! attempt with redirects followed inside the attempt, retries on connection errors and retryable
//! 5xx statuses, the body staged on disk while counted, then unpacked (gzip, tar, tar.gz) into the
//! Wasm module that is returned.
//!
//! It also holds the request plumbing the OCI fetcher shares: redirect following with a per-attempt
//! time budget, the mapping of transport errors and statuses onto [`AttemptError`]s, and bounded
//! body reading. No network code lives here; every request goes through [`Fetcher::transport`].

use std::io::Write;
use std::time::Duration;

use sha2::{Digest, Sha256};
use url::Url;

use super::retry::{with_retries, AttemptError, PullBudget};
use super::unpack::unpack_module;
use super::{BodyStream, FetchError, Fetcher, HttpRequest, HttpResponse, StagedModule};
use super::{StagedFile, TransportError};
use crate::clock::Timestamp;
use crate::url::HttpUrl;

/// Redirect hops followed inside one attempt (as Go's `net/http` client).
pub const MAX_REDIRECTS: usize = 10;

/// Builds the error of the step that failed: [`FetchError::Download`] for module bodies,
/// [`FetchError::Manifest`] for OCI manifests and tokens.
pub(crate) type ErrorKind = fn(String) -> FetchError;

/// HTTP cache validators of a downloaded module (`ETag`, `Last-Modified`), sent back as
/// `If-None-Match` / `If-Modified-Since` so a real server can answer `304 Not Modified`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Validators {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_modified: Option<String>,
}

impl Validators {
    fn from_response(resp: &HttpResponse) -> Option<Self> {
        let v = Validators {
            etag: resp.header("etag").map(str::to_string),
            last_modified: resp.header("last-modified").map(str::to_string),
        };
        (v.etag.is_some() || v.last_modified.is_some()).then_some(v)
    }

    fn apply(&self, mut req: HttpRequest) -> HttpRequest {
        if let Some(e) = &self.etag {
            req = req.header("if-none-match", e.clone());
        }
        if let Some(m) = &self.last_modified {
            req = req.header("if-modified-since", m.clone());
        }
        req
    }
}

/// The result of a conditional download.
#[derive(Debug)]
pub enum HttpPull {
    /// The body was downloaded: the module and the validators the server sent with it.
    Fetched(StagedModule, Option<Validators>),
    /// `304 Not Modified`: the module the validators belong to is still current.
    NotModified,
}

/// What one attempt got.
enum Attempt {
    Body(Box<dyn StagedFile>, Option<Validators>),
    NotModified,
}

impl Fetcher {
    /// Downloads `url` (behavior.md §4.1) and unpacks it into a staged Wasm module.
    ///
    /// Errors: [`FetchError::Download`] for every failed transfer (4xx statuses included: plain web
    /// servers get no credentials), [`FetchError::TooLarge`], [`FetchError::Blocked`], and
    /// [`FetchError::InvalidModule`] when the body is not (an archive of) a Wasm binary.
    pub async fn fetch_http(
        &self,
        url: &str,
        budget: PullBudget,
    ) -> Result<StagedModule, FetchError> {
        match self.fetch_http_conditional(url, budget, None).await? {
            HttpPull::Fetched(m, _) => Ok(m),
            HttpPull::NotModified => Err(FetchError::Download(format!(
                "{url}: 304 Not Modified to an unconditional request"
            ))),
        }
    }

    /// [`Fetcher::fetch_http`] as a conditional request when `validators` of the cached module are
    /// known (behavior.md §6: a real HTTP server answering 304 makes the outcome `revalidated`).
    pub async fn fetch_http_conditional(
        &self,
        url: &str,
        budget: PullBudget,
        validators: Option<&Validators>,
    ) -> Result<HttpPull, FetchError> {
        let parsed = HttpUrl::parse(url)
            .map_err(|why| FetchError::Download(format!("{url}: invalid url: {why}")))?;
        let url = parsed.url().as_str();
        let attempt = with_retries(self, budget, |timeout| async move {
            self.download_attempt(url, timeout, validators).await
        })
        .await?;
        let (mut raw, got) = match attempt {
            Attempt::NotModified => return Ok(HttpPull::NotModified),
            Attempt::Body(raw, got) => (raw, got),
        };
        let mut out = self.store.stage().map_err(FetchError::io)?;
        let (sha256, size) = super::cpu_bound(|| {
            let mut reader = raw.reader().map_err(FetchError::io)?;
            unpack_module(&mut reader, &mut out, self.config.max_binary_size)
        })?;
        Ok(HttpPull::Fetched(
            StagedModule {
                file: out,
                sha256,
                size,
            },
            got,
        ))
    }

    /// One attempt: GET (following redirects) and the whole body into a fresh staging file.
    async fn download_attempt(
        &self,
        url: &str,
        timeout: Duration,
        validators: Option<&Validators>,
    ) -> Result<Attempt, AttemptError> {
        let kind: ErrorKind = FetchError::Download;
        if timeout.is_zero() {
            return Err(AttemptError::Fatal(kind(format!(
                "{url}: pull deadline exceeded"
            ))));
        }
        let started = self.now();
        let req = match validators {
            Some(v) => v.apply(HttpRequest::get(url)),
            None => HttpRequest::get(url),
        };
        let (mut resp, final_url) = self
            .send_following_redirects(req, timeout, started, kind)
            .await?;
        if resp.status == 304 && validators.is_some() {
            return Ok(Attempt::NotModified);
        }
        if !(200..300).contains(&resp.status) {
            return Err(status_failure(&final_url, resp.status, kind));
        }
        // Any body may be an archive; unpacking holds the module itself to the limit.
        let limit = TransferLimit::archive(self.config.max_binary_size);
        check_content_length(&resp, limit)?;
        let mut file = self
            .store
            .stage()
            .map_err(|e| AttemptError::Fatal(FetchError::io(e)))?;
        let got = Validators::from_response(&resp);
        stream_body(&final_url, resp.body.as_mut(), &mut file, None, limit, kind).await?;
        Ok(Attempt::Body(file, got))
    }

    /// Sends `req`, following redirects (301, 302, 303, 307, 308; relative `Location`s resolved
    /// against the request URL; at most [`MAX_REDIRECTS`] hops), all within `timeout` measured from
    /// `started`. The `Authorization` header is dropped when a hop leaves the original scheme and
    /// authority. Returns the first non-redirect response, whatever its status, and its URL.
    pub(crate) async fn send_following_redirects(
        &self,
        mut req: HttpRequest,
        timeout: Duration,
        started: Timestamp,
        kind: ErrorKind,
    ) -> Result<(HttpResponse, String), AttemptError> {
        let mut hops = 0;
        loop {
            let remaining = timeout.saturating_sub(self.now().since(started));
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

/// Streams a body into `out` (and `hasher`), stopping with [`FetchError::TooLarge`] as soon as it
/// passes the limit. Returns the number of bytes.
pub(crate) async fn stream_body(
    url: &str,
    body: &mut dyn BodyStream,
    out: &mut (dyn Write + Send),
    mut hasher: Option<&mut Sha256>,
    limit: TransferLimit,
    kind: ErrorKind,
) -> Result<u64, AttemptError> {
    let mut size = 0u64;
    while let Some(chunk) = body
        .next_chunk()
        .await
        .map_err(|e| transport_failure(url, e, kind))?
    {
        size += chunk.len() as u64;
        if size > limit.bytes {
            return Err(limit.exceeded());
        }
        if let Some(h) = hasher.as_deref_mut() {
            h.update(&chunk);
        }
        out.write_all(&chunk)
            .map_err(|e| AttemptError::Fatal(FetchError::io(e)))?;
    }
    out.flush()
        .map_err(|e| AttemptError::Fatal(FetchError::io(e)))?;
    Ok(size)
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

// ---------------------------------------------------------------------------------------------
// A scripted transport for the fetcher tests (also used by the OCI tests).

#[cfg(test)]
pub(crate) mod fake {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use async_trait::async_trait;
    use bytes::Bytes;

    use crate::clock::{ManualClock, Timestamp};
    use crate::fetch::{
        BodyStream, FetchConfig, Fetcher, HttpRequest, HttpResponse, Transport, TransportError,
    };
    use crate::store::{MemFiles, MemStore};

    /// What the fake answers to one request.
    #[derive(Clone, Debug)]
    pub(crate) enum Reply {
        Response {
            status: u16,
            headers: Vec<(String, String)>,
            body: Vec<u8>,
            /// The body breaks off with this error after its bytes.
            then: Option<TransportError>,
        },
        /// A transport error; `Timeout` advances the clock by the attempt's timeout first.
        Error(TransportError),
    }

    impl Reply {
        pub(crate) fn ok(body: impl Into<Vec<u8>>) -> Self {
            Reply::Response {
                status: 200,
                headers: Vec::new(),
                body: body.into(),
                then: None,
            }
        }

        pub(crate) fn status(status: u16) -> Self {
            Reply::Response {
                status,
                headers: Vec::new(),
                body: Vec::new(),
                then: None,
            }
        }

        pub(crate) fn redirect(status: u16, location: &str) -> Self {
            Reply::status(status).header("location", location)
        }

        pub(crate) fn header(mut self, name: &str, value: &str) -> Self {
            if let Reply::Response { headers, .. } = &mut self {
                headers.push((name.to_ascii_lowercase(), value.to_string()));
            }
            self
        }

        /// A 200 whose body breaks off after `prefix`.
        pub(crate) fn broken(prefix: impl Into<Vec<u8>>, e: TransportError) -> Self {
            Reply::Response {
                status: 200,
                headers: Vec::new(),
                body: prefix.into(),
                then: Some(e),
            }
        }
    }

    type Handler = Box<dyn Fn(&HttpRequest, usize) -> Reply + Send + Sync>;

    /// Answers by URL (the query string is ignored for matching); unknown URLs get 404. Every
    /// request is logged.
    pub(crate) struct FakeTransport {
        pub(crate) clock: Arc<ManualClock>,
        routes: Mutex<Vec<(String, Arc<Handler>)>>,
        log: Mutex<Vec<HttpRequest>>,
    }

    impl FakeTransport {
        pub(crate) fn route(
            &self,
            url: &str,
            h: impl Fn(&HttpRequest, usize) -> Reply + Send + Sync + 'static,
        ) {
            self.routes
                .lock()
                .unwrap()
                .push((url.to_string(), Arc::new(Box::new(h))));
        }

        /// The n-th request gets `replies[n]`, the last one repeating.
        pub(crate) fn script(&self, url: &str, replies: Vec<Reply>) {
            self.route(url, move |_, n| replies[n.min(replies.len() - 1)].clone());
        }

        pub(crate) fn requests(&self) -> Vec<HttpRequest> {
            self.log.lock().unwrap().clone()
        }

        /// Requests to `url` (query ignored).
        pub(crate) fn count(&self, url: &str) -> usize {
            self.log
                .lock()
                .unwrap()
                .iter()
                .filter(|r| strip_query(&r.url) == url)
                .count()
        }
    }

    fn strip_query(url: &str) -> &str {
        url.split('?').next().unwrap_or(url)
    }

    struct ScriptedBody {
        chunks: Vec<Bytes>,
        then: Option<TransportError>,
    }

    #[async_trait]
    impl BodyStream for ScriptedBody {
        async fn next_chunk(&mut self) -> Result<Option<Bytes>, TransportError> {
            if !self.chunks.is_empty() {
                return Ok(Some(self.chunks.remove(0)));
            }
            match self.then.take() {
                Some(e) => Err(e),
                None => Ok(None),
            }
        }
    }

    #[async_trait]
    impl Transport for FakeTransport {
        async fn get(
            &self,
            req: &HttpRequest,
            timeout: Duration,
        ) -> Result<HttpResponse, TransportError> {
            let key = strip_query(&req.url).to_string();
            let n = self.count(&key);
            self.log.lock().unwrap().push(req.clone());
            let handler = self
                .routes
                .lock()
                .unwrap()
                .iter()
                .rev()
                .find(|(u, _)| *u == key)
                .map(|(_, h)| h.clone());
            let reply = match handler {
                Some(h) => h(req, n),
                None => Reply::status(404),
            };
            match reply {
                Reply::Error(TransportError::Timeout) => {
                    self.clock.advance(timeout);
                    Err(TransportError::Timeout)
                }
                Reply::Error(e) => Err(e),
                Reply::Response {
                    status,
                    headers,
                    body,
                    then,
                } => Ok(HttpResponse {
                    status,
                    headers,
                    body: Box::new(ScriptedBody {
                        // Several chunks, so that limits are checked mid-stream.
                        chunks: body.chunks(4096).map(Bytes::copy_from_slice).collect(),
                        then,
                    }),
                }),
            }
        }
    }

    pub(crate) struct Harness {
        pub(crate) fetcher: Fetcher,
        pub(crate) clock: Arc<ManualClock>,
        pub(crate) transport: Arc<FakeTransport>,
        pub(crate) files: Arc<MemFiles>,
    }

    pub(crate) fn config() -> FetchConfig {
        FetchConfig {
            request_timeout: Duration::from_secs(15),
            max_attempts: 5,
            pull_deadline: Duration::from_secs(30),
            max_binary_size: 1 << 20,
            insecure_registries: Vec::new(),
            allow_private_token_realm: false,
        }
    }

    pub(crate) fn harness(config: FetchConfig) -> Harness {
        let clock = Arc::new(ManualClock::new(Timestamp::ZERO));
        let transport = Arc::new(FakeTransport {
            clock: clock.clone(),
            routes: Mutex::new(Vec::new()),
            log: Mutex::new(Vec::new()),
        });
        let files = Arc::new(MemFiles::default());
        let fetcher = Fetcher {
            transport: transport.clone(),
            clock: clock.clone(),
            store: Arc::new(MemStore::new()),
            files: files.clone(),
            config,
            jitter: None,
        };
        Harness {
            fetcher,
            clock,
            transport,
            files,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::fake::{config, harness, Harness, Reply};
    use super::*;
    use crate::clock::Clock;
    use crate::fetch::unpack::tests::{gzip, tar_of, wasm};
    use crate::outcome::Reason;
    use crate::store::sha256_hex;

    const URL: &str = "https://mods.example/filter.wasm";

    async fn fetch(h: &Harness, url: &str) -> Result<StagedModule, FetchError> {
        h.fetcher.fetch_http(url, h.fetcher.budget()).await
    }

    fn contents(m: &mut StagedModule) -> Vec<u8> {
        let mut v = Vec::new();
        m.file.reader().unwrap().read_to_end(&mut v).unwrap();
        v
    }

    #[tokio::test]
    async fn download_ok_is_one_request() {
        let h = harness(config());
        let module = wasm(100);
        h.transport.script(URL, vec![Reply::ok(module.clone())]);
        let mut m = fetch(&h, URL).await.unwrap();
        assert_eq!(m.sha256, sha256_hex(&module));
        assert_eq!(m.size, module.len() as u64);
        assert_eq!(contents(&mut m), module);
        assert_eq!(h.transport.count(URL), 1);
        assert_eq!(h.clock.now(), Timestamp::ZERO);
    }

    #[tokio::test]
    async fn retries_5xx_with_exponential_backoff() {
        let h = harness(config());
        h.transport.script(
            URL,
            vec![
                Reply::status(503),
                Reply::status(500),
                Reply::status(502),
                Reply::ok(wasm(1)),
            ],
        );
        fetch(&h, URL).await.unwrap();
        assert_eq!(h.transport.count(URL), 4);
        // Waits of 500 ms, 750 ms and 1125 ms between the four attempts.
        assert_eq!(h.clock.now(), Timestamp::from_millis(500 + 750 + 1125));
    }

    #[tokio::test]
    async fn gives_up_after_max_attempts() {
        let h = harness(config());
        h.transport.script(URL, vec![Reply::status(503)]);
        let err = fetch(&h, URL).await.unwrap_err();
        assert_eq!(err.reason(), Reason::DownloadFailure);
        assert!(
            err.to_string().contains(URL) && err.to_string().contains("503"),
            "{err}"
        );
        assert_eq!(h.transport.count(URL), 5);
        assert_eq!(
            h.clock.now().0,
            Duration::from_millis(500 + 750 + 1125) + Duration::from_micros(1_687_500)
        );
    }

    #[tokio::test]
    async fn client_errors_and_non_transient_5xx_are_not_retried() {
        for status in [400, 401, 403, 404, 501, 505, 511] {
            let h = harness(config());
            h.transport.script(URL, vec![Reply::status(status)]);
            let err = fetch(&h, URL).await.unwrap_err();
            assert!(
                matches!(&err, FetchError::Download(m) if m.contains(URL) && m.contains(&status.to_string())),
                "{status}: {err}"
            );
            assert_eq!(h.transport.count(URL), 1, "{status}");
        }
    }

    #[tokio::test]
    async fn connection_errors_and_resets_mid_body_are_retried() {
        let h = harness(config());
        h.transport.script(
            URL,
            vec![
                Reply::Error(TransportError::Connect("refused".into())),
                Reply::broken(wasm(10), TransportError::Reset("peer".into())),
                Reply::ok(wasm(10)),
            ],
        );
        let m = fetch(&h, URL).await.unwrap();
        assert_eq!(m.size, 18);
        assert_eq!(h.transport.count(URL), 3);
    }

    #[tokio::test]
    async fn timeouts_consume_the_pull_deadline() {
        let h = harness(config());
        h.transport
            .script(URL, vec![Reply::Error(TransportError::Timeout)]);
        let err = fetch(&h, URL).await.unwrap_err();
        assert_eq!(err.reason(), Reason::DownloadFailure);
        // 15 s, 500 ms backoff, then the rest of the 30 s: no room for a third attempt.
        assert_eq!(h.transport.count(URL), 2);
        assert_eq!(h.clock.now(), Timestamp::from_millis(30_000));
    }

    #[tokio::test]
    async fn blocked_addresses_and_tls_errors_are_final() {
        let h = harness(config());
        h.transport.script(
            URL,
            vec![Reply::Error(TransportError::Blocked(
                "169.254.169.254".into(),
            ))],
        );
        let err = fetch(&h, URL).await.unwrap_err();
        assert_eq!(err.reason(), Reason::BlockedAddress);
        assert_eq!(h.transport.count(URL), 1);

        let h = harness(config());
        h.transport.script(
            URL,
            vec![Reply::Error(TransportError::Tls("bad cert".into()))],
        );
        assert_eq!(
            fetch(&h, URL).await.unwrap_err().reason(),
            Reason::DownloadFailure
        );
        assert_eq!(h.transport.count(URL), 1);
    }

    #[tokio::test]
    async fn unpacks_compressed_and_archived_bodies() {
        let module = wasm(3000);
        let tarball = tar_of(&[("plugin.wasm", &module)]);
        for (name, body) in [
            ("plain", module.clone()),
            ("gzip", gzip(&module)),
            ("tar", tarball.clone()),
            ("tar.gz", gzip(&tarball)),
        ] {
            let h = harness(config());
            h.transport.script(URL, vec![Reply::ok(body)]);
            let mut m = fetch(&h, URL)
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(m.sha256, sha256_hex(&module), "{name}");
            assert_eq!(contents(&mut m), module, "{name}");
        }
    }

    #[tokio::test]
    async fn invalid_body_is_invalid_module_and_not_retried() {
        let h = harness(config());
        h.transport.script(URL, vec![Reply::ok("wasm\n")]);
        let err = fetch(&h, URL).await.unwrap_err();
        assert_eq!(err.reason(), Reason::InvalidModule);
        assert_eq!(h.transport.count(URL), 1);
    }

    #[tokio::test]
    async fn too_large_body_stops_at_once() {
        let mut cfg = config();
        cfg.max_binary_size = 10_000;
        let h = harness(cfg.clone());
        h.transport.script(URL, vec![Reply::ok(wasm(50_000))]);
        assert_eq!(
            fetch(&h, URL).await.unwrap_err(),
            FetchError::TooLarge { limit: 10_000 }
        );
        assert_eq!(h.transport.count(URL), 1);
        // Announced by Content-Length.
        let h = harness(cfg);
        h.transport.script(
            URL,
            vec![
                Reply::ok(wasm(10)).header("content-length", &(10_000 + (1 << 20) + 1).to_string())
            ],
        );
        assert_eq!(fetch(&h, URL).await.unwrap_err().reason(), Reason::TooLarge);
    }

    #[tokio::test]
    async fn module_of_exactly_the_limit_is_accepted_however_packed() {
        let mut cfg = config();
        cfg.max_binary_size = 64 * 1024;
        let module = wasm(64 * 1024 - 8); // the 8-byte header comes on top
        for body in [
            module.clone(),
            crate::fetch::unpack::tests::tar_of(&[("plugin.wasm", &module)]),
            crate::fetch::unpack::tests::gzip(&crate::fetch::unpack::tests::tar_of(&[(
                "plugin.wasm",
                &module,
            )])),
        ] {
            let h = harness(cfg.clone());
            h.transport.script(URL, vec![Reply::ok(body)]);
            let m = fetch(&h, URL).await.unwrap();
            assert_eq!(m.size, 64 * 1024);
        }
        // One byte more is too large, packed or not.
        let bigger = wasm(64 * 1024 - 7);
        let h = harness(cfg);
        h.transport.script(
            URL,
            vec![Reply::ok(crate::fetch::unpack::tests::tar_of(&[(
                "plugin.wasm",
                &bigger,
            )]))],
        );
        assert_eq!(
            fetch(&h, URL).await.unwrap_err(),
            FetchError::TooLarge { limit: 64 * 1024 }
        );
    }

    #[tokio::test]
    async fn follows_redirects_within_one_attempt() {
        let h = harness(config());
        h.transport
            .script(URL, vec![Reply::redirect(302, "/v2/filter.wasm")]);
        h.transport.script(
            "https://mods.example/v2/filter.wasm",
            vec![Reply::redirect(301, "https://cdn.example/a/b/x.wasm")],
        );
        h.transport.script(
            "https://cdn.example/a/b/x.wasm",
            vec![Reply::redirect(307, "../c/y.wasm?sig=1")],
        );
        h.transport
            .script("https://cdn.example/a/c/y.wasm", vec![Reply::ok(wasm(5))]);
        let m = fetch(&h, URL).await.unwrap();
        assert_eq!(m.size, 13);
        let urls: Vec<_> = h.transport.requests().into_iter().map(|r| r.url).collect();
        assert_eq!(
            urls,
            [
                URL,
                "https://mods.example/v2/filter.wasm",
                "https://cdn.example/a/b/x.wasm",
                "https://cdn.example/a/c/y.wasm?sig=1"
            ]
        );
    }

    #[tokio::test]
    async fn redirect_loops_stop() {
        let h = harness(config());
        h.transport.script(URL, vec![Reply::redirect(302, URL)]);
        let err = fetch(&h, URL).await.unwrap_err();
        assert!(err.to_string().contains("redirects"), "{err}");
        assert_eq!(h.transport.count(URL), MAX_REDIRECTS + 1);
    }

    #[tokio::test]
    async fn no_request_once_the_deadline_passed() {
        let h = harness(config());
        h.transport.script(URL, vec![Reply::ok(wasm(1))]);
        let budget = h.fetcher.budget();
        h.clock.advance(Duration::from_secs(31));
        let err = h.fetcher.fetch_http(URL, budget).await.unwrap_err();
        assert_eq!(err.reason(), Reason::DownloadFailure);
        assert_eq!(h.transport.count(URL), 0);
    }

    #[test]
    fn fetch_futures_are_send() {
        // `serve` spawns pulls on the multi-threaded runtime.
        fn send<T: Send>(_: T) {}
        let h = harness(config());
        send(h.fetcher.fetch_http(URL, h.fetcher.budget()));
    }

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
