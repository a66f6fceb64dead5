//! In-place policy changes (sg-ebpf README §5.1): a changed policy is edited under its own id,
//! writing entries in proportion to the change, in an order in which every packet is decided
//! by the old policy or by the new one, never by a mixture of the two.
//!
//! Why an order exists. A policy is two longest-prefix maps: SG_CLASSES gives the remote
//! address a class, SG_SERVICES gives (class, protocol, port) a rule. For one LPM map going from
//! entry set O to entry set N, write the entries of N that are new or changed, longest prefix
//! first, then delete the entries only O has, shortest prefix first. At every step a key's
//! longest match is either its longest match in O (with O's value) or its longest match in N
//! (with N's value): an entry of N that was written has every longer entry of N written before
//! it, and an entry of O that was deleted has every shorter one deleted before it.
//!
//! Across the two maps the classes must mean the same thing: class numbers are a function of
//! the class's selector set ([`live_classes`]), stable across compiles, so a class keeps its
//! SG_SERVICES entries when other rules change. A change then falls in one of two shapes:
//! - **classes change, services of existing classes do not** (a rule with a new remote, a
//!   remote-group or address-group member added or removed, a rule removed with its remote):
//!   the services of new classes are written first (no class entry points at them yet), the
//!   class map is switched in the order above, the services of classes no longer used go last.
//!   A packet's class is its old one or its new one, and either class has all its services;
//! - **services change, classes do not** (a rule added or removed on a remote the policy
//!   already uses): the service map is switched in the order above.
//!
//! A change of both shapes at once (a rule added on a new remote and another removed on an
//! old one in one input) could decide a packet by the new classes and the old services; it is
//! written under a fresh id instead, as is any change larger than the policy itself.

use std::{
    collections::{BTreeSet, HashMap},
    hash::{Hash as _, Hasher},
};

use anyhow::{Context as _, Result};
use sg_common::*;

use super::apply::{Entries, PolicyContent};
use crate::{
    compile::{Compiled, CompiledPolicy, Selector},
    datapath::{Datapath, batch},
};

/// Live class numbers for the classes one compiled policy uses: compiled class id → live
/// class number. The number is a hash of the class's selector set (what the class means), so
/// that it stays the same across compiles; the rare collision within a policy takes the next
/// free number, in an order that depends only on the selector sets. Never 0.
pub fn live_classes(compiled: &Compiled, policy: &CompiledPolicy) -> HashMap<u32, u32> {
    let mut ids: BTreeSet<u32> = policy.classes.iter().map(|e| e.value.class).collect();
    ids.extend(policy.services.iter().map(|e| e.key.class));
    let none: &[Selector] = &[];
    let mut named: Vec<(u32, &[Selector], u32)> = ids
        .into_iter()
        .map(|id| {
            let selectors = compiled
                .classes
                .get(id as usize - 1)
                .map_or(none, |c| c.selectors.as_slice());
            let mut h = Fnv(0xcbf2_9ce4_8422_2325);
            selectors.hash(&mut h);
            (1 + ((h.0 ^ (h.0 >> 32)) as u32 % (u32::MAX - 1)), selectors, id)
        })
        .collect();
    named.sort_unstable();
    let mut taken: BTreeSet<u32> = BTreeSet::new();
    let mut out = HashMap::with_capacity(named.len());
    for (mut n, _, id) in named {
        while !taken.insert(n) {
            n = if n == u32::MAX { 1 } else { n + 1 };
        }
        out.insert(id, n);
    }
    out
}

/// FNV-1a: fixed, so that every agent (of one build) computes the same number for the same
/// class. A build whose `Selector` hashes differently renumbers classes once: every policy is
/// then rewritten, correctly, under fresh ids or as a larger in-place change.
struct Fnv(u64);

