//! Deterministic content for the simulated world: module bytes derived from their names, the
//! archives HTTP servers may send (gzip, tar, tar.gz), and OCI/Docker images in the formats real tools
//! push (behavior.md §4.2). Everything here is a pure function of its inputs, so two runs of a
//! scenario see the same bytes, checksums and manifest digests.
//!
//! The registry and the HTTP hosts that serve these bytes live in [`super::world`]; the images are
//! built by the library's image builder ([`crate::fetch::oci::image`]), the one the registry tests
//! push to a real registry.

use crate::fetch::oci::image::{self as builder, ImageOptions, Layout};

pub use crate::fetch::oci::image::{gzip, Blob, Image};
pub use crate::fetch::unpack::PLUGIN_WASM;

/// The name of the custom section every simulated module carries.
pub const CUSTOM_SECTION_NAME: &str = "wasm-ecds-sim";
/// Wasm magic and version 1.
const WASM_HEADER: [u8; 8] = *b"\0asm\x01\0\0\0";
/// Prefix of the bytes of a module declared `invalid: true`.
const INVALID_PREFIX: &[u8] = b"not wasm: ";

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

/// A ustar archive with one regular file (mode 0644, uid/gid 0, mtime 0).
pub fn tar_single(path: &str, data: &[u8]) -> Vec<u8> {
    builder::tar(&[(path, data)])
}

/// How an image is laid out in the registry (`publish.format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Deserialize)]
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

/// Builds the image of `module` (named `name`) in `format`.
pub fn build_image(name: &str, module: &[u8], format: ImageFormat) -> Image {
    let options = ImageOptions::new(name);
    let build = |layout| builder::build_image(layout, module, &options);
    match format {
        ImageFormat::OciArtifact => build(Layout::WasmArtifact),
        ImageFormat::OciArtifactSingle => build(Layout::WasmArtifactSingle),
        ImageFormat::OciCompat => build(Layout::OciCompat),
        ImageFormat::Docker => build(Layout::Docker),
        ImageFormat::OciIndex => builder::build_index(vec![
            ("linux", "arm64", build(Layout::OciCompat)),
            ("linux", "amd64", build(Layout::WasmArtifact)),
        ]),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use serde_json::Value;

    use super::*;
    use crate::fetch::oci::OCI_INDEX;

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
        assert_eq!(idx.top().media_type, OCI_INDEX);
    }
}
