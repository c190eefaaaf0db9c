//! One pass from a response body to a staged module (behavior.md §4): every chunk is counted
//! against the size limit as it arrives, hashed, and either written straight into the staging file
//! that becomes the module (a plain Wasm body, a Wasm artifact layer) or fed to the unpacker
//! (gzip, tar, tar.gz, image layers) while the rest is still on its way. Nothing is read back.
//!
//! On a multi-threaded runtime (`serve`) hashing and unpacking run on blocking threads of their
//! own, fed through small bounded queues of the body's own chunks (no copies): receiving, hashing
//! and writing overlap, and memory stays flat in the module's size. On a current-thread runtime
//! (the simulator, whose virtual clock must see no work outside its own thread, and unit tests)
//! hashing runs inline and an archive is staged whole and unpacked afterwards by the same code
//! (see [`super::cpu_bound`]).

use std::io::{self, Read, Write};
use std::sync::Arc;

use bytes::{Buf, Bytes};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::request::{transport_failure, ErrorKind, TransferLimit};
use super::retry::AttemptError;
use super::unpack::{check_wasm, MIN_WASM_SIZE, WASM_MAGIC};
use super::{BodyStream, FetchError, StagedModule};
use crate::store::{ModuleStore, StagedFile};

/// Chunks queued for a hashing or unpacking thread. Each is at most one read of the connection
/// (hyper reads up to ~400 KiB), so a pull holds a couple of MiB at most whatever the module's
/// size; a few chunks are enough slack for the threads to overlap.
const QUEUE: usize = 4;

/// What a body holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    /// An HTTP body: plain Wasm, or gzip / tar / tar.gz around it, told by its first bytes.
    Any,
    /// A Wasm artifact layer: the body is the module.
    Wasm,
    /// A Docker or OCI compat image layer: `plugin.wasm` inside a tar(.gz).
    ImageLayer,
}

/// The digest the body must have (an OCI layer's descriptor), and the URL a mismatch names.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Expected<'a> {
    pub sha256: &'a str,
    pub url: &'a str,
}

/// Reads `body` to its end into a staged module.
///
/// Errors: the transport's (retried as usual), [`FetchError::TooLarge`] as soon as the body or the
/// module passes its limit, a digest mismatch (retried: the bytes were damaged on the way), and
/// the unpacker's ([`FetchError::InvalidModule`], final). A body whose digest is checked is read
/// to its end before its content is judged, so a damaged transfer is retried, never mistaken for
/// an invalid module. Nothing staged survives a failure.
pub(crate) async fn stream_module(
    store: &Arc<dyn ModuleStore>,
    url: &str,
    body: &mut dyn BodyStream,
    layout: Layout,
    expected: Option<Expected<'_>>,
    limit: TransferLimit,
    kind: ErrorKind,
) -> Result<StagedModule, AttemptError> {
    let mut pass = Pass {
        store: store.clone(),
        layout,
        hash_body: expected.is_some(),
        limit,
        head: Vec::with_capacity(MIN_WASM_SIZE),
        pending: Vec::new(),
        size: 0,
        sink: None,
        hasher: None,
    };
    let read = async {
        while let Some(chunk) = body
            .next_chunk()
            .await
            .map_err(|e| transport_failure(url, e, kind))?
        {
            pass.push(chunk).await?;
        }
        Ok(())
    }
    .await;
    match read {
        Ok(()) => pass.finish(expected).await,
        Err(e) => {
            pass.abandon().await;
            Err(e)
        }
    }
}

/// Where the body goes once its format is known.
enum Sink {
    /// The body is the module: written to its staging file as it arrives.
    Module(Box<dyn StagedFile>),
    /// The body holds the module: fed to the unpacker.
    Unpack(Unpacker),
    /// The unpacker gave up early, but the body's digest is still to be checked: only hashed.
    Failed(Unpacker),
}

struct Pass {
    store: Arc<dyn ModuleStore>,
    layout: Layout,
    /// Whether the body's own sha256 is wanted even when it is not the module.
    hash_body: bool,
    limit: TransferLimit,
    /// The first bytes of the body (its Wasm header, when it is the module).
    head: Vec<u8>,
    /// Chunks received before the format was known.
    pending: Vec<Bytes>,
    size: u64,
    sink: Option<Sink>,
    hasher: Option<Hasher>,
}

