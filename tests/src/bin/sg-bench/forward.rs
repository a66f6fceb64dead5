//! §2 Forwarding through the namespace compute node (`sg_user::diff::topo`): a Linux bridge
//! `brq…`, the VM's tap (a veth whose other end is the VM's eth0 in its own namespace) and an
//! uplink namespace standing for the rest of the network.
//!
//! Four nodes, one per setup, are built from the same input and measured in turn within each
//! round, so that a busy moment of the machine falls on all of them:
//! - **unfiltered** (the floor): br_netfilter off, nothing attached;
//! - **iptables-legacy** and **iptables-nft**: sg's Neutron parity rules for the same input
//!   (`IptablesDataplane::apply`), br_netfilter on, real conntrack; the matching rule is the
//!   last of the port's ingress chain (checked);
//! - **sg**: the compiled input applied by the agent's applier, br_netfilter off.
//!
//! New-flow UDP: `flood.rs` sends from the uplink, every frame a new 5-tuple admitted by the
//! last rule; delivered = the VM's eth0 rx counter. Before the runs of each rule count, a
//! burst to a port no rule admits checks that the filter drops it (and the floor delivers it).
//! iptables' conntrack table is flushed before each run (262,144 entries would fill within a
//! second); sg's LRU table is left as it is, evicting as it goes.
//!
//! Established TCP: one iperf3 stream (`-R`: the uplink sends, the VM receives; the VM opened
//! the connection, as Neutron's default egress rule allows).

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use sg_user::{
    agent::apply::Applier,
    compile,
    datapath::{Datapath, LoadOptions},
    diff::{scenario::REMOTE_MAC, topo::Topology},
    iptables::{Backend, IptablesDataplane, RenderOptions},
    model::Model,
    netns,
    packet::format_mac,
};

use crate::{
    env::{PinRoot, run, tag},
    flood::{Flow, Sender},
    policy::{self, DENY_PORT, Doc, HOST, MATCH_PORT},
};

pub const RULES: [usize; 4] = [10, 100, 1_000, 5_000];
const VM_IP: &str = "203.0.113.10";
const UPLINK_IP: &str = "203.0.113.1";
const PEERS: usize = 1_000;

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Setup {
    Unfiltered,
    Legacy,
    Nft,
    Sg,
}

pub const SETUPS: [Setup; 4] = [Setup::Unfiltered, Setup::Legacy, Setup::Nft, Setup::Sg];

