//! Stage 4: per-port connection tracking that gives each packet the state iptables' `-m state`
//! would see (README §4). `lookup` only reads (and revokes); `commit` writes, and the caller
//! calls it only once every stage has accepted the packet.
//!
//! Linux sources this follows (net/netfilter, v6.x):
//! - nf_conntrack_core.c `resolve_normal_ct`: a packet in the reply direction is ESTABLISHED;
//!   one in the original direction is ESTABLISHED once a reply was seen (IPS_SEEN_REPLY, set
//!   after the protocol tracker ran), NEW before. A tracker verdict of -NF_ACCEPT leaves the
//!   packet without conntrack: INVALID. Nothing is confirmed for a dropped packet.
//! - nf_conntrack_proto_tcp.c: `tcp_valid_flags`, `tcp_error`, `tcp_new` (a SYN starts a
//!   flow; with nf_conntrack_tcp_loose=1 so does a bare ACK), the `tcp_conntracks` table,
//!   the timeouts, SYN in TIME_WAIT/CLOSE re-opening the flow, the RST that kills a flow that
//!   never saw a reply, and the UNACK cap for a picked-up flow. Sequence/window tracking
//!   (`tcp_in_window`) is not done: sg behaves as nf_conntrack_tcp_be_liberal=1.
//! - nf_conntrack_proto_udp.c: `udp_error`/`udplite_error`, 30 s unreplied, 120 s replied.
//! - nf_conntrack_proto_icmp.c: types above 18 are invalid; errors (3, 4, 5, 11, 12) go to
//!   `nf_conntrack_inet_error`; `invmap` pairs requests and replies; only `valid_new` types
//!   (8, 13, 15, 17) start a flow.
//! - nf_conntrack_proto_icmpv6.c: `noct_valid_new` types (130-136, 143) are UNTRACKED; types
//!   below 128 are errors; `invmap` pairs 128/129 and 139/140; `valid_new` is 128 and 139;
//!   every other informational type has no inverse and is INVALID.
//! - `nf_conntrack_inet_error`: an error is RELATED when the inverse of the quoted packet's
//!   tuple is a tuple of a known flow and the outer destination is that tuple's destination,
//!   i.e. the quoted packet's source.
// Map calls take the 44-byte key by reference on purpose: by value it is a copy on the
// 512-byte BPF stack.
#![allow(clippy::needless_borrows_for_generic_args)]

use aya_ebpf::{bindings::__sk_buff, helpers::bpf_ktime_get_ns, programs::TcContext};
use sg_common::*;

use crate::{
    maps::{SG_CONNTRACK, SG_CT_ASSURED, SG_CT_EVENTS},
    parse::{
        self, FRAG_LATER, IPPROTO_DCCP, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_NONE, IPPROTO_SCTP,
        IPPROTO_TCP, IPPROTO_UDP, IPPROTO_UDPLITE, Pkt,
    },
    policy,
};

const NS_PER_S: u64 = 1_000_000_000;

/// What `commit` does once the packet is accepted.
const OP_NONE: u8 = 0;
const OP_CREATE: u8 = 1;
const OP_UPDATE: u8 = 2;
const OP_DELETE: u8 = 3;

/// Which table holds the entry found under a packet's key (live, expired or revoked).
const IN_NONE: u8 = 0;
/// SG_CONNTRACK: not assured yet; pressure may evict it.
const IN_NEW: u8 = 1;
/// SG_CT_ASSURED: never evicted.
const IN_ASSURED: u8 = 2;

/// `bpf_map_update_elem` flag: only create.
const BPF_NOEXIST: u64 = 1;
const EEXIST: i32 = 17;

/// The conntrack view of one packet. It crosses BPF global-function boundaries, so it holds
/// no pointer: `commit` finds the entry again by key.
#[repr(C)]
pub struct Ct {
    /// Rule that admitted the flow this packet belongs to (ESTABLISHED/RELATED).
    pub rule: u32,
    /// `CT_STATE_*`.
    pub state: u8,
    op: u8,
    /// The packet's source is the key's side a.
    src_is_a: bool,
    /// TCP state after this packet.
    tcp_state: u8,
    /// `CT_F_*` bits this packet adds to the entry.
    set_flags: u8,
    /// A traced packet (`sg trace`): compute everything, write nothing, so that tracing
    /// never changes what it observes.
    pub dry: bool,
    /// The lookup found a revoked flow under the key (a tombstone, `CT_F_REVOKED`), which
    /// counts as no entry for the side that opened it and drops the other side's packets.
    revoked: bool,
    /// The revoked flow's `CT_F_ORIG_A`: which side opened it.
    revoked_orig_a: bool,
    /// `IN_*`: the table of the entry under `key`, if any.
    found: u8,
    _pad: [u8; 3],
    timeout_s: u64,
    now: u64,
    key: CtKey,
    _tail: [u8; 4],
}

