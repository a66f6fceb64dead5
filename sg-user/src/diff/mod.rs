//! The differential test: the same input and the same frames through real kernel iptables
//! (loaded from the parity renderer's output, with br_netfilter and real conntrack) and
//! through the eBPF datapath, on a namespace compute node (design §7). Every verdict must
//! agree, except the documented differences (`tests/DIFFERENCES.md`), where sg's own verdict
//! is asserted instead.
//!
//! Per configuration: build the node, run every scenario under iptables (conntrack flushed
//! before each), then under eBPF (conntrack flushed before each), and compare shot by shot.

pub mod backend;
pub mod scenario;
pub mod topo;
pub mod wire;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use self::{
    backend::Backend,
    scenario::{REMOTE_MAC, Scenario, Side, Step},
    topo::Topology,
    wire::RawSocket,
};
use crate::{
    model::Model,
    packet::{Body, Frame, IpPacket, L4},
};

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Makes SIGINT and SIGTERM stop the run at the next frame instead of killing the process:
/// the run then returns an error and every namespace, pin and ruleset it made is removed on
/// the way out.
pub fn stop_on_interrupt() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_interrupt as *const () as usize;
            libc::sigaction(sig, &act, std::ptr::null_mut());
        }
    }
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
        bail!("interrupted; cleaning up");
    }
    Ok(())
}

/// The outcome of one shot under one back end: which frames arrived, or not sent because
/// the frame it answers never arrived there.
pub type Outcome = Option<Vec<bool>>;

/// The outcomes of one pass: per scenario, per step.
pub type PassOutcomes = Vec<Vec<Outcome>>;

#[derive(Debug, Default, Clone, Serialize)]
pub struct Summary {
    pub configs: usize,
    pub scenarios: usize,
    pub frames: usize,
    pub agreements: usize,
    pub mismatches: usize,
    /// Frames of documented differences whose sg verdict was checked, and how many were
    /// not what the documentation says.
    pub documented_checked: usize,
    pub documented_failed: usize,
    /// Shots one back end did not send because an earlier frame already differed.
    pub not_compared: usize,
}

impl Summary {
    pub fn add(&mut self, o: &Summary) {
        self.configs += o.configs;
        self.scenarios += o.scenarios;
        self.frames += o.frames;
        self.agreements += o.agreements;
        self.mismatches += o.mismatches;
        self.documented_checked += o.documented_checked;
        self.documented_failed += o.documented_failed;
        self.not_compared += o.not_compared;
    }

    pub fn ok(&self) -> bool {
        self.mismatches == 0 && self.documented_failed == 0
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "configs {}, scenarios {}, frames {}: {} agree, {} mismatch; documented differences: {} frames \
             checked, {} wrong; {} shots not compared after an earlier difference",
            self.configs,
            self.scenarios,
            self.frames,
            self.agreements,
            self.mismatches,
            self.documented_checked,
            self.documented_failed,
            self.not_compared
        )
    }
}

/// One frame the two back ends disagree on (or a documented verdict sg did not give).
#[derive(Debug, Clone, Serialize)]
pub struct Mismatch {
    pub config: String,
    pub scenario: String,
    pub step: usize,
    pub frame: String,
    pub iptables: Option<bool>,
    pub ebpf: Option<bool>,
    pub documented: Option<&'static str>,
}

/// Everything needed to run one configuration.
pub struct Config {
    pub name: String,
    pub model: Model,
    pub host: String,
}

