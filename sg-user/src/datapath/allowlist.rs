//! A fixed allow-list for one interface, written straight into the policy maps. This is what
//! `sg attach --allow` installs before any Neutron model is involved: ingress allows only the
//! listed protocol/ports, egress allows everything (like Neutron's default egress rules). The
//! port is stateless and has no address checks (any source MAC, no IP/MAC pairs, no ARP check).

use std::str::FromStr;

use anyhow::{Result, bail};
use aya::maps::lpm_trie::Key;
use sg_common::*;

use super::Datapath;

/// `tcp/80`, `udp/53`, `icmp`, `tcp` (any port), `any`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allow {
    /// `None`: any protocol.
    pub proto: Option<u8>,
    pub port: Option<u16>,
}

impl std::fmt::Display for Allow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let proto = match self.proto {
            None => return f.write_str("any"),
            Some(6) => "tcp".to_string(),
            Some(17) => "udp".to_string(),
            Some(1) => "icmp".to_string(),
            Some(58) => "icmpv6".to_string(),
            Some(n) => n.to_string(),
        };
        match self.port {
            Some(p) => write!(f, "{proto}/{p}"),
            None => f.write_str(&proto),
        }
    }
}

impl FromStr for Allow {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (p, port) = match s.split_once('/') {
            Some((p, port)) => (
                p,
                Some(
                    port.parse::<u16>()
                        .map_err(|e| anyhow::anyhow!("port {port:?} in {s:?}: {e}"))?,
                ),
            ),
            None => (s, None),
        };
        let proto = match p {
            "any" => None,
            "tcp" => Some(6),
            "udp" => Some(17),
            "icmp" => Some(1),
            "icmpv6" | "ipv6-icmp" => Some(58),
            n => match n.parse::<u8>() {
                Ok(n) => Some(n),
                Err(_) => bail!("unknown protocol {n:?} in {s:?} (tcp, udp, icmp, icmpv6, any or a number)"),
            },
        };
        if proto.is_none() && port.is_some() {
            bail!("{s:?}: protocol any cannot have a port");
        }
        Ok(Self { proto, port })
    }
}

/// Makes `ifindex` a filtered port (index `port_idx`, policy id `port_idx`) with `allows` as
/// its ingress allow list, for IPv4 and IPv6.
pub fn install(dp: &mut Datapath, ifindex: u32, port_idx: u32, allows: &[Allow]) -> Result<()> {
    let policy = port_idx;
    const CLASS: u32 = 1;
    for dir in [DIR_INGRESS, DIR_EGRESS] {
        for family in [FAMILY_V4, FAMILY_V6] {
            let key = ClassKey {
                policy,
                dir,
                family,
                _pad: [0; 2],
                addr: [0; 16],
            };
            dp.classes()?
                .insert(&Key::new(CLASS_KEY_FIXED_BITS, key), ClassVal { class: CLASS }, 0)?;
            let base = ServiceKey {
                policy,
                class: CLASS,
                dir,
                family,
                ..Default::default()
            };
            let entries: Vec<(u32, ServiceKey)> = if dir == DIR_EGRESS {
                vec![(SERVICE_KEY_ANY_PROTO_BITS, base)]
            } else {
                allows
                    .iter()
                    .map(|a| match (a.proto, a.port) {
                        (None, _) => (SERVICE_KEY_ANY_PROTO_BITS, base),
                        (Some(proto), None) => (SERVICE_KEY_PROTO_BITS, ServiceKey { proto, ..base }),
                        (Some(proto), Some(port)) => (
                            SERVICE_KEY_FULL_BITS,
                            ServiceKey {
                                proto,
                                port_be: port.to_be_bytes(),
                                ..base
                            },
                        ),
                    })
                    .collect()
            };
            for (rule, (bits, key)) in entries.into_iter().enumerate() {
                dp.services()?.insert(
                    &Key::new(bits, key),
                    ServiceVal {
                        rule: rule as u32 + 1,
                    },
                    0,
                )?;
            }
        }
    }
    // No source-MAC restriction: an AddrKey prefix that stops before the MAC matches every
    // MAC of address set `addr_id` (the allow-list knows nothing about the VM behind the tap).
    let addr_id = port_idx;
    dp.addrs()?.insert(
        &Key::new(
            ADDR_KEY_FIXED_BITS - 48,
            AddrKey {
                addr_id,
                kind: ADDR_KIND_MAC,
                ..Default::default()
            },
        ),
        AddrVal { index: 0 },
        0,
    )?;
    let info = PortInfo {
        policy,
        addr_id,
        port_idx,
        flags: PORT_F_FILTERED,
        mac: [0; 6],
        _pad: [0; 2],
        rev: policy,
    };
    dp.ports()?.insert(ifindex, info, 0)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_allow_specs() {
        assert_eq!(
            "tcp/80".parse::<Allow>().unwrap(),
            Allow {
                proto: Some(6),
                port: Some(80)
            }
        );
        assert_eq!(
            "icmp".parse::<Allow>().unwrap(),
            Allow {
                proto: Some(1),
                port: None
            }
        );
        assert_eq!(
            "any".parse::<Allow>().unwrap(),
            Allow {
                proto: None,
                port: None
            }
        );
        assert_eq!(
            "112".parse::<Allow>().unwrap(),
            Allow {
                proto: Some(112),
                port: None
            }
        );
        assert!("tcp/99999".parse::<Allow>().is_err());
        assert!("any/80".parse::<Allow>().is_err());
        assert!("bogus".parse::<Allow>().is_err());
    }
}
