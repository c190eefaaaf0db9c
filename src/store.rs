//! Where module bytes live: the on-disk cache directory in `serve`, memory in `sim` (style guide §2).
//!
//! Layout (behavior.md §5): `<dir>/<hex sha256 of module name>/<checksum>.wasm`, plus `index.json`
//! holding the remembered URL → checksum resolutions. Modules are written to a staging file first and
//! renamed into place only after they were verified, so a crash never leaves a partial module under
//! its final name. Staging files live in `<dir>/.staging/` and are removed at start.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

mod hooked;
pub use hooked::{HookedStore, StoreHooks};

pub const INDEX_FILE: &str = "index.json";
const STAGING_DIR: &str = ".staging";

/// Hex sha256 of a string (the directory name of a module).
pub fn sha256_hex(data: &[u8]) -> String {
    // Into a buffer of the final size (`hex::encode` collects the digits one char at a time).
    let mut hex = [0u8; 64];
    hex::encode_to_slice(Sha256::digest(data), &mut hex).expect("64 digits for 32 bytes");
    String::from_utf8_lossy(&hex).into_owned()
}

/// A file being written; readable again (from the start) before it is committed. Dropping it
/// without committing deletes it.
pub trait StagedFile: Write + Send {
    /// A reader over everything written so far, from the start.
    fn reader(&mut self) -> io::Result<Box<dyn Read + Send + '_>>;
    /// Empties the file (to reuse it for another attempt).
    fn truncate(&mut self) -> io::Result<()>;
    /// Makes what was written durable, so that [`ModuleStore::commit`] only renames. Optional:
    /// `commit` syncs a file that was not synced (or was written to since).
    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn as_any(self: Box<Self>) -> Box<dyn std::any::Any>;
}

/// A module file found in the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredModule {
    /// The directory: hex sha256 of the module name.
    pub name_hash: String,
    pub checksum: String,
    pub path: PathBuf,
    pub size: u64,
}

/// Storage of module files and of the small cache index.
///
/// Contract: thread-safe; `commit` is atomic (the final name holds a complete file or nothing);
/// paths returned are the ones `read`/`remove` accept and the ones delivered to Envoy in file mode.
pub trait ModuleStore: Send + Sync {
    fn stage(&self) -> io::Result<Box<dyn StagedFile>>;
    /// Moves a staged file to `<name_hash>/<checksum>.wasm`; replaces an existing file.
    fn commit(
        &self,
        staged: Box<dyn StagedFile>,
        module_name: &str,
        checksum: &str,
    ) -> io::Result<PathBuf>;
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// The module file for reading in pieces (the module endpoint streams it); by default its
    /// bytes read whole.
    fn open(&self, path: &Path) -> io::Result<Box<dyn Read + Send>> {
        Ok(Box::new(io::Cursor::new(self.read(path)?)))
    }
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Every committed module file.
    fn list(&self) -> io::Result<Vec<StoredModule>>;
    fn load_index(&self) -> io::Result<Option<Vec<u8>>>;
    fn save_index(&self, bytes: &[u8]) -> io::Result<()>;
    /// Removes everything (used by the simulator's `restart: {keepCache: false}`).
    fn wipe(&self) -> io::Result<()>;
    /// Whether what the store holds outlives a crash of the process. The index of such a store is
    /// written soon after every change ([`INDEX_SAVE_INTERVAL`](crate::cache::INDEX_SAVE_INTERVAL));
    /// the index of one that does not (memory) is written only at the graceful points after which
    /// it can be read again (purge passes, shutdown, restart).
    fn survives_crash(&self) -> bool {
        true
    }
    /// How many threads verify the cached files at start ([`crate::cache::verify`]); 0: the opening
    /// thread verifies them all before the cache opens (memory, where reads never wait).
    fn verify_threads(&self) -> usize {
        0
    }
}

/// Reads `file://` modules.
pub trait FileSource: Send + Sync {
    /// Opens a module file. Only regular files are modules: anything else is refused.
    fn open(&self, path: &str) -> io::Result<Box<dyn Read + Send>>;
    /// True when a read may block for an unbounded time (a real file system: a hung network
    /// mount); the fetcher then reads on a thread of its own under a deadline. False for memory.
    fn may_block(&self) -> bool {
        true
    }
}

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct OsFiles;

impl FileSource for OsFiles {
    fn open(&self, path: &str) -> io::Result<Box<dyn Read + Send>> {
        Ok(Box::new(open_regular(Path::new(path))?))
    }
}

