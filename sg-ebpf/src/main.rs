//! sg datapath: Neutron security groups at tcx on every VM tap (README.md is the behaviour spec).
//!
//! `sg_from_vm` runs at tcx ingress of the tap (frames the VM sends, Neutron "egress"),
//! `sg_to_vm` at tcx egress (frames towards the VM, Neutron "ingress"). A tap without an
//! SG_PORTS entry is not ours: it passes untouched and uncounted.
//!
//! Every frame goes, top-down in this file: parse (`parse`), port security and fixed rules
//! (`portsec` from the VM, `fixed` towards it), fragments (`frag`), conntrack (`conntrack`),
//! policy (`policy`), then the verdict and its accounting (`verdict`). Nothing is logged on
//! this path.
#![no_std]
#![no_main]

mod conntrack;
mod fixed;
mod frag;
mod maps;
mod parse;
mod policy;
mod portsec;
mod verdict;

use aya_ebpf::{bindings::__sk_buff, macros::classifier, programs::TcContext};
use sg_common::*;

use crate::{
    maps::SG_PORTS,
    parse::{FRAG_FIRST, FRAG_LATER, L3_IP, Pkt},
    verdict::{Decision, TRACED, TRACED_DRY, UNDECIDED},
};

#[classifier]
pub fn sg_from_vm(ctx: TcContext) -> i32 {
    classify(&ctx, DIR_EGRESS)
}

#[classifier]
pub fn sg_to_vm(ctx: TcContext) -> i32 {
    classify(&ctx, DIR_INGRESS)
}

#[inline(always)]
fn classify(ctx: &TcContext, dir: u8) -> i32 {
    // SAFETY: the context of a classifier is a valid __sk_buff for the whole run.
    let skb: &__sk_buff = unsafe { &*ctx.skb.skb };
    // Copy the port entry once: the agent may replace it while this packet is in flight.
    let port = match unsafe { SG_PORTS.get(skb.ifindex) } {
        Some(p) => *p,
        None => return TC_ACT_UNSPEC,
    };
    let mut d = Decision {
        dir,
        // Only BPF_PROG_TEST_RUN sets these marks: the packet records its decision in
        // SG_TRACE; with the dry mark (`sg trace`) it also writes no state and no counters.
        traced: match skb.mark {
            TRACE_MARK => TRACED,
            TRACE_DRY_MARK => TRACED_DRY,
            _ => 0,
        },
        ..Default::default()
    };
    d.reason = if port.flags & PORT_F_CLOSED != 0 {
        REASON_DROP_PORT_CLOSED
    } else if port.flags & PORT_F_FILTERED == 0 {
        REASON_ALLOW_UNFILTERED
    } else {
        decide(ctx, skb, &port, &mut d)
    };
    verdict::finish(&port, &d, skb.len)
}

/// The decision for a filtered port.
#[inline(always)]
fn decide(ctx: &TcContext, skb: &__sk_buff, port: &PortInfo, d: &mut Decision) -> u8 {
    // 1. Parse. The kernel moves a received frame's outer VLAN tag into skb->vlan_tci before
    //    tcx ingress, and a frame towards the VM may carry its tag there too; a tag still in
    //    the frame is the parser's business.
    if skb.vlan_present != 0 {
        return REASON_DROP_VLAN;
    }
    let mut pkt = Pkt::EMPTY;
    let reason = parse::parse(ctx, &mut pkt);
    if reason != 0 {
        return reason;
    }
    d.family = pkt.family;
    d.proto = pkt.proto;

    // 2. Frame-level checks. From the VM: ethertype, source MAC and ARP (ebtables' job on a
    //    Neutron node); towards the VM, iptables lets every non-IP frame through.
    if d.dir == DIR_EGRESS {
        let reason = portsec::frame(ctx, port, &pkt);
        if reason != 0 {
            return reason;
        }
    } else if pkt.l3 != L3_IP {
        return REASON_ALLOW_NON_IP;
    }

    // 3. A later fragment has no L4 header to decide on: it follows the first fragment.
    if pkt.frag == FRAG_LATER {
        return frag::follow(port, d.dir, &pkt, &mut d.rule);
    }
    let reason = decide_ip(ctx, port, &pkt, d);
    if pkt.frag == FRAG_FIRST && d.traced != TRACED_DRY {
        frag::remember(port, d.dir, &pkt, reason, d.rule);
    }
    reason
}

/// An IP packet with its L4 header: Neutron's chain order for its direction.
#[inline(always)]
fn decide_ip(ctx: &TcContext, port: &PortInfo, pkt: &Pkt, d: &mut Decision) -> u8 {
    // 4. Fixed rules ahead of the state rule: the egress chain's spoof, DHCP, RA and ICMPv6
    //    rules; the ingress chain's ND/MLD rules. A drop ends here; an allow still goes
    //    through conntrack so that the flow it starts is recorded.
    let fixed = if d.dir == DIR_EGRESS {
        portsec::ip(port, pkt)
    } else {
        fixed::before_conntrack(pkt)
    };
    if fixed != UNDECIDED && !reason_allows(fixed) {
        return fixed;
    }

    // 5. Conntrack: the state `-m state` would see.
    let mut ct = conntrack::Ct::NONE;
    ct.dry = d.traced == TRACED_DRY;
    conntrack::lookup(ctx, port, pkt, &mut ct);
    d.ct_state = ct.state;

    let reason = match fixed {
        UNDECIDED => match ct.state {
            CT_STATE_ESTABLISHED => {
                d.rule = ct.rule;
                REASON_ALLOW_ESTABLISHED
            }
            CT_STATE_RELATED => {
                d.rule = ct.rule;
                REASON_ALLOW_RELATED
            }
            // The other side of a revoked flow: no rule of this direction may re-open it.
            CT_STATE_REVOKED => REASON_DROP_REVOKED,
            _ => rules(port, pkt, d),
        },
        fixed => fixed,
    };

    // 6. State is written only for a packet every stage accepted.
    if reason_allows(reason) && d.traced != TRACED_DRY {
        conntrack::commit(&ct, d.dir, port.policy, d.rule);
    }
    reason
}

/// NEW, INVALID, UNTRACKED and stateless packets: the provider rules (towards the VM), then the
/// security-group rules, then the INVALID drop, then the fallback drop. A rule that allows a
/// packet allows it even when it is INVALID, as in iptables.
#[inline(always)]
fn rules(port: &PortInfo, pkt: &Pkt, d: &mut Decision) -> u8 {
    if d.dir == DIR_INGRESS {
        let reason = fixed::provider(port, pkt);
        if reason != UNDECIDED {
            return reason;
        }
    }
    let hit = policy::lookup(&policy::Query {
        policy: port.policy,
        dir: d.dir,
        family: pkt.family,
        proto: pkt.proto,
        src_ports: (port.flags & PORT_F_SRC_PORTS != 0) as u8,
        port: pkt.service_port(),
        sport: pkt.source_port(),
        remote: if d.dir == DIR_INGRESS { pkt.src } else { pkt.dst },
    });
    d.class = hit.class;
    if hit.rule != 0 {
        d.rule = hit.rule;
        REASON_ALLOW_RULE
    } else if d.ct_state == CT_STATE_INVALID {
        REASON_DROP_INVALID
    } else {
        REASON_DROP_NO_RULE
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
