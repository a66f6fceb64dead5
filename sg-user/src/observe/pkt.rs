//! What a captured frame looks like in a log line: the `pkt=` field of Neutron's OVS log
//! driver, which prints `str(os_ken.lib.packet.packet.Packet(data))`, and the one-line summary
//! of `sg monitor`.
//!
//! os_ken prints each header as `name(attr=value,...)` with attributes in name order, headers
//! joined by `", "`, and what it does not decode as a Python bytes literal. sg decodes the
//! headers os_ken decodes for security-group traffic: Ethernet, ARP, IPv4, IPv6 (without
//! extension headers), TCP with its options, UDP, ICMP and ICMPv6 echo. Any other payload is
//! printed as bytes where os_ken may go on decoding (DHCP, ICMP errors, ND...); the oracle
//! test (`tests/tests/netlog.rs`) compares the two on frames of each kind decoded here.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};

use crate::model::addr::inet_ntop6;

/// `str(Packet(data))` as os_ken prints it. Its parser loop: stop at a buffer of zero bytes
/// only, decode header after header while each names the next, stop at a header too short to
/// decode (`struct.error`), and print what is left unless it is all zero padding.
pub fn os_ken(data: &[u8]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut rest = data;
    let mut next = Some(Layer::Ethernet);
    while let Some(layer) = next {
        if all_zero(rest) {
            break;
        }
        let Some((text, following, r)) = decode(layer, rest) else {
            break;
        };
        parts.push(text);
        next = following;
        rest = r;
    }
    if !all_zero(rest) {
        parts.push(py_bytes(rest));
    }
    parts.join(", ")
}

fn all_zero(b: &[u8]) -> bool {
    b.iter().all(|x| *x == 0)
}

#[derive(Clone, Copy)]
enum Layer {
    Ethernet,
    Arp,
    Ipv4,
    Ipv6,
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
}

type Decoded<'a> = Option<(String, Option<Layer>, &'a [u8])>;

fn decode(layer: Layer, d: &[u8]) -> Decoded<'_> {
    match layer {
        Layer::Ethernet => ethernet(d),
        Layer::Arp => arp(d),
        Layer::Ipv4 => ipv4(d),
        Layer::Ipv6 => ipv6(d),
        Layer::Tcp => tcp(d),
        Layer::Udp => udp(d),
        Layer::Icmp => icmp(d, "icmp", "type"),
        Layer::Icmpv6 => icmp(d, "icmpv6", "type_"),
    }
}

fn be16(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

fn be32(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

fn mac(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(":")
}

fn v4(b: &[u8]) -> String {
    Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string()
}

fn v6(b: &[u8]) -> String {
    let a: [u8; 16] = b[..16].try_into().expect("16 bytes");
    inet_ntop6(Ipv6Addr::from(a))
}

/// A Python `bytes` literal, as `repr(b)` writes it.
pub fn py_bytes(b: &[u8]) -> String {
    let quote = if b.contains(&b'\'') && !b.contains(&b'"') {
        '"'
    } else {
        '\''
    };
    let mut s = String::from("b");
    s.push(quote);
    for &c in b {
        match c {
            b'\\' => s.push_str("\\\\"),
            b'\t' => s.push_str("\\t"),
            b'\n' => s.push_str("\\n"),
            b'\r' => s.push_str("\\r"),
            c if c as char == quote => {
                s.push('\\');
                s.push(quote)
            }
            0x20..=0x7e => s.push(c as char),
            c => {
                let _ = write!(s, "\\x{c:02x}");
            }
        }
    }
    s.push(quote);
    s
}

fn ethernet(d: &[u8]) -> Decoded<'_> {
    if d.len() < 14 {
        return None;
    }
    let ethertype = be16(d, 12);
    let text = format!(
        "ethernet(dst='{}',ethertype={ethertype},src='{}')",
        mac(&d[0..6]),
        mac(&d[6..12])
    );
    let next = match ethertype {
        0x0806 => Some(Layer::Arp),
        0x0800 => Some(Layer::Ipv4),
        0x86dd => Some(Layer::Ipv6),
        _ => None,
    };
    Some((text, next, &d[14..]))
}

fn arp(d: &[u8]) -> Decoded<'_> {
    if d.len() < 28 {
        return None;
    }
    let text = format!(
        "arp(dst_ip='{}',dst_mac='{}',hlen={},hwtype={},opcode={},plen={},proto={},src_ip='{}',src_mac='{}')",
        v4(&d[24..28]),
        mac(&d[18..24]),
        d[4],
        be16(d, 0),
        be16(d, 6),
        d[5],
        be16(d, 2),
        v4(&d[14..18]),
        mac(&d[8..14]),
    );
    Some((text, None, &d[28..]))
}

