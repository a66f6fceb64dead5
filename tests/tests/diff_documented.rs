//! Documented differences that random configurations stay clear of, asserted on both sides:
//! D12 (per-port conntrack zones on a network mixing stateless and stateful ports) and D13
//! (a rule removed: sg cuts a flow Neutron's conntrack cleanup misses).

use serde_json::json;
use sg_user::{
    diff::{
        self, Config,
        backend::Backend,
        scenario::{Edit, REMOTE_MAC, Scenario, Shot, Side, Step},
    },
    model::{self, Model},
    packet::{Frame, IpPacket, L4, TCP_ACK, TCP_PSH, TCP_SYN},
};

const NET: &str = "6b1d2e3f-4a5b-4c6d-8e7f-001122334455";

fn rule(id: &str, dir: &str, proto: Option<&str>, port: Option<u16>) -> serde_json::Value {
    json!({"id": id, "direction": dir, "ethertype": "IPv4", "protocol": proto,
           "port_range_min": port, "port_range_max": port})
}

fn port(id: &str, mac: &str, ip: Option<&str>, groups: &[&str]) -> serde_json::Value {
    json!({"id": id, "mac_address": mac, "network_id": NET, "device_owner": "compute:nova",
           "fixed_ips": ip.map(|i| vec![json!({"ip_address": i, "subnet_id": "s"})]).unwrap_or_default(),
           "security_groups": groups, "port_security_enabled": true, "binding:host_id": "compute-1"})
}

fn shot(from: Side, to: Side, frame: Frame) -> Step {
    Step::Send(Shot {
        from,
        to,
        labels: vec![diff::scenario::describe(&frame)],
        frames: vec![frame],
        needs_previous: false,
        datagram: false,
        documented: None,
    })
}

/// (source, destination, source port, destination port)
type Ends<'a> = (&'a str, &'a str, u16, u16);

fn tcp((src, dst, sport, dport): Ends, flags: u8, seq: u32, ack: u32, id: u32) -> IpPacket {
    let mut p = IpPacket::new(
        src.parse().unwrap(),
        dst.parse().unwrap(),
        L4::Tcp {
            sport,
            dport,
            flags,
            seq,
            ack,
        },
    );
    p.ident = id;
    p
}

/// Runs `scenario` on `model` under both back ends; returns (iptables, ebpf) per step.
fn run(model: Model, scenario: Scenario) -> (Vec<diff::Outcome>, Vec<diff::Outcome>) {
    let cfg = Config {
        name: "documented".into(),
        model,
        host: "compute-1".into(),
    };
    let tag = sg_tests::unique("dd");
    let scenarios = vec![scenario];
    let (ipt, ebpf) = diff::run_passes(&cfg, &scenarios, &tag, &|topo, host| {
        let i: Box<dyn Backend> = Box::new(diff::backend::Iptables::new(
            topo,
            host,
            sg_user::iptables::Backend::Nft,
        )?);
        let e: Box<dyn Backend> = Box::new(diff::backend::Ebpf::new(topo, host, &tag)?);
        Ok((i, e))
    })
    .unwrap();
    (ipt.into_iter().next().unwrap(), ebpf.into_iter().next().unwrap())
}

