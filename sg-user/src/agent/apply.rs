//! Applying a compiled host policy to the eBPF maps without a wrong verdict in between
//! (design §4).
//!
//! The compiler numbers policies, address sets and rules densely from 1 for each input. The
//! applier maps them onto *live* ids:
//! - a policy (or a port's address set) is identified by its content; unchanged content keeps
//!   its live id, so its flows are not re-checked and nothing is rewritten. The content itself
//!   is the key: a hash only picks the bucket and equality decides, so two different policies
//!   never share an id, even if someone who controls the input finds colliding hashes;
//! - changed content is written under a fresh id while the old entries stay in place, then
//!   each port is switched with one SG_PORTS update, then entries no port uses are deleted.
//! - rule indexes are stable per (security group id, rule id), so SG_RULE_HITS keeps counting
//!   for a rule across updates.
//!
//! Every new entry is written before any port is switched. If a write fails, what this apply
//! wrote is removed again and the running policy is untouched.

use std::{
    collections::{
        BTreeMap, BTreeSet, HashMap,
        hash_map::{Entry, RandomState},
    },
    hash::{BuildHasher, Hash, Hasher},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use sg_common::*;
use tracing::{debug, info, warn};

use super::taps::{TapPlan, TapsHandle};
use crate::{
    compile::{Compiled, LpmEntry},
    datapath::{Datapath, batch},
};

type Entries<K, V> = Vec<(u32, K, V)>;

/// A policy as the maps hold it, with the policy id field zeroed: what identifies it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct PolicyContent {
    classes: Entries<ClassKey, ClassVal>,
    services: Entries<ServiceKey, ServiceVal>,
    src_ports: Entries<SrcPortKey, ServiceVal>,
}

impl Hash for PolicyContent {
    fn hash<H: Hasher>(&self, h: &mut H) {
        for (p, k, v) in &self.classes {
            (p, bytemuck::bytes_of(k), v.class).hash(h);
        }
        0xffu8.hash(h);
        for (p, k, v) in &self.services {
            (p, bytemuck::bytes_of(k), v.rule).hash(h);
        }
        0xfeu8.hash(h);
        for (p, k, v) in &self.src_ports {
            (p, bytemuck::bytes_of(k), v.rule).hash(h);
        }
    }
}

/// A port's address set as SG_ADDRS holds it, with the set id zeroed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct AddrSet(Entries<AddrKey, AddrVal>);

impl Hash for AddrSet {
    fn hash<H: Hasher>(&self, h: &mut H) {
        for (p, k, v) in &self.0 {
            (p, bytemuck::bytes_of(k), v.index).hash(h);
        }
    }
}

/// The hasher of the content-keyed tables: std's randomly keyed SipHash, or, for tests, one
/// under which every content has the same hash, so that equality alone tells contents apart.
#[derive(Clone, Default)]
pub struct ContentHashing {
    collide: bool,
    keys: RandomState,
}

impl ContentHashing {
    /// Every content hashes to 0 (tests of what a collision does).
    pub fn colliding() -> Self {
        Self {
            collide: true,
            keys: RandomState::new(),
        }
    }
}

impl BuildHasher for ContentHashing {
    type Hasher = ContentHasher;
    fn build_hasher(&self) -> ContentHasher {
        ContentHasher {
            inner: self.keys.build_hasher(),
            collide: self.collide,
        }
    }
}

pub struct ContentHasher {
    inner: std::collections::hash_map::DefaultHasher,
    collide: bool,
}

impl Hasher for ContentHasher {
    fn write(&mut self, bytes: &[u8]) {
        if !self.collide {
            self.inner.write(bytes);
        }
    }
    fn finish(&self) -> u64 {
        if self.collide { 0 } else { self.inner.finish() }
    }
}

/// Live ids by content.
type ByContent<C> = HashMap<C, u32, ContentHashing>;

