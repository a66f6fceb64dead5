//! BPF_PROG_TEST_RUN cases on crafted frames: every stage and every reason of README.md, IPv4
//! and IPv6. Each case asserts the verdict the program returned and the reason it wrote to
//! SG_TRACE (the frame carries TRACE_MARK through the ctx mark).
//!
//! The port under test is ifindex 1 (loopback): TEST_RUN needs an existing device, and only
//! `skb->ifindex` matters to the programs.
//!
//! Not testable here: IPv4/IPv6 frames shorter than the fixed IP header, which the kernel's
//! TEST_RUN refuses with EINVAL before the program runs (datapath_bridge.rs sends one through
//! a real veth instead).

use sg_common::*;
use sg_tests::dp::*;
use sg_user::{
    datapath::{
        Datapath, LoadOptions,
        fixture::{self, PortSpec, Rule},
    },
    packet::{Body, Frame, IpPacket, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN},
};

const IF: u32 = 1;
const PORT: u32 = 7;
const TCP_URG: u8 = 0x20;
const TCP_ECE: u8 = 0x40;
const TCP_CWR: u8 = 0x80;

/// fe80:: address of VM_MAC and of AAP_MAC.
const VM_LL: &str = "fe80::f816:3eff:fe00:5";
const AAP_LL: &str = "fe80::f816:3eff:fe00:aa";
const AAP6: &str = "2001:db8:a::/64";

/// Port 7: fixed 10.0.0.5 and 2001:db8::5, pairs (AAP_MAC, 10.0.1.0/24) and
/// (AAP_MAC, 2001:db8:a::/64), stateful.
fn base_port() -> PortSpec {
    PortSpec::new(IF, PORT, VM_MAC)
        .fixed_ip(VM4)
        .fixed_ip(VM6)
        .pair(AAP_MAC, AAP4)
        .pair(AAP_MAC, AAP6)
        .stateful()
}

/// Rule indexes are positions in this list, from 1.
fn base_rules() -> Vec<Rule> {
    vec![
        Rule::ingress_v4().tcp(22, 22),                         // 1
        Rule::ingress_v4().tcp(80, 80).remote("192.0.2.0/24"),  // 2
        Rule::ingress_v4().icmp(Some(8), Some(0)),              // 3
        Rule::ingress_v4().udp(12345, 12346),                   // 4
        Rule::ingress_v6().tcp(22, 22),                         // 5
        Rule::ingress_v6().icmp(Some(128), None),               // 6
        Rule::egress_v4(),                                      // 7
        Rule::egress_v6(),                                      // 8
        Rule::ingress_v4().proto(132).ports(9999, 9999),        // 9  SCTP
        Rule::ingress_v4().proto(33).ports(5000, 5000),         // 10 DCCP
        Rule::ingress_v4().proto(136).ports(7000, 7000),        // 11 UDP-Lite
        Rule::ingress_v4().proto(47).remote("198.51.100.0/24"), // 12 GRE
        Rule::ingress_v6().udp(53, 53),                         // 13
    ]
}

fn load(port: &PortSpec, rules: &[Rule]) -> Datapath {
    let mut dp = Datapath::load(&LoadOptions::default()).expect("load the datapath");
    fixture::install(&mut dp, port, rules).expect("install the test port");
    dp
}

fn patch(mut frame: Vec<u8>, off: usize, bytes: &[u8]) -> Vec<u8> {
    frame[off..off + bytes.len()].copy_from_slice(bytes);
    frame
}

fn vlan(tpid: u16, p: IpPacket, from_vm_side: bool) -> Vec<u8> {
    let (src, dst) = if from_vm_side {
        (VM_MAC, GW_MAC)
    } else {
        (GW_MAC, VM_MAC)
    };
    Frame {
        src_mac: src,
        dst_mac: dst,
        vlans: vec![(tpid, 100)],
        body: Body::Ip(p),
    }
    .build()
}

fn syn_in(dport: u16) -> Vec<u8> {
    to_vm(tcp(REMOTE4, 40000, VM4, dport, TCP_SYN))
}

// ------------------------------------------------------------------------------------------
// Stage 1: parse
// ------------------------------------------------------------------------------------------

