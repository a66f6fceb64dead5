//! The agent's RPC shape: what Neutron's server hands an L2 agent (`security_group_info_for_devices`)
//! and what the agent then passes to its firewall driver, turned into the objects the validator
//! reads. The `sg_neutron` driver pushes exactly this to `sg agent --api-socket`, which keeps it
//! as one document (`neutron-state.json` in the run directory); `sg validate`, `sg compile` and
//! `sg iptables render` read it like any other input.
//!
//! ```json
//! {
//!   "plug": "direct",
//!   "devices": {"tapadcc4b66-c1": {"device": "tapadcc4b66-c1", "mac_address": "...",
//!               "fixed_ips": ["192.168.206.6"], "security_groups": ["..."], ...}},
//!   "security_groups": {"<sg id>": [{"direction": "ingress", "ethertype": "IPv4",
//!               "protocol": "tcp", "port_range_min": 80, "port_range_max": 80,
//!               "source_ip_prefix": "0.0.0.0/0", "stateful": true}]},
//!   "sg_member_ips": {"<remote group id>": {"IPv4": [["192.168.206.7", null]], "IPv6": []}},
//!   "trusted_ports": ["tap5f0c8a2e-9b"]
//! }
//! ```
//!
//! - `devices`: port dicts by Neutron device name (or a list of them). Fixed IPs are plain
//!   strings; a port without `id` is named by its device. Per-port `security_group_rules` (the
//!   server's DHCP and RA provider rules) are ignored: sg derives the same rules from the fixed
//!   IPs (sg-ebpf/README.md §3, and the parity renderer as the server does).
//! - `security_groups`: each group's rules as agent rule dicts: no rule id, the remote prefix
//!   in `source_ip_prefix` (ingress) or `dest_ip_prefix` (egress), optional
//!   `source_port_range_min`/`_max`, the group's `stateful` flag on every rule. A rule's id in
//!   sg is its content (the dict as canonical JSON); identical dicts are one rule, as the server
//!   and Neutron's iptables driver de-duplicate them.
//! - `sg_member_ips`: the member list of every remote group and remote address group, as
//!   `[ip, mac]` pairs (the JSON form of Neutron's tuples) by ethertype. A remote group without
//!   a list has no members, as in Neutron's driver; a port's group without rules has no rules.
//! - `trusted_ports`: the devices of `process_trusted_ports` (Neutron's `network:*` ports),
//!   which sg passes unfiltered.
//! - `plug` (an sg field): `direct` when the device is the tap (Neutron's Linux bridge style,
//!   the `sg` driver), `hybrid` when the device is the port id and the tap is
//!   `tap<port id[:11]>` (`sg_hybrid`, the OVS agent with hybrid plugging).

use serde_json::{Map, Value};

use super::error::{ValidationErrors, show};
use super::input::{Kind, RawObject};

/// How the tap relates to Neutron's device name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plug {
    /// The device is the tap.
    Direct,
    /// The device is the port id; the tap is `tap` + its first 11 characters.
    Hybrid,
}

impl Plug {
    pub fn parse(s: &str) -> Option<Plug> {
        match s {
            "direct" => Some(Plug::Direct),
            "hybrid" => Some(Plug::Hybrid),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Plug::Direct => "direct",
            Plug::Hybrid => "hybrid",
        }
    }

    /// The tap of a Neutron device (`get_hybrid_port_name` for hybrid plugging).
    pub fn tap(self, device: &str) -> String {
        match self {
            Plug::Direct => device.to_string(),
            Plug::Hybrid => format!("tap{device}").chars().take(14).collect(),
        }
    }
}

/// The field under which the conversion hands the validator Neutron's device name.
pub(crate) const RPC_DEVICE: &str = " rpc device";

/// A document is in the RPC shape when it has one of the RPC-only keys, or `security_groups`
/// as an object (the API shape has a list there).
pub(crate) fn is_rpc_document(map: &Map<String, Value>) -> bool {
    ["devices", "sg_member_ips", "trusted_ports"]
        .iter()
        .any(|k| map.contains_key(*k))
        || matches!(map.get("security_groups"), Some(Value::Object(_)))
}

