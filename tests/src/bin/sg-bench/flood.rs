//! The new-flow sender: UDP frames with a new 5-tuple each, written with `sendmmsg` on an
//! AF_PACKET socket (qdisc bypassed) in the uplink namespace, so that they enter the node's
//! bridge as if from a remote host.
//!
//! Each batch is patched in place from a template: source port and source address (and the
//! IPv4 header checksum) change for every frame, so that no two frames of a run share a
//! 5-tuple (60,000 ports × 100 addresses). UDP checksum 0 (none), as IPv4 allows.
//!
//! The sender does everything on its own CPU: a veth transmit runs the receiving side's
//! softirq (bridge, netfilter or tcx, the VM's veth) on the same CPU before `sendmmsg`
//! returns, so the offered rate already slows down under a costly filter, and frames that
//! the backlog cannot take are dropped there and show up as offered but not delivered.

use std::{
    os::fd::{AsRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use sg_user::netns;

const BATCH: usize = 64;
const FRAME_LEN: usize = 60;

pub struct Flow {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// Sources are `src_net.(first..first+100)`; the destination is fixed.
    pub src_net: [u8; 3],
    pub first_host: u8,
    pub dst: [u8; 4],
    pub dport: u16,
    /// Sent by the VM instead: `dst` is the (fixed) source and the varying address the
    /// destination, so that port security passes and Neutron's default egress rule admits
    /// every flow (how the benchmark fills a conntrack table without walking the rules).
    pub from_vm: bool,
}

/// What one run sent.
#[derive(Clone, Copy, Debug)]
pub struct Sent {
    pub frames: u64,
    pub elapsed: Duration,
}

fn checksum(h: &[u8]) -> u16 {
    let mut s: u32 = 0;
    for c in h.chunks(2) {
        s += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
    }
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

fn write_frame(buf: &mut [u8; FRAME_LEN], f: &Flow, n: u64) {
    let sport = 1024 + (n % 60_000) as u16;
    let host = f.first_host.wrapping_add(((n / 60_000) % 100) as u8);
    buf[0..6].copy_from_slice(&f.dst_mac);
    buf[6..12].copy_from_slice(&f.src_mac);
    buf[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut buf[14..34];
    ip.copy_from_slice(&[
        0x45, 0, 0, 46, 0, 0, 0x40, 0, 64, 17, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ]);
    let (var, fixed) = if f.from_vm { (16, 12) } else { (12, 16) };
    ip[var..var + 3].copy_from_slice(&f.src_net);
    ip[var + 3] = host;
    ip[fixed..fixed + 4].copy_from_slice(&f.dst);
    let c = checksum(ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let udp = &mut buf[34..42];
    udp[0..2].copy_from_slice(&sport.to_be_bytes());
    udp[2..4].copy_from_slice(&f.dport.to_be_bytes());
    udp[4..6].copy_from_slice(&26u16.to_be_bytes());
    udp[6..8].copy_from_slice(&[0, 0]);
    buf[42..].fill(0xa5);
}

/// A bound AF_PACKET socket in a namespace.
pub struct Sender {
    fd: OwnedFd,
    /// Frames sent so far: the next frame's number (so runs never repeat a 5-tuple).
    pub next: u64,
}

impl Sender {
    pub fn open(ns: &str, dev: &str) -> Result<Self> {
        let dev = dev.to_string();
        let fd = netns::run_in(Some(ns), move || -> Result<OwnedFd> {
            let ifindex = netns::ifindex(&dev)?;
            let fd = netns::packet_socket(ifindex).with_context(|| format!("AF_PACKET socket on {dev}"))?;
            let one: libc::c_int = 1;
            // SAFETY: valid option pointer and size. Skips the qdisc layer (veth has none).
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_PACKET,
                    libc::PACKET_QDISC_BYPASS,
                    &one as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as u32,
                )
            };
            Ok(fd)
        })??;
        Ok(Self { fd, next: 0 })
    }

    /// Sends new flows for `duration`, or `max` frames if that comes first.
    pub fn run(&mut self, flow: &Flow, duration: Duration, max: u64) -> Result<Sent> {
        let mut bufs = vec![[0u8; FRAME_LEN]; BATCH];
        let mut iov: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr() as *mut libc::c_void,
                iov_len: FRAME_LEN,
            })
            .collect();
        // SAFETY: zeroed mmsghdr is valid; each points at its own iovec below.
        let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
        for (m, v) in msgs.iter_mut().zip(iov.iter_mut()) {
            m.msg_hdr.msg_iov = v as *mut libc::iovec;
            m.msg_hdr.msg_iovlen = 1;
        }
        let start = Instant::now();
        let mut sent = 0u64;
        loop {
            let elapsed = start.elapsed();
            if elapsed >= duration || sent >= max {
                return Ok(Sent {
                    frames: sent,
                    elapsed,
                });
            }
            let n = (max - sent).min(BATCH as u64) as usize;
            for (i, b) in bufs.iter_mut().take(n).enumerate() {
                write_frame(b, flow, self.next + i as u64);
            }
            // SAFETY: msgs[..n] point at valid buffers that outlive the call.
            let r = unsafe { libc::sendmmsg(self.fd.as_raw_fd(), msgs.as_mut_ptr(), n as u32, 0) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENOBUFS) || e.raw_os_error() == Some(libc::EAGAIN) {
                    continue;
                }
                bail!("sendmmsg: {e}");
            }
            sent += r as u64;
            self.next += r as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_valid_and_distinct() {
        let f = Flow {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src_net: [203, 0, 113],
            first_host: 100,
            dst: [203, 0, 113, 10],
            dport: 9000,
            from_vm: false,
        };
        let (mut a, mut b) = ([0u8; FRAME_LEN], [0u8; FRAME_LEN]);
        write_frame(&mut a, &f, 0);
        write_frame(&mut b, &f, 60_000);
        assert_eq!(checksum(&a[14..34]), 0, "IPv4 header checksum verifies");
        assert_eq!(a[34..36], 1024u16.to_be_bytes());
        assert_eq!((a[29], b[29]), (100, 101));
    }
}
