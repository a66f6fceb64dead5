//! Support for the datapath tests: a test port's addresses, frame shorthands, a table runner
//! that reads every decision back from SG_TRACE, and raw AF_PACKET sockets for the namespace
//! tests.

use std::{
    net::IpAddr,
    os::fd::{AsRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use sg_common::*;
use sg_user::{
    datapath::Datapath,
    packet::{Body, Frame, IpPacket, L4, Mac},
};

use crate::spawn_in;

/// The port under test.
pub const VM_MAC: Mac = [0xfa, 0x16, 0x3e, 0x00, 0x00, 0x05];
/// The MAC of an allowed address pair of the port.
pub const AAP_MAC: Mac = [0xfa, 0x16, 0x3e, 0x00, 0x00, 0xaa];
/// The other end: a router or a remote host.
pub const GW_MAC: Mac = [0xfa, 0x16, 0x3e, 0x00, 0x00, 0x01];
/// A MAC the port does not own.
pub const EVIL_MAC: Mac = [0xfa, 0x16, 0x3e, 0x66, 0x66, 0x66];

pub const VM4: &str = "10.0.0.5";
pub const AAP4: &str = "10.0.1.0/24";
pub const REMOTE4: &str = "192.0.2.10";
pub const ROUTER4: &str = "10.0.0.1";
pub const VM6: &str = "2001:db8::5";
pub const REMOTE6: &str = "2001:db8:1::10";
pub const ROUTER6: &str = "fe80::1";

/// Allow / drop, as the programs return them.
pub const ALLOW: i32 = TC_ACT_UNSPEC;
pub const DROP: i32 = TC_ACT_SHOT;

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|_| panic!("address {s}"))
}

pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> IpPacket {
    IpPacket::new(
        ip(src),
        ip(dst),
        L4::Tcp {
            sport,
            dport,
            flags,
            seq: 1000,
            ack: if flags & 0x10 != 0 { 2000 } else { 0 },
        },
    )
}

pub fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> IpPacket {
    IpPacket::new(ip(src), ip(dst), L4::Udp { sport, dport }).with_payload(b"payload".to_vec())
}

/// ICMP or ICMPv6 (by the address family) with echo id `id`.
pub fn icmp(src: &str, dst: &str, icmp_type: u8, code: u8, id: u16) -> IpPacket {
    let mut rest = [0u8; 4];
    rest[..2].copy_from_slice(&id.to_be_bytes());
    rest[3] = 1;
    IpPacket::new(
        ip(src),
        ip(dst),
        L4::Icmp {
            icmp_type,
            code,
            rest,
        },
    )
}

/// An ICMP/ICMPv6 error from `src` to `dst` quoting `inner`.
pub fn icmp_error(src: &str, dst: &str, icmp_type: u8, code: u8, inner: &IpPacket) -> IpPacket {
    IpPacket::new(
        ip(src),
        ip(dst),
        L4::IcmpError {
            icmp_type,
            code,
            inner: inner.build(),
        },
    )
}

pub fn raw(src: &str, dst: &str, proto: u8, payload: &[u8]) -> IpPacket {
    IpPacket::new(
        ip(src),
        ip(dst),
        L4::Raw {
            proto,
            payload: payload.to_vec(),
        },
    )
}

/// A frame the VM sends (its MAC to the router's).
pub fn from_vm(p: IpPacket) -> Vec<u8> {
    Frame::ip(VM_MAC, GW_MAC, p).build()
}

/// A frame the VM sends from another source MAC.
pub fn from_mac(mac: Mac, p: IpPacket) -> Vec<u8> {
    Frame::ip(mac, GW_MAC, p).build()
}

/// A frame towards the VM.
pub fn to_vm(p: IpPacket) -> Vec<u8> {
    Frame::ip(GW_MAC, VM_MAC, p).build()
}