/// What the agent knows about one port it manages, also written to the run-state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LivePort {
    pub id: String,
    pub device: String,
    pub network_id: String,
    /// Stable for the life of the port: conntrack zone and counter key.
    pub port_idx: u32,
    /// Where the tap is now; `None` while it does not exist.
    pub ifindex: Option<u32>,
    pub policy: u32,
    pub addr_id: u32,
    pub flags: u32,
    pub security_groups: Vec<String>,
    /// The interface holding the links: the tap, or its hybrid peer `qvb<id>`
    /// ([`super::taps`]); `None` while the port is not enforced anywhere.
    #[serde(default)]
    pub point: Option<String>,
    /// The port left the input while its tap exists: the tap drops every frame.
    #[serde(default)]
    pub closed: bool,
}

/// A rule as the run-state file and `sg trace` describe it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveRule {
    pub index: u32,
    pub security_group_id: String,
    pub rule_id: String,
    pub text: String,
}

/// What one apply did, for the log.
#[derive(Debug, Default, Clone, Serialize)]
pub struct ApplyReport {
    pub policies_written: usize,
    pub policies_deleted: usize,
    pub addr_sets_written: usize,
    pub addr_sets_deleted: usize,
    pub entries_written: usize,
    pub entries_deleted: usize,
    pub ports_switched: Vec<String>,
    pub ports_removed: Vec<String>,
    pub taps_attached: Vec<String>,
    /// Pinned links of a previous agent that got this agent's program (atomic swap).
    pub taps_taken_over: Vec<String>,
    pub taps_missing: Vec<String>,
}

impl ApplyReport {
    pub fn changed(&self) -> bool {
        self.entries_written + self.entries_deleted > 0
            || !self.ports_switched.is_empty()
            || !self.ports_removed.is_empty()
            || !self.taps_attached.is_empty()
            || !self.taps_taken_over.is_empty()
    }
}

pub struct Applier {
    pub dp: Datapath,
    netns: Option<String>,
    policies: ByContent<PolicyContent>,
    addr_sets: ByContent<AddrSet>,
    /// Ids found in the maps at adoption whose content another id also holds: deleted once no
    /// port uses them.
    duplicates: Vec<(u32, PolicyContent)>,
    duplicate_addrs: Vec<(u32, AddrSet)>,
    ports: BTreeMap<String, LivePort>,
    rule_idx: BTreeMap<(String, String), u32>,
    rules: BTreeMap<u32, LiveRule>,
    /// Ports that left the input while their tap exists, by port id: closed, until the taps
    /// thread reports the tap gone.
    closed: BTreeMap<String, LivePort>,
    /// The thread that attaches taps and switches SG_PORTS entries.
    taps: TapsHandle,
    next_policy: u32,
    next_addr: u32,
    next_port_idx: u32,
}

impl Applier {
    /// Takes over whatever a previous agent left in the pinned maps: its policies and address
    /// sets are recognised by content (and kept if unchanged), its ports' indexes are kept so
    /// conntrack zones and counters carry on. `previous` is the last run-state, if any.
    pub fn adopt(dp: Datapath, netns: Option<String>, previous: Option<&RunState>) -> Result<Self> {
        Self::adopt_with(dp, netns, previous, ContentHashing::default())
    }

