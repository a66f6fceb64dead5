//! Builds the eBPF object (sg-ebpf, nightly, bpfel-unknown-none) and leaves it in $OUT_DIR/sg,
//! where `sg_user::datapath::EBPF_OBJECT` embeds it.
use std::{env, path::PathBuf};

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    // `cargo xtask setup` installs bpf-linker into $CARGO_HOME/bin; make sure the nested nightly
    // cargo finds it even when that directory is not on the caller's PATH.
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    if let Some(bin) = cargo_home.map(|h| h.join("bin")) {
        let path = env::var_os("PATH").unwrap_or_default();
        let mut dirs: Vec<PathBuf> = env::split_paths(&path).collect();
        if !dirs.contains(&bin) {
            dirs.push(bin);
            // SAFETY: build scripts are single-threaded at this point.
            unsafe { env::set_var("PATH", env::join_paths(dirs)?) };
        }
    }
    if which_bpf_linker().is_none() {
        println!(
            "cargo:warning=bpf-linker not found: run `cargo xtask setup` (it builds bpf-linker \
             against nightly rustc's LLVM)"
        );
    }

    let meta = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = meta
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "sg-ebpf")
        .ok_or_else(|| anyhow!("sg-ebpf package not found in the workspace"))?;
    let dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("sg-ebpf manifest has no parent"))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "sg-ebpf",
            root_dir: dir.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}

fn which_bpf_linker() -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|d| d.join("bpf-linker"))
        .find(|p| p.exists())
}