impl Ct {
    pub const NONE: Ct = Ct {
        rule: 0,
        state: CT_STATE_NONE,
        op: OP_NONE,
        src_is_a: true,
        tcp_state: TCP_NONE,
        set_flags: 0,
        dry: false,
        revoked: false,
        revoked_orig_a: false,
        found: IN_NONE,
        _pad: [0; 3],
        timeout_s: 0,
        now: 0,
        _tail: [0; 4],
        key: CtKey {
            zone: 0,
            family: 0,
            proto: 0,
            _pad: [0; 2],
            addr_a: [0; 16],
            addr_b: [0; 16],
            port_a: 0,
            port_b: 0,
        },
    };
}

/// The state of `pkt` on `port`, into `ct` (which starts as `Ct::NONE`). Stateless ports keep
/// `CT_STATE_NONE` and no entry.
#[inline(always)]
pub fn lookup(ctx: &TcContext, port: &PortInfo, pkt: &Pkt, ct: &mut Ct) {
    if port.flags & PORT_F_STATEFUL == 0 {
        return;
    }
    // ICMP errors have their own global function, called from here rather than from
    // sg_ct_lookup so that the two frames are never stacked.
    if is_icmp_error(pkt) {
        ct.now = unsafe { bpf_ktime_get_ns() };
        sg_ct_related(ctx.skb.skb, port, pkt, ct);
    } else {
        sg_ct_lookup(port, pkt, ct);
    }
}

/// ICMP 3, 4, 5, 11, 12 (Linux `icmp_is_err`); ICMPv6 types below 128.
#[inline(always)]
fn is_icmp_error(pkt: &Pkt) -> bool {
    pkt.has_icmp()
        && if pkt.family == FAMILY_V6 {
            pkt.icmp_type < 128
        } else {
            matches!(pkt.icmp_type, 3 | 4 | 5 | 11 | 12)
        }
}

/// A BPF global function: verified once, whatever the caller knows about the packet.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn sg_ct_lookup(port: *const PortInfo, pkt: *const Pkt, ct: *mut Ct) -> u32 {
    // SAFETY: the caller's stack values; global functions must check for null.
    let (Some(port), Some(pkt), Some(ct)) = (unsafe { port.as_ref() }, unsafe { pkt.as_ref() }, unsafe {
        ct.as_mut()
    }) else {
        return 0;
    };
    ct.now = unsafe { bpf_ktime_get_ns() };
    let entry = if pkt.has_icmp() {
        icmp(port, pkt, ct)
    } else {
        flow(port, pkt, ct)
    };
    // Conntrack runs only for packets no earlier stage dropped, and the state rule accepts
    // every ESTABLISHED packet (main.rs `decide_ip`): its acceptance is certain, so its effect
    // on the flow is written now, through the pointer this lookup holds, instead of by a
    // second lookup in `commit`. NEW packets still wait for the rules.
    if ct.state == CT_STATE_ESTABLISHED && !entry.is_null() && !ct.dry {
        apply(ct, entry);
        ct.op = OP_NONE;
    }
    ct.state as u32
}

/// Writes an accepted packet's effect on the live entry `e` (OP_UPDATE, OP_DELETE).
#[inline(always)]
fn apply(ct: &Ct, e: *mut CtVal) {
    match ct.op {
        OP_UPDATE => {
            // SAFETY: a map value pointer from a lookup in this program run. An LRU entry
            // evicted meanwhile stays valid memory until the RCU grace period, and the write
            // is lost. Concurrent updates of one flow from two CPUs race as plain stores,
            // which at worst loses a refresh.
            unsafe {
                (*e).expires_ns = ct.now + ct.timeout_s * NS_PER_S;
                (*e).tcp_state = ct.tcp_state;
                (*e).flags |= ct.set_flags;
                (*e).packets = (*e).packets.wrapping_add(1);
            }
            if ct.found == IN_NEW {
                protect(ct, e);
            }
        }
        OP_DELETE => remove(ct.found, &ct.key),
        _ => {}
    }
}

/// Moves a flow that has become assured from SG_CONNTRACK, where a flood of new flows can
/// evict it, to SG_CT_ASSURED, where nothing does. When SG_CT_ASSURED is full the flow stays
/// where it is, marked `CT_F_UNPROTECTED` so that this is tried (and counted) once.
#[inline(always)]
fn protect(ct: &Ct, e: *mut CtVal) {
    // SAFETY: see `apply`.
    let val = unsafe { *e };
    if val.flags & CT_F_ASSURED == 0 || val.flags & CT_F_UNPROTECTED != 0 {
        return;
    }
    match SG_CT_ASSURED.insert(&ct.key, &val, BPF_NOEXIST) {
        Ok(()) => {
            let _ = SG_CONNTRACK.remove(&ct.key);
        }
        // Another CPU moved it first.
        Err(err) if err == -EEXIST => {
            let _ = SG_CONNTRACK.remove(&ct.key);
        }
        Err(_) => {
            // SAFETY: see `apply`.
            unsafe { (*e).flags |= CT_F_UNPROTECTED };
            event(ct.key.zone, CT_EV_ASSURED_FULL);
        }
    }
}

/// Removes the entry under `key` from the table `found` names, and counts it.
#[inline(always)]
fn remove(found: u8, key: &CtKey) {
    let removed = match found {
        IN_ASSURED => SG_CT_ASSURED.remove(key).is_ok(),
        IN_NEW => SG_CONNTRACK.remove(key).is_ok(),
        _ => false,
    };
    if removed {
        event(key.zone, CT_EV_REMOVED);
    }
}

