//! Stage 1: parse the frame into a `Pkt`.
//!
//! Every read goes through `bpf_skb_load_bytes`: it copies from the linear part and from page
//! fragments alike, so a non-linear skb (GSO/GRO on a tap, headers beyond `data_end`) parses
//! the same as a linear one, and variable offsets (IPv4 options, IPv6 extension headers) need no
//! packet-pointer range proof. A read past the end of the skb fails, and the frame is then
//! `drop-malformed`: a truncated or inconsistent header never gets undefined behaviour.
//!
//! Lengths come from the IP header, not the frame: an Ethernet frame is padded to 60 bytes, and
//! Linux trims the skb to the IP total length before netfilter sees it.
use aya_ebpf::{bindings::__sk_buff, programs::TcContext};
use sg_common::*;

pub const ETH_HLEN: u32 = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_DCCP: u8 = 33;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_NONE: u8 = 59;
pub const IPPROTO_SCTP: u8 = 132;
pub const IPPROTO_UDPLITE: u8 = 136;

const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
/// At most this many IPv6 extension headers are walked (README §1).
const MAX_EXT_HDRS: u32 = 6;

/// What follows the Ethernet header.
pub const L3_OTHER: u8 = 0;
pub const L3_ARP: u8 = 1;
pub const L3_IP: u8 = 2;

pub const FRAG_NONE: u8 = 0;
/// Offset 0 with more fragments: carries the L4 header and decides for the datagram.
pub const FRAG_FIRST: u8 = 1;
/// Offset != 0: no L4 header; follows the first fragment's verdict.
pub const FRAG_LATER: u8 = 2;

/// A parsed frame. Addresses in network order, ports and ICMP fields in host order.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Pkt {
    pub src_mac: [u8; 6],
    /// `L3_*`.
    pub l3: u8,
    /// `FAMILY_V4` / `FAMILY_V6` for IP, 0 otherwise.
    pub family: u8,
    /// The upper-layer protocol after any IPv6 extension headers.
    pub proto: u8,
    /// `FRAG_*`.
    pub frag: u8,
    /// TCP flags byte.
    pub tcp_flags: u8,
    /// The L4 header is complete but Linux's protocol tracker calls it broken (TCP data offset,
    /// UDP length): conntrack state INVALID, the rules still decide.
    pub l4_bad: bool,
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// ICMP echo/query identifier.
    pub icmp_id: u16,
    pub sport: u16,
    pub dport: u16,
    /// IPv4 identification or IPv6 fragment identification.
    pub frag_id: u32,
    /// Offset of the L4 header from the start of the frame.
    pub l4_off: u32,
    /// Offset just past the IP packet (IPv4 total length / IPv6 payload length).
    pub l3_end: u32,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

impl Pkt {
    pub const EMPTY: Pkt = Pkt {
        src_mac: [0; 6],
        l3: L3_OTHER,
        family: 0,
        proto: 0,
        frag: FRAG_NONE,
        tcp_flags: 0,
        l4_bad: false,
        icmp_type: 0,
        icmp_code: 0,
        icmp_id: 0,
        sport: 0,
        dport: 0,
        frag_id: 0,
        l4_off: 0,
        l3_end: 0,
        src: [0; 16],
        dst: [0; 16],
    };

    /// The SG_SERVICES port of this packet: the destination port of port-carrying protocols,
    /// (type << 8 | code) for ICMP and ICMPv6, 0 for everything else.
    #[inline(always)]
    pub fn service_port(&self) -> u16 {
        match self.proto {
            IPPROTO_TCP | IPPROTO_UDP | IPPROTO_UDPLITE | IPPROTO_SCTP | IPPROTO_DCCP => self.dport,
            IPPROTO_ICMP | IPPROTO_ICMPV6 if self.has_icmp() => {
                ((self.icmp_type as u16) << 8) | self.icmp_code as u16
            }
            _ => 0,
        }
    }

