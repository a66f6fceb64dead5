//! The eBPF back end: load the embedded object, reach its maps, attach to taps, pin.
//!
//! Pin layout (design §5), under a versioned root such as `/sys/fs/bpf/sg/v2`:
//! - `maps/<MAP>`: every map in `sg_common::PINNED_MAPS`, reused across agent restarts after
//!   its type, key size, value size and capacity have been checked;
//! - `links/<netns>/<ifname>@<ifindex>_<program>`: one tcx link per tap and direction, so that
//!   enforcement outlives the agent and a new agent can swap its program in atomically.

use std::{
    fs, io,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, LpmTrie, MapData, MapInfo, MapType, PerCpuArray, PerCpuHashMap, PerCpuValues},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
    },
    sys::SyscallError,
};
use sg_common::*;

use crate::netns;

pub mod allowlist;
pub mod batch;
pub mod fixture;

/// The eBPF object built by build.rs (sg-ebpf, bpfel-unknown-none).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sg"));

/// The benchmark floor (sg-ebpf's `sg-passthru`): one classifier, `sg_passthru`, that returns
/// "next" without reading the frame. Only benchmarks load it, for BPF_PROG_TEST_RUN; nothing
/// attaches it.
pub static PASSTHRU_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sg-passthru"));

/// Name prefix of the pins `Datapath::tap_handles` makes for a moment under the pin root.
const HANDLE_PIN_PREFIX: &str = "handle_";

/// Default pin root. The version component changes whenever a pinned layout changes.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/sg/v2";

/// What a pinned map must look like to be reused.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MapSpec {
    pub name: &'static str,
    pub map_type: MapType,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

const fn size<T>() -> u32 {
    core::mem::size_of::<T>() as u32
}

/// LPM trie keys carry a u32 prefix length in front of the data.
const fn lpm<T>() -> u32 {
    4 + size::<T>()
}

/// The expected shape of every pinned map; `max_entries` of the conntrack and fragment maps
/// follows the options.
pub fn map_specs(opts: &LoadOptions) -> [MapSpec; 15] {
    [
        MapSpec {
            name: MAP_PORTS,
            map_type: MapType::Hash,
            key_size: 4,
            value_size: size::<PortInfo>(),
            max_entries: MAX_PORTS,
        },
        MapSpec {
            name: MAP_ADDRS,
            map_type: MapType::LpmTrie,
            key_size: lpm::<AddrKey>(),
            value_size: size::<AddrVal>(),
            max_entries: MAX_ADDRS,
        },
        MapSpec {
            name: MAP_CLASSES,
            map_type: MapType::LpmTrie,
            key_size: lpm::<ClassKey>(),
            value_size: size::<ClassVal>(),
            max_entries: MAX_CLASSES,
        },
        MapSpec {
            name: MAP_SERVICES,
            map_type: MapType::LpmTrie,
            key_size: lpm::<ServiceKey>(),
            value_size: size::<ServiceVal>(),
            max_entries: MAX_SERVICES,
        },
        MapSpec {
            name: MAP_SRC_PORTS,
            map_type: MapType::LpmTrie,
            key_size: lpm::<SrcPortKey>(),
            value_size: size::<ServiceVal>(),
            max_entries: MAX_SRC_PORTS,
        },
        MapSpec {
            name: MAP_CONNTRACK,
            map_type: MapType::LruHash,
            key_size: size::<CtKey>(),
            value_size: size::<CtVal>(),
            max_entries: opts.ct_entries,
        },
        MapSpec {
            name: MAP_CT_ASSURED,
            map_type: MapType::Hash,
            key_size: size::<CtKey>(),
            value_size: size::<CtVal>(),
            max_entries: opts.ct_assured_entries,
        },
        MapSpec {
            name: MAP_CT_EVENTS,
            map_type: MapType::PerCpuHash,
            key_size: size::<CtEventKey>(),
            value_size: 8,
            max_entries: MAX_CT_EVENTS,
        },
        MapSpec {
            name: MAP_FRAGS,
            map_type: MapType::LruHash,
            key_size: size::<FragKey>(),
            value_size: size::<FragVal>(),
            max_entries: opts.frag_entries,
        },
        MapSpec {
            name: MAP_STATS,
            map_type: MapType::PerCpuHash,
            key_size: size::<StatKey>(),
            value_size: size::<Counter>(),
            max_entries: MAX_STATS,
        },
        MapSpec {
            name: MAP_RULE_HITS,
            map_type: MapType::PerCpuArray,
            key_size: 4,
            value_size: size::<Counter>(),
            max_entries: MAX_RULES,
        },
        MapSpec {
            name: MAP_NEXT_IDS,
            map_type: MapType::Array,
            key_size: 4,
            value_size: size::<NextIds>(),
            max_entries: 1,
        },
        // Pinned so that events written while no agent runs wait for the next one, and so that
        // a second instance of the programs (`sg debug`) writes into the same buffer.
        MapSpec {
            name: MAP_EVENTS,
            map_type: MapType::RingBuf,
            key_size: 0,
            value_size: 0,
            max_entries: EVENTS_BYTES,
        },
        MapSpec {
            name: MAP_LOG_LIMITS,
            map_type: MapType::Hash,
            key_size: 4,
            value_size: size::<LogLimit>(),
            max_entries: MAX_PORTS,
        },
        MapSpec {
            name: MAP_MONITOR,
            map_type: MapType::Array,
            key_size: 4,
            value_size: size::<MonitorCfg>(),
            max_entries: 1,
        },
    ]
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Pin root; `None` keeps everything private to this process (tests, `sg trace` scratch).
    pub pin_root: Option<PathBuf>,
    /// Capacity of SG_CONNTRACK: flows not yet assured.
    pub ct_entries: u32,
    /// Capacity of SG_CT_ASSURED: assured flows.
    pub ct_assured_entries: u32,
    pub frag_entries: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            pin_root: None,
            ct_entries: DEFAULT_CT_ENTRIES,
            ct_assured_entries: DEFAULT_CT_ASSURED_ENTRIES,
            frag_entries: DEFAULT_FRAG_ENTRIES,
        }
    }
}

