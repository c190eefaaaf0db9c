//! `require_auth` in the simulated world: the credentials a host wants, its `WWW-Authenticate`
//! challenges (Basic, or Bearer with a token endpoint on the host itself), and the challenge a
//! request may answer within the same attempt without being counted again.

use base64::Engine as _;

use super::answer::Answer;
use crate::clock::Timestamp;
use crate::sim::rules::AuthScheme;

/// The realm of `WWW-Authenticate: Basic` challenges.
pub(super) const REALM: &str = "sim";
/// Where a Bearer-token host hands out tokens (on the host itself; never counted, never failed).
pub const TOKEN_PATH: &str = "/sim/token";
/// The token handed to anonymous token requests: it grants nothing.
pub(super) const ANONYMOUS_TOKEN: &str = "sim-anonymous";

#[derive(Clone, Debug)]
pub(super) struct AuthRule {
    /// `user:pass`.
    pub(super) userpass: String,
    pub(super) scheme: AuthScheme,
}

impl AuthRule {
    /// The token issued for the right credentials (derived from them, so deterministic).
    pub(super) fn token(&self) -> String {
        format!(
            "sim-{}",
            &crate::store::sha256_hex(self.userpass.as_bytes())[..24]
        )
    }

    pub(super) fn admits(&self, authorization: Option<&str>) -> bool {
        match self.scheme {
            AuthScheme::Basic => {
                authorization.and_then(decode_basic).as_deref() == Some(self.userpass.as_str())
            }
            AuthScheme::Bearer => authorization
                .and_then(|h| h.trim().strip_prefix("Bearer "))
                .is_some_and(|t| t.trim() == self.token()),
        }
    }

    pub(super) fn challenge(&self, authority: &str, scope: Option<&str>) -> String {
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

/// A counted request answered 401 without credentials: the same request sent again as the very
/// next request, at the same virtual instant, with credentials answers the challenge within the same
/// attempt and is not counted again (scenarios.md "With `require_auth`"). Any other request in
/// between (a ping included) ends the attempt.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Challenge {
    pub(super) host: String,
    pub(super) path: String,
    pub(super) at: Timestamp,
}

pub(super) fn token_answer(token: &str) -> Answer {
    let body = serde_json::json!({"token": token, "access_token": token, "expires_in": 300});
    Answer::new(
        200,
        "application/json",
        serde_json::to_vec(&body).expect("json serializes"),
    )
}

/// `user:pass` of a `Basic` authorization header.
pub(super) fn decode_basic(header: &str) -> Option<String> {
    let (scheme, token) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .ok()?;
    String::from_utf8(raw).ok()
}
