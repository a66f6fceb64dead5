//! §3 Control plane: the same change applied by sg (compiler + the agent's applier, to maps
//! under a private pin root, taps being veth pairs in a private namespace) and by sg's
//! iptables back end (`IptablesDataplane::apply`: Neutron's render, `iptables-save` diff,
//! ipsets, `iptables-restore --noflush`) with iptables-legacy and iptables-nft, each in its
//! own namespace. Within a repeat the three run back to back; ratios are per repeat.
//!
//! - Full sync: from nothing to the whole input. sg: compile + apply: every map entry written
//!   and every tap's pinned tcx links taken over by the new programs (an agent whose maps are
//!   gone; loading the programs is part of an agent start, measured below); iptables:
//!   render and apply into a fresh namespace. Attaching a *new* tap is measured on its own: it waits
//!   for RCU grace periods, which has nothing to do with the number of rules.
//! - One-rule change on a port with 1,000 rules: one rule added, then removed again (a removal
//!   needs a new policy generation, so that flows it admitted are re-checked). For sg the
//!   figure is the applier call, after which the change is in effect; compiling the whole
//!   input again is shown beside it.
//! - A remote-group member added to a group of 5,000 (a port on another host), then removed.
//! - Agent restart to ready: `sg agent` started over the state a previous agent left (pinned
//!   maps and links, or the iptables rules and ipsets), timed from spawn to its "ready" line.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use sg_user::{
    agent::apply::Applier,
    compile,
    datapath::{Datapath, LoadOptions},
    iptables::{Backend, IptablesDataplane, RenderOptions},
    model::Model,
};

use crate::{
    env::{Ns, PinRoot, RcuExpedited, tag},
    policy::{self, Doc, HOST},
};

#[derive(Debug, Serialize, Deserialize, Default)]
pub struct Scenario {
    pub name: String,
    /// What the input holds.
    pub input: String,
    /// Seconds per repeat: sg (the figure), sg's compile alone (a part of it for full syncs,
    /// beside it for changes), iptables-legacy, iptables-nft.
    pub sg: Vec<f64>,
    pub sg_compile: Vec<f64>,
    pub legacy: Vec<f64>,
    pub nft: Vec<f64>,
    /// Entries sg wrote or deleted in the last repeat, iptables rules in the ruleset.
    pub sg_entries: usize,
    pub ipt_rules: usize,
}

#[derive(Debug, Serialize, Deserialize, Default)]
pub struct Restart {
    pub input: String,
    /// Seconds from spawn to the "ready" line: first start (no previous state), restarts.
    pub sg_first: f64,
    pub sg: Vec<f64>,
    pub legacy_first: f64,
    pub legacy: Vec<f64>,
    pub nft_first: f64,
    pub nft: Vec<f64>,
    /// The programs' load (verifier) alone, from the library, per restart.
    pub sg_load: Vec<f64>,
}

#[derive(Debug, Serialize, Deserialize, Default)]
pub struct Results {
    pub scenarios: Vec<Scenario>,
    pub restart: Restart,
    /// Seconds per new tap attached (two tcx links): normal and expedited RCU.
    pub attach: (f64, f64),
    pub attach_taps: usize,
}

/// `ports` local ports with `egress`, `base` (`base` rules) and one of `tenants` tenant
/// groups (`tenant` rules each), and `peers` members of `peers` on other hosts.
pub fn node_doc(ports: usize, base: usize, tenant: usize, tenants: usize, peers: usize) -> Doc {
    let mut d = Doc::new();
    d.group("base", policy::filler_rules("base", base, 0));
    for t in 0..tenants {
        let g = format!("t{t}");
        d.group(&g, policy::filler_rules(&g, tenant, 100_000 + t * 100));
    }
    for i in 0..ports {
        let g = format!("t{}", i % tenants);
        d.local_port(&policy::local_ip(i), &["base", &g]);
    }
    d.peers(peers);
    d
}

/// Taps for the local ports of `m`: veth pairs in a namespace.
struct Taps {
    ns: Ns,
}

impl Taps {
    fn new(m: &Model, what: &str) -> Result<Self> {
        let ns = Ns::new(tag(what))?;
        let devices: Vec<String> = m.local_ports(HOST).iter().map(|p| p.device.clone()).collect();
        let mut batch = String::new();
        for (i, d) in devices.iter().enumerate() {
            batch.push_str(&format!(
                "link add {d} type veth peer name p{i}\nlink set {d} up\n"
            ));
        }
        ns.ip_batch(&batch)?;
        Ok(Self { ns })
    }
}

