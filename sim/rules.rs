//! What a scenario can make a simulated host do besides serving: fail requests (`fail`, until
//! `recover`) and demand credentials (`require_auth`). Shared by the scenario format
//! ([`super::scenario`]), which parses them, and the world ([`super::world`]), which applies them.

use serde::Deserialize;

/// Which counted requests a failure rule applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KindFilter {
    Manifest,
    Blob,
    Get,
    Any,
}

impl KindFilter {
    pub fn as_str(self) -> &'static str {
        match self {
            KindFilter::Manifest => "manifest",
            KindFilter::Blob => "blob",
            KindFilter::Get => "get",
            KindFilter::Any => "any",
        }
    }
}

/// How a failed request fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailMode {
    Unavailable,
    Timeout,
    Reset,
    Corrupt,
    Status(u16),
}

impl std::fmt::Display for FailMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FailMode::Unavailable => f.write_str("unavailable"),
            FailMode::Timeout => f.write_str("timeout"),
            FailMode::Reset => f.write_str("reset"),
            FailMode::Corrupt => f.write_str("corrupt"),
            FailMode::Status(s) => write!(f, "status {s}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailRule {
    pub host: String,
    pub kind: KindFilter,
    pub mode: FailMode,
    /// `None`: until `recover`.
    pub times: Option<u32>,
}

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
