//! The simulated world: OCI registries and HTTP servers behind the fetchers' [`Transport`], on the
//! scenario's virtual clock (scenarios.md "Steps", "Expectations").
//!
//! A host (`host[:port]`, the scheme does not matter) may be a registry, an HTTP server, or both.
//! Requests are classified by path: `/v2/` is the registry ping (never counted, never failed),
//! `/v2/<repo>/manifests/<ref>` a *manifest* request, `/v2/<repo>/blobs/<digest>` a *blob* request,
//! anything else an HTTP *get*. Counted requests are counted per host and kind whether they succeed or
//! not, and are subject to the `fail` rules of their host and to `require_auth`.
//!
//! What it leaves to others: retries, auth flows, unpacking and verification are the fetchers' (the
//! code under test); this type only answers, like a real server would.
//!
//! # Layout
//! - this file: the hosts' state, publishing, failure rules and counts, and the [`Transport`];
//! - [`answer`]: how one request is answered (routing, manifests, blobs, injected failures);
//! - [`auth`]: `require_auth` (Basic and Bearer challenges, the token endpoint).

mod answer;
mod auth;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::content::{build_image, ImageFormat};
use super::rules::{FailRule, KindFilter};
use crate::clock::{Clock, Timestamp};
use crate::fetch::{BodyStream, HttpRequest, HttpResponse, Transport, TransportError};
use crate::url::OciRef;
use answer::Decision;
use auth::{AuthRule, Challenge};

pub use super::rules::AuthScheme;
pub use auth::TOKEN_PATH;

/// Bodies are handed out in chunks of this size, as a network would.
const CHUNK: usize = 64 * 1024;

/// The kind of a counted request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RequestKind {
    Manifest,
    Blob,
    Get,
}

impl RequestKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestKind::Manifest => "manifest",
            RequestKind::Blob => "blob",
            RequestKind::Get => "get",
        }
    }

    fn matches(self, filter: KindFilter) -> bool {
        matches!(
            (filter, self),
            (KindFilter::Any, _)
                | (KindFilter::Manifest, RequestKind::Manifest)
                | (KindFilter::Blob, RequestKind::Blob)
                | (KindFilter::Get, RequestKind::Get)
        )
    }
}

/// Counted requests of one host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestCounts {
    pub manifest: u64,
    pub blob: u64,
    pub get: u64,
}

impl RequestCounts {
    pub fn total(&self) -> u64 {
        self.manifest + self.blob + self.get
    }

    fn bump(&mut self, kind: RequestKind) {
        match kind {
            RequestKind::Manifest => self.manifest += 1,
            RequestKind::Blob => self.blob += 1,
            RequestKind::Get => self.get += 1,
        }
    }
}

/// What the world did since it was last asked, for the trace: each event's text is written into
/// one buffer (a request logs one event; a string per event cost more than writing it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorldEvents {
    text: String,
    /// When each event happened and where its text ends in `text`.
    ends: Vec<(Timestamp, usize)>,
}

impl WorldEvents {
    /// Appends an event at `at` whose text is `args`.
    fn push(&mut self, at: Timestamp, args: std::fmt::Arguments<'_>) {
        let _ = self.text.write_fmt(args);
        self.ends.push((at, self.text.len()));
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The time and text of event `i`.
    pub fn get(&self, i: usize) -> (Timestamp, &str) {
        let start = i.checked_sub(1).map_or(0, |p| self.ends[p].1);
        let (at, end) = self.ends[i];
        (at, &self.text[start..end])
    }

    pub fn iter(&self) -> impl Iterator<Item = (Timestamp, &str)> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }

    fn clear(&mut self) {
        self.text.clear();
        self.ends.clear();
    }
}

#[derive(Clone, Debug)]
struct Stored {
    media_type: String,
    bytes: Bytes,
}

#[derive(Debug, Default)]
struct Repo {
    /// tag → manifest digest (hex).
    tags: BTreeMap<String, String>,
    /// digest (hex) → manifest.
    manifests: BTreeMap<String, Stored>,
    /// digest (hex) → blob.
    blobs: BTreeMap<String, Bytes>,
}

#[derive(Debug, Default)]
struct Host {
    repos: BTreeMap<String, Repo>,
    /// path (with query) → body.
    paths: BTreeMap<String, Bytes>,
    rules: Vec<FailRule>,
    /// What `require_auth` demands.
    auth: Option<AuthRule>,
}

