//! Phase 2 of a processing: the fetch a [`Job`] describes, run off the engine (it borrows nothing of
//! it), and its result, [`Obtained`] or a [`Failure`].

use std::sync::Arc;

use crate::cache::ModuleKey;
use crate::cache::Verifier;
use crate::fetch::http::{HttpPull, Validators};
use crate::fetch::{FetchError, Fetcher, StagedModule};
use crate::outcome::Reason;
use crate::plugin::{Credentials, ObjectKey};
use crate::url::{HttpUrl, OciRef};

/// What must be fetched for one plugin version.
#[derive(Clone, Debug)]
pub enum Job {
    File {
        path: String,
        expected: Option<String>,
    },
    /// `conditional`: the cached module the url resolves to and its validators, for a conditional
    /// request (a `304` makes the outcome `revalidated`).
    Http {
        url: HttpUrl,
        expected: Option<String>,
        conditional: Option<(ModuleKey, Validators)>,
        /// The plugin's own pull timeout, if it has one.
        timeout: Option<std::time::Duration>,
    },
    Oci {
        reference: OciRef,
        name: String,
        credentials: Option<Credentials>,
        expected: Option<String>,
        /// The checksums of the cached modules of this name when the job was planned: an OCI pull
        /// stops after the manifest when the digest it resolves to is among them. (Usually none
        /// or one: a list, the name not copied with each.)
        cached: Vec<String>,
        /// The plugin's own pull timeout, if it has one.
        timeout: Option<std::time::Duration>,
    },
    /// A cache hit on a module whose file is still being verified since the start: waits for its
    /// verification (moved to the front of the queue). Its result is the cache hit; whether the
    /// file verified is the cache's to say ([`crate::engine::Engine::lost_cache_hit`]).
    Verify {
        key: ModuleKey,
        verifier: Arc<Verifier>,
    },
}

impl Job {
    /// The host a pull of this job sends its requests to (`host[:port]` of an http(s) URL, the
    /// registry of an OCI image), which bounds how many run at once (`--max-pulls-per-host`);
    /// `None` for a local file, which is read, not pulled, and for a cached module's verification.
    pub fn pull_host(&self) -> Option<&str> {
        match self {
            Job::File { .. } | Job::Verify { .. } => None,
            Job::Http { url, .. } => Some(crate::url::authority(url.url())),
            Job::Oci { reference, .. } => Some(&reference.registry),
        }
    }

    /// Identity for single-flight: two plugins whose jobs have the same key share one download.
    /// Made of the job's parts, not formatted into one text (it is built for every job).
    pub fn flight_key(&self) -> FlightKey {
        match self {
            Job::File { path, expected } => FlightKey::File {
                path: path.clone(),
                expected: expected.clone(),
            },
            Job::Verify { key, .. } => FlightKey::Verify(key.clone()),
            Job::Http { url, expected, .. } => FlightKey::Http {
                url: url.as_str().to_string(),
                expected: expected.clone(),
                // The module name hides credentials; two sets of them are two downloads.
                who: url
                    .has_credentials()
                    .then(|| crate::store::sha256_hex(url.as_written().as_bytes())),
            },
            Job::Oci {
                reference,
                credentials,
                expected,
                ..
            } => FlightKey::Oci {
                reference: reference.clone(),
                expected: expected.clone(),
                // Credentials take part so that a module is never shared across authorizations.
                who: credentials
                    .as_ref()
                    .map(|c| crate::store::sha256_hex(c.basic_header().as_bytes())),
            },
        }
    }
}

/// A job's identity for single-flight ([`Job::flight_key`]). `who`: the sha256 of the credentials
/// a pull uses, if any (never the credentials themselves).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FlightKey {
    File {
        path: String,
        expected: Option<String>,
    },
    Verify(ModuleKey),
    Http {
        url: String,
        expected: Option<String>,
        who: Option<String>,
    },
    Oci {
        reference: OciRef,
        expected: Option<String>,
        who: Option<String>,
    },
}

/// Why a processing obtained no module. Every variant maps onto exactly one [`Reason`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("pull secret {0} not found")]
    MissingSecret(ObjectKey),
    /// Remote code without `http_uri` (behavior.md §10).
    #[error("the Wasm filter's remote code has no http_uri: nothing to pull")]
    NoHttpUri,
    /// The module could not be written to, or read back from, the cache.
    #[error("cache: {0}")]
    Cache(String),
}

impl Failure {
    pub fn reason(&self) -> Reason {
        match self {
            Failure::Fetch(e) => e.reason(),
            Failure::MissingSecret(_) => Reason::MissingSecret,
            Failure::NoHttpUri => Reason::MissingHttpUri,
            Failure::Cache(_) => Reason::DownloadFailure,
        }
    }
}