    /// The SG_SRC_PORTS source port: the source port of port-carrying protocols, 0 otherwise.
    #[inline(always)]
    pub fn source_port(&self) -> u16 {
        match self.proto {
            IPPROTO_TCP | IPPROTO_UDP | IPPROTO_UDPLITE | IPPROTO_SCTP | IPPROTO_DCCP => self.sport,
            _ => 0,
        }
    }

    /// ICMP for IPv4 or ICMPv6 for IPv6 (a protocol number of the other family is "other").
    #[inline(always)]
    pub fn has_icmp(&self) -> bool {
        (self.family == FAMILY_V4 && self.proto == IPPROTO_ICMP)
            || (self.family == FAMILY_V6 && self.proto == IPPROTO_ICMPV6)
    }

    #[inline(always)]
    pub fn is_udp(&self, sport: u16, dport: u16) -> bool {
        self.proto == IPPROTO_UDP && self.sport == sport && self.dport == dport
    }

    #[inline(always)]
    pub fn is_icmp6(&self, icmp_type: u8) -> bool {
        self.family == FAMILY_V6 && self.proto == IPPROTO_ICMPV6 && self.icmp_type == icmp_type
    }
}

#[inline(always)]
pub fn load<const N: usize>(ctx: &TcContext, off: u32) -> Result<[u8; N], u8> {
    ctx.load::<[u8; N]>(off as usize)
        .map_err(|_| REASON_DROP_MALFORMED)
}

/// Loads exactly N bytes at `off` into `dst`; false past the end of the skb.
#[inline(always)]
pub fn load_into<const N: usize>(ctx: &TcContext, off: u32, dst: &mut [u8; N]) -> bool {
    // SAFETY: `dst` is N writable bytes; the helper checks the skb bounds.
    unsafe {
        aya_ebpf::helpers::bpf_skb_load_bytes(
            ctx.skb.skb as *const core::ffi::c_void,
            off,
            dst.as_mut_ptr() as *mut core::ffi::c_void,
            N as u32,
        ) == 0
    }
}

#[inline(always)]
fn be16(b0: u8, b1: u8) -> u16 {
    u16::from_be_bytes([b0, b1])
}

/// Parses Ethernet, then ARP | IPv4 | IPv6 | other, then the L4 header, into `pkt`. Returns 0,
/// or the drop reason (`drop-malformed`, `drop-vlan`, `drop-ipv6-ext`).
#[inline(always)]
pub fn parse(ctx: &TcContext, pkt: &mut Pkt) -> u8 {
    sg_parse(ctx.skb.skb, pkt) as u8
}

/// `parse` as a BPF global function (README "Verifier"): the verifier checks it once, on its own, instead
/// of once per caller state, and the caller only learns "some Pkt was written".
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn sg_parse(skb: *mut __sk_buff, pkt: *mut Pkt) -> u32 {
    // SAFETY: the caller passes its own stack Pkt; the verifier makes global functions check
    // pointer arguments for null.
    let Some(pkt) = (unsafe { pkt.as_mut() }) else {
        return REASON_DROP_MALFORMED as u32;
    };
    let ctx = TcContext::new(skb);
    match parse_frame(&ctx, pkt) {
        Ok(()) => 0,
        Err(reason) => reason as u32,
    }
}

#[inline(always)]
fn parse_frame(ctx: &TcContext, pkt: &mut Pkt) -> Result<(), u8> {
    let eth: [u8; 14] = load(ctx, 0)?;
    *pkt = Pkt::EMPTY;
    pkt.src_mac = [eth[6], eth[7], eth[8], eth[9], eth[10], eth[11]];
    match be16(eth[12], eth[13]) {
        // A tag still in the frame (the kernel moves the outer tag of a received frame into
        // skb->vlan_tci; the caller checks that).
        ETH_P_8021Q | ETH_P_8021AD => return Err(REASON_DROP_VLAN),
        ETH_P_ARP => pkt.l3 = L3_ARP,
        ETH_P_IP => {
            pkt.l3 = L3_IP;
            ipv4(ctx, pkt)?;
            l4(ctx, pkt)?;
        }
        ETH_P_IPV6 => {
            pkt.l3 = L3_IP;
            ipv6(ctx, pkt)?;
            l4(ctx, pkt)?;
        }
        _ => {}
    }
    Ok(())
}

