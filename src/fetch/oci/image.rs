//! Builds OCI and Docker images holding a Wasm module, in every layout the fetcher accepts
//! (behavior.md §4.2): the blobs and manifests a registry stores, as bytes with their digests.
//!
//! It is the one image builder of the project: the simulator publishes its images with it
//! (`sim/content.rs`) and the registry tests push them to a real `docker-registry`
//! (`tests/support/image.rs`). Manifests, indexes, descriptors and configs are `oci-spec` types,
//! serialized compactly. Everything is a pure function of its inputs (tar and gzip headers carry no
//! timestamps, every annotation map has one entry), so the same module always gives the same
//! digests.

use std::collections::HashMap;
use std::io::Write;

use flate2::{Compression, GzBuilder};
use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, Digest, ImageConfigurationBuilder, ImageIndexBuilder,
    ImageManifestBuilder, MediaType, Os, PlatformBuilder, RootFsBuilder, Sha256Digest,
};
use serde::Serialize;

use super::media_type::{
    DOCKER_CONFIG, DOCKER_LAYER, DOCKER_MANIFEST, OCI_CONFIG, OCI_EMPTY, OCI_INDEX, OCI_LAYER_GZIP,
    OCI_MANIFEST, ORAS_UNKNOWN_ARTIFACT, WASM_CONFIG_ALT, WASM_CONFIG_LAYER, WASM_CONTENT_LAYER,
    WASM_CONTENT_LAYER_ALT,
};
use crate::fetch::unpack::PLUGIN_WASM;
use crate::store::sha256_hex;

/// The annotation naming a layer's file (what `oras` and `wasme` write).
pub const TITLE_ANNOTATION: &str = "org.opencontainers.image.title";
/// The annotation of a `wasme` "compat" image.
pub const VARIANT_ANNOTATION: &str = "module.wasm.image/variant";

/// How an image holds its module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Layout {
    /// `docker build` of `FROM scratch` + `plugin.wasm`: a Docker v2 manifest whose last layer is a
    /// tar.gz holding `plugin.wasm`.
    Docker,
    /// The `wasme` *compat* variant: an OCI image whose last layer is a tar+gzip layer holding
    /// `plugin.wasm`.
    OciCompat,
    /// The `wasme` *oci* variant: a Wasm config and two layers, the config then the raw module.
    WasmArtifact,
    /// `oras push` of the module alone: an empty config and one content layer.
    WasmArtifactSingle,
    /// The CNCF "Wasm OCI artifact" media types (`application/vnd.wasm.…`): one content layer.
    WasmArtifactAlt,
}

/// What [`build_image`] may vary besides the layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageOptions {
    /// The root id written into a Wasm artifact's config.
    pub root_id: String,
    /// Docker and OCI compat images get a first layer that holds no module (a real image built
    /// `FROM` a base has one); the fetcher must take the last layer.
    pub decoy_layer: bool,
}

impl ImageOptions {
    pub fn new(root_id: &str) -> Self {
        ImageOptions {
            root_id: root_id.to_string(),
            decoy_layer: false,
        }
    }
}

/// A blob or a manifest: its media type, bytes and hex sha256.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blob {
    pub media_type: String,
    pub bytes: Vec<u8>,
    /// Hex sha256, without `sha256:`.
    pub digest: String,
}

impl Blob {
    pub fn new(media_type: &str, bytes: Vec<u8>) -> Self {
        let digest = sha256_hex(&bytes);
        Blob {
            media_type: media_type.to_string(),
            bytes,
            digest,
        }
    }

    /// The compact JSON of `value`.
    pub fn json(media_type: &str, value: &impl Serialize) -> Self {
        Blob::new(media_type, to_json(value))
    }

    /// Its content descriptor.
    pub fn descriptor(&self) -> Descriptor {
        let digest: Sha256Digest = self.digest.parse().expect("a sha256 hex digest");
        Descriptor::new(
            MediaType::from(self.media_type.as_str()),
            self.bytes.len() as u64,
            Digest::from(digest),
        )
    }