#[test]
fn parse_frames_headers_and_truncation() {
    let mut dp = load(&base_port(), &base_rules());
    let tcp_out = from_vm(tcp(VM4, 1234, REMOTE4, 443, TCP_SYN));
    let v6_in = to_vm(tcp(REMOTE6, 40000, VM6, 22, TCP_SYN));
    let cases = vec![
        out_drop(
            "802.1Q tag from the VM",
            vlan(0x8100, tcp(VM4, 1, REMOTE4, 2, TCP_SYN), true),
            REASON_DROP_VLAN,
        ),
        out_drop(
            "802.1ad tag from the VM",
            vlan(0x88a8, tcp(VM4, 1, REMOTE4, 2, TCP_SYN), true),
            REASON_DROP_VLAN,
        ),
        in_drop(
            "802.1Q tag towards the VM",
            vlan(0x8100, tcp(REMOTE4, 1, VM4, 22, TCP_SYN), false),
            REASON_DROP_VLAN,
        ),
        out_drop(
            "LLDP from the VM",
            ether(VM_MAC, [1, 0x80, 0xc2, 0, 0, 0xe], 0x88cc, vec![0; 40]),
            REASON_DROP_ETHERTYPE,
        ),
        out_drop(
            "802.3 length field from the VM",
            ether(VM_MAC, [1, 0x80, 0xc2, 0, 0, 0], 0x0026, vec![0x42; 38]),
            REASON_DROP_ETHERTYPE,
        ),
        out_drop(
            "IPX from the VM",
            ether(VM_MAC, GW_MAC, 0x8137, vec![0; 30]),
            REASON_DROP_ETHERTYPE,
        ),
        in_ok(
            "LLDP towards the VM",
            ether(GW_MAC, VM_MAC, 0x88cc, vec![0; 40]),
            REASON_ALLOW_NON_IP,
        ),
        in_ok(
            "ARP towards the VM",
            arp(GW_MAC, 1, GW_MAC, ROUTER4, VM4),
            REASON_ALLOW_NON_IP,
        ),
        out_drop(
            "IPv4 version 5",
            patch(tcp_out.clone(), 14, &[0x55]),
            REASON_DROP_MALFORMED,
        ),
        out_drop(
            "IPv4 IHL 4",
            patch(tcp_out.clone(), 14, &[0x44]),
            REASON_DROP_MALFORMED,
        ),
        out_drop(
            "IPv4 total length below the header",
            patch(tcp_out.clone(), 16, &[0, 16]),
            REASON_DROP_MALFORMED,
        ),
        out_drop(
            "IPv4 total length beyond the frame",
            patch(tcp_out.clone(), 16, &[0, 200]),
            REASON_DROP_MALFORMED,
        ),
        out_drop(
            "IPv4 IHL beyond the total length",
            patch(tcp_out.clone(), 14, &[0x4f]),
            REASON_DROP_MALFORMED,
        ),
        out_drop(
            "TCP header of 10 bytes",
            from_vm(raw(VM4, REMOTE4, 6, &[0; 10])),
            REASON_DROP_MALFORMED,
        ),
        out_drop(
            "UDP header of 6 bytes",
            from_vm(raw(VM4, REMOTE4, 17, &[0; 6])),
            REASON_DROP_MALFORMED,
        ),
        out_drop(
            "ICMP header of 4 bytes",
            from_vm(raw(VM4, REMOTE4, 1, &[8, 0, 0, 0])),
            REASON_DROP_MALFORMED,
        ),
        out_drop(
            "SCTP header of 2 bytes",
            from_vm(raw(VM4, REMOTE4, 132, &[0, 1])),
            REASON_DROP_MALFORMED,
        ),
        in_drop(
            "TCP cut by the frame end",
            to_vm(tcp(REMOTE4, 1, VM4, 22, TCP_SYN))[..44].to_vec(),
            REASON_DROP_MALFORMED,
        ),
        in_drop(
            "IPv6 version 4",
            patch(v6_in.clone(), 14, &[0x40]),
            REASON_DROP_MALFORMED,
        ),
        in_drop(
            "IPv6 payload beyond the frame",
            patch(v6_in.clone(), 18, &[0, 200]),
            REASON_DROP_MALFORMED,
        ),
        in_drop(
            "IPv6 TCP header of 10 bytes",
            to_vm(raw(REMOTE6, VM6, 6, &[0; 10])),
            REASON_DROP_MALFORMED,
        ),
        in_drop(
            "IPv6 hop-by-hop longer than the packet",
            patch(
                to_vm(tcp(REMOTE6, 1, VM6, 22, TCP_SYN).with_ipv6_ext(0, 8)),
                55,
                &[100],
            ),
            REASON_DROP_MALFORMED,
        ),
        in_drop(
            "IPv6 seven extension headers",
            to_vm((0..7).fold(tcp(REMOTE6, 1, VM6, 22, TCP_SYN), |p, _| p.with_ipv6_ext(60, 8))),
            REASON_DROP_IPV6_EXT,
        ),
        in_ok(
            "IPv6 six extension headers, then TCP 22",
            to_vm((0..6).fold(tcp(REMOTE6, 1, VM6, 22, TCP_SYN), |p, _| p.with_ipv6_ext(60, 8))),
            REASON_ALLOW_RULE,
        )
        .rule(5),
        in_ok(
            "IPv4 options, TCP 22",
            to_vm(tcp(REMOTE4, 1, VM4, 22, TCP_SYN).with_ipv4_options(vec![1; 8])),
            REASON_ALLOW_RULE,
        )
        .rule(1),
        in_drop(
            "IPv4 options, TCP 23",
            to_vm(tcp(REMOTE4, 1, VM4, 23, TCP_SYN).with_ipv4_options(vec![1; 40])),
            REASON_DROP_NO_RULE,
        ),
        in_ok(
            "IPv6 hop-by-hop, TCP 22",
            to_vm(tcp(REMOTE6, 1, VM6, 22, TCP_SYN).with_ipv6_ext(0, 8)),
            REASON_ALLOW_RULE,
        )
        .rule(5),
        in_ok(
            "IPv6 routing and destination options, UDP 53",
            to_vm(
                udp(REMOTE6, 1, VM6, 53)
                    .with_ipv6_ext(43, 24)
                    .with_ipv6_ext(60, 16),
            ),
            REASON_ALLOW_RULE,
        )
        .rule(13),
        in_ok(
            "IPv6 AH, TCP 22",
            to_vm(tcp(REMOTE6, 1, VM6, 22, TCP_SYN).with_ipv6_ext(51, 24)),
            REASON_ALLOW_RULE,
        )
        .rule(5),
        in_drop(
            "IPv6 AH, TCP 23",
            to_vm(tcp(REMOTE6, 1, VM6, 23, TCP_SYN).with_ipv6_ext(51, 16)),
            REASON_DROP_NO_RULE,
        ),
        in_ok(
            "SCTP 9999",
            to_vm(raw(
                REMOTE4,
                VM4,
                132,
                &[0x9c, 0x40, 0x27, 0x0f, 0, 0, 0, 0, 0, 0, 0, 0],
            )),
            REASON_ALLOW_RULE,
        )
        .rule(9),
        in_drop(
            "SCTP 9998",
            to_vm(raw(REMOTE4, VM4, 132, &[0x9c, 0x40, 0x27, 0x0e, 0, 0, 0, 0])),
            REASON_DROP_NO_RULE,
        ),
        in_ok(
            "DCCP 5000",
            to_vm(raw(REMOTE4, VM4, 33, &[0x9c, 0x40, 0x13, 0x88, 0, 0, 0, 0])),
            REASON_ALLOW_RULE,
        )
        .rule(10),
        in_ok(
            "UDP-Lite 7000",
            to_vm(raw(REMOTE4, VM4, 136, &[0x9c, 0x40, 0x1b, 0x58, 0, 0, 0, 0])),
            REASON_ALLOW_RULE,
        )
        .rule(11),
        in_ok(
            "GRE from an allowed remote",
            to_vm(raw("198.51.100.7", VM4, 47, &[0; 8])),
            REASON_ALLOW_RULE,
        )
        .rule(12),
        in_drop(
            "GRE from another remote",
            to_vm(raw(REMOTE4, VM4, 47, &[0; 8])),
            REASON_DROP_NO_RULE,
        ),
        in_drop(
            "protocol 58 inside IPv4 is just a number",
            to_vm(raw(REMOTE4, VM4, 58, &[128, 0, 0, 0, 0, 0, 0, 0])),
            REASON_DROP_NO_RULE,
        ),
        in_drop(
            "IPv6 no next header (59) is conntrack-INVALID",
            to_vm(raw(REMOTE6, VM6, 59, &[])),
            REASON_DROP_INVALID,
        ),
        out_drop(
            "ARP cut short",
            ether(VM_MAC, [0xff; 6], 0x0806, vec![0, 1, 8, 0, 6, 4, 0, 1])[..24].to_vec(),
            REASON_DROP_MALFORMED,
        ),
    ];
    run(&mut dp, IF, &cases, true);
}

// ------------------------------------------------------------------------------------------
// Stage 2: port security from the VM
// ------------------------------------------------------------------------------------------

#[test]
fn from_vm_ipv4_mac_spoofing_and_dhcp() {
    let mut dp = load(&base_port(), &base_rules());
    let cases = vec![
        out_ok(
            "TCP from the port's IP",
            from_vm(tcp(VM4, 1234, REMOTE4, 443, TCP_SYN)),
            REASON_ALLOW_RULE,
        )
        .rule(7),
        out_ok(
            "pair IP from the pair MAC",
            from_mac(AAP_MAC, tcp("10.0.1.7", 1, REMOTE4, 443, TCP_SYN)),
            REASON_ALLOW_RULE,
        ),
        out_drop(
            "pair IP from the port MAC",
            from_vm(tcp("10.0.1.7", 1, REMOTE4, 443, TCP_SYN)),
            REASON_DROP_SPOOF_IP,
        ),
        out_drop(
            "port IP from the pair MAC",
            from_mac(AAP_MAC, tcp(VM4, 1, REMOTE4, 443, TCP_SYN)),
            REASON_DROP_SPOOF_IP,
        ),
        out_drop(
            "foreign IP",
            from_vm(tcp("10.0.0.99", 1, REMOTE4, 443, TCP_SYN)),
            REASON_DROP_SPOOF_IP,
        ),
        out_drop(
            "IP just outside the pair CIDR",
            from_mac(AAP_MAC, udp("10.0.2.0", 1, REMOTE4, 53)),
            REASON_DROP_SPOOF_IP,
        ),
        out_drop(
            "foreign MAC",
            from_mac(EVIL_MAC, tcp(VM4, 1, REMOTE4, 443, TCP_SYN)),
            REASON_DROP_SPOOF_MAC,
        ),
        out_drop(
            "foreign MAC, IPv6",
            from_mac(EVIL_MAC, tcp(VM6, 1, REMOTE6, 443, TCP_SYN)),
            REASON_DROP_SPOOF_MAC,
        ),
        out_ok(
            "DHCP discover from 0.0.0.0",
            from_vm(udp("0.0.0.0", 68, "255.255.255.255", 67)),
            REASON_ALLOW_DHCP_CLIENT,
        ),
        out_drop(
            "DHCP discover from a foreign MAC",
            from_mac(EVIL_MAC, udp("0.0.0.0", 68, "255.255.255.255", 67)),
            REASON_DROP_SPOOF_MAC,
        ),
        out_drop(
            "0.0.0.0 to a unicast server",
            from_vm(udp("0.0.0.0", 68, ROUTER4, 67)),
            REASON_DROP_SPOOF_IP,
        ),
        out_ok(
            "DHCP renew",
            from_vm(udp(VM4, 68, ROUTER4, 67)),
            REASON_ALLOW_DHCP_CLIENT,
        ),
        out_ok(
            "DHCP from a pair IP",
            from_mac(AAP_MAC, udp("10.0.1.9", 68, ROUTER4, 67)),
            REASON_ALLOW_DHCP_CLIENT,
        ),
        out_drop(
            "DHCP server reply from the VM",
            from_vm(udp(VM4, 67, "10.0.0.6", 68)),
            REASON_DROP_DHCP_SPOOF,
        ),
        out_drop(
            "DHCP server reply, spoofed source",
            from_vm(udp("10.0.0.99", 67, "10.0.0.6", 68)),
            REASON_DROP_SPOOF_IP,
        ),
        out_drop(
            "DHCP server broadcast reply",
            from_vm(udp(VM4, 67, "255.255.255.255", 68)),
            REASON_DROP_DHCP_SPOOF,
        ),
        out_ok(
            "UDP 68 to 68 is no DHCP",
            from_vm(udp(VM4, 68, ROUTER4, 68)),
            REASON_ALLOW_RULE,
        ),
        out_ok(
            "ICMP echo",
            from_vm(icmp(VM4, REMOTE4, 8, 0, 7)),
            REASON_ALLOW_RULE,
        ),
    ];
    run(&mut dp, IF, &cases, true);
}

