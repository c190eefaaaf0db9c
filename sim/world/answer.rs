//! How the simulated world answers one request: routing by path (ping, manifest, blob, plain
//! get), the registry's manifests and blobs, the host's `fail` rules, and `require_auth`'s
//! challenges, all decided under the world's lock.

use std::net::IpAddr;

use bytes::Bytes;

use super::auth::{decode_basic, token_answer, AuthRule, Challenge, ANONYMOUS_TOKEN, TOKEN_PATH};
use super::{Host, RequestKind, SimWorld, State};
use crate::clock::Timestamp;
use crate::config::is_always_blocked;
use crate::fetch::{HeaderText, Headers, HttpRequest, TransportError};
use crate::sim::rules::{AuthScheme, FailMode, FailRule};
use crate::url::{authority, path_and_query};

/// Corruption flips every byte after this many.
pub(super) const CORRUPT_AFTER: usize = 8;

/// A request URL taken apart: the lowercase authority (`host[:port]`, user info and default port
/// removed), the path with query (`/` at least, no fragment) and, for an IP-literal host, its
/// address.
pub(super) type SplitUrl = (String, String, Option<IpAddr>);

/// `url` taken apart ([`SplitUrl`]); `None` for other schemes or no host.
pub(super) fn split_request_url(url: &str) -> Option<SplitUrl> {
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

/// Whether `header` (as sent) lowercased is `lower`, without making the lowercase copy.
fn lowercased_is(header: &str, lower: &str) -> bool {
    header.len() == lower.len()
        && (header.bytes().zip(lower.bytes())).all(|(h, l)| h.to_ascii_lowercase() == l)
}

/// The media types a request accepts, as sent (compared lowercased); read in place, per request.
fn accepted(req: &HttpRequest) -> impl Iterator<Item = &str> + Clone {
    req.headers
        .iter()
        .filter(|(k, _)| k == "accept")
        .flat_map(|(_, v)| v.split(','))
        .map(|m| m.split(';').next().unwrap_or("").trim())
        .filter(|m| !m.is_empty())
}

/// What a request path asks for; the parts borrow the path.
pub(super) enum Route<'a> {
    Ping,
    Manifest { repo: &'a str, reference: &'a str },
    Blob { repo: &'a str, digest: &'a str },
    Get,
}

pub(super) fn route(path: &str) -> Route<'_> {
    let path = path.split('?').next().unwrap_or(path);
    if path == "/v2" || path == "/v2/" {
        return Route::Ping;
    }
    if let Some(rest) = path.strip_prefix("/v2/") {
        if let Some((repo, reference)) = rest.rsplit_once("/manifests/") {
            return Route::Manifest { repo, reference };
        }
        if let Some((repo, digest)) = rest.rsplit_once("/blobs/") {
            return Route::Blob { repo, digest };
        }
    }
    Route::Get
}

/// A response decided under the lock, turned into an [`HttpResponse`] after.
pub(super) struct Answer {
    pub(super) status: u16,
    pub(super) headers: Headers,
    pub(super) body: Bytes,
    /// `Some(n)`: the connection drops after `n` body bytes.
    pub(super) reset_after: Option<usize>,
}

impl Answer {
    pub(super) fn new(
        status: u16,
        content_type: impl Into<HeaderText>,
        body: impl Into<Bytes>,
    ) -> Self {
        Answer {
            status,
            headers: vec![("content-type".into(), content_type.into())],
            body: body.into(),
            reset_after: None,
        }
    }

    pub(super) fn header(mut self, name: &'static str, value: impl Into<HeaderText>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub(super) fn registry_error(status: u16, code: &str, message: &str) -> Self {
        let body = serde_json::json!({"errors": [{"code": code, "message": message}]});
        Answer::new(
            status,
            "application/json",
            serde_json::to_vec(&body).expect("json serializes"),
        )
    }

    pub(super) fn unauthorized(challenge: String) -> Self {
        Answer::registry_error(401, "UNAUTHORIZED", "authentication required")
            .header("www-authenticate", challenge)
    }
}

pub(super) enum Decision {
    Answer(Answer),
    Fail(TransportError),
    Timeout,
}

