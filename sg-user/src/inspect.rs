//! What `sg status`, `sg show port`, `sg stats` and `sg conntrack list` print: the agent's
//! run state joined with the pinned maps. Tables for people, `--json` for machines.

use std::{collections::BTreeMap, fmt::Write as _, net::IpAddr, path::Path};

use anyhow::{Result, anyhow};
use serde::Serialize;
use sg_common::*;

use crate::{
    agent::apply::{LivePort, RunState},
    pinned,
};

pub struct Sources<'a> {
    pub pin_root: &'a Path,
    pub run_dir: &'a Path,
}

impl Sources<'_> {
    fn run_state(&self) -> Result<RunState> {
        RunState::load(self.run_dir)?.ok_or_else(|| {
            anyhow!(
                "no agent run state in {} (has `sg agent` run with this --run-dir?)",
                self.run_dir.display()
            )
        })
    }
}

#[derive(Debug, Serialize)]
pub struct PortStatus {
    pub id: String,
    pub device: String,
    pub ifindex: Option<u32>,
    /// The tap has an SG_PORTS entry with this port's index.
    pub enforced: bool,
    pub port_idx: u32,
    pub policy: u32,
    pub flags: Vec<&'static str>,
    pub security_groups: Vec<String>,
    pub allowed: u64,
    pub dropped: u64,
    /// This port's flows that conntrack pressure evicted before they were assured (a flood of
    /// new flows evicts its own oldest first; see `sg_common` on the two tables).
    pub conntrack_evicted: u64,
    /// This port's flows that became assured while SG_CT_ASSURED was full, and stay evictable.
    pub conntrack_unprotected: u64,
}

pub fn flag_names(flags: u32) -> Vec<&'static str> {
    [
        (PORT_F_FILTERED, "filtered"),
        (PORT_F_STATEFUL, "stateful"),
        (PORT_F_SPOOF_V4, "spoof-v4"),
        (PORT_F_SPOOF_V6, "spoof-v6"),
        (PORT_F_V6_FIXED, "v6-fixed"),
        (PORT_F_ARP_PROTECT, "arp-protect"),
    ]
    .into_iter()
    .filter(|(f, _)| flags & f != 0)
    .map(|(_, n)| n)
    .collect()
}

/// `sg status`: every port, and how full the conntrack tables are.
#[derive(Debug, Serialize)]
pub struct Status {
    pub ports: Vec<PortStatus>,
    /// SG_CONNTRACK: flows not assured yet (LRU).
    pub conntrack_entries: usize,
    pub conntrack_capacity: u32,
    /// SG_CT_ASSURED: assured flows, never evicted.
    pub conntrack_assured_entries: usize,
    pub conntrack_assured_capacity: u32,
}

pub fn status(src: &Sources) -> Result<Status> {
    let ports = port_status(src)?;
    let ct = pinned::conntrack(src.pin_root)?;
    let capacity = |name: &str| -> Result<u32> {
        let path = src.pin_root.join("maps").join(name);
        Ok(if path.exists() {
            aya::maps::MapInfo::from_pin(path)?.max_entries()
        } else {
            0
        })
    };
    Ok(Status {
        ports,
        conntrack_entries: ct.iter().filter(|e| !e.protected).count(),
        conntrack_capacity: capacity(MAP_CONNTRACK)?,
        conntrack_assured_entries: ct.iter().filter(|e| e.protected).count(),
        conntrack_assured_capacity: capacity(MAP_CT_ASSURED)?,
    })
}

pub fn status_text(s: &Status) -> String {
    let mut out = status_table(&s.ports);
    let pct = |n: usize, cap: u32| 100.0 * n as f64 / cap.max(1) as f64;
    let _ = writeln!(
        out,
        "conntrack: {} assured flows of {} ({:.1}%; never evicted), {} not assured yet of {} ({:.1}%; \
         when full, a new flow evicts the least recently used of these)",
        s.conntrack_assured_entries,
        s.conntrack_assured_capacity,
        pct(s.conntrack_assured_entries, s.conntrack_assured_capacity),
        s.conntrack_entries,
        s.conntrack_capacity,
        pct(s.conntrack_entries, s.conntrack_capacity),
    );
    for p in &s.ports {
        if p.conntrack_evicted > 0 || p.conntrack_unprotected > 0 {
            let _ = writeln!(
                out,
                "conntrack pressure on {}: {} flows evicted before they were assured, {} assured flows \
                 left evictable (assured table full)",
                p.device, p.conntrack_evicted, p.conntrack_unprotected
            );
        }
    }
    out
}

