//! Support for sg's privileged tests: uniquely named network namespaces and bpffs pin roots
//! that are removed when the guard drops, including when the test panics.
//!
//! These tests need root, a kernel with tcx (6.6+), bpffs and iproute2. They never skip: if
//! the environment is missing something, they fail and say what.

/// Datapath test support: frame shorthands, the TEST_RUN case runner, raw sockets.
pub mod dp;

use std::{
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result, bail};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call: `<prefix><pid>-<n>`. Kept short because interface
/// names are limited to 15 characters.
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}-{n}", std::process::id() % 100_000)
}

/// Runs a command and fails with its stderr if it fails.
pub fn run(cmd: &str, args: &[&str]) -> Result<Output> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// `ip -n NS ...`
pub fn ip_in(ns: &str, args: &[&str]) -> Result<Output> {
    let mut a = vec!["-n", ns];
    a.extend_from_slice(args);
    run("ip", &a)
}

/// A network namespace that is deleted on drop, with loopback up.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Result<Self> {
        let name = unique(prefix);
        run("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        ip_in(&ns.name, &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs `cmd args` inside the namespace.
    pub fn exec(&self, cmd: &str, args: &[&str]) -> Result<Output> {
        let mut a = vec!["netns", "exec", &self.name, cmd];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        ip_in(&self.name, args)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace removes its interfaces, and with them their tcx links.
        let _ = Command::new("ip").args(["netns", "delete", &self.name]).output();
    }
}

/// Creates a veth pair with `a` in `ns_a` and `b` in `ns_b`, both up, with the given MACs.
pub fn veth(ns_a: &Netns, a: &str, mac_a: &str, ns_b: &Netns, b: &str, mac_b: &str) -> Result<()> {
    ns_a.ip(&[
        "link", "add", a, "address", mac_a, "type", "veth", "peer", "name", b, "address", mac_b, "netns",
        &ns_b.name,
    ])?;
    ns_a.ip(&["link", "set", a, "up"])?;
    ns_b.ip(&["link", "set", b, "up"])?;
    Ok(())
}

/// A private bpffs pin root, removed with everything under it (which detaches pinned links).
pub struct PinRoot {
    pub path: std::path::PathBuf,
}

impl PinRoot {
    pub fn new() -> Result<Self> {
        ensure_bpffs()?;
        let path = std::path::PathBuf::from("/sys/fs/bpf").join(unique("sg-test-"));
        Ok(Self { path })
    }
}

impl Drop for PinRoot {
    fn drop(&mut self) {
        if self.path.exists()
            && let Err(e) = sg_user::datapath::detach_all(&self.path)
        {
            eprintln!("cleanup of {} failed: {e:#}", self.path.display());
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

pub fn ensure_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    if !mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        bail!("bpffs is not mounted on /sys/fs/bpf: run `cargo xtask setup`");
    }
    Ok(())
}

/// Spawns a thread that lives in netns `ns` and runs `f` there. Sockets it creates belong to
/// that namespace.
pub fn spawn_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<Result<T>> {
    let path = sg_user::netns::netns_path(ns);
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd as _;
        let file = std::fs::File::open(&path).with_context(|| format!("{}", path.display()))?;
        // SAFETY: changes the namespace of this new thread only.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns {}: {}", path.display(), std::io::Error::last_os_error());
        }
        Ok(f())
    })
}

/// Starts TCP listeners on `ports` in `ns` that accept connections forever, answering each
/// with one line. The threads die with the test process.
pub fn tcp_servers(ns: &str, addr: std::net::IpAddr, ports: &[u16]) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    for &port in ports {
        let tx = tx.clone();
        spawn_in(ns, move || {
            use std::io::Write as _;
            let l = match std::net::TcpListener::bind((addr, port)) {
                Ok(l) => l,
                Err(e) => {
                    let _ = tx.send(Err(anyhow::anyhow!("bind {addr}:{port}: {e}")));
                    return;
                }
            };
            let _ = tx.send(Ok(()));
            for s in l.incoming().flatten() {
                let mut s = s;
                let _ = writeln!(s, "hello from {port}");
            }
        });
    }
    for _ in ports {
        rx.recv_timeout(std::time::Duration::from_secs(5))
            .context("server did not start")??;
    }
    Ok(())
}

/// Connects from `ns` to `addr:port` and reads the server's line; `Ok(false)` on timeout.
pub fn tcp_reachable(
    ns: &str,
    addr: std::net::IpAddr,
    port: u16,
    timeout: std::time::Duration,
) -> Result<bool> {
    spawn_in(ns, move || {
        use std::io::Read as _;
        match std::net::TcpStream::connect_timeout(&(addr, port).into(), timeout) {
            Ok(mut s) => {
                s.set_read_timeout(Some(timeout)).ok();
                let mut buf = [0u8; 64];
                Ok(s.read(&mut buf).map(|n| n > 0).unwrap_or(false))
            }
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Ok(false),
            Err(e) => Err(anyhow::anyhow!("connect {addr}:{port}: {e}")),
        }
    })
    .join()
    .map_err(|_| anyhow::anyhow!("connect thread panicked"))??
}
