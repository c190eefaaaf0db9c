//! `file://` modules (behavior.md §2: no pull policy applies): read through
//! [`FileSource`](crate::store::FileSource) (the real file system in `serve`, memory in `sim`),
//! and verified. Unlike HTTP bodies they are not unpacked: with file delivery Envoy reads the file
//! itself, so it must be a plain Wasm binary (a gzip or tar file is `invalid_module`).

use std::io::{self, Read, Write};

use sha2::{Digest, Sha256};

use super::unpack::check_wasm;
use super::{FetchError, Fetcher, StagedModule};

impl Fetcher {
    /// Reads the module at `path` (an absolute local path, without `file://`).
    ///
    /// Errors: [`FetchError::Download`] when the file cannot be opened or read (naming the path),
    /// [`FetchError::TooLarge`], [`FetchError::InvalidModule`].
    pub fn fetch_file(&self, path: &str) -> Result<StagedModule, FetchError> {
        let mut input = self.files.open(path).map_err(|e| {
            FetchError::Download(match e.kind() {
                io::ErrorKind::NotFound => format!("file://{path}: no such file"),
                _ => format!("file://{path}: {e}"),
            })
        })?;
        let mut out = self.store.stage().map_err(FetchError::io)?;
        let limit = self.config.max_binary_size;
        let (mut hasher, mut size, mut prefix) = (Sha256::new(), 0u64, Vec::with_capacity(8));
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = input
                .read(&mut buf)
                .map_err(|e| FetchError::Download(format!("file://{path}: {e}")))?;
            if n == 0 {
                break;
            }
            size += n as u64;
            if size > limit {
                return Err(FetchError::TooLarge { limit });
            }
            if prefix.len() < 8 {
                prefix.extend_from_slice(&buf[..n.min(8 - prefix.len())]);
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(FetchError::io)?;
        }
        check_wasm(&prefix).map_err(|e| match e {
            FetchError::InvalidModule(m) => FetchError::InvalidModule(format!(
                "file://{path}: {m} (file modules must be plain Wasm binaries)"
            )),
            other => other,
        })?;
        let sha256 = hex::encode(hasher.finalize());
        Ok(StagedModule {
            file: out,
            sha256,
            size,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use crate::fetch::fake::{config, harness};
    use crate::fetch::unpack::tests::{gzip, tar_of, wasm};
    use crate::fetch::FetchError;
    use crate::outcome::Reason;
    use crate::store::sha256_hex;

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
}
