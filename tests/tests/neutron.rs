//! The Neutron path end to end: Neutron's own SecurityGroupAgentRpc loads the sg_neutron driver
//! by its alias, a fake plugin RPC (Neutron's server code over an API-shaped document) feeds
//! it, the driver talks to `sg agent --api-socket`, and real packets on a namespace node show
//! the WEB1 story. Then the local API itself: a bad call fails alone, the socket's mode, group
//! and peer check, the pushed state across a restart, batches, and waiting for enforcement.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::IpAddr,
    os::unix::{fs::MetadataExt as _, net::UnixStream},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use sg_tests::{
    ComputeNode, MUST_HAPPEN, PinRoot, tcp_reachable, tcp_servers, unique, workspace_bin, workspace_root,
};

const TAP: &str = "tapadcc4b66-c1";
const PORT_ID: &str = "adcc4b66-c1e2-4b9a-9d3f-5a7c2e8b1f04";
const VM_MAC: &str = "fa:16:3e:dc:d2:ab";
const VM_IP: &str = "192.168.206.6";
const WEB_SERVERS: &str = "7a9e3b2c-4d5f-4e6a-8b1c-9d0e2f3a4b5c";
const SHORT: Duration = Duration::from_millis(700);

/// `sg agent --api-socket` with its own pins, run dir and socket; killed on drop.
struct ApiAgent {
    child: Option<Child>,
    pins: PinRoot,
    dir: PathBuf,
    socket: PathBuf,
    netns: String,
    extra: Vec<String>,
}

