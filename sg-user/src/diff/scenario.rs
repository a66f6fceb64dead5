//! Scenarios: sequences of crafted frames, in either direction, derived from the input.
//!
//! A scenario is what one flow (or one probe) looks like on the wire: a TCP conversation, a
//! UDP exchange, pings, ICMP errors, spoofed sources, DHCP, ND, fragments, other protocols, a
//! rule removed or added in the middle. Addresses and ports come from the input itself (the
//! port's addresses and pairs, the rules' prefixes, ports, ICMP types and remote groups), so
//! that most probes sit right on a rule's edge. Every frame is unique on the wire: IPv4
//! frames carry a scenario-wide id in the IP identification field, IPv6 frames in the flow
//! label.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use rand::{RngExt as _, SeedableRng as _, seq::IndexedRandom as _};
use rand_chacha::ChaCha8Rng;

use crate::{
    model::{Direction, Ethertype, Model, Port, Remote},
    packet::{Body, Frame, IpPacket, L4, Mac, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN},
};

/// Where a frame enters or is captured: a local port's VM, or the uplink of a network.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Side {
    Vm(String),
    Uplink(String),
}

/// Frames sent together from one side and captured at another, followed by a sentinel.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Shot {
    pub from: Side,
    pub to: Side,
    #[serde(skip)]
    pub frames: Vec<Frame>,
    /// One line per frame, for reports.
    pub labels: Vec<String>,
    /// Only sent if the previous shot of the scenario was delivered by both back ends: a real
    /// peer answers only what it received.
    pub needs_previous: bool,
    /// Fragments of one datagram: the outcome is whether the datagram arrived.
    pub datagram: bool,
    /// A documented difference: the expected sg verdict of every frame, checked on its own.
    pub documented: Option<(&'static str, bool)>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub enum Step {
    Send(Shot),
    /// Change the input (a rule removed, or put back): both back ends apply it.
    Change {
        what: String,
        edit: Edit,
    },
}

/// A change to the configuration a scenario runs on. An edit rather than a copy of the
/// input, so that a shrunk input gets the same change.
#[derive(Debug, Clone, serde::Serialize)]
pub enum Edit {
    RemoveRule {
        group: String,
        rule: String,
    },
    /// Back to the configuration as given.
    Original,
}

impl Edit {
    pub fn apply(&self, base: &Model) -> Model {
        let mut m = base.clone();
        if let Edit::RemoveRule { group, rule } = self
            && let Some(sg) = m.security_groups.iter_mut().find(|s| &s.id == group)
        {
            sg.rules.retain(|r| &r.id != rule);
        }
        m
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Scenario {
    pub name: String,
    pub steps: Vec<Step>,
}

/// A MAC for "the rest of the network" behind an uplink.
pub const REMOTE_MAC: Mac = [0x02, 0x00, 0x5e, 0x00, 0x00, 0x01];
const OTHER_MAC: Mac = [0x02, 0x00, 0x5e, 0x00, 0x0b, 0xad];

struct Ctx<'a> {
    model: &'a Model,
    port: &'a Port,
    rng: ChaCha8Rng,
    next_id: u32,
}

fn mac_of(p: &Port) -> Mac {
    p.mac.0
}

fn v4_of(p: &Port) -> Option<Ipv4Addr> {
    p.fixed_ips.iter().find_map(|f| match f.ip {
        IpAddr::V4(a) => Some(a),
        _ => None,
    })
}

fn v6_of(p: &Port) -> Option<Ipv6Addr> {
    p.fixed_ips.iter().find_map(|f| match f.ip {
        IpAddr::V6(a) => Some(a),
        _ => None,
    })
}

/// An address inside `net` (not the network address when there is room).
fn inside(net: IpNet, pick: u32) -> IpAddr {
    let net = net.trunc();
    match net {
        IpNet::V4(n) => {
            let host_bits = 32 - n.prefix_len() as u32;
            let span = if host_bits >= 32 {
                u32::MAX
            } else {
                (1u32 << host_bits) - 1
            };
            let off = if span == 0 { 0 } else { 1 + pick % span.max(1) };
            IpAddr::V4(Ipv4Addr::from(u32::from(n.network()).wrapping_add(off.min(span))))
        }
        IpNet::V6(n) => {
            let host_bits = 128 - n.prefix_len() as u32;
            let off: u128 = if host_bits == 0 {
                0
            } else {
                1 + (pick as u128 % ((1u128 << host_bits.min(32)) - 1).max(1))
            };
            IpAddr::V6(Ipv6Addr::from(u128::from(n.network()).wrapping_add(off)))
        }
    }
}

impl Ctx<'_> {
    fn id(&mut self) -> u32 {
        self.next_id += 1;
        self.next_id
    }

    fn ip(&mut self, src: IpAddr, dst: IpAddr, l4: L4) -> IpPacket {
        let mut p = IpPacket::new(src, dst, l4);
        p.ident = self.id();
        p
    }

    fn vm(&self) -> Side {
        Side::Vm(self.port.id.clone())
    }

    fn uplink(&self) -> Side {
        Side::Uplink(self.port.network_id.clone())
    }

    /// The port's own address of a family (its link-local for IPv6 when it has no IPv6).
    /// A remote address and a service port that the rules of the shot's direction name, and
    /// the VM's own address (the remote and the port drawn in this order, so that a seed keeps
    /// giving the same scenarios).
    fn ends(&mut self, eth: Ethertype, to_vm: bool) -> (IpAddr, u16, IpAddr) {
        let dir = direction(to_vm);
        let remote = self.remote(eth, dir);
        let (_, dport) = self.service(eth, dir);
        (remote, dport, self.own(eth))
    }

