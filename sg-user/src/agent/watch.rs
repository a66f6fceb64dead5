//! Watching the input with inotify. Editors and config managers replace files by renaming a
//! new one over the old, so the watch is on the directory and filters by name; for a
//! directory input every JSON file in it counts.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result};
use futures::StreamExt as _;
use inotify::{EventStream, Inotify, WatchMask};

pub struct Watcher {
    events: EventStream<Vec<u8>>,
    /// `Some(name)`: only this file of the watched directory matters.
    file: Option<OsString>,
    /// A relevant event was seen but not yet reported. `changed()` runs inside `select!` and
    /// may be dropped at any await; the event must survive that.
    pending: bool,
}

impl Watcher {
    pub fn new(path: &Path) -> Result<Self> {
        let (dir, file): (PathBuf, Option<OsString>) = if path.is_dir() {
            (path.to_path_buf(), None)
        } else {
            let dir = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            (dir.to_path_buf(), path.file_name().map(|f| f.to_owned()))
        };
        let inotify = Inotify::init().context("inotify_init")?;
        inotify
            .watches()
            .add(
                &dir,
                WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO | WatchMask::CREATE | WatchMask::DELETE,
            )
            .with_context(|| format!("watching {}", dir.display()))?;
        Ok(Self {
            events: inotify.into_event_stream(vec![0u8; 4096])?,
            file,
            pending: false,
        })
    }

    /// Resolves when the input changed, after the burst of events of one write has settled.
    /// Cancel-safe: an event consumed by a dropped call is reported by the next one.
    pub async fn changed(&mut self) -> Result<()> {
        while !self.pending {
            let ev = self.events.next().await.context("inotify stream ended")??;
            let relevant = match (&self.file, &ev.name) {
                (Some(f), Some(n)) => f == n,
                (None, Some(n)) => Path::new(n).extension().is_some_and(|e| e == "json"),
                _ => false,
            };
            self.pending = relevant;
        }
        // Let the rest of this write's events arrive; the caller reads the file afterwards, so
        // whatever they announce is seen.
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(30), self.events.next()).await {}
        self.pending = false;
        Ok(())
    }
}
