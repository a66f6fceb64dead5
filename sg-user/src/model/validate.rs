//! From JSON objects to a validated [`Model`], with the API's conversions and checks
//! (`neutron/extensions/securitygroup.py`, `neutron/db/securitygroups_db.py`,
//! `neutron_lib/api/validators`). Every check records its error and goes on, so that one run
//! reports everything; an object with a broken field is kept only for the cross-checks that
//! do not depend on that field.

use std::collections::{BTreeMap, HashMap, HashSet};

use ipnet::IpNet;
use serde_json::{Map, Value};

use super::addr::{self, MacAddr};
use super::error::{ValidationErrors, show};
use super::input::{self, Kind, RawObject};
use super::protocol;
use super::{
    AddressGroup, AddressPair, Direction, Ethertype, FixedIp, LogEvent, Member, Model, NetworkLog, Port,
    Remote, Rule, SecurityGroup,
};

/// Reads one object's fields, recording errors against the object.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    object: &'static str,
    id: String,
    errs: &'a mut ValidationErrors,
    ok: bool,
}

impl<'a> Fields<'a> {
    fn new(
        map: &'a Map<String, Value>,
        object: &'static str,
        origin: &str,
        errs: &'a mut ValidationErrors,
    ) -> Fields<'a> {
        // Without a usable id the object is named by where it was found.
        let placeholder = format!("<{origin}>");
        let mut f = Fields {
            map,
            object,
            id: placeholder,
            errs,
            ok: true,
        };
        if let Some(id) = f.req_str("id") {
            f.id = id;
        }
        f
    }

    fn err(&mut self, field: &str, value: &Value, reason: impl Into<String>) {
        self.errs.push(self.object, &self.id, field, show(value), reason);
        self.ok = false;
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// A string field; missing and null give None.
    fn opt_str(&mut self, key: &str) -> Option<String> {
        match self.get(key) {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(v) => {
                self.err(key, v, "expected a string");
                None
            }
        }
    }

    fn req_str(&mut self, key: &str) -> Option<String> {
        match self.opt_str(key) {
            Some(s) if !s.is_empty() => Some(s),
            Some(_) => {
                self.err(key, &Value::String(String::new()), "must not be empty");
                None
            }
            None if self.map.get(key).is_some_and(|v| !v.is_null()) => None,
            None => {
                let v = self.map.get(key).cloned().unwrap_or(Value::Null);
                self.err(key, &v, "missing required field");
                None
            }
        }
    }

    fn opt_bool(&mut self, key: &str, default: bool) -> bool {
        match self.get(key) {
            None => default,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                self.err(key, v, "expected true or false");
                default
            }
        }
    }

    fn opt_list(&mut self, key: &str) -> Vec<&'a Value> {
        match self.get(key) {
            None => Vec::new(),
            Some(Value::Array(items)) => items.iter().collect(),
            Some(v) => {
                self.err(key, v, "expected a list");
                Vec::new()
            }
        }
    }
}

/// Objects as parsed, with whether they parsed cleanly.
struct Parsed {
    /// With whether each rule parsed cleanly (in rule order).
    sgs: Vec<(String, SecurityGroup, Vec<bool>)>,
    /// Groups that came in an RPC-shaped document: their rule ids are the rules' contents
    /// (model::rpc::rule_id), unique within the group only.
    rpc_sgs: HashSet<String>,
    ags: Vec<(String, AddressGroup)>,
    ports: Vec<(String, Port)>,
    /// With whether it came in an RPC-shaped document (pushed by the Neutron driver).
    logs: Vec<(String, NetworkLog, bool)>,
    /// Explicit member lists of an RPC-shaped document, by remote id.
    members: Vec<(String, String, BTreeMap<Ethertype, Vec<Member>>)>,
}

pub(crate) fn build(
    docs: Vec<(String, Value)>,
    mut errs: ValidationErrors,
) -> Result<Model, ValidationErrors> {
    let mut raws: Vec<RawObject> = Vec::new();
    for (origin, doc) in docs {
        input::objects(&origin, doc, &mut raws, &mut errs);
    }
    let mut parsed = Parsed {
        sgs: Vec::new(),
        rpc_sgs: HashSet::new(),
        ags: Vec::new(),
        ports: Vec::new(),
        logs: Vec::new(),
        members: Vec::new(),
    };
    for raw in &raws {
        match raw.kind {
            Kind::SecurityGroup => {
                let (sg, oks) = security_group(raw, &mut errs);
                if raw.rpc {
                    parsed.rpc_sgs.insert(sg.id.clone());
                }
                parsed.sgs.push((raw.origin.clone(), sg, oks));
            }
            Kind::AddressGroup => {
                parsed
                    .ags
                    .push((raw.origin.clone(), address_group(raw, &mut errs)));
            }
            Kind::Port => {
                parsed.ports.push((raw.origin.clone(), port(raw, &mut errs)));
            }
            Kind::Log => {
                if let Some(log) = network_log(raw, &mut errs) {
                    parsed.logs.push((raw.origin.clone(), log, raw.rpc));
                }
            }
            Kind::TrustedPort => {
                parsed
                    .ports
                    .push((raw.origin.clone(), trusted_port(raw, &mut errs)));
            }
            Kind::Members => {
                let (id, lists) = member_lists(raw, &mut errs);
                parsed.members.push((raw.origin.clone(), id, lists));
            }
        }
    }
    cross_check(&parsed, &mut errs);
    if !errs.is_empty() {
        return Err(errs);
    }
    Ok(assemble(parsed))
}

// -------------------------------------------------------------------------------------------
// Security groups and rules
// -------------------------------------------------------------------------------------------

fn security_group(raw: &RawObject, errs: &mut ValidationErrors) -> (SecurityGroup, Vec<bool>) {
    let mut f = Fields::new(&raw.fields, "security_group", &raw.origin, errs);
    let name = f.opt_str("name").unwrap_or_default();
    let stateful = f.opt_bool("stateful", true);
    let key = if f.map.contains_key("security_group_rules") {
        "security_group_rules"
    } else {
        "rules"
    };
    let items = f.opt_list(key);
    let sg_id = f.id.clone();
    let mut rules = Vec::new();
    let mut oks = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let origin = format!("{} {key}[{i}]", raw.origin);
        let Value::Object(map) = item else {
            f.err(&format!("{key}[{i}]"), item, "expected an object");
            continue;
        };
        let (rule, ok) = rule(map, &origin, &sg_id, stateful, raw.rpc, f.errs);
        rules.push(rule);
        oks.push(ok);
    }
    (
        SecurityGroup {
            id: sg_id,
            name,
            stateful,
            rpc: raw.rpc,
            rules,
        },
        oks,
    )
}