    fn own(&self, eth: Ethertype) -> IpAddr {
        match eth {
            Ethertype::IPv4 => IpAddr::V4(v4_of(self.port).unwrap_or(Ipv4Addr::new(10, 250, 0, 5))),
            Ethertype::IPv6 => IpAddr::V6(v6_of(self.port).unwrap_or_else(|| self.port.mac.link_local())),
        }
    }

    /// A remote address the port's rules care about, or an arbitrary one.
    fn remote(&mut self, eth: Ethertype, dir: Direction) -> IpAddr {
        let mut candidates: Vec<IpAddr> = Vec::new();
        for (_, r) in self.model.port_rules(self.port) {
            if r.ethertype != eth || r.direction != dir {
                continue;
            }
            match &r.remote {
                Remote::Prefix(net) if net.prefix_len() > 0 => {
                    candidates.push(inside(*net, self.rng.random()));
                    // Just outside the prefix, on its upper edge.
                    if let IpNet::V4(n) = net.trunc()
                        && n.prefix_len() > 0
                    {
                        candidates.push(IpAddr::V4(Ipv4Addr::from(
                            u32::from(n.broadcast()).wrapping_add(1),
                        )));
                    }
                }
                Remote::Group(_) | Remote::AddressGroup(_) => {
                    if let Some(members) = self.model.members(&r.remote, eth) {
                        for m in members {
                            candidates.push(inside(m.net, self.rng.random()));
                        }
                    }
                }
                _ => {}
            }
        }
        let own = self.own(eth);
        candidates.retain(|a| *a != own);
        if !candidates.is_empty() && self.rng.random_bool(0.75) {
            return *candidates.choose(&mut self.rng).unwrap();
        }
        match eth {
            Ethertype::IPv4 => IpAddr::V4(Ipv4Addr::new(203, 0, 113, self.rng.random_range(1..250))),
            Ethertype::IPv6 => IpAddr::V6(Ipv6Addr::new(
                0x2001,
                0xdb8,
                0xff,
                0,
                0,
                0,
                0,
                self.rng.random_range(1..0xfff),
            )),
        }
    }

    /// (protocol, destination port or ICMP type/code) pairs that sit on the port's rules.
    fn service(&mut self, eth: Ethertype, dir: Direction) -> (u8, u16) {
        let mut options: Vec<(u8, u16)> = Vec::new();
        for (_, r) in self.model.port_rules(self.port) {
            if r.ethertype != eth || r.direction != dir {
                continue;
            }
            match (r.proto_num, r.port_range_min, r.port_range_max) {
                (Some(p @ (6 | 17)), Some(lo), hi) => {
                    let hi = hi.unwrap_or(lo);
                    options.extend([
                        (p, lo),
                        (p, hi),
                        (p, lo.saturating_sub(1).max(1)),
                        (p, hi.saturating_add(1)),
                    ]);
                }
                (Some(p @ (6 | 17)), None, _) => options.push((p, self.rng.random_range(1..65535))),
                _ => {}
            }
        }
        if options.is_empty() || self.rng.random_bool(0.2) {
            let p = if self.rng.random_bool(0.6) { 6 } else { 17 };
            return (
                p,
                *[22u16, 80, 443, 53, 8080, 5000].choose(&mut self.rng).unwrap(),
            );
        }
        *options.choose(&mut self.rng).unwrap()
    }

    fn shot(&self, from: Side, to: Side, frames: Vec<Frame>) -> Shot {
        let labels = frames.iter().map(describe).collect();
        Shot {
            from,
            to,
            frames,
            labels,
            needs_previous: false,
            datagram: false,
            documented: None,
        }
    }

    /// A shot towards the VM (from the uplink) or from it (to the uplink).
    fn shot_dir(&self, to_vm: bool, frames: Vec<Frame>) -> Shot {
        if to_vm {
            self.shot(self.uplink(), self.vm(), frames)
        } else {
            self.shot(self.vm(), self.uplink(), frames)
        }
    }

    fn frame(&self, to_vm: bool, p: IpPacket) -> Frame {
        let (src, dst) = if to_vm {
            (REMOTE_MAC, mac_of(self.port))
        } else {
            (mac_of(self.port), REMOTE_MAC)
        };
        Frame::ip(src, dst, p)
    }

    /// A TCP conversation: handshake, data each way, FIN each way, last ACK; or ending in a
    /// RST. `to_vm`: the remote opens it.
    fn tcp_conversation(&mut self, eth: Ethertype, to_vm: bool, rst: bool) -> Vec<Step> {
        let (remote, dport, own) = self.ends(eth, to_vm);
        let (client, server) = if to_vm { (remote, own) } else { (own, remote) };
        let cport = self.rng.random_range(32768..60999u16);
        let (c, s) = (1_000u32, 5_000u32);
        let seg = |me: &mut Self, from_client: bool, flags: u8, seq: u32, ack: u32, data: &[u8]| {
            let (src, dst, sport, dp) = if from_client {
                (client, server, cport, dport)
            } else {
                (server, client, dport, cport)
            };
            let p = me
                .ip(
                    src,
                    dst,
                    L4::Tcp {
                        sport,
                        dport: dp,
                        flags,
                        seq,
                        ack,
                    },
                )
                .with_payload(data.to_vec());
            let towards_vm = from_client == to_vm;
            let frame = me.frame(towards_vm, p);
            let (f, t) = if towards_vm {
                (me.uplink(), me.vm())
            } else {
                (me.vm(), me.uplink())
            };
            let mut shot = me.shot(f, t, vec![frame]);
            shot.needs_previous = true;
            Step::Send(shot)
        };
        let mut steps = vec![
            seg(self, true, TCP_SYN, c, 0, b""),
            seg(self, false, TCP_SYN | TCP_ACK, s, c + 1, b""),
            seg(self, true, TCP_ACK, c + 1, s + 1, b""),
            seg(self, true, TCP_PSH | TCP_ACK, c + 1, s + 1, b"hello"),
            seg(self, false, TCP_PSH | TCP_ACK, s + 1, c + 6, b"world"),
        ];
        if let Step::Send(first) = &mut steps[0] {
            first.needs_previous = false;
        }
        if rst {
            // In window for whichever side resets: Linux drops out-of-window RSTs as INVALID,
            // sg does not track windows (D14), and a real stack sends its own next sequence.
            if self.rng.random_bool(0.5) {
                steps.push(seg(self, true, TCP_RST | TCP_ACK, c + 6, s + 6, b""));
            } else {
                steps.push(seg(self, false, TCP_RST | TCP_ACK, s + 6, c + 6, b""));
            }
        } else {
            steps.push(seg(self, true, TCP_FIN | TCP_ACK, c + 6, s + 6, b""));
            steps.push(seg(self, false, TCP_FIN | TCP_ACK, s + 6, c + 7, b""));
            steps.push(seg(self, true, TCP_ACK, c + 7, s + 7, b""));
        }
        steps
    }