#[test]
fn from_vm_arp() {
    let mut dp = load(&base_port(), &base_rules());
    let mut bad_ptype = arp(VM_MAC, 1, VM_MAC, VM4, ROUTER4);
    bad_ptype[16..18].copy_from_slice(&[0x86, 0xdd]);
    let mut bad_plen = arp(VM_MAC, 1, VM_MAC, VM4, ROUTER4);
    bad_plen[19] = 16;
    let cases = vec![
        out_ok("request", arp(VM_MAC, 1, VM_MAC, VM4, ROUTER4), REASON_ALLOW_ARP),
        out_ok("reply", arp(VM_MAC, 2, VM_MAC, VM4, ROUTER4), REASON_ALLOW_ARP),
        out_ok("gratuitous", arp(VM_MAC, 1, VM_MAC, VM4, VM4), REASON_ALLOW_ARP),
        out_ok(
            "probe from 0.0.0.0",
            arp(VM_MAC, 1, VM_MAC, "0.0.0.0", VM4),
            REASON_ALLOW_ARP,
        ),
        out_drop(
            "spoofed sender IP",
            arp(VM_MAC, 2, VM_MAC, "10.0.0.99", ROUTER4),
            REASON_DROP_SPOOF_ARP,
        ),
        out_drop(
            "router's IP",
            arp(VM_MAC, 2, VM_MAC, ROUTER4, "10.0.0.6"),
            REASON_DROP_SPOOF_ARP,
        ),
        out_drop(
            "sender MAC differs from the source MAC",
            arp(VM_MAC, 2, EVIL_MAC, VM4, ROUTER4),
            REASON_DROP_SPOOF_ARP,
        ),
        out_ok(
            "pair IP from the pair MAC",
            arp(AAP_MAC, 2, AAP_MAC, "10.0.1.20", ROUTER4),
            REASON_ALLOW_ARP,
        ),
        out_drop(
            "pair IP from the port MAC",
            arp(VM_MAC, 2, VM_MAC, "10.0.1.20", ROUTER4),
            REASON_DROP_SPOOF_ARP,
        ),
        out_drop(
            "from a foreign MAC",
            arp(EVIL_MAC, 2, EVIL_MAC, VM4, ROUTER4),
            REASON_DROP_SPOOF_MAC,
        ),
        out_drop("IPv6 protocol type", bad_ptype, REASON_DROP_SPOOF_ARP),
        out_drop("protocol address length 16", bad_plen, REASON_DROP_SPOOF_ARP),
    ];
    run(&mut dp, IF, &cases, true);
}

/// A port without fixed IPs has one MAC-only pair, which lets it send IPv4 from any address,
/// but no IPv4 address to announce: Neutron drops all of its ARP (issue 17 F1), probes too.
/// Allowed-address-pair addresses remain announceable from their MACs.
#[test]
fn from_vm_arp_without_ipv4_addresses() {
    let bare = PortSpec::new(IF, PORT, VM_MAC).stateful();
    let mut dp = load(&bare, &base_rules());
    let cases = vec![
        out_drop(
            "reply claiming the router's IP (the issue's frame)",
            arp(VM_MAC, 2, VM_MAC, "192.168.206.1", "192.168.206.10"),
            REASON_DROP_SPOOF_ARP,
        ),
        out_drop(
            "request from an address of its own choosing",
            arp(VM_MAC, 1, VM_MAC, VM4, ROUTER4),
            REASON_DROP_SPOOF_ARP,
        ),
        out_drop(
            "probe",
            arp(VM_MAC, 1, VM_MAC, "0.0.0.0", VM4),
            REASON_DROP_SPOOF_ARP,
        ),
        out_ok(
            "IPv4 from any source still passes the MAC-only pair",
            from_vm(udp("192.0.2.77", 1, REMOTE4, 53)),
            REASON_ALLOW_RULE,
        ),
    ];
    run(&mut dp, IF, &cases, true);

    let v6_only = PortSpec::new(IF, PORT, VM_MAC).fixed_ip(VM6).stateful();
    let mut dp = load(&v6_only, &base_rules());
    let cases = vec![out_drop(
        "an IPv6-only port: any ARP",
        arp(VM_MAC, 1, VM_MAC, VM4, ROUTER4),
        REASON_DROP_SPOOF_ARP,
    )];
    run(&mut dp, IF, &cases, true);

    let with_pair = PortSpec::new(IF, PORT, VM_MAC).pair(AAP_MAC, AAP4).stateful();
    let mut dp = load(&with_pair, &base_rules());
    let cases = vec![
        out_ok(
            "pair IP from the pair MAC",
            arp(AAP_MAC, 2, AAP_MAC, "10.0.1.20", ROUTER4),
            REASON_ALLOW_ARP,
        ),
        out_ok(
            "probe from the pair MAC",
            arp(AAP_MAC, 1, AAP_MAC, "0.0.0.0", "10.0.1.20"),
            REASON_ALLOW_ARP,
        ),
        out_drop(
            "another IP from the pair MAC",
            arp(AAP_MAC, 2, AAP_MAC, "192.168.206.1", ROUTER4),
            REASON_DROP_SPOOF_ARP,
        ),
        out_drop(
            "anything from the port MAC, which has no address",
            arp(VM_MAC, 2, VM_MAC, "10.0.1.20", ROUTER4),
            REASON_DROP_SPOOF_ARP,
        ),
        out_drop(
            "probe from the port MAC",
            arp(VM_MAC, 1, VM_MAC, "0.0.0.0", ROUTER4),
            REASON_DROP_SPOOF_ARP,
        ),
    ];
    run(&mut dp, IF, &cases, true);

    let open = PortSpec::new(IF, PORT, VM_MAC)
        .pair(VM_MAC, "0.0.0.0/0")
        .stateful();
    let mut dp = load(&open, &base_rules());
    let cases = vec![out_ok(
        "an IPv4 pair of /0 turns ARP protection off",
        arp(VM_MAC, 2, VM_MAC, "192.168.206.1", ROUTER4),
        REASON_ALLOW_ARP,
    )];
    run(&mut dp, IF, &cases, true);
}