/// IPv4: version 4, IHL >= 5, IHL*4 <= total length <= frame. Options are skipped by IHL.
#[inline(always)]
fn ipv4(ctx: &TcContext, pkt: &mut Pkt) -> Result<(), u8> {
    let h: [u8; 20] = load(ctx, ETH_HLEN)?;
    let ihl = ((h[0] & 0x0f) as u32) * 4;
    let tot = be16(h[2], h[3]) as u32;
    if h[0] >> 4 != 4 || ihl < 20 || tot < ihl || ETH_HLEN + tot > ctx.len() {
        return Err(REASON_DROP_MALFORMED);
    }
    let frag = be16(h[6], h[7]);
    pkt.frag = if frag & 0x1fff != 0 {
        FRAG_LATER
    } else if frag & 0x2000 != 0 {
        FRAG_FIRST
    } else {
        FRAG_NONE
    };
    pkt.frag_id = be16(h[4], h[5]) as u32;
    pkt.family = FAMILY_V4;
    pkt.proto = h[9];
    pkt.src[..4].copy_from_slice(&h[12..16]);
    pkt.dst[..4].copy_from_slice(&h[16..20]);
    pkt.l4_off = ETH_HLEN + ihl;
    pkt.l3_end = ETH_HLEN + tot;
    Ok(())
}

#[inline(always)]
fn ipv6(ctx: &TcContext, pkt: &mut Pkt) -> Result<(), u8> {
    let h: [u8; 40] = load(ctx, ETH_HLEN)?;
    let end = ETH_HLEN + 40 + be16(h[4], h[5]) as u32;
    if h[0] >> 4 != 6 || end > ctx.len() {
        return Err(REASON_DROP_MALFORMED);
    }
    pkt.family = FAMILY_V6;
    pkt.src.copy_from_slice(&h[8..24]);
    pkt.dst.copy_from_slice(&h[24..40]);
    pkt.l3_end = end;
    let w = ext_walk(ctx, h[6], ETH_HLEN + 40, end)?;
    pkt.proto = w.proto;
    pkt.l4_off = w.off;
    pkt.frag = w.frag;
    pkt.frag_id = w.frag_id;
    Ok(())
}

/// Where the IPv6 extension-header chain ends.
pub struct ExtWalk {
    pub proto: u8,
    pub off: u32,
    pub frag: u8,
    pub frag_id: u32,
}

/// Walks hop-by-hop, routing, fragment, destination-options and AH headers as the kernel's
/// `ipv6_skip_exthdr`/`ipv6_find_hdr` do (lengths: (hdrlen + 1) * 8, AH (hdrlen + 2) * 4), at
/// most `MAX_EXT_HDRS` of them. A non-first fragment stops the walk: its protocol is the
/// fragment header's next header and it carries no L4 header. An atomic fragment (offset 0,
/// no M flag) is a whole packet, as for Linux.
///
/// Every header must lie wholly inside the IP payload (`end`): bytes after it (Ethernet
/// padding, or a crafted trailer) are not part of the packet, and a header that reaches into
/// them is a truncated packet (`drop-malformed`), as for the kernel, which trims the skb to
/// the payload length before parsing.
#[inline(always)]
pub fn ext_walk(ctx: &TcContext, first: u8, start: u32, end: u32) -> Result<ExtWalk, u8> {
    let mut w = ExtWalk {
        proto: first,
        off: start,
        frag: FRAG_NONE,
        frag_id: 0,
    };
    let mut i = 0;
    while i < MAX_EXT_HDRS {
        let len = match w.proto {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH => {
                // The shortest of these is 8 bytes ((0 + 1) * 8; AH (0 + 2) * 4).
                if w.off + 8 > end {
                    return Err(REASON_DROP_MALFORMED);
                }
                let x: [u8; 2] = load(ctx, w.off)?;
                let len = if w.proto == NEXTHDR_AUTH {
                    (x[1] as u32 + 2) * 4
                } else {
                    (x[1] as u32 + 1) * 8
                };
                w.proto = x[0];
                len
            }
            NEXTHDR_FRAGMENT => {
                if w.off + 8 > end {
                    return Err(REASON_DROP_MALFORMED);
                }
                let x: [u8; 8] = load(ctx, w.off)?;
                let fo = be16(x[2], x[3]);
                let id = u32::from_be_bytes([x[4], x[5], x[6], x[7]]);
                w.proto = x[0];
                if fo & 0xfff8 != 0 {
                    w.frag = FRAG_LATER;
                    w.frag_id = id;
                    w.off += 8;
                    return Ok(w);
                }
                if fo & 1 != 0 {
                    w.frag = FRAG_FIRST;
                    w.frag_id = id;
                }
                8
            }
            _ => return Ok(w),
        };
        w.off += len;
        if w.off > end {
            return Err(REASON_DROP_MALFORMED);
        }
        i += 1;
    }
    match w.proto {
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH | NEXTHDR_FRAGMENT => {
            Err(REASON_DROP_IPV6_EXT)
        }
        _ => Ok(w),
    }
}