/// Counts one conntrack event of a port (SG_CT_EVENTS, per CPU).
#[inline(always)]
fn event(port_idx: u32, event: u8) {
    let key = CtEventKey {
        port_idx,
        event,
        _pad: [0; 3],
    };
    match SG_CT_EVENTS.get_ptr_mut(&key) {
        // SAFETY: a per-CPU value: only this CPU writes it, and not re-entrantly.
        Some(c) => unsafe { *c += 1 },
        None => {
            let _ = SG_CT_EVENTS.insert(&key, &1, 0);
        }
    }
}

/// Records the packet's effect on its flow. Called only for accepted packets; `rule` is the
/// rule that admitted a new flow (0 for a fixed rule).
#[inline(always)]
pub fn commit(ct: &Ct, dir: u8, policy: u32, rule: u32) {
    if ct.op != OP_NONE {
        sg_ct_commit(ct, dir, policy, rule);
    }
}

/// A BPF global function.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn sg_ct_commit(ct: *const Ct, dir: u8, policy: u32, rule: u32) -> u32 {
    // SAFETY: the caller's stack value; global functions must check for null.
    let Some(ct) = (unsafe { ct.as_ref() }) else {
        return 0;
    };
    match ct.op {
        OP_CREATE => {
            let expires_ns = ct.now + ct.timeout_s * NS_PER_S;
            let mut flags = 0;
            if ct.src_is_a {
                flags |= CT_F_ORIG_A;
            }
            if dir == DIR_INGRESS {
                flags |= CT_F_ADMIT_INGRESS;
            }
            let val = CtVal {
                expires_ns,
                policy,
                rule,
                tcp_state: ct.tcp_state,
                flags,
                _pad: [0; 2],
                packets: 1,
            };
            // An expired or revoked entry under the key makes way for the new flow, which
            // starts where every flow starts: among those not assured yet.
            remove(ct.found, &ct.key);
            // Only create: if another CPU created the flow meanwhile, that entry stands.
            if SG_CONNTRACK.insert(&ct.key, &val, BPF_NOEXIST).is_ok() {
                event(ct.key.zone, CT_EV_CREATED);
            }
        }
        OP_UPDATE => {
            // Found again by key: a map-value pointer cannot cross the global-function
            // boundary. If the entry was evicted meanwhile, the update is lost, as it would
            // be a moment later anyway.
            let e = match ct.found {
                IN_ASSURED => SG_CT_ASSURED.get_ptr_mut(&ct.key),
                _ => SG_CONNTRACK.get_ptr_mut(&ct.key),
            };
            if let Some(e) = e {
                apply(ct, e);
            }
        }
        OP_DELETE => apply(ct, core::ptr::null_mut()),
        _ => {}
    }
    0
}

// ------------------------------------------------------------------------------------------
// Keys and entries
// ------------------------------------------------------------------------------------------

/// (addr, port) of side x sorts before or equal to side y, bytewise (sg-common CtKey).
#[inline(always)]
fn le(x: &[u8; 16], xp: u16, y: &[u8; 16], yp: u16) -> bool {
    let (x0, x1) = split(x);
    let (y0, y1) = split(y);
    (x0, x1, xp) <= (y0, y1, yp)
}

#[inline(always)]
fn split(a: &[u8; 16]) -> (u64, u64) {
    (
        u64::from_be_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]),
        u64::from_be_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]),
    )
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn make_key(zone: u32, family: u8, proto: u8, a: &[u8; 16], pa: u16, b: &[u8; 16], pb: u16) -> CtKey {
    CtKey {
        zone,
        family,
        proto,
        _pad: [0; 2],
        addr_a: *a,
        addr_b: *b,
        port_a: pa,
        port_b: pb,
    }
}

/// The normalised key of a packet from (src, sport) to (dst, dport); also says whether the
/// source is side a.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn flow_key(
    zone: u32,
    family: u8,
    proto: u8,
    src: &[u8; 16],
    sport: u16,
    dst: &[u8; 16],
    dport: u16,
) -> (CtKey, bool) {
    if le(src, sport, dst, dport) {
        (make_key(zone, family, proto, src, sport, dst, dport), true)
    } else {
        (make_key(zone, family, proto, dst, dport, src, sport), false)
    }
}

fn has_ports(proto: u8) -> bool {
    matches!(
        proto,
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_UDPLITE | IPPROTO_SCTP | IPPROTO_DCCP
    )
}

