//! Registry authentication (behavior.md §4.2 "Auth"): the anonymous `/v2/` ping, answering its
//! `WWW-Authenticate` challenge with Basic credentials or a bearer token from the challenge's realm,
//! and the safety checks on that realm (no loopback, private, link-local or metadata hosts).

use std::net::IpAddr;

use serde::Deserialize;

use super::{credentials_note, deadline_exceeded};
use url::{Host, Url};

use crate::fetch::request::{read_small_body, status_failure, ErrorKind};
use crate::fetch::retry::{with_retries, AttemptError, PullBudget};
use crate::fetch::{FetchError, Fetcher, HttpRequest};
use crate::plugin::secret::Credentials;

/// Token responses are small too (1 MiB).
const MAX_TOKEN_RESPONSE: usize = 1 << 20;

/// The `Authorization` header every registry request of one pull carries.
pub(super) struct Auth {
    pub(super) header: Option<String>,
    pub(super) used_credentials: bool,
}

impl Auth {
    pub(super) fn anonymous() -> Self {
        Auth {
            header: None,
            used_credentials: false,
        }
    }

    pub(super) fn apply(&self, req: HttpRequest) -> HttpRequest {
        match &self.header {
            Some(h) => req.header("authorization", h.clone()),
            None => req,
        }
    }
}

impl Fetcher {
    /// Pings `/v2/` anonymously and answers its challenge: nothing (anonymous), Basic with the
    /// credentials, or a bearer token from the challenge's realm.
    pub(super) async fn oci_authenticate(
        &self,
        base: &str,
        repository: &str,
        creds: Option<&Credentials>,
        budget: PullBudget,
    ) -> Result<Auth, FetchError> {
        let kind: ErrorKind = FetchError::Manifest;
        let ping = format!("{base}/v2/");
        let ping = ping.as_str();
        let challenges = with_retries(self, budget, |timeout, started| async move {
            if timeout.is_zero() {
                return Err(deadline_exceeded(ping, kind));
            }
            let (resp, _) = self
                .send_following_redirects(HttpRequest::get(ping), timeout, started, kind)
                .await?;
            // Anything but a 401 means "no auth needed here"; the manifest request has the last
            // word (and its own retries), so a failing ping status is not retried.
            Ok((resp.status == 401).then(|| {
                resp.headers
                    .iter()
                    .filter(|(k, _)| k.eq_ignore_ascii_case("www-authenticate"))
                    .flat_map(|(_, v)| parse_challenges(v))
                    .collect::<Vec<_>>()
            }))
        })
        .await?;
        let Some(challenges) = challenges else {
            return Ok(Auth::anonymous());
        };
        if let Some(bearer) = challenges.iter().find(|c| c.scheme == "bearer") {
            return self
                .bearer_token(ping, bearer, repository, creds, budget)
                .await;
        }
        match (challenges.iter().any(|c| c.scheme == "basic"), creds) {
            (true, Some(c)) => Ok(Auth {
                header: Some(c.basic_header()),
                used_credentials: true,
            }),
            // No credentials: go on anonymously and let the registry's 401 say `unauthorized`.
            _ => Ok(Auth::anonymous()),
        }
    }

    /// The token flow of the Docker registry auth spec: GET the realm with `service` and
    /// `scope=repository:<repo>:pull`, with Basic credentials if any.
    async fn bearer_token(
        &self,
        ping: &str,
        challenge: &Challenge,
        repository: &str,
        creds: Option<&Credentials>,
        budget: PullBudget,
    ) -> Result<Auth, FetchError> {
        let kind: ErrorKind = FetchError::Manifest;
        let realm = challenge.param("realm").ok_or_else(|| {
            FetchError::Unauthorized(format!("{ping}: bearer challenge without realm"))
        })?;
        let mut url = parse_realm(realm, self.config.allow_private_token_realm).map_err(|why| {
            FetchError::Unauthorized(format!("token realm {realm:?} refused: {why}"))
        })?;
        let mut query: Vec<String> = url
            .query()
            .filter(|q| !q.is_empty())
            .map(str::to_string)
            .into_iter()
            .collect();
        if let Some(service) = challenge.param("service") {
            query.push(format!("service={}", query_escape(service)));
        }
        query.push(format!(
            "scope={}",
            query_escape(&format!("repository:{repository}:pull"))
        ));
        url.set_query(Some(&query.join("&")));
        let url = url.as_str();
        let token = with_retries(self, budget, |timeout, started| async move {
            if timeout.is_zero() {
                return Err(deadline_exceeded(realm, kind));
            }
            let mut req = HttpRequest::get(url);
            if let Some(c) = creds {
                req = req.header("authorization", c.basic_header());
            }
            let (mut resp, final_url) = self
                .send_following_redirects(req, timeout, started, kind)
                .await?;
            match resp.status {
                200..=299 => {}
                401 | 403 => {
                    return Err(AttemptError::Fatal(FetchError::Unauthorized(format!(
                        "token endpoint {realm}: status code {} ({})",
                        resp.status,
                        credentials_note(creds.is_some())
                    ))))
                }
                s => return Err(status_failure(realm, s, kind)),
            }
            let body =
                read_small_body(&final_url, resp.body.as_mut(), MAX_TOKEN_RESPONSE, kind).await?;
            let parsed: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
                AttemptError::Fatal(kind(format!("token endpoint {realm}: invalid json: {e}")))
            })?;
            parsed
                .token
                .or(parsed.access_token)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| {
                    AttemptError::Fatal(kind(format!(
                        "token endpoint {realm}: response has no token"
                    )))
                })
        })
        .await?;
        Ok(Auth {
            header: Some(format!("Bearer {token}")),
            used_credentials: creds.is_some(),
        })
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
}