fn rule(
    map: &Map<String, Value>,
    origin: &str,
    sg_id: &str,
    stateful: bool,
    rpc: bool,
    errs: &mut ValidationErrors,
) -> (Rule, bool) {
    let mut f = Fields::new(map, "security_group_rule", origin, errs);

    if let Some(owner) = f.opt_str("security_group_id")
        && owner != sg_id
    {
        let v = Value::String(owner);
        f.err(
            "security_group_id",
            &v,
            format!("the rule is listed under security group {sg_id}"),
        );
    }

    let direction = match f.get("direction") {
        Some(Value::String(s)) if s == "ingress" => Some(Direction::Ingress),
        Some(Value::String(s)) if s == "egress" => Some(Direction::Egress),
        Some(v) => {
            f.err("direction", v, "must be 'ingress' or 'egress'");
            None
        }
        None => {
            f.err("direction", &Value::Null, "missing required field");
            None
        }
    };

    // `convert_ethertype_to_case_insensitive`; the API defaults a missing ethertype to IPv4.
    let ethertype = match map.get("ethertype") {
        None => Some(Ethertype::IPv4),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("ipv4") => Some(Ethertype::IPv4),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("ipv6") => Some(Ethertype::IPv6),
        Some(v) => {
            f.err(
                "ethertype",
                v,
                "security group rule ethertype not supported: allowed values are IPv4 and IPv6",
            );
            None
        }
    };

    let protocol = match protocol::convert_protocol(map.get("protocol").unwrap_or(&Value::Null)) {
        Ok(p) => Some(p),
        Err(reason) => {
            f.err("protocol", &map["protocol"], reason);
            None
        }
    };

    let port_min = port_value(&mut f, "port_range_min");
    let port_max = port_value(&mut f, "port_range_max");
    let sport_min = port_value(&mut f, "source_port_range_min");
    let sport_max = port_value(&mut f, "source_port_range_max");
    // A refused value is reported once: the range checks below would see it as missing.
    let ports_parsed = port_min.is_ok() && port_max.is_ok();
    let sports_parsed = sport_min.is_ok() && sport_max.is_ok();
    let (mut port_min, mut port_max) = (port_min.unwrap_or(None), port_max.unwrap_or(None));
    let (mut sport_min, mut sport_max) = (sport_min.unwrap_or(None), sport_max.unwrap_or(None));

    // Where the remote prefix is: the API's `remote_ip_prefix`, or the agent's
    // `source_ip_prefix` (ingress) / `dest_ip_prefix` (egress).
    let prefix_key = match (rpc, direction) {
        (false, _) => "remote_ip_prefix",
        (true, Some(Direction::Egress)) => "dest_ip_prefix",
        (true, _) => "source_ip_prefix",
    };
    if rpc {
        let local_key = match direction {
            Some(Direction::Egress) => "source_ip_prefix",
            _ => "dest_ip_prefix",
        };
        if let Some(v) = map.get(local_key).filter(|v| !v.is_null())
            && !v.as_str().is_some_and(|s| s.is_empty() || s.ends_with("/0"))
        {
            f.err(
                local_key,
                v,
                "a match on the VM's own address, which sg does not support (Neutron's server sends \
                 the remote prefix as source_ip_prefix on ingress rules, dest_ip_prefix on egress rules)",
            );
        }
        if let Some(v) = map.get("remote_ip_prefix").filter(|v| !v.is_null()) {
            f.err(
                "remote_ip_prefix",
                v,
                "an API field: agent rule dicts carry the remote prefix as source_ip_prefix \
                 (ingress) or dest_ip_prefix (egress)",
            );
        }
    }
    // An unparsable prefix is reported here and then treated as absent.
    let remote_ip_prefix = match map.get(prefix_key) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(v @ Value::String(s)) => {
            let net = addr::parse_network(s);
            if net.is_none() {
                f.err(prefix_key, v, format!("'{s}' is not a valid CIDR"));
            }
            net
        }
        Some(v) => {
            f.err(prefix_key, v, "expected a CIDR string");
            None
        }
    };
    // The API tests these ids for truth, so an empty string is "not set".
    let remote_group_id = f.opt_str("remote_group_id").filter(|s| !s.is_empty());
    let remote_address_group_id = f.opt_str("remote_address_group_id").filter(|s| !s.is_empty());

    // `_validate_base_security_group_rule_attributes`, in Neutron's order.
    let protocol = match (protocol, ethertype) {
        (Some(p), Some(e)) => Some(p.map(|p| protocol::canonical_ipv6_icmp(p, e == Ethertype::IPv6))),
        (p, _) => p,
    };
    if port_min == Some(1) && port_max == Some(65535) {
        (port_min, port_max) = (None, None);
    }
    if let Some(protocol) = &protocol
        && ports_parsed
    {
        validate_port_range(&mut f, protocol.as_deref(), port_min, port_max);
    }
    if sport_min == Some(1) && sport_max == Some(65535) {
        (sport_min, sport_max) = (None, None);
    }
    if (sport_min.is_some() || sport_max.is_some()) && sports_parsed {
        validate_source_ports(
            &mut f,
            protocol.as_ref().and_then(|p| p.as_deref()),
            (sport_min, sport_max),
            (port_min, port_max),
        );
    }
    if let (Some(net), Some(e)) = (&remote_ip_prefix, ethertype)
        && Ethertype::of_net(*net) != e
    {
        let v = map[prefix_key].clone();
        f.err(
            prefix_key,
            &v,
            format!("conflicting value ethertype {} for CIDR", e.as_str()),
        );
    }
    if let (Some(Some(p)), Some(Ethertype::IPv4)) = (&protocol, ethertype)
        && protocol::is_ipv6_only(p)
    {
        let v = Value::String(p.clone());
        f.err("protocol", &v, "invalid ethertype IPv4 for this protocol");
    }
    let set: Vec<&str> = [
        (prefix_key, remote_ip_prefix.is_some()),
        ("remote_group_id", remote_group_id.is_some()),
        ("remote_address_group_id", remote_address_group_id.is_some()),
    ]
    .iter()
    .filter(|(_, on)| *on)
    .map(|(k, _)| *k)
    .collect();
    if set.len() > 1 {
        let key = set[1];
        let v = map[key].clone();
        f.err(
            key,
            &v,
            format!("only one of {prefix_key}, remote_group_id or remote_address_group_id may be provided ({} is also set)", set[0]),
        );
    }

    let net = remote_ip_prefix;
    let remote = match (&net, &remote_group_id, &remote_address_group_id) {
        (Some(n), _, _) => Remote::Prefix(*n),
        (None, Some(g), _) => Remote::Group(g.clone()),
        (None, None, Some(a)) => Remote::AddressGroup(a.clone()),
        _ => Remote::Any,
    };
    let protocol = protocol.flatten();
    let proto_num = protocol
        .as_deref()
        .map(protocol::stored_to_number)
        .filter(|&n| n != 0);
    let ok = f.ok;
    let rule = Rule {
        id: f.id,
        security_group_id: sg_id.to_string(),
        direction: direction.unwrap_or(Direction::Ingress),
        ethertype: ethertype.unwrap_or(Ethertype::IPv4),
        protocol,
        proto_num,
        port_range_min: port_min,
        port_range_max: port_max,
        source_port_range_min: sport_min,
        source_port_range_max: sport_max,
        remote_ip_prefix: net.map(addr::net_to_string),
        normalized_cidr: net.map(|n| addr::net_to_string(n.trunc())),
        remote_group_id,
        remote_address_group_id,
        remote,
        stateful,
        rpc,
    };
    (rule, ok)
}