/// The live entry under `ct.key` (in SG_CT_ASSURED or SG_CONNTRACK; `ct.found` says which), or
/// null. An expired entry counts as absent. An entry admitted under another policy id is
/// re-checked against the port's current policy (revocation, design §4 and §8): still allowed,
/// it moves to the new id and rule; no longer allowed, it becomes a tombstone (`CT_F_REVOKED`),
/// which counts as no entry here and sets `ct.revoked` so that the caller can keep the flow's
/// other side from re-opening it. A tombstone is re-checked like any entry when the policy
/// changes again, and revived if admitted. Every packet that finds a tombstone keeps it for
/// another `revoked_timeout`, so a sender that keeps retransmitting never outlives it. Entries
/// admitted by a fixed rule (rule 0) do not depend on the security-group rules and just move to
/// the new id.
#[inline(always)]
fn live_entry(port: &PortInfo, ct: &mut Ct) -> *mut CtVal {
    // Assured flows first: they carry most packets.
    let e = match SG_CT_ASSURED.get_ptr_mut(&ct.key) {
        Some(e) => {
            ct.found = IN_ASSURED;
            e
        }
        None => match SG_CONNTRACK.get_ptr_mut(&ct.key) {
            Some(e) => {
                ct.found = IN_NEW;
                e
            }
            None => return core::ptr::null_mut(),
        },
    };
    // SAFETY: a map value pointer from this lookup; see `commit` about concurrency.
    unsafe {
        if (*e).expires_ns <= ct.now {
            return core::ptr::null_mut();
        }
        let mut revoked = (*e).flags & CT_F_REVOKED != 0;
        if (*e).policy != port.policy {
            if (*e).rule != 0 {
                let rule = recheck(&ct.key, (*e).flags, port);
                revoked = rule == 0;
                if !ct.dry {
                    if revoked {
                        (*e).flags |= CT_F_REVOKED;
                    } else {
                        (*e).rule = rule;
                        (*e).flags &= !CT_F_REVOKED;
                    }
                }
            }
            if !ct.dry {
                (*e).policy = port.policy;
            }
        }
        if revoked {
            ct.revoked = true;
            ct.revoked_orig_a = (*e).flags & CT_F_ORIG_A != 0;
            if !ct.dry {
                (*e).expires_ns = ct.now + revoked_timeout(ct.key.proto) * NS_PER_S;
            }
            return core::ptr::null_mut();
        }
    }
    e
}

/// How long a tombstone outlives the last packet of its flow: longer than the gap between a
/// sender's retransmissions (TCP backs off up to 120 s), so that it does not expire while the
/// VM still tries, and a retransmission cannot re-open the flow through the other direction's
/// rules.
#[inline(always)]
fn revoked_timeout(proto: u8) -> u64 {
    match proto {
        IPPROTO_TCP => timeout::TCP_UNACK,
        IPPROTO_UDP | IPPROTO_UDPLITE => timeout::UDP_REPLIED,
        IPPROTO_ICMP | IPPROTO_ICMPV6 => timeout::ICMP,
        _ => timeout::GENERIC,
    }
}

/// A packet without a live entry whose key holds a revoked flow: a packet from the side that
/// did not open the flow must not start it again in its own direction (a VM's reply stream
/// through the default egress rule), unless it is a TCP SYN, a new connection. Such a packet
/// is `CT_STATE_REVOKED`. Packets from the opening side are decided as packets without state:
/// the current rules of the admitting direction decide them, as the re-check just did.
#[inline(always)]
fn revoked_reply(ct: &Ct, src_is_a: bool, tcp_syn: bool) -> bool {
    ct.revoked && src_is_a != ct.revoked_orig_a && !tcp_syn
}

/// The port's current policy for the flow's first packet: its original direction, remote and
/// service port. For ICMP keys side a is always the requester and port_b the request's
/// (type << 8 | code); protocols without ports have zero ports; so "the original destination
/// port" is the right service port for every key.
#[inline(always)]
fn recheck(key: &CtKey, flags: u8, port: &PortInfo) -> u32 {
    let dir = if flags & CT_F_ADMIT_INGRESS != 0 {
        DIR_INGRESS
    } else {
        DIR_EGRESS
    };
    let orig_a = flags & CT_F_ORIG_A != 0;
    let (src, dst, sport, dport) = if orig_a {
        (&key.addr_a, &key.addr_b, key.port_a, key.port_b)
    } else {
        (&key.addr_b, &key.addr_a, key.port_b, key.port_a)
    };
    policy::lookup(&policy::Query {
        policy: port.policy,
        dir,
        family: key.family,
        proto: key.proto,
        // ICMP keys hold the query id here; no SG_SRC_PORTS entry has an ICMP protocol.
        src_ports: (port.flags & PORT_F_SRC_PORTS != 0) as u8,
        port: dport,
        sport,
        remote: if dir == DIR_INGRESS { *src } else { *dst },
    })
    .rule
}

/// Fills the state of a packet that found `entry` (in the original direction when `orig`).
/// Returns whether a reply had been seen before it.
#[inline(always)]
fn established(ct: &mut Ct, entry: *mut CtVal, orig: bool) -> bool {
    // SAFETY: non-null pointer from `live_entry`.
    let (flags, rule) = unsafe { ((*entry).flags, (*entry).rule) };
    let seen_reply = flags & CT_F_SEEN_REPLY != 0;
    ct.rule = rule;
    ct.state = if orig && !seen_reply {
        CT_STATE_NEW
    } else {
        CT_STATE_ESTABLISHED
    };
    if !orig {
        ct.set_flags |= CT_F_SEEN_REPLY;
    }
    seen_reply
}

#[inline(always)]
fn entry_orig(entry: *mut CtVal, src_is_a: bool) -> bool {
    // SAFETY: non-null pointer from `live_entry`.
    let orig_a = unsafe { (*entry).flags } & CT_F_ORIG_A != 0;
    orig_a == src_is_a
}

