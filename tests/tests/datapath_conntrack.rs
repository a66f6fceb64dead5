//! Conntrack through BPF_PROG_TEST_RUN: sequences of frames whose verdicts depend on the ones
//! before, checked against Linux's trackers (README §4); revocation; stateless ports; zones;
//! what SG_TRACE, SG_STATS and SG_RULE_HITS record.

use sg_common::*;
use sg_tests::{Netns, dp::*, spawn_in};
use sg_user::{
    datapath::{
        Datapath, LoadOptions,
        fixture::{self, PortSpec, Rule},
    },
    packet::{TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN},
};

const IF: u32 = 1;
const PORT: u32 = 7;

fn port() -> PortSpec {
    PortSpec::new(IF, PORT, VM_MAC)
        .fixed_ip(VM4)
        .fixed_ip(VM6)
        .stateful()
}

/// 1: ingress TCP 22, 2: ingress TCP 80 from 192.0.2.0/24, 3: ingress ICMP echo,
/// 4: egress IPv4 any, 5: egress IPv6 any, 6: ingress IPv6 TCP 22.
fn rules() -> Vec<Rule> {
    vec![
        Rule::ingress_v4().tcp(22, 22),
        Rule::ingress_v4().tcp(80, 80).remote("192.0.2.0/24"),
        Rule::ingress_v4().icmp(Some(8), None),
        Rule::egress_v4(),
        Rule::egress_v6(),
        Rule::ingress_v6().tcp(22, 22),
    ]
}

fn ingress_only() -> Vec<Rule> {
    rules().into_iter().filter(|r| r.dir == DIR_INGRESS).collect()
}

fn load(port: &PortSpec, rules: &[Rule]) -> Datapath {
    let mut dp = Datapath::load(&LoadOptions::default()).expect("load the datapath");
    fixture::install(&mut dp, port, rules).expect("install the test port");
    dp
}

/// Every entry of both conntrack tables.
fn entries(dp: &mut Datapath) -> Vec<(CtKey, CtVal)> {
    dp.conntrack_entries()
        .unwrap()
        .into_iter()
        .map(|(k, v, _)| (k, v))
        .collect()
}

