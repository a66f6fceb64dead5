//! Support for sg's privileged tests: uniquely named network namespaces and bpffs pin roots
//! that are removed when the guard drops, including when the test panics.
//!
//! These tests need root, a kernel with tcx (6.6+), bpffs and iproute2. They never skip: if
//! the environment is missing something, they fail and say what.

/// Seeded random Neutron configurations (they live in sg-user, which `sg diff --random` uses).
pub use sg_user::generator;

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

/// Waits until `cond` holds, checking every few milliseconds, and fails with `what` after
/// `timeout`. For effects that happen asynchronously (softirq processing that ksoftirqd may
/// defer under load, an agent's reaction to an event): the deadline is only ever reached when
/// the effect never comes, so it can be generous without slowing a passing test.
pub fn wait_until(what: &str, timeout: std::time::Duration, mut cond: impl FnMut() -> bool) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    while !cond() {
        if std::time::Instant::now() > deadline {
            bail!("{what}: not true after {timeout:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Ok(())
}

/// How long a test waits for something that must happen (a connection that must succeed, a
/// counter that must move, an agent's new generation). Only a failing test waits this long.
pub const MUST_HAPPEN: std::time::Duration = std::time::Duration::from_secs(10);

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
        // The name carries this process's pid: one that exists belongs to a dead test process
        // that was killed before its guards ran.
        if std::path::Path::new("/run/netns").join(&name).exists() {
            let _ = Command::new("ip").args(["netns", "delete", &name]).output();
        }
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
        // A test process killed before its guards ran leaves its pins; a later process with
        // the same pid would adopt them. Their owner is dead (this pid is ours now).
        if path.exists() && sg_user::datapath::detach_all(&path).is_err() {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("removing the stale {}", path.display()))?;
        }
        Ok(Self { path })
    }
}

