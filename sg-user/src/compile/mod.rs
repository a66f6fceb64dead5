//! The policy compiler: from a validated [`Model`] and a host name to the entries of the
//! sg-common maps (design §3), plus the tables that explain them.
//!
//! Pure and deterministic: the same model and host give the same [`Compiled`], entry for entry
//! and byte for byte. Policy, address-set, class and rule numbers are dense from 1, assigned in
//! order of first use (ports by tap name, then each port's groups and rules in order).
//!
//! **Stage 1 (`SG_CLASSES`).** For each (policy, direction, family), every rule has one remote
//! *selector*: its `remote_ip_prefix` network, a remote group (the member CIDRs of that family,
//! the port's own addresses included, as in the ipset), an address group (its CIDRs of that
//! family), or the family's /0 when it has no remote. The class of an address is the set of
//! selectors that contain it. Among the prefixes the selectors use, the ones containing an
//! address are nested, so that set is determined by the longest of them: it is the set of
//! selectors owning that prefix or any shorter prefix containing it. One LPM entry per distinct
//! prefix therefore classifies every address exactly; an address in no prefix has no entry
//! (class 0: no rule can admit it). Class ids are shared by identical selector sets.
//!
//! **Stage 2 (`SG_SERVICES`).** Every rule matches a set of (protocol, port) values, written as
//! prefixes of the 24 bits `proto:port` (any protocol: length 0; a protocol: 8; a destination
//! port range: its minimal aligned blocks; an ICMP type: 16; type and code: 24). For each class,
//! the rules whose selector is in the class contribute their prefixes. A packet matched by the
//! longest prefix P is inside exactly those rule prefixes that are P or contain P (a longer one
//! containing it would have matched instead), so the entry for P carries the first rule, in
//! chain order, among the rules owning P or a shorter prefix containing P. Every packet that
//! some rule admits therefore finds an entry naming the first rule that admits it, and a packet
//! that no rule admits finds none.
//!
//! **Source ports (`SG_SRC_PORTS`).** Rules that also restrict the source port (only agent rule
//! dicts have them) are left out of stage 2 and compiled the same way over the 40 bits
//! `proto:sport:dport`, per class: a source block that is not a single port, combined with a
//! destination range, is expanded port by port (validation bounds that). The datapath asks
//! `SG_SRC_PORTS` only when `SG_SERVICES` admits nothing, so a packet two such rules admit is
//! credited to the rule without source ports even when the other comes first in the chain
//! (tests/DIFFERENCES.md D21); the verdict is the same.
//!
//! **Pruning.** An entry whose value equals that of its nearest kept ancestor (the entry the
//! lookup would fall back to without it) is left out, in both stages: the packets it covers get
//! the same answer from the ancestor, and entries longer than it are unaffected. A /24 member
//! inside a /16 member of the same group, or `tcp 80` under an earlier `any` rule, costs nothing.

mod eval;
pub mod lpm;
mod render;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

/// The compiler's lookups are its hot loop (a prefix's ancestors, up to 129 probes each);
/// SipHash's resistance to flooding buys nothing on the operator's own input.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
use std::fmt;

use ipnet::IpNet;
use sg_common::{
    ADDR_KEY_FIXED_BITS, ADDR_KIND_ARP_V4, ADDR_KIND_FIXED_V4, ADDR_KIND_FIXED_V6, ADDR_KIND_MAC,
    ADDR_KIND_PAIR_V4, ADDR_KIND_PAIR_V6, AddrKey, AddrVal, CLASS_KEY_FIXED_BITS, ClassKey, ClassVal,
    PORT_F_ARP_PROTECT, PORT_F_FILTERED, PORT_F_SPOOF_V4, PORT_F_SPOOF_V6, PORT_F_SRC_PORTS, PORT_F_STATEFUL,
    PORT_F_V6_FIXED, PortInfo, SERVICE_KEY_ANY_PROTO_BITS, SRC_PORT_KEY_PROTO_BITS, ServiceKey, ServiceVal,
    SrcPortKey,
};

use crate::model::protocol::{PROTO_ICMP, is_icmp_protocol, is_port_protocol};
use crate::model::{Direction, Ethertype, MacAddr, Model, Port, Remote, Rule, addr};

pub use eval::{CompiledLookup, Packet, Verdict, port_field, reference_first_rule};
pub use render::{render_json, render_table};