/// The always-delivered frame that closes a shot (see `wire`): a foreign ethertype towards a
/// VM from the uplink (iptables never sees non-IP, sg lets it through to the VM), an ARP probe
/// from a VM's own MAC otherwise (iptables never sees ARP, sg allows probes from a MAC with an
/// IPv4 address). A port whose MAC has no IPv4 address may send no ARP at all (as in Neutron):
/// its sentinel is a duplicate-address-detection neighbour solicitation from `::`, which
/// Neutron's chains and sg both let out before any rule (and in before any rule, towards a VM)
/// and neither tracks. `n` makes it unique.
fn sentinel(model: &Model, from: &Side, to: &Side, n: u32) -> Frame {
    let tpa = [10, 255, (n >> 8) as u8, n as u8];
    match from {
        Side::Uplink(_) => {
            let dst = match to {
                Side::Vm(id) => model.port(id).map(|p| p.mac.0).unwrap_or([0xff; 6]),
                Side::Uplink(_) => [0xff; 6],
            };
            Frame {
                src_mac: REMOTE_MAC,
                dst_mac: dst,
                vlans: vec![],
                body: Body::Other {
                    ethertype: 0x88b5,
                    payload: [b"sg-sentinel".as_slice(), &tpa].concat(),
                },
            }
        }
        Side::Vm(id) if model.port(id).is_some_and(|p| !may_send_arp_probes(p)) => {
            let mac = model.port(id).map(|p| p.mac.0).unwrap_or([2, 0, 0, 0, 0, 1]);
            // Target fe80::5347:<n>, solicited-node group ff02::1:ff47:<n>.
            let target: std::net::Ipv6Addr = format!("fe80::5347:{:x}", n & 0xffff).parse().expect("address");
            let t = target.octets();
            let group =
                std::net::Ipv6Addr::from([0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, t[13], t[14], t[15]]);
            let mut p = IpPacket::new(
                std::net::Ipv6Addr::UNSPECIFIED.into(),
                group.into(),
                L4::Icmp {
                    icmp_type: 135,
                    code: 0,
                    rest: [0; 4],
                },
            )
            .with_payload(t.to_vec());
            // A flow label no scenario frame uses (theirs count up from 1).
            p.ident = 0xf_0000 | (n & 0xffff);
            let g = group.octets();
            Frame::ip(mac, [0x33, 0x33, g[12], g[13], g[14], g[15]], p)
        }
        Side::Vm(id) => {
            let mac = model.port(id).map(|p| p.mac.0).unwrap_or([2, 0, 0, 0, 0, 1]);
            Frame {
                src_mac: mac,
                dst_mac: [0xff; 6],
                vlans: vec![],
                body: Body::Arp {
                    op: 1,
                    sha: mac,
                    spa: [0; 4],
                    tha: [0; 6],
                    tpa,
                },
            }
        }
    }
}

/// Whether sg lets an ARP probe from the port's own MAC out: the port is not filtered, its
/// ARP protection is off (an IPv4 pair of /0), or its MAC has an IPv4 address.
fn may_send_arp_probes(p: &crate::model::Port) -> bool {
    !p.is_filtered()
        || p.allowed_address_pairs
            .iter()
            .any(|a| a.net.addr().is_ipv4() && a.net.prefix_len() == 0)
        || p.spoof_pairs(crate::model::Ethertype::IPv4)
            .iter()
            .any(|x| x.mac == p.mac && x.net.is_some())
}

/// Raw sockets on every VM and uplink of a topology.
struct Sockets {
    vms: BTreeMap<String, RawSocket>,
    uplinks: BTreeMap<String, RawSocket>,
}

impl Sockets {
    fn open(topo: &Topology) -> Result<Self> {
        let mut vms = BTreeMap::new();
        for (id, e) in &topo.vms {
            vms.insert(id.clone(), RawSocket::open(&e.ns, &e.dev)?);
        }
        let mut uplinks = BTreeMap::new();
        for (id, e) in &topo.uplinks {
            uplinks.insert(id.clone(), RawSocket::open(&e.ns, &e.dev)?);
        }
        Ok(Self { vms, uplinks })
    }

    fn get(&self, side: &Side) -> Result<&RawSocket> {
        match side {
            Side::Vm(id) => self.vms.get(id),
            Side::Uplink(id) => self.uplinks.get(id),
        }
        .with_context(|| format!("no endpoint for {side:?}"))
    }
}

