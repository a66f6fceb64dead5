//! `cargo xtask package`: the Debian package, with cargo-deb.
//!
//! The build is done here, then cargo-deb packs with `--no-build`: `sg` first, then the files
//! generated from it (man pages and completions, from the clap definitions through the hidden
//! `sg generate-docs`) staged with README.md and, when the tree has it, the Neutron driver in
//! `target/<profile>/sg-pkgroot`, which `sg-user/Cargo.toml` maps onto `/`. The unit, sg.toml and
//! the maintainer scripts are in `sg-user/debian/`.
//!
//! For the tests (`cargo xtask test`), `--for-tests` packs the debug build the tests already
//! made (seconds instead of a release build) and also the package of the parent commit, built
//! in a `git worktree` into target/sg-prev and kept by commit under `target/sg-package/`, for
//! the upgrade test. The first time, that build compiles sg's dependencies (about 6 minutes on
//! two busy cores); then only what changed between parents.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{step, workspace_root};

/// cargo-deb release installed from crates.io when missing; builds with rustc 1.85 and later.
pub const CARGO_DEB_VERSION: &str = "3.8.0";

/// Where `--for-tests` leaves the packages the package test installs.
pub const TEST_DIR: &str = "target/sg-package";

/// The parent commit's build (its own target directory, see `previous`).
const PREVIOUS_TARGET: &str = "target/sg-prev";

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Release,
    /// The tests' debug build. cargo-deb warns that it is meant for releases: this package is
    /// only ever installed by the package test.
    Dev,
}

impl Profile {
    fn dir(self) -> &'static str {
        match self {
            Profile::Release => "release",
            Profile::Dev => "debug",
        }
    }
}

/// `cargo xtask package`: the release package under target/debian/. Returns its path.
pub fn release() -> Result<PathBuf> {
    ensure_cargo_deb()?;
    let root = workspace_root();
    let out = root.join("target/debian");
    let deb = build(&root, &root.join("target"), Profile::Release, &out, None)?;
    Ok(deb)
}

/// `cargo xtask package --for-tests`: this tree's package from the debug build, and the
/// package of `previous_rev` (the parent commit, HEAD^, unless told), at
/// TEST_DIR/{current,previous}.deb.
pub fn for_tests(previous_rev: &str) -> Result<()> {
    ensure_cargo_deb()?;
    let root = workspace_root();
    let dir = root.join(TEST_DIR);
    std::fs::create_dir_all(&dir)?;
    let started = std::time::Instant::now();
    build(
        &root,
        &root.join("target"),
        Profile::Dev,
        &dir.join("current.deb"),
        None,
    )?;
    // The parent's build replaces target/debug/sg-docs: keep this tree's for a parent that
    // cannot generate its own.
    let docs = dir.join("docs");
    let _ = std::fs::remove_dir_all(&docs);
    for sub in ["man", "completions"] {
        copy_dir(&root.join("target/debug/sg-docs").join(sub), &docs.join(sub))?;
    }
    previous(previous_rev, &dir.join("previous.deb"), &docs)?;
    eprintln!(
        "    packages for the tests in {} ({:.0?})",
        dir.display(),
        started.elapsed()
    );
    Ok(())
}

/// Installs cargo-deb CARGO_DEB_VERSION unless that version is there.
pub fn ensure_cargo_deb() -> Result<()> {
    let have = Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if let Some(v) = &have
        && v.split_whitespace().last() == Some(CARGO_DEB_VERSION)
    {
        eprintln!("    cargo-deb          present ({v})");
        return Ok(());
    }
    step(
        "install cargo-deb (about two minutes, once)",
        Command::new("cargo").args([
            "install",
            "cargo-deb",
            "--version",
            CARGO_DEB_VERSION,
            "--locked",
            "--force",
        ]),
    )
    .context("cargo-deb is needed to build the package; it comes from crates.io")
}

