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

/// An AF_PACKET raw socket that sends out of and receives every frame of interface `ifindex`
/// of the calling thread's namespace (a socket keeps the namespace it was made in).
pub fn packet_socket(ifindex: u32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    let all = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2); the fd is owned right away.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, all as i32) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: a zeroed sockaddr_ll is valid; the fields set are the ones bind needs.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = all;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: a valid sockaddr_ll of the size given.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &sll as *const _ as *const libc::sockaddr,
            size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}