/// aya-log's level in the programs: frozen in `.rodata` at load, so at 0 ("off") the verifier
/// removes every log call and the programs cost what they would without them.
const LOG_LEVEL_OFF: u8 = 0;

impl LoadOptions {
    /// Options that match the maps already pinned under `root` (capacities included), for
    /// tools that load a second instance over a running agent's maps.
    pub fn matching_pins(root: &Path) -> Result<Self> {
        let cap = |name: &str, default: u32| -> Result<u32> {
            match MapInfo::from_pin(root.join("maps").join(name)) {
                Ok(info) => Ok(info.max_entries()),
                Err(aya::maps::MapError::SyscallError(SyscallError { io_error, .. }))
                    if io_error.kind() == io::ErrorKind::NotFound =>
                {
                    Ok(default)
                }
                Err(e) => Err(e).with_context(|| format!("reading pinned map {name}")),
            }
        };
        Ok(Self {
            pin_root: Some(root.to_path_buf()),
            ct_entries: cap(MAP_CONNTRACK, DEFAULT_CT_ENTRIES)?,
            ct_assured_entries: cap(MAP_CT_ASSURED, DEFAULT_CT_ASSURED_ENTRIES)?,
            frag_entries: cap(MAP_FRAGS, DEFAULT_FRAG_ENTRIES)?,
        })
    }
}

/// A tap (or any interface) as sg addresses it: its name inside an optional named netns.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Iface {
    pub name: String,
    pub netns: Option<String>,
}

impl Iface {
    pub fn new(name: impl Into<String>, netns: Option<&str>) -> Self {
        Self {
            name: name.into(),
            netns: netns.map(str::to_owned),
        }
    }

    pub fn ifindex(&self) -> Result<u32> {
        let name = self.name.clone();
        netns::run_in(self.netns.as_deref(), move || {
            netns::ifindex(&name).with_context(|| format!("interface {name}"))
        })?
    }
}

/// Which program runs where: from-VM at tcx ingress of the tap, to-VM at tcx egress.
pub const PROGRAMS: [(&str, TcAttachType); 2] = [
    (PROG_FROM_VM, TcAttachType::Ingress),
    (PROG_TO_VM, TcAttachType::Egress),
];

/// How an attach went: a fresh link, or an atomic program swap on an existing pinned link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    New,
    TookOver,
}

pub struct Datapath {
    ebpf: Ebpf,
    pin_root: Option<PathBuf>,
}

impl Datapath {
    /// Loads the object and both programs. With a pin root, every map in PINNED_MAPS is reused
    /// from `<root>/maps` when it is there and has the expected shape, and created and pinned
    /// otherwise. A pinned map with another shape is refused: reusing it would corrupt state.
    pub fn load(opts: &LoadOptions) -> Result<Self> {
        Self::load_object(EBPF_OBJECT, opts, LOG_LEVEL_OFF, |_| Ok(()))
    }

    /// Loads the programs with their per-stage debug records on (aya-log level debug), sharing
    /// the pinned maps of `opts`. The records go to `logger` through the returned reader, which
    /// must live as long as the programs and be flushed when its fd is readable. For `sg debug`:
    /// attached to one port's links only, so no other port runs the extra code.
    pub fn load_debug<L: log::Log>(opts: &LoadOptions, logger: L) -> Result<(Self, aya_log::EbpfLogger<L>)> {
        let mut reader = None;
        let dp = Self::load_object(EBPF_OBJECT, opts, aya_log::Level::Debug as u8, |ebpf| {
            reader = Some(
                aya_log::EbpfLogger::init_with_logger(ebpf, logger)
                    .context("reading the programs' aya-log buffer")?,
            );
            Ok(())
        })?;
        Ok((dp, reader.expect("set before the programs load")))
    }

