//! What `sg status`, `sg show port`, `sg stats` and `sg conntrack list` print: the agent's
//! run state joined with the pinned maps. Tables for people, `--json` for machines.

use std::{collections::BTreeMap, fmt::Write as _, net::IpAddr, path::Path};

use anyhow::{Result, anyhow};
use serde::Serialize;
use sg_common::*;

use crate::{
    agent::{
        apply::{LivePort, RunState},
        lock::{self, AgentRecord},
        taps,
    },
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
    /// Where the port is enforced now, and that interface's ifindex: its tap, or the hybrid
    /// bridge's `qvb<id>`. `None` when it is enforced nowhere.
    pub point: Option<String>,
    pub ifindex: Option<u32>,
    /// `enforced`, `closed` (left the input; its tap drops everything), `no-tap`, or
    /// `unfiltered` (a tap exists and sg's programs do not filter it), checked against the
    /// kernel, not taken from the agent's word.
    pub state: &'static str,
    /// Why a port is unfiltered.
    pub detail: Option<String>,
    /// `state == "enforced"`.
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
        (PORT_F_CLOSED, "closed"),
    ]
    .into_iter()
    .filter(|(f, _)| flags & f != 0)
    .map(|(_, n)| n)
    .collect()
}

/// Whether an agent runs on the pin root (the holder of its lock), and since when.
#[derive(Debug, Serialize)]
pub struct AgentState {
    pub running: bool,
    pub pid: Option<u32>,
    /// RFC 3339 UTC.
    pub started_at: Option<String>,
    /// When a stopped agent stopped (a clean exit), or was last seen alive (killed, crashed).
    pub down_since: Option<String>,
    pub stop_reason: Option<String>,
    /// One line for people.
    pub summary: String,
}

pub fn agent_state(src: &Sources) -> Result<AgentState> {
    let holder = lock::holder(src.pin_root)?;
    let record = AgentRecord::load(src.run_dir).unwrap_or(None);
    let started_at = record.as_ref().map(|r| lock::utc(r.started_at));
    Ok(match (holder, record) {
        (Some(pid), _) => AgentState {
            running: true,
            pid: Some(pid),
            summary: format!(
                "running, pid {pid}{}",
                started_at
                    .as_ref()
                    .map(|t| format!(", since {t}"))
                    .unwrap_or_default()
            ),
            started_at,
            down_since: None,
            stop_reason: None,
        },
        (None, Some(r)) => {
            let (since, summary) = match (&r.stopped_at, &r.stop_reason) {
                (Some(t), reason) => (
                    lock::utc(*t),
                    format!(
                        "NOT RUNNING since {} ({}; pid was {})",
                        lock::utc(*t),
                        reason.as_deref().unwrap_or("stopped"),
                        r.pid
                    ),
                ),
                (None, _) => (
                    lock::utc(r.alive_at),
                    format!(
                        "NOT RUNNING since {} at the latest: last seen alive then, it was killed \
                         or crashed (pid was {})",
                        lock::utc(r.alive_at),
                        r.pid
                    ),
                ),
            };
            AgentState {
                running: false,
                pid: None,
                started_at,
                down_since: Some(since),
                stop_reason: r.stop_reason.clone(),
                summary,
            }
        }
        (None, None) => AgentState {
            running: false,
            pid: None,
            started_at: None,
            down_since: None,
            stop_reason: None,
            summary: format!(
                "NOT RUNNING (no agent holds {} and {} has no agent record)",
                src.pin_root.display(),
                src.run_dir.display()
            ),
        },
    })
}

/// `sg status`: the agent, every port, and how full the conntrack tables are.
#[derive(Debug, Serialize)]
pub struct Status {
    pub agent: AgentState,
    /// The agent runs and every port with a tap is enforced (or closed).
    pub healthy: bool,
    pub ports: Vec<PortStatus>,
    /// SG_CONNTRACK: flows not assured yet (LRU).
    pub conntrack_entries: usize,
    pub conntrack_capacity: u32,
    /// SG_CT_ASSURED: assured flows, never evicted.
    pub conntrack_assured_entries: usize,
    pub conntrack_assured_capacity: u32,
}

