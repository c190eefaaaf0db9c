//! The HTTP(S) fetcher (behavior.md §4.1), mirroring Istio's `pkg/wasm/httpfetcher.go`: one GET per
//! attempt with redirects followed inside the attempt, retries on connection errors and retryable
//! 5xx statuses, and the body turned into the Wasm module in one pass as it arrives
//! ([`super::stream`]): a plain Wasm body is hashed while it is written to the staging file that
//! becomes the module, a gzip, tar or tar.gz body is unpacked while it streams.
//!
//! The request plumbing it shares with the OCI fetcher (redirects, status and error mapping, body
//! limits) is in [`super::request`]. No network code lives here; every request goes through
//! [`Fetcher::transport`].

use std::time::Duration;

use super::request::{check_content_length, status_failure, ErrorKind, TransferLimit};
use super::retry::{with_retries, AttemptError, PullBudget};
use super::stream::{stream_module, Layout};
use super::{FetchError, Fetcher, HttpRequest, HttpResponse, StagedModule};
use crate::clock::Timestamp;
use crate::url::HttpUrl;

pub use super::request::{is_retryable_status, MAX_REDIRECTS};

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
    Body(StagedModule, Option<Validators>),
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
        let parsed = HttpUrl::parse(url).map_err(|why| {
            let url = crate::url::redact(url);
            FetchError::Download(format!("{url}: invalid url: {why}"))
        })?;
        match self.fetch_http_conditional(&parsed, budget, None).await? {
            HttpPull::Fetched(m, _) => Ok(m),
            HttpPull::NotModified => Err(FetchError::Download(format!(
                "{parsed}: 304 Not Modified to an unconditional request"
            ))),
        }
    }

    /// [`Fetcher::fetch_http`] as a conditional request when `validators` of the cached module are
    /// known (behavior.md §6: a real HTTP server answering 304 makes the outcome `revalidated`).
    pub async fn fetch_http_conditional(
        &self,
        url: &HttpUrl,
        budget: PullBudget,
        validators: Option<&Validators>,
    ) -> Result<HttpPull, FetchError> {
        // Credentials in the URL travel as a header, never in the URL an error may quote.
        let target = url.request_url();
        let (url, auth) = (target.as_str(), url.basic_auth());
        let auth = auth.as_deref();
        let attempt = with_retries(self, budget, |timeout, started| async move {
            self.download_attempt(url, timeout, started, validators, auth)
                .await
        })
        .await?;
        match attempt {
            Attempt::NotModified => Ok(HttpPull::NotModified),
            Attempt::Body(staged, got) => Ok(HttpPull::Fetched(staged, got)),
        }
    }

    /// One attempt: GET (following redirects) and the whole body, in one pass, into the staged
    /// module.
    async fn download_attempt(
        &self,
        url: &str,
        timeout: Duration,
        started: Timestamp,
        validators: Option<&Validators>,
        auth: Option<&str>,
    ) -> Result<Attempt, AttemptError> {
        let kind: ErrorKind = FetchError::Download;
        if timeout.is_zero() {
            return Err(AttemptError::Fatal(kind(format!(
                "{url}: pull deadline exceeded"
            ))));
        }
        let mut req = match validators {
            Some(v) => v.apply(HttpRequest::get(url)),
            None => HttpRequest::get(url),
        };
        if let Some(auth) = auth {
            req = req.header("authorization", auth.to_string());
        }
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
        let got = Validators::from_response(&resp);
        let staged = stream_module(
            &self.store,
            &final_url,
            resp.body.as_mut(),
            Layout::Any,
            None,
            limit,
            kind,
        )
        .await?;
        Ok(Attempt::Body(staged, got))
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;
    use crate::clock::{Clock, Timestamp};
    use crate::fetch::fake::{config, harness, Harness, Reply};
    use crate::fetch::unpack::tests::{gzip, tar_of, wasm};
    use crate::fetch::TransportError;
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
    async fn zero_request_timeout_means_no_per_attempt_limit() {
        // Go's http.Client: a timeout of 0 is no timeout. The attempt may take the whole pull
        // deadline (30 s), and a body that arrives is accepted.
        let mut cfg = config();
        cfg.request_timeout = Duration::ZERO;
        let h = harness(cfg.clone());
        h.transport.script(URL, vec![Reply::ok(wasm(10))]);
        assert_eq!(fetch(&h, URL).await.unwrap().size, 18);
        let h = harness(cfg);
        h.transport
            .script(URL, vec![Reply::Error(TransportError::Timeout)]);
        let err = fetch(&h, URL).await.unwrap_err();
        assert_eq!(err.reason(), Reason::DownloadFailure);
        assert_eq!(
            h.transport.count(URL),
            1,
            "the first attempt had the whole budget"
        );
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
}
