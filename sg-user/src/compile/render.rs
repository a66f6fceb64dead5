//! `sg compile` output: a table for people and JSON for machines. Both list every map entry;
//! the JSON carries each key and value as the exact bytes written to the map (hex) next to
//! their decoded fields.

use std::fmt::Write;

use serde::Serialize;
use sg_common::{
    ADDR_KEY_FIXED_BITS, ADDR_KIND_ARP_V4, ADDR_KIND_FIXED_V4, ADDR_KIND_FIXED_V6, ADDR_KIND_MAC,
    ADDR_KIND_PAIR_V4, ADDR_KIND_PAIR_V6, AddrKey, CLASS_KEY_FIXED_BITS, ClassKey, FAMILY_V4,
    PORT_F_ARP_PROTECT, PORT_F_FILTERED, PORT_F_SPOOF_V4, PORT_F_SPOOF_V6, PORT_F_SRC_PORTS, PORT_F_STATEFUL,
    PORT_F_V6_FIXED, SERVICE_KEY_ANY_PROTO_BITS, SERVICE_KEY_PROTO_BITS, SRC_PORT_KEY_PROTO_BITS, ServiceKey,
    SrcPortKey,
};

use super::{Compiled, MapStats};
use crate::model::protocol::{display_name, is_icmp_protocol};
use crate::model::{MacAddr, addr};

fn hex<T: bytemuck::Pod>(v: &T) -> String {
    bytemuck::bytes_of(v).iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

pub fn flag_names(flags: u32) -> Vec<&'static str> {
    [
        (PORT_F_FILTERED, "FILTERED"),
        (PORT_F_STATEFUL, "STATEFUL"),
        (PORT_F_SPOOF_V4, "SPOOF_V4"),
        (PORT_F_SPOOF_V6, "SPOOF_V6"),
        (PORT_F_V6_FIXED, "V6_FIXED"),
        (PORT_F_ARP_PROTECT, "ARP_PROTECT"),
        (PORT_F_SRC_PORTS, "SRC_PORTS"),
    ]
    .iter()
    .filter(|(f, _)| flags & f != 0)
    .map(|&(_, n)| n)
    .collect()
}

fn dir_name(d: u8) -> &'static str {
    if d == sg_common::DIR_INGRESS {
        "ingress"
    } else {
        "egress"
    }
}

/// An address field and prefix length as CIDR text (`family` 4 or 6).
fn cidr(addr16: [u8; 16], len: u32, family: u8) -> String {
    let ip = if family == FAMILY_V4 {
        std::net::IpAddr::from([addr16[0], addr16[1], addr16[2], addr16[3]])
    } else {
        std::net::IpAddr::from(addr16)
    };
    format!("{}/{}", addr::ip_to_string(ip), len)
}

fn addr_kind(kind: u8) -> (&'static str, u8) {
    match kind {
        ADDR_KIND_MAC => ("mac", 0),
        ADDR_KIND_PAIR_V4 => ("pair_v4", 4),
        ADDR_KIND_PAIR_V6 => ("pair_v6", 6),
        ADDR_KIND_ARP_V4 => ("arp_v4", 4),
        ADDR_KIND_FIXED_V4 => ("fixed_v4", 4),
        ADDR_KIND_FIXED_V6 => ("fixed_v6", 6),
        _ => ("?", 0),
    }
}

/// The address part of an SG_ADDRS entry, if any.
fn addr_text(key: &AddrKey, prefix_len: u32) -> Option<String> {
    let (_, family) = addr_kind(key.kind);
    (family != 0).then(|| {
        let len = prefix_len - ADDR_KEY_FIXED_BITS;
        if len == 0 && matches!(key.kind, ADDR_KIND_PAIR_V4 | ADDR_KIND_PAIR_V6) {
            "any".to_string()
        } else {
            cidr(key.addr, len, family)
        }
    })
}

fn class_addr(key: &ClassKey, prefix_len: u32) -> String {
    cidr(key.addr, prefix_len - CLASS_KEY_FIXED_BITS, key.family)
}