    /// Loads `object` (this build's datapath, or another build of it for the benchmarks).
    pub fn load_object(
        object: &[u8],
        opts: &LoadOptions,
        log_level: u8,
        before_programs: impl FnOnce(&mut Ebpf) -> Result<()>,
    ) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(MAP_CONNTRACK, opts.ct_entries)
            .map_max_entries(MAP_CT_ASSURED, opts.ct_assured_entries)
            .map_max_entries(MAP_FRAGS, opts.frag_entries)
            .override_global(aya_log::LEVEL, &log_level, false);
        if let Some(root) = &opts.pin_root {
            check_layout_version(root)?;
        }
        let map_dir = opts.pin_root.as_ref().map(|r| r.join("maps"));
        if let Some(dir) = &map_dir {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            for spec in map_specs(opts) {
                let path = dir.join(spec.name);
                check_pinned_map(&path, &spec)?;
                loader.map_pin_path(spec.name, path);
            }
        }
        let mut ebpf = loader.load(object).context("loading the sg eBPF object")?;
        before_programs(&mut ebpf)?;
        for (name, _) in PROGRAMS {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the object"))?
                .try_into()?;
            prog.load().with_context(|| format!("verifier rejected {name}"))?;
        }
        Ok(Self {
            ebpf,
            pin_root: opts.pin_root.clone(),
        })
    }

    pub fn pin_root(&self) -> Option<&Path> {
        self.pin_root.as_deref()
    }

    pub fn program(&mut self, name: &str) -> Result<&mut SchedClassifier> {
        Ok(self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing"))?
            .try_into()?)
    }

    /// Attaches both programs to `iface` (tcx, first in the chain). With a pin root the links
    /// are pinned; a link already pinned for this interface and ifindex gets the new program
    /// swapped in atomically, so the tap is never unfiltered.
    pub fn attach(&mut self, iface: &Iface) -> Result<(u32, Attached)> {
        let ifindex = iface.ifindex()?;
        let pin_root = self.pin_root.clone();
        let mut how = Attached::New;
        for (name, attach_type) in PROGRAMS {
            let prog = self.program(name)?;
            let ifname = iface.name.clone();
            let pin = pin_root
                .as_ref()
                .map(|root| link_pin_path(root, iface, ifindex, name));
            if netns::run_in(iface.netns.as_deref(), || {
                attach_here(prog, attach_type, &ifname, pin.as_deref())
            })?? == Attached::TookOver
            {
                how = Attached::TookOver;
            }
        }
        Ok((ifindex, how))
    }

    /// The ids of the loaded programs, in `PROGRAMS` order: what a tcx query of an enforced
    /// interface lists.
    pub fn program_ids(&mut self) -> Result<[u32; 2]> {
        let mut ids = [0; 2];
        for (i, (name, _)) in PROGRAMS.iter().enumerate() {
            ids[i] = self.program(name)?.info()?.id();
        }
        Ok(ids)
    }

    /// Second handles on the loaded programs and on SG_PORTS, for the thread that attaches
    /// taps while this one applies policies (`agent::taps`). `sg_to_vm` comes first: a tcx
    /// attach waits for an RCU grace period, and a tap that comes up between the two attaches
    /// is then already closed to the outside.
    pub fn tap_handles(&mut self) -> Result<TapHandles> {
        let mut progs = Vec::new();
        for (name, attach_type) in PROGRAMS.into_iter().rev() {
            let handle = match self.pin_root.clone() {
                // Through a pin of our own, removed at once: opening a pin (BPF_OBJ_GET) needs
                // only the file, where opening the program by id (bpf_prog_get_fd_by_id, what
                // `from_program_info` does) needs CAP_SYS_ADMIN, which the unit does not grant.
                Some(root) => {
                    let path = root.join(format!("{HANDLE_PIN_PREFIX}{name}"));
                    let _ = fs::remove_file(&path);
                    let prog = self.program(name)?;
                    prog.pin(&path)
                        .with_context(|| format!("pinning {name} at {}", path.display()))?;
                    let handle = SchedClassifier::from_pin(&path);
                    prog.unpin()
                        .with_context(|| format!("removing {}", path.display()))?;
                    handle
                }
                None => {
                    let info = self.program(name)?.info()?;
                    SchedClassifier::from_program_info(info, name.into())
                }
            };
            progs.push((
                name,
                handle.with_context(|| format!("a second handle on {name}"))?,
                attach_type,
            ));
        }
        let ports = match self.ebpf.map(MAP_PORTS) {
            Some(aya::maps::Map::HashMap(m)) => m.fd().as_fd().try_clone_to_owned()?,
            _ => bail!("map {MAP_PORTS} missing from the object"),
        };
        Ok(TapHandles {
            progs,
            ports: MapData::from_fd(ports)?,
            pin_root: self.pin_root.clone(),
        })
    }

    /// Pins again every map whose pin is gone (someone removed the pin root under a running
    /// agent). The maps themselves live on in this process, with every entry and flow. Returns
    /// the names re-pinned. A pin that now names another map is refused: two agents' state
    /// cannot be merged.
    pub fn repin_maps(&self) -> Result<Vec<&'static str>> {
        let Some(root) = &self.pin_root else {
            return Ok(Vec::new());
        };
        let dir = root.join("maps");
        let mut repinned = Vec::new();
        for name in PINNED_MAPS {
            let data = match self.ebpf.map(name) {
                Some(
                    aya::maps::Map::HashMap(m)
                    | aya::maps::Map::LpmTrie(m)
                    | aya::maps::Map::LruHashMap(m)
                    | aya::maps::Map::PerCpuHashMap(m)
                    | aya::maps::Map::PerCpuArray(m)
                    | aya::maps::Map::Array(m)
                    | aya::maps::Map::RingBuf(m),
                ) => m,
                Some(_) => bail!("map {name} is of a type sg does not pin"),
                _ => bail!("map {name} missing from the object"),
            };
            let path = dir.join(name);
            match MapInfo::from_pin(&path) {
                Ok(pinned) => {
                    let ours = data.info()?.id();
                    if pinned.id() != ours {
                        return Err(anyhow::Error::new(ForeignPin(format!(
                            "{} is now map id {} and this agent's {name} is id {ours}: another \
                             process pinned its own map there",
                            path.display(),
                            pinned.id()
                        ))));
                    }
                }
                Err(aya::maps::MapError::SyscallError(SyscallError { io_error, .. }))
                    if io_error.kind() == io::ErrorKind::NotFound =>
                {
                    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
                    data.pin(&path)
                        .with_context(|| format!("pinning {}", path.display()))?;
                    repinned.push(name);
                }
                Err(e) => return Err(e).with_context(|| format!("reading pinned map {}", path.display())),
            }
        }
        Ok(repinned)
    }

    pub fn ports(&mut self) -> Result<HashMap<&mut MapData, u32, PortInfo>> {
        Ok(HashMap::try_from(self.map_mut(MAP_PORTS)?)?)
    }

    pub fn classes(&mut self) -> Result<LpmTrie<&mut MapData, ClassKey, ClassVal>> {
        Ok(LpmTrie::try_from(self.map_mut(MAP_CLASSES)?)?)
    }

    pub fn services(&mut self) -> Result<LpmTrie<&mut MapData, ServiceKey, ServiceVal>> {
        Ok(LpmTrie::try_from(self.map_mut(MAP_SERVICES)?)?)
    }

    pub fn src_ports(&mut self) -> Result<LpmTrie<&mut MapData, SrcPortKey, ServiceVal>> {
        Ok(LpmTrie::try_from(self.map_mut(MAP_SRC_PORTS)?)?)
    }

    pub fn addrs(&mut self) -> Result<LpmTrie<&mut MapData, AddrKey, AddrVal>> {
        Ok(LpmTrie::try_from(self.map_mut(MAP_ADDRS)?)?)
    }

    /// Zeroes the hit counter of a rule index that is being freed or reused.
    pub fn reset_rule_hits(&mut self, index: u32) -> Result<()> {
        let mut hits: PerCpuArray<&mut MapData, Counter> =
            PerCpuArray::try_from(self.map_mut(MAP_RULE_HITS)?)?;
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow!("{what}: {e}"))?;
        hits.set(index, PerCpuValues::try_from(vec![Counter::default(); cpus])?, 0)?;
        Ok(())
    }

    pub fn stats(&mut self) -> Result<PerCpuHashMap<&mut MapData, StatKey, Counter>> {
        Ok(PerCpuHashMap::try_from(self.map_mut(MAP_STATS)?)?)
    }

    pub fn log_limits(&mut self) -> Result<HashMap<&mut MapData, u32, LogLimit>> {
        Ok(HashMap::try_from(self.map_mut(MAP_LOG_LIMITS)?)?)
    }

    /// SG_CONNTRACK: flows not yet assured.
    pub fn conntrack(&mut self) -> Result<HashMap<&mut MapData, CtKey, CtVal>> {
        Ok(HashMap::try_from(self.map_mut(MAP_CONNTRACK)?)?)
    }

    /// SG_CT_ASSURED: assured flows.
    pub fn conntrack_assured(&mut self) -> Result<HashMap<&mut MapData, CtKey, CtVal>> {
        Ok(HashMap::try_from(self.map_mut(MAP_CT_ASSURED)?)?)
    }

    /// Every conntrack entry, both tables, with whether it is in SG_CT_ASSURED.
    pub fn conntrack_entries(&mut self) -> Result<Vec<(CtKey, CtVal, bool)>> {
        let mut out: Vec<(CtKey, CtVal, bool)> = Vec::new();
        for (k, v) in self.conntrack()?.iter().collect::<Result<Vec<_>, _>>()? {
            out.push((k, v, false));
        }
        for (k, v) in self.conntrack_assured()?.iter().collect::<Result<Vec<_>, _>>()? {
            out.push((k, v, true));
        }
        Ok(out)
    }

    /// A conntrack event count of a port (`CT_EV_*`), summed over CPUs.
    pub fn ct_event(&mut self, port_idx: u32, event: u8) -> Result<u64> {
        let events: PerCpuHashMap<&mut MapData, CtEventKey, u64> =
            PerCpuHashMap::try_from(self.map_mut(MAP_CT_EVENTS)?)?;
        let key = CtEventKey {
            port_idx,
            event,
            _pad: [0; 3],
        };
        Ok(match events.get(&key, 0) {
            Ok(v) => v.iter().sum(),
            Err(aya::maps::MapError::KeyNotFound) => 0,
            Err(e) => return Err(e.into()),
        })
    }

    pub fn frags(&mut self) -> Result<HashMap<&mut MapData, FragKey, FragVal>> {
        Ok(HashMap::try_from(self.map_mut(MAP_FRAGS)?)?)
    }

    /// SG_NEXT_IDS: the ids this and every earlier agent on these maps may have given out.
    pub fn next_ids(&mut self) -> Result<NextIds> {
        let a: aya::maps::Array<&mut MapData, NextIds> =
            aya::maps::Array::try_from(self.map_mut(MAP_NEXT_IDS)?)?;
        Ok(a.get(&0, 0)?)
    }

    pub fn set_next_ids(&mut self, ids: NextIds) -> Result<()> {
        let mut a: aya::maps::Array<&mut MapData, NextIds> =
            aya::maps::Array::try_from(self.map_mut(MAP_NEXT_IDS)?)?;
        a.set(0, ids, 0)?;
        Ok(())
    }

    pub fn rule_hits(&mut self) -> Result<PerCpuArray<&mut MapData, Counter>> {
        Ok(PerCpuArray::try_from(self.map_mut(MAP_RULE_HITS)?)?)
    }

    pub fn trace_map(&mut self) -> Result<PerCpuArray<&mut MapData, TraceRec>> {
        Ok(PerCpuArray::try_from(self.map_mut(MAP_TRACE)?)?)
    }

    /// An LPM trie's map, for the batch operations of `batch`.
    pub fn lpm_map(&self, name: &str) -> Result<&MapData> {
        match self.ebpf.map(name) {
            Some(aya::maps::Map::LpmTrie(m)) => Ok(m),
            Some(_) => bail!("map {name} is not an LPM trie"),
            None => bail!("map {name} missing from the object"),
        }
    }

    pub fn map_mut(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| anyhow!("map {name} missing from the object"))
    }

    /// Runs one program on one frame with BPF_PROG_TEST_RUN, as if it arrived on `ifindex`.
    /// Returns the tcx verdict (`TC_ACT_UNSPEC` allows, `TC_ACT_SHOT` drops).
    pub fn test_run(&mut self, program: &str, frame: &[u8], ifindex: u32, mark: u32) -> Result<i32> {
        Ok(self.test_run_repeat(program, frame, ifindex, mark, 1)?.0)
    }

    /// Like `test_run`, `repeat` times in the kernel; also returns the kernel's average time
    /// per run.
    pub fn test_run_repeat(
        &mut self,
        program: &str,
        frame: &[u8],
        ifindex: u32,
        mark: u32,
        repeat: u32,
    ) -> Result<(i32, std::time::Duration)> {
        use aya::{TestRun as _, TestRunOptions};
        let mut ctx = [0u8; SKB_CTX_LEN];
        ctx[SKB_MARK_OFF..SKB_MARK_OFF + 4].copy_from_slice(&mark.to_ne_bytes());
        ctx[SKB_IFINDEX_OFF..SKB_IFINDEX_OFF + 4].copy_from_slice(&ifindex.to_ne_bytes());
        let mut out = vec![0u8; frame.len() + 256];
        let prog = self.program(program)?;
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                repeat,
                ..Default::default()
            })
            .with_context(|| format!("BPF_PROG_TEST_RUN of {program} (ifindex {ifindex})"))?;
        Ok((r.return_value as i32, r.duration))
    }
}

