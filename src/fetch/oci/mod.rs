//! The OCI registry fetcher (behavior.md §4.2): a small OCI Distribution API client over
//! [`Transport`](super::Transport), mirroring what Istio's `pkg/wasm/imagefetcher.go` does with
//! go-containerregistry.
//!
//! A pull has two steps, so that the cache can stop after the first one when it already holds the
//! resolved digest (outcome `revalidated`):
//! - [`Fetcher::oci_resolve`]: authenticate (ping `/v2/`, then Basic or a bearer token), fetch the
//!   manifest (one request; an image index adds one for its `linux/amd64` child), verify its digest
//!   and choose the layer that holds the module;
//! - [`Fetcher::oci_download`]: one blob request for that layer, streamed to a staging file while
//!   hashed and verified against the descriptor digest, then unpacked (`plugin.wasm` out of a
//!   Docker / OCI-compat layer, or the raw bytes of a Wasm artifact layer).
//!
//! The ping and token requests go through the same transport (the simulator tells them apart by
//! path and does not count them). Config blobs and other layers are never downloaded. Comparing
//! the digest with an expected checksum, and committing the module, are the cache's job.
//!
//! # Layout
//! - this file: the resolved reference, the endpoint of a registry, the two steps put together;
//! - [`auth`]: the ping, Basic and Bearer challenges, token realm checks;
//! - [`manifest`]: fetching and verifying manifests, image index → `linux/amd64`, choosing the
//!   module layer per image format; [`digests`]: their sha256, computed again only when the bytes
//!   read from a URL changed;
//! - [`pull`]: the blob download, streamed to the store and unpacked per image format;
//! - [`media_type`]: the media types of every format; [`image`]: builds images in every format
//!   (for the simulator and the tests).

mod auth;
mod digests;
#[cfg(test)]
mod fixtures;
pub mod image;
mod manifest;
pub mod media_type;
mod pull;

use std::fmt;

use super::request::{status_failure, ErrorKind};
use super::retry::{AttemptError, PullBudget};
use super::{FetchError, Fetcher};
use crate::plugin::secret::Credentials;
use crate::url::OciRef;
use manifest::{choose_layer, pick_platform, PARSED_MANIFESTS};

pub use auth::validate_realm;
pub use media_type::*;

/// Manifests are small JSON documents; anything bigger is refused (4 MiB, as containerd).
pub const MAX_MANIFEST_SIZE: usize = 4 << 20;

/// How an image holds its module (behavior.md §4.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    /// Docker manifest; the last layer is a tar.gz holding `plugin.wasm`.
    Docker,
    /// OCI manifest; the last layer is an OCI tar+gzip layer holding `plugin.wasm`.
    OciCompat,
    /// OCI manifest with a Wasm content layer whose raw bytes are the module.
    WasmArtifact,
}

/// A content descriptor: what a blob is, its sha256 (hex, without `sha256:`) and size.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

/// A resolved reference: the manifest digest (the cache checksum) and the layer to download.
#[derive(Clone)]
pub struct OciResolved {
    /// Hex sha256 of the image manifest. For an image index this is the digest of the chosen
    /// `linux/amd64` child manifest, as Istio's `img.Digest()` after `desc.Image()`: the checksum
    /// names the image whose layer is downloaded.
    pub digest: String,
    /// Hex sha256 of the image index the reference pointed at, if it did (a URL pinned by an index
    /// digest expects this one, not [`OciResolved::digest`]).
    pub index_digest: Option<String>,
    pub format: ImageFormat,
    pub layer: Descriptor,
    /// Credentials were sent to the registry (Basic) or to its token endpoint (Bearer).
    pub used_credentials: bool,
    /// `https://registry` (or `http://` for insecure registries).
    base: String,
    /// The repository as the API names it (Docker Hub adds `library/`).
    repository: String,
    /// The `Authorization` value to reuse for the blob; never printed.
    authorization: Option<String>,
    /// `registry/repository[:tag][@digest]`, for messages.
    display: String,
}

impl fmt::Debug for OciResolved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OciResolved")
            .field("reference", &self.display)
            .field("digest", &self.digest)
            .field("index_digest", &self.index_digest)
            .field("format", &self.format)
            .field("layer", &self.layer)
            .field("used_credentials", &self.used_credentials)
            .finish_non_exhaustive()
    }
}

