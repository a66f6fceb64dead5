//! `cargo xtask setup`: install what is missing, change nothing that is already right.
//!
//! Every step checks first and prints one line saying what it found or did; a second run is
//! a few cheap checks. A failing step says which step failed and what to do about it.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, anyhow, bail};

/// bpf-linker release known to work with nightly's LLVM 22 (aya notes §0.1).
const BPF_LINKER_VERSION: &str = "0.13.0";

const DEBIAN_PACKAGES: &[&str] = &[
    "iptables",
    "ipset",
    "bpftool",
    "conntrack",
    "iproute2",
    "tcpdump",
    "iperf3",
    // The metrics test runs a real Prometheus server (and promtool) against the agent.
    "prometheus",
    // Neutron's functional firewall suite (cargo xtask neutron) checks traffic with these.
    "ncat",
    "iputils-ping",
    "iputils-arping",
    // systemd-analyze, for the package test's `systemd-analyze verify` of sg-agent.service
    // (systemd need not run: the test machines have none as PID 1).
    "systemd",
];

pub fn run() -> Result<()> {
    let started = std::time::Instant::now();
    eprintln!("==> setup");
    step("nightly toolchain", nightly)?;
    step("nightly rust-src", rust_src)?;
    step("bpf-linker", bpf_linker)?;
    step("Debian packages", || debian_packages(DEBIAN_PACKAGES))?;
    step("bpffs", bpffs)?;
    eprintln!("    setup done in {:.1?}", started.elapsed());
    Ok(())
}

pub fn step(name: &str, f: impl FnOnce() -> Result<String>) -> Result<()> {
    match f() {
        Ok(msg) => {
            eprintln!("    {name:<18} {msg}");
            Ok(())
        }
        Err(e) => Err(e.context(format!("setup step `{name}` failed"))),
    }
}

fn output(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("could not run {cmd}"))?;
    if !out.status.success() {
        bail!(
            "`{cmd} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nightly() -> Result<String> {
    let list = output("rustup", &["toolchain", "list"])
        .context("rustup is needed to build the eBPF object with nightly")?;
    if list.lines().any(|l| l.starts_with("nightly")) {
        let v = output("rustc", &["+nightly", "--version"])?;
        return Ok(format!("present ({})", v.trim()));
    }
    output(
        "rustup",
        &["toolchain", "install", "nightly", "--profile", "minimal"],
    )
    .context(
        "installing the nightly toolchain failed; check access to static.rust-lang.org, or run \
         `rustup toolchain install nightly --profile minimal` yourself",
    )?;
    Ok("installed".into())
}

fn rust_src() -> Result<String> {
    let installed = output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok("present".into());
    }
    output(
        "rustup",
        &["component", "add", "rust-src", "--toolchain", "nightly"],
    )
    .context(
        "rust-src (needed for -Z build-std=core) could not be downloaded; check access to \
         static.rust-lang.org, then run `rustup component add rust-src --toolchain nightly`",
    )?;
    Ok("installed".into())
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo")
        })
}

/// The libLLVM shared library that nightly rustc itself uses.
fn nightly_libllvm() -> Result<PathBuf> {
    let sysroot = output("rustc", &["+nightly", "--print", "sysroot"])?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let mut found = std::fs::read_dir(&lib)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .collect::<Vec<_>>();
    found.sort();
    found
        .pop()
        .ok_or_else(|| anyhow!("no libLLVM.so.* in {}: is nightly complete?", lib.display()))
}

fn bpf_linker() -> Result<String> {
    let llvm = nightly_libllvm()?;
    let bin = cargo_home().join("bin/bpf-linker");
    if bin.exists() {
        // Must link against the libLLVM of the current nightly; a nightly update needs a rebuild.
        let ldd = output("ldd", &[bin.to_str().unwrap()]).unwrap_or_default();
        let soname = llvm.file_name().unwrap().to_string_lossy().into_owned();
        if ldd
            .lines()
            .any(|l| l.contains(&soname) && !l.contains("not found"))
        {
            return Ok(format!("present ({}, {soname})", bin.display()));
        }
        eprintln!("    bpf-linker         does not match nightly's {soname}: rebuilding");
    }
    let name = llvm.file_name().unwrap().to_string_lossy().into_owned();
    let major = name
        .trim_start_matches("libLLVM.so.")
        .split(['.', '-'])
        .next()
        .and_then(|m| m.parse::<u32>().ok())
        .ok_or_else(|| anyhow!("cannot read the LLVM major version from {name}"))?;
    // A prefix whose lib/ has libLLVM.so (for linking) and the soname (for run time; the build
    // writes an rpath to this lib/), both pointing at nightly's own library.
    let prefix = cargo_home().join(format!("sg-llvm-prefix/{name}"));
    let libdir = prefix.join("lib");
    std::fs::create_dir_all(&libdir)?;
    for link in ["libLLVM.so", name.as_str()] {
        let p = libdir.join(link);
        let _ = std::fs::remove_file(&p);
        std::os::unix::fs::symlink(&llvm, &p).with_context(|| format!("symlink {}", p.display()))?;
    }
    eprintln!(
        "    bpf-linker         building {BPF_LINKER_VERSION} against {} (about a minute)",
        llvm.display()
    );
    let status = Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--force",
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix)
        .status()
        .context("running cargo install")?;
    if !status.success() {
        bail!(
            "`cargo install bpf-linker` failed. It needs crates.io access and nightly's \
             libLLVM at {}; see the error above",
            llvm.display()
        );
    }
    Ok(format!("installed {}", bin.display()))
}

/// Installs what `packages` lacks (as root), or says what to install.
pub fn debian_packages(packages: &[&str]) -> Result<String> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            output("dpkg-query", &["-W", "-f=${Status}", p])
                .map(|s| s.trim() != "install ok installed")
                .unwrap_or(true)
        })
        .collect();
    if missing.is_empty() {
        return Ok(format!("present ({})", packages.join(", ")));
    }
    if !crate::is_root() {
        bail!(
            "missing packages {}: run setup as root, or `apt-get install {}`",
            missing.join(" "),
            missing.join(" ")
        );
    }
    eprintln!("    Debian packages    installing {}", missing.join(" "));
    let ok = |c: &mut Command| {
        c.env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if !ok(Command::new("apt-get").args(["update", "-qq"])) {
        bail!("`apt-get update` failed: check the Debian mirror is reachable");
    }
    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing);
    if !ok(&mut install) {
        bail!(
            "`apt-get install {}` failed; see the output above",
            missing.join(" ")
        );
    }
    Ok(format!("installed {}", missing.join(", ")))
}

fn bpffs() -> Result<String> {
    let mounted = || {
        std::fs::read_to_string("/proc/mounts").is_ok_and(|m| {
            m.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.get(1) == Some(&"/sys/fs/bpf") && f.get(2) == Some(&"bpf")
            })
        })
    };
    if mounted() {
        return Ok("mounted on /sys/fs/bpf".into());
    }
    if !crate::is_root() {
        bail!("bpffs is not mounted: as root, `mount -t bpf bpf /sys/fs/bpf`");
    }
    output("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"]).context("mounting bpffs")?;
    Ok("mounted on /sys/fs/bpf (was not)".into())
}
