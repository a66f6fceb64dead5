//! Noticing that pins vanish under a running agent (`sg detach --all --force`, an `rm -r` of
//! the pin root): an inotify watch on the pin directories. Any deletion there wakes the agent,
//! which checks its maps and links and restores what is missing. Deletions the agent makes
//! itself (a tap's links when it goes) wake it too and find nothing to restore.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result};
use futures::StreamExt as _;
use inotify::{EventStream, Inotify, WatchMask, Watches};

pub struct PinWatch {
    dirs: Vec<PathBuf>,
    events: EventStream<Vec<u8>>,
    watches: Watches,
    pending: bool,
}

impl PinWatch {
    pub fn new(root: &Path, netns: Option<&str>) -> Result<Self> {
        let inotify = Inotify::init().context("inotify_init")?;
        let watches = inotify.watches();
        let mut w = Self {
            dirs: vec![
                root.to_path_buf(),
                root.join("maps"),
                root.join("links"),
                root.join("links").join(netns.unwrap_or("-")),
            ],
            events: inotify.into_event_stream(vec![0u8; 4096])?,
            watches,
            pending: false,
        };
        w.rearm();
        Ok(w)
    }

    /// Watches the pin directories that exist now (a restore creates them again). Adding a
    /// watch is idempotent for a directory already watched; a removed directory took its
    /// watch with it.
    pub fn rearm(&mut self) {
        let mask = WatchMask::DELETE | WatchMask::DELETE_SELF | WatchMask::MOVED_FROM | WatchMask::MOVE_SELF;
        for d in &self.dirs {
            if d.exists() {
                let _ = self.watches.add(d, mask);
            }
        }
    }

    /// Resolves when something was removed from the pin directories, once the burst of
    /// removals (a whole `sg detach`) has settled. Cancel-safe: an event consumed by a dropped
    /// call is reported by the next one.
    pub async fn fired(&mut self) -> Result<()> {
        if !self.pending {
            self.events.next().await.context("inotify stream ended")??;
            self.pending = true;
        }
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(50), self.events.next()).await {}
        self.pending = false;
        Ok(())
    }
}
