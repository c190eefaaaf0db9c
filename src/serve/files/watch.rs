//! The watcher of the plugin files: it collects the paths the kernel reports changed for the
//! controller, which re-reads just those files ([`FileSource::update`](super::FileSource::update)).
//! Events of reads (open, access, close without writing) are dropped here: the server's own reads
//! of the files raise them, and they must never wake the controller.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use tokio::sync::mpsc;

use super::FileChanges;
use crate::serve::Command;

/// Paths collected beyond this many between two updates make the next update a full rescan:
/// the memory held for a burst of changes stays bounded.
pub const MAX_PENDING_PATHS: usize = 4096;

/// What the watcher saw and has not handed over yet, and whether the controller was told.
#[derive(Debug, Default)]
struct Pending {
    changes: FileChanges,
    signalled: bool,
}

impl Pending {
    /// Adds one reported event (or watch error); true when the controller should be told.
    fn note(&mut self, res: notify::Result<notify::Event>) -> bool {
        let ev = match res {
            Ok(ev) if matches!(ev.kind, notify::EventKind::Access(_)) => return false,
            Ok(ev) => ev,
            Err(e) => {
                // The kernel's queue overflowed or a watch broke: what changed is not known.
                tracing::warn!(error = %e, "plugin file watch error; reading every file again");
                self.changes.rescan = true;
                return !std::mem::replace(&mut self.signalled, true);
            }
        };
        tracing::trace!(kind = ?ev.kind, paths = ?ev.paths, "plugin files changed");
        if ev.need_rescan() || ev.paths.is_empty() {
            self.changes.rescan = true;
        } else if !self.changes.rescan {
            self.changes.paths.extend(ev.paths);
            if self.changes.paths.len() > MAX_PENDING_PATHS {
                self.changes.paths.clear();
                self.changes.rescan = true;
            }
        }
        !std::mem::replace(&mut self.signalled, true)
    }
}

/// Watches the directory of each file given as a path (so replacements by rename are seen); the
/// directories under a directory path are watched by the controller as the walks find them
/// ([`Watcher::update`]), each on its own, so that one that cannot be watched (or a symbolic link
/// loop) leaves the others watched. The controller is sent [`Command::Reload`] when something
/// changed, and takes the changed paths with [`Watcher::take`].
pub(in crate::serve) fn spawn_watcher(
    paths: &[PathBuf],
    tx: mpsc::Sender<Command>,
) -> anyhow::Result<Option<Watcher>> {
    use notify::Watcher as _;
    if paths.is_empty() {
        return Ok(None);
    }
    let pending = Arc::new(Mutex::new(Pending::default()));
    let shared = pending.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let tell = shared.lock().expect("pending file changes").note(res);
        if tell && tx.try_send(Command::Reload).is_err() {
            // The command queue is full: the next event tells it again.
            shared.lock().expect("pending file changes").signalled = false;
        }
    })?;
    for p in paths.iter().filter(|p| !p.is_dir()) {
        let target = p
            .parent()
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."));
        watcher
            .watch(&target, notify::RecursiveMode::NonRecursive)
            .with_context(|| format!("cannot watch {}", target.display()))?;
    }
    Ok(Some(Watcher {
        inner: watcher,
        dirs: BTreeSet::new(),
        pending,
    }))
}

/// The file watcher, the directories it watches and what it saw.
pub(in crate::serve) struct Watcher {
    inner: notify::RecommendedWatcher,
    dirs: BTreeSet<PathBuf>,
    pending: Arc<Mutex<Pending>>,
}

impl Watcher {
    /// Watches exactly `dirs` (the directories the last walk read); returns those not watched
    /// before. A directory that cannot be watched is a warning, once.
    pub(in crate::serve) fn update(&mut self, dirs: &[PathBuf]) -> Vec<PathBuf> {
        use notify::Watcher as _;
        let wanted: BTreeSet<&PathBuf> = dirs.iter().collect();
        for gone in (self.dirs.iter()).filter(|d| !wanted.contains(d)) {
            let _ = self.inner.unwatch(gone);
        }
        self.dirs.retain(|d| wanted.contains(d));
        let mut added = Vec::new();
        for dir in wanted {
            if self.dirs.insert(dir.clone()) {
                added.push(dir.clone());
                if let Err(e) = self.inner.watch(dir, notify::RecursiveMode::NonRecursive) {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot watch plugin directory");
                }
            }
        }
        added
    }

    /// What changed since the last call.
    pub(in crate::serve) fn take(&self) -> FileChanges {
        let mut pending = self.pending.lock().expect("pending file changes");
        pending.signalled = false;
        std::mem::take(&mut pending.changes)
    }
}

#[cfg(test)]
mod tests {
    use notify::event::{AccessKind, AccessMode, CreateKind, DataChange, ModifyKind};
    use notify::{Event, EventKind};

    use super::*;

    fn event(kind: EventKind, path: &str) -> notify::Result<Event> {
        Ok(Event::new(kind).add_path(PathBuf::from(path)))
    }

    #[test]
    fn reads_never_tell_and_changes_tell_once_until_taken() {
        let mut p = Pending::default();
        let read = EventKind::Access(AccessKind::Close(AccessMode::Read));
        assert!(!p.note(event(read, "/d/a.yaml")));
        assert!(!p.note(event(
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            "/d/a.yaml"
        )));
        assert_eq!(p.changes, FileChanges::default());
        let write = EventKind::Modify(ModifyKind::Data(DataChange::Content));
        assert!(p.note(event(write, "/d/a.yaml")));
        assert!(!p.note(event(EventKind::Create(CreateKind::File), "/d/b.yaml")));
        let paths: Vec<&str> = p
            .changes
            .paths
            .iter()
            .map(|p| p.to_str().unwrap())
            .collect();
        assert_eq!(paths, ["/d/a.yaml", "/d/b.yaml"]);
        assert!(!p.changes.rescan);
    }

    #[test]
    fn an_overflow_an_error_or_too_many_paths_is_a_rescan() {
        let mut p = Pending::default();
        let overflow = Event::new(EventKind::Other).set_flag(notify::event::Flag::Rescan);
        p.note(Ok(overflow));
        assert!(p.changes.rescan && p.changes.paths.is_empty());

        let mut p = Pending::default();
        p.note(Err(notify::Error::generic("queue overflow")));
        assert!(p.changes.rescan);

        let mut p = Pending::default();
        let write = EventKind::Modify(ModifyKind::Data(DataChange::Content));
        for i in 0..=MAX_PENDING_PATHS {
            p.note(event(write, &format!("/d/{i}.yaml")));
        }
        assert!(p.changes.rescan && p.changes.paths.is_empty());
    }

    #[tokio::test]
    async fn the_servers_own_reads_are_no_change() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        std::fs::write(root.join("a.yaml"), "a").unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        let mut w = spawn_watcher(std::slice::from_ref(&root), tx)
            .unwrap()
            .unwrap();
        let added = w.update(std::slice::from_ref(&root));
        assert_eq!(added.as_slice(), std::slice::from_ref(&root));
        for _ in 0..3 {
            std::fs::read(root.join("a.yaml")).unwrap();
        }
        // Events come in order: once the write of b.yaml is told, the reads before it were seen.
        std::fs::write(root.join("b.yaml"), "b").unwrap();
        let told = tokio::time::timeout(std::time::Duration::from_secs(60), rx.recv());
        assert!(matches!(told.await, Ok(Some(Command::Reload))));
        let changes = w.take();
        assert!(!changes.rescan);
        assert_eq!(
            changes.paths.into_iter().collect::<Vec<_>>(),
            [root.join("b.yaml")]
        );
    }
}
