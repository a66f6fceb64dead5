//! Addresses as Neutron parses and prints them.
//!
//! Neutron stores the *strings* it got through `netaddr`, and the iptables driver prints those
//! strings back, so the model keeps both: the original (or Neutron-normalised) text for the
//! renderer and a parsed value for matching. Parsing follows `netaddr` 1.x with the flags the
//! API uses (`INET_PTON`): no leading zeros in IPv4 octets, no whitespace. IPv6 text is
//! produced like glibc's `inet_ntop`, which is what Python's `str(IPAddress)` calls.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// A MAC address (EUI-48).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// Parses every EUI-48 text form `netaddr.valid_mac` accepts (colon or dash pairs with 1-2
    /// hex digits, Cisco triples, PostgreSQL halves, bare 11-12 digits), as the API does.
    pub fn parse(s: &str) -> Option<MacAddr> {
        let hex_group = |g: &str, min: usize, max: usize| {
            (min..=max).contains(&g.len()) && g.bytes().all(|b| b.is_ascii_hexdigit())
        };
        let words: Vec<&str>;
        let width: u32;
        let try_split = |sep: char, n: usize, min: usize, max: usize| -> Option<Vec<&str>> {
            let parts: Vec<&str> = s.split(sep).collect();
            (parts.len() == n && parts.iter().all(|p| hex_group(p, min, max))).then_some(parts)
        };
        if let Some(p) = try_split(':', 6, 1, 2).or_else(|| try_split('-', 6, 1, 2)) {
            words = p;
            width = 8;
        } else if let Some(p) = try_split(':', 3, 1, 4)
            .or_else(|| try_split('-', 3, 1, 4))
            .or_else(|| try_split('.', 3, 1, 4))
        {
            words = p;
            width = 16;
        } else if let Some(p) = try_split('-', 2, 5, 6).or_else(|| try_split(':', 2, 5, 6)) {
            words = p;
            width = 24;
        } else if hex_group(s, 11, 12) {
            words = vec![s];
            width = 48;
        } else {
            return None;
        }
        let mut value: u64 = 0;
        for w in words {
            value = (value << width) | u64::from_str_radix(w, 16).ok()?;
        }
        let b = value.to_be_bytes();
        Some(MacAddr([b[2], b[3], b[4], b[5], b[6], b[7]]))
    }

    /// Upper-case colon form, as Neutron's iptables driver prints it (`mac_iptables`).
    pub fn to_upper(&self) -> String {
        self.to_string().to_ascii_uppercase()
    }

    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }

    /// The IPv6 link-local address Neutron derives from the MAC
    /// (`get_ipv6_addr_by_EUI64("fe80::/64", mac)`): modified EUI-64.
    pub fn link_local(&self) -> Ipv6Addr {
        let m = self.0;
        Ipv6Addr::from([
            0xfe,
            0x80,
            0,
            0,
            0,
            0,
            0,
            0,
            m[0] ^ 0x02,
            m[1],
            m[2],
            0xff,
            0xfe,
            m[3],
            m[4],
            m[5],
        ])
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// Parses an IP address the way `neutron_lib.api.validators.validate_ip_address` accepts it:
/// IPv4 only in canonical dotted-quad form (no leading zeros), IPv6 in any standard form.
pub fn parse_ip(s: &str) -> Option<IpAddr> {
    if s.contains(':') {
        s.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
    } else {
        // Rust's parser is exactly the canonical dotted quad Neutron insists on.
        s.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
    }
}

/// A prefix as `netaddr.IPNetwork` parses it: an address, optionally `/len`, `/netmask` or
/// `/hostmask`. Host bits are kept (`IpNet` stores the address as given); use
/// [`IpNet::trunc`] for the network.
pub fn parse_network(s: &str) -> Option<IpNet> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let ip = parse_ip(addr)?;
    let width: u8 = if ip.is_ipv4() { 32 } else { 128 };
    let prefix = match len {
        None => width,
        Some(l) if !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()) => {
            // Python's int() reads "024" as 24, and so does this.
            let n: u32 = l.trim_start_matches('0').parse().unwrap_or(0);
            if l.len() > 3 || n > u32::from(width) {
                return None;
            }
            n as u8
        }
        Some(l) => mask_to_prefix(parse_ip(l)?, ip.is_ipv4())?,
    };
    IpNet::new(ip, prefix).ok()
}

