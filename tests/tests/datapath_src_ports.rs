//! BPF_PROG_TEST_RUN cases for rules with source ports (SG_SRC_PORTS): the maps are what the
//! real compiler makes of an agent RPC-shaped input, written as the agent writes them. The
//! port under test is ifindex 1 (loopback), as in datapath_cases.rs.

use aya::maps::lpm_trie::Key;
use serde_json::{Value, json};
use sg_common::*;
use sg_tests::dp::*;
use sg_user::{
    compile::{self, Compiled},
    datapath::{Datapath, LoadOptions},
    model,
    packet::{TCP_ACK, TCP_PSH, TCP_SYN},
};

const IF: u32 = 1;
const PORT: u32 = 7;

/// The port of sg_tests::dp (VM4, VM_MAC) in groups whose rules are `rules`.
fn compiled(rules: Value) -> Compiled {
    let mac = sg_user::model::MacAddr(VM_MAC).to_string();
    let m = model::from_values(vec![(
        "rpc.json".into(),
        json!({
            "devices": {"tap1": {"device": "tap1", "mac_address": mac, "network_id": "n",
                                 "fixed_ips": [VM4], "security_groups": ["sg"]}},
            "security_groups": {"sg": rules},
        }),
    )])
    .unwrap_or_else(|e| panic!("{e}"));
    compile::compile(&m, "any")
}

/// Writes policy 1 of `c` under `policy`, and (when `switch`) points the port at it.
fn install(dp: &mut Datapath, c: &Compiled, policy: u32, switch: bool) {
    let p = &c.policies[0];
    for e in &p.classes {
        let key = ClassKey { policy, ..e.key };
        dp.classes()
            .unwrap()
            .insert(&Key::new(e.prefix_len, key), e.value, 0)
            .unwrap();
    }
    for e in &p.services {
        let key = ServiceKey { policy, ..e.key };
        dp.services()
            .unwrap()
            .insert(&Key::new(e.prefix_len, key), e.value, 0)
            .unwrap();
    }
    for e in &p.src_ports {
        let key = SrcPortKey { policy, ..e.key };
        dp.src_ports()
            .unwrap()
            .insert(&Key::new(e.prefix_len, key), e.value, 0)
            .unwrap();
    }
    let port = &c.ports[0];
    for e in &port.addrs {
        let key = AddrKey {
            addr_id: PORT,
            ..e.key
        };
        dp.addrs()
            .unwrap()
            .insert(&Key::new(e.prefix_len, key), e.value, 0)
            .unwrap();
    }
    if switch {
        // A new content gets a new revision from the applier (what makes flows be re-checked).
        let info = PortInfo {
            policy,
            rev: policy,
            addr_id: PORT,
            port_idx: PORT,
            ..port.info
        };
        dp.ports().unwrap().insert(IF, info, 0).unwrap();
    }
}

fn rule_index(c: &Compiled, text: &str) -> u32 {
    c.rules
        .iter()
        .find(|r| r.text == text)
        .unwrap_or_else(|| panic!("no rule {text:?} in {:?}", c.rules))
        .index
}

