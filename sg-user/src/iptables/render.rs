//! Steps 2 and 3 of the renderer: Neutron's `IptablesFirewallDriver` (chains and rules from the
//! server view, spec §3-§8) and its `IptablesManager` (the order the rules end up in, spec §11),
//! for one agent start on a fresh host: `prepare_devices_filter(all local devices)` under
//! `defer_apply`, then one apply.
//!
//! The code follows the driver's call order because the order rules are *added* in decides
//! where they end up: per chain, "top" rules first, then the others, each in insertion order,
//! and of textually identical lines only the last one survives.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use crate::model::{Direction, Ethertype, addr};

use super::neutron::{PortDict, RuleDict, ServerView, ethertype_of};
use super::{Agent, IpSet, RenderOptions, Table, protocols};

/// `iptables_comments.py`.
mod comment {
    pub const UNMATCH_DROP: &str = "Default drop rule for unmatched traffic.";
    pub const VM_INT_SG: &str = "Direct traffic from the VM interface to the security group chain.";
    pub const SG_TO_VM_SG: &str = "Jump to the VM specific chain.";
    pub const INPUT_TO_SG: &str = "Direct incoming traffic from VM to the security group chain.";
    pub const PAIR_ALLOW: &str = "Allow traffic from defined IP/MAC pairs.";
    pub const PAIR_DROP: &str = "Drop traffic without an IP/MAC allow rule.";
    pub const DHCP_CLIENT: &str = "Allow DHCP client traffic.";
    pub const DHCP_SPOOF: &str = "Prevent DHCP Spoofing by VM.";
    pub const UNMATCHED: &str = "Send unmatched traffic to the fallback chain.";
    pub const INVALID_DROP: &str = "Drop packets that appear related to an existing connection (e.g. TCP ACK/FIN) but do not have an entry in conntrack.";
    pub const ALLOW_ASSOC: &str = "Direct packets associated with a known session to the RETURN chain.";
    pub const PORT_SEC_ACCEPT: &str = "Accept all packets when port security is disabled.";
    pub const TRUSTED_ACCEPT: &str = "Accept all packets when port is trusted.";
    pub const IPV6_RA_DROP: &str = "Drop IPv6 Router Advts from VM Instance.";
    pub const IPV6_ICMP_ALLOW: &str = "Allow IPv6 ICMP traffic.";
}

/// Builtin chains per table, in iptables-save's hook order.
pub(crate) const BUILTIN: [(&str, &[&str]); 3] = [
    ("filter", &["INPUT", "FORWARD", "OUTPUT"]),
    ("raw", &["PREROUTING", "OUTPUT"]),
    ("nat", &["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"]),
];
const FILTER_TOP: &str = "neutron-filter-top";
const SG_CHAIN: &str = "sg-chain";
/// `MAX_IPTABLES_CHAIN_LEN_WRAP`.
const CHAIN_LEN_WRAP: usize = 11;
/// `MAX_IPTABLES_CHAIN_LEN_NOWRAP`.
const CHAIN_LEN_NOWRAP: usize = 28;
/// `ICMPV6_ALLOWED_INGRESS_TYPES` (MLD query, NS, NA) and `ICMPV6_ALLOWED_UNSPEC_ADDR_TYPES`
/// (MLDv1 report, NS, MLDv2 report).
const ICMPV6_INGRESS: [u8; 3] = [130, 135, 136];
const ICMPV6_UNSPEC: [u8; 3] = [131, 135, 143];
/// First conntrack zone Neutron hands out (`ZONE_START`).
const ZONE_START: u32 = 4097;

fn first_chars(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn skip_chars(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[i..],
        None => "",
    }
}

/// `comment_rule`: the comment goes right before the first ` -j ` (where iptables-save prints
/// it), first for a jump-only rule, last if there is no jump.
fn comment_rule(rule: &str, comment: Option<&str>, enabled: bool) -> String {
    let Some(comment) = comment.filter(|_| enabled) else {
        return rule.to_string();
    };
    let c = format!("-m comment --comment \"{comment}\"");
    if rule.starts_with("-j") {
        return format!("{c} {rule}");
    }
    match rule.find(" -j ") {
        Some(j) => format!("{} {c} {}", &rule[..j], &rule[j + 1..]),
        None => format!("{rule} {c}"),
    }
}

