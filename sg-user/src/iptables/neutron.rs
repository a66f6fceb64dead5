//! Step 1 of the renderer: the model as Neutron's server hands it to the agent's firewall
//! driver (`security_group_info_for_devices`, spec §1): port dicts with their provider rules,
//! the reduced rule dicts of each security group, and the member lists of remote groups.
//!
//! Two server paths exist and differ in details the output shows (oracle finding 5):
//! - Linux bridge: the ML2 server's DB queries. Rule prefixes are the stored strings (host
//!   bits kept); members are `(fixed IP, None)` and `(pair IP, pair MAC)` of member ports
//!   *with* fixed IPs (the query inner-joins IP allocations).
//! - OVS hybrid: the agent's resource cache. Prefixes are `normalized_cidr`; members are
//!   `(fixed IP, port MAC)` and `(pair IP, pair MAC)` of every member port.
//!
//! An input in the agent's RPC shape (`model::rpc`) already is this view: its rule dicts keep
//! their prefix strings and source ports, and its member lists are used as given, every list
//! the document holds (Neutron's driver creates a set for each list it is handed).
//!
//! Unlike Neutron's agent, which asks for 20 devices per RPC and merges the answers with
//! `dict.update` (losing member lists, oracle finding 1, tests/DIFFERENCES.md D1), this builds
//! one answer for all local devices: what the driver installs when it gets the complete lists.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::model::{Direction, Ethertype, Model, Port, Remote, addr};

use super::{Agent, RenderOptions};

/// A rule dict as the driver receives it (spec §1.2): the API rule reduced to the keys the
/// server copies, with the remote prefix moved to `source_ip_prefix` / `dest_ip_prefix`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RuleDict {
    pub direction: Direction,
    pub ethertype: Ethertype,
    /// As stored (name or decimal string); None = any.
    pub protocol: Option<String>,
    pub port_range_min: Option<u16>,
    pub port_range_max: Option<u16>,
    /// Only provider rules carry a source port (the RA rule carries the ICMPv6 type here).
    pub source_port_range_min: Option<u16>,
    pub source_port_range_max: Option<u16>,
    pub source_ip_prefix: Option<String>,
    pub dest_ip_prefix: Option<String>,
    pub remote_group_id: Option<String>,
    pub remote_address_group_id: Option<String>,
    /// The group's flag; provider rules have none (None counts as stateful).
    pub stateful: Option<bool>,
}

impl RuleDict {
    fn provider(ethertype: Ethertype, protocol: &str) -> RuleDict {
        RuleDict {
            direction: Direction::Ingress,
            ethertype,
            protocol: Some(protocol.to_string()),
            port_range_min: None,
            port_range_max: None,
            source_port_range_min: None,
            source_port_range_max: None,
            source_ip_prefix: None,
            dest_ip_prefix: None,
            remote_group_id: None,
            remote_address_group_id: None,
            stateful: None,
        }
    }

    /// `_get_any_remote_group_id_in_rule`: the remote group, else the address group.
    pub fn remote_id(&self) -> Option<&str> {
        self.remote_group_id
            .as_deref()
            .or(self.remote_address_group_id.as_deref())
    }
}

/// One member of a remote group as delivered: `(ip, mac)`. `ip` is the string Neutron holds (a
/// fixed IP, a pair's address as typed, an address group's CIDR).
pub(crate) type MemberIp = (String, Option<String>);

/// A port dict (spec §1.1) for one device the driver filters or passes.
#[derive(Clone, Debug)]
pub(crate) struct PortDict<'a> {
    pub port: &'a Port,
    /// LB: the tap name; hybrid: the port UUID (what the OVS agent calls the device).
    pub device: String,
    /// Flattened fixed IPs, as the DB stores them (`str(netaddr.IPAddress)`).
    pub fixed_ips: Vec<String>,
    /// The server's provider rules (RA, DHCP replies), spec §5.6.
    pub provider_rules: Vec<RuleDict>,
}