/// The L4 fields the decision needs. The header must be complete inside the IP packet:
/// TCP 20 bytes, UDP/UDP-Lite 8, SCTP/DCCP 4 (the ports), ICMP/ICMPv6 8 (iptables' icmp
/// match and Linux's ICMP tracker both read the full 8-byte header). Non-first fragments
/// carry none.
#[inline(always)]
fn l4(ctx: &TcContext, pkt: &mut Pkt) -> Result<(), u8> {
    if pkt.frag == FRAG_LATER {
        return Ok(());
    }
    if pkt.l4_off > pkt.l3_end {
        return Err(REASON_DROP_MALFORMED);
    }
    let avail = pkt.l3_end - pkt.l4_off;
    // Length checks against the payload only make sense for a whole datagram.
    let whole = pkt.frag == FRAG_NONE;
    match pkt.proto {
        IPPROTO_TCP => {
            if avail < 20 {
                return Err(REASON_DROP_MALFORMED);
            }
            let t: [u8; 20] = load(ctx, pkt.l4_off)?;
            pkt.sport = be16(t[0], t[1]);
            pkt.dport = be16(t[2], t[3]);
            pkt.tcp_flags = t[13];
            // nf_conntrack_proto_tcp.c tcp_error(): "truncated packet".
            let doff = ((t[12] >> 4) as u32) * 4;
            pkt.l4_bad = doff < 20 || (whole && doff > avail);
        }
        IPPROTO_UDP | IPPROTO_UDPLITE => {
            if avail < 8 {
                return Err(REASON_DROP_MALFORMED);
            }
            let u: [u8; 8] = load(ctx, pkt.l4_off)?;
            pkt.sport = be16(u[0], u[1]);
            pkt.dport = be16(u[2], u[3]);
            let ulen = be16(u[4], u[5]) as u32;
            pkt.l4_bad = whole
                && if pkt.proto == IPPROTO_UDP {
                    // nf_conntrack_proto_udp.c udp_error(): "truncated/malformed packet".
                    ulen > avail || ulen < 8
                } else {
                    // udplite_error(): the checksum coverage, 0 meaning the whole datagram.
                    ulen != 0 && (ulen < 8 || ulen > avail)
                };
        }
        IPPROTO_SCTP | IPPROTO_DCCP => {
            if avail < 4 {
                return Err(REASON_DROP_MALFORMED);
            }
            let p: [u8; 4] = load(ctx, pkt.l4_off)?;
            pkt.sport = be16(p[0], p[1]);
            pkt.dport = be16(p[2], p[3]);
        }
        _ if pkt.has_icmp() => {
            if avail < 8 {
                return Err(REASON_DROP_MALFORMED);
            }
            let i: [u8; 8] = load(ctx, pkt.l4_off)?;
            pkt.icmp_type = i[0];
            pkt.icmp_code = i[1];
            pkt.icmp_id = be16(i[4], i[5]);
        }
        _ => {}
    }
    Ok(())
}