/// The ids of the programs attached at tcx `hook` of interface `ifindex` (in this thread's
/// network namespace). A BPF_PROG_QUERY of the ids alone, which CAP_NET_ADMIN allows; aya's
/// `query_tcx` also opens each program by id (bpf_prog_get_fd_by_id), which needs
/// CAP_SYS_ADMIN, which the unit does not grant.
pub fn tcx_prog_ids(ifindex: u32, hook: TcAttachType) -> io::Result<Vec<u32>> {
    /// `union bpf_attr`'s BPF_PROG_QUERY member.
    #[repr(C)]
    #[derive(Default)]
    struct ProgQuery {
        target_ifindex: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        _pad: u32,
        prog_attach_flags: u64,
        link_ids: u64,
        link_attach_flags: u64,
        revision: u64,
    }
    const BPF_PROG_QUERY: libc::c_long = 16;
    const BPF_TCX_INGRESS: u32 = 46;
    const BPF_TCX_EGRESS: u32 = 47;
    let attach_type = match hook {
        TcAttachType::Ingress => BPF_TCX_INGRESS,
        TcAttachType::Egress => BPF_TCX_EGRESS,
        TcAttachType::Custom(_) => return Err(io::Error::from(io::ErrorKind::InvalidInput)),
    };
    let mut ids = vec![0u32; 64];
    let mut q = ProgQuery {
        target_ifindex: ifindex,
        attach_type,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..Default::default()
    };
    // SAFETY: `q` is a valid BPF_PROG_QUERY attribute of the size passed; the kernel writes at
    // most `prog_cnt` ids into `ids`, which outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            &mut q as *mut ProgQuery,
            std::mem::size_of::<ProgQuery>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    ids.truncate(q.prog_cnt as usize);
    Ok(ids)
}

