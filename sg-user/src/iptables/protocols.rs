//! The protocol names Neutron's iptables driver prints after `-p` (`_iptables_protocol_name`).
//!
//! Neutron starts from neutron-lib's `IPTABLES_PROTOCOL_NAME_MAP`, overlays the host's
//! `/etc/protocols` (number → official name, a later line for the same number wins, as in its
//! dict update over `getprotoent()`), then maps `ipip` to whatever protocol 4 is called there
//! (`ipencap` on Debian, `ipv4` on RHEL). Values not in the map are printed as stored. sg reads
//! the same file, so the output follows the host as Neutron's does.

use std::collections::HashMap;
use std::sync::OnceLock;

/// neutron-lib `IPTABLES_PROTOCOL_NAME_MAP` (constants.py), without `'0': None`: protocol 0 never
/// reaches the lookup (`_iptables_protocol_name` returns no `-p` for it first).
const NEUTRON_LIB_MAP: &[(&str, &str)] = &[
    ("ipv6-encap", "ipv6"),
    ("icmpv6", "ipv6-icmp"),
    ("pgm", "113"),
    ("1", "icmp"),
    ("2", "igmp"),
    ("3", "ggp"),
    ("4", "ipencap"),
    ("5", "st"),
    ("6", "tcp"),
    ("8", "egp"),
    ("9", "igp"),
    ("12", "pup"),
    ("17", "udp"),
    ("20", "hmp"),
    ("22", "xns-idp"),
    ("27", "rdp"),
    ("29", "iso-tp4"),
    ("33", "dccp"),
    ("36", "xtp"),
    ("37", "ddp"),
    ("38", "idpr-cmtp"),
    ("41", "ipv6"),
    ("43", "ipv6-route"),
    ("44", "ipv6-frag"),
    ("45", "idrp"),
    ("46", "rsvp"),
    ("47", "gre"),
    ("50", "esp"),
    ("51", "ah"),
    ("57", "skip"),
    ("58", "ipv6-icmp"),
    ("59", "ipv6-nonxt"),
    ("60", "ipv6-opts"),
    ("73", "rspf"),
    ("81", "vmtp"),
    ("88", "eigrp"),
    ("89", "ospf"),
    ("93", "ax.25"),
    ("94", "ipip"),
    ("97", "etherip"),
    ("98", "encap"),
    ("103", "pim"),
    ("108", "ipcomp"),
    ("112", "vrrp"),
    ("115", "l2tp"),
    ("124", "isis"),
    ("132", "sctp"),
    ("133", "fc"),
    ("135", "mobility-header"),
    ("136", "udplite"),
    ("137", "mpls-in-ip"),
    ("138", "manet"),
    ("139", "hip"),
    ("140", "shim6"),
    ("141", "wesp"),
    ("142", "rohc"),
];

/// The name map for `protocols_text` (the contents of an `/etc/protocols`).
pub fn name_map(protocols_text: &str) -> HashMap<String, String> {
    let mut map: HashMap<String, String> = NEUTRON_LIB_MAP
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for line in protocols_text.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut fields = line.split_whitespace();
        if let (Some(name), Some(num)) = (fields.next(), fields.next())
            && num.bytes().all(|b| b.is_ascii_digit())
        {
            // str(int(p_proto)): "004" would be "4"
            let num = num.trim_start_matches('0');
            let num = if num.is_empty() { "0" } else { num };
            map.insert(num.to_string(), name.to_string());
        }
    }
    let four = map.get("4").cloned().unwrap_or_else(|| "ipencap".into());
    map.insert("ipip".into(), four);
    map
}

/// The host's map, read once from `/etc/protocols` (neutron-lib's alone if it is missing).
pub fn host_map() -> &'static HashMap<String, String> {
    static MAP: OnceLock<HashMap<String, String>> = OnceLock::new();
    MAP.get_or_init(|| name_map(&std::fs::read_to_string("/etc/protocols").unwrap_or_default()))
}

/// `_iptables_protocol_name`: None for "any" (no protocol, `""` or `"0"`).
pub fn iptables_name<'a>(map: &'a HashMap<String, String>, protocol: Option<&'a str>) -> Option<&'a str> {
    match protocol {
        None | Some("") | Some("0") => None,
        Some(p) => Some(map.get(p).map(String::as_str).unwrap_or(p)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debian_names() {
        let m = name_map("ip 0 IP\nhopopt 0 HOPOPT\nipencap 4 IP-ENCAP\ntcp 6 TCP # c\nipip 94 IPIP\n");
        assert_eq!(iptables_name(&m, Some("6")), Some("tcp"));
        assert_eq!(iptables_name(&m, Some("ipip")), Some("ipencap"));
        assert_eq!(iptables_name(&m, Some("94")), Some("ipip"));
        assert_eq!(iptables_name(&m, Some("pgm")), Some("113"));
        assert_eq!(iptables_name(&m, Some("hopopt")), Some("hopopt"));
        assert_eq!(iptables_name(&m, Some("0")), None);
        assert_eq!(iptables_name(&m, Some("icmpv6")), Some("ipv6-icmp"));
        let rhel = name_map("ipv4 4 IPv4\n");
        assert_eq!(iptables_name(&rhel, Some("ipip")), Some("ipv4"));
    }
}
