//! Stage 5: the security-group rules as two LPM lookups, whose cost does not grow with the
//! number of rules (design §3): the remote address gives a class, then (class, protocol, port)
//! gives the first rule, in Neutron's chain order, that admits the packet.
use core::mem::ManuallyDrop;

use aya_ebpf::maps::lpm_trie::Key;
use sg_common::*;

use crate::maps::{SG_CLASSES, SG_SERVICES, SG_SRC_PORTS};

/// The outcome of a policy lookup; 0 means "none" for both fields.
#[derive(Clone, Copy, Default)]
pub struct Hit {
    pub class: u32,
    pub rule: u32,
}

/// Answers `q`. (Inlined wrapper around the BPF global function, which can only return a
/// scalar.)
#[inline(always)]
pub fn lookup(q: &Query) -> Hit {
    let v = sg_policy(q);
    Hit {
        class: (v >> 32) as u32,
        rule: v as u32,
    }
}

/// One policy question. `remote` is the packet's source towards the VM and its destination
/// from the VM; `port` is `Pkt::service_port()` and `sport` the source port (or a conntrack
/// entry's original ones, for revocation); `src_ports` is the port's `PORT_F_SRC_PORTS`.
#[repr(C)]
pub struct Query {
    pub policy: u32,
    pub dir: u8,
    pub family: u8,
    pub proto: u8,
    pub src_ports: u8,
    pub port: u16,
    pub sport: u16,
    pub remote: [u8; 16],
}

/// `class << 32 | rule`. A BPF global function: verified once.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn sg_policy(q: *const Query) -> u64 {
    // SAFETY: the caller's stack value; global functions must check for null.
    let Some(q) = (unsafe { q.as_ref() }) else {
        return 0;
    };
    let hit = two_stage(q);
    ((hit.class as u64) << 32) | hit.rule as u64
}

/// The three LPM keys share one stack slot: this function ends the longest call chain of the
/// programs (a packet's program, then `sg_ct_lookup`'s revocation check, then here), which the
/// verifier holds to 512 bytes of stack in all.
union Keys {
    class: ManuallyDrop<Key<ClassKey>>,
    service: ManuallyDrop<Key<ServiceKey>>,
    src: ManuallyDrop<Key<SrcPortKey>>,
}

#[inline(always)]
fn two_stage(q: &Query) -> Hit {
    let mut hit = Hit::default();
    let mut keys = Keys {
        class: ManuallyDrop::new(Key::new(
            CLASS_KEY_FIXED_BITS + 128,
            ClassKey {
                policy: q.policy,
                dir: q.dir,
                family: q.family,
                _pad: [0; 2],
                addr: q.remote,
            },
        )),
    };
    // SAFETY: the field just written.
    let Some(class) = SG_CLASSES.get(unsafe { &*keys.class }) else {
        return hit;
    };
    hit.class = class.class;
    keys.service = ManuallyDrop::new(Key::new(
        SERVICE_KEY_FULL_BITS,
        ServiceKey {
            policy: q.policy,
            class: hit.class,
            dir: q.dir,
            family: q.family,
            proto: q.proto,
            port_be: q.port.to_be_bytes(),
            _pad: [0; 3],
        },
    ));
    // SAFETY: the field just written.
    if let Some(s) = SG_SERVICES.get(unsafe { &*keys.service }) {
        hit.rule = s.rule;
        return hit;
    }
    // Rules with source ports answer only what no other rule admits: the verdict is the same
    // as iptables' first match, the rule named may be a later one (tests/DIFFERENCES.md D21).
    if q.src_ports != 0 {
        keys.src = ManuallyDrop::new(Key::new(
            SRC_PORT_KEY_FULL_BITS,
            SrcPortKey {
                policy: q.policy,
                class: hit.class,
                dir: q.dir,
                family: q.family,
                proto: q.proto,
                sport_be: q.sport.to_be_bytes(),
                dport_be: q.port.to_be_bytes(),
                _pad: [0; 1],
            },
        ));
        // SAFETY: the field just written.
        if let Some(s) = SG_SRC_PORTS.get(unsafe { &*keys.src }) {
            hit.rule = s.rule;
        }
    }
    hit
}
