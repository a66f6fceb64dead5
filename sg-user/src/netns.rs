//! Running work inside a named network namespace (`ip netns` names, /var/run/netns/NAME).
//!
//! Interface names, ifindexes and tcx attachment are all relative to the calling thread's
//! netns, so the work runs on a short-lived OS thread that joined the target namespace. The
//! calling thread (possibly a tokio worker) never changes namespace.

use std::{ffi::CString, fs::File, os::fd::AsRawFd as _, path::PathBuf};

use anyhow::{Context as _, Result, anyhow, bail};

pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/var/run/netns").join(name)
}

/// Runs `f` in netns `ns` (or in the current one when `None`) and returns its result.
pub fn run_in<T: Send>(ns: Option<&str>, f: impl FnOnce() -> T + Send) -> Result<T> {
    let Some(ns) = ns else { return Ok(f()) };
    let path = netns_path(ns);
    let file = File::open(&path).with_context(|| format!("network namespace {ns} ({})", path.display()))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: setns on this thread only; the thread ends right after `f`.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(anyhow!("setns into {ns}: {}", std::io::Error::last_os_error()));
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow!("thread running in netns {ns} panicked"))?
    })
}

/// ifindex of `name` in the calling thread's netns.
pub fn ifindex(name: &str) -> Result<u32> {
    let c = CString::new(name).with_context(|| format!("interface name {name:?}"))?;
    // SAFETY: valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        bail!("no interface named {name}: {}", std::io::Error::last_os_error());
    }
    Ok(idx)
}
