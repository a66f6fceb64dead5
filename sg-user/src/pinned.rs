//! Read access to the pinned maps of a running (or crashed) agent, without loading the
//! object: what `sg status`, `sg stats` and `sg conntrack` show, and what the conntrack
//! garbage collector scans.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use anyhow::{Context as _, Result, anyhow};
use aya::maps::{HashMap, Map, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues};
use sg_common::*;

pub fn open(root: &Path, name: &str) -> Result<Map> {
    let path = root.join("maps").join(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening pinned map {} (is the agent set up?)", path.display()))?;
    Ok(Map::from_map_data(data)?)
}

/// ifindex → port entry, sorted by ifindex.
pub fn ports(root: &Path) -> Result<Vec<(u32, PortInfo)>> {
    let map: HashMap<MapData, u32, PortInfo> = open(root, MAP_PORTS)?.try_into()?;
    let mut v = map.iter().collect::<Result<Vec<_>, _>>()?;
    v.sort_by_key(|(k, _)| *k);
    Ok(v)
}

/// Counters summed over CPUs, sorted by (port, direction, reason).
pub fn stats(root: &Path) -> Result<Vec<(StatKey, Counter)>> {
    let map: PerCpuHashMap<MapData, StatKey, Counter> = open(root, MAP_STATS)?.try_into()?;
    let mut v = Vec::new();
    for item in map.iter() {
        let (k, per_cpu) = item?;
        v.push((k, sum(per_cpu.iter())));
    }
    v.sort_by_key(|(k, _)| (k.port_idx, k.dir, k.reason));
    Ok(v)
}

/// Per-rule hits summed over CPUs, for the rule indexes that have any.
pub fn rule_hits(root: &Path) -> Result<Vec<(u32, Counter)>> {
    let map: PerCpuArray<MapData, Counter> = open(root, MAP_RULE_HITS)?.try_into()?;
    let mut v = Vec::new();
    for (i, item) in map.iter().enumerate() {
        let c = sum(item?.iter());
        if c.packets > 0 {
            v.push((i as u32, c));
        }
    }
    Ok(v)
}

fn sum<'a>(it: impl Iterator<Item = &'a Counter>) -> Counter {
    it.fold(Counter::default(), |a, c| Counter {
        packets: a.packets + c.packets,
        bytes: a.bytes + c.bytes,
    })
}

/// A conntrack entry and the table that holds it.
#[derive(Debug, Clone, Copy)]
pub struct CtEntry {
    pub key: CtKey,
    pub val: CtVal,
    /// In SG_CT_ASSURED (never evicted), not SG_CONNTRACK (flows not assured yet).
    pub protected: bool,
}

/// The conntrack tables, both, sorted by key. A pin root of an older sg without
/// SG_CT_ASSURED has only SG_CONNTRACK.
pub fn conntrack(root: &Path) -> Result<Vec<CtEntry>> {
    let mut v: BTreeMap<(bool, Vec<u8>), CtEntry> = BTreeMap::new();
    for (name, protected) in [(MAP_CONNTRACK, false), (MAP_CT_ASSURED, true)] {
        if protected && !root.join("maps").join(name).exists() {
            continue;
        }
        let map: HashMap<MapData, CtKey, CtVal> = open(root, name)?.try_into()?;
        // A hash walked while the datapath changes it may restart and show an entry twice.
        for (key, val) in map.iter().filter_map(|r| r.ok()) {
            v.insert(
                (protected, bytemuck::bytes_of(&key).to_vec()),
                CtEntry { key, val, protected },
            );
        }
    }
    let mut v: Vec<CtEntry> = v.into_values().collect();
    v.sort_by_key(|e| {
        let k = e.key;
        (k.zone, k.family, k.proto, k.addr_a, k.addr_b, k.port_a, k.port_b)
    });
    Ok(v)
}

/// SG_CT_EVENTS summed over CPUs: (port index, `CT_EV_*`) → count. Empty for a pin root of an
/// older sg.
pub fn ct_events(root: &Path) -> Result<BTreeMap<(u32, u8), u64>> {
    if !root.join("maps").join(MAP_CT_EVENTS).exists() {
        return Ok(BTreeMap::new());
    }
    let map: PerCpuHashMap<MapData, CtEventKey, u64> = open(root, MAP_CT_EVENTS)?.try_into()?;
    let mut out = BTreeMap::new();
    for item in map.iter() {
        let (k, per_cpu) = item?;
        out.insert((k.port_idx, k.event), per_cpu.iter().sum());
    }
    Ok(out)
}

