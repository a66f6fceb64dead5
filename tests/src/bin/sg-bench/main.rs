//! `sg-bench`: the benchmarks behind `cargo xtask bench` (issue 8, and the performance parts
//! of issues 3, 4 and 5). Run as root, built in release; `cargo xtask bench` does both.
//!
//! 1. Classifier cost: BPF_PROG_TEST_RUN of the real programs on compiled maps, against a
//!    pass-through program (`classifier.rs`).
//! 2. Forwarding through a namespace compute node: new-flow UDP and one TCP stream, with no
//!    filter, iptables-legacy, iptables-nft and sg (`forward.rs`, `flood.rs`).
//! 3. Control plane: sg's compiler and applier against sg's iptables back end, and agent
//!    restarts (`control.rs`).
//! 4. Memory: map sizes from the definitions and the kernel's accounting (`memory.rs`).
//! 5. The Neutron driver: a one-rule update through `sg_hybrid` and through Neutron's
//!    `iptables_hybrid`, from the driver call to the rule enforced (`driver.rs`).
//!
//! Output: `<out>/results.md`, `<out>/*.svg`, and the raw samples in `<out>/raw/results.json`
//! (from which `--from-raw` redraws the report without measuring again).

mod classifier;
mod control;
mod driver;
mod env;
mod flood;
mod forward;
mod memory;
mod plots;
mod policy;
mod report;
mod stats;

use std::{path::PathBuf, time::Instant};

use anyhow::{Context as _, Result, bail};
use clap::Parser;

use crate::report::{All, Busy, Machine};

#[derive(Parser)]
#[command(about = "sg benchmarks: writes results.md and SVG plots")]
struct Args {
    /// Fewer repeats and shorter runs (under 5 minutes in all).
    #[arg(long)]
    quick: bool,
    /// Output directory (results.md, *.svg, raw/).
    #[arg(long, default_value = "bench")]
    out: PathBuf,
    /// The `sg` binary (release) for the agent restarts.
    #[arg(long, default_value = "target/release/sg")]
    sg: PathBuf,
    /// Only these sections: classifier, forwarding, control, memory, driver (repeatable).
    #[arg(long)]
    only: Vec<String>,
    /// Redraw results.md and the plots from a raw results file, measuring nothing.
    #[arg(long)]
    from_raw: Option<PathBuf>,
    /// Write the control-plane inputs as Neutron JSON into this directory and exit, so that a
    /// figure can be reproduced (or profiled) with `sg compile --input FILE`.
    #[arg(long)]
    dump_inputs: Option<PathBuf>,
}

const SECTIONS: [&str; 5] = ["classifier", "forwarding", "control", "memory", "driver"];

fn main() -> Result<()> {
    let args = Args::parse();
    for o in &args.only {
        if !SECTIONS.contains(&o.as_str()) {
            bail!("unknown section {o}: one of {}", SECTIONS.join(", "));
        }
    }
    if let Some(dir) = &args.dump_inputs {
        return control::dump_inputs(dir);
    }
    std::fs::create_dir_all(args.out.join("raw"))?;
    let all = match &args.from_raw {
        Some(p) => serde_json::from_slice(&std::fs::read(p)?).context("raw results")?,
        None => measure(&args)?,
    };
    if args.from_raw.is_none() {
        std::fs::write(
            args.out.join("raw/results.json"),
            serde_json::to_vec_pretty(&all)?,
        )?;
    }
    std::fs::write(args.out.join("results.md"), report::markdown(&all))?;
    plots::all(&args.out, &all)?;
    eprintln!("wrote {}", args.out.join("results.md").display());
    Ok(())
}

fn measure(args: &Args) -> Result<All> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmarks load eBPF programs and create network namespaces: run as root");
    }
    if !args.sg.exists() {
        bail!(
            "{} not found: build it first (`cargo build --release -p sg-user`; `cargo xtask bench` does)",
            args.sg.display()
        );
    }
    let want = |s: &str| args.only.is_empty() || args.only.iter().any(|o| o == s);
    let q = args.quick;
    let mut all = All {
        machine: machine(q),
        ..Default::default()
    };
    let started = Instant::now();
    let section = |name: &str, all: &mut All, f: &mut dyn FnMut(&mut All) -> Result<()>| -> Result<()> {
        eprintln!("==> {name}");
        let t = Instant::now();
        let load_start = env::loadavg();
        let (busy0, total0) = env::cpu_ticks();
        let own0 = env::own_ticks();
        f(all)?;
        let (busy1, total1) = env::cpu_ticks();
        let own1 = env::own_ticks();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let others =
            (busy1 - busy0).saturating_sub(own1 - own0) as f64 / (total1 - total0).max(1) as f64 * cpus;
        all.busy.push(Busy {
            section: name.to_string(),
            seconds: t.elapsed().as_secs_f64(),
            load_start,
            load_end: env::loadavg(),
            others_cpus: others,
        });
        Ok(())
    };
    if want("classifier") {
        section("classifier", &mut all, &mut |a| {
            a.classifier = Some(classifier::run(if q { 3 } else { 7 }, 1_000_000, 10_000)?);
            Ok(())
        })?;
    }
    if want("forwarding") {
        section("forwarding", &mut all, &mut |a| {
            a.forward = Some(forward::run_all(&forward::Config {
                udp_rounds: if q { 2 } else { 5 },
                udp_seconds: if q { 1.0 } else { 2.0 },
                tcp_rounds: if q { 1 } else { 3 },
                tcp_seconds: if q { 1 } else { 3 },
            })?);
            Ok(())
        })?;
    }
    if want("control") {
        section("control", &mut all, &mut |a| {
            a.compile = Some(control::compile_bench(if q { 5 } else { 11 })?);
            a.control = Some(control::run_all(
                &control::Config {
                    sync_repeats: if q { 1 } else { 5 },
                    change_repeats: if q { 5 } else { 20 },
                    restart_repeats: if q { 2 } else { 5 },
                },
                &args.sg,
            )?);
            Ok(())
        })?;
    }
    if want("memory") {
        section("memory", &mut all, &mut |a| {
            a.memory = Some(memory::run_all()?);
            Ok(())
        })?;
    }
    if want("driver") {
        section("driver", &mut all, &mut |a| {
            a.driver = Some(driver::run_all(&args.sg, if q { 60 } else { 300 })?);
            Ok(())
        })?;
    }
    eprintln!("measured in {:.0} s", started.elapsed().as_secs_f64());
    Ok(all)
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    env::run(cmd, args)
        .ok()
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| format!("{cmd}: unknown"))
}

fn machine(quick: bool) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let commit = env::run("git", &["rev-parse", "--short", "HEAD"])
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let dirty = env::run("git", &["status", "--porcelain", "--untracked-files=no"])
        .map(|s| !s.trim().is_empty())
        .unwrap_or(false);
    Machine {
        cpu,
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel: first_line("uname", &["-r"]),
        iptables: format!(
            "{}; {}",
            first_line("iptables-legacy", &["--version"]),
            first_line("iptables-nft", &["--version"])
        ),
        bpftool: first_line("bpftool", &["version"]),
        iperf3: first_line("iperf3", &["--version"]),
        date: first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        commit: format!(
            "commit {commit}{}",
            if dirty { " with uncommitted changes" } else { "" }
        ),
        mode: if quick { "quick" } else { "full" }.into(),
        rcu_expedited: std::fs::read_to_string("/sys/kernel/rcu_expedited")
            .unwrap_or_default()
            .trim()
            .to_string(),
    }
}