    /// A packet that is not the start of anything: a bare ACK (Linux picks it up as NEW), a
    /// SYN-ACK or a FIN without state (INVALID); then the other side's answer.
    fn tcp_without_state(&mut self, eth: Ethertype, to_vm: bool) -> Vec<Step> {
        let (remote, dport, own) = self.ends(eth, to_vm);
        let flags = *[TCP_ACK, TCP_SYN | TCP_ACK, TCP_FIN | TCP_ACK, TCP_PSH | TCP_ACK]
            .choose(&mut self.rng)
            .unwrap();
        let cport = self.rng.random_range(32768..60999u16);
        let (src, dst) = if to_vm { (remote, own) } else { (own, remote) };
        let p = self.ip(
            src,
            dst,
            L4::Tcp {
                sport: cport,
                dport,
                flags,
                seq: 7000,
                ack: 9000,
            },
        );
        let f = self.frame(to_vm, p);
        let first = self.shot_dir(to_vm, vec![f]);
        let p = self.ip(
            dst,
            src,
            L4::Tcp {
                sport: dport,
                dport: cport,
                flags: TCP_ACK,
                seq: 9000,
                ack: 7001,
            },
        );
        let f = self.frame(!to_vm, p);
        let mut answer = self.shot_dir(!to_vm, vec![f]);
        answer.needs_previous = true;
        vec![Step::Send(first), Step::Send(answer)]
    }

    fn udp_exchange(&mut self, eth: Ethertype, to_vm: bool) -> Vec<Step> {
        let (remote, dport, own) = self.ends(eth, to_vm);
        let sport = self.rng.random_range(32768..60999u16);
        let (a, b) = if to_vm { (remote, own) } else { (own, remote) };
        let mut steps = Vec::new();
        for (i, (src, dst, sp, dp, towards_vm)) in [
            (a, b, sport, dport, to_vm),
            (b, a, dport, sport, !to_vm),
            (a, b, sport, dport, to_vm),
        ]
        .into_iter()
        .enumerate()
        {
            let p = self
                .ip(src, dst, L4::Udp { sport: sp, dport: dp })
                .with_payload(b"sg".to_vec());
            let f = self.frame(towards_vm, p);
            let mut s = self.shot_dir(towards_vm, vec![f]);
            s.needs_previous = i == 1;
            steps.push(Step::Send(s));
        }
        steps
    }

    fn echo(&mut self, eth: Ethertype, to_vm: bool, unsolicited_reply: bool) -> Vec<Step> {
        let dir = direction(to_vm);
        let remote = self.remote(eth, dir);
        let own = self.own(eth);
        let (req, rep) = if eth == Ethertype::IPv4 {
            (8u8, 0u8)
        } else {
            (128, 129)
        };
        let ident: u16 = self.rng.random();
        let rest = |seq: u16| {
            let i = ident.to_be_bytes();
            let s = seq.to_be_bytes();
            [i[0], i[1], s[0], s[1]]
        };
        let (a, b) = if to_vm { (remote, own) } else { (own, remote) };
        if unsolicited_reply {
            let p = self.ip(
                a,
                b,
                L4::Icmp {
                    icmp_type: rep,
                    code: 0,
                    rest: rest(1),
                },
            );
            let f = self.frame(to_vm, p);
            let s = self.shot_dir(to_vm, vec![f]);
            return vec![Step::Send(s)];
        }
        let p = self.ip(
            a,
            b,
            L4::Icmp {
                icmp_type: req,
                code: 0,
                rest: rest(1),
            },
        );
        let f = self.frame(to_vm, p);
        let s1 = self.shot_dir(to_vm, vec![f]);
        let p = self.ip(
            b,
            a,
            L4::Icmp {
                icmp_type: rep,
                code: 0,
                rest: rest(1),
            },
        );
        let f = self.frame(!to_vm, p);
        let mut s2 = self.shot_dir(!to_vm, vec![f]);
        s2.needs_previous = true;
        vec![Step::Send(s1), Step::Send(s2)]
    }