// ------------------------------------------------------------------------------------------
// TCP, UDP and everything else with a 5-tuple
// ------------------------------------------------------------------------------------------

#[inline(always)]
/// Fills `ct` for a packet of a 5-tuple protocol; returns the live entry it found (null if
/// none, or if the packet re-opened a closed TCP flow).
fn flow(port: &PortInfo, pkt: &Pkt, ct: &mut Ct) -> *mut CtVal {
    // No upper-layer header at all: Linux's get_l4proto fails and the packet is INVALID.
    if pkt.family == FAMILY_V6 && pkt.proto == IPPROTO_NONE {
        ct.state = CT_STATE_INVALID;
        return core::ptr::null_mut();
    }
    let (sport, dport) = if has_ports(pkt.proto) {
        (pkt.sport, pkt.dport)
    } else {
        (0, 0)
    };
    let (key, src_is_a) = flow_key(
        port.port_idx,
        pkt.family,
        pkt.proto,
        &pkt.src,
        sport,
        &pkt.dst,
        dport,
    );
    ct.key = key;
    ct.src_is_a = src_is_a;
    // The trackers' error functions run before the lookup and leave the flow untouched.
    if pkt.l4_bad || (pkt.proto == IPPROTO_TCP && !tcp_valid_flags(pkt.tcp_flags)) {
        ct.state = CT_STATE_INVALID;
        return core::ptr::null_mut();
    }
    let entry = live_entry(port, ct);
    let syn = pkt.proto == IPPROTO_TCP && tcp_index(pkt.tcp_flags) == TCP_SYN_SET;
    if entry.is_null() && revoked_reply(ct, src_is_a, syn) {
        ct.state = CT_STATE_REVOKED;
        return entry;
    }
    if pkt.proto == IPPROTO_TCP {
        return tcp(ct, entry, pkt.tcp_flags);
    }
    let udp = pkt.proto == IPPROTO_UDP || pkt.proto == IPPROTO_UDPLITE;
    if entry.is_null() {
        ct.state = CT_STATE_NEW;
        ct.op = OP_CREATE;
        ct.timeout_s = if udp {
            timeout::UDP_UNREPLIED
        } else {
            timeout::GENERIC
        };
        return entry;
    }
    let seen_reply = established(ct, entry, entry_orig(entry, src_is_a));
    ct.op = OP_UPDATE;
    ct.timeout_s = if !udp {
        timeout::GENERIC
    } else if seen_reply {
        // Linux keeps 30 s for the first reply and gives a stream 120 s and ASSURED.
        ct.set_flags |= CT_F_ASSURED;
        timeout::UDP_REPLIED
    } else {
        timeout::UDP_UNREPLIED
    };
    entry
}

const TCPHDR_FIN: u8 = 0x01;
const TCPHDR_SYN: u8 = 0x02;
const TCPHDR_RST: u8 = 0x04;
const TCPHDR_PSH: u8 = 0x08;
const TCPHDR_ACK: u8 = 0x10;
const TCPHDR_URG: u8 = 0x20;

/// nf_conntrack_proto_tcp.c `tcp_valid_flags`, as a bit set over FIN|SYN|RST|ACK|URG after
/// PSH, ECE and CWR are masked off ("PUSH, ECE and CWR are always valid").
const TCP_VALID_FLAGS: u64 = (1 << TCPHDR_SYN)
    | (1 << (TCPHDR_SYN | TCPHDR_URG))
    | (1 << (TCPHDR_SYN | TCPHDR_ACK))
    | (1 << TCPHDR_RST)
    | (1 << (TCPHDR_RST | TCPHDR_ACK))
    | (1 << (TCPHDR_FIN | TCPHDR_ACK))
    | (1 << (TCPHDR_FIN | TCPHDR_ACK | TCPHDR_URG))
    | (1 << TCPHDR_ACK)
    | (1 << (TCPHDR_ACK | TCPHDR_URG));

#[inline(always)]
fn tcp_valid_flags(flags: u8) -> bool {
    let f = flags & (TCPHDR_FIN | TCPHDR_SYN | TCPHDR_RST | TCPHDR_ACK | TCPHDR_URG) & !TCPHDR_PSH;
    (TCP_VALID_FLAGS >> f) & 1 != 0
}

/// `get_conntrack_index`: the row of `tcp_conntracks` a segment uses.
const TCP_SYN_SET: u8 = 0;
const TCP_SYNACK_SET: u8 = 1;
const TCP_FIN_SET: u8 = 2;
const TCP_ACK_SET: u8 = 3;
const TCP_RST_SET: u8 = 4;
const TCP_NONE_SET: u8 = 5;

#[inline(always)]
fn tcp_index(flags: u8) -> u8 {
    if flags & TCPHDR_RST != 0 {
        TCP_RST_SET
    } else if flags & TCPHDR_SYN != 0 {
        if flags & TCPHDR_ACK != 0 {
            TCP_SYNACK_SET
        } else {
            TCP_SYN_SET
        }
    } else if flags & TCPHDR_FIN != 0 {
        TCP_FIN_SET
    } else if flags & TCPHDR_ACK != 0 {
        TCP_ACK_SET
    } else {
        TCP_NONE_SET
    }
}

