//! Crafting Ethernet frames: for BPF_PROG_TEST_RUN, `sg trace` and the differential test.
//!
//! A `Frame` describes a packet at the level an operator thinks of it (addresses, protocol,
//! ports, flags); `Frame::build` produces the exact bytes with valid lengths and checksums.

use std::net::IpAddr;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88A8;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_SCTP: u8 = 132;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

pub type Mac = [u8; 6];

/// The layer-4 part of an IP packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        seq: u32,
        ack: u32,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// ICMP (IPv4) or ICMPv6, by the packet's family. `rest` is the 4 bytes after the
    /// checksum (echo id and sequence).
    Icmp {
        icmp_type: u8,
        code: u8,
        rest: [u8; 4],
    },
    /// An ICMP/ICMPv6 error quoting `inner` (an IP packet without Ethernet header).
    IcmpError {
        icmp_type: u8,
        code: u8,
        inner: Vec<u8>,
    },
    /// Any protocol number with an opaque payload.
    Raw {
        proto: u8,
        payload: Vec<u8>,
    },
}

impl L4 {
    pub fn proto(&self, v6: bool) -> u8 {
        match self {
            L4::Tcp { .. } => IPPROTO_TCP,
            L4::Udp { .. } => IPPROTO_UDP,
            L4::Icmp { .. } | L4::IcmpError { .. } => {
                if v6 {
                    IPPROTO_ICMPV6
                } else {
                    IPPROTO_ICMP
                }
            }
            L4::Raw { proto, .. } => *proto,
        }
    }
}

/// An IP packet inside an Ethernet frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpPacket {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4: L4,
    pub payload: Vec<u8>,
    pub ttl: u8,
    /// IPv4 identification / IPv6 fragment id.
    pub ident: u32,
    /// IPv4 options (padded with zeros to a multiple of 4 bytes).
    pub ipv4_options: Vec<u8>,
    /// IPv6 extension headers before the L4 header (and before a fragment header): (next-header
    /// number, total length in bytes). Hop-by-hop (0), routing (43) and destination options
    /// (60) take multiples of 8; AH (51) multiples of 4 from 12.
    pub ipv6_ext: Vec<(u8, usize)>,
    /// Fragment (offset in 8-byte units, more fragments). IPv6 gets a fragment header after
    /// `ipv6_ext`. A fragment with offset > 0 should carry `L4::Raw`.
    pub frag: Option<(u16, bool)>,
}

impl IpPacket {
    pub fn new(src: IpAddr, dst: IpAddr, l4: L4) -> Self {
        Self {
            src,
            dst,
            l4,
            payload: Vec::new(),
            ttl: 64,
            ident: 1,
            ipv4_options: Vec::new(),
            ipv6_ext: Vec::new(),
            frag: None,
        }
    }

    pub fn with_ipv4_options(mut self, opts: impl Into<Vec<u8>>) -> Self {
        self.ipv4_options = opts.into();
        self
    }

    pub fn with_ipv6_ext(mut self, kind: u8, len: usize) -> Self {
        self.ipv6_ext.push((kind, len));
        self
    }

    pub fn fragment(mut self, offset_units: u16, more: bool, ident: u32) -> Self {
        self.frag = Some((offset_units, more));
        self.ident = ident;
        self
    }

    pub fn with_payload(mut self, payload: impl Into<Vec<u8>>) -> Self {
        self.payload = payload.into();
        self
    }