/// The one conntrack entry there must be.
fn only_entry(dp: &mut Datapath) -> CtVal {
    let e = entries(dp);
    assert_eq!(e.len(), 1, "conntrack entries: {e:?}");
    e[0].1
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn out_tcp(flags: u8) -> Vec<u8> {
    from_vm(tcp(VM4, 40000, REMOTE4, 443, flags))
}
fn in_tcp(flags: u8) -> Vec<u8> {
    to_vm(tcp(REMOTE4, 443, VM4, 40000, flags))
}

#[test]
fn tcp_from_the_vm_handshake_data_close_and_reopen() {
    let mut dp = load(
        &port(),
        &ingress_only()
            .into_iter()
            .chain([Rule::egress_v4().tcp(443, 443)])
            .collect::<Vec<_>>(),
    );
    let seq = [
        out_ok("SYN", out_tcp(TCP_SYN), REASON_ALLOW_RULE)
            .rule(5)
            .state(CT_STATE_NEW),
        out_ok(
            "SYN retransmitted: still NEW",
            out_tcp(TCP_SYN),
            REASON_ALLOW_RULE,
        )
        .state(CT_STATE_NEW),
        in_ok("SYN-ACK", in_tcp(TCP_SYN | TCP_ACK), REASON_ALLOW_ESTABLISHED)
            .rule(5)
            .state(CT_STATE_ESTABLISHED),
        out_ok("ACK", out_tcp(TCP_ACK), REASON_ALLOW_ESTABLISHED),
        out_ok("data", out_tcp(TCP_PSH | TCP_ACK), REASON_ALLOW_ESTABLISHED),
        in_ok("data back", in_tcp(TCP_PSH | TCP_ACK), REASON_ALLOW_ESTABLISHED),
        in_drop(
            "a SYN from the server is invalid",
            in_tcp(TCP_SYN),
            REASON_DROP_INVALID,
        ),
        out_ok(
            "a SYN from the client is ignored",
            out_tcp(TCP_SYN),
            REASON_ALLOW_ESTABLISHED,
        ),
        in_drop(
            "invalid flags even inside a flow",
            in_tcp(TCP_SYN | TCP_FIN),
            REASON_DROP_INVALID,
        ),
        out_ok("FIN", out_tcp(TCP_FIN | TCP_ACK), REASON_ALLOW_ESTABLISHED),
        in_ok("ACK of the FIN", in_tcp(TCP_ACK), REASON_ALLOW_ESTABLISHED),
        in_ok("FIN back", in_tcp(TCP_FIN | TCP_ACK), REASON_ALLOW_ESTABLISHED),
        out_ok("last ACK", out_tcp(TCP_ACK), REASON_ALLOW_ESTABLISHED),
    ];
    run(&mut dp, IF, &seq, false);
    let e = only_entry(&mut dp);
    assert_eq!(e.tcp_state, TCP_TIME_WAIT);
    assert_eq!(
        e.flags & (CT_F_SEEN_REPLY | CT_F_ASSURED),
        CT_F_SEEN_REPLY | CT_F_ASSURED
    );
    assert_eq!(e.flags & CT_F_ADMIT_INGRESS, 0);
    assert_eq!(e.rule, 5, "the egress rule (fifth) admitted it");
    let left = e.expires_ns.saturating_sub(monotonic_ns());
    assert!(
        left > 100_000_000_000 && left <= 120_000_000_000,
        "TIME_WAIT lasts 120 s: {left}"
    );

    // A new SYN on the same ports re-opens the flow: NEW again, so the rules decide.
    let reopen = [
        out_ok("SYN in TIME_WAIT re-opens", out_tcp(TCP_SYN), REASON_ALLOW_RULE).state(CT_STATE_NEW),
        in_ok(
            "SYN-ACK of the new flow",
            in_tcp(TCP_SYN | TCP_ACK),
            REASON_ALLOW_ESTABLISHED,
        ),
    ];
    run(&mut dp, IF, &reopen, false);
    assert_eq!(only_entry(&mut dp).tcp_state, TCP_SYN_RECV);
}

#[test]
fn tcp_to_the_vm_needs_no_egress_rule_for_replies() {
    let mut dp = load(&port(), &ingress_only());
    let syn = to_vm(tcp(REMOTE4, 50000, VM4, 22, TCP_SYN));
    let from = |flags| to_vm(tcp(REMOTE4, 50000, VM4, 22, flags));
    let back = |flags| from_vm(tcp(VM4, 22, REMOTE4, 50000, flags));
    let seq = [
        in_ok("SYN to 22", syn.clone(), REASON_ALLOW_RULE).rule(1),
        out_ok(
            "SYN-ACK from the VM",
            back(TCP_SYN | TCP_ACK),
            REASON_ALLOW_ESTABLISHED,
        )
        .rule(1),
        out_drop(
            "a SYN-ACK to another port is no reply",
            from_vm(tcp(VM4, 22, REMOTE4, 50001, TCP_SYN | TCP_ACK)),
            REASON_DROP_INVALID,
        ),
        in_ok("ACK", from(TCP_ACK), REASON_ALLOW_ESTABLISHED),
        out_ok("data", back(TCP_PSH | TCP_ACK), REASON_ALLOW_ESTABLISHED),
        in_ok("RST", from(TCP_RST), REASON_ALLOW_ESTABLISHED),
        out_ok("an ACK after the RST", back(TCP_ACK), REASON_ALLOW_ESTABLISHED),
    ];
    run(&mut dp, IF, &seq, false);
    let e = only_entry(&mut dp);
    assert_eq!(e.tcp_state, TCP_CLOSE);
    assert_ne!(e.flags & CT_F_ADMIT_INGRESS, 0);
    let left = e.expires_ns.saturating_sub(monotonic_ns());
    assert!(left <= 10_000_000_000, "CLOSE lasts 10 s: {left}");
    // The RST closed it; the client's SYN re-opens it (NEW, rule 1 again).
    run(
        &mut dp,
        IF,
        &[in_ok("SYN in CLOSE", syn, REASON_ALLOW_RULE)
            .rule(1)
            .state(CT_STATE_NEW)],
        false,
    );
}

#[test]
fn tcp_state_table_walk() {
    let mut dp = load(&port(), &rules());
    let steps: [(&str, bool, u8, u8, u8); 9] = [
        // name, from the VM?, flags, reason, TCP state after
        ("SYN", true, TCP_SYN, REASON_ALLOW_RULE, TCP_SYN_SENT),
        (
            "simultaneous SYN",
            false,
            TCP_SYN,
            REASON_ALLOW_ESTABLISHED,
            TCP_SYN_SENT2,
        ),
        (
            "SYN-ACK from the originator",
            true,
            TCP_SYN | TCP_ACK,
            REASON_ALLOW_ESTABLISHED,
            TCP_SYN_RECV,
        ),
        ("ACK", false, TCP_ACK, REASON_ALLOW_ESTABLISHED, TCP_SYN_RECV),
        (
            "ACK from the originator",
            true,
            TCP_ACK,
            REASON_ALLOW_ESTABLISHED,
            TCP_ESTABLISHED,
        ),
        (
            "FIN",
            false,
            TCP_FIN | TCP_ACK,
            REASON_ALLOW_ESTABLISHED,
            TCP_FIN_WAIT,
        ),
        ("ACK", true, TCP_ACK, REASON_ALLOW_ESTABLISHED, TCP_CLOSE_WAIT),
        (
            "FIN",
            true,
            TCP_FIN | TCP_ACK,
            REASON_ALLOW_ESTABLISHED,
            TCP_LAST_ACK,
        ),
        (
            "last ACK",
            false,
            TCP_ACK,
            REASON_ALLOW_ESTABLISHED,
            TCP_TIME_WAIT,
        ),
    ];
    for (name, out, flags, reason, state) in steps {
        let case = if out {
            out_ok(name, out_tcp(flags), reason)
        } else {
            in_ok(name, in_tcp(flags), reason)
        };
        run(&mut dp, IF, &[case], false);
        assert_eq!(only_entry(&mut dp).tcp_state, state, "after {name}");
    }
}

#[test]
fn tcp_pickup_rst_and_invalid_replies() {
    let mut dp = load(&port(), &ingress_only());
    // A mid-stream ACK is NEW (tcp_loose=1) and capped at 300 s until the other side answers.
    run(
        &mut dp,
        IF,
        &[in_ok(
            "ACK to 22, no state",
            to_vm(tcp(REMOTE4, 50000, VM4, 22, TCP_ACK)),
            REASON_ALLOW_RULE,
        )
        .state(CT_STATE_NEW)],
        false,
    );
    let e = only_entry(&mut dp);
    assert_eq!(e.tcp_state, TCP_ESTABLISHED);
    assert!(e.expires_ns - monotonic_ns() <= 300_000_000_000, "UNACK cap");
    run(
        &mut dp,
        IF,
        &[
            out_ok(
                "the VM answers",
                from_vm(tcp(VM4, 22, REMOTE4, 50000, TCP_ACK)),
                REASON_ALLOW_ESTABLISHED,
            ),
            in_ok(
                "the client goes on",
                to_vm(tcp(REMOTE4, 50000, VM4, 22, TCP_ACK)),
                REASON_ALLOW_ESTABLISHED,
            ),
        ],
        false,
    );
    let e = only_entry(&mut dp);
    assert!(
        e.expires_ns - monotonic_ns() > 4 * 24 * 3600 * 1_000_000_000,
        "5 days once both sides spoke"
    );

    // A RST answering a SYN kills the flow: nothing was ever established.
    dp.clear_flows().unwrap();
    let mut dp2 = load(&port(), &rules());
    let seq = [
        out_ok("SYN", out_tcp(TCP_SYN), REASON_ALLOW_RULE),
        in_ok(
            "RST-ACK answers it",
            in_tcp(TCP_RST | TCP_ACK),
            REASON_ALLOW_ESTABLISHED,
        ),
        in_drop(
            "a SYN-ACK now is invalid",
            in_tcp(TCP_SYN | TCP_ACK),
            REASON_DROP_INVALID,
        ),
    ];
    run(&mut dp2, IF, &seq, false);
    assert!(entries(&mut dp2).is_empty(), "the RST removed the flow");
}

#[test]
fn udp_and_icmp_replies() {
    let mut dp = load(&port(), &rules());
    let seq = [
        out_ok(
            "UDP query",
            from_vm(udp(VM4, 5000, REMOTE4, 53)),
            REASON_ALLOW_RULE,
        )
        .state(CT_STATE_NEW),
        out_ok(
            "second query before any reply is NEW",
            from_vm(udp(VM4, 5000, REMOTE4, 53)),
            REASON_ALLOW_RULE,
        )
        .state(CT_STATE_NEW),
        in_ok(
            "UDP reply",
            to_vm(udp(REMOTE4, 53, VM4, 5000)),
            REASON_ALLOW_ESTABLISHED,
        )
        .state(CT_STATE_ESTABLISHED),
        out_ok(
            "next query is ESTABLISHED",
            from_vm(udp(VM4, 5000, REMOTE4, 53)),
            REASON_ALLOW_ESTABLISHED,
        ),
        in_drop(
            "reply from another port",
            to_vm(udp(REMOTE4, 54, VM4, 5000)),
            REASON_DROP_NO_RULE,
        ),
        in_drop(
            "reply from another host",
            to_vm(udp("192.0.2.11", 53, VM4, 5000)),
            REASON_DROP_NO_RULE,
        ),
        in_drop(
            "reply to another port",
            to_vm(udp(REMOTE4, 53, VM4, 5001)),
            REASON_DROP_NO_RULE,
        ),
        out_ok(
            "echo request id 7",
            from_vm(icmp(VM4, REMOTE4, 8, 0, 7)),
            REASON_ALLOW_RULE,
        )
        .state(CT_STATE_NEW),
        in_ok(
            "echo reply id 7",
            to_vm(icmp(REMOTE4, VM4, 0, 0, 7)),
            REASON_ALLOW_ESTABLISHED,
        ),
        in_drop(
            "echo reply id 8",
            to_vm(icmp(REMOTE4, VM4, 0, 0, 8)),
            REASON_DROP_INVALID,
        ),
        in_drop(
            "echo reply id 7 from another host",
            to_vm(icmp("192.0.2.11", VM4, 0, 0, 7)),
            REASON_DROP_INVALID,
        ),
        in_ok(
            "the remote's own echo request id 7 is another flow",
            to_vm(icmp(REMOTE4, VM4, 8, 0, 7)),
            REASON_ALLOW_RULE,
        )
        .state(CT_STATE_NEW),
        out_ok(
            "the VM's reply to it",
            from_vm(icmp(VM4, REMOTE4, 0, 0, 7)),
            REASON_ALLOW_ESTABLISHED,
        ),
        out_ok(
            "ICMPv6 echo request (fixed rule) starts a flow",
            from_vm(icmp(VM6, REMOTE6, 128, 0, 3)),
            REASON_ALLOW_ICMP6,
        )
        .state(CT_STATE_NEW),
        in_ok(
            "ICMPv6 echo reply",
            to_vm(icmp(REMOTE6, VM6, 129, 0, 3)),
            REASON_ALLOW_ESTABLISHED,
        ),
        in_drop(
            "ICMPv6 echo reply, other id",
            to_vm(icmp(REMOTE6, VM6, 129, 0, 4)),
            REASON_DROP_INVALID,
        ),
        in_drop(
            "ICMPv6 echo reply, other code",
            to_vm(icmp(REMOTE6, VM6, 129, 1, 3)),
            REASON_DROP_INVALID,
        ),
        out_ok(
            "IPv6 UDP",
            from_vm(udp(VM6, 6000, REMOTE6, 123)),
            REASON_ALLOW_RULE,
        ),
        in_ok(
            "IPv6 UDP reply",
            to_vm(udp(REMOTE6, 123, VM6, 6000)),
            REASON_ALLOW_ESTABLISHED,
        ),
        out_ok(
            "GRE out",
            from_vm(raw(VM4, REMOTE4, 47, &[0; 8])),
            REASON_ALLOW_RULE,
        ),
        in_ok(
            "GRE back",
            to_vm(raw(REMOTE4, VM4, 47, &[0; 8])),
            REASON_ALLOW_ESTABLISHED,
        ),
        out_ok(
            "DHCP request (fixed rule) starts a flow",
            from_vm(udp(VM4, 68, ROUTER4, 67)),
            REASON_ALLOW_DHCP_CLIENT,
        ),
        in_ok(
            "DHCP ack is ESTABLISHED before the provider rule",
            to_vm(udp(ROUTER4, 67, VM4, 68)),
            REASON_ALLOW_ESTABLISHED,
        ),
    ];
    run(&mut dp, IF, &seq, false);
}

#[test]
fn icmp_errors_are_related_only_to_their_exact_flow() {
    let mut dp = load(
        &port(),
        &ingress_only()
            .into_iter()
            .chain([Rule::egress_v4(), Rule::egress_v6()])
            .collect::<Vec<_>>(),
    );
    let syn = tcp(VM4, 40001, REMOTE4, 80, TCP_SYN);
    let q = udp(VM4, 5000, REMOTE4, 53);
    let echo = icmp(VM4, REMOTE4, 8, 0, 9);
    let syn6 = tcp(VM6, 40000, REMOTE6, 443, TCP_SYN);
    let mut truncated = syn.build();
    truncated.truncate(10);
    let seq = [
        out_ok("TCP SYN out", from_vm(syn.clone()), REASON_ALLOW_RULE),
        in_ok(
            "unreachable about it",
            to_vm(icmp_error(ROUTER4, VM4, 3, 1, &syn)),
            REASON_ALLOW_RELATED,
        )
        .state(CT_STATE_RELATED),
        in_ok(
            "source quench (4)",
            to_vm(icmp_error(ROUTER4, VM4, 4, 0, &syn)),
            REASON_ALLOW_RELATED,
        ),
        in_ok(
            "redirect (5)",
            to_vm(icmp_error(ROUTER4, VM4, 5, 1, &syn)),
            REASON_ALLOW_RELATED,
        ),
        in_ok(
            "time exceeded (11)",
            to_vm(icmp_error(ROUTER4, VM4, 11, 0, &syn)),
            REASON_ALLOW_RELATED,
        ),
        in_ok(
            "parameter problem (12)",
            to_vm(icmp_error(ROUTER4, VM4, 12, 0, &syn)),
            REASON_ALLOW_RELATED,
        ),
        in_drop(
            "about another source port",
            to_vm(icmp_error(
                ROUTER4,
                VM4,
                3,
                1,
                &tcp(VM4, 40002, REMOTE4, 80, TCP_SYN),
            )),
            REASON_DROP_INVALID,
        ),
        in_drop(
            "about another destination port",
            to_vm(icmp_error(
                ROUTER4,
                VM4,
                3,
                1,
                &tcp(VM4, 40001, REMOTE4, 81, TCP_SYN),
            )),
            REASON_DROP_INVALID,
        ),
        in_drop(
            "about UDP on the same ports",
            to_vm(icmp_error(ROUTER4, VM4, 3, 1, &udp(VM4, 40001, REMOTE4, 80))),
            REASON_DROP_INVALID,
        ),
        in_drop(
            "quoting the reply direction (its source is not the error's destination)",
            to_vm(icmp_error(
                ROUTER4,
                VM4,
                3,
                1,
                &tcp(REMOTE4, 80, VM4, 40001, TCP_SYN | TCP_ACK),
            )),
            REASON_DROP_INVALID,
        ),
        in_drop(
            "sent to another address",
            to_vm(icmp_error(ROUTER4, "10.0.0.6", 3, 1, &syn)),
            REASON_DROP_INVALID,
        ),
        in_drop(
            "quoting 10 bytes of IP header",
            to_vm(icmp_error_bytes(ROUTER4, VM4, 3, 1, truncated.clone())),
            REASON_DROP_INVALID,
        ),
        in_drop(
            "quoting a non-first fragment",
            to_vm(icmp_error(
                ROUTER4,
                VM4,
                3,
                1,
                &raw(VM4, REMOTE4, 6, &[0; 16]).fragment(2, false, 5),
            )),
            REASON_DROP_INVALID,
        ),
        out_ok("UDP out", from_vm(q.clone()), REASON_ALLOW_RULE),
        in_ok(
            "port unreachable from the server",
            to_vm(icmp_error(REMOTE4, VM4, 3, 3, &q)),
            REASON_ALLOW_RELATED,
        ),
        in_drop(
            "about another UDP port",
            to_vm(icmp_error(REMOTE4, VM4, 3, 3, &udp(VM4, 5000, REMOTE4, 54))),
            REASON_DROP_INVALID,
        ),
        out_ok("echo request out", from_vm(echo.clone()), REASON_ALLOW_RULE),
        in_ok(
            "time exceeded about the echo",
            to_vm(icmp_error(ROUTER4, VM4, 11, 0, &echo)),
            REASON_ALLOW_RELATED,
        ),
        in_drop(
            "about another echo id",
            to_vm(icmp_error(ROUTER4, VM4, 11, 0, &icmp(VM4, REMOTE4, 8, 0, 10))),
            REASON_DROP_INVALID,
        ),
        in_drop(
            "about an echo reply the VM never sent",
            to_vm(icmp_error(ROUTER4, VM4, 11, 0, &icmp(VM4, REMOTE4, 0, 0, 9))),
            REASON_DROP_INVALID,
        ),
        in_drop(
            "about an ICMP error",
            to_vm(icmp_error(
                ROUTER4,
                VM4,
                11,
                0,
                &icmp_error(VM4, REMOTE4, 3, 3, &q),
            )),
            REASON_DROP_INVALID,
        ),
        out_ok("IPv6 TCP out", from_vm(syn6.clone()), REASON_ALLOW_RULE),
        in_ok(
            "ICMPv6 packet too big",
            to_vm(icmp_error(ROUTER6, VM6, 2, 0, &syn6)),
            REASON_ALLOW_RELATED,
        ),
        in_ok(
            "ICMPv6 time exceeded",
            to_vm(icmp_error(ROUTER6, VM6, 3, 0, &syn6)),
            REASON_ALLOW_RELATED,
        ),
        in_ok(
            "ICMPv6 type 100 is an error too",
            to_vm(icmp_error(ROUTER6, VM6, 100, 0, &syn6)),
            REASON_ALLOW_RELATED,
        ),
        in_ok(
            "ICMPv6 error quoting a packet with a hop-by-hop header",
            to_vm(icmp_error(ROUTER6, VM6, 1, 4, &syn6.clone().with_ipv6_ext(0, 8))),
            REASON_ALLOW_RELATED,
        ),
        in_drop(
            "ICMPv6 error about another port",
            to_vm(icmp_error(
                ROUTER6,
                VM6,
                1,
                4,
                &tcp(VM6, 40000, REMOTE6, 444, TCP_SYN),
            )),
            REASON_DROP_INVALID,
        ),
    ];
    run(&mut dp, IF, &seq, false);

    // The VM reporting an error about a flow it accepted.
    let inbound = tcp(REMOTE4, 50000, VM4, 22, TCP_SYN);
    let seq = [
        in_ok("SYN to 22", to_vm(inbound.clone()), REASON_ALLOW_RULE),
        out_ok(
            "the VM's port unreachable about it",
            from_vm(icmp_error(VM4, REMOTE4, 3, 3, &inbound)),
            REASON_ALLOW_RELATED,
        ),
    ];
    let mut dp = load(&port(), &ingress_only());
    run(&mut dp, IF, &seq, false);
}

/// An ICMP error quoting arbitrary bytes.
fn icmp_error_bytes(
    src: &str,
    dst: &str,
    icmp_type: u8,
    code: u8,
    inner: Vec<u8>,
) -> sg_user::packet::IpPacket {
    sg_user::packet::IpPacket::new(
        ip(src),
        ip(dst),
        sg_user::packet::L4::IcmpError {
            icmp_type,
            code,
            inner,
        },
    )
}

#[test]
fn revocation_on_a_policy_switch() {
    let port = port();
    let mut dp = load(&port, &rules());
    let ssh_in = |flags| to_vm(tcp(REMOTE4, 50000, VM4, 22, flags));
    let ssh_out = |flags| from_vm(tcp(VM4, 22, REMOTE4, 50000, flags));
    let http_in = |flags| to_vm(tcp("192.0.2.1", 50001, VM4, 80, flags));
    let seq = [
        in_ok("SSH SYN (rule 1)", ssh_in(TCP_SYN), REASON_ALLOW_RULE).rule(1),
        out_ok(
            "SSH SYN-ACK",
            ssh_out(TCP_SYN | TCP_ACK),
            REASON_ALLOW_ESTABLISHED,
        ),
        in_ok("SSH ACK", ssh_in(TCP_ACK), REASON_ALLOW_ESTABLISHED),
        in_ok("HTTP SYN (rule 2)", http_in(TCP_SYN), REASON_ALLOW_RULE).rule(2),
        out_ok(
            "HTTP SYN-ACK",
            from_vm(tcp(VM4, 80, "192.0.2.1", 50001, TCP_SYN | TCP_ACK)),
            REASON_ALLOW_ESTABLISHED,
        ),
        out_ok(
            "ICMPv6 echo (fixed rule)",
            from_vm(icmp(VM6, REMOTE6, 128, 0, 5)),
            REASON_ALLOW_ICMP6,
        ),
        out_ok(
            "HTTPS out (egress rule 4)",
            from_vm(tcp(VM4, 40000, REMOTE4, 443, TCP_SYN)),
            REASON_ALLOW_RULE,
        )
        .rule(4),
    ];
    run(&mut dp, IF, &seq, false);
    assert_eq!(entries(&mut dp).len(), 4);

    // Generation 2: SSH removed, HTTP now rule 1, no egress rules.
    let gen2 = vec![
        Rule::ingress_v4().tcp(80, 80).remote("192.0.2.0/24"),
        Rule::ingress_v4().icmp(Some(8), None),
    ];
    fixture::install_policy(&mut dp, 70, &gen2).unwrap();
    fixture::set_policy(&mut dp, &port, 70).unwrap();
    let seq = [
        in_drop(
            "SSH data: its rule is gone, the flow stops",
            ssh_in(TCP_PSH | TCP_ACK),
            REASON_DROP_NO_RULE,
        )
        .state(CT_STATE_NEW),
        in_ok(
            "HTTP data: still allowed, now by rule 1",
            http_in(TCP_ACK),
            REASON_ALLOW_ESTABLISHED,
        )
        .rule(1),
        in_ok(
            "ICMPv6 echo reply: a fixed rule's flow survives",
            to_vm(icmp(REMOTE6, VM6, 129, 0, 5)),
            REASON_ALLOW_ESTABLISHED,
        ),
        in_drop(
            "HTTPS SYN-ACK: egress rule gone, the flow is revoked",
            in_tcp(TCP_SYN | TCP_ACK),
            REASON_DROP_REVOKED,
        )
        .state(CT_STATE_REVOKED),
    ];
    run(&mut dp, IF, &seq, false);
    let e = entries(&mut dp);
    assert_eq!(e.len(), 4, "{e:?}");
    let revoked: Vec<u16> = e
        .iter()
        .filter(|(_, v)| v.flags & CT_F_REVOKED != 0)
        .map(|(k, _)| k.port_a.min(k.port_b))
        .collect();
    assert_eq!(revoked.len(), 2, "SSH and HTTPS are tombstones: {e:?}");
    assert!(revoked.contains(&22) && revoked.contains(&443), "{e:?}");
    for (k, v) in e {
        assert_eq!(v.policy, 70, "{k:?} moved to the new policy");
    }
}

/// Revocation follows the flow, not the packet (issue 17 A): a flow that only a removed
/// ingress rule admitted stops in both directions. The VM's next packet, in the flow's reply
/// orientation, must not re-admit it as a new flow through the default egress rule, as it did
/// when the revoked entry was simply deleted. The tombstone keeps the flow dead until it
/// expires, a policy admits the flow again, or a SYN opens a new connection on the tuple.
#[test]
fn revocation_follows_the_flow_not_the_packet() {
    let port = port();
    // 1: ingress TCP 80, 2: ingress UDP 5000, 3: egress IPv4 any (every VM has it).
    let gen1 = vec![
        Rule::ingress_v4().tcp(80, 80),
        Rule::ingress_v4().udp(5000, 5000),
        Rule::egress_v4(),
    ];
    let mut dp = load(&port, &gen1);
    let web_in = |sport: u16, flags| to_vm(tcp("192.0.2.1", sport, VM4, 80, flags));
    let web_out = |dport: u16, flags| from_vm(tcp(VM4, 80, "192.0.2.1", dport, flags));
    let udp_in = || to_vm(udp(REMOTE4, 40000, VM4, 5000));
    let udp_out = || from_vm(udp(VM4, 5000, REMOTE4, 40000));
    let mut seq = Vec::new();
    for sport in [50001, 50002] {
        seq.extend([
            in_ok("client SYN (rule 1)", web_in(sport, TCP_SYN), REASON_ALLOW_RULE).rule(1),
            out_ok(
                "SYN-ACK",
                web_out(sport, TCP_SYN | TCP_ACK),
                REASON_ALLOW_ESTABLISHED,
            ),
            in_ok("ACK", web_in(sport, TCP_ACK), REASON_ALLOW_ESTABLISHED),
            out_ok(
                "the VM sends the data (iperf3 -R)",
                web_out(sport, TCP_PSH | TCP_ACK),
                REASON_ALLOW_ESTABLISHED,
            ),
        ]);
    }
    seq.extend([
        in_ok("UDP to the VM (rule 2)", udp_in(), REASON_ALLOW_RULE).rule(2),
        out_ok("the VM's UDP stream back", udp_out(), REASON_ALLOW_ESTABLISHED),
    ]);
    run(&mut dp, IF, &seq, false);

    // Generation 2: the ingress rules are removed; the egress rule stays (as policy 70's rule 1).
    fixture::install_policy(&mut dp, 70, &[Rule::egress_v4()]).unwrap();
    fixture::set_policy(&mut dp, &port, 70).unwrap();
    let seq = [
        out_drop(
            "the VM's next data segment: the flow is revoked, not re-admitted by the egress rule",
            web_out(50001, TCP_PSH | TCP_ACK),
            REASON_DROP_REVOKED,
        )
        .state(CT_STATE_REVOKED),
        in_drop(
            "the client's ACK: no rule admits it",
            web_in(50001, TCP_ACK),
            REASON_DROP_NO_RULE,
        ),
        out_drop(
            "and the VM's retransmission",
            web_out(50001, TCP_PSH | TCP_ACK),
            REASON_DROP_REVOKED,
        ),
        in_drop(
            "the client first on the other connection",
            web_in(50002, TCP_PSH | TCP_ACK),
            REASON_DROP_NO_RULE,
        ),
        out_drop(
            "then the VM on it",
            web_out(50002, TCP_PSH | TCP_ACK),
            REASON_DROP_REVOKED,
        ),
        out_drop("the VM's UDP stream", udp_out(), REASON_DROP_REVOKED),
        in_drop(
            "an ICMP error about the revoked UDP flow relates to nothing",
            to_vm(icmp_error(REMOTE4, VM4, 3, 3, &udp(VM4, 5000, REMOTE4, 40000))),
            REASON_DROP_INVALID,
        ),
        out_ok(
            "a new connection from the VM on the first flow's tuple (a SYN) is the egress rule's",
            web_out(50001, TCP_SYN),
            REASON_ALLOW_RULE,
        )
        .rule(1), // policy 70's only rule
    ];
    run(&mut dp, IF, &seq, false);
    let e = entries(&mut dp);
    assert_eq!(e.len(), 3, "two tombstones and the new connection: {e:?}");
    let revoked = e.iter().filter(|(_, v)| v.flags & CT_F_REVOKED != 0).count();
    assert_eq!(revoked, 2, "{e:?}");
    for (k, v) in &e {
        assert_eq!(v.policy, 70, "{k:?} was re-checked against policy 70");
    }

    // Generation 3: the rules are back, under a new policy id: the revoked flows are re-checked
    // again, and admitted.
    fixture::install_policy(&mut dp, 71, &gen1).unwrap();
    fixture::set_policy(&mut dp, &port, 71).unwrap();
    let seq = [
        out_ok(
            "the UDP flow is admitted again",
            udp_out(),
            REASON_ALLOW_ESTABLISHED,
        )
        .rule(2),
        out_ok(
            "so is the second TCP connection",
            web_out(50002, TCP_PSH | TCP_ACK),
            REASON_ALLOW_ESTABLISHED,
        )
        .rule(1),
        in_ok("both ways", web_in(50002, TCP_ACK), REASON_ALLOW_ESTABLISHED),
    ];
    run(&mut dp, IF, &seq, false);
    assert!(
        entries(&mut dp).iter().all(|(_, v)| v.flags & CT_F_REVOKED == 0),
        "revived"
    );
}

/// The two conntrack tables (issue 17 E): a flow starts in SG_CONNTRACK (LRU) and moves to
/// SG_CT_ASSURED, which nothing evicts, once assured (a TCP handshake completed, a UDP
/// exchange that went on after its reply). When SG_CT_ASSURED is full the flow stays in the
/// LRU table, marked and counted. SG_CT_EVENTS counts what the datapath did to each port's
/// entries.
#[test]
fn assured_flows_move_where_no_flood_reaches_them() {
    let port = port();
    let mut dp = Datapath::load(&LoadOptions {
        ct_assured_entries: 2,
        ..Default::default()
    })
    .unwrap();
    fixture::install(&mut dp, &port, &rules()).unwrap();
    let placed = |dp: &mut Datapath, low_port: u16| -> Option<(bool, u8)> {
        dp.conntrack_entries()
            .unwrap()
            .into_iter()
            .find(|(k, _, _)| k.port_a.min(k.port_b) == low_port)
            .map(|(_, v, protected)| (protected, v.flags))
    };
    let out = |sport: u16, flags| from_vm(tcp(VM4, sport, REMOTE4, 443, flags));
    let back = |sport: u16, flags| to_vm(tcp(REMOTE4, 443, VM4, sport, flags));
    let handshake = |dp: &mut Datapath, sport: u16| {
        run(
            dp,
            IF,
            &[
                out_ok("SYN", out(sport, TCP_SYN), REASON_ALLOW_RULE),
                in_ok(
                    "SYN-ACK",
                    back(sport, TCP_SYN | TCP_ACK),
                    REASON_ALLOW_ESTABLISHED,
                ),
            ],
            false,
        );
        assert_eq!(
            placed(dp, 443).map(|(p, _)| p),
            Some(false),
            "replied but not assured: still evictable"
        );
        run(
            dp,
            IF,
            &[out_ok("ACK", out(sport, TCP_ACK), REASON_ALLOW_ESTABLISHED)],
            false,
        );
    };

    // First flow: assured by the handshake's last ACK, then protected.
    handshake(&mut dp, 40001);
    let (protected, flags) = placed(&mut dp, 443).unwrap();
    assert!(protected && flags & CT_F_ASSURED != 0, "{flags:#x}");
    run(
        &mut dp,
        IF,
        &[in_ok(
            "data from the protected table",
            back(40001, TCP_PSH | TCP_ACK),
            REASON_ALLOW_ESTABLISHED,
        )],
        false,
    );
    dp.clear_flows().unwrap();

    // A UDP exchange is not assured by its reply, only by the packet after it.
    let q = || from_vm(udp(VM4, 5000, REMOTE4, 53));
    let a = || to_vm(udp(REMOTE4, 53, VM4, 5000));
    run(
        &mut dp,
        IF,
        &[
            out_ok("query", q(), REASON_ALLOW_RULE),
            in_ok("answer", a(), REASON_ALLOW_ESTABLISHED),
        ],
        false,
    );
    assert_eq!(placed(&mut dp, 53).map(|(p, _)| p), Some(false));
    run(
        &mut dp,
        IF,
        &[out_ok("next query", q(), REASON_ALLOW_ESTABLISHED)],
        false,
    );
    assert_eq!(placed(&mut dp, 53).map(|(p, _)| p), Some(true));

    // SG_CT_ASSURED holds 2: the UDP stream and one TCP flow.
    handshake(&mut dp, 40002);
    assert_eq!(placed(&mut dp, 443).map(|(p, _)| p), Some(true));
    assert_eq!(dp.ct_event(PORT, CT_EV_ASSURED_FULL).unwrap(), 0);
    // Expire it: a new flow under its key removes the dead entry from SG_CT_ASSURED (counted)
    // and starts in SG_CONNTRACK like any flow.
    let k443 = dp
        .conntrack_entries()
        .unwrap()
        .into_iter()
        .find(|(k, _, _)| k.port_a.min(k.port_b) == 443)
        .unwrap()
        .0;
    let mut v = dp.conntrack_assured().unwrap().get(&k443, 0).unwrap();
    v.expires_ns = 1;
    dp.conntrack_assured().unwrap().insert(k443, v, 0).unwrap();
    let removed_before = dp.ct_event(PORT, CT_EV_REMOVED).unwrap();
    handshake(&mut dp, 40002);
    assert_eq!(
        dp.ct_event(PORT, CT_EV_REMOVED).unwrap(),
        removed_before + 1,
        "the dead entry made way"
    );
    let (protected, _) = placed(&mut dp, 443).unwrap();
    assert!(protected, "it had room again");
    handshake(&mut dp, 40003);
    let flows: Vec<(u16, bool, u8)> = dp
        .conntrack_entries()
        .unwrap()
        .into_iter()
        .map(|(k, v, p)| (k.port_a.max(k.port_b), p, v.flags))
        .collect();
    let third = flows.iter().find(|f| f.0 == 40003).unwrap();
    assert!(!third.1, "no room in SG_CT_ASSURED: {flows:?}");
    assert_ne!(third.2 & CT_F_UNPROTECTED, 0, "{flows:?}");
    assert_eq!(dp.ct_event(PORT, CT_EV_ASSURED_FULL).unwrap(), 1);
    run(
        &mut dp,
        IF,
        &[
            in_ok(
                "it still works",
                back(40003, TCP_PSH | TCP_ACK),
                REASON_ALLOW_ESTABLISHED,
            ),
            out_ok(
                "both ways",
                out(40003, TCP_PSH | TCP_ACK),
                REASON_ALLOW_ESTABLISHED,
            ),
        ],
        false,
    );
    assert_eq!(
        dp.ct_event(PORT, CT_EV_ASSURED_FULL).unwrap(),
        1,
        "tried and counted once"
    );
    // Every flow created was counted.
    assert_eq!(dp.ct_event(PORT, CT_EV_CREATED).unwrap(), 5);
}

/// An agent of this build over pins of an earlier one, which had a single conntrack table
/// (SG_CONNTRACK, same shape) and neither SG_CT_ASSURED nor SG_CT_EVENTS: the missing maps are
/// created, the old table is reused, and an assured flow in it is still known and moves to
/// SG_CT_ASSURED on its next packet.
#[test]
fn pins_of_a_single_table_build_are_adopted() {
    let pins = sg_tests::PinRoot::new().unwrap();
    let opts = LoadOptions {
        pin_root: Some(pins.path.clone()),
        ..Default::default()
    };
    let port = port();
    let sport = 40100;
    {
        let mut dp = Datapath::load(&opts).unwrap();
        fixture::install(&mut dp, &port, &rules()).unwrap();
        run(
            &mut dp,
            IF,
            &[
                out_ok(
                    "SYN",
                    from_vm(tcp(VM4, sport, REMOTE4, 443, TCP_SYN)),
                    REASON_ALLOW_RULE,
                ),
                in_ok(
                    "SYN-ACK",
                    to_vm(tcp(REMOTE4, 443, VM4, sport, TCP_SYN | TCP_ACK)),
                    REASON_ALLOW_ESTABLISHED,
                ),
                out_ok(
                    "ACK",
                    from_vm(tcp(VM4, sport, REMOTE4, 443, TCP_ACK)),
                    REASON_ALLOW_ESTABLISHED,
                ),
            ],
            false,
        );
        // What the earlier build left: the assured flow in its only table.
        let (k, v, protected) = dp.conntrack_entries().unwrap().remove(0);
        assert!(protected && v.flags & CT_F_ASSURED != 0);
        dp.conntrack_assured().unwrap().remove(&k).unwrap();
        dp.conntrack().unwrap().insert(k, v, 0).unwrap();
    }
    for name in [MAP_CT_ASSURED, MAP_CT_EVENTS] {
        std::fs::remove_file(pins.path.join("maps").join(name)).unwrap();
    }
    let mut dp = Datapath::load(&opts).expect("pins of the earlier build are adopted");
    run(
        &mut dp,
        IF,
        &[in_ok(
            "the flow is still known",
            to_vm(tcp(REMOTE4, 443, VM4, sport, TCP_PSH | TCP_ACK)),
            REASON_ALLOW_ESTABLISHED,
        )],
        false,
    );
    let e = dp.conntrack_entries().unwrap();
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].2, "and now protected: {e:?}");
}