/// The service part of an SG_SERVICES entry: `any`, `tcp`, `tcp 1024-2047`, `icmp type 8`,
/// `icmp type 8 code 0`.
fn service_text(key: &ServiceKey, prefix_len: u32) -> String {
    if prefix_len == SERVICE_KEY_ANY_PROTO_BITS {
        return "any".to_string();
    }
    let name = display_name(key.proto);
    if prefix_len == SERVICE_KEY_PROTO_BITS {
        return name;
    }
    let port = u16::from_be_bytes(key.port_be);
    let bits = prefix_len - SERVICE_KEY_PROTO_BITS;
    if is_icmp_protocol(key.proto) {
        let (t, c) = (port >> 8, port & 0xff);
        if bits == 16 {
            format!("{name} type {t} code {c}")
        } else {
            format!("{name} type {t}")
        }
    } else {
        let hi = port | (((1u32 << (16 - bits)) - 1) as u16);
        if hi == port {
            format!("{name} {port}")
        } else {
            format!("{name} {port}-{hi}")
        }
    }
}

/// An SG_SRC_PORTS entry: `tcp sport 12345 dport 1024-2047`, `udp sport 32768-65535`.
fn src_port_text(key: &SrcPortKey, prefix_len: u32) -> String {
    let name = display_name(key.proto);
    let range = |v: u16, bits: u32| {
        let hi = if bits == 0 {
            u16::MAX
        } else {
            v | (((1u32 << (16 - bits)) - 1) as u16)
        };
        if hi == v {
            v.to_string()
        } else {
            format!("{v}-{hi}")
        }
    };
    let bits = prefix_len - SRC_PORT_KEY_PROTO_BITS;
    let sport = range(u16::from_be_bytes(key.sport_be), bits.min(16));
    if bits <= 16 {
        format!("{name} sport {sport}")
    } else {
        format!(
            "{name} sport {sport} dport {}",
            range(u16::from_be_bytes(key.dport_be), bits - 16)
        )
    }
}

#[derive(Serialize)]
struct JsonCompiled<'a> {
    host: &'a str,
    stats: JsonStats,
    ports: Vec<JsonPort<'a>>,
    policies: Vec<JsonPolicy<'a>>,
    classes: Vec<JsonClass>,
    rules: Vec<JsonRule<'a>>,
}

#[derive(Serialize)]
struct JsonStats {
    ports: JsonMap,
    addrs: JsonMap,
    classes: JsonMap,
    services: JsonMap,
    #[serde(skip_serializing_if = "Option::is_none")]
    src_ports: Option<JsonMap>,
    policies: usize,
    class_ids: usize,
    rules: usize,
}

#[derive(Serialize)]
struct JsonMap {
    map: &'static str,
    entries: usize,
    bytes: usize,
}

#[derive(Serialize)]
struct JsonPort<'a> {
    id: &'a str,
    device: &'a str,
    network_id: &'a str,
    policy: u32,
    addr_id: u32,
    port_idx: u32,
    flags: Vec<&'static str>,
    mac: String,
    value: String,
    addrs: Vec<JsonAddr>,
}

#[derive(Serialize)]
struct JsonAddr {
    prefix_len: u32,
    kind: &'static str,
    mac: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    addr: Option<String>,
    index: u32,
    key: String,
    value: String,
}

#[derive(Serialize)]
struct JsonPolicy<'a> {
    id: u32,
    security_groups: &'a [String],
    classes: Vec<JsonClassEntry>,
    services: Vec<JsonServiceEntry>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    src_ports: Vec<JsonServiceEntry>,
}

#[derive(Serialize)]
struct JsonClassEntry {
    prefix_len: u32,
    dir: &'static str,
    family: u8,
    addr: String,
    class: u32,
    key: String,
    value: String,
}

#[derive(Serialize)]
struct JsonServiceEntry {
    prefix_len: u32,
    class: u32,
    dir: &'static str,
    family: u8,
    service: String,
    rule: u32,
    key: String,
    value: String,
}

#[derive(Serialize)]
struct JsonClass {
    id: u32,
    selectors: Vec<String>,
}

#[derive(Serialize)]
struct JsonRule<'a> {
    index: u32,
    security_group_id: &'a str,
    rule_id: &'a str,
    text: &'a str,
}

