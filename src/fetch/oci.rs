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

use std::fmt;
use std::io::Read;
use std::net::IpAddr;
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::http::{
    check_content_length, read_small_body, status_failure, stream_body, url_host, ErrorKind,
    TransferLimit,
};
use super::retry::{with_retries, AttemptError, PullBudget};
use super::unpack::{check_wasm, extract_plugin_wasm, MIN_WASM_SIZE};
use super::{FetchError, Fetcher, HttpRequest, StagedFile, StagedModule};
use crate::plugin::secret::Credentials;
use crate::store::sha256_hex;
use crate::url::{is_sha256_hex, OciRef};

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// The last layer of a Docker image holding `plugin.wasm`.
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// The last layer of an OCI "compat" image holding `plugin.wasm`.
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// The raw module of a Wasm artifact (solo-io Wasm image spec, the one Istio accepts).
pub const WASM_CONTENT_LAYER: &str = "application/vnd.module.wasm.content.layer.v1+wasm";
/// The same, as written by other tools (accepted as an improvement, behavior.md §4.2).
pub const WASM_CONTENT_LAYER_ALT: &str = "application/vnd.wasm.content.layer.v1+wasm";
/// The config layer of a two-layer Wasm artifact; never downloaded.
pub const WASM_CONFIG_LAYER: &str = "application/vnd.module.wasm.config.v1+json";

/// What a manifest request accepts, index types first.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json";
/// Manifests are small JSON documents; anything bigger is refused (4 MiB, as containerd).
pub const MAX_MANIFEST_SIZE: usize = 4 << 20;
/// Token responses are small too (1 MiB).
const MAX_TOKEN_RESPONSE: usize = 1 << 20;

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

/// The `Authorization` header every registry request of one pull carries.
struct Auth {
    header: Option<String>,
    used_credentials: bool,
}

impl Auth {
    fn anonymous() -> Self {
        Auth {
            header: None,
            used_credentials: false,
        }
    }

    fn apply(&self, req: HttpRequest) -> HttpRequest {
        match &self.header {
            Some(h) => req.header("authorization", h.clone()),
            None => req,
        }
    }
}

/// A fetched manifest: its bytes, hex digest and `Content-Type`.
struct FetchedManifest {
    bytes: Vec<u8>,
    digest: String,
    content_type: Option<String>,
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
        let parsed = parse_manifest(&first, &display)?;
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
            let child_manifest = parse_manifest(&fetched, &display)?;
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

