//! `cargo xtask neutron [--driver sg|iptables]`: Neutron's own functional firewall suite
//! (`neutron/tests/functional/agent/test_firewall.py`, unmodified, from the neutron 29.0.0
//! wheel) against sg, or against Neutron's iptables driver on the same machine for comparison.
//! Also the sg_neutron driver's unit tests. Everything runs from a cached virtualenv
//! (tests/neutron/setup_venv.sh) and a run directory under target/neutron/.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::{step, workspace_root};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Driver {
    /// The sg_neutron driver feeding an `sg agent` (this repository).
    Sg,
    /// Neutron's IptablesFirewallDriver, with and without ipset (the upstream scenarios).
    Iptables,
}

impl Driver {
    fn name(self) -> &'static str {
        match self {
            Driver::Sg => "sg",
            Driver::Iptables => "iptables",
        }
    }

    /// The test module stestr runs: ours (Neutron's classes with the sg scenario), or
    /// Neutron's own.
    fn module(self) -> &'static str {
        match self {
            Driver::Sg => "test_firewall_sg",
            Driver::Iptables => "neutron.tests.functional.agent.test_firewall",
        }
    }
}

/// The virtualenv's python (created on first use).
pub fn venv_python() -> Result<PathBuf> {
    let out = Command::new(workspace_root().join("tests/neutron/setup_venv.sh"))
        .stderr(Stdio::inherit())
        .output()
        .context("running tests/neutron/setup_venv.sh")?;
    if !out.status.success() {
        bail!("tests/neutron/setup_venv.sh failed ({})", out.status);
    }
    let path = String::from_utf8(out.stdout)?.trim().to_string();
    Ok(PathBuf::from(path))
}

/// Installs the work tree's sg_neutron into `dir` (not into the shared venv: each work tree
/// and run tests its own copy), entry points included.
pub fn install_driver(python: &Path, dir: &Path) -> Result<()> {
    let _ = fs::remove_dir_all(dir);
    step(
        "install sg_neutron (entry points sg, sg_hybrid)",
        Command::new(python)
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
            .arg(workspace_root().join("sg-user/neutron")),
    )?;
    // pip leaves its build tree in the source directory.
    let _ = fs::remove_dir_all(workspace_root().join("sg-user/neutron/build"));
    for egg in fs::read_dir(workspace_root().join("sg-user/neutron"))?.flatten() {
        if egg.file_name().to_string_lossy().ends_with(".egg-info") {
            let _ = fs::remove_dir_all(egg.path());
        }
    }
    Ok(())
}

/// The driver's unit tests, against a scripted agent, with Neutron's FirewallDriver.
pub fn unit_tests(python: &Path, site: &Path) -> Result<()> {
    let tests = workspace_root().join("sg-user/neutron/tests");
    step(
        "sg_neutron unit tests",
        Command::new(python)
            .args(["-W", "ignore", "-m", "unittest", "discover", "-v", "-s"])
            .arg(&tests)
            .arg("-t")
            .arg(&tests)
            .env("PYTHONPATH", site)
            // Outside the work tree, so that the installed copy is what is imported.
            .current_dir(std::env::temp_dir()),
    )
}

/// Runs the suite for `driver`; fails unless every test passed or was skipped.
pub fn run(driver: Driver) -> Result<()> {
    let root = workspace_root();
    let python = venv_python()?;
    let venv = python
        .parent()
        .and_then(Path::parent)
        .context("venv layout")?
        .to_path_buf();
    let site_packages = venv.join("lib/python3.11/site-packages");
    if !site_packages.join("neutron").is_dir() {
        bail!(
            "{}: no neutron package in the virtualenv",
            site_packages.display()
        );
    }
    let run_dir = root.join("target/neutron").join(driver.name());
    let _ = fs::remove_dir_all(&run_dir);
    fs::create_dir_all(run_dir.join("logs"))?;
    fs::write(
        run_dir.join(".stestr.conf"),
        format!(
            "[DEFAULT]\ntest_path={}\ntop_dir={}\n",
            site_packages.join("neutron/tests/functional/agent").display(),
            site_packages.display()
        ),
    )?;

    let site = run_dir.join("site");
    let mut pythonpath = vec![site.clone(), root.join("tests/neutron")];
    if driver == Driver::Sg {
        install_driver(&python, &site)?;
        unit_tests(&python, &site)?;
    } else {
        pythonpath.truncate(0);
    }

    let path = format!(
        "{}:{}",
        venv.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let stream = run_dir.join("stream.subunit");
    eprintln!(
        "\n==> neutron test_firewall ({}): {} (logs: {})",
        driver.name(),
        driver.module(),
        run_dir.join("logs").display()
    );
    let started = Instant::now();
    let status = Command::new(venv.join("bin/stestr"))
        .args(["run", "--subunit", "--no-discover", driver.module()])
        .current_dir(&run_dir)
        .stdout(fs::File::create(&stream)?)
        .stderr(fs::File::create(run_dir.join("stderr.txt"))?)
        .env("PATH", path)
        .env(
            "PYTHONPATH",
            std::env::join_paths(&pythonpath).context("PYTHONPATH")?,
        )
        // Neutron's functional tests skip everything without it; we are root already, and
        // the root helper runs commands as its child (tests/neutron/roothelper).
        .env("OS_SUDO_TESTING", "1")
        .env("OS_ROOTWRAP_CMD", root.join("tests/neutron/roothelper"))
        .env("OS_LOG_PATH", run_dir.join("logs"))
        .env("OS_TEST_TIMEOUT", "180")
        .env("SG_BIN", root.join("target/debug/sg"))
        .status()
        .context("running stestr")?;
    let secs = started.elapsed().as_secs_f64();
    let summary = Command::new(&python)
        .arg(root.join("tests/neutron/summarize.py"))
        .arg(driver.name())
        .arg(format!("{secs:.0}"))
        .stdin(fs::File::open(&stream)?)
        .status()
        .context("summarising the results")?;
    if !summary.success() {
        bail!(
            "neutron test_firewall ({}) failed (stestr: {status}); logs in {}",
            driver.name(),
            run_dir.join("logs").display()
        );
    }
    Ok(())
}
