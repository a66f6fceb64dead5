//! Protocol tables and conversions from neutron-lib `constants.py` and Neutron's
//! `extensions/securitygroup.py` / `db/securitygroups_db.py`.

/// `IP_PROTOCOL_MAP`, in neutron-lib's order: every protocol name the API accepts.
pub const IP_PROTOCOL_MAP: [(&str, u8); 25] = [
    ("ah", 51),
    ("dccp", 33),
    ("egp", 8),
    ("esp", 50),
    ("gre", 47),
    ("hopopt", 0),
    ("icmp", 1),
    ("igmp", 2),
    ("ip", 0),
    ("ipip", 4),
    ("ipv6-encap", 41),
    ("ipv6-frag", 44),
    ("ipv6-icmp", 58),
    ("icmpv6", 58),
    ("ipv6-nonxt", 59),
    ("ipv6-opts", 60),
    ("ipv6-route", 43),
    ("ospf", 89),
    ("pgm", 113),
    ("rsvp", 46),
    ("sctp", 132),
    ("tcp", 6),
    ("udp", 17),
    ("udplite", 136),
    ("vrrp", 112),
];

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_DCCP: u8 = 33;
pub const PROTO_IPV6_ICMP: u8 = 58;
pub const PROTO_SCTP: u8 = 132;
pub const PROTO_UDPLITE: u8 = 136;

/// `SG_PORT_PROTO_NUMS`: protocols whose port range is a destination-port range.
pub fn is_port_protocol(num: u8) -> bool {
    matches!(
        num,
        PROTO_DCCP | PROTO_SCTP | PROTO_TCP | PROTO_UDP | PROTO_UDPLITE
    )
}

/// The minimal aligned blocks covering `lo..=hi`, as (first port, prefix length in bits): how
/// a port range becomes LPM prefixes.
pub fn port_blocks(lo: u16, hi: u16) -> Vec<(u16, u8)> {
    let (mut lo, hi) = (u32::from(lo), u32::from(hi));
    let mut out = Vec::new();
    while lo <= hi {
        let mut size = if lo == 0 {
            1 << 16
        } else {
            1u32 << lo.trailing_zeros().min(16)
        };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        out.push((lo as u16, (16 - size.trailing_zeros()) as u8));
        lo += size;
    }
    out
}

/// ICMP and ICMPv6: the port range is (type, code).
pub fn is_icmp_protocol(num: u8) -> bool {
    matches!(num, PROTO_ICMP | PROTO_IPV6_ICMP)
}

pub fn name_to_number(name: &str) -> Option<u8> {
    IP_PROTOCOL_MAP.iter().find(|(n, _)| *n == name).map(|&(_, v)| v)
}

/// `IP_PROTOCOL_NUM_TO_NAME_MAP`: built by a dict comprehension over `IP_PROTOCOL_MAP` without
/// `icmpv6`, so for number 0 the later name, `ip`, wins over `hopopt`.
pub fn number_to_name(num: &str) -> Option<&'static str> {
    IP_PROTOCOL_MAP
        .iter()
        .rev()
        .filter(|(n, _)| *n != "icmpv6")
        .find(|(_, v)| v.to_string() == num)
        .map(|&(n, _)| n)
}

/// Why a protocol value was refused by `convert_protocol`.
pub const PROTOCOL_REASON: &str = "security group rule protocol not supported: only 'any', \
     the names of neutron-lib's IP_PROTOCOL_MAP and integers 0 to 255 are supported";

/// The API's `convert_protocol`: `None`/`"any"` mean any protocol, integers 0-255 are kept
/// as their decimal string, names are lower-cased. Returns `Ok(None)` for "any".
///
/// Two deliberate differences from Neutron, both about inputs that only a hand-made API call
/// can produce: "ANY" in another case is also "any" (Neutron would store the string `any`,
/// which its iptables driver then renders as `-p any`, an invalid rule), and decimal strings
/// with leading zeros are refused (Neutron stores `"06"` verbatim, and its iptables driver,
/// not finding `"06"` in its name map, silently drops the port match).
pub fn convert_protocol(value: &serde_json::Value) -> Result<Option<String>, String> {
    use serde_json::Value;
    match value {
        Value::Null => Ok(None),
        Value::Number(n) => match n.as_u64() {
            Some(v) if v <= 255 => Ok(Some(v.to_string())),
            _ => Err(PROTOCOL_REASON.to_string()),
        },
        Value::String(s) if s.eq_ignore_ascii_case("any") => Ok(None),
        Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            if s.len() > 1 && s.starts_with('0') {
                return Err("protocol numbers with leading zeros are refused: Neutron keeps \
                            the string and its iptables driver then drops the port match"
                    .to_string());
            }
            match s.parse::<u32>() {
                Ok(v) if v <= 255 => Ok(Some(s.clone())),
                _ => Err(PROTOCOL_REASON.to_string()),
            }
        }
        Value::String(s) => {
            let lower = s.to_ascii_lowercase();
            if name_to_number(&lower).is_some() {
                Ok(Some(lower))
            } else {
                Err(PROTOCOL_REASON.to_string())
            }
        }
        _ => Err(PROTOCOL_REASON.to_string()),
    }
}