#[test]
fn from_vm_ipv6() {
    let mut dp = load(&base_port(), &base_rules());
    let mldv2 = icmp("::", "ff02::16", 143, 0, 0).with_ipv6_ext(0, 8);
    let cases = vec![
        out_ok(
            "TCP from the fixed IPv6",
            from_vm(tcp(VM6, 1, REMOTE6, 443, TCP_SYN)),
            REASON_ALLOW_RULE,
        )
        .rule(8),
        out_ok(
            "TCP from the port's link-local",
            from_vm(tcp(VM_LL, 1, "fe80::1", 443, TCP_SYN)),
            REASON_ALLOW_RULE,
        ),
        out_ok(
            "pair MAC's link-local",
            from_mac(AAP_MAC, tcp(AAP_LL, 1, REMOTE6, 443, TCP_SYN)),
            REASON_ALLOW_RULE,
        ),
        out_ok(
            "inside the pair prefix",
            from_mac(AAP_MAC, udp("2001:db8:a::7", 1, REMOTE6, 53)),
            REASON_ALLOW_RULE,
        ),
        out_drop(
            "pair link-local from the port MAC",
            from_vm(tcp(AAP_LL, 1, REMOTE6, 443, TCP_SYN)),
            REASON_DROP_SPOOF_IP,
        ),
        out_drop(
            "spoofed IPv6",
            from_vm(tcp("2001:db8::99", 1, REMOTE6, 443, TCP_SYN)),
            REASON_DROP_SPOOF_IP,
        ),
        out_ok(
            "DAD neighbour solicitation",
            from_vm(icmp("::", "ff02::1:ff00:5", 135, 0, 0)),
            REASON_ALLOW_DAD_MLD,
        ),
        out_ok(
            "MLDv2 report from :: with hop-by-hop",
            from_vm(mldv2),
            REASON_ALLOW_DAD_MLD,
        ),
        out_ok(
            "MLDv1 report from ::",
            from_vm(icmp("::", "ff02::1:ff00:5", 131, 0, 0)),
            REASON_ALLOW_DAD_MLD,
        ),
        out_drop(
            "NS from :: to a unicast address",
            from_vm(icmp("::", "2001:db8::1", 135, 0, 0)),
            REASON_DROP_SPOOF_IP,
        ),
        out_drop(
            "echo request from :: to ff02::1",
            from_vm(icmp("::", "ff02::1", 128, 0, 1)),
            REASON_DROP_SPOOF_IP,
        ),
        out_drop(
            "DAD from a foreign MAC",
            from_mac(EVIL_MAC, icmp("::", "ff02::1:ff00:5", 135, 0, 0)),
            REASON_DROP_SPOOF_MAC,
        ),
        out_ok(
            "neighbour solicitation",
            from_vm(icmp(VM_LL, "ff02::1:ff00:1", 135, 0, 0)),
            REASON_ALLOW_ICMP6,
        ),
        out_ok(
            "neighbour advertisement",
            from_vm(icmp(VM_LL, "fe80::1", 136, 0, 0)),
            REASON_ALLOW_ICMP6,
        ),
        out_ok(
            "router solicitation",
            from_vm(icmp(VM_LL, "ff02::2", 133, 0, 0)),
            REASON_ALLOW_ICMP6,
        ),
        out_drop(
            "router advertisement",
            from_vm(icmp(VM_LL, "ff02::1", 134, 0, 0)),
            REASON_DROP_RA,
        ),
        out_drop(
            "router advertisement, spoofed source",
            from_vm(icmp("fe80::99", "ff02::1", 134, 0, 0)),
            REASON_DROP_SPOOF_IP,
        ),
        out_ok(
            "echo request",
            from_vm(icmp(VM6, REMOTE6, 128, 0, 9)),
            REASON_ALLOW_ICMP6,
        ),
        out_ok(
            "an ICMPv6 error",
            from_vm(icmp(VM6, REMOTE6, 1, 4, 0)),
            REASON_ALLOW_ICMP6,
        ),
        out_ok(
            "redirect",
            from_vm(icmp(VM_LL, "fe80::7", 137, 0, 0)),
            REASON_ALLOW_ICMP6,
        ),
        out_ok(
            "DHCPv6 solicit",
            from_vm(udp(VM_LL, 546, "ff02::1:2", 547)),
            REASON_ALLOW_DHCP6_CLIENT,
        ),
        out_drop(
            "DHCPv6 advertise from the VM",
            from_vm(udp(VM_LL, 547, "fe80::9", 546)),
            REASON_DROP_DHCP6_SPOOF,
        ),
        out_ok("UDP", from_vm(udp(VM6, 5000, REMOTE6, 53)), REASON_ALLOW_RULE).rule(8),
    ];
    run(&mut dp, IF, &cases, true);
}

#[test]
fn from_vm_without_egress_rules() {
    // Only ingress rules: the fixed rules still let DHCP and ICMPv6 out.
    let rules: Vec<Rule> = base_rules()
        .into_iter()
        .filter(|r| r.dir == DIR_INGRESS)
        .collect();
    let mut dp = load(&base_port(), &rules);
    let cases = vec![
        out_drop(
            "TCP",
            from_vm(tcp(VM4, 1, REMOTE4, 443, TCP_SYN)),
            REASON_DROP_NO_RULE,
        ),
        out_drop("UDP", from_vm(udp(VM4, 1, REMOTE4, 53)), REASON_DROP_NO_RULE),
        out_drop(
            "ICMP echo",
            from_vm(icmp(VM4, REMOTE4, 8, 0, 3)),
            REASON_DROP_NO_RULE,
        ),
        out_drop(
            "TCP ACK without state",
            from_vm(tcp(VM4, 1, REMOTE4, 443, TCP_ACK)),
            REASON_DROP_NO_RULE,
        ),
        out_drop(
            "TCP FIN without state",
            from_vm(tcp(VM4, 1, REMOTE4, 443, TCP_FIN | TCP_ACK)),
            REASON_DROP_INVALID,
        ),
        out_drop(
            "IPv6 TCP",
            from_vm(tcp(VM6, 1, REMOTE6, 443, TCP_SYN)),
            REASON_DROP_NO_RULE,
        ),
        out_ok(
            "ICMPv6 echo",
            from_vm(icmp(VM6, REMOTE6, 128, 0, 3)),
            REASON_ALLOW_ICMP6,
        ),
        out_ok(
            "DHCP",
            from_vm(udp(VM4, 68, ROUTER4, 67)),
            REASON_ALLOW_DHCP_CLIENT,
        ),
        out_ok(
            "DHCPv6",
            from_vm(udp(VM_LL, 546, "ff02::1:2", 547)),
            REASON_ALLOW_DHCP6_CLIENT,
        ),
    ];
    run(&mut dp, IF, &cases, true);
}

#[test]
fn spoof_chains_follow_neutrons_pair_lists() {
    // IPv4 only: no IPv6 pair list, so no IPv6 source check at all (spec §6), and no RA.
    let v4_only = PortSpec::new(IF, PORT, VM_MAC).fixed_ip(VM4).stateful();
    let mut dp = load(&v4_only, &base_rules());
    let cases = vec![
        out_ok(
            "any IPv6 source",
            from_vm(tcp("2001:db8::99", 1, REMOTE6, 443, TCP_SYN)),
            REASON_ALLOW_RULE,
        ),
        out_drop(
            "IPv4 source still checked",
            from_vm(tcp("10.0.0.99", 1, REMOTE4, 443, TCP_SYN)),
            REASON_DROP_SPOOF_IP,
        ),
        in_drop(
            "no RA without an IPv6 fixed IP",
            to_vm(icmp("fe80::1", "ff02::1", 134, 0, 0)),
            REASON_DROP_NO_RULE,
        ),
        in_ok(
            "DHCPv6 reply to fe80::/64 anyway",
            to_vm(udp("fe80::1", 547, VM_LL, 546)),
            REASON_ALLOW_DHCP6_REPLY,
        ),
    ];
    run(&mut dp, IF, &cases, true);

    // No fixed IP: a MAC-only pair in both families, any source IP from the port MAC.
    let bare = PortSpec::new(IF, PORT, VM_MAC).stateful();
    let mut dp = load(&bare, &base_rules());
    let cases = vec![
        out_ok(
            "any IPv4 source from the port MAC",
            from_vm(tcp("172.16.0.1", 1, REMOTE4, 443, TCP_SYN)),
            REASON_ALLOW_RULE,
        ),
        out_ok(
            "any IPv6 source from the port MAC",
            from_vm(tcp("2001:db8::99", 1, REMOTE6, 443, TCP_SYN)),
            REASON_ALLOW_RULE,
        ),
        out_drop(
            "but no ARP: the port has no IPv4 address to announce (as in Neutron)",
            arp(VM_MAC, 2, VM_MAC, "172.16.0.1", ROUTER4),
            REASON_DROP_SPOOF_ARP,
        ),
        out_drop(
            "still not from another MAC",
            from_mac(EVIL_MAC, tcp("172.16.0.1", 1, REMOTE4, 443, TCP_SYN)),
            REASON_DROP_SPOOF_MAC,
        ),
    ];
    run(&mut dp, IF, &cases, true);

    // An allowed address pair 0.0.0.0/0: Neutron's arp_protect skips the ARP chain.
    let open = PortSpec::new(IF, PORT, VM_MAC)
        .fixed_ip(VM4)
        .pair(AAP_MAC, "0.0.0.0/0")
        .stateful();
    let mut dp = load(&open, &base_rules());
    let cases = vec![
        out_ok(
            "ARP for any IP",
            arp(VM_MAC, 2, VM_MAC, "172.16.0.1", ROUTER4),
            REASON_ALLOW_ARP,
        ),
        out_ok(
            "ARP with another sender MAC",
            arp(VM_MAC, 2, EVIL_MAC, "172.16.0.1", ROUTER4),
            REASON_ALLOW_ARP,
        ),
        out_ok(
            "any IPv4 from the /0 pair's MAC",
            from_mac(AAP_MAC, udp("172.16.0.1", 1, REMOTE4, 53)),
            REASON_ALLOW_RULE,
        ),
        out_drop(
            "but not from the port MAC",
            from_vm(udp("172.16.0.1", 1, REMOTE4, 53)),
            REASON_DROP_SPOOF_IP,
        ),
    ];
    run(&mut dp, IF, &cases, true);
}

