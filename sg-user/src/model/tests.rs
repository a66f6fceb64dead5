//! Input shapes, normalisation, membership and one test per class of validation error.

use serde_json::{Value, json};

use super::*;

const SG: &str = "5e2b6c4d-1a2b-4c3d-8e9f-0a1b2c3d4e5f";
const SG2: &str = "6f3c7d5e-2b3c-4d4e-9f0a-1b2c3d4e5f60";
const PORT: &str = "7f7c1a9b-4412-4b3b-8a3c-2f1f9f3f0c11";
const NET: &str = "3e1d5c6a-b21f-4c1e-9a7d-5f0e2a1b9c33";

fn rule(id: &str, extra: Value) -> Value {
    let mut r = json!({"id": id, "direction": "ingress", "ethertype": "IPv4"});
    r.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    r
}

fn sg(id: &str, rules: Vec<Value>) -> Value {
    json!({"id": id, "name": "g", "stateful": true, "security_group_rules": rules})
}

fn port(id: &str, extra: Value) -> Value {
    let mut p = json!({
        "id": id, "mac_address": "fa:16:3e:12:34:56", "network_id": NET,
        "fixed_ips": [{"ip_address": "10.0.0.5", "subnet_id": "s"}], "security_groups": [SG],
    });
    p.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    p
}

fn load_doc(doc: Value) -> Result<Model, ValidationErrors> {
    from_values(vec![("test.json".to_string(), doc)])
}

fn one_rule(extra: Value) -> Result<Model, ValidationErrors> {
    load_doc(json!({"security_groups": [sg(SG, vec![rule("r1", extra)])]}))
}

/// Asserts that some error names this object id, field, value (JSON text) and reason part.
#[track_caller]
fn assert_err(res: Result<Model, ValidationErrors>, id: &str, field: &str, value: &str, reason: &str) {
    let errs = res.expect_err("input should be refused");
    let line = errs
        .iter()
        .find(|e| e.id == id && e.field == field)
        .unwrap_or_else(|| panic!("no error for {id} {field}; got:\n{errs}"));
    assert_eq!(line.value, value, "{line}");
    assert!(
        line.reason.contains(reason),
        "reason {:?} lacks {reason:?}",
        line.reason
    );
    let text = line.to_string();
    for part in [id, field, value] {
        assert!(text.contains(part), "{text:?} lacks {part:?}");
    }
}

fn only_rule(m: &Model) -> &Rule {
    &m.security_groups[0].rules[0]
}

// ------------------------------------------------------------------------------------------
// Shapes
// ------------------------------------------------------------------------------------------

#[test]
fn reference_examples_load() {
    for f in ["web1.json", "web1-default-only.json"] {
        let path = format!("{}/examples/{f}", env!("CARGO_MANIFEST_DIR"));
        let m = load(&path).unwrap_or_else(|e| panic!("{f}: {e}"));
        let p = m.port("adcc4b66-c1e2-4b9a-9d3f-5a7c2e8b1f04").unwrap();
        assert_eq!(p.device, "tapadcc4b66-c1");
        assert_eq!(p.binding_host_id.as_deref(), Some("compute-1"));
        assert_eq!(p.fixed_ip_strings(), ["192.168.206.6"]);
    }
}

#[test]
fn rest_and_cli_shapes_are_accepted() {
    let cli_sg = json!({
        "id": SG, "name": "default", "stateful": true, "created_at": "x", "tags": [],
        "rules": [{"id": "r1", "direction": "egress", "ethertype": "IPv4", "protocol": null,
                   "port_range_min": null, "port_range_max": null, "remote_ip_prefix": null,
                   "remote_group_id": null, "remote_address_group_id": null, "normalized_cidr": null,
                   "security_group_id": SG, "tenant_id": "t"}],
    });
    let cli_port = json!({
        "id": PORT, "mac_address": "fa:16:3e:12:34:56", "network_id": NET,
        "fixed_ips": [{"subnet_id": "s", "ip_address": "10.0.0.5"}],
        "security_group_ids": [SG], "binding_host_id": "compute-2", "binding_vif_type": "bridge",
    });
    let cli_ag = json!({"id": "ag1", "name": "x", "addresses": ["10.1.0.0/16"], "project_id": "p"});
    let docs = vec![
        (
            "a.json".to_string(),
            json!({"security_group": {"id": SG2, "name": "w", "security_group_rules": []}}),
        ),
        ("b.json".to_string(), cli_sg),
        ("c.json".to_string(), cli_port),
        ("d.json".to_string(), cli_ag),
        (
            "e.json".to_string(),
            json!({"address_group": {"id": "ag2", "addresses": []}}),
        ),
        (
            "f.json".to_string(),
            json!({"port": port("p2", json!({"binding:host_id": ""}))}),
        ),
        (
            "g.json".to_string(),
            json!({"ports": [port("p3", json!({}))], "address_groups": []}),
        ),
        (
            "h.json".to_string(),
            json!([{"id": "ag3", "addresses": ["::/0"]}]),
        ),
    ];
    let m = from_values(docs).unwrap();
    assert_eq!(m.security_groups.len(), 2);
    assert_eq!(m.address_groups.len(), 3);
    assert_eq!(m.ports.len(), 3);
    let p = m.port(PORT).unwrap();
    assert_eq!(p.security_groups, [SG]);
    assert_eq!(p.binding_host_id.as_deref(), Some("compute-2"));
    assert!(!p.is_local("compute-1"));
    assert!(
        m.port("p2").unwrap().is_local("anything"),
        "empty binding host counts as local"
    );
    assert_eq!(m.security_group(SG).unwrap().rules.len(), 1);
}