/// `_make_canonical_ipv6_icmp_protocol`: IPv6 rules store `icmp`/`icmpv6` as `ipv6-icmp` and
/// `"1"` as `"58"`.
pub fn canonical_ipv6_icmp(protocol: String, ipv6: bool) -> String {
    if ipv6 {
        if protocol == "icmp" || protocol == "icmpv6" {
            return "ipv6-icmp".to_string();
        }
        if protocol == "1" {
            return "58".to_string();
        }
    }
    protocol
}

/// `_get_ip_proto_number` for a stored protocol string (already converted).
pub fn stored_to_number(protocol: &str) -> u8 {
    if let Some(n) = name_to_number(protocol) {
        return n;
    }
    // convert_protocol only lets decimal 0-255 through otherwise.
    protocol.parse().unwrap_or(0)
}

/// `_get_ip_proto_name_and_num`, used by the duplicate-rule comparison: names and numbers
/// of the same protocol compare equal, but `hopopt` and `"0"` (= `ip`) do not.
pub fn name_and_num(protocol: &str, ipv6: bool) -> (String, String) {
    let p = canonical_ipv6_icmp(protocol.to_string(), ipv6);
    if let Some(n) = name_to_number(&p) {
        return (p, n.to_string());
    }
    if let Some(name) = number_to_name(&p) {
        return (name.to_string(), p);
    }
    (p.clone(), p)
}

/// `_validate_ethertype_and_protocol`: these are refused on IPv4 rules.
pub fn is_ipv6_only(protocol: &str) -> bool {
    matches!(
        protocol,
        "ipv6-encap"
            | "ipv6-frag"
            | "ipv6-icmp"
            | "icmpv6"
            | "ipv6-nonxt"
            | "ipv6-opts"
            | "ipv6-route"
            | "41"
            | "44"
            | "58"
            | "59"
            | "60"
            | "43"
    )
}

/// A short name for a protocol number in human text.
pub fn display_name(num: u8) -> String {
    match num {
        PROTO_ICMP => "icmp".into(),
        PROTO_IPV6_ICMP => "ipv6-icmp".into(),
        _ => number_to_name(&num.to_string())
            .map(str::to_string)
            .unwrap_or_else(|| num.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn convert_like_the_api() {
        assert_eq!(convert_protocol(&json!(null)), Ok(None));
        assert_eq!(convert_protocol(&json!("any")), Ok(None));
        assert_eq!(convert_protocol(&json!("TCP")), Ok(Some("tcp".into())));
        assert_eq!(convert_protocol(&json!(6)), Ok(Some("6".into())));
        assert_eq!(convert_protocol(&json!("112")), Ok(Some("112".into())));
        assert!(convert_protocol(&json!(256)).is_err());
        assert!(convert_protocol(&json!("")).is_err());
        assert!(convert_protocol(&json!("foo")).is_err());
        assert!(convert_protocol(&json!(-1)).is_err());
        assert!(convert_protocol(&json!(true)).is_err());
        // Deliberate differences (tests/DIFFERENCES.md D7).
        assert!(convert_protocol(&json!("06")).is_err());
        assert_eq!(convert_protocol(&json!("ANY")), Ok(None));
    }

    #[test]
    fn names_and_numbers_compare_like_neutron() {
        assert_eq!(name_and_num("6", false), name_and_num("tcp", false));
        assert_eq!(name_and_num("0", false), ("ip".into(), "0".into()));
        assert_ne!(name_and_num("hopopt", false), name_and_num("0", false));
        assert_eq!(name_and_num("58", true), name_and_num("ipv6-icmp", true));
        assert_eq!(name_and_num("200", false), ("200".into(), "200".into()));
        assert_eq!(stored_to_number("icmpv6"), 58);
        assert_eq!(stored_to_number("vrrp"), 112);
        assert_eq!(stored_to_number("132"), 132);
    }
}
