//! Stage 3, frames towards the VM: the fixed rules of Neutron's ingress (`i`) chain
//! (README §3, ../shared/spec/neutron-iptables.md §4.4 and the provider rules of §5.6).
use sg_common::*;

use crate::{
    parse::Pkt,
    portsec::{ZERO_MAC, port_has},
    verdict::UNDECIDED,
};

/// Before the state rule: MLD queries, neighbour solicitations and advertisements, from any
/// source (the three uncommented ip6tables rules at the top of the IPv6 `i` chain).
#[inline(always)]
pub fn before_conntrack(pkt: &Pkt) -> u8 {
    if pkt.family == FAMILY_V6 && pkt.has_icmp() && matches!(pkt.icmp_type, 130 | 135 | 136) {
        return REASON_ALLOW_ND_MLD;
    }
    UNDECIDED
}

/// The provider rules, which sit after RELATED/ESTABLISHED and before the security-group rules.
#[inline(always)]
pub fn provider(port: &PortInfo, pkt: &Pkt) -> u8 {
    if pkt.family == FAMILY_V6 {
        // Router advertisements from any source, when the port has an IPv6 fixed IP.
        if pkt.is_icmp6(134) && port.flags & PORT_F_V6_FIXED != 0 {
            return REASON_ALLOW_RA;
        }
        // DHCPv6 replies to a fixed IPv6 of the port or into fe80::/64.
        if pkt.is_udp(547, 546)
            && (pkt.dst[..8] == [0xfe, 0x80, 0, 0, 0, 0, 0, 0]
                || port_has(port.addr_id, ADDR_KIND_FIXED_V6, &ZERO_MAC, &pkt.dst))
        {
            return REASON_ALLOW_DHCP6_REPLY;
        }
    } else if pkt.is_udp(67, 68)
        // DHCP replies to a fixed IPv4 of the port or to the broadcast address.
        && (pkt.dst[..4] == [255; 4] || port_has(port.addr_id, ADDR_KIND_FIXED_V4, &ZERO_MAC, &pkt.dst))
    {
        return REASON_ALLOW_DHCP_REPLY;
    }
    UNDECIDED
}