impl Hasher for Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// The writes that take one policy id from `old` to `new` in place, in the order they must be
/// made. Entries carry policy id 0 (set when written). A class is *in use* when a class entry
/// points at it: only those are ever looked up.
#[derive(Debug, Default)]
pub struct Delta {
    /// SG_SERVICES of classes not in use before: nothing looks them up yet.
    first: (Entries<ServiceKey, ServiceVal>, Entries<ServiceKey, ServiceVal>),
    /// SG_CLASSES: new or changed entries, longest prefix first; deletions, shortest first.
    classes: (Entries<ClassKey, ClassVal>, Entries<ClassKey, ClassVal>),
    /// SG_SERVICES of classes in use before and after: in the same order as classes.
    shared: (Entries<ServiceKey, ServiceVal>, Entries<ServiceKey, ServiceVal>),
    /// SG_SERVICES of classes no longer in use: nothing looks them up any more.
    last: (Entries<ServiceKey, ServiceVal>, Entries<ServiceKey, ServiceVal>),
}

impl Delta {
    /// The ordered delta from `old` to `new`, or `None` when the change has both shapes (see
    /// the module) or costs more than writing `new` under a fresh id and deleting `old`.
    pub fn plan(old: &PolicyContent, new: &PolicyContent) -> Option<Self> {
        // Source-port rules (SG_SRC_PORTS, consulted when SG_SERVICES admits nothing) are a
        // second service map whose order against SG_SERVICES is not worked out: a change to
        // them is written under a fresh id.
        if old.src_ports != new.src_ports {
            return None;
        }
        let (mut class_writes, mut class_deletes) = diff(&old.classes, &new.classes);
        let before: BTreeSet<u32> = old.classes.iter().map(|(_, _, v)| v.class).collect();
        let after: BTreeSet<u32> = new.classes.iter().map(|(_, _, v)| v.class).collect();
        let (writes, deletes) = diff(&old.services, &new.services);
        let mut d = Delta::default();
        let group = |class: u32| match (before.contains(&class), after.contains(&class)) {
            (false, _) => 0,
            (true, true) => 1,
            (true, false) => 2,
        };
        for e in writes {
            match group(e.1.class) {
                0 => d.first.0.push(e),
                1 => d.shared.0.push(e),
                _ => d.last.0.push(e),
            }
        }
        for e in deletes {
            match group(e.1.class) {
                0 => d.first.1.push(e),
                1 => d.shared.1.push(e),
                _ => d.last.1.push(e),
            }
        }
        // The services of a class in use changed while the classes changed: a packet could
        // meet its new class with the old services.
        let classes_change = !(class_writes.is_empty() && class_deletes.is_empty());
        let shared_change = !(d.shared.0.is_empty() && d.shared.1.is_empty());
        if classes_change && shared_change {
            return None;
        }
        let full = old.classes.len()
            + old.services.len()
            + old.src_ports.len()
            + new.classes.len()
            + new.services.len()
            + new.src_ports.len();
        if class_writes.len() + class_deletes.len() + d.service_len() >= full {
            return None;
        }
        class_writes.sort_by_key(|(len, _, _)| std::cmp::Reverse(*len));
        class_deletes.sort_by_key(|(len, _, _)| *len);
        d.shared.0.sort_by_key(|(len, _, _)| std::cmp::Reverse(*len));
        d.shared.1.sort_by_key(|(len, _, _)| *len);
        d.classes = (class_writes, class_deletes);
        Some(d)
    }

    fn service_len(&self) -> usize {
        [&self.first, &self.shared, &self.last]
            .iter()
            .map(|(w, d)| w.len() + d.len())
            .sum()
    }

    /// Entries written or deleted.
    pub fn len(&self) -> usize {
        self.classes.0.len() + self.classes.1.len() + self.service_len()
    }