impl Drop for PinRoot {
    fn drop(&mut self) {
        if !self.path.exists() {
            return;
        }
        if let Err(e) = sg_user::datapath::detach_all(&self.path) {
            eprintln!("cleanup of {} failed: {e:#}", self.path.display());
        }
        // detach_all removes sg's own layout; pins a test made by hand (another layout version's
        // maps) would otherwise stay behind with the directory.
        let _ = std::fs::remove_dir_all(&self.path);
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

/// A namespace compute node: a host namespace with a Linux bridge `brq…` (iptables off on the
/// bridge, as for an eBPF node), VMs behind veth "taps", and peers that stand for remote hosts.
pub struct ComputeNode {
    pub host: Netns,
    pub bridge: String,
    pub vms: Vec<Vm>,
}

/// A VM: its own namespace with `eth0`, the host side being the tap on the bridge.
pub struct Vm {
    pub ns: Netns,
    pub tap: String,
    pub ip: std::net::IpAddr,
    pub mac: String,
}

impl ComputeNode {
    pub fn new() -> Result<Self> {
        let host = Netns::new("sgc")?;
        // The bridge's own IPv6 (router solicitations, MLD) would be traffic nobody sent.
        for k in ["all", "default"] {
            host.exec("sysctl", &["-qw", &format!("net.ipv6.conf.{k}.disable_ipv6=1")])?;
        }
        let bridge = format!("brq{}", &unique("")[..])
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(14)
            .collect::<String>();
        // With multicast snooping on, the bridge joins the all-snoopers group 224.0.0.106 and
        // sends IGMPv3 reports for it (from 0.0.0.0, about a second after it comes up) out of
        // every port: a real frame towards each VM that no test sent (issue 12).
        host.ip(&["link", "add", &bridge, "type", "bridge", "mcast_snooping", "0"])?;
        host.ip(&["link", "set", &bridge, "up"])?;
        for f in ["bridge-nf-call-iptables", "bridge-nf-call-ip6tables"] {
            host.exec("sysctl", &["-qw", &format!("net.bridge.{f}=0")])?;
        }
        Ok(Self {
            host,
            bridge,
            vms: Vec::new(),
        })
    }

    /// Adds a VM plugged as Neutron's OVS agent plugs it for an iptables-type driver
    /// ("hybrid"): tap `tap<id>` on its own Linux bridge `qbr<id>`, joined to the node's bridge
    /// (standing for br-int) by the veth pair `qvb<id>` / `qvo<id>`.
    pub fn add_hybrid_vm(&mut self, tap: &str, mac: &str, cidr: &str) -> Result<&Vm> {
        let id = tap.strip_prefix("tap").context("a hybrid tap is named tap<id>")?;
        let (qbr, qvb, qvo) = (format!("qbr{id}"), format!("qvb{id}"), format!("qvo{id}"));
        // Quiet, as the node bridge: no IGMP reports of its own towards the VM.
        self.host
            .ip(&["link", "add", &qbr, "type", "bridge", "mcast_snooping", "0"])?;
        self.host.ip(&["link", "set", &qbr, "up"])?;
        self.host
            .ip(&["link", "add", &qvb, "type", "veth", "peer", "name", &qvo])?;
        self.host.ip(&["link", "set", &qvb, "master", &qbr, "up"])?;
        self.host
            .ip(&["link", "set", &qvo, "master", &self.bridge, "up"])?;
        let ns = Netns::new("sgvm")?;
        self.plug_on(&qbr, &ns, tap, mac, cidr)?;
        let ip = cidr.split('/').next().unwrap().parse()?;
        self.vms.push(Vm {
            ns,
            tap: tap.to_string(),
            ip,
            mac: mac.to_string(),
        });
        Ok(self.vms.last().unwrap())
    }

    /// Adds a VM with tap `tap` (host side, on the bridge), `eth0` with `mac` and `cidr`.
    pub fn add_vm(&mut self, tap: &str, mac: &str, cidr: &str) -> Result<&Vm> {
        let ns = Netns::new("sgvm")?;
        self.plug(&ns, tap, mac, cidr)?;
        let ip = cidr.split('/').next().unwrap().parse()?;
        self.vms.push(Vm {
            ns,
            tap: tap.to_string(),
            ip,
            mac: mac.to_string(),
        });
        Ok(self.vms.last().unwrap())
    }

    /// (Re)creates the veth between the bridge and `ns`'s eth0.
    pub fn plug(&self, ns: &Netns, tap: &str, mac: &str, cidr: &str) -> Result<()> {
        self.plug_on(&self.bridge, ns, tap, mac, cidr)
    }

    /// (Re)creates the veth between bridge `bridge` and `ns`'s eth0.
    pub fn plug_on(&self, bridge: &str, ns: &Netns, tap: &str, mac: &str, cidr: &str) -> Result<()> {
        // No IPv6 DAD, MLD reports or router solicitations from the VM stacks: tests send what
        // they mean. Set before eth0 arrives in the namespace, since a device moved in takes
        // the namespace's defaults; set after it comes up, it would already have sent them.
        for k in ["all", "default"] {
            ns.exec("sysctl", &["-qw", &format!("net.ipv6.conf.{k}.disable_ipv6=1")])?;
        }
        self.host.ip(&[
            "link", "add", tap, "type", "veth", "peer", "name", "eth0", "address", mac, "netns", &ns.name,
        ])?;
        self.host.ip(&["link", "set", tap, "master", bridge, "up"])?;
        ns.ip(&["addr", "add", cidr, "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        Ok(())
    }

    /// A peer namespace on the bridge that sg does not filter (a "remote" host).
    pub fn add_peer(&self, cidr: &str) -> Result<Netns> {
        let ns = Netns::new("sgpeer")?;
        for k in ["all", "default"] {
            ns.exec("sysctl", &["-qw", &format!("net.ipv6.conf.{k}.disable_ipv6=1")])?;
        }
        let dev = unique("pv");
        self.host.ip(&[
            "link", "add", &dev, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ])?;
        self.host
            .ip(&["link", "set", &dev, "master", &self.bridge, "up"])?;
        ns.ip(&["addr", "add", cidr, "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        Ok(ns)
    }
}

/// Path of a binary of this workspace next to the running test (target/<profile>/NAME).
/// `cargo xtask test` builds them first.
pub fn workspace_bin(name: &str) -> Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .context("test binary location")?;
    let p = dir.join(name);
    if !p.exists() {
        bail!(
            "{} not found: build it first (`cargo build -p sg-user --bins`; `cargo xtask test` does)",
            p.display()
        );
    }
    Ok(p)
}

/// A running `sg agent` with private pin root, run dir and input file; killed on drop.
pub struct Agent {
    pub child: Option<std::process::Child>,
    pub pins: PinRoot,
    pub run_dir: std::path::PathBuf,
    pub input: std::path::PathBuf,
    pub netns: String,
    pub log: std::path::PathBuf,
    pub host: String,
    pub extra: Vec<String>,
    /// Run the agent process itself in this network namespace (`ip netns exec`), so that what
    /// it listens on (`--metrics-addr`) is that namespace's, never the host's.
    pub process_netns: Option<String>,
}

impl Agent {
    /// Writes `input` and starts the agent on the taps of `netns`.
    pub fn start(netns: &str, input: &serde_json::Value) -> Result<Self> {
        Self::start_with(netns, input, &[])
    }

    /// Like `start`, with extra `sg agent` arguments.
    pub fn start_with(netns: &str, input: &serde_json::Value, extra: &[&str]) -> Result<Self> {
        Self::start_full(netns, input, extra, None)
    }

    /// Like `start_with`, the agent process running inside `process_netns`.
    pub fn start_full(
        netns: &str,
        input: &serde_json::Value,
        extra: &[&str],
        process_netns: Option<&str>,
    ) -> Result<Self> {
        let mut a = Self::prepare(netns, extra)?;
        a.process_netns = process_netns.map(str::to_string);
        a.write_input(input)?;
        a.spawn()?;
        a.wait_generation(1)?;
        Ok(a)
    }

    /// An agent not started yet, with its own directory (`dir()`), pin root and run dir; its
    /// input is `dir()/input.json` unless `input` is changed before `spawn`.
    pub fn prepare(netns: &str, extra: &[&str]) -> Result<Self> {
        let dir = std::env::temp_dir().join(unique("sg-agent-"));
        // Never inherit a dead run's state.json: it would satisfy `wait_generation` at once.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            child: None,
            pins: PinRoot::new()?,
            run_dir: dir.join("run"),
            input: dir.join("input.json"),
            netns: netns.to_string(),
            log: dir.join("agent.log"),
            host: "compute-1".into(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            process_netns: None,
        })
    }

    /// The agent's private directory (input, log, run dir), removed on drop.
    pub fn dir(&self) -> std::path::PathBuf {
        self.log.parent().unwrap().to_path_buf()
    }

    /// Waits until the log contains `text` `n` times or more.
    pub fn wait_log(&self, text: &str, n: usize) -> Result<()> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while self.log_text().matches(text).count() < n {
            if std::time::Instant::now() > deadline {
                bail!(
                    "the agent did not log {text:?} {n} times; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        Ok(())
    }

    pub fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = Command::new(workspace_bin("sg")?);
        if let Some(ns) = &self.process_netns {
            // Only the network namespace: `ip netns exec` would also remount /sys, hiding bpffs.
            use std::os::{fd::AsRawFd as _, unix::process::CommandExt as _};
            let f = std::fs::File::open(sg_user::netns::netns_path(ns))?;
            // SAFETY: setns(2) on an fd this process holds open, between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .args([
                "--pin-root",
                self.pins.path.to_str().unwrap(),
                "--run-dir",
                self.run_dir.to_str().unwrap(),
            ])
            .args([
                "agent",
                "--state",
                self.input.to_str().unwrap(),
                "--host",
                &self.host,
                "--netns",
                &self.netns,
            ])
            .args(["--gc-interval-ms", "500"])
            .args(&self.extra)
            .env("NO_COLOR", "1")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// Replaces the input atomically (write + rename), as a config manager would.
    pub fn write_input(&self, input: &serde_json::Value) -> Result<()> {
        let tmp = self.input.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(input)?)?;
        std::fs::rename(&tmp, &self.input)?;
        Ok(())
    }

    pub fn generation(&self) -> Option<u64> {
        let s = std::fs::read(self.run_dir.join("state.json")).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&s).ok()?;
        v["generation"].as_u64()
    }

    /// Waits until the agent has applied generation `g` (or later).
    pub fn wait_generation(&self, g: u64) -> Result<u64> {
        let deadline = std::time::Instant::now() + 3 * MUST_HAPPEN;
        loop {
            if let Some(cur) = self.generation()
                && cur >= g
            {
                return Ok(cur);
            }
            if std::time::Instant::now() > deadline {
                bail!("agent did not reach generation {g}; log:\n{}", self.log_text());
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the agent: SIGKILL when `hard`, SIGTERM otherwise.
    pub fn stop(&mut self, hard: bool) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            let sig = if hard { libc::SIGKILL } else { libc::SIGTERM };
            // SAFETY: plain kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, sig) };
            c.wait()?;
        }
        Ok(())
    }

    /// Runs `sg <args>` against this agent's pins and run dir; returns stdout.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(workspace_bin("sg")?)
            .args([
                "--pin-root",
                self.pins.path.to_str().unwrap(),
                "--run-dir",
                self.run_dir.to_str().unwrap(),
            ])
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "sg {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Agent {
    /// Runs `sg <args>` against this agent's pins and run dir: (exit code, stdout, stderr).
    pub fn cli_status(&self, args: &[&str]) -> Result<(i32, String, String)> {
        let out = Command::new(workspace_bin("sg")?)
            .args([
                "--pin-root",
                self.pins.path.to_str().unwrap(),
                "--run-dir",
                self.run_dir.to_str().unwrap(),
            ])
            .args(args)
            .output()?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// `sg status --json --port <port>`: (exit code, the port's status).
    pub fn port_status(&self, port: &str) -> Result<(i32, serde_json::Value)> {
        let (code, out, err) = self.cli_status(&["status", "--json", "--port", port])?;
        let v = serde_json::from_str(&out).with_context(|| format!("sg status: {out}{err}"))?;
        Ok((code, v))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.stop(true);
        let _ = std::fs::remove_dir_all(self.dir());
    }
}

/// The workspace root (for the corpus, the oracle, the examples).
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The hand-written corpus (`tests/corpus/*.json`) and the project's reference inputs
/// (`sg-user/examples/*.json`: WEB1 / WEB_SERVERS), as `(file stem, document)` in name order.
pub fn corpus() -> Vec<(String, serde_json::Value)> {
    let mut files: Vec<std::path::PathBuf> = Vec::new();
    for dir in ["tests/corpus", "sg-user/examples"] {
        let dir = workspace_root().join(dir);
        files.extend(
            std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|x| x == "json")),
        );
    }
    files.sort();
    assert!(files.len() >= 12, "corpus missing");
    files
        .iter()
        .map(|p| {
            let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
            (p.file_stem().unwrap().to_string_lossy().into_owned(), doc)
        })
        .collect()
}

/// A unified diff of two texts (`diff -u`), for failure messages.
pub fn unified_diff(a_name: &str, a: &str, b_name: &str, b: &str) -> String {
    let dir = std::env::temp_dir().join(unique("sg-diff-"));
    std::fs::create_dir_all(&dir).unwrap();
    let (pa, pb) = (dir.join(a_name), dir.join(b_name));
    std::fs::write(&pa, a).unwrap();
    std::fs::write(&pb, b).unwrap();
    let out = Command::new("diff").arg("-u").arg(&pa).arg(&pb).output();
    let _ = std::fs::remove_dir_all(&dir);
    match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
        Err(e) => format!("(diff failed: {e})"),
    }
}

/// Installs the work tree's `sg_neutron` (entry points included) into `target` with `python`.
///
/// pip builds a local project inside its source directory (`build/`, `*.egg-info`), so two
/// installs from `sg-user/neutron` at once (the neutron tests run in parallel) tear down each
/// other's build tree and one of them ends up with a package that has no entry points. Each
/// install therefore builds from a private copy of the sources.
pub fn install_sg_neutron(python: &std::path::Path, target: &std::path::Path) -> Result<()> {
    let src = workspace_root().join("sg-user/neutron");
    let copy = std::path::PathBuf::from(format!("{}.src", target.display()));
    let _ = std::fs::remove_dir_all(&copy);
    let _ = std::fs::remove_dir_all(target);
    std::fs::create_dir_all(copy.join("sg_neutron"))?;
    for file in ["pyproject.toml", "README.md"] {
        std::fs::copy(src.join(file), copy.join(file)).with_context(|| file.to_string())?;
    }
    for entry in std::fs::read_dir(src.join("sg_neutron"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|x| x == "py") {
            std::fs::copy(&path, copy.join("sg_neutron").join(path.file_name().unwrap()))?;
        }
    }
    let out = Command::new(python)
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
        .args(["--no-deps", "--no-build-isolation", "--target"])
        .arg(target)
        .arg(&copy)
        .output()
        .context("running pip")?;
    let _ = std::fs::remove_dir_all(&copy);
    if !out.status.success() {
        bail!(
            "installing sg_neutron into {}: {}",
            target.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
