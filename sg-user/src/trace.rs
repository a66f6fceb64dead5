//! `sg trace`: why would this packet be allowed or dropped on this port, right now?
//!
//! The answer comes from the real program, not a model of it: a second instance of the
//! object is loaded over the live pinned maps (not attached anywhere), and the packet is run
//! through it with BPF_PROG_TEST_RUN as if it arrived on the port's tap. The skb mark
//! `TRACE_DRY_MARK` makes the program record its decision in SG_TRACE and leave conntrack, the
//! fragment table and the counters untouched, so tracing never changes what it observes.

use std::net::IpAddr;

use anyhow::{Context as _, Result, anyhow, bail};
use aya::maps::{PerCpuArray, PerCpuValues};
use serde::Serialize;
use sg_common::*;

use crate::{
    agent::apply::RunState,
    datapath::{Datapath, LoadOptions},
    inspect::{Sources, dir_name},
    netns,
    packet::{
        Body, Frame, IpPacket, L4, Mac, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, format_mac, parse_mac,
    },
};

pub const SYNTAX: &str = "\
PACKET is: PROTO SRC DST [OPTIONS...]
  PROTO    tcp | udp | sctp | icmp | icmpv6 | arp | a protocol number
  SRC DST  IP or IP:PORT ([v6]:PORT for IPv6)
  OPTIONS  syn ack fin rst psh          TCP flags (default: syn)
           type=N code=N id=N           ICMP type/code (default: echo request)
           src-mac=M dst-mac=M          Ethernet addresses (default: the port's MAC on the VM side)
Examples:
  sg trace --port WEB1 to-vm tcp 203.0.113.7:40000 192.168.206.6:80
  sg trace --port WEB1 from-vm udp 192.168.206.6:67 192.168.206.20:68
  sg trace --port WEB1 to-vm icmp 203.0.113.7 192.168.206.6 type=8";

/// The far side's MAC when none is given.
const PEER_MAC: Mac = [0xfa, 0x16, 0x3e, 0xff, 0xff, 0xfe];

fn split_endpoint(s: &str) -> Result<(IpAddr, Option<u16>)> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok((ip, None));
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (ip, port) = rest
            .split_once("]:")
            .ok_or_else(|| anyhow!("{s:?}: expected [IPv6]:PORT"))?;
        return Ok((ip.parse()?, Some(port.parse()?)));
    }
    let (ip, port) = s
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("{s:?}: not an IP or IP:PORT"))?;
    Ok((
        ip.parse()
            .with_context(|| format!("{ip:?} is not an IP address"))?,
        Some(port.parse().with_context(|| format!("{port:?} is not a port"))?),
    ))
}