/// One `IptablesTable`: chains and rules in insertion order.
struct TableBuilder {
    name: &'static str,
    wrap: &'static str,
    /// Wrapped chains by short name.
    chains: BTreeSet<String>,
    unwrapped: BTreeSet<String>,
    /// (full chain name, full `-A` line with its comment, top).
    rules: Vec<(String, String, bool)>,
}

impl TableBuilder {
    fn new(name: &'static str, wrap: &'static str) -> Self {
        TableBuilder {
            name,
            wrap,
            chains: BTreeSet::new(),
            unwrapped: BTreeSet::new(),
            rules: Vec::new(),
        }
    }

    fn chain_name(&self, name: &str, wrap: bool) -> String {
        if wrap {
            format!("{}-{}", self.wrap, first_chars(name, CHAIN_LEN_WRAP))
        } else {
            first_chars(name, CHAIN_LEN_NOWRAP).to_string()
        }
    }

    fn add_chain(&mut self, name: &str, wrap: bool) {
        if wrap {
            self.chains.insert(first_chars(name, CHAIN_LEN_WRAP).to_string());
        } else {
            self.unwrapped
                .insert(first_chars(name, CHAIN_LEN_NOWRAP).to_string());
        }
    }

    /// `add_rule`: `$name` targets are expanded to the wrapped chain.
    fn add_rule(
        &mut self,
        chain: &str,
        rule: &str,
        wrap: bool,
        top: bool,
        comment: Option<&str>,
        comments: bool,
    ) {
        debug_assert!(!wrap || self.chains.contains(first_chars(chain, CHAIN_LEN_WRAP)));
        let rule = if rule.contains('$') {
            rule.split(' ')
                .map(|t| match t.strip_prefix('$') {
                    Some(c) => format!("{}-{}", self.wrap, first_chars(c, CHAIN_LEN_WRAP)),
                    None => t.to_string(),
                })
                .collect::<Vec<_>>()
                .join(" ")
        } else {
            rule.to_string()
        };
        let chain = self.chain_name(chain, wrap);
        let line = format!("-A {chain} {rule}");
        let line = comment_rule(line.trim(), comment, comments);
        self.rules.push((chain, line, top));
    }

    /// `IptablesManager._modify_rules` on a host without state, then iptables-save's layout:
    /// top rules, then the others, duplicates collapsed onto their last occurrence, grouped per
    /// chain (builtin chains in hook order, then user chains by name).
    fn finish(self) -> Table {
        let builtin: &[&str] = BUILTIN
            .iter()
            .find(|(t, _)| *t == self.name)
            .map(|(_, c)| *c)
            .unwrap_or(&[]);
        let ordered: Vec<&(String, String, bool)> = self
            .rules
            .iter()
            .filter(|r| r.2)
            .chain(self.rules.iter().filter(|r| !r.2))
            .collect();
        let mut seen: HashSet<&str> = HashSet::new();
        let mut kept: Vec<&(String, String, bool)> = Vec::new();
        for r in ordered.into_iter().rev() {
            if seen.insert(r.1.as_str()) {
                kept.push(r);
            }
        }
        kept.reverse();
        let mut user: BTreeSet<String> = self.chains.iter().map(|c| format!("{}-{c}", self.wrap)).collect();
        user.extend(self.unwrapped.iter().cloned());
        let mut by_chain: HashMap<&str, Vec<String>> = HashMap::new();
        for (chain, line, _) in kept {
            let rule = line[3 + chain.len()..].trim_start().to_string();
            by_chain.entry(chain.as_str()).or_default().push(rule);
        }
        let mut rules = Vec::new();
        for chain in builtin.iter().map(|c| c.to_string()).chain(user.iter().cloned()) {
            if let Some(rs) = by_chain.remove(chain.as_str()) {
                rules.extend(rs.into_iter().map(|r| (chain.clone(), r)));
            }
        }
        debug_assert!(by_chain.is_empty(), "rules in undeclared chains: {by_chain:?}");
        Table {
            name: self.name,
            builtin: builtin.to_vec(),
            chains: user.into_iter().collect(),
            rules,
        }
    }
}