fn is_enolink(e: &aya::programs::ProgramError) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = src {
        if let Some(io) = err.downcast_ref::<io::Error>()
            && io.raw_os_error() == Some(libc::ENOLINK)
        {
            return true;
        }
        src = err.source();
    }
    e.to_string().contains("os error 67")
}

/// Attaches one program to interface `ifname` of the calling thread's namespace, tcx first in
/// the chain. With `pin`: a live link pinned there gets the program swapped in atomically
/// (`TookOver`); a dead one (its device is gone, ENOLINK) is removed; a fresh link is pinned.
/// Without: the fresh link lives as long as this process.
pub fn attach_here(
    prog: &mut SchedClassifier,
    attach_type: TcAttachType,
    ifname: &str,
    pin: Option<&Path>,
) -> Result<Attached> {
    let existing = match pin {
        Some(p) => match PinnedLink::from_pin(p) {
            Ok(link) => Some(link),
            Err(LinkError::SyscallError(SyscallError { io_error, .. }))
                if io_error.kind() == io::ErrorKind::NotFound =>
            {
                None
            }
            Err(e) => return Err(e).context(format!("opening pin {}", p.display())),
        },
        None => None,
    };
    if let Some(pinned) = existing {
        let p = pin.expect("a pinned link has a path");
        let link: SchedClassifierLink = FdLink::from(pinned).try_into()?;
        match prog.attach_to_link(link) {
            Ok(id) => {
                // Already pinned; dropping our handle keeps it.
                prog.take_link(id)?;
                return Ok(Attached::TookOver);
            }
            // The pinned link outlived its device (ENOLINK): a new device has the same name
            // and ifindex. Drop the dead pin and attach afresh.
            Err(e) if is_enolink(&e) => {
                tracing::warn!("pinned link {} is dead ({e}); attaching afresh", p.display());
                fs::remove_file(p).with_context(|| format!("removing dead pin {}", p.display()))?;
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("swapping a program into the pinned link of {ifname}"));
            }
        }
    }
    let id = prog
        .attach_with_options(ifname, attach_type, TcAttachOptions::TcxOrder(LinkOrder::first()))
        .with_context(|| format!("attaching to {ifname}"))?;
    let link = prog.take_link(id)?;
    match pin {
        Some(p) => {
            if let Some(parent) = p.parent() {
                fs::create_dir_all(parent)?;
            }
            let fd: FdLink = link.try_into()?;
            fd.pin(p).with_context(|| format!("pinning {}", p.display()))?;
        }
        // Unpinned: keep the link alive as long as this process.
        None => std::mem::forget(link),
    }
    Ok(Attached::New)
}