struct Sg {
    applier: Applier,
    _pins: PinRoot,
}

impl Sg {
    fn new(taps: &Taps, what: &str) -> Result<Self> {
        let pins = PinRoot::new(what);
        let dp = Datapath::load(&LoadOptions {
            pin_root: Some(pins.0.clone()),
            ..Default::default()
        })?;
        Ok(Self {
            applier: Applier::adopt(dp, Some(taps.ns.0.clone()), None)?,
            _pins: pins,
        })
    }

    /// (seconds of the applier call, seconds of the compile, entries written + deleted).
    fn apply(&mut self, m: &Model) -> Result<(f64, f64, usize)> {
        let t = Instant::now();
        let c = compile::compile(m, HOST);
        let compile_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let r = self.applier.apply(&c)?;
        Ok((
            t.elapsed().as_secs_f64(),
            compile_s,
            r.entries_written + r.entries_deleted,
        ))
    }
}

/// The iptables back end in its own namespace.
struct Ipt {
    dp: IptablesDataplane,
    _ns: Ns,
}

impl Ipt {
    fn new(backend: Backend, what: &str) -> Result<Self> {
        let ns = Ns::new(tag(what))?;
        Ok(Self {
            dp: IptablesDataplane::new(backend).in_netns(Some(ns.0.clone())),
            _ns: ns,
        })
    }

