//! Validates the real-registry test infrastructure (`tests/support`): a real `docker-registry`
//! (plain HTTP, Basic auth, TLS) accepts every Wasm image format pushed by the helper, and the
//! manifests and blobs come back intact through plain GETs made with [`HyperTransport`].
//!
//! Skips with a loud message when `docker-registry` is missing (fails under `CI=true`); see
//! `scripts/install-test-deps.sh`.

mod support;

use std::io::Read;
use std::time::Duration;

use wasm_ecds::config::Config;
use wasm_ecds::fetch::hyper_transport::HyperTransport;
use wasm_ecds::fetch::{Headers, HttpRequest, Transport, TransportError};

use support::image::{
    sha256_digest, DOCKER_LAYER, DOCKER_MANIFEST, OCI_INDEX, OCI_LAYER, OCI_MANIFEST,
};
use support::{wasm_module, ImageFormat, Pushed, Registry, RegistryOptions};

const TIMEOUT: Duration = Duration::from_secs(30);
const ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// A GET through the server's transport, body read chunk by chunk.
async fn get(
    t: &HyperTransport,
    url: &str,
    authorization: Option<&str>,
) -> Result<(u16, Headers, Vec<u8>), TransportError> {
    let mut req = HttpRequest::get(url).header("accept", ACCEPT_ALL);
    if let Some(auth) = authorization {
        req = req.header("authorization", auth.to_string());
    }
    let mut resp = t.get(&req, TIMEOUT).await?;
    let mut body = Vec::new();
    while let Some(chunk) = resp.body.next_chunk().await? {
        body.extend_from_slice(&chunk);
    }
    Ok((resp.status, resp.headers, body))
}

fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_ref())
}

/// The `plugin.wasm` entry of a tar.gz layer.
fn plugin_wasm_in(layer: &[u8]) -> Option<Vec<u8>> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(layer));
    for entry in archive.entries().expect("tar entries") {
        let mut entry = entry.expect("tar entry");
        let is_plugin = entry
            .path()
            .expect("entry path")
            .file_name()
            .is_some_and(|n| n == "plugin.wasm");
        if is_plugin {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).expect("entry bytes");
            return Some(bytes);
        }
    }
    None
}

/// Pushes every format and reads everything back.
async fn push_and_read_back_every_format(registry: &Registry, authorization: Option<&str>) {
    let transport = registry.transport();
    let base = registry.base_url();
    for format in ImageFormat::ALL {
        let wasm = wasm_module(&format!("smoke {}", format.name()));
        let repo = format!("smoke/{}", format.name());
        let pushed: Pushed = registry.push(&repo, "v1", format, &wasm).await;
        assert_eq!(pushed.digest.len(), "sha256:".len() + 64, "{pushed:?}");

        // The tag resolves to the pushed manifest, with its media type.
        let (status, headers, manifest) = get(
            &transport,
            &format!("{base}/v2/{repo}/manifests/v1"),
            authorization,
        )
        .await
        .expect("manifest");
        assert_eq!(
            status,
            200,
            "{format:?}: {}",
            String::from_utf8_lossy(&manifest)
        );
        assert_eq!(
            header(&headers, "docker-content-digest"),
            Some(pushed.digest.as_str())
        );
        assert_eq!(header(&headers, "content-type"), Some(pushed.media_type));
        assert_eq!(sha256_digest(&manifest), pushed.digest);
        let manifest: serde_json::Value = serde_json::from_slice(&manifest).expect("json");
        assert_eq!(manifest["mediaType"], pushed.media_type);

        // An index points at its linux/amd64 child, which is fetchable by digest.
        let image = if format == ImageFormat::Index {
            assert_eq!(pushed.media_type, OCI_INDEX);
            let amd64 = manifest["manifests"]
                .as_array()
                .expect("manifests")
                .iter()
                .find(|m| m["platform"]["architecture"] == "amd64")
                .expect("linux/amd64 entry");
            assert_eq!(amd64["digest"], pushed.image_digest.as_str());
            let (status, _, child) = get(
                &transport,
                &format!("{base}/v2/{repo}/manifests/{}", pushed.image_digest),
                authorization,
            )
            .await
            .expect("child manifest");
            assert_eq!(status, 200);
            assert_eq!(sha256_digest(&child), pushed.image_digest);
            serde_json::from_slice::<serde_json::Value>(&child).expect("json")
        } else {
            assert_eq!(pushed.image_digest, pushed.digest);
            manifest
        };

        // Every blob is there and intact; the module layer holds the module.
        for digest in &pushed.blobs {
            let (status, _, blob) = get(
                &transport,
                &format!("{base}/v2/{repo}/blobs/{digest}"),
                authorization,
            )
            .await
            .expect("blob");
            assert_eq!(status, 200, "{format:?} blob {digest}");
            assert_eq!(&sha256_digest(&blob), digest);
            if *digest != pushed.module_layer {
                continue;
            }
            let layers = image["layers"].as_array().expect("layers");
            let layer = layers
                .iter()
                .find(|l| l["digest"] == digest.as_str())
                .expect("module layer in manifest");
            let media_type = layer["mediaType"].as_str().expect("media type");
            match media_type {
                DOCKER_LAYER | OCI_LAYER => {
                    assert_eq!(
                        layers.last(),
                        Some(layer),
                        "{format:?}: module in last layer"
                    );
                    assert_eq!(plugin_wasm_in(&blob).as_deref(), Some(&wasm[..]));
                }
                _ => assert_eq!(blob, wasm, "{format:?}: raw module layer"),
            }
        }
        let expected_type = match format {
            ImageFormat::Docker => DOCKER_MANIFEST,
            _ => OCI_MANIFEST,
        };
        assert_eq!(image["mediaType"], expected_type);
    }
}

