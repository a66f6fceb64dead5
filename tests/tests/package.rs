//! The Debian package on this machine, as an operator uses it: install the parent commit's
//! package, configure /etc/sg/sg.toml, run the agent as the installed unit says (its ExecStart,
//! its capability set), the WEB1 story, upgrade to this tree's package under a live TCP
//! connection, a pinned layout this version cannot use, removal (with and without
//! /etc/sg/keep-enforcement) and purge.
//!
//! The packages come from `cargo xtask package --for-tests` (`cargo xtask test` runs it):
//! target/sg-package/previous.deb and current.deb. There is no systemd running as PID 1 on the
//! test machines, so the unit is checked with `systemd-analyze verify`, and the agent is started
//! from the unit's own ExecStart and CapabilityBoundingSet (setpriv), inside the node's network
//! namespace (nsenter), where a compute node's agent finds its taps.
//!
//! The test holds a machine-wide lock (two test runs would install over each other), refuses
//! to run where sg is installed already, and purges the package, stops the agent and removes
//! every pin on the way out, also when it fails.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use sg_tests::{ComputeNode, MUST_HAPPEN, PinRoot, run, spawn_in, tcp_reachable, tcp_servers, wait_until};

const TAP: &str = "tapadcc4b66-c1";
const MAC: &str = "fa:16:3e:dc:d2:ab";
const VM_IP: &str = "192.168.206.6";
const PEER_IP: &str = "192.168.206.10";
const UNIT: &str = "/usr/lib/systemd/system/sg-agent.service";
const CONFIG: &str = "/etc/sg/sg.toml";

fn vm_ip() -> IpAddr {
    VM_IP.parse().unwrap()
}

