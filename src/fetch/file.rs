//! `file://` modules (behavior.md §2: no pull policy applies): read through
//! [`FileSource`](crate::store::FileSource) (the real file system in `serve`, memory in `sim`),
//! unpacked like an HTTP body (plain Wasm, gzip, tar, tar.gz) and staged like any other module.

use std::io;

use super::unpack::unpack_module;
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
        let (sha256, size) = unpack_module(&mut input, &mut out, self.config.max_binary_size)
            .map_err(|e| match e {
                FetchError::Download(m) => FetchError::Download(format!("file://{path}: {m}")),
                other => other,
            })?;
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

    use crate::fetch::http::fake::{config, harness};
    use crate::fetch::unpack::tests::{gzip, tar_of, wasm};
    use crate::fetch::FetchError;
    use crate::outcome::Reason;
    use crate::store::sha256_hex;

    #[test]
    fn reads_and_unpacks_local_modules() {
        let h = harness(config());
        let module = wasm(40);
        h.files.put("/opt/plain.wasm", module.clone());
        h.files.put(
            "/opt/packed.tgz",
            gzip(&tar_of(&[("plugin.wasm", &module)])),
        );
        for path in ["/opt/plain.wasm", "/opt/packed.tgz"] {
            let mut m = h.fetcher.fetch_file(path).unwrap();
            assert_eq!(m.sha256, sha256_hex(&module), "{path}");
            let mut back = Vec::new();
            m.file.reader().unwrap().read_to_end(&mut back).unwrap();
            assert_eq!(back, module);
        }
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