    /// The VM opens a TCP or UDP flow; the remote answers with an ICMP error quoting it
    /// (RELATED), then one quoting a flow that does not exist (INVALID unless a rule allows).
    fn icmp_error(&mut self, eth: Ethertype) -> Vec<Step> {
        let remote = self.remote(eth, Direction::Egress);
        let own = self.own(eth);
        let (proto, dport) = self.service(eth, Direction::Egress);
        let sport = self.rng.random_range(32768..60999u16);
        let l4 = |sp: u16, dp: u16| {
            if proto == 6 {
                L4::Tcp {
                    sport: sp,
                    dport: dp,
                    flags: TCP_SYN,
                    seq: 1,
                    ack: 0,
                }
            } else {
                L4::Udp { sport: sp, dport: dp }
            }
        };
        let out = self.ip(own, remote, l4(sport, dport));
        let quoted = |p: &IpPacket| {
            let b = p.build();
            let hl = if eth == Ethertype::IPv4 { 20 } else { 40 };
            b[..(hl + 8).min(b.len())].to_vec()
        };
        let (etype, ecode) = if eth == Ethertype::IPv4 {
            (3u8, 3u8)
        } else {
            (1, 4)
        };
        let inner = quoted(&out);
        let f = self.frame(false, out);
        let s1 = self.shot(self.vm(), self.uplink(), vec![f]);
        let err = self.ip(
            remote,
            own,
            L4::IcmpError {
                icmp_type: etype,
                code: ecode,
                inner,
            },
        );
        let f = self.frame(true, err);
        let mut s2 = self.shot(self.uplink(), self.vm(), vec![f]);
        s2.needs_previous = true;
        let stranger = IpPacket::new(own, remote, l4(sport.wrapping_add(1), dport.wrapping_add(1)));
        let err = self.ip(
            remote,
            own,
            L4::IcmpError {
                icmp_type: etype,
                code: ecode,
                inner: quoted(&stranger),
            },
        );
        let f = self.frame(true, err);
        let s3 = self.shot(self.uplink(), self.vm(), vec![f]);
        vec![Step::Send(s1), Step::Send(s2), Step::Send(s3)]
    }

    /// From the VM: a source address it does not own, its own address from another MAC, and
    /// each allowed address pair with its own MAC, the port's MAC and a stranger's.
    fn spoofing(&mut self, eth: Ethertype) -> Vec<Step> {
        let remote = self.remote(eth, Direction::Egress);
        let own = self.own(eth);
        let stranger = match eth {
            Ethertype::IPv4 => IpAddr::V4(Ipv4Addr::new(198, 51, 100, self.rng.random_range(1..250))),
            Ethertype::IPv6 => IpAddr::V6(Ipv6Addr::new(
                0x2001,
                0xdb8,
                0xbad,
                0,
                0,
                0,
                0,
                self.rng.random_range(1..0xfff),
            )),
        };
        let mut cases: Vec<(IpAddr, Mac)> = vec![(stranger, mac_of(self.port)), (own, OTHER_MAC)];
        for pair in &self.port.allowed_address_pairs {
            if Ethertype::of_net(pair.net) != eth {
                continue;
            }
            let addr = inside(pair.net, self.rng.random());
            cases.push((addr, pair.mac.0));
            cases.push((addr, mac_of(self.port)));
            cases.push((addr, OTHER_MAC));
        }
        let has_pairs = !self.port.spoof_pairs(eth).is_empty();
        let mut steps = Vec::new();
        for (src, mac) in cases {
            let (sport, dport) = (self.rng.random_range(32768..60999u16), 53);
            let p = self.ip(src, remote, L4::Udp { sport, dport });
            let f = Frame::ip(mac, REMOTE_MAC, p);
            let mut s = self.shot(self.vm(), self.uplink(), vec![f]);
            // Neutron's iptables has no spoof chain for a family without pairs, and never
            // sees the MAC except through a pair; sg checks the source MAC like Neutron's
            // ebtables did (D9).
            let allowed_mac =
                mac == mac_of(self.port) || self.port.allowed_address_pairs.iter().any(|p| p.mac.0 == mac);
            if self.port.is_filtered() && !allowed_mac && !has_pairs {
                s.documented = Some(("D9", false));
            }
            steps.push(Step::Send(s));
        }
        steps
    }

    fn dhcp(&mut self) -> Vec<Step> {
        let own = self.own(Ethertype::IPv4);
        let server = IpAddr::V4(Ipv4Addr::new(10, 250, 0, 2));
        let bcast = IpAddr::V4(Ipv4Addr::BROADCAST);
        let zero = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        let mut steps = Vec::new();
        let mut send =
            |me: &mut Self, src: IpAddr, dst: IpAddr, sp: u16, dp: u16, to_vm: bool, dst_mac: Mac| {
                let p = me
                    .ip(src, dst, L4::Udp { sport: sp, dport: dp })
                    .with_payload(vec![1u8; 32]);
                let (smac, dmac) = if to_vm {
                    (REMOTE_MAC, dst_mac)
                } else {
                    (mac_of(me.port), dst_mac)
                };
                let f = Frame::ip(smac, dmac, p);
                let s = me.shot_dir(to_vm, vec![f]);
                steps.push(Step::Send(s));
            };
        let vm_mac = mac_of(self.port);
        send(self, zero, bcast, 68, 67, false, [0xff; 6]); // discover
        send(self, own, server, 68, 67, false, REMOTE_MAC); // renew
        send(self, own, server, 67, 68, false, REMOTE_MAC); // the VM acting as a server
        send(self, server, own, 67, 68, true, vm_mac); // offer to the port's address
        send(self, server, bcast, 67, 68, true, [0xff; 6]); // broadcast offer
        let other = IpAddr::V4(Ipv4Addr::new(10, 250, 0, 77));
        send(self, server, other, 67, 68, true, vm_mac); // to an address that is not the port's
        steps
    }

