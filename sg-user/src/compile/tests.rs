//! Compiler unit tests, the WEB1 golden files and determinism.

use std::net::IpAddr;

use serde_json::{Value, json};
use sg_common::*;

use super::*;
use crate::model::{self, Model};

const HOST: &str = "compute-1";

fn example(name: &str) -> Model {
    let path = format!("{}/examples/{name}", env!("CARGO_MANIFEST_DIR"));
    model::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn model_of(doc: Value) -> Model {
    model::from_values(vec![("test.json".into(), doc)]).unwrap_or_else(|e| panic!("{e}"))
}

fn rule(id: &str, extra: Value) -> Value {
    let mut r = json!({"id": id, "direction": "ingress", "ethertype": "IPv4"});
    r.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    r
}

fn port(id: &str, ip: &str, groups: &[&str]) -> Value {
    json!({"id": id, "mac_address": "fa:16:3e:00:00:01", "network_id": "n",
           "fixed_ips": [{"ip_address": ip}], "security_groups": groups})
}

fn pkt(dir: Direction, remote: &str, proto: u8, port: u16) -> Packet {
    Packet {
        dir,
        remote: remote.parse::<IpAddr>().unwrap(),
        proto,
        port,
        sport: 40000,
    }
}

/// The rule id the compiled maps name for a packet on the first local port.
fn compiled_rule(m: &Model, c: &Compiled, p: &Packet) -> Option<String> {
    let lookup = CompiledLookup::new(c).expect("entries load into an LPM trie");
    let policy = c.ports[0].info.policy;
    lookup
        .evaluate(policy, p)
        .rule
        .map(|i| c.rules[i as usize - 1].rule_id.clone())
        .inspect(|id| {
            let sgs = &m.port(&c.ports[0].id).unwrap().security_groups;
            let want = reference_first_rule(m, sgs, p).map(|(_, r)| r.id.clone());
            assert_eq!(
                Some(id.clone()),
                want,
                "compiled and reference disagree for {p:?}"
            );
        })
}

#[track_caller]
fn check_golden(name: &str, actual: &str) {
    let path = format!("{}/src/compile/golden/{name}", env!("CARGO_MANIFEST_DIR"));
    if std::env::var_os("SG_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e} (SG_UPDATE_GOLDEN=1 writes it)"));
    if expected != actual {
        let line = expected
            .lines()
            .zip(actual.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        panic!(
            "{name} differs from the golden file at line {}:\n  golden: {:?}\n  actual: {:?}\n(rerun with SG_UPDATE_GOLDEN=1 to accept)",
            line + 1,
            expected.lines().nth(line),
            actual.lines().nth(line)
        );
    }
}

#[test]
fn golden_web1() {
    let c = compile(&example("web1.json"), HOST);
    check_golden("web1.compiled.json", &render_json(&c));
    check_golden("web1.compiled.txt", &render_table(&c));
}

#[test]
fn golden_web1_default_only() {
    let c = compile(&example("web1-default-only.json"), HOST);
    check_golden("web1-default-only.compiled.json", &render_json(&c));
}

#[test]
fn web1_verdicts() {
    let m = example("web1.json");
    let c = compile(&m, HOST);
    assert_eq!(c.ports.len(), 1);
    let p = &c.ports[0];
    assert_eq!(p.device, "tapadcc4b66-c1");
    assert_eq!(
        p.info.flags,
        PORT_F_FILTERED | PORT_F_STATEFUL | PORT_F_SPOOF_V4 | PORT_F_ARP_PROTECT
    );
    let text = |r: Option<String>| r.map(|id| c.rules.iter().find(|x| x.rule_id == id).unwrap().text.clone());
    let http = compiled_rule(&m, &c, &pkt(Direction::Ingress, "203.0.113.9", 6, 80));
    assert_eq!(text(http).as_deref(), Some("ingress IPv4 tcp 80 from 0.0.0.0/0"));
    assert_eq!(
        compiled_rule(&m, &c, &pkt(Direction::Ingress, "203.0.113.9", 6, 22)),
        None
    );
    // WEB1 is a member of default, so its own address is in the remote group.
    let own = compiled_rule(&m, &c, &pkt(Direction::Ingress, "192.168.206.6", 6, 22));
    assert_eq!(
        text(own).as_deref(),
        Some("ingress IPv4 any from group default (0c2f6d1e-8a3b-4f5c-9d7e-2b1a4c6e8f03)")
    );
    let out = compiled_rule(&m, &c, &pkt(Direction::Egress, "2001:db8::1", 17, 53));
    assert_eq!(text(out).as_deref(), Some("egress IPv6 any to any"));
    // No IPv6 member: the IPv6 remote-group rule matches nothing.
    assert_eq!(
        compiled_rule(&m, &c, &pkt(Direction::Ingress, "2001:db8::1", 6, 80)),
        None
    );
    assert!(compile(&m, "elsewhere").ports.is_empty());
}

#[test]
fn output_is_deterministic() {
    let m = example("web1.json");
    assert_eq!(render_json(&compile(&m, HOST)), render_json(&compile(&m, HOST)));
    // Independent of map iteration order: a model with many selectors and services.
    let rules: Vec<Value> = (0..40)
        .map(|i| rule(&format!("r{i}"), json!({"protocol": "tcp", "port_range_min": 1000 + i * 7, "port_range_max": 1100 + i * 13,
                                              "remote_ip_prefix": format!("10.{}.0.0/{}", i % 5, 8 + i % 17)})))
        .collect();
    let doc = json!({"security_groups": [{"id": "g", "security_group_rules": rules}], "ports": [port("p", "10.0.0.1", &["g"])]});
    let a = render_json(&compile(&model_of(doc.clone()), HOST));
    let b = render_json(&compile(&model_of(doc), HOST));
    assert_eq!(a, b);
}

#[test]
fn port_ranges_become_minimal_aligned_blocks() {
    assert_eq!(
        range_prefixes(1024, 65535),
        [(1024, 6), (2048, 5), (4096, 4), (8192, 3), (16384, 2), (32768, 1)]
    );
    assert_eq!(range_prefixes(80, 80), [(80, 16)]);
    assert_eq!(range_prefixes(1, 65534).len(), 30);
    assert_eq!(range_prefixes(0, 65535), [(0, 0)]);
}

#[test]
fn earlier_broad_rule_wins_over_later_narrow_one() {
    for (first, second, at80, at81) in [("a", "b", "a", "a"), ("b", "a", "b", "a")] {
        let a = rule("a", json!({"protocol": "tcp"}));
        let b = rule(
            "b",
            json!({"protocol": "tcp", "port_range_min": 80, "port_range_max": 80}),
        );
        let rules = if first == "a" { vec![a, b] } else { vec![b, a] };
        let m = model_of(
            json!({"security_groups": [{"id": "g", "rules": rules}], "ports": [port("p", "10.0.0.1", &["g"])]}),
        );
        let c = compile(&m, HOST);
        assert_eq!(
            compiled_rule(&m, &c, &pkt(Direction::Ingress, "1.2.3.4", 6, 80)).as_deref(),
            Some(at80),
            "{first} then {second}"
        );
        assert_eq!(
            compiled_rule(&m, &c, &pkt(Direction::Ingress, "1.2.3.4", 6, 81)).as_deref(),
            Some(at81)
        );
    }
}

#[test]
fn first_rule_follows_chain_order_not_index_order() {
    // Policy 1 indexes g2's rule first; policy 2 puts g1 first in its chain.
    let g1 = json!({"id": "g1", "rules": [rule("r1", json!({}))]});
    let g2 = json!({"id": "g2", "rules": [rule("r2", json!({}))]});
    let ports = [
        port("p1", "10.0.0.1", &["g2"]),
        port("p2", "10.0.0.2", &["g1", "g2"]),
    ];
    let m = model_of(json!({"security_groups": [g1, g2], "ports": ports}));
    let c = compile(&m, HOST);
    let lookup = CompiledLookup::new(&c).unwrap();
    let p2 = c.ports.iter().find(|p| p.id == "p2").unwrap();
    let v = lookup.evaluate(p2.info.policy, &pkt(Direction::Ingress, "1.1.1.1", 6, 1));
    assert_eq!(c.rules[v.rule.unwrap() as usize - 1].rule_id, "r1");
}

#[test]
fn icmp_type_255_is_a_wildcard_for_ipv4_only() {
    let rules = vec![
        rule(
            "v4",
            json!({"protocol": "icmp", "port_range_min": 255, "port_range_max": 3}),
        ),
        rule(
            "v6",
            json!({"ethertype": "IPv6", "protocol": "icmp", "port_range_min": 255}),
        ),
    ];
    let m = model_of(
        json!({"security_groups": [{"id": "g", "rules": rules}], "ports": [port("p", "10.0.0.1", &["g"])]}),
    );
    let c = compile(&m, HOST);
    assert_eq!(
        compiled_rule(&m, &c, &pkt(Direction::Ingress, "1.2.3.4", 1, 8 << 8)).as_deref(),
        Some("v4")
    );
    assert_eq!(
        compiled_rule(&m, &c, &pkt(Direction::Ingress, "::1", 58, 128 << 8)),
        None
    );
    assert_eq!(
        compiled_rule(&m, &c, &pkt(Direction::Ingress, "::1", 58, 255 << 8 | 7)).as_deref(),
        Some("v6")
    );
}

#[test]
fn icmp_type_and_code() {
    let rules = vec![
        rule(
            "echo0",
            json!({"protocol": "icmp", "port_range_min": 8, "port_range_max": 0}),
        ),
        rule("unreach", json!({"protocol": "1", "port_range_min": 3})),
    ];
    let m = model_of(
        json!({"security_groups": [{"id": "g", "rules": rules}], "ports": [port("p", "10.0.0.1", &["g"])]}),
    );
    let c = compile(&m, HOST);
    let r =
        |ty: u16, code: u16| compiled_rule(&m, &c, &pkt(Direction::Ingress, "1.2.3.4", 1, ty << 8 | code));
    assert_eq!(r(8, 0).as_deref(), Some("echo0"));
    assert_eq!(r(8, 1), None);
    assert_eq!(r(3, 13).as_deref(), Some("unreach"));
    assert_eq!(r(0, 0), None);
}

#[test]
fn nested_prefixes_and_remote_groups_classify_by_longest_prefix() {
    let rules = vec![
        rule(
            "wide",
            json!({"protocol": "udp", "remote_ip_prefix": "10.0.0.0/8"}),
        ),
        rule(
            "narrow",
            json!({"protocol": "tcp", "remote_ip_prefix": "10.1.2.0/24"}),
        ),
        rule("grp", json!({"protocol": "icmp", "remote_group_id": "g"})),
    ];
    let member = json!({"id": "m", "mac_address": "fa:16:3e:00:00:02", "network_id": "n", "binding:host_id": "far",
                        "fixed_ips": [{"ip_address": "10.1.2.3"}], "allowed_address_pairs": [{"ip_address": "172.16.0.0/12"}],
                        "security_groups": ["g"]});
    let m = model_of(
        json!({"security_groups": [{"id": "g", "rules": rules}], "ports": [port("p", "192.168.0.1", &["g"]), member]}),
    );
    let c = compile(&m, HOST);
    assert_eq!(c.ports.len(), 1, "the member on another host is not compiled");
    let r = |ip: &str, proto| compiled_rule(&m, &c, &pkt(Direction::Ingress, ip, proto, 1));
    assert_eq!(r("10.1.2.3", 17).as_deref(), Some("wide"));
    assert_eq!(r("10.1.2.3", 6).as_deref(), Some("narrow"));
    assert_eq!(r("10.1.2.3", 1).as_deref(), Some("grp"));
    assert_eq!(r("10.1.2.4", 1), None);
    assert_eq!(
        r("172.20.0.1", 1).as_deref(),
        Some("grp"),
        "allowed-address-pair CIDR of a member"
    );
    assert_eq!(
        r("192.168.0.1", 1).as_deref(),
        Some("grp"),
        "the port itself is a member"
    );
    assert_eq!(r("11.0.0.1", 17), None);
}

#[test]
fn address_group_and_zero_prefix_members() {
    let rules = vec![
        rule("ag", json!({"protocol": "tcp", "remote_address_group_id": "a"})),
        rule("all", json!({"protocol": "udp", "remote_group_id": "g"})),
    ];
    let member = json!({"id": "m", "mac_address": "fa:16:3e:00:00:02", "network_id": "n",
                        "fixed_ips": [{"ip_address": "10.0.0.9"}], "allowed_address_pairs": [{"ip_address": "0.0.0.0/0"}],
                        "security_groups": ["g"]});
    let ag = json!({"id": "a", "addresses": ["198.51.100.0/24", "2001:db8::/32"]});
    let m = model_of(
        json!({"security_groups": [{"id": "g", "rules": rules}], "address_groups": [ag],
                            "ports": [port("p", "10.0.0.1", &["g"]), member]}),
    );
    let c = compile(&m, HOST);
    let ports = c
        .ports
        .iter()
        .map(|p| (p.id.as_str(), p.info.flags & PORT_F_ARP_PROTECT))
        .collect::<Vec<_>>();
    assert!(ports.contains(&("m", 0)), "a /0 pair turns ARP protection off");
    assert!(ports.contains(&("p", PORT_F_ARP_PROTECT)));
    let r = |ip: &str, proto| compiled_rule(&m, &c, &pkt(Direction::Ingress, ip, proto, 1));
    assert_eq!(r("198.51.100.7", 6).as_deref(), Some("ag"));
    assert_eq!(r("198.51.101.7", 6), None);
    assert_eq!(
        r("8.8.8.8", 17).as_deref(),
        Some("all"),
        "a /0 member admits everything"
    );
}

#[test]
fn policies_are_shared_by_ports_with_the_same_group_list() {
    let groups = json!([{"id": "a", "rules": [rule("ra", json!({}))]}, {"id": "b", "rules": [rule("rb", json!({"direction": "egress"}))]}]);
    let ports = [
        port("p1", "10.0.0.1", &["a", "b"]),
        port("p2", "10.0.0.2", &["a", "b"]),
        port("p3", "10.0.0.3", &["b", "a"]),
    ];
    let c = compile(
        &model_of(json!({"security_groups": groups, "ports": ports})),
        HOST,
    );
    let policy = |id: &str| c.ports.iter().find(|p| p.id == id).unwrap().info.policy;
    assert_eq!(policy("p1"), policy("p2"));
    assert_ne!(policy("p1"), policy("p3"));
    assert_eq!(c.policies.len(), 2);
    assert_eq!(
        c.rules.len(),
        2,
        "rule indexes are per rule, shared across policies"
    );
    let addr_ids: Vec<u32> = c.ports.iter().map(|p| p.info.addr_id).collect();
    assert_eq!(addr_ids, [1, 2, 3]);
}

#[test]
fn port_flags_and_addresses() {
    let p = json!({"id": "p", "mac_address": "fa:16:3e:12:34:56", "network_id": "n",
                   "fixed_ips": [{"ip_address": "10.0.0.5"}, {"ip_address": "2001:db8::5"}],
                   "allowed_address_pairs": [{"ip_address": "10.0.0.100"}, {"ip_address": "10.0.0.5", "mac_address": "fa:16:3e:12:34:56"},
                                             {"ip_address": "10.1.0.7/16", "mac_address": "fa:16:3e:00:00:99"}],
                   "security_groups": []});
    let c = compile(&model_of(json!({"ports": [p]})), HOST);
    let port = &c.ports[0];
    assert_eq!(
        port.info.flags,
        PORT_F_FILTERED
            | PORT_F_STATEFUL
            | PORT_F_SPOOF_V4
            | PORT_F_SPOOF_V6
            | PORT_F_V6_FIXED
            | PORT_F_ARP_PROTECT
    );
    assert_eq!(port.info.mac, [0xfa, 0x16, 0x3e, 0x12, 0x34, 0x56]);
    let mut lpm = lpm::Lpm::new(size_of::<AddrKey>());
    for e in &port.addrs {
        lpm.insert_pod(e.prefix_len, &e.key, e.value.index).unwrap();
        assert_eq!(e.key.addr_id, port.info.addr_id);
    }
    let key = |kind, mac: [u8; 6], ip: &str| AddrKey {
        addr_id: port.info.addr_id,
        kind,
        _pad: 0,
        mac,
        addr: addr::ip_key(ip.parse().unwrap()),
    };
    let pm = port.info.mac;
    let other = [0xfa, 0x16, 0x3e, 0, 0, 0x99];
    // Pair positions in Neutron's IPv4 list: AAP .100, AAP .5, AAP 10.1/16, fixed .5 (same as 2).
    assert_eq!(
        lpm.lookup_pod(&key(ADDR_KIND_PAIR_V4, pm, "10.0.0.100"))
            .map(|x| *x.1),
        Some(1)
    );
    assert_eq!(
        lpm.lookup_pod(&key(ADDR_KIND_PAIR_V4, pm, "10.0.0.5"))
            .map(|x| *x.1),
        Some(2)
    );
    assert_eq!(
        lpm.lookup_pod(&key(ADDR_KIND_PAIR_V4, other, "10.1.255.1"))
            .map(|x| *x.1),
        Some(3)
    );
    assert_eq!(
        lpm.lookup_pod(&key(ADDR_KIND_PAIR_V4, pm, "10.1.255.1")),
        None,
        "pair MAC must match"
    );
    assert_eq!(
        lpm.lookup_pod(&key(ADDR_KIND_PAIR_V6, pm, "fe80::f816:3eff:fe12:3456"))
            .map(|x| *x.1),
        Some(2)
    );
    assert!(
        lpm.lookup_pod(&key(ADDR_KIND_PAIR_V6, other, "fe80::f816:3eff:fe00:99"))
            .is_none(),
        "IPv4 pairs add no link-local"
    );
    assert!(lpm.lookup_pod(&key(ADDR_KIND_MAC, other, "0.0.0.0")).is_some());
    assert!(
        lpm.lookup_pod(&key(ADDR_KIND_FIXED_V6, [0; 6], "2001:db8::5"))
            .is_some()
    );
    assert!(
        lpm.lookup_pod(&key(ADDR_KIND_FIXED_V4, [0; 6], "10.0.0.100"))
            .is_none()
    );
}

#[test]
fn mac_only_pair_and_missing_families() {
    let p = json!({"id": "p", "mac_address": "fa:16:3e:12:34:56", "network_id": "n", "fixed_ips": []});
    let q = json!({"id": "q", "mac_address": "fa:16:3e:12:34:57", "network_id": "n", "fixed_ips": [{"ip_address": "10.0.0.1"}]});
    let c = compile(&model_of(json!({"ports": [p, q]})), HOST);
    let flags = |id: &str| c.ports.iter().find(|x| x.id == id).unwrap().info.flags;
    assert_ne!(flags("p") & PORT_F_SPOOF_V6, 0, "MAC-only pair in both families");
    assert_eq!(
        flags("q") & (PORT_F_SPOOF_V6 | PORT_F_V6_FIXED),
        0,
        "an IPv4-only port gets no IPv6 source check"
    );
    let p = &c.ports.iter().find(|x| x.id == "p").unwrap();
    let mac_only: Vec<_> = p
        .addrs
        .iter()
        .filter(|e| e.key.kind == ADDR_KIND_PAIR_V4)
        .collect();
    assert_eq!(mac_only.len(), 1);
    assert_eq!(mac_only[0].prefix_len, ADDR_KEY_FIXED_BITS);
    // No IPv4 address, so nothing to announce: Neutron drops all ARP from such a port.
    assert!(
        p.addrs.iter().all(|e| e.key.kind != ADDR_KIND_ARP_V4),
        "a port without fixed IPs has no ARP sender"
    );
    let q = &c.ports.iter().find(|x| x.id == "q").unwrap();
    let arp: Vec<_> = q
        .addrs
        .iter()
        .filter(|e| e.key.kind == ADDR_KIND_ARP_V4)
        .map(|e| (e.key.addr[..4].to_vec(), e.prefix_len - ADDR_KEY_FIXED_BITS))
        .collect();
    assert_eq!(
        arp,
        vec![(vec![10, 0, 0, 1], 32), (vec![0, 0, 0, 0], 32)],
        "its address and probes"
    );
}

#[test]
fn unfiltered_ports_get_an_empty_entry() {
    let off = json!({"id": "p", "mac_address": "fa:16:3e:12:34:56", "network_id": "n", "port_security_enabled": false});
    let dhcp = json!({"id": "q", "mac_address": "fa:16:3e:12:34:57", "network_id": "n", "device_owner": "network:dhcp"});
    let c = compile(&model_of(json!({"ports": [off, dhcp]})), HOST);
    assert_eq!(c.ports.len(), 2);
    for p in &c.ports {
        assert_eq!((p.info.policy, p.info.addr_id, p.info.flags), (0, 0, 0));
        assert!(p.addrs.is_empty());
    }
    assert!(c.policies.is_empty());
}

#[test]
fn stateless_groups_clear_the_stateful_flag() {
    let g = json!({"id": "g", "stateful": false, "rules": [rule("r", json!({}))]});
    let c = compile(
        &model_of(json!({"security_groups": [g], "ports": [port("p", "10.0.0.1", &["g"])]})),
        HOST,
    );
    assert_eq!(c.ports[0].info.flags & PORT_F_STATEFUL, 0);
}

#[test]
fn keys_are_masked_and_stats_count_bytes() {
    let c = compile(&example("web1.json"), HOST);
    assert!(CompiledLookup::new(&c).is_ok());
    assert_eq!(
        c.stats.classes.entries,
        c.policies.iter().map(|p| p.classes.len()).sum::<usize>()
    );
    assert_eq!(c.stats.services.bytes, c.stats.services.entries * (4 + 16 + 4));
    assert_eq!(c.stats.ports.bytes, 28);
}

#[test]
fn source_port_rules_go_to_their_own_map_and_answer_after_the_others() {
    let m = model_of(json!({
        "security_groups": {"sg": [
            {"direction": "egress", "ethertype": "IPv4", "protocol": "tcp",
             "source_port_range_min": 12345, "source_port_range_max": 12346},
            {"direction": "egress", "ethertype": "IPv4", "protocol": "tcp", "port_range_min": 22,
             "port_range_max": 22, "source_port_range_min": 42, "source_port_range_max": 42},
            {"direction": "egress", "ethertype": "IPv4", "protocol": "tcp", "port_range_min": 80,
             "port_range_max": 80},
        ]},
        "devices": {"tap1": {"device": "tap1", "mac_address": "fa:16:3e:00:00:01", "network_id": "n",
                             "fixed_ips": ["10.0.0.5"], "security_groups": ["sg"]}},
    }));
    let c = compile(&m, HOST);
    assert_ne!(c.ports[0].info.flags & PORT_F_SRC_PORTS, 0);
    let pol = &c.policies[0];
    // sport 12345-12346 is two exact ports (any destination); sport 42 to 22 is one pair.
    assert_eq!(pol.src_ports.len(), 3, "{:?}", pol.src_ports);
    assert!(
        pol.src_ports
            .iter()
            .any(|e| e.prefix_len == SRC_PORT_KEY_FULL_BITS
                && u16::from_be_bytes(e.key.sport_be) == 42
                && u16::from_be_bytes(e.key.dport_be) == 22)
    );
    let rule_of = |sport: u16, port: u16| {
        let mut p = pkt(Direction::Egress, "10.9.9.9", 6, port);
        p.sport = sport;
        compiled_rule(&m, &c, &p)
    };
    let first = m.security_groups[0].rules[0].id.clone();
    let second = m.security_groups[0].rules[1].id.clone();
    let third = m.security_groups[0].rules[2].id.clone();
    assert_eq!(rule_of(12345, 9), Some(first.clone()));
    assert_eq!(rule_of(12346, 65535), Some(first.clone()));
    assert_eq!(rule_of(12347, 9), None);
    assert_eq!(rule_of(12344, 9), None);
    assert_eq!(rule_of(42, 22), Some(second));
    assert_eq!(rule_of(42, 23), None);
    assert_eq!(rule_of(43, 22), None);
    // Both the first rule and the third admit it: the one without source ports is named.
    assert_eq!(rule_of(12345, 80), Some(third));
    // A port whose rules have no source ports does not look there.
    let plain = compile(&example("web1.json"), HOST);
    assert_eq!(plain.ports[0].info.flags & PORT_F_SRC_PORTS, 0);
    assert!(plain.policies.iter().all(|p| p.src_ports.is_empty()));
}