    /// Makes the writes under policy `id`, in order. On an error the policy is left between the
    /// old and the new content (each packet decided by one of them); the caller re-reads it.
    pub fn apply(&self, dp: &Datapath, id: u32) -> Result<()> {
        let classes = dp.lpm_map(MAP_CLASSES)?;
        let services = dp.lpm_map(MAP_SERVICES)?;
        let cl = |e: &Entries<ClassKey, ClassVal>| -> Entries<ClassKey, ClassVal> {
            e.iter()
                .map(|(p, k, v)| (*p, ClassKey { policy: id, ..*k }, *v))
                .collect()
        };
        let sv = |e: &Entries<ServiceKey, ServiceVal>| -> Entries<ServiceKey, ServiceVal> {
            e.iter()
                .map(|(p, k, v)| (*p, ServiceKey { policy: id, ..*k }, *v))
                .collect()
        };
        batch::lpm_update(services, &sv(&self.first.0)).context("SG_SERVICES")?;
        batch::lpm_delete(services, &sv(&self.first.1)).context("SG_SERVICES")?;
        batch::lpm_update(classes, &cl(&self.classes.0)).context("SG_CLASSES")?;
        batch::lpm_delete(classes, &cl(&self.classes.1)).context("SG_CLASSES")?;
        for (w, d) in [&self.shared, &self.last] {
            batch::lpm_update(services, &sv(w)).context("SG_SERVICES")?;
            batch::lpm_delete(services, &sv(d)).context("SG_SERVICES")?;
        }
        Ok(())
    }
}

