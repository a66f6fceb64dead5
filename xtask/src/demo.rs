//! `cargo xtask demo`: the reference story on a namespace compute node.
//!
//! VM WEB1 (192.168.206.6, fa:16:3e:dc:d2:ab) sits behind tap tapadcc4b66-c1 on bridge
//! brq9b2d5f3e-6a and serves HTTP on 80 and TCP on 443. A client on the same network asks for
//! the page. With only the `default` group the request times out; once WEB_SERVERS (tcp 80
//! and 443 from 0.0.0.0/0) is added to the agent's input, it succeeds.
//!
//! `cargo xtask demo --neutron` tells the same story with Neutron driving: its own
//! SecurityGroupAgentRpc loads the sg_neutron driver by the alias `sg` and calls it from its
//! RPC handlers (tests/neutron/agent_rpc.py, Neutron's server code behind a fake plugin), and
//! the driver feeds `sg agent --api-socket`.
//!
//! Everything it creates (namespaces, processes, pins, files) is removed at the end, also
//! when a step fails.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::workspace_root;

const TAP: &str = "tapadcc4b66-c1";
const BRIDGE: &str = "brq9b2d5f3e-6a";
const VM_MAC: &str = "fa:16:3e:dc:d2:ab";
const VM_IP: &str = "192.168.206.6";
const CLIENT_IP: &str = "192.168.206.10";

struct Demo {
    host: String,
    vm: String,
    client: String,
    pin_root: String,
    dir: PathBuf,
    children: Vec<Child>,
}

impl Demo {
    fn sg(&self, args: &[&str]) -> Result<String> {
        let run_dir = self.dir.join("run");
        sh(&[
            &[
                bin("sg").as_str(),
                "--pin-root",
                &self.pin_root,
                "--run-dir",
                run_dir.to_str().unwrap(),
            ],
            args,
        ]
        .concat())
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new(bin("sg"))
            .args(["--pin-root", &self.pin_root, "detach", "--all"])
            .output();
        for ns in [&self.client, &self.vm, &self.host] {
            let _ = Command::new("ip").args(["netns", "delete", ns]).output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn bin(name: &str) -> String {
    workspace_root()
        .join("target/debug")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn sh(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs sg-probe in a namespace; returns (success, its one-line answer).
fn probe(ns: &str, args: &[&str]) -> Result<(bool, String)> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, &bin("sg-probe")])
        .args(args)
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    ))
}

fn expect(what: &str, (ok, line): (bool, String), expect_ok: bool) -> Result<()> {
    let mark = if ok == expect_ok {
        "as expected"
    } else {
        "UNEXPECTED"
    };
    println!("    {what:<40} {line}   [{mark}]");
    if ok != expect_ok {
        bail!(
            "{what}: expected {}",
            if expect_ok { "success" } else { "a timeout" }
        );
    }
    Ok(())
}

fn indent(text: &str) {
    for l in text.lines() {
        println!("    {l}");
    }
}