/// One entry of an LPM trie map: the kernel key is `{prefix_len: u32, data: K}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LpmEntry<K, V> {
    pub prefix_len: u32,
    pub key: K,
    pub value: V,
}

/// Everything the datapath needs for one host, and the tables that explain it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compiled {
    pub host: String,
    /// Local ports (bound to the host or unbound), by tap name.
    pub ports: Vec<CompiledPort>,
    /// By id (`policies[i].id == i + 1`).
    pub policies: Vec<CompiledPolicy>,
    /// By id (`classes[i].id == i + 1`).
    pub classes: Vec<ClassInfo>,
    /// By rule index (`rules[i].index == i + 1`): the `ServiceVal.rule` and `SG_RULE_HITS` index.
    pub rules: Vec<RuleInfo>,
    pub stats: Stats,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompiledPort {
    pub id: String,
    pub device: String,
    pub network_id: String,
    /// The `SG_PORTS` value, without ifindex (the agent binds it). `port_idx` is 0: the agent
    /// assigns it, since it must stay stable for the port's life across compilations. An
    /// unfiltered port (port security off, or `network:*`) has policy 0, addr_id 0, no flags.
    pub info: PortInfo,
    /// This port's `SG_ADDRS` entries (under `info.addr_id`). `ADDR_KIND_MAC` entries cover
    /// only the fixed key bits, so the address field of a lookup is not matched; pair entries
    /// cover the pair's network (none of it for the MAC-only pair of a port without fixed IPs),
    /// and their `AddrVal.index` is the 1-based position in Neutron's pair list of that family
    /// (0 for the other kinds). A pair repeated in Neutron's list is one entry, the first.
    pub addrs: Vec<LpmEntry<AddrKey, AddrVal>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompiledPolicy {
    pub id: u32,
    /// The ordered group list that defines the policy; ports with the same list share it.
    pub security_groups: Vec<String>,
    /// `SG_CLASSES` entries, sorted by key bytes then prefix length.
    pub classes: Vec<LpmEntry<ClassKey, ClassVal>>,
    /// `SG_SERVICES` entries, sorted by key bytes then prefix length.
    pub services: Vec<LpmEntry<ServiceKey, ServiceVal>>,
    /// `SG_SRC_PORTS` entries (rules with source ports), sorted likewise.
    pub src_ports: Vec<LpmEntry<SrcPortKey, ServiceVal>>,
}

/// A remote selector: one rule's notion of "which remote addresses".
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Selector {
    /// A network (`remote_ip_prefix`, or the /0 of a rule without remote).
    Prefix(IpNet),
    /// The members of a security group.
    Group(String),
    /// The addresses of an address group.
    AddressGroup(String),
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Prefix(n) => f.write_str(&addr::net_to_string(*n)),
            Selector::Group(g) => write!(f, "group {g}"),
            Selector::AddressGroup(a) => write!(f, "address-group {a}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassInfo {
    pub id: u32,
    /// The selectors containing the addresses of this class, in selector order.
    pub selectors: Vec<Selector>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleInfo {
    pub index: u32,
    pub security_group_id: String,
    pub rule_id: String,
    /// One line for people, e.g. `ingress IPv4 tcp 80 from 0.0.0.0/0`.
    pub text: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapStats {
    pub entries: usize,
    /// Key and value bytes as the kernel stores them (LPM keys include their 4-byte prefix
    /// length; `SG_PORTS` keys are the 4-byte ifindex).
    pub bytes: usize,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub ports: MapStats,
    pub addrs: MapStats,
    pub classes: MapStats,
    pub services: MapStats,
    pub src_ports: MapStats,
    pub policies: usize,
    pub class_ids: usize,
    pub rules: usize,
}

/// Compiles the policy of every port local to `host` (bound to it, or unbound).
pub fn compile(model: &Model, host: &str) -> Compiled {
    let mut c = Compiler {
        model,
        selectors: HashMap::default(),
        selector_list: Vec::new(),
        class_ids: HashMap::default(),
        classes: Vec::new(),
        rule_index: HashMap::default(),
        rules: Vec::new(),
    };
    let local = model.local_ports(host);

    let mut policy_of: HashMap<&[String], u32> = HashMap::default();
    let mut policy_groups: Vec<&[String]> = Vec::new();
    for port in local.iter().filter(|p| p.is_filtered()) {
        policy_of
            .entry(port.security_groups.as_slice())
            .or_insert_with(|| {
                policy_groups.push(port.security_groups.as_slice());
                policy_groups.len() as u32
            });
    }
    for groups in &policy_groups {
        for (sg, rule) in model.groups_rules(groups) {
            c.rule_index(sg.id.as_str(), rule);
        }
    }
    let policies: Vec<CompiledPolicy> = policy_groups
        .iter()
        .enumerate()
        .map(|(i, groups)| c.policy(i as u32 + 1, groups))
        .collect();

    let mut next_addr_id = 0;
    let ports: Vec<CompiledPort> = local
        .iter()
        .map(|port| {
            if !port.is_filtered() {
                let info = PortInfo {
                    mac: port.mac.0,
                    ..PortInfo::default()
                };
                return CompiledPort {
                    id: port.id.clone(),
                    device: port.device.clone(),
                    network_id: port.network_id.clone(),
                    info,
                    addrs: Vec::new(),
                };
            }
            next_addr_id += 1;
            compile_port(
                model,
                port,
                policy_of[port.security_groups.as_slice()],
                next_addr_id,
            )
        })
        .collect();

    let stats = Stats {
        ports: map_stats::<u32, PortInfo>(ports.len(), false),
        addrs: map_stats::<AddrKey, AddrVal>(ports.iter().map(|p| p.addrs.len()).sum(), true),
        classes: map_stats::<ClassKey, ClassVal>(policies.iter().map(|p| p.classes.len()).sum(), true),
        services: map_stats::<ServiceKey, ServiceVal>(policies.iter().map(|p| p.services.len()).sum(), true),
        src_ports: map_stats::<SrcPortKey, ServiceVal>(
            policies.iter().map(|p| p.src_ports.len()).sum(),
            true,
        ),
        policies: policies.len(),
        class_ids: c.classes.len(),
        rules: c.rules.len(),
    };
    Compiled {
        host: host.to_string(),
        ports,
        policies,
        classes: c.classes,
        rules: c.rules,
        stats,
    }
}

fn map_stats<K, V>(entries: usize, lpm: bool) -> MapStats {
    let per = size_of::<K>() + size_of::<V>() + if lpm { 4 } else { 0 };
    MapStats {
        entries,
        bytes: entries * per,
    }
}

struct Compiler<'m> {
    model: &'m Model,
    selectors: HashMap<Selector, u32>,
    selector_list: Vec<Selector>,
    class_ids: HashMap<Vec<u32>, u32>,
    classes: Vec<ClassInfo>,
    rule_index: HashMap<(&'m str, &'m str), u32>,
    rules: Vec<RuleInfo>,
}

/// A (protocol, port) prefix over the 24 bits `proto << 16 | port`.
type ServicePrefix = (u32, u8);

/// The entries of one policy, as the compiler collects them.
#[derive(Default)]
struct PolicyEntries {
    classes: Vec<LpmEntry<ClassKey, ClassVal>>,
    services: Vec<LpmEntry<ServiceKey, ServiceVal>>,
    src_ports: Vec<LpmEntry<SrcPortKey, ServiceVal>>,
}

/// A (protocol, source port, destination port) prefix over the 40 bits
/// `proto << 32 | sport << 16 | dport`.
type SrcPortPrefix = (u64, u8);

impl<'m> Compiler<'m> {
    fn rule_index(&mut self, sg_id: &'m str, rule: &'m Rule) -> u32 {
        if let Some(&i) = self.rule_index.get(&(sg_id, rule.id.as_str())) {
            return i;
        }
        let index = self.rules.len() as u32 + 1;
        self.rules.push(RuleInfo {
            index,
            security_group_id: sg_id.to_string(),
            rule_id: rule.id.clone(),
            text: self.describe(rule),
        });
        self.rule_index.insert((sg_id, rule.id.as_str()), index);
        index
    }

    /// `Rule::describe` with group names, for the rule table.
    fn describe(&self, rule: &Rule) -> String {
        let named = |id: &str, name: Option<&str>| match name {
            Some(n) if !n.is_empty() && n != id => format!("{n} ({id})"),
            _ => id.to_string(),
        };
        let text = rule.describe();
        match &rule.remote {
            Remote::Group(g) => {
                let name = self.model.security_group(g).map(|s| s.name.as_str());
                text.replace(&format!("group {g}"), &format!("group {}", named(g, name)))
            }
            Remote::AddressGroup(a) => {
                let name = self.model.address_group(a).map(|s| s.name.as_str());
                text.replace(
                    &format!("address-group {a}"),
                    &format!("address-group {}", named(a, name)),
                )
            }
            _ => text,
        }
    }

    fn selector_id(&mut self, s: Selector) -> u32 {
        if let Some(&id) = self.selectors.get(&s) {
            return id;
        }
        let id = self.selector_list.len() as u32;
        self.selector_list.push(s.clone());
        self.selectors.insert(s, id);
        id
    }

    /// `selectors` is sorted and deduplicated.
    fn class_id(&mut self, selectors: Vec<u32>) -> u32 {
        if let Some(&id) = self.class_ids.get(&selectors) {
            return id;
        }
        let id = self.classes.len() as u32 + 1;
        self.classes.push(ClassInfo {
            id,
            selectors: selectors
                .iter()
                .map(|&s| self.selector_list[s as usize].clone())
                .collect(),
        });
        self.class_ids.insert(selectors, id);
        id
    }

    fn policy(&mut self, id: u32, groups: &'m [String]) -> CompiledPolicy {
        let mut out = PolicyEntries::default();
        for dir in Direction::ALL {
            for eth in Ethertype::ALL {
                let chain: Vec<(u32, &'m Rule)> = self
                    .model
                    .groups_rules(groups)
                    .filter(|(_, r)| r.direction == dir && r.ethertype == eth)
                    .map(|(sg, r)| (self.rule_index[&(sg.id.as_str(), r.id.as_str())], r))
                    .collect();
                if !chain.is_empty() {
                    self.context(id, dir, eth, &chain, &mut out);
                }
            }
        }
        let PolicyEntries {
            mut classes,
            mut services,
            mut src_ports,
        } = out;
        classes.sort_by(|a: &LpmEntry<ClassKey, ClassVal>, b| {
            (bytemuck::bytes_of(&a.key), a.prefix_len).cmp(&(bytemuck::bytes_of(&b.key), b.prefix_len))
        });
        services.sort_by(|a: &LpmEntry<ServiceKey, ServiceVal>, b| {
            (bytemuck::bytes_of(&a.key), a.prefix_len).cmp(&(bytemuck::bytes_of(&b.key), b.prefix_len))
        });
        src_ports.sort_by(|a: &LpmEntry<SrcPortKey, ServiceVal>, b| {
            (bytemuck::bytes_of(&a.key), a.prefix_len).cmp(&(bytemuck::bytes_of(&b.key), b.prefix_len))
        });
        CompiledPolicy {
            id,
            security_groups: groups.to_vec(),
            classes,
            services,
            src_ports,
        }
    }

    /// Stage 1 and stage 2 entries of one (policy, direction, family), whose rules are `chain`
    /// (rule index, rule) in chain order.
    fn context(
        &mut self,
        policy: u32,
        dir: Direction,
        eth: Ethertype,
        chain: &[(u32, &'m Rule)],
        out: &mut PolicyEntries,
    ) {
        let PolicyEntries {
            classes: class_out,
            services: service_out,
            src_ports: src_port_out,
        } = out;
        // Each rule's selector, and the prefixes each selector is made of.
        let rule_sel: Vec<u32> = chain.iter().map(|(_, r)| self.selector_id(selector(r))).collect();
        let mut owners: HashMap<([u8; 16], u8), Vec<u32>> = HashMap::default();
        for &sel in BTreeSet::from_iter(rule_sel.iter().copied()).iter() {
            for net in self.selector_nets(sel, eth) {
                let owned = owners.entry(addr::net_key(net)).or_default();
                if !owned.contains(&sel) {
                    owned.push(sel);
                }
            }
        }

        // Shortest prefixes first, so that pruning sees every ancestor before its descendants.
        let mut prefixes: Vec<([u8; 16], u8)> = owners.keys().copied().collect();
        prefixes.sort_unstable_by_key(|&(key, len)| (len, key));
        let mut class_rules: Vec<(u32, Vec<usize>)> = Vec::new();
        let mut seen_classes: BTreeSet<u32> = BTreeSet::new();
        let mut kept: HashMap<([u8; 16], u8), u32> = HashMap::default();
        for &(key, len) in &prefixes {
            let mut set: Vec<u32> = Vec::new();
            for l in 0..=len {
                if let Some(sels) = owners.get(&(truncate(key, l), l)) {
                    set.extend(sels);
                }
            }
            set.sort_unstable();
            set.dedup();
            let class = self.class_id(set.clone());
            if seen_classes.insert(class) {
                let positions = (0..chain.len())
                    .filter(|&i| set.binary_search(&rule_sel[i]).is_ok())
                    .collect();
                class_rules.push((class, positions));
            }
            let nearest = (0..len).rev().find_map(|l| kept.get(&(truncate(key, l), l)));
            if nearest == Some(&class) {
                continue;
            }
            kept.insert((key, len), class);
            class_out.push(LpmEntry {
                prefix_len: CLASS_KEY_FIXED_BITS + u32::from(len),
                key: ClassKey {
                    policy,
                    dir: dir.key(),
                    family: eth.family(),
                    _pad: [0; 2],
                    addr: key,
                },
                value: ClassVal { class },
            });
        }

        for (class, positions) in class_rules {
            // The earliest chain position owning each service prefix.
            let mut first: HashMap<ServicePrefix, usize> = HashMap::default();
            for &pos in positions.iter().filter(|&&p| !has_source_ports(chain[p].1)) {
                for p in service_prefixes(chain[pos].1) {
                    first.entry(p).and_modify(|f| *f = (*f).min(pos)).or_insert(pos);
                }
            }
            let mut own: Vec<ServicePrefix> = first.keys().copied().collect();
            own.sort_unstable_by_key(|&(value, len)| (len, value));
            let mut kept: HashMap<ServicePrefix, usize> = HashMap::default();
            for (value, len) in own {
                let best = (0..=len)
                    .filter_map(|l| first.get(&(value & mask24(l), l)))
                    .min()
                    .copied()
                    .expect("the prefix itself is present");
                let nearest = (0..len).rev().find_map(|l| kept.get(&(value & mask24(l), l)));
                if nearest == Some(&best) {
                    continue;
                }
                kept.insert((value, len), best);
                service_out.push(LpmEntry {
                    prefix_len: SERVICE_KEY_ANY_PROTO_BITS + u32::from(len),
                    key: ServiceKey {
                        policy,
                        class,
                        dir: dir.key(),
                        family: eth.family(),
                        proto: (value >> 16) as u8,
                        port_be: (value as u16).to_be_bytes(),
                        _pad: [0; 3],
                    },
                    value: ServiceVal { rule: chain[best].0 },
                });
            }

            // The same over (proto, sport, dport) for the rules with source ports.
            let mut first: HashMap<SrcPortPrefix, usize> = HashMap::default();
            for &pos in positions.iter().filter(|&&p| has_source_ports(chain[p].1)) {
                for p in src_port_prefixes(chain[pos].1) {
                    first.entry(p).and_modify(|f| *f = (*f).min(pos)).or_insert(pos);
                }
            }
            let mut own: Vec<SrcPortPrefix> = first.keys().copied().collect();
            own.sort_unstable_by_key(|&(value, len)| (len, value));
            let mut kept: HashMap<SrcPortPrefix, usize> = HashMap::default();
            for (value, len) in own {
                let best = (8..=len)
                    .filter_map(|l| first.get(&(value & mask40(l), l)))
                    .min()
                    .copied()
                    .expect("the prefix itself is present");
                let nearest = (8..len).rev().find_map(|l| kept.get(&(value & mask40(l), l)));
                if nearest == Some(&best) {
                    continue;
                }
                kept.insert((value, len), best);
                src_port_out.push(LpmEntry {
                    prefix_len: SRC_PORT_KEY_PROTO_BITS - 8 + u32::from(len),
                    key: SrcPortKey {
                        policy,
                        class,
                        dir: dir.key(),
                        family: eth.family(),
                        proto: (value >> 32) as u8,
                        sport_be: ((value >> 16) as u16).to_be_bytes(),
                        dport_be: (value as u16).to_be_bytes(),
                        _pad: [0; 1],
                    },
                    value: ServiceVal { rule: chain[best].0 },
                });
            }
        }
    }

    /// The networks a selector is made of, for one family.
    fn selector_nets(&self, sel: u32, eth: Ethertype) -> Vec<IpNet> {
        match &self.selector_list[sel as usize] {
            Selector::Prefix(n) => vec![*n],
            Selector::Group(g) => member_nets(self.model, &Remote::Group(g.clone()), eth),
            Selector::AddressGroup(a) => member_nets(self.model, &Remote::AddressGroup(a.clone()), eth),
        }
    }
}

fn member_nets(model: &Model, remote: &Remote, eth: Ethertype) -> Vec<IpNet> {
    model
        .members(remote, eth)
        .unwrap_or(&[])
        .iter()
        .map(|m| m.net.trunc())
        .collect()
}

/// The remote selector of a rule.
pub fn selector(rule: &Rule) -> Selector {
    match &rule.remote {
        Remote::Any => Selector::Prefix(addr::any_net(rule.ethertype == Ethertype::IPv4)),
        Remote::Prefix(n) => Selector::Prefix(n.trunc()),
        Remote::Group(g) => Selector::Group(g.clone()),
        Remote::AddressGroup(a) => Selector::AddressGroup(a.clone()),
    }
}

fn truncate(key: [u8; 16], len: u8) -> [u8; 16] {
    let v = u128::from_be_bytes(key);
    let m = if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len))
    };
    (v & m).to_be_bytes()
}

fn mask24(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        (0xff_ffffu32 << (24 - u32::from(len))) & 0xff_ffff
    }
}

fn mask40(len: u8) -> u64 {
    const ALL: u64 = (1 << 40) - 1;
    if len == 0 {
        0
    } else {
        (ALL << (40 - u32::from(len))) & ALL
    }
}

/// Whether a rule restricts the source port (it then lives in `SG_SRC_PORTS`).
pub fn has_source_ports(rule: &Rule) -> bool {
    rule.source_port_range_min.is_some() && rule.proto_num.is_some_and(is_port_protocol)
}

/// The (protocol, source port, destination port) prefixes of a rule with source ports, over
/// `proto << 32 | sport << 16 | dport`. A source block shorter than a port, followed by a
/// destination range, is taken port by port (an LPM prefix cannot skip bits).
pub fn src_port_prefixes(rule: &Rule) -> Vec<SrcPortPrefix> {
    let (Some(proto), Some(slo), Some(shi)) = (
        rule.proto_num,
        rule.source_port_range_min,
        rule.source_port_range_max,
    ) else {
        return Vec::new();
    };
    let base = u64::from(proto) << 32;
    let dblocks = match (rule.port_range_min, rule.port_range_max) {
        (Some(lo), Some(hi)) if lo <= hi => Some(range_prefixes(lo, hi)),
        _ => None,
    };
    let mut out = Vec::new();
    for (sp, sl) in range_prefixes(slo, shi) {
        let Some(dblocks) = &dblocks else {
            out.push((base | u64::from(sp) << 16, 8 + sl));
            continue;
        };
        let sports = u64::from(sp)..u64::from(sp) + (1u64 << (16 - sl));
        for s in sports {
            for &(dp, dl) in dblocks {
                out.push((base | s << 16 | u64::from(dp), 24 + dl));
            }
        }
    }
    out
}

/// The (protocol, port) prefixes a rule admits, over `proto << 16 | port`.
pub fn service_prefixes(rule: &Rule) -> Vec<ServicePrefix> {
    let Some(proto) = rule.proto_num else {
        return vec![(0, 0)];
    };
    let base = u32::from(proto) << 16;
    let whole = vec![(base, 8)];
    if is_port_protocol(proto) {
        match (rule.port_range_min, rule.port_range_max) {
            (Some(lo), Some(hi)) if lo <= hi => range_prefixes(lo, hi)
                .into_iter()
                .map(|(p, l)| (base | u32::from(p), 8 + l))
                .collect(),
            _ => whole,
        }
    } else if is_icmp_protocol(proto) {
        match (rule.port_range_min, rule.port_range_max) {
            // The kernel's IPv4 icmp match treats type 255 as "any type" (ip_tables.c
            // icmp_type_code_match: `test_type == 0xFF ||`); ip6_tables has no such case.
            (Some(255), _) if proto == PROTO_ICMP => whole,
            (Some(t), None) => vec![(base | u32::from(t) << 8, 16)],
            (Some(t), Some(c)) => vec![(base | u32::from(t) << 8 | u32::from(c), 24)],
            _ => whole,
        }
    } else {
        // Neutron renders no port match for other protocols (the API refuses such ports).
        whole
    }
}

/// The minimal aligned blocks covering `lo..=hi`, as (first port, prefix length in bits).
pub fn range_prefixes(lo: u16, hi: u16) -> Vec<(u16, u8)> {
    crate::model::protocol::port_blocks(lo, hi)
}

fn compile_port(model: &Model, port: &Port, policy: u32, addr_id: u32) -> CompiledPort {
    let v4_pairs = port.spoof_pairs(Ethertype::IPv4);
    let v6_pairs = port.spoof_pairs(Ethertype::IPv6);

    let mut flags = PORT_F_FILTERED;
    // As Neutron's iptables driver decides it, so that both back ends track the same ports.
    if model.port_stateful(port) {
        flags |= PORT_F_STATEFUL;
    }
    if !v4_pairs.is_empty() {
        flags |= PORT_F_SPOOF_V4;
    }
    if !v6_pairs.is_empty() {
        flags |= PORT_F_SPOOF_V6;
    }
    if port.has_fixed_ip(Ethertype::IPv6) {
        flags |= PORT_F_V6_FIXED;
    }
    if model.port_rules(port).any(|(_, r)| has_source_ports(r)) {
        flags |= PORT_F_SRC_PORTS;
    }
    // Neutron's arp_protect looks at the IPv4 addresses only and skips protection when one
    // of them is a /0.
    if !port
        .allowed_address_pairs
        .iter()
        .any(|a| a.net.addr().is_ipv4() && a.net.prefix_len() == 0)
    {
        flags |= PORT_F_ARP_PROTECT;
    }

    let mut addrs: Vec<LpmEntry<AddrKey, AddrVal>> = Vec::new();
    let mut push = |kind: u8, mac: MacAddr, net: Option<IpNet>, index: u32| {
        let (addr, len) = net.map(addr::net_key).unwrap_or(([0; 16], 0));
        let entry = LpmEntry {
            prefix_len: ADDR_KEY_FIXED_BITS + u32::from(len),
            key: AddrKey {
                addr_id,
                kind,
                _pad: 0,
                mac: mac.0,
                addr,
            },
            value: AddrVal { index },
        };
        // A repeated pair (an AAP equal to a fixed IP) is one LPM entry; keep the first.
        if !addrs
            .iter()
            .any(|e| e.prefix_len == entry.prefix_len && e.key == entry.key)
        {
            addrs.push(entry);
        }
    };
    push(ADDR_KIND_MAC, port.mac, None, 0);
    for pair in &port.allowed_address_pairs {
        push(ADDR_KIND_MAC, pair.mac, None, 0);
    }
    for (kind, pairs) in [(ADDR_KIND_PAIR_V4, &v4_pairs), (ADDR_KIND_PAIR_V6, &v6_pairs)] {
        for (i, pair) in pairs.iter().enumerate() {
            push(kind, pair.mac, pair.net, i as u32 + 1);
        }
    }
    // ARP senders: the IPv4 pairs that have an address, and a probe from each of their MACs.
    // A port with no IPv4 address (only the MAC-only pair) gets none: all its ARP is dropped.
    for (i, pair) in v4_pairs.iter().enumerate() {
        if let Some(net) = pair.net {
            push(ADDR_KIND_ARP_V4, pair.mac, Some(net), i as u32 + 1);
            push(
                ADDR_KIND_ARP_V4,
                pair.mac,
                Some(IpNet::from(IpAddr::V4(Ipv4Addr::UNSPECIFIED))),
                0,
            );
        }
    }
    for f in &port.fixed_ips {
        let kind = if f.ip.is_ipv4() {
            ADDR_KIND_FIXED_V4
        } else {
            ADDR_KIND_FIXED_V6
        };
        push(kind, MacAddr::default(), Some(IpNet::from(f.ip)), 0);
    }

    CompiledPort {
        id: port.id.clone(),
        device: port.device.clone(),
        network_id: port.network_id.clone(),
        info: PortInfo {
            policy,
            addr_id,
            port_idx: 0,
            flags,
            mac: port.mac.0,
            _pad: [0; 2],
        },
        addrs,
    }
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