    /// `adopt` with the given hashing of the content-keyed tables.
    pub fn adopt_with(
        mut dp: Datapath,
        netns: Option<String>,
        previous: Option<&RunState>,
        hashing: ContentHashing,
    ) -> Result<Self> {
        let mut policies: BTreeMap<u32, PolicyContent> = BTreeMap::new();
        for item in dp.classes()?.iter() {
            let (k, v) = item?;
            let mut key = k.data();
            let id = key.policy;
            key.policy = 0;
            policies
                .entry(id)
                .or_default()
                .classes
                .push((k.prefix_len(), key, v));
        }
        for item in dp.services()?.iter() {
            let (k, v) = item?;
            let mut key = k.data();
            let id = key.policy;
            key.policy = 0;
            policies
                .entry(id)
                .or_default()
                .services
                .push((k.prefix_len(), key, v));
        }
        for item in dp.src_ports()?.iter() {
            let (k, v) = item?;
            let mut key = k.data();
            let id = key.policy;
            key.policy = 0;
            policies
                .entry(id)
                .or_default()
                .src_ports
                .push((k.prefix_len(), key, v));
        }
        let mut addr_sets: BTreeMap<u32, Entries<AddrKey, AddrVal>> = BTreeMap::new();
        for item in dp.addrs()?.iter() {
            let (k, v) = item?;
            let mut key = k.data();
            let id = key.addr_id;
            key.addr_id = 0;
            addr_sets.entry(id).or_default().push((k.prefix_len(), key, v));
        }
        let port_entries: Vec<(u32, PortInfo)> = dp.ports()?.iter().collect::<Result<_, _>>()?;
        // Ids freed before the restart may still be carried by conntrack entries: never give
        // one again (sg-common `NextIds`).
        let used = dp.next_ids()?;
        let taps = TapsHandle::spawn(dp.tap_handles()?, netns.clone())?;

        let mut a = Self {
            next_policy: (policies.keys().max().copied().unwrap_or(0) + 1).max(used.policy),
            next_addr: (addr_sets.keys().max().copied().unwrap_or(0) + 1).max(used.addr_id),
            next_port_idx: (port_entries.iter().map(|(_, p)| p.port_idx).max().unwrap_or(0) + 1)
                .max(used.port_idx),
            dp,
            netns,
            policies: HashMap::with_hasher(hashing.clone()),
            addr_sets: HashMap::with_hasher(hashing),
            duplicates: Vec::new(),
            duplicate_addrs: Vec::new(),
            ports: BTreeMap::new(),
            rule_idx: BTreeMap::new(),
            rules: BTreeMap::new(),
            closed: BTreeMap::new(),
            taps,
        };
        for (id, mut content) in policies {
            content.classes.sort_by(|x, y| {
                bytemuck::bytes_of(&x.1)
                    .cmp(bytemuck::bytes_of(&y.1))
                    .then(x.0.cmp(&y.0))
            });
            content.services.sort_by(|x, y| {
                bytemuck::bytes_of(&x.1)
                    .cmp(bytemuck::bytes_of(&y.1))
                    .then(x.0.cmp(&y.0))
            });
            content.src_ports.sort_by(|x, y| {
                bytemuck::bytes_of(&x.1)
                    .cmp(bytemuck::bytes_of(&y.1))
                    .then(x.0.cmp(&y.0))
            });
            match a.policies.entry(content) {
                Entry::Occupied(e) => a.duplicates.push((id, e.key().clone())),
                Entry::Vacant(e) => {
                    e.insert(id);
                }
            }
        }
        for (id, mut set) in addr_sets {
            set.sort_by(|x, y| {
                bytemuck::bytes_of(&x.1)
                    .cmp(bytemuck::bytes_of(&y.1))
                    .then(x.0.cmp(&y.0))
            });
            let set = AddrSet(set);
            match a.addr_sets.entry(set) {
                Entry::Occupied(e) => a.duplicate_addrs.push((id, e.key().clone())),
                Entry::Vacant(e) => {
                    e.insert(id);
                }
            }
        }
        if let Some(prev) = previous {
            for r in &prev.rules {
                a.rule_idx
                    .insert((r.security_group_id.clone(), r.rule_id.clone()), r.index);
                a.rules.insert(r.index, r.clone());
            }
            for p in &prev.ports {
                // Trust the previous state only where the maps agree with it.
                let confirmed = p
                    .ifindex
                    .and_then(|i| port_entries.iter().find(|(k, _)| *k == i))
                    .is_none_or(|(_, info)| info.port_idx == p.port_idx);
                if confirmed {
                    a.ports.insert(p.id.clone(), p.clone());
                    a.next_port_idx = a.next_port_idx.max(p.port_idx + 1);
                }
            }
        }
        Ok(a)
    }

    pub fn ports(&self) -> impl Iterator<Item = &LivePort> {
        self.ports.values()
    }

    /// The taps thread, for the agent: its wake-ups and its checks.
    pub fn taps(&self) -> &TapsHandle {
        &self.taps
    }