fn port_status(src: &Sources) -> Result<Vec<PortStatus>> {
    let rs = src.run_state()?;
    let entries: BTreeMap<u32, PortInfo> = pinned::ports(src.pin_root)?.into_iter().collect();
    let stats = pinned::stats(src.pin_root)?;
    let evicted = pinned::ct_evicted(src.pin_root)?;
    let events = pinned::ct_events(src.pin_root)?;
    let mut out = Vec::new();
    for p in &rs.ports {
        let (mut allowed, mut dropped) = (0, 0);
        for (k, c) in stats.iter().filter(|(k, _)| k.port_idx == p.port_idx) {
            if reason_allows(k.reason) {
                allowed += c.packets;
            } else {
                dropped += c.packets;
            }
        }
        out.push(PortStatus {
            id: p.id.clone(),
            device: p.device.clone(),
            ifindex: p.ifindex,
            enforced: p
                .ifindex
                .and_then(|i| entries.get(&i))
                .is_some_and(|e| e.port_idx == p.port_idx),
            port_idx: p.port_idx,
            policy: p.policy,
            flags: flag_names(p.flags),
            security_groups: p.security_groups.clone(),
            allowed,
            dropped,
            conntrack_evicted: evicted.get(&p.port_idx).copied().unwrap_or(0),
            conntrack_unprotected: events
                .get(&(p.port_idx, CT_EV_ASSURED_FULL))
                .copied()
                .unwrap_or(0),
        });
    }
    Ok(out)
}

pub fn status_table(ports: &[PortStatus]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<16} {:>7} {:<9} {:>5} {:>6} {:>10} {:>10}  {:<38} flags",
        "TAP", "IFINDEX", "STATE", "IDX", "POLICY", "ALLOWED", "DROPPED", "PORT"
    );
    for p in ports {
        let state = match (p.ifindex, p.enforced) {
            (None, _) => "no-tap",
            (Some(_), true) => "enforced",
            (Some(_), false) => "pending",
        };
        let _ = writeln!(
            s,
            "{:<16} {:>7} {:<9} {:>5} {:>6} {:>10} {:>10}  {:<38} {}",
            p.device,
            p.ifindex.map(|i| i.to_string()).unwrap_or_else(|| "-".into()),
            state,
            p.port_idx,
            p.policy,
            p.allowed,
            p.dropped,
            p.id,
            p.flags.join(",")
        );
    }
    s
}

fn find_port<'a>(rs: &'a RunState, id: &str) -> Result<&'a LivePort> {
    rs.ports
        .iter()
        .find(|p| p.id == id || p.device == id || p.id.starts_with(id))
        .ok_or_else(|| anyhow!("no port {id:?} (port id, id prefix or tap name) in the agent's run state"))
}

