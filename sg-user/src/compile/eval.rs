//! Two ways to decide whether a security-group rule admits a packet, for testing one against
//! the other: a plain rule-by-rule walk over the model, with iptables' matching semantics, and
//! a walk over the compiled map entries doing exactly what the datapath does.

use std::net::IpAddr;

use sg_common::{ClassKey, ServiceKey, SrcPortKey};

use super::Compiled;
use super::lpm::Lpm;
use crate::model::protocol::{PROTO_ICMP, PROTO_IPV6_ICMP, is_icmp_protocol, is_port_protocol};
use crate::model::{Direction, Ethertype, Model, Remote, Rule, SecurityGroup, addr};

/// What the policy stage looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    pub dir: Direction,
    /// The remote address: the source for ingress, the destination for egress.
    pub remote: IpAddr,
    pub proto: u8,
    /// The destination port for TCP/UDP/SCTP/DCCP/UDP-Lite, `type << 8 | code` for ICMP
    /// (IPv4) and ICMPv6 (IPv6); ignored otherwise.
    pub port: u16,
    /// The source port for TCP/UDP/SCTP/DCCP/UDP-Lite; ignored otherwise.
    pub sport: u16,
}

impl Packet {
    pub fn ethertype(&self) -> Ethertype {
        Ethertype::of_ip(self.remote)
    }
}

/// The first rule, in chain order over the groups `sg_ids`, that admits the packet, the way
/// iptables walks the port's chain; except that rules with source ports come after all the
/// others (sg names the rule that way, compile module docs): the packet is admitted exactly
/// when iptables admits it.
pub fn reference_first_rule<'m>(
    model: &'m Model,
    sg_ids: &'m [String],
    pkt: &Packet,
) -> Option<(&'m SecurityGroup, &'m Rule)> {
    let admits = |r: &Rule| rule_admits(model, r, pkt);
    model
        .groups_rules(sg_ids)
        .find(|(_, r)| !super::has_source_ports(r) && admits(r))
        .or_else(|| {
            model
                .groups_rules(sg_ids)
                .find(|(_, r)| super::has_source_ports(r) && admits(r))
        })
}

fn rule_admits(model: &Model, rule: &Rule, pkt: &Packet) -> bool {
    if rule.direction != pkt.dir || rule.ethertype != pkt.ethertype() {
        return false;
    }
    let remote_ok = match &rule.remote {
        Remote::Any => true,
        Remote::Prefix(net) => net.trunc().contains(&pkt.remote),
        remote @ (Remote::Group(_) | Remote::AddressGroup(_)) => model
            .members(remote, rule.ethertype)
            .unwrap_or(&[])
            .iter()
            .any(|m| m.net.trunc().contains(&pkt.remote)),
    };
    if !remote_ok {
        return false;
    }
    let Some(proto) = rule.proto_num else {
        return true;
    };
    if proto != pkt.proto {
        return false;
    }
    let (min, max) = (rule.port_range_min, rule.port_range_max);
    if is_port_protocol(proto) {
        // `--sport`/`--dport N` or `-m multiport --sports/--dports A:B`.
        let sport_ok = match (rule.source_port_range_min, rule.source_port_range_max) {
            (Some(lo), Some(hi)) => (lo..=hi).contains(&pkt.sport),
            _ => true,
        };
        sport_ok
            && match (min, max) {
                (Some(lo), Some(hi)) => (lo..=hi).contains(&pkt.port),
                _ => true,
            }
    } else if is_icmp_protocol(proto) {
        // `--icmp-type T[/C]`: type T with any code, or exactly T/C. xt's IPv4 icmp match
        // takes type 255 as "any"; the IPv6 one does not.
        let (ty, code) = ((pkt.port >> 8) as u8, pkt.port as u8);
        match (min, max) {
            (None, _) => true,
            (Some(255), _) if proto == PROTO_ICMP => true,
            (Some(t), None) => u16::from(ty) == t,
            (Some(t), Some(c)) => u16::from(ty) == t && u16::from(code) == c,
        }
    } else {
        true
    }
}

/// The port field the datapath puts in a `ServiceKey` for a packet.
pub fn port_field(ethertype: Ethertype, proto: u8, port: u16) -> u16 {
    let icmp = match ethertype {
        Ethertype::IPv4 => PROTO_ICMP,
        Ethertype::IPv6 => PROTO_IPV6_ICMP,
    };
    if is_port_protocol(proto) || proto == icmp {
        port
    } else {
        0
    }
}

/// The result of the two-stage lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Stage 1 result; 0 when no selector contains the remote address.
    pub class: u32,
    /// The rule index that admits the packet; None: denied.
    pub rule: Option<u32>,
}

/// The compiled `SG_CLASSES`, `SG_SERVICES` and `SG_SRC_PORTS` maps loaded into LPM simulators.
pub struct CompiledLookup {
    classes: Lpm<u32>,
    services: Lpm<u32>,
    src_ports: Lpm<u32>,
}

impl CompiledLookup {
    /// Loads every policy's entries. Fails if the compiler wrote two entries with the same
    /// prefix or a key with bits set past its prefix.
    pub fn new(compiled: &Compiled) -> Result<Self, super::lpm::LpmError> {
        let mut classes = Lpm::new(size_of::<ClassKey>());
        let mut services = Lpm::new(size_of::<ServiceKey>());
        let mut src_ports = Lpm::new(size_of::<SrcPortKey>());
        for p in &compiled.policies {
            for e in &p.src_ports {
                src_ports.insert_pod(e.prefix_len, &e.key, e.value.rule)?;
            }
            for e in &p.classes {
                classes.insert_pod(e.prefix_len, &e.key, e.value.class)?;
            }
            for e in &p.services {
                services.insert_pod(e.prefix_len, &e.key, e.value.rule)?;
            }
        }
        Ok(CompiledLookup {
            classes,
            services,
            src_ports,
        })
    }

    /// Stage 1 on (policy, dir, family, remote address), then stage 2 on (policy, class, dir,
    /// family, protocol, port), then on a miss `SG_SRC_PORTS` (which holds entries only for
    /// policies whose ports have `PORT_F_SRC_PORTS`).
    pub fn evaluate(&self, policy: u32, pkt: &Packet) -> Verdict {
        let eth = pkt.ethertype();
        let ck = ClassKey {
            policy,
            dir: pkt.dir.key(),
            family: eth.family(),
            _pad: [0; 2],
            addr: addr::ip_key(pkt.remote),
        };
        let Some((_, &class)) = self.classes.lookup_pod(&ck) else {
            return Verdict { class: 0, rule: None };
        };
        let sk = ServiceKey {
            policy,
            class,
            dir: pkt.dir.key(),
            family: eth.family(),
            proto: pkt.proto,
            port_be: port_field(eth, pkt.proto, pkt.port).to_be_bytes(),
            _pad: [0; 3],
        };
        if let Some((_, &r)) = self.services.lookup_pod(&sk) {
            return Verdict { class, rule: Some(r) };
        }
        let port_protocol = is_port_protocol(pkt.proto);
        let spk = SrcPortKey {
            policy,
            class,
            dir: pkt.dir.key(),
            family: eth.family(),
            proto: pkt.proto,
            sport_be: if port_protocol { pkt.sport } else { 0 }.to_be_bytes(),
            dport_be: port_field(eth, pkt.proto, pkt.port).to_be_bytes(),
            _pad: [0; 1],
        };
        Verdict {
            class,
            rule: self.src_ports.lookup_pod(&spk).map(|(_, &r)| r),
        }
    }
}