/// One challenge of a `WWW-Authenticate` header; the scheme is lowercased.
#[derive(Debug, PartialEq, Eq)]
struct Challenge {
    scheme: String,
    params: Vec<(String, String)>,
}

impl Challenge {
    fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Parses `Bearer realm="…",service="…", Basic realm="…"` (RFC 7235): a token not followed by
/// `=` starts a new challenge; parameter values are tokens or quoted strings.
fn parse_challenges(header: &str) -> Vec<Challenge> {
    let mut out: Vec<Challenge> = Vec::new();
    let chars: Vec<char> = header.chars().collect();
    let mut i = 0;
    let skip = |i: &mut usize, f: &dyn Fn(char) -> bool| {
        while *i < chars.len() && f(chars[*i]) {
            *i += 1;
        }
    };
    while i < chars.len() {
        skip(&mut i, &|c| c.is_whitespace() || c == ',');
        let start = i;
        skip(&mut i, &|c| !(c.is_whitespace() || c == ',' || c == '='));
        let token: String = chars[start..i].iter().collect();
        if token.is_empty() {
            // A stray '=' (token68 padding): skip it.
            i += 1;
            continue;
        }
        let mut j = i;
        skip(&mut j, &|c| c.is_whitespace());
        if j < chars.len() && chars[j] == '=' {
            i = j + 1;
            skip(&mut i, &|c| c.is_whitespace());
            let mut value = String::new();
            if i < chars.len() && chars[i] == '"' {
                i += 1;
                while i < chars.len() && chars[i] != '"' {
                    if chars[i] == '\\' && i + 1 < chars.len() {
                        i += 1;
                    }
                    value.push(chars[i]);
                    i += 1;
                }
                i += 1; // closing quote
            } else {
                let start = i;
                skip(&mut i, &|c| !(c.is_whitespace() || c == ','));
                value = chars[start..i].iter().collect();
            }
            if let Some(c) = out.last_mut() {
                c.params.push((token.to_ascii_lowercase(), value));
            }
        } else {
            out.push(Challenge {
                scheme: token.to_ascii_lowercase(),
                params: Vec::new(),
            });
        }
    }
    out
}

/// A bearer realm must be an http(s) URL whose host is not localhost, a loopback, private,
/// unique-local or link-local address, nor a cloud metadata endpoint (behavior.md §4.2 "Safety";
/// Istio `validateRealmURL`). `allow_private` admits loopback and private hosts (tests, the
/// simulator); link-local and metadata addresses are refused regardless.
pub fn validate_realm(realm: &str, allow_private: bool) -> Result<(), String> {
    parse_realm(realm, allow_private).map(drop)
}

/// [`validate_realm`], returning the parsed realm.
fn parse_realm(realm: &str, allow_private: bool) -> Result<Url, String> {
    let url = Url::parse(realm.trim()).map_err(|e| format!("not an absolute url ({e})"))?;
    let scheme = url.scheme();
    if scheme != "http" && scheme != "https" {
        return Err(format!(
            "scheme {scheme:?} not allowed (want http or https)"
        ));
    }
    let ip = match url.host() {
        None => return Err("missing host".into()),
        Some(Host::Domain(name)) => {
            let name = name.trim_end_matches('.');
            if name == "metadata.google.internal" {
                return Err("host is a cloud metadata service".into());
            }
            if (name == "localhost" || name.ends_with(".localhost")) && !allow_private {
                return Err(format!("{name} is a local or private address"));
            }
            return Ok(url);
        }
        Some(Host::Ipv4(v4)) => IpAddr::V4(v4),
        Some(Host::Ipv6(v6)) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
    };
    if crate::config::is_always_blocked(ip) || is_link_local(ip) {
        return Err(format!("{ip} is a link-local or metadata address"));
    }
    if is_private(ip) && !allow_private {
        return Err(format!("{ip} is a local or private address"));
    }
    Ok(url)
}

fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_private() || v4.is_unspecified(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.is_unspecified() || (v6.segments()[0] & 0xfe00) == 0xfc00
        }
    }
}

