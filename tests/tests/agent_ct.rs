//! What a full conntrack table does (documented difference D18): the least recently used flow
//! loses its state, new flows are still admitted, and the table never holds more than its
//! capacity.

use std::{
    net::{IpAddr, UdpSocket},
    time::Duration,
};

use serde_json::{Value, json};
use sg_tests::{Agent, ComputeNode, spawn_in};

#[test]
fn full_table_evicts_the_oldest_flows_and_admits_new_ones() {
    let mut node = ComputeNode::new().unwrap();
    node.add_vm("tapfeed0000-00", "fa:16:3e:00:fe:ed", "10.8.0.5/24")
        .unwrap();
    let peer = node.add_peer("10.8.0.200/24").unwrap();
    // Ingress UDP 53 only, no egress rule: a reply leaves the VM only as ESTABLISHED.
    let input = json!({
        "security_groups": [{"id": "sg-dns", "stateful": true, "security_group_rules": [
            {"id": "dns", "direction": "ingress", "ethertype": "IPv4", "protocol": "udp",
             "port_range_min": 53, "port_range_max": 53}]}],
        "address_groups": [],
        "ports": [{"id": "feed0000-0000-4000-8000-00000000feed", "mac_address": "fa:16:3e:00:fe:ed",
            "network_id": "net-ct", "fixed_ips": [{"ip_address": "10.8.0.5"}], "security_groups": ["sg-dns"],
            "binding:host_id": "compute-1", "device": "tapfeed0000-00"}],
    });
    let agent = Agent::start_with(&node.host.name, &input, &["--ct-entries", "64"]).unwrap();
    let vm: IpAddr = "10.8.0.5".parse().unwrap();
    const FLOWS: u16 = 200;

    // The VM collects every query first and answers them all afterwards, oldest first, from
    // one CPU: frames from one CPU keep their order through veth and the bridge, so once the
    // newest answer is in, every older answer that got out is in too.
    let (tx, rx) = std::sync::mpsc::channel();
    let server = spawn_in(&node.vms[0].ns.name, move || {
        pin_to_cpu(1);
        let s = UdpSocket::bind((vm, 53)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        tx.send(()).unwrap();
        let mut from = Vec::new();
        let mut buf = [0u8; 16];
        while from.len() < FLOWS as usize {
            let Ok((_, a)) = s.recv_from(&mut buf) else { break };
            from.push(a);
        }
        for a in &from {
            s.send_to(b"answer", a).unwrap();
        }
        from.len()
    });
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let client = spawn_in(&peer.name, move || {
        // The kernel's LRU keeps per-CPU lists, and an entry created on a CPU that then stays
        // idle is not reclaimed first: all flows are created from one CPU, so that "oldest"
        // means the same to the table as to this test.
        pin_to_cpu(0);
        let socks: Vec<UdpSocket> = (0..FLOWS)
            .map(|i| UdpSocket::bind(("10.8.0.200", 40000 + i)).unwrap())
            .collect();
        for s in &socks {
            s.send_to(b"query", (vm, 53)).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        socks
    });
    // Sockets keep their namespace: read the answers here once the VM has sent them all.
    let socks = client.join().unwrap().unwrap();
    let received = server.join().unwrap().unwrap();
    let last = socks.last().unwrap();
    last.set_read_timeout(Some(sg_tests::MUST_HAPPEN)).unwrap();
    let newest_answered = last.recv(&mut [0u8; 16]).is_ok();
    let mut answered: Vec<bool> = socks[..socks.len() - 1]
        .iter()
        .map(|s| {
            s.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 16];
            s.recv(&mut buf).is_ok()
        })
        .collect();
    answered.push(newest_answered);
    assert_eq!(
        received, FLOWS as usize,
        "every new flow was admitted although the table was full"
    );
    let delivered = answered.iter().filter(|x| **x).count();
    assert!(
        !answered[0],
        "the oldest flow lost its state: its answer must not get out"
    );
    assert!(answered[FLOWS as usize - 1], "the newest flow kept its state");
    assert!(
        delivered <= 64,
        "more answers ({delivered}) than the table can hold state for"
    );

    let ct: Value = serde_json::from_str(&agent.cli(&["conntrack", "list", "--json"]).unwrap()).unwrap();
    assert!(
        ct.as_array().unwrap().len() <= 64,
        "conntrack holds {} entries",
        ct.as_array().unwrap().len()
    );
}

fn pin_to_cpu(cpu: usize) {
    // The machine this runs on has at least two CPUs (2 cores on CI); on one, both would be 0.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    sg_user::diff::wire::pin_to_cpu(cpu % cpus).unwrap();
}