impl SimWorld {
    /// Decides the answer to one request (under the lock, no awaiting).
    pub(super) fn decide(&self, req: &HttpRequest, now: Timestamp) -> Decision {
        let Some(split) = self.split_url(&req.url) else {
            return Decision::Fail(TransportError::Connect(format!(
                "{}: not an http(s) url",
                req.url
            )));
        };
        let (authority, path, ip) = (&split.0, &split.1, split.2);
        if let Some(ip) = ip {
            if is_always_blocked(ip) {
                let mut st = self.state();
                st.events.push(
                    now,
                    format_args!("request {authority} {path} -> blocked address"),
                );
                return Decision::Fail(TransportError::Blocked(format!(
                    "{ip} is a link-local or metadata address"
                )));
            }
        }
        let authorization = req
            .headers
            .iter()
            .find(|(k, _)| k == "authorization")
            .map(|(_, v)| v.as_ref());
        let mut guard = self.state();
        let st = &mut *guard;
        // Only the very next request can answer a challenge.
        let challenged = st.challenge.take();
        if !st.hosts.contains_key(authority) {
            st.hosts.insert(authority.clone(), Host::default());
        }
        let host = st.hosts.get_mut(authority).expect("inserted above");
        let auth = host.auth.clone();
        let authorized = auth.as_ref().is_none_or(|a| a.admits(authorization));
        let route = route(path);
        let scope = match &route {
            Route::Manifest { repo, .. } | Route::Blob { repo, .. } => Some(*repo),
            _ => None,
        };
        let challenge = |a: &AuthRule| a.challenge(authority, scope);
        let kind = match route {
            Route::Ping => {
                let answer = match auth.as_ref().filter(|_| !authorized) {
                    None => Answer::new(200, "application/json", Bytes::from_static(b"{}")),
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
        // This very request, challenged just before (compared in place: made only to be kept).
        let answers_challenge = authorization.is_some()
            && challenged
                .as_ref()
                .is_some_and(|c| c.host == *authority && c.path == *path && c.at == now);
        let host = st.hosts.get_mut(authority).expect("inserted above");
        let note = if answers_challenge {
            " (answers the challenge, not counted again)"
        } else {
            ""
        };
        let rule = if answers_challenge {
            None
        } else {
            match st.counts.get_mut(authority) {
                Some(c) => c.bump(kind),
                None => st.counts.entry(authority.clone()).or_default().bump(kind),
            }
            take_rule(&mut host.rules, kind)
        };
        let log = |st: &mut State, result: &dyn std::fmt::Display| {
            st.events.push(
                now,
                format_args!(
                    "request {authority} {} {path} -> {result}{note}",
                    kind.as_str()
                ),
            )
        };
        match rule {
            Some(FailMode::Unavailable) => {
                log(st, &"unavailable (connection refused)");
                return Decision::Fail(TransportError::Connect("connection refused".into()));
            }
            Some(FailMode::Timeout) => {
                log(st, &"timeout");
                return Decision::Timeout;
            }
            Some(FailMode::Status(code)) => {
                log(st, &format_args!("{code} (injected)"));
                return Decision::Answer(Answer::new(code, "text/plain", Bytes::new()));
            }
            _ => {}
        }
        let mut answer = if let Some(a) = auth.as_ref().filter(|_| !authorized) {
            if authorization.is_none() {
                st.challenge = Some(Challenge {
                    host: authority.clone(),
                    path: path.clone(),
                    at: now,
                });
            }
            Answer::unauthorized(challenge(a))
        } else {
            let host = st.hosts.get(authority).expect("inserted above");
            match route {
                Route::Manifest { repo, reference } => {
                    serve_manifest(host, repo, reference, accepted(req))
                }
                Route::Blob { repo, digest } => serve_blob(host, repo, digest),
                Route::Get | Route::Ping => match host.paths.get(path) {
                    Some(body) => Answer::new(200, "application/octet-stream", body.clone()),
                    None => Answer::new(
                        404,
                        "text/plain",
                        Bytes::from_static(b"404 page not found\n"),
                    ),
                },
            }
        };
        let what = match rule {
            Some(FailMode::Reset) => {
                answer.reset_after = Some(answer.body.len() / 2);
                ", reset mid-body"
            }
            Some(FailMode::Corrupt) => {
                let mut bytes = answer.body.to_vec();
                for b in bytes.iter_mut().skip(CORRUPT_AFTER) {
                    *b ^= 0xff;
                }
                answer.body = Bytes::from(bytes);
                ", corrupted body"
            }
            _ => "",
        };
        log(st, &format_args!("{}{what}", answer.status));
        Decision::Answer(answer)
    }
}

/// Consumes one use of the first rule matching `kind`.
pub(super) fn take_rule(rules: &mut Vec<FailRule>, kind: RequestKind) -> Option<FailMode> {
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

pub(super) fn serve_manifest<'r>(
    host: &Host,
    repo: &str,
    reference: &str,
    mut accept: impl Iterator<Item = &'r str> + Clone,
) -> Answer {
    let unknown = || Answer::registry_error(404, "MANIFEST_UNKNOWN", "manifest unknown");
    let Some(r) = host.repos.get(repo) else {
        return Answer::registry_error(
            404,
            "NAME_UNKNOWN",
            "repository name not known to registry",
        );
    };
    let digest: &str = match reference.strip_prefix("sha256:") {
        Some(d) => d,
        None => match r.tags.get(reference) {
            Some(d) => d,
            None => return unknown(),
        },
    };
    let Some(m) = r.manifests.get(digest) else {
        return unknown();
    };
    // Like distribution: a manifest the client does not accept is not served.
    if accept.clone().next().is_some()
        && !accept.any(|a| a == "*/*" || lowercased_is(a, &m.media_type))
    {
        return Answer::registry_error(
            404,
            "MANIFEST_UNKNOWN",
            &format!("manifest of type {} not in the accept header", m.media_type),
        );
    }
    Answer::new(200, m.media_type.clone(), m.bytes.clone())
        .header("docker-content-digest", format!("sha256:{digest}"))
}

pub(super) fn serve_blob(host: &Host, repo: &str, digest: &str) -> Answer {
    let blob = digest
        .strip_prefix("sha256:")
        .and_then(|d| host.repos.get(repo)?.blobs.get(d));
    match blob {
        Some(b) => Answer::new(200, "application/octet-stream", b.clone())
            .header("docker-content-digest", digest.to_string()),
        None => Answer::registry_error(404, "BLOB_UNKNOWN", "blob unknown to registry"),
    }
}
