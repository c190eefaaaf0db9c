//! The simulated world: OCI registries and HTTP servers behind the fetchers' [`Transport`], on the
//! scenario's virtual clock (scenarios.md "Steps", "Expectations").
//!
//! A host (`host[:port]`, the scheme does not matter) may be a registry, an HTTP server, or both.
//! Requests are classified by path: `/v2/` is the registry ping (never counted, never failed),
//! `/v2/<repo>/manifests/<ref>` a *manifest* request, `/v2/<repo>/blobs/<digest>` a *blob* request,
//! anything else an HTTP *get*. Counted requests are counted per host and kind whether they succeed or
//! not, and are subject to the `fail` rules of their host and to `require_auth`.
//!
//! What it leaves to others: retries, auth flows, unpacking and verification are the fetchers' (the
//! code under test); this type only answers, like a real server would.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use bytes::Bytes;

use super::content::{build_image, ImageFormat};
use super::scenario::{FailMode, FailRule, KindFilter};
use crate::clock::{Clock, Timestamp};
use crate::config::is_always_blocked;
use crate::fetch::{BodyStream, HttpRequest, HttpResponse, Transport, TransportError};
use crate::url::{authority, path_and_query, OciRef};

/// Bodies are handed out in chunks of this size, as a network would.
const CHUNK: usize = 64 * 1024;
/// Corruption flips every byte after this many.
const CORRUPT_AFTER: usize = 8;
/// The realm of `WWW-Authenticate: Basic` challenges.
const REALM: &str = "sim";
/// Where a Bearer-token host hands out tokens (on the host itself; never counted, never failed).
pub const TOKEN_PATH: &str = "/sim/token";
/// The token handed to anonymous token requests: it grants nothing.
const ANONYMOUS_TOKEN: &str = "sim-anonymous";

/// How a host that `require_auth` protects challenges clients.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthScheme {
    /// `WWW-Authenticate: Basic`; requests carry `Authorization: Basic`.
    #[default]
    Basic,
    /// `WWW-Authenticate: Bearer realm="https://<host>/sim/token"`: clients fetch a token there
    /// (with Basic credentials) and send `Authorization: Bearer <token>`.
    Bearer,
}

impl AuthScheme {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthScheme::Basic => "basic",
            AuthScheme::Bearer => "bearer",
        }
    }
}

#[derive(Clone, Debug)]
struct AuthRule {
    /// `user:pass`.
    userpass: String,
    scheme: AuthScheme,
}

impl AuthRule {
    /// The token issued for the right credentials (derived from them, so deterministic).
    fn token(&self) -> String {
        format!(
            "sim-{}",
            &crate::store::sha256_hex(self.userpass.as_bytes())[..24]
        )
    }

    fn admits(&self, authorization: Option<&str>) -> bool {
        match self.scheme {
            AuthScheme::Basic => {
                authorization.and_then(decode_basic).as_deref() == Some(self.userpass.as_str())
            }
            AuthScheme::Bearer => authorization
                .and_then(|h| h.trim().strip_prefix("Bearer "))
                .is_some_and(|t| t.trim() == self.token()),
        }
    }

    fn challenge(&self, authority: &str, scope: Option<&str>) -> String {
        match self.scheme {
            AuthScheme::Basic => format!("Basic realm=\"{REALM}\""),
            AuthScheme::Bearer => {
                let mut c = format!(
                    "Bearer realm=\"https://{authority}{TOKEN_PATH}\",service=\"{authority}\""
                );
                if let Some(repo) = scope {
                    c.push_str(&format!(",scope=\"repository:{repo}:pull\""));
                }
                c
            }
        }
    }
}

/// The kind of a counted request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RequestKind {
    Manifest,
    Blob,
    Get,
}

impl RequestKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestKind::Manifest => "manifest",
            RequestKind::Blob => "blob",
            RequestKind::Get => "get",
        }
    }

    fn matches(self, filter: KindFilter) -> bool {
        matches!(
            (filter, self),
            (KindFilter::Any, _)
                | (KindFilter::Manifest, RequestKind::Manifest)
                | (KindFilter::Blob, RequestKind::Blob)
                | (KindFilter::Get, RequestKind::Get)
        )
    }
}