    fn dhcp6_nd_ra(&mut self) -> Vec<Step> {
        let lla = IpAddr::V6(self.port.mac.link_local());
        let own = self.own(Ethertype::IPv6);
        let router = IpAddr::V6("fe80::1".parse().unwrap());
        let all_dhcp: IpAddr = "ff02::1:2".parse().unwrap();
        let all_nodes: IpAddr = "ff02::1".parse().unwrap();
        let unspec = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
        let mut steps = Vec::new();
        let mut send = |me: &mut Self, src: IpAddr, dst: IpAddr, l4: L4, to_vm: bool| {
            let p = me.ip(src, dst, l4);
            let f = me.frame(to_vm, p);
            let s = me.shot_dir(to_vm, vec![f]);
            steps.push(Step::Send(s));
        };
        let icmp = |t: u8| L4::Icmp {
            icmp_type: t,
            code: 0,
            rest: [0; 4],
        };
        send(
            self,
            lla,
            all_dhcp,
            L4::Udp {
                sport: 546,
                dport: 547,
            },
            false,
        ); // solicit
        send(
            self,
            lla,
            all_dhcp,
            L4::Udp {
                sport: 547,
                dport: 546,
            },
            false,
        ); // the VM as a server
        send(
            self,
            router,
            lla,
            L4::Udp {
                sport: 547,
                dport: 546,
            },
            true,
        ); // advertise to link-local
        send(
            self,
            router,
            own,
            L4::Udp {
                sport: 547,
                dport: 546,
            },
            true,
        ); // to the port's address
        send(self, lla, all_nodes, icmp(134), false); // RA from the VM
        send(self, router, all_nodes, icmp(134), true); // RA to the VM
        send(self, router, lla, icmp(135), true); // NS, NA, MLD query towards the VM
        send(self, router, lla, icmp(136), true);
        send(self, router, all_nodes, icmp(130), true);
        send(self, unspec, "ff02::1:ff00:5".parse().unwrap(), icmp(135), false); // DAD
        send(self, unspec, "ff02::16".parse().unwrap(), icmp(143), false); // MLDv2 report
        send(self, lla, router, icmp(135), false); // NS from the VM
        send(self, own, router, icmp(128), false); // echo request out
        steps
    }

    /// A datagram in two fragments, in order, in the direction a UDP rule allows or not.
    fn fragments(&mut self, eth: Ethertype, to_vm: bool) -> Vec<Step> {
        let (remote, dport, own) = self.ends(eth, to_vm);
        let (src, dst) = if to_vm { (remote, own) } else { (own, remote) };
        let ident = self.id();
        let payload = vec![0x5au8; 24];
        // First fragment: UDP header + 16 bytes of data = 24 bytes = 3 units; the rest, 16
        // bytes at offset 3.
        let mut full = IpPacket::new(src, dst, L4::Udp { sport: 40000, dport }).with_payload(payload.clone());
        full.ident = ident;
        let whole = full.build();
        let hl = if eth == Ethertype::IPv4 { 20 } else { 40 };
        let l4 = &whole[hl..];
        let first = IpPacket::new(
            src,
            dst,
            L4::Raw {
                proto: 17,
                payload: l4[..24].to_vec(),
            },
        )
        .fragment(0, true, ident);
        let later = IpPacket::new(
            src,
            dst,
            L4::Raw {
                proto: 17,
                payload: l4[24..].to_vec(),
            },
        )
        .fragment(3, false, ident);
        let frames = vec![self.frame(to_vm, first), self.frame(to_vm, later)];
        let mut s = self.shot_dir(to_vm, frames);
        s.datagram = true;
        vec![Step::Send(s)]
    }

    /// Another protocol: GRE, VRRP, or a protocol number a rule names.
    fn other_protocol(&mut self, eth: Ethertype, to_vm: bool) -> Vec<Step> {
        let dir = direction(to_vm);
        let mut protos: Vec<u8> = self
            .model
            .port_rules(self.port)
            .filter(|(_, r)| r.ethertype == eth && r.direction == dir)
            .filter_map(|(_, r)| r.proto_num)
            .filter(|p| !matches!(p, 6 | 17 | 1 | 58 | 132 | 33 | 136 | 0 | 43 | 44 | 60 | 51 | 59))
            .collect();
        protos.extend([47u8, 112]);
        let proto = *protos.choose(&mut self.rng).unwrap();
        let remote = self.remote(eth, dir);
        let own = self.own(eth);
        let (src, dst) = if to_vm { (remote, own) } else { (own, remote) };
        let p = self.ip(
            src,
            dst,
            L4::Raw {
                proto,
                payload: vec![0; 8],
            },
        );
        let f = self.frame(to_vm, p);
        let s = self.shot_dir(to_vm, vec![f]);
        vec![Step::Send(s)]
    }

    /// ICMP probes on the types and codes the rules name (and their neighbours).
    fn icmp_types(&mut self, eth: Ethertype, to_vm: bool) -> Vec<Step> {
        let dir = direction(to_vm);
        let icmp_proto = if eth == Ethertype::IPv4 { 1 } else { 58 };
        let mut probes: Vec<(u8, u8)> = vec![(13, 0), (if eth == Ethertype::IPv4 { 8 } else { 128 }, 0)];
        for (_, r) in self.model.port_rules(self.port) {
            if r.ethertype == eth
                && r.direction == dir
                && r.proto_num == Some(icmp_proto)
                && let Some(t) = r.port_range_min
            {
                let t = t as u8;
                let c = r.port_range_max.unwrap_or(0) as u8;
                probes.extend([(t, c), (t, c.wrapping_add(1)), (t.wrapping_add(1), 0)]);
            }
        }
        let remote = self.remote(eth, dir);
        let own = self.own(eth);
        let (src, dst) = if to_vm { (remote, own) } else { (own, remote) };
        let mut steps = Vec::new();
        for (t, c) in probes.into_iter().take(4) {
            // Types whose quoted packet a tracker would parse are sent as errors quoting noise.
            let l4 = L4::Icmp {
                icmp_type: t,
                code: c,
                rest: [0, 1, 0, 1],
            };
            let p = self.ip(src, dst, l4);
            let f = self.frame(to_vm, p);
            let s = self.shot_dir(to_vm, vec![f]);
            steps.push(Step::Send(s));
        }
        steps
    }

