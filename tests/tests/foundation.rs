//! The first real verdicts: crafted frames through BPF_PROG_TEST_RUN, then real packets
//! between two namespaces with sg attached to a veth "tap".

use std::{net::IpAddr, time::Duration};

use sg_common::*;
use sg_tests::{Netns, PinRoot, tcp_reachable, tcp_servers, veth};
use sg_user::{
    datapath::{Datapath, Iface, LoadOptions, allowlist},
    packet::{Frame, IpPacket, L4, TCP_SYN},
};

const VM_MAC: [u8; 6] = [0xfa, 0x16, 0x3e, 0xdc, 0xd2, 0xab];
const PEER_MAC: [u8; 6] = [0xfa, 0x16, 0x3e, 0x00, 0x00, 0x01];

fn tcp_syn(src: &str, dst: &str, dport: u16) -> Vec<u8> {
    let p = IpPacket::new(
        src.parse().unwrap(),
        dst.parse().unwrap(),
        L4::Tcp {
            sport: 40000,
            dport,
            flags: TCP_SYN,
            seq: 1,
            ack: 0,
        },
    );
    Frame::ip(PEER_MAC, VM_MAC, p).build()
}

#[test]
fn test_run_allows_listed_port_and_drops_the_rest() {
    let mut dp = Datapath::load(&LoadOptions::default()).expect("load");
    // ifindex 1 is loopback, which always exists: TEST_RUN needs a real device.
    let allows = ["tcp/80".parse().unwrap(), "udp/53".parse().unwrap()];
    let to80 = tcp_syn("10.0.0.1", "10.0.0.2", 80);
    let to81 = tcp_syn("10.0.0.1", "10.0.0.2", 81);

    // Not managed yet: passes untouched.
    assert_eq!(dp.test_run(PROG_TO_VM, &to81, 1, 0).unwrap(), TC_ACT_UNSPEC);

    allowlist::install(&mut dp, 1, 7, &allows).unwrap();
    assert_eq!(
        dp.test_run(PROG_TO_VM, &to80, 1, 0).unwrap(),
        TC_ACT_UNSPEC,
        "tcp/80 allowed"
    );
    assert_eq!(
        dp.test_run(PROG_TO_VM, &to81, 1, 0).unwrap(),
        TC_ACT_SHOT,
        "tcp/81 dropped"
    );
    let v6 = tcp_syn("2001:db8::1", "2001:db8::2", 80);
    assert_eq!(
        dp.test_run(PROG_TO_VM, &v6, 1, 0).unwrap(),
        TC_ACT_UNSPEC,
        "IPv6 tcp/80"
    );
    let v6_81 = tcp_syn("2001:db8::1", "2001:db8::2", 81);
    assert_eq!(
        dp.test_run(PROG_TO_VM, &v6_81, 1, 0).unwrap(),
        TC_ACT_SHOT,
        "IPv6 tcp/81"
    );
    // Egress allows everything.
    assert_eq!(dp.test_run(PROG_FROM_VM, &to81, 1, 0).unwrap(), TC_ACT_UNSPEC);
    // A frame cut inside the TCP header is malformed. (The kernel's TEST_RUN itself refuses
    // IPv4 frames shorter than a full IP header with EINVAL.)
    assert_eq!(dp.test_run(PROG_TO_VM, &to80[..36], 1, 0).unwrap(), TC_ACT_SHOT);

    // Counters say why.
    let stats = dp.stats().unwrap();
    let get = |reason| {
        stats
            .get(
                &StatKey {
                    port_idx: 7,
                    dir: DIR_INGRESS,
                    reason,
                    _pad: [0; 2],
                },
                0,
            )
            .map(|v| v.iter().map(|c| c.packets).sum::<u64>())
            .unwrap_or(0)
    };
    assert_eq!(get(REASON_ALLOW_RULE), 2);
    assert_eq!(get(REASON_DROP_NO_RULE), 2);
    assert_eq!(get(REASON_DROP_MALFORMED), 1);
}

#[test]
fn namespace_pair_one_flow_delivered_one_dropped() {
    let host = Netns::new("sgh").unwrap();
    let vm = Netns::new("sgv").unwrap();
    let pins = PinRoot::new().unwrap();
    let tap = sg_tests::unique("tap");
    veth(&host, &tap, "fa:16:3e:00:00:01", &vm, "eth0", "fa:16:3e:dc:d2:ab").unwrap();
    host.ip(&["addr", "add", "192.168.206.1/24", "dev", &tap])
        .unwrap();
    vm.ip(&["addr", "add", "192.168.206.6/24", "dev", "eth0"])
        .unwrap();

    let vm_ip: IpAddr = "192.168.206.6".parse().unwrap();
    tcp_servers(&vm.name, vm_ip, &[80, 81]).unwrap();
    let t = Duration::from_millis(700);
    assert!(
        tcp_reachable(&host.name, vm_ip, 81, t).unwrap(),
        "unfiltered: 81 reachable"
    );

    let mut dp = Datapath::load(&LoadOptions {
        pin_root: Some(pins.path.clone()),
        ..Default::default()
    })
    .unwrap();
    let (ifindex, _) = dp.attach(&Iface::new(&tap, Some(&host.name))).unwrap();
    allowlist::install(&mut dp, ifindex, 1, &["tcp/80".parse().unwrap()]).unwrap();
    // Enforcement must not depend on this process holding the object: drop it.
    drop(dp);

    assert!(
        tcp_reachable(&host.name, vm_ip, 80, t).unwrap(),
        "tcp/80 is delivered"
    );
    assert!(
        !tcp_reachable(&host.name, vm_ip, 81, t).unwrap(),
        "tcp/81 is dropped"
    );
}
