//! Test fixtures shared by the OCI fetcher's unit tests: a scripted registry on the fake transport
//! (ping, manifests under a tag and their digest, blobs, protected repositories) and hand-written
//! manifests, including the malformed ones a real registry would never build.

use std::io::Read;

use serde_json::json;

use super::*;
use crate::fetch::fake::{Harness, Reply};
use crate::fetch::{FetchError, HttpRequest, StagedModule};
use crate::store::sha256_hex;

pub(super) const BASE: &str = "https://reg.example";

pub(super) fn oci_ref(s: &str) -> OciRef {
    OciRef::parse(s).unwrap()
}

pub(super) fn creds() -> Credentials {
    Credentials {
        username: "alice".into(),
        password: "s3cret".into(),
    }
}

pub(super) fn desc(media_type: &str, bytes: &[u8]) -> serde_json::Value {
    json!({"mediaType": media_type, "digest": format!("sha256:{}", sha256_hex(bytes)), "size": bytes.len()})
}

pub(super) fn manifest_url(repo: &str, reference: &str) -> String {
    format!("{BASE}/v2/{repo}/manifests/{reference}")
}

pub(super) fn blob_url(repo: &str, bytes: &[u8]) -> String {
    format!("{BASE}/v2/{repo}/blobs/sha256:{}", sha256_hex(bytes))
}

/// Serves an anonymous registry ping.
pub(super) fn anonymous(h: &Harness) {
    h.transport
        .script(&format!("{BASE}/v2/"), vec![Reply::ok("{}")]);
}

pub(super) fn manifest_reply(bytes: &[u8], media_type: &str) -> Reply {
    Reply::ok(bytes.to_vec())
        .header("content-type", media_type)
        .header(
            "docker-content-digest",
            &format!("sha256:{}", sha256_hex(bytes)),
        )
}

/// Publishes a manifest under `tag` and under its digest; returns the digest.
pub(super) fn put_manifest(
    h: &Harness,
    repo: &str,
    tag: &str,
    manifest: &serde_json::Value,
) -> String {
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

pub(super) fn put_blob(h: &Harness, repo: &str, bytes: &[u8]) {
    h.transport
        .script(&blob_url(repo, bytes), vec![Reply::ok(bytes.to_vec())]);
}

pub(super) fn image(media_type: &str, layers: &[(&str, &[u8])]) -> serde_json::Value {
    let config = b"{\"architecture\":\"amd64\"}";
    json!({
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": desc(OCI_CONFIG, config),
            "layers": layers.iter().map(|(t, b)| desc(t, b)).collect::<Vec<_>>(),
    })
}

pub(super) async fn pull(
    h: &Harness,
    r: &str,
    c: Option<&Credentials>,
) -> Result<(OciResolved, StagedModule), FetchError> {
    let budget = h.fetcher.budget();
    let resolved = h.fetcher.oci_resolve(&oci_ref(r), c, budget).await?;
    let module = h.fetcher.oci_download(&resolved, budget).await?;
    Ok((resolved, module))
}

pub(super) fn contents(m: &mut StagedModule) -> Vec<u8> {
    let mut v = Vec::new();
    m.file.reader().unwrap().read_to_end(&mut v).unwrap();
    v
}

pub(super) fn auth_of(req: &HttpRequest) -> Option<String> {
    req.headers
        .iter()
        .find(|(k, _)| k == "authorization")
        .map(|(_, v)| v.to_string())
}

/// A registry that wants `want` as the Authorization of manifest and blob requests.
pub(super) fn protected(h: &Harness, challenge: &str, want: String, module: &[u8]) {
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
