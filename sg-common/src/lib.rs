//! The kernel/user boundary of sg: every map key and value, every flag and every code that the
//! eBPF programs (`sg-ebpf`) and userspace (`sg-user`) exchange. One source of truth.
//!
//! Rules for everything in this crate:
//! - `#[repr(C)]`, `bytemuck::Pod`, and no implicit padding: the `Pod` derive refuses a type
//!   with padding, so a hash key can never carry uninitialised bytes (aya notes §7).
//! - Explicit `_pad` fields are always zero.
//! - Addresses are byte arrays in network order so that `bpftool map dump` prints them
//!   readably; ports and ICMP type/code are host order unless the field says `_be`.
//! - IPv4 addresses live in the first 4 bytes of a 16-byte field, the rest zero.
#![no_std]

use bytemuck::{Pod, Zeroable};

/// Marks a type as usable as an aya map key or value in userspace.
macro_rules! user_pod {
    ($($t:ty),* $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: every type listed is `bytemuck::Pod` (checked by the derive): repr(C),
            // no padding, any bit pattern valid.
            unsafe impl aya::Pod for $t {}
        )*
    };
}

// -------------------------------------------------------------------------------------------
// Names that bpftool shows. The kernel truncates object names to 15 characters.
// -------------------------------------------------------------------------------------------

/// tcx ingress on the tap: frames the VM sends.
pub const PROG_FROM_VM: &str = "sg_from_vm";
/// tcx egress on the tap: frames towards the VM.
pub const PROG_TO_VM: &str = "sg_to_vm";

pub const MAP_PORTS: &str = "SG_PORTS";
pub const MAP_ADDRS: &str = "SG_ADDRS";
pub const MAP_CLASSES: &str = "SG_CLASSES";
pub const MAP_SERVICES: &str = "SG_SERVICES";
pub const MAP_SRC_PORTS: &str = "SG_SRC_PORTS";
pub const MAP_CONNTRACK: &str = "SG_CONNTRACK";
pub const MAP_CT_ASSURED: &str = "SG_CT_ASSURED";
pub const MAP_CT_EVENTS: &str = "SG_CT_EVENTS";
pub const MAP_NEXT_IDS: &str = "SG_NEXT_IDS";
pub const MAP_FRAGS: &str = "SG_FRAGS";
pub const MAP_STATS: &str = "SG_STATS";
pub const MAP_RULE_HITS: &str = "SG_RULE_HITS";
pub const MAP_TRACE: &str = "SG_TRACE";

/// Every map sg pins, in a stable order.
pub const PINNED_MAPS: [&str; 12] = [
    MAP_PORTS,
    MAP_ADDRS,
    MAP_CLASSES,
    MAP_SERVICES,
    MAP_SRC_PORTS,
    MAP_CONNTRACK,
    MAP_CT_ASSURED,
    MAP_CT_EVENTS,
    MAP_FRAGS,
    MAP_STATS,
    MAP_RULE_HITS,
    MAP_NEXT_IDS,
];

// -------------------------------------------------------------------------------------------
// Capacities (max_entries). The agent may override SG_CONNTRACK, SG_CT_ASSURED and SG_FRAGS at
// load time.
// -------------------------------------------------------------------------------------------

pub const MAX_PORTS: u32 = 16_384;
pub const MAX_ADDRS: u32 = 262_144;
pub const MAX_CLASSES: u32 = 1_048_576;
pub const MAX_SERVICES: u32 = 1_048_576;
pub const MAX_SRC_PORTS: u32 = 65_536;
/// SG_CONNTRACK: flows not yet assured.
pub const DEFAULT_CT_ENTRIES: u32 = 262_144;
/// SG_CT_ASSURED: assured flows.
pub const DEFAULT_CT_ASSURED_ENTRIES: u32 = 262_144;
/// SG_CT_EVENTS: (port, event) counters.
pub const MAX_CT_EVENTS: u32 = 65_536;
pub const DEFAULT_FRAG_ENTRIES: u32 = 8_192;
pub const MAX_STATS: u32 = 65_536;
/// Rule indexes are dense small integers assigned by the compiler; index 0 means "no rule".
pub const MAX_RULES: u32 = 65_536;

// -------------------------------------------------------------------------------------------
// tcx verdicts
// -------------------------------------------------------------------------------------------

