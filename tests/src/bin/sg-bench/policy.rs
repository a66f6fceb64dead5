//! The inputs every section measures: Neutron documents built here and run through sg's real
//! validator and compiler (and, for iptables, sg's Neutron parity renderer).
//!
//! A port's ingress rules are `n - 1` *filler* rules, then the *match* rule last: UDP 9000 from
//! 203.0.113.0/24, the one rule the measured new flows need. Fillers mix what a large security
//! group holds, cycling through eight kinds (`k` is the rule's number, `j = k / 8`):
//!
//! | k % 8 | rule |
//! |---|---|
//! | 0 | TCP one port, from a /24 in 10.0.0.0/10 |
//! | 1 | UDP port range, from a /24 in 172.16.0.0/12 |
//! | 2 | ICMP type and code, from a /28 in 10.64.0.0/10 |
//! | 3 | TCP port range, from the remote group `peers` (ports on other hosts) |
//! | 4 | TCP one port from anywhere (the first four), else TCP 443 from a /32 in 10.192.0.0/10 |
//! | 5 | UDP one port, from the address group `partners` (50 /24s in 100.64.0.0/10) |
//! | 6 | any protocol, from a /28 in 192.168.0.0/16 |
//! | 7 | TCP port range, from a /16 in 10.0.0.0/10 (the first eight nest over kind-0 /24s) |
//!
//! sg's policy size grows with the rules that apply to each remote class: a rule from anywhere
//! is copied into every class, and a rule from a /16 into every class nested in it. A group
//! with hundreds of rules from anywhere and thousands of prefixes would multiply; this mix
//! keeps such rules to a handful, which is what large security groups (allow-lists of
//! prefixes) usually look like.
//!
//! No filler admits a packet from 203.0.113.0/24 to UDP 9000 or 9999, so with iptables every
//! measured new flow walks all `n` rules, and with sg it takes its two lookups. Every port also
//! has Neutron's default egress rule (egress IPv4, any), in the group `egress`.

use serde_json::{Value, json};

/// The compute node's name (`binding:host_id` of local ports).
pub const HOST: &str = "bench-host";
/// The network of every local port; the bridge is `brq` + its first 11 characters.
pub const NETWORK: &str = "5e1ec7ed-0b0e-4c4e-9a11-000000000001";
/// Where the measured flows come from.
pub const SOURCE_NET: &str = "203.0.113.0/24";
/// The UDP port the match rule admits, and one that no rule admits.
pub const MATCH_PORT: u16 = 9000;
pub const DENY_PORT: u16 = 9999;
/// The remote group whose members are the ports of other hosts.
pub const PEERS: &str = "peers";

/// Filler rule `k` of group `group` (see the module table).
pub fn filler(group: &str, k: usize) -> Value {
    let j = k / 8;
    let mut r = json!({
        "id": format!("{group}-r{k}"),
        "direction": "ingress",
        "ethertype": "IPv4",
    });
    let ports = |r: &mut Value, lo: usize, hi: usize| {
        r["port_range_min"] = json!(lo);
        r["port_range_max"] = json!(hi);
    };
    match k % 8 {
        0 => {
            r["protocol"] = json!("tcp");
            ports(&mut r, 1000 + j % 30000, 1000 + j % 30000);
            r["remote_ip_prefix"] = json!(format!("10.{}.{}.0/24", j / 256 % 64, j % 256));
        }
        1 => {
            let lo = 2000 + (j * 37) % 20000;
            r["protocol"] = json!("udp");
            ports(&mut r, lo, lo + j % 64);
            r["remote_ip_prefix"] = json!(format!("172.{}.{}.0/24", 16 + j / 256 % 16, j % 256));
        }
        2 => {
            r["protocol"] = json!("icmp");
            ports(&mut r, j % 40, j % 8);
            r["remote_ip_prefix"] = json!(format!("10.{}.{}.16/28", 64 + j / 256 % 64, j % 256));
        }
        3 => {
            r["protocol"] = json!("tcp");
            ports(&mut r, 30000 + j % 30000, 30000 + j % 30000 + j % 16);
            r["remote_group_id"] = json!(PEERS);
        }
        4 if j < 16 && j.is_multiple_of(4) => {
            r["protocol"] = json!("tcp");
            ports(&mut r, 20000 + j % 10000, 20000 + j % 10000);
        }
        4 => {
            r["protocol"] = json!("tcp");
            ports(&mut r, 443, 443);
            r["remote_ip_prefix"] = json!(format!("10.{}.{}.7/32", 192 + j / 256 % 64, j % 256));
        }
        5 => {
            r["protocol"] = json!("udp");
            ports(&mut r, 10000 + j % 50000, 10000 + j % 50000);
            r["remote_address_group_id"] = json!("partners");
        }
        6 => {
            r["remote_ip_prefix"] = json!(format!("192.168.{}.{}/28", j / 16 % 256, j % 16 * 16));
        }
        _ => {
            r["protocol"] = json!("tcp");
            ports(&mut r, 8000 + j % 1000, 8000 + j % 1000 + 80);
            let second = if j < 8 { j } else { 16 + j % 48 };
            r["remote_ip_prefix"] = json!(format!("10.{second}.0.0/16"));
        }
    }
    r
}