    /// The state for the CLI, with where each port is enforced right now.
    pub fn run_state(&self, generation: u64) -> RunState {
        let view = self.taps.view().unwrap_or_else(|e| {
            warn!("asking the taps thread where ports are enforced: {e:#}");
            BTreeMap::new()
        });
        let located = |p: &LivePort| {
            let mut p = p.clone();
            let point = view.get(&p.device).and_then(|v| v.point.clone());
            p.ifindex = point.as_ref().map(|x| x.ifindex);
            p.point = point.map(|x| x.name);
            p
        };
        let mut ports: Vec<LivePort> = self.ports.values().map(located).collect();
        ports.extend(
            self.closed
                .values()
                .filter(|p| view.get(&p.device).is_some_and(|v| v.closed))
                .map(located),
        );
        RunState {
            generation,
            netns: self.netns.clone(),
            ports,
            rules: self.rules.values().cloned().collect(),
        }
    }

    /// Makes the maps and attachments match `compiled`. The taps thread reads the namespace's
    /// interfaces itself, so a tap that appeared a moment ago is attached too.
    pub fn apply(&mut self, compiled: &Compiled) -> Result<ApplyReport> {
        let mut report = ApplyReport::default();

        // Rules: stable live indexes, checked against the limit before anything is written.
        let (rule_map, live_rules, reused) = self.assign_rule_indexes(compiled)?;

        // Desired contents, by compiled policy id and by port.
        let mut desired_policies: HashMap<u32, PolicyContent> = HashMap::new();
        for p in &compiled.policies {
            let content = policy_content(p, &rule_map)?;
            desired_policies.insert(p.id, content);
        }
        let mut port_addrs: HashMap<&str, AddrSet> = HashMap::new();
        for port in &compiled.ports {
            port_addrs.insert(&port.id, AddrSet(addr_content(&port.addrs)));
        }

        // Phase 1: write what is new, under fresh ids. Nothing references it yet.
        let mut written_policies: Vec<PolicyContent> = Vec::new();
        let mut written_addrs: Vec<AddrSet> = Vec::new();
        let phase1 = (|| -> Result<()> {
            for content in desired_policies.values() {
                if self.policies.contains_key(content) {
                    continue;
                }
                let id = self.next_policy;
                self.next_policy += 1;
                report.entries_written += self.write_policy(id, content)?;
                self.policies.insert(content.clone(), id);
                written_policies.push(content.clone());
                report.policies_written += 1;
            }
            for set in port_addrs.values() {
                if self.addr_sets.contains_key(set) {
                    continue;
                }
                let id = self.next_addr;
                self.next_addr += 1;
                report.entries_written += self.write_addrs(id, set)?;
                self.addr_sets.insert(set.clone(), id);
                written_addrs.push(set.clone());
                report.addr_sets_written += 1;
            }
            Ok(())
        })();
        if let Err(e) = phase1 {
            for c in written_policies {
                if let Some(id) = self.policies.remove(&c) {
                    let _ = self.delete_policy(id, &c);
                }
            }
            for s in written_addrs {
                if let Some(id) = self.addr_sets.remove(&s) {
                    let _ = self.delete_addrs(id, &s);
                }
            }
            return Err(e.context("writing the new policy; the running policy is unchanged"));
        }
        // An index taken over from a rule this change removes starts its new rule at zero. No
        // port uses the new policy yet; hits the old rule gets until its ports switch below are
        // counted under the new one (only when the free indexes ran out).
        for idx in reused {
            self.dp.reset_rule_hits(idx)?;
        }

        // Phase 2: switch each port with one SG_PORTS update, attaching taps that appeared,
        // and close the taps of ports that left. The taps thread does it.
        let mut plan: BTreeMap<String, TapPlan> = BTreeMap::new();
        let mut live: BTreeMap<String, LivePort> = BTreeMap::new();
        for cp in &compiled.ports {
            let (policy, addr_id) = if cp.info.flags & PORT_F_FILTERED != 0 {
                let policy = self.policies[&desired_policies[&cp.info.policy]];
                let addr_id = self.addr_sets[&port_addrs[cp.id.as_str()]];
                (policy, addr_id)
            } else {
                (0, 0)
            };
            let port_idx = match self.ports.get(&cp.id).or_else(|| self.closed.get(&cp.id)) {
                Some(p) => p.port_idx,
                None => {
                    let i = self.next_port_idx;
                    self.next_port_idx += 1;
                    i
                }
            };
            let info = PortInfo {
                policy,
                addr_id,
                port_idx,
                ..cp.info
            };
            plan.insert(
                cp.device.clone(),
                TapPlan {
                    port_id: cp.id.clone(),
                    info,
                },
            );
            self.closed.remove(&cp.id);
            live.insert(
                cp.id.clone(),
                LivePort {
                    id: cp.id.clone(),
                    device: cp.device.clone(),
                    network_id: cp.network_id.clone(),
                    port_idx,
                    ifindex: None,
                    policy,
                    addr_id,
                    flags: info.flags,
                    security_groups: compiled
                        .policies
                        .iter()
                        .find(|p| p.id == cp.info.policy)
                        .map(|p| p.security_groups.clone())
                        .unwrap_or_default(),
                    point: None,
                    closed: false,
                },
            );
        }
        // Ports that left the input (or this host): a tap that still exists is closed.
        let leaving: Vec<LivePort> = self
            .ports
            .values()
            .filter(|p| !live.contains_key(&p.id))
            .cloned()
            .collect();
        let had = |p: &LivePort| TapPlan {
            port_id: p.id.clone(),
            info: PortInfo {
                policy: p.policy,
                addr_id: p.addr_id,
                port_idx: p.port_idx,
                flags: p.flags,
                ..Default::default()
            },
        };
        let switch = self
            .taps
            .switch(plan, leaving.iter().map(|p| (p.device.clone(), had(p))).collect())?;
        report.ports_switched = switch.switched;
        report.taps_attached = switch.attached;
        report.taps_taken_over = switch.taken_over;
        report.taps_missing = switch.missing;
        for p in leaving {
            if switch.closed.contains(&p.device) {
                self.closed.insert(
                    p.id.clone(),
                    LivePort {
                        policy: 0,
                        addr_id: 0,
                        flags: PORT_F_FILTERED | PORT_F_CLOSED,
                        closed: true,
                        ..p.clone()
                    },
                );
            }
            report.ports_removed.push(p.device);
        }
        self.ports = live;
        // Where each port is enforced now; a closed tap the taps thread saw go is forgotten.
        let view = self.taps.view()?;
        for p in self.ports.values_mut() {
            let point = view.get(&p.device).and_then(|v| v.point.clone());
            p.ifindex = point.as_ref().map(|x| x.ifindex);
            p.point = point.map(|x| x.name);
        }
        self.closed
            .retain(|_, p| view.get(&p.device).is_some_and(|v| v.closed));
        if !switch.errors.is_empty() {
            // The ports that failed may still use the old policies: keep them until the next
            // apply, which deletes what is then unused.
            self.rules_applied(live_rules)?;
            bail!(
                "the new policy is written, but {} tap(s) could not be switched:\n{}",
                switch.errors.len(),
                switch.errors.join("\n")
            );
        }

        // Phase 3: delete what no port uses any more.
        let used_policies: BTreeSet<u32> = self.ports.values().map(|p| p.policy).collect();
        let used_addrs: BTreeSet<u32> = self.ports.values().map(|p| p.addr_id).collect();
        let mut stale: Vec<(u32, PolicyContent)> = self
            .policies
            .iter()
            .filter(|(_, id)| !used_policies.contains(id))
            .map(|(c, id)| (*id, c.clone()))
            .collect();
        for (_, c) in &stale {
            self.policies.remove(c);
        }
        let (unused, used): (Vec<_>, Vec<_>) = std::mem::take(&mut self.duplicates)
            .into_iter()
            .partition(|(id, _)| !used_policies.contains(id));
        self.duplicates = used;
        stale.extend(unused);
        for (id, content) in stale {
            report.entries_deleted += self.delete_policy(id, &content)?;
            report.policies_deleted += 1;
        }
        let mut stale: Vec<(u32, AddrSet)> = self
            .addr_sets
            .iter()
            .filter(|(_, id)| !used_addrs.contains(id))
            .map(|(s, id)| (*id, s.clone()))
            .collect();
        for (_, s) in &stale {
            self.addr_sets.remove(s);
        }
        let (unused, used): (Vec<_>, Vec<_>) = std::mem::take(&mut self.duplicate_addrs)
            .into_iter()
            .partition(|(id, _)| !used_addrs.contains(id));
        self.duplicate_addrs = used;
        stale.extend(unused);
        for (id, set) in stale {
            report.entries_deleted += self.delete_addrs(id, &set)?;
            report.addr_sets_deleted += 1;
        }
        self.rules_applied(live_rules)?;
        debug!(?report, "apply finished");
        Ok(report)
    }