/// Runs every scenario under one back end; returns the outcome of each step of each.
fn run_pass(
    backend: &mut dyn Backend,
    cfg: &Config,
    sockets: &Sockets,
    scenarios: &[Scenario],
) -> Result<Vec<Vec<Outcome>>> {
    backend.start()?;
    backend.apply(&cfg.model, None)?;
    let mut all = Vec::new();
    let mut n = 0u32;
    for sc in scenarios {
        backend.reset()?;
        let mut current: Option<Model> = None;
        let mut outcomes = Vec::new();
        let mut previous_delivered = true;
        for step in &sc.steps {
            match step {
                Step::Change { edit, .. } => {
                    let model = edit.apply(&cfg.model);
                    let old = current.as_ref().unwrap_or(&cfg.model);
                    backend.apply(&model, Some(old))?;
                    current = Some(model);
                    outcomes.push(None);
                }
                Step::Send(shot) => {
                    check_interrupted()?;
                    if shot.needs_previous && !previous_delivered {
                        outcomes.push(None);
                        previous_delivered = false;
                        continue;
                    }
                    n += 1;
                    let frames: Vec<Vec<u8>> = shot.frames.iter().map(Frame::build).collect();
                    let s = sentinel(&cfg.model, &shot.from, &shot.to, n).build();
                    let seen = wire::exchange(sockets.get(&shot.from)?, sockets.get(&shot.to)?, &frames, &s)
                        .with_context(|| format!("scenario {} under {}", sc.name, backend.name()))?;
                    previous_delivered = if shot.datagram {
                        seen.iter().any(|x| *x)
                    } else {
                        seen.iter().all(|x| *x)
                    };
                    outcomes.push(Some(seen));
                }
            }
        }
        if let Some(changed) = &current {
            backend.apply(&cfg.model, Some(changed))?;
        }
        all.push(outcomes);
    }
    Ok(all)
}

/// Compares the two passes of one configuration.
fn compare(
    cfg: &Config,
    scenarios: &[Scenario],
    ipt: &[Vec<Outcome>],
    ebpf: &[Vec<Outcome>],
    mismatches: &mut Vec<Mismatch>,
) -> Summary {
    let mut s = Summary {
        configs: 1,
        scenarios: scenarios.len(),
        ..Default::default()
    };
    for (sc, (a, b)) in scenarios.iter().zip(ipt.iter().zip(ebpf)) {
        for (i, step) in sc.steps.iter().enumerate() {
            let Step::Send(shot) = step else { continue };
            let (oa, ob) = (&a[i], &b[i]);
            if let Some((id, expected)) = shot.documented {
                let Some(ob) = ob else {
                    s.not_compared += 1;
                    continue;
                };
                for (j, got) in ob.iter().enumerate() {
                    s.documented_checked += 1;
                    s.frames += 1;
                    if *got != expected {
                        s.documented_failed += 1;
                        mismatches.push(Mismatch {
                            config: cfg.name.clone(),
                            scenario: sc.name.clone(),
                            step: i,
                            frame: shot.labels[j].clone(),
                            iptables: oa.as_ref().map(|v| v[j]),
                            ebpf: Some(*got),
                            documented: Some(id),
                        });
                    }
                }
                continue;
            }
            match (oa, ob) {
                (Some(va), Some(vb)) => {
                    let (va, vb) = if shot.datagram {
                        (vec![va.iter().any(|x| *x)], vec![vb.iter().any(|x| *x)])
                    } else {
                        (va.clone(), vb.clone())
                    };
                    for (j, (x, y)) in va.iter().zip(&vb).enumerate() {
                        s.frames += 1;
                        if x == y {
                            s.agreements += 1;
                        } else {
                            s.mismatches += 1;
                            mismatches.push(Mismatch {
                                config: cfg.name.clone(),
                                scenario: sc.name.clone(),
                                step: i,
                                frame: shot.labels[j].clone(),
                                iptables: Some(*x),
                                ebpf: Some(*y),
                                documented: None,
                            });
                        }
                    }
                }
                (None, None) => {}
                _ => s.not_compared += 1,
            }
        }
    }
    s
}