/// The content id of an agent rule dict: its keys sorted, as compact JSON, without the group id
/// (which the rule's place already gives).
pub fn rule_id(rule: &Map<String, Value>) -> String {
    let sorted: std::collections::BTreeMap<&String, &Value> = rule
        .iter()
        .filter(|(k, v)| k.as_str() != "security_group_id" && !v.is_null())
        .collect();
    serde_json::to_string(&sorted).unwrap_or_default()
}

/// Splits an RPC-shaped document into the objects the validator reads.
pub(crate) fn objects(
    origin: &str,
    mut doc: Map<String, Value>,
    out: &mut Vec<RawObject>,
    errs: &mut ValidationErrors,
) {
    let plug = match doc.remove("plug") {
        None | Some(Value::Null) => Plug::Direct,
        Some(Value::String(s)) if Plug::parse(&s).is_some() => Plug::parse(&s).expect("checked"),
        Some(v) => {
            errs.push(
                "document",
                origin,
                "plug",
                show(&v),
                "expected \"direct\" or \"hybrid\"",
            );
            Plug::Direct
        }
    };

    match doc.remove("devices") {
        None | Some(Value::Null) => {}
        Some(Value::Object(devices)) => {
            for (key, port) in devices {
                device(
                    &format!("{origin} devices[{key:?}]"),
                    Some(&key),
                    port,
                    plug,
                    out,
                    errs,
                );
            }
        }
        Some(Value::Array(devices)) => {
            for (i, port) in devices.into_iter().enumerate() {
                device(&format!("{origin} devices[{i}]"), None, port, plug, out, errs);
            }
        }
        Some(v) => errs.push(
            "document",
            origin,
            "devices",
            show(&v),
            "expected an object of port dicts by device",
        ),
    }

    match doc.remove("security_groups") {
        None | Some(Value::Null) => {}
        Some(Value::Object(groups)) => {
            for (sg_id, rules) in groups {
                security_group(
                    &format!("{origin} security_groups[{sg_id:?}]"),
                    sg_id,
                    rules,
                    out,
                    errs,
                );
            }
        }
        Some(v) => errs.push(
            "document",
            origin,
            "security_groups",
            show(&v),
            "expected an object of rule lists by security group id",
        ),
    }

    match doc.remove("sg_member_ips") {
        None | Some(Value::Null) => {}
        Some(Value::Object(lists)) => {
            for (id, by_ethertype) in lists {
                let origin = format!("{origin} sg_member_ips[{id:?}]");
                match by_ethertype {
                    Value::Object(mut fields) => {
                        fields.insert("id".into(), Value::String(id));
                        out.push(RawObject {
                            kind: Kind::Members,
                            origin,
                            fields,
                            rpc: true,
                        });
                    }
                    other => errs.push(
                        "security_group",
                        &id,
                        "sg_member_ips",
                        show(&other),
                        "expected {\"IPv4\": [[ip, mac], ...], \"IPv6\": [...]}",
                    ),
                }
            }
        }
        Some(v) => errs.push(
            "document",
            origin,
            "sg_member_ips",
            show(&v),
            "expected an object of member lists by remote group id",
        ),
    }

    match doc.remove("trusted_ports") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for (i, item) in items.into_iter().enumerate() {
                match item {
                    Value::String(device) if !device.is_empty() => {
                        let mut fields = Map::new();
                        fields.insert("device".into(), Value::String(plug.tap(&device)));
                        fields.insert(RPC_DEVICE.into(), Value::String(device.clone()));
                        fields.insert("id".into(), Value::String(device));
                        out.push(RawObject {
                            kind: Kind::TrustedPort,
                            origin: format!("{origin} trusted_ports[{i}]"),
                            fields,
                            rpc: true,
                        });
                    }
                    other => errs.push(
                        "document",
                        origin,
                        format!("trusted_ports[{i}]"),
                        show(&other),
                        "expected a device name",
                    ),
                }
            }
        }
        Some(v) => errs.push(
            "document",
            origin,
            "trusted_ports",
            show(&v),
            "expected a list of device names",
        ),
    }
}