/// Opens a regular file for reading. A FIFO, device, socket or directory is refused before it
/// is opened (a FIFO's open would wait for a writer, its reads for data); the open itself is
/// non-blocking and the opened file is checked again, so one swapped in between is refused too.
/// (`O_NONBLOCK` changes nothing for a regular file's reads.)
pub fn open_regular(path: &Path) -> io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let meta = fs::metadata(path)?;
    if !meta.is_file() {
        return Err(not_regular(&meta));
    }
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(not_regular(&meta));
    }
    Ok(file)
}

fn not_regular(meta: &fs::Metadata) -> io::Error {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    let kind = if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "not a file"
    };
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("not a regular file ({kind})"),
    )
}

// ---------------------------------------------------------------------------------------------
// Disk

/// The cache directory on disk.
#[derive(Debug)]
pub struct DiskStore {
    root: PathBuf,
    /// See [`ModuleStore::verify_threads`]; `None`: one per core.
    verify_threads: Option<usize>,
}

impl DiskStore {
    /// Opens (and creates) the cache directory; leftover staging files are removed. The root is
    /// made absolute (canonical): module paths go to Envoy as `filename`s, which Envoy would
    /// resolve against its own working directory.
    pub fn open(root: impl Into<PathBuf>) -> io::Result<Self> {
        let root = root.into();
        fs::create_dir_all(&root)?;
        let root = fs::canonicalize(&root)?;
        let staging = root.join(STAGING_DIR);
        let _ = fs::remove_dir_all(&staging);
        fs::create_dir_all(&staging)?;
        Ok(DiskStore {
            root,
            verify_threads: None,
        })
    }

    /// Verifies the cached files at start on `threads` threads (`None`: one per core; 0: all of
    /// them before the cache opens, on the opening thread).
    pub fn with_verify_threads(mut self, threads: Option<usize>) -> Self {
        self.verify_threads = threads;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

struct DiskStaged {
    file: fs::File,
    path: PathBuf,
    committed: bool,
    /// Nothing was written since the last [`StagedFile::sync`].
    synced: bool,
    /// Bytes written and not yet handed to the kernel's writeback.
    unflushed: u64,
    written: u64,
}

/// How much a staging file may hold in dirty pages before their writeback is started: the disk
/// writes while the rest downloads, and the `fsync` before the rename waits for the tail only.
const WRITE_BEHIND: u64 = 8 << 20;

impl DiskStaged {
    /// Starts (does not wait for) the writeback of what was written since the last call.
    #[cfg(target_os = "linux")]
    fn write_behind(&mut self) {
        use std::os::fd::AsRawFd;
        let (start, len) = (self.written - self.unflushed, self.unflushed);
        let (Ok(start), Ok(len)) = (i64::try_from(start), i64::try_from(len)) else {
            return;
        };
        // SAFETY: a plain syscall on a file descriptor this struct owns; it touches no memory.
        // Only a hint: failing changes nothing but when the data reaches the disk.
        let _ = unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                start,
                len,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        self.unflushed = 0;
    }

    #[cfg(not(target_os = "linux"))]
    fn write_behind(&mut self) {
        self.unflushed = 0;
    }
}

impl Write for DiskStaged {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.synced = false;
        self.written += n as u64;
        self.unflushed += n as u64;
        if self.unflushed >= WRITE_BEHIND {
            self.write_behind();
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl StagedFile for DiskStaged {
    fn reader(&mut self) -> io::Result<Box<dyn Read + Send + '_>> {
        self.file.flush()?;
        let mut f = fs::File::open(&self.path)?;
        f.seek(SeekFrom::Start(0))?;
        Ok(Box::new(io::BufReader::new(f)))
    }
    fn truncate(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.seek(SeekFrom::Start(0))?;
        self.written = 0;
        self.unflushed = 0;
        Ok(())
    }
    fn sync(&mut self) -> io::Result<()> {
        if !self.synced {
            self.file.sync_all()?;
            self.synced = true;
        }
        Ok(())
    }
    fn as_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }
}

impl Drop for DiskStaged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

static STAGE_COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl ModuleStore for DiskStore {
    fn stage(&self) -> io::Result<Box<dyn StagedFile>> {
        let n = STAGE_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = self
            .root
            .join(STAGING_DIR)
            .join(format!("{}-{n}.part", std::process::id()));
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)?;
        Ok(Box::new(DiskStaged {
            file,
            path,
            committed: false,
            synced: false,
            unflushed: 0,
            written: 0,
        }))
    }

    fn commit(
        &self,
        staged: Box<dyn StagedFile>,
        module_name: &str,
        checksum: &str,
    ) -> io::Result<PathBuf> {
        let mut staged = staged
            .as_any()
            .downcast::<DiskStaged>()
            .map_err(|_| io::Error::other("staged file of another store"))?;
        staged.sync()?;
        let dir = self.root.join(sha256_hex(module_name.as_bytes()));
        fs::create_dir_all(&dir)?;
        let dest = dir.join(format!("{checksum}.wasm"));
        fs::rename(&staged.path, &dest)?;
        staged.committed = true;
        Ok(dest)
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        fs::read(path)
    }

    fn open(&self, path: &Path) -> io::Result<Box<dyn Read + Send>> {
        Ok(Box::new(fs::File::open(path)?))
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => {
                if let Some(dir) = path.parent() {
                    let _ = fs::remove_dir(dir); // only succeeds when empty
                }
                Ok(())
            }
        }
    }