#[test]
fn stateless_ports_need_a_rule_each_way() {
    let stateless = PortSpec::new(IF, PORT, VM_MAC).fixed_ip(VM4).fixed_ip(VM6);
    let both_ways = vec![Rule::ingress_v4().tcp(22, 22), Rule::egress_v4().proto(6)];
    let mut dp = load(&stateless, &both_ways);
    let cases = [
        in_ok(
            "SYN to 22",
            to_vm(tcp(REMOTE4, 50000, VM4, 22, TCP_SYN)),
            REASON_ALLOW_RULE,
        )
        .state(CT_STATE_NONE),
        out_ok(
            "SYN-ACK by the egress rule",
            from_vm(tcp(VM4, 22, REMOTE4, 50000, TCP_SYN | TCP_ACK)),
            REASON_ALLOW_RULE,
        )
        .state(CT_STATE_NONE),
        in_ok(
            "a SYN-ACK to 22 is not INVALID here",
            to_vm(tcp(REMOTE4, 50000, VM4, 22, TCP_SYN | TCP_ACK)),
            REASON_ALLOW_RULE,
        ),
        in_drop(
            "TCP 23",
            to_vm(tcp(REMOTE4, 50000, VM4, 23, TCP_ACK)),
            REASON_DROP_NO_RULE,
        ),
        in_drop(
            "an echo reply is no-rule, not INVALID",
            to_vm(icmp(REMOTE4, VM4, 0, 0, 1)),
            REASON_DROP_NO_RULE,
        ),
        out_drop(
            "UDP has no egress rule",
            from_vm(udp(VM4, 1, REMOTE4, 53)),
            REASON_DROP_NO_RULE,
        ),
        in_drop(
            "and its reply no ingress rule",
            to_vm(udp(REMOTE4, 53, VM4, 1)),
            REASON_DROP_NO_RULE,
        ),
        in_ok(
            "provider rules still apply",
            to_vm(udp(ROUTER4, 67, VM4, 68)),
            REASON_ALLOW_DHCP_REPLY,
        ),
        in_ok(
            "ND still applies",
            to_vm(icmp("fe80::1", VM6, 135, 0, 0)),
            REASON_ALLOW_ND_MLD,
        ),
    ];
    run(&mut dp, IF, &cases, false);
    assert!(
        entries(&mut dp).is_empty(),
        "no conntrack entries on a stateless port"
    );

    let mut dp = load(&stateless, &[Rule::ingress_v4().tcp(22, 22)]);
    let cases = [
        in_ok(
            "SYN to 22",
            to_vm(tcp(REMOTE4, 50000, VM4, 22, TCP_SYN)),
            REASON_ALLOW_RULE,
        ),
        out_drop(
            "no egress rule, no reply",
            from_vm(tcp(VM4, 22, REMOTE4, 50000, TCP_SYN | TCP_ACK)),
            REASON_DROP_NO_RULE,
        ),
    ];
    run(&mut dp, IF, &cases, false);
}

