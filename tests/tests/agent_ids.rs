//! Ids the agent allocates are never reused while the pinned maps live (issue 17, the
//! reviewer's guess). A restarted agent used to start at the largest id still in the maps plus
//! one. A policy id or port index freed before the restart could then be given again, while
//! conntrack entries still carried it:
//! - a reused policy id made an old flow look already checked against the new policy, so it
//!   skipped its revocation check;
//! - a reused port index (the conntrack zone) handed the old port's flows to the new port.
//!
//! The agent's applier runs here on a namespace with veth devices standing for taps; each
//! "restart" drops it and adopts the pinned maps again, with the run state it left.

use serde_json::{Value, json};
use sg_common::*;
use sg_tests::{Netns, PinRoot, dp::*, spawn_in};
use sg_user::{
    agent::apply::{Applier, RunState},
    compile,
    datapath::{Datapath, LoadOptions},
    model,
    packet::{TCP_ACK, TCP_PSH, TCP_SYN},
};

const SSH: &str = "sg-ssh";
const WEB: &str = "sg-web";
const HTTPS: &str = "sg-https";
const OUT: &str = "sg-out";

fn groups() -> Value {
    let ingress = |id: &str, port: u16| {
        json!({"id": id, "direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
               "port_range_min": port, "port_range_max": port})
    };
    json!([
        {"id": SSH, "stateful": true, "security_group_rules": [ingress("ssh", 22)]},
        {"id": WEB, "stateful": true, "security_group_rules": [ingress("web", 80)]},
        {"id": HTTPS, "stateful": true, "security_group_rules": [ingress("https", 443)]},
        {"id": OUT, "stateful": true, "security_group_rules": [
            {"id": "out", "direction": "egress", "ethertype": "IPv4"}]},
    ])
}

/// A port on device `dev` with the test port's MAC and address.
fn port(id: &str, dev: &str, groups: &[&str]) -> Value {
    json!({"id": id, "mac_address": "fa:16:3e:00:00:05", "network_id": "net-ids",
           "fixed_ips": [{"ip_address": VM4}], "security_groups": groups,
           "binding:host_id": "compute-1", "device": dev})
}

struct Node {
    ns: Netns,
    pins: PinRoot,
}

impl Node {
    fn new() -> Self {
        let ns = Netns::new("sgid").unwrap();
        for dev in ["da", "db", "dc"] {
            ns.ip(&[
                "link",
                "add",
                dev,
                "type",
                "veth",
                "peer",
                "name",
                &format!("{dev}p"),
            ])
            .unwrap();
        }
        Self {
            ns,
            pins: PinRoot::new().unwrap(),
        }
    }

    /// An agent start: adopts the pinned maps (and the previous run state).
    fn adopt(&self, previous: Option<&RunState>) -> Applier {
        let dp = Datapath::load(&LoadOptions {
            pin_root: Some(self.pins.path.clone()),
            ..Default::default()
        })
        .unwrap();
        Applier::adopt(dp, Some(self.ns.name.clone()), previous).unwrap()
    }

    /// Applies `ports` and returns the ifindex of each device.
    fn apply(&self, a: &mut Applier, ports: Vec<Value>) -> std::collections::BTreeMap<String, u32> {
        let m = model::from_values(vec![(
            "ids".into(),
            json!({"security_groups": groups(), "address_groups": [], "ports": ports}),
        )])
        .unwrap();
        let ns = self.ns.name.clone();
        let links = spawn_in(&ns, || {
            ["da", "db", "dc"]
                .iter()
                .map(|d| (d.to_string(), sg_user::netns::ifindex(d).unwrap()))
                .collect::<std::collections::BTreeMap<_, _>>()
        })
        .join()
        .unwrap()
        .unwrap();
        a.apply(&compile::compile(&m, "compute-1")).unwrap();
        links
    }

    /// Runs TEST_RUN cases on `dev` inside the node's namespace.
    fn run(&self, a: &mut Applier, dev: &str, cases: Vec<Case>) {
        let ns = self.ns.name.clone();
        let dev = dev.to_string();
        // The applier's datapath is used from the namespace's thread, where the devices are.
        let dp: &mut Datapath = &mut a.dp;
        std::thread::scope(|s| {
            s.spawn(|| {
                let f = std::fs::File::open(sg_user::netns::netns_path(&ns)).unwrap();
                // SAFETY: changes the namespace of this scoped thread only.
                assert_eq!(
                    unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) },
                    0
                );
                let ifindex = sg_user::netns::ifindex(&dev).unwrap();
                run(dp, ifindex, &cases, false);
            })
            .join()
            .unwrap();
        });
    }
}