fn ipv4(d: &[u8]) -> Decoded<'_> {
    if d.len() < 20 {
        return None;
    }
    let ihl = (d[0] & 0x0f) as usize;
    let hlen = ihl * 4;
    let total = be16(d, 2) as usize;
    let option = if hlen > 20 && d.len() >= hlen {
        py_bytes(&d[20..hlen])
    } else {
        "None".to_string()
    };
    let flags_off = be16(d, 6);
    let text = format!(
        "ipv4(csum={},dst='{}',flags={},header_length={ihl},identification={},offset={},option={option},proto={},src='{}',tos={},total_length={total},ttl={},version={})",
        be16(d, 10),
        v4(&d[16..20]),
        flags_off >> 13,
        be16(d, 4),
        flags_off & 0x1fff,
        d[9],
        v4(&d[12..16]),
        d[1],
        d[8],
        d[0] >> 4,
    );
    // os_ken: the payload is buf[header_length*4:total_length].
    let from = hlen.min(d.len());
    let to = total.min(d.len()).max(from);
    Some((text, l4(d[9], false), &d[from..to]))
}

fn ipv6(d: &[u8]) -> Decoded<'_> {
    if d.len() < 40 {
        return None;
    }
    let vtf = be32(d, 0);
    let plen = be16(d, 4) as usize;
    let nxt = d[6];
    let text = format!(
        "ipv6(dst='{}',ext_hdrs=[],flow_label={},hop_limit={},nxt={nxt},payload_length={plen},src='{}',traffic_class={},version={})",
        v6(&d[24..40]),
        vtf & 0xfffff,
        d[7],
        v6(&d[8..24]),
        (vtf >> 20) & 0xff,
        vtf >> 28,
    );
    let end = (40 + plen).min(d.len());
    Some((text, l4(nxt, true), &d[40..end]))
}

fn l4(proto: u8, v6: bool) -> Option<Layer> {
    match proto {
        6 => Some(Layer::Tcp),
        17 => Some(Layer::Udp),
        1 if !v6 => Some(Layer::Icmp),
        58 if v6 => Some(Layer::Icmpv6),
        _ => None,
    }
}

fn tcp(d: &[u8]) -> Decoded<'_> {
    if d.len() < 20 {
        return None;
    }
    let offset = (d[12] >> 4) as usize;
    let hlen = (offset * 4).min(d.len());
    let option = if hlen > 20 {
        format!("[{}]", tcp_options(&d[20..hlen]).join(", "))
    } else {
        "None".to_string()
    };
    let text = format!(
        "tcp(ack={},bits={},csum={},dst_port={},offset={offset},option={option},seq={},src_port={},urgent={},window_size={})",
        be32(d, 8),
        be16(d, 12) & 0x1ff,
        be16(d, 16),
        be16(d, 2),
        be32(d, 4),
        be16(d, 0),
        be16(d, 18),
        be16(d, 14),
    );
    Some((text, None, &d[hlen.max(20).min(d.len())..]))
}

fn tcp_options(mut b: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(&kind) = b.first() {
        if kind == 0 || kind == 1 {
            out.push(format!(
                "TCPOption{}(kind={kind},length=1)",
                if kind == 0 {
                    "EndOfOptionList"
                } else {
                    "NoOperation"
                }
            ));
            b = &b[1..];
            continue;
        }
        let len = b.get(1).copied().unwrap_or(0) as usize;
        if len < 2 || len > b.len() {
            out.push(format!(
                "TCPOptionUnknown(kind={kind},length={len},value={})",
                py_bytes(&b[b.len().min(2)..])
            ));
            break;
        }
        let v = &b[2..len];
        out.push(match (kind, len) {
            (2, 4) => format!(
                "TCPOptionMaximumSegmentSize(kind=2,length=4,max_seg_size={})",
                be16(v, 0)
            ),
            (3, 3) => format!("TCPOptionWindowScale(kind=3,length=3,shift_cnt={})", v[0]),
            (4, 2) => "TCPOptionSACKPermitted(kind=4,length=2)".to_string(),
            (8, 10) => format!(
                "TCPOptionTimestamps(kind=8,length=10,ts_ecr={},ts_val={})",
                be32(v, 4),
                be32(v, 0)
            ),
            _ => format!("TCPOptionUnknown(kind={kind},length={len},value={})", py_bytes(v)),
        });
        b = &b[len..];
    }
    out
}