pub fn status(src: &Sources) -> Result<Status> {
    let agent = agent_state(src)?;
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
        healthy: agent.running && ports.iter().all(|p| p.state != "unfiltered"),
        agent,
        ports,
        conntrack_entries: ct.iter().filter(|e| !e.protected).count(),
        conntrack_capacity: capacity(MAP_CONNTRACK)?,
        conntrack_assured_entries: ct.iter().filter(|e| e.protected).count(),
        conntrack_assured_capacity: capacity(MAP_CT_ASSURED)?,
    })
}

pub fn status_text(s: &Status) -> String {
    let mut out = format!("agent: {}\n", s.agent.summary);
    if !s.agent.running {
        out.push_str(
            "  the pinned links keep enforcing the last policy; input changes are not applied, \
             and a tap created or re-created now is not filtered (except hybrid ports, enforced \
             on qvb)\n",
        );
    }
    out.push('\n');
    out.push_str(&status_table(&s.ports));
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

/// What the kernel says about one interface of the taps' namespace.
#[derive(Debug, Default, Clone)]
struct Seen {
    ifindex: Option<u32>,
    /// Names of the programs attached at tcx ingress and egress.
    ingress: Vec<String>,
    egress: Vec<String>,
}

fn look(names: Vec<String>, netns: Option<&str>) -> Result<BTreeMap<String, Seen>> {
    use aya::programs::{SchedClassifier, TcAttachType};
    crate::netns::run_in(netns, move || {
        names
            .into_iter()
            .map(|n| {
                let ifindex = crate::netns::ifindex(&n).ok();
                let progs = |t| {
                    SchedClassifier::query_tcx(n.as_str(), t)
                        .map(|(_, ps)| {
                            ps.iter()
                                .filter_map(|p| p.name_as_str().map(str::to_owned))
                                .collect()
                        })
                        .unwrap_or_default()
                };
                let seen = match ifindex {
                    Some(_) => Seen {
                        ifindex,
                        ingress: progs(TcAttachType::Ingress),
                        egress: progs(TcAttachType::Egress),
                    },
                    None => Seen::default(),
                };
                (n, seen)
            })
            .collect()
    })
}

/// A port's state, checked against the kernel, not taken from the agent's word: an interface
/// the port can be enforced on (its tap, or its hybrid peer `qvb<id>`) has an SG_PORTS entry
/// naming this port and both programs at the right hooks. Returns the state, why a tap is
/// unfiltered, and where the port is enforced now.
fn check_port(
    p: &LivePort,
    seen: &BTreeMap<String, Seen>,
    entries: &BTreeMap<u32, PortInfo>,
) -> (&'static str, Option<String>, Option<(String, u32)>) {
    let exists = |n: &str| seen.get(n).and_then(|s| s.ifindex);
    let peer = taps::hybrid_peer(&p.device);
    let mut candidates: Vec<&str> = Vec::new();
    for c in [p.point.as_deref(), peer.as_deref(), Some(p.device.as_str())]
        .into_iter()
        .flatten()
    {
        if !candidates.contains(&c) {
            candidates.push(c);
        }
    }
    let mut why = Vec::new();
    for point in candidates {
        let Some(ifindex) = exists(point) else {
            continue;
        };
        let Some(entry) = entries.get(&ifindex).filter(|e| e.port_idx == p.port_idx) else {
            continue;
        };
        let s = &seen[point];
        // From the VM is tcx ingress of the tap and tcx egress of qvb.
        let (from_hook, to_hook) = if point == p.device {
            (&s.ingress, &s.egress)
        } else {
            (&s.egress, &s.ingress)
        };
        let lacking: Vec<&str> = [(from_hook, PROG_FROM_VM), (to_hook, PROG_TO_VM)]
            .into_iter()
            .filter(|(hook, prog)| !hook.iter().any(|n| n == prog))
            .map(|(_, prog)| prog)
            .collect();
        if !lacking.is_empty() {
            why.push(format!(
                "{point} (ifindex {ifindex}) lacks {}",
                lacking.join(" and ")
            ));
            continue;
        }
        let state = if entry.flags & PORT_F_CLOSED != 0 {
            "closed"
        } else {
            "enforced"
        };
        return (state, None, Some((point.to_string(), ifindex)));
    }
    let Some(tap) = exists(&p.device) else {
        return ("no-tap", None, None);
    };
    if why.is_empty() {
        let recorded = p.point.as_deref().unwrap_or(&p.device);
        why.push(match (exists(recorded), p.ifindex) {
            (Some(now), Some(was)) if now != was => {
                format!("{recorded} was re-created (ifindex {now}); sg enforced ifindex {was}")
            }
            _ => format!(
                "{} (ifindex {tap}) has no sg programs and no SG_PORTS entry",
                p.device
            ),
        });
    }
    ("unfiltered", Some(why.join("; ")), None)
}

/// One port's state, checked against the kernel, without reading the conntrack table: what
/// `sg status --port` prints, and what the Neutron driver can ask before it lets a port's
/// traffic in.
pub fn port_state(src: &Sources, id: &str) -> Result<PortStatus> {
    let rs = src.run_state()?;
    let id = find_port(&rs, id)?.id.clone();
    port_status_of(src, &rs, Some(&id))?
        .pop()
        .ok_or_else(|| anyhow!("port {id} vanished from the run state"))
}

fn port_status(src: &Sources) -> Result<Vec<PortStatus>> {
    port_status_of(src, &src.run_state()?, None)
}

fn port_status_of(src: &Sources, rs: &RunState, only: Option<&str>) -> Result<Vec<PortStatus>> {
    let ports: Vec<&LivePort> = rs
        .ports
        .iter()
        .filter(|p| only.is_none_or(|id| p.id == id))
        .collect();
    let entries: BTreeMap<u32, PortInfo> = pinned::ports(src.pin_root)?.into_iter().collect();
    let stats = pinned::stats(src.pin_root)?;
    let evicted = pinned::ct_evicted(src.pin_root)?;
    let events = pinned::ct_events(src.pin_root)?;
    let mut names: Vec<String> = Vec::new();
    for p in &ports {
        names.push(p.device.clone());
        names.extend(p.point.clone());
        names.extend(taps::hybrid_peer(&p.device));
    }
    names.sort();
    names.dedup();
    let seen = look(names, rs.netns.as_deref())?;
    let mut out = Vec::new();
    for p in ports {
        let (mut allowed, mut dropped) = (0, 0);
        for (k, c) in stats.iter().filter(|(k, _)| k.port_idx == p.port_idx) {
            if reason_allows(k.reason) {
                allowed += c.packets;
            } else {
                dropped += c.packets;
            }
        }
        let (state, detail, at) = check_port(p, &seen, &entries);
        out.push(PortStatus {
            id: p.id.clone(),
            device: p.device.clone(),
            point: at.as_ref().map(|a| a.0.clone()),
            ifindex: at.map(|a| a.1),
            state,
            detail,
            enforced: state == "enforced",
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
        "{:<16} {:<16} {:>7} {:<10} {:>5} {:>6} {:>10} {:>10}  {:<38} flags",
        "TAP", "ENFORCED ON", "IFINDEX", "STATE", "IDX", "POLICY", "ALLOWED", "DROPPED", "PORT"
    );
    for p in ports {
        let _ = writeln!(
            s,
            "{:<16} {:<16} {:>7} {:<10} {:>5} {:>6} {:>10} {:>10}  {:<38} {}",
            p.device,
            p.point.as_deref().unwrap_or("-"),
            p.ifindex.map(|i| i.to_string()).unwrap_or_else(|| "-".into()),
            p.state,
            p.port_idx,
            p.policy,
            p.allowed,
            p.dropped,
            p.id,
            p.flags.join(",")
        );
        if let Some(d) = &p.detail {
            let _ = writeln!(s, "  ^ {d}");
        }
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