/// `convert_validate_port_value`: an integer 0-65535 (or its decimal string). `Err` when the
/// value was refused (and reported).
fn port_value(f: &mut Fields, key: &str) -> Result<Option<u16>, ()> {
    let Some(v) = f.get(key) else {
        return Ok(None);
    };
    let n = match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) if !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse().ok()
        }
        _ => None,
    };
    match n {
        Some(n) if n <= 65535 => Ok(Some(n as u16)),
        _ => {
            f.err(key, v, "invalid value for port: must be an integer 0 to 65535");
            Err(())
        }
    }
}

/// `_validate_port_range`.
fn validate_port_range(f: &mut Fields, protocol: Option<&str>, min: Option<u16>, max: Option<u16>) {
    if min.is_none() && max.is_none() {
        return;
    }
    let (first_key, first) = match min {
        Some(v) => ("port_range_min", v),
        None => ("port_range_max", max.unwrap_or_default()),
    };
    let Some(protocol) = protocol else {
        f.err(
            first_key,
            &Value::from(first),
            "must also specify protocol if port range is given",
        );
        return;
    };
    let num = protocol::stored_to_number(protocol);
    if protocol::is_port_protocol(num) {
        for (key, v) in [("port_range_min", min), ("port_range_max", max)] {
            if v == Some(0) {
                f.err(
                    key,
                    &Value::from(0),
                    format!("port 0 is not allowed for protocol {protocol}"),
                );
                return;
            }
        }
        match (min, max) {
            (Some(lo), Some(hi)) if lo <= hi => {}
            (Some(lo), Some(hi)) => f.err(
                "port_range_max",
                &Value::from(hi),
                format!("port_range_min ({lo}) must be <= port_range_max for protocol {protocol}"),
            ),
            (None, Some(hi)) => f.err(
                "port_range_min",
                &Value::Null,
                format!("protocol {protocol} needs port_range_min with port_range_max ({hi})"),
            ),
            (Some(lo), None) => f.err(
                "port_range_max",
                &Value::Null,
                format!("protocol {protocol} needs port_range_max with port_range_min ({lo})"),
            ),
            (None, None) => {}
        }
    } else if protocol::is_icmp_protocol(num) {
        for (key, field, v) in [("port_range_min", "type", min), ("port_range_max", "code", max)] {
            if let Some(v) = v.filter(|&v| v > 255) {
                f.err(
                    key,
                    &Value::from(v),
                    format!("invalid value for ICMP {field}: it must be 0 to 255"),
                );
            }
        }
        if let (None, Some(code)) = (min, max) {
            f.err(
                "port_range_max",
                &Value::from(code),
                "ICMP code (port_range_max) is provided but ICMP type (port_range_min) is missing",
            );
        }
    } else {
        f.err(
            first_key,
            &Value::from(first),
            format!("ports cannot be specified for protocol {protocol}: only for DCCP, SCTP, TCP, UDP, UDPLITE (and ICMP type/code)"),
        );
    }
}

/// Most LPM entries one rule's source and destination port ranges may take together (see
/// `validate_source_ports`).
pub(crate) const MAX_PORT_PAIR_ENTRIES: usize = 4096;

