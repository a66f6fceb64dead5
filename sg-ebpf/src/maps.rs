//! Every map of the datapath. All are BTF-defined so that `bpftool map dump name SG_…` prints
//! field names; layouts come from sg-common. The names are the sg-common `MAP_*` names, which
//! userspace uses to pin them.
use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap},
    macros::btf_map,
};
use sg_common::*;

/// ifindex -> the port behind that tap. A tap without an entry is not sg's.
#[btf_map]
pub static SG_PORTS: HashMap<u32, PortInfo, { MAX_PORTS as usize }> = HashMap::new();

/// A port's allowed MACs, IP/MAC pairs and fixed IPs (LPM, so CIDR pairs work).
#[btf_map]
pub static SG_ADDRS: LpmTrie<AddrKey, AddrVal, { MAX_ADDRS as usize }> = LpmTrie::new();

/// Policy stage 1: remote address -> class.
#[btf_map]
pub static SG_CLASSES: LpmTrie<ClassKey, ClassVal, { MAX_CLASSES as usize }> = LpmTrie::new();

/// Policy stage 2: (class, protocol, port) -> rule.
#[btf_map]
pub static SG_SERVICES: LpmTrie<ServiceKey, ServiceVal, { MAX_SERVICES as usize }> = LpmTrie::new();

/// Policy stage 2 for rules with source ports: (class, protocol, source port, destination
/// port) -> rule, consulted after a miss in SG_SERVICES.
#[btf_map]
pub static SG_SRC_PORTS: LpmTrie<SrcPortKey, ServiceVal, { MAX_SRC_PORTS as usize }> = LpmTrie::new();

/// Per-port connection tracking of flows not yet assured. LRU: when it is full, a new flow
/// evicts the least recently used of them instead of being refused (Linux's early drop). The
/// agent may resize it at load time.
#[btf_map]
pub static SG_CONNTRACK: LruHashMap<CtKey, CtVal, { DEFAULT_CT_ENTRIES as usize }> = LruHashMap::new();

/// Assured flows, which nothing evicts: a flood of new flows cannot push them out. The agent may
/// resize it at load time.
#[btf_map]
pub static SG_CT_ASSURED: HashMap<CtKey, CtVal, { DEFAULT_CT_ASSURED_ENTRIES as usize }> = HashMap::new();

/// Conntrack events per (port, event), from which `sg status` tells evicted flows. Allocated as
/// ports have events (BPF_F_NO_PREALLOC): a preallocated per-CPU table would cost its full size
/// on every CPU.
#[btf_map]
pub static SG_CT_EVENTS: PerCpuHashMap<CtEventKey, u64, { MAX_CT_EVENTS as usize }, 1> = PerCpuHashMap::new();

/// First-fragment verdicts that later fragments of the same datagram follow.
#[btf_map]
pub static SG_FRAGS: LruHashMap<FragKey, FragVal, { DEFAULT_FRAG_ENTRIES as usize }> = LruHashMap::new();

/// Packets and bytes per (port, direction, reason).
#[btf_map]
pub static SG_STATS: PerCpuHashMap<StatKey, Counter, { MAX_STATS as usize }> = PerCpuHashMap::new();

/// Packets and bytes per rule index, for packets that a security-group rule admitted.
#[btf_map]
pub static SG_RULE_HITS: PerCpuArray<Counter, { MAX_RULES as usize }> = PerCpuArray::new();

/// The decision of the last packet marked with TRACE_MARK, per CPU.
#[btf_map]
pub static SG_TRACE: PerCpuArray<TraceRec, 1> = PerCpuArray::new();

/// The agent's id high-water marks (sg-common `NextIds`). The programs never read it: it is
/// here so that it is pinned, and lives, with the maps whose ids it keeps from being reused.
#[btf_map]
pub static SG_NEXT_IDS: Array<NextIds, 1> = Array::new();