    /// Seconds of one apply (render included). iptables-legacy's xtables lock is host-wide:
    /// another user of the machine holding it makes the restore fail; such an attempt is
    /// retried and not counted.
    fn apply(&self, m: &Model) -> Result<f64> {
        let opts = RenderOptions::new(HOST);
        let mut tries = 0;
        loop {
            let t = Instant::now();
            match self.dp.apply(m, &opts) {
                Ok(_) => return Ok(t.elapsed().as_secs_f64()),
                Err(e) if tries < 5 && format!("{e:#}").contains("xtables lock") => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn rules(&self) -> Result<usize> {
        let mut n = 0;
        for f in [sg_user::model::Ethertype::IPv4, sg_user::model::Ethertype::IPv6] {
            n += self.dp.save(f)?.lines().filter(|l| l.starts_with("-A ")).count();
        }
        Ok(n)
    }
}

/// The taps of a node with sg's links attached and pinned under `pins` (set up with
/// expedited RCU grace periods), so that each repeat can start from empty maps and take the
/// links over, as an agent does.
struct Attached {
    taps: Taps,
    pins: PinRoot,
}

impl Attached {
    fn new(m: &Model, what: &str) -> Result<Self> {
        let taps = Taps::new(m, what)?;
        let pins = PinRoot::new(what);
        {
            let _rcu = RcuExpedited::on();
            let dp = Datapath::load(&LoadOptions {
                pin_root: Some(pins.0.clone()),
                ..Default::default()
            })?;
            let mut a = Applier::adopt(dp, Some(taps.ns.0.clone()), None)?;
            a.apply(&compile::compile(m, HOST))?;
        }
        Ok(Self { taps, pins })
    }

    /// An agent's state from nothing over the attached taps: the pinned maps are dropped (the
    /// links keep the old programs, and those their maps, until taken over) and new ones made.
    fn fresh(&self) -> Result<Applier> {
        std::fs::remove_dir_all(self.pins.0.join("maps"))?;
        let dp = Datapath::load(&LoadOptions {
            pin_root: Some(self.pins.0.clone()),
            ..Default::default()
        })?;
        Applier::adopt(dp, Some(self.taps.ns.0.clone()), None)
    }
}

fn full_sync(name: &str, doc: &Doc, repeats: usize, node: &Attached) -> Result<Scenario> {
    let m = doc.model()?;
    let mut s = Scenario {
        name: name.to_string(),
        input: m.summary(),
        ..Default::default()
    };
    let ports = m.local_ports(HOST).len();
    for _ in 0..repeats {
        let mut applier = node.fresh()?;
        let t = Instant::now();
        let c = compile::compile(&m, HOST);
        let compile_s = t.elapsed().as_secs_f64();
        let r = applier.apply(&c)?;
        s.sg.push(t.elapsed().as_secs_f64());
        s.sg_compile.push(compile_s);
        s.sg_entries = r.entries_written + r.ports_switched.len();
        if r.taps_taken_over.len() != ports {
            bail!(
                "{name}: {} of {ports} taps taken over ({} attached afresh)",
                r.taps_taken_over.len(),
                r.taps_attached.len()
            );
        }
        drop(applier);
        for (backend, out) in [(Backend::Legacy, &mut s.legacy), (Backend::Nft, &mut s.nft)] {
            let ipt = Ipt::new(backend, "cpi")?;
            out.push(ipt.apply(&m)?);
            s.ipt_rules = ipt.rules()?;
        }
        eprintln!(
            "  {name}: sg {:.1} ms (compile {:.1}), legacy {:.0} ms, nft {:.0} ms",
            s.sg.last().unwrap() * 1e3,
            compile_s * 1e3,
            s.legacy.last().unwrap() * 1e3,
            s.nft.last().unwrap() * 1e3
        );
    }
    Ok(s)
}

/// A new tap: both tcx links attached (and pinned), per tap, with the kernel's normal RCU
/// grace periods and with expedited ones: (normal, expedited) seconds per tap.
fn attach_cost(n: usize) -> Result<(f64, f64)> {
    let m = node_doc(n, 10, 1, 1, 10).model()?;
    let mut out = [0.0; 2];
    for (i, expedited) in [false, true].into_iter().enumerate() {
        let taps = Taps::new(&m, "atc")?;
        let mut sg = Sg::new(&taps, "atc")?;
        let _rcu = expedited.then(RcuExpedited::on);
        let t = Instant::now();
        let (_, _, _) = sg.apply(&m)?;
        out[i] = t.elapsed().as_secs_f64() / n as f64;
    }
    Ok((out[0], out[1]))
}

/// Applies `a`, then alternately `b` and `a`; the `b` applies go to `to_b`, the others to
/// `to_a`.
fn change(to_b: &str, to_a: &str, a: &Model, b: &Model, repeats: usize) -> Result<(Scenario, Scenario)> {
    let taps = Taps::new(a, "cct")?;
    let mut sg = Sg::new(&taps, "ccs")?;
    sg.apply(a)?;
    let legacy = Ipt::new(Backend::Legacy, "ccl")?;
    let nft = Ipt::new(Backend::Nft, "ccn")?;
    legacy.apply(a)?;
    nft.apply(a)?;
    let mut sa = Scenario {
        name: to_a.to_string(),
        input: a.summary(),
        ..Default::default()
    };
    let mut sb = Scenario {
        name: to_b.to_string(),
        input: a.summary(),
        ..Default::default()
    };
    for _ in 0..repeats {
        for (m, s) in [(b, &mut sb), (a, &mut sa)] {
            let (apply_s, compile_s, entries) = sg.apply(m)?;
            s.sg.push(apply_s);
            s.sg_compile.push(compile_s);
            s.sg_entries = entries;
            s.legacy.push(legacy.apply(m)?);
            s.nft.push(nft.apply(m)?);
        }
    }
    sa.ipt_rules = legacy.rules()?;
    sb.ipt_rules = sa.ipt_rules;
    for s in [&sb, &sa] {
        eprintln!(
            "  {}: sg {:.2} ms ({} entries), legacy {:.0} ms, nft {:.0} ms",
            s.name,
            crate::stats::Summary::of(&s.sg).median * 1e3,
            s.sg_entries,
            crate::stats::Summary::of(&s.legacy).median * 1e3,
            crate::stats::Summary::of(&s.nft).median * 1e3
        );
    }
    Ok((sb, sa))
}

fn one_rule(repeats: usize) -> Result<(Scenario, Scenario)> {
    let mut doc = Doc::new();
    let rules = policy::ingress_rules("big", 1_000, 0);
    doc.group("big", rules.clone());
    doc.local_port(&policy::local_ip(0), &["big"]);
    doc.peers(1_000);
    let a = doc.model()?;
    let mut more = rules;
    more.insert(
        500,
        serde_json::json!({
            "id": "big-added", "direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
            "port_range_min": 7777, "port_range_max": 7777, "remote_ip_prefix": "198.18.0.0/15",
        }),
    );
    let mut doc_b = Doc::new();
    doc_b.group("big", more);
    doc_b.local_port(&policy::local_ip(0), &["big"]);
    doc_b.peers(1_000);
    let b = doc_b.model()?;
    change(
        "one rule added, port with 1,000 rules",
        "one rule removed, port with 1,000 rules",
        &a,
        &b,
        repeats,
    )
}

fn member(repeats: usize) -> Result<(Scenario, Scenario)> {
    // 20 ports whose 100 rules include remote-group rules on `peers`.
    let a = node_doc(20, 100, 0, 1, 4_999).model()?;
    let b = node_doc(20, 100, 0, 1, 5_000).model()?;
    change(
        "remote-group member added (5,000 members)",
        "remote-group member removed (5,000 members)",
        &a,
        &b,
        repeats,
    )
}

/// An agent over a namespace of taps, with its own pin root, run dir and input file.
struct AgentRun {
    sg: PathBuf,
    dir: PathBuf,
    pins: PinRoot,
    netns: String,
}

impl AgentRun {
    fn new(sg: &Path, doc: &Doc, netns: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(tag("agent"));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("input.json"), serde_json::to_vec(&doc.build())?)?;
        Ok(Self {
            sg: sg.to_path_buf(),
            pins: PinRoot::new("agt"),
            netns: netns.to_string(),
            dir,
        })
    }

    /// Starts the agent, waits for "ready", stops it (SIGTERM): seconds from spawn to ready.
    fn start_stop(&self, extra: &[&str]) -> Result<f64> {
        let t = Instant::now();
        let mut child = Command::new(&self.sg)
            .args(["--pin-root", self.pins.0.to_str().unwrap()])
            .args(["--run-dir", self.dir.join("run").to_str().unwrap()])
            .args(["agent", "--host", HOST, "--netns", &self.netns])
            .args(["--state", self.dir.join("input.json").to_str().unwrap()])
            .args(["--gc-interval-ms", "600000"])
            .args(extra)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting sg agent")?;
        let out = child.stdout.take().context("stdout")?;
        let mut ready = None;
        let mut log = String::new();
        for line in BufReader::new(out).lines() {
            let line = line?;
            log.push_str(&line);
            log.push('\n');
            if line.contains(" ready") {
                ready = Some(t.elapsed().as_secs_f64());
                break;
            }
        }
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait()?;
        match ready {
            Some(s) => Ok(s),
            None => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read as _;
                    let _ = e.read_to_string(&mut err);
                }
                bail!("sg agent {extra:?} never got ready ({status}):\n{log}{err}")
            }
        }
    }
}

