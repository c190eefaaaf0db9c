//! Unpacking module bodies (behavior.md §4.1, §4.2): plain Wasm, gzip, tar (first entry), tar.gz,
//! and `plugin.wasm` out of image layers; bounded by the size limit (no decompression bombs).
//!
//! Everything here is synchronous and streaming: the input is read once, the Wasm binary is written
//! to `out` while it is hashed, and at most a small peek buffer is held in memory. Nothing is ever
//! written to the file system except through `out` (tar entries are read, never unpacked), so
//! symlinks, hard links and `..` paths in an archive cannot reach outside it.
//!
//! Callers own the transfer (HTTP, OCI blob, `file://`); this module owns only the format.

use std::error::Error as StdError;
use std::fmt;
use std::io::{self, Read, Write};

use flate2::read::MultiGzDecoder;
use sha2::{Digest, Sha256};

use super::FetchError;

/// The first four bytes of every Wasm binary: `\0asm`.
pub const WASM_MAGIC: [u8; 4] = [0x00, 0x61, 0x73, 0x6d];
/// A Wasm binary is at least the magic plus the 4-byte version.
pub const MIN_WASM_SIZE: usize = 8;
/// The file an image layer holds the module in (solo-io Wasm image spec, "compat" variant).
pub const PLUGIN_WASM: &str = "plugin.wasm";

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// `ustar` at offset 257 of the first header marks a POSIX (or GNU) tar archive.
const TAR_MAGIC_OFFSET: usize = 257;
const TAR_MAGIC: &[u8] = b"ustar";
/// Enough to recognise every format above.
const PEEK_SIZE: usize = 512;
/// Archive framing (headers, padding, end blocks) allowed on top of the module size limit, so that
/// a tar holding a module of exactly the limit is not refused.
pub(crate) const ARCHIVE_OVERHEAD: u64 = 1 << 20;
/// gzip in tar in gzip …: stop after this many layers.
const MAX_NESTING: u32 = 4;
const COPY_BUF: usize = 64 * 1024;

/// Checks the start of a module (its first bytes, or all of it when shorter than 8 bytes). The
/// error never shows the bytes: a body or file may hold anything.
pub fn check_wasm(prefix: &[u8]) -> Result<(), FetchError> {
    if prefix.len() >= MIN_WASM_SIZE && prefix[..4] == WASM_MAGIC {
        return Ok(());
    }
    Err(FetchError::InvalidModule(if prefix.len() < MIN_WASM_SIZE {
        format!(
            "not a Wasm module: {} bytes, a module has at least {MIN_WASM_SIZE}",
            prefix.len()
        )
    } else {
        "not a Wasm module (no \\0asm header)".to_string()
    }))
}

/// Unpacks a module body (plain Wasm, gzip, tar, tar.gz, nested up to a few levels) into `out`.
/// Returns the hex sha256 and the size of the Wasm binary.
///
/// Every decompressed stream and the module itself are bounded by `max_size`
/// ([`FetchError::TooLarge`]); a corrupt archive or a result that is not Wasm is
/// [`FetchError::InvalidModule`]. A tar contributes its first regular file.
pub fn unpack_module(
    input: &mut dyn Read,
    out: &mut dyn Write,
    max_size: u64,
) -> Result<(String, u64), FetchError> {
    let input = Guarded::raw(input, max_size.saturating_add(ARCHIVE_OVERHEAD));
    unpack_level(Box::new(input), out, max_size, 0)
}