fn ssh_in(flags: u8) -> Vec<u8> {
    to_vm(tcp(REMOTE4, 50022, VM4, 22, flags))
}

#[test]
fn a_policy_id_freed_before_a_restart_is_not_given_again() {
    let node = Node::new();
    let mut a = node.adopt(None);
    // Port C on WEB gets the first policy; port A on SSH the second, the largest.
    node.apply(&mut a, vec![port("c", "dc", &[WEB])]);
    node.apply(&mut a, vec![port("c", "dc", &[WEB]), port("a", "da", &[SSH])]);
    let ssh_policy = a.ports().find(|p| p.id == "a").unwrap().policy;
    node.run(
        &mut a,
        "da",
        vec![
            in_ok("SSH SYN", ssh_in(TCP_SYN), REASON_ALLOW_RULE),
            out_ok(
                "SYN-ACK",
                from_vm(tcp(VM4, 22, REMOTE4, 50022, TCP_SYN | TCP_ACK)),
                REASON_ALLOW_ESTABLISHED,
            ),
            in_ok("ACK", ssh_in(TCP_ACK), REASON_ALLOW_ESTABLISHED),
        ],
    );
    // A joins WEB instead: it shares C's policy, and the SSH policy (the largest id) is freed.
    // The SSH flow has sent nothing since: its entry still carries that id.
    node.apply(&mut a, vec![port("c", "dc", &[WEB]), port("a", "da", &[WEB])]);
    let state = a.run_state(3);
    drop(a);

    let mut a = node.adopt(Some(&state));
    // A moves to a group of its own, HTTPS: a new policy under a new id.
    node.apply(&mut a, vec![port("c", "dc", &[WEB]), port("a", "da", &[HTTPS])]);
    let https_policy = a.ports().find(|p| p.id == "a").unwrap().policy;
    assert!(
        https_policy > ssh_policy,
        "policy id {https_policy} given again (the SSH policy was {ssh_policy})"
    );
    node.run(
        &mut a,
        "da",
        vec![in_drop(
            "SSH data: re-checked against HTTPS only, the flow is revoked",
            ssh_in(TCP_PSH | TCP_ACK),
            REASON_DROP_NO_RULE,
        )],
    );
}

#[test]
fn a_port_index_freed_before_a_restart_is_not_given_again() {
    let node = Node::new();
    let mut a = node.adopt(None);
    node.apply(&mut a, vec![port("a", "da", &[WEB]), port("b", "db", &[OUT])]);
    let b_idx = a.ports().find(|p| p.id == "b").unwrap().port_idx;
    // B opens a connection to a remote host.
    let out = |flags| from_vm(tcp(VM4, 40000, REMOTE4, 443, flags));
    let back = |flags| to_vm(tcp(REMOTE4, 443, VM4, 40000, flags));
    node.run(
        &mut a,
        "db",
        vec![
            out_ok("SYN", out(TCP_SYN), REASON_ALLOW_RULE),
            in_ok("SYN-ACK", back(TCP_SYN | TCP_ACK), REASON_ALLOW_ESTABLISHED),
            out_ok("ACK", out(TCP_ACK), REASON_ALLOW_ESTABLISHED),
        ],
    );
    // B is deleted; its index (the largest) is freed, its conntrack entries are still there.
    node.apply(&mut a, vec![port("a", "da", &[WEB])]);
    let state = a.run_state(2);
    drop(a);

    // A new port D, with B's address and groups (Neutron reuses addresses), on B's old tap.
    let mut a = node.adopt(Some(&state));
    node.apply(&mut a, vec![port("a", "da", &[WEB]), port("d", "db", &[OUT])]);
    let d_idx = a.ports().find(|p| p.id == "d").unwrap().port_idx;
    assert!(d_idx > b_idx, "port index {d_idx} given again (B's was {b_idx})");
    node.run(
        &mut a,
        "db",
        vec![in_drop(
            "the remote host's data for B's connection is nothing of D's",
            back(TCP_PSH | TCP_ACK),
            REASON_DROP_NO_RULE,
        )],
    );
}