/// Counted requests of one host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestCounts {
    pub manifest: u64,
    pub blob: u64,
    pub get: u64,
}

impl RequestCounts {
    pub fn total(&self) -> u64 {
        self.manifest + self.blob + self.get
    }

    fn bump(&mut self, kind: RequestKind) {
        match kind {
            RequestKind::Manifest => self.manifest += 1,
            RequestKind::Blob => self.blob += 1,
            RequestKind::Get => self.get += 1,
        }
    }
}

/// Something the world did, for the trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorldEvent {
    pub at: Timestamp,
    pub text: String,
}

#[derive(Clone, Debug)]
struct Stored {
    media_type: String,
    bytes: Bytes,
}

#[derive(Debug, Default)]
struct Repo {
    /// tag → manifest digest (hex).
    tags: BTreeMap<String, String>,
    /// digest (hex) → manifest.
    manifests: BTreeMap<String, Stored>,
    /// digest (hex) → blob.
    blobs: BTreeMap<String, Bytes>,
}

#[derive(Debug, Default)]
struct Host {
    repos: BTreeMap<String, Repo>,
    /// path (with query) → body.
    paths: BTreeMap<String, Bytes>,
    rules: Vec<FailRule>,
    /// What `require_auth` demands.
    auth: Option<AuthRule>,
}

/// A counted request answered 401 without credentials: the same request sent again as the very
/// next request, at the same virtual instant, with credentials answers the challenge within the same
/// attempt and is not counted again (scenarios.md "With `require_auth`"). Any other request in
/// between (a ping included) ends the attempt.
#[derive(Debug, PartialEq, Eq)]
struct Challenge {
    host: String,
    path: String,
    at: Timestamp,
}

#[derive(Debug, Default)]
struct State {
    hosts: BTreeMap<String, Host>,
    counts: BTreeMap<String, RequestCounts>,
    events: Vec<WorldEvent>,
    challenge: Option<Challenge>,
}

/// The simulated hosts. Thread-safe; the lock is never held across an `.await`.
pub struct SimWorld {
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
}

impl std::fmt::Debug for SimWorld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimWorld").finish_non_exhaustive()
    }
}

/// The lowercase authority (`host[:port]`, user info and default port removed), the path with query
/// (`/` at least, no fragment) and, for an IP-literal host, its address. `None` for other schemes or
/// no host.
fn split_request_url(url: &str) -> Option<(String, String, Option<IpAddr>)> {
    let u = url::Url::parse(url).ok()?;
    if !matches!(u.scheme(), "http" | "https") {
        return None;
    }
    let ip = match u.host()? {
        url::Host::Domain(_) => None,
        url::Host::Ipv4(v4) => Some(IpAddr::V4(v4)),
        url::Host::Ipv6(v6) => Some(IpAddr::V6(v6)),
    };
    Some((
        authority(&u).to_string(),
        path_and_query(&u).to_string(),
        ip,
    ))
}

enum Route {
    Ping,
    Manifest { repo: String, reference: String },
    Blob { repo: String, digest: String },
    Get,
}

fn route(path: &str) -> Route {
    let path = path.split('?').next().unwrap_or(path);
    if path == "/v2" || path == "/v2/" {
        return Route::Ping;
    }
    if let Some(rest) = path.strip_prefix("/v2/") {
        if let Some((repo, reference)) = rest.rsplit_once("/manifests/") {
            return Route::Manifest {
                repo: repo.to_string(),
                reference: reference.to_string(),
            };
        }
        if let Some((repo, digest)) = rest.rsplit_once("/blobs/") {
            return Route::Blob {
                repo: repo.to_string(),
                digest: digest.to_string(),
            };
        }
    }
    Route::Get
}

/// A response decided under the lock, turned into an [`HttpResponse`] after.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Bytes,
    /// `Some(n)`: the connection drops after `n` body bytes.
    reset_after: Option<usize>,
}

impl Answer {
    fn new(status: u16, content_type: &str, body: impl Into<Bytes>) -> Self {
        Answer {
            status,
            headers: vec![("content-type".into(), content_type.into())],
            body: body.into(),
            reset_after: None,
        }
    }

    fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    fn registry_error(status: u16, code: &str, message: &str) -> Self {
        let body = serde_json::json!({"errors": [{"code": code, "message": message}]});
        Answer::new(
            status,
            "application/json",
            serde_json::to_vec(&body).expect("json serializes"),
        )
    }