/// Builds `sg` of the workspace at `tree` into `target_dir`, stages the generated files and
/// packs the .deb to `out` (a file, or a directory for cargo-deb's own name). `docs`: the man
/// pages and completions to ship when the tree's own `sg` cannot generate them (it predates
/// them).
fn build(
    tree: &Path,
    target_dir: &Path,
    profile: Profile,
    out: &Path,
    docs: Option<&Path>,
) -> Result<PathBuf> {
    let mut c = Command::new("cargo");
    c.args(["build", "-p", "sg-user", "--bin", "sg"])
        .env("CARGO_TARGET_DIR", target_dir)
        .current_dir(tree);
    if tree != workspace_root() {
        // Another checkout (the parent commit) is built once per commit: incremental state
        // would only take disk space.
        c.env("CARGO_INCREMENTAL", "0");
    }
    if profile == Profile::Release {
        c.arg("--release");
    }
    step_in(tree, "build sg for the package", &mut c)?;

    let out_dir = target_dir.join(profile.dir());
    let sg = out_dir.join("sg");
    let pkgroot = out_dir.join("sg-pkgroot");
    stage(tree, &sg, docs, &pkgroot)?;

    let version = deb_version(tree)?;
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut c = Command::new("cargo");
    c.args([
        "deb",
        "-p",
        "sg-user",
        "--no-build",
        "--fast",
        "--deb-version",
        &version,
    ])
    .arg("--output")
    .arg(out)
    .env("CARGO_TARGET_DIR", target_dir)
    .current_dir(tree);
    if profile == Profile::Dev {
        c.args(["--profile", "dev", "--quiet"]);
    }
    let o = c.output().context("running cargo deb")?;
    if !o.status.success() {
        bail!(
            "cargo deb failed in {}:\n{}",
            tree.display(),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let deb = String::from_utf8_lossy(&o.stdout)
        .lines()
        .rev()
        .find(|l| l.trim().ends_with(".deb"))
        .map(|l| PathBuf::from(l.trim()))
        .unwrap_or_else(|| out.to_path_buf());
    eprintln!("    package            {} ({version})", deb.display());
    Ok(deb)
}

/// The files `sg-user/Cargo.toml` maps from sg-pkgroot onto `/`.
fn stage(tree: &Path, sg: &Path, fallback_docs: Option<&Path>, root: &Path) -> Result<()> {
    if root.exists() {
        std::fs::remove_dir_all(root).with_context(|| format!("removing {}", root.display()))?;
    }
    let docs = root.with_file_name("sg-docs");
    if docs.exists() {
        std::fs::remove_dir_all(&docs)?;
    }
    let generated = Command::new(sg).arg("generate-docs").arg(&docs).output();
    if !generated.as_ref().is_ok_and(|o| o.status.success()) {
        let Some(fallback) = fallback_docs else {
            bail!(
                "`{} generate-docs` failed: {}",
                sg.display(),
                generated
                    .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                    .unwrap_or_else(|e| e.to_string())
            );
        };
        for sub in ["man", "completions"] {
            copy_dir(&fallback.join(sub), &docs.join(sub))?;
        }
    }
    let copy = |from: &Path, to: &str| -> Result<()> {
        let to = root.join(to);
        std::fs::create_dir_all(to.parent().unwrap())?;
        std::fs::copy(from, &to)
            .map(|_| ())
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))
    };
    // cargo-deb compresses only man pages it did not find under the build directory.
    for page in std::fs::read_dir(docs.join("man"))? {
        let page = page?.path();
        let name = page.file_name().unwrap().to_string_lossy().into_owned();
        copy(&page, &format!("usr/share/man/man8/{name}"))?;
        let o = Command::new("gzip")
            .args(["-9n"])
            .arg(root.join(format!("usr/share/man/man8/{name}")))
            .output()
            .context("running gzip")?;
        if !o.status.success() {
            bail!("gzip {name}: {}", String::from_utf8_lossy(&o.stderr));
        }
    }
    copy(
        &docs.join("completions/sg.bash"),
        "usr/share/bash-completion/completions/sg",
    )?;
    copy(
        &docs.join("completions/_sg"),
        "usr/share/zsh/vendor-completions/_sg",
    )?;
    copy(&tree.join("README.md"), "usr/share/doc/sg/README.md")?;
    neutron_driver(tree, root)?;
    Ok(())
}

