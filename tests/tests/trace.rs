//! `sg trace` and the inspection commands against a running agent: the verdict, stage, rule
//! id and text come from the real program, and tracing writes nothing to the live tables.

use serde_json::Value;
use sg_tests::{Agent, ComputeNode};

const TAP: &str = "tapadcc4b66-c1";

fn web1() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../sg-user/examples/web1.json"
        ))
        .unwrap(),
    )
    .unwrap()
}

#[test]
fn trace_explains_allowed_and_dropped_packets_without_side_effects() {
    let mut node = ComputeNode::new().unwrap();
    node.add_vm(TAP, "fa:16:3e:dc:d2:ab", "192.168.206.6/24").unwrap();
    let agent = Agent::start(&node.host.name, &web1()).unwrap();
    let counters = || -> Vec<(String, u64)> {
        let stats: Value = serde_json::from_str(&agent.cli(&["stats", "--json"]).unwrap()).unwrap();
        stats["counters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    format!("{} {}", c["direction"], c["reason"]),
                    c["packets"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let before = counters();
    let trace = |dport: &str| -> Value {
        let out = agent
            .cli(&[
                "trace",
                "--port",
                TAP,
                "--netns",
                &node.host.name,
                "to-vm",
                "tcp",
                "203.0.113.7:40000",
                &format!("192.168.206.6:{dport}"),
                "--json",
            ])
            .unwrap();
        serde_json::from_str(&out).unwrap()
    };
    let allowed = trace("80");
    assert_eq!(allowed["verdict"], "ALLOW");
    assert_eq!(allowed["reason"], "allow-rule");
    assert_eq!(allowed["stage"], "policy");
    assert_eq!(allowed["conntrack"], "NEW");
    assert_eq!(allowed["rule_id"], "c4e6a8b0-3d5f-4e7a-9b1c-2d3e4f5a6b71");
    assert_eq!(allowed["rule"], "ingress IPv4 tcp 80 from 0.0.0.0/0");
    let dropped = trace("22");
    assert_eq!(dropped["verdict"], "DROP");
    assert_eq!(dropped["reason"], "drop-no-rule");
    assert_eq!(dropped["rule_id"], Value::Null);

    // A spoofed source from the VM is explained at the port-security stage.
    let out = agent
        .cli(&[
            "trace",
            "--port",
            TAP,
            "--netns",
            &node.host.name,
            "from-vm",
            "udp",
            "10.9.9.9:5000",
            "203.0.113.7:53",
            "--json",
        ])
        .unwrap();
    let spoof: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (spoof["verdict"].as_str(), spoof["reason"].as_str()),
        (Some("DROP"), Some("drop-spoof-ip"))
    );
    assert_eq!(spoof["stage"], "port-security");

    // Tracing an allowed SYN created no conntrack entry and counted nothing. The comparison
    // covers every counter of the node: `ComputeNode` keeps the bridge and the VM silent, so
    // any change is a trace side effect.
    let ct: Value = serde_json::from_str(&agent.cli(&["conntrack", "list", "--json"]).unwrap()).unwrap();
    assert_eq!(
        ct.as_array().unwrap().len(),
        0,
        "trace wrote conntrack state: {ct}"
    );
    assert_eq!(counters(), before, "trace changed the counters");

    // The other inspection commands answer for this port.
    let show = agent.cli(&["show", "port", "adcc4b66"]).unwrap();
    assert!(
        show.contains("ingress IPv4 tcp 443 from 0.0.0.0/0") && show.contains(TAP),
        "{show}"
    );
}