#[test]
fn directory_is_the_union_of_its_json_files_in_name_order() {
    let dir = std::env::temp_dir().join(format!("sg-model-dir-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("b.json"),
        json!({"port": port(PORT, json!({}))}).to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.join("a.json"),
        json!({"security_group": sg(SG, vec![])}).to_string(),
    )
    .unwrap();
    std::fs::write(dir.join("c.txt"), "not json").unwrap();
    std::fs::write(
        dir.join("c.json"),
        json!({"security_group": sg(SG2, vec![])}).to_string(),
    )
    .unwrap();
    let m = load(&dir).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(
        m.security_groups
            .iter()
            .map(|s| s.id.as_str())
            .collect::<Vec<_>>(),
        [SG, SG2]
    );
    assert_eq!(m.ports.len(), 1);
}

// ------------------------------------------------------------------------------------------
// Normalisation
// ------------------------------------------------------------------------------------------

#[test]
fn protocols_are_stored_as_neutron_stores_them() {
    let cases = [
        (json!({"protocol": "any"}), "IPv4", None, None),
        (json!({"protocol": "TCP"}), "IPv4", Some("tcp"), Some(6)),
        (json!({"protocol": 17}), "IPv4", Some("17"), Some(17)),
        (json!({"protocol": "icmp"}), "IPv6", Some("ipv6-icmp"), Some(58)),
        (json!({"protocol": "icmpv6"}), "IPv6", Some("ipv6-icmp"), Some(58)),
        (json!({"protocol": "1"}), "IPv6", Some("58"), Some(58)),
        (json!({"protocol": 1}), "IPv4", Some("1"), Some(1)),
        (json!({"protocol": "0"}), "IPv4", Some("0"), None),
        (json!({"protocol": "hopopt"}), "IPv4", Some("hopopt"), None),
        (json!({"protocol": "vrrp"}), "IPv4", Some("vrrp"), Some(112)),
    ];
    for (extra, eth, stored, num) in cases {
        let mut extra = extra;
        extra["ethertype"] = json!(eth);
        let m = one_rule(extra.clone()).unwrap_or_else(|e| panic!("{extra}: {e}"));
        let r = only_rule(&m);
        assert_eq!(r.protocol.as_deref(), stored, "{extra}");
        assert_eq!(r.proto_num, num, "{extra}");
    }
}

#[test]
fn full_port_range_is_no_port_match() {
    let m = one_rule(json!({"protocol": "tcp", "port_range_min": 1, "port_range_max": "65535"})).unwrap();
    assert_eq!(
        (only_rule(&m).port_range_min, only_rule(&m).port_range_max),
        (None, None)
    );
    let m = one_rule(json!({"protocol": "tcp", "port_range_min": "80", "port_range_max": 80})).unwrap();
    assert_eq!(
        (only_rule(&m).port_range_min, only_rule(&m).port_range_max),
        (Some(80), Some(80))
    );
}

#[test]
fn prefixes_keep_host_bits_and_gain_a_length() {
    let m = one_rule(json!({"remote_ip_prefix": "10.0.0.5/24"})).unwrap();
    let r = only_rule(&m);
    assert_eq!(r.remote_ip_prefix.as_deref(), Some("10.0.0.5/24"));
    assert_eq!(r.normalized_cidr.as_deref(), Some("10.0.0.0/24"));
    let m = one_rule(json!({"remote_ip_prefix": "2001:DB8::1", "ethertype": "ipv6"})).unwrap();
    let r = only_rule(&m);
    assert_eq!(r.ethertype, Ethertype::IPv6);
    assert_eq!(r.remote_ip_prefix.as_deref(), Some("2001:db8::1/128"));
    let m = one_rule(json!({"remote_ip_prefix": ""})).unwrap();
    assert_eq!(only_rule(&m).remote, Remote::Any);
}

#[test]
fn rules_carry_their_groups_stateful_flag() {
    let mut g = sg(SG, vec![rule("r1", json!({}))]);
    g["stateful"] = json!(false);
    let m = load_doc(json!({"security_groups": [g]})).unwrap();
    assert!(!only_rule(&m).stateful);
}

#[test]
fn port_defaults_follow_the_api() {
    let p = json!({"id": PORT, "mac_address": "FA-16-3E-12-34-56", "network_id": NET,
                   "allowed_address_pairs": [{"ip_address": "10.0.0.100"},
                                             {"ip_address": "10.0.9.0/24", "mac_address": "fa:16:3e:00:00:01"}]});
    let m = load_doc(json!({"ports": [p]})).unwrap();
    let p = &m.ports[0];
    assert_eq!(p.device, "tap7f7c1a9b-44");
    assert!(p.port_security_enabled && p.is_filtered());
    assert_eq!(p.mac.to_string(), "fa:16:3e:12:34:56");
    assert_eq!(p.mac_address, "FA-16-3E-12-34-56");
    assert_eq!(
        p.allowed_address_pairs[0].mac_address, "FA-16-3E-12-34-56",
        "missing pair MAC is the port MAC"
    );
    assert_eq!(p.allowed_address_pairs[0].mac, p.mac);
    assert_eq!(p.allowed_address_pairs[1].mac.to_string(), "fa:16:3e:00:00:01");
    assert!(p.binding_host_id.is_none() && p.is_local("h"));
}

#[test]
fn trusted_and_unsecured_ports_are_not_filtered() {
    let dhcp = port(
        "p1",
        json!({"device_owner": "network:dhcp", "security_groups": []}),
    );
    let off = port(
        "p2",
        json!({"port_security_enabled": false, "security_groups": []}),
    );
    let lb = port("p3", json!({"device_owner": "neutron:LOADBALANCERV2"}));
    let m = load_doc(json!({"security_groups": [sg(SG, vec![])], "ports": [dhcp, off, lb]})).unwrap();
    assert!(!m.port("p1").unwrap().is_filtered());
    assert!(!m.port("p2").unwrap().is_filtered());
    assert!(m.port("p3").unwrap().is_filtered());
}

#[test]
fn spoof_pairs_follow_neutron_order() {
    // The spec's §12 example port, plus an IPv6 pair with another MAC.
    let p = port(
        PORT,
        json!({"fixed_ips": [{"ip_address": "10.0.0.5"}, {"ip_address": "2001:db8::5"}],
               "allowed_address_pairs": [{"ip_address": "10.0.0.100", "mac_address": "fa:16:3e:12:34:56"},
                                         {"ip_address": "2001:db8::/64", "mac_address": "fa:16:3e:00:00:01"}]}),
    );
    let m = load_doc(json!({"security_groups": [sg(SG, vec![])], "ports": [p]})).unwrap();
    let p = &m.ports[0];
    let text = |e| {
        p.spoof_pairs(e)
            .into_iter()
            .map(|x| format!("{} {}", x.mac.to_upper(), x.ip.unwrap()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        text(Ethertype::IPv4),
        ["FA:16:3E:12:34:56 10.0.0.100", "FA:16:3E:12:34:56 10.0.0.5"]
    );
    assert_eq!(
        text(Ethertype::IPv6),
        [
            "FA:16:3E:00:00:01 2001:db8::/64",
            "FA:16:3E:00:00:01 fe80::f816:3eff:fe00:1",
            "FA:16:3E:12:34:56 2001:db8::5",
            "FA:16:3E:12:34:56 fe80::f816:3eff:fe12:3456",
        ]
    );
}

#[test]
fn port_without_fixed_ips_gets_a_mac_only_pair_in_both_families() {
    let m = load_doc(
        json!({"security_groups": [sg(SG, vec![])], "ports": [port(PORT, json!({"fixed_ips": []}))]}),
    )
    .unwrap();
    for e in Ethertype::ALL {
        let pairs = m.ports[0].spoof_pairs(e);
        assert_eq!(pairs.len(), 1);
        assert!(pairs[0].ip.is_none());
    }
}

#[test]
fn members_are_fixed_ips_and_pairs_per_ethertype() {
    let rules = vec![
        rule("r4", json!({"remote_group_id": SG})),
        rule("r6", json!({"remote_group_id": SG, "ethertype": "IPv6"})),
        rule("ra", json!({"remote_address_group_id": "ag"})),
    ];
    let a = port(
        "pa",
        json!({"fixed_ips": [{"ip_address": "10.0.0.5"}, {"ip_address": "2001:db8::5"}],
                             "allowed_address_pairs": [{"ip_address": "0.0.0.0/0"}, {"ip_address": "10.0.0.5"}]}),
    );
    let b = port(
        "pb",
        json!({"binding:host_id": "elsewhere", "fixed_ips": [{"ip_address": "10.0.0.6"}]}),
    );
    let c = port(
        "pc",
        json!({"fixed_ips": [], "allowed_address_pairs": [{"ip_address": "10.9.9.9"}]}),
    );
    let ag = json!({"id": "ag", "addresses": ["10.1.2.3/16", "2001:db8::/32", "10.1.0.0/16"]});
    let m = load_doc(json!({"security_groups": [sg(SG, rules)], "address_groups": [ag], "ports": [b, c, a]}))
        .unwrap();
    let show = |r: Remote, e| {
        m.members(&r, e)
            .unwrap()
            .iter()
            .map(|x| format!("{}{}", x.ip, if x.mac.is_some() { "+mac" } else { "" }))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        show(Remote::Group(SG.into()), Ethertype::IPv4),
        ["10.0.0.5", "0.0.0.0/0+mac", "10.0.0.5+mac", "10.0.0.6"]
    );
    assert_eq!(show(Remote::Group(SG.into()), Ethertype::IPv6), ["2001:db8::5"]);
    assert_eq!(
        show(Remote::AddressGroup("ag".into()), Ethertype::IPv4),
        ["10.1.0.0/16"]
    );
    assert!(
        m.members(&Remote::AddressGroup("ag".into()), Ethertype::IPv6)
            .is_none(),
        "no IPv6 rule references it"
    );
    assert_eq!(
        m.address_group("ag").unwrap().addresses,
        ["10.1.0.0/16", "2001:db8::/32"]
    );
}

#[test]
fn statefulness_follows_the_first_rule_of_the_first_group() {
    let mut empty_stateless = sg(SG, vec![]);
    empty_stateless["stateful"] = json!(false);
    let mut stateless = sg(SG2, vec![rule("r1", json!({}))]);
    stateless["stateful"] = json!(false);
    let m = load_doc(json!({"security_groups": [empty_stateless, stateless],
                            "ports": [port("p1", json!({"security_groups": [SG, SG2]})),
                                      port("p2", json!({"security_groups": [SG2, SG]})),
                                      port("p3", json!({"security_groups": []}))]}))
    .unwrap();
    assert!(
        m.port_stateful(m.port("p1").unwrap()),
        "first group empty: iptables keeps conntrack"
    );
    assert!(!m.port_stateful(m.port("p2").unwrap()));
    assert!(m.port_stateful(m.port("p3").unwrap()));
}

// ------------------------------------------------------------------------------------------
// One test per class of validation error
// ------------------------------------------------------------------------------------------

#[test]
fn err_protocol_unknown_name() {
    assert_err(
        one_rule(json!({"protocol": "foo"})),
        "r1",
        "protocol",
        "\"foo\"",
        "not supported",
    );
}

#[test]
fn err_protocol_number_out_of_range() {
    assert_err(
        one_rule(json!({"protocol": 256})),
        "r1",
        "protocol",
        "256",
        "0 to 255",
    );
    assert_err(
        one_rule(json!({"protocol": ""})),
        "r1",
        "protocol",
        "\"\"",
        "not supported",
    );
}

#[test]
fn err_protocol_ipv6_only_on_ipv4() {
    assert_err(
        one_rule(json!({"protocol": "ipv6-icmp"})),
        "r1",
        "protocol",
        "\"ipv6-icmp\"",
        "ethertype IPv4",
    );
    assert_err(
        one_rule(json!({"protocol": 58})),
        "r1",
        "protocol",
        "\"58\"",
        "ethertype IPv4",
    );
}

#[test]
fn err_ports_without_protocol() {
    assert_err(
        one_rule(json!({"port_range_min": 80, "port_range_max": 80})),
        "r1",
        "port_range_min",
        "80",
        "protocol",
    );
}

#[test]
fn err_port_zero() {
    assert_err(
        one_rule(json!({"protocol": "tcp", "port_range_min": 0, "port_range_max": 80})),
        "r1",
        "port_range_min",
        "0",
        "port 0 is not allowed for protocol tcp",
    );
}

#[test]
fn err_port_value_out_of_range() {
    assert_err(
        one_rule(json!({"protocol": "tcp", "port_range_min": 70000, "port_range_max": 70000})),
        "r1",
        "port_range_min",
        "70000",
        "0 to 65535",
    );
    assert_err(
        one_rule(json!({"protocol": "tcp", "port_range_min": "x", "port_range_max": 1})),
        "r1",
        "port_range_min",
        "\"x\"",
        "0 to 65535",
    );
}

#[test]
fn port_value_out_of_range_is_one_error() {
    // The range checks must not run on a value that was refused: they would report the refused
    // bound as missing (`port_range_max=null`), an error about a value nobody sent.
    for (rule, field) in [
        (
            json!({"protocol": "tcp", "port_range_min": 80, "port_range_max": 70000}),
            "port_range_max",
        ),
        (
            json!({"protocol": "tcp", "port_range_min": 70000, "port_range_max": 80}),
            "port_range_min",
        ),
        (
            json!({"protocol": "udp", "port_range_min": -1, "port_range_max": 80}),
            "port_range_min",
        ),
    ] {
        let errs = one_rule(rule.clone()).expect_err("input should be refused");
        assert_eq!(errs.len(), 1, "{rule}: one error expected, got:\n{errs}");
        let e = errs.iter().next().unwrap();
        assert_eq!(e.field, field, "{errs}");
        assert!(e.reason.contains("0 to 65535"), "{errs}");
    }
}

#[test]
fn err_port_min_above_max() {
    assert_err(
        one_rule(json!({"protocol": "udp", "port_range_min": 90, "port_range_max": 80})),
        "r1",
        "port_range_max",
        "80",
        "port_range_min (90) must be <= port_range_max",
    );
}

#[test]
fn err_port_range_half_given() {
    assert_err(
        one_rule(json!({"protocol": "6", "port_range_min": 90})),
        "r1",
        "port_range_max",
        "null",
        "needs port_range_max",
    );
}

#[test]
fn err_ports_on_protocol_without_ports() {
    assert_err(
        one_rule(json!({"protocol": "gre", "port_range_min": 5, "port_range_max": 5})),
        "r1",
        "port_range_min",
        "5",
        "ports cannot be specified for protocol gre",
    );
}

#[test]
fn err_icmp_type_and_code_range() {
    assert_err(
        one_rule(json!({"protocol": "icmp", "port_range_min": 256})),
        "r1",
        "port_range_min",
        "256",
        "ICMP type",
    );
    assert_err(
        one_rule(json!({"protocol": "icmp", "port_range_min": 8, "port_range_max": 300})),
        "r1",
        "port_range_max",
        "300",
        "ICMP code",
    );
}

#[test]
fn err_icmp_code_without_type() {
    assert_err(
        one_rule(json!({"protocol": "icmp", "port_range_max": 0})),
        "r1",
        "port_range_max",
        "0",
        "ICMP type (port_range_min) is missing",
    );
}

#[test]
fn err_prefix_family_conflicts_with_ethertype() {
    assert_err(
        one_rule(json!({"remote_ip_prefix": "::/0"})),
        "r1",
        "remote_ip_prefix",
        "\"::/0\"",
        "conflicting value ethertype IPv4",
    );
}

#[test]
fn err_malformed_cidr() {
    assert_err(
        one_rule(json!({"remote_ip_prefix": "10.0.0.0/33"})),
        "r1",
        "remote_ip_prefix",
        "\"10.0.0.0/33\"",
        "not a valid CIDR",
    );
}

#[test]
fn err_more_than_one_remote() {
    let m = load_doc(
        json!({"security_groups": [sg(SG, vec![rule("r1", json!({"remote_ip_prefix": "10.0.0.0/8", "remote_group_id": SG}))])]}),
    );
    assert_err(
        m,
        "r1",
        "remote_group_id",
        &format!("\"{SG}\""),
        "only one of remote_ip_prefix",
    );
}

#[test]
fn err_undefined_remote_group() {
    assert_err(
        one_rule(json!({"remote_group_id": "nope"})),
        "r1",
        "remote_group_id",
        "\"nope\"",
        "not defined",
    );
}

#[test]
fn err_undefined_remote_address_group() {
    assert_err(
        one_rule(json!({"remote_address_group_id": "nope"})),
        "r1",
        "remote_address_group_id",
        "\"nope\"",
        "not defined",
    );
}

#[test]
fn err_duplicate_rule_treats_any_prefix_as_none_and_names_as_numbers() {
    let rules = vec![
        rule(
            "r1",
            json!({"protocol": "tcp", "port_range_min": 22, "port_range_max": 22}),
        ),
        rule(
            "r2",
            json!({"protocol": "6", "port_range_min": 22, "port_range_max": 22, "remote_ip_prefix": "0.0.0.0/0"}),
        ),
        rule(
            "r3",
            json!({"protocol": "tcp", "port_range_min": 22, "port_range_max": 22, "remote_ip_prefix": "10.0.0.0/8"}),
        ),
    ];
    let res = load_doc(json!({"security_groups": [sg(SG, rules)]}));
    let errs = res.clone().unwrap_err();
    assert_eq!(errs.len(), 1, "{errs}");
    assert_err(
        res,
        "r2",
        "rule",
        "\"ingress IPv4 6 22 from 0.0.0.0/0\"",
        "duplicate of rule r1",
    );
}

#[test]
fn err_stateful_and_stateless_on_one_port() {
    let mut stateless = sg(SG2, vec![]);
    stateless["stateful"] = json!(false);
    let m = load_doc(
        json!({"security_groups": [sg(SG, vec![]), stateless], "ports": [port(PORT, json!({"security_groups": [SG, SG2]}))]}),
    );
    assert_err(
        m,
        PORT,
        "security_groups",
        &format!("[\"{SG}\",\"{SG2}\"]"),
        "both stateful and stateless",
    );
}

#[test]
fn err_undefined_group_on_port() {
    let m = load_doc(json!({"ports": [port(PORT, json!({}))]}));
    assert_err(m, PORT, "security_groups", &format!("\"{SG}\""), "not defined");
}

#[test]
fn err_malformed_mac() {
    let m = load_doc(
        json!({"security_groups": [sg(SG, vec![])], "ports": [port(PORT, json!({"mac_address": "fa:16:3e:zz:34:56"}))]}),
    );
    assert_err(m, PORT, "mac_address", "\"fa:16:3e:zz:34:56\"", "not a valid MAC");
    let m = load_doc(
        json!({"security_groups": [sg(SG, vec![])], "ports": [port(PORT, json!({"mac_address": "00:00:00:00:00:00"}))]}),
    );
    assert_err(m, PORT, "mac_address", "\"00:00:00:00:00:00\"", "not a valid MAC");
    let pairs =
        json!({"allowed_address_pairs": [{"ip_address": "10.0.0.9", "mac_address": "ff:ff:ff:ff:ff:ff"}]});
    let m = load_doc(json!({"security_groups": [sg(SG, vec![])], "ports": [port(PORT, pairs)]}));
    assert_err(
        m,
        PORT,
        "allowed_address_pairs[0].mac_address",
        "\"ff:ff:ff:ff:ff:ff\"",
        "not a valid MAC",
    );
}

#[test]
fn err_malformed_ip() {
    let m = load_doc(
        json!({"security_groups": [sg(SG, vec![])], "ports": [port(PORT, json!({"fixed_ips": [{"ip_address": "10.0.0.300"}]}))]}),
    );
    assert_err(
        m,
        PORT,
        "fixed_ips[0].ip_address",
        "\"10.0.0.300\"",
        "not a valid IP",
    );
    let m = load_doc(
        json!({"security_groups": [sg(SG, vec![])], "ports": [port(PORT, json!({"fixed_ips": [{"ip_address": "010.0.0.1"}]}))]}),
    );
    assert_err(
        m,
        PORT,
        "fixed_ips[0].ip_address",
        "\"010.0.0.1\"",
        "not a valid IP",
    );
    let pairs = json!({"allowed_address_pairs": [{"ip_address": "10.0.0.5/24"}]});
    let m = load_doc(json!({"security_groups": [sg(SG, vec![])], "ports": [port(PORT, pairs)]}));
    assert!(
        m.is_ok(),
        "an IPv4 pair CIDR in netaddr's form keeps its host bits"
    );
    let pairs = json!({"allowed_address_pairs": [{"ip_address": "10.0.0.0/255.255.255.0"}]});
    let m = load_doc(json!({"security_groups": [sg(SG, vec![])], "ports": [port(PORT, pairs)]}));
    assert_err(
        m,
        PORT,
        "allowed_address_pairs[0].ip_address",
        "\"10.0.0.0/255.255.255.0\"",
        "not a valid IP address or subnet",
    );
    let m = load_doc(json!({"address_groups": [{"id": "ag", "addresses": ["10.0.0.0/40"]}]}));
    assert_err(
        m,
        "ag",
        "addresses[0]",
        "\"10.0.0.0/40\"",
        "not a valid IP address or CIDR",
    );
}

#[test]
fn err_duplicate_allowed_address_pair() {
    let pairs = json!({"allowed_address_pairs": [{"ip_address": "10.0.0.9"}, {"ip_address": "10.0.0.9", "mac_address": "fa:16:3e:12:34:56"}]});
    let m = load_doc(json!({"security_groups": [sg(SG, vec![])], "ports": [port(PORT, pairs)]}));
    assert_err(
        m,
        PORT,
        "allowed_address_pairs[1].ip_address",
        "\"10.0.0.9\"",
        "duplicate allowed address pair",
    );
}

#[test]
fn err_duplicate_port_ids() {
    let m = load_doc(
        json!({"security_groups": [sg(SG, vec![])], "ports": [port(PORT, json!({})), port(PORT, json!({"device": "tapother"}))]}),
    );
    assert_err(m, PORT, "id", &format!("\"{PORT}\""), "duplicate port id");
}

#[test]
fn err_duplicate_tap_names() {
    let m = load_doc(json!({"security_groups": [sg(SG, vec![])],
                            "ports": [port("7f7c1a9b-44aa", json!({})), port("7f7c1a9b-44bb", json!({}))]}));
    assert_err(
        m,
        "7f7c1a9b-44bb",
        "device",
        "\"tap7f7c1a9b-44\"",
        "tap name also used by port 7f7c1a9b-44aa",
    );
}

#[test]
fn err_bad_tap_name() {
    let m = load_doc(
        json!({"security_groups": [sg(SG, vec![])], "ports": [port(PORT, json!({"device": "a-much-too-long-name"}))]}),
    );
    assert_err(
        m,
        PORT,
        "device",
        "\"a-much-too-long-name\"",
        "Linux interface name",
    );
}

#[test]
fn err_duplicate_group_and_rule_ids() {
    let m = load_doc(
        json!({"security_groups": [sg(SG, vec![rule("r1", json!({}))]), sg(SG, vec![rule("r1", json!({"direction": "egress"}))])]}),
    );
    assert_err(
        m.clone(),
        SG,
        "id",
        &format!("\"{SG}\""),
        "duplicate security group id",
    );
    assert_err(m, "r1", "id", "\"r1\"", "duplicate security group rule id");
    let m =
        load_doc(json!({"address_groups": [{"id": "ag", "addresses": []}, {"id": "ag", "addresses": []}]}));
    assert_err(m, "ag", "id", "\"ag\"", "duplicate address group id");
}

#[test]
fn err_bad_direction() {
    assert_err(
        one_rule(json!({"direction": "in"})),
        "r1",
        "direction",
        "\"in\"",
        "'ingress' or 'egress'",
    );
}

#[test]
fn err_bad_ethertype() {
    assert_err(
        one_rule(json!({"ethertype": "IPv5"})),
        "r1",
        "ethertype",
        "\"IPv5\"",
        "IPv4 and IPv6",
    );
}

#[test]
fn err_port_security_disabled_with_groups() {
    let m = load_doc(
        json!({"security_groups": [sg(SG, vec![])], "ports": [port(PORT, json!({"port_security_enabled": false}))]}),
    );
    assert_err(
        m,
        PORT,
        "security_groups",
        &format!("[\"{SG}\"]"),
        "port security must be enabled",
    );
}

#[test]
fn err_missing_required_fields() {
    let m = load_doc(json!({"ports": [{"network_id": NET, "mac_address": "fa:16:3e:12:34:56"}]}));
    assert_err(m, "<test.json ports[0]>", "id", "null", "missing required field");
    let m = load_doc(
        json!({"security_groups": [sg(SG, vec![])], "ports": [{"id": PORT, "network_id": NET, "fixed_ips": []}]}),
    );
    assert_err(m, PORT, "mac_address", "null", "missing required field");
}

#[test]
fn err_rule_listed_under_another_group() {
    assert_err(
        one_rule(json!({"security_group_id": SG2})),
        "r1",
        "security_group_id",
        &format!("\"{SG2}\""),
        "listed under",
    );
}

#[test]
fn err_unrecognised_document() {
    let errs = load_doc(json!({"hello": 1})).unwrap_err();
    assert_eq!(errs.len(), 1);
    assert!(
        errs.0[0]
            .to_string()
            .starts_with("document test.json: not a recognised Neutron object"),
        "{errs}"
    );
    let errs = from_json_str("x.json", "{").unwrap_err();
    assert!(errs.to_string().contains("not valid JSON"), "{errs}");
}

#[test]
fn all_errors_are_reported_together_one_per_line() {
    let rules = vec![
        rule("r1", json!({"protocol": "foo"})),
        rule(
            "r2",
            json!({"protocol": "tcp", "port_range_min": 0, "port_range_max": 1}),
        ),
        rule("r3", json!({"remote_group_id": "nope"})),
    ];
    let errs = load_doc(
        json!({"security_groups": [sg(SG, rules)], "ports": [port(PORT, json!({"mac_address": "x"}))]}),
    )
    .unwrap_err();
    let text = errs.to_string();
    assert_eq!(text.lines().count(), 4, "{text}");
    assert_eq!(text.lines().count(), errs.len());
    assert!(
        text.contains("security_group_rule r2: port_range_min=0: port 0 is not allowed for protocol tcp"),
        "{text}"
    );
}

// What Neutron's API refuses and the oracle found sg accepting (tests/oracle/README.md,
// finding 6): multicast pairs (IPv6 pairs overlapping ff00::/8, `::/0` included) and bare
// addresses in address groups.

fn pair_doc(pair: Value) -> Value {
    json!({"security_groups": [sg(SG, vec![])], "ports": [port(PORT, json!({"allowed_address_pairs": [pair]}))]})
}

#[test]
fn err_ipv6_pair_overlapping_multicast() {
    for cidr in ["::/0", "8000::/1", "ff00::/8", "ff02::/16"] {
        assert_err(
            load_doc(pair_doc(json!({"ip_address": cidr}))),
            PORT,
            "allowed_address_pairs[0].ip_address",
            &format!("\"{cidr}\""),
            "overlaps the multicast range ff00::/8",
        );
    }
    for ok in ["::/1", "2001:db8::/64", "fe80::/10"] {
        assert!(load_doc(pair_doc(json!({"ip_address": ok}))).is_ok(), "{ok}");
    }
}

#[test]
fn err_multicast_pair() {
    for (ip, range) in [
        ("224.0.0.18", "224.0.0.0/4"),
        ("239.1.2.0/24", "224.0.0.0/4"),
        ("128.0.0.0/1", "224.0.0.0/4"),
        ("ff02::12", "ff00::/8"),
    ] {
        assert_err(
            load_doc(pair_doc(json!({"ip_address": ip}))),
            PORT,
            "allowed_address_pairs[0].ip_address",
            &format!("\"{ip}\""),
            &format!("overlaps the multicast range {range}"),
        );
    }
    assert_err(
        load_doc(pair_doc(
            json!({"ip_address": "10.0.0.9", "mac_address": "01:00:5e:00:00:12"}),
        )),
        PORT,
        "allowed_address_pairs[0].mac_address",
        "\"01:00:5e:00:00:12\"",
        "multicast MAC",
    );
    // Neutron's one exception: the IPv4 "any" pair.
    assert!(load_doc(pair_doc(json!({"ip_address": "0.0.0.0/0"}))).is_ok());
}

#[test]
fn err_bare_address_in_address_group() {
    let m = load_doc(json!({"address_groups": [{"id": "ag", "addresses": ["10.0.0.0/24", "10.0.0.5"]}]}));
    assert_err(
        m,
        "ag",
        "addresses[1]",
        "\"10.0.0.5\"",
        "not a valid IP subnet: address groups take CIDRs only",
    );
    let m = load_doc(json!({"address_groups": [{"id": "ag", "addresses": ["2001:db8::1"]}]}));
    assert_err(
        m,
        "ag",
        "addresses[0]",
        "\"2001:db8::1\"",
        "address groups take CIDRs only (e.g. '2001:db8::1/128')",
    );
    let m = load_doc(json!({"address_groups": [{"id": "ag", "addresses": ["10.0.0.0/255.255.255.0"]}]}));
    assert_err(
        m,
        "ag",
        "addresses[0]",
        "\"10.0.0.0/255.255.255.0\"",
        "not a valid IP subnet",
    );
    // `::/0` stays valid in an address group (Neutron accepts it; the ipset gets two /1).
    assert!(load_doc(json!({"address_groups": [{"id": "ag", "addresses": ["::/0"]}]})).is_ok());
}

// ------------------------------------------------------------------------------------------
// The agent's RPC shape (model::rpc)
// ------------------------------------------------------------------------------------------

/// The WEB1 story as Neutron's server hands it to the agent's firewall driver.
fn rpc_web1() -> Value {
    json!({
        "devices": {"tapadcc4b66-c1": {
            "device": "tapadcc4b66-c1", "id": "adcc4b66-c1e2-4b9a-9d3f-5a7c2e8b1f04",
            "mac_address": "fa:16:3e:dc:d2:ab", "network_id": NET,
            "fixed_ips": ["192.168.206.6"], "device_owner": "compute:nova",
            "security_groups": ["default", "web"], "port_security_enabled": true,
            "security_group_rules": [{"direction": "ingress", "ethertype": "IPv4", "protocol": "udp",
                "port_range_min": 68, "port_range_max": 68, "source_port_range_min": 67,
                "source_port_range_max": 67, "dest_ip_prefix": "192.168.206.6/32"}],
        }},
        "security_groups": {
            "default": [
                {"direction": "egress", "ethertype": "IPv4", "stateful": true},
                {"direction": "ingress", "ethertype": "IPv4", "remote_group_id": "default", "stateful": true},
            ],
            "web": [
                {"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp", "port_range_min": 80,
                 "port_range_max": 80, "source_ip_prefix": "0.0.0.0/0", "stateful": true},
                {"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp", "port_range_min": 80,
                 "port_range_max": 80, "source_ip_prefix": "0.0.0.0/0", "stateful": true},
            ],
        },
        "sg_member_ips": {"default": {"IPv4": [["192.168.206.6", null], ["192.168.206.9", "fa:16:3e:00:00:09"]]}},
    })
}

#[test]
fn rpc_document_becomes_the_same_model_objects() {
    let m = load_doc(rpc_web1()).expect("valid");
    let port = m
        .port("adcc4b66-c1e2-4b9a-9d3f-5a7c2e8b1f04")
        .expect("port by id");
    assert_eq!(port.device, "tapadcc4b66-c1");
    assert_eq!(port.fixed_ip_strings(), ["192.168.206.6"]);
    assert_eq!(port.security_groups, ["default", "web"]);
    let web = m.security_group("web").unwrap();
    // Identical dicts are one rule; its id is its content.
    assert_eq!(web.rules.len(), 1);
    let r = &web.rules[0];
    assert!(r.rpc && r.stateful);
    assert_eq!(r.remote, Remote::Prefix("0.0.0.0/0".parse().unwrap()));
    assert_eq!((r.port_range_min, r.port_range_max), (Some(80), Some(80)));
    assert_eq!(
        r.id,
        r#"{"direction":"ingress","ethertype":"IPv4","port_range_max":80,"port_range_min":80,"protocol":"tcp","source_ip_prefix":"0.0.0.0/0","stateful":true}"#
    );
    // Members are the explicit list, MACs included.
    let members = m
        .members(&Remote::Group("default".into()), Ethertype::IPv4)
        .unwrap();
    let ips: Vec<(&str, Option<String>)> = members
        .iter()
        .map(|m| (m.ip.as_str(), m.mac.map(|x| x.to_string())))
        .collect();
    assert_eq!(
        ips,
        [
            ("192.168.206.6", None),
            ("192.168.206.9", Some("fa:16:3e:00:00:09".to_string()))
        ]
    );
}

#[test]
fn rpc_groups_without_rules_or_members_are_empty_not_errors() {
    // A port prepared before its group's rules arrive, and a remote group without a member
    // list: Neutron's driver has no rules and an empty set; so does sg.
    let m = load_doc(json!({
        "devices": {"tap1": {"device": "tap1", "mac_address": "fa:16:3e:12:34:56", "network_id": NET,
                             "fixed_ips": ["10.0.0.5"], "security_groups": ["later", "sg"]}},
        "security_groups": {"sg": [{"direction": "ingress", "ethertype": "IPv4", "remote_group_id": "nobody"}]},
    }))
    .expect("valid");
    assert_eq!(m.port("tap1").unwrap().device, "tap1");
    assert!(m.security_group("later").is_none());
    assert_eq!(
        m.members(&Remote::Group("nobody".into()), Ethertype::IPv4),
        Some(&[][..])
    );
}

#[test]
fn rpc_groups_may_hold_the_same_rule() {
    // Neutron gives every new group the same two egress rules; a port in two such groups is
    // the first thing `cargo xtask cloud` does. The RPC shape names a rule by its content, so
    // the same content in two groups is two rules, one per group (API-shape ids stay global).
    let egress = json!([{"direction": "egress", "ethertype": "IPv4", "stateful": true},
                        {"direction": "egress", "ethertype": "IPv6", "stateful": true}]);
    let m = load_doc(json!({
        "devices": {"tap1": {"device": "tap1", "mac_address": "fa:16:3e:12:34:56", "network_id": NET,
                             "fixed_ips": ["10.0.0.5"], "security_groups": ["base", "web"]}},
        "security_groups": {"base": egress, "web": egress},
    }))
    .expect("valid");
    for g in ["base", "web"] {
        let sg = m.security_group(g).unwrap();
        assert_eq!(sg.rules.len(), 2, "{g}");
        assert!(sg.rules.iter().all(|r| r.security_group_id == g));
    }
}

#[test]
fn rpc_hybrid_plug_names_the_tap_after_the_port_id() {
    let m = load_doc(json!({
        "plug": "hybrid",
        "devices": {"adcc4b66-c1e2-4b9a-9d3f-5a7c2e8b1f04": {
            "device": "adcc4b66-c1e2-4b9a-9d3f-5a7c2e8b1f04", "mac_address": "fa:16:3e:dc:d2:ab",
            "network_id": NET, "fixed_ips": ["192.168.206.6"], "security_groups": []}},
        "trusted_ports": ["5f0c8a2e-9b7d-4c1e-a3f6-8d2b4e6a0c19"],
    }))
    .expect("valid");
    assert_eq!(
        m.port("adcc4b66-c1e2-4b9a-9d3f-5a7c2e8b1f04").unwrap().device,
        "tapadcc4b66-c1"
    );
    let trusted = m.port("5f0c8a2e-9b7d-4c1e-a3f6-8d2b4e6a0c19").unwrap();
    assert_eq!(trusted.device, "tap5f0c8a2e-9b");
    assert!(trusted.is_trusted() && !trusted.is_filtered());
}

#[test]
fn rpc_source_ports_and_direction_prefixes() {
    let doc = |rule: Value| json!({"security_groups": {"sg": [rule]}});
    let m = load_doc(doc(
        json!({"direction": "egress", "ethertype": "IPv4", "protocol": "tcp",
        "source_port_range_min": 12345, "source_port_range_max": 12346, "dest_ip_prefix": "10.1.0.0/16"}),
    ))
    .expect("valid");
    let r = &m.security_groups[0].rules[0];
    assert_eq!(
        (r.source_port_range_min, r.source_port_range_max),
        (Some(12345), Some(12346))
    );
    assert_eq!(r.remote_ip_prefix.as_deref(), Some("10.1.0.0/16"));
    assert_eq!(r.describe(), "egress IPv4 tcp sport 12345-12346 to 10.1.0.0/16");

    // The agent's IPv6 rules may say icmp; Neutron's driver means ICMPv6.
    let m = load_doc(doc(
        json!({"direction": "ingress", "ethertype": "IPv6", "protocol": "icmp",
        "source_ip_prefix": "2001:db8::2"}),
    ))
    .expect("valid");
    assert_eq!(m.security_groups[0].rules[0].proto_num, Some(58));
}

#[test]
fn err_rpc_rules_name_the_agent_fields() {
    let doc = |rule: Value| json!({"security_groups": {"sg": [rule]}});
    let id_of = |rule: &Value| super::rpc::rule_id(rule.as_object().unwrap());

    let r = json!({"direction": "ingress", "ethertype": "IPv4", "source_ip_prefix": "10.0.0.300/8"});
    assert_err(
        load_doc(doc(r.clone())),
        &id_of(&r),
        "source_ip_prefix",
        "\"10.0.0.300/8\"",
        "not a valid CIDR",
    );

    let r = json!({"direction": "ingress", "ethertype": "IPv4", "dest_ip_prefix": "10.0.0.5/32"});
    assert_err(
        load_doc(doc(r.clone())),
        &id_of(&r),
        "dest_ip_prefix",
        "\"10.0.0.5/32\"",
        "the VM's own address",
    );

    let r = json!({"direction": "egress", "ethertype": "IPv4", "remote_ip_prefix": "10.0.0.0/8"});
    assert_err(
        load_doc(doc(r.clone())),
        &id_of(&r),
        "remote_ip_prefix",
        "\"10.0.0.0/8\"",
        "dest_ip_prefix (egress)",
    );

    let r = json!({"direction": "egress", "ethertype": "IPv4", "protocol": "icmp", "source_port_range_min": 8,
                   "source_port_range_max": 8});
    assert_err(
        load_doc(doc(r.clone())),
        &id_of(&r),
        "source_port_range_min",
        "8",
        "need protocol tcp",
    );

    let r = json!({"direction": "egress", "ethertype": "IPv4", "protocol": "tcp", "source_port_range_min": 9,
                   "source_port_range_max": 8});
    assert_err(
        load_doc(doc(r.clone())),
        &id_of(&r),
        "source_port_range_max",
        "8",
        "must be <=",
    );

    let r = json!({"direction": "egress", "ethertype": "IPv4", "protocol": "tcp", "source_port_range_min": 1000,
                   "source_port_range_max": 60000, "port_range_min": 80, "port_range_max": 81});
    assert_err(
        load_doc(doc(r.clone())),
        &id_of(&r),
        "source_port_range_max",
        "60000",
        "classifier entries",
    );

    let bad_member = json!({"sg_member_ips": {"g": {"IPv4": [["2001:db8::1", null]], "IPv5": []}}});
    assert_err(
        load_doc(bad_member.clone()),
        "g",
        "sg_member_ips.IPv4[0]",
        "\"2001:db8::1\"",
        "not an IPv4 address",
    );
    assert_err(
        load_doc(bad_member),
        "g",
        "sg_member_ips.IPv5",
        "[]",
        "ethertype IPv4 or IPv6",
    );

    let bad_port = json!({"devices": {"tap1": {"device": "tap1", "mac_address": "fa:16:3e:12:34:56",
                                                "network_id": NET, "fixed_ips": ["10.0.0.500"]}}});
    assert_err(
        load_doc(bad_port),
        "tap1",
        "fixed_ips[0]",
        "\"10.0.0.500\"",
        "not a valid IP address",
    );
}
