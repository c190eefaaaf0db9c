//! `file://` modules (behavior.md §2: no pull policy applies): read through
//! [`FileSource`] (the real file system in `serve`, memory in `sim`), and verified. Unlike HTTP
//! bodies they are not unpacked: with file delivery Envoy reads the file itself, so it must be a
//! plain Wasm binary (a gzip or tar file is `invalid_module`).
//!
//! Only regular files are read (a FIFO or a device is refused before it is opened), at most
//! `max_binary_size` bytes, and never for longer than one attempt's timeout: a read from the real
//! file system runs on a thread of its own that is abandoned at the deadline (a hung network mount
//! cannot hold a worker, readiness or shutdown). Errors never show the file's content.

use std::io::{self, Read, Write};

use sha2::{Digest, Sha256};

use super::retry::PullBudget;
use super::unpack::{MIN_WASM_SIZE, WASM_MAGIC};
use super::{FetchError, Fetcher, StagedModule};
use crate::store::{FileSource, ModuleStore};

impl Fetcher {
    /// Reads the module at `path` (an absolute local path, without `file://`), on the calling
    /// thread.
    ///
    /// Errors: [`FetchError::Download`] when the file cannot be opened or read, or is not a
    /// regular file (naming the path), [`FetchError::TooLarge`], [`FetchError::InvalidModule`].
    pub fn fetch_file(&self, path: &str) -> Result<StagedModule, FetchError> {
        read_module(
            self.files.as_ref(),
            self.store.as_ref(),
            path,
            self.config.max_binary_size,
        )
    }

    /// [`Fetcher::fetch_file`] within one attempt's timeout of `budget`. A source whose reads may
    /// block is read on a thread of its own; past the timeout the read is abandoned (the thread
    /// ends whenever the read does, and its result is dropped) and the fetch fails naming it.
    pub async fn fetch_file_within(
        &self,
        path: &str,
        budget: PullBudget,
    ) -> Result<StagedModule, FetchError> {
        if !self.files.may_block() {
            return self.fetch_file(path);
        }
        let timeout = self
            .config
            .attempt_timeout(budget.deadline.since(self.now()));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (files, store) = (self.files.clone(), self.store.clone());
        let (owned, limit) = (path.to_string(), self.config.max_binary_size);
        // A plain thread, not tokio's blocking pool: the runtime waits for its blocking tasks when
        // it shuts down, and a read that never returns must not hold the process.
        std::thread::Builder::new()
            .name("file-module-read".into())
            .spawn(move || {
                let _ = tx.send(read_module(files.as_ref(), store.as_ref(), &owned, limit));
            })
            .map_err(|e| FetchError::Download(format!("file://{path}: no reader thread: {e}")))?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(FetchError::Download(format!(
                "file://{path}: the read stopped without a result"
            ))),
            Err(_) => Err(FetchError::Download(format!(
                "file://{path}: read timed out after {timeout:?}"
            ))),
        }
    }
}

/// Reads, hashes and stages a plain Wasm module of at most `limit` bytes.
fn read_module(
    files: &dyn FileSource,
    store: &dyn ModuleStore,
    path: &str,
    limit: u64,
) -> Result<StagedModule, FetchError> {
    let mut input = files.open(path).map_err(|e| {
        FetchError::Download(match e.kind() {
            io::ErrorKind::NotFound => format!("file://{path}: no such file"),
            _ => format!("file://{path}: {e}"),
        })
    })?;
    let mut out = store.stage().map_err(FetchError::io)?;
    let (mut hasher, mut size) = (Sha256::new(), 0u64);
    let mut prefix = Vec::with_capacity(MIN_WASM_SIZE);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match input.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(FetchError::Download(format!("file://{path}: {e}"))),
        };
        if n == 0 {
            break;
        }
        size += n as u64;
        if size > limit {
            return Err(FetchError::TooLarge { limit });
        }
        if prefix.len() < MIN_WASM_SIZE {
            prefix.extend_from_slice(&buf[..n.min(MIN_WASM_SIZE - prefix.len())]);
            if prefix.len() >= WASM_MAGIC.len() && prefix[..WASM_MAGIC.len()] != WASM_MAGIC {
                return Err(not_wasm(path, &mut input, size, limit));
            }
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(FetchError::io)?;
    }
    if prefix.len() < MIN_WASM_SIZE {
        return Err(not_wasm(path, &mut input, size, limit));
    }
    Ok(StagedModule {
        file: out,
        sha256: hex::encode(hasher.finalize()),
        size,
    })
}