/// Builds the frame a packet description means, for a port with MAC `port_mac`.
pub fn parse_packet(words: &[String], dir: u8, port_mac: Mac) -> Result<Frame> {
    let [proto, src, dst, opts @ ..] = words else {
        bail!("a packet needs PROTO SRC DST\n{SYNTAX}");
    };
    let (src_ip, sport) = split_endpoint(src)?;
    let (dst_ip, dport) = split_endpoint(dst)?;
    if src_ip.is_ipv4() != dst_ip.is_ipv4() {
        bail!("{src} and {dst} are of different address families");
    }
    let (mut src_mac, mut dst_mac) = if dir == DIR_EGRESS {
        (port_mac, PEER_MAC)
    } else {
        (PEER_MAC, port_mac)
    };
    let (mut flags, mut icmp_type, mut icmp_code, mut icmp_id) = (0u8, None, 0u8, 1u16);
    for o in opts {
        match o.as_str() {
            "syn" => flags |= TCP_SYN,
            "ack" => flags |= TCP_ACK,
            "fin" => flags |= TCP_FIN,
            "rst" => flags |= TCP_RST,
            "psh" => flags |= TCP_PSH,
            _ => {
                let (k, v) = o
                    .split_once('=')
                    .ok_or_else(|| anyhow!("unknown option {o:?}\n{SYNTAX}"))?;
                match k {
                    "type" => icmp_type = Some(v.parse().with_context(|| format!("type={v}"))?),
                    "code" => icmp_code = v.parse().with_context(|| format!("code={v}"))?,
                    "id" => icmp_id = v.parse().with_context(|| format!("id={v}"))?,
                    "src-mac" => src_mac = parse_mac(v).ok_or_else(|| anyhow!("src-mac={v}: not a MAC"))?,
                    "dst-mac" => dst_mac = parse_mac(v).ok_or_else(|| anyhow!("dst-mac={v}: not a MAC"))?,
                    _ => bail!("unknown option {o:?}\n{SYNTAX}"),
                }
            }
        }
    }
    let v6 = src_ip.is_ipv6();
    let need_ports = |what: &str| -> Result<(u16, u16)> {
        match (sport, dport) {
            (Some(s), Some(d)) => Ok((s, d)),
            _ => bail!("{what} needs SRC:PORT and DST:PORT"),
        }
    };
    let l4 = match proto.as_str() {
        "tcp" => {
            let (sport, dport) = need_ports("tcp")?;
            L4::Tcp {
                sport,
                dport,
                flags: if flags == 0 { TCP_SYN } else { flags },
                seq: 1000,
                ack: 0,
            }
        }
        "udp" => {
            let (sport, dport) = need_ports("udp")?;
            L4::Udp { sport, dport }
        }
        "sctp" => {
            let (sport, dport) = need_ports("sctp")?;
            let mut payload = Vec::new();
            payload.extend_from_slice(&sport.to_be_bytes());
            payload.extend_from_slice(&dport.to_be_bytes());
            payload.extend_from_slice(&[0; 8]);
            // An INIT chunk header, so conntrack-aware code sees a connection start.
            payload.extend_from_slice(&[1, 0, 0, 20]);
            payload.extend_from_slice(&[0; 16]);
            L4::Raw { proto: 132, payload }
        }
        "icmp" | "icmpv6" | "ipv6-icmp" => {
            let t = icmp_type.unwrap_or(if v6 { 128 } else { 8 });
            let id = icmp_id.to_be_bytes();
            L4::Icmp {
                icmp_type: t,
                code: icmp_code,
                rest: [id[0], id[1], 0, 1],
            }
        }
        "arp" => {
            let (IpAddr::V4(s), IpAddr::V4(d)) = (src_ip, dst_ip) else {
                bail!("arp needs IPv4 addresses")
            };
            return Ok(Frame {
                src_mac,
                dst_mac: [0xff; 6],
                vlans: Vec::new(),
                body: Body::Arp {
                    op: 1,
                    sha: src_mac,
                    spa: s.octets(),
                    tha: [0; 6],
                    tpa: d.octets(),
                },
            });
        }
        n => {
            let proto: u8 = n
                .parse()
                .map_err(|_| anyhow!("unknown protocol {n:?}\n{SYNTAX}"))?;
            L4::Raw {
                proto,
                payload: vec![0; 8],
            }
        }
    };
    Ok(Frame::ip(src_mac, dst_mac, IpPacket::new(src_ip, dst_ip, l4)))
}

#[derive(Debug, Serialize)]
pub struct TraceResult {
    pub port: String,
    pub device: String,
    pub direction: &'static str,
    pub frame: String,
    pub verdict: &'static str,
    pub reason: &'static str,
    pub stage: &'static str,
    pub conntrack: &'static str,
    pub rule_index: u32,
    pub rule_id: Option<String>,
    pub rule: Option<String>,
    pub security_group_id: Option<String>,
    pub policy: u32,
    pub class: u32,
}

/// The pipeline stage a reason belongs to.
pub fn stage_of(reason: u8) -> &'static str {
    match reason {
        REASON_DROP_MALFORMED | REASON_DROP_VLAN | REASON_DROP_IPV6_EXT => "parse",
        REASON_DROP_ETHERTYPE
        | REASON_DROP_SPOOF_MAC
        | REASON_DROP_SPOOF_ARP
        | REASON_DROP_SPOOF_IP
        | REASON_ALLOW_ARP => "port-security",
        REASON_ALLOW_DHCP_CLIENT
        | REASON_ALLOW_DHCP_REPLY
        | REASON_ALLOW_DHCP6_CLIENT
        | REASON_ALLOW_DHCP6_REPLY
        | REASON_ALLOW_ICMP6
        | REASON_ALLOW_DAD_MLD
        | REASON_ALLOW_ND_MLD
        | REASON_ALLOW_RA
        | REASON_DROP_DHCP_SPOOF
        | REASON_DROP_DHCP6_SPOOF
        | REASON_DROP_RA => "fixed-rules",
        REASON_ALLOW_ESTABLISHED | REASON_ALLOW_RELATED | REASON_DROP_INVALID | REASON_DROP_REVOKED => {
            "conntrack"
        }
        REASON_ALLOW_RULE | REASON_DROP_NO_RULE => "policy",
        REASON_ALLOW_FRAG | REASON_DROP_FRAG_NO_FIRST | REASON_DROP_FRAG_DENIED => "fragments",
        REASON_ALLOW_UNFILTERED | REASON_ALLOW_NON_IP | REASON_DROP_PORT_CLOSED => "port",
        _ => "unknown",
    }
}

