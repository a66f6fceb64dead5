//! Every map of the datapath. All are BTF-defined so that `bpftool map dump name SG_…` prints
//! field names; layouts come from sg-common.
use aya_ebpf::{
    btf_maps::{HashMap, LpmTrie, PerCpuHashMap},
    macros::btf_map,
};
use sg_common::*;

#[btf_map]
pub static SG_PORTS: HashMap<u32, PortInfo, { MAX_PORTS as usize }> = HashMap::new();

#[btf_map]
pub static SG_CLASSES: LpmTrie<ClassKey, ClassVal, { MAX_CLASSES as usize }> = LpmTrie::new();

#[btf_map]
pub static SG_SERVICES: LpmTrie<ServiceKey, ServiceVal, { MAX_SERVICES as usize }> = LpmTrie::new();

#[btf_map]
pub static SG_STATS: PerCpuHashMap<StatKey, Counter, { MAX_STATS as usize }> = PerCpuHashMap::new();