/// An ARP frame (IPv4 over Ethernet) from `mac` with sender (sha, spa).
pub fn arp(mac: Mac, op: u16, sha: Mac, spa: &str, tpa: &str) -> Vec<u8> {
    let octets = |s: &str| match ip(s) {
        IpAddr::V4(v) => v.octets(),
        IpAddr::V6(_) => panic!("ARP needs IPv4"),
    };
    Frame {
        src_mac: mac,
        dst_mac: [0xff; 6],
        vlans: Vec::new(),
        body: Body::Arp {
            op,
            sha,
            spa: octets(spa),
            tha: [0; 6],
            tpa: octets(tpa),
        },
    }
    .build()
}

/// A frame with any ethertype and body (hand-made headers, non-IP protocols).
pub fn ether(src: Mac, dst: Mac, ethertype: u16, bytes: Vec<u8>) -> Vec<u8> {
    Frame {
        src_mac: src,
        dst_mac: dst,
        vlans: Vec::new(),
        body: Body::RawL3 { ethertype, bytes },
    }
    .build()
}

/// Which program a case runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// `sg_from_vm`.
    FromVm,
    /// `sg_to_vm`.
    ToVm,
}

impl Dir {
    pub fn program(self) -> &'static str {
        match self {
            Dir::FromVm => PROG_FROM_VM,
            Dir::ToVm => PROG_TO_VM,
        }
    }
}

/// One BPF_PROG_TEST_RUN case: a frame, the program, and the verdict and reason it must get.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub dir: Dir,
    pub frame: Vec<u8>,
    pub verdict: i32,
    pub reason: u8,
    /// When set, the trace record's rule must be this.
    pub rule: Option<u32>,
    /// When set, the trace record's conntrack state must be this.
    pub ct_state: Option<u8>,
}

impl Case {
    pub fn new(name: impl Into<String>, dir: Dir, frame: Vec<u8>, verdict: i32, reason: u8) -> Self {
        let name = name.into();
        assert_eq!(
            verdict == ALLOW,
            reason_allows(reason),
            "case {name:?}: verdict and reason disagree in the table itself"
        );
        Self {
            name,
            dir,
            frame,
            verdict,
            reason,
            rule: None,
            ct_state: None,
        }
    }

    pub fn rule(mut self, rule: u32) -> Self {
        self.rule = Some(rule);
        self
    }

    pub fn state(mut self, ct_state: u8) -> Self {
        self.ct_state = Some(ct_state);
        self
    }
}

/// `Case` shorthands: out_ok/out_drop for frames from the VM, in_ok/in_drop towards it.
pub fn out_ok(name: &str, frame: Vec<u8>, reason: u8) -> Case {
    Case::new(name, Dir::FromVm, frame, ALLOW, reason)
}
pub fn out_drop(name: &str, frame: Vec<u8>, reason: u8) -> Case {
    Case::new(name, Dir::FromVm, frame, DROP, reason)
}
pub fn in_ok(name: &str, frame: Vec<u8>, reason: u8) -> Case {
    Case::new(name, Dir::ToVm, frame, ALLOW, reason)
}
pub fn in_drop(name: &str, frame: Vec<u8>, reason: u8) -> Case {
    Case::new(name, Dir::ToVm, frame, DROP, reason)
}