/// A pin of ours now names another process's object: nothing this process can repair.
#[derive(Debug)]
pub struct ForeignPin(pub String);

impl std::fmt::Display for ForeignPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ForeignPin {}

/// What the taps thread needs of a loaded datapath: its own handles on the two programs (with
/// their attach types) and on SG_PORTS, and the pin root.
pub struct TapHandles {
    pub progs: Vec<(&'static str, SchedClassifier, TcAttachType)>,
    pub ports: MapData,
    pub pin_root: Option<PathBuf>,
}

impl Datapath {
    /// Runs one program on one frame with TRACE_MARK set and returns the verdict and the
    /// SG_TRACE record the program wrote (the per-CPU slot whose sequence number moved).
    pub fn trace_run(&mut self, program: &str, frame: &[u8], ifindex: u32) -> Result<(i32, TraceRec)> {
        let before: Vec<TraceRec> = self.trace_map()?.get(&0, 0)?.iter().copied().collect();
        let verdict = self.test_run(program, frame, ifindex, TRACE_MARK)?;
        let after: Vec<TraceRec> = self.trace_map()?.get(&0, 0)?.iter().copied().collect();
        let rec = after
            .iter()
            .zip(&before)
            .find(|(a, b)| a.seq != b.seq)
            .map(|(a, _)| *a)
            .ok_or_else(|| anyhow!("{program} wrote no trace record (is the port in SG_PORTS?)"))?;
        Ok((verdict, rec))
    }

