//! Map entries for a port described in a few lines, written straight into the maps: for
//! datapath tests, benchmarks and demos, before (and independently of) the Neutron compiler.
//! It writes what the compiler writes for the same port: `PortInfo`, the port's `SG_ADDRS`
//! (MACs, IP/MAC pairs as Neutron builds them, fixed IPs) and a policy's `SG_CLASSES` and
//! `SG_SERVICES`.
//!
//! ```text
//! let port = PortSpec::new(ifindex, 1, mac).fixed_ip("10.0.0.5").stateful();
//! let rules = [Rule::ingress_v4().tcp(22, 22), Rule::egress_v4()];
//! fixture::install(&mut dp, &port, &rules)?;
//! ```

use std::net::{IpAddr, Ipv6Addr};

use anyhow::{Result, bail};
use aya::maps::lpm_trie::Key;
use ipnet::IpNet;
use sg_common::*;

use super::Datapath;
use crate::packet::Mac;

/// A Neutron port behind a tap.
#[derive(Debug, Clone)]
pub struct PortSpec {
    pub ifindex: u32,
    /// Conntrack zone and counter key; also used as policy id and address-set id.
    pub port_idx: u32,
    pub mac: Mac,
    pub fixed_ips: Vec<IpAddr>,
    /// Allowed address pairs: (MAC, IP or CIDR).
    pub pairs: Vec<(Mac, IpNet)>,
    /// Port security enabled.
    pub filtered: bool,
    pub stateful: bool,
}

impl PortSpec {
    /// A filtered, stateless port with no addresses.
    pub fn new(ifindex: u32, port_idx: u32, mac: Mac) -> Self {
        Self {
            ifindex,
            port_idx,
            mac,
            fixed_ips: Vec::new(),
            pairs: Vec::new(),
            filtered: true,
            stateful: false,
        }
    }

    pub fn fixed_ip(mut self, ip: &str) -> Self {
        self.fixed_ips.push(ip.parse().expect("fixed IP"));
        self
    }

    pub fn pair(mut self, mac: Mac, net: &str) -> Self {
        let net = net
            .parse::<IpNet>()
            .or_else(|_| net.parse::<IpAddr>().map(IpNet::from))
            .expect("pair address");
        self.pairs.push((mac, net));
        self
    }

    pub fn stateful(mut self) -> Self {
        self.stateful = true;
        self
    }

    pub fn port_security(mut self, on: bool) -> Self {
        self.filtered = on;
        self
    }

    /// Neutron's pair list for one family (spec §6): pairs in order (an IPv6 pair adds its
    /// MAC's link-local address), then the fixed IPs with the port MAC (IPv6 adds the port
    /// MAC's link-local), or a MAC-only pair when the port has no fixed IP.
    pub fn spoof_pairs(&self, v6: bool) -> Vec<(Mac, Option<IpNet>)> {
        let mut out: Vec<(Mac, Option<IpNet>)> = Vec::new();
        let mut push = |mac: Mac, net: Option<IpNet>| {
            if !out.contains(&(mac, net)) {
                out.push((mac, net));
            }
        };
        for (mac, net) in &self.pairs {
            if net.addr().is_ipv6() == v6 {
                push(*mac, Some(*net));
                if v6 {
                    push(*mac, Some(IpNet::from(IpAddr::V6(link_local(mac)))));
                }
            }
        }
        for ip in &self.fixed_ips {
            if ip.is_ipv6() == v6 {
                push(self.mac, Some(IpNet::from(*ip)));
                if v6 {
                    push(self.mac, Some(IpNet::from(IpAddr::V6(link_local(&self.mac)))));
                }
            }
        }
        if self.fixed_ips.is_empty() {
            push(self.mac, None);
        }
        out
    }

    /// `PORT_F_*` as the compiler derives them.
    pub fn flags(&self) -> u32 {
        if !self.filtered {
            return 0;
        }
        let mut f = PORT_F_FILTERED;
        if self.stateful {
            f |= PORT_F_STATEFUL;
        }
        if !self.spoof_pairs(false).is_empty() {
            f |= PORT_F_SPOOF_V4;
        }
        if !self.spoof_pairs(true).is_empty() {
            f |= PORT_F_SPOOF_V6;
        }
        if self.fixed_ips.iter().any(IpAddr::is_ipv6) {
            f |= PORT_F_V6_FIXED;
        }
        if !self
            .pairs
            .iter()
            .any(|(_, n)| n.addr().is_ipv4() && n.prefix_len() == 0)
        {
            f |= PORT_F_ARP_PROTECT;
        }
        f
    }