/// What the agent holds after `security_group_info_for_devices`.
pub(crate) struct ServerView<'a> {
    /// Local ports the server returned (everything but trusted `network:*` ports), in the
    /// order the agent asked for them (input order).
    pub devices: Vec<PortDict<'a>>,
    /// Local trusted ports' device ids, in input order (`_get_trusted_devices`).
    pub trusted: Vec<String>,
    /// Rule dicts per security group of the devices, deduplicated as the server does.
    pub sg_rules: HashMap<String, Vec<RuleDict>>,
    /// remote id → ethertype → members, for every (remote, ethertype) a device's rule
    /// references. Members are sorted by (ip, mac) strings, the order the oracle fixes for
    /// what Neutron leaves to set iteration (tests/oracle/README.md).
    pub members: BTreeMap<String, BTreeMap<Ethertype, Vec<MemberIp>>>,
}

/// `str(netaddr.IPNetwork(ip).version)` of a member or prefix string.
pub(crate) fn ethertype_of(ip: &str) -> Option<Ethertype> {
    addr::parse_network(ip).map(Ethertype::of_net)
}

pub(crate) fn server_view<'a>(model: &'a Model, opts: &RenderOptions) -> ServerView<'a> {
    let local: Vec<&Port> = model.ports.iter().filter(|p| p.is_local(&opts.host)).collect();
    let mut devices = Vec::new();
    let mut trusted = Vec::new();
    for port in local {
        let device = match (&port.rpc_device, opts.agent) {
            (Some(d), _) => d.clone(),
            (None, Agent::LinuxBridge) => port.device.clone(),
            (None, Agent::OvsHybrid) => port.id.clone(),
        };
        if port.is_trusted() {
            trusted.push(device);
            continue;
        }
        let fixed_ips: Vec<String> = port.fixed_ips.iter().map(|f| addr::ip_to_string(f.ip)).collect();
        let provider_rules = provider_rules(&fixed_ips);
        devices.push(PortDict {
            port,
            device,
            fixed_ips,
            provider_rules,
        });
    }

    // `_select_rules_for_ports`: the devices' groups, each group's rules in order.
    let mut sg_rules: HashMap<String, Vec<RuleDict>> = HashMap::new();
    let mut wanted: HashSet<(String, Ethertype)> = HashSet::new();
    let mut ag_refs: HashSet<String> = HashSet::new();
    for d in &devices {
        for sg_id in &d.port.security_groups {
            if sg_rules.contains_key(sg_id) {
                continue;
            }
            let Some(sg) = model.security_group(sg_id) else {
                continue;
            };
            let mut rules: Vec<RuleDict> = Vec::new();
            for r in &sg.rules {
                let prefix = match opts.agent {
                    _ if r.rpc => r.remote_ip_prefix.clone(),
                    Agent::LinuxBridge => r.remote_ip_prefix.clone(),
                    Agent::OvsHybrid => r.normalized_cidr.clone().or(r.remote_ip_prefix.clone()),
                };
                let (source_ip_prefix, dest_ip_prefix) = match r.direction {
                    Direction::Ingress => (prefix, None),
                    Direction::Egress => (None, prefix),
                };
                let dict = RuleDict {
                    direction: r.direction,
                    ethertype: r.ethertype,
                    protocol: r.protocol.clone(),
                    port_range_min: r.port_range_min,
                    port_range_max: r.port_range_max,
                    source_port_range_min: r.source_port_range_min,
                    source_port_range_max: r.source_port_range_max,
                    source_ip_prefix,
                    dest_ip_prefix,
                    remote_group_id: r.remote_group_id.clone(),
                    remote_address_group_id: r.remote_address_group_id.clone(),
                    stateful: Some(if r.rpc { r.stateful } else { sg.stateful }),
                };
                // An agent rule's members are the lists the document gave (below).
                if let Some(id) = dict.remote_id()
                    && !r.rpc
                {
                    wanted.insert((id.to_string(), r.ethertype));
                }
                if let Some(id) = &dict.remote_address_group_id {
                    ag_refs.insert(id.clone());
                }
                // `if rule_dict not in sg_info['security_groups'][sg_id]`
                if !rules.contains(&dict) {
                    rules.push(dict);
                }
            }
            sg_rules.insert(sg_id.clone(), rules);
        }
    }

    let mut members: BTreeMap<String, BTreeMap<Ethertype, Vec<MemberIp>>> = BTreeMap::new();
    for (id, lists) in model.rpc_member_lists() {
        for (ethertype, list) in lists {
            let list = list
                .iter()
                .map(|m| (m.ip.clone(), m.mac.map(|x| x.to_string())))
                .collect();
            members.entry(id.clone()).or_default().insert(*ethertype, list);
        }
    }
    for (id, ethertype) in wanted {
        // Remote group ids and address group ids share one namespace in the driver. Should
        // an id be both, the server's `sg_member_ips.update(address_group_info)` lets the
        // address group win.
        let remote = if ag_refs.contains(&id) {
            Remote::AddressGroup(id.clone())
        } else {
            Remote::Group(id.clone())
        };
        let list = member_ips(model, &remote, ethertype, opts.agent);
        members.entry(id).or_default().insert(ethertype, list);
    }

    ServerView {
        devices,
        trusted,
        sg_rules,
        members,
    }
}