// Linux's sNO..sS2 are the sg-common TCP_* values; sIV (TCP_CONNTRACK_MAX) and sIG.
const S_NO: u8 = TCP_NONE;
const S_SS: u8 = TCP_SYN_SENT;
const S_SR: u8 = TCP_SYN_RECV;
const S_ES: u8 = TCP_ESTABLISHED;
const S_FW: u8 = TCP_FIN_WAIT;
const S_CW: u8 = TCP_CLOSE_WAIT;
const S_LA: u8 = TCP_LAST_ACK;
const S_TW: u8 = TCP_TIME_WAIT;
const S_CL: u8 = TCP_CLOSE;
const S_S2: u8 = TCP_SYN_SENT2;
const S_IV: u8 = 10;
const S_IG: u8 = 11;

/// One row of `tcp_conntracks` (indexed by the old state sNO..sS2) packed as 4-bit nibbles,
/// so the lookup is a shift on a constant: no memory access for the verifier to prove.
const fn row(s: [u8; 10]) -> u64 {
    let mut r = 0u64;
    let mut i = 0;
    while i < 10 {
        r |= (s[i] as u64) << (4 * i);
        i += 1;
    }
    r
}

// nf_conntrack_proto_tcp.c `tcp_conntracks[2][6][TCP_CONNTRACK_MAX]`, copied row by row.
//                                sNO   sSS   sSR   sES   sFW   sCW   sLA   sTW   sCL   sS2
const ORIG_SYN: u64 = row([S_SS, S_SS, S_IG, S_IG, S_IG, S_IG, S_IG, S_SS, S_SS, S_S2]);
const ORIG_SYNACK: u64 = row([S_IV, S_IV, S_SR, S_IV, S_IV, S_IV, S_IV, S_IV, S_IV, S_SR]);
const ORIG_FIN: u64 = row([S_IV, S_IV, S_FW, S_FW, S_LA, S_LA, S_LA, S_TW, S_CL, S_IV]);
const ORIG_ACK: u64 = row([S_ES, S_IV, S_ES, S_ES, S_CW, S_CW, S_TW, S_TW, S_CL, S_IV]);
const ORIG_RST: u64 = row([S_IV, S_CL, S_CL, S_CL, S_CL, S_CL, S_CL, S_CL, S_CL, S_CL]);
const REPLY_SYN: u64 = row([S_IV, S_S2, S_IV, S_IV, S_IV, S_IV, S_IV, S_SS, S_IV, S_S2]);
const REPLY_SYNACK: u64 = row([S_IV, S_SR, S_IG, S_IG, S_IG, S_IG, S_IG, S_IG, S_IG, S_SR]);
const REPLY_FIN: u64 = row([S_IV, S_IV, S_FW, S_FW, S_LA, S_LA, S_LA, S_TW, S_CL, S_IV]);
const REPLY_ACK: u64 = row([S_IV, S_IG, S_SR, S_ES, S_CW, S_CW, S_TW, S_TW, S_CL, S_IG]);
const REPLY_RST: u64 = row([S_IV, S_CL, S_CL, S_CL, S_CL, S_CL, S_CL, S_CL, S_CL, S_CL]);
// The "none" rows are all sIV.
const NONE_ROW: u64 = row([S_IV; 10]);

#[inline(always)]
fn tcp_next(orig: bool, index: u8, old: u8) -> u8 {
    if old > S_S2 {
        return S_IV;
    }
    let r = match (orig, index) {
        (true, TCP_SYN_SET) => ORIG_SYN,
        (true, TCP_SYNACK_SET) => ORIG_SYNACK,
        (true, TCP_FIN_SET) => ORIG_FIN,
        (true, TCP_ACK_SET) => ORIG_ACK,
        (true, TCP_RST_SET) => ORIG_RST,
        (false, TCP_SYN_SET) => REPLY_SYN,
        (false, TCP_SYNACK_SET) => REPLY_SYNACK,
        (false, TCP_FIN_SET) => REPLY_FIN,
        (false, TCP_ACK_SET) => REPLY_ACK,
        (false, TCP_RST_SET) => REPLY_RST,
        _ => NONE_ROW,
    };
    ((r >> (4 * old as u64)) & 0xf) as u8
}

/// tcp_timeouts[], in seconds.
#[inline(always)]
fn tcp_timeout(state: u8) -> u64 {
    match state {
        S_SS => timeout::TCP_SYN_SENT,
        S_SR => timeout::TCP_SYN_RECV,
        S_ES => timeout::TCP_ESTABLISHED,
        S_FW => timeout::TCP_FIN_WAIT,
        S_CW => timeout::TCP_CLOSE_WAIT,
        S_LA => timeout::TCP_LAST_ACK,
        S_TW => timeout::TCP_TIME_WAIT,
        S_S2 => timeout::TCP_SYN_SENT2,
        _ => timeout::TCP_CLOSE,
    }
}