/// Waits until the agent's run state reaches `generation`.
fn wait_generation(d: &Demo, generation: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let state = d.dir.join("run/state.json");
    loop {
        if let Ok(s) = std::fs::read_to_string(&state)
            && s.contains(&format!("\"generation\": {generation}"))
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(d.dir.join("agent.log")).unwrap_or_default();
            bail!("the agent did not apply generation {generation}; its log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn new_demo() -> Result<Demo> {
    if !crate::is_root() {
        bail!("the demo creates network namespaces and loads eBPF: run it as root");
    }
    let id = std::process::id();
    let d = Demo {
        host: format!("sgdemo-node-{id}"),
        vm: format!("sgdemo-web1-{id}"),
        client: format!("sgdemo-client-{id}"),
        pin_root: format!("/sys/fs/bpf/sgdemo-{id}"),
        dir: std::env::temp_dir().join(format!("sgdemo-{id}")),
        children: Vec::new(),
    };
    std::fs::create_dir_all(&d.dir)?;
    Ok(d)
}

/// The namespace compute node, WEB1 and its servers, the client.
fn build_node(d: &mut Demo, title: &str) -> Result<()> {
    println!("\n== {title} ==\n");
    for ns in [&d.host, &d.vm, &d.client] {
        sh(&["ip", "netns", "add", ns])?;
        sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
    }
    sh(&["ip", "-n", &d.host, "link", "add", BRIDGE, "type", "bridge"])?;
    sh(&["ip", "-n", &d.host, "link", "set", BRIDGE, "up"])?;
    // An eBPF node does not send bridged frames through iptables (design §1).
    sh(&[
        "ip",
        "netns",
        "exec",
        &d.host,
        "sysctl",
        "-qw",
        "net.bridge.bridge-nf-call-iptables=0",
    ])?;
    for (ns, dev, mac, ip) in [
        (&d.vm, TAP, VM_MAC, VM_IP),
        (&d.client, "tapclient-00", "fa:16:3e:00:00:10", CLIENT_IP),
    ] {
        sh(&[
            "ip", "-n", &d.host, "link", "add", dev, "type", "veth", "peer", "name", "eth0", "address", mac,
            "netns", ns,
        ])?;
        sh(&["ip", "-n", &d.host, "link", "set", dev, "master", BRIDGE, "up"])?;
        sh(&["ip", "-n", ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        sh(&["ip", "-n", ns, "link", "set", "eth0", "up"])?;
    }
    println!("  compute node  netns {}: bridge {BRIDGE}", d.host);
    println!("  VM WEB1       netns {}: {TAP} -> eth0 {VM_IP} {VM_MAC}", d.vm);
    println!("  client        netns {}: eth0 {CLIENT_IP}", d.client);
    d.children.push(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &d.vm,
                &bin("sg-probe"),
                "serve",
                "--http",
                "80",
                "--tcp",
                "443",
                "--tcp",
                "22",
                "--name",
                "WEB1",
            ])
            .stdout(Stdio::null())
            .spawn()?,
    );
    println!("  WEB1 serves HTTP on 80, accepts TCP on 443 and 22\n");

    Ok(())
}

pub fn run() -> Result<()> {
    let started = Instant::now();
    let mut d = new_demo()?;
    let examples = workspace_root().join("sg-user/examples");
    let input = d.dir.join("neutron.json");
    std::fs::copy(examples.join("web1-default-only.json"), &input)?;
    build_node(
        &mut d,
        "sg demo: VM WEB1 on a compute node, Neutron security groups enforced by eBPF",
    )?;

    println!("[1] sg agent starts with WEB1 in the `default` group only");
    let log = std::fs::File::create(d.dir.join("agent.log"))?;
    let run_dir = d.dir.join("run");
    d.children.push(
        Command::new(bin("sg"))
            .args(["--pin-root", &d.pin_root, "--run-dir", run_dir.to_str().unwrap()])
            .args([
                "agent",
                "--state",
                input.to_str().unwrap(),
                "--host",
                "compute-1",
                "--netns",
                &d.host,
            ])
            .env("NO_COLOR", "1")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?,
    );
    wait_generation(&d, 1)?;
    let http = format!("{VM_IP}:80");
    let https = format!("{VM_IP}:443");
    expect(
        "client: GET http://192.168.206.6/",
        probe(&d.client, &["get", &http, "--timeout-ms", "1500"])?,
        false,
    )?;

    println!("\n[2] WEB_SERVERS (tcp 80 and 443 from 0.0.0.0/0) added to WEB1 in the agent's input");
    let tmp = d.dir.join("neutron.json.tmp");
    std::fs::copy(examples.join("web1.json"), &tmp)?;
    std::fs::rename(&tmp, &input)?;
    wait_generation(&d, 2)?;
    expect(
        "client: GET http://192.168.206.6/",
        probe(&d.client, &["get", &http, "--timeout-ms", "1500"])?,
        true,
    )?;
    expect(
        "client: TCP connect 192.168.206.6:443",
        probe(&d.client, &["connect", &https, "--timeout-ms", "1500"])?,
        true,
    )?;
    expect(
        "client: TCP connect 192.168.206.6:22",
        probe(
            &d.client,
            &["connect", &format!("{VM_IP}:22"), "--timeout-ms", "1000"],
        )?,
        false,
    )?;

    println!("\n[3] the agent's log");
    indent(&std::fs::read_to_string(d.dir.join("agent.log"))?);

    println!("\n[4] sg status");
    indent(&d.sg(&["status"])?);

    println!("[5] sg trace --port {TAP} to-vm tcp {CLIENT_IP}:40000 {VM_IP}:80   (allowed)");
    indent(&d.sg(&[
        "trace",
        "--port",
        TAP,
        "--netns",
        &d.host,
        "to-vm",
        "tcp",
        &format!("{CLIENT_IP}:40000"),
        &http,
    ])?);
    println!("\n[6] sg trace --port {TAP} to-vm tcp {CLIENT_IP}:40000 {VM_IP}:22   (dropped)");
    indent(&d.sg(&[
        "trace",
        "--port",
        TAP,
        "--netns",
        &d.host,
        "to-vm",
        "tcp",
        &format!("{CLIENT_IP}:40000"),
        &format!("{VM_IP}:22"),
    ])?);

    println!("\n[7] bpftool map dump name SG_PORTS   (BTF: field names, not hex)");
    indent(&sh(&["bpftool", "map", "dump", "name", "SG_PORTS"])?);

    println!("\n[8] teardown: agent stopped, sg detach --all, namespaces deleted");
    drop(d);
    println!("\ndemo done in {:.1?}", started.elapsed());
    Ok(())
}

/// Neutron's agent side (tests/neutron/agent_rpc.py), one command per line.
struct NeutronAgent {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl NeutronAgent {
    fn cmd(&mut self, line: &str) -> Result<String> {
        use std::io::{BufRead as _, Write as _};
        println!("    neutron> {line}");
        writeln!(self.stdin.as_mut().context("stdin")?, "{line}")?;
        let mut answer = String::new();
        self.stdout.read_line(&mut answer)?;
        let answer = answer.trim_end().to_string();
        match answer.strip_prefix("ok") {
            Some(rest) => Ok(rest.trim().to_string()),
            None => bail!("Neutron's agent: `{line}` failed: {answer}"),
        }
    }
}

impl Drop for NeutronAgent {
    fn drop(&mut self) {
        // End of input: the helper cleans up after itself and exits.
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn run_neutron() -> Result<()> {
    let started = Instant::now();
    let mut d = new_demo()?;
    let root = workspace_root();
    let python = crate::neutron::venv_python()?;
    let site = d.dir.join("site");
    crate::neutron::install_driver(&python, &site)?;
    build_node(
        &mut d,
        "sg demo with Neutron: its agent loads firewall_driver = sg and feeds the sg agent",
    )?;

    println!("[1] sg agent starts with no input: it serves the Neutron driver's socket");
    let socket = d.dir.join("agent.sock");
    let log = std::fs::File::create(d.dir.join("agent.log"))?;
    let run_dir = d.dir.join("run");
    d.children.push(
        Command::new(bin("sg"))
            .args(["--pin-root", &d.pin_root, "--run-dir", run_dir.to_str().unwrap()])
            .args([
                "agent",
                "--api-socket",
                socket.to_str().unwrap(),
                "--netns",
                &d.host,
            ])
            .env("NO_COLOR", "1")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if Instant::now() > deadline {
            bail!("the agent did not open {}", socket.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    println!("    sg agent --api-socket {}", socket.display());

    println!("\n[2] Neutron's SecurityGroupAgentRpc, [SECURITYGROUP] firewall_driver = sg");
    let mut child = Command::new(&python)
        .args(["-W", "ignore"])
        .arg(root.join("tests/neutron/agent_rpc.py"))
        .args(["--driver", "sg", "--socket", socket.to_str().unwrap()])
        .env("PYTHONPATH", &site)
        .current_dir(&d.dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut neutron = NeutronAgent {
        stdin: child.stdin.take(),
        stdout: std::io::BufReader::new(child.stdout.take().context("stdout")?),
        child,
    };
    println!("    loaded: {}", neutron.cmd("driver")?);

    println!("\n[3] WEB1's port is plugged: Neutron prepares its filter (groups: default)");
    let examples = root.join("sg-user/examples");
    neutron.cmd(&format!(
        "load {}",
        examples.join("web1-default-only.json").display()
    ))?;
    neutron.cmd(&format!("prepare {TAP}"))?;
    let http = format!("{VM_IP}:80");
    let https = format!("{VM_IP}:443");
    expect(
        "client: GET http://192.168.206.6/",
        probe(&d.client, &["get", &http, "--timeout-ms", "1500"])?,
        false,
    )?;
    expect(
        "client: TCP connect 192.168.206.6:443",
        probe(&d.client, &["connect", &https, "--timeout-ms", "1000"])?,
        false,
    )?;

    println!("\n[4] WEB1 joins WEB_SERVERS (tcp 80 and 443 from 0.0.0.0/0): Neutron updates the port");
    neutron.cmd(&format!("load {}", examples.join("web1.json").display()))?;
    neutron.cmd(&format!("port_updated {TAP}"))?;
    expect(
        "client: GET http://192.168.206.6/",
        probe(&d.client, &["get", &http, "--timeout-ms", "1500"])?,
        true,
    )?;
    expect(
        "client: TCP connect 192.168.206.6:443",
        probe(&d.client, &["connect", &https, "--timeout-ms", "1500"])?,
        true,
    )?;
    expect(
        "client: TCP connect 192.168.206.6:22",
        probe(
            &d.client,
            &["connect", &format!("{VM_IP}:22"), "--timeout-ms", "1000"],
        )?,
        false,
    )?;

    println!("\n[5] the agent's log");
    indent(&std::fs::read_to_string(d.dir.join("agent.log"))?);

    println!("\n[6] sg status");
    indent(&d.sg(&["status"])?);

    let pushed = run_dir.join("neutron-state.json");
    println!(
        "[7] what Neutron pushed, kept for restarts: sg validate {}",
        pushed.display()
    );
    indent(&d.sg(&["validate", pushed.to_str().unwrap()])?);

    println!("\n[8] sg trace --port {TAP} to-vm tcp {CLIENT_IP}:40000 {VM_IP}:22   (dropped)");
    indent(&d.sg(&[
        "trace",
        "--port",
        TAP,
        "--netns",
        &d.host,
        "to-vm",
        "tcp",
        &format!("{CLIENT_IP}:40000"),
        &format!("{VM_IP}:22"),
    ])?);

    println!("\n[9] teardown: Neutron's agent and sg agent stopped, sg detach --all, namespaces deleted");
    drop(neutron);
    drop(d);
    println!("\ndemo done in {:.1?}", started.elapsed());
    Ok(())
}
