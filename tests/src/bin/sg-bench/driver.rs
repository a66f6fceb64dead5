//! §5 The Neutron driver: a one-rule update on a port with 100 rules, from the driver call to
//! the rule enforced, through `sg_hybrid` (the sg_neutron driver and `sg agent --api-socket`)
//! and through Neutron's own `iptables_hybrid` on the same machine (tests/neutron/
//! bench_driver.py drives both the way Neutron's agent handles a rule update).
//!
//! sg's figure includes everything between Neutron's agent and the datapath: the driver's
//! requests over the socket (five per update), validation of the call and of the whole input,
//! compilation, the map writes, saving the pushed state (in a tmpfs run directory, as `/run`
//! is on a compute node), and the wait until the tap enforces the new policy. iptables': the
//! driver's iptables-save/-restore and ipset commands through a root helper that runs them as
//! children (what sudo or rootwrap does on a node, minus their own start-up).

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use crate::env::{Ns, PinRoot, run, tag};

pub const RULES: usize = 100;

#[derive(Debug, Serialize, Deserialize, Default)]
pub struct Results {
    pub rules: usize,
    /// Seconds per update (every update, in order).
    pub sg: Vec<f64>,
    pub iptables: Vec<f64>,
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The Neutron virtualenv's python and a directory holding the work tree's sg_neutron.
fn python_with_driver(dir: &Path) -> Result<PathBuf> {
    let out = Command::new(workspace_root().join("tests/neutron/setup_venv.sh"))
        .stderr(Stdio::inherit())
        .output()
        .context("tests/neutron/setup_venv.sh")?;
    if !out.status.success() {
        bail!("tests/neutron/setup_venv.sh failed");
    }
    let python = PathBuf::from(String::from_utf8(out.stdout)?.trim());
    let st = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--no-build-isolation",
            "--target",
        ])
        .arg(dir)
        .arg(workspace_root().join("sg-user/neutron"))
        .status()?;
    let _ = std::fs::remove_dir_all(workspace_root().join("sg-user/neutron/build"));
    if !st.success() {
        bail!("installing sg_neutron");
    }
    Ok(python)
}

fn bench(python: &Path, site: &Path, args: &[&str]) -> Result<Vec<f64>> {
    let out = Command::new(python)
        .args(["-W", "ignore"])
        .arg(workspace_root().join("tests/neutron/bench_driver.py"))
        .args(args)
        .env("PYTHONPATH", site)
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null())
        .output()
        .context("tests/neutron/bench_driver.py")?;
    if !out.status.success() {
        bail!(
            "bench_driver.py {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("bench_driver.py output")?;
    serde_json::from_value(v["seconds"].clone()).context("seconds")
}

/// A running `sg agent --api-socket`, stopped on drop.
struct Agent(std::process::Child);

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child; SIGTERM leaves its pins, which PinRoot removes.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

pub fn run_all(sg: &Path, repeats: usize) -> Result<Results> {
    let work = std::env::temp_dir().join(tag("drv"));
    // The run directory on tmpfs, as /run is on a compute node.
    let shm = PathBuf::from("/dev/shm").join(tag("drv"));
    std::fs::create_dir_all(&work)?;
    std::fs::create_dir_all(&shm)?;
    let result = (|| -> Result<Results> {
        let site = work.join("site");
        let python = python_with_driver(&site)?;

        // sg: the tap of the port (hybrid plugging: tap + the port id's first 11 characters).
        let node = Ns::new(tag("drvsg"))?;
        node.ip(&[
            "link",
            "add",
            "tapadcc4b66-c1",
            "type",
            "veth",
            "peer",
            "name",
            "vm0",
        ])?;
        node.ip(&["link", "set", "tapadcc4b66-c1", "up"])?;
        node.ip(&["link", "set", "vm0", "up"])?;
        let pins = PinRoot::new("drv");
        let socket = shm.join("agent.sock");
        let log = std::fs::File::create(work.join("agent.log"))?;
        let _agent = Agent(
            Command::new(sg)
                .arg("--pin-root")
                .arg(&pins.0)
                .arg("--run-dir")
                .arg(shm.join("run"))
                .arg("agent")
                .arg("--api-socket")
                .arg(&socket)
                .args(["--netns", &node.0])
                .env("RUST_LOG", "warn")
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()?,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if Instant::now() > deadline {
                bail!("the agent did not open its socket");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let reps = repeats.to_string();
        let rules = RULES.to_string();
        let sg_s = bench(
            &python,
            &site,
            &[
                "--driver",
                "sg_hybrid",
                "--socket",
                socket.to_str().unwrap(),
                "--rules",
                &rules,
                "--repeats",
                &reps,
            ],
        )?;

        // iptables_hybrid: Neutron's driver in a namespace of its own.
        let ipt = Ns::new(tag("drvipt"))?;
        let ipt_s = bench(
            &python,
            &site,
            &[
                "--driver",
                "iptables_hybrid",
                "--netns",
                &ipt.0,
                "--rules",
                &rules,
                "--repeats",
                &reps,
            ],
        )?;
        let chains = run("ip", &["netns", "exec", &ipt.0, "iptables-save"])?;
        if !chains.contains("-p tcp -m tcp --dport 1098 -j RETURN") {
            bail!("Neutron's iptables driver did not install the port's rules");
        }
        for (name, s) in [("sg_hybrid", &sg_s), ("iptables_hybrid", &ipt_s)] {
            eprintln!(
                "  {name}: p50 {:.2} ms, p99 {:.2} ms over {} updates",
                percentile(s, 0.5) * 1e3,
                percentile(s, 0.99) * 1e3,
                s.len()
            );
        }
        Ok(Results {
            rules: RULES,
            sg: sg_s,
            iptables: ipt_s,
        })
    })();
    let _ = std::fs::remove_dir_all(&work);
    let _ = std::fs::remove_dir_all(&shm);
    result
}

/// The `q` quantile (nearest rank).
pub fn percentile(v: &[f64], q: f64) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}