fn json_map(map: &'static str, s: MapStats) -> JsonMap {
    JsonMap {
        map,
        entries: s.entries,
        bytes: s.bytes,
    }
}

/// Pretty JSON, newline-terminated. Same input, same bytes.
pub fn render_json(c: &Compiled) -> String {
    let doc = JsonCompiled {
        host: &c.host,
        stats: JsonStats {
            ports: json_map(sg_common::MAP_PORTS, c.stats.ports),
            addrs: json_map(sg_common::MAP_ADDRS, c.stats.addrs),
            classes: json_map(sg_common::MAP_CLASSES, c.stats.classes),
            services: json_map(sg_common::MAP_SERVICES, c.stats.services),
            src_ports: (c.stats.src_ports.entries > 0)
                .then(|| json_map(sg_common::MAP_SRC_PORTS, c.stats.src_ports)),
            policies: c.stats.policies,
            class_ids: c.stats.class_ids,
            rules: c.stats.rules,
        },
        ports: c
            .ports
            .iter()
            .map(|p| JsonPort {
                id: &p.id,
                device: &p.device,
                network_id: &p.network_id,
                policy: p.info.policy,
                addr_id: p.info.addr_id,
                port_idx: p.info.port_idx,
                flags: flag_names(p.info.flags),
                mac: MacAddr(p.info.mac).to_string(),
                value: hex(&p.info),
                addrs: p
                    .addrs
                    .iter()
                    .map(|e| JsonAddr {
                        prefix_len: e.prefix_len,
                        kind: addr_kind(e.key.kind).0,
                        mac: MacAddr(e.key.mac).to_string(),
                        addr: addr_text(&e.key, e.prefix_len),
                        index: e.value.index,
                        key: hex(&e.key),
                        value: hex(&e.value),
                    })
                    .collect(),
            })
            .collect(),
        policies: c
            .policies
            .iter()
            .map(|p| JsonPolicy {
                id: p.id,
                security_groups: &p.security_groups,
                classes: p
                    .classes
                    .iter()
                    .map(|e| JsonClassEntry {
                        prefix_len: e.prefix_len,
                        dir: dir_name(e.key.dir),
                        family: e.key.family,
                        addr: class_addr(&e.key, e.prefix_len),
                        class: e.value.class,
                        key: hex(&e.key),
                        value: hex(&e.value),
                    })
                    .collect(),
                services: p
                    .services
                    .iter()
                    .map(|e| JsonServiceEntry {
                        prefix_len: e.prefix_len,
                        class: e.key.class,
                        dir: dir_name(e.key.dir),
                        family: e.key.family,
                        service: service_text(&e.key, e.prefix_len),
                        rule: e.value.rule,
                        key: hex(&e.key),
                        value: hex(&e.value),
                    })
                    .collect(),
                src_ports: p
                    .src_ports
                    .iter()
                    .map(|e| JsonServiceEntry {
                        prefix_len: e.prefix_len,
                        class: e.key.class,
                        dir: dir_name(e.key.dir),
                        family: e.key.family,
                        service: src_port_text(&e.key, e.prefix_len),
                        rule: e.value.rule,
                        key: hex(&e.key),
                        value: hex(&e.value),
                    })
                    .collect(),
            })
            .collect(),
        classes: c
            .classes
            .iter()
            .map(|k| JsonClass {
                id: k.id,
                selectors: k.selectors.iter().map(|s| s.to_string()).collect(),
            })
            .collect(),
        rules: c
            .rules
            .iter()
            .map(|r| JsonRule {
                index: r.index,
                security_group_id: &r.security_group_id,
                rule_id: &r.rule_id,
                text: &r.text,
            })
            .collect(),
    };
    let mut s = serde_json::to_string_pretty(&doc).expect("plain data serialises");
    s.push('\n');
    s
}