    /// A flow admitted by one rule, then that rule removed, then the flow's next packets: the
    /// client's first, or the VM's first (a VM sending the data, as `iperf3 -R` does). Or a
    /// denied SYN, then a rule added for it, then the SYN again.
    fn change(&mut self, eth: Ethertype) -> Option<Vec<Step>> {
        let candidates: Vec<(usize, usize)> = self
            .model
            .security_groups
            .iter()
            .enumerate()
            .filter(|(_, sg)| self.port.security_groups.contains(&sg.id))
            .flat_map(|(i, sg)| {
                sg.rules
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| {
                        r.direction == Direction::Ingress
                            && r.ethertype == eth
                            && r.proto_num == Some(6)
                            && r.port_range_min.is_some()
                            && matches!(r.remote, Remote::Any)
                    })
                    .map(move |(j, _)| (i, j))
            })
            .collect();
        // Neutron cuts the flows of a removed rule by deleting conntrack entries of the port's
        // fixed IPs; a flow on another address of the port (no fixed IP, an allowed pair)
        // survives in iptables while sg re-checks it (D13, tested on its own).
        let own = self.own(eth);
        if !self.port.fixed_ips.iter().any(|f| f.ip == own) {
            return None;
        }
        let &(gi, ri) = candidates.choose(&mut self.rng)?;
        let rule = self.model.security_groups[gi].rules[ri].clone();
        let remove = Edit::RemoveRule {
            group: self.model.security_groups[gi].id.clone(),
            rule: rule.id.clone(),
        };
        let remote = self.remote(eth, Direction::Ingress);
        let dport = rule.port_range_min.unwrap();
        let cport = self.rng.random_range(32768..60999u16);
        // Whether the removal revokes the flow: no other rule of the port admits it. Then sg
        // stops it in both directions. Neutron deletes its conntrack entry, and when the egress
        // rules admit the VM's next packet as a new flow (mid-stream pickup), it re-opens the
        // flow and the client's packets pass again as its replies (D13): after the change, the
        // VM's frames and the client's frames that follow one are sg's documented verdicts.
        // Otherwise both back ends drop them, compared. A stateless port has no flow to revoke:
        // every frame is compared.
        let edited = remove.apply(self.model);
        let admits = |dir: Direction, port: u16| {
            crate::compile::reference_first_rule(
                &edited,
                &self.port.security_groups,
                &crate::compile::Packet {
                    dir,
                    remote,
                    proto: 6,
                    port,
                    // The client's port towards the VM, the VM's service port from it.
                    sport: if dir == Direction::Ingress { cport } else { dport },
                },
            )
            .is_some()
        };
        let revoked = !admits(Direction::Ingress, dport);
        let documented = revoked && admits(Direction::Egress, cport) && self.model.port_stateful(self.port);
        let revoked_frame = |step: Step| match step {
            Step::Send(mut s) if documented => {
                s.documented = Some(("D13", false));
                Step::Send(s)
            }
            step => step,
        };
        let mk = |me: &mut Self, to_vm: bool, flags: u8, seq: u32, ack: u32| {
            let (src, dst, sp, dp) = if to_vm {
                (remote, own, cport, dport)
            } else {
                (own, remote, dport, cport)
            };
            let p = me
                .ip(
                    src,
                    dst,
                    L4::Tcp {
                        sport: sp,
                        dport: dp,
                        flags,
                        seq,
                        ack,
                    },
                )
                .with_payload(b"x".to_vec());
            let f = me.frame(to_vm, p);
            Step::Send(me.shot_dir(to_vm, vec![f]))
        };
        let variant = self.rng.random_range(0..3u32);
        if variant == 0 {
            // The client speaks first after the removal.
            Some(vec![
                mk(self, true, TCP_SYN, 100, 0),
                mk(self, false, TCP_SYN | TCP_ACK, 900, 101),
                mk(self, true, TCP_ACK, 101, 901),
                Step::Change {
                    what: format!("remove rule {} ({})", rule.id, rule.describe()),
                    edit: remove.clone(),
                },
                mk(self, true, TCP_PSH | TCP_ACK, 101, 901),
                revoked_frame(mk(self, false, TCP_PSH | TCP_ACK, 901, 102)),
                revoked_frame(mk(self, true, TCP_PSH | TCP_ACK, 102, 902)),
            ])
        } else if variant == 1 && revoked {
            // The VM sends the data and keeps sending after the removal (iperf3 -R); its
            // segments run ahead of what the client has acknowledged, as a stream's do.
            let far = 901 + 200_000;
            // Sent whatever happened to the VM's segment: a real client acknowledges what it
            // received before the change.
            let ack = revoked_frame(mk(self, true, TCP_ACK, 101, 902));
            Some(vec![
                mk(self, true, TCP_SYN, 100, 0),
                mk(self, false, TCP_SYN | TCP_ACK, 900, 101),
                mk(self, true, TCP_ACK, 101, 901),
                mk(self, false, TCP_PSH | TCP_ACK, 901, 101),
                mk(self, true, TCP_ACK, 101, 902),
                Step::Change {
                    what: format!("remove rule {} ({})", rule.id, rule.describe()),
                    edit: remove.clone(),
                },
                revoked_frame(mk(self, false, TCP_PSH | TCP_ACK, far, 101)),
                ack,
                revoked_frame(mk(self, false, TCP_PSH | TCP_ACK, far + 1, 101)),
            ])
        } else {
            Some(vec![
                Step::Change {
                    what: format!("remove rule {} ({})", rule.id, rule.describe()),
                    edit: remove.clone(),
                },
                mk(self, true, TCP_SYN, 100, 0),
                Step::Change {
                    what: format!("add rule {} back", rule.id),
                    edit: Edit::Original,
                },
                mk(self, true, TCP_SYN, 100, 0),
                mk(self, false, TCP_SYN | TCP_ACK, 900, 101),
            ])
        }
    }

    /// Frames only sg filters, with their documented sg verdicts: a foreign ethertype and a
    /// VLAN tag from the VM (D8), ARP with a sender the port does not own (D10), a fragment
    /// whose first fragment never came (D11).
    fn documented_only(&mut self) -> Vec<Step> {
        let mut steps = Vec::new();
        let vm_mac = mac_of(self.port);
        let other = Frame {
            src_mac: vm_mac,
            dst_mac: REMOTE_MAC,
            vlans: vec![],
            body: Body::Other {
                ethertype: 0x88b6,
                payload: b"not ip".to_vec(),
            },
        };
        let mut s = self.shot(self.vm(), self.uplink(), vec![other]);
        s.documented = Some(("D8", false));
        steps.push(Step::Send(s));
        let own = self.own(Ethertype::IPv4);
        let remote = self.remote(Ethertype::IPv4, Direction::Egress);
        let p = self.ip(
            own,
            remote,
            L4::Udp {
                sport: 40000,
                dport: 53,
            },
        );
        let mut tagged = self.frame(false, p);
        tagged.vlans.push((0x8100, 100));
        let mut s = self.shot(self.vm(), self.uplink(), vec![tagged]);
        s.documented = Some(("D8", false));
        steps.push(Step::Send(s));
        let IpAddr::V4(spa) = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7)) else {
            unreachable!()
        };
        let arp = Frame {
            src_mac: vm_mac,
            dst_mac: [0xff; 6],
            vlans: vec![],
            body: Body::Arp {
                op: 1,
                sha: vm_mac,
                spa: spa.octets(),
                tha: [0; 6],
                tpa: [10, 250, 0, 1],
            },
        };
        // The sender is the port's only if a pair of its MAC with an address covers it (the
        // MAC-only pair of a port without fixed IPs carries no address: all of that port's ARP
        // is dropped, as in Neutron); an IPv4 pair of /0 turns ARP protection off altogether.
        let arp_off = self
            .port
            .allowed_address_pairs
            .iter()
            .any(|p| matches!(p.net, IpNet::V4(n) if n.prefix_len() == 0));
        let owned = self
            .port
            .spoof_pairs(Ethertype::IPv4)
            .iter()
            .any(|p| p.mac.0 == vm_mac && p.net.is_some_and(|n| n.trunc().contains(&IpAddr::V4(spa))));
        let mut s = self.shot(self.vm(), self.uplink(), vec![arp]);
        s.documented = Some(("D10", arp_off || owned));
        steps.push(Step::Send(s));
        let later = IpPacket::new(
            remote,
            own,
            L4::Raw {
                proto: 17,
                payload: vec![0; 16],
            },
        )
        .fragment(3, false, self.id());
        let f = self.frame(true, later);
        let mut s = self.shot(self.uplink(), self.vm(), vec![f]);
        s.documented = Some(("D11", false));
        steps.push(Step::Send(s));
        steps
    }
}