/// An image built for a module, kept for the next publish of the same module in the same format
/// (building one hashes and serialises every blob; scenarios publish the same modules again and
/// again). One per module name and format, replaced when the bytes differ.
#[derive(Debug)]
struct BuiltImage {
    format: ImageFormat,
    module: Vec<u8>,
    blobs: Vec<(String, Bytes)>,
    manifests: Vec<(String, Stored)>,
    top: String,
}

impl BuiltImage {
    fn new(name: &str, module: &[u8], format: ImageFormat) -> Self {
        let image = build_image(name, module, format);
        let top = image.top().digest.clone();
        BuiltImage {
            format,
            module: module.to_vec(),
            blobs: (image.blobs.into_iter())
                .map(|b| (b.digest, Bytes::from(b.bytes)))
                .collect(),
            manifests: (image.manifests.into_iter())
                .map(|m| {
                    let stored = Stored {
                        media_type: m.media_type,
                        bytes: Bytes::from(m.bytes),
                    };
                    (m.digest, stored)
                })
                .collect(),
            top,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    hosts: BTreeMap<String, Host>,
    /// Module name → its images, one per format.
    images: BTreeMap<String, Vec<BuiltImage>>,
    counts: BTreeMap<String, RequestCounts>,
    events: WorldEvents,
    challenge: Option<Challenge>,
}

/// Request URLs taken apart, kept: the fetchers request the same few URLs again and again. When
/// it holds this many, it starts afresh.
const MAX_SPLIT_URLS: usize = 4096;

/// The simulated hosts. Thread-safe; the locks are never held across an `.await`.
pub struct SimWorld {
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
    /// Request URLs taken apart ([`answer::split_request_url`]), `None` for one that is not
    /// http(s).
    urls: Mutex<HashMap<String, Option<Arc<answer::SplitUrl>>>>,
}

impl std::fmt::Debug for SimWorld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimWorld").finish_non_exhaustive()
    }
}

/// A body in chunks, optionally breaking off.
struct SimBody {
    data: Bytes,
    pos: usize,
    reset_after: Option<usize>,
}

#[async_trait]
impl BodyStream for SimBody {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, TransportError> {
        let end = self
            .reset_after
            .unwrap_or(self.data.len())
            .min(self.data.len());
        if self.pos >= end {
            return match self.reset_after {
                Some(_) => Err(TransportError::Reset("connection reset by peer".into())),
                None => Ok(None),
            };
        }
        let next = (self.pos + CHUNK).min(end);
        let chunk = self.data.slice(self.pos..next);
        self.pos = next;
        Ok(Some(chunk))
    }
}

