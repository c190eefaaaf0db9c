//! Wasm images in every format of behavior.md §4.2, for the registry helper to push with plain OCI
//! Distribution calls. They are built by the library's image builder
//! ([`wasm_ecds::fetch::oci::image`], the one the simulator publishes with); this module only names
//! the formats the tests cover and gives digests in the registry's `sha256:<hex>` form.

use sha2::{Digest, Sha256};
use wasm_ecds::fetch::oci::image::{self as builder, ImageOptions, Layout};

pub use wasm_ecds::fetch::oci::image::{gzip, tar, ManifestBuilder};
pub use wasm_ecds::fetch::oci::media_type::{
    DOCKER_CONFIG, DOCKER_LAYER, DOCKER_MANIFEST, OCI_CONFIG, OCI_INDEX,
    OCI_LAYER_GZIP as OCI_LAYER, OCI_MANIFEST, WASM_CONFIG_ALT, WASM_CONFIG_LAYER as WASM_CONFIG,
    WASM_CONTENT_LAYER as WASM_CONTENT, WASM_CONTENT_LAYER_ALT as WASM_CONTENT_ALT,
};

/// How a module is packaged (behavior.md §4.2 "Image formats").
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ImageFormat {
    /// Docker manifest v2; a decoy layer, then the last layer: tar.gz with `plugin.wasm`.
    Docker,
    /// OCI manifest; a decoy layer, then the last layer: `…oci.image.layer.v1.tar+gzip` with
    /// `plugin.wasm`.
    OciCompat,
    /// OCI Wasm artifact as the reference accepts it: two layers, the config ([`WASM_CONFIG`])
    /// and the raw module ([`WASM_CONTENT`]).
    OciArtifact,
    /// A single [`WASM_CONTENT`] layer with an empty config, as `oras push` writes (improvement).
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

/// A blob with its media type and `sha256:` digest.
#[derive(Clone, Debug)]
pub struct Blob {
    pub media_type: String,
    pub bytes: Vec<u8>,
    pub digest: String,
}

/// One image manifest and the blobs it references.
#[derive(Clone, Debug)]
pub struct Image {
    pub media_type: &'static str,
    pub manifest: Vec<u8>,
    /// `sha256:` digest of the manifest.
    pub digest: String,
    /// Config first, then layers, as referenced by the manifest (a blob may appear twice).
    pub blobs: Vec<Blob>,
    /// `sha256:` digest of the layer that holds the module.
    pub module_layer: String,
    /// What the library built.
    pub built: builder::Image,
}

impl From<builder::Image> for Image {
    /// A single image (not an index).
    fn from(built: builder::Image) -> Self {
        let top = built.top();
        let media_type = [DOCKER_MANIFEST, OCI_MANIFEST]
            .into_iter()
            .find(|m| *m == top.media_type)
            .expect("an image manifest");
        Image {
            media_type,
            manifest: top.bytes.clone(),
            digest: format!("sha256:{}", top.digest),
            blobs: built
                .blobs
                .iter()
                .map(|b| Blob {
                    media_type: b.media_type.clone(),
                    bytes: b.bytes.clone(),
                    digest: format!("sha256:{}", b.digest),
                })
                .collect(),
            module_layer: format!("sha256:{}", built.module_layer),
            built,
        }
    }
}

/// Builds the manifest and blobs of a single image (not [`ImageFormat::Index`]) holding `wasm`.
pub fn build_image(format: ImageFormat, wasm: &[u8]) -> Image {
    let layout = match format {
        ImageFormat::Docker => Layout::Docker,
        ImageFormat::OciCompat => Layout::OciCompat,
        ImageFormat::OciArtifact => Layout::WasmArtifact,
        ImageFormat::OciArtifactSingleLayer => Layout::WasmArtifactSingle,
        ImageFormat::OciArtifactAltMediaType => Layout::WasmArtifactAlt,
        ImageFormat::Index => panic!("an index is not a single image: use build_index"),
    };
    let options = ImageOptions {
        decoy_layer: true,
        ..ImageOptions::new("wasm-ecds-test")
    };
    builder::build_image(layout, wasm, &options).into()
}

/// An index over `(os, architecture, image)` entries, in order: its bytes and `sha256:` digest.
pub fn build_index(entries: &[(&str, &str, &Image)]) -> (Vec<u8>, String) {
    let index = builder::build_index(
        entries
            .iter()
            .map(|(os, arch, image)| (*os, *arch, image.built.clone()))
            .collect(),
    );
    let top = index.top();
    (top.bytes.clone(), format!("sha256:{}", top.digest))
}
