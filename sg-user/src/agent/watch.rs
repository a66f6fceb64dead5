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
        })
    }

    /// Resolves when the input changed, after the burst of events of one write has settled.
    pub async fn changed(&mut self) -> Result<()> {
        loop {
            let ev = self.events.next().await.context("inotify stream ended")??;
            let relevant = match (&self.file, &ev.name) {
                (Some(f), Some(n)) => f == n,
                (None, Some(n)) => Path::new(n).extension().is_some_and(|e| e == "json"),
                _ => false,
            };
            if relevant {
                break;
            }
        }
        // Swallow the rest of this write's events.
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(30), self.events.next()).await {}
        Ok(())
    }
}