/// Source ports: Neutron's drivers render them as `--sport`/`--sports` for the protocols with
/// ports. sg classifies (source port, destination port) as one 32-bit prefix, so a source
/// range that is not a single aligned block, combined with a destination range, takes one
/// entry per source port: more than `MAX_PORT_PAIR_ENTRIES` is refused.
fn validate_source_ports(
    f: &mut Fields,
    protocol: Option<&str>,
    (min, max): (Option<u16>, Option<u16>),
    (dmin, dmax): (Option<u16>, Option<u16>),
) {
    let first_key = if min.is_some() {
        "source_port_range_min"
    } else {
        "source_port_range_max"
    };
    let first = Value::from(min.or(max).unwrap_or_default());
    let Some(protocol) = protocol.filter(|p| protocol::is_port_protocol(protocol::stored_to_number(p)))
    else {
        f.err(
            first_key,
            &first,
            "source ports need protocol tcp, udp, udplite, sctp or dccp",
        );
        return;
    };
    let (lo, hi) = match (min, max) {
        (Some(lo), Some(hi)) if lo <= hi => (lo, hi),
        (Some(lo), Some(hi)) => {
            f.err(
                "source_port_range_max",
                &Value::from(hi),
                format!(
                    "source_port_range_min ({lo}) must be <= source_port_range_max for protocol {protocol}"
                ),
            );
            return;
        }
        _ => {
            f.err(
                first_key,
                &first,
                "source_port_range_min and source_port_range_max go together",
            );
            return;
        }
    };
    if lo == 0 {
        f.err(
            "source_port_range_min",
            &Value::from(0),
            format!("port 0 is not allowed for protocol {protocol}"),
        );
        return;
    }
    if let (Some(dlo), Some(dhi)) = (dmin, dmax)
        && dlo <= dhi
    {
        let dblocks = protocol::port_blocks(dlo, dhi).len();
        let entries: usize = protocol::port_blocks(lo, hi)
            .iter()
            .map(|&(_, len)| if len == 16 { dblocks } else { dblocks << (16 - len) })
            .sum();
        if entries > MAX_PORT_PAIR_ENTRIES {
            f.err(
                "source_port_range_max",
                &Value::from(hi),
                format!(
                    "source ports {lo}-{hi} with destination ports {dlo}-{dhi} would take {entries} \
                     classifier entries (sg's limit is {MAX_PORT_PAIR_ENTRIES}): give a single source \
                     port, an aligned source block, or no destination range"
                ),
            );
        }
    }
}

// -------------------------------------------------------------------------------------------
// Address groups
// -------------------------------------------------------------------------------------------

fn address_group(raw: &RawObject, errs: &mut ValidationErrors) -> AddressGroup {
    let mut f = Fields::new(&raw.fields, "address_group", &raw.origin, errs);
    let name = f.opt_str("name").unwrap_or_default();
    let mut addresses = Vec::new();
    let mut nets = Vec::new();
    for (i, item) in f.opt_list("addresses").into_iter().enumerate() {
        let key = format!("addresses[{i}]");
        let Some(net) = item.as_str().and_then(addr::parse_network) else {
            f.err(&key, item, "not a valid IP address or CIDR");
            continue;
        };
        // The API's `type:subnet_list` (`validate_subnet` per item): a CIDR, IPv4 in netaddr's
        // own form. A bare address is refused, not read as a host route.
        let text = item.as_str().unwrap_or_default();
        if !text.contains('/') {
            f.err(
                &key,
                item,
                format!(
                    "'{text}' is not a valid IP subnet: address groups take CIDRs only (e.g. '{text}/{}')",
                    if net.addr().is_ipv4() { 32 } else { 128 }
                ),
            );
            continue;
        }
        if net.addr().is_ipv4() && addr::net_to_string(net) != text {
            f.err(
                &key,
                item,
                format!("'{text}' is not a valid IP subnet: write IPv4 CIDRs as address/length"),
            );
            continue;
        }

        // Neutron stores f"{network}/{prefixlen}" and ignores repeats.
        let net = net.trunc();
        if !nets.contains(&net) {
            addresses.push(addr::net_to_string(net));
            nets.push(net);
        }
    }
    AddressGroup {
        id: f.id,
        name,
        addresses,
        nets,
    }
}

// -------------------------------------------------------------------------------------------
// Ports
// -------------------------------------------------------------------------------------------

/// `validate_mac_address`: a MAC netaddr accepts, not all-zero and not broadcast.
fn mac(f: &mut Fields, key: &str, v: &Value) -> Option<MacAddr> {
    let parsed = v.as_str().and_then(MacAddr::parse);
    match parsed {
        Some(m) if m.0 != [0; 6] && m.0 != [0xff; 6] => Some(m),
        _ => {
            f.err(key, v, "not a valid MAC address");
            None
        }
    }
}