/// netaddr accepts a netmask (ones then zeros) or a hostmask (zeros then ones) after the `/`.
fn mask_to_prefix(mask: IpAddr, v4: bool) -> Option<u8> {
    let (bits, width) = match mask {
        IpAddr::V4(m) if v4 => (u128::from(u32::from(m)) << 96, 32u32),
        IpAddr::V6(m) if !v4 => (u128::from(m), 128u32),
        _ => return None,
    };
    let ones = bits.leading_ones();
    if bits.checked_shl(ones).unwrap_or(0) == 0 {
        return Some(ones.min(width) as u8);
    }
    // hostmask: the significant `width` bits are zeros then ones.
    let host = if v4 { (bits >> 96) as u32 as u128 } else { bits };
    let host_ones = host.trailing_ones();
    if host_ones < 128 && host >> host_ones == 0 {
        return Some((width - host_ones) as u8);
    }
    None
}

/// Text of an address as Python's `str(netaddr.IPAddress)` prints it.
pub fn ip_to_string(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => inet_ntop6(v6),
    }
}

/// Text of a prefix as `str(netaddr.IPNetwork)` prints it: the address as given, then `/len`.
pub fn net_to_string(net: IpNet) -> String {
    format!("{}/{}", ip_to_string(net.addr()), net.prefix_len())
}

/// glibc `inet_ntop(AF_INET6)`: compress the first longest run of two or more zero groups,
/// lower-case hex, and the dotted tail for IPv4-compatible and IPv4-mapped addresses. Rust's
/// `Display` differs for IPv4-compatible addresses (`::1.2.3.4`), hence our own.
pub fn inet_ntop6(ip: Ipv6Addr) -> String {
    let w = ip.segments();
    let (mut best, mut best_len) = (usize::MAX, 0usize);
    let mut i = 0;
    while i < 8 {
        if w[i] == 0 {
            let start = i;
            while i < 8 && w[i] == 0 {
                i += 1;
            }
            if i - start > best_len {
                (best, best_len) = (start, i - start);
            }
        } else {
            i += 1;
        }
    }
    if best_len < 2 {
        best = usize::MAX;
    }
    let mut out = String::with_capacity(41);
    let mut i = 0;
    while i < 8 {
        if i == best {
            out.push(':');
            i += best_len;
            if i == 8 {
                out.push(':');
            }
            continue;
        }
        if i != 0 {
            out.push(':');
        }
        if i == 6 && best == 0 && (best_len == 6 || (best_len == 5 && w[5] == 0xffff)) {
            let o = ip.octets();
            out.push_str(&Ipv4Addr::new(o[12], o[13], o[14], o[15]).to_string());
            break;
        }
        out.push_str(&format!("{:x}", w[i]));
        i += 1;
    }
    out
}

/// The network of a prefix as a (16-byte, network order) key field and its length, IPv4 in
/// the first 4 bytes as sg-common requires.
pub fn net_key(net: IpNet) -> ([u8; 16], u8) {
    let net = net.trunc();
    (ip_key(net.addr()), net.prefix_len())
}

/// An address as a 16-byte key field (IPv4 in the first 4 bytes, the rest zero).
pub fn ip_key(ip: IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => out = v6.octets(),
    }
    out
}

