//! The harness's wire: a frame is seen as delivered or dropped by the sentinel that follows
//! it, on a topology built from a Neutron input.

use sg_user::{
    agent::apply::Applier,
    compile,
    datapath::{Datapath, LoadOptions},
    diff::{topo::Topology, wire},
    model,
    packet::{Body, Frame, IpPacket, L4, TCP_SYN, parse_mac},
};

#[test]
fn sentinel_tells_delivered_from_dropped() {
    let m = model::load(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../sg-user/examples/web1.json"
    ))
    .unwrap();
    let topo = Topology::build(&m, "compute-1", &sg_tests::unique("w")).unwrap();
    topo.bridge_netfilter(false).unwrap();
    let port = &m.ports[0];
    let vm = &topo.vms[&port.id];
    let up = &topo.uplinks[&port.network_id];
    let vm_sock = wire::RawSocket::open(&vm.ns, &vm.dev).unwrap();
    let up_sock = wire::RawSocket::open(&up.ns, &up.dev).unwrap();
    wire::pin_to_cpu(0).unwrap();

    let vm_mac = parse_mac(&port.mac.to_string()).unwrap();
    let peer_mac = [0xfa, 0x16, 0x3e, 0x99, 0, 1];
    let syn = |dport: u16, id: u32| {
        let mut p = IpPacket::new(
            "203.0.113.9".parse().unwrap(),
            "192.168.206.6".parse().unwrap(),
            L4::Tcp {
                sport: 40000,
                dport,
                flags: TCP_SYN,
                seq: 1,
                ack: 0,
            },
        );
        p.ident = id;
        Frame::ip(peer_mac, vm_mac, p).build()
    };
    // Non-IP towards the VM passes both back ends: the sentinel.
    let sentinel = Frame {
        src_mac: peer_mac,
        dst_mac: vm_mac,
        vlans: vec![],
        body: Body::Other {
            ethertype: 0x88b5,
            payload: b"sg-sentinel".to_vec(),
        },
    }
    .build();

    let unfiltered = wire::exchange(&up_sock, &vm_sock, &[syn(80, 1), syn(22, 2)], &sentinel).unwrap();
    assert_eq!(unfiltered, vec![true, true]);

    let pins = sg_tests::PinRoot::new().unwrap();
    let dp = Datapath::load(&LoadOptions {
        pin_root: Some(pins.path.clone()),
        ..Default::default()
    })
    .unwrap();
    let mut applier = Applier::adopt(dp, Some(topo.node.0.clone()), None).unwrap();
    let compiled = compile::compile(&m, "compute-1");
    applier.apply(&compiled).unwrap();
    let filtered = wire::exchange(&up_sock, &vm_sock, &[syn(80, 3), syn(22, 4)], &sentinel).unwrap();
    assert_eq!(
        filtered,
        vec![true, false],
        "WEB_SERVERS allows 80, nothing allows 22"
    );
}