/// A VM-to-VM TCP conversation between two local ports on one network.
fn vm_to_vm(model: &Model, a: &Port, b: &Port, rng: &mut ChaCha8Rng, next_id: &mut u32) -> Vec<Step> {
    let (Some(ia), Some(ib)) = (v4_of(a), v4_of(b)) else {
        return Vec::new();
    };
    let dport = *[22u16, 80, 443, 8080].choose(rng).unwrap();
    let cport = rng.random_range(32768..60999u16);
    let mut id = || {
        *next_id += 1;
        *next_id
    };
    let _ = model;
    let mut steps = Vec::new();
    for (i, (from_a, flags, seq, ack)) in [
        (true, TCP_SYN, 10u32, 0u32),
        (false, TCP_SYN | TCP_ACK, 50, 11),
        (true, TCP_ACK, 11, 51),
        (false, TCP_PSH | TCP_ACK, 51, 11),
    ]
    .into_iter()
    .enumerate()
    {
        let (src, dst, sp, dp, smac, dmac, from, to) = if from_a {
            (ia, ib, cport, dport, a.mac.0, b.mac.0, &a.id, &b.id)
        } else {
            (ib, ia, dport, cport, b.mac.0, a.mac.0, &b.id, &a.id)
        };
        let mut p = IpPacket::new(
            src.into(),
            dst.into(),
            L4::Tcp {
                sport: sp,
                dport: dp,
                flags,
                seq,
                ack,
            },
        );
        p.ident = id();
        let f = Frame::ip(smac, dmac, p);
        let labels = vec![describe(&f)];
        steps.push(Step::Send(Shot {
            from: Side::Vm(from.clone()),
            to: Side::Vm(to.clone()),
            frames: vec![f],
            labels,
            needs_previous: i > 0,
            datagram: false,
            documented: None,
        }));
    }
    steps
}