    /// Rules no longer in the input give their index back, with a clean counter.
    fn rules_applied(&mut self, live_rules: BTreeMap<u32, LiveRule>) -> Result<()> {
        let dropped: Vec<(String, String)> = self
            .rule_idx
            .iter()
            .filter(|(_, idx)| !live_rules.contains_key(idx))
            .map(|(k, _)| k.clone())
            .collect();
        for k in dropped {
            if let Some(idx) = self.rule_idx.remove(&k) {
                self.dp.reset_rule_hits(idx)?;
            }
        }
        for r in live_rules.values() {
            self.rule_idx
                .insert((r.security_group_id.clone(), r.rule_id.clone()), r.index);
        }
        self.rules = live_rules;
        // The next ids outlive this process (sg-common `NextIds`).
        self.dp.set_next_ids(NextIds {
            policy: self.next_policy,
            addr_id: self.next_addr,
            port_idx: self.next_port_idx,
            _pad: 0,
        })?;
        Ok(())
    }

    /// Live rule indexes for `compiled`'s rules: a rule keeps its index across applies (its
    /// SG_RULE_HITS counter carries on); a new rule takes the lowest index that no rule held
    /// before this apply, and only when none is left, the index of a rule this apply removes
    /// (returned as `reused`). Returns compiled index → live index, and the live rules. Refuses
    /// more rules than SG_RULE_HITS has indexes, before anything is written.
    #[allow(clippy::type_complexity)]
    fn assign_rule_indexes(
        &self,
        compiled: &Compiled,
    ) -> Result<(HashMap<u32, u32>, BTreeMap<u32, LiveRule>, Vec<u32>)> {
        let limit = MAX_RULES - 1;
        if compiled.rules.len() > limit as usize {
            bail!(
                "the ports of this host use {} security-group rules; sg counts each rule under an \
                 index of SG_RULE_HITS and has {} of them (index 0 means no rule); the running \
                 policy is unchanged",
                thousands(compiled.rules.len()),
                thousands(limit as usize)
            );
        }
        let wanted: BTreeSet<(&str, &str)> = compiled
            .rules
            .iter()
            .map(|r| (r.security_group_id.as_str(), r.rule_id.as_str()))
            .collect();
        let held: BTreeSet<u32> = self.rule_idx.values().copied().collect();
        let mut free = (1..MAX_RULES).filter(|i| !held.contains(i));
        let mut leaving = self
            .rule_idx
            .iter()
            .filter(|((g, r), _)| !wanted.contains(&(g.as_str(), r.as_str())))
            .map(|(_, i)| *i);
        let mut rule_map = HashMap::new();
        let mut live = BTreeMap::new();
        let mut reused = Vec::new();
        for r in &compiled.rules {
            let key = (r.security_group_id.clone(), r.rule_id.clone());
            let idx = match self.rule_idx.get(&key) {
                Some(i) => *i,
                None => match free.next() {
                    Some(i) => i,
                    None => {
                        // Fewer rules than indexes (checked above), so a held index is leaving.
                        let i = leaving.next().expect("an index of a removed rule");
                        reused.push(i);
                        i
                    }
                },
            };
            rule_map.insert(r.index, idx);
            live.insert(
                idx,
                LiveRule {
                    index: idx,
                    security_group_id: r.security_group_id.clone(),
                    rule_id: r.rule_id.clone(),
                    text: r.text.clone(),
                },
            );
        }
        Ok((rule_map, live, reused))
    }

