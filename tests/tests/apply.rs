//! The applier identifies live policies and address sets by their content (issue 12): when
//! every content hashes alike, two ports with different rules still get different policies,
//! each enforcing its own rules, and an unchanged policy keeps its id.

use serde_json::json;
use sg_common::*;
use sg_tests::{PinRoot, dp::tcp, unique};
use sg_user::{
    agent::apply::{Applier, ContentHashing},
    compile,
    datapath::{Datapath, LoadOptions},
    diff::topo::Topology,
    model,
    packet::{Frame, TCP_SYN},
};

const WEB: &str = "aaaa0000-0000-4000-8000-00000000a001";
const SSH: &str = "bbbb0000-0000-4000-8000-00000000b002";
const WEB_MAC: [u8; 6] = [0xfa, 0x16, 0x3e, 0, 0xa0, 0x01];
const SSH_MAC: [u8; 6] = [0xfa, 0x16, 0x3e, 0, 0xb0, 0x02];

fn doc(ssh_ports: &[u16]) -> serde_json::Value {
    let group = |id: &str, ports: &[u16]| {
        json!({"id": id, "security_group_rules": ports.iter().map(|p| json!({
            "id": format!("{id}-{p}"), "direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
            "port_range_min": p, "port_range_max": p, "remote_ip_prefix": "0.0.0.0/0"})).collect::<Vec<_>>()})
    };
    let port = |id: &str, mac: &str, ip: &str, sg: &str| {
        json!({"id": id, "mac_address": mac, "network_id": "net-c", "binding:host_id": "compute-1",
               "fixed_ips": [{"ip_address": ip}], "security_groups": [sg]})
    };
    json!({
        "security_groups": [group("sg-web", &[80]), group("sg-ssh", ssh_ports)],
        "address_groups": [],
        "ports": [
            port(WEB, "fa:16:3e:00:a0:01", "10.77.0.1", "sg-web"),
            port(SSH, "fa:16:3e:00:b0:02", "10.77.0.2", "sg-ssh"),
        ],
    })
}

#[test]
fn colliding_content_hashes_never_share_a_policy() {
    let m = model::from_values(vec![("collide".into(), doc(&[22]))]).unwrap();
    let topo = Topology::build(&m, "compute-1", &unique("c")).unwrap();
    let pins = PinRoot::new().unwrap();
    let dp = Datapath::load(&LoadOptions {
        pin_root: Some(pins.path.clone()),
        ..Default::default()
    })
    .unwrap();
    let mut applier =
        Applier::adopt_with(dp, Some(topo.node.0.clone()), None, ContentHashing::colliding()).unwrap();
    applier.apply(&compile::compile(&m, "compute-1")).unwrap();

    let live = |a: &Applier, id: &str| a.ports().find(|p| p.id == id).unwrap().clone();
    let (web, ssh) = (live(&applier, WEB), live(&applier, SSH));
    assert_ne!(
        web.policy, ssh.policy,
        "two contents, one hash: still two policies"
    );
    assert_ne!(web.addr_id, ssh.addr_id, "and two address sets");

    // Each tap enforces its own group's rules.
    // BPF_PROG_TEST_RUN needs the tap's ifindex in the calling thread's namespace.
    let node = topo.node.0.clone();
    let verdict = |a: &mut Applier, ifindex: u32, mac: [u8; 6], dst: &str, dport: u16| {
        let frame = Frame::ip(
            [0xfa, 0x16, 0x3e, 9, 9, 9],
            mac,
            tcp("203.0.113.9", 40000, dst, dport, TCP_SYN),
        );
        let (v, rec) = sg_user::netns::run_in(Some(&node), || {
            a.dp.trace_run(PROG_TO_VM, &frame.build(), ifindex)
        })
        .unwrap()
        .unwrap();
        (v, reason_name(rec.reason))
    };
    let (wi, si) = (web.ifindex.unwrap(), ssh.ifindex.unwrap());
    assert_eq!(
        verdict(&mut applier, wi, WEB_MAC, "10.77.0.1", 80),
        (TC_ACT_UNSPEC, "allow-rule")
    );
    assert_eq!(
        verdict(&mut applier, wi, WEB_MAC, "10.77.0.1", 22),
        (TC_ACT_SHOT, "drop-no-rule")
    );
    assert_eq!(
        verdict(&mut applier, si, SSH_MAC, "10.77.0.2", 22),
        (TC_ACT_UNSPEC, "allow-rule")
    );
    assert_eq!(
        verdict(&mut applier, si, SSH_MAC, "10.77.0.2", 80),
        (TC_ACT_SHOT, "drop-no-rule")
    );

    // A change to one group rewrites that port's policy only; the other keeps its id.
    let m2 = model::from_values(vec![("collide".into(), doc(&[22, 23]))]).unwrap();
    let report = applier.apply(&compile::compile(&m2, "compute-1")).unwrap();
    assert_eq!(report.policies_written, 1, "{report:?}");
    assert_eq!(
        live(&applier, WEB).policy,
        web.policy,
        "unchanged content keeps its id"
    );
    assert_ne!(live(&applier, SSH).policy, ssh.policy);
    assert_eq!(
        verdict(&mut applier, si, SSH_MAC, "10.77.0.2", 23),
        (TC_ACT_UNSPEC, "allow-rule")
    );
    assert_eq!(
        verdict(&mut applier, wi, WEB_MAC, "10.77.0.1", 23),
        (TC_ACT_SHOT, "drop-no-rule")
    );
}