/// Both families' tables and the ipset manager, driven like `IptablesFirewallDriver`.
struct Driver<'v, 'm> {
    opts: &'v RenderOptions,
    view: &'v ServerView<'m>,
    protocols: &'static HashMap<String, String>,
    /// [family][table]: filter, raw, nat.
    tables: [[TableBuilder; 3]; 2],
    /// Sets the ipset manager knows, by name.
    ipsets: BTreeMap<String, IpSet>,
    /// Zone per filtered port id.
    port_zones: BTreeMap<String, u32>,
}

const FILTER: usize = 0;
const RAW: usize = 1;
const NAT: usize = 2;

fn fam(e: Ethertype) -> usize {
    match e {
        Ethertype::IPv4 => 0,
        Ethertype::IPv6 => 1,
    }
}

impl<'v, 'm> Driver<'v, 'm> {
    fn comments(&self) -> bool {
        self.opts.comments
    }

    fn c(&self, rule: &str, comment: &str) -> String {
        comment_rule(rule, Some(comment), self.comments())
    }

    /// The same rules into one table of both families.
    fn add_v4v6(&mut self, table: usize, chain: &str, rules: &[String], top: bool, comment: Option<&str>) {
        let comments = self.comments();
        for t in &mut self.tables {
            for r in rules {
                t[table].add_rule(chain, r, true, top, comment, comments);
            }
        }
    }

    fn add_chain_v4v6(&mut self, chain: &str) {
        for t in &mut self.tables {
            t[FILTER].add_chain(chain, true);
        }
    }

    /// `IptablesManager.__init__` (state_less) and the driver's fallback chain.
    fn init(&mut self) {
        let comments = self.comments();
        for t in &mut self.tables {
            let f = &mut t[FILTER];
            f.add_chain(FILTER_TOP, false);
            f.add_rule(
                "FORWARD",
                &format!("-j {FILTER_TOP}"),
                false,
                true,
                None,
                comments,
            );
            f.add_rule("OUTPUT", &format!("-j {FILTER_TOP}"), false, true, None, comments);
            f.add_chain("local", true);
            f.add_rule(FILTER_TOP, "-j $local", false, false, None, comments);
            for (table, chains) in [
                (FILTER, &["INPUT", "OUTPUT", "FORWARD"][..]),
                (RAW, &["PREROUTING", "OUTPUT"][..]),
                (NAT, &["PREROUTING"][..]),
            ] {
                for chain in chains {
                    t[table].add_chain(chain, true);
                    t[table].add_rule(chain, &format!("-j ${chain}"), false, false, None, comments);
                }
            }
            t[FILTER].add_chain("sg-fallback", true);
            t[FILTER].add_rule(
                "sg-fallback",
                "-j DROP",
                true,
                false,
                Some(comment::UNMATCH_DROP),
                comments,
            );
        }
    }

    /// `_get_device_name`: the physdev name (hybrid: `tap` + UUID, cut to 14).
    fn physdev(&self, device: &str) -> String {
        match self.opts.agent {
            Agent::LinuxBridge => device.to_string(),
            Agent::OvsHybrid => first_chars(&format!("tap{device}"), 14).to_string(),
        }
    }

    fn port_chain(&self, port: &PortDict, letter: char) -> String {
        let suffix = match self.opts.agent {
            Agent::LinuxBridge => skip_chars(&port.device, 3),
            Agent::OvsHybrid => port.device.as_str(),
        };
        first_chars(&format!("{letter}{suffix}"), CHAIN_LEN_WRAP).to_string()
    }

    fn direction_letter(d: Direction) -> char {
        match d {
            Direction::Ingress => 'i',
            Direction::Egress => 'o',
        }
    }