/// The result of phases 1 and 2.
pub enum Obtained {
    /// Served from the cache without contacting the source.
    Cached(ModuleKey),
    /// The source was asked; the module was already cached.
    Revalidated(ModuleKey),
    /// Downloaded (`validators`: what an HTTP server sent, for conditional requests later).
    Fetched {
        key: ModuleKey,
        staged: StagedModule,
        private: bool,
        validators: Option<Validators>,
    },
    /// Read from a local file.
    File { path: String, sha256: String },
    /// Downloaded by another plugin's identical job in flight at the same time (single flight):
    /// already committed to the cache under this key.
    Shared(ModuleKey),
}

/// A result handed to the other waiters of a shared job (single flight).
pub fn share_result(result: &Result<Obtained, Failure>) -> Result<Obtained, Failure> {
    match result {
        Ok(Obtained::Fetched { key, .. }) | Ok(Obtained::Shared(key)) => {
            Ok(Obtained::Shared(key.clone()))
        }
        Ok(Obtained::Revalidated(k)) => Ok(Obtained::Revalidated(k.clone())),
        Ok(Obtained::Cached(k)) => Ok(Obtained::Cached(k.clone())),
        Ok(Obtained::File { path, sha256 }) => Ok(Obtained::File {
            path: path.clone(),
            sha256: sha256.clone(),
        }),
        Err(e) => Err(e.clone()),
    }
}

fn check_expected(expected: Option<&str>, actual: &str) -> Result<(), FetchError> {
    match expected {
        Some(exp) if exp != actual => Err(FetchError::Checksum {
            expected: exp.to_string(),
            actual: actual.to_string(),
        }),
        _ => Ok(()),
    }
}

/// Makes a downloaded module durable here, in the job's task, so that committing it on the
/// engine's thread only renames it (a 256 MiB module's `fsync` would stall the engine otherwise).
fn synced(mut staged: StagedModule) -> Result<StagedModule, Failure> {
    crate::fetch::cpu_bound(|| staged.file.sync())
        .map_err(|e| Failure::Cache(format!("write failed: {e}")))?;
    Ok(staged)
}

/// Runs a job (phase 2).
pub async fn run_job(fetcher: &Fetcher, job: &Job) -> Result<Obtained, Failure> {
    match job {
        Job::Verify { key, verifier } => {
            verifier.wait(key).await;
            Ok(Obtained::Cached(key.clone()))
        }
        Job::File { path, expected } => {
            let staged = fetcher.fetch_file_within(path, fetcher.budget()).await?;
            check_expected(expected.as_deref(), &staged.sha256)?;
            Ok(Obtained::File {
                path: path.clone(),
                sha256: staged.sha256,
            })
        }
        Job::Http {
            url,
            expected,
            conditional,
            timeout,
        } => {
            let validators = conditional.as_ref().map(|(_, v)| v);
            let pull = fetcher
                .fetch_http_conditional(url, fetcher.budget_within(*timeout), validators)
                .await?;
            let (staged, validators) = match (pull, conditional) {
                (HttpPull::Fetched(staged, validators), _) => (staged, validators),
                (HttpPull::NotModified, Some((key, _))) => {
                    return Ok(Obtained::Revalidated(key.clone()))
                }
                (HttpPull::NotModified, None) => {
                    let url = url.as_str();
                    return Err(FetchError::Download(format!("{url}: unexpected 304")).into());
                }
            };
            check_expected(expected.as_deref(), &staged.sha256)?;
            let key = ModuleKey::new(url.as_str(), staged.sha256.clone());
            Ok(Obtained::Fetched {
                key,
                staged: synced(staged)?,
                // Fetched with credentials from the URL: like a registry's private module, served
                // to another plugin (whose URL may carry other credentials) only after its own pull.
                private: url.has_credentials(),
                validators,
            })
        }
        Job::Oci {
            reference,
            name,
            credentials,
            expected,
            cached,
            timeout,
        } => {
            let budget = fetcher.budget_within(*timeout);
            let resolved = fetcher
                .oci_resolve(reference, credentials.as_ref(), budget)
                .await?;
            // A URL pinned to an image index digest names the index; the module is its child.
            let checksum = match expected.as_deref() {
                Some(exp) if resolved.index_digest.as_deref() == Some(exp) => exp.to_string(),
                exp => {
                    check_expected(exp, &resolved.digest)?;
                    resolved.digest.clone()
                }
            };
            let revalidated = cached.contains(&checksum);
            let key = ModuleKey::new(name.clone(), checksum);
            if revalidated {
                return Ok(Obtained::Revalidated(key));
            }
            let staged = fetcher.oci_download(&resolved, budget).await?;
            Ok(Obtained::Fetched {
                key,
                staged: synced(staged)?,
                private: resolved.used_credentials,
                validators: None,
            })
        }
    }
}