fn package(name: &str) -> PathBuf {
    let p = sg_tests::workspace_root().join("target/sg-package").join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo xtask package --for-tests` (`cargo xtask test` does)",
        p.display()
    );
    p.canonicalize().unwrap()
}

/// `dpkg-query`'s status and version of sg, if dpkg knows it.
fn installed() -> Option<(String, String)> {
    let o = Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Abbrev}|${Version}", "sg"])
        .output()
        .ok()?;
    let s = String::from_utf8_lossy(&o.stdout).to_string();
    let (status, version) = s.split_once('|')?;
    o.status
        .success()
        .then(|| (status.trim().to_string(), version.to_string()))
}

fn deb_version(deb: &Path) -> String {
    let o = run("dpkg-deb", &["-f", deb.to_str().unwrap(), "Version"]).unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn apt_install(deb: &Path) -> String {
    apt_install_with(deb, |c| c)
}

/// `apt-get install ./deb`, through `wrap` (which may put it under another command); returns
/// what it printed.
fn apt_install_with(deb: &Path, wrap: impl FnOnce(&mut Command) -> &mut Command) -> String {
    let mut c = Command::new("apt-get");
    c.args([
        "install",
        "-y",
        "-q",
        "--no-install-recommends",
        "--allow-downgrades",
        "-o",
        "Dpkg::Options::=--force-confold",
    ])
    .arg(deb)
    .env("DEBIAN_FRONTEND", "noninteractive");
    let o = wrap(&mut c).output().unwrap();
    let out = format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.status.success(),
        "apt-get install {} failed:\n{out}",
        deb.display()
    );
    out
}

/// The upgrade's `apt-get install`, in a private mount namespace where /sys/fs/bpf is not
/// mounted (as on a host where nothing mounted bpffs): the postinst must mount it. The pins
/// of the node live in the machine's bpffs, which that namespace does not touch.
fn apt_install_without_bpffs(deb: &Path) -> String {
    let script = "umount /sys/fs/bpf && ! grep -q ' /sys/fs/bpf bpf ' /proc/self/mounts && \
                  apt-get \"$@\" && grep -q ' /sys/fs/bpf bpf ' /proc/self/mounts && \
                  echo 'bpffs mounted after the install'";
    let out = apt_install_with(deb, |c| {
        let args: Vec<std::ffi::OsString> = c.get_args().map(|a| a.to_owned()).collect();
        let envs: Vec<(std::ffi::OsString, std::ffi::OsString)> = c
            .get_envs()
            .filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned())))
            .collect();
        *c = Command::new("unshare");
        c.args(["--mount", "--propagation", "private", "sh", "-c", script, "sh"])
            .args(args)
            .envs(envs)
    });
    assert!(
        out.contains("sg: mounted bpffs on /sys/fs/bpf") && out.contains("bpffs mounted after the install"),
        "the postinst mounts bpffs where it is missing:\n{out}"
    );
    out
}

fn dpkg(args: &[&str]) -> String {
    let o = Command::new("dpkg").args(args).output().unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "dpkg {} failed:\n{out}", args.join(" "));
    out
}

/// The pid of the package test that installed sg on this machine.
const OWNER: &str = "/run/sg-package-test.pid";

/// Removes the package and everything it made, its pins included (its prerm detaches what the
/// installed config names). If that fails (an sg that cannot run), the package goes with
/// keep-enforcement, and the test's PinRoot detaches the pins.
fn purge() {
    let _ = std::fs::remove_file("/etc/sg/keep-enforcement");
    let _ = Command::new("dpkg").args(["--purge", "sg"]).output();
    if installed().is_some_and(|(s, _)| !s.starts_with("un")) {
        let _ = std::fs::write("/etc/sg/keep-enforcement", "");
        let _ = Command::new("dpkg").args(["--purge", "sg"]).output();
    }
}

/// Stops the agent a killed package test (pid `owner`) left running on its own pin root
/// (`/sys/fs/bpf/sg-test-<owner>-...`, in the installed config): it holds the pin root, and
/// the package's removal would refuse to detach under it.
fn stop_leftover_agent(owner: i32) {
    let Some(root) = std::fs::read_to_string(CONFIG).ok().and_then(|c| {
        c.lines()
            .find_map(|l| l.strip_prefix("pin-root = "))
            .map(|v| PathBuf::from(v.trim().trim_matches('"')))
    }) else {
        return;
    };
    if !root
        .to_string_lossy()
        .starts_with(&format!("/sys/fs/bpf/sg-test-{owner}-"))
    {
        return;
    }
    if let Ok(Some(agent)) = sg_user::agent::lock::holder(&root) {
        // SAFETY: kill(2); the agent holds the dead test's own pin root.
        unsafe { libc::kill(agent as i32, libc::SIGTERM) };
        let _ = wait_until("the leftover agent exits", MUST_HAPPEN, || {
            sg_user::agent::lock::holder(&root).is_ok_and(|h| h.is_none())
        });
    }
}

/// The machine-wide lock: one package test at a time on a machine.
struct MachineLock(#[allow(dead_code)] std::fs::File);

impl MachineLock {
    fn take() -> Self {
        let f = std::fs::File::create("/run/lock/sg-package-test.lock").unwrap();
        // SAFETY: flock on an fd we own; released when the file closes.
        assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
        Self(f)
    }
}

/// The installed package and the agent this test runs from it; on drop, the agent is killed,
/// the package purged and the pins removed, whatever state the test stopped in.
struct Node {
    node: ComputeNode,
    peer: sg_tests::Netns,
    pins: PinRoot,
    dir: PathBuf,
    agent: Option<Child>,
    _lock: MachineLock,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop_agent();
        if installed().is_some() {
            purge();
        }
        if installed().is_none_or(|(s, _)| s.starts_with("un")) {
            let _ = std::fs::remove_file(OWNER);
        }
        // PinRoot's own drop detaches whatever is left under the pin root.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Node {
    fn new() -> Self {
        let lock = MachineLock::take();
        if let Some((status, version)) = installed()
            && !status.starts_with("un")
        {
            let owner = std::fs::read_to_string(OWNER)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok());
            // SAFETY: kill(2) with signal 0 only checks that the process exists.
            match owner {
                // Installed by a package test that was killed before its guards ran.
                Some(pid) if unsafe { libc::kill(pid, 0) } != 0 => {
                    stop_leftover_agent(pid);
                    purge();
                }
                _ => panic!(
                    "the sg package is on this machine already ({status} {version}): the \
                     package test installs and purges it, so it does not run here (`dpkg \
                     --purge sg` first)"
                ),
            }
        }
        std::fs::write(OWNER, std::process::id().to_string()).unwrap();
        let mut node = ComputeNode::new().unwrap();
        node.add_vm(TAP, MAC, &format!("{VM_IP}/24")).unwrap();
        let peer = node.add_peer(&format!("{PEER_IP}/24")).unwrap();
        let dir = std::env::temp_dir().join(sg_tests::unique("sg-pkg-"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self {
            node,
            peer,
            pins: PinRoot::new().unwrap(),
            dir,
            agent: None,
            _lock: lock,
        }
    }

    fn input(&self) -> PathBuf {
        self.dir.join("neutron.json")
    }

    fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    fn log(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    /// Replaces the input with one of the WEB1 examples, atomically.
    fn write_input(&self, example: &str) {
        let src = sg_tests::workspace_root().join("sg-user/examples").join(example);
        let tmp = self.dir.join("neutron.json.tmp");
        std::fs::copy(src, &tmp).unwrap();
        std::fs::rename(&tmp, self.input()).unwrap();
    }

    /// Edits the installed /etc/sg/sg.toml as an operator would: the input, this host's name,
    /// and (so that this test never touches a real agent's state) its own pin root and run dir.
    fn configure(&self) {
        let text = std::fs::read_to_string(CONFIG).unwrap();
        assert!(
            text.contains("\nstate = "),
            "the shipped sg.toml sets state:\n{text}"
        );
        let mut out: String = text
            .lines()
            .map(|l| {
                if l.starts_with("state = ") {
                    format!("state = {:?}", self.input().to_str().unwrap())
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        out += &format!(
            "\nhost = \"compute-1\"\npin-root = {:?}\nrun-dir = {:?}\ngc-interval-ms = 500\n",
            self.pins.path.to_str().unwrap(),
            self.run_dir().to_str().unwrap()
        );
        std::fs::write(CONFIG, out).unwrap();
    }

    /// Starts the agent as the installed unit does: its ExecStart words, under its
    /// CapabilityBoundingSet, in the node's network namespace; stderr to the log.
    fn start_agent(&mut self) {
        assert!(self.agent.is_none());
        let unit = std::fs::read_to_string(UNIT).unwrap();
        let value = |key: &str| -> String {
            unit.lines()
                .find_map(|l| l.strip_prefix(&format!("{key}=")))
                .unwrap_or_else(|| panic!("{UNIT} has no {key}"))
                .to_string()
        };
        let caps: Vec<String> = value("CapabilityBoundingSet")
            .split_whitespace()
            .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
            .collect();
        let mut exec: Vec<String> = value("ExecStart").split_whitespace().map(str::to_owned).collect();
        let mut bounding = format!("--bounding-set=-all,{}", caps.join(","));
        if !self.sg_knows_config() {
            // The transition: the parent commit predates the packaging, and its package is its
            // sg in this tree's packaging (xtask/src/package.rs), which has no --config yet.
            // It gets the keys configure() wrote as flags, and every capability: it was not
            // made to run under the unit's set.
            bounding = "--bounding-set=+all".into();
            let at = exec
                .iter()
                .position(|w| w == "--config")
                .expect("ExecStart has --config");
            exec.splice(
                at..at + 2,
                [
                    "--pin-root",
                    self.pins.path.to_str().unwrap(),
                    "--run-dir",
                    self.run_dir().to_str().unwrap(),
                ]
                .map(str::to_owned),
            );
            exec.extend(
                [
                    "--state",
                    self.input().to_str().unwrap(),
                    "--host",
                    "compute-1",
                    "--gc-interval-ms",
                    "500",
                ]
                .map(str::to_owned),
            );
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .unwrap();
        // As systemd connects stderr to the journal: JOURNAL_STREAM names the stream.
        let stream = {
            use std::os::unix::fs::MetadataExt as _;
            let m = log.metadata().unwrap();
            format!("{}:{}", m.dev(), m.ino())
        };
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.node.host.name))
            .arg("setpriv")
            .arg(bounding)
            .arg("--inh-caps=-all")
            .arg("--")
            .args(&exec)
            .env("NO_COLOR", "1")
            .env("JOURNAL_STREAM", stream)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.agent = Some(child);
    }

    fn sg_knows_config(&self) -> bool {
        let o = Command::new("/usr/sbin/sg").arg("--help").output().unwrap();
        String::from_utf8_lossy(&o.stdout).contains("--config")
    }

    /// SIGTERM, as systemd stops the unit (KillSignal=SIGTERM); returns the exit status.
    fn stop_agent(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.agent.take()?;
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().ok()
    }

    /// Waits for the agent's run state to reach `g`.
    fn wait_generation(&mut self, g: u64) {
        let state = self.run_dir().join("state.json");
        let reached = || {
            std::fs::read(&state)
                .ok()
                .and_then(|s| serde_json::from_slice::<serde_json::Value>(&s).ok())
                .and_then(|v| v["generation"].as_u64())
                .is_some_and(|cur| cur >= g)
        };
        if let Err(e) = wait_until(&format!("generation {g}"), 3 * MUST_HAPPEN, reached) {
            let exited = self.agent.as_mut().and_then(|c| c.try_wait().ok().flatten());
            panic!("{e} (agent exit: {exited:?}); log:\n{}", self.log_text());
        }
    }

    fn wait_ready(&self, n: usize) {
        if let Err(e) = wait_until(&format!("agent ready ({n})"), MUST_HAPPEN, || {
            self.log_text().matches(" ready ").count() >= n
        }) {
            panic!("{e}; log:\n{}", self.log_text());
        }
    }

    fn reachable(&self, port: u16, timeout: Duration) -> bool {
        tcp_reachable(&self.peer.name, vm_ip(), port, timeout).unwrap()
    }

    /// The installed `sg` with the installed config, as an operator runs it: in the namespace
    /// of the node's taps.
    fn sg(&self, args: &[&str]) -> String {
        let o = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.node.host.name))
            .args(["/usr/sbin/sg", "--config", CONFIG])
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "sg {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

/// A line-echo server on VM_IP:port in `ns`.
fn echo_server(ns: &str, port: u16) {
    let (tx, rx) = std::sync::mpsc::channel();
    spawn_in(ns, move || {
        let l = TcpListener::bind((vm_ip(), port)).unwrap();
        tx.send(()).unwrap();
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                s.set_nodelay(true).unwrap();
                let mut w = s.try_clone().unwrap();
                for line in BufReader::new(s).lines() {
                    let Ok(line) = line else { break };
                    if writeln!(w, "{line}").is_err() {
                        break;
                    }
                }
            });
        }
    });
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
}

/// One established TCP connection that exchanges a line every few ms; an echo that does not
/// come within MUST_HAPPEN is an error (the connection was cut).
struct Flow {
    ok: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl Flow {
    fn start(ns: &str, port: u16) -> Self {
        let (ok, errors, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let (o, e, s) = (ok.clone(), errors.clone(), stop.clone());
        let handle = spawn_in(ns, move || {
            let stream = TcpStream::connect_timeout(&(vm_ip(), port).into(), MUST_HAPPEN).unwrap();
            stream.set_read_timeout(Some(MUST_HAPPEN)).unwrap();
            stream.set_nodelay(true).unwrap();
            let mut w = stream.try_clone().unwrap();
            let mut r = BufReader::new(stream);
            let mut i = 0u64;
            while !s.load(Ordering::Relaxed) {
                i += 1;
                let mut line = String::new();
                let good = writeln!(w, "ping {i}").is_ok()
                    && r.read_line(&mut line).is_ok()
                    && line.trim() == format!("ping {i}");
                if good { &o } else { &e }.fetch_add(1, Ordering::Relaxed);
                if !good {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let f = Self {
            ok,
            errors,
            stop,
            handle: Some(handle),
        };
        f.wait_progress(3, "the flow never started");
        f
    }

    fn wait_progress(&self, n: u64, what: &str) {
        let target = self.ok.load(Ordering::Relaxed) + n;
        wait_until(what, MUST_HAPPEN, || {
            self.ok.load(Ordering::Relaxed) >= target || self.errors.load(Ordering::Relaxed) > 0
        })
        .unwrap();
        assert_eq!(self.errors.load(Ordering::Relaxed), 0, "{what}: the flow failed");
    }

    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.handle.take().unwrap().join();
        (
            self.ok.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        )
    }
}

/// Whether anything of the package's own or the unit's is left under /etc, /usr, /var/lib.
fn leftovers() -> Vec<String> {
    let mut found = Vec::new();
    for p in [
        "/usr/sbin/sg",
        UNIT,
        "/lib/systemd/system/sg-agent.service",
        "/etc/sg",
        "/var/lib/sg",
        "/etc/systemd/system/sg-agent.service",
        "/etc/systemd/system/multi-user.target.wants/sg-agent.service",
        "/var/lib/systemd/deb-systemd-helper-enabled/sg-agent.service.dsh-also",
        "/var/lib/systemd/deb-systemd-helper-masked/sg-agent.service",
    ] {
        if Path::new(p).symlink_metadata().is_ok() {
            found.push(p.to_string());
        }
    }
    found
}

#[test]
fn install_web1_upgrade_under_a_connection_refuse_a_changed_layout_remove_purge() {
    let previous = package("previous.deb");
    let current = package("current.deb");
    let (v_prev, v_cur) = (deb_version(&previous), deb_version(&current));
    assert!(
        run("dpkg", &["--compare-versions", &v_cur, "gt", &v_prev]).is_ok(),
        "this tree's package ({v_cur}) must be newer than its parent's ({v_prev})"
    );
    let mut n = Node::new();
    let vm_ns = n.node.vms[0].ns.name.clone();
    tcp_servers(&vm_ns, vm_ip(), &[80, 22]).unwrap();
    echo_server(&vm_ns, 443);

    // 1. The parent commit's package, configured in /etc/sg/sg.toml.
    apt_install(&previous);
    assert_eq!(installed().unwrap().1, v_prev);
    n.write_input("web1-default-only.json");
    n.configure();
    n.start_agent();
    n.wait_generation(1);

    // 2. The WEB1 story: only `default`, so 80 times out; WEB_SERVERS (tcp 80 and 443) opens it.
    let t = Duration::from_millis(600);
    assert!(!n.reachable(80, t), "default group only: 80 must time out");
    n.write_input("web1.json");
    n.wait_generation(2);
    assert!(
        n.reachable(80, MUST_HAPPEN),
        "WEB_SERVERS applied: 80 must answer"
    );
    assert!(!n.reachable(22, t), "22 is in no group: it must time out");
    let flow = Flow::start(&n.peer.name, 443);

    // 3. Upgrade to this tree's package under the connection. systemd would restart the unit
    // after unpacking (restart-after-upgrade); here the test does: SIGTERM, then the new
    // ExecStart. The new agent adopts the pins and swaps its programs into the links. The
    // install runs where bpffs is not mounted, so its postinst has to mount it.
    apt_install_without_bpffs(&current);
    assert_eq!(installed().unwrap().1, v_cur);
    let verify = Command::new("systemd-analyze")
        .args(["verify", UNIT])
        .output()
        .unwrap();
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify {UNIT}:\n{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    flow.wait_progress(10, "before the restart");
    let exit = n.stop_agent().unwrap();
    assert!(exit.success(), "the old agent's SIGTERM exit: {exit:?}");
    assert!(!n.reachable(22, t), "no agent: the pinned links still filter");
    flow.wait_progress(10, "while no agent runs");
    n.start_agent();
    n.wait_ready(2);
    flow.wait_progress(10, "after the upgrade");
    let log = n.log_text();
    assert!(
        log.contains(&format!("took_over=[\"{TAP}\"]")),
        "the new agent took the links over:\n{log}"
    );
    let ready = log.lines().rfind(|l| l.contains(" ready ")).unwrap();
    assert!(
        ready.starts_with("<6>") && ready.contains("INFO"),
        "on a journal stream each line carries its syslog priority: {ready}"
    );
    let status = n.sg(&["status"]);
    assert!(status.contains(TAP) && status.contains("enforced"), "{status}");
    assert!(n.reachable(80, MUST_HAPPEN), "80 still answers after the upgrade");
    assert!(!n.reachable(22, t), "22 still times out after the upgrade");

    // 4. A pinned layout this version cannot use (as if the previous version had pinned
    // SG_STATS with other values): the agent refuses to start, exit status 78 (the unit does
    // not restart on it), naming the map, the change and the ways out; the attached programs
    // keep enforcing meanwhile.
    assert!(n.stop_agent().unwrap().success());
    let stats = n.pins.path.join("maps/SG_STATS");
    std::fs::remove_file(&stats).unwrap(); // the programs keep their map; only the pin goes
    run(
        "bpftool",
        &[
            "map",
            "create",
            stats.to_str().unwrap(),
            "type",
            "hash",
            "key",
            "4",
            "value",
            "8",
            "entries",
            "16",
            "name",
            "SG_STATS",
        ],
    )
    .unwrap();
    let refused = Command::new("/usr/sbin/sg")
        .args(["--config", CONFIG, "agent"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(78), "{err}");
    assert!(
        err.contains("SG_STATS") && err.contains("layout changed"),
        "{err}"
    );
    assert!(err.contains("sg detach --all"), "the way out:\n{err}");
    flow.wait_progress(10, "while the new layout is refused");
    assert!(
        !n.reachable(22, t),
        "refused agent: the attached programs still filter"
    );
    let (ok, errors) = flow.finish();
    assert_eq!(
        errors, 0,
        "the connection through upgrade and refusal ({ok} exchanges ok)"
    );

    // The way out the message names: detach, then the agent starts on fresh maps.
    let out = n.sg(&["detach", "--all"]);
    assert!(out.contains("removed the run state"), "{out}");
    n.start_agent();
    n.wait_generation(1);
    assert!(
        n.reachable(80, MUST_HAPPEN),
        "80 answers after detach and restart"
    );
    assert!(!n.reachable(22, t), "22 times out after detach and restart");

    // 5. Removal keeping enforcement on purpose: the pins stay and keep filtering.
    assert!(n.stop_agent().unwrap().success());
    std::fs::write("/etc/sg/keep-enforcement", "").unwrap();
    dpkg(&["-r", "sg"]);
    assert!(!Path::new("/usr/sbin/sg").exists());
    assert!(n.pins.path.join("maps").exists(), "keep-enforcement: pins stay");
    assert!(!n.reachable(22, t), "keep-enforcement: 22 still filtered");
    assert!(n.reachable(80, MUST_HAPPEN), "keep-enforcement: 80 still allowed");

    // 6. Reinstall adopts them; removal without the flag leaves no links, pins or run state.
    std::fs::remove_file("/etc/sg/keep-enforcement").unwrap();
    apt_install(&current);
    n.start_agent();
    n.wait_ready(4);
    assert!(n.log_text().matches(&format!("took_over=[\"{TAP}\"]")).count() >= 2);
    assert!(n.stop_agent().unwrap().success());
    dpkg(&["-r", "sg"]);
    assert!(!n.pins.path.exists(), "dpkg -r: the pin root is gone");
    assert!(!n.run_dir().exists(), "dpkg -r: the run state is gone");
    assert!(
        n.reachable(22, MUST_HAPPEN),
        "dpkg -r: nothing filters the tap any more"
    );
    assert!(Path::new(CONFIG).exists(), "dpkg -r keeps the conffile");

    // 7. Purge: nothing of the package or its unit is left.
    dpkg(&["--purge", "sg"]);
    let after = installed();
    assert!(
        after.as_ref().is_none_or(|(s, _)| s.starts_with("un")),
        "dpkg still knows sg after purge: {after:?}"
    );
    assert_eq!(leftovers(), Vec::<String>::new(), "left after purge");
}