impl Pass {
    async fn push(&mut self, chunk: Bytes) -> Result<(), AttemptError> {
        self.size += chunk.len() as u64;
        // A plain module is held to the module limit; an archive to the limit plus its framing.
        let max = match self.sink {
            Some(Sink::Module(_)) => self.limit.module,
            _ => self.limit.bytes,
        };
        if self.size > max {
            return Err(AttemptError::Fatal(FetchError::TooLarge {
                limit: self.limit.module,
            }));
        }
        if self.head.len() < MIN_WASM_SIZE {
            let n = (MIN_WASM_SIZE - self.head.len()).min(chunk.len());
            self.head.extend_from_slice(&chunk[..n]);
        }
        if self.sink.is_none() {
            self.pending.push(chunk);
            if self.layout != Layout::Any || self.head.len() >= WASM_MAGIC.len() {
                self.choose()?;
                for chunk in std::mem::take(&mut self.pending) {
                    self.feed(chunk).await?;
                }
                // The chosen limit applies to what came before too.
                if matches!(self.sink, Some(Sink::Module(_))) && self.size > self.limit.module {
                    return Err(AttemptError::Fatal(FetchError::TooLarge {
                        limit: self.limit.module,
                    }));
                }
            }
            return Ok(());
        }
        self.feed(chunk).await
    }

    /// Picks the sink by the layout and, for an HTTP body, by its first bytes.
    fn choose(&mut self) -> Result<(), AttemptError> {
        let io = |e| AttemptError::Fatal(FetchError::io(e));
        let plain = match self.layout {
            Layout::Wasm => true,
            Layout::ImageLayer => false,
            Layout::Any => self.head.starts_with(&WASM_MAGIC),
        };
        let consume: Consume = match self.layout {
            Layout::ImageLayer => super::unpack::extract_plugin_wasm,
            _ => super::unpack::unpack_module,
        };
        self.sink = Some(if plain {
            self.hasher = Some(Hasher::start());
            Sink::Module(self.store.stage().map_err(io)?)
        } else {
            if self.hash_body {
                self.hasher = Some(Hasher::start());
            }
            Sink::Unpack(Unpacker::start(&self.store, consume, self.limit.module).map_err(io)?)
        });
        Ok(())
    }

    async fn feed(&mut self, chunk: Bytes) -> Result<(), AttemptError> {
        if let Some(h) = &mut self.hasher {
            h.update(&chunk).await;
        }
        match self.sink.as_mut() {
            Some(Sink::Module(file)) => file
                .write_all(&chunk)
                .map_err(|e| AttemptError::Fatal(FetchError::io(e))),
            Some(Sink::Unpack(u)) => {
                if u.feed(chunk)
                    .await
                    .map_err(|e| AttemptError::Fatal(FetchError::io(e)))?
                {
                    return Ok(());
                }
                let Some(Sink::Unpack(u)) = self.sink.take() else {
                    unreachable!("matched above")
                };
                if self.hash_body {
                    // Read on: only a body whose digest matches may be judged invalid.
                    self.sink = Some(Sink::Failed(u));
                    return Ok(());
                }
                Err(AttemptError::Fatal(u.finish().await.err().unwrap_or_else(
                    || FetchError::InvalidModule("unpacking stopped before the body ended".into()),
                )))
            }
            Some(Sink::Failed(_)) => Ok(()),
            None => unreachable!("fed only once a sink was chosen"),
        }
    }

    async fn finish(
        mut self,
        expected: Option<Expected<'_>>,
    ) -> Result<StagedModule, AttemptError> {
        if self.sink.is_none() {
            // The body ended before its format was known: it is too short to be anything but the
            // unpacker's to refuse.
            self.choose()?;
            for chunk in std::mem::take(&mut self.pending) {
                self.feed(chunk).await?;
            }
        }
        let body_sha256 = match self.hasher.take() {
            Some(h) => Some(h.finish().await.map_err(AttemptError::Fatal)?),
            None => None,
        };
        if let (Some(want), Some(got)) = (expected, &body_sha256) {
            if *got != want.sha256 {
                self.abandon().await;
                return Err(AttemptError::Retry(FetchError::Download(format!(
                    "{}: blob bytes hash to sha256:{got}, descriptor says sha256:{}",
                    want.url, want.sha256
                ))));
            }
        }
        match self.sink.take() {
            Some(Sink::Module(mut file)) => {
                file.flush()
                    .map_err(|e| AttemptError::Fatal(FetchError::io(e)))?;
                check_wasm(&self.head).map_err(AttemptError::Fatal)?;
                Ok(StagedModule {
                    file,
                    sha256: body_sha256.expect("a module body is hashed"),
                    size: self.size,
                })
            }
            Some(Sink::Unpack(u)) | Some(Sink::Failed(u)) => {
                u.finish().await.map_err(AttemptError::Fatal)
            }
            None => unreachable!("chosen above"),
        }
    }

    /// Stops every helper and drops what was staged (before returning, so that a failed attempt
    /// leaves nothing behind).
    async fn abandon(&mut self) {
        if let Some(h) = self.hasher.take() {
            let _ = h.finish().await;
        }
        match self.sink.take() {
            Some(Sink::Unpack(u)) | Some(Sink::Failed(u)) => {
                let _ = u.finish().await;
            }
            Some(Sink::Module(_)) | None => {}
        }
    }
}