impl Setup {
    pub fn name(self) -> &'static str {
        match self {
            Setup::Unfiltered => "unfiltered",
            Setup::Legacy => "iptables-legacy",
            Setup::Nft => "iptables-nft",
            Setup::Sg => "sg",
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Results {
    pub udp_seconds: f64,
    pub tcp_seconds: u32,
    /// pps offered and delivered, `[setup][rules index][round]`.
    pub offered: Vec<Vec<Vec<f64>>>,
    pub delivered: Vec<Vec<Vec<f64>>>,
    /// bits per second received by the VM, `[setup][rules index][round]`.
    pub tcp: Vec<Vec<Vec<f64>>>,
    /// Rules in the port's iptables ingress chain before the match rule, per rule count.
    pub chain_rules: Vec<usize>,
    /// ns per packet inside `sg_to_vm` on the forwarding path (BPF_ENABLE_STATS, one extra
    /// run after the measured ones), per rule count.
    pub sg_prog_ns: Vec<f64>,
    /// The same with the port stateless (no conntrack), and its delivered pps.
    pub sg_prog_ns_stateless: Vec<f64>,
    pub sg_stateless_pps: Vec<f64>,
}

pub fn model(n: usize) -> Result<Model> {
    let mut d = Doc::new();
    d.group("fwd", policy::ingress_rules("fwd", n, 0));
    d.local_port(VM_IP, &["fwd"]);
    d.peers(PEERS);
    d.model()
}

struct Node {
    setup: Setup,
    topo: Topology,
    vm_ns: String,
    up_ns: String,
    device: String,
    vm_mac: [u8; 6],
    sender: Sender,
    ipt: Option<IptablesDataplane>,
    sg: Option<Applier>,
    _pins: Option<PinRoot>,
}

impl Node {
    fn new(setup: Setup, m: &Model, i: usize) -> Result<Self> {
        let topo = Topology::build(m, HOST, &tag(&format!("f{i}")))?;
        let port = m.local_ports(HOST)[0].clone();
        let vm_ns = topo.vms[&port.id].ns.clone();
        let up_ns = topo.uplinks[&port.network_id].ns.clone();
        run(
            "ip",
            &[
                "-n",
                &up_ns,
                "link",
                "set",
                "eth0",
                "address",
                &format_mac(&REMOTE_MAC),
            ],
        )?;
        let sender = Sender::open(&up_ns, "eth0")?;
        let (mut ipt, mut sg, mut pins) = (None, None, None);
        match setup {
            Setup::Unfiltered => topo.bridge_netfilter(false)?,
            Setup::Legacy | Setup::Nft => {
                topo.bridge_netfilter(true)?;
                let backend = if setup == Setup::Legacy {
                    Backend::Legacy
                } else {
                    Backend::Nft
                };
                ipt = Some(IptablesDataplane::new(backend).in_netns(Some(topo.node.0.clone())));
            }
            Setup::Sg => {
                topo.bridge_netfilter(false)?;
                let p = PinRoot::new(&format!("fwd{i}"));
                let dp = Datapath::load(&LoadOptions {
                    pin_root: Some(p.0.clone()),
                    ..Default::default()
                })?;
                sg = Some(Applier::adopt(dp, Some(topo.node.0.clone()), None)?);
                pins = Some(p);
            }
        }
        Ok(Self {
            setup,
            vm_ns,
            up_ns,
            device: port.device.clone(),
            vm_mac: port.mac.0,
            sender,
            ipt,
            sg,
            _pins: pins,
            topo,
        })
    }

    /// Makes the node enforce `m`; returns the rules ahead of the match rule in the port's
    /// iptables ingress chain (iptables setups).
    fn apply(&mut self, m: &Model) -> Result<Option<usize>> {
        if let Some(ipt) = &self.ipt {
            let opts = RenderOptions::new(HOST);
            ipt.apply(m, &opts)?;
            self.flush_conntrack()?;
            return Ok(Some(match_position(
                &ipt.save(sg_user::model::Ethertype::IPv4)?,
                &self.device,
            )?));
        }
        if let Some(a) = &mut self.sg {
            let compiled = compile::compile(m, HOST);
            a.apply(&compiled)?;
        }
        Ok(None)
    }

    /// sg_to_vm's (run time, run count) so far (counted only while stats are enabled).
    fn prog_stats(&mut self) -> Result<(Duration, u64)> {
        let a = self.sg.as_mut().context("not the sg node")?;
        let info = a.dp.program(sg_common::PROG_TO_VM)?.info()?;
        Ok((info.run_time(), info.run_count()))
    }

    /// One diagnostic run with program statistics on: (ns per packet inside sg_to_vm,
    /// delivered pps), with the port stateful or not.
    fn prog_run(&mut self, d: Duration, stateful: bool) -> Result<(f64, f64)> {
        let dev = self.device.clone();
        let node = self.topo.node.0.clone();
        let ifindex = netns::run_in(Some(&node), move || netns::ifindex(&dev))??;
        let set = |a: &mut Applier, on: bool| -> Result<()> {
            let mut info = a.dp.ports()?.get(&ifindex, 0)?;
            if on {
                info.flags |= sg_common::PORT_F_STATEFUL;
            } else {
                info.flags &= !sg_common::PORT_F_STATEFUL;
            }
            a.dp.ports()?.insert(ifindex, info, 0)?;
            Ok(())
        };
        set(self.sg.as_mut().context("not the sg node")?, stateful)?;
        let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)?;
        let (t0, c0) = self.prog_stats()?;
        let (_, pps, _) = self.udp(MATCH_PORT, d, u64::MAX)?;
        let (t1, c1) = self.prog_stats()?;
        drop(stats);
        set(self.sg.as_mut().context("not the sg node")?, true)?;
        Ok(((t1 - t0).as_nanos() as f64 / (c1 - c0).max(1) as f64, pps))
    }

    fn flush_conntrack(&self) -> Result<()> {
        if self.ipt.is_some() {
            run("ip", &["netns", "exec", &self.topo.node.0, "conntrack", "-F"])?;
        }
        Ok(())
    }

    fn flow(&self, dport: u16) -> Flow {
        Flow {
            src_mac: REMOTE_MAC,
            dst_mac: self.vm_mac,
            src_net: [203, 0, 113],
            first_host: 100,
            dst: [203, 0, 113, 10],
            dport,
        }
    }

    fn rx(&self) -> Result<u64> {
        let out = run(
            "ip",
            &["-n", &self.vm_ns, "-j", "-s", "link", "show", "dev", "eth0"],
        )?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        v[0]["stats64"]["rx"]["packets"]
            .as_u64()
            .context("rx packets of the VM's eth0")
    }

    /// Sends `duration` (or `max` frames) of new flows to `dport`: (offered pps, delivered
    /// pps, frames delivered).
    fn udp(&mut self, dport: u16, duration: Duration, max: u64) -> Result<(f64, f64, u64)> {
        self.flush_conntrack()?;
        let flow = self.flow(dport);
        let before = self.rx()?;
        let sent = self.sender.run(&flow, duration, max)?;
        // Everything is forwarded on the sender's CPU before sendmmsg returns; give stragglers
        // that went through the backlog a moment.
        std::thread::sleep(Duration::from_millis(20));
        let delivered = self.rx()? - before;
        let secs = sent.elapsed.as_secs_f64();
        Ok((sent.pps(), delivered as f64 / secs, delivered))
    }

    /// Checks the filter: a burst the rules deny is dropped, one they admit is delivered.
    fn check(&mut self) -> Result<()> {
        const N: u64 = 2_000;
        let (_, _, denied) = self.udp(DENY_PORT, Duration::from_secs(5), N)?;
        let (_, _, allowed) = self.udp(MATCH_PORT, Duration::from_secs(5), N)?;
        let want_denied = if self.setup == Setup::Unfiltered { N } else { 0 };
        ensure!(
            denied == want_denied && allowed == N,
            "{}: {denied} of {N} frames to UDP {DENY_PORT} and {allowed} of {N} to UDP {MATCH_PORT} \
             delivered (expected {want_denied} and {N})",
            self.setup.name()
        );
        Ok(())
    }

    fn addresses(&self, on: bool) -> Result<()> {
        let op = if on { "add" } else { "del" };
        run(
            "ip",
            &[
                "-n",
                &self.vm_ns,
                "addr",
                op,
                &format!("{VM_IP}/24"),
                "dev",
                "eth0",
            ],
        )?;
        run(
            "ip",
            &[
                "-n",
                &self.up_ns,
                "addr",
                op,
                &format!("{UPLINK_IP}/24"),
                "dev",
                "eth0",
            ],
        )?;
        Ok(())
    }

    /// One iperf3 stream from the uplink to the VM: bits per second the VM received.
    fn tcp(&self, seconds: u32) -> Result<f64> {
        let server = Server::start(&self.up_ns)?;
        let out = run(
            "ip",
            &[
                "netns",
                "exec",
                &self.vm_ns,
                "iperf3",
                "-c",
                UPLINK_IP,
                "-R",
                "-J",
                "-t",
                &seconds.to_string(),
                "--connect-timeout",
                "3000",
            ],
        )
        .with_context(|| format!("iperf3 through the {} node", self.setup.name()))?;
        drop(server);
        let v: serde_json::Value = serde_json::from_str(&out)?;
        v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .context("iperf3 result")
    }
}

/// `iperf3 -s -1` in a namespace, killed on drop.
struct Server(Child);

impl Server {
    fn start(ns: &str) -> Result<Self> {
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "iperf3", "-s", "-1", "-B", UPLINK_IP])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 -s")?;
        let s = Self(child);
        // Listening once ss shows the socket.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let out = run("ip", &["netns", "exec", ns, "ss", "-ltnH", "sport", "= :5201"])?;
            if !out.trim().is_empty() {
                return Ok(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!("iperf3 server did not start in {ns}")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The number of rules ahead of the match rule in the port's ingress chain
/// (`neutron-linuxbri-i<tap[3:13]>`), failing unless the match rule is the last rule before
/// the INVALID drop.
fn match_position(save: &str, device: &str) -> Result<usize> {
    // Neutron's chain name: wrap, then (direction letter + tap name without "tap")[:11].
    let short: String = format!("i{}", &device[3..]).chars().take(11).collect();
    let chain = format!("neutron-linuxbri-{short}");
    let prefix = format!("-A {chain} ");
    let rules: Vec<&str> = save.lines().filter(|l| l.starts_with(&prefix)).collect();
    let pos = rules
        .iter()
        .position(|r| r.contains("203.0.113.0/24") && r.contains(&format!("--dport {MATCH_PORT}")))
        .with_context(|| format!("no match rule in {chain}:\n{}", rules.join("\n")))?;
    let next = rules.get(pos + 1).copied().unwrap_or_default();
    ensure!(
        next.contains("INVALID"),
        "the match rule is not the last rule of {chain}: next is {next}"
    );
    Ok(pos)
}

pub struct Config {
    pub udp_rounds: usize,
    pub udp_seconds: f64,
    pub tcp_rounds: usize,
    pub tcp_seconds: u32,
}

pub fn run_all(cfg: &Config) -> Result<Results> {
    let m0 = model(RULES[0])?;
    let mut nodes: Vec<Node> = SETUPS
        .iter()
        .enumerate()
        .map(|(i, s)| Node::new(*s, &m0, i))
        .collect::<Result<_>>()?;
    let mut res = Results {
        udp_seconds: cfg.udp_seconds,
        tcp_seconds: cfg.tcp_seconds,
        offered: vec![vec![Vec::new(); RULES.len()]; SETUPS.len()],
        delivered: vec![vec![Vec::new(); RULES.len()]; SETUPS.len()],
        tcp: vec![vec![Vec::new(); RULES.len()]; SETUPS.len()],
        chain_rules: Vec::new(),
        sg_prog_ns: Vec::new(),
        sg_prog_ns_stateless: Vec::new(),
        sg_stateless_pps: Vec::new(),
    };
    for (r, n) in RULES.iter().enumerate() {
        let m = model(*n)?;
        let mut chain = 0;
        for node in &mut nodes {
            if let Some(p) = node.apply(&m)? {
                chain = p;
            }
            node.check()?;
        }
        res.chain_rules.push(chain);
        eprintln!("  {n} rules: {chain} rules ahead of the match rule in the iptables chain");
        for _ in 0..cfg.udp_rounds {
            for (s, node) in nodes.iter_mut().enumerate() {
                let (offered, delivered, _) =
                    node.udp(MATCH_PORT, Duration::from_secs_f64(cfg.udp_seconds), u64::MAX)?;
                res.offered[s][r].push(offered);
                res.delivered[s][r].push(delivered);
            }
        }
        // Diagnostics, after the measured runs: the time spent inside sg_to_vm per packet
        // on this very path (BPF_ENABLE_STATS costs two clock reads per run, so it stays off
        // during the measured runs), for the port as measured (stateful) and for the same
        // port made stateless by flipping PORT_F_STATEFUL in its SG_PORTS entry for one run:
        // the difference is the cost of creating a conntrack entry per new flow.
        {
            let sg = nodes
                .iter_mut()
                .find(|n| n.setup == Setup::Sg)
                .context("sg node")?;
            let d = Duration::from_secs_f64(cfg.udp_seconds);
            let (ns, _) = sg.prog_run(d, true)?;
            res.sg_prog_ns.push(ns);
            let (ns, pps) = sg.prog_run(d, false)?;
            res.sg_prog_ns_stateless.push(ns);
            res.sg_stateless_pps.push(pps);
        }
        for node in &nodes {
            node.addresses(true)?;
        }
        for _ in 0..cfg.tcp_rounds {
            for (s, node) in nodes.iter().enumerate() {
                res.tcp[s][r].push(node.tcp(cfg.tcp_seconds)?);
            }
        }
        for node in &nodes {
            node.addresses(false)?;
        }
        for (s, setup) in SETUPS.iter().enumerate() {
            eprintln!(
                "  {n} rules, {} (sg prog {:.0} ns): udp delivered {:?} kpps, tcp {:?} Gbit/s",
                setup.name(),
                res.sg_prog_ns[r],
                res.delivered[s][r]
                    .iter()
                    .map(|x| (x / 1e3).round())
                    .collect::<Vec<_>>(),
                res.tcp[s][r]
                    .iter()
                    .map(|x| (x / 1e7).round() / 100.0)
                    .collect::<Vec<_>>()
            );
        }
    }
    Ok(res)
}