impl Drop for AgentRun {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn restart(sg: &Path, repeats: usize) -> Result<Restart> {
    let doc = node_doc(200, 400, 21, 20, 1_000);
    let m = doc.model()?;
    let mut r = Restart {
        input: m.summary(),
        ..Default::default()
    };
    let taps = Taps::new(&m, "rst")?;
    let ebpf = AgentRun::new(sg, &doc, &taps.ns.0)?;
    {
        // The first start attaches every tap: setup, with fast grace periods.
        let _rcu = RcuExpedited::on();
        r.sg_first = ebpf.start_stop(&[])?;
    }
    // iptables agents, each on its own namespace (rules live in the namespace of the taps).
    let legacy_taps = Taps::new(&m, "rsl")?;
    let legacy = AgentRun::new(sg, &doc, &legacy_taps.ns.0)?;
    let ipt_legacy = ["--dataplane", "iptables", "--backend", "legacy"];
    r.legacy_first = legacy.start_stop(&ipt_legacy)?;
    let nft_taps = Taps::new(&m, "rsn")?;
    let nft = AgentRun::new(sg, &doc, &nft_taps.ns.0)?;
    let ipt_nft = ["--dataplane", "iptables", "--backend", "nft"];
    r.nft_first = nft.start_stop(&ipt_nft)?;
    for _ in 0..repeats {
        r.sg.push(ebpf.start_stop(&[])?);
        r.legacy.push(legacy.start_stop(&ipt_legacy)?);
        r.nft.push(nft.start_stop(&ipt_nft)?);
        let t = Instant::now();
        drop(Datapath::load(&LoadOptions::default())?);
        r.sg_load.push(t.elapsed().as_secs_f64());
    }
    eprintln!(
        "  restart: sg {:.0} ms (first {:.0}), legacy {:.0} ms (first {:.0}), nft {:.0} ms (first {:.0})",
        crate::stats::Summary::of(&r.sg).median * 1e3,
        r.sg_first * 1e3,
        crate::stats::Summary::of(&r.legacy).median * 1e3,
        r.legacy_first * 1e3,
        crate::stats::Summary::of(&r.nft).median * 1e3,
        r.nft_first * 1e3
    );
    Ok(r)
}

/// The full-sync inputs of `run_all`, as files.
pub fn dump_inputs(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, doc) in [
        ("sync-200x422-shared.json", node_doc(200, 400, 21, 20, 1_000)),
        ("sync-200x422-per-port.json", node_doc(200, 400, 21, 200, 1_000)),
        ("sync-1000x50.json", node_doc(1_000, 40, 9, 50, 1_000)),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, serde_json::to_vec_pretty(&doc.build())?)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

pub struct Config {
    pub sync_repeats: usize,
    pub change_repeats: usize,
    pub restart_repeats: usize,
}

pub fn run_all(cfg: &Config, sg: &Path) -> Result<Results> {
    let mut res = Results::default();
    let big = node_doc(1_000, 40, 9, 50, 1_000);
    // One set of 1,000 taps serves every full sync: ports are numbered alike in all inputs.
    let node = Attached::new(&big.model()?, "cpn")?;
    res.scenarios.push(full_sync(
        "full sync, 200 ports × 422 rules (20 distinct policies)",
        &node_doc(200, 400, 21, 20, 1_000),
        cfg.sync_repeats,
        &node,
    )?);
    res.scenarios.push(full_sync(
        "full sync, 200 ports × 422 rules (every port its own policy)",
        &node_doc(200, 400, 21, 200, 1_000),
        cfg.sync_repeats,
        &node,
    )?);
    res.scenarios.push(full_sync(
        "full sync, 1,000 ports × 50 rules (50 distinct policies)",
        &big,
        cfg.sync_repeats,
        &node,
    )?);
    drop(node);
    res.attach_taps = 20;
    res.attach = attach_cost(res.attach_taps)?;
    let (add, del) = one_rule(cfg.change_repeats)?;
    res.scenarios.push(add);
    res.scenarios.push(del);
    let (add, del) = member(cfg.change_repeats)?;
    res.scenarios.push(add);
    res.scenarios.push(del);
    res.restart = restart(sg, cfg.restart_repeats)?;
    Ok(res)
}

#[derive(Debug, Serialize, Deserialize, Default)]
pub struct CompileBench {
    pub input: String,
    /// Seconds per repeat: sg's compiler, and sg's Neutron iptables renderer on the same model.
    pub compile: Vec<f64>,
    pub render: Vec<f64>,
    pub entries: usize,
    pub bytes: usize,
    pub policies: usize,
    pub ipt_rules: usize,
}

/// Issue 3's compile benchmark: 1,000 local ports × 100 rules in 3 shared groups (plus the
/// egress rule), the remote group `peers` holding the 1,000 local ports and 4,000 others.
pub fn compile_bench(repeats: usize) -> Result<CompileBench> {
    let mut d = Doc::new();
    d.group("base", policy::filler_rules("base", 34, 0));
    d.group("web", policy::filler_rules("web", 33, 40));
    d.group("app", policy::filler_rules("app", 33, 80));
    for i in 0..1_000 {
        d.local_port(&policy::local_ip(i), &["base", "web", "app", policy::PEERS]);
    }
    d.peers(4_000);
    let m = d.model()?;
    let mut r = CompileBench {
        input: m.summary(),
        ..Default::default()
    };
    let opts = RenderOptions::new(HOST);
    for _ in 0..repeats {
        let t = Instant::now();
        let c = compile::compile(&m, HOST);
        r.compile.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let rendered = sg_user::iptables::render(&m, &opts);
        r.render.push(t.elapsed().as_secs_f64());
        let s = c.stats;
        r.entries = s.ports.entries + s.addrs.entries + s.classes.entries + s.services.entries;
        r.bytes = s.ports.bytes + s.addrs.bytes + s.classes.bytes + s.services.bytes;
        r.policies = s.policies;
        r.ipt_rules = rendered
            .v4
            .lines()
            .chain(rendered.v6.lines())
            .filter(|l| l.starts_with("-A "))
            .count();
    }
    eprintln!(
        "  compile 1,000 × 100: {:.1} ms, render {:.1} ms",
        crate::stats::Summary::of(&r.compile).median * 1e3,
        crate::stats::Summary::of(&r.render).median * 1e3
    );
    Ok(r)
}
