//! The sha256 of the manifest bytes last read from each manifest URL. A revalidation reads the
//! same bytes again and again (the tag did not move); comparing them with the bytes hashed last
//! time costs a fraction of hashing them again. The two latest different manifests of a URL are
//! kept, so a tag moved back (a rollback, a tag switched between two images) is not hashed again
//! either. The digest stays a function of the bytes: it is reused only for bytes equal to those it
//! was computed from.
//!
//! Bounded like [`super::manifest::ParsedManifests`]: manifests of at most
//! [`MAX_REMEMBERED_BYTES`] bytes, two per URL, [`MAX_REMEMBERED_URLS`] URLs (it starts afresh
//! when full): 8 MiB at most.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use crate::store::sha256_hex;

const MAX_REMEMBERED_BYTES: usize = 16 << 10;
const MAX_REMEMBERED_URLS: usize = 256;

#[derive(Default)]
pub(super) struct ManifestDigests {
    /// URL → the two latest different bytes read from it and their hex sha256, latest first.
    last: Mutex<HashMap<String, Latest>>,
    /// Digests computed (not found here), for the tests.
    #[cfg(test)]
    hashed: std::sync::atomic::AtomicUsize,
}

/// Bytes and their hex sha256, the latest first (the second empty until a URL gave two).
type Latest = [(Vec<u8>, String); 2];

/// The digests every fetcher of the process computed (true for any of them).
pub(super) static MANIFEST_DIGESTS: LazyLock<ManifestDigests> =
    LazyLock::new(ManifestDigests::default);

impl ManifestDigests {
    /// The hex sha256 of `bytes`, read from `url`.
    pub(super) fn sha256(&self, url: &str, bytes: &[u8]) -> String {
        let lock = || self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(latest) = lock().get_mut(url) {
            if let Some(i) = latest.iter().position(|(b, d)| !d.is_empty() && b == bytes) {
                latest.swap(0, i);
                return latest[0].1.clone();
            }
        }
        #[cfg(test)]
        self.hashed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let digest = sha256_hex(bytes);
        if bytes.len() <= MAX_REMEMBERED_BYTES {
            let mut last = lock();
            match last.get_mut(url) {
                Some(latest) => {
                    // The older one makes room (its buffers reused) and the new one goes first.
                    latest.swap(0, 1);
                    let (b, d) = &mut latest[0];
                    b.clear();
                    b.extend_from_slice(bytes);
                    d.clone_from(&digest);
                }
                None => {
                    if last.len() >= MAX_REMEMBERED_URLS {
                        last.clear();
                    }
                    let latest = [(bytes.to_vec(), digest.clone()), Default::default()];
                    last.insert(url.to_string(), latest);
                }
            }
        }
        digest
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn the_same_bytes_again_are_not_hashed_again_and_other_bytes_are() {
        let digests = ManifestDigests::default();
        let hashed = || digests.hashed.load(Ordering::Relaxed);
        let (a, b) = (br#"{"a":1}"#.to_vec(), br#"{"b":2}"#.to_vec());
        let url = "https://reg.example/v2/r/manifests/v1";
        assert_eq!(digests.sha256(url, &a), sha256_hex(&a));
        assert_eq!(hashed(), 1);
        assert_eq!(digests.sha256(url, &a), sha256_hex(&a));
        assert_eq!(hashed(), 1, "same bytes from the same URL: reused");
        assert_eq!(digests.sha256(url, &b), sha256_hex(&b));
        assert_eq!(hashed(), 2, "other bytes: hashed");
        // Same length, one byte different.
        let mut c = b.clone();
        c[2] ^= 1;
        assert_eq!(digests.sha256(url, &c), sha256_hex(&c));
        assert_eq!(hashed(), 3);
        // The tag moved back: the two latest manifests of a URL are remembered.
        assert_eq!(digests.sha256(url, &b), sha256_hex(&b));
        assert_eq!(hashed(), 3, "the previous bytes of the URL: reused");
        assert_eq!(digests.sha256(url, &c), sha256_hex(&c));
        assert_eq!(hashed(), 3);
        // A third one pushes out the older of the two (b was read after c, so c goes).
        assert_eq!(digests.sha256(url, &b), sha256_hex(&b));
        assert_eq!(digests.sha256(url, &a), sha256_hex(&a));
        assert_eq!(hashed(), 4);
        assert_eq!(digests.sha256(url, &b), sha256_hex(&b));
        assert_eq!(hashed(), 4);
        assert_eq!(digests.sha256(url, &c), sha256_hex(&c));
        assert_eq!(hashed(), 5, "only two remembered per URL");
        // An empty body is hashed like any other (the empty slot is not taken for it).
        let other = "https://reg.example/v2/r/manifests/v2";
        assert_eq!(digests.sha256(other, b""), sha256_hex(b""));
        assert_eq!(hashed(), 6);
        assert_eq!(digests.sha256(other, &b), sha256_hex(&b));
        assert_eq!(hashed(), 7, "remembered per URL");
    }

    #[test]
    fn large_manifests_are_hashed_every_time_and_the_table_stays_bounded() {
        let digests = ManifestDigests::default();
        let big = vec![b'x'; MAX_REMEMBERED_BYTES + 1];
        let url = "https://reg.example/v2/r/manifests/big";
        for _ in 0..3 {
            assert_eq!(digests.sha256(url, &big), sha256_hex(&big));
        }
        assert_eq!(digests.hashed.load(Ordering::Relaxed), 3);
        for i in 0..MAX_REMEMBERED_URLS * 2 + 1 {
            digests.sha256(&format!("https://reg.example/v2/r/manifests/{i}"), b"{}");
            assert!(digests.last.lock().unwrap().len() <= MAX_REMEMBERED_URLS);
        }
    }
}
