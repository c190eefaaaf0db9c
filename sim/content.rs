//! Deterministic content for the simulated world: module bytes derived from their names, the
//! archives HTTP servers may send (gzip, tar, tar.gz), and OCI/Docker images in the formats real tools
//! push (behavior.md §4.2). Everything here is a pure function of its inputs, so two runs of a
//! scenario see the same bytes, checksums and manifest digests.
//!
//! The registry and the HTTP hosts that serve these bytes live in [`super::world`].

use std::io::Write;

use flate2::{Compression, GzBuilder};
use serde_json::{json, Value};

use crate::store::sha256_hex;

/// The name of the custom section every simulated module carries.
pub const CUSTOM_SECTION_NAME: &str = "wasm-ecds-sim";
/// Wasm magic and version 1.
const WASM_HEADER: [u8; 8] = *b"\0asm\x01\0\0\0";
/// Prefix of the bytes of a module declared `invalid: true`.
const INVALID_PREFIX: &[u8] = b"not wasm: ";
/// The file name image layers and tar bodies hold the module under.
pub const PLUGIN_WASM: &str = "plugin.wasm";

pub const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MT_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MT_OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
pub const MT_OCI_LAYER_TGZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MT_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const MT_DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const MT_WASM_CONFIG: &str = "application/vnd.module.wasm.config.v1+json";
pub const MT_WASM_CONTENT: &str = "application/vnd.module.wasm.content.layer.v1+wasm";
/// What `oras push` records as the artifact type when none is given.
const ORAS_UNKNOWN_ARTIFACT: &str = "application/vnd.unknown.artifact.v1";

/// Deterministic bytes of a module.
///
/// A valid module is the Wasm header followed by one custom section (id 0) named
/// [`CUSTOM_SECTION_NAME`] whose payload is the module's name, zero-padded inside the section so that
/// the whole module is `size` bytes when that is reachable (a size below the minimum gives the
/// minimum; a size that the LEB128 length encoding makes unreachable gives one byte more). An invalid
/// module is `not wasm: <name>` padded with spaces to `size`.
pub fn module_bytes(name: &str, size: Option<u64>, invalid: bool) -> Vec<u8> {
    if invalid {
        let mut b = INVALID_PREFIX.to_vec();
        b.extend_from_slice(name.as_bytes());
        if let Some(size) = size {
            let size = usize::try_from(size).unwrap_or(usize::MAX);
            if b.len() < size {
                b.resize(size, b' ');
            }
        }
        return b;
    }
    let mut section = Vec::new();
    write_leb128(&mut section, CUSTOM_SECTION_NAME.len() as u64);
    section.extend_from_slice(CUSTOM_SECTION_NAME.as_bytes());
    section.extend_from_slice(name.as_bytes());
    let min_content = section.len() as u64;
    let content_len = match size {
        Some(size) => padded_content_len(size, min_content),
        None => min_content,
    };
    section.resize(usize::try_from(content_len).unwrap_or(usize::MAX), 0);
    let mut out = WASM_HEADER.to_vec();
    out.push(0); // custom section id
    write_leb128(&mut out, content_len);
    out.extend_from_slice(&section);
    out
}

/// The section content length that makes the module `size` bytes in total (header 8 + id 1 + LEB128
/// length + content), never less than `min`.
fn padded_content_len(size: u64, min: u64) -> u64 {
    for leb in 1..=10u64 {
        let Some(content) = size.checked_sub(9 + leb) else {
            break;
        };
        if content >= min && leb128_len(content) == leb {
            return content;
        }
    }
    // Unreachable sizes: the closest larger one (or the minimum).
    let mut content = min;
    while 9 + leb128_len(content) + content < size {
        content += 1;
    }
    content
}

fn leb128_len(mut v: u64) -> u64 {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

fn write_leb128(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// How an HTTP(S) server sends a module (`publish.encoding`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
pub enum Encoding {
    #[serde(rename = "plain")]
    Plain,
    #[serde(rename = "gzip")]
    Gzip,
    #[serde(rename = "tar")]
    Tar,
    #[serde(rename = "tar.gz")]
    TarGz,
}

impl Encoding {
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Plain => "plain",
            Encoding::Gzip => "gzip",
            Encoding::Tar => "tar",
            Encoding::TarGz => "tar.gz",
        }
    }

    pub fn encode(self, module: &[u8]) -> Vec<u8> {
        match self {
            Encoding::Plain => module.to_vec(),
            Encoding::Gzip => gzip(module),
            Encoding::Tar => tar_single(PLUGIN_WASM, module),
            Encoding::TarGz => gzip(&tar_single(PLUGIN_WASM, module)),
        }
    }
}

/// gzip with a fixed header (mtime 0, no file name) and compression level.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), Compression::default());
    enc.write_all(data).expect("writing into a Vec cannot fail");
    enc.finish().expect("writing into a Vec cannot fail")
}

/// A ustar archive with one regular file (mode 0644, uid/gid 0, mtime 0).
pub fn tar_single(path: &str, data: &[u8]) -> Vec<u8> {
    let mut header = tar::Header::new_ustar();
    header.set_path(path).expect("a short relative path");
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    let mut builder = tar::Builder::new(Vec::new());
    builder
        .append(&header, data)
        .expect("writing into a Vec cannot fail");
    builder
        .into_inner()
        .expect("writing into a Vec cannot fail")
}

