//! The Neutron model: security groups, address groups and ports as Neutron's database holds
//! them after API normalisation, plus what Neutron's server derives for its agents (flattened
//! fixed IPs, filled allowed-address-pair MACs, tap names, remote-group members).
//!
//! Both back ends read this: the eBPF compiler ([`crate::compile`]) and the iptables parity
//! renderer. The renderer reproduces Neutron's text, so every string Neutron would print is
//! kept in the form Neutron stores it (`remote_ip_prefix` with host bits, protocol names or
//! numbers as stored, addresses as typed), next to a parsed value for matching.

pub mod addr;
mod error;
mod export;
mod input;
pub mod protocol;
pub mod rpc;
mod validate;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::Path;

use ipnet::IpNet;

pub use addr::MacAddr;
pub use error::{ValidationError, ValidationErrors};
pub use export::{shrink_candidates, to_json};

/// Loads a JSON file, or the union of a directory's `*.json` files taken in name order, and
/// validates it with Neutron's API semantics. Every problem is reported at once.
pub fn load(path: impl AsRef<Path>) -> Result<Model, ValidationErrors> {
    let mut errs = ValidationErrors::default();
    let docs = input::read_path(path.as_ref(), &mut errs);
    validate::build(docs, errs)
}

/// Like [`load`], with more documents after the file's (the agent's pushed state); without a
/// path, only those.
pub fn load_with(
    path: Option<&Path>,
    extra: Vec<(String, serde_json::Value)>,
) -> Result<Model, ValidationErrors> {
    let mut errs = ValidationErrors::default();
    let mut docs = match path {
        Some(p) => input::read_path(p, &mut errs),
        None => Vec::new(),
    };
    docs.extend(extra);
    validate::build(docs, errs)
}

/// Same as [`load`] for a document held in memory (`origin` names it in messages).
pub fn from_json_str(origin: &str, text: &str) -> Result<Model, ValidationErrors> {
    let mut errs = ValidationErrors::default();
    match serde_json::from_str(text) {
        Ok(v) => validate::build(vec![(origin.to_string(), v)], errs),
        Err(e) => {
            errs.push("document", origin, "", "", format!("not valid JSON: {e}"));
            Err(errs)
        }
    }
}

/// Same as [`load`] for documents already parsed, in the order given.
pub fn from_values(docs: Vec<(String, serde_json::Value)>) -> Result<Model, ValidationErrors> {
    validate::build(docs, ValidationErrors::default())
}

/// The host name `sg` filters for when `--host` is not given, as Neutron's agents default
/// `host` to `socket.gethostname()`.
pub fn default_host() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// Towards the VM.
    Ingress,
    /// From the VM.
    Egress,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }

    /// The `DIR_*` value of sg-common keys.
    pub fn key(self) -> u8 {
        match self {
            Direction::Ingress => sg_common::DIR_INGRESS,
            Direction::Egress => sg_common::DIR_EGRESS,
        }
    }
}

/// A rule's ethertype, which is also the address family everywhere else.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Ethertype {
    IPv4,
    IPv6,
}

impl Ethertype {
    pub const ALL: [Ethertype; 2] = [Ethertype::IPv4, Ethertype::IPv6];

