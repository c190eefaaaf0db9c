//! A scripted [`Transport`](super::Transport) for the fetchers' unit tests: answers by URL from
//! replies given in advance (the n-th request to a URL gets the n-th reply), logs every request and
//! advances a manual clock on timeouts; plus a [`Harness`] putting a [`Fetcher`] on top of it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::clock::{ManualClock, Timestamp};
use crate::fetch::{
    BodyStream, FetchConfig, Fetcher, HttpRequest, HttpResponse, Transport, TransportError,
};
use crate::store::{MemFiles, MemStore};

/// What the fake answers to one request.
#[derive(Clone, Debug)]
pub(crate) enum Reply {
    Response {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        /// The body breaks off with this error after its bytes.
        then: Option<TransportError>,
    },
    /// A transport error; `Timeout` advances the clock by the attempt's timeout first.
    Error(TransportError),
}

impl Reply {
    pub(crate) fn ok(body: impl Into<Vec<u8>>) -> Self {
        Reply::Response {
            status: 200,
            headers: Vec::new(),
            body: body.into(),
            then: None,
        }
    }

    pub(crate) fn status(status: u16) -> Self {
        Reply::Response {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            then: None,
        }
    }

    pub(crate) fn redirect(status: u16, location: &str) -> Self {
        Reply::status(status).header("location", location)
    }

    pub(crate) fn header(mut self, name: &str, value: &str) -> Self {
        if let Reply::Response { headers, .. } = &mut self {
            headers.push((name.to_ascii_lowercase(), value.to_string()));
        }
        self
    }

    /// A 200 whose body breaks off after `prefix`.
    pub(crate) fn broken(prefix: impl Into<Vec<u8>>, e: TransportError) -> Self {
        Reply::Response {
            status: 200,
            headers: Vec::new(),
            body: prefix.into(),
            then: Some(e),
        }
    }
}

type Handler = Box<dyn Fn(&HttpRequest, usize) -> Reply + Send + Sync>;

/// Answers by URL (the query string is ignored for matching); unknown URLs get 404. Every
/// request is logged.
pub(crate) struct FakeTransport {
    pub(crate) clock: Arc<ManualClock>,
    routes: Mutex<Vec<(String, Arc<Handler>)>>,
    log: Mutex<Vec<HttpRequest>>,
}

impl FakeTransport {
    pub(crate) fn route(
        &self,
        url: &str,
        h: impl Fn(&HttpRequest, usize) -> Reply + Send + Sync + 'static,
    ) {
        self.routes
            .lock()
            .unwrap()
            .push((url.to_string(), Arc::new(Box::new(h))));
    }

    /// The n-th request gets `replies[n]`, the last one repeating.
    pub(crate) fn script(&self, url: &str, replies: Vec<Reply>) {
        self.route(url, move |_, n| replies[n.min(replies.len() - 1)].clone());
    }

    pub(crate) fn requests(&self) -> Vec<HttpRequest> {
        self.log.lock().unwrap().clone()
    }

    /// Requests to `url` (query ignored).
    pub(crate) fn count(&self, url: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|r| strip_query(&r.url) == url)
            .count()
    }
}

fn strip_query(url: &str) -> &str {
    url.split('?').next().unwrap_or(url)
}

struct ScriptedBody {
    chunks: Vec<Bytes>,
    then: Option<TransportError>,
}

#[async_trait]
impl BodyStream for ScriptedBody {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, TransportError> {
        if !self.chunks.is_empty() {
            return Ok(Some(self.chunks.remove(0)));
        }
        match self.then.take() {
            Some(e) => Err(e),
            None => Ok(None),
        }
    }
}

#[async_trait]
impl Transport for FakeTransport {
    async fn get(
        &self,
        req: &HttpRequest,
        timeout: Duration,
    ) -> Result<HttpResponse, TransportError> {
        let key = strip_query(&req.url).to_string();
        let n = self.count(&key);
        self.log.lock().unwrap().push(req.clone());
        let handler = self
            .routes
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|(u, _)| *u == key)
            .map(|(_, h)| h.clone());
        let reply = match handler {
            Some(h) => h(req, n),
            None => Reply::status(404),
        };
        match reply {
            Reply::Error(TransportError::Timeout) => {
                self.clock.advance(timeout);
                Err(TransportError::Timeout)
            }
            Reply::Error(e) => Err(e),
            Reply::Response {
                status,
                headers,
                body,
                then,
            } => Ok(HttpResponse {
                status,
                headers: headers
                    .into_iter()
                    .map(|(k, v)| (k.into(), v.into()))
                    .collect(),
                body: Box::new(ScriptedBody {
                    // Several chunks, so that limits are checked mid-stream.
                    chunks: body.chunks(4096).map(Bytes::copy_from_slice).collect(),
                    then,
                }),
            }),
        }
    }
}

pub(crate) struct Harness {
    pub(crate) fetcher: Fetcher,
    pub(crate) clock: Arc<ManualClock>,
    pub(crate) transport: Arc<FakeTransport>,
    pub(crate) files: Arc<MemFiles>,
}

pub(crate) fn config() -> FetchConfig {
    FetchConfig {
        request_timeout: Duration::from_secs(15),
        max_attempts: 5,
        pull_deadline: Duration::from_secs(30),
        max_binary_size: 1 << 20,
        insecure_registries: Vec::new(),
        allow_private_token_realm: false,
    }
}

pub(crate) fn harness(config: FetchConfig) -> Harness {
    let clock = Arc::new(ManualClock::new(Timestamp::ZERO));
    let transport = Arc::new(FakeTransport {
        clock: clock.clone(),
        routes: Mutex::new(Vec::new()),
        log: Mutex::new(Vec::new()),
    });
    let files = Arc::new(MemFiles::default());
    let fetcher = Fetcher {
        transport: transport.clone(),
        clock: clock.clone(),
        store: Arc::new(MemStore::new()),
        files: files.clone(),
        config,
        jitter: None,
    };
    Harness {
        fetcher,
        clock,
        transport,
        files,
    }
}