fn udp(d: &[u8]) -> Decoded<'_> {
    if d.len() < 8 {
        return None;
    }
    let total = be16(d, 4) as usize;
    let text = format!(
        "udp(csum={},dst_port={},src_port={},total_length={total})",
        be16(d, 6),
        be16(d, 2),
        be16(d, 0)
    );
    Some((text, None, &d[8..total.clamp(8, d.len())]))
}

fn icmp<'a>(d: &'a [u8], name: &str, type_attr: &str) -> Decoded<'a> {
    if d.len() < 4 {
        return None;
    }
    let (t, code, csum) = (d[0], d[1], be16(d, 2));
    let echo = if name == "icmp" {
        t == 0 || t == 8
    } else {
        t == 128 || t == 129
    };
    let data = if echo && d.len() >= 8 {
        format!(
            "echo(data={},id={},seq={})",
            if d.len() > 8 {
                py_bytes(&d[8..])
            } else {
                "None".to_string()
            },
            be16(d, 4),
            be16(d, 6)
        )
    } else {
        py_bytes(&d[4..])
    };
    let text = format!("{name}(code={code},csum={csum},data={data},{type_attr}={t})");
    Some((text, None, &[]))
}

/// `sg monitor`'s packet summary: addresses, protocol and what matters of it.
pub fn summary(data: &[u8]) -> String {
    if data.len() < 14 {
        return format!("{} bytes", data.len());
    }
    let (src_mac, dst_mac) = (mac(&data[6..12]), mac(&data[0..6]));
    let d = &data[14..];
    match be16(data, 12) {
        0x0806 if d.len() >= 28 => {
            let op = match be16(d, 6) {
                1 => "request",
                2 => "reply",
                _ => "op?",
            };
            format!(
                "ARP {op} {} ({}) -> {}",
                v4(&d[14..18]),
                mac(&d[8..14]),
                v4(&d[24..28])
            )
        }
        0x0800 if d.len() >= 20 => {
            let hlen = ((d[0] & 0x0f) as usize * 4).min(d.len());
            let later = be16(d, 6) & 0x1fff != 0;
            let l4 = if later { &[][..] } else { &d[hlen..] };
            ip_summary(&v4(&d[12..16]), &v4(&d[16..20]), d[9], l4, false, later)
        }
        0x86dd if d.len() >= 40 => ip_summary(&v6(&d[8..24]), &v6(&d[24..40]), d[6], &d[40..], true, false),
        t => format!("{src_mac} -> {dst_mac} ethertype 0x{t:04x}"),
    }
}

fn ip_summary(src: &str, dst: &str, proto: u8, l4: &[u8], v6: bool, later_frag: bool) -> String {
    let (s, d) = if v6 {
        (format!("[{src}]"), format!("[{dst}]"))
    } else {
        (src.to_string(), dst.to_string())
    };
    if later_frag {
        return format!("{src} -> {dst} proto {proto} fragment");
    }
    match proto {
        6 if l4.len() >= 14 => {
            let flags = l4[13];
            let names: Vec<&str> = [
                (0x02, "SYN"),
                (0x10, "ACK"),
                (0x01, "FIN"),
                (0x04, "RST"),
                (0x08, "PSH"),
            ]
            .iter()
            .filter(|(b, _)| flags & b != 0)
            .map(|(_, n)| *n)
            .collect();
            format!(
                "{s}:{} -> {d}:{} tcp {}",
                be16(l4, 0),
                be16(l4, 2),
                names.join("|")
            )
        }
        17 if l4.len() >= 4 => format!("{s}:{} -> {d}:{} udp", be16(l4, 0), be16(l4, 2)),
        1 if !v6 && l4.len() >= 2 => format!("{src} -> {dst} icmp type {} code {}", l4[0], l4[1]),
        58 if v6 && l4.len() >= 2 => format!("{src} -> {dst} icmpv6 type {} code {}", l4[0], l4[1]),
        p => format!("{src} -> {dst} proto {p}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_bytes_literals() {
        assert_eq!(py_bytes(b"hello"), "b'hello'");
        assert_eq!(py_bytes(b"\x00\x01ab"), "b'\\x00\\x01ab'");
        assert_eq!(py_bytes(b"it's"), "b\"it's\"");
        assert_eq!(py_bytes(b"'\""), "b'\\'\"'");
        assert_eq!(py_bytes(b"\\\t\n\r\x7f"), "b'\\\\\\t\\n\\r\\x7f'");
    }
}