    pub fn as_str(self) -> &'static str {
        match self {
            Ethertype::IPv4 => "IPv4",
            Ethertype::IPv6 => "IPv6",
        }
    }

    /// The `FAMILY_*` value of sg-common keys.
    pub fn family(self) -> u8 {
        match self {
            Ethertype::IPv4 => sg_common::FAMILY_V4,
            Ethertype::IPv6 => sg_common::FAMILY_V6,
        }
    }

    pub fn of_ip(ip: IpAddr) -> Ethertype {
        if ip.is_ipv4() {
            Ethertype::IPv4
        } else {
            Ethertype::IPv6
        }
    }

    pub fn of_net(net: IpNet) -> Ethertype {
        Ethertype::of_ip(net.addr())
    }

    /// Address width in bits.
    pub fn bits(self) -> u8 {
        match self {
            Ethertype::IPv4 => 32,
            Ethertype::IPv6 => 128,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecurityGroup {
    pub id: String,
    pub name: String,
    pub stateful: bool,
    /// From an agent RPC-shaped document ([`rpc`]).
    pub rpc: bool,
    /// In the order given, which is the order of the port's iptables chain.
    pub rules: Vec<Rule>,
}

/// Which remote addresses a rule admits. At most one kind per rule (the API forbids more).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Remote {
    /// No remote: any address of the rule's family.
    Any,
    /// `remote_ip_prefix`; `net` keeps host bits as stored, match on `net.trunc()`.
    Prefix(IpNet),
    /// `remote_group_id`: the members of that security group.
    Group(String),
    /// `remote_address_group_id`: the addresses of that group.
    AddressGroup(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub id: String,
    pub security_group_id: String,
    pub direction: Direction,
    pub ethertype: Ethertype,
    /// As Neutron stores it: a lower-case name or a decimal string; None for any. IPv6 rules
    /// have `icmp`/`icmpv6` as `ipv6-icmp` and `"1"` as `"58"`.
    pub protocol: Option<String>,
    /// The IP protocol number the rule matches; None for any, which includes protocol 0
    /// (`"0"`, `ip`, `hopopt`: iptables reads protocol 0 as "all").
    pub proto_num: Option<u8>,
    /// None/None for "all ports" (the API stores 1-65535 that way). For ICMP: type, code.
    pub port_range_min: Option<u16>,
    pub port_range_max: Option<u16>,
    /// Source ports (TCP, UDP, UDP-Lite, SCTP, DCCP). Only agent rule dicts carry them (the
    /// REST API has no such field; Neutron's drivers honour it). None/None for any.
    pub source_port_range_min: Option<u16>,
    pub source_port_range_max: Option<u16>,
    /// `str(IPNetwork(input))`: host bits kept, `/32` or `/128` added to a bare address.
    pub remote_ip_prefix: Option<String>,
    /// `str(IPNetwork(remote_ip_prefix).cidr)`: the network form the OVO path sends.
    pub normalized_cidr: Option<String>,
    pub remote_group_id: Option<String>,
    pub remote_address_group_id: Option<String>,
    pub remote: Remote,
    /// The `stateful` flag of the rule's security group.
    pub stateful: bool,
    /// An agent rule dict ([`rpc`]): its id is its content, and the prefix string is rendered
    /// as given.
    pub rpc: bool,
}

impl Rule {
    /// One line for people: `ingress IPv4 tcp 80-443 from 0.0.0.0/0`.
    pub fn describe(&self) -> String {
        let mut s = format!("{} {} ", self.direction.as_str(), self.ethertype.as_str());
        match (&self.protocol, self.proto_num) {
            (None, _) | (_, None) => s.push_str("any"),
            (Some(p), Some(n)) => {
                s.push_str(p);
                if protocol::is_icmp_protocol(n) {
                    if let Some(t) = self.port_range_min {
                        s.push_str(&format!(" type {t}"));
                        if let Some(c) = self.port_range_max {
                            s.push_str(&format!(" code {c}"));
                        }
                    }
                } else {
                    if let (Some(lo), Some(hi)) = (self.source_port_range_min, self.source_port_range_max) {
                        s.push_str(&format!(" sport {}", port_range_text(lo, hi)));
                    }
                    if let (Some(lo), Some(hi)) = (self.port_range_min, self.port_range_max) {
                        s.push_str(&format!(" {}", port_range_text(lo, hi)));
                    }
                }
            }
        }
        s.push_str(match self.direction {
            Direction::Ingress => " from ",
            Direction::Egress => " to ",
        });
        match &self.remote {
            Remote::Any => s.push_str("any"),
            Remote::Prefix(_) => s.push_str(self.remote_ip_prefix.as_deref().unwrap_or("?")),
            Remote::Group(g) => s.push_str(&format!("group {g}")),
            Remote::AddressGroup(g) => s.push_str(&format!("address-group {g}")),
        }
        s
    }
}

fn port_range_text(lo: u16, hi: u16) -> String {
    if lo == hi {
        lo.to_string()
    } else {
        format!("{lo}-{hi}")
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressGroup {
    pub id: String,
    pub name: String,
    /// Neutron stores `f"{network}/{prefixlen}"` of each address, deduplicated.
    pub addresses: Vec<String>,
    /// The same, parsed.
    pub nets: Vec<IpNet>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FixedIp {
    /// As given (Neutron's server flattens fixed IPs to these strings).
    pub ip_address: String,
    pub ip: IpAddr,
    pub subnet_id: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressPair {
    /// As typed: a bare address or a CIDR, host bits kept (Neutron keeps it verbatim).
    pub ip_address: String,
    /// Parsed; a bare address is a /32 or /128. Match on `net.trunc()`.
    pub net: IpNet,
    /// Filled with the port's MAC when the input has none, as the API does.
    pub mac_address: String,
    pub mac: MacAddr,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    pub id: String,
    pub name: String,
    /// As given.
    pub mac_address: String,
    pub mac: MacAddr,
    pub fixed_ips: Vec<FixedIp>,
    pub allowed_address_pairs: Vec<AddressPair>,
    /// In the order given, which Neutron treats as the chain order.
    pub security_groups: Vec<String>,
    pub port_security_enabled: bool,
    pub network_id: String,
    pub device_owner: String,
    /// `binding:host_id`; None when missing or empty (such ports count as local).
    pub binding_host_id: Option<String>,
    /// The tap: `device` if given, else `"tap" + id[:11]`.
    pub device: String,
    /// From an agent RPC-shaped document ([`rpc`]): the device name Neutron's agent uses for
    /// it (the tap, or the port id with hybrid plugging). A group such a port names without
    /// rules has none.
    pub rpc_device: Option<String>,
}

/// One entry of a port's IP/MAC pair list (spec §6), in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpoofPair {
    pub mac: MacAddr,
    /// The address text Neutron renders (through `ip_to_cidr`): an AAP as typed, a fixed IP,
    /// or the EUI-64 link-local. None for the MAC-only pair of a port without fixed IPs.
    pub ip: Option<String>,
    /// Parsed `ip`, host bits kept.
    pub net: Option<IpNet>,
}

impl Port {
    /// `fixed_ips` flattened to strings, as Neutron's server sends them to agents.
    pub fn fixed_ip_strings(&self) -> Vec<&str> {
        self.fixed_ips.iter().map(|f| f.ip_address.as_str()).collect()
    }

    /// A `network:*` port (DHCP, router interface): Neutron trusts it and never filters it.
    pub fn is_trusted(&self) -> bool {
        self.device_owner.starts_with("network:")
    }

    /// Port security on and not trusted: sg filters this port.
    pub fn is_filtered(&self) -> bool {
        self.port_security_enabled && !self.is_trusted()
    }

    /// Bound to `host`, or not bound at all.
    pub fn is_local(&self, host: &str) -> bool {
        self.binding_host_id.as_deref().is_none_or(|h| h == host)
    }

    pub fn has_fixed_ip(&self, ethertype: Ethertype) -> bool {
        self.fixed_ips.iter().any(|f| Ethertype::of_ip(f.ip) == ethertype)
    }

    /// Neutron's IP/MAC pair list of one family (`_spoofing_rule`): allowed address pairs,
    /// then fixed IPs with the port MAC; an IPv6 address adds the link-local of its MAC
    /// unless that exact pair is already listed; a port without fixed IPs gets one MAC-only
    /// pair in both families.
    pub fn spoof_pairs(&self, ethertype: Ethertype) -> Vec<SpoofPair> {
        let mut pairs: Vec<SpoofPair> = Vec::new();
        let add = |mac: MacAddr, text: &str, net: IpNet, pairs: &mut Vec<SpoofPair>| {
            if Ethertype::of_net(net) != ethertype {
                return;
            }
            pairs.push(SpoofPair {
                mac,
                ip: Some(text.to_string()),
                net: Some(net),
            });
            if ethertype == Ethertype::IPv6 {
                let lla = mac.link_local();
                let lla_text = addr::inet_ntop6(lla);
                if !pairs
                    .iter()
                    .any(|p| p.mac == mac && p.ip.as_deref() == Some(lla_text.as_str()))
                {
                    let net = IpNet::new(IpAddr::V6(lla), 128).expect("/128 is valid");
                    pairs.push(SpoofPair {
                        mac,
                        ip: Some(lla_text),
                        net: Some(net),
                    });
                }
            }
        };
        for p in &self.allowed_address_pairs {
            add(p.mac, &p.ip_address, p.net, &mut pairs);
        }
        for f in &self.fixed_ips {
            let net = IpNet::from(f.ip);
            add(self.mac, &f.ip_address, net, &mut pairs);
        }
        if self.fixed_ips.is_empty() {
            pairs.push(SpoofPair {
                mac: self.mac,
                ip: None,
                net: None,
            });
        }
        pairs
    }
}

/// One address of a remote group, as Neutron's server lists it (spec §1.3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// As Neutron delivers it: a fixed IP, an allowed-address-pair address as typed (may be
    /// a CIDR, `0.0.0.0/0` included), or an address group's stored CIDR.
    pub ip: String,
    /// Parsed `ip`; match on `net.trunc()` (what ipset's hash:net stores).
    pub net: IpNet,
    /// None for fixed IPs and address-group addresses (the server's DB path), the pair's MAC
    /// for allowed address pairs.
    pub mac: Option<MacAddr>,
}

/// A validated input. Construct with [`load`], [`from_json_str`] or [`from_values`].
#[derive(Clone, Debug)]
pub struct Model {
    /// In input order (files by name, then document order).
    pub security_groups: Vec<SecurityGroup>,
    pub address_groups: Vec<AddressGroup>,
    pub ports: Vec<Port>,
    sg_index: HashMap<String, usize>,
    ag_index: HashMap<String, usize>,
    port_index: HashMap<String, usize>,
    members: BTreeMap<(Remote, Ethertype), Vec<Member>>,
    /// The member lists an RPC-shaped document gave (`sg_member_ips`), by remote id, as given.
    rpc_members: BTreeMap<String, BTreeMap<Ethertype, Vec<Member>>>,
}

impl Model {
    pub fn security_group(&self, id: &str) -> Option<&SecurityGroup> {
        self.sg_index.get(id).map(|&i| &self.security_groups[i])
    }

    pub fn address_group(&self, id: &str) -> Option<&AddressGroup> {
        self.ag_index.get(id).map(|&i| &self.address_groups[i])
    }

    pub fn port(&self, id: &str) -> Option<&Port> {
        self.port_index.get(id).map(|&i| &self.ports[i])
    }

    /// One line for `sg validate`: what the input holds.
    pub fn summary(&self) -> String {
        let rules: usize = self.security_groups.iter().map(|s| s.rules.len()).sum();
        format!(
            "{} security groups ({} rules), {} address groups, {} ports",
            self.security_groups.len(),
            rules,
            self.address_groups.len(),
            self.ports.len()
        )
    }

    /// Members of a remote group or address group for one ethertype, for every pair that a
    /// rule references (an empty list means an empty ipset: the rule matches nothing). None
    /// for other remotes and for pairs no rule references.
    ///
    /// Neutron's server collects members into a set, so its order is arbitrary. Ours: member
    /// ports by port id, each port's fixed IPs then its allowed address pairs, duplicates of
    /// the same (ip, mac) dropped; address groups in stored order. As on the server, a port
    /// without fixed IPs contributes nothing (its pairs included), because the query joins
    /// the port's IP allocations.
    pub fn members(&self, remote: &Remote, ethertype: Ethertype) -> Option<&[Member]> {
        self.members.get(&(remote.clone(), ethertype)).map(Vec::as_slice)
    }

    /// The member list an RPC-shaped document gave for a remote group or address group id, as
    /// given; None when it gave none.
    pub fn rpc_members(&self, id: &str, ethertype: Ethertype) -> Option<&[Member]> {
        self.rpc_members
            .get(id)
            .map(|m| m.get(&ethertype).map(Vec::as_slice).unwrap_or(&[]))
    }

    /// Every member list an RPC-shaped document gave, by remote id.
    pub fn rpc_member_lists(&self) -> impl Iterator<Item = (&String, &BTreeMap<Ethertype, Vec<Member>>)> {
        self.rpc_members.iter()
    }

    /// Every (remote, ethertype) member list, in a stable order.
    pub fn member_lists(&self) -> impl Iterator<Item = (&Remote, Ethertype, &[Member])> {
        self.members.iter().map(|((r, e), m)| (r, *e, m.as_slice()))
    }

    /// Ports this host filters or passes: bound to `host` or unbound, sorted by tap name
    /// (Neutron's iptables driver processes ports in that order).
    pub fn local_ports(&self, host: &str) -> Vec<&Port> {
        let mut ports: Vec<&Port> = self.ports.iter().filter(|p| p.is_local(host)).collect();
        ports.sort_by(|a, b| a.device.cmp(&b.device));
        ports
    }

    /// The security-group rules of a port in iptables chain order (the port's groups in
    /// order, each group's rules in order), with their group.
    pub fn port_rules<'a>(
        &'a self,
        port: &'a Port,
    ) -> impl Iterator<Item = (&'a SecurityGroup, &'a Rule)> + 'a {
        self.groups_rules(&port.security_groups)
    }

    /// The rules of an ordered list of groups, in chain order.
    pub fn groups_rules<'a>(
        &'a self,
        sg_ids: &'a [String],
    ) -> impl Iterator<Item = (&'a SecurityGroup, &'a Rule)> + 'a {
        sg_ids
            .iter()
            .filter_map(|id| self.security_group(id))
            .flat_map(|sg| sg.rules.iter().map(move |r| (sg, r)))
    }

    /// Whether Neutron's iptables driver treats the port as stateful (spec §8.2): decided by
    /// the first rule of the port's first group; a first group without rules, and
    /// `network:`/`neutron:` ports, count as stateful. Since the API refuses to mix stateful
    /// and stateless groups on a port, this differs from "the groups' flag" only when the
    /// first group is stateless and empty, and then iptables keeps conntrack on.
    pub fn port_stateful(&self, port: &Port) -> bool {
        if port.device_owner.starts_with("network:") || port.device_owner.starts_with("neutron:") {
            return true;
        }
        match port
            .security_groups
            .first()
            .and_then(|id| self.security_group(id))
        {
            Some(sg) => sg.rules.first().is_none_or(|r| r.stateful),
            None => true,
        }
    }
}

#[cfg(test)]
mod tests;