    pub fn info(&self, policy: u32) -> PortInfo {
        PortInfo {
            policy,
            addr_id: self.port_idx,
            port_idx: self.port_idx,
            flags: self.flags(),
            mac: self.mac,
            _pad: [0; 2],
        }
    }
}

/// The EUI-64 link-local address of a MAC (fe80::/64 + MAC with the U/L bit flipped).
pub fn link_local(mac: &Mac) -> Ipv6Addr {
    let mut a = [0u8; 16];
    a[0] = 0xfe;
    a[1] = 0x80;
    a[8] = mac[0] ^ 0x02;
    a[9] = mac[1];
    a[10] = mac[2];
    a[11] = 0xff;
    a[12] = 0xfe;
    a[13] = mac[3];
    a[14] = mac[4];
    a[15] = mac[5];
    Ipv6Addr::from(a)
}

/// One security-group rule (allow), Neutron style.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub dir: u8,
    pub family: u8,
    /// Remote prefix; `None` is any.
    pub remote: Option<IpNet>,
    /// `None` is any protocol.
    pub proto: Option<u8>,
    pub ports: Ports,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ports {
    Any,
    /// Destination port range (TCP, UDP, UDP-Lite, SCTP, DCCP).
    Range(u16, u16),
    /// ICMP/ICMPv6 type, optionally with a code.
    Icmp(u8, Option<u8>),
}

impl Rule {
    pub fn new(dir: u8, family: u8) -> Self {
        Self {
            dir,
            family,
            remote: None,
            proto: None,
            ports: Ports::Any,
        }
    }
    pub fn ingress_v4() -> Self {
        Self::new(DIR_INGRESS, FAMILY_V4)
    }
    pub fn ingress_v6() -> Self {
        Self::new(DIR_INGRESS, FAMILY_V6)
    }
    pub fn egress_v4() -> Self {
        Self::new(DIR_EGRESS, FAMILY_V4)
    }
    pub fn egress_v6() -> Self {
        Self::new(DIR_EGRESS, FAMILY_V6)
    }
    pub fn proto(mut self, p: u8) -> Self {
        self.proto = Some(p);
        self
    }
    pub fn tcp(self, lo: u16, hi: u16) -> Self {
        self.proto(6).ports(lo, hi)
    }
    pub fn udp(self, lo: u16, hi: u16) -> Self {
        self.proto(17).ports(lo, hi)
    }
    pub fn ports(mut self, lo: u16, hi: u16) -> Self {
        self.ports = Ports::Range(lo, hi);
        self
    }
    /// ICMP for IPv4 rules, ICMPv6 for IPv6 rules; `None` type is any.
    pub fn icmp(mut self, icmp_type: Option<u8>, code: Option<u8>) -> Self {
        self.proto = Some(if self.family == FAMILY_V6 { 58 } else { 1 });
        if let Some(t) = icmp_type {
            self.ports = Ports::Icmp(t, code);
        }
        self
    }
    pub fn remote(mut self, net: &str) -> Self {
        self.remote = Some(
            net.parse::<IpNet>()
                .or_else(|_| net.parse::<IpAddr>().map(IpNet::from))
                .expect("remote prefix"),
        );
        self
    }

    fn remote_net(&self) -> IpNet {
        self.remote.unwrap_or_else(|| {
            if self.family == FAMILY_V6 {
                "::/0".parse().unwrap()
            } else {
                "0.0.0.0/0".parse().unwrap()
            }
        })
    }