fn port(raw: &RawObject, errs: &mut ValidationErrors) -> Port {
    let mut f = Fields::new(&raw.fields, "port", &raw.origin, errs);
    let name = f.opt_str("name").unwrap_or_default();
    let mac_address = f.req_str("mac_address");
    let port_mac = mac_address
        .as_ref()
        .and_then(|m| mac(&mut f, "mac_address", &Value::String(m.clone())));

    let mut fixed_ips = Vec::new();
    for (i, item) in f.opt_list("fixed_ips").into_iter().enumerate() {
        // The server flattens fixed IPs to plain strings for its agents.
        let (key, ip_v) = match item {
            Value::String(_) => (format!("fixed_ips[{i}]"), item),
            _ => (
                format!("fixed_ips[{i}].ip_address"),
                item.get("ip_address").unwrap_or(&Value::Null),
            ),
        };
        let Some(text) = ip_v.as_str() else {
            f.err(
                &key,
                ip_v,
                "missing or not a string: expected {\"ip_address\": ..., \"subnet_id\": ...} or an address",
            );
            continue;
        };
        let Some(ip) = addr::parse_ip(text) else {
            f.err(&key, ip_v, "not a valid IP address");
            continue;
        };
        let subnet_id = item.get("subnet_id").and_then(Value::as_str).map(str::to_string);
        fixed_ips.push(FixedIp {
            ip_address: text.to_string(),
            ip,
            subnet_id,
        });
    }

    let mut pairs = Vec::new();
    for (i, item) in f.opt_list("allowed_address_pairs").into_iter().enumerate() {
        let key = format!("allowed_address_pairs[{i}]");
        let ip_v = item.get("ip_address").unwrap_or(&Value::Null);
        let Some(text) = ip_v.as_str() else {
            f.err(&format!("{key}.ip_address"), ip_v, "missing or not a string");
            continue;
        };
        // `_validate_allowed_address_pairs`: a CIDR must parse, and an IPv4 one must be in
        // netaddr's own form; otherwise a plain address.
        let net = if text.contains('/') {
            addr::parse_network(text).filter(|n| !n.addr().is_ipv4() || addr::net_to_string(*n) == text)
        } else {
            addr::parse_ip(text).map(IpNet::from)
        };
        let Some(net) = net else {
            f.err(
                &format!("{key}.ip_address"),
                ip_v,
                "not a valid IP address or subnet",
            );
            continue;
        };
        // `validate_subnet_not_multicast` / `validate_ip_not_multicast`: the API refuses a
        // pair that is or overlaps a multicast range; `0.0.0.0/0` is the one exception (so
        // `::/0`, which overlaps ff00::/8, is refused).
        if let Some(range) = multicast_overlap(net, text.contains('/')) {
            f.err(
                &format!("{key}.ip_address"),
                ip_v,
                format!("'{text}' overlaps the multicast range {range}, which Neutron's API refuses for allowed address pairs"),
            );
            continue;
        }
        let (mac_address, pair_mac) = match item.get("mac_address").filter(|v| !v.is_null()) {
            Some(v) => (
                v.as_str().unwrap_or_default().to_string(),
                mac(&mut f, &format!("{key}.mac_address"), v),
            ),
            None => (mac_address.clone().unwrap_or_default(), port_mac),
        };
        let Some(pair_mac) = pair_mac else { continue };
        if pair_mac.is_multicast() {
            let v = item.get("mac_address").cloned().unwrap_or(Value::Null);
            f.err(
                &format!("{key}.mac_address"),
                &v,
                "a multicast MAC address, which Neutron's API refuses for allowed address pairs",
            );
            continue;
        }
        if pairs
            .iter()
            .any(|p: &AddressPair| p.mac == pair_mac && p.ip_address == text)
        {
            f.err(
                &format!("{key}.ip_address"),
                ip_v,
                format!("duplicate allowed address pair ({pair_mac}, {text})"),
            );
            continue;
        }
        pairs.push(AddressPair {
            ip_address: text.to_string(),
            net,
            mac_address,
            mac: pair_mac,
        });
    }

    let sg_key = if f.map.contains_key("security_groups") {
        "security_groups"
    } else {
        "security_group_ids"
    };
    let mut security_groups: Vec<String> = Vec::new();
    for (i, item) in f.opt_list(sg_key).into_iter().enumerate() {
        match item.as_str() {
            Some(s) if !s.is_empty() && !security_groups.iter().any(|g| g == s) => {
                security_groups.push(s.to_string())
            }
            Some(s) if !s.is_empty() => f.err(
                &format!("{sg_key}[{i}]"),
                item,
                "duplicate security group in the list",
            ),
            _ => f.err(&format!("{sg_key}[{i}]"), item, "expected a security group id"),
        }
    }

    // The API reads a missing or null port_security_enabled as true.
    let port_security_enabled = f.opt_bool("port_security_enabled", true);
    // The API refuses groups or pairs on a port without port security; an agent's driver
    // may still be handed both (Neutron's functional suite does it), and then filters nothing.
    let rpc = raw.rpc;
    if !port_security_enabled && !security_groups.is_empty() && !rpc {
        let v = Value::from(security_groups.clone());
        f.err(
            sg_key,
            &v,
            "port security must be enabled in order to use security groups",
        );
    }
    if !port_security_enabled && !pairs.is_empty() && !rpc {
        let v = Value::from(pairs.iter().map(|p| p.ip_address.clone()).collect::<Vec<_>>());
        f.err(
            "allowed_address_pairs",
            &v,
            "port security must be enabled in order to use allowed address pairs",
        );
    }
    let network_id = f.req_str("network_id").unwrap_or_default();
    let device_owner = f.opt_str("device_owner").unwrap_or_default();
    let host_key = if f.map.contains_key("binding:host_id") {
        "binding:host_id"
    } else {
        "binding_host_id"
    };
    let binding_host_id = f.opt_str(host_key).filter(|h| !h.is_empty());

    let device = match f.opt_str("device") {
        Some(d) => d,
        None => format!("tap{}", f.id.chars().take(11).collect::<String>()),
    };
    if !valid_ifname(&device) {
        let v = Value::String(device.clone());
        f.err(
            "device",
            &v,
            "not a valid Linux interface name (1-15 bytes, no '/', ':' or whitespace)",
        );
    }

    Port {
        id: f.id,
        name,
        mac_address: mac_address.unwrap_or_default(),
        mac: port_mac.unwrap_or_default(),
        fixed_ips,
        allowed_address_pairs: pairs,
        security_groups,
        port_security_enabled,
        network_id,
        device_owner,
        binding_host_id,
        device,
        rpc_device: rpc_device(raw),
    }
}

fn rpc_device(raw: &RawObject) -> Option<String> {
    raw.fields
        .get(super::rpc::RPC_DEVICE)
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// A device of `process_trusted_ports`: Neutron's driver accepts everything on its tap. As a
/// port it is a `network:` port, which sg never filters.
fn trusted_port(raw: &RawObject, errs: &mut ValidationErrors) -> Port {
    let mut f = Fields::new(&raw.fields, "port", &raw.origin, errs);
    let device = f.req_str("device").unwrap_or_default();
    if !valid_ifname(&device) {
        let v = Value::String(device.clone());
        f.err(
            "device",
            &v,
            "not a valid Linux interface name (1-15 bytes, no '/', ':' or whitespace)",
        );
    }
    Port {
        id: f.id,
        name: String::new(),
        mac_address: String::new(),
        mac: MacAddr::default(),
        fixed_ips: Vec::new(),
        allowed_address_pairs: Vec::new(),
        security_groups: Vec::new(),
        port_security_enabled: false,
        network_id: String::new(),
        device_owner: TRUSTED_OWNER.to_string(),
        binding_host_id: None,
        device,
        rpc_device: rpc_device(raw),
    }
}

/// The `device_owner` sg gives a device of `process_trusted_ports`.
pub(crate) const TRUSTED_OWNER: &str = "network:trusted";

/// Linux `dev_valid_name`.
fn valid_ifname(device: &str) -> bool {
    !(device.is_empty()
        || device.len() > 15
        || device == "."
        || device == ".."
        || device.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()))
}

