//! `cargo xtask demo`: VM WEB1 behind its tap in network namespaces, filtered by sg.
//!
//! Everything it creates (namespaces, the server process, pins) is removed at the end, also
//! when a step fails.

use std::process::{Child, Command, Stdio};

use anyhow::{Context as _, Result, bail};

use crate::workspace_root;

const TAP: &str = "tapadcc4b66-c1";
const VM_MAC: &str = "fa:16:3e:dc:d2:ab";
const VM_IP: &str = "192.168.206.6";
const HOST_IP: &str = "192.168.206.1";

struct Demo {
    host: String,
    vm: String,
    pin_root: String,
    server: Option<Child>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = Command::new(bin("sg"))
            .args(["--pin-root", &self.pin_root, "detach", "--all"])
            .output();
        for ns in [&self.vm, &self.host] {
            let _ = Command::new("ip").args(["netns", "delete", ns]).output();
        }
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

/// Runs a probe in a namespace and returns its one-line answer (success or not).
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

fn show(what: &str, (ok, line): (bool, String), expect_ok: bool) -> Result<()> {
    let mark = if ok == expect_ok {
        "as expected"
    } else {
        "UNEXPECTED"
    };
    println!("    {what:<34} {line}   [{mark}]");
    if ok != expect_ok {
        bail!(
            "{what}: expected {}",
            if expect_ok { "success" } else { "a timeout" }
        );
    }
    Ok(())
}

pub fn run() -> Result<()> {
    if !crate::is_root() {
        bail!("the demo creates network namespaces and loads eBPF: run it as root");
    }
    let id = std::process::id();
    let mut d = Demo {
        host: format!("sgdemo-host-{id}"),
        vm: format!("sgdemo-web1-{id}"),
        pin_root: format!("/sys/fs/bpf/sgdemo-{id}"),
        server: None,
    };
    println!("\n== sg demo: VM WEB1 behind tap {TAP}, filtered by eBPF at tcx ==\n");
    sh(&["ip", "netns", "add", &d.host])?;
    sh(&["ip", "netns", "add", &d.vm])?;
    sh(&[
        "ip", "-n", &d.host, "link", "add", TAP, "type", "veth", "peer", "name", "eth0", "address", VM_MAC,
        "netns", &d.vm,
    ])?;
    sh(&[
        "ip",
        "-n",
        &d.host,
        "addr",
        "add",
        &format!("{HOST_IP}/24"),
        "dev",
        TAP,
    ])?;
    sh(&[
        "ip",
        "-n",
        &d.vm,
        "addr",
        "add",
        &format!("{VM_IP}/24"),
        "dev",
        "eth0",
    ])?;
    for (ns, dev) in [(&d.host, TAP), (&d.vm, "eth0"), (&d.host, "lo"), (&d.vm, "lo")] {
        sh(&["ip", "-n", ns, "link", "set", dev, "up"])?;
    }
    println!("  compute node netns {}: tap {TAP} ({HOST_IP})", d.host);
    println!("  VM WEB1 netns {}: eth0 {VM_IP} {VM_MAC}", d.vm);
    d.server = Some(
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
    std::thread::sleep(std::time::Duration::from_millis(300));
    println!("  WEB1 serves HTTP on 80 and accepts TCP on 443 and 22\n");

    let http = format!("{VM_IP}:80");
    let https = format!("{VM_IP}:443");
    let ssh = format!("{VM_IP}:22");
    println!("[1] no filter yet");
    show(
        "GET http://192.168.206.6/",
        probe(&d.host, &["get", &http, "--timeout-ms", "1500"])?,
        true,
    )?;
    show(
        "TCP connect 192.168.206.6:22",
        probe(&d.host, &["connect", &ssh, "--timeout-ms", "1500"])?,
        true,
    )?;

    println!("\n[2] sg attach --iface {TAP} --allow tcp/80 --allow tcp/443");
    let out = sh(&[
        &bin("sg"),
        "--pin-root",
        &d.pin_root,
        "attach",
        "--iface",
        TAP,
        "--netns",
        &d.host,
        "--allow",
        "tcp/80",
        "--allow",
        "tcp/443",
    ])?;
    println!("    {}", out.trim());
    show(
        "GET http://192.168.206.6/",
        probe(&d.host, &["get", &http, "--timeout-ms", "1500"])?,
        true,
    )?;
    show(
        "TCP connect 192.168.206.6:443",
        probe(&d.host, &["connect", &https, "--timeout-ms", "1500"])?,
        true,
    )?;
    show(
        "TCP connect 192.168.206.6:22",
        probe(&d.host, &["connect", &ssh, "--timeout-ms", "1500"])?,
        false,
    )?;

    println!("\n[3] bpftool map dump name SG_PORTS (the tap's entry, field names from BTF)");
    let dump = sh(&["bpftool", "map", "dump", "name", "SG_PORTS"]).unwrap_or_else(|e| format!("{e:#}"));
    for l in dump.lines() {
        println!("    {l}");
    }
    println!("\n[4] cleanup: sg detach --all, namespaces deleted");
    drop(d);
    println!("\ndemo done");
    Ok(())
}