/// Allow: let the next tcx program (or the stack) decide. sg never short-circuits others.
pub const TC_ACT_UNSPEC: i32 = -1;
/// Deny.
pub const TC_ACT_SHOT: i32 = 2;

// -------------------------------------------------------------------------------------------
// Directions and families as stored in keys
// -------------------------------------------------------------------------------------------

/// Traffic towards the VM (Neutron "ingress", tap tcx egress, program `sg_to_vm`).
pub const DIR_INGRESS: u8 = 0;
/// Traffic from the VM (Neutron "egress", tap tcx ingress, program `sg_from_vm`).
pub const DIR_EGRESS: u8 = 1;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

// -------------------------------------------------------------------------------------------
// SG_PORTS: ifindex (u32) -> PortInfo. A tap without an entry passes untouched.
// -------------------------------------------------------------------------------------------

/// Port security on and not a trusted (`network:*`) port: filter this port.
pub const PORT_F_FILTERED: u32 = 1 << 0;
/// Stateful security groups: use conntrack. Clear for stateless groups (Neutron `CT --notrack`).
pub const PORT_F_STATEFUL: u32 = 1 << 1;
/// The IPv4 IP/MAC pair list is not empty, so IPv4 sources are checked (Neutron only creates
/// the spoof chain of a family whose pair list is non-empty).
pub const PORT_F_SPOOF_V4: u32 = 1 << 2;
/// Same for IPv6.
pub const PORT_F_SPOOF_V6: u32 = 1 << 3;
/// The port has an IPv6 fixed IP: router advertisements are allowed in (provider rule).
pub const PORT_F_V6_FIXED: u32 = 1 << 4;
/// Enforce the ARP sender check (Neutron's ebtables `neutronARP-<tap>` chain). Cleared when an
/// IPv4 allowed address pair is a /0, as Neutron's arp_protect skips ARP protection then. The
/// source-MAC check (ebtables `neutronMAC-<tap>`) applies to every filtered port regardless.
pub const PORT_F_ARP_PROTECT: u32 = 1 << 5;
/// The port left the input (or this host) while its tap still exists: every frame is dropped,
/// both ways, until the tap goes. A firewall that loses track of a port fails closed.
pub const PORT_F_CLOSED: u32 = 1 << 6;
/// The port's policy has rules with source ports (only Neutron's agent rule dicts carry them):
/// a packet that SG_SERVICES does not admit is also looked up in SG_SRC_PORTS.
pub const PORT_F_SRC_PORTS: u32 = 1 << 7;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct PortInfo {
    /// Compiled policy id: selects this port's SG_CLASSES and SG_SERVICES entries. A new
    /// policy is written under a fresh id and then switched here with one update.
    pub policy: u32,
    /// Address-set id: selects this port's SG_ADDRS entries; switched like `policy`.
    pub addr_id: u32,
    /// Stable small integer for the life of the port: conntrack zone and counter key.
    pub port_idx: u32,
    /// `PORT_F_*`.
    pub flags: u32,
    /// The port's own MAC.
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

// -------------------------------------------------------------------------------------------
// SG_NEXT_IDS: array of one `NextIds`, the agent's own. The programs never read it; it lives with
// the maps because the ids it protects live in them: conntrack entries carry a policy id and a
// port index (their zone) long after the policy or the port is gone. A restarted agent that gave
// a freed id again would let an old flow skip its revocation check (same policy id) or hand a
// deleted port's flows to a new port (same zone). Ids are therefore never reused while the maps
// live.
// -------------------------------------------------------------------------------------------

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct NextIds {
    /// The next policy id to allocate: larger than every id ever used.
    pub policy: u32,
    /// The next address-set id.
    pub addr_id: u32,
    /// The next port index.
    pub port_idx: u32,
    pub _pad: u32,
}

// -------------------------------------------------------------------------------------------
// SG_ADDRS: LPM trie of a port's addresses, keyed by addr_id.
// -------------------------------------------------------------------------------------------

/// `mac` is an allowed source MAC (port MAC or an allowed-address-pair MAC); addr is zero.
pub const ADDR_KIND_MAC: u8 = 1;
/// IPv4 IP/MAC pair (spoof chain entry); a MAC-only pair has a zero-length address prefix.
pub const ADDR_KIND_PAIR_V4: u8 = 4;
/// IPv6 IP/MAC pair, including the link-local address derived from the MAC.
pub const ADDR_KIND_PAIR_V6: u8 = 6;
/// (MAC, sender IPv4) that an ARP frame from the VM may carry: every IPv4 pair that has an
/// address (Neutron's `arp_protect` address set, checked as pairs), and (MAC, 0.0.0.0/32) for
/// RFC 5227 probes from each of those MACs. The MAC-only pair of a port without fixed IPs is
/// not one: such a port has no IPv4 address, and Neutron drops all of its ARP.
pub const ADDR_KIND_ARP_V4: u8 = 5;
/// IPv4 fixed IP of the port (provider DHCP reply rule); mac is zero.
pub const ADDR_KIND_FIXED_V4: u8 = 14;
/// IPv6 fixed IP of the port (provider DHCPv6 reply rule); mac is zero.
pub const ADDR_KIND_FIXED_V6: u8 = 16;

/// Bits of `AddrKey` before `addr`: addr_id, kind, pad, mac.
pub const ADDR_KEY_FIXED_BITS: u32 = 96;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct AddrKey {
    pub addr_id: u32,
    /// `ADDR_KIND_*`.
    pub kind: u8,
    pub _pad: u8,
    pub mac: [u8; 6],
    pub addr: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct AddrVal {
    /// Position of the pair in Neutron's pair list (for explanations); 0 for other kinds.
    pub index: u32,
}

// -------------------------------------------------------------------------------------------
// Policy, stage 1: SG_CLASSES, LPM (policy, dir, family, remote address) -> class.
// The compiler partitions the remote address space of every (policy, dir, family) by the
// remote selectors its rules use; the longest prefix names the set of selectors that contain
// the address. "Any remote" is the /0 selector.
// -------------------------------------------------------------------------------------------

/// Bits of `ClassKey` before `addr`.
pub const CLASS_KEY_FIXED_BITS: u32 = 64;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ClassKey {
    pub policy: u32,
    pub dir: u8,
    pub family: u8,
    pub _pad: [u8; 2],
    pub addr: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ClassVal {
    /// Never 0: 0 means "no selector contains this address".
    pub class: u32,
}

// -------------------------------------------------------------------------------------------
// Policy, stage 2: SG_SERVICES, LPM (policy, class, dir, family, protocol, port) -> rule.
// `port` is big-endian so that a port range becomes a few prefixes. It holds the destination
// port for TCP/UDP/UDP-Lite/SCTP/DCCP, and (type << 8 | code) for ICMP and ICMPv6. A rule
// without ports stops its prefix after `proto`; protocol "any" stops before `proto`.
// -------------------------------------------------------------------------------------------

/// Bits of `ServiceKey` up to and including `family`: a rule for any protocol.
pub const SERVICE_KEY_ANY_PROTO_BITS: u32 = 80;
/// Bits up to and including `proto`: a rule for one protocol without ports.
pub const SERVICE_KEY_PROTO_BITS: u32 = 88;
/// Bits up to and including `port`: an exact port.
pub const SERVICE_KEY_FULL_BITS: u32 = 104;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ServiceKey {
    pub policy: u32,
    pub class: u32,
    pub dir: u8,
    pub family: u8,
    pub proto: u8,
    /// Big-endian: destination port, or ICMP (type << 8 | code).
    pub port_be: [u8; 2],
    pub _pad: [u8; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ServiceVal {
    /// Index of the first security-group rule (in Neutron's chain order) that allows every
    /// packet of this entry. Never 0.
    pub rule: u32,
}

// -------------------------------------------------------------------------------------------
// Policy, stage 2 for rules with source ports: SG_SRC_PORTS, LPM (policy, class, dir, family,
// protocol, source port, destination port) -> rule. Only the rules that restrict the source port
// are here (TCP, UDP, UDP-Lite, SCTP, DCCP), each as prefixes of the 32 bits sport:dport; it is
// consulted only when SG_SERVICES admits nothing and the port has PORT_F_SRC_PORTS.
// -------------------------------------------------------------------------------------------

/// Bits of `SrcPortKey` up to and including `proto`.
pub const SRC_PORT_KEY_PROTO_BITS: u32 = 88;
/// Bits up to and including `dport_be`: an exact (source, destination) port pair.
pub const SRC_PORT_KEY_FULL_BITS: u32 = 120;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SrcPortKey {
    pub policy: u32,
    pub class: u32,
    pub dir: u8,
    pub family: u8,
    pub proto: u8,
    pub sport_be: [u8; 2],
    pub dport_be: [u8; 2],
    pub _pad: [u8; 1],
}

// -------------------------------------------------------------------------------------------
// Conntrack: one entry per flow and port (the port is the zone, as the OVS firewall does;
// Neutron's Linux bridge driver shares one zone per network), in one of two tables:
// - SG_CONNTRACK, an LRU hash: flows not yet assured (Linux IPS_ASSURED: a TCP handshake
//   completed, a UDP exchange that went on after its first reply). When it is full, a new
//   flow evicts the least recently used of them, as Linux's early drop sacrifices unassured
//   flows.
// - SG_CT_ASSURED, a plain hash: a flow moves there when it becomes assured, and nothing ever
//   evicts it. When it is full, the flow stays in SG_CONNTRACK (`CT_F_UNPROTECTED`) and the
//   event is counted.
// A flood of new flows can therefore only push out flows that are not assured yet.
// The 5-tuple is normalised so that both directions find the same entry:
// (addr_a, port_a) <= (addr_b, port_b) bytewise. Protocols without ports (other than ICMP)
// have zero ports.
// ICMP/ICMPv6 queries are keyed by role, not by byte order, because Linux keeps a request from
// A and a request from B with the same id apart: addr_a is the requester, port_a the query id,
// port_b (request type << 8 | code), and CT_F_ORIG_A is always set.
// -------------------------------------------------------------------------------------------

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct CtKey {
    pub zone: u32,
    pub family: u8,
    pub proto: u8,
    pub _pad: [u8; 2],
    pub addr_a: [u8; 16],
    pub addr_b: [u8; 16],
    pub port_a: u16,
    pub port_b: u16,
}

/// The original direction of the flow went from (addr_a, port_a) to (addr_b, port_b).
pub const CT_F_ORIG_A: u8 = 1 << 0;
/// A packet in the reply direction has been seen (Linux IPS_SEEN_REPLY).
pub const CT_F_SEEN_REPLY: u8 = 1 << 1;
/// Linux IPS_ASSURED: only affects timeouts.
pub const CT_F_ASSURED: u8 = 1 << 2;
/// The flow was admitted by the to-VM (ingress) policy; clear for from-VM (egress).
pub const CT_F_ADMIT_INGRESS: u8 = 1 << 3;
/// The flow was revoked: the port's policy no longer admits it in the orientation and
/// direction it was admitted. The entry stays as a tombstone so that no packet of the flow,
/// in either direction, re-admits it through the other direction's rules; it expires, is
/// revived when a later policy admits the flow again, or is replaced by a new connection.
pub const CT_F_REVOKED: u8 = 1 << 4;
/// The flow is assured but did not fit in SG_CT_ASSURED (full): it stays in SG_CONNTRACK,
/// where pressure can evict it. Counted as `CT_EV_ASSURED_FULL`.
pub const CT_F_UNPROTECTED: u8 = 1 << 5;

/// TCP states, numbered as Linux `enum tcp_conntrack` so that dumps read like /proc.
pub const TCP_NONE: u8 = 0;
pub const TCP_SYN_SENT: u8 = 1;
pub const TCP_SYN_RECV: u8 = 2;
pub const TCP_ESTABLISHED: u8 = 3;
pub const TCP_FIN_WAIT: u8 = 4;
pub const TCP_CLOSE_WAIT: u8 = 5;
pub const TCP_LAST_ACK: u8 = 6;
pub const TCP_TIME_WAIT: u8 = 7;
pub const TCP_CLOSE: u8 = 8;
pub const TCP_SYN_SENT2: u8 = 9;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct CtVal {
    /// `bpf_ktime_get_ns()` after which the entry is dead (CLOCK_MONOTONIC).
    pub expires_ns: u64,
    /// Policy id in force when the flow was last (re)checked; a different id in SG_PORTS
    /// makes the datapath re-check the flow (revocation).
    pub policy: u32,
    /// Rule that admitted the flow (0: a fixed rule such as DHCP or ICMPv6).
    pub rule: u32,
    /// `TCP_*` for TCP, 0 otherwise.
    pub tcp_state: u8,
    /// `CT_F_*`.
    pub flags: u8,
    pub _pad: [u8; 2],
    pub packets: u32,
}

/// Timeouts in seconds, as Linux nf_conntrack defaults.
pub mod timeout {
    pub const TCP_SYN_SENT: u64 = 120;
    pub const TCP_SYN_RECV: u64 = 60;
    pub const TCP_ESTABLISHED: u64 = 5 * 24 * 3600;
    pub const TCP_FIN_WAIT: u64 = 120;
    pub const TCP_CLOSE_WAIT: u64 = 60;
    pub const TCP_LAST_ACK: u64 = 30;
    pub const TCP_TIME_WAIT: u64 = 120;
    pub const TCP_CLOSE: u64 = 10;
    pub const TCP_SYN_SENT2: u64 = 120;
    /// Linux caps a flow that has not seen a reply (a mid-stream pickup) at this.
    pub const TCP_UNACK: u64 = 300;
    pub const UDP_UNREPLIED: u64 = 30;
    pub const UDP_REPLIED: u64 = 120;
    pub const ICMP: u64 = 30;
    pub const GENERIC: u64 = 600;
}

// -------------------------------------------------------------------------------------------
// SG_FRAGS: LRU hash. The first fragment decides; later fragments of the same datagram
// follow its verdict. IPv4 ids are 16 bits, IPv6 32.
// -------------------------------------------------------------------------------------------

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FragKey {
    pub port_idx: u32,
    pub dir: u8,
    pub family: u8,
    /// The IPv4 protocol; 0 for IPv6, whose reassembly (like Linux's) does not key on it.
    pub proto: u8,
    pub _pad: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub id: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FragVal {
    pub expires_ns: u64,
    /// Reason the first fragment got (`REASON_*`); allow reasons let later fragments pass.
    pub reason: u8,
    pub _pad: [u8; 3],
    pub rule: u32,
}

/// Seconds a first-fragment verdict is remembered (Linux ipfrag_time).
pub const FRAG_TIMEOUT_S: u64 = 30;

// -------------------------------------------------------------------------------------------
// SG_CT_EVENTS: per-CPU hash (port_idx, event) -> count. What happened to a port's conntrack
// entries, so that `sg status` can tell how many of its flows pressure evicted: created minus
// removed minus collected minus those still in the tables. The datapath counts CREATED,
// REMOVED and ASSURED_FULL; the agent's garbage collector counts COLLECTED (one writer per
// key, so userspace never races the datapath).
// -------------------------------------------------------------------------------------------

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct CtEventKey {
    pub port_idx: u32,
    /// `CT_EV_*`.
    pub event: u8,
    pub _pad: [u8; 3],
}

/// A flow's entry was written into SG_CONNTRACK.
pub const CT_EV_CREATED: u8 = 1;
/// The datapath removed an entry: a closed or re-opened TCP flow, an expired or revoked entry
/// replaced by a new flow.
pub const CT_EV_REMOVED: u8 = 2;
/// The agent's garbage collector deleted an expired entry, or one of a port that is gone.
pub const CT_EV_COLLECTED: u8 = 3;
/// A flow became assured while SG_CT_ASSURED was full (`CT_F_UNPROTECTED`).
pub const CT_EV_ASSURED_FULL: u8 = 4;

// -------------------------------------------------------------------------------------------
// Verdict reasons. One code per way a packet can be decided; counted per port and direction
// in SG_STATS. Codes below REASON_FIRST_DROP allow, the others drop.
// -------------------------------------------------------------------------------------------

pub const REASON_ALLOW_UNFILTERED: u8 = 1;
pub const REASON_ALLOW_ESTABLISHED: u8 = 2;
pub const REASON_ALLOW_RELATED: u8 = 3;
pub const REASON_ALLOW_RULE: u8 = 4;
pub const REASON_ALLOW_DHCP_CLIENT: u8 = 5;
pub const REASON_ALLOW_DHCP_REPLY: u8 = 6;
pub const REASON_ALLOW_DHCP6_CLIENT: u8 = 7;
pub const REASON_ALLOW_DHCP6_REPLY: u8 = 8;
pub const REASON_ALLOW_ICMP6: u8 = 9;
pub const REASON_ALLOW_DAD_MLD: u8 = 10;
pub const REASON_ALLOW_ND_MLD: u8 = 11;
pub const REASON_ALLOW_RA: u8 = 12;
pub const REASON_ALLOW_ARP: u8 = 13;
pub const REASON_ALLOW_NON_IP: u8 = 14;
pub const REASON_ALLOW_FRAG: u8 = 15;

pub const REASON_FIRST_DROP: u8 = 32;
pub const REASON_DROP_MALFORMED: u8 = 32;
pub const REASON_DROP_VLAN: u8 = 33;
pub const REASON_DROP_ETHERTYPE: u8 = 34;
pub const REASON_DROP_SPOOF_MAC: u8 = 35;
pub const REASON_DROP_SPOOF_ARP: u8 = 36;
pub const REASON_DROP_SPOOF_IP: u8 = 37;
pub const REASON_DROP_DHCP_SPOOF: u8 = 38;
pub const REASON_DROP_DHCP6_SPOOF: u8 = 39;
pub const REASON_DROP_RA: u8 = 40;
pub const REASON_DROP_INVALID: u8 = 41;
pub const REASON_DROP_NO_RULE: u8 = 42;
pub const REASON_DROP_FRAG_NO_FIRST: u8 = 43;
pub const REASON_DROP_FRAG_DENIED: u8 = 44;
pub const REASON_DROP_IPV6_EXT: u8 = 45;
/// A packet in the reply orientation of a revoked flow (`CT_F_REVOKED`).
pub const REASON_DROP_REVOKED: u8 = 46;
/// The port is closed (`PORT_F_CLOSED`): it left the input while its tap exists.
pub const REASON_DROP_PORT_CLOSED: u8 = 47;
pub const REASON_LAST: u8 = 47;

/// Whether a reason code allows the packet.
pub const fn reason_allows(reason: u8) -> bool {
    reason != 0 && reason < REASON_FIRST_DROP
}

/// Short stable name of a reason code, for counters, logs and `sg trace`.
pub const fn reason_name(reason: u8) -> &'static str {
    match reason {
        REASON_ALLOW_UNFILTERED => "allow-unfiltered",
        REASON_ALLOW_ESTABLISHED => "allow-established",
        REASON_ALLOW_RELATED => "allow-related",
        REASON_ALLOW_RULE => "allow-rule",
        REASON_ALLOW_DHCP_CLIENT => "allow-dhcp-client",
        REASON_ALLOW_DHCP_REPLY => "allow-dhcp-reply",
        REASON_ALLOW_DHCP6_CLIENT => "allow-dhcp6-client",
        REASON_ALLOW_DHCP6_REPLY => "allow-dhcp6-reply",
        REASON_ALLOW_ICMP6 => "allow-icmp6",
        REASON_ALLOW_DAD_MLD => "allow-dad-mld",
        REASON_ALLOW_ND_MLD => "allow-nd-mld",
        REASON_ALLOW_RA => "allow-ra",
        REASON_ALLOW_ARP => "allow-arp",
        REASON_ALLOW_NON_IP => "allow-non-ip",
        REASON_ALLOW_FRAG => "allow-fragment",
        REASON_DROP_MALFORMED => "drop-malformed",
        REASON_DROP_VLAN => "drop-vlan",
        REASON_DROP_ETHERTYPE => "drop-ethertype",
        REASON_DROP_SPOOF_MAC => "drop-spoof-mac",
        REASON_DROP_SPOOF_ARP => "drop-spoof-arp",
        REASON_DROP_SPOOF_IP => "drop-spoof-ip",
        REASON_DROP_DHCP_SPOOF => "drop-dhcp-spoof",
        REASON_DROP_DHCP6_SPOOF => "drop-dhcp6-spoof",
        REASON_DROP_RA => "drop-ra",
        REASON_DROP_INVALID => "drop-invalid",
        REASON_DROP_NO_RULE => "drop-no-rule",
        REASON_DROP_FRAG_NO_FIRST => "drop-frag-no-first",
        REASON_DROP_FRAG_DENIED => "drop-frag-denied",
        REASON_DROP_IPV6_EXT => "drop-ipv6-ext",
        REASON_DROP_REVOKED => "drop-revoked",
        REASON_DROP_PORT_CLOSED => "drop-port-closed",
        _ => "unknown",
    }
}

// -------------------------------------------------------------------------------------------
// SG_STATS: per-CPU hash (port_idx, dir, reason) -> packets, bytes.
// SG_RULE_HITS: per-CPU array indexed by rule index -> packets, bytes.
// -------------------------------------------------------------------------------------------

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct StatKey {
    pub port_idx: u32,
    pub dir: u8,
    pub reason: u8,
    pub _pad: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

// -------------------------------------------------------------------------------------------
// SG_TRACE: per-CPU array of one record, written only for packets whose skb mark is
// TRACE_MARK. `sg trace` sets that mark through BPF_PROG_TEST_RUN and reads the record back.
// -------------------------------------------------------------------------------------------

pub const TRACE_MARK: u32 = 0x5347_7472; // "SGtr"
/// Like `TRACE_MARK`, and the packet writes nothing else: no conntrack or fragment state, no
/// counters. `sg trace` uses it so that explaining a packet never changes the live tables.
pub const TRACE_DRY_MARK: u32 = 0x5347_7464; // "SGtd"

/// Conntrack state of a packet as iptables `-m state` would see it.
pub const CT_STATE_NONE: u8 = 0;
pub const CT_STATE_NEW: u8 = 1;
pub const CT_STATE_ESTABLISHED: u8 = 2;
pub const CT_STATE_RELATED: u8 = 3;
pub const CT_STATE_INVALID: u8 = 4;
pub const CT_STATE_UNTRACKED: u8 = 5;
/// sg only: the packet belongs to a revoked flow (`CT_F_REVOKED`) and comes from the side
/// that did not open it.
pub const CT_STATE_REVOKED: u8 = 6;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TraceRec {
    /// Incremented on every traced packet, so a reader can tell a fresh record.
    pub seq: u32,
    pub port_idx: u32,
    pub policy: u32,
    pub class: u32,
    pub rule: u32,
    pub reason: u8,
    pub dir: u8,
    pub ct_state: u8,
    pub family: u8,
    pub proto: u8,
    pub _pad: [u8; 3],
}

user_pod!(
    PortInfo, AddrKey, AddrVal, ClassKey, ClassVal, ServiceKey, ServiceVal, SrcPortKey, CtKey, CtVal,
    CtEventKey, FragKey, FragVal, StatKey, Counter, TraceRec, NextIds,
);

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_are_stable() {
        // The pinned maps outlive the agent binary; these sizes are part of the pin format.
        assert_eq!(size_of::<PortInfo>(), 24);
        assert_eq!(size_of::<AddrKey>(), 28);
        assert_eq!(size_of::<ClassKey>(), 24);
        assert_eq!(size_of::<ServiceKey>(), 16);
        assert_eq!(size_of::<SrcPortKey>(), 16);
        assert_eq!(size_of::<CtKey>(), 44);
        assert_eq!(size_of::<CtVal>(), 24);
        assert_eq!(size_of::<CtEventKey>(), 8);
        assert_eq!(size_of::<NextIds>(), 16);
        assert_eq!(size_of::<FragKey>(), 44);
        assert_eq!(size_of::<StatKey>(), 8);
        assert_eq!(size_of::<TraceRec>(), 28);
    }

    #[test]
    fn prefix_constants_match_field_offsets() {
        assert_eq!(
            ADDR_KEY_FIXED_BITS as usize,
            8 * core::mem::offset_of!(AddrKey, addr)
        );
        assert_eq!(
            CLASS_KEY_FIXED_BITS as usize,
            8 * core::mem::offset_of!(ClassKey, addr)
        );
        assert_eq!(
            SERVICE_KEY_ANY_PROTO_BITS as usize,
            8 * core::mem::offset_of!(ServiceKey, proto)
        );
        assert_eq!(
            SERVICE_KEY_PROTO_BITS as usize,
            8 * core::mem::offset_of!(ServiceKey, port_be)
        );
        assert_eq!(
            SERVICE_KEY_FULL_BITS as usize,
            8 * core::mem::offset_of!(ServiceKey, _pad)
        );
        assert_eq!(
            SRC_PORT_KEY_PROTO_BITS as usize,
            8 * core::mem::offset_of!(SrcPortKey, sport_be)
        );
        assert_eq!(
            SRC_PORT_KEY_FULL_BITS as usize,
            8 * core::mem::offset_of!(SrcPortKey, _pad)
        );
    }

    #[test]
    fn reasons_split_allow_and_drop() {
        assert!(reason_allows(REASON_ALLOW_RULE));
        assert!(!reason_allows(REASON_DROP_NO_RULE));
        assert!(!reason_allows(0));
        for r in 1..=REASON_LAST {
            if !(16..REASON_FIRST_DROP).contains(&r) {
                assert_ne!(reason_name(r), "unknown", "reason {r} has no name");
            }
        }
    }
}