/// One remote id's `sg_member_ips` entry: `{"IPv4": [[ip, mac], ...], "IPv6": [...]}`; a
/// member may also be a bare address string or `[ip]`.
fn member_lists(raw: &RawObject, errs: &mut ValidationErrors) -> (String, BTreeMap<Ethertype, Vec<Member>>) {
    let mut f = Fields::new(&raw.fields, "security_group", &raw.origin, errs);
    let mut lists: BTreeMap<Ethertype, Vec<Member>> = BTreeMap::new();
    for (key, value) in raw.fields.iter().filter(|(k, _)| k.as_str() != "id") {
        let field = format!("sg_member_ips.{key}");
        let ethertype = match key.as_str() {
            "IPv4" => Ethertype::IPv4,
            "IPv6" => Ethertype::IPv6,
            _ => {
                f.err(&field, value, "expected the ethertype IPv4 or IPv6");
                continue;
            }
        };
        let items: &[Value] = match value {
            Value::Array(items) => items,
            Value::Null => &[],
            other => {
                f.err(&field, other, "expected a list of [ip, mac] pairs");
                continue;
            }
        };
        let list = lists.entry(ethertype).or_default();
        for (i, item) in items.iter().enumerate() {
            let field = format!("{field}[{i}]");
            let (ip_v, mac_v) = match item {
                Value::String(_) => (item, &Value::Null),
                Value::Array(pair) if (1..=2).contains(&pair.len()) => {
                    (&pair[0], pair.get(1).unwrap_or(&Value::Null))
                }
                other => {
                    f.err(&field, other, "expected [ip, mac] or an address");
                    continue;
                }
            };
            let Some(text) = ip_v.as_str() else {
                f.err(&field, ip_v, "expected an address or CIDR string");
                continue;
            };
            let Some(net) = addr::parse_network(text) else {
                f.err(&field, ip_v, "not a valid IP address or CIDR");
                continue;
            };
            if Ethertype::of_net(net) != ethertype {
                f.err(&field, ip_v, format!("not an {} address", ethertype.as_str()));
                continue;
            }
            let mac = match mac_v {
                Value::Null => None,
                v => match v.as_str().and_then(MacAddr::parse) {
                    Some(m) => Some(m),
                    None => {
                        f.err(&format!("{field}.mac"), v, "not a valid MAC address");
                        continue;
                    }
                },
            };
            list.push(Member {
                ip: text.to_string(),
                net,
                mac,
            });
        }
    }
    (f.id, lists)
}

/// The multicast range a pair address falls in or overlaps (224.0.0.0/4, ff00::/8), as
/// neutron-lib's `validate_subnet_not_multicast` (`cidr`) or `validate_ip_not_multicast` decide.
fn multicast_overlap(net: IpNet, cidr: bool) -> Option<&'static str> {
    let (mcast, text) = if net.addr().is_ipv4() {
        (addr::parse_network("224.0.0.0/4")?, "224.0.0.0/4")
    } else {
        (addr::parse_network("ff00::/8")?, "ff00::/8")
    };
    if !cidr {
        return mcast.contains(&net.addr()).then_some(text);
    }
    if net.addr().is_ipv4() && net.prefix_len() == 0 {
        return None;
    }
    // Two CIDRs overlap iff they agree on the shorter prefix.
    let len = net.prefix_len().min(mcast.prefix_len());
    let a = IpNet::new(net.addr(), len).ok()?.trunc();
    let b = IpNet::new(mcast.addr(), len).ok()?.trunc();
    (a == b).then_some(text)
}

// -------------------------------------------------------------------------------------------
// Network logs (neutron/extensions/logging.py, neutron_lib/services/logapi)
// -------------------------------------------------------------------------------------------

/// A log object, or None when it is not one sg logs: Neutron's API knows other resource types
/// (`firewall_group`), which only other drivers implement; those are refused, since sg would
/// otherwise accept a log it never writes.
fn network_log(raw: &RawObject, errs: &mut ValidationErrors) -> Option<NetworkLog> {
    let mut f = Fields::new(&raw.fields, "log", &raw.origin, errs);
    let name = f.opt_str("name").unwrap_or_default();
    let project_id = f
        .opt_str("project_id")
        .or_else(|| f.opt_str("tenant_id"))
        .unwrap_or_default();
    match f.get("resource_type") {
        Some(Value::String(t)) if t == "security_group" => {}
        Some(v) => {
            let v = v.clone();
            f.err(
                "resource_type",
                &v,
                "sg logs only resource_type \"security_group\" (Neutron's security-group logging)",
            );
        }
        None => {
            let v = f.map.get("resource_type").cloned().unwrap_or(Value::Null);
            f.err("resource_type", &v, "missing required field");
        }
    }
    let event = match f.get("event") {
        None => LogEvent::All,
        Some(Value::String(e)) if e == "ALL" => LogEvent::All,
        Some(Value::String(e)) if e == "ACCEPT" => LogEvent::Accept,
        Some(Value::String(e)) if e == "DROP" => LogEvent::Drop,
        Some(v) => {
            let v = v.clone();
            f.err("event", &v, "must be one of \"ALL\", \"ACCEPT\", \"DROP\"");
            LogEvent::All
        }
    };
    let resource_id = f.opt_str("resource_id").filter(|s| !s.is_empty());
    let target_id = f.opt_str("target_id").filter(|s| !s.is_empty());
    let enabled = f.opt_bool("enabled", true);
    let port_ids = if raw.rpc && f.map.contains_key("port_ids") {
        let mut ids = Vec::new();
        for (i, v) in f.opt_list("port_ids").into_iter().enumerate() {
            match v.as_str() {
                Some(s) if !s.is_empty() => ids.push(s.to_string()),
                _ => f.err(&format!("port_ids[{i}]"), v, "expected a port id"),
            }
        }
        Some(ids)
    } else {
        None
    };
    let ok = f.ok;
    ok.then(|| NetworkLog {
        id: f.id.clone(),
        name,
        project_id,
        resource_id,
        target_id,
        event,
        enabled,
        port_ids,
    })
}