    fn physdev_dir(d: Direction) -> &'static str {
        match d {
            Direction::Ingress => "physdev-out",
            Direction::Egress => "physdev-in",
        }
    }

    /// `process_trusted_ports`.
    fn trusted_ports(&mut self) {
        let mut done: Vec<String> = Vec::new();
        for id in self.view.trusted.clone() {
            if done.contains(&id) {
                continue;
            }
            let dev = self.physdev(&id);
            let rules: Vec<String> = Direction::ALL
                .iter()
                .map(|&d| {
                    format!(
                        "-m physdev --{} {dev} --physdev-is-bridged -j ACCEPT",
                        Self::physdev_dir(d)
                    )
                })
                .collect();
            self.add_v4v6(FILTER, "FORWARD", &rules, false, Some(comment::TRUSTED_ACCEPT));
            self.nat_short_circuit(&dev);
            done.push(id);
        }
    }

    fn nat_short_circuit(&mut self, dev: &str) {
        let rules: Vec<String> = Direction::ALL
            .iter()
            .map(|&d| format!("-m physdev --{} {dev} -j ACCEPT", Self::physdev_dir(d)))
            .collect();
        self.add_v4v6(NAT, "PREROUTING", &rules, false, Some(comment::TRUSTED_ACCEPT));
    }

    /// `update_security_group_members` with ipset: `set_members` for each delivered list.
    fn ipset_members(&mut self) {
        for (id, by_eth) in &self.view.members {
            for (&ethertype, members) in by_eth {
                let name = first_chars(&format!("N{}{id}", ethertype.as_str()), 29).to_string();
                let sanitized = sanitize(members);
                let set = self.ipsets.entry(name.clone()).or_insert_with(|| IpSet {
                    name: name.clone(),
                    family: ethertype,
                    members: Vec::new(),
                    commands: Vec::new(),
                    created: false,
                });
                set.set_members(sanitized);
            }
        }
    }

    /// `_setup_chains_apply`.
    fn setup_chains(&mut self) {
        self.add_chain_v4v6(SG_CHAIN);
        for port in filtered_sorted(self.view) {
            self.conntrack_jump(port);
            let dev = self.physdev(&port.device);
            self.nat_short_circuit(&dev);
            self.setup_chain(port, Direction::Ingress);
            self.setup_chain(port, Direction::Egress);
        }
        self.add_v4v6(FILTER, SG_CHAIN, &["-j ACCEPT".to_string()], false, None);
        let unfiltered: Vec<&PortDict> = self
            .view
            .devices
            .iter()
            .filter(|p| !p.port.port_security_enabled)
            .collect();
        for port in unfiltered {
            let dev = self.physdev(&port.device);
            for d in Direction::ALL {
                let rule = vec![format!(
                    "-m physdev --{} {dev} --physdev-is-bridged -j ACCEPT",
                    Self::physdev_dir(d)
                )];
                self.add_v4v6(FILTER, "FORWARD", &rule, false, Some(comment::PORT_SEC_ACCEPT));
                if d == Direction::Egress {
                    self.add_v4v6(FILTER, "INPUT", &rule, false, Some(comment::PORT_SEC_ACCEPT));
                }
            }
            self.nat_short_circuit(&dev);
        }
    }

    /// `_get_jump_rules` / `_add_conntrack_jump`: three CT rules in raw PREROUTING.
    fn conntrack_jump(&mut self, port: &PortDict) {
        // Allocated up front, in this same order (`zones`).
        let zone = self.port_zones[&port.port.id];
        let br = match self.opts.agent {
            Agent::LinuxBridge => first_chars(&format!("brq{}", port.port.network_id), 14).to_string(),
            Agent::OvsHybrid => first_chars(&format!("qvb{}", port.device), 14).to_string(),
        };
        let dev = self.physdev(&port.device);
        // `_get_port_device_name`: four characters go for a `tap` device (spec §8.1).
        let name = if port.device.starts_with("tap") {
            skip_chars(&port.device, 4)
        } else {
            &port.device
        };
        let (comment, target) = if self.port_stateful(port) {
            (format!("Set zone for {name}"), format!("--zone {zone}"))
        } else {
            (format!("Make {name} stateless"), "--notrack".to_string())
        };
        let rules: Vec<String> = [
            format!("-m physdev --physdev-in {br}"),
            format!("-i {br}"),
            format!("-m physdev --physdev-in {dev}"),
        ]
        .into_iter()
        .map(|m| format!("{m} -m comment --comment \"{comment}\" -j CT {target}"))
        .collect();
        self.add_v4v6(RAW, "PREROUTING", &rules, false, None);
    }

    /// `_get_port_sg_rules` + `_are_sg_rules_stateful`: the first rule of the first group (with
    /// ipset off, the first one that expands to something).
    fn port_stateful(&self, port: &PortDict) -> bool {
        let owner = &port.port.device_owner;
        if owner.starts_with("network:") || owner.starts_with("neutron:") {
            return true;
        }
        let Some(first) = port.port.security_groups.first() else {
            return true;
        };
        for rule in self.view.sg_rules.get(first).map(Vec::as_slice).unwrap_or(&[]) {
            if self.opts.ipset {
                return rule.stateful.unwrap_or(true);
            }
            let expands = Direction::ALL
                .iter()
                .any(|&d| !self.expand(rule, port, d).is_empty());
            if expands {
                return rule.stateful.unwrap_or(true);
            }
        }
        true
    }

    /// `_expand_sg_rule_with_remote_ips`: a remote-group rule becomes one rule per member that
    /// is not one of the port's own addresses.
    fn expand(&self, rule: &RuleDict, port: &PortDict, direction: Direction) -> Vec<RuleDict> {
        let Some(id) = rule.remote_id() else {
            return vec![rule.clone()];
        };
        let members = self
            .view
            .members
            .get(id)
            .and_then(|m| m.get(&rule.ethertype))
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        members
            .iter()
            .filter(|(ip, _)| !port.fixed_ips.contains(ip))
            .map(|(ip, _)| {
                let mut r = rule.clone();
                let cidr = addr::parse_network(ip)
                    .map(|n| addr::net_to_string(n.trunc()))
                    .unwrap_or_else(|| ip.clone());
                match direction {
                    Direction::Ingress => r.source_ip_prefix = Some(cidr),
                    Direction::Egress => r.dest_ip_prefix = Some(cidr),
                }
                r
            })
            .collect()
    }

    /// `_setup_chain` = `_add_chain` + `_add_rules_by_security_group`.
    fn setup_chain(&mut self, port: &PortDict, direction: Direction) {
        let chain = self.port_chain(port, Self::direction_letter(direction));
        self.add_chain_v4v6(&chain);
        let dev = self.physdev(&port.device);
        let pd = Self::physdev_dir(direction);
        let jump = vec![format!(
            "-m physdev --{pd} {dev} --physdev-is-bridged -j ${SG_CHAIN}"
        )];
        self.add_v4v6(FILTER, "FORWARD", &jump, true, Some(comment::VM_INT_SG));
        let jump = vec![format!(
            "-m physdev --{pd} {dev} --physdev-is-bridged -j ${chain}"
        )];
        self.add_v4v6(FILTER, SG_CHAIN, &jump, false, Some(comment::SG_TO_VM_SG));
        if direction == Direction::Egress {
            self.add_v4v6(FILTER, "INPUT", &jump, false, Some(comment::INPUT_TO_SG));
        }

        // Port-level (provider) rules, then the groups' rules, split by ethertype.
        let mut selected: Vec<RuleDict> = port
            .provider_rules
            .iter()
            .filter(|r| r.direction == direction)
            .cloned()
            .collect();
        for sg_id in &port.port.security_groups {
            for rule in self.view.sg_rules.get(sg_id).map(Vec::as_slice).unwrap_or(&[]) {
                if rule.direction != direction {
                    continue;
                }
                if self.opts.ipset {
                    selected.push(rule.clone());
                } else {
                    selected.extend(self.expand(rule, port, direction));
                }
            }
        }
        let mut out: [Vec<String>; 2] = [Vec::new(), Vec::new()];
        match direction {
            Direction::Egress => self.fixed_egress_rules(port, &mut out),
            Direction::Ingress => out[1].extend(
                ICMPV6_INGRESS
                    .iter()
                    .map(|t| format!("-p ipv6-icmp -m icmp6 --icmpv6-type {t} -j RETURN")),
            ),
        }
        for e in Ethertype::ALL {
            let rules: Vec<&RuleDict> = selected.iter().filter(|r| r.ethertype == e).collect();
            let converted = self.convert_rules(&rules);
            out[fam(e)].extend(converted);
        }
        let comments = self.comments();
        for (f, rules) in out.iter().enumerate() {
            for r in rules {
                self.tables[f][FILTER].add_rule(&chain, r, true, false, None, comments);
            }
        }
    }

    /// `_add_fixed_egress_rules` = `_spoofing_rule` + `_drop_dhcp_rule`.
    fn fixed_egress_rules(&mut self, port: &PortDict, out: &mut [Vec<String>; 2]) {
        out[0].push(self.c(
            "-s 0.0.0.0/32 -d 255.255.255.255/32 -p udp -m udp --sport 68 --dport 67 -j RETURN",
            comment::DHCP_CLIENT,
        ));
        for t in ICMPV6_UNSPEC {
            out[1].push(self.c(
                &format!("-s ::/128 -d ff02::/16 -p ipv6-icmp -m icmp6 --icmpv6-type {t} -j RETURN"),
                comment::IPV6_ICMP_ALLOW,
            ));
        }
        let chain = self.port_chain(port, 's');
        let comments = self.comments();
        for e in Ethertype::ALL {
            let pairs = spoof_pairs(port, e);
            if pairs.is_empty() {
                continue;
            }
            let f = fam(e);
            let table = &mut self.tables[f][FILTER];
            table.add_chain(&chain, true);
            for (mac, ip) in pairs {
                let rule = match ip {
                    None => format!("-m mac --mac-source {mac} -j RETURN"),
                    Some(ip) => format!("-s {ip} -m mac --mac-source {mac} -j RETURN"),
                };
                table.add_rule(&chain, &rule, true, false, Some(comment::PAIR_ALLOW), comments);
            }
            table.add_rule(&chain, "-j DROP", true, false, Some(comment::PAIR_DROP), comments);
            out[f].push(format!("-j ${chain}"));
        }
        out[0].push(self.c(
            "-p udp -m udp --sport 68 --dport 67 -j RETURN",
            comment::DHCP_CLIENT,
        ));
        out[1].push(self.c(
            "-p ipv6-icmp -m icmp6 --icmpv6-type 134 -j DROP",
            comment::IPV6_RA_DROP,
        ));
        out[1].push(self.c("-p ipv6-icmp -j RETURN", comment::IPV6_ICMP_ALLOW));
        out[1].push(self.c(
            "-p udp -m udp --sport 546 --dport 547 -j RETURN",
            comment::DHCP_CLIENT,
        ));
        out[0].push(self.c("-p udp -m udp --sport 67 --dport 68 -j DROP", comment::DHCP_SPOOF));
        out[1].push(self.c(
            "-p udp -m udp --sport 547 --dport 546 -j DROP",
            comment::DHCP_SPOOF,
        ));
    }

    /// `_convert_sgr_to_iptables_rules`: state rule, the rules (first copy of a text wins),
    /// INVALID drop, fallback jump.
    fn convert_rules(&self, rules: &[&RuleDict]) -> Vec<String> {
        let mut out = vec![self.c(
            "-m state --state RELATED,ESTABLISHED -j RETURN",
            comment::ALLOW_ASSOC,
        )];
        let mut seen: HashSet<String> = HashSet::new();
        for rule in rules {
            if let Some(args) = self.rule_args(rule)
                && seen.insert(args.clone())
            {
                out.push(args);
            }
        }
        out.push(self.c("-m state --state INVALID -j DROP", comment::INVALID_DROP));
        out.push(self.c("-j $sg-fallback", comment::UNMATCHED));
        out
    }

    /// `_convert_sg_rule_to_iptables_args`; None when the rule's set is unknown.
    fn rule_args(&self, rule: &RuleDict) -> Option<String> {
        let mut args: Vec<String> = Vec::new();
        match rule.remote_id().filter(|_| self.opts.ipset) {
            Some(id) => {
                let name = first_chars(&format!("N{}{id}", rule.ethertype.as_str()), 29).to_string();
                if !self.ipsets.contains_key(&name) {
                    return None;
                }
                args.extend(self.protocol_and_ports(rule));
                let dir = match rule.direction {
                    Direction::Ingress => "src",
                    Direction::Egress => "dst",
                };
                args.push(format!("-m set --match-set {name} {dir}"));
            }
            None => {
                args.extend(prefix_arg('s', rule.source_ip_prefix.as_deref()));
                args.extend(prefix_arg('d', rule.dest_ip_prefix.as_deref()));
                args.extend(self.protocol_and_ports(rule));
            }
        }
        args.push("-j RETURN".to_string());
        Some(args.join(" "))
    }

    /// `_generate_protocol_and_port_args`.
    fn protocol_and_ports(&self, rule: &RuleDict) -> Vec<String> {
        let mut args = Vec::new();
        let name = protocols::iptables_name(self.protocols, rule.protocol.as_deref());
        let Some(name) = name else { return args };
        args.push(format!("-p {name}"));
        let is_port = rule.source_port_range_min.is_some() || rule.port_range_min.is_some();
        let module = match name {
            "dccp" | "icmp" | "sctp" | "tcp" | "udp" => Some(name),
            "ipv6-icmp" => Some("icmp6"),
            _ => None,
        };
        if let (true, Some(m)) = (is_port, module) {
            args.push(format!("-m {m}"));
        }
        args.extend(port_arg(
            "sport",
            name,
            rule.source_port_range_min,
            rule.source_port_range_max,
        ));
        args.extend(port_arg("dport", name, rule.port_range_min, rule.port_range_max));
        args
    }
}