/// Makes the two back ends (iptables, eBPF) for a topology and host.
pub type MakeBackends<'a> = dyn Fn(&Topology, &str) -> Result<(Box<dyn Backend>, Box<dyn Backend>)> + 'a;

/// Runs one configuration through both back ends.
pub fn run_config(
    cfg: &Config,
    scenarios: &[Scenario],
    tag: &str,
    make: &MakeBackends,
    mismatches: &mut Vec<Mismatch>,
) -> Result<Summary> {
    let (a, b) = run_passes(cfg, scenarios, tag, make)?;
    Ok(compare(cfg, scenarios, &a, &b, mismatches))
}

/// Both passes of one configuration, without comparing: (iptables, eBPF) outcomes per
/// scenario and step.
pub fn run_passes(
    cfg: &Config,
    scenarios: &[Scenario],
    tag: &str,
    make: &MakeBackends,
) -> Result<(PassOutcomes, PassOutcomes)> {
    let topo = Topology::build(&cfg.model, &cfg.host, tag)?;
    let sockets = Sockets::open(&topo)?;
    wire::pin_to_cpu(0)?;
    let (mut ipt, mut ebpf) = make(&topo, &cfg.host)?;
    let a = run_pass(ipt.as_mut(), cfg, &sockets, scenarios)?;
    ipt.teardown()?;
    let b = run_pass(ebpf.as_mut(), cfg, &sockets, scenarios)?;
    ebpf.teardown()?;
    Ok((a, b))
}

/// Writes a reproduction of the mismatches of one configuration: the input, the scenarios
/// involved (frame by frame) and each side's verdicts.
pub fn write_repro(
    dir: &Path,
    cfg_json: &serde_json::Value,
    scenarios: &[Scenario],
    found: &[Mismatch],
) -> Result<PathBuf> {
    let name = found.first().map(|m| m.config.clone()).unwrap_or_default();
    let out = dir.join(format!("mismatch-{name}"));
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("input.json"), serde_json::to_vec_pretty(cfg_json)?)?;
    let mut text = String::new();
    for m in found {
        text += &format!(
            "{} step {}: {}\n    iptables: {}  sg: {}{}\n",
            m.scenario,
            m.step,
            m.frame,
            verdict(m.iptables),
            verdict(m.ebpf),
            m.documented
                .map(|d| format!("  (documented difference {d})"))
                .unwrap_or_default()
        );
    }
    text += "\nscenarios:\n";
    for sc in scenarios
        .iter()
        .filter(|s| found.iter().any(|m| m.scenario == s.name))
    {
        text += &format!("{}\n", sc.name);
        for (i, step) in sc.steps.iter().enumerate() {
            match step {
                Step::Send(shot) => {
                    for l in &shot.labels {
                        text += &format!("  {i:>2} {:?} -> {:?}: {l}\n", shot.from, shot.to);
                    }
                }
                Step::Change { what, .. } => text += &format!("  {i:>2} change: {what}\n"),
            }
        }
    }
    std::fs::write(out.join("mismatches.txt"), &text)?;
    Ok(out)
}

fn verdict(v: Option<bool>) -> &'static str {
    match v {
        Some(true) => "delivered",
        Some(false) => "dropped",
        None => "not sent",
    }
}

