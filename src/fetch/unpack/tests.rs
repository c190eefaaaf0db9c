//! Unit tests of unpacking: every body format, archives with links and `..` paths, truncation,
//! decompression bombs; and the small module, gzip and tar builders the other fetcher tests use.

use super::*;
use flate2::write::GzEncoder;
use flate2::Compression;

/// A tiny valid-looking module: magic, version, then `n` filler bytes.
pub(crate) fn wasm(n: usize) -> Vec<u8> {
    let mut v = vec![0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00];
    v.extend((0..n).map(|i| (i % 251) as u8));
    v
}

pub(crate) fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::fast());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

/// A tar of regular files.
pub(crate) fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// Raw header writing, for names `append_data` refuses (`..`) and links.
fn raw_entry(b: &mut tar::Builder<Vec<u8>>, name: &str, kind: tar::EntryType, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(kind);
    if kind.is_symlink() || kind.is_hard_link() {
        h.set_link_name("/etc/passwd").unwrap();
    }
    h.set_cksum();
    b.append(&h, data).unwrap();
}

fn unpack(body: &[u8], max: u64) -> Result<(String, u64, Vec<u8>), FetchError> {
    let mut out = Vec::new();
    let (sha, size) = unpack_module(&mut &body[..], &mut out, max)?;
    Ok((sha, size, out))
}

fn extract(body: &[u8], max: u64) -> Result<Vec<u8>, FetchError> {
    let mut out = Vec::new();
    let (sha, size) = extract_plugin_wasm(&mut &body[..], &mut out, max)?;
    assert_eq!(size, out.len() as u64);
    assert_eq!(sha, crate::store::sha256_hex(&out));
    Ok(out)
}

#[test]
fn check_wasm_wants_magic_and_eight_bytes() {
    assert!(check_wasm(&wasm(0)).is_ok());
    assert!(matches!(
        check_wasm(b"\0asm"),
        Err(FetchError::InvalidModule(m)) if m.contains("4 bytes")
    ));
    // The content is never echoed (neither as text nor as hex).
    assert_eq!(
        check_wasm(b"<html><body>"),
        Err(FetchError::InvalidModule(
            "not a Wasm module (no \\0asm header)".into()
        ))
    );
}

#[test]
fn unpacks_every_body_format() {
    let module = wasm(5000);
    let want = crate::store::sha256_hex(&module);
    let tarball = tar_of(&[("plugin.wasm", &module)]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("plain", module.clone()),
        ("gzip", gzip(&module)),
        ("tar", tarball.clone()),
        ("tar.gz", gzip(&tarball)),
        ("gzip of gzip", gzip(&gzip(&module))),
        ("tar of gzip", tar_of(&[("m.wasm.gz", &gzip(&module))])),
    ];
    for (name, body) in cases {
        let (sha, size, out) = unpack(&body, 1 << 20).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            (sha.as_str(), size),
            (want.as_str(), module.len() as u64),
            "{name}"
        );
        assert_eq!(out, module, "{name}");
    }
}

#[test]
fn tar_takes_the_first_regular_file() {
    let module = wasm(10);
    let mut b = tar::Builder::new(Vec::new());
    raw_entry(&mut b, "dir/", tar::EntryType::Directory, b"");
    raw_entry(&mut b, "link", tar::EntryType::Symlink, b"");
    raw_entry(&mut b, "first.wasm", tar::EntryType::Regular, &module);
    raw_entry(
        &mut b,
        "second.wasm",
        tar::EntryType::Regular,
        b"not wasm at all",
    );
    let body = b.into_inner().unwrap();
    assert_eq!(unpack(&body, 1 << 20).unwrap().2, module);
    // The first regular file decides: not wasm → invalid, even if a later one is.
    let body = tar_of(&[("readme", b"hello world, no wasm"), ("m.wasm", &module)]);
    assert!(matches!(
        unpack(&body, 1 << 20),
        Err(FetchError::InvalidModule(_))
    ));
}