    /// The IP packet bytes (no Ethernet header).
    pub fn build(&self) -> Vec<u8> {
        let v6 = self.src.is_ipv6();
        let proto = self.l4.proto(v6);
        let l4 = self.l4_bytes(proto);
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut opts = self.ipv4_options.clone();
                while !opts.len().is_multiple_of(4) {
                    opts.push(0);
                }
                let frag = self
                    .frag
                    .map(|(off, more)| off & 0x1fff | if more { 0x2000 } else { 0 })
                    .unwrap_or(0);
                let mut ip = ipv4_header(
                    s.octets(),
                    d.octets(),
                    proto,
                    opts.len() + l4.len(),
                    self.ttl,
                    self.ident as u16,
                    frag,
                );
                if !opts.is_empty() {
                    ip[0] = 0x40 | ((20 + opts.len()) / 4) as u8;
                    ip[10] = 0;
                    ip[11] = 0;
                    ip.splice(20..20, opts);
                    let c = checksum_fold(checksum_add(0, &ip[..ip.len()]));
                    ip[10..12].copy_from_slice(&c.to_be_bytes());
                }
                ip.extend_from_slice(&l4);
                ip
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                // Extension headers, then the fragment header, then L4; each names the next.
                let mut chain: Vec<(u8, Vec<u8>)> = Vec::new();
                for &(kind, len) in &self.ipv6_ext {
                    let mut h = vec![0u8; len.max(2)];
                    h[1] = if kind == 51 {
                        (len / 4).saturating_sub(2) as u8
                    } else {
                        (len / 8).saturating_sub(1) as u8
                    };
                    chain.push((kind, h));
                }
                if let Some((off, more)) = self.frag {
                    let mut h = vec![0u8; 8];
                    let fo = (off << 3) | more as u16;
                    h[2..4].copy_from_slice(&fo.to_be_bytes());
                    h[4..8].copy_from_slice(&self.ident.to_be_bytes());
                    chain.push((44, h));
                }
                let first = chain.first().map(|(k, _)| *k).unwrap_or(proto);
                let mut body = Vec::new();
                for i in 0..chain.len() {
                    let next = chain.get(i + 1).map(|(k, _)| *k).unwrap_or(proto);
                    let mut h = chain[i].1.clone();
                    h[0] = next;
                    body.extend_from_slice(&h);
                }
                body.extend_from_slice(&l4);
                let mut ip = ipv6_header(s.octets(), d.octets(), first, body.len(), self.ttl);
                ip.extend_from_slice(&body);
                // IPv6 has no identification field: the flow label tells frames apart.
                let flow = (self.ident & 0x000f_ffff).to_be_bytes();
                ip[1] = flow[1];
                ip[2] = flow[2];
                ip[3] = flow[3];
                ip
            }
            _ => panic!("IpPacket with mixed address families"),
        }
    }

    fn l4_bytes(&self, proto: u8) -> Vec<u8> {
        let mut b = match &self.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
                seq,
                ack,
            } => {
                let mut t = Vec::with_capacity(20);
                t.extend_from_slice(&sport.to_be_bytes());
                t.extend_from_slice(&dport.to_be_bytes());
                t.extend_from_slice(&seq.to_be_bytes());
                t.extend_from_slice(&ack.to_be_bytes());
                t.push(5 << 4);
                t.push(*flags);
                t.extend_from_slice(&64240u16.to_be_bytes());
                t.extend_from_slice(&[0, 0, 0, 0]);
                t
            }
            L4::Udp { sport, dport } => {
                let mut u = Vec::with_capacity(8);
                u.extend_from_slice(&sport.to_be_bytes());
                u.extend_from_slice(&dport.to_be_bytes());
                u.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                u.extend_from_slice(&[0, 0]);
                u
            }
            L4::Icmp {
                icmp_type,
                code,
                rest,
            } => {
                let mut i = vec![*icmp_type, *code, 0, 0];
                i.extend_from_slice(rest);
                i
            }
            L4::IcmpError {
                icmp_type,
                code,
                inner,
            } => {
                let mut i = vec![*icmp_type, *code, 0, 0, 0, 0, 0, 0];
                i.extend_from_slice(inner);
                i
            }
            L4::Raw { payload, .. } => payload.clone(),
        };
        b.extend_from_slice(&self.payload);
        let csum_off = match self.l4 {
            L4::Tcp { .. } => Some(16),
            L4::Udp { .. } => Some(6),
            L4::Icmp { .. } | L4::IcmpError { .. } => Some(2),
            L4::Raw { .. } => None,
        };
        if let Some(off) = csum_off {
            let pseudo = match (self.src, self.dst, proto) {
                // ICMPv4 has no pseudo-header.
                (_, _, IPPROTO_ICMP) => Vec::new(),
                (IpAddr::V4(s), IpAddr::V4(d), _) => {
                    let mut p = Vec::with_capacity(12);
                    p.extend_from_slice(&s.octets());
                    p.extend_from_slice(&d.octets());
                    p.extend_from_slice(&[0, proto]);
                    p.extend_from_slice(&(b.len() as u16).to_be_bytes());
                    p
                }
                (IpAddr::V6(s), IpAddr::V6(d), _) => {
                    let mut p = Vec::with_capacity(40);
                    p.extend_from_slice(&s.octets());
                    p.extend_from_slice(&d.octets());
                    p.extend_from_slice(&(b.len() as u32).to_be_bytes());
                    p.extend_from_slice(&[0, 0, 0, proto]);
                    p
                }
                _ => unreachable!(),
            };
            let mut sum = checksum_add(0, &pseudo);
            sum = checksum_add(sum, &b);
            let mut c = checksum_fold(sum);
            if c == 0 && proto == IPPROTO_UDP {
                c = 0xffff;
            }
            b[off..off + 2].copy_from_slice(&c.to_be_bytes());
        }
        b
    }
}

/// A whole Ethernet frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub src_mac: Mac,
    pub dst_mac: Mac,
    /// 802.1Q / 802.1ad tags, outermost first: (TPID, TCI).
    pub vlans: Vec<(u16, u16)>,
    pub body: Body,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Ip(IpPacket),
    Arp {
        op: u16,
        sha: Mac,
        spa: [u8; 4],
        tha: Mac,
        tpa: [u8; 4],
    },
    /// Any other ethertype with an opaque payload.
    Other {
        ethertype: u16,
        payload: Vec<u8>,
    },
    /// Raw bytes after the Ethernet header, ethertype given (malformed IP, fragments, ...).
    RawL3 {
        ethertype: u16,
        bytes: Vec<u8>,
    },
}