// ------------------------------------------------------------------------------------------
// Stage 3 and 5: towards the VM, fixed rules and security-group rules
// ------------------------------------------------------------------------------------------

#[test]
fn to_vm_fixed_rules() {
    let mut dp = load(&base_port(), &base_rules());
    let cases = vec![
        in_ok(
            "neighbour solicitation from anywhere",
            to_vm(icmp("2001:db8:ffff::1", VM6, 135, 0, 0)),
            REASON_ALLOW_ND_MLD,
        ),
        in_ok(
            "neighbour advertisement",
            to_vm(icmp("fe80::1", VM_LL, 136, 0, 0)),
            REASON_ALLOW_ND_MLD,
        ),
        in_ok(
            "MLD query",
            to_vm(icmp("fe80::1", "ff02::1", 130, 0, 0).with_ipv6_ext(0, 8)),
            REASON_ALLOW_ND_MLD,
        ),
        in_ok(
            "router advertisement",
            to_vm(icmp(ROUTER6, "ff02::1", 134, 0, 0)),
            REASON_ALLOW_RA,
        )
        .state(CT_STATE_UNTRACKED),
        in_drop(
            "MLD report",
            to_vm(icmp("fe80::9", "ff02::16", 143, 0, 0)),
            REASON_DROP_NO_RULE,
        ),
        in_drop(
            "router solicitation",
            to_vm(icmp("fe80::9", "ff02::2", 133, 0, 0)),
            REASON_DROP_NO_RULE,
        ),
        in_drop(
            "redirect is not tracked and invalid",
            to_vm(icmp(ROUTER6, VM_LL, 137, 0, 0)),
            REASON_DROP_INVALID,
        ),
        in_ok(
            "DHCP reply to the fixed IP",
            to_vm(udp(ROUTER4, 67, VM4, 68)),
            REASON_ALLOW_DHCP_REPLY,
        ),
        in_ok(
            "DHCP reply to broadcast",
            to_vm(udp(ROUTER4, 67, "255.255.255.255", 68)),
            REASON_ALLOW_DHCP_REPLY,
        ),
        in_drop(
            "DHCP reply to a pair IP",
            to_vm(udp(ROUTER4, 67, "10.0.1.7", 68)),
            REASON_DROP_NO_RULE,
        ),
        in_drop(
            "DHCP reply from another port",
            to_vm(udp(ROUTER4, 68, VM4, 68)),
            REASON_DROP_NO_RULE,
        ),
        in_ok(
            "DHCPv6 reply to the link-local",
            to_vm(udp("fe80::1", 547, VM_LL, 546)),
            REASON_ALLOW_DHCP6_REPLY,
        ),
        in_ok(
            "DHCPv6 reply to the fixed IPv6",
            to_vm(udp("2001:db8::1", 547, VM6, 546)),
            REASON_ALLOW_DHCP6_REPLY,
        ),
        in_drop(
            "DHCPv6 reply to another address",
            to_vm(udp("2001:db8::1", 547, "2001:db8::77", 546)),
            REASON_DROP_NO_RULE,
        ),
    ];
    run(&mut dp, IF, &cases, true);
}

#[test]
fn to_vm_icmp_states_and_rules() {
    let mut dp = load(&base_port(), &base_rules());
    let cases = vec![
        in_ok(
            "echo request 8/0",
            to_vm(icmp(REMOTE4, VM4, 8, 0, 1)),
            REASON_ALLOW_RULE,
        )
        .rule(3)
        .state(CT_STATE_NEW),
        in_drop(
            "echo request 8/1 (rule is 8/0)",
            to_vm(icmp(REMOTE4, VM4, 8, 1, 1)),
            REASON_DROP_NO_RULE,
        ),
        in_drop(
            "echo reply without a request",
            to_vm(icmp(REMOTE4, VM4, 0, 0, 1)),
            REASON_DROP_INVALID,
        ),
        in_drop(
            "router advertisement (9) is not tracked",
            to_vm(icmp(ROUTER4, VM4, 9, 0, 0)),
            REASON_DROP_INVALID,
        ),
        in_drop(
            "router solicitation (10)",
            to_vm(icmp(ROUTER4, VM4, 10, 0, 0)),
            REASON_DROP_INVALID,
        ),
        in_drop(
            "type 1 (unassigned)",
            to_vm(icmp(ROUTER4, VM4, 1, 0, 0)),
            REASON_DROP_INVALID,
        ),
        in_drop(
            "type 19, above Linux's NR_ICMP_TYPES",
            to_vm(icmp(ROUTER4, VM4, 19, 0, 0)),
            REASON_DROP_INVALID,
        ),
        in_drop(
            "timestamp request without rule",
            to_vm(icmp(REMOTE4, VM4, 13, 0, 1)),
            REASON_DROP_NO_RULE,
        )
        .state(CT_STATE_NEW),
        in_drop(
            "timestamp reply without request",
            to_vm(icmp(REMOTE4, VM4, 14, 0, 1)),
            REASON_DROP_INVALID,
        ),
        in_drop(
            "information request",
            to_vm(icmp(REMOTE4, VM4, 15, 0, 1)),
            REASON_DROP_NO_RULE,
        ),
        in_drop(
            "address mask request",
            to_vm(icmp(REMOTE4, VM4, 17, 0, 1)),
            REASON_DROP_NO_RULE,
        ),
        in_drop(
            "destination unreachable about nothing",
            to_vm(icmp(ROUTER4, VM4, 3, 1, 0)),
            REASON_DROP_INVALID,
        ),
        in_drop(
            "time exceeded about nothing",
            to_vm(icmp_error(ROUTER4, VM4, 11, 0, &udp(VM4, 1, REMOTE4, 2))),
            REASON_DROP_INVALID,
        ),
        in_ok(
            "ICMPv6 echo request",
            to_vm(icmp(REMOTE6, VM6, 128, 0, 1)),
            REASON_ALLOW_RULE,
        )
        .rule(6),
        in_ok(
            "ICMPv6 echo request code 1 (rule has no code)",
            to_vm(icmp(REMOTE6, VM6, 128, 1, 1)),
            REASON_ALLOW_RULE,
        )
        .rule(6),
        in_drop(
            "ICMPv6 echo reply without request",
            to_vm(icmp(REMOTE6, VM6, 129, 0, 1)),
            REASON_DROP_INVALID,
        ),
        in_drop(
            "ICMPv6 node information query",
            to_vm(icmp(REMOTE6, VM6, 139, 0, 1)),
            REASON_DROP_NO_RULE,
        ),
        in_drop(
            "ICMPv6 node information reply",
            to_vm(icmp(REMOTE6, VM6, 140, 0, 1)),
            REASON_DROP_INVALID,
        ),
        in_drop(
            "ICMPv6 type 200",
            to_vm(icmp(REMOTE6, VM6, 200, 0, 1)),
            REASON_DROP_INVALID,
        ),
        in_drop(
            "ICMPv6 packet too big about nothing",
            to_vm(icmp_error(ROUTER6, VM6, 2, 0, &udp(VM6, 1, REMOTE6, 2))),
            REASON_DROP_INVALID,
        ),
        in_drop(
            "ICMPv6 type 100 (unassigned error) about nothing",
            to_vm(icmp(ROUTER6, VM6, 100, 0, 0)),
            REASON_DROP_INVALID,
        ),
    ];
    run(&mut dp, IF, &cases, true);
}