#[test]
fn rejects_non_wasm_bodies() {
    for body in [
        b"wasm\n".to_vec(),
        b"".to_vec(),
        gzip(b"<html>not found</html>"),
        tar_of(&[("x", b"hello world")]),
        tar_of(&[]),
    ] {
        assert!(
            matches!(unpack(&body, 1 << 20), Err(FetchError::InvalidModule(_))),
            "{body:?}"
        );
    }
}

#[test]
fn corrupt_and_truncated_gzip_is_invalid() {
    let gz = gzip(&wasm(100_000));
    let truncated = &gz[..gz.len() / 2];
    match unpack(truncated, 1 << 20) {
        Err(FetchError::InvalidModule(m)) => assert!(m.contains("gzip"), "{m}"),
        other => panic!("{other:?}"),
    }
    let mut garbled = gz.clone();
    for b in &mut garbled[20..60] {
        *b ^= 0x5a;
    }
    assert!(matches!(
        unpack(&garbled, 1 << 20),
        Err(FetchError::InvalidModule(_))
    ));
}

#[test]
fn truncated_tar_is_invalid() {
    let module = wasm(4000);
    let t = tar_of(&[("plugin.wasm", &module)]);
    // Cut inside the entry's data: 512 header bytes + part of the module.
    let cut = &t[..512 + 1000];
    match unpack(cut, 1 << 20) {
        Err(FetchError::InvalidModule(m)) => assert!(m.contains("truncated"), "{m}"),
        other => panic!("{other:?}"),
    }
    let cut = gzip(&t[..512 + 1000]);
    match extract(&cut, 1 << 20) {
        Err(FetchError::InvalidModule(m)) => assert!(m.contains("truncated"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn gzip_bomb_stops_at_the_limit() {
    // 64 MiB of zeros behind a wasm header compress to ~64 KiB; the limit is 1 MiB.
    let mut e = GzEncoder::new(Vec::new(), Compression::fast());
    e.write_all(&wasm(0)).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..64 {
        e.write_all(&zeros).unwrap();
    }
    let bomb = e.finish().unwrap();
    assert!(bomb.len() < 1 << 20);
    let mut written = CountingSink(0);
    let err = unpack_module(&mut &bomb[..], &mut written, 1 << 20).unwrap_err();
    assert_eq!(err, FetchError::TooLarge { limit: 1 << 20 });
    assert!(written.0 <= (1 << 20) + COPY_BUF as u64);
    // Also inside a tar.gz layer.
    let err = extract_plugin_wasm(&mut &bomb[..], &mut written, 1 << 20).unwrap_err();
    assert!(matches!(
        err,
        FetchError::InvalidModule(_) | FetchError::TooLarge { .. }
    ));
}

struct CountingSink(u64);
impl Write for CountingSink {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0 += b.len() as u64;
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn plain_module_over_the_limit_is_too_large() {
    let module = wasm(2000);
    assert_eq!(
        unpack(&module, 1000).unwrap_err(),
        FetchError::TooLarge { limit: 1000 }
    );
    assert_eq!(unpack(&module, 2008).unwrap().1, 2008);
    // A tar entry declaring more than the limit is refused before reading it.
    let t = tar_of(&[("plugin.wasm", &wasm(3 << 20))]);
    assert_eq!(
        unpack(&t, 1 << 20).unwrap_err(),
        FetchError::TooLarge { limit: 1 << 20 }
    );
}

#[test]
fn extracts_plugin_wasm_from_layers() {
    let module = wasm(300);
    for name in ["plugin.wasm", "./plugin.wasm", "usr/local/plugin.wasm"] {
        let layer = gzip(&tar_of(&[("other.txt", b"x"), (name, &module)]));
        assert_eq!(extract(&layer, 1 << 20).unwrap(), module, "{name}");
    }
    // An uncompressed tar layer is accepted too.
    let layer = tar_of(&[("plugin.wasm", &module)]);
    assert_eq!(extract(&layer, 1 << 20).unwrap(), module);
}

#[test]
fn plugin_wasm_must_be_a_regular_file_inside_the_archive() {
    let module = wasm(300);
    // Only a symlink, a hard link and a `..` path named plugin.wasm: not found.
    let mut b = tar::Builder::new(Vec::new());
    raw_entry(&mut b, "plugin.wasm", tar::EntryType::Symlink, b"");
    raw_entry(&mut b, "x/plugin.wasm", tar::EntryType::Link, b"");
    raw_entry(&mut b, "../plugin.wasm", tar::EntryType::Regular, &module);
    raw_entry(
        &mut b,
        "a/../../plugin.wasm",
        tar::EntryType::Regular,
        &module,
    );
    let layer = gzip(&b.into_inner().unwrap());
    match extract(&layer, 1 << 20) {
        Err(FetchError::InvalidModule(m)) => assert!(m.contains("no plugin.wasm"), "{m}"),
        other => panic!("{other:?}"),
    }
    // The same with a regular plugin.wasm after them: that one is taken.
    let mut b = tar::Builder::new(Vec::new());
    raw_entry(&mut b, "plugin.wasm", tar::EntryType::Symlink, b"");
    raw_entry(
        &mut b,
        "../plugin.wasm",
        tar::EntryType::Regular,
        b"evil evil evil",
    );
    raw_entry(&mut b, "plugin.wasm", tar::EntryType::Regular, &module);
    let layer = gzip(&b.into_inner().unwrap());
    assert_eq!(extract(&layer, 1 << 20).unwrap(), module);
}

#[test]
fn extract_rejects_missing_non_wasm_and_garbage() {
    let layer = gzip(&tar_of(&[("non-wasm.txt", b"a")]));
    assert!(
        matches!(extract(&layer, 1 << 20), Err(FetchError::InvalidModule(m)) if m.contains("no plugin.wasm"))
    );
    let layer = gzip(&tar_of(&[("plugin.wasm", b"this is wasm plugin")]));
    assert!(matches!(
        extract(&layer, 1 << 20),
        Err(FetchError::InvalidModule(_))
    ));
    assert!(matches!(
        extract(b"definitely not a layer", 1 << 20),
        Err(FetchError::InvalidModule(_))
    ));
    let layer = gzip(&tar_of(&[("plugin.wasm", &wasm(5000))]));
    assert!(matches!(
        extract(&layer, 1000),
        Err(FetchError::TooLarge { limit: 1000 })
    ));
}

#[test]
fn input_read_errors_are_download_failures() {
    struct Broken;
    impl Read for Broken {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::Error::other("disk on fire"))
        }
    }
    let err = unpack_module(&mut Broken, &mut Vec::new(), 100).unwrap_err();
    assert!(matches!(err, FetchError::Download(m) if m.contains("disk on fire")));
}

/// The probe's gzip of zeros: it must be refused from the first bytes out of the decompressor,
/// not inflated whole. Counts what the input gave and what reached `out`.
#[test]
fn gzip_of_zeros_is_refused_from_its_first_bytes() {
    struct Counting<'a> {
        inner: &'a [u8],
        read: usize,
    }
    impl Read for Counting<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.read += n;
            Ok(n)
        }
    }
    let mut e = GzEncoder::new(Vec::new(), Compression::default());
    let mib = vec![0u8; 1 << 20];
    for _ in 0..50 {
        e.write_all(&mib).unwrap();
    }
    let body = e.finish().unwrap();
    let mut input = Counting {
        inner: &body,
        read: 0,
    };
    let mut out = Vec::new();
    let err = unpack_module(&mut input, &mut out, 256 << 20).unwrap_err();
    assert_eq!(
        err,
        FetchError::InvalidModule("not a Wasm module (no \\0asm header)".into())
    );
    assert!(out.is_empty(), "{} bytes written", out.len());
    // 50 MiB of zeros are about 50 KiB of gzip; the first 512 inflated bytes need a fraction.
    assert!(
        input.read < body.len() / 2,
        "read {} of {} compressed bytes",
        input.read,
        body.len()
    );
}
