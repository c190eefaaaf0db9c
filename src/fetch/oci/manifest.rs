//! Manifests (behavior.md §4.2): fetching one by tag or digest and verifying its bytes against
//! `Docker-Content-Digest` and the requested digest, following an image index to its
//! `linux/amd64` child, and choosing the layer that holds the module per image format (Docker, OCI
//! compat, Wasm artifact). A manifest is parsed once: the same bytes fetched again (a
//! revalidation finding the tag where it was) reuse what their first parse gave
//! ([`ParsedManifests`]).
//!
//! Length: a little over 600 lines, most of them tests of what a manifest may be; kept whole, as
//! the fetch, the parse and the layer choice read the same manifest types.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use serde::Deserialize;

use super::auth::Auth;
use super::digests::MANIFEST_DIGESTS;
use super::{deadline_exceeded, registry_status, Descriptor, ImageFormat};
use super::{DOCKER_LAYER, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, MANIFEST_ACCEPT};
use super::{MAX_MANIFEST_SIZE, OCI_INDEX, OCI_LAYER_GZIP, OCI_MANIFEST};
use super::{WASM_CONTENT_LAYER, WASM_CONTENT_LAYER_ALT};
use crate::fetch::request::{read_small_body, ErrorKind};
use crate::fetch::retry::{with_retries, AttemptError, PullBudget};
use crate::fetch::{FetchError, Fetcher, HttpRequest};
use crate::url::is_sha256_hex;

/// A fetched manifest: its bytes, hex digest and `Content-Type`.
pub(super) struct FetchedManifest {
    bytes: Vec<u8>,
    pub(super) digest: String,
    content_type: Option<String>,
}

