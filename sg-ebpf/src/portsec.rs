//! Stage 2, frames from the VM: port security and the fixed rules of Neutron's egress (`o`)
//! chain, in Neutron's order (README §2, ../shared/spec/neutron-iptables.md §4.5, §4.6).
//!
//! The frame-level checks (ethertype, source MAC, ARP) are the Linux bridge agent's ebtables
//! chains `neutronMAC-<tap>` and `neutronARP-<tap>`; iptables cannot see them.
use aya_ebpf::{bindings::__sk_buff, maps::lpm_trie::Key, programs::TcContext};
use sg_common::*;

use crate::{
    maps::SG_ADDRS,
    parse::{ETH_HLEN, L3_ARP, L3_OTHER, Pkt},
    verdict::UNDECIDED,
};

pub const ZERO_MAC: [u8; 6] = [0; 6];
pub const ZERO_ADDR: [u8; 16] = [0; 16];

/// Whether the port's address set `addr_id` holds an entry of `kind` for (mac, addr): an LPM
/// lookup, so an IP/MAC pair with a CIDR or a MAC-only pair (prefix length 0) matches.
#[inline(always)]
pub fn port_has(addr_id: u32, kind: u8, mac: &[u8; 6], addr: &[u8; 16]) -> bool {
    let key = Key::new(
        ADDR_KEY_FIXED_BITS + 128,
        AddrKey {
            addr_id,
            kind,
            _pad: 0,
            mac: *mac,
            addr: *addr,
        },
    );
    SG_ADDRS.get(&key).is_some()
}

/// Checks that apply to every frame from the VM. A reason decides the frame (every non-IP
/// frame is decided here); `UNDECIDED` sends an IP packet on.
#[inline(always)]
pub fn frame(ctx: &TcContext, port: &PortInfo, pkt: &Pkt) -> u8 {
    sg_portsec_frame(ctx.skb.skb, port, pkt) as u8
}

/// `frame` as a BPF global function.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn sg_portsec_frame(skb: *mut __sk_buff, port: *const PortInfo, pkt: *const Pkt) -> u32 {
    // SAFETY: the caller's stack values; global functions must check for null.
    let (Some(port), Some(pkt)) = (unsafe { port.as_ref() }, unsafe { pkt.as_ref() }) else {
        return REASON_DROP_MALFORMED as u32;
    };
    frame_checks(&TcContext::new(skb), port, pkt) as u32
}

#[inline(always)]
fn frame_checks(ctx: &TcContext, port: &PortInfo, pkt: &Pkt) -> u8 {
    // Ethertype allow-list: ARP, IPv4, IPv6 (VLAN tags were refused by the parser).
    if pkt.l3 == L3_OTHER {
        return REASON_DROP_ETHERTYPE;
    }
    // neutronMAC-<tap>: the source MAC is the port's or an allowed-address-pair MAC.
    if !port_has(port.addr_id, ADDR_KIND_MAC, &pkt.src_mac, &ZERO_ADDR) {
        return REASON_DROP_SPOOF_MAC;
    }
    if pkt.l3 == L3_ARP {
        return arp(ctx, port, pkt);
    }
    UNDECIDED
}

