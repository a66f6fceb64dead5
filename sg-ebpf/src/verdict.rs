//! Stage 6: the verdict, and the accounting that explains it: SG_STATS per (port, direction,
//! reason), SG_RULE_HITS per rule, and the SG_TRACE record of a traced packet.
use sg_common::*;

use crate::maps::{SG_RULE_HITS, SG_STATS, SG_TRACE};

/// "No decision yet" where a stage returns a reason (reason codes start at 1). Plain integers
/// rather than `Option<u8>`: LLVM leaves the payload of a `None` undefined and may spill it,
/// which the verifier refuses ("!read_ok").
pub const UNDECIDED: u8 = 0;

pub const TRACED: u8 = 1;
pub const TRACED_DRY: u8 = 2;

/// Everything known about a packet's decision.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Decision {
    pub dir: u8,
    /// `REASON_*`, never 0 once decided.
    pub reason: u8,
    pub family: u8,
    pub proto: u8,
    /// `CT_STATE_*`.
    pub ct_state: u8,
    /// `TRACED`: record the decision in SG_TRACE; `TRACED_DRY`: that and nothing else.
    pub traced: u8,
    /// 1: the packet starts a flow (it creates the conntrack entry, or the port is stateless):
    /// what the security-group log calls the first packet of a flow.
    pub first: u8,
    pub _pad: [u8; 1],
    pub class: u32,
    pub rule: u32,
}

/// Counts the decision and turns it into a tcx verdict: allow is TC_ACT_UNSPEC ("next", so
/// other tcx programs still run), deny is TC_ACT_SHOT.
#[inline(always)]
pub fn finish(port: &PortInfo, d: &Decision, bytes: u32) -> i32 {
    sg_finish(port, d, bytes)
}

/// A BPF global function.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn sg_finish(port: *const PortInfo, d: *const Decision, bytes: u32) -> i32 {
    // SAFETY: the caller's stack values; global functions must check for null.
    let (Some(port), Some(d)) = (unsafe { port.as_ref() }, unsafe { d.as_ref() }) else {
        return TC_ACT_SHOT;
    };
    if d.traced != 0 {
        trace(port, d);
    }
    if d.traced == TRACED_DRY {
        return if reason_allows(d.reason) {
            TC_ACT_UNSPEC
        } else {
            TC_ACT_SHOT
        };
    }
    add(
        SG_STATS.get_ptr_mut(StatKey {
            port_idx: port.port_idx,
            dir: d.dir,
            reason: d.reason,
            _pad: [0; 2],
        }),
        bytes,
        |c| {
            let key = StatKey {
                port_idx: port.port_idx,
                dir: d.dir,
                reason: d.reason,
                _pad: [0; 2],
            };
            let _ = SG_STATS.insert(key, c, 0);
        },
    );
    if d.reason == REASON_ALLOW_RULE {
        add(SG_RULE_HITS.get_ptr_mut(d.rule), bytes, |_| {});
    }
    if reason_allows(d.reason) {
        TC_ACT_UNSPEC
    } else {
        TC_ACT_SHOT
    }
}

/// Adds one packet to a per-CPU counter, or hands a fresh counter to `insert`.
#[inline(always)]
fn add(c: Option<*mut Counter>, bytes: u32, insert: impl FnOnce(Counter)) {
    match c {
        // SAFETY: a per-CPU value: only this CPU writes it, and not re-entrantly.
        Some(c) => unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes as u64;
        },
        None => insert(Counter {
            packets: 1,
            bytes: bytes as u64,
        }),
    }
}

#[inline(always)]
fn trace(port: &PortInfo, d: &Decision) {
    let Some(t) = SG_TRACE.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU value, see `add`.
    unsafe {
        (*t).seq = (*t).seq.wrapping_add(1);
        (*t).port_idx = port.port_idx;
        (*t).policy = port.policy;
        (*t).class = d.class;
        (*t).rule = d.rule;
        (*t).reason = d.reason;
        (*t).dir = d.dir;
        (*t).ct_state = d.ct_state;
        (*t).family = d.family;
        (*t).proto = d.proto;
    }
}