/// `_port_arg`.
fn port_arg(dir: &str, protocol: &str, min: Option<u16>, max: Option<u16>) -> Option<String> {
    let min = min?;
    match protocol {
        "icmp" | "ipv6-icmp" => {
            let kind = if protocol == "icmp" { "icmp" } else { "icmpv6" };
            Some(match max {
                Some(code) => format!("--{kind}-type {min}/{code}"),
                None => format!("--{kind}-type {min}"),
            })
        }
        "dccp" | "sctp" | "tcp" | "udp" | "udplite" => Some(if Some(min) == max {
            if protocol == "udplite" {
                format!("-m multiport --{dir}s {min}")
            } else {
                format!("--{dir} {min}")
            }
        } else {
            format!(
                "-m multiport --{dir}s {min}:{}",
                max.map(|m| m.to_string()).unwrap_or_else(|| "None".into())
            )
        }),
        _ => None,
    }
}

/// `_ip_prefix_arg`: a bare address becomes a host CIDR, a `/0` prefix is no constraint.
fn prefix_arg(flag: char, prefix: Option<&str>) -> Option<String> {
    let p = prefix.filter(|p| !p.is_empty())?;
    if !p.contains('/') {
        return Some(format!("-{flag} {}", ip_to_cidr(p)));
    }
    if p.ends_with("/0") {
        return None;
    }
    Some(format!("-{flag} {p}"))
}

