//! The module blob (behavior.md §4.2): one request for the chosen layer, turned into the module in
//! one pass as it arrives ([`crate::fetch::stream`]): hashed and checked against the descriptor
//! while it is written to the staging file that becomes the module (a Wasm artifact layer), or
//! while `plugin.wasm` is unpacked out of it (a Docker or OCI compat layer).

use std::time::Duration;

use super::{deadline_exceeded, registry_status, ImageFormat, OciResolved};
use crate::clock::Timestamp;
use crate::fetch::request::{check_content_length, ErrorKind, TransferLimit};
use crate::fetch::retry::{with_retries, AttemptError, PullBudget};
use crate::fetch::stream::{stream_module, Expected, Layout};
use crate::fetch::{FetchError, Fetcher, HttpRequest, StagedModule};

impl Fetcher {
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
        with_retries(self, budget, |timeout, started| async move {
            self.blob_attempt(url, resolved, timeout, started).await
        })
        .await
    }

    /// One blob request, checked against the descriptor, into the staged module.
    async fn blob_attempt(
        &self,
        url: &str,
        resolved: &OciResolved,
        timeout: Duration,
        started: Timestamp,
    ) -> Result<StagedModule, AttemptError> {
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
            .send_following_redirects(req, timeout, started, kind)
            .await?;
        registry_status(url, resp.status, resolved.used_credentials, kind)?;
        let limit = layer_limit(resolved.format, self.config.max_binary_size);
        check_content_length(&resp, limit)?;
        let layout = match resolved.format {
            // The blob is the module: its sha256 is the layer digest.
            ImageFormat::WasmArtifact => Layout::Wasm,
            ImageFormat::Docker | ImageFormat::OciCompat => Layout::ImageLayer,
        };
        let expected = Expected {
            sha256: &resolved.layer.digest,
            url,
        };
        stream_module(
            &self.store,
            &final_url,
            resp.body.as_mut(),
            layout,
            Some(expected),
            limit,
            kind,
        )
        .await
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
    use serde_json::json;

    use super::super::fixtures::*;
    use super::super::*;
    use super::*;
    use crate::fetch::fake::{config, harness, Reply};
    use crate::fetch::unpack::tests::{gzip, tar_of, wasm};
    use crate::outcome::Reason;
    use crate::store::sha256_hex;

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
            .map(|(_, v)| v.to_string())
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
}