/// `tcp_new`: only a SYN, or with tcp_loose a bare ACK (a mid-stream pickup), starts a flow.
#[inline(always)]
fn tcp_new(ct: &mut Ct, index: u8) {
    let new = tcp_next(true, index, S_NO);
    if new != S_SS && new != S_ES {
        ct.state = CT_STATE_INVALID;
        return;
    }
    ct.state = CT_STATE_NEW;
    ct.op = OP_CREATE;
    ct.tcp_state = new;
    // No reply seen yet: a picked-up ESTABLISHED flow is capped at the UNACK timeout.
    ct.timeout_s = if new == S_ES {
        timeout::TCP_UNACK
    } else {
        tcp_timeout(new)
    };
}

/// `nf_conntrack_tcp_packet` without window tracking. Returns `entry`, or null when the
/// packet re-opened the flow.
#[inline(always)]
fn tcp(ct: &mut Ct, entry: *mut CtVal, flags: u8) -> *mut CtVal {
    let index = tcp_index(flags);
    if entry.is_null() {
        tcp_new(ct, index);
        return entry;
    }
    let orig = entry_orig(entry, ct.src_is_a);
    // SAFETY: non-null pointer from `live_entry`.
    let old = unsafe { (*entry).tcp_state };
    let new = tcp_next(orig, index, old);
    if new == S_SS && (old == S_TW || old == S_CL) {
        // A SYN re-opens a closed flow: Linux kills the entry and looks the packet up again,
        // so it is NEW for whichever side sent it (the kill happens in conntrack, before the
        // filter, whatever the verdict). Linux re-opens from CLOSE only when the close began
        // with a FIN or the RST came from the same side, and otherwise lets the SYN through
        // as IGNORED; sg always re-opens (same verdict while the rules admit the SYN).
        if !ct.dry {
            remove(ct.found, &ct.key);
            ct.found = IN_NONE;
        }
        tcp_new(ct, index);
        return core::ptr::null_mut();
    }
    let seen_reply = established(ct, entry, orig);
    match new {
        // Ignored: the packet keeps its state, the flow is untouched.
        S_IG => ct.set_flags = 0,
        S_IV => {
            ct.state = CT_STATE_INVALID;
            ct.set_flags = 0;
        }
        _ => {
            ct.op = OP_UPDATE;
            ct.tcp_state = new;
            let rst = index == TCP_RST_SET;
            ct.timeout_s = if rst { timeout::TCP_CLOSE } else { tcp_timeout(new) };
            if !seen_reply {
                if rst {
                    // "If only reply is a RST, we can consider ourselves not to have an
                    // established connection": the entry goes.
                    ct.op = OP_DELETE;
                }
                if new == S_ES && ct.timeout_s > timeout::TCP_UNACK {
                    ct.timeout_s = timeout::TCP_UNACK;
                }
            } else if (old == S_SR || old == S_ES) && new == S_ES {
                ct.set_flags |= CT_F_ASSURED;
            }
        }
    }
    entry
}

// ------------------------------------------------------------------------------------------
// ICMP and ICMPv6
// ------------------------------------------------------------------------------------------

/// For a query or a reply (the types `invmap` knows): the request type and whether this type
/// is the request.
#[inline(always)]
fn icmp_query(family: u8, icmp_type: u8) -> Option<(u8, bool)> {
    if family == FAMILY_V4 {
        match icmp_type {
            8 | 13 | 15 | 17 => Some((icmp_type, true)),
            0 => Some((8, false)),
            14 => Some((13, false)),
            16 => Some((15, false)),
            18 => Some((17, false)),
            _ => None,
        }
    } else {
        match icmp_type {
            128 | 139 => Some((icmp_type, true)),
            129 => Some((128, false)),
            140 => Some((139, false)),
            _ => None,
        }
    }
}

/// The role-based key of an ICMP query or reply from `src` to `dst` (sg-common CtKey).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn icmp_key(
    zone: u32,
    family: u8,
    proto: u8,
    src: &[u8; 16],
    dst: &[u8; 16],
    id: u16,
    req_type: u8,
    code: u8,
    is_request: bool,
) -> CtKey {
    let tc = ((req_type as u16) << 8) | code as u16;
    if is_request {
        make_key(zone, family, proto, src, id, dst, tc)
    } else {
        make_key(zone, family, proto, dst, id, src, tc)
    }
}

/// Queries and replies (errors went to `sg_ct_related`); returns the live entry or null.
#[inline(always)]
fn icmp(port: &PortInfo, pkt: &Pkt, ct: &mut Ct) -> *mut CtVal {
    let t = pkt.icmp_type;
    if pkt.family == FAMILY_V6 {
        if matches!(t, 130..=136 | 143) {
            ct.state = CT_STATE_UNTRACKED;
            return core::ptr::null_mut();
        }
    } else if t > 18 {
        ct.state = CT_STATE_INVALID;
        return core::ptr::null_mut();
    }
    let Some((req_type, is_request)) = icmp_query(pkt.family, t) else {
        // No inverse tuple: Linux cannot track it.
        ct.state = CT_STATE_INVALID;
        return core::ptr::null_mut();
    };
    ct.key = icmp_key(
        port.port_idx,
        pkt.family,
        pkt.proto,
        &pkt.src,
        &pkt.dst,
        pkt.icmp_id,
        req_type,
        pkt.icmp_code,
        is_request,
    );
    ct.src_is_a = is_request;
    let entry = live_entry(port, ct);
    if entry.is_null() && revoked_reply(ct, is_request, false) {
        ct.state = CT_STATE_REVOKED;
        return entry;
    }
    ct.timeout_s = timeout::ICMP;
    if entry.is_null() {
        // Only a request can start a flow ("valid_new"); a reply without one is INVALID.
        if is_request {
            ct.state = CT_STATE_NEW;
            ct.op = OP_CREATE;
        } else {
            ct.state = CT_STATE_INVALID;
        }
        return entry;
    }
    established(ct, entry, entry_orig(entry, is_request));
    ct.op = OP_UPDATE;
    entry
}