    fn list(&self) -> io::Result<Vec<StoredModule>> {
        let mut out = Vec::new();
        for dir in fs::read_dir(&self.root)? {
            let dir = dir?;
            let name_hash = dir.file_name().to_string_lossy().to_string();
            if !dir.file_type()?.is_dir() || name_hash == STAGING_DIR {
                continue;
            }
            for f in fs::read_dir(dir.path())? {
                let f = f?;
                let fname = f.file_name().to_string_lossy().to_string();
                if let Some(checksum) = fname.strip_suffix(".wasm") {
                    out.push(StoredModule {
                        name_hash: name_hash.clone(),
                        checksum: checksum.to_string(),
                        path: f.path(),
                        size: f.metadata()?.len(),
                    });
                }
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    fn load_index(&self) -> io::Result<Option<Vec<u8>>> {
        match fs::read(self.root.join(INDEX_FILE)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn save_index(&self, bytes: &[u8]) -> io::Result<()> {
        let tmp = self
            .root
            .join(STAGING_DIR)
            .join(format!("{INDEX_FILE}.{}", std::process::id()));
        fs::write(&tmp, bytes)?;
        fs::rename(tmp, self.root.join(INDEX_FILE))
    }

    fn wipe(&self) -> io::Result<()> {
        fs::remove_dir_all(&self.root)?;
        fs::create_dir_all(self.root.join(STAGING_DIR))
    }

    /// One per core unless set: hashing is CPU-bound once the files are in the page cache, and
    /// parallel reads keep a cold disk's queue full.
    fn verify_threads(&self) -> usize {
        self.verify_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }
}

// ---------------------------------------------------------------------------------------------
// Memory

/// An in-memory store with the same layout (paths under a virtual root). Survives a simulated
/// restart because the simulator keeps the `Arc`.
#[derive(Debug, Default)]
pub struct MemStore {
    files: Mutex<BTreeMap<PathBuf, Arc<Vec<u8>>>>,
    index: Mutex<Option<Vec<u8>>>,
}

/// The virtual root of a [`MemStore`].
pub const MEM_ROOT: &str = "/var/cache/wasm-ecds";

struct MemStaged {
    buf: Vec<u8>,
}

impl Write for MemStaged {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl StagedFile for MemStaged {
    fn reader(&mut self) -> io::Result<Box<dyn Read + Send + '_>> {
        Ok(Box::new(&self.buf[..]))
    }
    fn truncate(&mut self) -> io::Result<()> {
        self.buf.clear();
        Ok(())
    }
    fn as_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }
}

impl ModuleStore for MemStore {
    fn stage(&self) -> io::Result<Box<dyn StagedFile>> {
        Ok(Box::new(MemStaged { buf: Vec::new() }))
    }

    fn commit(
        &self,
        staged: Box<dyn StagedFile>,
        module_name: &str,
        checksum: &str,
    ) -> io::Result<PathBuf> {
        let staged = staged
            .as_any()
            .downcast::<MemStaged>()
            .map_err(|_| io::Error::other("staged file of another store"))?;
        let path = Path::new(MEM_ROOT)
            .join(sha256_hex(module_name.as_bytes()))
            .join(format!("{checksum}.wasm"));
        self.files
            .lock()
            .expect("store lock")
            .insert(path.clone(), Arc::new(staged.buf));
        Ok(path)
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        self.files
            .lock()
            .expect("store lock")
            .get(path)
            .map(|b| b.as_ref().clone())
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, path.display().to_string()))
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        self.files.lock().expect("store lock").remove(path);
        Ok(())
    }

    fn list(&self) -> io::Result<Vec<StoredModule>> {
        let files = self.files.lock().expect("store lock");
        Ok(files
            .iter()
            .filter_map(|(path, bytes)| {
                let checksum = path
                    .file_name()?
                    .to_str()?
                    .strip_suffix(".wasm")?
                    .to_string();
                let name_hash = path.parent()?.file_name()?.to_str()?.to_string();
                Some(StoredModule {
                    name_hash,
                    checksum,
                    path: path.clone(),
                    size: bytes.len() as u64,
                })
            })
            .collect())
    }

    fn load_index(&self) -> io::Result<Option<Vec<u8>>> {
        Ok(self.index.lock().expect("store lock").clone())
    }

    fn save_index(&self, bytes: &[u8]) -> io::Result<()> {
        *self.index.lock().expect("store lock") = Some(bytes.to_vec());
        Ok(())
    }

    fn wipe(&self) -> io::Result<()> {
        self.files.lock().expect("store lock").clear();
        *self.index.lock().expect("store lock") = None;
        Ok(())
    }

    /// Nothing in memory outlives the process.
    fn survives_crash(&self) -> bool {
        false
    }
}

/// In-memory `file://` contents for the simulator.
#[derive(Debug, Default)]
pub struct MemFiles {
    files: Mutex<BTreeMap<String, Arc<Vec<u8>>>>,
}

impl MemFiles {
    pub fn put(&self, path: &str, bytes: Vec<u8>) {
        self.files
            .lock()
            .expect("files lock")
            .insert(path.to_string(), Arc::new(bytes));
    }
    pub fn remove(&self, path: &str) {
        self.files.lock().expect("files lock").remove(path);
    }
}

impl FileSource for MemFiles {
    fn open(&self, path: &str) -> io::Result<Box<dyn Read + Send>> {
        let bytes = self
            .files
            .lock()
            .expect("files lock")
            .get(path)
            .cloned()
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, format!("{path}: no such file"))
            })?;
        Ok(Box::new(io::Cursor::new(bytes.as_ref().clone())))
    }

    fn may_block(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(store: &dyn ModuleStore) {
        let mut s = store.stage().unwrap();
        s.write_all(b"\0asm\x01\0\0\0").unwrap();
        let mut back = Vec::new();
        s.reader().unwrap().read_to_end(&mut back).unwrap();
        assert_eq!(back, b"\0asm\x01\0\0\0");
        let path = store.commit(s, "oci://r/a", "abc").unwrap();
        assert!(path.ends_with(format!("{}/abc.wasm", sha256_hex(b"oci://r/a"))));
        assert_eq!(store.read(&path).unwrap().len(), 8);
        let listed = store.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].checksum, "abc");
        // An uncommitted staging file leaves nothing behind.
        let mut s = store.stage().unwrap();
        s.write_all(b"partial").unwrap();
        drop(s);
        assert_eq!(store.list().unwrap().len(), 1);
        store.remove(&path).unwrap();
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn disk_store_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path()).unwrap();
        roundtrip(&store);
        assert_eq!(
            fs::read_dir(dir.path().join(STAGING_DIR)).unwrap().count(),
            0
        );
    }

    #[test]
    fn only_regular_files_open() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo.wasm");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.unwrap().success());
        let file = dir.path().join("m.wasm");
        fs::write(&file, b"\0asm\x01\0\0\0").unwrap();
        // No writer ever opens the FIFO: a blocking open would never return.
        let e = open_regular(&fifo).unwrap_err();
        assert_eq!(e.to_string(), "not a regular file (a FIFO)");
        let e = open_regular(dir.path()).unwrap_err();
        assert_eq!(e.to_string(), "not a regular file (a directory)");
        let e = open_regular(Path::new("/dev/zero")).unwrap_err();
        assert_eq!(e.to_string(), "not a regular file (a character device)");
        let mut back = Vec::new();
        OsFiles
            .open(file.to_str().unwrap())
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back.len(), 8);
    }

    #[test]
    fn mem_store_roundtrip() {
        roundtrip(&MemStore::new());
    }
}