    fn titled(&self, title: &str) -> Descriptor {
        let mut d = self.descriptor();
        d.set_annotations(Some(one(TITLE_ANNOTATION, title)));
        d
    }
}

/// What a registry stores for one tag: every blob and every manifest, the tagged one last.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    /// Configs and layers in manifest order, child images first (a blob may appear twice).
    pub blobs: Vec<Blob>,
    /// Child manifests first, the tagged manifest (or index) last.
    pub manifests: Vec<Blob>,
    /// Hex sha256 of the layer the fetcher downloads (of the `linux/amd64` child of an index).
    pub module_layer: String,
}

impl Image {
    /// The manifest the tag points at.
    pub fn top(&self) -> &Blob {
        self.manifests.last().expect("an image has a manifest")
    }
}

/// A manifest being put together from a config and layers.
#[derive(Clone, Debug)]
pub struct ManifestBuilder {
    media_type: String,
    artifact_type: Option<String>,
    config: Blob,
    layers: Vec<(Blob, Descriptor)>,
    annotation: Option<(String, String)>,
    module_layer: Option<usize>,
}

impl ManifestBuilder {
    /// An image manifest of `media_type` ([`OCI_MANIFEST`] or [`DOCKER_MANIFEST`]).
    pub fn new(media_type: &str, config: Blob) -> Self {
        ManifestBuilder {
            media_type: media_type.to_string(),
            artifact_type: None,
            config,
            layers: Vec::new(),
            annotation: None,
            module_layer: None,
        }
    }

    pub fn artifact_type(mut self, t: &str) -> Self {
        self.artifact_type = Some(t.to_string());
        self
    }

    /// The manifest's single annotation.
    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotation = Some((key.to_string(), value.to_string()));
        self
    }

    /// A layer that does not hold the module.
    pub fn layer(mut self, blob: Blob) -> Self {
        let d = blob.descriptor();
        self.layers.push((blob, d));
        self
    }

    /// The layer holding the module, optionally annotated with its file name.
    pub fn module_layer(mut self, blob: Blob, title: Option<&str>) -> Self {
        let d = match title {
            Some(t) => blob.titled(t),
            None => blob.descriptor(),
        };
        self.module_layer = Some(self.layers.len());
        self.layers.push((blob, d));
        self
    }

    /// A layer annotated with its file name that does not hold the module.
    pub fn titled_layer(mut self, blob: Blob, title: &str) -> Self {
        let d = blob.titled(title);
        self.layers.push((blob, d));
        self
    }

    pub fn build(self) -> Image {
        let mut m = ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::from(self.media_type.as_str()))
            .config(self.config.descriptor())
            .layers(
                self.layers
                    .iter()
                    .map(|(_, d)| d.clone())
                    .collect::<Vec<_>>(),
            );
        if let Some(t) = &self.artifact_type {
            m = m.artifact_type(MediaType::from(t.as_str()));
        }
        if let Some((k, v)) = &self.annotation {
            m = m.annotations(one(k, v));
        }
        let manifest = m.build().expect("every required manifest field is set");
        let module = self
            .module_layer
            .map(|i| self.layers[i].0.digest.clone())
            .unwrap_or_default();
        let mut blobs = vec![self.config];
        blobs.extend(self.layers.into_iter().map(|(b, _)| b));
        Image {
            blobs,
            manifests: vec![Blob::json(&self.media_type, &manifest)],
            module_layer: module,
        }
    }
}

