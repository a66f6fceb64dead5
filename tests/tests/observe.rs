//! Observability on a namespace compute node: the security-group log (events, Neutron's line
//! format judged by os_ken itself, the per-port rate limit, lost events), `sg monitor`, `sg debug`
//! and `/metrics` scraped by a real Prometheus server.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{Array, HashMap, MapData};
use serde_json::{Value, json};
use sg_common::*;
use sg_tests::{
    Agent, ComputeNode, MUST_HAPPEN, Netns,
    dp::{RawSock, tcp, udp},
    spawn_in, unique, wait_until, workspace_root,
};
use sg_user::{
    observe::pkt,
    packet::{Frame, IpPacket, Mac, TCP_SYN},
    pinned,
};

const TAP: &str = "tapadcc4b66-c1";
const PORT_ID: &str = "adcc4b66-c1e2-4b9a-9d3f-5a7c2e8b1f04";
const MAC: &str = "fa:16:3e:dc:d2:ab";
const VM_MAC: Mac = [0xfa, 0x16, 0x3e, 0xdc, 0xd2, 0xab];
const VM_IP: &str = "192.168.206.6";
const PEER_IP: &str = "192.168.206.10";
const SG_DEFAULT: &str = "0c2f6d1e-8a3b-4f5c-9d7e-2b1a4c6e8f03";
const SG_WEB: &str = "7a9e3b2c-4d5f-4e6a-8b1c-9d0e2f3a4b5c";

/// WEB1 in `default` and WEB_SERVERS (tcp 80 from anywhere), with network logs `logs`.
fn input(logs: Value) -> Value {
    json!({
        "security_groups": [
            {"id": SG_DEFAULT, "name": "default", "security_group_rules": [
                {"id": "d-e4", "direction": "egress", "ethertype": "IPv4"},
            ]},
            {"id": SG_WEB, "name": "WEB_SERVERS", "security_group_rules": [
                {"id": "web-80", "direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
                 "port_range_min": 80, "port_range_max": 80, "remote_ip_prefix": "0.0.0.0/0"},
            ]},
        ],
        "ports": [{
            "id": PORT_ID, "name": "WEB1", "mac_address": MAC, "network_id": "net-1",
            "fixed_ips": [{"ip_address": VM_IP, "subnet_id": "subnet-1"}],
            "security_groups": [SG_DEFAULT, SG_WEB], "device_owner": "compute:nova",
            "binding:host_id": "compute-1",
        }],
        "logs": logs,
    })
}

struct Node {
    node: ComputeNode,
    peer: Netns,
    peer_mac: Mac,
}

fn node() -> Node {
    let mut node = ComputeNode::new().unwrap();
    node.add_vm(TAP, MAC, &format!("{VM_IP}/24")).unwrap();
    let peer = node.add_peer(&format!("{PEER_IP}/24")).unwrap();
    let out = peer.ip(&["-j", "link", "show", "eth0"]).unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let m = sg_user::model::MacAddr::parse(v[0]["address"].as_str().unwrap()).unwrap();
    Node {
        node,
        peer,
        peer_mac: m.0,
    }
}

impl Node {
    /// A frame from the peer to the VM.
    fn frame(&self, p: IpPacket) -> Vec<u8> {
        Frame::ip(self.peer_mac, VM_MAC, p).build()
    }
}

/// A TCP SYN from the peer.
fn syn(dport: u16) -> IpPacket {
    let mut p = tcp(PEER_IP, 40000, VM_IP, dport, TCP_SYN);
    p.ident = 0x4242;
    p
}