/// The logging plugin's checks: the group and the port exist, and a port named with a group
/// is in it (`InvalidResourceConstraint`).
fn check_logs(p: &Parsed, errs: &mut ValidationErrors) {
    duplicates(
        "log",
        "id",
        p.logs.iter().map(|(o, l, _)| (l.id.as_str(), o.as_str())),
        "log id",
        errs,
    );
    for (_, log, rpc) in &p.logs {
        // Neutron's server sends every log object to every agent: one pushed by the driver may
        // name a group or a port this host does not have, and then covers nothing here.
        if *rpc {
            continue;
        }
        if let Some(g) = &log.resource_id
            && !p.sgs.iter().any(|(_, s, _)| s.id == *g)
        {
            errs.push(
                "log",
                &log.id,
                "resource_id",
                show(&Value::from(g.as_str())),
                "no security group with this id in the input",
            );
        }
        if let Some(t) = &log.target_id {
            match p.ports.iter().find(|(_, port)| port.id == *t) {
                None => errs.push(
                    "log",
                    &log.id,
                    "target_id",
                    show(&Value::from(t.as_str())),
                    "no port with this id in the input",
                ),
                Some((_, port)) => {
                    if let Some(g) = &log.resource_id
                        && !port.security_groups.contains(g)
                    {
                        errs.push(
                            "log",
                            &log.id,
                            "target_id",
                            show(&Value::from(t.as_str())),
                            format!(
                                "the port is not in security group {g} (resource_id), as Neutron requires"
                            ),
                        );
                    }
                }
            }
        }
    }
}

// -------------------------------------------------------------------------------------------
// Checks across objects
// -------------------------------------------------------------------------------------------

/// Reports ids defined twice (`kind` objects named by `ids`, with their origins).
fn duplicates<'a>(
    object: &'static str,
    field: &str,
    ids: impl Iterator<Item = (&'a str, &'a str)>,
    what: &str,
    errs: &mut ValidationErrors,
) {
    let mut seen: HashMap<&str, &str> = HashMap::new();
    for (id, origin) in ids {
        if let Some(first) = seen.get(id) {
            errs.push(
                object,
                id,
                field,
                show(&Value::from(id)),
                format!("duplicate {what} (first at {first})"),
            );
        } else {
            seen.insert(id, origin);
        }
    }
}

/// The key of `_rule_to_key`: 0.0.0.0/0, ::/0 and no prefix compare equal; protocols compare
/// by (name, number).
fn rule_key(r: &Rule) -> String {
    let none = "+".to_string();
    let opt = |v: Option<String>| v.unwrap_or_else(|| none.clone());
    let prefix = match r.remote_ip_prefix.as_deref() {
        None | Some("0.0.0.0/0") | Some("::/0") => none.clone(),
        Some(p) => p.to_string(),
    };
    let proto = r.protocol.as_deref().map(|p| {
        let (name, num) = protocol::name_and_num(p, r.ethertype == Ethertype::IPv6);
        format!("['{name}', '{num}']")
    });
    [
        r.direction.as_str().to_string(),
        r.ethertype.as_str().to_string(),
        opt(r.port_range_max.map(|v| v.to_string())),
        opt(r.port_range_min.map(|v| v.to_string())),
        // Not in Neutron's key (its API has no source ports); sg's inputs may carry them.
        opt(r.source_port_range_max.map(|v| v.to_string())),
        opt(r.source_port_range_min.map(|v| v.to_string())),
        opt(proto),
        opt(r.remote_group_id.clone()),
        opt(r.remote_address_group_id.clone()),
        prefix,
        r.security_group_id.clone(),
    ]
    .join("_")
}

fn cross_check(p: &Parsed, errs: &mut ValidationErrors) {
    check_logs(p, errs);
    duplicates(
        "security_group",
        "id",
        p.sgs.iter().map(|(o, s, _)| (s.id.as_str(), o.as_str())),
        "security group id",
        errs,
    );
    // Rule ids are global in Neutron's API. The agent's RPC shape has none: there a rule is its
    // content, and two groups may hold the same one (every new group gets the same two egress
    // rules), which the compiler keeps apart by (group, rule).
    let rule_origins: Vec<(&str, String)> = p
        .sgs
        .iter()
        .filter(|(_, s, _)| !p.rpc_sgs.contains(&s.id))
        .flat_map(|(_, s, _)| {
            s.rules
                .iter()
                .map(move |r| (r.id.as_str(), format!("security group {}", s.id)))
        })
        .collect();
    duplicates(
        "security_group_rule",
        "id",
        rule_origins.iter().map(|(id, o)| (*id, o.as_str())),
        "security group rule id",
        errs,
    );
    duplicates(
        "address_group",
        "id",
        p.ags.iter().map(|(o, a)| (a.id.as_str(), o.as_str())),
        "address group id",
        errs,
    );
    duplicates(
        "port",
        "id",
        p.ports.iter().map(|(o, x)| (x.id.as_str(), o.as_str())),
        "port id",
        errs,
    );
    duplicates(
        "security_group",
        "sg_member_ips",
        p.members.iter().map(|(o, id, _)| (id.as_str(), o.as_str())),
        "member list",
        errs,
    );

    let mut taps: HashMap<&str, &str> = HashMap::new();
    for (_, port) in &p.ports {
        match taps.get(port.device.as_str()) {
            Some(other) if *other != port.id => errs.push(
                "port",
                &port.id,
                "device",
                show(&Value::from(port.device.as_str())),
                format!("tap name also used by port {other}"),
            ),
            Some(_) => {}
            None => {
                taps.insert(&port.device, &port.id);
            }
        }
    }

    let sgs: HashMap<&str, &SecurityGroup> = p.sgs.iter().map(|(_, s, _)| (s.id.as_str(), s)).collect();
    let ags: HashSet<&str> = p.ags.iter().map(|(_, a)| a.id.as_str()).collect();

    for (_, sg, oks) in &p.sgs {
        let mut keys: HashMap<String, &str> = HashMap::new();
        for (rule, ok) in sg.rules.iter().zip(oks) {
            // An agent rule names remote groups whose members come with sg_member_ips (none
            // without): nothing to define.
            if let Some(g) = &rule.remote_group_id
                && !rule.rpc
                && !sgs.contains_key(g.as_str())
            {
                errs.push(
                    "security_group_rule",
                    &rule.id,
                    "remote_group_id",
                    show(&Value::from(g.as_str())),
                    "security group not defined in the input",
                );
            }
            if let Some(a) = &rule.remote_address_group_id
                && !rule.rpc
                && !ags.contains(a.as_str())
            {
                errs.push(
                    "security_group_rule",
                    &rule.id,
                    "remote_address_group_id",
                    show(&Value::from(a.as_str())),
                    "address group not defined in the input",
                );
            }
            // Agent rule dicts are what the server made of stored rules: identical ones are
            // already one, and equivalent ones are rendered by Neutron's driver one by one.
            if !ok || rule.rpc {
                continue;
            }
            let key = rule_key(rule);
            if let Some(first) = keys.get(&key) {
                errs.push(
                    "security_group_rule",
                    &rule.id,
                    "rule",
                    show(&Value::from(rule.describe())),
                    format!("duplicate of rule {first} in security group {} (Neutron: security group rule already exists)", sg.id),
                );
            } else {
                keys.insert(key, &rule.id);
            }
        }
    }

    for (_, port) in &p.ports {
        let mut stateful = Vec::new();
        let mut stateless = Vec::new();
        // The agent may name a port's groups before their rules arrive, and the API already
        // refused mixed statefulness; Neutron's driver decides by the first rule (as
        // `Model::port_stateful` does).
        if port.rpc_device.is_some() {
            continue;
        }
        for id in &port.security_groups {
            match sgs.get(id.as_str()) {
                None => errs.push(
                    "port",
                    &port.id,
                    "security_groups",
                    show(&Value::from(id.as_str())),
                    "security group not defined in the input",
                ),
                Some(sg) if sg.stateful => stateful.push(id.as_str()),
                Some(_) => stateless.push(id.as_str()),
            }
        }
        if !stateful.is_empty() && !stateless.is_empty() {
            errs.push(
                "port",
                &port.id,
                "security_groups",
                show(&Value::from(port.security_groups.clone())),
                format!(
                    "cannot apply both stateful and stateless security groups on the same port (stateful: {}; stateless: {})",
                    stateful.join(", "),
                    stateless.join(", ")
                ),
            );
        }
    }
}

