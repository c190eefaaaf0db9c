//! Wasm images in every format of behavior.md §4.2, built in memory (blobs + manifest JSON) so the
//! registry helper can push them with plain OCI Distribution calls. Layers are deterministic (tar
//! and gzip headers carry no timestamps): the same module always gives the same digests.

use std::io::Write;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const WASM_CONTENT: &str = "application/vnd.module.wasm.content.layer.v1+wasm";
pub const WASM_CONFIG: &str = "application/vnd.module.wasm.config.v1+json";
/// The media types of the CNCF "Wasm OCI artifact" layout (wasm-to-oci and others).
pub const WASM_CONTENT_ALT: &str = "application/vnd.wasm.content.layer.v1+wasm";
pub const WASM_CONFIG_ALT: &str = "application/vnd.wasm.config.v0+json";

/// How a module is packaged (behavior.md §4.2 "Image formats").
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ImageFormat {
    /// Docker manifest v2; a decoy layer, then the last layer: tar.gz with `plugin.wasm`.
    Docker,
    /// OCI manifest; a decoy layer, then the last layer: `…oci.image.layer.v1.tar+gzip` with
    /// `plugin.wasm`.
    OciCompat,
    /// OCI Wasm artifact as the reference accepts it: two layers, the raw module
    /// ([`WASM_CONTENT`]) first and the config ([`WASM_CONFIG`]) last.
    OciArtifact,
    /// A single [`WASM_CONTENT`] layer (improvement).
    OciArtifactSingleLayer,
    /// A single [`WASM_CONTENT_ALT`] layer with a [`WASM_CONFIG_ALT`] config (improvement).
    OciArtifactAltMediaType,
    /// An OCI image index: a `linux/arm64` entry holding a *different* module first, then the
    /// `linux/amd64` entry (an [`ImageFormat::OciCompat`] image) holding the module.
    Index,
}

impl ImageFormat {
    pub const ALL: [ImageFormat; 6] = [
        ImageFormat::Docker,
        ImageFormat::OciCompat,
        ImageFormat::OciArtifact,
        ImageFormat::OciArtifactSingleLayer,
        ImageFormat::OciArtifactAltMediaType,
        ImageFormat::Index,
    ];

    /// A short name usable as a repository or tag component.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Docker => "docker",
            ImageFormat::OciCompat => "oci-compat",
            ImageFormat::OciArtifact => "oci-artifact",
            ImageFormat::OciArtifactSingleLayer => "oci-artifact-single",
            ImageFormat::OciArtifactAltMediaType => "oci-artifact-alt",
            ImageFormat::Index => "index",
        }
    }

    /// The media type of the manifest the tag points to.
    pub fn manifest_media_type(self) -> &'static str {
        match self {
            ImageFormat::Docker => DOCKER_MANIFEST,
            ImageFormat::Index => OCI_INDEX,
            _ => OCI_MANIFEST,
        }
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// A blob with its media type and digest.
#[derive(Clone, Debug)]
pub struct Blob {
    pub media_type: &'static str,
    pub bytes: Vec<u8>,
    pub digest: String,
}

impl Blob {
    pub fn new(media_type: &'static str, bytes: Vec<u8>) -> Self {
        let digest = sha256_digest(&bytes);
        Blob {
            media_type,
            bytes,
            digest,
        }
    }

    /// The OCI descriptor of this blob.
    pub fn descriptor(&self) -> Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.bytes.len()})
    }
}

/// One image manifest and the blobs it references.
#[derive(Clone, Debug)]
pub struct Image {
    pub media_type: &'static str,
    pub manifest: Vec<u8>,
    pub digest: String,
    /// Config first, then layers, as referenced by the manifest (a blob may appear twice).
    pub blobs: Vec<Blob>,
    /// Digest of the layer that holds the module.
    pub module_layer: String,
}

/// A deterministic tar.gz holding `entries` (path, bytes), in order.
pub fn tar_gz(entries: &[(&str, &[u8])]) -> Vec<u8> {
    gzip(&tar(entries))
}

/// A deterministic tar archive (no timestamps, owner 0).
pub fn tar(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, bytes) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_entry_type(tar::EntryType::Regular);
        builder
            .append_data(&mut header, path, *bytes)
            .expect("tar entry");
    }
    builder.into_inner().expect("tar archive")
}