/// Builds the image of `module` in `layout`.
pub fn build_image(layout: Layout, module: &[u8], options: &ImageOptions) -> Image {
    match layout {
        Layout::Docker | Layout::OciCompat => {
            let docker = layout == Layout::Docker;
            let (manifest_type, config_type, layer_type) = if docker {
                (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER)
            } else {
                (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER_GZIP)
            };
            let decoy = options
                .decoy_layer
                .then(|| tar(&[("etc/wasm-ecds-decoy.txt", b"not the module\n")]));
            let module_tar = tar(&[(PLUGIN_WASM, module)]);
            let diff_ids = decoy
                .iter()
                .chain([&module_tar])
                .map(|t| format!("sha256:{}", sha256_hex(t)))
                .collect::<Vec<_>>();
            let config = ImageConfigurationBuilder::default()
                .architecture(Arch::Amd64)
                .os(Os::Linux)
                .config(ConfigBuilder::default().build().expect("an empty config"))
                .rootfs(
                    RootFsBuilder::default()
                        .typ("layers")
                        .diff_ids(diff_ids)
                        .build()
                        .expect("a rootfs"),
                )
                .build()
                .expect("every required config field is set");
            let mut m = ManifestBuilder::new(manifest_type, Blob::json(config_type, &config));
            if let Some(d) = decoy {
                m = m.layer(Blob::new(layer_type, gzip(&d)));
            }
            m = m.module_layer(Blob::new(layer_type, gzip(&module_tar)), None);
            if !docker {
                m = m.annotation(VARIANT_ANNOTATION, "compat");
            }
            m.build()
        }
        Layout::WasmArtifact => {
            let config = Blob::json(WASM_CONFIG_LAYER, &wasm_config(&options.root_id));
            ManifestBuilder::new(OCI_MANIFEST, config.clone())
                .titled_layer(config, "runtime-config.json")
                .module_layer(
                    Blob::new(WASM_CONTENT_LAYER, module.to_vec()),
                    Some(PLUGIN_WASM),
                )
                .build()
        }
        Layout::WasmArtifactSingle => {
            ManifestBuilder::new(OCI_MANIFEST, Blob::new(OCI_EMPTY, b"{}".to_vec()))
                .artifact_type(ORAS_UNKNOWN_ARTIFACT)
                .module_layer(
                    Blob::new(WASM_CONTENT_LAYER, module.to_vec()),
                    Some(PLUGIN_WASM),
                )
                .build()
        }
        Layout::WasmArtifactAlt => {
            let config = Blob::json(WASM_CONFIG_ALT, &wasm_config(&options.root_id));
            ManifestBuilder::new(OCI_MANIFEST, config)
                .module_layer(
                    Blob::new(WASM_CONTENT_LAYER_ALT, module.to_vec()),
                    Some(PLUGIN_WASM),
                )
                .build()
        }
    }
}

/// An OCI image index over `(os, architecture, image)` entries, in order; its module layer is the
/// one of the `linux/amd64` entry.
pub fn build_index(entries: Vec<(&str, &str, Image)>) -> Image {
    let mut descriptors = Vec::new();
    let mut blobs = Vec::new();
    let mut manifests = Vec::new();
    let mut module_layer = String::new();
    for (os, arch, image) in entries {
        let mut d = image.top().descriptor();
        d.set_platform(Some(
            PlatformBuilder::default()
                .architecture(Arch::from(arch))
                .os(Os::from(os))
                .build()
                .expect("a platform"),
        ));
        descriptors.push(d);
        if (os, arch) == ("linux", "amd64") {
            module_layer = image.module_layer.clone();
        }
        blobs.extend(image.blobs);
        manifests.extend(image.manifests);
    }
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(descriptors)
        .build()
        .expect("every required index field is set");
    manifests.push(Blob::json(OCI_INDEX, &index));
    Image {
        blobs,
        manifests,
        module_layer,
    }
}

/// The runtime config of a `wasme` Wasm artifact.
fn wasm_config(root_id: &str) -> serde_json::Value {
    serde_json::json!({
        "type": "envoy_proxy",
        "abiVersions": ["v0.2.1"],
        "config": {"rootIds": [root_id]},
    })
}

fn one(key: &str, value: &str) -> HashMap<String, String> {
    HashMap::from([(key.to_string(), value.to_string())])
}

fn to_json(value: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(value).expect("json serializes")
}

/// gzip with a fixed header (mtime 0, no file name) and compression level.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), Compression::default());
    enc.write_all(data).expect("writing into a Vec cannot fail");
    enc.finish().expect("writing into a Vec cannot fail")
}