/// How an image is laid out in the registry (`publish.format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImageFormat {
    /// `wasme`'s *oci* variant: config `…module.wasm.config.v1+json`, and two layers (the runtime
    /// config and the raw module as `…module.wasm.content.layer.v1+wasm`).
    OciArtifact,
    /// `oras push` of the module alone: an empty config and one content layer.
    OciArtifactSingle,
    /// The *compat* variant: an OCI image whose last layer is a tar.gz holding `plugin.wasm`.
    OciCompat,
    /// `docker build` of `FROM scratch` + `plugin.wasm`: a Docker v2 manifest.
    Docker,
    /// Extension: an OCI image index with a `linux/arm64` entry (compat image) and a `linux/amd64`
    /// entry (artifact image) of the same module.
    OciIndex,
}

impl ImageFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::OciArtifact => "oci-artifact",
            ImageFormat::OciArtifactSingle => "oci-artifact-single",
            ImageFormat::OciCompat => "oci-compat",
            ImageFormat::Docker => "docker",
            ImageFormat::OciIndex => "oci-index",
        }
    }
}

/// A blob or manifest: its bytes and hex sha256.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blob {
    pub media_type: String,
    pub bytes: Vec<u8>,
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

    fn descriptor(&self) -> Value {
        json!({"mediaType": self.media_type, "digest": format!("sha256:{}", self.digest), "size": self.bytes.len()})
    }

    fn descriptor_titled(&self, title: &str) -> Value {
        let mut d = self.descriptor();
        d["annotations"] = json!({"org.opencontainers.image.title": title});
        d
    }
}

/// What publishing an image pushes: every blob and manifest, and the manifest the tag points at
/// (the last of `manifests`).
#[derive(Clone, Debug)]
pub struct Image {
    pub blobs: Vec<Blob>,
    /// Child manifests first, the tagged one last.
    pub manifests: Vec<Blob>,
}

impl Image {
    pub fn top(&self) -> &Blob {
        self.manifests.last().expect("an image has a manifest")
    }
}

fn manifest_blob(media_type: &str, manifest: &Value) -> Blob {
    Blob::new(
        media_type,
        serde_json::to_vec(manifest).expect("json serializes"),
    )
}