#[test]
fn source_port_rules_admit_exactly_their_source_ports() {
    // Neutron's functional test_connection_with_source_port_range and test_next_port_closed,
    // as frames.
    let c = compiled(json!([
        {"direction": "egress", "ethertype": "IPv4", "protocol": "tcp",
         "source_port_range_min": 12345, "source_port_range_max": 12346},
        {"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
         "source_port_range_min": 42, "source_port_range_max": 42},
        {"direction": "ingress", "ethertype": "IPv4", "protocol": "udp", "port_range_min": 53,
         "port_range_max": 53, "source_port_range_min": 5353, "source_port_range_max": 5353},
    ]));
    assert_ne!(c.ports[0].info.flags & PORT_F_SRC_PORTS, 0);
    let out_rule = rule_index(&c, "egress IPv4 tcp sport 12345-12346 to any");
    let in_rule = rule_index(&c, "ingress IPv4 tcp sport 42 from any");
    let dns_rule = rule_index(&c, "ingress IPv4 udp sport 5353 53 from any");
    let mut dp = Datapath::load(&LoadOptions::default()).expect("load the datapath");
    install(&mut dp, &c, 1, true);
    let out = |sport| from_vm(tcp(VM4, sport, REMOTE4, 9000, TCP_SYN));
    let inb = |sport| to_vm(tcp(REMOTE4, sport, VM4, 9000, TCP_SYN));
    let cases = [
        out_ok("sport 12345", out(12345), REASON_ALLOW_RULE).rule(out_rule),
        out_ok("sport 12346", out(12346), REASON_ALLOW_RULE).rule(out_rule),
        out_drop("sport 12344", out(12344), REASON_DROP_NO_RULE),
        out_drop("sport 12347", out(12347), REASON_DROP_NO_RULE),
        in_ok("in from sport 42", inb(42), REASON_ALLOW_RULE).rule(in_rule),
        in_drop("in from sport 43", inb(43), REASON_DROP_NO_RULE),
        in_drop("in from sport 41", inb(41), REASON_DROP_NO_RULE),
        in_ok(
            "udp 5353 -> 53",
            to_vm(udp(REMOTE4, 5353, VM4, 53)),
            REASON_ALLOW_RULE,
        )
        .rule(dns_rule),
        in_drop(
            "udp 5353 -> 54",
            to_vm(udp(REMOTE4, 5353, VM4, 54)),
            REASON_DROP_NO_RULE,
        ),
        in_drop(
            "udp 5354 -> 53",
            to_vm(udp(REMOTE4, 5354, VM4, 53)),
            REASON_DROP_NO_RULE,
        ),
        in_drop(
            "tcp 42 -> 53: not udp",
            to_vm(tcp(REMOTE4, 5353, VM4, 53, TCP_SYN)),
            REASON_DROP_NO_RULE,
        ),
    ];
    run(&mut dp, IF, &cases, true);
}

#[test]
fn a_flow_admitted_by_a_source_port_rule_is_rechecked_by_its_source_port() {
    let with_rule = compiled(json!([
        {"direction": "egress", "ethertype": "IPv4", "protocol": "tcp",
         "source_port_range_min": 12345, "source_port_range_max": 12346},
        {"direction": "egress", "ethertype": "IPv4", "protocol": "udp"},
    ]));
    let mut dp = Datapath::load(&LoadOptions::default()).expect("load the datapath");
    install(&mut dp, &with_rule, 1, true);
    let out = |flags| from_vm(tcp(VM4, 12345, REMOTE4, 9000, flags));
    let back = |flags| to_vm(tcp(REMOTE4, 9000, VM4, 12345, flags));
    let open = [
        out_ok("SYN", out(TCP_SYN), REASON_ALLOW_RULE),
        in_ok("SYN-ACK", back(TCP_SYN | TCP_ACK), REASON_ALLOW_ESTABLISHED),
        out_ok("ACK", out(TCP_ACK), REASON_ALLOW_ESTABLISHED),
    ];
    run(&mut dp, IF, &open, false);

    // The same rule under a new policy id: the re-check finds it by the flow's source port.
    install(&mut dp, &with_rule, 2, true);
    run(
        &mut dp,
        IF,
        &[in_ok(
            "data after an unrelated switch",
            back(TCP_PSH | TCP_ACK),
            REASON_ALLOW_ESTABLISHED,
        )],
        false,
    );

    // The rule is gone: the flow stops (Neutron's functional test_established_connection_is_cut).
    let without = compiled(json!([{"direction": "egress", "ethertype": "IPv4", "protocol": "udp"}]));
    install(&mut dp, &without, 3, true);
    run(
        &mut dp,
        IF,
        &[in_drop(
            "data after the rule went: the revoked flow's reply",
            back(TCP_PSH | TCP_ACK),
            REASON_DROP_REVOKED,
        )],
        false,
    );
}