/// neutronARP-<tap>, tightened as the OVS firewall does: the sender hardware address is the
/// frame's source MAC and (source MAC, sender IP) is one of the port's ARP senders
/// (`ADDR_KIND_ARP_V4`: its IPv4 pairs that have an address, and probes with sender IP
/// 0.0.0.0, RFC 5227, from their MACs). A port without an IPv4 address has none, and all its
/// ARP is dropped, as Neutron's DROP-policy chain with no allow rule does. No check when an
/// IPv4 pair is a /0 (`PORT_F_ARP_PROTECT` clear), as Neutron's arp_protect skips the chain
/// then.
#[inline(always)]
fn arp(ctx: &TcContext, port: &PortInfo, pkt: &Pkt) -> u8 {
    if port.flags & PORT_F_ARP_PROTECT == 0 {
        return REASON_ALLOW_ARP;
    }
    // htype(2) ptype(2) hlen plen op(2) sha(6) spa(4) tha(6) tpa(4)
    let a: [u8; 28] = match crate::parse::load(ctx, ETH_HLEN) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let sha = [a[8], a[9], a[10], a[11], a[12], a[13]];
    let mut spa = ZERO_ADDR;
    spa[..4].copy_from_slice(&a[14..18]);
    // ebtables' --arp-ip-src only matches IPv4-over-Ethernet ARP.
    let ipv4_arp = a[2] == 0x08 && a[3] == 0x00 && a[4] == 6 && a[5] == 4;
    if ipv4_arp && sha == pkt.src_mac && port_has(port.addr_id, ADDR_KIND_ARP_V4, &pkt.src_mac, &spa) {
        REASON_ALLOW_ARP
    } else {
        REASON_DROP_SPOOF_ARP
    }
}

/// The fixed rules of the egress chain that precede the state rule. A reason decides the
/// packet (`UNDECIDED` does not); an allowed packet still goes through conntrack so that its flow is recorded.
#[inline(always)]
pub fn ip(port: &PortInfo, pkt: &Pkt) -> u8 {
    if pkt.family == FAMILY_V4 {
        ipv4(port, pkt)
    } else {
        ipv6(port, pkt)
    }
}

#[inline(always)]
fn ipv4(port: &PortInfo, pkt: &Pkt) -> u8 {
    const ANY: [u8; 4] = [0; 4];
    const BROADCAST: [u8; 4] = [255; 4];
    let dhcp_client = pkt.is_udp(68, 67);
    // 1. DHCP discover/request before the VM has an address, ahead of the spoof check.
    if dhcp_client && pkt.src[..4] == ANY && pkt.dst[..4] == BROADCAST {
        return REASON_ALLOW_DHCP_CLIENT;
    }
    // 2. The s-chain, present only when the port has IPv4 pairs.
    if port.flags & PORT_F_SPOOF_V4 != 0 && !port_has(port.addr_id, ADDR_KIND_PAIR_V4, &pkt.src_mac, &pkt.src)
    {
        return REASON_DROP_SPOOF_IP;
    }
    // 3. DHCP renew/rebind. 4. The VM may not be a DHCP server.
    if dhcp_client {
        return REASON_ALLOW_DHCP_CLIENT;
    }
    if pkt.is_udp(67, 68) {
        return REASON_DROP_DHCP_SPOOF;
    }
    UNDECIDED
}

#[inline(always)]
fn ipv6(port: &PortInfo, pkt: &Pkt) -> u8 {
    let icmp = pkt.has_icmp();
    // 1. DAD and MLD reports from the unspecified address to ff02::/16.
    if icmp
        && matches!(pkt.icmp_type, 131 | 135 | 143)
        && pkt.src == ZERO_ADDR
        && pkt.dst[0] == 0xff
        && pkt.dst[1] == 0x02
    {
        return REASON_ALLOW_DAD_MLD;
    }
    // 2. The IPv6 s-chain (pairs include each MAC's EUI-64 link-local address).
    if port.flags & PORT_F_SPOOF_V6 != 0 && !port_has(port.addr_id, ADDR_KIND_PAIR_V6, &pkt.src_mac, &pkt.src)
    {
        return REASON_DROP_SPOOF_IP;
    }
    if icmp {
        // 3. No router advertisements from a VM. 4. Any other ICMPv6 passes, whatever the
        // security-group rules say.
        return if pkt.icmp_type == 134 {
            REASON_DROP_RA
        } else {
            REASON_ALLOW_ICMP6
        };
    }
    // 5. DHCPv6 client yes, server no.
    if pkt.is_udp(546, 547) {
        return REASON_ALLOW_DHCP6_CLIENT;
    }
    if pkt.is_udp(547, 546) {
        return REASON_DROP_DHCP6_SPOOF;
    }
    UNDECIDED
}
