//! Fetching modules (behavior.md §4): the HTTP(S) fetcher, the OCI fetcher and `file://` reads, all
//! written against the narrow [`Transport`] trait so that `serve` (hyper, see [`hyper_transport`]) and
//! `sim` (in-memory registries) run the same retry, auth, unpacking and verification code.
//!
//! A fetch stages the module in the [`ModuleStore`](crate::store::ModuleStore) while hashing it and
//! returns a [`StagedModule`]; committing it into the cache is the cache's job.

#[cfg(test)]
pub(crate) mod fake;
pub mod file;
pub mod http;
pub mod hyper_transport;
pub mod oci;
pub(crate) mod request;
pub mod retry;
pub(crate) mod stream;
pub mod unpack;

use std::borrow::Cow;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use thiserror::Error;

use crate::clock::{Clock, Timestamp};
use crate::config::{Config, PULL_DEADLINE};
use crate::outcome::Reason;
use crate::store::{FileSource, ModuleStore, StagedFile};

pub use retry::{Backoff, PullBudget};

/// A header name or value. Fixed texts (names, Accept lists, content types) are borrowed, so a
/// request or response carries copies only of the values that vary.
pub type HeaderText = Cow<'static, str>;

/// Header `(name, value)` pairs; names are lowercase.
pub type Headers = Vec<(HeaderText, HeaderText)>;

/// One HTTP GET attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpRequest {
    /// Absolute URL.
    pub url: String,
    /// Header names are lowercase.
    pub headers: Headers,
}

impl HttpRequest {
    pub fn get(url: impl Into<String>) -> Self {
        HttpRequest {
            url: url.into(),
            headers: Vec::new(),
        }
    }

    /// Adds a header; the name is lowercased (copied only when it has an uppercase letter).
    pub fn header(mut self, name: impl Into<HeaderText>, value: impl Into<HeaderText>) -> Self {
        let mut name = name.into();
        if name.bytes().any(|b| b.is_ascii_uppercase()) {
            name = Cow::Owned(name.to_ascii_lowercase());
        }
        self.headers.push((name, value.into()));
        self
    }
}

/// A response whose body is read chunk by chunk (never buffered whole by the transport).
pub struct HttpResponse {
    pub status: u16,
    /// Header names are lowercase.
    pub headers: Headers,
    pub body: Box<dyn BodyStream>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_ref())
    }
}

impl std::fmt::Debug for HttpResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpResponse")
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

/// A response body. Reads are bounded by the attempt's timeout (the transport's job).
#[async_trait]
pub trait BodyStream: Send {
    /// The next chunk, `None` at the end.
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, TransportError>;
}

/// A body that is already in memory (small responses, tests, the simulator).
pub struct FullBody(Option<Bytes>);

impl FullBody {
    pub fn boxed(b: impl Into<Bytes>) -> Box<dyn BodyStream> {
        Box::new(FullBody(Some(b.into())))
    }
}

#[async_trait]
impl BodyStream for FullBody {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, TransportError> {
        Ok(self.0.take().filter(|b| !b.is_empty()))
    }
}

/// Failures below HTTP: no status was received, or the body broke off.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum TransportError {
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("timed out")]
    Timeout,
    #[error("connection reset: {0}")]
    Reset(String),
    /// The resolved address is link-local, a metadata address or in a blocked CIDR.
    #[error("blocked address: {0}")]
    Blocked(String),
    #[error("tls: {0}")]
    Tls(String),
}

impl TransportError {
    /// Connection errors and timeouts are retried; a blocked address never is.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, TransportError::Blocked(_) | TransportError::Tls(_))
    }
}

/// Runs CPU-heavy work (decompressing, hashing a staged module) without stalling the other tasks
/// of a multi-threaded runtime (`serve`); inline on a current-thread runtime (the simulator, whose
/// virtual clock must see no work outside its own thread).
pub(crate) fn cpu_bound<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Sends one HTTP GET. Implementations: hyper in `serve`, in-memory hosts in `sim`, fakes in tests.
///
/// Contract: one call is one attempt that reached (or tried to reach) the host. It must give up with
/// [`TransportError::Timeout`] once `timeout` has passed, *including* the time spent reading the
/// body; a virtual-time transport advances its clock by `timeout` instead of waiting. Redirects are
/// not followed (the fetchers do that, so every hop is checked and counted). Thread-safe.
#[async_trait]
pub trait Transport: Send + Sync {
    async fn get(
        &self,
        req: &HttpRequest,
        timeout: Duration,
    ) -> Result<HttpResponse, TransportError>;
}

