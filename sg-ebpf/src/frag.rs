//! Fragments (README §6). iptables sees datagrams that conntrack reassembled; sg decides each
//! frame as it comes: the first fragment (offset 0) like any packet, and later fragments by the
//! first fragment's remembered verdict. A later fragment whose first fragment was not seen is
//! dropped (`drop-frag-no-first`), where iptables would hold it for reassembly.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use sg_common::*;

use crate::{maps::SG_FRAGS, parse::Pkt};

/// A datagram as Linux reassembly identifies it: IPv4 by (source, destination, id, protocol),
/// IPv6 by (source, destination, id) only. An IPv6 fragment header's next header is the
/// datagram's protocol only in the first fragment: with options after the fragment header a
/// later fragment names those options (RFC 8200 §4.5 uses the first fragment's value), so the
/// protocol is left out of the IPv6 key.
#[inline(always)]
fn key(port: &PortInfo, dir: u8, pkt: &Pkt) -> FragKey {
    FragKey {
        port_idx: port.port_idx,
        dir,
        family: pkt.family,
        proto: if pkt.family == FAMILY_V6 { 0 } else { pkt.proto },
        _pad: 0,
        src: pkt.src,
        dst: pkt.dst,
        id: pkt.frag_id,
    }
}

/// The verdict of a non-first fragment; `rule` gets the first fragment's rule.
#[inline(always)]
pub fn follow(port: &PortInfo, dir: u8, pkt: &Pkt, rule: &mut u32) -> u8 {
    let v = sg_frag_follow(port, dir, pkt);
    *rule = (v >> 32) as u32;
    v as u8
}

/// `rule << 32 | reason`. A BPF global function.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn sg_frag_follow(port: *const PortInfo, dir: u8, pkt: *const Pkt) -> u64 {
    // SAFETY: the caller's stack values; global functions must check for null.
    let (Some(port), Some(pkt)) = (unsafe { port.as_ref() }, unsafe { pkt.as_ref() }) else {
        return REASON_DROP_FRAG_NO_FIRST as u64;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    match unsafe { SG_FRAGS.get(key(port, dir, pkt)) } {
        Some(first) if first.expires_ns > now => {
            let reason = if reason_allows(first.reason) {
                REASON_ALLOW_FRAG
            } else {
                REASON_DROP_FRAG_DENIED
            };
            ((first.rule as u64) << 32) | reason as u64
        }
        _ => REASON_DROP_FRAG_NO_FIRST as u64,
    }
}

/// Remembers a first fragment's verdict, allow or drop, for FRAG_TIMEOUT_S.
#[inline(always)]
pub fn remember(port: &PortInfo, dir: u8, pkt: &Pkt, reason: u8, rule: u32) {
    sg_frag_remember(port, dir, pkt, reason, rule);
}

/// A BPF global function.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn sg_frag_remember(
    port: *const PortInfo,
    dir: u8,
    pkt: *const Pkt,
    reason: u8,
    rule: u32,
) -> u32 {
    // SAFETY: the caller's stack values; global functions must check for null.
    let (Some(port), Some(pkt)) = (unsafe { port.as_ref() }, unsafe { pkt.as_ref() }) else {
        return 0;
    };
    let val = FragVal {
        expires_ns: unsafe { bpf_ktime_get_ns() } + FRAG_TIMEOUT_S * 1_000_000_000,
        reason,
        _pad: [0; 3],
        rule,
    };
    let _ = SG_FRAGS.insert(key(port, dir, pkt), val, 0);
    0
}