pub fn ct_state_name(s: u8) -> &'static str {
    match s {
        CT_STATE_NEW => "NEW",
        CT_STATE_ESTABLISHED => "ESTABLISHED",
        CT_STATE_RELATED => "RELATED",
        CT_STATE_INVALID => "INVALID",
        CT_STATE_UNTRACKED => "UNTRACKED",
        CT_STATE_REVOKED => "REVOKED",
        _ => "-",
    }
}

pub fn trace(
    src: &Sources,
    netns_name: Option<&str>,
    port: &str,
    dir: u8,
    words: &[String],
) -> Result<TraceResult> {
    let rs = RunState::load(src.run_dir)?
        .ok_or_else(|| anyhow!("no agent run state in {}", src.run_dir.display()))?;
    let p = rs
        .ports
        .iter()
        .find(|p| p.id == port || p.device == port || p.id.starts_with(port))
        .ok_or_else(|| anyhow!("no port {port:?} in the agent's run state"))?;
    let ifindex = p
        .ifindex
        .ok_or_else(|| anyhow!("the tap {} of port {} does not exist", p.device, p.id))?;
    let info = crate::pinned::ports(src.pin_root)?
        .into_iter()
        .find(|(i, _)| *i == ifindex)
        .map(|(_, info)| info)
        .ok_or_else(|| anyhow!("{} (ifindex {ifindex}) has no SG_PORTS entry", p.device))?;
    let frame = parse_packet(words, dir, info.mac)?;
    let bytes = frame.build();

    // Reuse the live maps; the object's own SG_TRACE is private to this instance.
    let mut dp = Datapath::load(&LoadOptions::matching_pins(src.pin_root)?)?;
    let cpus = aya::util::nr_cpus().map_err(|(w, e)| anyhow!("{w}: {e}"))?;
    {
        let mut t: PerCpuArray<_, TraceRec> = PerCpuArray::try_from(dp.map_mut(MAP_TRACE)?)?;
        t.set(0, PerCpuValues::try_from(vec![TraceRec::default(); cpus])?, 0)?;
    }
    let program = if dir == DIR_EGRESS {
        PROG_FROM_VM
    } else {
        PROG_TO_VM
    };
    let verdict = netns::run_in(netns_name, || {
        dp.test_run(program, &bytes, ifindex, TRACE_DRY_MARK)
    })??;
    let t: PerCpuArray<_, TraceRec> = PerCpuArray::try_from(dp.map_mut(MAP_TRACE)?)?;
    let rec = t
        .get(&0, 0)?
        .iter()
        .find(|r| r.seq != 0)
        .copied()
        .ok_or_else(|| anyhow!("the program did not record a trace (is this sg build's datapath loaded?)"))?;
    let rule = rs.rules.iter().find(|r| r.index == rec.rule && rec.rule != 0);
    Ok(TraceResult {
        port: p.id.clone(),
        device: p.device.clone(),
        direction: dir_name(dir),
        frame: describe(&frame),
        verdict: if verdict == TC_ACT_SHOT { "DROP" } else { "ALLOW" },
        reason: reason_name(rec.reason),
        stage: stage_of(rec.reason),
        conntrack: ct_state_name(rec.ct_state),
        rule_index: rec.rule,
        rule_id: rule.map(|r| r.rule_id.clone()),
        rule: rule.map(|r| r.text.clone()),
        security_group_id: rule.map(|r| r.security_group_id.clone()),
        policy: rec.policy,
        class: rec.class,
    })
}