#[test]
fn d12_mixed_network_sg_keeps_each_ports_statefulness() {
    // Port "a…" (stateless, sorts first) and port "b…" (stateful) share a network. Under
    // Neutron the first port's raw rule makes the whole bridge untracked, so B's reply is not
    // ESTABLISHED and B has no ingress rule: dropped. sg tracks B on its own: delivered.
    let doc = json!({
        "security_groups": [
            {"id": "sg-stateless", "stateful": false, "security_group_rules": [rule("l1", "egress", None, None), rule("l2", "ingress", None, None)]},
            {"id": "sg-stateful", "stateful": true, "security_group_rules": [rule("f1", "egress", None, None)]},
        ],
        "address_groups": [],
        "ports": [
            port("aaaaaaaa-0000-4000-8000-000000000001", "fa:16:3e:00:00:0a", Some("10.7.0.10"), &["sg-stateless"]),
            port("bbbbbbbb-0000-4000-8000-000000000002", "fa:16:3e:00:00:0b", Some("10.7.0.11"), &["sg-stateful"]),
        ],
    });
    let m = model::from_values(vec![("d12".into(), doc)]).unwrap();
    let b = "bbbbbbbb-0000-4000-8000-000000000002".to_string();
    let vm_mac = [0xfa, 0x16, 0x3e, 0, 0, 0x0b];
    let steps = vec![
        shot(
            Side::Vm(b.clone()),
            Side::Uplink(NET.into()),
            Frame::ip(
                vm_mac,
                REMOTE_MAC,
                tcp(("10.7.0.11", "203.0.113.9", 40000, 443), TCP_SYN, 1, 0, 1),
            ),
        ),
        shot(
            Side::Uplink(NET.into()),
            Side::Vm(b.clone()),
            Frame::ip(
                REMOTE_MAC,
                vm_mac,
                tcp(
                    ("203.0.113.9", "10.7.0.11", 443, 40000),
                    TCP_SYN | TCP_ACK,
                    9,
                    2,
                    2,
                ),
            ),
        ),
    ];
    let (ipt, ebpf) = run(
        m,
        Scenario {
            name: "d12".into(),
            steps,
        },
    );
    assert_eq!(
        (ipt[0].clone(), ebpf[0].clone()),
        (Some(vec![true]), Some(vec![true])),
        "the SYN leaves in both"
    );
    assert_eq!(
        ipt[1],
        Some(vec![false]),
        "Neutron: the network is untracked, the reply is dropped"
    );
    assert_eq!(
        ebpf[1],
        Some(vec![true]),
        "sg: port B is stateful, its reply is ESTABLISHED"
    );
}

#[test]
fn d13_rule_removed_sg_cuts_a_flow_neutrons_cleanup_misses() {
    // A port without fixed IPs (any source from its MAC) serves tcp 80. The rule goes away
    // mid-flow. Neutron deletes conntrack entries by the port's fixed IPs, of which there are
    // none: the flow lives on in iptables. sg re-checks the flow: it stops.
    let doc = json!({
        "security_groups": [{"id": "sg-web", "stateful": true, "security_group_rules": [
            rule("w80", "ingress", Some("tcp"), Some(80)), rule("e", "egress", None, None)]}],
        "address_groups": [],
        "ports": [port("cccccccc-0000-4000-8000-000000000003", "fa:16:3e:00:00:0c", None, &["sg-web"])],
    });
    let m = model::from_values(vec![("d13".into(), doc)]).unwrap();
    let c = "cccccccc-0000-4000-8000-000000000003".to_string();
    let vm_mac = [0xfa, 0x16, 0x3e, 0, 0, 0x0c];
    let to_vm = |flags, seq, ack, id| {
        shot(
            Side::Uplink(NET.into()),
            Side::Vm(c.clone()),
            Frame::ip(
                REMOTE_MAC,
                vm_mac,
                tcp(("203.0.113.5", "10.9.9.9", 50000, 80), flags, seq, ack, id),
            ),
        )
    };
    let steps = vec![
        to_vm(TCP_SYN, 100, 0, 1),
        shot(
            Side::Vm(c.clone()),
            Side::Uplink(NET.into()),
            Frame::ip(
                vm_mac,
                REMOTE_MAC,
                tcp(
                    ("10.9.9.9", "203.0.113.5", 80, 50000),
                    TCP_SYN | TCP_ACK,
                    500,
                    101,
                    2,
                ),
            ),
        ),
        to_vm(TCP_ACK, 101, 501, 3),
        Step::Change {
            what: "remove w80".into(),
            edit: Edit::RemoveRule {
                group: "sg-web".into(),
                rule: "w80".into(),
            },
        },
        to_vm(TCP_PSH | TCP_ACK, 101, 501, 4),
    ];
    let (ipt, ebpf) = run(
        m,
        Scenario {
            name: "d13".into(),
            steps,
        },
    );
    for i in 0..3 {
        assert_eq!(ipt[i], Some(vec![true]), "handshake step {i} under iptables");
        assert_eq!(ebpf[i], Some(vec![true]), "handshake step {i} under sg");
    }
    assert_eq!(
        ipt[4],
        Some(vec![true]),
        "Neutron: no fixed IP, no conntrack deletion, the flow lives on"
    );
    assert_eq!(
        ebpf[4],
        Some(vec![false]),
        "sg: the only rule allowing the flow is gone"
    );
}