/// A plain-text report: ports, then each policy's classes and services, then the class and
/// rule tables and the map sizes.
pub fn render_table(c: &Compiled) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "host {}", c.host);
    let _ = writeln!(s, "\nPORTS ({})", c.ports.len());
    let _ = writeln!(
        s,
        "  {:<15} {:>6} {:>5}  {:<17}  {:<36}  flags",
        "device", "policy", "addrs", "mac", "port"
    );
    if c.ports.is_empty() {
        let _ = writeln!(
            s,
            "  (no port is bound to host {} or unbound; see --host)",
            c.host
        );
    }
    for p in &c.ports {
        let flags = flag_names(p.info.flags);
        let flags = if flags.is_empty() {
            "- (not filtered)".to_string()
        } else {
            flags.join(",")
        };
        let _ = writeln!(
            s,
            "  {:<15} {:>6} {:>5}  {:<17}  {:<36}  {}",
            p.device,
            p.info.policy,
            p.info.addr_id,
            MacAddr(p.info.mac).to_string(),
            p.id,
            flags
        );
        for e in &p.addrs {
            let (kind, _) = addr_kind(e.key.kind);
            let mut line = format!("      {kind:<8} {}", MacAddr(e.key.mac));
            if let Some(a) = addr_text(&e.key, e.prefix_len) {
                let _ = write!(line, " {a}");
            }
            if e.value.index != 0 {
                let _ = write!(line, "  (pair {})", e.value.index);
            }
            let _ = writeln!(s, "{line}");
        }
    }
    for p in &c.policies {
        let _ = writeln!(
            s,
            "\nPOLICY {}  groups: {}",
            p.id,
            if p.security_groups.is_empty() {
                "-".to_string()
            } else {
                p.security_groups.join(", ")
            }
        );
        let _ = writeln!(s, "  classes ({}):", p.classes.len());
        for e in &p.classes {
            let _ = writeln!(
                s,
                "    {:<7} IPv{}  {:<43} -> class {}",
                dir_name(e.key.dir),
                e.key.family,
                class_addr(&e.key, e.prefix_len),
                e.value.class
            );
        }
        let _ = writeln!(s, "  services ({}):", p.services.len());
        for e in &p.services {
            let _ = writeln!(
                s,
                "    {:<7} IPv{}  class {:<4} {:<30} -> rule {}",
                dir_name(e.key.dir),
                e.key.family,
                e.key.class,
                service_text(&e.key, e.prefix_len),
                e.value.rule
            );
        }
        if !p.src_ports.is_empty() {
            let _ = writeln!(s, "  source ports ({}):", p.src_ports.len());
        }
        for e in &p.src_ports {
            let _ = writeln!(
                s,
                "    {:<7} IPv{}  class {:<4} {:<30} -> rule {}",
                dir_name(e.key.dir),
                e.key.family,
                e.key.class,
                src_port_text(&e.key, e.prefix_len),
                e.value.rule
            );
        }
    }
    let _ = writeln!(s, "\nCLASSES ({})", c.classes.len());
    for k in &c.classes {
        let sels: Vec<String> = k.selectors.iter().map(|x| x.to_string()).collect();
        let _ = writeln!(s, "  {:>4}  {}", k.id, sels.join(" | "));
    }
    let _ = writeln!(s, "\nRULES ({})", c.rules.len());
    for r in &c.rules {
        let _ = writeln!(
            s,
            "  {:>4}  {}  {}  {}",
            r.index, r.security_group_id, r.rule_id, r.text
        );
    }
    let _ = writeln!(s, "\nMAPS");
    for (name, m) in [
        (sg_common::MAP_PORTS, c.stats.ports),
        (sg_common::MAP_ADDRS, c.stats.addrs),
        (sg_common::MAP_CLASSES, c.stats.classes),
        (sg_common::MAP_SERVICES, c.stats.services),
        (sg_common::MAP_SRC_PORTS, c.stats.src_ports),
    ] {
        if name == sg_common::MAP_SRC_PORTS && m.entries == 0 {
            continue;
        }
        let _ = writeln!(s, "  {name:<12} {:>8} entries {:>10} bytes", m.entries, m.bytes);
    }
    let _ = writeln!(
        s,
        "  policies {}, classes {}, rules {}",
        c.stats.policies, c.stats.class_ids, c.stats.rules
    );
    s
}
