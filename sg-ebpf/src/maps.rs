//! Every map of the datapath. All are BTF-defined so that `bpftool map dump name SG_…` prints
//! field names; layouts come from sg-common.
use aya_ebpf::{
    btf_maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap},
    macros::btf_map,
};
use sg_common::*;

#[btf_map]
pub static SG_PORTS: HashMap<u32, PortInfo, { MAX_PORTS as usize }> = HashMap::new();

#[btf_map]
pub static SG_ADDRS: LpmTrie<AddrKey, AddrVal, { MAX_ADDRS as usize }> = LpmTrie::new();

#[btf_map]
pub static SG_CLASSES: LpmTrie<ClassKey, ClassVal, { MAX_CLASSES as usize }> = LpmTrie::new();

#[btf_map]
pub static SG_SERVICES: LpmTrie<ServiceKey, ServiceVal, { MAX_SERVICES as usize }> = LpmTrie::new();

#[btf_map]
pub static SG_CONNTRACK: LruHashMap<CtKey, CtVal, { DEFAULT_CT_ENTRIES as usize }> = LruHashMap::new();

#[btf_map]
pub static SG_FRAGS: LruHashMap<FragKey, FragVal, { DEFAULT_FRAG_ENTRIES as usize }> = LruHashMap::new();

#[btf_map]
pub static SG_STATS: PerCpuHashMap<StatKey, Counter, { MAX_STATS as usize }> = PerCpuHashMap::new();

#[btf_map]
pub static SG_RULE_HITS: PerCpuArray<Counter, { MAX_RULES as usize }> = PerCpuArray::new();

#[btf_map]
pub static SG_TRACE: PerCpuArray<TraceRec, 1> = PerCpuArray::new();