/// `ip_to_cidr`: `str(netaddr.IPNetwork(ip))`.
fn ip_to_cidr(ip: &str) -> String {
    addr::parse_network(ip)
        .map(addr::net_to_string)
        .unwrap_or_else(|| ip.to_string())
}

/// `_sanitize_addresses`: members as ipset stores them; `/0` as two `/1`.
fn sanitize(members: &[(String, Option<String>)]) -> Vec<String> {
    let mut out = Vec::new();
    for (ip, _) in members {
        match addr::parse_network(ip) {
            Some(n) if n.prefix_len() == 0 && n.addr().is_ipv4() => {
                out.extend(["0.0.0.0/1".into(), "128.0.0.0/1".into()])
            }
            Some(n) if n.prefix_len() == 0 => out.extend(["::/1".into(), "8000::/1".into()]),
            Some(n) => out.push(addr::net_to_string(n)),
            None => out.push(ip.clone()),
        }
    }
    out
}

/// `_build_ipv4v6_mac_ip_list` over the pairs then the fixed IPs: (upper-case MAC, CIDR text),
/// MAC-only for a port without fixed IPs.
fn spoof_pairs(port: &PortDict, e: Ethertype) -> Vec<(String, Option<String>)> {
    let mut list: Vec<(String, Option<String>)> = Vec::new();
    let mut add = |mac: String, ip: &str| {
        if ethertype_of(ip) != Some(e) {
            return;
        }
        list.push((mac.clone(), Some(ip.to_string())));
        if e == Ethertype::IPv6 {
            let m = crate::model::MacAddr::parse(&mac).unwrap_or_default();
            let lla = addr::inet_ntop6(m.link_local());
            if !list
                .iter()
                .any(|(pm, pip)| *pm == mac && pip.as_deref() == Some(lla.as_str()))
            {
                list.push((mac, Some(lla)));
            }
        }
    };
    for a in &port.port.allowed_address_pairs {
        add(a.mac.to_upper(), &a.ip_address);
    }
    for ip in &port.fixed_ips {
        add(port.port.mac.to_upper(), ip);
    }
    if port.fixed_ips.is_empty() {
        list.push((port.port.mac.to_upper(), None));
    }
    list.into_iter()
        .map(|(m, ip)| (m, ip.map(|i| ip_to_cidr(&i))))
        .collect()
}

