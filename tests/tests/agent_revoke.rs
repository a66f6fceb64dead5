//! Revocation with the VM as the sender (issue 17 A): a client on the network opens a TCP
//! connection to the VM's port 80, which only an ingress rule allows, and the VM streams data
//! back (as `iperf3 -R` does). The rule is removed mid-stream. Under sg the flow stops,
//! although the VM's default egress rule would admit a new flow from the VM: a flow is
//! re-checked in the orientation in which it was admitted, and its other side cannot re-open
//! it. Under Neutron's iptables the VM's next segment re-opens it (DIFFERENCES.md D13).

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use sg_tests::{Agent, ComputeNode, spawn_in};

const TAP: &str = "tapadcc4b66-c1";
const MAC: &str = "fa:16:3e:dc:d2:ab";
const VM_IP: &str = "192.168.206.6";
const PEER_IP: &str = "192.168.206.10";

/// WEB1: the default group (egress any, ingress from the group) and, when `web`, WEB_SERVERS'
/// tcp/80 from anywhere. The network is the node's bridge (`brq<network>`, as the Linux bridge
/// agent names it), so that Neutron's conntrack zone rules match both of its ports.
fn input(node: &ComputeNode, web: bool) -> Value {
    let mut groups = vec!["sg-default"];
    if web {
        groups.push("sg-web");
    }
    json!({
        "security_groups": [
            {"id": "sg-default", "name": "default", "stateful": true, "security_group_rules": [
                {"id": "d-e4", "direction": "egress", "ethertype": "IPv4"},
                {"id": "d-e6", "direction": "egress", "ethertype": "IPv6"},
                {"id": "d-i4", "direction": "ingress", "ethertype": "IPv4", "remote_group_id": "sg-default"},
            ]},
            {"id": "sg-web", "name": "WEB_SERVERS", "stateful": true, "security_group_rules": [
                {"id": "web-80", "direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
                 "port_range_min": 80, "port_range_max": 80, "remote_ip_prefix": "0.0.0.0/0"},
            ]},
        ],
        "address_groups": [],
        "ports": [{
            "id": "adcc4b66-c1e2-4b9a-9d3f-5a7c2e8b1f04", "name": "WEB1", "mac_address": MAC,
            "network_id": &node.bridge[3..], "fixed_ips": [{"ip_address": VM_IP, "subnet_id": "subnet-1"}],
            "security_groups": groups, "port_security_enabled": true,
            "device_owner": "compute:nova", "binding:host_id": "compute-1",
        }],
    })
}

/// A server on VM_IP:80 in `ns` that writes to every connection until it fails.
fn streaming_server(ns: &str) {
    let (tx, rx) = std::sync::mpsc::channel();
    spawn_in(ns, move || {
        let l = TcpListener::bind((VM_IP.parse::<IpAddr>().unwrap(), 80)).unwrap();
        tx.send(()).unwrap();
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let chunk = [0x5au8; 16 * 1024];
                while s.write_all(&chunk).is_ok() {}
            });
        }
    });
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
}

/// The client end: connects from `ns` and counts the bytes it receives until `stop`.
struct Receiver {
    bytes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl Receiver {
    fn start(ns: &str) -> Self {
        let (bytes, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let (b, s) = (bytes.clone(), stop.clone());
        let handle = spawn_in(ns, move || {
            let mut c = TcpStream::connect_timeout(
                &(VM_IP.parse::<IpAddr>().unwrap(), 80).into(),
                Duration::from_secs(2),
            )
            .unwrap();
            c.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
            let mut buf = vec![0u8; 64 * 1024];
            while !s.load(Ordering::Relaxed) {
                match c.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        b.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => break,
                }
            }
        });
        Self {
            bytes,
            stop,
            handle: Some(handle),
        }
    }

    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Bytes received during `d`.
    fn during(&self, d: Duration) -> u64 {
        let before = self.bytes();
        std::thread::sleep(d);
        self.bytes() - before
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Streams from the VM until a MiB has arrived, then removes tcp/80; returns the receiver.
fn stream_then_remove_the_rule(node: &ComputeNode, peer: &str, agent: &Agent) -> Receiver {
    streaming_server(&node.vms[0].ns.name);
    let rx = Receiver::start(peer);
    let t = Instant::now();
    while rx.bytes() < 1 << 20 && t.elapsed() < sg_tests::MUST_HAPPEN {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        rx.bytes() >= 1 << 20,
        "the stream never ran: {} bytes",
        rx.bytes()
    );
    let g = agent.generation().unwrap();
    agent.write_input(&input(node, false)).unwrap();
    agent.wait_generation(g + 1).unwrap();
    rx
}

#[test]
fn vm_sent_stream_stops_when_its_ingress_rule_is_removed() {
    let mut node = ComputeNode::new().unwrap();
    node.add_vm(TAP, MAC, &format!("{VM_IP}/24")).unwrap();
    let peer = node.add_peer(&format!("{PEER_IP}/24")).unwrap();
    let agent = Agent::start(&node.host.name, &input(&node, true)).unwrap();
    let rx = stream_then_remove_the_rule(&node, &peer.name, &agent);
    // What was in flight at the change drains; then the stream must stay silent.
    let t = Instant::now();
    while rx.during(Duration::from_millis(500)) > 0 && t.elapsed() < sg_tests::MUST_HAPPEN {}
    let after = rx.during(Duration::from_secs(2));
    let ct = agent.cli(&["conntrack", "list"]).unwrap();
    assert_eq!(
        after, 0,
        "{after} bytes reached the client after tcp/80 was removed; conntrack:\n{ct}"
    );
}

/// The same under sg's iptables back end (Neutron's ruleset and its conntrack cleanup): Neutron
/// deletes the flow's conntrack entry, the VM's next segment is picked up as a new flow and let
/// out by the egress rule, and the client's ACKs are then its replies. The stream carries on:
/// the documented difference D13, measured.
#[test]
fn vm_sent_stream_carries_on_under_iptables() {
    let mut node = ComputeNode::new().unwrap();
    node.add_vm(TAP, MAC, &format!("{VM_IP}/24")).unwrap();
    let peer = node.add_peer(&format!("{PEER_IP}/24")).unwrap();
    for f in ["bridge-nf-call-iptables", "bridge-nf-call-ip6tables"] {
        node.host
            .exec("sysctl", &["-qw", &format!("net.bridge.{f}=1")])
            .unwrap();
    }
    let agent =
        Agent::start_with(&node.host.name, &input(&node, true), &["--dataplane", "iptables"]).unwrap();
    let rx = stream_then_remove_the_rule(&node, &peer.name, &agent);
    // The generation is recorded after Neutron's conntrack cleanup ran: the stream goes on.
    let after = rx.during(Duration::from_secs(2));
    assert!(
        after > 1 << 20,
        "under iptables the VM's stream re-opens through the egress rule; only {after} bytes"
    );
}