impl Frame {
    pub fn ip(src_mac: Mac, dst_mac: Mac, pkt: IpPacket) -> Self {
        Self {
            src_mac,
            dst_mac,
            vlans: Vec::new(),
            body: Body::Ip(pkt),
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(128);
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        for (tpid, tci) in &self.vlans {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&tci.to_be_bytes());
        }
        match &self.body {
            Body::Ip(p) => {
                let et = if p.src.is_ipv6() { ETH_P_IPV6 } else { ETH_P_IP };
                f.extend_from_slice(&et.to_be_bytes());
                f.extend_from_slice(&p.build());
            }
            Body::Arp {
                op,
                sha,
                spa,
                tha,
                tpa,
            } => {
                f.extend_from_slice(&ETH_P_ARP.to_be_bytes());
                f.extend_from_slice(&[0, 1, 8, 0, 6, 4]);
                f.extend_from_slice(&op.to_be_bytes());
                f.extend_from_slice(sha);
                f.extend_from_slice(spa);
                f.extend_from_slice(tha);
                f.extend_from_slice(tpa);
            }
            Body::Other { ethertype, payload } => {
                f.extend_from_slice(&ethertype.to_be_bytes());
                f.extend_from_slice(payload);
            }
            Body::RawL3 { ethertype, bytes } => {
                f.extend_from_slice(&ethertype.to_be_bytes());
                f.extend_from_slice(bytes);
            }
        }
        // Pad to the Ethernet minimum as a NIC would; parsers must rely on IP lengths.
        while f.len() < 60 {
            f.push(0);
        }
        f
    }
}

pub fn ipv4_header(
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    l4_len: usize,
    ttl: u8,
    id: u16,
    frag: u16,
) -> Vec<u8> {
    let mut h = Vec::with_capacity(20);
    h.push(0x45);
    h.push(0);
    h.extend_from_slice(&((20 + l4_len) as u16).to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&frag.to_be_bytes());
    h.push(ttl);
    h.push(proto);
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    let c = checksum_fold(checksum_add(0, &h));
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

pub fn ipv6_header(src: [u8; 16], dst: [u8; 16], next: u8, payload_len: usize, hop: u8) -> Vec<u8> {
    let mut h = Vec::with_capacity(40);
    h.extend_from_slice(&[0x60, 0, 0, 0]);
    h.extend_from_slice(&(payload_len as u16).to_be_bytes());
    h.push(next);
    h.push(hop);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h
}

/// One's-complement sum of 16-bit big-endian words.
pub fn checksum_add(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum = sum.wrapping_add(u16::from_be_bytes([c[0], c[1]]) as u32);
    }
    if let [last] = chunks.remainder() {
        sum = sum.wrapping_add((*last as u32) << 8);
    }
    sum
}

pub fn checksum_fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

pub fn parse_mac(s: &str) -> Option<Mac> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        return None;
    }
    let mut m = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        if p.len() != 2 {
            return None;
        }
        m[i] = u8::from_str_radix(p, 16).ok()?;
    }
    Some(m)
}

pub fn format_mac(m: &Mac) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_checksum_verifies() {
        let h = ipv4_header([10, 0, 0, 1], [10, 0, 0, 2], 6, 20, 64, 7, 0);
        assert_eq!(checksum_fold(checksum_add(0, &h)), 0);
    }

    #[test]
    fn tcp_checksum_verifies_with_pseudo_header() {
        let p = IpPacket::new(
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            L4::Tcp {
                sport: 1234,
                dport: 80,
                flags: TCP_SYN,
                seq: 1,
                ack: 0,
            },
        )
        .with_payload(b"hello".to_vec());
        let b = p.build();
        let tcp = &b[20..];
        let mut pseudo = vec![10, 0, 0, 1, 10, 0, 0, 2, 0, 6];
        pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
        assert_eq!(checksum_fold(checksum_add(checksum_add(0, &pseudo), tcp)), 0);
        assert_eq!(u16::from_be_bytes([b[2], b[3]]) as usize, b.len());
    }

    #[test]
    fn frames_are_padded_and_carry_ethertype() {
        let f = Frame::ip(
            [2, 0, 0, 0, 0, 1],
            [2, 0, 0, 0, 0, 2],
            IpPacket::new(
                "fe80::1".parse().unwrap(),
                "fe80::2".parse().unwrap(),
                L4::Icmp {
                    icmp_type: 128,
                    code: 0,
                    rest: [0, 1, 0, 1],
                },
            ),
        )
        .build();
        assert_eq!(&f[12..14], &ETH_P_IPV6.to_be_bytes());
        assert!(f.len() >= 60);
        assert_eq!(f[14 + 6], IPPROTO_ICMPV6);
    }

    #[test]
    fn mac_round_trip() {
        let m = parse_mac("fa:16:3e:dc:d2:ab").unwrap();
        assert_eq!(format_mac(&m), "fa:16:3e:dc:d2:ab");
        assert!(parse_mac("fa:16:3e:dc:d2").is_none());
        assert!(parse_mac("fa:16:3e:dc:d2:zz").is_none());
    }
}