    // A policy is written and deleted in batches (datapath::batch): one syscall per map rather
    // than per entry. Entries are stored without their id, which is set here.

    fn write_policy(&mut self, id: u32, c: &PolicyContent) -> Result<usize> {
        let classes: Entries<ClassKey, ClassVal> = c
            .classes
            .iter()
            .map(|(p, k, v)| (*p, ClassKey { policy: id, ..*k }, *v))
            .collect();
        batch::lpm_update(self.dp.lpm_map(MAP_CLASSES)?, &classes)
            .context("SG_CLASSES is full or refused an entry")?;
        let services: Entries<ServiceKey, ServiceVal> = c
            .services
            .iter()
            .map(|(p, k, v)| (*p, ServiceKey { policy: id, ..*k }, *v))
            .collect();
        batch::lpm_update(self.dp.lpm_map(MAP_SERVICES)?, &services)
            .context("SG_SERVICES is full or refused an entry")?;
        let src_ports: Entries<SrcPortKey, ServiceVal> = c
            .src_ports
            .iter()
            .map(|(p, k, v)| (*p, SrcPortKey { policy: id, ..*k }, *v))
            .collect();
        batch::lpm_update(self.dp.lpm_map(MAP_SRC_PORTS)?, &src_ports)
            .context("SG_SRC_PORTS is full or refused an entry")?;
        Ok(c.classes.len() + c.services.len() + c.src_ports.len())
    }