#[derive(Debug, Serialize)]
pub struct StatRow {
    pub port: String,
    pub device: String,
    pub direction: &'static str,
    pub reason: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct RuleRow {
    pub index: u32,
    pub security_group_id: String,
    pub rule_id: String,
    pub text: String,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct Stats {
    pub counters: Vec<StatRow>,
    pub rules: Vec<RuleRow>,
}

pub fn dir_name(dir: u8) -> &'static str {
    if dir == DIR_INGRESS { "to-vm" } else { "from-vm" }
}

pub fn stats(src: &Sources, port: Option<&str>) -> Result<Stats> {
    let rs = src.run_state()?;
    let only = port.map(|p| find_port(&rs, p)).transpose()?.map(|p| p.port_idx);
    let by_idx: BTreeMap<u32, &LivePort> = rs.ports.iter().map(|p| (p.port_idx, p)).collect();
    let counters = pinned::stats(src.pin_root)?
        .into_iter()
        .filter(|(k, _)| only.is_none_or(|i| i == k.port_idx))
        .map(|(k, c)| StatRow {
            port: by_idx
                .get(&k.port_idx)
                .map(|p| p.id.clone())
                .unwrap_or_else(|| format!("#{}", k.port_idx)),
            device: by_idx
                .get(&k.port_idx)
                .map(|p| p.device.clone())
                .unwrap_or_default(),
            direction: dir_name(k.dir),
            reason: reason_name(k.reason),
            packets: c.packets,
            bytes: c.bytes,
        })
        .collect();
    let texts: BTreeMap<u32, _> = rs.rules.iter().map(|r| (r.index, r)).collect();
    let rules = pinned::rule_hits(src.pin_root)?
        .into_iter()
        .filter_map(|(i, c)| {
            texts.get(&i).map(|r| RuleRow {
                index: i,
                security_group_id: r.security_group_id.clone(),
                rule_id: r.rule_id.clone(),
                text: r.text.clone(),
                packets: c.packets,
                bytes: c.bytes,
            })
        })
        .collect();
    Ok(Stats { counters, rules })
}

pub fn stats_table(s: &Stats) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:<8} {:<20} {:>12} {:>14}",
        "TAP", "DIR", "REASON", "PACKETS", "BYTES"
    );
    for r in &s.counters {
        let _ = writeln!(
            out,
            "{:<16} {:<8} {:<20} {:>12} {:>14}",
            r.device, r.direction, r.reason, r.packets, r.bytes
        );
    }
    let _ = writeln!(
        out,
        "\n{:>5} {:>12} {:>14}  {:<36} RULE",
        "IDX", "PACKETS", "BYTES", "RULE ID"
    );
    for r in &s.rules {
        let _ = writeln!(
            out,
            "{:>5} {:>12} {:>14}  {:<36} {}",
            r.index, r.packets, r.bytes, r.rule_id, r.text
        );
    }
    out
}

#[derive(Debug, Serialize)]
pub struct CtRow {
    pub port: String,
    pub device: String,
    pub proto: u8,
    pub orig_src: String,
    pub orig_dst: String,
    pub tcp_state: &'static str,
    pub seen_reply: bool,
    /// Assured (Linux IPS_ASSURED).
    pub assured: bool,
    /// In SG_CT_ASSURED: no pressure can evict it.
    pub protected: bool,
    /// Revoked: its admitting rule is gone; kept so that its other side cannot re-open it.
    pub revoked: bool,
    pub admitted: &'static str,
    pub rule: u32,
    pub policy: u32,
    pub expires_in_s: i64,
    pub packets: u32,
}

fn addr(family: u8, a: &[u8; 16]) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::from([a[0], a[1], a[2], a[3]])
    } else {
        IpAddr::from(*a)
    }
}

fn endpoint(family: u8, a: &[u8; 16], port: u16) -> String {
    match addr(family, a) {
        IpAddr::V4(v) => format!("{v}:{port}"),
        IpAddr::V6(v) => format!("[{v}]:{port}"),
    }
}

pub fn tcp_state_name(s: u8) -> &'static str {
    match s {
        TCP_SYN_SENT => "SYN_SENT",
        TCP_SYN_RECV => "SYN_RECV",
        TCP_ESTABLISHED => "ESTABLISHED",
        TCP_FIN_WAIT => "FIN_WAIT",
        TCP_CLOSE_WAIT => "CLOSE_WAIT",
        TCP_LAST_ACK => "LAST_ACK",
        TCP_TIME_WAIT => "TIME_WAIT",
        TCP_CLOSE => "CLOSE",
        TCP_SYN_SENT2 => "SYN_SENT2",
        _ => "-",
    }
}