#[tokio::test]
async fn plain_http_registry_accepts_every_format() {
    let Some(registry) = Registry::start(RegistryOptions::plain()).await else {
        return;
    };
    assert!(!registry.is_tls());
    assert_eq!(registry.get("/v2/", &[]).await.status, 200);
    push_and_read_back_every_format(&registry, None).await;

    // Pushing the same module again gives the same digests (deterministic layers).
    let wasm = wasm_module("again");
    let a = registry
        .push("smoke/again", "a", ImageFormat::Docker, &wasm)
        .await;
    let b = registry
        .push("smoke/again", "b", ImageFormat::Docker, &wasm)
        .await;
    assert_eq!(a.digest, b.digest);
    assert_eq!(
        registry.oci_url("smoke/again", "a"),
        format!("oci://{}/smoke/again:a", registry.host())
    );
    assert_eq!(
        registry.oci_url("smoke/again", &a.digest),
        format!("oci://{}/smoke/again@{}", registry.host(), a.digest)
    );
}

#[tokio::test]
async fn basic_auth_registry_requires_credentials() {
    let options = RegistryOptions::plain().basic_auth("puller", "s3cret-pass");
    let Some(registry) = Registry::start(options).await else {
        return;
    };
    // Anonymous requests are refused with a Basic challenge.
    let denied = registry.get_anonymous("/v2/").await;
    assert_eq!(denied.status, 401);
    let challenge = denied.header("www-authenticate").unwrap_or_default();
    assert!(challenge.starts_with("Basic "), "{challenge}");
    assert!(challenge.contains("basic-realm"), "{challenge}");
    assert_eq!(registry.get("/v2/", &[]).await.status, 200);

    push_and_read_back_every_format(&registry, Some("Basic cHVsbGVyOnMzY3JldC1wYXNz")).await;

    // Without credentials the pushed manifests are not readable.
    let pushed = registry
        .push(
            "smoke/private",
            "v1",
            ImageFormat::OciArtifact,
            &wasm_module("private"),
        )
        .await;
    let anonymous = registry
        .get_anonymous(&format!("/v2/{}/manifests/{}", pushed.repo, pushed.digest))
        .await;
    assert_eq!(anonymous.status, 401);

    // The pull-secret helper encodes the same credentials.
    let secret: serde_json::Value =
        serde_json::from_str(&registry.docker_config_json()).expect("json");
    assert_eq!(
        secret["auths"][registry.host()]["auth"],
        "cHVsbGVyOnMzY3JldC1wYXNz"
    );
}

#[tokio::test]
async fn tls_registry_is_trusted_through_the_extra_root_only() {
    let Some(registry) = Registry::start(RegistryOptions::plain().tls()).await else {
        return;
    };
    assert!(registry.is_tls());
    assert!(registry.base_url().starts_with("https://127.0.0.1:"));
    assert!(registry.config().insecure_registries.is_empty());
    push_and_read_back_every_format(&registry, None).await;

    let url = format!("{}/v2/", registry.base_url());
    // Without the extra root the certificate is not trusted...
    let untrusting = HyperTransport::new(&Config::default(), Vec::new()).expect("transport");
    let err = get(&untrusting, &url, None).await.expect_err("untrusted");
    assert!(matches!(err, TransportError::Tls(_)), "{err:?}");
    // ...unless the registry is listed as insecure.
    let insecure = Config {
        insecure_registries: vec![registry.host()],
        ..Config::default()
    };
    let insecure = HyperTransport::new(&insecure, Vec::new()).expect("transport");
    assert_eq!(get(&insecure, &url, None).await.expect("insecure").0, 200);
}

#[tokio::test]
async fn blocked_cidrs_keep_the_transport_away_from_the_registry() {
    let Some(registry) = Registry::start(RegistryOptions::plain()).await else {
        return;
    };
    let config = Config {
        blocked_cidrs: vec!["127.0.0.0/8".parse().expect("cidr")],
        ..registry.config()
    };
    let transport = HyperTransport::new(&config, Vec::new()).expect("transport");
    let err = get(&transport, &format!("{}/v2/", registry.base_url()), None)
        .await
        .expect_err("blocked");
    assert!(matches!(err, TransportError::Blocked(_)), "{err:?}");
}