// -------------------------------------------------------------------------------------------
// The model and its member lists
// -------------------------------------------------------------------------------------------

fn assemble(p: Parsed) -> Model {
    let rpc_members: BTreeMap<String, BTreeMap<Ethertype, Vec<Member>>> =
        p.members.into_iter().map(|(_, id, lists)| (id, lists)).collect();
    let security_groups: Vec<SecurityGroup> = p.sgs.into_iter().map(|(_, s, _)| s).collect();
    let address_groups: Vec<AddressGroup> = p.ags.into_iter().map(|(_, a)| a).collect();
    let ports: Vec<Port> = p.ports.into_iter().map(|(_, x)| x).collect();
    let logs: Vec<NetworkLog> = p.logs.into_iter().map(|(_, x, _)| x).collect();
    let sg_index = security_groups
        .iter()
        .enumerate()
        .map(|(i, s)| (s.id.clone(), i))
        .collect();
    let ag_index: HashMap<String, usize> = address_groups
        .iter()
        .enumerate()
        .map(|(i, a)| (a.id.clone(), i))
        .collect();
    let port_index = ports.iter().enumerate().map(|(i, x)| (x.id.clone(), i)).collect();

    // Member ports of each group, by port id (see `Model::members` for the order).
    let mut by_group: HashMap<&str, Vec<&Port>> = HashMap::new();
    let mut sorted: Vec<&Port> = ports.iter().collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    for port in sorted {
        for g in &port.security_groups {
            by_group.entry(g.as_str()).or_default().push(port);
        }
    }

    let mut members: BTreeMap<(Remote, Ethertype), Vec<Member>> = BTreeMap::new();
    for rule in security_groups.iter().flat_map(|s| &s.rules) {
        let key = (rule.remote.clone(), rule.ethertype);
        if members.contains_key(&key) {
            continue;
        }
        let explicit = match &rule.remote {
            Remote::Group(id) | Remote::AddressGroup(id) => rpc_members.get(id),
            Remote::Any | Remote::Prefix(_) => None,
        };
        let list = match &rule.remote {
            // The lists the agent was given; an agent rule whose group has none matches
            // nothing, as an empty set in Neutron's driver.
            Remote::Group(_) | Remote::AddressGroup(_) if explicit.is_some() || rule.rpc => explicit
                .and_then(|m| m.get(&rule.ethertype))
                .cloned()
                .unwrap_or_default(),
            Remote::Group(g) => group_members(
                by_group.get(g.as_str()).map(Vec::as_slice).unwrap_or(&[]),
                rule.ethertype,
            ),
            Remote::AddressGroup(a) => {
                let Some(&i) = ag_index.get(a) else {
                    members.insert(key, Vec::new());
                    continue;
                };
                let ag = &address_groups[i];
                ag.addresses
                    .iter()
                    .zip(&ag.nets)
                    .filter(|(_, n)| Ethertype::of_net(**n) == rule.ethertype)
                    .map(|(s, n)| Member {
                        ip: s.clone(),
                        net: *n,
                        mac: None,
                    })
                    .collect()
            }
            Remote::Any | Remote::Prefix(_) => continue,
        };
        members.insert(key, list);
    }

    Model {
        security_groups,
        address_groups,
        ports,
        logs,
        sg_index,
        ag_index,
        port_index,
        members,
        rpc_members,
    }
}

/// `_select_ips_for_remote_group`: every fixed IP of the member ports (mac None), plus their
/// allowed-address-pair addresses with the pair MAC; ports without fixed IPs add nothing.
fn group_members(ports: &[&Port], ethertype: Ethertype) -> Vec<Member> {
    let mut out: Vec<Member> = Vec::new();
    let mut seen: HashSet<(String, Option<MacAddr>)> = HashSet::new();
    for port in ports.iter().filter(|p| !p.fixed_ips.is_empty()) {
        let fixed = port
            .fixed_ips
            .iter()
            .map(|f| (f.ip_address.clone(), IpNet::from(f.ip), None));
        let pairs = port
            .allowed_address_pairs
            .iter()
            .map(|a| (a.ip_address.clone(), a.net, Some(a.mac)));
        for (ip, net, mac) in fixed.chain(pairs) {
            if Ethertype::of_net(net) == ethertype && seen.insert((ip.clone(), mac)) {
                out.push(Member { ip, net, mac });
            }
        }
    }
    out
}