    /// SG_SERVICES (key template, prefix length) pairs; the caller fills policy and class.
    fn services(&self) -> Vec<(ServiceKey, u32)> {
        let base = ServiceKey {
            dir: self.dir,
            family: self.family,
            ..Default::default()
        };
        let Some(proto) = self.proto else {
            return vec![(base, SERVICE_KEY_ANY_PROTO_BITS)];
        };
        let base = ServiceKey { proto, ..base };
        match self.ports {
            Ports::Any => vec![(base, SERVICE_KEY_PROTO_BITS)],
            Ports::Icmp(t, None) => vec![(
                ServiceKey {
                    port_be: [t, 0],
                    ..base
                },
                SERVICE_KEY_PROTO_BITS + 8,
            )],
            Ports::Icmp(t, Some(c)) => vec![(
                ServiceKey {
                    port_be: [t, c],
                    ..base
                },
                SERVICE_KEY_FULL_BITS,
            )],
            Ports::Range(lo, hi) => port_blocks(lo, hi)
                .into_iter()
                .map(|(p, len)| {
                    (
                        ServiceKey {
                            port_be: p.to_be_bytes(),
                            ..base
                        },
                        SERVICE_KEY_PROTO_BITS + len,
                    )
                })
                .collect(),
        }
    }
}

/// The minimal aligned blocks covering lo..=hi, as (first port, prefix length in bits).
pub fn port_blocks(lo: u16, hi: u16) -> Vec<(u16, u32)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (lo as u32, hi as u32);
    while lo <= hi {
        let mut size = if lo == 0 {
            1 << 16
        } else {
            1 << lo.trailing_zeros()
        };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        out.push((lo as u16, 16 - size.trailing_zeros()));
        lo += size;
    }
    out
}

fn net_key(net: &IpNet) -> ([u8; 16], u32) {
    let mut a = [0u8; 16];
    match net.network() {
        IpAddr::V4(v) => a[..4].copy_from_slice(&v.octets()),
        IpAddr::V6(v) => a.copy_from_slice(&v.octets()),
    }
    (a, net.prefix_len() as u32)
}

/// Writes `rules` as policy `policy`: one class per distinct remote prefix of each (direction,
/// family), holding every rule whose remote contains that prefix; each service prefix maps to
/// the first such rule (chain order) that covers it. Rule indexes are 1-based positions in
/// `rules` (the compiler numbers rules across all policies instead; SG_RULE_HITS is one array,
/// so two fixture policies share counters). Returns the number of SG_SERVICES entries written.
pub fn install_policy(dp: &mut Datapath, policy: u32, rules: &[Rule]) -> Result<usize> {
    let mut written = 0;
    let mut classes: Vec<(u8, u8, IpNet)> = Vec::new();
    for r in rules {
        let k = (r.dir, r.family, r.remote_net().trunc());
        if !classes.contains(&k) {
            classes.push(k);
        }
    }
    for (i, (dir, family, net)) in classes.iter().enumerate() {
        let class = i as u32 + 1;
        let (addr, len) = net_key(net);
        dp.classes()?.insert(
            &Key::new(
                CLASS_KEY_FIXED_BITS + len,
                ClassKey {
                    policy,
                    dir: *dir,
                    family: *family,
                    _pad: [0; 2],
                    addr,
                },
            ),
            ClassVal { class },
            0,
        )?;
        // (prefix length, key) -> first rule covering it.
        let mut entries: Vec<(u32, ServiceKey, u32)> = Vec::new();
        for (idx, r) in rules.iter().enumerate() {
            if r.dir != *dir || r.family != *family || !r.remote_net().contains(net) {
                continue;
            }
            for (mut key, bits) in r.services() {
                key.policy = policy;
                key.class = class;
                if !entries.iter().any(|(b, k, _)| *b == bits && *k == key) {
                    entries.push((bits, key, idx as u32 + 1));
                }
            }
        }
        // A longer service prefix must carry the earliest rule among those covering it.
        let snapshot = entries.clone();
        for (bits, key, rule) in entries.iter_mut() {
            for (b, k, r) in &snapshot {
                if *b < *bits && covers(k, *b, key) && r < rule {
                    *rule = *r;
                }
            }
        }
        for (bits, key, rule) in entries {
            dp.services()?
                .insert(&Key::new(bits, key), ServiceVal { rule }, 0)?;
            written += 1;
        }
    }
    Ok(written)
}

/// Whether the `bits`-long prefix of `outer` contains `inner`.
fn covers(outer: &ServiceKey, bits: u32, inner: &ServiceKey) -> bool {
    let a = bytemuck::bytes_of(outer);
    let b = bytemuck::bytes_of(inner);
    (0..bits as usize).all(|i| (a[i / 8] >> (7 - i % 8)) & 1 == (b[i / 8] >> (7 - i % 8)) & 1)
}