/// The filtered devices in the order the driver sets them up (`sorted(filtered_ports)`).
fn filtered_sorted<'a, 'm>(view: &'a ServerView<'m>) -> Vec<&'a PortDict<'m>> {
    let mut filtered: Vec<&PortDict> = view
        .devices
        .iter()
        .filter(|p| p.port.port_security_enabled)
        .collect();
    filtered.sort_by(|a, b| a.device.cmp(&b.device));
    filtered
}

/// The conntrack zone of each filtered port, by port id, as `IpConntrackManager` hands them
/// out on a fresh host: keyed by network (Linux bridge) or device (hybrid), first 11
/// characters; a new key gets one above the highest zone in use (`_find_open_zone`), from 4097.
pub(crate) fn zones(view: &ServerView, opts: &RenderOptions) -> BTreeMap<String, u32> {
    let mut by_key: HashMap<String, u32> = HashMap::new();
    let mut out = BTreeMap::new();
    for port in filtered_sorted(view) {
        let key_src = match opts.agent {
            Agent::LinuxBridge => &port.port.network_id,
            Agent::OvsHybrid => &port.device,
        };
        let key = first_chars(key_src, 11).to_string();
        let next = by_key
            .values()
            .max()
            .map_or(ZONE_START, |m| (m + 1).max(ZONE_START));
        let zone = *by_key.entry(key).or_insert(next);
        out.insert(port.port.id.clone(), zone);
    }
    out
}