/// A ustar archive of regular files (mode 0644, uid/gid 0, mtime 0), in order.
pub fn tar(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, data) in entries {
        let mut header = tar::Header::new_ustar();
        header.set_path(path).expect("a short relative path");
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        builder
            .append(&header, *data)
            .expect("writing into a Vec cannot fail");
    }
    builder
        .into_inner()
        .expect("writing into a Vec cannot fail")
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::fetch::fake::{config, harness, Reply};
    use crate::fetch::unpack::tests::wasm;
    use crate::url::OciRef;

    const ALL: [Layout; 5] = [
        Layout::Docker,
        Layout::OciCompat,
        Layout::WasmArtifact,
        Layout::WasmArtifactSingle,
        Layout::WasmArtifactAlt,
    ];

    fn options(decoy: bool) -> ImageOptions {
        ImageOptions {
            decoy_layer: decoy,
            ..ImageOptions::new("test")
        }
    }

    #[test]
    fn manifests_reference_their_blobs_and_are_deterministic() {
        let m = wasm(100);
        for layout in ALL {
            let img = build_image(layout, &m, &options(true));
            assert_eq!(img, build_image(layout, &m, &options(true)), "{layout:?}");
            let v: Value = serde_json::from_slice(&img.top().bytes).unwrap();
            assert_eq!(v["schemaVersion"], 2);
            assert_eq!(v["mediaType"], img.top().media_type.as_str());
            let digests: Vec<&str> = v["layers"]
                .as_array()
                .unwrap()
                .iter()
                .chain([&v["config"]])
                .map(|d| d["digest"].as_str().unwrap())
                .collect();
            for d in digests {
                let hex = d.strip_prefix("sha256:").unwrap();
                assert!(img.blobs.iter().any(|b| b.digest == hex), "{layout:?}");
            }
            assert!(img.blobs.iter().any(|b| b.digest == img.module_layer));
        }
        let idx = build_index(vec![
            (
                "linux",
                "arm64",
                build_image(Layout::OciCompat, &m, &options(false)),
            ),
            (
                "linux",
                "amd64",
                build_image(Layout::WasmArtifact, &m, &options(false)),
            ),
        ]);
        assert_eq!(idx.manifests.len(), 3);
        assert_eq!(idx.top().media_type, OCI_INDEX);
        let v: Value = serde_json::from_slice(&idx.top().bytes).unwrap();
        assert_eq!(v["manifests"][1]["platform"]["architecture"], "amd64");
        assert_eq!(v["manifests"][1]["platform"]["os"], "linux");
    }

    /// The fetcher takes the module out of every layout the builder makes (and of an index).
    #[tokio::test]
    async fn the_fetcher_pulls_every_layout() {
        let module = wasm(3000);
        let mut images: Vec<Image> = ALL
            .iter()
            .flat_map(|l| [false, true].map(|d| build_image(*l, &module, &options(d))))
            .collect();
        images.push(build_index(vec![
            (
                "linux",
                "arm64",
                build_image(Layout::Docker, &wasm(1), &options(true)),
            ),
            (
                "linux",
                "amd64",
                build_image(Layout::OciCompat, &module, &options(true)),
            ),
        ]));
        for img in images {
            let h = harness(config());
            let base = "https://reg.example/v2";
            h.transport
                .script(&format!("{base}/"), vec![Reply::ok("{}")]);
            for m in &img.manifests {
                let reply = Reply::ok(m.bytes.clone()).header("content-type", &m.media_type);
                let url = format!("{base}/r/manifests/sha256:{}", m.digest);
                h.transport.script(&url, vec![reply.clone()]);
                if m == img.top() {
                    h.transport
                        .script(&format!("{base}/r/manifests/v1"), vec![reply]);
                }
            }
            for b in &img.blobs {
                let url = format!("{base}/r/blobs/sha256:{}", b.digest);
                h.transport.script(&url, vec![Reply::ok(b.bytes.clone())]);
            }
            let r = OciRef::parse("reg.example/r:v1").unwrap();
            let budget = h.fetcher.budget();
            let resolved = h.fetcher.oci_resolve(&r, None, budget).await.unwrap();
            assert_eq!(resolved.layer.digest, img.module_layer);
            let staged = h.fetcher.oci_download(&resolved, budget).await.unwrap();
            assert_eq!(staged.sha256, sha256_hex(&module));
        }
    }
}