    fn delete_policy(&mut self, id: u32, c: &PolicyContent) -> Result<usize> {
        let classes: Entries<ClassKey, ClassVal> = c
            .classes
            .iter()
            .map(|(p, k, v)| (*p, ClassKey { policy: id, ..*k }, *v))
            .collect();
        let services: Entries<ServiceKey, ServiceVal> = c
            .services
            .iter()
            .map(|(p, k, v)| (*p, ServiceKey { policy: id, ..*k }, *v))
            .collect();
        let src_ports: Entries<SrcPortKey, ServiceVal> = c
            .src_ports
            .iter()
            .map(|(p, k, v)| (*p, SrcPortKey { policy: id, ..*k }, *v))
            .collect();
        // Every map is attempted even if one fails, as the per-entry loop did.
        let a = batch::lpm_delete(self.dp.lpm_map(MAP_CLASSES)?, &classes).context("SG_CLASSES");
        let b = batch::lpm_delete(self.dp.lpm_map(MAP_SERVICES)?, &services).context("SG_SERVICES");
        let c2 = batch::lpm_delete(self.dp.lpm_map(MAP_SRC_PORTS)?, &src_ports).context("SG_SRC_PORTS");
        a?;
        b?;
        c2?;
        Ok(c.classes.len() + c.services.len() + c.src_ports.len())
    }

    fn write_addrs(&mut self, id: u32, set: &AddrSet) -> Result<usize> {
        let entries: Entries<AddrKey, AddrVal> = set
            .0
            .iter()
            .map(|(p, k, v)| (*p, AddrKey { addr_id: id, ..*k }, *v))
            .collect();
        batch::lpm_update(self.dp.lpm_map(MAP_ADDRS)?, &entries)
            .context("SG_ADDRS is full or refused an entry")?;
        Ok(set.0.len())
    }

    fn delete_addrs(&mut self, id: u32, set: &AddrSet) -> Result<usize> {
        let entries: Entries<AddrKey, AddrVal> = set
            .0
            .iter()
            .map(|(p, k, v)| (*p, AddrKey { addr_id: id, ..*k }, *v))
            .collect();
        batch::lpm_delete(self.dp.lpm_map(MAP_ADDRS)?, &entries).context("SG_ADDRS")?;
        Ok(set.0.len())
    }
}