/// Builds the image of `module` (named `name`) in `format`.
pub fn build_image(name: &str, module: &[u8], format: ImageFormat) -> Image {
    match format {
        ImageFormat::OciArtifact => {
            let config = Blob::new(
                MT_WASM_CONFIG,
                serde_json::to_vec(&json!({"type": "envoy_proxy", "abiVersions": ["v0.2.1"], "config": {"rootIds": [name]}}))
                    .expect("json serializes"),
            );
            let content = Blob::new(MT_WASM_CONTENT, module.to_vec());
            let manifest = json!({
                "schemaVersion": 2,
                "mediaType": MT_OCI_MANIFEST,
                "config": config.descriptor(),
                "layers": [config.descriptor_titled("runtime-config.json"), content.descriptor_titled(PLUGIN_WASM)],
            });
            Image {
                manifests: vec![manifest_blob(MT_OCI_MANIFEST, &manifest)],
                blobs: vec![config, content],
            }
        }
        ImageFormat::OciArtifactSingle => {
            let config = Blob::new(MT_OCI_EMPTY, b"{}".to_vec());
            let content = Blob::new(MT_WASM_CONTENT, module.to_vec());
            let manifest = json!({
                "schemaVersion": 2,
                "mediaType": MT_OCI_MANIFEST,
                "artifactType": ORAS_UNKNOWN_ARTIFACT,
                "config": config.descriptor(),
                "layers": [content.descriptor_titled(PLUGIN_WASM)],
            });
            Image {
                manifests: vec![manifest_blob(MT_OCI_MANIFEST, &manifest)],
                blobs: vec![config, content],
            }
        }
        ImageFormat::OciCompat | ImageFormat::Docker => {
            let docker = format == ImageFormat::Docker;
            let tar = tar_single(PLUGIN_WASM, module);
            let diff_id = sha256_hex(&tar);
            let layer = Blob::new(
                if docker {
                    MT_DOCKER_LAYER
                } else {
                    MT_OCI_LAYER_TGZ
                },
                gzip(&tar),
            );
            let config = Blob::new(
                if docker {
                    MT_DOCKER_CONFIG
                } else {
                    MT_OCI_CONFIG
                },
                serde_json::to_vec(&json!({
                    "architecture": "amd64",
                    "os": "linux",
                    "config": {},
                    "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{diff_id}")]},
                }))
                .expect("json serializes"),
            );
            let manifest = if docker {
                json!({
                    "schemaVersion": 2,
                    "mediaType": MT_DOCKER_MANIFEST,
                    "config": config.descriptor(),
                    "layers": [layer.descriptor()],
                })
            } else {
                json!({
                    "schemaVersion": 2,
                    "mediaType": MT_OCI_MANIFEST,
                    "config": config.descriptor(),
                    "layers": [layer.descriptor()],
                    "annotations": {"module.wasm.image/variant": "compat"},
                })
            };
            let mt = if docker {
                MT_DOCKER_MANIFEST
            } else {
                MT_OCI_MANIFEST
            };
            Image {
                manifests: vec![manifest_blob(mt, &manifest)],
                blobs: vec![config, layer],
            }
        }
        ImageFormat::OciIndex => {
            let arm = build_image(name, module, ImageFormat::OciCompat);
            let amd = build_image(name, module, ImageFormat::OciArtifact);
            let platform = |arch: &str| json!({"architecture": arch, "os": "linux"});
            let mut arm_desc = arm.top().descriptor();
            arm_desc["platform"] = platform("arm64");
            let mut amd_desc = amd.top().descriptor();
            amd_desc["platform"] = platform("amd64");
            let index = json!({
                "schemaVersion": 2,
                "mediaType": MT_OCI_INDEX,
                "manifests": [arm_desc, amd_desc],
            });
            let mut blobs = arm.blobs;
            blobs.extend(amd.blobs);
            let mut manifests = arm.manifests;
            manifests.extend(amd.manifests);
            manifests.push(manifest_blob(MT_OCI_INDEX, &index));
            Image { blobs, manifests }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn valid_modules_are_wasm_of_the_requested_size() {
        let small = module_bytes("v1", None, false);
        assert_eq!(&small[..8], b"\0asm\x01\0\0\0");
        assert_eq!(small[8], 0, "a custom section");
        assert!(small.windows(2).any(|w| w == b"v1"));
        for size in [0u64, 30, 100, 127, 128, 129, 140, 16_384, 16_390, 2 << 20] {
            let b = module_bytes("v1", Some(size), false);
            assert!(b.len() as u64 >= size.min(small.len() as u64));
            assert!(
                b.len() as u64 <= size.max(small.len() as u64) + 1,
                "size {size} gave {}",
                b.len()
            );
            // The section length is consistent with the total length.
            let (mut len, mut shift, mut i) = (0u64, 0, 9);
            loop {
                let byte = b[i];
                len |= u64::from(byte & 0x7f) << shift;
                shift += 7;
                i += 1;
                if byte & 0x80 == 0 {
                    break;
                }
            }
            assert_eq!(i as u64 + len, b.len() as u64);
        }
        assert_eq!(module_bytes("v1", Some(2 << 20), false).len(), 2 << 20);
    }

    #[test]
    fn bytes_are_deterministic_and_differ_by_name() {
        assert_eq!(
            module_bytes("a", Some(1000), false),
            module_bytes("a", Some(1000), false)
        );
        assert_ne!(
            module_bytes("a", None, false),
            module_bytes("b", None, false)
        );
        let junk = module_bytes("junk", Some(64), true);
        assert_eq!(junk.len(), 64);
        assert_ne!(&junk[..4], b"\0asm");
        for f in [
            ImageFormat::OciArtifact,
            ImageFormat::OciArtifactSingle,
            ImageFormat::OciCompat,
            ImageFormat::Docker,
            ImageFormat::OciIndex,
        ] {
            let m = module_bytes("a", None, false);
            assert_eq!(
                build_image("a", &m, f).top(),
                build_image("a", &m, f).top(),
                "{f:?}"
            );
        }
    }

    #[test]
    fn archives_hold_the_module() {
        let m = module_bytes("x", Some(5000), false);
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&Encoding::Gzip.encode(&m)[..])
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, m);
        let tgz = Encoding::TarGz.encode(&m);
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(&tgz[..]));
        let mut e = ar.entries().unwrap().next().unwrap().unwrap();
        assert_eq!(e.path().unwrap().to_str(), Some(PLUGIN_WASM));
        let mut out = Vec::new();
        e.read_to_end(&mut out).unwrap();
        assert_eq!(out, m);
    }

    #[test]
    fn image_manifests_reference_their_blobs() {
        let m = module_bytes("a", None, false);
        for f in [
            ImageFormat::OciArtifact,
            ImageFormat::OciArtifactSingle,
            ImageFormat::OciCompat,
            ImageFormat::Docker,
        ] {
            let img = build_image("a", &m, f);
            let v: Value = serde_json::from_slice(&img.top().bytes).unwrap();
            let layers = v["layers"].as_array().unwrap();
            let last = layers.last().unwrap();
            let digest = last["digest"]
                .as_str()
                .unwrap()
                .strip_prefix("sha256:")
                .unwrap();
            assert!(img
                .blobs
                .iter()
                .any(|b| b.digest == digest
                    && b.bytes.len() as u64 == last["size"].as_u64().unwrap()));
            let cfg = v["config"]["digest"]
                .as_str()
                .unwrap()
                .strip_prefix("sha256:")
                .unwrap();
            assert!(img.blobs.iter().any(|b| b.digest == cfg));
        }
        let idx = build_image("a", &m, ImageFormat::OciIndex);
        assert_eq!(idx.manifests.len(), 3);
        assert_eq!(idx.top().media_type, MT_OCI_INDEX);
    }
}
