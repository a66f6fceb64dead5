//! Read access to the pinned maps of a running (or crashed) agent, without loading the
//! object: what `sg status`, `sg stats` and `sg conntrack` show, and what the conntrack
//! garbage collector scans.

use std::path::Path;

use anyhow::{Context as _, Result};
use aya::maps::{HashMap, Map, MapData, PerCpuArray, PerCpuHashMap};
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

pub fn conntrack(root: &Path) -> Result<Vec<(CtKey, CtVal)>> {
    let map: HashMap<MapData, CtKey, CtVal> = open(root, MAP_CONNTRACK)?.try_into()?;
    let mut v = map.iter().collect::<Result<Vec<_>, _>>()?;
    v.sort_by_key(|(k, _)| (k.zone, k.family, k.proto, k.addr_a, k.addr_b, k.port_a, k.port_b));
    Ok(v)
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

/// Deletes expired conntrack and fragment entries. The datapath ignores expired entries
/// anyway; collecting them keeps the LRU tables from evicting live flows first. Returns the
/// number of entries deleted.
pub fn collect_expired(root: &Path) -> Result<usize> {
    let now = monotonic_ns();
    let mut deleted = 0;
    let mut ct: HashMap<MapData, CtKey, CtVal> = open(root, MAP_CONNTRACK)?.try_into()?;
    let expired: Vec<CtKey> = ct
        .iter()
        .filter_map(|r| r.ok())
        .filter(|(_, v)| v.expires_ns < now)
        .map(|(k, _)| k)
        .collect();
    for k in &expired {
        // A packet may have refreshed it since the scan; only delete what is still expired.
        if ct.get(k, 0).is_ok_and(|v| v.expires_ns < now) && ct.remove(k).is_ok() {
            deleted += 1;
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