pub fn conntrack(src: &Sources, port: Option<&str>) -> Result<Vec<CtRow>> {
    let rs = src.run_state()?;
    let only = port.map(|p| find_port(&rs, p)).transpose()?.map(|p| p.port_idx);
    let by_idx: BTreeMap<u32, &LivePort> = rs.ports.iter().map(|p| (p.port_idx, p)).collect();
    let now = pinned::monotonic_ns() as i64;
    Ok(pinned::conntrack(src.pin_root)?
        .into_iter()
        .filter(|e| only.is_none_or(|i| i == e.key.zone))
        .map(|e| {
            let (k, v) = (e.key, e.val);
            let a = endpoint(k.family, &k.addr_a, k.port_a);
            let b = endpoint(k.family, &k.addr_b, k.port_b);
            let (orig_src, orig_dst) = if v.flags & CT_F_ORIG_A != 0 {
                (a, b)
            } else {
                (b, a)
            };
            CtRow {
                port: by_idx
                    .get(&k.zone)
                    .map(|p| p.id.clone())
                    .unwrap_or_else(|| format!("#{}", k.zone)),
                device: by_idx.get(&k.zone).map(|p| p.device.clone()).unwrap_or_default(),
                proto: k.proto,
                orig_src,
                orig_dst,
                tcp_state: tcp_state_name(v.tcp_state),
                seen_reply: v.flags & CT_F_SEEN_REPLY != 0,
                assured: v.flags & CT_F_ASSURED != 0,
                protected: e.protected,
                revoked: v.flags & CT_F_REVOKED != 0,
                admitted: if v.flags & CT_F_ADMIT_INGRESS != 0 {
                    "to-vm"
                } else {
                    "from-vm"
                },
                rule: v.rule,
                policy: v.policy,
                expires_in_s: (v.expires_ns as i64 - now) / 1_000_000_000,
                packets: v.packets,
            }
        })
        .collect())
}

pub fn conntrack_table(rows: &[CtRow]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<16} {:>5} {:<46} {:<46} {:<12} {:<6} {:<10} {:<8} {:>5} {:>8}",
        "TAP",
        "PROTO",
        "ORIGINAL SOURCE",
        "ORIGINAL DESTINATION",
        "TCP",
        "REPLY",
        "STATE",
        "ADMITTED",
        "RULE",
        "TTL(s)"
    );
    for r in rows {
        // Revoked beats everything; "protected" is assured and in SG_CT_ASSURED.
        let state = match (r.revoked, r.protected, r.assured) {
            (true, _, _) => "revoked",
            (false, true, _) => "protected",
            (false, false, true) => "assured",
            (false, false, false) => "new",
        };
        let _ = writeln!(
            s,
            "{:<16} {:>5} {:<46} {:<46} {:<12} {:<6} {:<10} {:<8} {:>5} {:>8}",
            r.device,
            r.proto,
            r.orig_src,
            r.orig_dst,
            r.tcp_state,
            if r.seen_reply { "yes" } else { "no" },
            state,
            r.admitted,
            r.rule,
            r.expires_in_s
        );
    }
    let _ = writeln!(s, "{} entries", rows.len());
    s
}

#[derive(Debug, Serialize)]
pub struct PortDetail {
    pub status: PortStatus,
    pub rules: Vec<crate::agent::apply::LiveRule>,
    pub counters: Vec<StatRow>,
    pub conntrack_entries: usize,
}

pub fn show_port(src: &Sources, id: &str) -> Result<PortDetail> {
    let rs = src.run_state()?;
    let p = find_port(&rs, id)?.clone();
    let status = port_status(src)?
        .into_iter()
        .find(|s| s.id == p.id)
        .expect("port listed by status");
    let rules = rs
        .rules
        .iter()
        .filter(|r| p.security_groups.contains(&r.security_group_id))
        .cloned()
        .collect();
    let counters = stats(src, Some(&p.id))?.counters;
    let conntrack_entries = conntrack(src, Some(&p.id))?.len();
    Ok(PortDetail {
        status,
        rules,
        counters,
        conntrack_entries,
    })
}

pub fn show_port_text(d: &PortDetail) -> String {
    let mut s = status_table(std::slice::from_ref(&d.status));
    let _ = writeln!(s, "\nsecurity groups: {}", d.status.security_groups.join(", "));
    let _ = writeln!(s, "conntrack entries: {}", d.conntrack_entries);
    let _ = writeln!(s, "\nrules (iptables chain order):");
    for r in &d.rules {
        let _ = writeln!(s, "  {:>5}  {}  {}", r.index, r.rule_id, r.text);
    }
    let _ = writeln!(s, "\ncounters:");
    for c in &d.counters {
        let _ = writeln!(
            s,
            "  {:<8} {:<20} {:>10} packets {:>12} bytes",
            c.direction, c.reason, c.packets, c.bytes
        );
    }
    s
}