    /// Forgets every connection and fragment (between independent test cases).
    pub fn clear_flows(&mut self) -> Result<()> {
        for name in [MAP_CONNTRACK, MAP_CT_ASSURED] {
            let mut ct: HashMap<&mut MapData, CtKey, CtVal> = HashMap::try_from(self.map_mut(name)?)?;
            let keys: Vec<CtKey> = ct.keys().collect::<Result<_, _>>()?;
            for k in keys {
                let _ = ct.remove(&k);
            }
        }
        let mut frags = self.frags()?;
        let keys: Vec<FragKey> = frags.keys().collect::<Result<_, _>>()?;
        for k in keys {
            let _ = frags.remove(&k);
        }
        Ok(())
    }

    /// Packets counted under (port, direction, reason), summed over CPUs.
    pub fn stat(&mut self, port_idx: u32, dir: u8, reason: u8) -> Result<u64> {
        let key = StatKey {
            port_idx,
            dir,
            reason,
            _pad: [0; 2],
        };
        Ok(match self.stats()?.get(&key, 0) {
            Ok(v) => v.iter().map(|c| c.packets).sum(),
            Err(aya::maps::MapError::KeyNotFound) => 0,
            Err(e) => return Err(e.into()),
        })
    }

    /// Packets SG_RULE_HITS counted for `rule`, summed over CPUs.
    pub fn rule_hit_count(&mut self, rule: u32) -> Result<u64> {
        Ok(self.rule_hits()?.get(&rule, 0)?.iter().map(|c| c.packets).sum())
    }
}

/// `struct __sk_buff` image for BPF_PROG_TEST_RUN: only mark and ifindex are set.
const SKB_CTX_LEN: usize = 192;
const SKB_MARK_OFF: usize = 8;
const SKB_IFINDEX_OFF: usize = 40;

fn check_pinned_map(path: &Path, spec: &MapSpec) -> Result<()> {
    let info = match MapInfo::from_pin(path) {
        Ok(info) => info,
        Err(aya::maps::MapError::SyscallError(SyscallError { io_error, .. }))
            if io_error.kind() == io::ErrorKind::NotFound =>
        {
            return Ok(());
        }
        Err(e) => return Err(e).with_context(|| format!("reading pinned map {}", path.display())),
    };
    let found = MapSpec {
        name: spec.name,
        map_type: info.map_type()?,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
    };
    if found != *spec {
        let capacity_only = MapSpec {
            max_entries: spec.max_entries,
            ..found
        } == *spec;
        return Err(LayoutMismatch(format!(
            "pinned map {} does not match this sg build: found {:?} key {} value {} entries {}, \
             expected {:?} key {} value {} entries {}. Refusing to reuse it: {}. The taps stay \
             filtered by the programs already attached, with the policy they had. Ways out: {}",
            path.display(),
            found.map_type,
            found.key_size,
            found.value_size,
            found.max_entries,
            spec.map_type,
            spec.key_size,
            spec.value_size,
            spec.max_entries,
            if capacity_only {
                "only its capacity differs"
            } else {
                "its layout changed between the sg that pinned it and this one"
            },
            if capacity_only {
                "start the agent with the capacity it was created with, or `sg detach --all` \
                 first (drops enforcement and conntrack state until the agent has applied its \
                 input)"
            } else {
                "run the sg version that pinned it, or `sg detach --all` and start this agent \
                 (the taps are unfiltered and their connections forgotten until it has applied \
                 its input)"
            }
        ))
        .into());
    }
    Ok(())
}

/// A pinned layout this build cannot use. The agent refuses to start (exit status 78, which the
/// unit does not restart) rather than read maps of another layout or drop the enforcement in
/// place; the message names the change and the ways out.
#[derive(Debug)]
pub struct LayoutMismatch(pub String);

impl std::fmt::Display for LayoutMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LayoutMismatch {}

/// With a versioned pin root (`.../sg/v2`, DEFAULT_PIN_ROOT), pins under a sibling version are
/// another layout's: their programs would keep filtering the taps beside ours with maps this
/// agent never updates. Refuses to start while there are any.
fn check_layout_version(root: &Path) -> Result<()> {
    let is_version = |name: &str| {
        name.strip_prefix('v')
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    let (Some(ours), Some(parent)) = (root.file_name().and_then(|n| n.to_str()), root.parent()) else {
        return Ok(());
    };
    if !is_version(ours) {
        return Ok(());
    }
    let Ok(entries) = fs::read_dir(parent) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        let has_pins = fs::read_dir(&path).is_ok_and(|mut d| d.next().is_some());
        if name != ours && is_version(&name) && has_pins {
            return Err(LayoutMismatch(format!(
                "{} holds pins of pinned layout {name}; this sg uses layout {ours} at {}. The \
                 programs attached with them still filter the taps, with maps this agent would \
                 never update, so it refuses to start. Ways out: run the sg version that pinned \
                 them, or `sg --pin-root {} detach --all` and start this agent (the taps are \
                 unfiltered and their connections forgotten until it has applied its input)",
                path.display(),
                root.display(),
                path.display()
            ))
            .into());
        }
    }
    Ok(())
}

pub fn link_pin_path(root: &Path, iface: &Iface, ifindex: u32, program: &str) -> PathBuf {
    root.join("links")
        .join(iface.netns.as_deref().unwrap_or("-"))
        // bpffs refuses names with a dot; interface names may contain one (VLAN devices).
        .join(format!(
            "{}@{}_{}",
            iface.name.replace('.', "%"),
            ifindex,
            program
        ))
}

/// Unpins (and so detaches) both links of one interface. A link whose interface is gone only
/// loses its pin file.
pub fn unpin_links(root: &Path, iface: &Iface, ifindex: u32) -> Result<()> {
    for (name, _) in PROGRAMS {
        let path = link_pin_path(root, iface, ifindex, name);
        match PinnedLink::from_pin(&path) {
            Ok(l) => drop(l.unpin()?),
            Err(_) if path.exists() => fs::remove_file(&path)?,
            Err(_) => {}
        }
    }
    Ok(())
}

/// Removes link pins whose interface is gone or now has another ifindex (ENOLINK on use):
/// tap names and ifindexes are both reused, so a pin is only valid for the pair it names.
pub fn collect_stale_links(root: &Path, netns: Option<&str>) -> Result<usize> {
    let dir = root.join("links").join(netns.unwrap_or("-"));
    let Ok(entries) = fs::read_dir(&dir) else {
        return Ok(0);
    };
    let mut removed = 0;
    for e in entries {
        let path = e?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some((ifname, rest)) = name.rsplit_once('@') else {
            continue;
        };
        let Some((ifindex, _prog)) = rest.split_once('_') else {
            continue;
        };
        let ifname = ifname.replace('%', ".");
        let current = netns::run_in(netns, || netns::ifindex(&ifname))?;
        if current.ok().map(|i| i.to_string()).as_deref() != Some(ifindex) {
            match PinnedLink::from_pin(&path) {
                Ok(l) => drop(l.unpin()?),
                Err(_) => fs::remove_file(&path)?,
            }
            removed += 1;
        }
    }
    Ok(removed)
}

/// Removes every link and map sg pinned under `root`, which detaches the programs. Returns
/// the number of pins removed. A directory that something filled again meanwhile (a running
/// agent restoring its pins after a forced detach) is left in place.
pub fn detach_all(root: &Path) -> Result<usize> {
    let remove_dir = |d: &Path| match fs::remove_dir(d) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) || e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r.with_context(|| format!("removing {}", d.display())),
    };
    let mut removed = 0;
    let links = root.join("links");
    if links.exists() {
        for ns in fs::read_dir(&links)? {
            let ns = ns?.path();
            for link in fs::read_dir(&ns)? {
                let path = link?.path();
                match PinnedLink::from_pin(&path) {
                    // Unpin, then drop the fd: the kernel detaches the tcx link.
                    Ok(l) => drop(l.unpin()?),
                    // A link whose interface is gone may fail to open; its file still goes.
                    Err(_) => fs::remove_file(&path)?,
                }
                removed += 1;
            }
            remove_dir(&ns)?;
        }
        remove_dir(&links)?;
    }
    let maps = root.join("maps");
    if maps.exists() {
        for m in fs::read_dir(&maps)? {
            fs::remove_file(m?.path())?;
            removed += 1;
        }
        remove_dir(&maps)?;
    }
    if root.exists() {
        // A program pin of tap_handles that an agent killed at that moment left behind.
        for e in fs::read_dir(root)? {
            let path = e?.path();
            if path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(HANDLE_PIN_PREFIX))
            {
                fs::remove_file(&path)?;
            }
        }
        remove_dir(root)?;
    }
    Ok(removed)
}