/// `count` scenarios for `model`'s ports local to `host`, from `seed`.
pub fn generate(model: &Model, host: &str, seed: u64, count: usize) -> Vec<Scenario> {
    let ports = model.local_ports(host);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::new();
    if ports.is_empty() {
        return out;
    }
    for n in 0..count {
        let port = *ports.choose(&mut rng).unwrap();
        let mut ctx = Ctx {
            model,
            port,
            rng: ChaCha8Rng::seed_from_u64(rng.random()),
            next_id: 0,
        };
        let eth = if port.has_fixed_ip(Ethertype::IPv6) && ctx.rng.random_bool(0.4) {
            Ethertype::IPv6
        } else {
            Ethertype::IPv4
        };
        let to_vm = ctx.rng.random_bool(0.5);
        let kind = ctx.rng.random_range(0..16u32);
        let (name, steps) = match kind {
            0 | 1 => ("tcp", ctx.tcp_conversation(eth, to_vm, false)),
            2 => ("tcp-rst", ctx.tcp_conversation(eth, to_vm, true)),
            3 => ("tcp-no-state", ctx.tcp_without_state(eth, to_vm)),
            4 => ("udp", ctx.udp_exchange(eth, to_vm)),
            5 => ("echo", ctx.echo(eth, to_vm, false)),
            6 => ("echo-reply-alone", ctx.echo(eth, to_vm, true)),
            7 => ("icmp-error", ctx.icmp_error(eth)),
            8 => ("spoofing", ctx.spoofing(eth)),
            9 => ("dhcp", ctx.dhcp()),
            10 => ("dhcp6-nd-ra", ctx.dhcp6_nd_ra()),
            11 => ("fragments", ctx.fragments(eth, to_vm)),
            12 => ("other-protocol", ctx.other_protocol(eth, to_vm)),
            13 => ("icmp-types", ctx.icmp_types(eth, to_vm)),
            14 => match ctx.change(eth) {
                Some(s) => ("rule-change", s),
                None => ("tcp", ctx.tcp_conversation(eth, true, false)),
            },
            _ => {
                let peers: Vec<&&Port> = ports
                    .iter()
                    .filter(|p| p.id != port.id && p.network_id == port.network_id)
                    .collect();
                match peers.choose(&mut ctx.rng) {
                    Some(peer) => {
                        let mut seed_rng = ChaCha8Rng::seed_from_u64(ctx.rng.random());
                        (
                            "vm-to-vm",
                            vm_to_vm(model, port, peer, &mut seed_rng, &mut ctx.next_id),
                        )
                    }
                    None => ("udp", ctx.udp_exchange(eth, to_vm)),
                }
            }
        };
        if steps.is_empty() {
            continue;
        }
        out.push(Scenario {
            name: format!("{n:03}-{name}-{}-{}", port.device, eth.as_str()),
            steps,
        });
    }
    out
}

/// The scenarios of the documented differences, one per local filtered port.
pub fn documented(model: &Model, host: &str, seed: u64) -> Vec<Scenario> {
    model
        .local_ports(host)
        .into_iter()
        .filter(|p| p.is_filtered())
        .map(|port| {
            let mut ctx = Ctx {
                model,
                port,
                rng: ChaCha8Rng::seed_from_u64(seed),
                next_id: 0,
            };
            Scenario {
                name: format!("documented-{}", port.device),
                steps: ctx.documented_only(),
            }
        })
        .collect()
}

/// One line describing a frame.
pub fn describe(f: &Frame) -> String {
    let tag = if f.vlans.is_empty() {
        String::new()
    } else {
        format!(" vlan {:?}", f.vlans)
    };
    match &f.body {
        Body::Ip(p) => {
            let frag = match p.frag {
                Some((off, more)) => format!(" frag off {off}{}", if more { " MF" } else { "" }),
                None => String::new(),
            };
            let l4 = match &p.l4 {
                L4::Tcp {
                    sport, dport, flags, ..
                } => format!("tcp {sport} > {dport} [{}]", tcp_flags(*flags)),
                L4::Udp { sport, dport } => format!("udp {sport} > {dport}"),
                L4::Icmp { icmp_type, code, .. } => format!("icmp type {icmp_type} code {code}"),
                L4::IcmpError { icmp_type, code, .. } => format!("icmp error type {icmp_type} code {code}"),
                L4::Raw { proto, .. } => format!("proto {proto}"),
            };
            format!(
                "{} > {}{tag} {} > {} {l4}{frag}",
                crate::packet::format_mac(&f.src_mac),
                crate::packet::format_mac(&f.dst_mac),
                p.src,
                p.dst
            )
        }
        Body::Arp {
            op, sha, spa, tpa, ..
        } => format!(
            "{} arp op {op} sender {} {} target {}",
            crate::packet::format_mac(&f.src_mac),
            crate::packet::format_mac(sha),
            Ipv4Addr::from(*spa),
            Ipv4Addr::from(*tpa)
        ),
        Body::Other { ethertype, .. } | Body::RawL3 { ethertype, .. } => {
            format!(
                "{}{tag} ethertype 0x{ethertype:04x}",
                crate::packet::format_mac(&f.src_mac)
            )
        }
    }
}

fn tcp_flags(f: u8) -> String {
    let mut s = String::new();
    for (bit, c) in [
        (TCP_SYN, 'S'),
        (TCP_ACK, '.'),
        (TCP_FIN, 'F'),
        (TCP_RST, 'R'),
        (TCP_PSH, 'P'),
    ] {
        if f & bit != 0 {
            s.push(c);
        }
    }
    s
}

/// The rules' direction for a shot towards the VM (ingress) or from it (egress).
fn direction(to_vm: bool) -> Direction {
    if to_vm {
        Direction::Ingress
    } else {
        Direction::Egress
    }
}
