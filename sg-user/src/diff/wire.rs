//! Frames on the wire: AF_PACKET sockets that inject crafted frames at one endpoint and see
//! what arrives at another, inside the harness's namespaces.
//!
//! A frame's fate is decided with a *sentinel*: after the frames of a step, the sender emits a
//! frame that both back ends always deliver, along the same path from the same CPU. Frames
//! from one CPU through veth and a bridge keep their order, so once the sentinel is seen,
//! every earlier frame that has not been seen was dropped. No timeout decides a verdict; a
//! timeout only means the run is broken.

use std::{
    os::fd::{AsRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::netns;

/// A raw socket bound to one interface of one namespace.
pub struct RawSocket {
    fd: OwnedFd,
    ifindex: u32,
    pub name: String,
}

impl RawSocket {
    /// Opens and binds a socket to `dev` in netns `ns`; it stays in that namespace.
    pub fn open(ns: &str, dev: &str) -> Result<Self> {
        let dev_name = dev.to_string();
        let (fd, ifindex) = netns::run_in(Some(ns), move || -> Result<(OwnedFd, u32)> {
            let ifindex = netns::ifindex(&dev_name)?;
            let fd =
                netns::packet_socket(ifindex).with_context(|| format!("AF_PACKET socket on {dev_name}"))?;
            Ok((fd, ifindex))
        })??;
        Ok(Self {
            fd,
            ifindex,
            name: format!("{ns}/{dev}"),
        })
    }

    pub fn send(&self, frame: &[u8]) -> Result<()> {
        // SAFETY: valid buffer; the socket is bound, so send(2) goes out of that interface.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr() as *const _, frame.len(), 0) };
        if n < 0 {
            bail!("send on {}: {}", self.name, std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receives one frame that arrived *into* this interface (not ones it sent), waiting up
    /// to `timeout`.
    pub fn recv(&self, timeout: Duration) -> Result<Option<Vec<u8>>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
            if r < 0 {
                bail!("poll on {}: {}", self.name, std::io::Error::last_os_error());
            }
            if r == 0 {
                return Ok(None);
            }
            let mut buf = vec![0u8; 65_536];
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: valid buffers and lengths.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut _,
                    buf.len(),
                    0,
                    &mut sll as *mut _ as *mut libc::sockaddr,
                    &mut len,
                )
            };
            if n < 0 {
                bail!("recv on {}: {}", self.name, std::io::Error::last_os_error());
            }
            if sll.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            buf.truncate(n as usize);
            return Ok(Some(buf));
        }
    }

    /// Throws away whatever is queued.
    pub fn drain(&self) -> Result<usize> {
        let mut n = 0;
        while self.recv(Duration::ZERO)?.is_some() {
            n += 1;
        }
        Ok(n)
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }
}

/// Pins the calling thread to one CPU so that the frames it sends keep their order through
/// the per-CPU backlog queues of veth and the bridge.
pub fn pin_to_cpu(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// What identifies a frame when it arrives: the bytes a bridge and netfilter never change.
/// IPv4 frames carry a unique IP id and IPv6 frames a unique flow label, set by the scenario
/// builder; other frames are compared whole (without Ethernet padding).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Signature {
    V4 {
        src: [u8; 4],
        dst: [u8; 4],
        proto: u8,
        id: u16,
        frag: u16,
    },
    V6 {
        src: [u8; 16],
        dst: [u8; 16],
        flow: u32,
    },
    Bytes(Vec<u8>),
}

pub fn signature(frame: &[u8]) -> Signature {
    let mut off = 12;
    while frame.len() >= off + 2
        && matches!(u16::from_be_bytes([frame[off], frame[off + 1]]), 0x8100 | 0x88a8)
    {
        off += 4;
    }
    let et = frame.get(off..off + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    let l3 = off + 2;
    match et {
        Some(0x0800) if frame.len() >= l3 + 20 => {
            let h = &frame[l3..l3 + 20];
            Signature::V4 {
                src: h[12..16].try_into().unwrap(),
                dst: h[16..20].try_into().unwrap(),
                proto: h[9],
                id: u16::from_be_bytes([h[4], h[5]]),
                frag: u16::from_be_bytes([h[6], h[7]]),
            }
        }
        Some(0x86dd) if frame.len() >= l3 + 40 => {
            let h = &frame[l3..l3 + 40];
            Signature::V6 {
                src: h[8..24].try_into().unwrap(),
                dst: h[24..40].try_into().unwrap(),
                flow: u32::from_be_bytes([0, h[1] & 0x0f, h[2], h[3]]),
            }
        }
        _ => {
            let mut b = frame.to_vec();
            while b.len() > 14 && b.last() == Some(&0) {
                b.pop();
            }
            Signature::Bytes(b)
        }
    }
}

/// Sends `frames` from `from`, then `sentinel`; returns, for each frame, whether `to` saw it
/// before the sentinel.
pub fn exchange(from: &RawSocket, to: &RawSocket, frames: &[Vec<u8>], sentinel: &[u8]) -> Result<Vec<bool>> {
    to.drain()?;
    for f in frames {
        from.send(f)?;
    }
    from.send(sentinel)?;
    let want: Vec<Signature> = frames.iter().map(|f| signature(f)).collect();
    let sentinel_sig = signature(sentinel);
    let mut seen = vec![false; frames.len()];
    // Only a broken topology ever waits this long; a loaded machine (softirqs deferred to
    // ksoftirqd) may take far longer than the microseconds a sentinel usually needs.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(got) = to.recv(left)? else {
            bail!(
                "the sentinel from {} never reached {}: the topology is broken, not a verdict",
                from.name,
                to.name
            );
        };
        let sig = signature(&got);
        if sig == sentinel_sig {
            return Ok(seen);
        }
        for (i, w) in want.iter().enumerate() {
            if *w == sig {
                seen[i] = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{Frame, IpPacket, L4};

    #[test]
    fn signatures_ignore_padding_but_not_ids() {
        let mut p = IpPacket::new(
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            L4::Udp { sport: 1, dport: 2 },
        );
        p.ident = 7;
        let a = Frame::ip([2; 6], [4; 6], p.clone()).build();
        p.ident = 8;
        let b = Frame::ip([2; 6], [4; 6], p).build();
        assert_ne!(signature(&a), signature(&b));
        let mut padded = a.clone();
        padded.extend_from_slice(&[0; 10]);
        assert_eq!(signature(&a), signature(&padded));
        let arp = crate::packet::Frame {
            src_mac: [2; 6],
            dst_mac: [0xff; 6],
            vlans: vec![],
            body: crate::packet::Body::Arp {
                op: 1,
                sha: [2; 6],
                spa: [0; 4],
                tha: [0; 6],
                tpa: [10, 0, 0, 1],
            },
        }
        .build();
        assert!(matches!(signature(&arp), Signature::Bytes(_)));
    }
}