fn describe(f: &Frame) -> String {
    let l2 = format!("{} > {}", format_mac(&f.src_mac), format_mac(&f.dst_mac));
    match &f.body {
        Body::Ip(p) => {
            let l4 = match &p.l4 {
                L4::Tcp {
                    sport, dport, flags, ..
                } => format!("tcp {sport} > {dport} flags 0x{flags:02x}"),
                L4::Udp { sport, dport } => format!("udp {sport} > {dport}"),
                L4::Icmp { icmp_type, code, .. } => format!("icmp type {icmp_type} code {code}"),
                L4::IcmpError { icmp_type, code, .. } => format!("icmp error type {icmp_type} code {code}"),
                L4::Raw { proto, .. } => format!("protocol {proto}"),
            };
            format!("{l2}, {} > {}, {l4}", p.src, p.dst)
        }
        Body::Arp { spa, tpa, .. } => {
            format!(
                "{l2}, arp who-has {} tell {}",
                IpAddr::from(*tpa),
                IpAddr::from(*spa)
            )
        }
        Body::Other { ethertype, .. } | Body::RawL3 { ethertype, .. } => {
            format!("{l2}, ethertype 0x{ethertype:04x}")
        }
    }
}

pub fn trace_text(t: &TraceResult) -> String {
    let mut s = format!(
        "port      {} ({}), {}\npacket    {}\nverdict   {} ({}), stage {}\nconntrack {}\n",
        t.port, t.device, t.direction, t.frame, t.verdict, t.reason, t.stage, t.conntrack
    );
    match (&t.rule, &t.rule_id) {
        (Some(text), Some(id)) => {
            s += &format!(
                "rule      #{} {} in group {}\n          {}\n",
                t.rule_index,
                id,
                t.security_group_id.as_deref().unwrap_or("?"),
                text
            );
        }
        _ if t.reason == "drop-no-rule" => s += "rule      none of the port's rules matches\n",
        _ => {}
    }
    s += &format!("policy    {} (remote class {})\n", t.policy, t.class);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn parses_tcp_with_default_syn_and_port_mac_on_the_vm_side() {
        let mac = [0xfa, 0x16, 0x3e, 1, 2, 3];
        let f = parse_packet(&words("tcp 10.0.0.1:4000 10.0.0.2:80"), DIR_INGRESS, mac).unwrap();
        assert_eq!(f.dst_mac, mac);
        let Body::Ip(p) = f.body else { panic!() };
        assert_eq!(
            p.l4,
            L4::Tcp {
                sport: 4000,
                dport: 80,
                flags: TCP_SYN,
                seq: 1000,
                ack: 0
            }
        );
    }

    #[test]
    fn parses_ipv6_icmp_and_options() {
        let f = parse_packet(
            &words("icmpv6 2001:db8::1 2001:db8::2 type=135 src-mac=02:00:00:00:00:09"),
            DIR_EGRESS,
            [0; 6],
        )
        .unwrap();
        assert_eq!(f.src_mac, [2, 0, 0, 0, 0, 9]);
        let Body::Ip(p) = f.body else { panic!() };
        assert!(matches!(
            p.l4,
            L4::Icmp {
                icmp_type: 135,
                code: 0,
                ..
            }
        ));
        let f = parse_packet(
            &words("udp [2001:db8::1]:546 [ff02::1:2]:547"),
            DIR_EGRESS,
            [0; 6],
        )
        .unwrap();
        let Body::Ip(p) = f.body else { panic!() };
        assert_eq!(
            p.l4,
            L4::Udp {
                sport: 546,
                dport: 547
            }
        );
    }

    #[test]
    fn rejects_bad_descriptions_with_reasons() {
        let e = parse_packet(&words("tcp 10.0.0.1 10.0.0.2"), DIR_INGRESS, [0; 6]).unwrap_err();
        assert!(e.to_string().contains("needs SRC:PORT"), "{e}");
        let e = parse_packet(&words("tcp 10.0.0.1:1 2001:db8::1:2"), DIR_INGRESS, [0; 6]).unwrap_err();
        assert!(e.to_string().contains("different address families"), "{e}");
        let e = parse_packet(&words("bogus 10.0.0.1 10.0.0.2"), DIR_INGRESS, [0; 6]).unwrap_err();
        assert!(e.to_string().contains("unknown protocol"), "{e}");
        assert!(parse_packet(&words("tcp"), DIR_INGRESS, [0; 6]).is_err());
    }
}