#[test]
fn to_vm_tcp_flags_and_states() {
    let mut dp = load(&base_port(), &base_rules());
    let f = |flags: u8, port: u16| to_vm(tcp(REMOTE4, 40000, VM4, port, flags));
    let mut doff4 = f(TCP_SYN, 23);
    doff4[46] = 0x40;
    let mut doff4_22 = f(TCP_SYN, 22);
    doff4_22[46] = 0x40;
    let mut doff_big = f(TCP_SYN, 23);
    doff_big[46] = 0xf0;
    let cases = vec![
        in_ok("SYN to 22", f(TCP_SYN, 22), REASON_ALLOW_RULE)
            .rule(1)
            .state(CT_STATE_NEW),
        in_drop("SYN to 23", f(TCP_SYN, 23), REASON_DROP_NO_RULE).state(CT_STATE_NEW),
        in_ok(
            "bare ACK to 22 picks up a flow",
            f(TCP_ACK, 22),
            REASON_ALLOW_RULE,
        )
        .state(CT_STATE_NEW),
        in_drop("bare ACK to 23", f(TCP_ACK, 23), REASON_DROP_NO_RULE).state(CT_STATE_NEW),
        in_drop("PSH|ACK to 23", f(TCP_PSH | TCP_ACK, 23), REASON_DROP_NO_RULE),
        in_ok(
            "SYN-ACK without state, allowed by a rule",
            f(TCP_SYN | TCP_ACK, 22),
            REASON_ALLOW_RULE,
        )
        .state(CT_STATE_INVALID),
        in_drop(
            "SYN-ACK without state",
            f(TCP_SYN | TCP_ACK, 23),
            REASON_DROP_INVALID,
        ),
        in_drop(
            "FIN-ACK without state",
            f(TCP_FIN | TCP_ACK, 23),
            REASON_DROP_INVALID,
        ),
        in_drop("RST without state", f(TCP_RST, 23), REASON_DROP_INVALID),
        in_drop(
            "RST-ACK without state",
            f(TCP_RST | TCP_ACK, 23),
            REASON_DROP_INVALID,
        ),
        in_drop("SYN|FIN", f(TCP_SYN | TCP_FIN, 23), REASON_DROP_INVALID),
        in_ok(
            "SYN|FIN allowed by a rule anyway",
            f(TCP_SYN | TCP_FIN, 22),
            REASON_ALLOW_RULE,
        )
        .state(CT_STATE_INVALID),
        in_drop("SYN|RST", f(TCP_SYN | TCP_RST, 23), REASON_DROP_INVALID),
        in_drop("no flags", f(0, 23), REASON_DROP_INVALID),
        in_drop("FIN alone", f(TCP_FIN, 23), REASON_DROP_INVALID),
        in_drop(
            "Xmas (FIN|PSH|URG)",
            f(TCP_FIN | TCP_PSH | TCP_URG, 23),
            REASON_DROP_INVALID,
        ),
        in_drop("URG alone", f(TCP_URG, 23), REASON_DROP_INVALID),
        in_ok(
            "SYN|ECE|CWR (ECN setup)",
            f(TCP_SYN | TCP_ECE | TCP_CWR, 22),
            REASON_ALLOW_RULE,
        )
        .state(CT_STATE_NEW),
        in_drop(
            "SYN|URG is a valid new flow",
            f(TCP_SYN | TCP_URG, 23),
            REASON_DROP_NO_RULE,
        )
        .state(CT_STATE_NEW),
        in_drop(
            "ACK|URG is a valid pickup",
            f(TCP_ACK | TCP_URG, 23),
            REASON_DROP_NO_RULE,
        )
        .state(CT_STATE_NEW),
        in_drop("data offset 4", doff4, REASON_DROP_INVALID),
        in_ok("data offset 4, allowed by a rule", doff4_22, REASON_ALLOW_RULE).state(CT_STATE_INVALID),
        in_drop("data offset beyond the packet", doff_big, REASON_DROP_INVALID),
    ];
    run(&mut dp, IF, &cases, true);
}

#[test]
fn to_vm_rule_matching() {
    let mut dp = load(&base_port(), &base_rules());
    let mut bad_udp_len = to_vm(udp(REMOTE4, 1, VM4, 12345));
    bad_udp_len[38..40].copy_from_slice(&[0, 4]);
    let mut long_udp_len = to_vm(udp(REMOTE4, 1, VM4, 9));
    long_udp_len[38..40].copy_from_slice(&[0, 200]);
    let cases = vec![
        in_ok(
            "HTTP from inside the remote prefix",
            syn_in_from("192.0.2.200", 80),
            REASON_ALLOW_RULE,
        )
        .rule(2),
        in_drop(
            "HTTP from outside it",
            syn_in_from("198.51.100.1", 80),
            REASON_DROP_NO_RULE,
        ),
        in_ok(
            "port range, low end",
            to_vm(udp(REMOTE4, 1, VM4, 12345)),
            REASON_ALLOW_RULE,
        )
        .rule(4),
        in_ok(
            "port range, high end",
            to_vm(udp(REMOTE4, 1, VM4, 12346)),
            REASON_ALLOW_RULE,
        )
        .rule(4),
        in_drop(
            "port range, below",
            to_vm(udp(REMOTE4, 1, VM4, 12344)),
            REASON_DROP_NO_RULE,
        ),
        in_drop(
            "port range, above",
            to_vm(udp(REMOTE4, 1, VM4, 12347)),
            REASON_DROP_NO_RULE,
        ),
        in_drop("TCP on a UDP rule's port", syn_in(12345), REASON_DROP_NO_RULE),
        in_drop(
            "an IPv4 rule does not allow IPv6",
            to_vm(tcp(REMOTE6, 1, VM6, 80, TCP_SYN)),
            REASON_DROP_NO_RULE,
        ),
        in_ok(
            "IPv6 TCP 22",
            to_vm(tcp(REMOTE6, 1, VM6, 22, TCP_SYN)),
            REASON_ALLOW_RULE,
        )
        .rule(5),
        in_ok(
            "UDP with a bad length, allowed by a rule",
            bad_udp_len,
            REASON_ALLOW_RULE,
        )
        .state(CT_STATE_INVALID),
        in_drop("UDP length beyond the packet", long_udp_len, REASON_DROP_INVALID),
        in_ok(
            "ingress to a pair address",
            to_vm(tcp(REMOTE4, 1, "10.0.1.7", 22, TCP_SYN)),
            REASON_ALLOW_RULE,
        ),
    ];
    run(&mut dp, IF, &cases, true);
}

fn syn_in_from(src: &str, dport: u16) -> Vec<u8> {
    to_vm(tcp(src, 40000, VM4, dport, TCP_SYN))
}