/// Why a fetch failed. Each variant maps onto exactly one [`Reason`].
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum FetchError {
    #[error("download failed: {0}")]
    Download(String),
    #[error("manifest failure: {0}")]
    Manifest(String),
    #[error("checksum mismatch: want {expected}, got {actual}")]
    Checksum { expected: String, actual: String },
    #[error("invalid module: {0}")]
    InvalidModule(String),
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    #[error("module too large: more than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("blocked address: {0}")]
    Blocked(String),
}

impl FetchError {
    pub fn reason(&self) -> Reason {
        match self {
            FetchError::Download(_) => Reason::DownloadFailure,
            FetchError::Manifest(_) => Reason::ManifestFailure,
            FetchError::Checksum { .. } => Reason::ChecksumMismatch,
            FetchError::InvalidModule(_) => Reason::InvalidModule,
            FetchError::Unauthorized(_) => Reason::Unauthorized,
            FetchError::TooLarge { .. } => Reason::TooLarge,
            FetchError::Blocked(_) => Reason::BlockedAddress,
        }
    }

    pub(crate) fn io(e: std::io::Error) -> Self {
        FetchError::Download(format!("cache i/o: {e}"))
    }
}

/// A verified Wasm module written to a staging file, not yet in the cache.
pub struct StagedModule {
    pub file: Box<dyn StagedFile>,
    /// Hex sha256 of the Wasm binary.
    pub sha256: String,
    pub size: u64,
}

impl StagedModule {
    /// `bytes` staged in `store` as they are (tests and tools that already hold a module).
    pub fn of_bytes(store: &dyn ModuleStore, bytes: &[u8]) -> std::io::Result<StagedModule> {
        let mut file = store.stage()?;
        std::io::Write::write_all(&mut file, bytes)?;
        Ok(StagedModule {
            file,
            sha256: crate::store::sha256_hex(bytes),
            size: bytes.len() as u64,
        })
    }
}

impl std::fmt::Debug for StagedModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagedModule")
            .field("sha256", &self.sha256)
            .field("size", &self.size)
            .finish()
    }
}

/// Options of the fetchers, taken from [`Config`].
#[derive(Clone, Debug)]
pub struct FetchConfig {
    /// How long one attempt may take; zero means no per-attempt limit (as Go's `http.Client`
    /// timeout): then only the pull's overall deadline bounds it.
    pub request_timeout: Duration,
    pub max_attempts: u32,
    pub pull_deadline: Duration,
    pub max_binary_size: u64,
    pub insecure_registries: Vec<String>,
    /// Lets a bearer-token `realm` point at a loopback or private address (tests and the simulator
    /// run their token endpoints on 127.0.0.1). Link-local and metadata addresses stay forbidden.
    pub allow_private_token_realm: bool,
}

impl From<&Config> for FetchConfig {
    fn from(c: &Config) -> Self {
        FetchConfig {
            request_timeout: c.http_request_timeout,
            max_attempts: c.http_request_max_retries.max(1),
            pull_deadline: PULL_DEADLINE,
            max_binary_size: c.max_binary_size,
            insecure_registries: c.insecure_registries.clone(),
            allow_private_token_realm: false,
        }
    }
}

impl FetchConfig {
    /// The time the next attempt may take when `remaining` is left of the pull's deadline.
    pub fn attempt_timeout(&self, remaining: Duration) -> Duration {
        if self.request_timeout.is_zero() {
            remaining
        } else {
            self.request_timeout.min(remaining)
        }
    }

    pub fn is_insecure(&self, host: &str) -> bool {
        self.insecure_registries
            .iter()
            .any(|h| h == "*" || h.eq_ignore_ascii_case(host))
    }
}

/// The effects a fetch needs, shared by the HTTP, OCI and file fetchers.
pub struct Fetcher {
    pub transport: Arc<dyn Transport>,
    pub clock: Arc<dyn Clock>,
    pub store: Arc<dyn ModuleStore>,
    pub files: Arc<dyn FileSource>,
    pub config: FetchConfig,
    /// Jitter source for backoff; `None` disables jitter (the simulator).
    pub jitter: Option<Mutex<fastrand::Rng>>,
}

impl Fetcher {
    /// A budget for one pull: the overall deadline starts now.
    pub fn budget(&self) -> PullBudget {
        self.budget_within(None)
    }

    /// The budget of a pull that may take `limit` (a plugin's own timeout) instead of the
    /// configured deadline.
    pub fn budget_within(&self, limit: Option<Duration>) -> PullBudget {
        PullBudget::new(self.clock.now() + limit.unwrap_or(self.config.pull_deadline))
    }

    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// The backoff for the attempts of one request.
    pub fn backoff(&self) -> Backoff {
        let jitter = self
            .jitter
            .as_ref()
            .map(|rng| rng.lock().expect("rng lock").u64(..));
        Backoff::new(crate::backoff::FETCH, jitter)
    }
}