    fn unauthorized(challenge: String) -> Self {
        Answer::registry_error(401, "UNAUTHORIZED", "authentication required")
            .header("www-authenticate", challenge)
    }
}

enum Decision {
    Answer(Answer),
    Fail(TransportError),
    Timeout,
}

/// A body in chunks, optionally breaking off.
struct SimBody {
    data: Bytes,
    pos: usize,
    reset_after: Option<usize>,
}

#[async_trait]
impl BodyStream for SimBody {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, TransportError> {
        let end = self
            .reset_after
            .unwrap_or(self.data.len())
            .min(self.data.len());
        if self.pos >= end {
            return match self.reset_after {
                Some(_) => Err(TransportError::Reset("connection reset by peer".into())),
                None => Ok(None),
            };
        }
        let next = (self.pos + CHUNK).min(end);
        let chunk = self.data.slice(self.pos..next);
        self.pos = next;
        Ok(Some(chunk))
    }
}

impl SimWorld {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        SimWorld {
            clock,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that matters
        // to a report; keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pushes the image of `module` to `r` (tag `latest` when untagged) and points the tag at it.
    /// Returns the digest of the tagged manifest.
    pub fn publish_oci(
        &self,
        r: &OciRef,
        name: &str,
        module: &[u8],
        format: ImageFormat,
    ) -> String {
        let image = build_image(name, module, format);
        let mut st = self.state();
        let repo = st
            .hosts
            .entry(r.registry.to_ascii_lowercase())
            .or_default()
            .repos
            .entry(r.repository.clone())
            .or_default();
        for b in &image.blobs {
            repo.blobs
                .insert(b.digest.clone(), Bytes::from(b.bytes.clone()));
        }
        for m in &image.manifests {
            repo.manifests.insert(
                m.digest.clone(),
                Stored {
                    media_type: m.media_type.clone(),
                    bytes: Bytes::from(m.bytes.clone()),
                },
            );
        }
        let digest = image.top().digest.clone();
        repo.tags
            .insert(r.tag_or_latest().to_string(), digest.clone());
        digest
    }

    /// Makes `path` of `authority` answer `body`.
    pub fn publish_http(&self, authority: &str, path: &str, body: Vec<u8>) {
        self.state()
            .hosts
            .entry(authority.to_string())
            .or_default()
            .paths
            .insert(path.to_string(), Bytes::from(body));
    }

    /// Removes a tag (or, for a digest reference, the manifest); blobs stay. False if nothing was
    /// published there.
    pub fn unpublish_oci(&self, r: &OciRef) -> bool {
        let mut st = self.state();
        let Some(repo) = st
            .hosts
            .get_mut(&r.registry.to_ascii_lowercase())
            .and_then(|h| h.repos.get_mut(&r.repository))
        else {
            return false;
        };
        match &r.digest {
            Some(d) => repo.manifests.remove(d).is_some(),
            None => repo.tags.remove(r.tag_or_latest()).is_some(),
        }
    }

    pub fn unpublish_http(&self, authority: &str, path: &str) -> bool {
        self.state()
            .hosts
            .get_mut(authority)
            .is_some_and(|h| h.paths.remove(path).is_some())
    }

    /// The hex manifest digest `r` currently resolves to.
    pub fn digest(&self, r: &OciRef) -> Option<String> {
        let st = self.state();
        let repo = st
            .hosts
            .get(&r.registry.to_ascii_lowercase())?
            .repos
            .get(&r.repository)?;
        match &r.digest {
            Some(d) => repo.manifests.contains_key(d).then(|| d.clone()),
            None => repo.tags.get(r.tag_or_latest()).cloned(),
        }
    }

    pub fn add_rule(&self, rule: FailRule) {
        self.state()
            .hosts
            .entry(rule.host.clone())
            .or_default()
            .rules
            .push(rule);
    }

    /// Removes every failure rule of `host`; returns how many there were.
    pub fn recover(&self, host: &str) -> usize {
        self.state()
            .hosts
            .get_mut(host)
            .map_or(0, |h| std::mem::take(&mut h.rules).len())
    }