/// The rule the measured flows match: UDP 9000 from 203.0.113.0/24.
pub fn match_rule(group: &str) -> Value {
    json!({
        "id": format!("{group}-match"),
        "direction": "ingress",
        "ethertype": "IPv4",
        "protocol": "udp",
        "port_range_min": MATCH_PORT,
        "port_range_max": MATCH_PORT,
        "remote_ip_prefix": SOURCE_NET,
    })
}

/// `n` ingress rules: fillers `first..first + n - 1`, then the match rule.
pub fn ingress_rules(group: &str, n: usize, first: usize) -> Vec<Value> {
    let mut v: Vec<Value> = (first..first + n.saturating_sub(1))
        .map(|k| filler(group, k))
        .collect();
    if n > 0 {
        v.push(match_rule(group));
    }
    v
}

/// `n` filler rules only (a group that is not the last one on its ports).
pub fn filler_rules(group: &str, n: usize, first: usize) -> Vec<Value> {
    (first..first + n).map(|k| filler(group, k)).collect()
}

/// Builds one input document.
pub struct Doc {
    groups: Vec<Value>,
    ports: Vec<Value>,
    next_port: usize,
}

impl Default for Doc {
    fn default() -> Self {
        Self::new()
    }
}

impl Doc {
    /// The `egress` group (Neutron's default egress rule), the empty `peers` group and the
    /// `partners` address group.
    pub fn new() -> Self {
        let egress = json!({
            "id": "egress",
            "name": "egress",
            "security_group_rules": [{
                "id": "egress-v4", "direction": "egress", "ethertype": "IPv4",
            }],
        });
        let peers = json!({"id": PEERS, "name": PEERS, "security_group_rules": []});
        Self {
            groups: vec![egress, peers],
            ports: Vec::new(),
            next_port: 0,
        }
    }

    pub fn group(&mut self, id: &str, rules: Vec<Value>) -> &mut Self {
        self.groups
            .push(json!({"id": id, "name": id, "security_group_rules": rules}));
        self
    }

    fn port_value(&mut self, ip: &str, groups: &[&str], host: &str) -> Value {
        let i = self.next_port;
        self.next_port += 1;
        json!({
            "id": format!("{i:08x}-be4c-4000-8000-{i:012x}"),
            "name": format!("bench-{i}"),
            "mac_address": format!("fa:16:3e:{:02x}:{:02x}:{:02x}", i >> 16 & 0xff, i >> 8 & 0xff, i & 0xff),
            "network_id": NETWORK,
            "fixed_ips": [{"ip_address": ip, "subnet_id": "bench-subnet"}],
            "security_groups": groups,
            "binding:host_id": host,
            "device_owner": "compute:nova",
        })
    }

    /// A port on this host with the groups `groups` (plus `egress` first); returns its id.
    pub fn local_port(&mut self, ip: &str, groups: &[&str]) -> String {
        let mut all = vec!["egress"];
        all.extend_from_slice(groups);
        let p = self.port_value(ip, &all, HOST);
        let id = p["id"].as_str().unwrap().to_string();
        self.ports.push(p);
        id
    }

    /// `n` ports on other hosts in the group `peers` (its members).
    pub fn peers(&mut self, n: usize) -> &mut Self {
        for i in 0..n {
            let ip = peer_ip(i);
            let p = self.port_value(&ip, &[PEERS], &format!("compute-{}", i % 40));
            self.ports.push(p);
        }
        self
    }

    pub fn build(&self) -> Value {
        let partners = json!({
            "id": "partners",
            "name": "partners",
            "addresses": (0..50).map(|i| format!("100.{}.{}.0/24", 64 + i / 256, i % 256)).collect::<Vec<_>>(),
        });
        json!({
            "security_groups": self.groups,
            "address_groups": [partners],
            "ports": self.ports,
        })
    }

    pub fn model(&self) -> anyhow::Result<sg_user::model::Model> {
        sg_user::model::from_values(vec![("bench".into(), self.build())])
            .map_err(|e| anyhow::anyhow!("the benchmark input is invalid:\n{e}"))
    }
}

/// The address of member `i` of `peers`: 10.128.0.0/10, no .0 or .255.
pub fn peer_ip(i: usize) -> String {
    let (h, l) = (i / 254, i % 254 + 1);
    format!("10.{}.{}.{l}", 128 + h / 256 % 64, h % 256)
}

/// An address for local port `i`: 10.250.0.0/16.
pub fn local_ip(i: usize) -> String {
    format!("10.250.{}.{}", i / 250 % 256, i % 250 + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_group_is_valid() {
        let mut d = Doc::new();
        d.group("big", ingress_rules("big", 10_000, 0));
        d.local_port(&local_ip(0), &["big"]);
        d.peers(100);
        let m = d.model().unwrap();
        assert_eq!(m.local_ports(HOST).len(), 1);
    }
}
