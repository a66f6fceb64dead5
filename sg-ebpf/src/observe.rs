//! Stage 7, after the verdict: events for the two consumers of SG_EVENTS, Neutron's
//! security-group log and `sg monitor`. The caller only comes here when the port logs
//! (`PORT_F_LOG_*`) or a monitor is attached (`SG_MONITOR.enabled`), so a node where nobody
//! logs or watches pays one flag test and one inlined array read per packet.
//!
//! - Log: ACCEPT for the first packet of a flow a security-group rule admits (the packet that
//!   creates its conntrack entry; every admitted packet of a stateless port); DROP for every
//!   dropped packet. Each port has its own token bucket (SG_LOG_LIMITS).
//! - Monitor: every verdict of the chosen port (or all) with a chosen reason, through one
//!   node-wide bucket in SG_MONITOR.
//!
//! One event serves both when both want it. Refused and lost events are counted in the
//! buckets that admitted or refused them.
use aya_ebpf::{
    bindings::{__sk_buff, bpf_spin_lock as kernel_lock},
    helpers::{bpf_ktime_get_ns, bpf_skb_load_bytes, bpf_spin_lock, bpf_spin_unlock},
};
use sg_common::*;

use crate::{
    maps::{SG_EVENTS, SG_LOG_LIMITS, SG_MONITOR},
    verdict::Decision,
};

/// Whether a `sg monitor` is attached: the per-packet test of the caller.
#[inline(always)]
pub fn monitor_on() -> bool {
    match SG_MONITOR.get(0) {
        Some(m) => m.enabled != 0,
        None => false,
    }
}

/// Whether the port's log wants this packet: a DROP, or the first packet of a flow a rule
/// admitted. The other packets of a logged port's flows, answered or not, stop here, before
/// any call.
#[inline(always)]
pub fn log_candidate(port: &PortInfo, d: &Decision) -> bool {
    if reason_allows(d.reason) {
        port.flags & PORT_F_LOG_ACCEPT != 0 && d.reason == REASON_ALLOW_RULE && d.first != 0
    } else {
        port.flags & PORT_F_LOG_DROP != 0
    }
}

/// A BPF global function: verified once, and none of its code is in the caller's path.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn sg_observe(skb: *mut __sk_buff, port: *const PortInfo, d: *const Decision) -> u32 {
    // SAFETY: the caller's stack values; global functions must check for null.
    let (Some(port), Some(d)) = (unsafe { port.as_ref() }, unsafe { d.as_ref() }) else {
        return 0;
    };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let mut flags = 0u8;

    let mut log = 0u8;
    if log_candidate(port, d) {
        log = if reason_allows(d.reason) {
            EVENT_F_LOG_ACCEPT
        } else {
            EVENT_F_LOG_DROP
        };
    }
    let mut log_bucket: Option<*mut Bucket> = None;
    if log != 0
        && let Some(b) = SG_LOG_LIMITS.get_ptr_mut(port.port_idx)
        && take(b, now)
    {
        flags |= log;
        log_bucket = Some(b);
    }

    let mut mon_bucket: Option<*mut Bucket> = None;
    if let Some(m) = SG_MONITOR.get_ptr_mut(0) {
        // SAFETY: a map value; the plain fields are written only by userspace.
        let (enabled, want_port, reasons) = unsafe { ((*m).enabled, (*m).port_idx, (*m).reasons) };
        if enabled != 0
            && (want_port == 0 || want_port == port.port_idx)
            && d.reason < 64
            && (reasons >> d.reason) & 1 != 0
        {
            // SAFETY: `bucket` is the first field of the map value.
            let b = unsafe { &raw mut (*m).bucket };
            if take(b, now) {
                flags |= EVENT_F_MONITOR;
                mon_bucket = Some(b);
            }
        }
    }
    if flags == 0 {
        return 0;
    }

    let Some(mut entry) = SG_EVENTS.reserve(0) else {
        if let Some(b) = log_bucket {
            lost(b);
        }
        if let Some(b) = mon_bucket {
            lost(b);
        }
        return 0;
    };
    // SAFETY: a reserved ring-buffer record of size_of::<Event>(), ours until submitted.
    let skb_len = unsafe { (*skb).len };
    let e = entry.as_mut_ptr();
    unsafe {
        (*e).ts_ns = now;
        (*e).ifindex = (*skb).ifindex;
        (*e).port_idx = port.port_idx;
        (*e).policy = port.policy;
        (*e).rule = d.rule;
        (*e).pkt_len = skb_len;
        (*e).flags = flags;
        (*e).dir = d.dir;
        (*e).reason = d.reason;
        (*e).ct_state = d.ct_state;
        (*e)._pad = [0; 6];
    }
    let mut cap = skb_len;
    if cap > EVENT_SNAP_LEN as u32 {
        cap = EVENT_SNAP_LEN as u32;
    }
    // SAFETY: `data` is EVENT_SNAP_LEN bytes of the record and cap is at most that.
    let copied =
        cap != 0 && unsafe { bpf_skb_load_bytes(skb as *const _, 0, (&raw mut (*e).data).cast(), cap) } == 0;
    unsafe { (*e).cap_len = if copied { cap as u16 } else { 0 } };
    entry.submit(0);
    1
}

/// One event through a bucket: admitted or refused, and counted either way.
#[inline(always)]
fn take(b: *mut Bucket, now: u64) -> bool {
    // SAFETY: a map value holding a bpf_spin_lock; nothing between lock and unlock calls a
    // helper or a function, as the verifier requires.
    unsafe {
        let lock = (&raw mut (*b).lock).cast::<kernel_lock>();
        bpf_spin_lock(lock);
        let tat = if (*b).tat_ns > now { (*b).tat_ns } else { now };
        let ok = tat - now <= (*b).tolerance_ns;
        if ok {
            (*b).tat_ns = tat + (*b).interval_ns;
            (*b).admitted += 1;
        } else {
            (*b).limited += 1;
        }
        bpf_spin_unlock(lock);
        ok
    }
}

#[inline(always)]
fn lost(b: *mut Bucket) {
    // SAFETY: see `take`.
    unsafe {
        let lock = (&raw mut (*b).lock).cast::<kernel_lock>();
        bpf_spin_lock(lock);
        (*b).lost += 1;
        bpf_spin_unlock(lock);
    }
}