/// Extracts the regular file whose base name is `plugin.wasm` from an image layer (tar.gz, or a
/// plain tar) into `out`. Symlinks, hard links and paths with `..` are skipped, never followed.
/// Returns the hex sha256 and the size of the Wasm binary.
pub fn extract_plugin_wasm(
    input: &mut dyn Read,
    out: &mut dyn Write,
    max_size: u64,
) -> Result<(String, u64), FetchError> {
    let limit = max_size.saturating_add(ARCHIVE_OVERHEAD);
    let input = Guarded::raw(input, limit);
    let (head, rest) = peek(Box::new(input))?;
    let tar_stream: Box<dyn Read + '_> = if head.starts_with(&GZIP_MAGIC) {
        let chained = io::Cursor::new(head).chain(rest);
        Box::new(Guarded::layer(
            MultiGzDecoder::new(chained),
            limit,
            "gzip stream",
        ))
    } else if is_tar(&head) {
        Box::new(io::Cursor::new(head).chain(rest))
    } else {
        return Err(FetchError::InvalidModule(
            "image layer is neither tar.gz nor tar".into(),
        ));
    };
    let mut archive = tar::Archive::new(tar_stream);
    let entries = archive.entries().map_err(|e| corrupt("tar archive", &e))?;
    for entry in entries {
        let entry = entry.map_err(|e| corrupt("tar archive", &e))?;
        let kind = entry.header().entry_type();
        if !(kind.is_file() || kind.is_contiguous()) {
            continue;
        }
        let path = entry.path_bytes().into_owned();
        if !is_plugin_wasm_path(&path) {
            continue;
        }
        return copy_tar_entry(entry, out, max_size, |r, out| {
            let (head, rest) = peek(r)?;
            copy_wasm(head, rest, out, max_size)
        });
    }
    Err(FetchError::InvalidModule(format!(
        "no {PLUGIN_WASM} regular file found in the image layer"
    )))
}

/// True for `plugin.wasm`, `./plugin.wasm`, `dir/plugin.wasm`; false when any component is `..`.
fn is_plugin_wasm_path(path: &[u8]) -> bool {
    let mut parts = path.split(|b| *b == b'/').filter(|p| !p.is_empty());
    if parts.clone().any(|p| p == b"..") {
        return false;
    }
    parts.next_back() == Some(PLUGIN_WASM.as_bytes())
}

fn unpack_level<'a>(
    reader: Box<dyn Read + 'a>,
    out: &mut dyn Write,
    max_size: u64,
    depth: u32,
) -> Result<(String, u64), FetchError> {
    let (head, rest) = peek(reader)?;
    let nested = |what: &str| {
        if depth >= MAX_NESTING {
            Err(FetchError::InvalidModule(format!(
                "{what} nested more than {MAX_NESTING} levels deep"
            )))
        } else {
            Ok(())
        }
    };
    if head.starts_with(&GZIP_MAGIC) {
        nested("gzip")?;
        let chained = io::Cursor::new(head).chain(rest);
        let limit = max_size.saturating_add(ARCHIVE_OVERHEAD);
        let decoder = Guarded::layer(MultiGzDecoder::new(chained), limit, "gzip stream");
        return unpack_level(Box::new(decoder), out, max_size, depth + 1);
    }
    if is_tar(&head) {
        nested("tar")?;
        let chained: Box<dyn Read + 'a> = Box::new(io::Cursor::new(head).chain(rest));
        let mut archive = tar::Archive::new(chained);
        let entries = archive.entries().map_err(|e| corrupt("tar archive", &e))?;
        for entry in entries {
            let entry = entry.map_err(|e| corrupt("tar archive", &e))?;
            let kind = entry.header().entry_type();
            // The reference takes the first entry; directories and links carry no module, so the
            // first *regular file* is taken.
            if !(kind.is_file() || kind.is_contiguous()) {
                continue;
            }
            return copy_tar_entry(entry, out, max_size, |r, out| {
                unpack_level(r, out, max_size, depth + 1)
            });
        }
        return Err(FetchError::InvalidModule(
            "tar archive holds no regular file".into(),
        ));
    }
    copy_wasm(head, rest, out, max_size)
}

/// Hands one tar entry to `inner`, refusing an entry larger than the limit up front and one that
/// ends before its declared size (a truncated archive).
fn copy_tar_entry<R: Read>(
    entry: tar::Entry<'_, R>,
    out: &mut dyn Write,
    max_size: u64,
    inner: impl FnOnce(Box<dyn Read + '_>, &mut dyn Write) -> Result<(String, u64), FetchError>,
) -> Result<(String, u64), FetchError> {
    let declared = entry.size();
    if declared > max_size.saturating_add(ARCHIVE_OVERHEAD) {
        return Err(FetchError::TooLarge { limit: max_size });
    }
    let mut counted = Counted {
        inner: entry,
        read: 0,
    };
    let result = inner(Box::new(&mut counted), out)?;
    // Drain what the inner level did not need so that a short entry is noticed.
    io::copy(&mut counted, &mut io::sink()).map_err(|e| corrupt("tar archive", &e))?;
    if counted.read < declared {
        return Err(FetchError::InvalidModule(format!(
            "truncated tar archive: entry of {declared} bytes ends after {}",
            counted.read
        )));
    }
    Ok(result)
}

/// Copies a Wasm binary (`head` followed by `rest`) to `out` while hashing it.
fn copy_wasm(
    head: Vec<u8>,
    mut rest: Box<dyn Read + '_>,
    out: &mut dyn Write,
    max_size: u64,
) -> Result<(String, u64), FetchError> {
    check_wasm(&head)?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut write = |chunk: &[u8], size: &mut u64| -> Result<(), FetchError> {
        *size += chunk.len() as u64;
        if *size > max_size {
            return Err(FetchError::TooLarge { limit: max_size });
        }
        hasher.update(chunk);
        out.write_all(chunk).map_err(FetchError::io)
    };
    write(&head, &mut size)?;
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        let n = match rest.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_failure(&e, "module")),
        };
        write(&buf[..n], &mut size)?;
    }
    out.flush().map_err(FetchError::io)?;
    Ok((hex::encode(hasher.finalize()), size))
}

