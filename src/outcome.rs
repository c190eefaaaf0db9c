//! The result of processing one plugin version (behavior.md §6) and its mapping onto Istio's metric
//! labels. Every fetch error maps onto exactly one [`Reason`] by an exhaustive match.

use std::fmt;

use serde::Serialize;

/// Why no valid module could be obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    DownloadFailure,
    ManifestFailure,
    ChecksumMismatch,
    InvalidModule,
    MissingSecret,
    Unauthorized,
    TooLarge,
    BlockedAddress,
    /// Remote code without `http_uri` (behavior.md §10): nothing can be pulled.
    MissingHttpUri,
}

impl Reason {
    pub const ALL: [Reason; 9] = [
        Reason::DownloadFailure,
        Reason::ManifestFailure,
        Reason::ChecksumMismatch,
        Reason::InvalidModule,
        Reason::MissingSecret,
        Reason::Unauthorized,
        Reason::TooLarge,
        Reason::BlockedAddress,
        Reason::MissingHttpUri,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::DownloadFailure => "download_failure",
            Reason::ManifestFailure => "manifest_failure",
            Reason::ChecksumMismatch => "checksum_mismatch",
            Reason::InvalidModule => "invalid_module",
            Reason::MissingSecret => "missing_secret",
            Reason::Unauthorized => "unauthorized",
            Reason::TooLarge => "too_large",
            Reason::BlockedAddress => "blocked_address",
            Reason::MissingHttpUri => "missing_http_uri",
        }
    }

    pub fn parse(s: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// The `result` label of `istio_agent_wasm_remote_fetch_count`, or `None` when no remote fetch is
    /// recorded (behavior.md §6).
    pub fn fetch_result(self) -> Option<FetchResult> {
        match self {
            Reason::DownloadFailure | Reason::TooLarge | Reason::BlockedAddress => {
                Some(FetchResult::DownloadFailure)
            }
            Reason::ManifestFailure | Reason::Unauthorized => Some(FetchResult::ManifestFailure),
            Reason::ChecksumMismatch => Some(FetchResult::ChecksumMismatched),
            Reason::InvalidModule => Some(FetchResult::FetchFailure),
            Reason::MissingSecret | Reason::MissingHttpUri => None,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Values of the `result` label of `istio_agent_wasm_remote_fetch_count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FetchResult {
    Success,
    DownloadFailure,
    ManifestFailure,
    ChecksumMismatched,
    FetchFailure,
}

impl FetchResult {
    pub fn as_str(self) -> &'static str {
        match self {
            FetchResult::Success => "success",
            FetchResult::DownloadFailure => "download_failure",
            FetchResult::ManifestFailure => "manifest_failure",
            FetchResult::ChecksumMismatched => "checksum_mismatched",
            FetchResult::FetchFailure => "fetch_failure",
        }
    }
}

/// The outcome of processing one plugin version.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "outcome", content = "reason", rename_all = "snake_case")]
pub enum Outcome {
    Pulled,
    Revalidated,
    Cached,
    Rejected(Reason),
    /// The resource failed validation; the field path that failed.
    Invalid(String),
}

impl Outcome {
    /// Every outcome's name, at its [`index`](Self::index): the values of the `outcome` label of
    /// `wasm_ecds_plugin_processing_count`.
    pub const NAMES: [&'static str; 5] = ["pulled", "revalidated", "cached", "rejected", "invalid"];

    /// The outcome's position in [`NAMES`](Self::NAMES).
    pub fn index(&self) -> usize {
        match self {
            Outcome::Pulled => 0,
            Outcome::Revalidated => 1,
            Outcome::Cached => 2,
            Outcome::Rejected(_) => 3,
            Outcome::Invalid(_) => 4,
        }
    }

    pub fn name(&self) -> &'static str {
        Self::NAMES[self.index()]
    }

    pub fn reason(&self) -> Option<String> {
        match self {
            Outcome::Rejected(r) => Some(r.as_str().to_string()),
            Outcome::Invalid(f) => Some(f.clone()),
            _ => None,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.reason() {
            Some(r) => write!(f, "{} ({r})", self.name()),
            None => f.write_str(self.name()),
        }
    }
}