    pub fn require_auth(&self, host: &str, username: &str, password: &str, scheme: AuthScheme) {
        self.state().hosts.entry(host.to_string()).or_default().auth = Some(AuthRule {
            userpass: format!("{username}:{password}"),
            scheme,
        });
    }

    /// Counted requests per host since the start.
    pub fn counts(&self) -> BTreeMap<String, RequestCounts> {
        self.state().counts.clone()
    }

    pub fn take_events(&self) -> Vec<WorldEvent> {
        std::mem::take(&mut self.state().events)
    }

    /// Decides the answer to one request (under the lock, no awaiting).
    fn decide(&self, req: &HttpRequest, now: Timestamp) -> Decision {
        let Some((authority, path, ip)) = split_request_url(&req.url) else {
            return Decision::Fail(TransportError::Connect(format!(
                "{}: not an http(s) url",
                req.url
            )));
        };
        if let Some(ip) = ip {
            if is_always_blocked(ip) {
                let mut st = self.state();
                st.events.push(WorldEvent {
                    at: now,
                    text: format!("request {authority} {path} -> blocked address"),
                });
                return Decision::Fail(TransportError::Blocked(format!(
                    "{ip} is a link-local or metadata address"
                )));
            }
        }
        let authorization = req
            .headers
            .iter()
            .find(|(k, _)| k == "authorization")
            .map(|(_, v)| v.as_str());
        let accept: Vec<String> = req
            .headers
            .iter()
            .filter(|(k, _)| k == "accept")
            .flat_map(|(_, v)| v.split(','))
            .map(|m| {
                m.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            })
            .filter(|m| !m.is_empty())
            .collect();
        let mut guard = self.state();
        let st = &mut *guard;
        // Only the very next request can answer a challenge.
        let challenged = st.challenge.take();
        let host = st.hosts.entry(authority.clone()).or_default();
        let auth = host.auth.clone();
        let authorized = auth.as_ref().is_none_or(|a| a.admits(authorization));
        let route = route(&path);
        let scope = match &route {
            Route::Manifest { repo, .. } | Route::Blob { repo, .. } => Some(repo.clone()),
            _ => None,
        };
        let challenge = |a: &AuthRule| a.challenge(&authority, scope.as_deref());
        let kind = match route {
            Route::Ping => {
                let answer = match auth.as_ref().filter(|_| !authorized) {
                    None => Answer::new(200, "application/json", &b"{}"[..]),
                    Some(a) => Answer::unauthorized(challenge(a)),
                };
                return Decision::Answer(
                    answer.header("docker-distribution-api-version", "registry/2.0"),
                );
            }
            Route::Get
                if auth
                    .as_ref()
                    .is_some_and(|a| a.scheme == AuthScheme::Bearer)
                    && path.split('?').next() == Some(TOKEN_PATH) =>
            {
                // The token endpoint: the right Basic credentials get the token, none get a token
                // that grants nothing, wrong ones are refused.
                let a = auth.as_ref().expect("checked above");
                let answer = match authorization {
                    None => token_answer(ANONYMOUS_TOKEN),
                    Some(h) if decode_basic(h).as_deref() == Some(a.userpass.as_str()) => {
                        token_answer(&a.token())
                    }
                    Some(_) => Answer::registry_error(401, "UNAUTHORIZED", "invalid credentials"),
                };
                return Decision::Answer(answer);
            }
            Route::Manifest { .. } => RequestKind::Manifest,
            Route::Blob { .. } => RequestKind::Blob,
            Route::Get => RequestKind::Get,
        };
        let this = Challenge {
            host: authority.clone(),
            path: path.clone(),
            at: now,
        };
        let answers_challenge = authorization.is_some() && challenged.as_ref() == Some(&this);
        let host = st.hosts.get_mut(&authority).expect("inserted above");
        let mut note = String::new();
        let rule = if answers_challenge {
            note.push_str(" (answers the challenge, not counted again)");
            None
        } else {
            st.counts.entry(authority.clone()).or_default().bump(kind);
            take_rule(&mut host.rules, kind)
        };
        let prefix = format!("request {authority} {} {path}", kind.as_str());
        let log = |st: &mut State, result: String| {
            st.events.push(WorldEvent {
                at: now,
                text: format!("{prefix} -> {result}{note}"),
            })
        };
        match rule {
            Some(FailMode::Unavailable) => {
                log(st, "unavailable (connection refused)".into());
                return Decision::Fail(TransportError::Connect("connection refused".into()));
            }
            Some(FailMode::Timeout) => {
                log(st, "timeout".into());
                return Decision::Timeout;
            }
            Some(FailMode::Status(code)) => {
                log(st, format!("{code} (injected)"));
                return Decision::Answer(Answer::new(code, "text/plain", Bytes::new()));
            }
            _ => {}
        }
        let mut answer = if let Some(a) = auth.as_ref().filter(|_| !authorized) {
            if authorization.is_none() {
                st.challenge = Some(this);
            }
            Answer::unauthorized(challenge(a))
        } else {
            let host = st.hosts.get(&authority).expect("inserted above");
            match route {
                Route::Manifest { repo, reference } => {
                    serve_manifest(host, &repo, &reference, &accept)
                }
                Route::Blob { repo, digest } => serve_blob(host, &repo, &digest),
                Route::Get | Route::Ping => match host.paths.get(&path) {
                    Some(body) => Answer::new(200, "application/octet-stream", body.clone()),
                    None => Answer::new(404, "text/plain", &b"404 page not found\n"[..]),
                },
            }
        };
        let mut result = answer.status.to_string();
        match rule {
            Some(FailMode::Reset) => {
                answer.reset_after = Some(answer.body.len() / 2);
                result.push_str(", reset mid-body");
            }
            Some(FailMode::Corrupt) => {
                let mut bytes = answer.body.to_vec();
                for b in bytes.iter_mut().skip(CORRUPT_AFTER) {
                    *b ^= 0xff;
                }
                answer.body = Bytes::from(bytes);
                result.push_str(", corrupted body");
            }
            _ => {}
        }
        log(st, result);
        Decision::Answer(answer)
    }
}

/// Consumes one use of the first rule matching `kind`.
fn take_rule(rules: &mut Vec<FailRule>, kind: RequestKind) -> Option<FailMode> {
    let i = rules.iter().position(|r| kind.matches(r.kind))?;
    let mode = rules[i].mode;
    if let Some(times) = &mut rules[i].times {
        *times -= 1;
        if *times == 0 {
            rules.remove(i);
        }
    }
    Some(mode)
}

fn token_answer(token: &str) -> Answer {
    let body = serde_json::json!({"token": token, "access_token": token, "expires_in": 300});
    Answer::new(
        200,
        "application/json",
        serde_json::to_vec(&body).expect("json serializes"),
    )
}

/// `user:pass` of a `Basic` authorization header.
fn decode_basic(header: &str) -> Option<String> {
    let (scheme, token) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .ok()?;
    String::from_utf8(raw).ok()
}

fn serve_manifest(host: &Host, repo: &str, reference: &str, accept: &[String]) -> Answer {
    let unknown = || Answer::registry_error(404, "MANIFEST_UNKNOWN", "manifest unknown");
    let Some(r) = host.repos.get(repo) else {
        return Answer::registry_error(
            404,
            "NAME_UNKNOWN",
            "repository name not known to registry",
        );
    };
    let digest = match reference.strip_prefix("sha256:") {
        Some(d) => d.to_string(),
        None => match r.tags.get(reference) {
            Some(d) => d.clone(),
            None => return unknown(),
        },
    };
    let Some(m) = r.manifests.get(&digest) else {
        return unknown();
    };
    // Like distribution: a manifest the client does not accept is not served.
    if !accept.is_empty() && !accept.iter().any(|a| a == "*/*" || *a == m.media_type) {
        return Answer::registry_error(
            404,
            "MANIFEST_UNKNOWN",
            &format!("manifest of type {} not in the accept header", m.media_type),
        );
    }
    Answer::new(200, &m.media_type, m.bytes.clone())
        .header("docker-content-digest", format!("sha256:{digest}"))
}

fn serve_blob(host: &Host, repo: &str, digest: &str) -> Answer {
    let blob = digest
        .strip_prefix("sha256:")
        .and_then(|d| host.repos.get(repo)?.blobs.get(d));
    match blob {
        Some(b) => Answer::new(200, "application/octet-stream", b.clone())
            .header("docker-content-digest", digest),
        None => Answer::registry_error(404, "BLOB_UNKNOWN", "blob unknown to registry"),
    }
}

#[async_trait]
impl Transport for SimWorld {
    async fn get(
        &self,
        req: &HttpRequest,
        timeout: Duration,
    ) -> Result<HttpResponse, TransportError> {
        let now = self.clock.now();
        match self.decide(req, now) {
            Decision::Fail(e) => Err(e),
            Decision::Timeout => {
                // No answer until the attempt's deadline: virtual time passes (other work due
                // meanwhile runs at its own time under the simulator's paused tokio clock).
                self.clock.sleep(timeout).await;
                Err(TransportError::Timeout)
            }
            Decision::Answer(a) => {
                let mut headers = a.headers;
                headers.push(("content-length".into(), a.body.len().to_string()));
                Ok(HttpResponse {
                    status: a.status,
                    headers,
                    body: Box::new(SimBody {
                        data: a.body,
                        pos: 0,
                        reset_after: a.reset_after,
                    }),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::plugin::Credentials;

    fn world() -> (Arc<ManualClock>, SimWorld) {
        let clock = Arc::new(ManualClock::new(Timestamp::ZERO));
        (clock.clone(), SimWorld::new(clock))
    }

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    async fn body(resp: HttpResponse) -> Result<Vec<u8>, TransportError> {
        let mut b = resp.body;
        let mut out = Vec::new();
        while let Some(c) = b.next_chunk().await? {
            out.extend_from_slice(&c);
        }
        Ok(out)
    }

    fn oci(s: &str) -> OciRef {
        OciRef::parse(s).unwrap()
    }

    const T: Duration = Duration::from_secs(15);

    #[test]
    fn urls_split_into_authority_and_path() {
        assert_eq!(
            split_request_url("https://Files.Example:8443/a/b.wasm?x=1#f"),
            Some(("files.example:8443".into(), "/a/b.wasm?x=1".into(), None))
        );
        assert_eq!(
            split_request_url("http://u:p@h"),
            Some(("h".into(), "/".into(), None))
        );
        assert_eq!(split_request_url("ftp://h/x"), None);
        assert_eq!(
            split_request_url("http://169.254.169.254:80/x").and_then(|x| x.2),
            Some("169.254.169.254".parse().unwrap())
        );
        assert_eq!(
            split_request_url("http://[fe80::1]:5000/").map(|x| (x.0, x.2)),
            Some(("[fe80::1]:5000".into(), Some("fe80::1".parse().unwrap())))
        );
    }

    #[test]
    fn registry_serves_manifests_and_blobs_and_counts_them() {
        let (_, w) = world();
        let digest = w.publish_oci(
            &oci("reg.example/ns/repo:v1"),
            "v1",
            b"\0asm\x01\0\0\0",
            ImageFormat::OciArtifact,
        );
        run(async {
            let ping = w
                .get(&HttpRequest::get("https://reg.example/v2/"), T)
                .await
                .unwrap();
            assert_eq!(ping.status, 200);
            let r = w
                .get(
                    &HttpRequest::get("https://reg.example/v2/ns/repo/manifests/v1"),
                    T,
                )
                .await
                .unwrap();
            assert_eq!(r.status, 200);
            assert_eq!(
                r.header("docker-content-digest"),
                Some(format!("sha256:{digest}").as_str())
            );
            let manifest: serde_json::Value =
                serde_json::from_slice(&body(r).await.unwrap()).unwrap();
            let layer = manifest["layers"][1]["digest"]
                .as_str()
                .unwrap()
                .to_string();
            let b = w
                .get(
                    &HttpRequest::get(format!("https://reg.example/v2/ns/repo/blobs/{layer}")),
                    T,
                )
                .await
                .unwrap();
            assert_eq!(body(b).await.unwrap(), b"\0asm\x01\0\0\0");
            let missing = w
                .get(
                    &HttpRequest::get("https://reg.example/v2/ns/repo/manifests/v2"),
                    T,
                )
                .await
                .unwrap();
            assert_eq!(missing.status, 404);
            let by_digest = w
                .get(
                    &HttpRequest::get(format!(
                        "http://reg.example/v2/ns/repo/manifests/sha256:{digest}"
                    )),
                    T,
                )
                .await
                .unwrap();
            assert_eq!(by_digest.status, 200);
            let refused = w
                .get(
                    &HttpRequest::get("https://reg.example/v2/ns/repo/manifests/v1")
                        .header("Accept", crate::fetch::oci::DOCKER_MANIFEST),
                    T,
                )
                .await
                .unwrap();
            assert_eq!(refused.status, 404, "not acceptable");
        });
        assert_eq!(
            w.counts()["reg.example"],
            RequestCounts {
                manifest: 4,
                blob: 1,
                get: 0
            }
        );
        assert!(w.unpublish_oci(&oci("reg.example/ns/repo:v1")));
        assert_eq!(w.digest(&oci("reg.example/ns/repo:v1")), None);
        assert_eq!(
            w.digest(&oci(&format!("reg.example/ns/repo@sha256:{digest}"))),
            Some(digest)
        );
    }

    #[test]
    fn failure_rules_consume_times_and_recover() {
        let (clock, w) = world();
        w.publish_http(
            "files.example",
            "/m.wasm",
            b"\0asm\x01\0\0\0abcdefgh".to_vec(),
        );
        let get = || HttpRequest::get("https://files.example/m.wasm");
        w.add_rule(FailRule {
            host: "files.example".into(),
            kind: KindFilter::Get,
            mode: FailMode::Status(503),
            times: Some(1),
        });
        w.add_rule(FailRule {
            host: "files.example".into(),
            kind: KindFilter::Any,
            mode: FailMode::Timeout,
            times: Some(1),
        });
        w.add_rule(FailRule {
            host: "files.example".into(),
            kind: KindFilter::Manifest,
            mode: FailMode::Unavailable,
            times: None,
        });
        run(async {
            assert_eq!(w.get(&get(), T).await.unwrap().status, 503);
            assert_eq!(
                w.get(&get(), Duration::from_secs(5)).await.unwrap_err(),
                TransportError::Timeout
            );
            assert_eq!(clock.now(), Timestamp(Duration::from_secs(5)));
            assert_eq!(
                body(w.get(&get(), T).await.unwrap()).await.unwrap(),
                b"\0asm\x01\0\0\0abcdefgh"
            );
            w.add_rule(FailRule {
                host: "files.example".into(),
                kind: KindFilter::Get,
                mode: FailMode::Reset,
                times: Some(1),
            });
            let r = w.get(&get(), T).await.unwrap();
            assert!(matches!(body(r).await, Err(TransportError::Reset(_))));
            w.add_rule(FailRule {
                host: "files.example".into(),
                kind: KindFilter::Get,
                mode: FailMode::Corrupt,
                times: None,
            });
            let b = body(w.get(&get(), T).await.unwrap()).await.unwrap();
            assert_eq!(&b[..8], b"\0asm\x01\0\0\0");
            assert_eq!(b[8], b'a' ^ 0xff);
            assert_eq!(w.recover("files.example"), 2);
            assert_eq!(
                body(w.get(&get(), T).await.unwrap()).await.unwrap().len(),
                16
            );
            // The ping never fails.
            assert_eq!(
                w.get(&HttpRequest::get("https://files.example/v2/"), T)
                    .await
                    .unwrap()
                    .status,
                200
            );
        });
        assert_eq!(w.counts()["files.example"].get, 6);
        let events = w.take_events();
        assert_eq!(events.len(), 6, "{events:?}");
        assert!(events[0].text.contains("503"));
    }

    #[test]
    fn auth_challenges_count_once_per_attempt() {
        let (clock, w) = world();
        w.publish_oci(
            &oci("reg.example/r:v1"),
            "v1",
            b"\0asm\x01\0\0\0",
            ImageFormat::OciArtifactSingle,
        );
        w.require_auth("reg.example", "u", "p", AuthScheme::Basic);
        let good = Credentials {
            username: "u".into(),
            password: "p".into(),
        }
        .basic_header();
        let bad = Credentials {
            username: "u".into(),
            password: "x".into(),
        }
        .basic_header();
        let m = "https://reg.example/v2/r/manifests/v1";
        run(async {
            let ping = w
                .get(&HttpRequest::get("https://reg.example/v2/"), T)
                .await
                .unwrap();
            assert_eq!(ping.status, 401);
            assert_eq!(ping.header("www-authenticate"), Some("Basic realm=\"sim\""));
            assert_eq!(
                w.get(
                    &HttpRequest::get("https://reg.example/v2/")
                        .header("authorization", good.clone()),
                    T
                )
                .await
                .unwrap()
                .status,
                200
            );
            // Anonymous, then the same request with credentials at once: one request.
            assert_eq!(w.get(&HttpRequest::get(m), T).await.unwrap().status, 401);
            assert_eq!(
                w.get(
                    &HttpRequest::get(m).header("authorization", good.clone()),
                    T
                )
                .await
                .unwrap()
                .status,
                200
            );
            assert_eq!(w.counts()["reg.example"].manifest, 1);
            // Wrong credentials are a counted 401.
            assert_eq!(
                w.get(&HttpRequest::get(m).header("authorization", bad), T)
                    .await
                    .unwrap()
                    .status,
                401
            );
            assert_eq!(w.counts()["reg.example"].manifest, 2);
            // A later attempt is a new request.
            assert_eq!(w.get(&HttpRequest::get(m), T).await.unwrap().status, 401);
            clock.advance(Duration::from_millis(500));
            assert_eq!(
                w.get(&HttpRequest::get(m).header("authorization", good), T)
                    .await
                    .unwrap()
                    .status,
                200
            );
            assert_eq!(w.counts()["reg.example"].manifest, 4);
        });
    }

    #[test]
    fn bearer_hosts_hand_out_tokens_without_counting_them() {
        let (_, w) = world();
        w.publish_oci(
            &oci("reg.example/r:v1"),
            "v1",
            b"\0asm\x01\0\0\0",
            ImageFormat::OciArtifactSingle,
        );
        w.require_auth("reg.example", "u", "p", AuthScheme::Bearer);
        let good = Credentials {
            username: "u".into(),
            password: "p".into(),
        }
        .basic_header();
        let m = "https://reg.example/v2/r/manifests/v1";
        run(async {
            let ping = w
                .get(&HttpRequest::get("https://reg.example/v2/"), T)
                .await
                .unwrap();
            assert_eq!(ping.status, 401);
            assert_eq!(
                ping.header("www-authenticate"),
                Some("Bearer realm=\"https://reg.example/sim/token\",service=\"reg.example\"")
            );
            let token_url =
                "https://reg.example/sim/token?service=reg.example&scope=repository:r:pull";
            let t = w
                .get(
                    &HttpRequest::get(token_url).header("authorization", good),
                    T,
                )
                .await
                .unwrap();
            let v: serde_json::Value = serde_json::from_slice(&body(t).await.unwrap()).unwrap();
            let token = v["token"].as_str().unwrap().to_string();
            let anon = w.get(&HttpRequest::get(token_url), T).await.unwrap();
            let v: serde_json::Value = serde_json::from_slice(&body(anon).await.unwrap()).unwrap();
            let anon_token = v["token"].as_str().unwrap().to_string();
            let bad = Credentials {
                username: "u".into(),
                password: "x".into(),
            }
            .basic_header();
            assert_eq!(
                w.get(&HttpRequest::get(token_url).header("authorization", bad), T)
                    .await
                    .unwrap()
                    .status,
                401
            );
            let r = w
                .get(
                    &HttpRequest::get(m).header("authorization", format!("Bearer {anon_token}")),
                    T,
                )
                .await
                .unwrap();
            assert_eq!(r.status, 401);
            assert!(r
                .header("www-authenticate")
                .unwrap()
                .contains("scope=\"repository:r:pull\""));
            let r = w
                .get(
                    &HttpRequest::get(m).header("authorization", format!("Bearer {token}")),
                    T,
                )
                .await
                .unwrap();
            assert_eq!(r.status, 200);
        });
        assert_eq!(
            w.counts()["reg.example"],
            RequestCounts {
                manifest: 2,
                blob: 0,
                get: 0
            }
        );
    }

    #[test]
    fn blocked_addresses_are_refused_without_counting() {
        let (_, w) = world();
        run(async {
            let e = w
                .get(
                    &HttpRequest::get("http://169.254.169.254/latest/meta-data"),
                    T,
                )
                .await
                .unwrap_err();
            assert!(matches!(e, TransportError::Blocked(_)));
        });
        assert!(w.counts().is_empty());
    }
}
