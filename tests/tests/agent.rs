//! The agent on a namespace compute node: restarts (SIGTERM and SIGKILL) under a live TCP
//! connection, tap deletion and recreation, rejected input, and 1,000 updates under traffic.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use sg_tests::{Agent, ComputeNode, MUST_HAPPEN, spawn_in, tcp_reachable, wait_until};

const TAP: &str = "tapadcc4b66-c1";
const PORT_ID: &str = "adcc4b66-c1e2-4b9a-9d3f-5a7c2e8b1f04";
const MAC: &str = "fa:16:3e:dc:d2:ab";
const VM_IP: &str = "192.168.206.6";
const PEER_IP: &str = "192.168.206.10";
const DEFAULT_SG: &str = "0c2f6d1e-8a3b-4f5c-9d7e-2b1a4c6e8f03";
const WEB_SG: &str = "7a9e3b2c-4d5f-4e6a-8b1c-9d0e2f3a4b5c";

fn rule(
    id: &str,
    dir: &str,
    eth: &str,
    proto: Option<&str>,
    port: Option<u16>,
    remote_group: Option<&str>,
) -> Value {
    json!({
        "id": id, "direction": dir, "ethertype": eth, "protocol": proto,
        "port_range_min": port, "port_range_max": port,
        "remote_ip_prefix": if remote_group.is_none() && dir == "ingress" { Some("0.0.0.0/0") } else { None },
        "remote_group_id": remote_group,
    })
}

/// WEB1 with `default` and WEB_SERVERS (tcp 80 plus `extra_ports`), bound to compute-1.
fn input(web: bool, extra_ports: &[u16]) -> Value {
    let mut web_rules = vec![rule("web-80", "ingress", "IPv4", Some("tcp"), Some(80), None)];
    for p in extra_ports {
        web_rules.push(rule(
            &format!("web-{p}"),
            "ingress",
            "IPv4",
            Some("tcp"),
            Some(*p),
            None,
        ));
    }
    let mut groups = vec![DEFAULT_SG];
    if web {
        groups.push(WEB_SG);
    }
    json!({
        "security_groups": [
            {"id": DEFAULT_SG, "name": "default", "stateful": true, "security_group_rules": [
                rule("d-e4", "egress", "IPv4", None, None, None),
                rule("d-e6", "egress", "IPv6", None, None, None),
                rule("d-i4", "ingress", "IPv4", None, None, Some(DEFAULT_SG)),
            ]},
            {"id": WEB_SG, "name": "WEB_SERVERS", "stateful": true, "security_group_rules": web_rules},
        ],
        "address_groups": [],
        "ports": [{
            "id": PORT_ID, "name": "WEB1", "mac_address": MAC, "network_id": "net-1",
            "fixed_ips": [{"ip_address": VM_IP, "subnet_id": "subnet-1"}],
            "security_groups": groups, "port_security_enabled": true,
            "device_owner": "compute:nova", "binding:host_id": "compute-1",
        }],
    })
}

fn node() -> (ComputeNode, sg_tests::Netns) {
    let mut node = ComputeNode::new().unwrap();
    node.add_vm(TAP, MAC, &format!("{VM_IP}/24")).unwrap();
    let peer = node.add_peer(&format!("{PEER_IP}/24")).unwrap();
    (node, peer)
}

fn vm_ip() -> IpAddr {
    VM_IP.parse().unwrap()
}