/// Runs `cases` through the real programs on `ifindex`. With `isolated`, conntrack and fragment
/// state is cleared before each case; otherwise the cases are one sequence. Every mismatch is
/// collected and reported together. Returns the number of cases run.
pub fn run(dp: &mut Datapath, ifindex: u32, cases: &[Case], isolated: bool) -> usize {
    let mut failures = Vec::new();
    for c in cases {
        if isolated {
            dp.clear_flows().expect("clear flows");
        }
        let (verdict, rec) = dp
            .trace_run(c.dir.program(), &c.frame, ifindex)
            .unwrap_or_else(|e| panic!("case {:?}: {e:#}", c.name));
        let mut wrong = Vec::new();
        if verdict != c.verdict {
            wrong.push(format!("verdict {verdict} (want {})", c.verdict));
        }
        if rec.reason != c.reason {
            wrong.push(format!(
                "reason {} (want {})",
                reason_name(rec.reason),
                reason_name(c.reason)
            ));
        }
        if let Some(rule) = c.rule
            && rec.rule != rule
        {
            wrong.push(format!("rule {} (want {rule})", rec.rule));
        }
        if let Some(st) = c.ct_state
            && rec.ct_state != st
        {
            wrong.push(format!("ct_state {} (want {st})", rec.ct_state));
        }
        let want_dir = match c.dir {
            Dir::FromVm => DIR_EGRESS,
            Dir::ToVm => DIR_INGRESS,
        };
        if rec.dir != want_dir {
            wrong.push(format!("trace dir {}", rec.dir));
        }
        if !wrong.is_empty() {
            failures.push(format!("  {}: {}", c.name, wrong.join(", ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    eprintln!("{} BPF_PROG_TEST_RUN cases passed", cases.len());
    cases.len()
}

// ------------------------------------------------------------------------------------------
// Raw AF_PACKET sockets, for sending crafted frames from a VM and capturing on the far side.
// ------------------------------------------------------------------------------------------

/// An AF_PACKET socket bound to one interface of one namespace.
pub struct RawSock {
    fd: OwnedFd,
}

impl RawSock {
    /// Opens the socket inside `ns` (sockets keep the namespace they were created in).
    pub fn open(ns: &str, ifname: &str) -> Result<Self> {
        let ifname = ifname.to_string();
        let fd = spawn_in(ns, move || -> Result<OwnedFd> {
            let ifindex = sg_user::netns::ifindex(&ifname)?;
            sg_user::netns::packet_socket(ifindex).with_context(|| format!("AF_PACKET socket on {ifname}"))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("socket thread panicked"))???;
        Ok(Self { fd })
    }

    pub fn send(&self, frame: &[u8]) -> Result<()> {
        // SAFETY: valid buffer; the socket is bound, so send(2) needs no address.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 || n as usize != frame.len() {
            bail!("AF_PACKET send: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `timeout` for an incoming frame (not one this host sent) that `pred` accepts.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&[u8]) -> bool) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) };
            if r < 0 {
                bail!("poll: {}", std::io::Error::last_os_error());
            }
            if r == 0 {
                continue;
            }
            // SAFETY: zeroed sockaddr_ll to be filled by recvfrom.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: valid buffer and address storage.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    &mut sll as *mut _ as *mut libc::sockaddr,
                    &mut len,
                )
            };
            if n < 0 {
                continue;
            }
            if sll.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            if pred(&buf[..n as usize]) {
                return Ok(true);
            }
        }
    }
}

/// Whether `frame` contains `needle` anywhere.
pub fn contains(frame: &[u8], needle: &[u8]) -> bool {
    frame.windows(needle.len()).any(|w| w == needle)
}

/// Sets a sysctl inside `ns` if the kernel has it.
pub fn sysctl_if_present(ns: &crate::Netns, key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let ns_name = ns.name.clone();
    let value = value.to_string();
    spawn_in(&ns_name, move || -> Result<()> {
        // /proc/sys/net follows the namespace of the thread that opens it.
        if std::path::Path::new(&path).exists() {
            std::fs::write(&path, &value).with_context(|| format!("writing {path}"))?;
        }
        Ok(())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("sysctl thread panicked"))??
}

/// Sends one echo request from `ns` to `dst` through the kernel's stack (a raw ICMP/ICMPv6
/// socket, so the VM's own ARP/ND and routing run) and waits for the matching reply.
pub fn ping(ns: &str, dst: IpAddr, timeout: Duration) -> Result<bool> {
    spawn_in(ns, move || -> Result<bool> {
        use socket2::{Domain, Protocol, SockAddr, Socket, Type};
        let v6 = dst.is_ipv6();
        let (domain, proto, req, rep) = if v6 {
            (Domain::IPV6, Protocol::ICMPV6, 128u8, 129u8)
        } else {
            (Domain::IPV4, Protocol::ICMPV4, 8u8, 0u8)
        };
        let s = Socket::new(domain, Type::RAW, Some(proto))?;
        s.set_read_timeout(Some(Duration::from_millis(100)))?;
        let id = (std::process::id() as u16) ^ 0x5347;
        let mut msg = vec![req, 0, 0, 0];
        msg.extend_from_slice(&id.to_be_bytes());
        msg.extend_from_slice(&1u16.to_be_bytes());
        msg.extend_from_slice(b"sg ping payload!");
        if !v6 {
            // The kernel fills the ICMPv6 checksum itself; ICMPv4 is ours to compute.
            let c = sg_user::packet::checksum_fold(sg_user::packet::checksum_add(0, &msg));
            msg[2..4].copy_from_slice(&c.to_be_bytes());
        }
        s.send_to(&msg, &SockAddr::from(std::net::SocketAddr::new(dst, 0)))?;
        let deadline = Instant::now() + timeout;
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
        while Instant::now() < deadline {
            let (n, from) = match s.recv_from(&mut buf) {
                Ok(r) => r,
                Err(_) => continue,
            };
            // SAFETY: recv_from initialised the first n bytes.
            let b: Vec<u8> = buf[..n].iter().map(|x| unsafe { x.assume_init() }).collect();
            // IPv4 raw sockets deliver the IP header too.
            let icmp = if v6 {
                &b[..]
            } else {
                &b[((b[0] & 0x0f) as usize) * 4..]
            };
            if from.as_socket().map(|a| a.ip()) == Some(dst)
                && icmp.len() >= 8
                && icmp[0] == rep
                && icmp[4..6] == id.to_be_bytes()
            {
                return Ok(true);
            }
        }
        Ok(false)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("ping thread panicked"))??
}

/// A UDP echo server on `addr:port` in `ns`, answering for `life`.
pub fn udp_echo_server(ns: &str, addr: IpAddr, port: u16, life: Duration) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    spawn_in(ns, move || {
        let s = match std::net::UdpSocket::bind((addr, port)) {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(Err(anyhow::anyhow!("bind {addr}:{port}: {e}")));
                return;
            }
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
        let _ = tx.send(Ok(()));
        let end = Instant::now() + life;
        let mut buf = [0u8; 2048];
        while Instant::now() < end {
            if let Ok((n, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(&buf[..n], from);
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(5))
        .context("UDP server did not start")?
}

/// Sends `msg` from `ns` (bound to `src_port`) to `dst` and waits for any datagram back.
/// `Ok(Some(bytes))` on a reply, `Ok(None)` on timeout, `Err` on an error such as
/// ECONNREFUSED (an ICMP port unreachable reached the socket).
pub fn udp_exchange(
    ns: &str,
    src_port: u16,
    dst: std::net::SocketAddr,
    msg: &'static [u8],
    timeout: Duration,
) -> Result<std::io::Result<Option<Vec<u8>>>> {
    spawn_in(ns, move || -> std::io::Result<Option<Vec<u8>>> {
        let any: IpAddr = if dst.is_ipv6() {
            "::".parse().unwrap()
        } else {
            "0.0.0.0".parse().unwrap()
        };
        let s = std::net::UdpSocket::bind((any, src_port))?;
        s.connect(dst)?;
        s.set_read_timeout(Some(timeout))?;
        s.send(msg)?;
        let mut buf = [0u8; 2048];
        match s.recv(&mut buf) {
            Ok(n) => Ok(Some(buf[..n].to_vec())),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    })
    .join()
    .map_err(|_| anyhow::anyhow!("UDP client thread panicked"))?
}
