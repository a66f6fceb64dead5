//! `cargo xtask cloud`: a real Neutron control plane on one machine (tests/cloud/cloud.py):
//! MariaDB, RabbitMQ, Neutron 29's API, RPC server and periodic workers, and two compute
//! nodes, each with its own OVS (userspace datapath), `neutron-openvswitch-agent` with
//! `firewall_driver = sg_hybrid` and an `sg agent`; then the operator's scenario through the
//! REST API, with packets as the verdicts. Everything runs in namespaces the run creates and
//! is removed at the end, even on failure.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::{neutron, setup, workspace_root};

/// From Debian: the services Neutron needs and what the VMs' traffic is checked with.
const PACKAGES: &[&str] = &[
    "openvswitch-switch",
    "rabbitmq-server",
    "mariadb-server",
    // Neutron's MySQL driver (pure Python), linked into the run's site directory.
    "python3-pymysql",
    "ethtool",
    "ncat",
];

const PYMYSQL: &str = "/usr/lib/python3/dist-packages/pymysql";

/// The scenario, or with `timings` (rounds, output directory) the change-to-wire timings.
pub fn run(timings: Option<(u32, &Path)>) -> Result<()> {
    let root = workspace_root();
    // The Debian packages' services must not start on their own when installed (Docker's
    // policy-rc.d does this; elsewhere they would be stopped by hand): the run starts its own.
    setup::step("cloud packages", || setup::debian_packages(PACKAGES))?;
    let python = neutron::venv_python()?;
    let run_dir = root.join("target/cloud");
    let _ = fs::remove_dir_all(&run_dir);
    fs::create_dir_all(&run_dir)?;
    let site = run_dir.join("site");
    neutron::install_driver(&python, &site)?;
    std::os::unix::fs::symlink(PYMYSQL, site.join("pymysql"))
        .with_context(|| format!("linking {PYMYSQL} into {}", site.display()))?;

    let state = run_dir.join("run");
    eprintln!(
        "\n==> cloud: tests/cloud/cloud.py (logs: {})",
        state.join("logs").display()
    );
    let started = Instant::now();
    let mut cmd = Command::new(&python);
    cmd.arg(root.join("tests/cloud/cloud.py"))
        .arg(&state)
        .arg(root.join("target/debug/sg"))
        .arg(&site);
    if let Some((rounds, out)) = timings {
        cmd.arg("--timings").arg(rounds.to_string()).arg(root.join(out));
    }
    let status = cmd.status().context("running tests/cloud/cloud.py")?;
    // The script removes everything it made; if it was killed, what it left is named by the
    // prefix it wrote.
    leftovers(&state)?;
    eprintln!("    cloud took {:.0?}", started.elapsed());
    if !status.success() {
        bail!(
            "cargo xtask cloud failed ({status}); logs in {}",
            state.join("logs").display()
        );
    }
    Ok(())
}

/// Removes the namespaces (killing what runs in them) and pin roots of a run that could not
/// clean up after itself.
fn leftovers(state: &Path) -> Result<()> {
    let Ok(prefix) = fs::read_to_string(state.join("prefix")) else {
        return Ok(());
    };
    let prefix = format!("{}-", prefix.trim());
    let list = Command::new("ip").args(["netns", "list"]).output()?;
    for ns in String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&prefix))
    {
        eprintln!("    cloud: removing leftover namespace {ns}");
        let pids = Command::new("ip").args(["netns", "pids", ns]).output()?;
        for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
        let _ = Command::new("ip").args(["netns", "del", ns]).status();
    }
    for entry in fs::read_dir("/sys/fs/bpf")? {
        let path: PathBuf = entry?.path();
        if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
        {
            eprintln!("    cloud: removing leftover pin root {}", path.display());
            let _ = fs::remove_dir_all(&path);
        }
    }
    Ok(())
}