/// `_apply_provider_rule`: the RA rule (ports with IPv6), DHCP replies to each IPv4 address and
/// broadcast, DHCPv6 replies to each IPv6 address and fe80::/64.
fn provider_rules(fixed_ips: &[String]) -> Vec<RuleDict> {
    let mut out = Vec::new();
    let of = |e: Ethertype| fixed_ips.iter().filter(move |ip| ethertype_of(ip) == Some(e));
    if of(Ethertype::IPv6).next().is_some() {
        let mut ra = RuleDict::provider(Ethertype::IPv6, "ipv6-icmp");
        ra.source_port_range_min = Some(134);
        out.push(ra);
    }
    for (e, len, extra, sport, dport) in [
        (Ethertype::IPv4, 32, "255.255.255.255/32", 67, 68),
        (Ethertype::IPv6, 128, "fe80::/64", 547, 546),
    ] {
        let dests = of(e).map(|ip| format!("{ip}/{len}")).chain([extra.to_string()]);
        for dest in dests {
            let mut r = RuleDict::provider(e, "udp");
            r.port_range_min = Some(dport);
            r.port_range_max = Some(dport);
            r.source_port_range_min = Some(sport);
            r.source_port_range_max = Some(sport);
            r.dest_ip_prefix = Some(dest);
            out.push(r);
        }
    }
    out
}

/// The member list of one (remote, ethertype), per server path (module docs).
fn member_ips(model: &Model, remote: &Remote, ethertype: Ethertype, agent: Agent) -> Vec<MemberIp> {
    let mut set: HashSet<MemberIp> = HashSet::new();
    match remote {
        Remote::Group(g) => {
            for p in model.ports.iter().filter(|p| p.security_groups.contains(g)) {
                if agent == Agent::LinuxBridge && p.fixed_ips.is_empty() {
                    continue;
                }
                let port_mac = match agent {
                    Agent::LinuxBridge => None,
                    Agent::OvsHybrid => Some(p.mac.to_string()),
                };
                for f in &p.fixed_ips {
                    set.insert((addr::ip_to_string(f.ip), port_mac.clone()));
                }
                for a in &p.allowed_address_pairs {
                    // The API fills a missing pair MAC with the port's, sanitized.
                    let mac = if a.mac_address == p.mac_address {
                        p.mac.to_string()
                    } else {
                        a.mac_address.clone()
                    };
                    set.insert((a.ip_address.clone(), Some(mac)));
                }
            }
        }
        Remote::AddressGroup(a) => {
            if let Some(ag) = model.address_group(a) {
                set.extend(ag.addresses.iter().map(|s| (s.clone(), None)));
            }
        }
        Remote::Any | Remote::Prefix(_) => {}
    }
    let mut list: Vec<MemberIp> = set
        .into_iter()
        .filter(|(ip, _)| ethertype_of(ip) == Some(ethertype))
        .collect();
    list.sort_by_cached_key(member_order);
    list
}

/// The order in which the members of one (remote, ethertype) become rules without ipset: by
/// the value of the prefix each one expands to, then its length, then the text and MAC for a
/// total order. Neutron hands the driver a Python set, whose iteration order changes with the
/// process's hash seed (tests/oracle/README.md, finding 8), so no order is Neutron's own;
/// address order is the one an operator reads and the oracle uses. Text order would put
/// 2001:db8::68b before 2001:db8::99, and 10.0.0.10 before 10.0.0.9.
fn member_order(m: &MemberIp) -> ([u8; 16], u8, String, String) {
    let (key, len) = addr::parse_network(&m.0).map_or(([0xff; 16], 0xff), addr::net_key);
    (key, len, m.0.clone(), m.1.clone().unwrap_or_default())
}