/// Percent-encodes a query value; `:` and `/` stay readable (allowed in a query, RFC 3986 §3.4).
fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use serde_json::json;

    use super::super::fixtures::*;
    use super::*;
    use crate::fetch::fake::{config, harness, Harness, Reply};
    use crate::fetch::oci::{OCI_MANIFEST, WASM_CONTENT_LAYER};
    use crate::fetch::unpack::tests::wasm;
    use crate::outcome::Reason;

    #[tokio::test]
    async fn basic_auth_when_challenged() {
        let module = wasm(10);
        let h = harness(config());
        protected(
            &h,
            "Basic realm=\"basic-realm\"",
            creds().basic_header(),
            &module,
        );
        let (resolved, _) = pull(&h, "reg.example/private:v1", Some(&creds()))
            .await
            .unwrap();
        assert!(resolved.used_credentials);
        assert!(!format!("{resolved:?}").contains(&creds().basic_header()));
        let reqs = h.transport.requests();
        assert_eq!(auth_of(&reqs[0]), None, "the ping is anonymous");
        assert!(reqs[1..]
            .iter()
            .all(|r| auth_of(r) == Some(creds().basic_header())));

        // Without credentials: anonymous, and the registry's 401 is `unauthorized`.
        let h = harness(config());
        protected(
            &h,
            "Basic realm=\"basic-realm\"",
            creds().basic_header(),
            &module,
        );
        let err = pull(&h, "reg.example/private:v1", None).await.unwrap_err();
        assert_eq!(err.reason(), Reason::Unauthorized);
        assert!(h.transport.requests().iter().all(|r| auth_of(r).is_none()));

        // Wrong credentials.
        let h = harness(config());
        protected(
            &h,
            "Basic realm=\"basic-realm\"",
            creds().basic_header(),
            &module,
        );
        let wrong = Credentials {
            username: "alice".into(),
            password: "nope".into(),
        };
        let err = pull(&h, "reg.example/private:v1", Some(&wrong))
            .await
            .unwrap_err();
        assert_eq!(err.reason(), Reason::Unauthorized);
    }

    #[tokio::test]
    async fn anonymous_registry_gets_no_credentials() {
        let h = harness(config());
        anonymous(&h);
        let module = wasm(10);
        put_manifest(
            &h,
            "r",
            "v1",
            &image(OCI_MANIFEST, &[(WASM_CONTENT_LAYER, &module)]),
        );
        put_blob(&h, "r", &module);
        let (resolved, _) = pull(&h, "reg.example/r:v1", Some(&creds())).await.unwrap();
        assert!(!resolved.used_credentials);
        assert!(h.transport.requests().iter().all(|r| auth_of(r).is_none()));
    }

    fn token_endpoint(
        h: &Harness,
        realm: &str,
        token_json: serde_json::Value,
        seen: Arc<Mutex<Vec<HttpRequest>>>,
    ) {
        h.transport.route(realm, move |req, _| {
            seen.lock().unwrap().push(req.clone());
            Reply::ok(serde_json::to_vec(&token_json).unwrap())
        });
    }

    #[tokio::test]
    async fn bearer_token_flow() {
        let module = wasm(10);
        let realm = "https://auth.example/token";
        let challenge = format!("Bearer realm=\"{realm}\",service=\"reg.example\"");

        // With credentials: Basic to the token endpoint, the token to the registry.
        let h = harness(config());
        protected(&h, &challenge, "Bearer t0k3n".into(), &module);
        let seen = Arc::new(Mutex::new(Vec::new()));
        token_endpoint(
            &h,
            realm,
            json!({"token": "t0k3n", "expires_in": 300}),
            seen.clone(),
        );
        let (resolved, _) = pull(&h, "reg.example/private:v1", Some(&creds()))
            .await
            .unwrap();
        assert!(resolved.used_credentials);
        let token_req = seen.lock().unwrap()[0].clone();
        assert_eq!(
            token_req.url,
            format!("{realm}?service=reg.example&scope=repository:private:pull")
        );
        assert_eq!(auth_of(&token_req), Some(creds().basic_header()));
        assert_eq!(h.transport.count(&manifest_url("private", "v1")), 1);

        // Anonymous token (`access_token` form).
        let h = harness(config());
        protected(&h, &challenge, "Bearer anon".into(), &module);
        let seen = Arc::new(Mutex::new(Vec::new()));
        token_endpoint(&h, realm, json!({"access_token": "anon"}), seen.clone());
        let (resolved, _) = pull(&h, "reg.example/private:v1", None).await.unwrap();
        assert!(!resolved.used_credentials);
        assert_eq!(auth_of(&seen.lock().unwrap()[0]), None);

        // The token endpoint refuses the credentials.
        let h = harness(config());
        protected(&h, &challenge, "Bearer t0k3n".into(), &module);
        h.transport.script(realm, vec![Reply::status(401)]);
        let err = pull(&h, "reg.example/private:v1", Some(&creds()))
            .await
            .unwrap_err();
        assert_eq!(err.reason(), Reason::Unauthorized);
        assert_eq!(h.transport.count(realm), 1);
    }

    #[tokio::test]
    async fn loopback_token_realm_is_refused_unless_allowed() {
        let module = wasm(10);
        let realm = "http://127.0.0.1:9999/token";
        let challenge = format!("Bearer realm=\"{realm}\",service=\"reg\"");
        let h = harness(config());
        protected(&h, &challenge, "Bearer t".into(), &module);
        token_endpoint(&h, realm, json!({"token": "t"}), Default::default());
        let err = pull(&h, "reg.example/private:v1", None).await.unwrap_err();
        assert!(
            matches!(&err, FetchError::Unauthorized(m) if m.contains(realm)),
            "{err}"
        );
        assert_eq!(h.transport.count(realm), 0);

        let mut cfg = config();
        cfg.allow_private_token_realm = true;
        let h = harness(cfg);
        protected(&h, &challenge, "Bearer t".into(), &module);
        token_endpoint(&h, realm, json!({"token": "t"}), Default::default());
        pull(&h, "reg.example/private:v1", None).await.unwrap();
        assert_eq!(h.transport.count(realm), 1);
    }

    #[test]
    fn parses_www_authenticate() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:a/b:pull""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].param("realm"), Some("https://auth.docker.io/token"));
        assert_eq!(c[0].param("scope"), Some("repository:a/b:pull"));
        let c = parse_challenges(r#"Basic realm="x, y", Bearer realm=https://a/t , charset=UTF-8"#);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].param("realm"), Some("x, y"));
        assert_eq!(c[1].param("realm"), Some("https://a/t"));
        assert_eq!(c[1].param("charset"), Some("UTF-8"));
        assert_eq!(parse_challenges("Negotiate abc==")[0].scheme, "negotiate");
    }

    #[test]
    fn validates_token_realms() {
        // Istio TestValidateAllRealms, for the realm we would use.
        for (realm, ok) in [
            ("https://auth.example.com/token", true),
            ("http://auth.example.com/token", true),
            ("http://169.254.169.254/latest/meta-data/", false),
            ("http://169.254.1.1/foo", false),
            ("http://metadata.google.internal/computeMetadata/v1/", false),
            ("http://localhost:8080/admin", false),
            ("http://127.0.0.1/api", false),
            ("http://127.0.0.5/api", false),
            ("file:///etc/passwd", false),
            ("gopher://internal:9000/_GET", false),
            ("dict://redis:6379/INFO", false),
            ("http://10.0.0.1/token", false),
            ("http://192.168.1.1/token", false),
            ("http://172.16.0.1/token", false),
            ("http://[::1]/token", false),
            ("http://[fe80::1]/token", false),
            ("http://[fd00:ec2::254]/latest/meta-data/", false),
            ("http://[fc00::1]/token", false),
            ("http://[::ffff:127.0.0.1]/token", false),
            ("http://100.100.100.200/token", false),
            ("token", false),
        ] {
            assert_eq!(validate_realm(realm, false).is_ok(), ok, "{realm}");
        }
        assert!(validate_realm("http://127.0.0.1:8080/token", true).is_ok());
        assert!(validate_realm("http://[::1]/token", true).is_ok());
        assert!(validate_realm("http://169.254.169.254/", true).is_err());
        assert!(validate_realm("http://[fd00:ec2::254]/", true).is_err());
    }
}
