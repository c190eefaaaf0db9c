//! The media types of OCI and Docker images and of Wasm artifacts (behavior.md §4.2), in one place
//! for the fetcher, the image builder ([`super::image`]), the simulator and the tests.
//!
//! They are constants so that the fetcher can `match` on them; the OCI and Docker ones are checked
//! against the `oci-spec` crate's [`MediaType`](oci_spec::image::MediaType) by the unit tests.

/// An OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// An OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// The config of an OCI image.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// The empty config `{}` of an OCI artifact (what `oras push` writes).
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
/// The last layer of an OCI "compat" image holding `plugin.wasm`.
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// A Docker manifest list (the Docker image index).
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// A Docker image manifest, schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// The config of a Docker image.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// The last layer of a Docker image holding `plugin.wasm`.
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// The raw module of a Wasm artifact (solo-io Wasm image spec, the one Istio accepts).
pub const WASM_CONTENT_LAYER: &str = "application/vnd.module.wasm.content.layer.v1+wasm";
/// The same, as written by other tools (accepted as an improvement, behavior.md §4.2).
pub const WASM_CONTENT_LAYER_ALT: &str = "application/vnd.wasm.content.layer.v1+wasm";
/// The config (and config layer) of a two-layer Wasm artifact; never downloaded.
pub const WASM_CONFIG_LAYER: &str = "application/vnd.module.wasm.config.v1+json";
/// The config of the CNCF "Wasm OCI artifact" layout, beside [`WASM_CONTENT_LAYER_ALT`].
pub const WASM_CONFIG_ALT: &str = "application/vnd.wasm.config.v0+json";
/// What `oras push` records as the artifact type when none is given.
pub const ORAS_UNKNOWN_ARTIFACT: &str = "application/vnd.unknown.artifact.v1";

/// What a manifest request accepts, index types first.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json";

#[cfg(test)]
mod tests {
    use oci_spec::image::{MediaType, ToDockerV2S2};

    use super::*;

    #[test]
    fn constants_are_the_oci_spec_media_types() {
        for (ours, theirs) in [
            (OCI_INDEX, MediaType::ImageIndex),
            (OCI_MANIFEST, MediaType::ImageManifest),
            (OCI_CONFIG, MediaType::ImageConfig),
            (OCI_EMPTY, MediaType::EmptyJSON),
            (OCI_LAYER_GZIP, MediaType::ImageLayerGzip),
        ] {
            assert_eq!(ours, theirs.to_string());
            assert_eq!(MediaType::from(ours), theirs);
        }
        for (ours, oci) in [
            (DOCKER_MANIFEST_LIST, MediaType::ImageIndex),
            (DOCKER_MANIFEST, MediaType::ImageManifest),
            (DOCKER_CONFIG, MediaType::ImageConfig),
            (DOCKER_LAYER, MediaType::ImageLayerGzip),
        ] {
            assert_eq!(Ok(ours), oci.to_docker_v2s2());
        }
        let accepted: Vec<&str> = MANIFEST_ACCEPT.split(", ").collect();
        assert_eq!(
            accepted,
            [
                OCI_INDEX,
                DOCKER_MANIFEST_LIST,
                OCI_MANIFEST,
                DOCKER_MANIFEST
            ]
        );
    }
}