#[test]
fn expired_entries_are_dead() {
    let mut dp = load(&port(), &rules());
    run(
        &mut dp,
        IF,
        &[out_ok(
            "UDP query",
            from_vm(udp(VM4, 5000, REMOTE4, 53)),
            REASON_ALLOW_RULE,
        )],
        false,
    );
    let (k, mut v) = entries(&mut dp).remove(0);
    v.expires_ns = 1;
    dp.conntrack().unwrap().insert(k, v, 0).unwrap();
    run(
        &mut dp,
        IF,
        &[
            in_drop(
                "the reply after the timeout",
                to_vm(udp(REMOTE4, 53, VM4, 5000)),
                REASON_DROP_NO_RULE,
            )
            .state(CT_STATE_NEW),
            out_ok(
                "a new query starts a new flow",
                from_vm(udp(VM4, 5000, REMOTE4, 53)),
                REASON_ALLOW_RULE,
            )
            .state(CT_STATE_NEW),
            in_ok(
                "whose reply passes",
                to_vm(udp(REMOTE4, 53, VM4, 5000)),
                REASON_ALLOW_ESTABLISHED,
            ),
        ],
        false,
    );
}

#[test]
fn trace_stats_and_rule_hits_explain_decisions() {
    let mut dp = load(&port(), &rules());
    let frame = to_vm(tcp("192.0.2.77", 1, VM4, 80, TCP_SYN));
    let (verdict, t) = dp.trace_run(PROG_TO_VM, &frame, IF).unwrap();
    assert_eq!(verdict, ALLOW);
    assert_eq!(
        (
            t.port_idx, t.policy, t.rule, t.reason, t.dir, t.ct_state, t.family, t.proto
        ),
        (
            PORT,
            PORT,
            2,
            REASON_ALLOW_RULE,
            DIR_INGRESS,
            CT_STATE_NEW,
            FAMILY_V4,
            6
        )
    );
    assert_ne!(t.class, 0, "a class was found");
    let (_, t2) = dp.trace_run(PROG_TO_VM, &frame, IF).unwrap();
    assert_eq!(t2.seq, t.seq + 1, "each traced packet bumps the sequence");

    // Untraced packets are counted but leave the record alone.
    let before = dp.stat(PORT, DIR_INGRESS, REASON_DROP_NO_RULE).unwrap();
    for _ in 0..5 {
        assert_eq!(
            dp.test_run(PROG_TO_VM, &to_vm(tcp(REMOTE4, 1, VM4, 23, TCP_SYN)), IF, 0)
                .unwrap(),
            DROP
        );
    }
    assert_eq!(
        dp.stat(PORT, DIR_INGRESS, REASON_DROP_NO_RULE).unwrap(),
        before + 5
    );
    let (_, t3) = dp.trace_run(PROG_TO_VM, &frame, IF).unwrap();
    assert_eq!(t3.seq, t2.seq + 1);
    assert_eq!(
        dp.stat(PORT, DIR_INGRESS, REASON_ALLOW_RULE).unwrap(),
        3,
        "a SYN re-sent in SYN_SENT is NEW"
    );
    assert_eq!(dp.stat(PORT, DIR_INGRESS, REASON_ALLOW_ESTABLISHED).unwrap(), 0);
    assert_eq!(dp.rule_hit_count(2).unwrap(), 3, "rule 2 admitted three packets");
    assert_eq!(dp.rule_hit_count(1).unwrap(), 0);
    // Directions are counted apart.
    dp.test_run(
        PROG_FROM_VM,
        &from_vm(tcp(VM4, 80, "192.0.2.77", 1, TCP_SYN | TCP_ACK)),
        IF,
        0,
    )
    .unwrap();
    assert_eq!(dp.stat(PORT, DIR_EGRESS, REASON_ALLOW_ESTABLISHED).unwrap(), 1);
    assert_eq!(dp.stat(PORT, DIR_INGRESS, REASON_ALLOW_ESTABLISHED).unwrap(), 0);
}