impl SimWorld {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        SimWorld {
            clock,
            state: Mutex::new(State::default()),
            urls: Mutex::default(),
        }
    }

    /// `url` taken apart, parsed once.
    fn split_url(&self, url: &str) -> Option<Arc<answer::SplitUrl>> {
        let mut urls = self.urls.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(split) = urls.get(url) {
            return split.clone();
        }
        if urls.len() >= MAX_SPLIT_URLS {
            urls.clear();
        }
        let split = answer::split_request_url(url).map(Arc::new);
        urls.insert(url.to_string(), split.clone());
        split
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that matters
        // to a report; keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pushes the image of `module` to `r` (tag `latest` when untagged) and points the tag at it.
    /// Returns the digest of the tagged manifest.
    pub fn publish_oci(
        &self,
        r: &OciRef,
        name: &str,
        module: &[u8],
        format: ImageFormat,
    ) -> String {
        let mut guard = self.state();
        let st = &mut *guard;
        // Looked up before anything is allocated: a scenario publishes the same few modules to the
        // same few repositories again and again.
        let images = entry_of(&mut st.images, name);
        let image = match images.iter().position(|i| i.format == format) {
            Some(i) => {
                if images[i].module != module {
                    images[i] = BuiltImage::new(name, module, format);
                }
                &images[i]
            }
            None => {
                images.push(BuiltImage::new(name, module, format));
                &images[images.len() - 1]
            }
        };
        let registry = if r.registry.bytes().any(|b| b.is_ascii_uppercase()) {
            std::borrow::Cow::Owned(r.registry.to_ascii_lowercase())
        } else {
            std::borrow::Cow::Borrowed(r.registry.as_str())
        };
        let repo = entry_of(&mut entry_of(&mut st.hosts, &registry).repos, &r.repository);
        // A digest names the bytes: one already there is the same blob or manifest.
        for (digest, bytes) in &image.blobs {
            if !repo.blobs.contains_key(digest) {
                repo.blobs.insert(digest.clone(), bytes.clone());
            }
        }
        for (digest, stored) in &image.manifests {
            match repo.manifests.get_mut(digest) {
                Some(have) if have.media_type == stored.media_type => {}
                Some(have) => *have = stored.clone(),
                None => {
                    repo.manifests.insert(digest.clone(), stored.clone());
                }
            }
        }
        let tag = r.tag_or_latest();
        match repo.tags.get_mut(tag) {
            Some(have) if *have == image.top => {}
            Some(have) => have.clone_from(&image.top),
            None => {
                repo.tags.insert(tag.to_string(), image.top.clone());
            }
        }
        image.top.clone()
    }

    /// Makes `path` of `authority` answer `body`.
    pub fn publish_http(&self, authority: &str, path: &str, body: Vec<u8>) {
        self.state()
            .hosts
            .entry(authority.to_string())
            .or_default()
            .paths
            .insert(path.to_string(), Bytes::from(body));
    }

    /// Removes a tag (or, for a digest reference, the manifest); blobs stay. False if nothing was
    /// published there.
    pub fn unpublish_oci(&self, r: &OciRef) -> bool {
        let mut st = self.state();
        let Some(repo) = st
            .hosts
            .get_mut(&r.registry.to_ascii_lowercase())
            .and_then(|h| h.repos.get_mut(&r.repository))
        else {
            return false;
        };
        match &r.digest {
            Some(d) => repo.manifests.remove(d).is_some(),
            None => repo.tags.remove(r.tag_or_latest()).is_some(),
        }
    }

    pub fn unpublish_http(&self, authority: &str, path: &str) -> bool {
        self.state()
            .hosts
            .get_mut(authority)
            .is_some_and(|h| h.paths.remove(path).is_some())
    }

    /// The hex manifest digest `r` currently resolves to.
    pub fn digest(&self, r: &OciRef) -> Option<String> {
        let st = self.state();
        let repo = st
            .hosts
            .get(&r.registry.to_ascii_lowercase())?
            .repos
            .get(&r.repository)?;
        match &r.digest {
            Some(d) => repo.manifests.contains_key(d).then(|| d.clone()),
            None => repo.tags.get(r.tag_or_latest()).cloned(),
        }
    }

    pub fn add_rule(&self, rule: FailRule) {
        self.state()
            .hosts
            .entry(rule.host.clone())
            .or_default()
            .rules
            .push(rule);
    }

    /// Removes every failure rule of `host`; returns how many there were.
    pub fn recover(&self, host: &str) -> usize {
        self.state()
            .hosts
            .get_mut(host)
            .map_or(0, |h| std::mem::take(&mut h.rules).len())
    }

    pub fn require_auth(&self, host: &str, username: &str, password: &str, scheme: AuthScheme) {
        self.state().hosts.entry(host.to_string()).or_default().auth = Some(AuthRule {
            userpass: format!("{username}:{password}"),
            scheme,
        });
    }

    /// Counted requests per host since the start.
    pub fn counts(&self) -> BTreeMap<String, RequestCounts> {
        self.state().counts.clone()
    }

    /// Moves the events so far into `out` (emptied first); the world keeps `out`'s buffers for the
    /// next ones, so a run that drains every step allocates for its events only while they grow.
    pub fn take_events_into(&self, out: &mut WorldEvents) {
        out.clear();
        std::mem::swap(out, &mut self.state().events);
    }
}

/// `map[key]`, inserted empty first when absent: the key is allocated only then.
fn entry_of<'m, V: Default>(map: &'m mut BTreeMap<String, V>, key: &str) -> &'m mut V {
    if !map.contains_key(key) {
        map.insert(key.to_string(), V::default());
    }
    map.get_mut(key).expect("inserted above when absent")
}

#[async_trait]
impl Transport for SimWorld {
    async fn get(
        &self,
        req: &HttpRequest,
        timeout: Duration,
    ) -> Result<HttpResponse, TransportError> {
        let now = self.clock.now();
        match self.decide(req, now) {
            Decision::Fail(e) => Err(e),
            Decision::Timeout => {
                // No answer until the attempt's deadline: virtual time passes (other work due
                // meanwhile runs at its own time under the simulator's paused tokio clock).
                self.clock.sleep(timeout).await;
                Err(TransportError::Timeout)
            }
            Decision::Answer(a) => {
                let mut headers = a.headers;
                headers.push(("content-length".into(), a.body.len().to_string().into()));
                Ok(HttpResponse {
                    status: a.status,
                    headers,
                    body: Box::new(SimBody {
                        data: a.body,
                        pos: 0,
                        reset_after: a.reset_after,
                    }),
                })
            }
        }
    }
}