/// The error of a file that is not a Wasm binary: its path and size, never its content. The rest
/// of the file is only counted (up to the limit), not kept.
fn not_wasm(path: &str, input: &mut dyn Read, read: u64, limit: u64) -> FetchError {
    let rest = io::copy(
        &mut Read::take(input, limit - read.min(limit) + 1),
        &mut io::sink(),
    );
    let size = match rest {
        Ok(n) if read + n > limit => format!("more than {limit} bytes"),
        Ok(n) => format!("{} bytes", read + n),
        Err(_) => format!("{read} bytes or more"),
    };
    FetchError::InvalidModule(format!(
        "file://{path}: not a Wasm module (no \\0asm header), {size} \
         (file modules must be plain Wasm binaries)"
    ))
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::sync::Arc;
    use std::time::Duration;

    use crate::fetch::fake::{config, harness};
    use crate::fetch::unpack::tests::{gzip, tar_of, wasm};
    use crate::fetch::FetchError;
    use crate::outcome::Reason;
    use crate::store::{sha256_hex, FileSource};

    #[test]
    fn reads_plain_modules_and_refuses_packed_ones() {
        let h = harness(config());
        let module = wasm(40);
        h.files.put("/opt/plain.wasm", module.clone());
        h.files.put(
            "/opt/packed.tgz",
            gzip(&tar_of(&[("plugin.wasm", &module)])),
        );
        let mut m = h.fetcher.fetch_file("/opt/plain.wasm").unwrap();
        assert_eq!(m.sha256, sha256_hex(&module));
        let mut back = Vec::new();
        m.file.reader().unwrap().read_to_end(&mut back).unwrap();
        assert_eq!(back, module);
        let err = h.fetcher.fetch_file("/opt/packed.tgz").unwrap_err();
        assert_eq!(err.reason(), Reason::InvalidModule, "{err}");
        assert!(h.transport.requests().is_empty());
    }

    #[test]
    fn missing_and_invalid_files() {
        let h = harness(config());
        let err = h.fetcher.fetch_file("/opt/missing.wasm").unwrap_err();
        assert!(
            matches!(&err, FetchError::Download(m) if m.contains("/opt/missing.wasm")),
            "{err}"
        );
        h.files.put("/opt/text.wasm", b"hello".to_vec());
        assert_eq!(
            h.fetcher.fetch_file("/opt/text.wasm").unwrap_err().reason(),
            Reason::InvalidModule
        );
        let mut cfg = config();
        cfg.max_binary_size = 100;
        let h = harness(cfg);
        h.files.put("/opt/big.wasm", wasm(200));
        assert_eq!(
            h.fetcher.fetch_file("/opt/big.wasm").unwrap_err(),
            FetchError::TooLarge { limit: 100 }
        );
    }

    /// The probe read a shadow-like file through a plugin and got its first bytes back in the
    /// error: errors name the path and the size only.
    #[test]
    fn errors_never_show_the_content() {
        let h = harness(config());
        let secret = b"root:$6$saltsalt$hashhashhash:19000:0:99999:7:::\n".repeat(10);
        h.files.put("/etc/shadowish", secret.clone());
        let err = h.fetcher.fetch_file("/etc/shadowish").unwrap_err();
        let text = err.to_string();
        assert_eq!(
            text,
            format!(
                "invalid module: file:///etc/shadowish: not a Wasm module (no \\0asm header), \
                 {} bytes (file modules must be plain Wasm binaries)",
                secret.len()
            )
        );
        assert!(!text.contains("root") && !text.contains(&hex::encode(&secret[..4])));
    }

    /// Opens without any check, as the server did before: a FIFO with a writer that never writes
    /// blocks the read for good. Stands for a hung network mount.
    struct UncheckedFiles;

    impl FileSource for UncheckedFiles {
        fn open(&self, path: &str) -> std::io::Result<Box<dyn Read + Send>> {
            Ok(Box::new(std::fs::File::open(path)?))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_that_never_ends_times_out_and_releases_the_caller() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("stuck.wasm");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.unwrap().success());
        // Opened read-write: a writer exists (so the reader's open returns) but never writes.
        let _writer = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&fifo)
            .unwrap();
        let mut h = harness(config());
        h.fetcher.files = Arc::new(UncheckedFiles);
        let path = fifo.to_str().unwrap();
        // Paused time: the 15 s attempt timeout passes as soon as the runtime is idle.
        let err = h
            .fetcher
            .fetch_file_within(path, h.fetcher.budget())
            .await
            .unwrap_err();
        assert_eq!(
            err,
            FetchError::Download(format!(
                "file://{path}: read timed out after {:?}",
                Duration::from_secs(15)
            ))
        );
        // The real file system refuses the FIFO before opening it. (Read on this thread: with
        // paused time the deadline of a read on another thread passes whenever this one idles.)
        h.fetcher.files = Arc::new(crate::store::OsFiles);
        let err = h.fetcher.fetch_file(path).unwrap_err();
        assert_eq!(
            err,
            FetchError::Download(format!("file://{path}: not a regular file (a FIFO)"))
        );
    }
}