#[test]
fn any_protocol_rules_and_rule_order() {
    // The first rule that admits a packet is the one recorded.
    let rules = vec![
        Rule::ingress_v4().tcp(1000, 2000),                       // 1
        Rule::ingress_v4().tcp(1500, 1500),                       // 2: never first
        Rule::ingress_v4().remote("203.0.113.0/24"),              // 3: anything from there
        Rule::ingress_v4().tcp(3000, 3000).remote("203.0.113.7"), // 4: shadowed by 3
        Rule::ingress_v6().remote("2001:db8:77::/48"),            // 5
    ];
    let mut dp = load(&base_port(), &rules);
    let cases = vec![
        in_ok("1500 is rule 1's", syn_in(1500), REASON_ALLOW_RULE).rule(1),
        in_ok("2000 is rule 1's", syn_in(2000), REASON_ALLOW_RULE).rule(1),
        in_drop("2001", syn_in(2001), REASON_DROP_NO_RULE),
        in_ok(
            "TCP 3000 from 203.0.113.7 is rule 3's",
            syn_in_from("203.0.113.7", 3000),
            REASON_ALLOW_RULE,
        )
        .rule(3),
        in_ok(
            "TCP 1200 from 203.0.113.7 is rule 1's",
            syn_in_from("203.0.113.7", 1200),
            REASON_ALLOW_RULE,
        )
        .rule(1),
        in_ok(
            "UDP from 203.0.113.9",
            to_vm(udp("203.0.113.9", 1, VM4, 9)),
            REASON_ALLOW_RULE,
        )
        .rule(3),
        in_ok(
            "GRE from 203.0.113.9",
            to_vm(raw("203.0.113.9", VM4, 47, &[0; 4])),
            REASON_ALLOW_RULE,
        )
        .rule(3),
        in_ok(
            "an echo reply that is INVALID, allowed by rule 3",
            to_vm(icmp("203.0.113.9", VM4, 0, 0, 1)),
            REASON_ALLOW_RULE,
        )
        .state(CT_STATE_INVALID),
        in_drop(
            "UDP from 203.0.114.9",
            to_vm(udp("203.0.114.9", 1, VM4, 9)),
            REASON_DROP_NO_RULE,
        ),
        in_ok(
            "IPv6 anything from the /48",
            to_vm(udp("2001:db8:77:1::1", 1, VM6, 9)),
            REASON_ALLOW_RULE,
        )
        .rule(5),
        in_drop(
            "IPv6 from outside",
            to_vm(udp("2001:db8:78::1", 1, VM6, 9)),
            REASON_DROP_NO_RULE,
        ),
        in_drop(
            "egress has no rule",
            from_vm(udp(VM4, 1, "203.0.113.9", 9)),
            REASON_DROP_NO_RULE,
        ),
    ];
    run(&mut dp, IF, &cases, true);
}

// ------------------------------------------------------------------------------------------
// Fragments
// ------------------------------------------------------------------------------------------

#[test]
fn fragments_follow_the_first() {
    let mut dp = load(&base_port(), &base_rules());
    let first = |dport: u16, id: u32| {
        to_vm(
            udp(REMOTE4, 1, VM4, dport)
                .with_payload(vec![0; 16])
                .fragment(0, true, id),
        )
    };
    let later = |src: &str, id: u32| to_vm(raw(src, VM4, 17, &[0; 24]).fragment(3, false, id));
    let first6 = |dport: u16, id: u32| {
        to_vm(
            udp(REMOTE6, 1, VM6, dport)
                .with_payload(vec![0; 16])
                .fragment(0, true, id),
        )
    };
    let later6 = |id: u32| to_vm(raw(REMOTE6, VM6, 17, &[0; 24]).fragment(3, false, id));
    let cases = vec![
        in_ok(
            "IPv4 first fragment, allowed port",
            first(12345, 100),
            REASON_ALLOW_RULE,
        )
        .rule(4),
        in_ok("its second fragment", later(REMOTE4, 100), REASON_ALLOW_FRAG).rule(4),
        in_ok("its last fragment, again", later(REMOTE4, 100), REASON_ALLOW_FRAG),
        in_drop(
            "same id, another source",
            later("192.0.2.11", 100),
            REASON_DROP_FRAG_NO_FIRST,
        ),
        in_drop("another id", later(REMOTE4, 101), REASON_DROP_FRAG_NO_FIRST),
        in_drop(
            "IPv4 first fragment, closed port",
            first(9, 200),
            REASON_DROP_NO_RULE,
        ),
        in_drop("its later fragment", later(REMOTE4, 200), REASON_DROP_FRAG_DENIED),
        in_drop(
            "first fragment cutting the TCP header",
            to_vm(raw(REMOTE4, VM4, 6, &[0; 8]).fragment(0, true, 300)),
            REASON_DROP_MALFORMED,
        ),
        in_ok("IPv6 first fragment", first6(53, 7), REASON_ALLOW_RULE).rule(13),
        in_ok("IPv6 later fragment", later6(7), REASON_ALLOW_FRAG).rule(13),
        in_drop(
            "IPv6 later fragment, unknown id",
            later6(8),
            REASON_DROP_FRAG_NO_FIRST,
        ),
        in_drop(
            "IPv6 first fragment, closed port",
            first6(54, 9),
            REASON_DROP_NO_RULE,
        ),
        in_drop("IPv6 its later fragment", later6(9), REASON_DROP_FRAG_DENIED),
        in_ok(
            "IPv6 atomic fragment is a whole packet",
            to_vm(udp(REMOTE6, 1, VM6, 53).fragment(0, false, 10)),
            REASON_ALLOW_RULE,
        ),
        in_ok(
            "IPv6 later fragment after a hop-by-hop header",
            to_vm(
                raw(REMOTE6, VM6, 17, &[0; 8])
                    .with_ipv6_ext(0, 8)
                    .fragment(5, true, 7),
            ),
            REASON_ALLOW_FRAG,
        ),
        out_ok(
            "from the VM: first fragment",
            from_vm(
                udp(VM4, 1, REMOTE4, 53)
                    .with_payload(vec![0; 16])
                    .fragment(0, true, 400),
            ),
            REASON_ALLOW_RULE,
        ),
        out_ok(
            "from the VM: later fragment",
            from_vm(raw(VM4, REMOTE4, 17, &[0; 16]).fragment(3, false, 400)),
            REASON_ALLOW_FRAG,
        ),
        out_drop(
            "from the VM: later fragment, foreign MAC",
            from_mac(EVIL_MAC, raw(VM4, REMOTE4, 17, &[0; 16]).fragment(3, false, 400)),
            REASON_DROP_SPOOF_MAC,
        ),
        out_drop(
            "from the VM: spoofed first fragment",
            from_vm(udp("10.0.0.99", 1, REMOTE4, 53).fragment(0, true, 401)),
            REASON_DROP_SPOOF_IP,
        ),
        out_drop(
            "from the VM: its later fragment",
            from_vm(raw("10.0.0.99", REMOTE4, 17, &[0; 16]).fragment(3, false, 401)),
            REASON_DROP_FRAG_DENIED,
        ),
        in_drop(
            "a later fragment in the other direction",
            to_vm(raw(REMOTE4, VM4, 17, &[0; 16]).fragment(3, false, 400)),
            REASON_DROP_FRAG_NO_FIRST,
        ),
    ];
    // One sequence: later fragments need their first.
    run(&mut dp, IF, &cases, false);
}

/// An IPv6 frame towards the VM whose IP payload (as the payload length says) is `payload`,
/// followed by `trailer`: bytes in the frame beyond the IP packet, as padding or a crafted
/// frame may carry.
fn v6_to_vm(next: u8, payload: &[u8], trailer: &[u8]) -> Vec<u8> {
    let mut bytes = sg_user::packet::ipv6_header(ip6(REMOTE6), ip6(VM6), next, payload.len(), 64);
    bytes.extend_from_slice(payload);
    bytes.extend_from_slice(trailer);
    ether(GW_MAC, VM_MAC, 0x86dd, bytes)
}

fn ip6(s: &str) -> [u8; 16] {
    match ip(s) {
        std::net::IpAddr::V6(a) => a.octets(),
        std::net::IpAddr::V4(_) => panic!("{s} is not IPv6"),
    }
}

