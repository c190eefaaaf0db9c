//! Peak memory of one pull: `cargo run --release --example pull_rss -- <MiB>`.
//!
//! Serves a valid Wasm module of `<MiB>` mebibytes from an in-process HTTP/1.1 server on
//! 127.0.0.1, pulls it through [`Fetcher::fetch_http`] with the real [`HyperTransport`] into a
//! [`DiskStore`] in a temporary directory, commits it, and prints the process's peak resident set
//! size (`VmHWM` from `/proc/self/status`) before and after. The server generates the body on the
//! fly in 64 KiB chunks (nothing holds the module in memory), so the growth of the peak is what the
//! pull itself needs: run it for 16 and for 128 MiB and compare.
//!
//! The module's bytes are a pure function of the size, so the expected sha256 is computed the same
//! way (streamed) after the pull and checked.

#![allow(clippy::disallowed_methods)] // a measuring tool

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::StreamBody;
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

use wasm_ecds::clock::SystemClock;
use wasm_ecds::config::Config;
use wasm_ecds::fetch::hyper_transport::HyperTransport;
use wasm_ecds::fetch::{FetchConfig, Fetcher};
use wasm_ecds::store::{DiskStore, ModuleStore, OsFiles};

const CHUNK: usize = 64 << 10;

/// The module: `\0asm` version 1, then one custom section named `pad` filling the rest with
/// deterministic bytes. Produces any byte range without materialising the rest.
#[derive(Clone, Copy)]
struct Module {
    size: u64,
    header: [u8; 24],
    header_len: usize,
}

impl Module {
    fn new(size: u64) -> Module {
        assert!(size >= 32, "module too small");
        // header 8 + id 1 + LEB128(len) + len == size
        let (len, leb) = (1..=10u64)
            .map(|k| (size - 9 - k, k))
            .find(|(len, k)| leb128(*len).len() as u64 == *k)
            .map(|(len, _)| (len, leb128(len)))
            .expect("a section length fits");
        let mut header = [0u8; 24];
        let mut h = b"\0asm\x01\0\0\0\0".to_vec();
        h.extend_from_slice(&leb);
        h.push(3);
        h.extend_from_slice(b"pad");
        header[..h.len()].copy_from_slice(&h);
        assert_eq!(9 + leb.len() as u64 + len, size);
        Module {
            size,
            header,
            header_len: h.len(),
        }
    }

    /// Bytes `[offset, offset + n)`.
    fn chunk(&self, offset: u64, n: usize) -> Vec<u8> {
        (offset..offset + n as u64)
            .map(|i| match usize::try_from(i) {
                Ok(i) if i < self.header_len => self.header[i],
                _ => (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8,
            })
            .collect()
    }

    /// `(offset, len)` of every chunk, in order.
    fn chunks(self) -> impl Iterator<Item = (u64, usize)> {
        (0..self.size.div_ceil(CHUNK as u64)).map(move |k| {
            let offset = k * CHUNK as u64;
            (offset, (self.size - offset).min(CHUNK as u64) as usize)
        })
    }

    fn sha256(self) -> String {
        let mut h = Sha256::new();
        for (offset, n) in self.chunks() {
            h.update(self.chunk(offset, n));
        }
        hex::encode(h.finalize())
    }
}

fn leb128(mut n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

/// Serves `module` on 127.0.0.1, generating each 64 KiB chunk when hyper asks for it.
async fn serve(module: Module) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = service_fn(move |_req| async move {
                    let frames = module.chunks().map(move |(offset, n)| {
                        Ok::<_, Infallible>(Frame::data(Bytes::from(module.chunk(offset, n))))
                    });
                    let body = StreamBody::new(tokio_stream::iter(frames));
                    let resp = hyper::Response::builder()
                        .header("content-length", module.size.to_string())
                        .header("content-type", "application/wasm")
                        .body(body)
                        .expect("response");
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    format!("http://{addr}/module.wasm")
}

/// A `kB` field of `/proc/self/status`, in KiB.
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn main() {
    let arg = std::env::args().nth(1).unwrap_or_else(|| "16".into());
    let size_mib: u64 = arg
        .parse()
        .unwrap_or_else(|_| panic!("usage: pull_rss <MiB> (got {arg:?})"));
    let module = Module::new(size_mib << 20);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let cache = tempfile::tempdir().expect("cache dir");
    let config = Config {
        http_request_timeout: Duration::from_secs(300),
        max_binary_size: (size_mib << 20).max(1 << 30),
        ..Config::default()
    };
    let url = rt.block_on(serve(module));
    let store = Arc::new(DiskStore::open(cache.path()).expect("cache dir"));
    let fetcher = {
        let _guard = rt.enter();
        Fetcher {
            transport: Arc::new(HyperTransport::new(&config, Vec::new()).expect("transport")),
            clock: Arc::new(SystemClock),
            store: store.clone(),
            files: Arc::new(OsFiles),
            config: FetchConfig::from(&config),
            jitter: None,
        }
    };

    let hwm_before = status_kib("VmHWM");
    let rss_before = status_kib("VmRSS");
    let started = Instant::now();
    let staged = rt
        .block_on(fetcher.fetch_http(&url, fetcher.budget()))
        .unwrap_or_else(|e| panic!("pull failed: {e}"));
    let (sha256, size) = (staged.sha256.clone(), staged.size);
    let path = store
        .commit(staged.file, &url, &sha256)
        .expect("commit into the cache");
    let elapsed = started.elapsed();
    let hwm_after = status_kib("VmHWM");
    let rss_after = status_kib("VmRSS");

    let on_disk = std::fs::metadata(&path).expect("committed module").len();
    assert_eq!(size, module.size, "module size");
    assert_eq!(on_disk, module.size, "committed file size");
    assert_eq!(sha256, module.sha256(), "module sha256");

    println!(
        "module: {size_mib} MiB ({} bytes), sha256 {}",
        module.size,
        &sha256[..16]
    );
    println!(
        "pull + commit: {:.2} s, {:.0} MiB/s",
        elapsed.as_secs_f64(),
        size_mib as f64 / elapsed.as_secs_f64()
    );
    println!(
        "VmRSS before {:.1} MiB, after {:.1} MiB",
        mib(rss_before),
        mib(rss_after)
    );
    println!(
        "peak RSS (VmHWM) before {:.1} MiB, after {:.1} MiB, growth {:.1} MiB",
        mib(hwm_before),
        mib(hwm_after),
        mib(hwm_after.saturating_sub(hwm_before))
    );
}
