//! `cargo xtask`: one entry point for setup, build, test, the demo and the benchmarks.
//!
//! xtask itself must build on a fresh machine before anything is installed, so it depends on
//! nothing that needs bpf-linker (only anyhow and clap).

mod cloud;
mod demo;
mod neutron;
mod package;
mod setup;

use std::process::Command;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "sg developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing: nightly rust-src, bpf-linker, Debian packages, bpffs (default).
    Setup,
    /// Build the eBPF object and the `sg` binary.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Setup, builds, both clippy runs, rustfmt check, the packages for the package test, and
    /// every test (needs root).
    Test,
    /// The Debian package (cargo-deb): target/debian/sg_<version>_<arch>.deb, release build.
    Package {
        /// Instead: this tree's package from the debug build and the parent commit's package,
        /// in target/sg-package/, for the package test (`cargo xtask test` does this).
        #[arg(long)]
        for_tests: bool,
        /// With --for-tests: the commit whose package the upgrade test starts from.
        #[arg(long, default_value = "HEAD^", requires = "for_tests")]
        previous: String,
    },
    /// The demo compute node in network namespaces (needs root).
    Demo {
        /// Neutron drives the story: its SecurityGroupAgentRpc loads the sg driver by alias
        /// and feeds an `sg agent --api-socket`.
        #[arg(long)]
        neutron: bool,
    },
    /// Neutron's own functional firewall suite (test_firewall.py, unmodified) against sg, or
    /// against Neutron's iptables driver for comparison (needs root).
    Neutron {
        #[arg(long, value_enum, default_value = "sg")]
        driver: neutron::Driver,
    },
    /// A real Neutron control plane on one machine (MariaDB, RabbitMQ, Neutron 29's API and
    /// RPC server, two compute nodes with OVS and `firewall_driver = sg_hybrid`) and the
    /// operator's scenario through the REST API (needs root; about 2 minutes). The last step
    /// of `test`.
    Cloud {
        /// Instead of the scenario: this many rounds of each timed change per firewall
        /// driver, into bench/cloud.md (what `bench --only cloud` runs).
        #[arg(long, value_name = "ROUNDS")]
        timings: Option<u32>,
    },
    /// The benchmarks: writes bench/results.md and bench/*.svg (needs root; --quick: < 5 min).
    Bench {
        /// Fewer repeats and shorter runs.
        #[arg(long)]
        quick: bool,
        /// Only these sections: classifier, forwarding, control, memory, driver, and cloud
        /// (the Neutron deployment's change-to-wire timings, only when named) (repeatable).
        #[arg(long)]
        only: Vec<String>,
        /// Where results.md and the plots go (a part run belongs beside the full one, e.g.
        /// `--only driver --out bench/neutron-driver`).
        #[arg(long, default_value = "bench")]
        out: String,
    },
}

/// A failed step prints what failed and what to do, not a backtrace (which anyhow would add
/// under RUST_BACKTRACE=1).
fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd.unwrap_or(Cmd::Setup) {
        Cmd::Setup => setup::run(),
        Cmd::Build { release } => {
            setup::run()?;
            build(release)
        }
        Cmd::Test => test(),
        Cmd::Demo { neutron } => {
            setup::run()?;
            build(false)?;
            if neutron { demo::run_neutron() } else { demo::run() }
        }
        Cmd::Neutron { driver } => {
            setup::run()?;
            if !is_root() {
                bail!("Neutron's functional tests create namespaces and bridges: run them as root");
            }
            if driver == neutron::Driver::Sg {
                build(false)?;
            }
            neutron::run(driver)
        }
        Cmd::Cloud { timings } => cloud(timings.map(|r| (r, std::path::Path::new("bench")))),
        Cmd::Bench { quick, only, out } => bench(quick, &only, &out),
        Cmd::Package { for_tests, previous } => {
            setup::run()?;
            if for_tests {
                build(false)?;
                package::for_tests(&previous)
            } else {
                let deb = package::release()?;
                println!("{}", deb.display());
                Ok(())
            }
        }
    }
}

pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs a command in the workspace root, echoing it, failing with a note on what to do.
pub fn step(what: &str, cmd: &mut Command) -> Result<()> {
    let shown = format!(
        "{} {}",
        cmd.get_program().to_string_lossy(),
        cmd.get_args()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    eprintln!("\n==> {what}: {shown}");
    let status = cmd
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("{what}: could not start `{shown}`"))?;
    if !status.success() {
        bail!("{what} failed ({status}): `{shown}`");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn build(release: bool) -> Result<()> {
    let mut c = cargo();
    c.args(["build", "-p", "sg-user", "-p", "sg-tests", "--bins"]);
    if release {
        c.arg("--release");
    }
    step("build (eBPF object via sg-user/build.rs, then sg)", &mut c)
}

fn test() -> Result<()> {
    let started = std::time::Instant::now();
    setup::run()?;
    build(false)?;
    step("rustfmt", cargo().args(["fmt", "--all", "--check"]))?;
    step(
        "clippy (userspace)",
        cargo().args([
            "clippy",
            "--workspace",
            "--exclude",
            "sg-ebpf",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    step(
        "clippy (eBPF)",
        Command::new("cargo").args([
            "+nightly",
            "clippy",
            "-p",
            "sg-ebpf",
            "--all-targets",
            "--",
            "-C",
            "panic=abort",
            "-Zpanic_abort_tests",
            "-D",
            "warnings",
        ]),
    )?;
    if !is_root() {
        bail!(
            "the test suite loads eBPF programs and creates network namespaces: run it as root \
             (tests that need root are real tests and are never skipped)"
        );
    }
    // The package test installs these: this tree's package and its parent commit's.
    package::for_tests("HEAD^")?;
    step(
        "tests (unit, BPF_PROG_TEST_RUN, network namespaces)",
        cargo().args([
            "test",
            "--workspace",
            "--exclude",
            "sg-ebpf",
            "--",
            "--test-threads",
            "2",
        ]),
    )?;
    // The Neutron driver: its unit tests, then Neutron's functional suite with sg.
    let t = std::time::Instant::now();
    neutron::run(neutron::Driver::Sg)?;
    eprintln!("    Neutron's functional suite with sg took {:.0?}", t.elapsed());
    // The whole control plane: Neutron's API, RPC and OVS agents driving sg on two nodes.
    let t = std::time::Instant::now();
    cloud::run(None)?;
    eprintln!(
        "    the Neutron deployment (cargo xtask cloud) took {:.0?}",
        t.elapsed()
    );
    eprintln!("\nall checks passed in {:.0?}", started.elapsed());
    Ok(())
}

/// Builds `sg` and runs the Neutron deployment: its scenario, or with `timings` its timed
/// changes into that directory's cloud.md.
fn cloud(timings: Option<(u32, &std::path::Path)>) -> Result<()> {
    setup::run()?;
    if !is_root() {
        bail!("the cloud run creates namespaces, bridges and BPF pins: run it as root");
    }
    step("build sg", cargo().args(["build", "-p", "sg-user", "--bins"]))?;
    cloud::run(timings)
}

/// Builds `sg` and `sg-bench` in release and runs the benchmarks into `bench/`.
fn bench(quick: bool, only: &[String], out: &str) -> Result<()> {
    // The Neutron deployment's timings (`--only cloud`, about 15 minutes) are not part of a
    // full run: it needs the cloud packages and the Neutron virtualenv.
    if only.iter().any(|o| o == "cloud") {
        cloud(Some((if quick { 10 } else { 50 }, std::path::Path::new(out))))?;
        let rest: Vec<String> = only.iter().filter(|o| *o != "cloud").cloned().collect();
        if rest.is_empty() {
            return Ok(());
        }
        return bench(quick, &rest, out);
    }
    setup::run()?;
    if !is_root() {
        bail!("the benchmarks load eBPF programs and create network namespaces: run them as root");
    }
    step(
        "build (release)",
        cargo().args(["build", "--release", "-p", "sg-user", "-p", "sg-tests", "--bins"]),
    )?;
    let root = workspace_root();
    let mut c = Command::new(root.join("target/release/sg-bench"));
    c.args(["--out", out, "--sg", "target/release/sg"]);
    if quick {
        c.arg("--quick");
    }
    for o in only {
        c.args(["--only", o]);
    }
    let started = std::time::Instant::now();
    step("benchmarks", &mut c)?;
    eprintln!(
        "\n{out}/results.md and {out}/*.svg written in {:.0?}",
        started.elapsed()
    );
    Ok(())
}

pub fn is_root() -> bool {
    // SAFETY: getuid has no preconditions.
    unsafe extern "C" {
        fn geteuid() -> u32;
    }
    unsafe { geteuid() == 0 }
}