/// The Neutron firewall driver (`sg-user/neutron`, a stdlib-only Python package), when the tree
/// has it: its wheel in /usr/share/sg/ for a virtualenv (`pip install`), and the same wheel
/// unpacked into /usr/lib/python3/dist-packages, with its entry points, for Debian's python3
/// and the Neutron it packages.
fn neutron_driver(tree: &Path, root: &Path) -> Result<()> {
    let project = tree.join("sg-user/neutron");
    if !project.join("pyproject.toml").exists() {
        return Ok(());
    }
    // setuptools writes build/ and *.egg-info next to the sources: build from a copy. pip
    // builds in an isolated environment with the build backend pyproject.toml names (from
    // PyPI), so no wheel or setuptools needs to be installed here.
    let src = root.with_file_name("sg-neutron-src");
    let wheels = root.with_file_name("sg-wheel");
    for d in [&src, &wheels] {
        let _ = std::fs::remove_dir_all(d);
    }
    copy_tree(&project, &src)?;
    let o = Command::new("python3")
        .args(["-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir"])
        .arg(&wheels)
        .arg(&src)
        .output()
        .context("running python3 -m pip wheel")?;
    if !o.status.success() {
        bail!(
            "building the Neutron driver's wheel failed:\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let share = root.join("usr/share/sg");
    let site = root.join("usr/lib/python3/dist-packages");
    std::fs::create_dir_all(&share)?;
    std::fs::create_dir_all(&site)?;
    for w in std::fs::read_dir(&wheels)? {
        let w = w?.path();
        std::fs::copy(&w, share.join(w.file_name().unwrap()))?;
        let o = Command::new("python3")
            .args(["-m", "zipfile", "-e"])
            .arg(&w)
            .arg(&site)
            .output()?;
        if !o.status.success() {
            bail!(
                "unpacking {}: {}",
                w.display(),
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
    Ok(())
}

/// `<crate version>+git<commits>.g<hash>-1`: the commit count orders a commit's package after
/// its parent's, so installing one over the other is an upgrade.
fn deb_version(tree: &Path) -> Result<String> {
    let git = |args: &[&str]| -> Result<String> {
        let o = Command::new("git").args(args).current_dir(tree).output()?;
        if !o.status.success() {
            bail!(
                "git {} in {}: {}",
                args.join(" "),
                tree.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let count = git(&["rev-list", "--count", "HEAD"])?;
    let hash = git(&["rev-parse", "--short=9", "HEAD"])?;
    let pkgid = Command::new("cargo")
        .args(["pkgid", "-p", "sg-user"])
        .current_dir(tree)
        .output()?;
    let pkgid = String::from_utf8_lossy(&pkgid.stdout);
    let version = pkgid
        .trim()
        .rsplit(['@', '#'])
        .next()
        .filter(|v| v.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .with_context(|| format!("no version in `cargo pkgid -p sg-user`: {pkgid}"))?;
    Ok(format!("{version}+git{count}.g{hash}-1"))
}

/// The package of commit `rev`, built in a temporary `git worktree` into PREVIOUS_TARGET, and
/// cached at `out` by commit. A commit from before the packaging existed gets
/// this tree's packaging around its own `sg`, with `docs`.
fn previous(rev: &str, out: &Path, docs: &Path) -> Result<()> {
    let root = workspace_root();
    let git = |args: &[&str]| -> Result<(bool, String)> {
        let o = Command::new("git").args(args).current_dir(&root).output()?;
        let text = if o.status.success() { &o.stdout } else { &o.stderr };
        Ok((
            o.status.success(),
            String::from_utf8_lossy(text).trim().to_string(),
        ))
    };
    let (ok, commit) = git(&["rev-parse", "--verify", &format!("{rev}^{{commit}}")])?;
    if !ok {
        bail!(
            "the upgrade test installs the package of the parent commit, but {rev} is not \
             there (a shallow clone?): {commit}"
        );
    }
    let (_, their_manifest) = git(&["show", &format!("{commit}:sg-user/Cargo.toml")])?;
    let packaged = their_manifest.contains("[package.metadata.deb]");
    // Without packaging of its own, the parent's package changes with this tree's packaging.
    let key = if packaged {
        commit.clone()
    } else {
        let mut files = vec!["sg-user/Cargo.toml".to_string()];
        for e in std::fs::read_dir(root.join("sg-user/debian"))? {
            files.push(format!("sg-user/debian/{}", e?.file_name().to_string_lossy()));
        }
        files.sort();
        let mut args = vec!["hash-object"];
        args.extend(files.iter().map(String::as_str));
        format!("{commit}\n{}", git(&args)?.1)
    };
    let stamp = out.with_extension("commit");
    if out.exists() && std::fs::read_to_string(&stamp).is_ok_and(|s| s == key) {
        eprintln!(
            "    previous package   {} (commit {}, cached)",
            out.display(),
            &commit[..12]
        );
        return Ok(());
    }
    let _ = std::fs::remove_file(&stamp);
    let wt = std::env::temp_dir().join(format!("sg-prev-{}-{}", &commit[..12], std::process::id()));
    let _guard = Worktree::add(&root, &wt, &commit)?;
    if !packaged {
        eprintln!(
            "    previous package   commit {} predates the packaging: its sg in this tree's packaging",
            &commit[..12]
        );
        copy_dir(&root.join("sg-user/debian"), &wt.join("sg-user/debian"))?;
        let ours = std::fs::read_to_string(root.join("sg-user/Cargo.toml"))?;
        let meta = &ours[ours
            .find("[package.metadata.deb]")
            .context("sg-user/Cargo.toml has no [package.metadata.deb]")?..];
        let mut theirs = std::fs::read_to_string(wt.join("sg-user/Cargo.toml"))?;
        theirs.push('\n');
        theirs.push_str(meta);
        std::fs::write(wt.join("sg-user/Cargo.toml"), theirs)?;
    }
    // A target directory of its own: cargo names the outputs of workspace crates independently
    // of where the checkout is, so the parent's sg-common would overwrite this tree's in a
    // shared one, and both builds would take the other's as up to date. Kept between runs,
    // only what changed between parents is rebuilt.
    build(&wt, &root.join(PREVIOUS_TARGET), Profile::Dev, out, Some(docs))?;
    std::fs::write(&stamp, &key)?;
    Ok(())
}

/// A `git worktree` removed (with its registration) on drop.
struct Worktree {
    repo: PathBuf,
    path: PathBuf,
}

impl Worktree {
    fn add(repo: &Path, path: &Path, commit: &str) -> Result<Self> {
        if path.exists() {
            std::fs::remove_dir_all(path)?;
        }
        let _ = Command::new("git")
            .args(["worktree", "prune"])
            .current_dir(repo)
            .output();
        step(
            "git worktree of the parent commit",
            Command::new("git")
                .args(["worktree", "add", "--detach", "--quiet"])
                .arg(path)
                .arg(commit),
        )?;
        Ok(Self {
            repo: repo.to_path_buf(),
            path: path.to_path_buf(),
        })
    }
}

impl Drop for Worktree {
    fn drop(&mut self) {
        let _ = Command::new("git")
            .args(["worktree", "remove", "--force"])
            .arg(&self.path)
            .current_dir(&self.repo)
            .output();
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let p = e?.path();
        std::fs::copy(&p, to.join(p.file_name().unwrap()))?;
    }
    Ok(())
}

/// Copies a Python project, without what an earlier in-tree build left in it.
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if name == "build" || name == "__pycache__" || name.ends_with(".egg-info") {
            continue;
        }
        if e.file_type()?.is_dir() {
            copy_tree(&p, &to.join(e.file_name()))?;
        } else {
            std::fs::copy(&p, to.join(e.file_name()))?;
        }
    }
    Ok(())
}

/// `step`, in another directory than the workspace root.
fn step_in(dir: &Path, what: &str, cmd: &mut Command) -> Result<()> {
    cmd.current_dir(dir);
    let shown = format!(
        "{} {}",
        cmd.get_program().to_string_lossy(),
        cmd.get_args()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    eprintln!("\n==> {what}: {shown} (in {})", dir.display());
    let status = cmd
        .status()
        .with_context(|| format!("{what}: could not start `{shown}`"))?;
    if !status.success() {
        bail!("{what} failed ({status}): `{shown}` in {}", dir.display());
    }
    Ok(())
}
