//! Namespaces, pin roots and commands, each removed when its guard drops (also on errors).

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// Runs a command and returns its stdout; fails with its stderr.
pub fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command with `input` on its standard input.
pub fn run_input(cmd: &str, args: &[&str], input: &str) -> Result<String> {
    use std::io::Write as _;
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd}"))?;
    let mut w = child.stdin.take().expect("piped");
    let text = input.to_string();
    let writer = std::thread::spawn(move || w.write_all(text.as_bytes()));
    let out = child.wait_with_output()?;
    let _ = writer.join();
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A name unique to this run.
pub fn tag(what: &str) -> String {
    format!("sgb{}{what}", std::process::id() % 100_000)
}

/// A network namespace, deleted on drop.
pub struct Ns(pub String);

impl Ns {
    pub fn new(name: String) -> Result<Self> {
        run("ip", &["netns", "add", &name])?;
        let ns = Self(name);
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut a = vec!["-n", &self.0];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    /// `ip -batch -` inside the namespace: many links quickly.
    pub fn ip_batch(&self, lines: &str) -> Result<()> {
        run_input("ip", &["-n", &self.0, "-batch", "-"], lines).map(|_| ())
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "delete", &self.0]).output();
    }
}

/// A private bpffs pin root, unpinned (links detached, maps freed) on drop.
pub struct PinRoot(pub PathBuf);

impl PinRoot {
    pub fn new(what: &str) -> Self {
        Self(PathBuf::from("/sys/fs/bpf").join(tag(what)))
    }
}

impl Drop for PinRoot {
    fn drop(&mut self) {
        if self.0.exists() && sg_user::datapath::detach_all(&self.0).is_err() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// `/proc/loadavg`'s first three fields.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Busy CPU time of the whole machine (user+nice+system+irq+softirq+steal), in clock ticks,
/// and the total: the share of it this process did not spend tells how busy others were.
pub fn cpu_ticks() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = s
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if f.len() < 8 {
        return (0, 0);
    }
    let busy = f[0] + f[1] + f[2] + f[5] + f[6] + f[7];
    (busy, f.iter().take(8).sum())
}

/// This process's CPU time (user + system, children included), in clock ticks.
pub fn own_ticks() -> u64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = s.rsplit(')').next().unwrap_or_default();
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(4)
        .filter_map(|x| x.parse().ok())
        .collect();
    f.iter().sum()
}

/// `/sys/kernel/rcu_expedited` on while this guard lives, restored on drop.
///
/// A tcx attach waits for an RCU grace period under rtnl (`tcx_entry_sync`), about 15 ms on
/// this machine, so attaching the taps of a large node takes seconds to minutes. The benchmark
/// turns expedited grace periods on while it *sets up* nodes (never while it measures), and
/// measures the attach cost itself both ways.
pub struct RcuExpedited(Option<String>);

const RCU_EXPEDITED: &str = "/sys/kernel/rcu_expedited";

impl RcuExpedited {
    pub fn on() -> Self {
        let old = std::fs::read_to_string(RCU_EXPEDITED).ok();
        if old.is_some() {
            let _ = std::fs::write(RCU_EXPEDITED, "1");
        }
        Self(old)
    }
}

impl Drop for RcuExpedited {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            let _ = std::fs::write(RCU_EXPEDITED, old.trim());
        }
    }
}