/// An IPv6 fragment header: next header, offset in 8-byte units, more-fragments, id.
fn frag_hdr(next: u8, offset_units: u16, more: bool, id: u32) -> Vec<u8> {
    let mut h = vec![next, 0];
    h.extend_from_slice(&((offset_units << 3) | more as u16).to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    h
}

/// An 8-byte destination-options (or hop-by-hop, routing) header naming `next`.
fn opts_hdr(next: u8) -> Vec<u8> {
    vec![next, 0, 1, 4, 0, 0, 0, 0]
}

/// A TCP SYN header from port 40000 to `dport`.
fn tcp_syn_hdr(dport: u16) -> Vec<u8> {
    let mut t = vec![0x9c, 0x40];
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, TCP_SYN, 0xfa, 0xf0, 0, 0, 0, 0]);
    t
}

/// Every IPv6 extension header is read inside the IP payload (issue 17 F2): a header that
/// lies, wholly or partly, in the bytes after the payload is a truncated packet. The crafted
/// chain primes a first fragment of an allowed TCP datagram, then hides a SYN to a denied
/// port behind a fragment header that sits beyond the payload and carries the primed id.
#[test]
fn ipv6_extension_headers_stay_inside_the_payload() {
    let mut dp = load(&base_port(), &base_rules());
    let id = 0x5117;
    let mut primer = frag_hdr(6, 0, true, id);
    primer.extend(tcp_syn_hdr(22));
    let hidden = |payload: Vec<u8>, trailer_from: usize| {
        let mut all = payload;
        all.extend(frag_hdr(6, 1, false, id));
        all.extend(tcp_syn_hdr(23));
        let (p, t) = all.split_at(trailer_from);
        (p.to_vec(), t.to_vec())
    };
    let (p1, t1) = hidden(opts_hdr(44), 8);
    let (p2, t2) = hidden(opts_hdr(44), 12);
    let (p3, t3) = hidden(Vec::new(), 4);
    let (p4, t4) = hidden(opts_hdr(44), 16);
    let cases = vec![
        in_ok(
            "primer: first fragment of a TCP datagram to port 22",
            v6_to_vm(44, &primer, &[]),
            REASON_ALLOW_RULE,
        )
        .rule(5),
        in_drop(
            "destination options end the payload, a later-fragment header follows outside it",
            v6_to_vm(60, &p1, &t1),
            REASON_DROP_MALFORMED,
        ),
        in_drop(
            "a later-fragment header with 4 of its 8 bytes inside the payload",
            v6_to_vm(60, &p2, &t2),
            REASON_DROP_MALFORMED,
        ),
        in_drop(
            "a later-fragment header first, 4 of its 8 bytes inside the payload",
            v6_to_vm(44, &p3, &t3),
            REASON_DROP_MALFORMED,
        ),
        in_ok(
            "the same fragment wholly inside the payload follows its first fragment",
            v6_to_vm(60, &p4, &t4),
            REASON_ALLOW_FRAG,
        )
        .rule(5),
        in_drop(
            "hop-by-hop ends the payload, destination options follow outside it",
            v6_to_vm(0, &opts_hdr(60), &opts_hdr(6)),
            REASON_DROP_MALFORMED,
        ),
        in_drop(
            "a first-fragment header outside the payload",
            v6_to_vm(
                60,
                &opts_hdr(44),
                &[frag_hdr(6, 0, true, id + 1), tcp_syn_hdr(22)].concat(),
            ),
            REASON_DROP_MALFORMED,
        ),
    ];
    // One sequence: the hidden fragments need the primed first fragment.
    run(&mut dp, IF, &cases, false);
}

/// Later fragments are keyed like their first fragment, by (source, destination, id) as Linux
/// reassembly identifies an IPv6 datagram (issue 17 F3): the next header of a later fragment's
/// fragment header is not the datagram's protocol when options follow the fragment header.
#[test]
fn ipv6_later_fragments_match_a_first_fragment_with_options_after_the_fragment_header() {
    let mut dp = load(&base_port(), &base_rules());
    let udp53 = |len: u16| {
        let mut u = vec![0, 1, 0, 53];
        u.extend_from_slice(&len.to_be_bytes());
        u.extend_from_slice(&[0, 0]);
        u.extend(vec![0; 16]);
        u
    };
    let first = |id: u32, dport_hi: u8| {
        let mut p = frag_hdr(60, 0, true, id);
        p.extend(opts_hdr(17));
        let mut u = udp53(40);
        u[2] = dport_hi;
        p.extend(u);
        v6_to_vm(44, &p, &[])
    };
    let later = |id: u32, next: u8| {
        let mut p = frag_hdr(next, 4, false, id);
        p.extend(vec![0x5a; 16]);
        v6_to_vm(44, &p, &[])
    };
    let cases = vec![
        in_ok(
            "first fragment: fragment header, destination options, UDP 53",
            first(0x600, 0),
            REASON_ALLOW_RULE,
        )
        .rule(13),
        in_ok(
            "its later fragment (fragment header naming destination options)",
            later(0x600, 60),
            REASON_ALLOW_FRAG,
        )
        .rule(13),
        in_ok(
            "another later fragment naming UDP itself",
            later(0x600, 17),
            REASON_ALLOW_FRAG,
        )
        .rule(13),
        in_drop(
            "first fragment to a closed port (UDP 309)",
            first(0x601, 1),
            REASON_DROP_NO_RULE,
        ),
        in_drop(
            "its later fragment follows the drop",
            later(0x601, 60),
            REASON_DROP_FRAG_DENIED,
        ),
    ];
    run(&mut dp, IF, &cases, false);
}

// ------------------------------------------------------------------------------------------
// Port security disabled, unknown taps
// ------------------------------------------------------------------------------------------

#[test]
fn unfiltered_ports_pass_everything() {
    let port = base_port().port_security(false);
    let mut dp = load(&port, &[]);
    let cases = vec![
        out_ok(
            "foreign MAC",
            from_mac(EVIL_MAC, tcp("1.2.3.4", 1, REMOTE4, 2, TCP_SYN)),
            REASON_ALLOW_UNFILTERED,
        ),
        out_ok(
            "VLAN tag",
            vlan(0x8100, tcp(VM4, 1, REMOTE4, 2, TCP_SYN), true),
            REASON_ALLOW_UNFILTERED,
        ),
        out_ok(
            "DHCP server",
            from_vm(udp(VM4, 67, "10.0.0.6", 68)),
            REASON_ALLOW_UNFILTERED,
        ),
        out_ok(
            "RA",
            from_vm(icmp(VM_LL, "ff02::1", 134, 0, 0)),
            REASON_ALLOW_UNFILTERED,
        ),
        out_ok(
            "LLDP",
            ether(VM_MAC, [1, 0x80, 0xc2, 0, 0, 0xe], 0x88cc, vec![0; 40]),
            REASON_ALLOW_UNFILTERED,
        ),
        in_ok("anything in", syn_in(23), REASON_ALLOW_UNFILTERED),
        in_ok(
            "garbage in",
            patch(syn_in(23), 14, &[0x12]),
            REASON_ALLOW_UNFILTERED,
        ),
    ];
    run(&mut dp, IF, &cases, true);
}

#[test]
fn taps_without_a_port_entry_pass_uncounted() {
    let mut dp = Datapath::load(&LoadOptions::default()).unwrap();
    for (prog, frame) in [
        (PROG_FROM_VM, from_mac(EVIL_MAC, udp(VM4, 67, "10.0.0.6", 68))),
        (PROG_TO_VM, syn_in(23)),
    ] {
        assert_eq!(
            dp.test_run(prog, &frame, IF, TRACE_MARK).unwrap(),
            ALLOW,
            "{prog}"
        );
    }
    let n = dp.stats().unwrap().keys().count();
    assert_eq!(n, 0, "nothing counted");
    let traced: u32 = dp
        .trace_map()
        .unwrap()
        .get(&0, 0)
        .unwrap()
        .iter()
        .map(|t| t.seq)
        .sum();
    assert_eq!(traced, 0, "nothing traced");
}