impl ApiAgent {
    fn start(netns: &str, extra: &[&str]) -> Result<Self> {
        let dir = std::env::temp_dir().join(unique("sg-api-"));
        std::fs::create_dir_all(&dir)?;
        let mut a = ApiAgent {
            child: None,
            pins: PinRoot::new()?,
            socket: dir.join("agent.sock"),
            dir,
            netns: netns.to_string(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        a.spawn()?;
        Ok(a)
    }

    fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    fn spawn(&mut self) -> Result<()> {
        let _ = std::fs::remove_file(&self.socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))?;
        self.child = Some(
            Command::new(workspace_bin("sg")?)
                .args(["--pin-root", self.pins.path.to_str().unwrap()])
                .arg("--run-dir")
                .arg(self.run_dir())
                .arg("agent")
                .arg("--api-socket")
                .arg(&self.socket)
                .args(["--netns", &self.netns, "--gc-interval-ms", "500"])
                .args(&self.extra)
                .env("NO_COLOR", "1")
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()?,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.socket.exists() {
            if Instant::now() > deadline {
                bail!("the agent did not open its socket; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    fn kill(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    fn sg(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(workspace_bin("sg")?)
            .args(["--pin-root", self.pins.path.to_str().unwrap()])
            .arg("--run-dir")
            .arg(self.run_dir())
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!("sg {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for ApiAgent {
    fn drop(&mut self) {
        let _ = self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A raw client of the local API (PROTOCOL.md).
struct Client {
    rd: BufReader<UnixStream>,
    wr: UnixStream,
}

impl Client {
    fn connect(path: &Path) -> Result<Self> {
        let s = UnixStream::connect(path).with_context(|| format!("connect {}", path.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Client {
            rd: BufReader::new(s.try_clone()?),
            wr: s,
        })
    }

    fn call(&mut self, op: &str, args: Value) -> Result<Value> {
        let mut req = json!({"v": 1, "id": op, "op": op});
        req.as_object_mut()
            .unwrap()
            .extend(args.as_object().cloned().unwrap_or_default());
        writeln!(self.wr, "{req}")?;
        let mut line = String::new();
        self.rd.read_line(&mut line)?;
        serde_json::from_str(&line).with_context(|| format!("answer {line:?}"))
    }

    fn ok(&mut self, op: &str, args: Value) -> Result<Value> {
        let r = self.call(op, args)?;
        if r["ok"] != true {
            bail!("{op} failed: {r}");
        }
        Ok(r)
    }
}

/// Copies a Python project, without what an earlier build left in it.
fn copy_sources(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let name = e.file_name();
        let n = name.to_string_lossy();
        if n == "build" || n == "__pycache__" || n.ends_with(".egg-info") {
            continue;
        }
        if e.file_type()?.is_dir() {
            copy_sources(&e.path(), &to.join(&name))?;
        } else {
            std::fs::copy(e.path(), to.join(&name))?;
        }
    }
    Ok(())
}

/// Neutron's agent side: tests/neutron/agent_rpc.py in the Neutron virtualenv, with the work
/// tree's sg_neutron installed into a directory of its own (so the entry points resolve).
struct NeutronAgent {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    dir: PathBuf,
}

impl NeutronAgent {
    fn start(driver: &str, socket: &Path) -> Result<Self> {
        let venv = Command::new(workspace_root().join("tests/neutron/setup_venv.sh"))
            .stderr(Stdio::inherit())
            .output()?;
        assert!(venv.status.success(), "tests/neutron/setup_venv.sh failed");
        let python = String::from_utf8(venv.stdout)?.trim().to_string();
        let dir = std::env::temp_dir().join(unique("sg-neutron-site-"));
        // setuptools builds in the source tree (build/, *.egg-info): two tests installing from
        // sg-user/neutron at once would remove and rewrite each other's build. Each installs
        // from a copy of its own.
        let src = dir.with_extension("src");
        copy_sources(&workspace_root().join("sg-user/neutron"), &src)?;
        let st = Command::new(&python)
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
            .arg(&dir)
            .arg(&src)
            .status()?;
        let _ = std::fs::remove_dir_all(&src);
        assert!(st.success(), "installing sg_neutron");
        let mut child = Command::new(&python)
            .args(["-W", "ignore"])
            .arg(workspace_root().join("tests/neutron/agent_rpc.py"))
            .args(["--driver", driver, "--socket"])
            .arg(socket)
            .env("PYTHONPATH", &dir)
            .current_dir(std::env::temp_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(NeutronAgent {
            stdin: child.stdin.take(),
            stdout: BufReader::new(child.stdout.take().unwrap()),
            child,
            dir,
        })
    }

    /// One command; returns the JSON after `ok`, or the error line.
    fn cmd(&mut self, line: &str) -> Result<std::result::Result<Value, String>> {
        writeln!(self.stdin.as_mut().context("stdin")?, "{line}")?;
        let mut answer = String::new();
        self.stdout.read_line(&mut answer)?;
        let answer = answer.trim_end();
        Ok(match answer.strip_prefix("ok") {
            Some("") => Ok(Value::Null),
            Some(rest) => Ok(serde_json::from_str(rest.trim())?),
            None => Err(answer.to_string()),
        })
    }

    fn ok(&mut self, line: &str) -> Result<Value> {
        self.cmd(line)?.map_err(|e| anyhow::anyhow!("`{line}`: {e}"))
    }
}

impl Drop for NeutronAgent {
    fn drop(&mut self) {
        // End of input: the helper cleans up after itself and exits.
        drop(self.stdin.take());
        let deadline = Instant::now() + MUST_HAPPEN;
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn example(name: &str) -> String {
    workspace_root()
        .join("sg-user/examples")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn web1_node() -> Result<(ComputeNode, sg_tests::Netns)> {
    let mut node = ComputeNode::new()?;
    node.add_vm(TAP, VM_MAC, &format!("{VM_IP}/24"))?;
    let client = node.add_peer("192.168.206.10/24")?;
    let vm_ns = node.vms[0].ns.name.clone();
    tcp_servers(&vm_ns, VM_IP.parse()?, &[22, 80, 443])?;
    Ok((node, client))
}

/// A connection that must succeed: the timeout only elapses when it fails.
fn open(client: &sg_tests::Netns, port: u16) -> Result<bool> {
    tcp_reachable(&client.name, VM_IP.parse::<IpAddr>()?, port, MUST_HAPPEN)
}

/// A connection that must not succeed within `SHORT` (a dropped SYN is never answered).
fn closed(client: &sg_tests::Netns, port: u16) -> Result<bool> {
    Ok(!tcp_reachable(
        &client.name,
        VM_IP.parse::<IpAddr>()?,
        port,
        SHORT,
    )?)
}

/// Neutron's agent, the alias `driver`, the WEB1 story.
fn web1_story_through_neutron(driver: &str, device: &str) -> Result<()> {
    let (node, client) = web1_node()?;
    let agent = ApiAgent::start(&node.host.name, &[])?;
    let mut neutron = NeutronAgent::start(driver, &agent.socket)?;
    let loaded = neutron.ok("driver")?;
    let class = if driver == "sg" {
        "sg_neutron.driver.SgFirewallDriver"
    } else {
        "sg_neutron.driver.SgHybridFirewallDriver"
    };
    assert_eq!(loaded["class"], class, "{loaded}");
    assert_eq!(loaded["hybrid"], driver == "sg_hybrid");

    // Nothing filters the tap yet.
    assert!(
        open(&client, 22)?,
        "the tap is not filtered before Neutron prepares it"
    );
    neutron.ok(&format!("load {}", example("web1-default-only.json")))?;
    neutron.ok(&format!("prepare {device}"))?;
    // prepare_port_filter returned: the tap is enforced now, not some time later.
    assert!(
        closed(&client, 22)?,
        "22 open right after prepare returned\n{}",
        agent.log()
    );
    assert!(closed(&client, 80)?, "80 open with the default group only");
    assert!(closed(&client, 443)?, "443 open with the default group only");
    assert_eq!(neutron.ok("ports")?, json!([device]));

    // WEB1 joins WEB_SERVERS: a port update, as the OVS agent handles it.
    neutron.ok(&format!("load {}", example("web1.json")))?;
    neutron.ok(&format!("port_updated {device}"))?;
    assert!(open(&client, 80)?, "80 closed after WEB_SERVERS\n{}", agent.log());
    assert!(open(&client, 443)?, "443 closed after WEB_SERVERS");
    assert!(closed(&client, 22)?, "22 open after WEB_SERVERS");
    // A rule update of the group reaches the port too.
    neutron.ok(&format!("rule_updated {WEB_SERVERS}"))?;
    assert!(open(&client, 443)?);

    // What the agent holds is what Neutron said, in the agent's RPC shape.
    let status = agent.sg(&["status"])?;
    assert!(status.contains(TAP), "{status}");
    let pushed = agent.run_dir().join("neutron-state.json");
    let v = agent.sg(&["validate", pushed.to_str().unwrap()])?;
    assert!(v.contains("valid"), "{v}");

    neutron.ok(&format!("remove {device}"))?;
    assert_eq!(neutron.ok("ports")?, json!([]));
    let doc = std::fs::read_to_string(&pushed)?;
    assert!(!doc.contains(TAP) && !doc.contains(PORT_ID), "{doc}");
    Ok(())
}

#[test]
fn neutron_loads_the_sg_driver_by_alias_and_web1_is_enforced() {
    web1_story_through_neutron("sg", TAP).unwrap();
}

#[test]
fn neutron_ovs_agent_style_sg_hybrid_names_the_tap_after_the_port_id() {
    web1_story_through_neutron("sg_hybrid", PORT_ID).unwrap();
}

#[test]
fn an_unreachable_agent_makes_the_driver_raise() {
    let dir = std::env::temp_dir().join(unique("sg-nobody-"));
    let mut neutron = NeutronAgent::start("sg", &dir.join("agent.sock")).unwrap();
    neutron.ok(&format!("load {}", example("web1.json"))).unwrap();
    let err = neutron.cmd(&format!("prepare {TAP}")).unwrap().unwrap_err();
    assert!(
        err.contains("AgentUnreachable")
            && err.contains("agent.sock")
            && err.contains("sg agent --api-socket"),
        "{err}"
    );
    assert_eq!(neutron.ok("ports").unwrap(), json!([]));
}

fn port(device: &str, groups: &[&str]) -> Value {
    json!({"device": device, "mac_address": VM_MAC, "network_id": "n", "fixed_ips": [VM_IP],
           "security_groups": groups, "port_security_enabled": true, "device_owner": "compute:x"})
}

fn web_rules() -> Value {
    json!([
        {"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp", "port_range_min": 80,
         "port_range_max": 80, "source_ip_prefix": "0.0.0.0/0", "stateful": true},
        {"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp", "port_range_min": 443,
         "port_range_max": 443, "source_ip_prefix": "0.0.0.0/0", "stateful": true},
        {"direction": "egress", "ethertype": "IPv4", "stateful": true},
    ])
}

#[test]
fn a_bad_call_fails_alone_with_its_field_and_changes_nothing() {
    let (node, client) = web1_node().unwrap();
    let agent = ApiAgent::start(&node.host.name, &[]).unwrap();
    let mut c = Client::connect(&agent.socket).unwrap();
    c.ok("hello", json!({"plug": "direct", "client": "test"}))
        .unwrap();
    c.ok(
        "update_security_group_rules",
        json!({"sg_id": "web", "rules": web_rules()}),
    )
    .unwrap();
    let r = c
        .ok(
            "prepare_port_filter",
            json!({"port": port(TAP, &["web"]), "wait_ms": 5000}),
        )
        .unwrap();
    assert_eq!(r["enforced"][TAP], true, "{r}");
    let before = c.ok("state", json!({})).unwrap();

    let bad = json!([{"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
                      "port_range_min": 22, "port_range_max": 70000}]);
    let r = c
        .call(
            "update_security_group_rules",
            json!({"sg_id": "web", "rules": bad}),
        )
        .unwrap();
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["v"], 1);
    assert_eq!(r["id"], "update_security_group_rules");
    assert_eq!(r["error"]["kind"], "invalid");
    let e = &r["error"]["errors"][0];
    assert_eq!(e["object"], "security_group_rule");
    assert_eq!(e["field"], "port_range_max");
    assert_eq!(e["value"], "70000");
    assert!(
        e["id"].as_str().unwrap().contains("\"port_range_max\":70000"),
        "{e}"
    );
    assert!(e["reason"].as_str().unwrap().contains("0 to 65535"), "{e}");
    // Nothing changed: same document, same generation, same traffic.
    let after = c.ok("state", json!({})).unwrap();
    assert_eq!(before, after);
    assert!(open(&client, 80).unwrap());
    assert!(closed(&client, 22).unwrap());

    // Each call is checked alone: a bad port names the port's field.
    let mut p = port("tap2", &["web"]);
    p["fixed_ips"] = json!(["192.168.206.300"]);
    let r = c.call("prepare_port_filter", json!({"port": p})).unwrap();
    assert_eq!(r["error"]["errors"][0]["field"], "fixed_ips[0]", "{r}");
    assert_eq!(r["error"]["errors"][0]["id"], "tap2", "{r}");
    // A protocol error names what is wrong.
    let r = c
        .call("prepare_port_filter", json!({"port": {"mac_address": VM_MAC}}))
        .unwrap();
    assert_eq!(r["error"]["kind"], "protocol");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("port.device"),
        "{r}"
    );
    let r = c.call("state", json!({"v": 2})).unwrap();
    assert_eq!(r["error"]["kind"], "version", "{r}");
    assert_eq!(c.ok("state", json!({})).unwrap(), before);
}

#[test]
fn a_batch_is_one_apply_and_waits_for_the_ports_it_prepared() {
    let (node, client) = web1_node().unwrap();
    let agent = ApiAgent::start(&node.host.name, &[]).unwrap();
    let mut c = Client::connect(&agent.socket).unwrap();
    let g0 = c.ok("state", json!({})).unwrap()["generation"].as_u64().unwrap();
    c.ok("filter_defer_apply_on", json!({})).unwrap();
    let r = c
        .ok(
            "update_security_group_rules",
            json!({"sg_id": "web", "rules": web_rules()}),
        )
        .unwrap();
    assert_eq!(r["deferred"], true);
    c.ok("prepare_port_filter", json!({"port": port(TAP, &["web"])}))
        .unwrap();
    // A bad call in the batch fails alone, when it arrives; the batch goes on.
    let bad = json!([{"direction": "sideways", "ethertype": "IPv4"}]);
    let r = c
        .call(
            "update_security_group_rules",
            json!({"sg_id": "other", "rules": bad}),
        )
        .unwrap();
    assert_eq!(r["error"]["kind"], "invalid", "{r}");
    assert_eq!(r["error"]["errors"][0]["field"], "direction", "{r}");
    // Nothing applied in the middle of the batch.
    let mid = c.ok("state", json!({})).unwrap();
    assert_eq!(mid["generation"].as_u64().unwrap(), g0);
    assert_eq!(mid["document"]["devices"], json!({}));
    assert!(
        open(&client, 22).unwrap(),
        "the tap is filtered before the batch ended"
    );
    let r = c.ok("filter_defer_apply_off", json!({"wait_ms": 5000})).unwrap();
    assert_eq!(
        r["generation"].as_u64().unwrap(),
        g0 + 1,
        "one apply for the batch: {r}"
    );
    assert_eq!(r["enforced"][TAP], true, "{r}");
    let doc = c.ok("state", json!({})).unwrap()["document"].clone();
    assert!(doc["security_groups"].get("other").is_none(), "{doc}");
    assert!(open(&client, 80).unwrap());
    assert!(closed(&client, 22).unwrap());

    // A batch whose connection drops is not applied.
    c.ok("filter_defer_apply_on", json!({})).unwrap();
    c.ok("remove_port_filter", json!({"port": port(TAP, &[])}))
        .unwrap();
    drop(c);
    let mut c = Client::connect(&agent.socket).unwrap();
    let r = c.ok("state", json!({})).unwrap();
    assert_eq!(r["generation"].as_u64().unwrap(), g0 + 1);
    assert!(r["document"]["devices"].get(TAP).is_some());
    assert!(closed(&client, 22).unwrap());
}

#[test]
fn prepare_waits_for_the_tap_and_says_when_it_is_not_there() {
    let (node, client) = web1_node().unwrap();
    let agent = ApiAgent::start(&node.host.name, &[]).unwrap();
    let mut c = Client::connect(&agent.socket).unwrap();
    c.ok(
        "update_security_group_rules",
        json!({"sg_id": "web", "rules": web_rules()}),
    )
    .unwrap();
    // No such tap on the node: applied, but not enforced within the wait.
    let t = Instant::now();
    let r = c
        .call(
            "prepare_port_filter",
            json!({"port": port("tapnotthere0", &["web"]), "wait_ms": 300}),
        )
        .unwrap();
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert_eq!(r["error"]["kind"], "not_enforced", "{r}");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("tapnotthere0"),
        "{r}"
    );
    let r = c.ok("enforcement", json!({"devices": ["tapnotthere0"]})).unwrap();
    assert_eq!(r["enforced"]["tapnotthere0"], false);
    // The tap appears: the agent attaches, the waiting request answers.
    let ns = sg_tests::Netns::new("sgvm").unwrap();
    let waiter = {
        let socket = agent.socket.clone();
        std::thread::spawn(move || {
            let mut c = Client::connect(&socket).unwrap();
            c.call(
                "enforcement",
                json!({"devices": ["tapnotthere0"], "wait_ms": 10000}),
            )
            .unwrap()
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    node.plug(&ns, "tapnotthere0", "fa:16:3e:00:00:77", "192.168.206.77/24")
        .unwrap();
    let r = waiter.join().unwrap();
    assert_eq!(r["enforced"]["tapnotthere0"], true, "{r}");
    let _ = client;
}

#[test]
fn the_pushed_state_survives_a_restart_without_neutron_resending() {
    let (node, client) = web1_node().unwrap();
    let mut agent = ApiAgent::start(&node.host.name, &[]).unwrap();
    let mut c = Client::connect(&agent.socket).unwrap();
    c.ok(
        "update_security_group_rules",
        json!({"sg_id": "web", "rules": web_rules()}),
    )
    .unwrap();
    c.ok(
        "prepare_port_filter",
        json!({"port": port(TAP, &["web"]), "wait_ms": 5000}),
    )
    .unwrap();
    let before = c.ok("state", json!({})).unwrap()["document"].clone();
    drop(c);
    agent.kill().unwrap();
    let pushed = agent.run_dir().join("neutron-state.json");
    assert!(pushed.exists());
    // sg's CLI reads the pushed document like any input.
    let compiled = agent
        .sg(&["compile", pushed.to_str().unwrap(), "--host", "x"])
        .unwrap();
    assert!(compiled.contains(TAP), "{compiled}");
    let rendered = agent
        .sg(&["iptables", "render", pushed.to_str().unwrap(), "--host", "x"])
        .unwrap();
    assert!(rendered.contains("--dport 443 -j RETURN"), "{rendered}");

    agent.spawn().unwrap();
    let mut c = Client::connect(&agent.socket).unwrap();
    let after = c.ok("state", json!({})).unwrap();
    assert_eq!(after["document"], before);
    let r = c
        .ok("enforcement", json!({"devices": [TAP], "wait_ms": 5000}))
        .unwrap();
    assert_eq!(r["enforced"][TAP], true);
    assert!(open(&client, 443).unwrap());
    assert!(closed(&client, 22).unwrap());

    // A state the agent cannot read stops it with the file's name and the way out.
    drop(c);
    agent.kill().unwrap();
    std::fs::write(&pushed, "{not json").unwrap();
    let out = Command::new(workspace_bin("sg").unwrap())
        .args(["--pin-root", agent.pins.path.to_str().unwrap()])
        .arg("--run-dir")
        .arg(agent.run_dir())
        .arg("agent")
        .arg("--api-socket")
        .arg(&agent.socket)
        .args(["--netns", &node.host.name])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("neutron-state.json") && err.contains("move it away"),
        "{err}"
    );
}

#[test]
fn the_socket_is_0660_with_its_group_and_peers_are_checked() {
    let (node, _client) = web1_node().unwrap();
    // A group of this machine that root is not in: nogroup (65534).
    let agent = ApiAgent::start(&node.host.name, &["--api-group", "65534"]).unwrap();
    let meta = std::fs::metadata(&agent.socket).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), 65534);

    let attempt = |uid: u32, gid: u32| -> String {
        use std::os::unix::process::CommandExt as _;
        let script = "import socket,sys\n\
            s=socket.socket(socket.AF_UNIX)\n\
            try:\n s.connect(sys.argv[1])\nexcept OSError as e:\n print('connect:', e.strerror); sys.exit()\n\
            try:\n s.sendall(b'{\"v\":1,\"op\":\"state\"}\\n')\nexcept OSError:\n pass\n\
            print(s.makefile().readline().strip())\n";
        let mut cmd = Command::new("python3");
        cmd.args(["-c", script]).arg(&agent.socket);
        // SAFETY: plain credential syscalls between fork and exec; groups before ids, as
        // dropping root comes last.
        unsafe {
            cmd.pre_exec(move || {
                let groups = [gid];
                if libc::setgroups(1, groups.as_ptr()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    // A member of the group may connect and talk.
    let member = attempt(65534, 65534);
    assert!(member.contains("\"ok\":true"), "{member}");
    // Anyone else: the file mode already refuses them.
    let other = attempt(65534, 65533);
    assert!(other.contains("Permission denied"), "{other}");
    // Should the mode be widened (a bind mount, a mistaken chmod), SO_PEERCRED still refuses.
    std::fs::set_permissions(&agent.socket, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let other = attempt(65534, 65533);
    assert!(other.contains("\"kind\":\"denied\""), "{other}");
    assert!(agent.log().contains("API connection refused"), "{}", agent.log());
}