/// Gzip without a timestamp or file name.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).expect("gzip");
    encoder.finish().expect("gzip")
}

/// Builds the manifest and blobs of a single image (not [`ImageFormat::Index`]) holding `wasm`.
pub fn build_image(format: ImageFormat, wasm: &[u8]) -> Image {
    match format {
        ImageFormat::Docker => layered_image(DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER, wasm),
        ImageFormat::OciCompat => layered_image(OCI_MANIFEST, OCI_CONFIG, OCI_LAYER, wasm),
        ImageFormat::OciArtifact => {
            let config = Blob::new(WASM_CONFIG, wasm_config_json());
            let content = Blob::new(WASM_CONTENT, wasm.to_vec());
            let config_layer = Blob::new(WASM_CONFIG, config.bytes.clone());
            artifact_image(config, vec![content, config_layer])
        }
        ImageFormat::OciArtifactSingleLayer => {
            let config = Blob::new(WASM_CONFIG, wasm_config_json());
            let content = Blob::new(WASM_CONTENT, wasm.to_vec());
            artifact_image(config, vec![content])
        }
        ImageFormat::OciArtifactAltMediaType => {
            let config = Blob::new(WASM_CONFIG_ALT, wasm_config_json());
            let content = Blob::new(WASM_CONTENT_ALT, wasm.to_vec());
            artifact_image(config, vec![content])
        }
        ImageFormat::Index => panic!("an index is not a single image: use build_index"),
    }
}

/// An index over `(os, architecture, image)` entries, in order.
pub fn build_index(entries: &[(&str, &str, &Image)]) -> (Vec<u8>, String) {
    let manifests: Vec<Value> = entries
        .iter()
        .map(|(os, arch, image)| {
            json!({
                "mediaType": image.media_type,
                "digest": image.digest,
                "size": image.manifest.len(),
                "platform": {"architecture": arch, "os": os},
            })
        })
        .collect();
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
    let bytes = serde_json::to_vec_pretty(&index).expect("index json");
    let digest = sha256_digest(&bytes);
    (bytes, digest)
}

fn wasm_config_json() -> Vec<u8> {
    serde_json::to_vec(&json!({
        "type": "envoy_proxy",
        "abiVersions": ["v0-097b7f2e4cc1fb490cc1943d0d633655ac3c522f", "v0.2.1"],
        "rootIds": ["wasm-ecds-test"],
    }))
    .expect("config json")
}

/// A container-style image: a decoy layer first, then the layer holding `plugin.wasm` last.
fn layered_image(
    manifest_type: &'static str,
    config_type: &'static str,
    layer_type: &'static str,
    wasm: &[u8],
) -> Image {
    let decoy_tar = tar(&[("etc/wasm-ecds-decoy.txt", b"not the module\n")]);
    let module_tar = tar(&[("plugin.wasm", wasm)]);
    let decoy = Blob::new(layer_type, gzip(&decoy_tar));
    let module = Blob::new(layer_type, gzip(&module_tar));
    let config = Blob::new(
        config_type,
        serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {
                "type": "layers",
                "diff_ids": [sha256_digest(&decoy_tar), sha256_digest(&module_tar)],
            },
        }))
        .expect("config json"),
    );
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": config.descriptor(),
        "layers": [decoy.descriptor(), module.descriptor()],
    });
    finish(manifest_type, manifest, config, vec![decoy, module], 1)
}

fn artifact_image(config: Blob, layers: Vec<Blob>) -> Image {
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
    });
    finish(OCI_MANIFEST, manifest, config, layers, 0)
}

fn finish(
    media_type: &'static str,
    manifest: Value,
    config: Blob,
    layers: Vec<Blob>,
    module_index: usize,
) -> Image {
    let bytes = serde_json::to_vec_pretty(&manifest).expect("manifest json");
    let digest = sha256_digest(&bytes);
    let module_layer = layers[module_index].digest.clone();
    let mut blobs = vec![config];
    blobs.extend(layers);
    Image {
        media_type,
        manifest: bytes,
        digest,
        blobs,
        module_layer,
    }
}