    /// Downloads the module layer of a resolved image (one blob request) and unpacks it.
    ///
    /// Errors: [`FetchError::Download`] (transfer, retries exhausted, digest never matching),
    /// [`FetchError::Unauthorized`] (401/403), [`FetchError::TooLarge`], [`FetchError::Blocked`],
    /// [`FetchError::InvalidModule`].
    pub async fn oci_download(
        &self,
        resolved: &OciResolved,
        budget: PullBudget,
    ) -> Result<StagedModule, FetchError> {
        let max = self.config.max_binary_size;
        if resolved.layer.size > layer_limit(resolved.format, max).bytes {
            return Err(FetchError::TooLarge { limit: max });
        }
        let url = format!(
            "{}/v2/{}/blobs/sha256:{}",
            resolved.base, resolved.repository, resolved.layer.digest
        );
        let url = url.as_str();
        let (mut raw, size) = with_retries(self, budget, |timeout| async move {
            self.blob_attempt(url, resolved, timeout).await
        })
        .await?;
        match resolved.format {
            ImageFormat::WasmArtifact => {
                // The blob is the module: its bytes were verified against the layer digest.
                let mut head = Vec::with_capacity(MIN_WASM_SIZE);
                raw.reader()
                    .and_then(|r| r.take(MIN_WASM_SIZE as u64).read_to_end(&mut head))
                    .map_err(FetchError::io)?;
                check_wasm(&head)?;
                Ok(StagedModule {
                    file: raw,
                    sha256: resolved.layer.digest.clone(),
                    size,
                })
            }
            ImageFormat::Docker | ImageFormat::OciCompat => {
                let mut out = self.store.stage().map_err(FetchError::io)?;
                let (sha256, size) = super::cpu_bound(|| {
                    let mut reader = raw.reader().map_err(FetchError::io)?;
                    extract_plugin_wasm(&mut reader, &mut out, max)
                })?;
                Ok(StagedModule {
                    file: out,
                    sha256,
                    size,
                })
            }
        }
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

    /// Pings `/v2/` anonymously and answers its challenge: nothing (anonymous), Basic with the
    /// credentials, or a bearer token from the challenge's realm.
    async fn oci_authenticate(
        &self,
        base: &str,
        repository: &str,
        creds: Option<&Credentials>,
        budget: PullBudget,
    ) -> Result<Auth, FetchError> {
        let kind: ErrorKind = FetchError::Manifest;
        let ping = format!("{base}/v2/");
        let ping = ping.as_str();
        let challenges = with_retries(self, budget, |timeout| async move {
            if timeout.is_zero() {
                return Err(deadline_exceeded(ping, kind));
            }
            let (resp, _) = self
                .send_following_redirects(HttpRequest::get(ping), timeout, self.now(), kind)
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
        validate_realm(realm, self.config.allow_private_token_realm).map_err(|why| {
            FetchError::Unauthorized(format!("token realm {realm:?} refused: {why}"))
        })?;
        let mut url = realm.to_string();
        let mut sep = if url.contains('?') { '&' } else { '?' };
        if let Some(service) = challenge.param("service") {
            url.push_str(&format!("{sep}service={}", query_escape(service)));
            sep = '&';
        }
        url.push_str(&format!(
            "{sep}scope={}",
            query_escape(&format!("repository:{repository}:pull"))
        ));
        let url = url.as_str();
        let token = with_retries(self, budget, |timeout| async move {
            if timeout.is_zero() {
                return Err(deadline_exceeded(realm, kind));
            }
            let mut req = HttpRequest::get(url);
            if let Some(c) = creds {
                req = req.header("authorization", c.basic_header());
            }
            let (mut resp, final_url) = self
                .send_following_redirects(req, timeout, self.now(), kind)
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

    /// One manifest (by tag or digest), verified: its sha256 must match `Docker-Content-Digest`
    /// and, when fetched by digest, that digest; a mismatch is retried like a transfer error.
    async fn fetch_manifest(
        &self,
        base: &str,
        repository: &str,
        reference: &str,
        expected: Option<&str>,
        auth: &Auth,
        budget: PullBudget,
    ) -> Result<FetchedManifest, FetchError> {
        let kind: ErrorKind = FetchError::Manifest;
        let url = format!("{base}/v2/{repository}/manifests/{reference}");
        let url = url.as_str();
        with_retries(self, budget, |timeout| async move {
            if timeout.is_zero() {
                return Err(deadline_exceeded(url, kind));
            }
            let req = auth.apply(HttpRequest::get(url).header("accept", MANIFEST_ACCEPT));
            let (mut resp, final_url) = self
                .send_following_redirects(req, timeout, self.now(), kind)
                .await?;
            registry_status(url, resp.status, auth.used_credentials, kind)?;
            let bytes =
                read_small_body(&final_url, resp.body.as_mut(), MAX_MANIFEST_SIZE, kind).await?;
            let digest = sha256_hex(&bytes);
            if let Some(header) = resp.header("docker-content-digest") {
                if let Some(hex) = header.trim().strip_prefix("sha256:") {
                    if hex != digest {
                        return Err(AttemptError::Retry(kind(format!(
                            "{url}: manifest bytes hash to sha256:{digest}, \
                             docker-content-digest says {header}"
                        ))));
                    }
                }
            }
            if let Some(want) = expected {
                if want != digest {
                    return Err(AttemptError::Retry(kind(format!(
                        "{url}: manifest bytes hash to sha256:{digest}, want sha256:{want}"
                    ))));
                }
            }
            Ok(FetchedManifest {
                content_type: resp.header("content-type").map(str::to_string),
                bytes,
                digest,
            })
        })
        .await
    }

    /// One blob request into a fresh staging file, hashed and checked against the descriptor.
    async fn blob_attempt(
        &self,
        url: &str,
        resolved: &OciResolved,
        timeout: Duration,
    ) -> Result<(Box<dyn StagedFile>, u64), AttemptError> {
        let kind: ErrorKind = FetchError::Download;
        if timeout.is_zero() {
            return Err(deadline_exceeded(url, kind));
        }
        let mut req = HttpRequest::get(url);
        if let Some(h) = &resolved.authorization {
            req = req.header("authorization", h.clone());
        }
        // Registries often redirect blobs to a storage host: the header is dropped there.
        let (mut resp, final_url) = self
            .send_following_redirects(req, timeout, self.now(), kind)
            .await?;
        registry_status(url, resp.status, resolved.used_credentials, kind)?;
        let limit = layer_limit(resolved.format, self.config.max_binary_size);
        check_content_length(&resp, limit)?;
        let mut file = self
            .store
            .stage()
            .map_err(|e| AttemptError::Fatal(FetchError::io(e)))?;
        let mut hasher = Sha256::new();
        let size = stream_body(
            &final_url,
            resp.body.as_mut(),
            &mut file,
            Some(&mut hasher),
            limit,
            kind,
        )
        .await?;
        let got = hex::encode(hasher.finalize());
        if got != resolved.layer.digest {
            return Err(AttemptError::Retry(kind(format!(
                "{url}: blob bytes hash to sha256:{got}, descriptor says sha256:{}",
                resolved.layer.digest
            ))));
        }
        Ok((file, size))
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

// ---------------------------------------------------------------------------------------------
// Manifests

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<RawDescriptor>>,
    #[serde(default)]
    layers: Option<Vec<RawDescriptor>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDescriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
}

struct ParsedManifest {
    media_type: String,
    is_index: bool,
    manifests: Vec<RawDescriptor>,
    layers: Vec<RawDescriptor>,
}

fn parse_manifest(m: &FetchedManifest, display: &str) -> Result<ParsedManifest, FetchError> {
    let raw: RawManifest = serde_json::from_slice(&m.bytes).map_err(|e| {
        FetchError::Manifest(format!(
            "{display}: manifest sha256:{} is not valid json: {e}",
            m.digest
        ))
    })?;
    // OCI manifests may omit `mediaType`; the response's Content-Type then names it.
    let media_type = raw
        .media_type
        .filter(|t| !t.is_empty())
        .or_else(|| {
            m.content_type
                .as_deref()
                .map(|t| t.split(';').next().unwrap_or_default().trim().to_string())
        })
        .unwrap_or_default();
    let is_index = match media_type.as_str() {
        OCI_INDEX | DOCKER_MANIFEST_LIST => true,
        OCI_MANIFEST | DOCKER_MANIFEST => false,
        _ => raw.manifests.is_some() && raw.layers.is_none(),
    };
    Ok(ParsedManifest {
        media_type,
        is_index,
        manifests: raw.manifests.unwrap_or_default(),
        layers: raw.layers.unwrap_or_default(),
    })
}

/// The `linux/amd64` entry of an image index, or its only entry when that has no platform.
fn pick_platform(index: &ParsedManifest, display: &str) -> Result<String, FetchError> {
    let entry = index
        .manifests
        .iter()
        .find(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
        })
        .or(match index.manifests.as_slice() {
            [only] if only.platform.is_none() => Some(only),
            _ => None,
        })
        .ok_or_else(|| {
            let platforms: Vec<String> = index
                .manifests
                .iter()
                .map(|d| match &d.platform {
                    Some(p) => format!("{}/{}", p.os, p.architecture),
                    None => "unspecified".into(),
                })
                .collect();
            FetchError::Manifest(format!(
                "{display}: image index has no linux/amd64 manifest (platforms: [{}])",
                platforms.join(", ")
            ))
        })?;
    sha256_of(&entry.digest, display)
}

fn sha256_of(digest: &str, display: &str) -> Result<String, FetchError> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| is_sha256_hex(h))
        .map(str::to_string)
        .ok_or_else(|| {
            FetchError::Manifest(format!(
                "{display}: unsupported digest {digest:?} (want sha256:<64 hex>)"
            ))
        })
}

fn descriptor(d: &RawDescriptor, display: &str) -> Result<Descriptor, FetchError> {
    Ok(Descriptor {
        media_type: d.media_type.clone(),
        digest: sha256_of(&d.digest, display)?,
        size: d.size,
    })
}

/// Chooses the layer that holds the module (behavior.md §4.2; Istio `extractDockerImage`,
/// `extractOCIStandardImage`, `extractOCIArtifactImage`).
fn choose_layer(
    m: &ParsedManifest,
    display: &str,
) -> Result<(ImageFormat, Descriptor), FetchError> {
    let err = |msg: String| FetchError::Manifest(format!("{display}: {msg}"));
    let types = || {
        m.layers
            .iter()
            .map(|l| l.media_type.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match m.media_type.as_str() {
        DOCKER_MANIFEST => {
            let last = m
                .layers
                .last()
                .ok_or_else(|| err("number of layers must be greater than zero".into()))?;
            if last.media_type != DOCKER_LAYER {
                return Err(err(format!(
                    "invalid media type {} (expect {DOCKER_LAYER})",
                    last.media_type
                )));
            }
            Ok((ImageFormat::Docker, descriptor(last, display)?))
        }
        OCI_MANIFEST | "" => {
            let is_content = |l: &&RawDescriptor| {
                matches!(
                    l.media_type.as_str(),
                    WASM_CONTENT_LAYER | WASM_CONTENT_LAYER_ALT
                )
            };
            if let Some(content) = m.layers.iter().find(is_content) {
                // The reference wants exactly content + config; a single content layer is
                // accepted too (improvement).
                if m.layers.len() > 2 {
                    return Err(err(format!(
                        "wasm artifact: number of layers must be 1 or 2 but got {} ({})",
                        m.layers.len(),
                        types()
                    )));
                }
                return Ok((ImageFormat::WasmArtifact, descriptor(content, display)?));
            }
            match m.layers.last() {
                Some(last) if last.media_type == OCI_LAYER_GZIP => {
                    Ok((ImageFormat::OciCompat, descriptor(last, display)?))
                }
                Some(last) => Err(err(format!(
                    "invalid format as an oci image: could not parse as compat variant: \
                     invalid media type {} (expect {OCI_LAYER_GZIP}); could not parse as oci \
                     variant: could not find the layer of type {WASM_CONTENT_LAYER} (layers: {})",
                    last.media_type,
                    types()
                ))),
                None => Err(err("number of layers must be greater than zero".into())),
            }
        }
        other => Err(err(format!(
            "unsupported manifest media type {other:?} (want {OCI_MANIFEST} or {DOCKER_MANIFEST})"
        ))),
    }
}

// ---------------------------------------------------------------------------------------------
// WWW-Authenticate

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
    let scheme = realm
        .split_once("://")
        .map(|(s, _)| s.to_ascii_lowercase())
        .ok_or("not an absolute url")?;
    if scheme != "http" && scheme != "https" {
        return Err(format!(
            "scheme {scheme:?} not allowed (want http or https)"
        ));
    }
    let host = url_host(realm)
        .filter(|h| !h.is_empty())
        .ok_or("missing host")?;
    let host = host.trim_end_matches('.');
    if host == "metadata.google.internal" {
        return Err("host is a cloud metadata service".into());
    }
    let private = if host == "localhost" || host.ends_with(".localhost") {
        true
    } else if let Ok(ip) = host.parse::<IpAddr>() {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        if crate::config::is_always_blocked(ip) || is_link_local(ip) {
            return Err(format!("{ip} is a link-local or metadata address"));
        }
        is_private(ip)
    } else {
        false
    };
    if private && !allow_private {
        return Err(format!("{host} is a local or private address"));
    }
    Ok(())
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

/// The transfer limit of a module layer: a Wasm artifact layer is the module; Docker and OCI
/// compat layers are tar.gz archives around it.
fn layer_limit(format: ImageFormat, max: u64) -> TransferLimit {
    match format {
        ImageFormat::WasmArtifact => TransferLimit::plain(max),
        ImageFormat::Docker | ImageFormat::OciCompat => TransferLimit::archive(max),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use serde_json::json;

    use super::*;
    use crate::fetch::http::fake::{config, harness, Harness, Reply};
    use crate::fetch::unpack::tests::{gzip, tar_of, wasm};
    use crate::fetch::TransportError;
    use crate::outcome::Reason;

    const BASE: &str = "https://reg.example";

    fn oci_ref(s: &str) -> OciRef {
        OciRef::parse(s).unwrap()
    }

    fn creds() -> Credentials {
        Credentials {
            username: "alice".into(),
            password: "s3cret".into(),
        }
    }

    fn desc(media_type: &str, bytes: &[u8]) -> serde_json::Value {
        json!({"mediaType": media_type, "digest": format!("sha256:{}", sha256_hex(bytes)), "size": bytes.len()})
    }

    fn manifest_url(repo: &str, reference: &str) -> String {
        format!("{BASE}/v2/{repo}/manifests/{reference}")
    }

    fn blob_url(repo: &str, bytes: &[u8]) -> String {
        format!("{BASE}/v2/{repo}/blobs/sha256:{}", sha256_hex(bytes))
    }

    /// Serves an anonymous registry ping.
    fn anonymous(h: &Harness) {
        h.transport
            .script(&format!("{BASE}/v2/"), vec![Reply::ok("{}")]);
    }

    fn manifest_reply(bytes: &[u8], media_type: &str) -> Reply {
        Reply::ok(bytes.to_vec())
            .header("content-type", media_type)
            .header(
                "docker-content-digest",
                &format!("sha256:{}", sha256_hex(bytes)),
            )
    }

    /// Publishes a manifest under `tag` and under its digest; returns the digest.
    fn put_manifest(h: &Harness, repo: &str, tag: &str, manifest: &serde_json::Value) -> String {
        let bytes = serde_json::to_vec(manifest).unwrap();
        let media_type = manifest["mediaType"].as_str().unwrap_or(OCI_MANIFEST);
        let digest = sha256_hex(&bytes);
        for reference in [tag.to_string(), format!("sha256:{digest}")] {
            h.transport.script(
                &manifest_url(repo, &reference),
                vec![manifest_reply(&bytes, media_type)],
            );
        }
        digest
    }

    fn put_blob(h: &Harness, repo: &str, bytes: &[u8]) {
        h.transport
            .script(&blob_url(repo, bytes), vec![Reply::ok(bytes.to_vec())]);
    }

    fn image(media_type: &str, layers: &[(&str, &[u8])]) -> serde_json::Value {
        let config = b"{\"architecture\":\"amd64\"}";
        json!({
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": desc("application/vnd.oci.image.config.v1+json", config),
            "layers": layers.iter().map(|(t, b)| desc(t, b)).collect::<Vec<_>>(),
        })
    }

    async fn pull(
        h: &Harness,
        r: &str,
        c: Option<&Credentials>,
    ) -> Result<(OciResolved, StagedModule), FetchError> {
        let budget = h.fetcher.budget();
        let resolved = h.fetcher.oci_resolve(&oci_ref(r), c, budget).await?;
        let module = h.fetcher.oci_download(&resolved, budget).await?;
        Ok((resolved, module))
    }

    fn contents(m: &mut StagedModule) -> Vec<u8> {
        let mut v = Vec::new();
        m.file.reader().unwrap().read_to_end(&mut v).unwrap();
        v
    }

    #[tokio::test]
    async fn docker_image_takes_plugin_wasm_from_the_last_layer() {
        let h = harness(config());
        anonymous(&h);
        let module = wasm(2000);
        let previous = gzip(&tar_of(&[("etc/motd", b"hello")]));
        let last = gzip(&tar_of(&[("plugin.wasm", &module)]));
        let m = image(
            DOCKER_MANIFEST,
            &[(DOCKER_LAYER, &previous), (DOCKER_LAYER, &last)],
        );
        let digest = put_manifest(&h, "test/docker", "v1", &m);
        put_blob(&h, "test/docker", &last);
        let (resolved, mut staged) = pull(&h, "reg.example/test/docker:v1", None).await.unwrap();
        assert_eq!(resolved.digest, digest);
        assert_eq!(resolved.format, ImageFormat::Docker);
        assert!(!resolved.used_credentials);
        assert_eq!(staged.sha256, sha256_hex(&module));
        assert_eq!(contents(&mut staged), module);
        // One manifest and one blob request; neither the config nor the first layer.
        assert_eq!(h.transport.count(&manifest_url("test/docker", "v1")), 1);
        assert_eq!(h.transport.count(&blob_url("test/docker", &last)), 1);
        assert_eq!(h.transport.requests().len(), 3); // + the ping
        let accept = h.transport.requests()[1]
            .headers
            .iter()
            .find(|(k, _)| k == "accept")
            .map(|(_, v)| v.clone())
            .unwrap();
        assert!(accept.contains(OCI_INDEX) && accept.contains(DOCKER_MANIFEST));
    }

    #[tokio::test]
    async fn oci_compat_image() {
        let h = harness(config());
        anonymous(&h);
        let module = wasm(700);
        let layer = gzip(&tar_of(&[("./plugin.wasm", &module)]));
        let digest = put_manifest(
            &h,
            "test/compat",
            "latest",
            &image(
                OCI_MANIFEST,
                &[(DOCKER_LAYER, b"x"), (OCI_LAYER_GZIP, &layer)],
            ),
        );
        put_blob(&h, "test/compat", &layer);
        let (resolved, staged) = pull(&h, "reg.example/test/compat", None).await.unwrap();
        assert_eq!(
            (resolved.digest.as_str(), resolved.format),
            (digest.as_str(), ImageFormat::OciCompat)
        );
        assert_eq!(staged.sha256, sha256_hex(&module));
    }

    #[tokio::test]
    async fn wasm_artifacts_with_one_or_two_layers() {
        let module = wasm(1234);
        let config_blob = b"{}".to_vec();
        for layers in [
            vec![
                (WASM_CONTENT_LAYER, module.as_slice()),
                (WASM_CONFIG_LAYER, &config_blob[..]),
            ],
            vec![
                (WASM_CONFIG_LAYER, &config_blob[..]),
                (WASM_CONTENT_LAYER, module.as_slice()),
            ],
            vec![(WASM_CONTENT_LAYER, module.as_slice())],
            vec![(WASM_CONTENT_LAYER_ALT, module.as_slice())],
        ] {
            let h = harness(config());
            anonymous(&h);
            // No mediaType in the JSON: the Content-Type names it.
            let mut m = image(OCI_MANIFEST, &layers);
            m.as_object_mut().unwrap().remove("mediaType");
            put_manifest(&h, "test/art", "v1", &m);
            put_blob(&h, "test/art", &module);
            let (resolved, mut staged) = pull(&h, "reg.example/test/art:v1", None).await.unwrap();
            assert_eq!(resolved.format, ImageFormat::WasmArtifact);
            assert_eq!(staged.sha256, sha256_hex(&module));
            assert_eq!(staged.size, module.len() as u64);
            assert_eq!(contents(&mut staged), module);
            assert_eq!(h.transport.requests().len(), 3);
        }
    }

    #[tokio::test]
    async fn unusable_manifests_are_manifest_failures() {
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (
                image(OCI_MANIFEST, &[("application/vnd.oci.image.layer.v1.tar", b"a")]),
                "invalid media type application/vnd.oci.image.layer.v1.tar",
            ),
            (image(DOCKER_MANIFEST, &[]), "number of layers must be greater than zero"),
            (image(OCI_MANIFEST, &[]), "number of layers must be greater than zero"),
            (
                image(
                    DOCKER_MANIFEST,
                    &[("application/vnd.docker.plugin.v1+json", b"a")],
                ),
                "invalid media type application/vnd.docker.plugin.v1+json",
            ),
            (
                image(OCI_MANIFEST, &[("aaa", b"a"), ("aaa", b"b")]),
                "could not find the layer of type application/vnd.module.wasm.content.layer.v1+wasm",
            ),
            (
                image(
                    OCI_MANIFEST,
                    &[(WASM_CONTENT_LAYER, b"a"), (WASM_CONFIG_LAYER, b"b"), ("c", b"c")],
                ),
                "number of layers must be 1 or 2",
            ),
            (
                json!({"mediaType": "application/vnd.docker.distribution.manifest.v1+prettyjws"}),
                "unsupported manifest media type",
            ),
        ];
        for (m, want) in cases {
            let h = harness(config());
            anonymous(&h);
            put_manifest(&h, "test/bad", "v1", &m);
            let err = h
                .fetcher
                .oci_resolve(
                    &oci_ref("reg.example/test/bad:v1"),
                    None,
                    h.fetcher.budget(),
                )
                .await
                .unwrap_err();
            assert!(
                matches!(&err, FetchError::Manifest(msg) if msg.contains(want) && msg.contains("reg.example/test/bad:v1")),
                "{want}: {err}"
            );
            // No blob was requested.
            assert_eq!(h.transport.requests().len(), 2);
        }
    }

    #[tokio::test]
    async fn layer_without_wasm_inside_is_invalid_module() {
        let h = harness(config());
        anonymous(&h);
        let layer = gzip(&tar_of(&[("plugin.wasm", b"this is wasm binary")]));
        put_manifest(
            &h,
            "t",
            "v1",
            &image(DOCKER_MANIFEST, &[(DOCKER_LAYER, &layer)]),
        );
        put_blob(&h, "t", &layer);
        let err = pull(&h, "reg.example/t:v1", None).await.unwrap_err();
        assert_eq!(err.reason(), Reason::InvalidModule);

        let h = harness(config());
        anonymous(&h);
        let layer = gzip(&tar_of(&[("non-wasm.txt", b"a")]));
        put_manifest(
            &h,
            "t",
            "v1",
            &image(OCI_MANIFEST, &[(OCI_LAYER_GZIP, &layer)]),
        );
        put_blob(&h, "t", &layer);
        let err = pull(&h, "reg.example/t:v1", None).await.unwrap_err();
        assert!(matches!(&err, FetchError::InvalidModule(m) if m.contains("no plugin.wasm")));

        let h = harness(config());
        anonymous(&h);
        let not_wasm = b"random bytes, not wasm".to_vec();
        put_manifest(
            &h,
            "t",
            "v1",
            &image(OCI_MANIFEST, &[(WASM_CONTENT_LAYER, &not_wasm)]),
        );
        put_blob(&h, "t", &not_wasm);
        let err = pull(&h, "reg.example/t:v1", None).await.unwrap_err();
        assert_eq!(err.reason(), Reason::InvalidModule);
    }

    #[tokio::test]
    async fn image_index_resolves_its_linux_amd64_child() {
        let h = harness(config());
        anonymous(&h);
        let module = wasm(99);
        let m = image(OCI_MANIFEST, &[(WASM_CONTENT_LAYER, &module)]);
        let child_bytes = serde_json::to_vec(&m).unwrap();
        let child = put_manifest(&h, "multi", "child", &m);
        let other = image(OCI_MANIFEST, &[(WASM_CONTENT_LAYER, b"arm")]);
        let other_bytes = serde_json::to_vec(&other).unwrap();
        let index = json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": format!("sha256:{}", sha256_hex(&other_bytes)), "size": other_bytes.len(), "platform": {"os": "linux", "architecture": "arm64"}},
                {"mediaType": OCI_MANIFEST, "digest": format!("sha256:{child}"), "size": child_bytes.len(), "platform": {"os": "linux", "architecture": "amd64"}},
            ],
        });
        let index_digest = put_manifest(&h, "multi", "v1", &index);
        put_blob(&h, "multi", &module);
        let (resolved, staged) = pull(&h, "reg.example/multi:v1", None).await.unwrap();
        assert_eq!(resolved.digest, child);
        assert_eq!(
            resolved.index_digest.as_deref(),
            Some(index_digest.as_str())
        );
        assert_eq!(staged.sha256, sha256_hex(&module));
        assert_eq!(h.transport.count(&manifest_url("multi", "v1")), 1);
        assert_eq!(
            h.transport
                .count(&manifest_url("multi", &format!("sha256:{child}"))),
            1
        );

        // Without a linux/amd64 entry.
        let h = harness(config());
        anonymous(&h);
        let index = json!({"mediaType": DOCKER_MANIFEST_LIST, "manifests": [
            {"mediaType": DOCKER_MANIFEST, "digest": format!("sha256:{child}"), "size": 1, "platform": {"os": "windows", "architecture": "amd64"}}]});
        put_manifest(&h, "multi", "v1", &index);
        let err = h
            .fetcher
            .oci_resolve(&oci_ref("reg.example/multi:v1"), None, h.fetcher.budget())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("windows/amd64"), "{err}");
    }

    #[tokio::test]
    async fn manifest_statuses() {
        // 404: not retried.
        let h = harness(config());
        anonymous(&h);
        let err = h
            .fetcher
            .oci_resolve(&oci_ref("reg.example/nope:v1"), None, h.fetcher.budget())
            .await
            .unwrap_err();
        assert_eq!(err.reason(), Reason::ManifestFailure);
        assert!(err.to_string().contains("404"), "{err}");
        assert_eq!(h.transport.count(&manifest_url("nope", "v1")), 1);

        // 401 and 403: unauthorized, not retried.
        for status in [401, 403] {
            let h = harness(config());
            anonymous(&h);
            h.transport
                .script(&manifest_url("p", "v1"), vec![Reply::status(status)]);
            let err = h
                .fetcher
                .oci_resolve(&oci_ref("reg.example/p:v1"), None, h.fetcher.budget())
                .await
                .unwrap_err();
            assert_eq!(err.reason(), Reason::Unauthorized, "{status}");
            assert_eq!(h.transport.count(&manifest_url("p", "v1")), 1);
        }

        // 503 then a connection reset, then the manifest: three requests.
        let h = harness(config());
        anonymous(&h);
        let m = image(OCI_MANIFEST, &[(WASM_CONTENT_LAYER, b"x")]);
        let bytes = serde_json::to_vec(&m).unwrap();
        h.transport.script(
            &manifest_url("r", "v1"),
            vec![
                Reply::status(503),
                Reply::Error(TransportError::Reset("eof".into())),
                manifest_reply(&bytes, OCI_MANIFEST),
            ],
        );
        h.fetcher
            .oci_resolve(&oci_ref("reg.example/r:v1"), None, h.fetcher.budget())
            .await
            .unwrap();
        assert_eq!(h.transport.count(&manifest_url("r", "v1")), 3);

        // Always 503: five attempts, then a manifest failure.
        let h = harness(config());
        anonymous(&h);
        h.transport
            .script(&manifest_url("r", "v1"), vec![Reply::status(503)]);
        let err = h
            .fetcher
            .oci_resolve(&oci_ref("reg.example/r:v1"), None, h.fetcher.budget())
            .await
            .unwrap_err();
        assert_eq!(err.reason(), Reason::ManifestFailure);
        assert_eq!(h.transport.count(&manifest_url("r", "v1")), 5);
    }

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
    async fn manifest_digest_mismatch_is_retried() {
        let h = harness(config());
        anonymous(&h);
        let m = image(OCI_MANIFEST, &[(WASM_CONTENT_LAYER, b"x")]);
        let bytes = serde_json::to_vec(&m).unwrap();
        let digest = sha256_hex(&bytes);
        // By tag: the first answer disagrees with its Docker-Content-Digest.
        h.transport.script(
            &manifest_url("r", "v1"),
            vec![
                Reply::ok(bytes.clone()).header(
                    "docker-content-digest",
                    &format!("sha256:{}", "0".repeat(64)),
                ),
                manifest_reply(&bytes, OCI_MANIFEST),
            ],
        );
        let resolved = h
            .fetcher
            .oci_resolve(&oci_ref("reg.example/r:v1"), None, h.fetcher.budget())
            .await
            .unwrap();
        assert_eq!(resolved.digest, digest);
        assert_eq!(h.transport.count(&manifest_url("r", "v1")), 2);

        // By digest: bytes that do not hash to it, every time.
        let h = harness(config());
        anonymous(&h);
        let wrong = "1".repeat(64);
        h.transport.script(
            &manifest_url("r", &format!("sha256:{wrong}")),
            vec![Reply::ok(bytes.clone())],
        );
        let err = h
            .fetcher
            .oci_resolve(
                &oci_ref(&format!("reg.example/r@sha256:{wrong}")),
                None,
                h.fetcher.budget(),
            )
            .await
            .unwrap_err();
        assert_eq!(err.reason(), Reason::ManifestFailure);
        assert_eq!(
            h.transport
                .count(&manifest_url("r", &format!("sha256:{wrong}"))),
            5
        );
    }

    #[tokio::test]
    async fn blob_digest_mismatch_is_retried() {
        let h = harness(config());
        anonymous(&h);
        let module = wasm(50);
        put_manifest(
            &h,
            "r",
            "v1",
            &image(OCI_MANIFEST, &[(WASM_CONTENT_LAYER, &module)]),
        );
        let mut corrupted = module.clone();
        corrupted[20] ^= 1;
        h.transport.script(
            &blob_url("r", &module),
            vec![Reply::ok(corrupted.clone()), Reply::ok(module.clone())],
        );
        let (_, staged) = pull(&h, "reg.example/r:v1", None).await.unwrap();
        assert_eq!(staged.sha256, sha256_hex(&module));
        assert_eq!(h.transport.count(&blob_url("r", &module)), 2);

        let h = harness(config());
        anonymous(&h);
        put_manifest(
            &h,
            "r",
            "v1",
            &image(OCI_MANIFEST, &[(WASM_CONTENT_LAYER, &module)]),
        );
        h.transport
            .script(&blob_url("r", &module), vec![Reply::ok(corrupted)]);
        let err = pull(&h, "reg.example/r:v1", None).await.unwrap_err();
        assert_eq!(err.reason(), Reason::DownloadFailure);
        assert!(err.to_string().contains("descriptor"), "{err}");
        assert_eq!(h.transport.count(&blob_url("r", &module)), 5);
    }

    #[tokio::test]
    async fn too_large_layers_are_refused() {
        let mut cfg = config();
        cfg.max_binary_size = 1000;
        let module = wasm(5000);
        // Announced by the descriptor: no blob request at all.
        let h = harness(cfg.clone());
        anonymous(&h);
        put_manifest(
            &h,
            "r",
            "v1",
            &image(OCI_MANIFEST, &[(WASM_CONTENT_LAYER, &module)]),
        );
        put_blob(&h, "r", &module);
        assert_eq!(
            pull(&h, "reg.example/r:v1", None).await.unwrap_err(),
            FetchError::TooLarge { limit: 1000 }
        );
        assert_eq!(h.transport.count(&blob_url("r", &module)), 0);
        // A descriptor that lies about the size: stopped while streaming, not retried.
        let h = harness(cfg);
        anonymous(&h);
        let mut m = image(OCI_MANIFEST, &[(WASM_CONTENT_LAYER, &module)]);
        m["layers"][0]["size"] = json!(10);
        put_manifest(&h, "r", "v1", &m);
        put_blob(&h, "r", &module);
        assert_eq!(
            pull(&h, "reg.example/r:v1", None).await.unwrap_err(),
            FetchError::TooLarge { limit: 1000 }
        );
        assert_eq!(h.transport.count(&blob_url("r", &module)), 1);
    }

    fn auth_of(req: &HttpRequest) -> Option<String> {
        req.headers
            .iter()
            .find(|(k, _)| k == "authorization")
            .map(|(_, v)| v.clone())
    }

    /// A registry that wants `want` as the Authorization of manifest and blob requests.
    fn protected(h: &Harness, challenge: &str, want: String, module: &[u8]) {
        h.transport.script(
            &format!("{BASE}/v2/"),
            vec![Reply::status(401).header("www-authenticate", challenge)],
        );
        let m = image(OCI_MANIFEST, &[(WASM_CONTENT_LAYER, module)]);
        let bytes = serde_json::to_vec(&m).unwrap();
        let want2 = want.clone();
        h.transport
            .route(&manifest_url("private", "v1"), move |req, _| {
                if auth_of(req).as_deref() == Some(want.as_str()) {
                    manifest_reply(&bytes, OCI_MANIFEST)
                } else {
                    Reply::status(401).header("www-authenticate", "Basic realm=\"x\"")
                }
            });
        let module = module.to_vec();
        h.transport
            .route(&blob_url("private", &module), move |req, _| {
                if auth_of(req).as_deref() == Some(want2.as_str()) {
                    Reply::ok(module.clone())
                } else {
                    Reply::status(401)
                }
            });
    }

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

    #[tokio::test]
    async fn blob_redirect_to_another_host_drops_authorization() {
        let h = harness(config());
        let module = wasm(10);
        protected(&h, "Basic realm=\"r\"", creds().basic_header(), &module);
        let storage = "https://storage.example/blobs/abc";
        h.transport.script(
            &blob_url("private", &module),
            vec![Reply::redirect(307, storage)],
        );
        h.transport.script(storage, vec![Reply::ok(module.clone())]);
        pull(&h, "reg.example/private:v1", Some(&creds()))
            .await
            .unwrap();
        let reqs = h.transport.requests();
        let hop = reqs.iter().find(|r| r.url == storage).unwrap();
        assert_eq!(auth_of(hop), None);
        let first = reqs
            .iter()
            .find(|r| r.url == blob_url("private", &module))
            .unwrap();
        assert_eq!(auth_of(first), Some(creds().basic_header()));
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
    fn oci_futures_are_send() {
        // `serve` spawns pulls on the multi-threaded runtime.
        fn send<T: Send>(_: T) {}
        let h = harness(config());
        let r = oci_ref("reg.example/r:v1");
        let c = creds();
        send(h.fetcher.oci_resolve(&r, Some(&c), h.fetcher.budget()));
        let resolved = OciResolved {
            digest: "0".repeat(64),
            index_digest: None,
            format: ImageFormat::WasmArtifact,
            layer: Descriptor {
                media_type: WASM_CONTENT_LAYER.into(),
                digest: "0".repeat(64),
                size: 1,
            },
            used_credentials: false,
            base: BASE.into(),
            repository: "r".into(),
            authorization: None,
            display: "reg.example/r:v1".into(),
        };
        send(h.fetcher.oci_download(&resolved, h.fetcher.budget()));
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