/// Flows of each port that conntrack pressure evicted, as far as the counters tell: every entry
/// the datapath created that it did not remove itself, the garbage collector did not collect
/// and the tables do not hold any more. The counters are read before the tables are walked
/// and the removals after, so that flows created or removed during the walk are never taken
/// for evicted ones (the figure may then be low, never high).
pub fn ct_evicted(root: &Path) -> Result<BTreeMap<u32, u64>> {
    let before = ct_events(root)?;
    let mut live: BTreeMap<u32, u64> = BTreeMap::new();
    for e in conntrack(root)? {
        *live.entry(e.key.zone).or_default() += 1;
    }
    let after = ct_events(root)?;
    let mut out = BTreeMap::new();
    for (&(port, ev), &created) in &before {
        if ev != CT_EV_CREATED {
            continue;
        }
        let gone = |ev: u8| after.get(&(port, ev)).copied().unwrap_or(0);
        let kept = live.get(&port).copied().unwrap_or(0);
        let evicted = created.saturating_sub(gone(CT_EV_REMOVED) + gone(CT_EV_COLLECTED) + kept);
        out.insert(port, evicted);
    }
    Ok(out)
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Deletes expired conntrack and fragment entries, and, given the index of every port the agent
/// manages (`ports`), the conntrack entries of ports that are gone: they can never be used
/// again, and their index is never given to another port. The datapath ignores expired entries
/// anyway; collecting them keeps the LRU table from evicting live flows first and frees
/// SG_CT_ASSURED, which nothing evicts. Each port's collected entries are counted in
/// SG_CT_EVENTS (`CT_EV_COLLECTED`, written only here). Returns the number of entries deleted.
pub fn collect_expired(root: &Path, ports: Option<&BTreeSet<u32>>) -> Result<usize> {
    let now = monotonic_ns();
    let mut deleted = 0;
    let mut collected: BTreeMap<u32, u64> = BTreeMap::new();
    let dead = |k: &CtKey, v: &CtVal| v.expires_ns < now || ports.is_some_and(|p| !p.contains(&k.zone));
    for name in [MAP_CONNTRACK, MAP_CT_ASSURED] {
        if !root.join("maps").join(name).exists() {
            continue;
        }
        let mut ct: HashMap<MapData, CtKey, CtVal> = open(root, name)?.try_into()?;
        let doomed: Vec<CtKey> = ct
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(k, v)| dead(k, v))
            .map(|(k, _)| k)
            .collect();
        for k in &doomed {
            // A packet may have refreshed it since the scan; only delete what is still dead.
            if ct.get(k, 0).is_ok_and(|v| dead(k, &v)) && ct.remove(k).is_ok() {
                deleted += 1;
                *collected.entry(k.zone).or_default() += 1;
            }
        }
    }
    if root.join("maps").join(MAP_CT_EVENTS).exists() {
        let mut events: PerCpuHashMap<MapData, CtEventKey, u64> = open(root, MAP_CT_EVENTS)?.try_into()?;
        // The counters of ports that are gone go with their entries.
        if let Some(ports) = ports {
            let gone: Vec<CtEventKey> = events
                .keys()
                .filter_map(|k| k.ok())
                .filter(|k| !ports.contains(&k.port_idx))
                .collect();
            for k in gone {
                collected.remove(&k.port_idx);
                let _ = events.remove(&k);
            }
        }
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow!("{what}: {e}"))?;
        for (port_idx, n) in collected {
            let key = CtEventKey {
                port_idx,
                event: CT_EV_COLLECTED,
                _pad: [0; 3],
            };
            let total = events.get(&key, 0).map(|v| v.iter().sum()).unwrap_or(0u64) + n;
            let mut values = vec![0u64; cpus];
            values[0] = total;
            events.insert(key, PerCpuValues::try_from(values)?, 0)?;
        }
    }
    let mut frags: HashMap<MapData, FragKey, FragVal> = open(root, MAP_FRAGS)?.try_into()?;
    let expired: Vec<FragKey> = frags
        .iter()
        .filter_map(|r| r.ok())
        .filter(|(_, v)| v.expires_ns < now)
        .map(|(k, _)| k)
        .collect();
    for k in &expired {
        if frags.remove(k).is_ok() {
            deleted += 1;
        }
    }
    Ok(deleted)
}