/// An ICMP/ICMPv6 error: RELATED when the quoted packet belongs to a live flow of this port
/// and the error goes to the quoted packet's source; INVALID otherwise. Nothing is written.
/// A BPF global function, with its own stack frame for the quoted packet.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn sg_ct_related(
    skb: *mut __sk_buff,
    port: *const PortInfo,
    pkt: *const Pkt,
    ct: *mut Ct,
) -> u32 {
    // SAFETY: the caller's values; global functions must check for null.
    let (Some(port), Some(pkt), Some(ct)) = (unsafe { port.as_ref() }, unsafe { pkt.as_ref() }, unsafe {
        ct.as_mut()
    }) else {
        return 0;
    };
    related(&TcContext::new(skb), port, pkt, ct);
    ct.state as u32
}

#[inline(always)]
fn related(ctx: &TcContext, port: &PortInfo, pkt: &Pkt, ct: &mut Ct) {
    ct.state = CT_STATE_INVALID;
    // An error changes no entry, so `ct.key` is free: the quoted packet's key is built in place
    // (this function's stack frame is on the deepest call chain).
    let end = pkt.l3_end;
    let off = pkt.l4_off + 8;
    let k = &mut ct.key;
    *k = Ct::NONE.key;
    k.zone = port.port_idx;
    k.family = pkt.family;
    // The quoted IP header: addresses into the key, then protocol and L4 offset. A quoted
    // non-first fragment has no L4 header, and Linux's get_l4proto refuses it.
    let l4 = if pkt.family == FAMILY_V4 {
        if off + 20 > end {
            return;
        }
        let Ok(h) = parse::load::<20>(ctx, off) else {
            return;
        };
        let ihl = ((h[0] & 0x0f) as u32) * 4;
        if ihl < 20 || u16::from_be_bytes([h[6], h[7]]) & 0x1fff != 0 {
            return;
        }
        k.proto = h[9];
        k.addr_a[..4].copy_from_slice(&h[12..16]);
        k.addr_b[..4].copy_from_slice(&h[16..20]);
        off + ihl
    } else {
        if off + 40 > end {
            return;
        }
        let Ok(h) = parse::load::<8>(ctx, off) else {
            return;
        };
        if !parse::load_into(ctx, off + 8, &mut k.addr_a) || !parse::load_into(ctx, off + 24, &mut k.addr_b) {
            return;
        }
        let Ok(w) = parse::ext_walk(ctx, h[6], off + 40, end) else {
            return;
        };
        if w.frag == FRAG_LATER {
            return;
        }
        k.proto = w.proto;
        w.off
    };
    // nf_conntrack_inet_error: the error must go to the quoted packet's source.
    if pkt.dst != k.addr_a {
        return;
    }
    // The quoted L4 header: 4 bytes of ports, or the 8-byte ICMP header of a query or reply
    // (an error about an error has no inverse tuple and relates to nothing).
    let quoted_is_a = if has_ports(k.proto) {
        if l4 + 4 > end {
            return;
        }
        let Ok(p) = parse::load::<4>(ctx, l4) else {
            return;
        };
        k.port_a = u16::from_be_bytes([p[0], p[1]]);
        k.port_b = u16::from_be_bytes([p[2], p[3]]);
        le(&k.addr_a, k.port_a, &k.addr_b, k.port_b)
    } else if (k.family == FAMILY_V4 && k.proto == IPPROTO_ICMP)
        || (k.family == FAMILY_V6 && k.proto == IPPROTO_ICMPV6)
    {
        if l4 + 8 > end {
            return;
        }
        let Ok(i) = parse::load::<8>(ctx, l4) else {
            return;
        };
        let Some((req_type, is_request)) = icmp_query(k.family, i[0]) else {
            return;
        };
        k.port_a = u16::from_be_bytes([i[4], i[5]]);
        k.port_b = ((req_type as u16) << 8) | i[1] as u16;
        // Role-based key: the requester is side a.
        is_request
    } else {
        le(&k.addr_a, 0, &k.addr_b, 0)
    };
    if !quoted_is_a {
        core::mem::swap(&mut k.addr_a, &mut k.addr_b);
        if has_ports(k.proto) {
            core::mem::swap(&mut k.port_a, &mut k.port_b);
        }
    }
    let entry = live_entry(port, ct);
    if entry.is_null() {
        return;
    }
    ct.state = CT_STATE_RELATED;
    // SAFETY: non-null pointer from `live_entry`.
    ct.rule = unsafe { (*entry).rule };
}