fn is_tar(peek: &[u8]) -> bool {
    peek.get(TAR_MAGIC_OFFSET..TAR_MAGIC_OFFSET + TAR_MAGIC.len()) == Some(TAR_MAGIC)
}

/// Reads up to [`PEEK_SIZE`] bytes (fewer only at the end of the stream).
fn peek<'a>(mut reader: Box<dyn Read + 'a>) -> Result<(Vec<u8>, Box<dyn Read + 'a>), FetchError> {
    let mut buf = Vec::with_capacity(PEEK_SIZE);
    (&mut reader)
        .take(PEEK_SIZE as u64)
        .read_to_end(&mut buf)
        .map_err(|e| read_failure(&e, "module"))?;
    Ok((buf, reader))
}

// ---------------------------------------------------------------------------------------------
// Errors through `io::Read`

/// A [`FetchError`] carried through an `io::Error`, so that the layer that noticed a problem (the
/// size guard of a gzip stream, the raw input) decides its kind, not the layer that reports it.
#[derive(Debug)]
struct Failure(FetchError);

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl StdError for Failure {}

fn carried(e: &io::Error) -> Option<FetchError> {
    let mut source: Option<&(dyn StdError + 'static)> = e.get_ref().map(|r| r as _);
    while let Some(s) = source {
        if let Some(Failure(f)) = s.downcast_ref::<Failure>() {
            return Some(f.clone());
        }
        source = s.source();
    }
    None
}

/// An error that surfaced while reading `what`.
fn read_failure(e: &io::Error, what: &str) -> FetchError {
    carried(e).unwrap_or_else(|| FetchError::InvalidModule(format!("reading {what}: {e}")))
}

/// An error reported by a decoder: carried errors pass through, anything else means corruption.
fn corrupt(what: &str, e: &io::Error) -> FetchError {
    carried(e).unwrap_or_else(|| FetchError::InvalidModule(format!("corrupt {what}: {e}")))
}

/// Counts the bytes of one stream and stops it past `limit`; tags its errors with their meaning.
struct Guarded<R> {
    inner: R,
    read: u64,
    limit: u64,
    /// `None` for the raw input (its errors are read failures), else the decoded format.
    what: Option<&'static str>,
}

impl<R: Read> Guarded<R> {
    fn raw(inner: R, limit: u64) -> Self {
        Guarded {
            inner,
            read: 0,
            limit,
            what: None,
        }
    }

    fn layer(inner: R, limit: u64, what: &'static str) -> Self {
        Guarded {
            inner,
            read: 0,
            limit,
            what: Some(what),
        }
    }
}

impl<R: Read> Read for Guarded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Never hand out more than one byte past the limit, so a bomb stops early.
        let room = (self.limit - self.read.min(self.limit)).saturating_add(1);
        let want = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        match self.inner.read(&mut buf[..want]) {
            Ok(n) => {
                self.read += n as u64;
                if self.read > self.limit {
                    return Err(io::Error::other(Failure(FetchError::TooLarge {
                        limit: self.limit.saturating_sub(ARCHIVE_OVERHEAD),
                    })));
                }
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) if carried(&e).is_some() => Err(e),
            Err(e) => Err(io::Error::other(Failure(match self.what {
                None => FetchError::Download(format!("reading module body: {e}")),
                Some(what) => FetchError::InvalidModule(format!("corrupt {what}: {e}")),
            }))),
        }
    }
}

/// Counts the bytes read through it.
struct Counted<R> {
    inner: R,
    read: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
pub(crate) mod tests;
