//! sg datapath: Neutron security groups at tcx on every VM tap.
//!
//! `sg_from_vm` runs at tcx ingress of the tap (frames the VM sends), `sg_to_vm` at tcx egress
//! (frames towards the VM). A tap without an SG_PORTS entry is not ours: it passes untouched.
//! Each packet goes parse, then policy, then verdict.
#![no_std]
#![no_main]

mod maps;
mod parse;

use aya_ebpf::{bindings::__sk_buff, macros::classifier, programs::TcContext};
use sg_common::*;

use crate::{
    maps::{SG_CLASSES, SG_PORTS, SG_SERVICES, SG_STATS},
    parse::Packet,
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
    let skb: &__sk_buff = unsafe { &*ctx.skb.skb };
    let ifindex = skb.ifindex;
    // Copy the port entry once: the agent may replace it while this packet is in flight.
    let port = match unsafe { SG_PORTS.get(ifindex) } {
        Some(p) => *p,
        None => return TC_ACT_UNSPEC,
    };
    let reason = if port.flags & PORT_F_FILTERED == 0 {
        REASON_ALLOW_UNFILTERED
    } else {
        match parse::parse(ctx) {
            Ok(Some(pkt)) => policy(&port, dir, &pkt),
            Ok(None) => REASON_ALLOW_NON_IP,
            Err(()) => REASON_DROP_MALFORMED,
        }
    };
    count(port.port_idx, dir, reason, ctx.len());
    if reason_allows(reason) {
        TC_ACT_UNSPEC
    } else {
        TC_ACT_SHOT
    }
}

/// Two-stage lookup: remote address -> class, then (class, protocol, port) -> rule.
#[inline(always)]
fn policy(port: &PortInfo, dir: u8, pkt: &Packet) -> u8 {
    let remote = if dir == DIR_INGRESS { pkt.src } else { pkt.dst };
    let ckey = aya_ebpf::maps::lpm_trie::Key::new(
        CLASS_KEY_FIXED_BITS + 128,
        ClassKey {
            policy: port.policy,
            dir,
            family: pkt.family,
            _pad: [0; 2],
            addr: remote,
        },
    );
    let class = match SG_CLASSES.get(&ckey) {
        Some(c) => c.class,
        None => return REASON_DROP_NO_RULE,
    };
    let skey = aya_ebpf::maps::lpm_trie::Key::new(
        SERVICE_KEY_FULL_BITS,
        ServiceKey {
            policy: port.policy,
            class,
            dir,
            family: pkt.family,
            proto: pkt.proto,
            port_be: pkt.service_port.to_be_bytes(),
            _pad: [0; 3],
        },
    );
    match SG_SERVICES.get(&skey) {
        Some(_) => REASON_ALLOW_RULE,
        None => REASON_DROP_NO_RULE,
    }
}

#[inline(always)]
fn count(port_idx: u32, dir: u8, reason: u8, bytes: u32) {
    let key = StatKey {
        port_idx,
        dir,
        reason,
        _pad: [0; 2],
    };
    if let Some(c) = SG_STATS.get_ptr_mut(key) {
        // SAFETY: per-CPU value, only this CPU writes it.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes as u64;
        }
    } else {
        let _ = SG_STATS.insert(
            key,
            Counter {
                packets: 1,
                bytes: bytes as u64,
            },
            0,
        );
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
