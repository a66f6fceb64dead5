//! Watching the input. It changes in many ways: an editor renames a new file over the old, a
//! config manager writes in place, Kubernetes swaps a ConfigMap's `..data -> ..<version>`
//! symlink with `mv -T`, a deploy tool points a symlink at a new release directory. So the
//! watcher does not trust any one event: every directory that takes part in resolving the
//! input (the one holding each symlink on the way, the one holding the file in the end) is
//! watched, any event there re-reads the input's identity (device, inode, size, mtime of every
//! resolved file), and the input counts as changed when that identity changes. The watches are
//! re-armed after every event, since a swap replaces the directories that were watched. The
//! agent also compares the identity at every housekeeping tick, so that no missed event can
//! leave it enforcing an old input indefinitely.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result};
use futures::StreamExt as _;
use inotify::{EventStream, Inotify, WatchDescriptor, WatchMask, Watches};
use tracing::warn;

/// What identifies one resolved input file's content.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

/// The input's identity: each JSON file it is read from, resolved, by the name it is read as.
/// `None` for a file that cannot be read (a dangling symlink in the middle of a swap).
type Identity = BTreeMap<PathBuf, Option<FileId>>;

pub struct Watcher {
    path: PathBuf,
    events: EventStream<Vec<u8>>,
    watches: Watches,
    armed: BTreeMap<PathBuf, WatchDescriptor>,
    identity: Identity,
    /// A relevant event was seen but not yet reported. `changed()` runs inside `select!` and
    /// may be dropped at any await; the event must survive that.
    pending: bool,
    warned_missing: bool,
}

impl Watcher {
    pub fn new(path: &Path) -> Result<Self> {
        let inotify = Inotify::init().context("inotify_init")?;
        let watches = inotify.watches();
        let mut w = Self {
            path: path.to_path_buf(),
            events: inotify.into_event_stream(vec![0u8; 4096])?,
            watches,
            armed: BTreeMap::new(),
            identity: Identity::new(),
            pending: false,
            warned_missing: false,
        };
        w.rearm();
        w.identity = identity(&w.path);
        Ok(w)
    }

    /// Resolves when the input changed, after the burst of events of one change has settled.
    /// Cancel-safe: an event consumed by a dropped call is reported by the next one.
    pub async fn changed(&mut self) -> Result<()> {
        loop {
            while !self.pending {
                self.events.next().await.context("inotify stream ended")??;
                self.pending = true;
            }
            // Let the rest of this change's events arrive; the caller reads the input
            // afterwards, so whatever they announce is seen.
            while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(30), self.events.next()).await
            {
            }
            self.pending = false;
            self.rearm();
            if self.check() {
                return Ok(());
            }
        }
    }

    /// Whether the input's identity differs from the one last reported (and remembers it).
    /// The housekeeping tick calls this too.
    pub fn check(&mut self) -> bool {
        let now = identity(&self.path);
        if now.is_empty() || now.values().any(Option::is_none) {
            if !self.warned_missing {
                warn!(
                    input = %self.path.display(),
                    "the input cannot be read (missing, or a symlink that points nowhere); the running policy stays"
                );
                self.warned_missing = true;
            }
        } else {
            self.warned_missing = false;
        }
        if now == self.identity {
            return false;
        }
        self.identity = now;
        self.rearm();
        true
    }

    /// Watches exactly the directories the input resolves through now.
    fn rearm(&mut self) {
        let want = dirs_of(&self.path);
        let stale: Vec<PathBuf> = self
            .armed
            .keys()
            .filter(|d| !want.contains(*d))
            .cloned()
            .collect();
        for d in stale {
            if let Some(wd) = self.armed.remove(&d) {
                // Fails when the directory is already gone, which removed the watch.
                let _ = self.watches.remove(wd);
            }
        }
        for d in want {
            if self.armed.contains_key(&d) {
                continue;
            }
            let mask = WatchMask::CLOSE_WRITE
                | WatchMask::MOVED_TO
                | WatchMask::MOVED_FROM
                | WatchMask::CREATE
                | WatchMask::DELETE
                | WatchMask::ATTRIB
                | WatchMask::DELETE_SELF
                | WatchMask::MOVE_SELF;
            match self.watches.add(&d, mask) {
                Ok(wd) => {
                    self.armed.insert(d, wd);
                }
                Err(e) => warn!("watching {}: {e}", d.display()),
            }
        }
    }
}

/// The files the input is read from: the file itself, or a directory's `*.json` entries (as
/// `model::load` reads them).
fn input_files(path: &Path) -> Vec<PathBuf> {
    if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)
            .map(|rd| {
                rd.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|e| e == "json"))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    }
}

fn identity(path: &Path) -> Identity {
    input_files(path)
        .into_iter()
        .map(|f| {
            let id = std::fs::metadata(&f)
                .ok()
                .filter(|m| m.is_file())
                .map(|m| FileId {
                    dev: m.dev(),
                    ino: m.ino(),
                    size: m.size(),
                    mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
                });
            (f, id)
        })
        .collect()
}

/// Every directory that takes part in resolving the input: the parent of the path, of each
/// symlink on the way and of the file at the end (canonical), and a directory input itself.
fn dirs_of(path: &Path) -> BTreeSet<PathBuf> {
    let mut dirs = BTreeSet::new();
    let add_chain = |start: &Path, dirs: &mut BTreeSet<PathBuf>| {
        let mut p = start.to_path_buf();
        for _ in 0..40 {
            let parent = match p.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            };
            dirs.insert(parent.canonicalize().unwrap_or_else(|_| parent.clone()));
            match std::fs::read_link(&p) {
                Ok(t) if t.is_absolute() => p = t,
                Ok(t) => p = parent.join(t),
                Err(_) => break,
            }
        }
        if let Some(d) = p
            .canonicalize()
            .ok()
            .and_then(|c| c.parent().map(Path::to_path_buf))
        {
            dirs.insert(d);
        }
    };
    add_chain(path, &mut dirs);
    if path.is_dir() {
        dirs.insert(path.canonicalize().unwrap_or_else(|_| path.to_path_buf()));
        for f in input_files(path) {
            add_chain(&f, &mut dirs);
        }
    }
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Kubernetes ConfigMap volume: `input.json -> ..data/input.json`, `..data -> ..v1`.
    #[test]
    fn configmap_swap_changes_the_identity_and_the_watched_dirs() {
        let root = std::env::temp_dir().join(format!("sg-watch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("..v1")).unwrap();
        std::fs::write(root.join("..v1/input.json"), "{}").unwrap();
        std::os::unix::fs::symlink("..v1", root.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/input.json", root.join("input.json")).unwrap();
        let input = root.join("input.json");
        let before = identity(&input);
        let dirs = dirs_of(&input);
        let canon = root.canonicalize().unwrap();
        assert!(
            dirs.contains(&canon) && dirs.contains(&canon.join("..v1")),
            "{dirs:?}"
        );

        std::fs::create_dir_all(root.join("..v2")).unwrap();
        std::fs::write(root.join("..v2/input.json"), "{}").unwrap();
        std::os::unix::fs::symlink("..v2", root.join("..data_tmp")).unwrap();
        std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
        std::fs::remove_dir_all(root.join("..v1")).unwrap();
        assert_ne!(identity(&input), before, "same size and content, another file");
        let dirs = dirs_of(&input);
        assert!(
            dirs.contains(&canon.join("..v2")) && !dirs.contains(&canon.join("..v1")),
            "{dirs:?}"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
