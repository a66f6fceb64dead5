//! Stage 5: the security-group rules as two LPM lookups, whose cost does not grow with the
//! number of rules (design §3): the remote address gives a class, then (class, protocol, port)
//! gives the first rule, in Neutron's chain order, that admits the packet.
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

#[inline(always)]
fn two_stage(q: &Query) -> Hit {
    let mut hit = Hit::default();
    let class_key = Key::new(
        CLASS_KEY_FIXED_BITS + 128,
        ClassKey {
            policy: q.policy,
            dir: q.dir,
            family: q.family,
            _pad: [0; 2],
            addr: q.remote,
        },
    );
    let Some(class) = SG_CLASSES.get(&class_key) else {
        return hit;
    };
    hit.class = class.class;
    let service_key = Key::new(
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
    );
    if let Some(s) = SG_SERVICES.get(&service_key) {
        hit.rule = s.rule;
        return hit;
    }
    // Rules with source ports answer only what no other rule admits: the verdict is the same
    // as iptables' first match, the rule named may be a later one (tests/DIFFERENCES.md D21).
    if q.src_ports != 0 {
        let key = Key::new(
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
        );
        if let Some(s) = SG_SRC_PORTS.get(&key) {
            hit.rule = s.rule;
        }
    }
    hit
}