/// Make random configurations well defined for the comparison: ports on one Linux bridge
/// network share one conntrack zone in Neutron, so a stateless and a stateful port there
/// change each other's behaviour (documented differences D2 and D12). A port whose statefulness
/// differs from the first port of its network moves to a network of its own.
pub fn separate_mixed_networks(model: &mut Model, host: &str) -> usize {
    let mut first: BTreeMap<String, bool> = BTreeMap::new();
    let mut moves = Vec::new();
    for p in model.local_ports(host) {
        if !p.is_filtered() {
            continue;
        }
        let stateful = model.port_stateful(p);
        match first.get(&p.network_id) {
            None => {
                first.insert(p.network_id.clone(), stateful);
            }
            Some(&s) if s != stateful => moves.push(p.id.clone()),
            _ => {}
        }
    }
    for (i, id) in moves.iter().enumerate() {
        if let Some(p) = model.ports.iter_mut().find(|p| &p.id == id) {
            p.network_id = format!(
                "{:08x}-d5{:02x}-4000-8000-{}",
                i,
                i,
                &p.id[p.id.len().saturating_sub(12)..]
            );
        }
    }
    moves.len()
}

/// Fails with the summary when anything differs.
pub fn check(summary: &Summary) -> Result<()> {
    if !summary.ok() {
        bail!("differential test failed: {summary}");
    }
    Ok(())
}

/// What `sg diff` runs.
#[derive(Debug, Clone)]
pub struct DiffOptions {
    pub inputs: Vec<PathBuf>,
    /// Random configurations: how many, and the first seed.
    pub random: usize,
    pub seed: u64,
    pub scenarios: usize,
    pub host: String,
    pub out: PathBuf,
    /// Shrink each failing configuration to a small reproduction.
    pub shrink: bool,
}

/// Makes both back ends for a configuration; the iptables side is chosen by the caller.
pub type BackendFactory = dyn Fn(&Topology, &Config, &str) -> Result<(Box<dyn Backend>, Box<dyn Backend>)>;

/// Runs every configuration; prints one line per configuration and writes reproductions of
/// mismatches under `opts.out`.
pub fn run(opts: &DiffOptions, make: &BackendFactory, log: &mut dyn FnMut(&str)) -> Result<Summary> {
    let mut configs: Vec<(Config, serde_json::Value, u64)> = Vec::new();
    for (i, path) in opts.inputs.iter().enumerate() {
        let model = crate::model::load(path).map_err(|e| anyhow::anyhow!("{}:\n{e}", path.display()))?;
        let json = load_json(path)?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| format!("input{i}"));
        configs.push((
            Config {
                name,
                model,
                host: opts.host.clone(),
            },
            json,
            opts.seed + i as u64,
        ));
    }
    for i in 0..opts.random as u64 {
        let seed = opts.seed + i;
        let doc = crate::generator::generate(seed);
        let json = serde_json::to_value(&doc)?;
        let mut model = crate::model::from_values(vec![(format!("seed-{seed}"), json.clone())])
            .map_err(|e| anyhow::anyhow!("generated config seed {seed} is invalid:\n{e}"))?;
        separate_mixed_networks(&mut model, crate::generator::LOCAL_HOST);
        configs.push((
            Config {
                name: format!("seed-{seed}"),
                model,
                host: crate::generator::LOCAL_HOST.into(),
            },
            json,
            seed,
        ));
    }
    let mut total = Summary::default();
    for (cfg, json, seed) in &configs {
        let mut scenarios = scenario::generate(&cfg.model, &cfg.host, *seed, opts.scenarios);
        scenarios.extend(scenario::documented(&cfg.model, &cfg.host, *seed));
        let mut found = Vec::new();
        let tag = format!("{}-{}", std::process::id() % 100_000, total.configs);
        let make_here = |topo: &Topology, _host: &str| make(topo, cfg, &tag);
        let s = run_config(cfg, &scenarios, &tag, &make_here, &mut found)?;
        log(&format!("{:<24} {s}", cfg.name));
        if !found.is_empty() {
            let dir = write_repro(&opts.out, json, &scenarios, &found)?;
            for m in found.iter().take(5) {
                log(&format!(
                    "  MISMATCH {} step {}: {}  iptables {} sg {}",
                    m.scenario,
                    m.step,
                    m.frame,
                    verdict(m.iptables),
                    verdict(m.ebpf)
                ));
            }
            if opts.shrink
                && let Some(first) = found.first()
            {
                let sc = scenarios
                    .iter()
                    .find(|s| s.name == first.scenario)
                    .cloned()
                    .expect("scenario of a mismatch");
                let small = shrink(cfg, &sc, first, make)?;
                let small_json = crate::model::to_json(&small);
                std::fs::write(
                    dir.join("input-shrunk.json"),
                    serde_json::to_vec_pretty(&small_json)?,
                )?;
                log(&format!(
                    "  reproduction: {} (shrunk input: {})",
                    dir.display(),
                    small.summary()
                ));
            } else {
                log(&format!("  reproduction: {}", dir.display()));
            }
        }
        total.add(&s);
    }
    Ok(total)
}