/// Entries of `new` that `old` lacks or holds with another value, and entries only `old` has.
/// Both are sorted by (key bytes, prefix length).
#[allow(clippy::type_complexity)]
fn diff<K: bytemuck::Pod, V: PartialEq + Copy>(
    old: &Entries<K, V>,
    new: &Entries<K, V>,
) -> (Entries<K, V>, Entries<K, V>) {
    let ord = |a: &(u32, K, V), b: &(u32, K, V)| {
        bytemuck::bytes_of(&a.1)
            .cmp(bytemuck::bytes_of(&b.1))
            .then(a.0.cmp(&b.0))
    };
    let (mut writes, mut deletes) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < old.len() || j < new.len() {
        match (old.get(i), new.get(j)) {
            (Some(o), Some(n)) => match ord(o, n) {
                std::cmp::Ordering::Less => {
                    deletes.push(*o);
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    writes.push(*n);
                    j += 1;
                }
                std::cmp::Ordering::Equal => {
                    if o.2 != n.2 {
                        writes.push(*n);
                    }
                    i += 1;
                    j += 1;
                }
            },
            (Some(o), None) => {
                deletes.push(*o);
                i += 1;
            }
            (None, Some(n)) => {
                writes.push(*n);
                j += 1;
            }
            (None, None) => break,
        }
    }
    (writes, deletes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(len: u32, addr: [u8; 4], class: u32) -> (u32, ClassKey, ClassVal) {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&addr);
        (
            CLASS_KEY_FIXED_BITS + len,
            ClassKey {
                policy: 0,
                dir: DIR_INGRESS,
                family: FAMILY_V4,
                _pad: [0; 2],
                addr: a,
            },
            ClassVal { class },
        )
    }

    fn service(class: u32, port: u16, rule: u32) -> (u32, ServiceKey, ServiceVal) {
        (
            SERVICE_KEY_FULL_BITS,
            ServiceKey {
                policy: 0,
                class,
                dir: DIR_INGRESS,
                family: FAMILY_V4,
                proto: 6,
                port_be: port.to_be_bytes(),
                _pad: [0; 3],
            },
            ServiceVal { rule },
        )
    }

    fn content(
        classes: Entries<ClassKey, ClassVal>,
        services: Entries<ServiceKey, ServiceVal>,
    ) -> PolicyContent {
        PolicyContent::sealed(classes, services, Vec::new())
    }

    /// Longest match of `addr` among class entries, as the kernel's LPM trie answers.
    fn lookup(entries: &[(u32, ClassKey, ClassVal)], addr: [u8; 4]) -> Option<u32> {
        entries
            .iter()
            .filter(|(len, k, _)| {
                let bits = len - CLASS_KEY_FIXED_BITS;
                let (a, b) = (
                    u32::from_be_bytes(addr),
                    u32::from_be_bytes(k.addr[..4].try_into().unwrap()),
                );
                bits == 0 || (a ^ b) >> (32 - bits) == 0
            })
            .max_by_key(|(len, _, _)| *len)
            .map(|(_, _, v)| v.class)
    }

    #[test]
    fn every_intermediate_class_map_answers_old_or_new() {
        // Old: 10/8 → 1, 10.1/16 → 2, 10.1.1/24 → 3. New: 10/8 → 1, 10.1.1/24 → 4 (the /16
        // goes, the /24 changes), 10.1.1.128/25 → 5 (new, inside the changed /24).
        let old = content(
            vec![
                class(8, [10, 0, 0, 0], 1),
                class(16, [10, 1, 0, 0], 2),
                class(24, [10, 1, 1, 0], 3),
            ],
            vec![service(1, 22, 1), service(2, 22, 1), service(3, 22, 1)],
        );
        let new = content(
            vec![
                class(8, [10, 0, 0, 0], 1),
                class(24, [10, 1, 1, 0], 4),
                class(25, [10, 1, 1, 128], 5),
            ],
            vec![service(1, 22, 1), service(4, 22, 1), service(5, 22, 1)],
        );
        let d = Delta::plan(&old, &new).expect("classes only: in place");
        assert!(d.shared.0.is_empty() && d.shared.1.is_empty());
        assert_eq!(d.first.0.len(), 2, "services of the new classes 4 and 5 first");
        assert_eq!(d.last.1.len(), 2, "those of classes 2 and 3 last");
        // Replay the class writes one at a time; probe addresses in every region.
        let probes = [
            [10, 0, 0, 1],
            [10, 1, 0, 1],
            [10, 1, 1, 1],
            [10, 1, 1, 200],
            [11, 0, 0, 1],
        ];
        let mut state = old.classes.clone();
        let check = |state: &Entries<ClassKey, ClassVal>| {
            for p in probes {
                let got = lookup(state, p);
                assert!(
                    got == lookup(&old.classes, p) || got == lookup(&new.classes, p),
                    "{p:?}: {got:?} is neither old nor new"
                );
            }
        };
        for w in &d.classes.0 {
            state.retain(|e| (e.0, bytemuck::bytes_of(&e.1)) != (w.0, bytemuck::bytes_of(&w.1)));
            state.push(*w);
            check(&state);
        }
        for del in &d.classes.1 {
            state.retain(|e| (e.0, bytemuck::bytes_of(&e.1)) != (del.0, bytemuck::bytes_of(&del.1)));
            check(&state);
        }
        let mut end = state.clone();
        end.sort_by(|x, y| {
            bytemuck::bytes_of(&x.1)
                .cmp(bytemuck::bytes_of(&y.1))
                .then(x.0.cmp(&y.0))
        });
        assert_eq!(end, new.classes);
    }

    #[test]
    fn a_change_of_both_shapes_is_not_made_in_place() {
        let old = content(
            vec![class(8, [10, 0, 0, 0], 1)],
            vec![service(1, 22, 1), service(1, 80, 2)],
        );
        // Class 2 appears and class 1 loses port 80.
        let new = content(
            vec![class(8, [10, 0, 0, 0], 1), class(24, [10, 9, 9, 0], 2)],
            vec![service(1, 22, 1), service(2, 22, 1), service(2, 443, 3)],
        );
        assert!(Delta::plan(&old, &new).is_none());
        // Services only: in place.
        let new = content(
            vec![class(8, [10, 0, 0, 0], 1)],
            vec![service(1, 22, 1), service(1, 443, 3)],
        );
        let d = Delta::plan(&old, &new).unwrap();
        assert_eq!((d.shared.0.len(), d.shared.1.len()), (1, 1));
    }
}