fn sorted<K: bytemuck::Pod, V>(mut v: Entries<K, V>) -> Entries<K, V> {
    v.sort_by(|x, y| {
        bytemuck::bytes_of(&x.1)
            .cmp(bytemuck::bytes_of(&y.1))
            .then(x.0.cmp(&y.0))
    });
    v
}

fn policy_content(p: &crate::compile::CompiledPolicy, rule_map: &HashMap<u32, u32>) -> Result<PolicyContent> {
    let live = |rule: u32| -> Result<ServiceVal> {
        match rule_map.get(&rule) {
            Some(&rule) => Ok(ServiceVal { rule }),
            None => bail!("compiled service entry refers to unknown rule {rule}"),
        }
    };
    let classes = p
        .classes
        .iter()
        .map(|e| (e.prefix_len, ClassKey { policy: 0, ..e.key }, e.value))
        .collect();
    let services = p
        .services
        .iter()
        .map(|e| {
            Ok((
                e.prefix_len,
                ServiceKey { policy: 0, ..e.key },
                live(e.value.rule)?,
            ))
        })
        .collect::<Result<_>>()?;
    let src_ports = p
        .src_ports
        .iter()
        .map(|e| {
            Ok((
                e.prefix_len,
                SrcPortKey { policy: 0, ..e.key },
                live(e.value.rule)?,
            ))
        })
        .collect::<Result<_>>()?;
    Ok(PolicyContent {
        classes: sorted(classes),
        services: sorted(services),
        src_ports: sorted(src_ports),
    })
}

/// 65535 → "65,535".
fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn addr_content(addrs: &[LpmEntry<AddrKey, AddrVal>]) -> Entries<AddrKey, AddrVal> {
    sorted(
        addrs
            .iter()
            .map(|e| (e.prefix_len, AddrKey { addr_id: 0, ..e.key }, e.value))
            .collect(),
    )
}

/// What the agent writes after each apply for the CLI (`sg status`, `sg trace`, ...): which
/// port is which tap, and what each rule index means.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunState {
    pub generation: u64,
    /// The named network namespace of the taps (`sg agent --netns`); `None`: the agent's own.
    #[serde(default)]
    pub netns: Option<String>,
    pub ports: Vec<LivePort>,
    pub rules: Vec<LiveRule>,
}

impl RunState {
    pub const FILE: &'static str = "state.json";

    pub fn load(run_dir: &std::path::Path) -> Result<Option<Self>> {
        let path = run_dir.join(Self::FILE);
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(
                serde_json::from_slice(&b).with_context(|| format!("parsing {}", path.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Written to a temporary file and renamed, so a reader never sees half a file.
    pub fn save(&self, run_dir: &std::path::Path) -> Result<()> {
        std::fs::create_dir_all(run_dir)?;
        let tmp = run_dir.join(format!("{}.tmp", Self::FILE));
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, run_dir.join(Self::FILE))?;
        Ok(())
    }
}

pub fn log_report(report: &ApplyReport, compiled: &Compiled) {
    if !report.changed() {
        debug!("no change");
        return;
    }
    // The security groups of the ports whose policy changed: what an operator asks first.
    let mut groups: Vec<&str> = compiled
        .ports
        .iter()
        .filter(|p| report.ports_switched.contains(&p.device))
        .filter_map(|p| compiled.policies.iter().find(|pol| pol.id == p.info.policy))
        .flat_map(|pol| pol.security_groups.iter().map(String::as_str))
        .collect();
    groups.sort();
    groups.dedup();
    info!(
        ports = compiled.ports.len(),
        policies_written = report.policies_written,
        policies_deleted = report.policies_deleted,
        entries_written = report.entries_written,
        entries_deleted = report.entries_deleted,
        switched = ?report.ports_switched,
        groups = ?groups,
        attached = ?report.taps_attached,
        took_over = ?report.taps_taken_over,
        removed = ?report.ports_removed,
        missing = ?report.taps_missing,
        "applied"
    );
}