fn load_json(path: &Path) -> Result<serde_json::Value> {
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        files.sort();
        let docs: Vec<serde_json::Value> = files
            .iter()
            .map(|f| Ok(serde_json::from_slice(&std::fs::read(f)?)?))
            .collect::<Result<_>>()?;
        return Ok(serde_json::Value::Array(docs));
    }
    Ok(serde_json::from_slice(&std::fs::read(path)?)?)
}

/// Smallest input (by removing rules, groups, pairs and uninvolved ports one at a time) on
/// which the same frame of the same scenario still differs. Frames stay as they were.
fn shrink(cfg: &Config, sc: &Scenario, m: &Mismatch, make: &BackendFactory) -> Result<Model> {
    let involved: Vec<String> = sc
        .steps
        .iter()
        .filter_map(|s| match s {
            Step::Send(shot) => Some([shot.from.clone(), shot.to.clone()]),
            _ => None,
        })
        .flatten()
        .filter_map(|s| match s {
            Side::Vm(id) => Some(id),
            Side::Uplink(_) => None,
        })
        .collect();
    let still_fails = |model: &Model, n: usize| -> Result<bool> {
        let c = Config {
            name: cfg.name.clone(),
            model: model.clone(),
            host: cfg.host.clone(),
        };
        let tag = format!("{}-k{n}", std::process::id() % 100_000);
        let make_here = |topo: &Topology, _h: &str| make(topo, &c, &tag);
        let mut found = Vec::new();
        // Change steps are edits: they apply to the shrunk input as they did to the original.
        run_config(&c, std::slice::from_ref(sc), &tag, &make_here, &mut found)?;
        Ok(found.iter().any(|f| f.step == m.step && f.frame == m.frame))
    };
    let mut best = cfg.model.clone();
    let mut trials = 0;
    let mut progress = true;
    while progress && trials < 80 {
        progress = false;
        for candidate in crate::model::shrink_candidates(&best, &involved) {
            trials += 1;
            if still_fails(&candidate, trials)? {
                best = candidate;
                progress = true;
                break;
            }
            if trials >= 80 {
                break;
            }
        }
    }
    Ok(best)
}

#[cfg(test)]
mod tests {
    /// Every difference the harness asserts sg's side of, or a dedicated test covers, has its
    /// section (reason and test) in the one list of deliberate differences.
    #[test]
    fn documented_differences_are_listed() {
        let list = include_str!("../../../tests/DIFFERENCES.md");
        let scenario = include_str!("scenario.rs");
        let mut ids: Vec<String> = scenario
            .match_indices("Some((\"D")
            .map(|(i, _)| scenario[i + 7..].split('"').next().unwrap().to_string())
            .collect();
        ids.extend(["D12", "D13", "D18"].map(String::from));
        assert!(ids.len() >= 7, "{ids:?}");
        for id in ids {
            assert!(
                list.contains(&format!("## {id}: ")),
                "{id} is used but has no section in tests/DIFFERENCES.md"
            );
        }
    }
}