impl Fetcher {
    /// Resolves a reference to its manifest digest and the layer holding the module.
    ///
    /// Errors: [`FetchError::Unauthorized`] (401/403, or a forbidden token realm),
    /// [`FetchError::Manifest`] (not found, retries exhausted, unusable manifest),
    /// [`FetchError::Blocked`].
    pub async fn oci_resolve(
        &self,
        r: &OciRef,
        creds: Option<&Credentials>,
        budget: PullBudget,
    ) -> Result<OciResolved, FetchError> {
        let (base, repository) = self.oci_endpoint(r);
        let display = r.to_string();
        let auth = self
            .oci_authenticate(&base, &repository, creds, budget)
            .await?;
        let first = self
            .fetch_manifest(
                &base,
                &repository,
                &r.reference(),
                r.digest.as_deref(),
                &auth,
                budget,
            )
            .await?;
        let parsed = PARSED_MANIFESTS.parse(&first, &display)?;
        let (manifest, digest, index_digest) = if parsed.is_index {
            let child = pick_platform(&parsed, &display)?;
            let fetched = self
                .fetch_manifest(
                    &base,
                    &repository,
                    &format!("sha256:{child}"),
                    Some(&child),
                    &auth,
                    budget,
                )
                .await?;
            let child_manifest = PARSED_MANIFESTS.parse(&fetched, &display)?;
            if child_manifest.is_index {
                return Err(FetchError::Manifest(format!(
                    "{display}: image index entry sha256:{child} is another index"
                )));
            }
            (child_manifest, fetched.digest, Some(first.digest))
        } else {
            (parsed, first.digest, None)
        };
        let (format, layer) = choose_layer(&manifest, &display)?;
        Ok(OciResolved {
            digest,
            index_digest,
            format,
            layer,
            used_credentials: auth.used_credentials,
            base,
            repository,
            authorization: auth.header,
            display,
        })
    }

    /// The API base URL and repository. Docker Hub is served by `registry-1.docker.io`, and its
    /// official images live under `library/` (as go-containerregistry resolves them).
    fn oci_endpoint(&self, r: &OciRef) -> (String, String) {
        let scheme = if self.config.is_insecure(&r.registry) {
            "http"
        } else {
            "https"
        };
        match r.registry.as_str() {
            "docker.io" | "index.docker.io" => {
                let repo = if r.repository.contains('/') {
                    r.repository.clone()
                } else {
                    format!("library/{}", r.repository)
                };
                (format!("{scheme}://registry-1.docker.io"), repo)
            }
            host => (format!("{scheme}://{host}"), r.repository.clone()),
        }
    }
}

fn deadline_exceeded(url: &str, kind: ErrorKind) -> AttemptError {
    AttemptError::Fatal(kind(format!("{url}: pull deadline exceeded")))
}

fn credentials_note(with_credentials: bool) -> &'static str {
    if with_credentials {
        "with the pull secret's credentials"
    } else {
        "anonymous; hint: set imagePullSecret"
    }
}

/// A registry's answer status: 2xx goes on; 401/403 is `unauthorized` (never retried); anything
/// else as for any HTTP request (5xx retried, the rest final).
fn registry_status(
    url: &str,
    status: u16,
    used_credentials: bool,
    kind: ErrorKind,
) -> Result<(), AttemptError> {
    match status {
        200..=299 => Ok(()),
        401 | 403 => Err(AttemptError::Fatal(FetchError::Unauthorized(format!(
            "{url}: status code {status} ({})",
            credentials_note(used_credentials)
        )))),
        s => Err(status_failure(url, s, kind)),
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;
    use crate::fetch::fake::{config, harness, Reply};
    use crate::fetch::TransportError;
    use crate::outcome::Reason;

    #[tokio::test]
    async fn ping_connection_failure_is_a_manifest_failure() {
        let h = harness(config());
        h.transport.script(
            &format!("{BASE}/v2/"),
            vec![Reply::Error(TransportError::Connect("refused".into()))],
        );
        let err = h
            .fetcher
            .oci_resolve(&oci_ref("reg.example/r:v1"), None, h.fetcher.budget())
            .await
            .unwrap_err();
        assert_eq!(err.reason(), Reason::ManifestFailure);
        assert_eq!(h.transport.count(&manifest_url("r", "v1")), 0);
    }

    #[tokio::test]
    async fn insecure_registries_use_plain_http() {
        let mut cfg = config();
        cfg.insecure_registries = vec!["localhost:5000".into()];
        let h = harness(cfg);
        h.transport
            .script("http://localhost:5000/v2/", vec![Reply::ok("{}")]);
        let m = image(OCI_MANIFEST, &[(WASM_CONTENT_LAYER, b"x")]);
        let bytes = serde_json::to_vec(&m).unwrap();
        h.transport.script(
            "http://localhost:5000/v2/r/manifests/latest",
            vec![manifest_reply(&bytes, OCI_MANIFEST)],
        );
        h.fetcher
            .oci_resolve(&oci_ref("localhost:5000/r"), None, h.fetcher.budget())
            .await
            .unwrap();
        assert!(h
            .transport
            .requests()
            .iter()
            .all(|r| r.url.starts_with("http://")));
    }

    #[test]
    fn docker_hub_endpoint() {
        let h = harness(config());
        let (base, repo) = h.fetcher.oci_endpoint(&oci_ref("docker.io/envoy:v1"));
        assert_eq!(
            (base.as_str(), repo.as_str()),
            ("https://registry-1.docker.io", "library/envoy")
        );
        let (_, repo) = h.fetcher.oci_endpoint(&oci_ref("docker.io/istio/wasm:v1"));
        assert_eq!(repo, "istio/wasm");
    }
}