/// Two ports: conntrack zones keep their flows apart.
#[test]
fn conntrack_zones_are_per_port() {
    let ns = Netns::new("sgz").unwrap();
    // Two ends of a veth pair: TEST_RUN only needs the devices to exist.
    ns.ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d1"])
        .unwrap();
    let n = spawn_in(&ns.name, || {
        let if0 = sg_user::netns::ifindex("d0").unwrap();
        let if1 = sg_user::netns::ifindex("d1").unwrap();
        let mut dp = Datapath::load(&LoadOptions::default()).unwrap();
        let a = PortSpec::new(if0, 1, VM_MAC).fixed_ip(VM4).stateful();
        let b = PortSpec::new(if1, 2, VM_MAC).fixed_ip(VM4).stateful();
        fixture::install(&mut dp, &a, &rules()).unwrap();
        fixture::install(&mut dp, &b, &ingress_only()).unwrap();
        let mut n = run(
            &mut dp,
            if0,
            &[out_ok("port A: SYN out", out_tcp(TCP_SYN), REASON_ALLOW_RULE)],
            false,
        );
        n += run(
            &mut dp,
            if1,
            &[in_drop(
                "port B: the SYN-ACK has no flow",
                in_tcp(TCP_SYN | TCP_ACK),
                REASON_DROP_INVALID,
            )],
            false,
        );
        n += run(
            &mut dp,
            if0,
            &[in_ok(
                "port A: it has",
                in_tcp(TCP_SYN | TCP_ACK),
                REASON_ALLOW_ESTABLISHED,
            )],
            false,
        );
        n
    })
    .join()
    .unwrap()
    .unwrap();
    assert_eq!(n, 3);
}
