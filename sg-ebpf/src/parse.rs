//! Header parsing. Every read is bounds-checked against data_end; a frame too short for the
//! header it announces is an error, never undefined behaviour.
use aya_ebpf::programs::TcContext;
use sg_common::{FAMILY_V4, FAMILY_V6};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;

pub struct Packet {
    pub family: u8,
    pub proto: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Destination port, or ICMP (type << 8 | code): the SG_SERVICES port field.
    pub service_port: u16,
}

#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, off: usize) -> Result<*const T, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return Err(());
    }
    Ok((start + off) as *const T)
}

/// `Ok(None)` for frames that are not IP.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Option<Packet>, ()> {
    let ethertype = u16::from_be_bytes(unsafe { *ptr_at::<[u8; 2]>(ctx, 12)? });
    let mut pkt = Packet {
        family: 0,
        proto: 0,
        src: [0; 16],
        dst: [0; 16],
        service_port: 0,
    };
    let l4_off = match ethertype {
        ETH_P_IP => {
            let ip = unsafe { *ptr_at::<[u8; 20]>(ctx, ETH_HLEN)? };
            let ihl = ((ip[0] & 0x0f) as usize) * 4;
            if ip[0] >> 4 != 4 || ihl < 20 {
                return Err(());
            }
            pkt.family = FAMILY_V4;
            pkt.proto = ip[9];
            pkt.src[..4].copy_from_slice(&ip[12..16]);
            pkt.dst[..4].copy_from_slice(&ip[16..20]);
            ETH_HLEN + ihl
        }
        ETH_P_IPV6 => {
            let ip = unsafe { *ptr_at::<[u8; 40]>(ctx, ETH_HLEN)? };
            if ip[0] >> 4 != 6 {
                return Err(());
            }
            pkt.family = FAMILY_V6;
            pkt.proto = ip[6];
            pkt.src.copy_from_slice(&ip[8..24]);
            pkt.dst.copy_from_slice(&ip[24..40]);
            ETH_HLEN + 40
        }
        _ => return Ok(None),
    };
    pkt.service_port = match pkt.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let ports = unsafe { *ptr_at::<[u8; 4]>(ctx, l4_off)? };
            u16::from_be_bytes([ports[2], ports[3]])
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let tc = unsafe { *ptr_at::<[u8; 2]>(ctx, l4_off)? };
            u16::from_be_bytes(tc)
        }
        _ => 0,
    };
    Ok(Some(pkt))
}