/// True where work may leave the task's thread: a multi-threaded runtime.
fn offload() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
}

/// sha256 of a stream of chunks.
enum Hasher {
    Inline(Sha256),
    Thread {
        tx: mpsc::Sender<Bytes>,
        done: JoinHandle<String>,
    },
}

impl Hasher {
    fn start() -> Self {
        if !offload() {
            return Hasher::Inline(Sha256::new());
        }
        let (tx, mut rx) = mpsc::channel::<Bytes>(QUEUE);
        let done = tokio::task::spawn_blocking(move || {
            let mut h = Sha256::new();
            while let Some(chunk) = rx.blocking_recv() {
                h.update(&chunk);
            }
            hex::encode(h.finalize())
        });
        Hasher::Thread { tx, done }
    }

    async fn update(&mut self, chunk: &Bytes) {
        match self {
            Hasher::Inline(h) => h.update(chunk),
            // The thread only ends once the sender is dropped.
            Hasher::Thread { tx, .. } => {
                let _ = tx.send(chunk.clone()).await;
            }
        }
    }

    async fn finish(self) -> Result<String, FetchError> {
        match self {
            Hasher::Inline(h) => Ok(hex::encode(h.finalize())),
            Hasher::Thread { tx, done } => {
                drop(tx);
                done.await
                    .map_err(|e| FetchError::Download(format!("internal error while hashing: {e}")))
            }
        }
    }
}

/// The format code that turns a body into a module: [`super::unpack::unpack_module`] or
/// [`super::unpack::extract_plugin_wasm`].
type Consume = fn(&mut dyn Read, &mut dyn Write, u64) -> Result<(String, u64), FetchError>;

/// Unpacks a body as it arrives (on a thread of its own), or once it is staged whole.
enum Unpacker {
    Thread {
        tx: mpsc::Sender<Bytes>,
        done: JoinHandle<Result<StagedModule, FetchError>>,
    },
    Staged {
        raw: Box<dyn StagedFile>,
        store: Arc<dyn ModuleStore>,
        consume: Consume,
        max: u64,
    },
}

impl Unpacker {
    fn start(store: &Arc<dyn ModuleStore>, consume: Consume, max: u64) -> io::Result<Self> {
        let store = store.clone();
        if !offload() {
            return Ok(Unpacker::Staged {
                raw: store.stage()?,
                store,
                consume,
                max,
            });
        }
        let (tx, rx) = mpsc::channel::<Bytes>(QUEUE);
        let done = tokio::task::spawn_blocking(move || {
            let mut input = ChannelReader {
                rx,
                chunk: Bytes::new(),
            };
            unpack(store.as_ref(), &mut input, consume, max)
        });
        Ok(Unpacker::Thread { tx, done })
    }

    /// Hands on a chunk; false once the unpacker stopped reading (it failed).
    async fn feed(&mut self, chunk: Bytes) -> io::Result<bool> {
        match self {
            Unpacker::Thread { tx, .. } => Ok(tx.send(chunk).await.is_ok()),
            Unpacker::Staged { raw, .. } => raw.write_all(&chunk).map(|()| true),
        }
    }

    /// The module, once the body has ended (or the unpacker's error).
    async fn finish(self) -> Result<StagedModule, FetchError> {
        match self {
            Unpacker::Thread { tx, done } => {
                drop(tx);
                done.await.map_err(|e| {
                    FetchError::Download(format!("internal error while unpacking: {e}"))
                })?
            }
            Unpacker::Staged {
                mut raw,
                store,
                consume,
                max,
            } => super::cpu_bound(|| {
                let mut input = raw.reader().map_err(FetchError::io)?;
                unpack(store.as_ref(), &mut input, consume, max)
            }),
        }
    }
}

/// Runs `consume` from `input` into a new staging file, then reads `input` to its end (archive
/// framing after the module).
fn unpack(
    store: &dyn ModuleStore,
    input: &mut dyn Read,
    consume: Consume,
    max: u64,
) -> Result<StagedModule, FetchError> {
    let mut file = store.stage().map_err(FetchError::io)?;
    let (sha256, size) = consume(input, &mut file, max)?;
    io::copy(input, &mut io::sink()).map_err(FetchError::io)?;
    Ok(StagedModule { file, sha256, size })
}

/// The chunks of a queue as one `Read` (on a blocking thread); the end of the queue is the end of
/// the stream.
struct ChannelReader {
    rx: mpsc::Receiver<Bytes>,
    chunk: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.chunk = chunk,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        self.chunk.advance(n);
        Ok(n)
    }
}