/// The all-addresses prefix of a family.
pub fn any_net(v4: bool) -> IpNet {
    if v4 {
        IpNet::V4(Ipv4Net::default())
    } else {
        IpNet::V6(Ipv6Net::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_forms() {
        let want = MacAddr([0xfa, 0x16, 0x3e, 0xdc, 0xd2, 0xab]);
        for s in [
            "fa:16:3e:dc:d2:ab",
            "FA-16-3E-DC-D2-AB",
            "fa16.3edc.d2ab",
            "fa163e:dcd2ab",
            "fa163edcd2ab",
        ] {
            assert_eq!(MacAddr::parse(s), Some(want), "{s}");
        }
        assert_eq!(
            MacAddr::parse("a:b:c:d:e:f"),
            Some(MacAddr([10, 11, 12, 13, 14, 15]))
        );
        for bad in [
            "",
            "fa:16:3e:dc:d2",
            "fa:16:3e:dc:d2:ab:00",
            "fa:16:3e:dc:d2:zz",
            "fa:16-3e:dc:d2:ab",
            " fa:16:3e:dc:d2:ab",
        ] {
            assert_eq!(MacAddr::parse(bad), None, "{bad}");
        }
        assert_eq!(want.to_upper(), "FA:16:3E:DC:D2:AB");
    }

    #[test]
    fn link_local_is_modified_eui64() {
        let mac = MacAddr::parse("fa:16:3e:12:34:56").unwrap();
        assert_eq!(inet_ntop6(mac.link_local()), "fe80::f816:3eff:fe12:3456");
    }

    #[test]
    fn ips_follow_validate_ip_address() {
        assert!(parse_ip("192.168.206.6").is_some());
        assert!(parse_ip("010.0.0.1").is_none());
        assert!(parse_ip("10.0.0").is_none());
        assert!(parse_ip("2001:DB8::1").is_some());
        assert!(parse_ip("::ffff:1.2.3.4").is_some());
        assert!(parse_ip(" 10.0.0.1").is_none());
    }

    #[test]
    fn networks_print_like_netaddr() {
        let s = |x: &str| parse_network(x).map(net_to_string);
        assert_eq!(s("10.0.0.5/24").as_deref(), Some("10.0.0.5/24"));
        assert_eq!(s("10.0.0.5").as_deref(), Some("10.0.0.5/32"));
        assert_eq!(s("2001:DB8::/32").as_deref(), Some("2001:db8::/32"));
        assert_eq!(s("2001:db8::1").as_deref(), Some("2001:db8::1/128"));
        assert_eq!(s("10.0.0.0/255.255.255.0").as_deref(), Some("10.0.0.0/24"));
        assert_eq!(s("10.0.0.0/0.0.0.255").as_deref(), Some("10.0.0.0/24"));
        assert_eq!(s("10.0.0.0/024").as_deref(), Some("10.0.0.0/24"));
        assert_eq!(s("0.0.0.0/0").as_deref(), Some("0.0.0.0/0"));
        assert_eq!(s("::/0").as_deref(), Some("::/0"));
        for bad in [
            "10.0.0.0/33",
            "10.0.0.0/",
            "10.0.0.0/255.0.255.0",
            "2001:db8::/129",
            "x/8",
            "10.0.0.0/-1",
            "10/8",
        ] {
            assert_eq!(parse_network(bad), None, "{bad}");
        }
    }

    #[test]
    fn ntop6_matches_glibc() {
        let f = |s: &str| inet_ntop6(s.parse().unwrap());
        assert_eq!(f("::"), "::");
        assert_eq!(f("::1"), "::1");
        assert_eq!(f("2001:db8:0:1:0:0:0:1"), "2001:db8:0:1::1");
        assert_eq!(f("2001:db8:0:0:1:0:0:1"), "2001:db8::1:0:0:1");
        assert_eq!(f("2001:db8:0:1:1:1:1:1"), "2001:db8:0:1:1:1:1:1");
        assert_eq!(f("::ffff:1.2.3.4"), "::ffff:1.2.3.4");
        assert_eq!(f("::1.2.3.4"), "::1.2.3.4");
        assert_eq!(f("fe80::f816:3eff:fe12:3456"), "fe80::f816:3eff:fe12:3456");
        assert_eq!(f("1:0:0:0:0:0:0:0"), "1::");
    }
}