/// Writes the port's addresses and its `PortInfo` pointing at `policy`.
pub fn install_port(dp: &mut Datapath, port: &PortSpec, policy: u32) -> Result<()> {
    let addr_id = port.port_idx;
    let mut entries: Vec<(u8, Mac, Option<IpNet>, u32)> = Vec::new();
    entries.push((ADDR_KIND_MAC, port.mac, None, 0));
    for (mac, _) in &port.pairs {
        entries.push((ADDR_KIND_MAC, *mac, None, 0));
    }
    for (kind, v6) in [(ADDR_KIND_PAIR_V4, false), (ADDR_KIND_PAIR_V6, true)] {
        for (i, (mac, net)) in port.spoof_pairs(v6).into_iter().enumerate() {
            entries.push((kind, mac, net, i as u32 + 1));
        }
    }
    // As the compiler: ARP senders are the IPv4 pairs with an address, plus probes.
    for (i, (mac, net)) in port.spoof_pairs(false).into_iter().enumerate() {
        if let Some(net) = net {
            entries.push((ADDR_KIND_ARP_V4, mac, Some(net), i as u32 + 1));
            entries.push((ADDR_KIND_ARP_V4, mac, Some("0.0.0.0/32".parse().unwrap()), 0));
        }
    }
    for ip in &port.fixed_ips {
        let kind = if ip.is_ipv6() {
            ADDR_KIND_FIXED_V6
        } else {
            ADDR_KIND_FIXED_V4
        };
        entries.push((kind, [0; 6], Some(IpNet::from(*ip)), 0));
    }
    for (kind, mac, net, index) in entries {
        let (addr, len) = net.map(|n| net_key(&n.trunc())).unwrap_or(([0; 16], 0));
        dp.addrs()?.insert(
            &Key::new(
                ADDR_KEY_FIXED_BITS + len,
                AddrKey {
                    addr_id,
                    kind,
                    _pad: 0,
                    mac,
                    addr,
                },
            ),
            AddrVal { index },
            0,
        )?;
    }
    set_policy(dp, port, policy)
}

/// Points the port at `policy` with one SG_PORTS update (what the agent does after writing a
/// new policy generation).
pub fn set_policy(dp: &mut Datapath, port: &PortSpec, policy: u32) -> Result<()> {
    if port.ifindex == 0 {
        bail!("port {} has no ifindex", port.port_idx);
    }
    dp.ports()?.insert(port.ifindex, port.info(policy), 0)?;
    Ok(())
}

/// The port with `rules` as its policy, whose id is the port index.
pub fn install(dp: &mut Datapath, port: &PortSpec, rules: &[Rule]) -> Result<()> {
    install_policy(dp, port.port_idx, rules)?;
    install_port(dp, port, port.port_idx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_become_aligned_blocks() {
        assert_eq!(port_blocks(22, 22), vec![(22, 16)]);
        assert_eq!(port_blocks(1024, 65535).len(), 6);
        assert_eq!(port_blocks(0, 65535), vec![(0, 0)]);
        assert_eq!(port_blocks(12345, 12346), vec![(12345, 16), (12346, 16)]);
        let total: u32 = port_blocks(1, 65534).iter().map(|(_, l)| 1 << (16 - l)).sum();
        assert_eq!(total, 65534);
    }

    #[test]
    fn link_local_is_eui64() {
        assert_eq!(
            link_local(&[0xfa, 0x16, 0x3e, 0x12, 0x34, 0x56]).to_string(),
            "fe80::f816:3eff:fe12:3456"
        );
    }

    #[test]
    fn pairs_follow_neutron() {
        let p = PortSpec::new(1, 1, [0xfa, 0x16, 0x3e, 0, 0, 1]).fixed_ip("10.0.0.5");
        assert_eq!(p.spoof_pairs(false).len(), 1);
        assert!(p.spoof_pairs(true).is_empty());
        assert_eq!(p.flags() & PORT_F_SPOOF_V6, 0);
        let bare = PortSpec::new(1, 1, [0xfa, 0x16, 0x3e, 0, 0, 1]);
        assert_eq!(bare.spoof_pairs(true), vec![(bare.mac, None)]);
        let open = bare.clone().pair([2, 0, 0, 0, 0, 2], "0.0.0.0/0");
        assert_eq!(open.flags() & PORT_F_ARP_PROTECT, 0);
    }
}