/// One port dict. Its id is `id`, else the device; its tap follows `plug`.
fn device(
    origin: &str,
    key: Option<&str>,
    port: Value,
    plug: Plug,
    out: &mut Vec<RawObject>,
    errs: &mut ValidationErrors,
) {
    let Value::Object(mut fields) = port else {
        errs.push(
            "port",
            &format!("<{origin}>"),
            "",
            show(&port),
            "expected a port dict",
        );
        return;
    };
    let device = match (fields.get("device"), key) {
        (Some(Value::String(d)), _) if !d.is_empty() => d.clone(),
        (None | Some(Value::Null), Some(k)) => k.to_string(),
        (v, _) => {
            let v = v.cloned().unwrap_or(Value::Null);
            let id = fields
                .get("id")
                .and_then(Value::as_str)
                .map_or_else(|| format!("<{origin}>"), str::to_string);
            errs.push("port", &id, "device", show(&v), "missing or not a device name");
            return;
        }
    };
    if let Some(k) = key
        && k != device
    {
        errs.push(
            "port",
            &device,
            "device",
            show(&Value::String(device.clone())),
            format!("listed under device {k:?}"),
        );
    }
    if !matches!(fields.get("id"), Some(Value::String(s)) if !s.is_empty()) {
        fields.insert("id".into(), Value::String(device.clone()));
    }
    fields.insert("device".into(), Value::String(plug.tap(&device)));
    fields.insert(RPC_DEVICE.into(), Value::String(device));
    // The server's provider rules; sg derives them itself (module docs).
    fields.remove("security_group_rules");
    out.push(RawObject {
        kind: Kind::Port,
        origin: origin.to_string(),
        fields,
        rpc: true,
    });
}

/// One group's rule list, as a security group object of the API shape whose rules keep the
/// agent's keys (the validator reads them with `RawObject::rpc`).
fn security_group(
    origin: &str,
    sg_id: String,
    rules: Value,
    out: &mut Vec<RawObject>,
    errs: &mut ValidationErrors,
) {
    let Value::Array(items) = rules else {
        errs.push(
            "security_group",
            &sg_id,
            "rules",
            show(&rules),
            "expected a list of rule dicts",
        );
        return;
    };
    let mut converted: Vec<Value> = Vec::new();
    let mut seen: Vec<String> = Vec::new();
    let mut stateful: Option<Value> = None;
    for (i, item) in items.into_iter().enumerate() {
        let Value::Object(mut rule) = item else {
            errs.push(
                "security_group",
                &sg_id,
                format!("rules[{i}]"),
                show(&item),
                "expected a rule dict",
            );
            continue;
        };
        let id = rule_id(&rule);
        if seen.contains(&id) {
            continue;
        }
        seen.push(id.clone());
        if stateful.is_none() {
            stateful = rule.get("stateful").cloned();
        }
        rule.insert("id".into(), Value::String(id));
        if !rule.contains_key("security_group_id") {
            rule.insert("security_group_id".into(), Value::String(sg_id.clone()));
        }
        converted.push(Value::Object(rule));
    }
    let mut fields = Map::new();
    fields.insert("id".into(), Value::String(sg_id));
    // The group's flag travels on each rule; a group without rules is stateful (Neutron's
    // `_are_sg_rules_stateful`).
    fields.insert("stateful".into(), stateful.unwrap_or(Value::Bool(true)));
    fields.insert("security_group_rules".into(), Value::Array(converted));
    out.push(RawObject {
        kind: Kind::SecurityGroup,
        origin: origin.to_string(),
        fields,
        rpc: true,
    });
}