/// A line-echo server on VM_IP:port in `ns`.
fn echo_server(ns: &str, port: u16) {
    let (tx, rx) = std::sync::mpsc::channel();
    spawn_in(ns, move || {
        let l = TcpListener::bind((vm_ip(), port)).unwrap();
        tx.send(()).unwrap();
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                // One small write per line: without NODELAY, Nagle and delayed ACK make each
                // exchange take tens of milliseconds.
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

/// A long-lived TCP connection from `ns` that sends a line every few ms and expects its echo.
/// Counts exchanges and errors until `stop`. An echo that does not come within MUST_HAPPEN is
/// an error: a dropped segment is retransmitted within a second, so only a connection the
/// firewall really cut (or a machine stalled far beyond any load) waits that long.
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

    /// Waits until the flow has made `n` more exchanges.
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

#[test]
fn web1_story_then_bad_input_is_rejected_and_policy_stays() {
    let (node, peer) = node();
    sg_tests::tcp_servers(&node.vms[0].ns.name, vm_ip(), &[80]).unwrap();
    let t = Duration::from_millis(600);
    let agent = Agent::start(&node.host.name, &input(false, &[])).unwrap();
    assert!(
        !tcp_reachable(&peer.name, vm_ip(), 80, t).unwrap(),
        "default group only: 80 must time out"
    );

    agent.write_input(&input(true, &[])).unwrap();
    agent.wait_generation(2).unwrap();
    assert!(
        tcp_reachable(&peer.name, vm_ip(), 80, MUST_HAPPEN).unwrap(),
        "WEB_SERVERS applied: 80 must answer"
    );

    // A rule with a bad direction and a port 0: the whole input is rejected, nothing changes.
    let mut bad = input(false, &[]);
    bad["security_groups"][1]["security_group_rules"][0]["direction"] = json!("sideways");
    bad["security_groups"][1]["security_group_rules"][0]["port_range_min"] = json!(0);
    agent.write_input(&bad).unwrap();
    wait_until("the agent logs the rejection", MUST_HAPPEN, || {
        agent.log_text().contains("rejected")
    })
    .unwrap();
    let log = agent.log_text();
    assert!(
        log.contains("direction=\"sideways\""),
        "the log names the field and value:\n{log}"
    );
    assert!(
        log.contains("port_range_min=0"),
        "all errors are reported together:\n{log}"
    );
    assert_eq!(
        agent.generation(),
        Some(2),
        "a rejected input is not a new generation"
    );
    assert!(
        tcp_reachable(&peer.name, vm_ip(), 80, MUST_HAPPEN).unwrap(),
        "the running policy stays"
    );

    let status = agent.cli(&["status"]).unwrap();
    assert!(status.contains(TAP) && status.contains("enforced"), "{status}");
}

#[test]
fn connection_survives_five_agent_restarts() {
    let (node, peer) = node();
    echo_server(&node.vms[0].ns.name, 80);
    let mut agent = Agent::start(&node.host.name, &input(true, &[])).unwrap();
    let flow = Flow::start(&peer.name, 80);
    for i in 0..5 {
        agent.stop(i % 2 == 0).unwrap(); // SIGKILL, SIGTERM, SIGKILL, ...
        // While no agent runs, the pinned links keep enforcing: 22 stays closed.
        assert!(!tcp_reachable(&peer.name, vm_ip(), 22, Duration::from_millis(300)).unwrap());
        agent.spawn().unwrap();
        if let Err(e) = wait_until(&format!("restart {i} ready"), MUST_HAPPEN, || {
            agent.log_text().matches(" ready ").count() >= i + 2
        }) {
            panic!("{e}: {}", agent.log_text());
        }
        // The connection goes on under the new agent before the next restart.
        flow.wait_progress(10, &format!("after restart {i}"));
    }
    // Every restart swapped its program into the pinned links instead of re-attaching.
    let log = agent.log_text();
    assert_eq!(log.matches("took_over=[\"tapadcc4b66-c1\"]").count(), 5, "{log}");
    let (ok, errors) = flow.finish();
    assert_eq!(
        errors, 0,
        "the connection saw errors across restarts ({ok} exchanges ok)"
    );
}

#[test]
fn tap_deleted_and_recreated_is_filtered_again() {
    let (node, peer) = node();
    let vm = &node.vms[0];
    // Listeners outlive the VM's interface: they serve again once the address is back.
    sg_tests::tcp_servers(&vm.ns.name, vm_ip(), &[80, 22]).unwrap();
    let agent = Agent::start(&node.host.name, &input(true, &[])).unwrap();
    let t = Duration::from_millis(500);
    for round in 0..3 {
        node.host.ip(&["link", "del", TAP]).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        node.plug(&vm.ns, TAP, MAC, &format!("{VM_IP}/24")).unwrap();
        // The new tap gets its programs back; until then the agent may not have seen it yet.
        let deadline = Instant::now() + MUST_HAPPEN;
        loop {
            let (_, status, _) = agent.cli_status(&["status", "--json"]).unwrap();
            let v: Value = serde_json::from_str(&status).unwrap();
            let ifindex = v["ports"][0]["ifindex"].as_u64();
            let now = sg_tests::run("ip", &["-n", &node.host.name, "-j", "link", "show", TAP]).unwrap();
            let now: Value = serde_json::from_slice(&now.stdout).unwrap();
            if v["ports"][0]["enforced"] == json!(true) && ifindex == now[0]["ifindex"].as_u64() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: tap not re-attached: {status}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            !tcp_reachable(&peer.name, vm_ip(), 22, t).unwrap(),
            "round {round}: 22 is open"
        );
        // The links of the deleted tap were unpinned: only the new ifindex has pins.
        let now = sg_tests::run("ip", &["-n", &node.host.name, "-j", "link", "show", TAP]).unwrap();
        let now: Value = serde_json::from_slice(&now.stdout).unwrap();
        let pins: Vec<String> = std::fs::read_dir(agent.pins.path.join("links").join(&node.host.name))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let current = format!("{TAP}@{}_", now[0]["ifindex"]);
        assert_eq!(pins.len(), 2, "round {round}: {pins:?}");
        assert!(
            pins.iter().all(|p| p.starts_with(&current)),
            "round {round}: stale pins {pins:?}"
        );
        assert!(
            tcp_reachable(&peer.name, vm_ip(), 80, MUST_HAPPEN).unwrap(),
            "round {round}: 80 is closed"
        );
    }
}

#[test]
fn thousand_updates_under_traffic_no_drop_no_leak() {
    let (node, peer) = node();
    let vm_ns = node.vms[0].ns.name.clone();
    echo_server(&vm_ns, 80);
    // The denied flow: UDP to 9999, never allowed. Count what reaches the VM.
    let leaked = Arc::new(AtomicU64::new(0));
    let l2 = leaked.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    spawn_in(&vm_ns, move || {
        let s = UdpSocket::bind((vm_ip(), 9999)).unwrap();
        tx.send(()).unwrap();
        let mut buf = [0u8; 64];
        while s.recv(&mut buf).is_ok() {
            l2.fetch_add(1, Ordering::Relaxed);
        }
    });
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let agent = Agent::start(&node.host.name, &input(true, &[])).unwrap();
    let flow = Flow::start(&peer.name, 80);
    let sending = Arc::new(AtomicBool::new(true));
    let sent = Arc::new(AtomicU64::new(0));
    let (s2, n2) = (sending.clone(), sent.clone());
    let sender = spawn_in(&peer.name, move || {
        let s = UdpSocket::bind(("0.0.0.0", 0)).unwrap();
        while s2.load(Ordering::Relaxed) {
            if s.send_to(b"x", (vm_ip(), 9999)).is_ok() {
                n2.fetch_add(1, Ordering::Relaxed);
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    });

    let mut generation = agent.generation().unwrap();
    for i in 0..1000u16 {
        // An unrelated rule changes every time: a new policy, a switch, a delete.
        agent.write_input(&input(true, &[2000 + i])).unwrap();
        generation = agent.wait_generation(generation + 1).unwrap();
    }
    sending.store(false, Ordering::Relaxed);
    sender.join().unwrap().unwrap();
    let (ok, errors) = flow.finish();
    assert_eq!(
        errors, 0,
        "the allowed flow saw errors during 1,000 updates ({ok} ok)"
    );
    assert!(ok > 100, "the allowed flow barely ran: {ok}");
    assert!(sent.load(Ordering::Relaxed) > 1000, "the denied flow barely ran");
    assert_eq!(leaked.load(Ordering::Relaxed), 0, "denied packets reached the VM");
    assert!(generation >= 1001);
}

#[test]
fn pinned_map_of_another_shape_is_refused() {
    // A pinned SG_PORTS whose values are 8 bytes (this build's are 28): reusing it would make
    // the datapath read garbage, so loading must refuse and say what to do.
    let pins = sg_tests::PinRoot::new().unwrap();
    std::fs::create_dir_all(pins.path.join("maps")).unwrap();
    let path = pins.path.join("maps/SG_PORTS");
    sg_tests::run(
        "bpftool",
        &[
            "map",
            "create",
            path.to_str().unwrap(),
            "type",
            "hash",
            "key",
            "4",
            "value",
            "8",
            "entries",
            "16",
            "name",
            "SG_PORTS",
        ],
    )
    .unwrap();
    let err = match sg_user::datapath::Datapath::load(&sg_user::datapath::LoadOptions {
        pin_root: Some(pins.path.clone()),
        ..Default::default()
    }) {
        Ok(_) => panic!("a pinned map of another shape was reused"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("SG_PORTS") && err.contains("does not match"),
        "{err}"
    );
    assert!(err.contains("value 8") && err.contains("value 28"), "{err}");
    assert!(err.contains("Refusing to reuse it"), "{err}");
}

#[test]
fn detach_all_removes_every_link_and_pin() {
    let (node, peer) = node();
    sg_tests::tcp_servers(&node.vms[0].ns.name, vm_ip(), &[22]).unwrap();
    let mut agent = Agent::start(&node.host.name, &input(true, &[])).unwrap();
    let t = Duration::from_millis(500);
    assert!(
        !tcp_reachable(&peer.name, vm_ip(), 22, t).unwrap(),
        "filtered while sg is attached"
    );
    agent.stop(false).unwrap();
    assert!(
        !tcp_reachable(&peer.name, vm_ip(), 22, t).unwrap(),
        "still filtered after the agent stopped"
    );
    let out = agent.cli(&["detach", "--all"]).unwrap();
    let maps = sg_common::PINNED_MAPS.len();
    assert!(
        out.contains(&format!("removed {} pins", 2 + maps)),
        "2 links and {maps} maps: {out}"
    );
    assert!(!agent.pins.path.exists(), "the pin root is gone");
    assert!(
        tcp_reachable(&peer.name, vm_ip(), 22, MUST_HAPPEN).unwrap(),
        "nothing filters the tap any more"
    );
}

#[test]
fn pins_of_another_layout_version_are_refused() {
    // The default pin root is versioned (/sys/fs/bpf/sg/v2); a build with another pinned layout
    // pins under another version. Pins left by one would keep filtering the taps beside a new
    // agent with maps nobody updates, so the new agent refuses to start and says what to do.
    let pins = sg_tests::PinRoot::new().unwrap();
    std::fs::create_dir_all(pins.path.join("v0/maps")).unwrap();
    let old = pins.path.join("v0/maps/SG_PORTS");
    sg_tests::run(
        "bpftool",
        &[
            "map",
            "create",
            old.to_str().unwrap(),
            "type",
            "hash",
            "key",
            "4",
            "value",
            "8",
            "entries",
            "16",
            "name",
            "SG_PORTS",
        ],
    )
    .unwrap();
    let err = match sg_user::datapath::Datapath::load(&sg_user::datapath::LoadOptions {
        pin_root: Some(pins.path.join("v1")),
        ..Default::default()
    }) {
        Ok(_) => panic!("an agent started beside pins of another layout version"),
        Err(e) => e,
    };
    assert!(
        err.chain().any(|c| c.is::<sg_user::datapath::LayoutMismatch>()),
        "{err:#}"
    );
    let err = format!("{err:#}");
    assert!(
        err.contains("pinned layout v0") && err.contains("layout v1"),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "sg --pin-root {} detach --all",
            pins.path.join("v0").display()
        )),
        "{err}"
    );
    assert!(!pins.path.join("v1").exists(), "nothing was created: {err}");
}
