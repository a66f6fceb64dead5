//! Who runs: an exclusive lock on the pin root, and the agent's record in the run directory.
//!
//! The lock is an `flock` on the pin root directory itself (bpffs holds no regular files). One
//! agent per pin root: a second one refuses to start, and `sg detach` refuses to pull the pins
//! from under a running agent. The kernel drops the lock when the process dies, however it
//! dies, so "is an agent running" is answered by the lock, never by a file that a killed agent
//! could not update. The record (`agent.json`) says since when, and when it stopped.

use std::{
    fs::File,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

/// The lock an agent holds on its pin root for its whole life.
pub struct PinLock {
    dir: File,
    path: PathBuf,
}

impl PinLock {
    /// Creates the pin root if needed and locks it, or says which process holds it.
    pub fn acquire(root: &Path) -> Result<Self> {
        std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        let dir = File::open(root).with_context(|| format!("opening {}", root.display()))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let who = match holder(root) {
                    Ok(Some(pid)) => format!("process {pid}{}", describe_pid(pid)),
                    _ => "another process".to_string(),
                };
                return Err(anyhow::Error::new(Taken(format!(
                    "{who} holds the lock on {}: another sg agent runs on this pin root. Two \
                     agents would fight over the same taps and maps; stop the other one first",
                    root.display()
                ))));
            }
            return Err(err).with_context(|| format!("locking {}", root.display()));
        }
        Ok(Self {
            dir,
            path: root.to_path_buf(),
        })
    }

    /// Whether the pin root at its path is still the directory this lock holds: it is not if
    /// someone removed it (`sg detach --all --force`), even if it was created again since.
    pub fn still_held(&self) -> bool {
        match (self.dir.metadata(), std::fs::metadata(&self.path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Another process holds the pin root: nothing this agent can repair.
#[derive(Debug)]
pub struct Taken(pub String);

impl std::fmt::Display for Taken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Taken {}

/// The pid of the process holding an `flock` on `root`, from /proc/locks.
pub fn holder(root: &Path) -> Result<Option<u32>> {
    let Ok(meta) = std::fs::metadata(root) else {
        return Ok(None);
    };
    let want = format!(
        "{:02x}:{:02x}:{}",
        libc::major(meta.dev()),
        libc::minor(meta.dev()),
        meta.ino()
    );
    let locks = std::fs::read_to_string("/proc/locks").context("reading /proc/locks")?;
    for line in locks.lines() {
        // "1: FLOCK  ADVISORY  WRITE 19724 00:28:240202 0 EOF"; waiters have "->" after the id.
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 6 && f[1] == "FLOCK" && f[5] == want {
            return Ok(f[4].parse().ok());
        }
    }
    Ok(None)
}

fn describe_pid(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let words: Vec<String> = c
                .split(|b| *b == 0)
                .filter(|w| !w.is_empty())
                .take(4)
                .map(|w| String::from_utf8_lossy(w).into_owned())
                .collect();
            format!(" ({})", words.join(" "))
        })
        .unwrap_or_default()
}

/// What the run directory says about the agent's life (`agent.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentRecord {
    pub pid: u32,
    pub pin_root: PathBuf,
    /// Seconds since the Unix epoch.
    pub started_at: u64,
    /// Written at every housekeeping tick: a killed agent was alive at this time.
    pub alive_at: u64,
    /// A clean exit: when, and why.
    pub stopped_at: Option<u64>,
    pub stop_reason: Option<String>,
}

impl AgentRecord {
    pub const FILE: &'static str = "agent.json";

    pub fn start(run_dir: &Path, pin_root: &Path) -> Result<Self> {
        let now = now();
        let r = Self {
            pid: std::process::id(),
            pin_root: pin_root.to_path_buf(),
            started_at: now,
            alive_at: now,
            stopped_at: None,
            stop_reason: None,
        };
        r.save(run_dir)?;
        Ok(r)
    }

    pub fn alive(&mut self, run_dir: &Path) -> Result<()> {
        self.alive_at = now();
        self.save(run_dir)
    }

    pub fn stopped(&mut self, run_dir: &Path, reason: &str) -> Result<()> {
        self.alive_at = now();
        self.stopped_at = Some(self.alive_at);
        self.stop_reason = Some(reason.to_string());
        self.save(run_dir)
    }

    pub fn load(run_dir: &Path) -> Result<Option<Self>> {
        let path = run_dir.join(Self::FILE);
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(
                serde_json::from_slice(&b).with_context(|| format!("parsing {}", path.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    fn save(&self, run_dir: &Path) -> Result<()> {
        std::fs::create_dir_all(run_dir)?;
        let tmp = run_dir.join(format!("{}.tmp", Self::FILE));
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, run_dir.join(Self::FILE))?;
        Ok(())
    }
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Seconds since the epoch as `2026-05-14T10:22:03Z`.
pub fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(super::utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::utc(1_778_754_123), "2026-05-14T10:22:03Z");
    }
}