/// The whole driver run; see the module docs.
pub(crate) fn run(
    view: &ServerView,
    opts: &RenderOptions,
) -> ([Vec<Table>; 2], Vec<IpSet>, BTreeMap<String, u32>) {
    let wrap = opts.agent.wrap();
    let mk = || {
        [
            TableBuilder::new("filter", wrap),
            TableBuilder::new("raw", wrap),
            TableBuilder::new("nat", wrap),
        ]
    };
    let mut d = Driver {
        opts,
        view,
        protocols: protocols::host_map(),
        tables: [mk(), mk()],
        ipsets: BTreeMap::new(),
        port_zones: zones(view, opts),
    };
    // `prepare_devices_filter` returns at once when there is no local device: nothing is
    // applied, not even the skeleton.
    let any_local = !view.devices.is_empty() || !view.trusted.is_empty();
    if any_local {
        d.init();
        if opts.ipset {
            d.ipset_members();
        }
        d.trusted_ports();
        d.setup_chains();
    }
    // Tables Neutron never wrote to come out as their builtin chains only.
    let Driver {
        tables: [v4, v6],
        ipsets,
        port_zones,
        ..
    } = d;
    let finish = |ts: [TableBuilder; 3]| ts.into_iter().map(TableBuilder::finish).collect();
    (
        [finish(v4), finish(v6)],
        ipsets.into_values().collect(),
        port_zones,
    )
}