fn os_ken(frames: &[Vec<u8>]) -> Vec<String> {
    let py = Command::new(workspace_root().join("tests/oracle/setup_venv.sh"))
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(py.status.success(), "tests/oracle/setup_venv.sh failed");
    let python = String::from_utf8(py.stdout).unwrap().trim().to_string();
    let mut child = Command::new(python)
        .arg(workspace_root().join("tests/oracle/os_ken_packets.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let input: String = frames.iter().map(|f| format!("{}\n", hex(f))).collect();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(child.wait().unwrap().success(), "os_ken_packets.py failed");
    out.lines().map(str::to_string).collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn snap(f: &[u8]) -> &[u8] {
    &f[..f.len().min(EVENT_SNAP_LEN)]
}

/// The `pkt=` of Neutron's log lines: sg's rendering against os_ken's own, on frames of every
/// kind sg decodes, cut to what an event carries.
#[test]
fn packet_summaries_match_os_ken() {
    let mac1: Mac = [0xfa, 0x16, 0x3e, 0, 0, 0x10];
    let f = |p: IpPacket| Frame::ip(mac1, VM_MAC, p).build();
    let mut syn_opts = tcp("192.168.206.10", 40000, "192.168.206.6", 80, TCP_SYN);
    syn_opts.ipv4_options = vec![1, 1, 1, 0];
    let mut frames = vec![
        f(tcp("192.168.206.10", 40000, "192.168.206.6", 80, TCP_SYN)),
        f(syn_opts),
        f(udp("10.0.0.1", 5353, "10.0.0.2", 53)),
        f(udp("10.0.0.1", 5353, "10.0.0.2", 53).with_payload(vec![b'x'; 300])),
        f(udp("10.0.0.1", 1, "10.0.0.2", 2).with_payload(b"it's \"q\" \\ \t\n\r\x00\xff".to_vec())),
        f(sg_tests::dp::icmp("10.0.0.1", "10.0.0.2", 8, 0, 7).with_payload(b"\x00\x01ab".to_vec())),
        f(sg_tests::dp::icmp("10.0.0.1", "10.0.0.2", 0, 0, 7)),
        f(sg_tests::dp::icmp("2001:db8::1", "2001:db8::2", 128, 0, 3).with_payload(b"xyz".to_vec())),
        f(tcp("2001:db8::1", 1, "fe80::f816:3eff:fedc:d2ab", 22, 0x12)),
        f(udp("2001:db8::1", 5000, "2001:db8::2", 53).with_payload(vec![0u8; 16])),
        f(sg_tests::dp::raw(
            "10.0.0.1",
            "10.0.0.2",
            132,
            &[1, 2, 3, 4, 5, 6, 7, 8],
        )),
        sg_tests::dp::arp(mac1, 1, mac1, "10.0.0.1", "10.0.0.2"),
    ];
    // A TCP header with every option kind os_ken names, and an unknown one.
    let mut t = f(tcp("10.0.0.1", 1000, "10.0.0.2", 80, TCP_SYN));
    let opts: [u8; 24] = [
        2, 4, 5, 0xb4, 4, 2, 8, 10, 0, 1, 0xe2, 0x40, 0, 0, 0, 0, 1, 3, 3, 7, 30, 3, 9, 0,
    ];
    t.truncate(14 + 20 + 20);
    t.extend_from_slice(&opts);
    t[14 + 20 + 12] = (((20 + opts.len()) / 4) << 4) as u8;
    let total = (20 + 20 + opts.len()) as u16;
    t[14 + 2..14 + 4].copy_from_slice(&total.to_be_bytes());
    frames.push(t);
    let want = os_ken(&frames.iter().map(|f| snap(f).to_vec()).collect::<Vec<_>>());
    assert_eq!(want.len(), frames.len());
    for (f, w) in frames.iter().zip(&want) {
        assert_eq!(&pkt::os_ken(snap(f)), w, "frame {}", hex(f));
    }
}

fn log_lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn bucket(agent: &Agent) -> LogLimit {
    let map: HashMap<MapData, u32, LogLimit> = pinned::open(&agent.pins.path, MAP_LOG_LIMITS)
        .unwrap()
        .try_into()
        .unwrap();
    let entries: Vec<(u32, LogLimit)> = map.iter().map(|r| r.unwrap()).collect();
    assert_eq!(entries.len(), 1, "one logged port, one bucket");
    map.get(&entries[0].0, 4).unwrap()
}

fn drops_counted(agent: &Agent) -> u64 {
    pinned::stats(&agent.pins.path)
        .unwrap()
        .iter()
        .filter(|(k, _)| k.dir == DIR_INGRESS && k.reason == REASON_DROP_NO_RULE)
        .map(|(_, c)| c.packets)
        .sum()
}

/// ACCEPT for the first packet of a flow a rule admits, and only for it, DROP for a dropped
/// packet; the line is Neutron's, with os_ken's rendering of the very frame; the right log
/// objects and project.
#[test]
fn security_group_log_lines() {
    let n = node();
    let logs = json!([
        {"id": "log-all", "project_id": "proj-a", "resource_type": "security_group",
         "resource_id": SG_WEB, "event": "ALL", "enabled": true},
        {"id": "log-drop", "project_id": "proj-b", "resource_type": "security_group",
         "target_id": PORT_ID, "event": "DROP"},
        {"id": "log-off", "project_id": "proj-c", "resource_type": "security_group",
         "event": "ALL", "enabled": false},
    ]);
    let dir = std::env::temp_dir().join(unique("sg-log-"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("sg-log.log");
    let agent = Agent::start_with(
        &n.node.host.name,
        &input(logs),
        &["--log-output", path.to_str().unwrap()],
    )
    .unwrap();
    let sock = RawSock::open(&n.peer.name, "eth0").unwrap();

    let accept = n.frame(syn(80));
    let drop = n.frame(udp(PEER_IP, 33333, VM_IP, 5000));
    sock.send(&accept).unwrap();
    sock.send(&drop).unwrap();
    wait_until("two log lines", MUST_HAPPEN, || log_lines(&path).len() >= 2).unwrap();
    let want = os_ken(&[snap(&accept).to_vec(), snap(&drop).to_vec()]);
    let lines = log_lines(&path);
    let prefix = regex_prefix();
    let accept_msg = format!(
        "action=ACCEPT project_id=proj-a log_resource_ids=['log-all'] vm_port={PORT_ID} pkt={}",
        want[0]
    );
    let drop_msg = format!(
        "action=DROP project_id=proj-a log_resource_ids=['log-all', 'log-drop'] vm_port={PORT_ID} pkt={}",
        want[1]
    );
    for (line, msg) in lines.iter().zip([&accept_msg, &drop_msg]) {
        let (head, body) = line.split_once(" [-] ").expect("oslo prefix");
        assert!(prefix(head), "prefix of {line:?}");
        assert_eq!(body, msg);
    }
    // The VM answers the SYN (a RST: nothing listens), the flow is established: no more lines.
    assert_eq!(lines.len(), 2, "{lines:#?}");
    let b = bucket(&agent);
    assert_eq!((b.admitted, b.limited, b.lost), (2, 0, 0));

    // A flow nobody answers (the VM's datagrams to an address nobody has): its first packet
    // is logged, the second is not, although conntrack still calls it NEW (DIFFERENCES D24).
    let vm = RawSock::open(&n.node.vms[0].ns.name, "eth0").unwrap();
    let out = Frame::ip(VM_MAC, n.peer_mac, udp(VM_IP, 40000, "192.168.206.99", 7000)).build();
    let from_vm_by_rule = || {
        pinned::stats(&agent.pins.path)
            .unwrap()
            .iter()
            .filter(|(k, _)| k.dir == DIR_EGRESS && k.reason == REASON_ALLOW_RULE)
            .map(|(_, c)| c.packets)
            .sum::<u64>()
    };
    vm.send(&out).unwrap();
    vm.send(&out).unwrap();
    wait_until("both datagrams decided", MUST_HAPPEN, || from_vm_by_rule() == 2).unwrap();
    let b = bucket(&agent);
    assert_eq!(
        (b.admitted, b.limited, b.lost),
        (3, 0, 0),
        "one event for the flow"
    );
    wait_until("three log lines", MUST_HAPPEN, || log_lines(&path).len() >= 3).unwrap();
    let lines = log_lines(&path);
    assert_eq!(lines.len(), 3, "{lines:#?}");
    let want = os_ken(&[snap(&out).to_vec()]);
    assert!(
        lines[2].ends_with(&format!(
            "action=ACCEPT project_id=proj-a log_resource_ids=['log-all'] vm_port={PORT_ID} pkt={}",
            want[0]
        )),
        "{}",
        lines[2]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `YYYY-mm-dd HH:MM:SS.mmm PID INFO sg.network_log`: oslo.log's default file prefix.
fn regex_prefix() -> impl Fn(&str) -> bool {
    |head: &str| {
        let parts: Vec<&str> = head.split(' ').collect();
        parts.len() == 5
            && parts[0].len() == 10
            && parts[0].chars().filter(|c| *c == '-').count() == 2
            && parts[1].len() == 12
            && parts[1].as_bytes()[8] == b'.'
            && parts[2].parse::<u32>().is_ok()
            && parts[3] == "INFO"
            && parts[4] == "sg.network_log"
    }
}

/// Sends `n` dropped UDP datagrams from the peer as fast as it can; returns how long it took.
fn flood(node: &Node, sock: &RawSock, n: usize) -> Duration {
    let frames: Vec<Vec<u8>> = (0..n)
        .map(|i| node.frame(udp(PEER_IP, 10_000 + (i % 50_000) as u16, VM_IP, 5000)))
        .collect();
    let t = Instant::now();
    for f in &frames {
        sock.send(f).unwrap();
    }
    t.elapsed()
}

/// Neutron's rate_limit and burst_limit (defaults 100/s and 25), per port, in the datapath:
/// a drop flood logs at most burst + rate × its duration, and every refused event is counted.
#[test]
fn log_rate_limit() {
    let n = node();
    let logs =
        json!([{"id": "log-all", "project_id": "p", "resource_type": "security_group", "event": "ALL"}]);
    let dir = std::env::temp_dir().join(unique("sg-log-"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("sg-log.log");
    let agent = Agent::start_with(
        &n.node.host.name,
        &input(logs),
        &["--log-output", path.to_str().unwrap()],
    )
    .unwrap();
    let sock = RawSock::open(&n.peer.name, "eth0").unwrap();
    let t0 = Instant::now();
    flood(&n, &sock, 2_000);
    let sent_for = t0.elapsed();
    // Every packet the datapath decided went through the bucket.
    let mut b = bucket(&agent);
    wait_until("the flood decided", MUST_HAPPEN, || {
        b = bucket(&agent);
        b.admitted + b.limited == drops_counted(&agent) && drops_counted(&agent) > 0
    })
    .unwrap();
    let decided = drops_counted(&agent);
    wait_until("the admitted events logged", MUST_HAPPEN, || {
        log_lines(&path).len() as u64 == b.admitted
    })
    .unwrap();
    let bound = LOG_BURST_LIMIT as f64 + LOG_RATE_LIMIT as f64 * sent_for.as_secs_f64();
    assert!(
        b.admitted >= LOG_BURST_LIMIT as u64 && b.admitted as f64 <= bound + 1.0,
        "admitted {} of {decided} in {sent_for:?}: want between {LOG_BURST_LIMIT} and {bound:.1}",
        b.admitted
    );
    assert!(b.limited > 0 && b.lost == 0, "{b:?}");
    assert!(log_lines(&path).iter().all(|l| l.contains("action=DROP")));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Events the ring buffer cannot hold while its reader is stopped are counted as lost; the rest
/// are all logged once the reader is back.
#[test]
fn lost_events_are_counted() {
    let n = node();
    let logs =
        json!([{"id": "log-drop", "project_id": "p", "resource_type": "security_group", "event": "DROP"}]);
    let dir = std::env::temp_dir().join(unique("sg-log-"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("sg-log.log");
    let mut agent = Agent::start_with(
        &n.node.host.name,
        &input(logs),
        &[
            "--log-output",
            path.to_str().unwrap(),
            "--log-rate-limit",
            "10000000",
            "--log-burst-limit",
            "10000000",
        ],
    )
    .unwrap();
    let sock = RawSock::open(&n.peer.name, "eth0").unwrap();
    let pid = agent.child.as_ref().unwrap().id() as i32;
    // SAFETY: signals to our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    // kill() only queues the stop: until every thread has stopped, the reader can still take
    // events (the buffer then holds more than its capacity in total). waitpid(WUNTRACED)
    // returns once the whole agent is stopped.
    let mut status = 0;
    // SAFETY: our own child; status is a valid out pointer.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WUNTRACED) };
    assert!(
        r == pid && libc::WIFSTOPPED(status),
        "agent not stopped: {r} {status:#x}"
    );
    // The buffer holds EVENTS_BYTES / (event + 8-byte header) events.
    let capacity = EVENTS_BYTES as usize / (size_of::<Event>() + 8);
    let mut sent = 0;
    while (drops_counted(&agent) as usize) < capacity + 500 && sent < 20 * capacity {
        flood(&n, &sock, 500);
        sent += 500;
    }
    let b = bucket(&agent);
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert!(
        b.lost > 0,
        "nothing lost with {} events admitted: {b:?}",
        b.admitted
    );
    assert_eq!(b.admitted, drops_counted(&agent));
    wait_until("the buffered events logged", MUST_HAPPEN, || {
        log_lines(&path).len() as u64 == b.admitted - b.lost
    })
    .unwrap();
    assert!(b.admitted - b.lost <= capacity as u64, "{b:?}");
    agent.stop(false).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

fn monitor_enabled(agent: &Agent) -> u32 {
    let map: Array<MapData, MonitorCfg> = pinned::open(&agent.pins.path, MAP_MONITOR)
        .unwrap()
        .try_into()
        .unwrap();
    map.get(&0, 0).unwrap().enabled
}

/// `sg monitor`: only the chosen port and reasons, each line with the packet, stage, reason
/// and rule; the datapath's monitor switch is on only while it runs.
#[test]
fn monitor_streams_verdicts() {
    let n = node();
    let agent = Agent::start(&n.node.host.name, &input(json!([]))).unwrap();
    assert_eq!(monitor_enabled(&agent), 0);
    let mut mon = Command::new(sg_tests::workspace_bin("sg").unwrap())
        .args(["--pin-root", agent.pins.path.to_str().unwrap()])
        .args(["--run-dir", agent.run_dir.to_str().unwrap()])
        .args([
            "monitor",
            "--port",
            TAP,
            "--reason",
            "drop-no-rule",
            "--reason",
            "allow-rule",
            "--count",
            "2",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut hello = String::new();
    BufReader::new(mon.stderr.take().unwrap())
        .read_line(&mut hello)
        .unwrap();
    assert!(hello.starts_with("monitoring"), "{hello}");
    assert_eq!(monitor_enabled(&agent), 1);
    let sock = RawSock::open(&n.peer.name, "eth0").unwrap();
    sock.send(&n.frame(udp(PEER_IP, 33333, VM_IP, 5000))).unwrap();
    sock.send(&n.frame(syn(80))).unwrap();
    let mut out = String::new();
    mon.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(mon.wait().unwrap().success());
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    let drop = lines[0];
    for want in [
        TAP,
        "to-vm",
        "DROP",
        "drop-no-rule",
        "stage=policy",
        "rule=-",
        &format!("port={PORT_ID}"),
        &format!("{PEER_IP}:33333 -> {VM_IP}:5000 udp"),
    ] {
        assert!(drop.contains(want), "{want:?} not in {drop:?}");
    }
    let accept = lines[1];
    for want in [
        "ALLOW",
        "allow-rule",
        "stage=policy",
        SG_WEB,
        "ingress IPv4 tcp 80",
        "tcp SYN",
    ] {
        assert!(accept.contains(want), "{want:?} not in {accept:?}");
    }
    // The monitor left: the datapath stops sending.
    wait_until("monitor switched off", MUST_HAPPEN, || {
        monitor_enabled(&agent) == 0
    })
    .unwrap();
}

/// The program id behind a pinned tcx link.
fn link_prog(path: &std::path::Path) -> u64 {
    let out = sg_tests::run(
        "bpftool",
        &["-j", "link", "show", "pinned", path.to_str().unwrap()],
    )
    .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["prog_id"].as_u64().unwrap()
}

/// `sg debug PORT on`: the port's links run the debug build and its per-stage records reach
/// the agent's log; `off` puts the normal programs back.
#[test]
fn debug_records_for_one_port() {
    let n = node();
    let agent = Agent::start(&n.node.host.name, &input(json!([]))).unwrap();
    let ifindex = sg_user::netns::run_in(Some(&n.node.host.name), || sg_user::netns::ifindex(TAP))
        .unwrap()
        .unwrap();
    let iface = sg_user::datapath::Iface::new(TAP, Some(&n.node.host.name));
    let pin = sg_user::datapath::link_pin_path(&agent.pins.path, &iface, ifindex, PROG_TO_VM);
    let normal = link_prog(&pin);
    let msg = agent.cli(&["debug", TAP, "on"]).unwrap();
    assert!(msg.contains("are on"), "{msg}");
    assert_ne!(link_prog(&pin), normal, "the debug build is on the port's link");
    let sock = RawSock::open(&n.peer.name, "eth0").unwrap();
    sock.send(&n.frame(udp(PEER_IP, 33333, VM_IP, 5000))).unwrap();
    wait_until("debug records in the agent log", MUST_HAPPEN, || {
        let log = agent.log_text();
        log.contains("datapath debug: parse: l3 2 family 4 proto 17") && log.contains("policy: class")
    })
    .unwrap_or_else(|e| panic!("{e}; agent log:\n{}", agent.log_text()));
    // The agent's link check keeps the debug build where it is: a removed link comes back
    // with it, and the other link keeps it.
    let from_pin = sg_user::datapath::link_pin_path(&agent.pins.path, &iface, ifindex, PROG_FROM_VM);
    let (debug_to, debug_from) = (link_prog(&pin), link_prog(&from_pin));
    std::fs::remove_file(&pin).unwrap();
    agent
        .wait_log("enforcement was removed from under the agent", 1)
        .unwrap();
    wait_until("the link pin back", MUST_HAPPEN, || pin.exists()).unwrap();
    assert_eq!(
        link_prog(&pin),
        debug_to,
        "the restored link runs the debug build"
    );
    assert_eq!(
        link_prog(&from_pin),
        debug_from,
        "the other link kept the debug build"
    );
    let msg = agent.cli(&["debug", TAP, "off"]).unwrap();
    assert!(msg.contains("off"), "{msg}");
    assert_eq!(link_prog(&pin), normal, "the normal program is back");
    let err = agent
        .cli(&["debug", "no-such-port", "on"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("no managed port"), "{err}");
}

/// HTTP GET from inside a namespace; returns the body.
fn http_get(ns: &str, addr: std::net::SocketAddr, path: &str) -> Result<String> {
    let path = path.to_string();
    spawn_in(ns, move || -> Result<String> {
        let mut s = std::net::TcpStream::connect_timeout(&addr, MUST_HAPPEN)?;
        s.set_read_timeout(Some(MUST_HAPPEN))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        let (head, body) = out.split_once("\r\n\r\n").context("no HTTP header end")?;
        if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
            bail!("{head}");
        }
        Ok(body.to_string())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("http thread panicked"))??
}

/// A free TCP port on the loopback of `ns`.
fn free_port(ns: &str) -> u16 {
    spawn_in(ns, || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    })
    .join()
    .unwrap()
    .unwrap()
}

struct Prometheus {
    child: std::process::Child,
    dir: std::path::PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `sg agent --metrics-addr` in the node's namespace, scraped by Debian's Prometheus server on
/// that namespace's loopback: the dropped-packet counter rises by exactly the packets sent,
/// as Prometheus's query API reports it, and `promtool check metrics` accepts the exposition.
#[test]
fn prometheus_scrapes_the_agent() {
    let n = node();
    let ns = n.node.host.name.clone();
    let mport = free_port(&ns);
    let maddr: std::net::SocketAddr = format!("127.0.0.1:{mport}").parse().unwrap();
    let agent = Agent::start_full(
        &ns,
        &input(json!([])),
        &["--metrics-addr", &maddr.to_string(), "--metrics-rule-hits"],
        Some(&ns),
    )
    .unwrap();

    // The exposition passes promtool's lint and has the families the issue asks for.
    let mut body = String::new();
    wait_until("/metrics answers", MUST_HAPPEN, || {
        http_get(&ns, maddr, "/metrics").map(|b| body = b).is_ok()
    })
    .unwrap();
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus, installed by cargo xtask setup)");
    lint.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = lint.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for family in [
        "sg_build_info{",
        "sg_conntrack_entries{table=\"unassured\"} ",
        "sg_conntrack_entries{table=\"assured\"} ",
        "sg_conntrack_capacity{table=\"unassured\"} 262144",
        "sg_conntrack_capacity{table=\"assured\"} 262144",
        "sg_apply_duration_seconds_bucket{",
        "sg_apply_errors_total 0",
        "sg_ports{state=\"enforced\"} 1",
        "sg_map_entries{map=\"SG_PORTS\"} 1",
        "sg_rule_hits_packets_total{",
    ] {
        assert!(body.contains(family), "{family} missing from:\n{body}");
    }
    // The tries' entry counts are the agent's own count of what it wrote: they match the maps.
    for name in [MAP_CLASSES, MAP_SERVICES, MAP_SRC_PORTS, MAP_ADDRS] {
        let map = pinned::open(&agent.pins.path, name).unwrap();
        let aya::maps::Map::LpmTrie(data) = &map else {
            panic!("{name} is not an LPM trie")
        };
        let mut n = 0;
        sg_user::datapath::batch::lookup_all(
            data,
            data.info().unwrap().key_size() as usize,
            data.info().unwrap().value_size() as usize,
            false,
            256,
            |_, _| n += 1,
        )
        .unwrap();
        // (No rule of this input has source ports.)
        assert!(n > 0 || name == MAP_SRC_PORTS, "{name} is empty");
        let line = format!("sg_map_entries{{map=\"{name}\"}} {n}\n");
        assert!(body.contains(&line), "{line:?} missing from:\n{body}");
    }

    let pport = free_port(&ns);
    let dir = std::env::temp_dir().join(unique("sg-prom-"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 200ms\n  scrape_timeout: 150ms\nscrape_configs:\n  - job_name: sg\n    static_configs:\n      - targets: ['{maddr}']\n"
        ),
    )
    .unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", &ns, "prometheus"])
        .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{pport}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
        .spawn()
        .unwrap();
    let prom = Prometheus { child, dir };
    let paddr: std::net::SocketAddr = format!("127.0.0.1:{pport}").parse().unwrap();
    let series = format!("sg_packets_total{{device=\"{TAP}\",direction=\"to-vm\",reason=\"drop-no-rule\"}}");
    let query = |ns: &str| -> Option<u64> {
        let q: String = series
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
                b => format!("%{b:02X}"),
            })
            .collect();
        let body = http_get(ns, paddr, &format!("/api/v1/query?query={q}")).ok()?;
        let v: Value = serde_json::from_str(&body).ok()?;
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    };
    let sock = RawSock::open(&n.peer.name, "eth0").unwrap();
    sock.send(&n.frame(udp(PEER_IP, 1, VM_IP, 5000))).unwrap();
    wait_until("Prometheus has the first drop", 3 * MUST_HAPPEN, || {
        query(&ns) == Some(1)
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {}",
            std::fs::read_to_string(prom.dir.join("prometheus.log")).unwrap_or_default()
        )
    });
    const SENT: u64 = 37;
    for i in 0..SENT {
        sock.send(&n.frame(udp(PEER_IP, 2 + i as u16, VM_IP, 5000)))
            .unwrap();
    }
    wait_until("Prometheus sees the 37 drops", 3 * MUST_HAPPEN, || {
        query(&ns) == Some(1 + SENT)
    })
    .unwrap();
    drop(prom);
    drop(agent);
}