impl Fetcher {
    /// One manifest (by tag or digest), verified: its sha256 must match `Docker-Content-Digest`
    /// and, when fetched by digest, that digest; a mismatch is retried like a transfer error.
    pub(super) async fn fetch_manifest(
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
        with_retries(self, budget, |timeout, started| async move {
            if timeout.is_zero() {
                return Err(deadline_exceeded(url, kind));
            }
            let req = auth.apply(HttpRequest::get(url).header("accept", MANIFEST_ACCEPT));
            let (mut resp, final_url) = self
                .send_following_redirects(req, timeout, started, kind)
                .await?;
            registry_status(url, resp.status, auth.used_credentials, kind)?;
            let bytes =
                read_small_body(&final_url, resp.body.as_mut(), MAX_MANIFEST_SIZE, kind).await?;
            let digest = MANIFEST_DIGESTS.sha256(url, &bytes);
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
}

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

pub(super) struct ParsedManifest {
    media_type: String,
    pub(super) is_index: bool,
    manifests: Vec<RawDescriptor>,
    layers: Vec<RawDescriptor>,
}

/// Manifests parsed, by digest. The digest names the bytes, so an entry stays true for good; the
/// `Content-Type` is kept with it because it names the media type of a manifest whose JSON does
/// not. Bounded: only manifests of at most [`MAX_REMEMBERED_MANIFEST`] bytes are kept, at most
/// [`MAX_REMEMBERED_MANIFESTS`] of them (it starts afresh when full), so a few MiB at most.
#[derive(Default)]
pub(super) struct ParsedManifests {
    known: Mutex<HashMap<String, Remembered>>,
    /// Manifests parsed (not found here), for the tests.
    #[cfg(test)]
    parses: std::sync::atomic::AtomicUsize,
}

/// A manifest parsed, and the `Content-Type` it came with.
type Remembered = (Option<String>, Arc<ParsedManifest>);

/// Image manifests are 1-2 KiB; an index of many platforms is larger and is parsed every time.
const MAX_REMEMBERED_MANIFEST: usize = 16 << 10;
const MAX_REMEMBERED_MANIFESTS: usize = 256;

/// The manifests every fetcher of the process parsed (the entries are true for any of them).
pub(super) static PARSED_MANIFESTS: LazyLock<ParsedManifests> =
    LazyLock::new(ParsedManifests::default);

impl ParsedManifests {
    /// [`parse_manifest`] of `m`, or what it gave for the same bytes and `Content-Type` before.
    pub(super) fn parse(
        &self,
        m: &FetchedManifest,
        display: &str,
    ) -> Result<Arc<ParsedManifest>, FetchError> {
        let lock = || self.known.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((content_type, parsed)) = lock().get(&m.digest) {
            if *content_type == m.content_type {
                return Ok(parsed.clone());
            }
        }
        #[cfg(test)]
        self.parses
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let parsed = Arc::new(parse_manifest(m, display)?);
        if m.bytes.len() <= MAX_REMEMBERED_MANIFEST {
            let mut known = lock();
            if known.len() >= MAX_REMEMBERED_MANIFESTS {
                known.clear();
            }
            known.insert(m.digest.clone(), (m.content_type.clone(), parsed.clone()));
        }
        Ok(parsed)
    }
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
pub(super) fn pick_platform(index: &ParsedManifest, display: &str) -> Result<String, FetchError> {
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
pub(super) fn choose_layer(
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::fixtures::*;
    use super::super::WASM_CONFIG_LAYER;
    use super::*;
    use crate::fetch::fake::{config, harness, Reply};
    use crate::fetch::unpack::tests::wasm;
    use crate::fetch::TransportError;
    use crate::outcome::Reason;
    use crate::store::sha256_hex;

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

    fn fetched(bytes: Vec<u8>, content_type: Option<&str>) -> FetchedManifest {
        FetchedManifest {
            digest: sha256_hex(&bytes),
            bytes,
            content_type: content_type.map(str::to_string),
        }
    }

    fn parses(p: &ParsedManifests) -> usize {
        p.parses.load(std::sync::atomic::Ordering::Relaxed)
    }

    #[test]
    fn the_same_manifest_is_parsed_once() {
        let p = ParsedManifests::default();
        let mut m = image(OCI_MANIFEST, &[(WASM_CONTENT_LAYER, b"module")]);
        let with_type = serde_json::to_vec(&m).unwrap();
        let first = p.parse(&fetched(with_type.clone(), None), "r").unwrap();
        let again = p.parse(&fetched(with_type, None), "r").unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(parses(&p), 1);
        assert_eq!(
            choose_layer(&again, "r").unwrap().0,
            ImageFormat::WasmArtifact
        );

        // Without `mediaType` the Content-Type names it: another Content-Type is parsed again.
        m.as_object_mut().unwrap().remove("mediaType");
        let untyped = serde_json::to_vec(&m).unwrap();
        let oci = p
            .parse(&fetched(untyped.clone(), Some(OCI_MANIFEST)), "r")
            .unwrap();
        assert_eq!(oci.media_type, OCI_MANIFEST);
        let docker = p
            .parse(&fetched(untyped, Some(DOCKER_MANIFEST)), "r")
            .unwrap();
        assert_eq!(docker.media_type, DOCKER_MANIFEST);
        assert_eq!(parses(&p), 3);

        // Not JSON: an error every time, nothing kept.
        for _ in 0..2 {
            let Err(err) = p.parse(&fetched(b"{".to_vec(), None), "r") else {
                panic!("not JSON, parsed");
            };
            assert!(err.to_string().contains("not valid json"), "{err}");
        }
        assert_eq!(parses(&p), 5);
    }

    #[test]
    fn parsed_manifests_are_bounded() {
        let p = ParsedManifests::default();
        // A large manifest (an index of many platforms) is parsed every time.
        let large: Vec<_> = (0..400)
            .map(|i| json!({"mediaType": OCI_MANIFEST, "digest": format!("sha256:{i:064}"), "size": 1}))
            .collect();
        let large =
            serde_json::to_vec(&json!({"mediaType": OCI_INDEX, "manifests": large})).unwrap();
        assert!(large.len() > MAX_REMEMBERED_MANIFEST);
        for _ in 0..2 {
            assert!(
                p.parse(&fetched(large.clone(), None), "r")
                    .unwrap()
                    .is_index
            );
        }
        assert_eq!(parses(&p), 2);
        // Never more than the limit of small ones.
        for i in 0..MAX_REMEMBERED_MANIFESTS + 10 {
            let m = image(
                OCI_MANIFEST,
                &[(WASM_CONTENT_LAYER, format!("m{i}").as_bytes())],
            );
            p.parse(&fetched(serde_json::to_vec(&m).unwrap(), None), "r")
                .unwrap();
            assert!(p.known.lock().unwrap().len() <= MAX_REMEMBERED_MANIFESTS);
        }
    }
}
