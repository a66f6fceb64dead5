//! §1 Classifier cost: BPF_PROG_TEST_RUN of the real programs on the maps the real compiler
//! and applier wrote, against the pass-through program.
//!
//! One node with five ports, holding 1, 10, 100, 1,000 and 10,000 ingress rules (policy.rs),
//! compiled together with a remote group of 1,000 members and an address group, applied by the
//! agent's applier to a private pin root, the taps being dummy interfaces in a private
//! namespace. Every measurement runs one frame `repeat` times in the kernel (the kernel's
//! average per run); every frame's verdict and reason are checked before and after.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::{EbpfLoader, TestRun as _, TestRunOptions, programs::SchedClassifier};
use serde::{Deserialize, Serialize};
use sg_common::*;
use sg_user::{
    agent::apply::Applier,
    compile,
    datapath::{Datapath, LoadOptions, PASSTHRU_OBJECT},
    netns,
    packet::{Frame, IpPacket, L4, Mac, TCP_ACK, TCP_SYN},
};

use crate::{
    env::{Ns, PinRoot, tag},
    policy::{self, DENY_PORT, Doc, HOST, MATCH_PORT},
};

pub const RULES: [usize; 5] = [1, 10, 100, 1_000, 10_000];
const PEERS: usize = 1_000;
const GW_MAC: Mac = [0xfa, 0x16, 0x3e, 0xff, 0, 1];
const REMOTE: &str = "203.0.113.7";
// struct __sk_buff as BPF_PROG_TEST_RUN takes it: its size and the ifindex field.
const SKB_CTX_LEN: usize = 192;
const SKB_IFINDEX_OFF: usize = 40;

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Case {
    Established,
    NewAllowed,
    NewDenied,
    Spoofed,
    Unmanaged,
}

pub const CASES: [Case; 5] = [
    Case::Established,
    Case::NewAllowed,
    Case::NewDenied,
    Case::Spoofed,
    Case::Unmanaged,
];

impl Case {
    pub fn title(self) -> &'static str {
        match self {
            Case::Established => "established flow (TCP ACK towards the VM)",
            Case::NewAllowed => "new flow allowed (UDP to the VM, last rule)",
            Case::NewDenied => "new flow denied (UDP to the VM, no rule)",
            Case::Spoofed => "spoofed source (UDP from the VM)",
            Case::Unmanaged => "frame on an unmanaged interface",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Case::Established => "established",
            Case::NewAllowed => "new allowed",
            Case::NewDenied => "new denied",
            Case::Spoofed => "spoofed",
            Case::Unmanaged => "unmanaged",
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Results {
    pub repeat: u32,
    pub rounds: usize,
    /// ns per run: `[case][rules index][round]`.
    pub cost: Vec<Vec<Vec<f64>>>,
    /// The floor measured just before each case: `[case][round]`.
    pub floor: Vec<Vec<f64>>,
    /// Distinct new flows (a new 5-tuple each, conntrack miss and insert), repeat 1,
    /// averaged over `distinct_flows` frames: `[rules index][round]`, and its floor.
    pub distinct: Vec<Vec<f64>>,
    pub distinct_floor: Vec<f64>,
    pub distinct_flows: usize,
    /// SG_CLASSES and SG_SERVICES entries of each port's policy.
    pub entries: Vec<(usize, usize)>,
    pub compile_s: f64,
    pub apply_s: f64,
}

struct Target {
    ifindex: u32,
    mac: Mac,
    ip: String,
    match_rule: u32,
}

pub fn run(rounds: usize, repeat: u32, distinct_flows: usize) -> Result<Results> {
    ensure!(
        repeat >= 1_000_000,
        "the classifier is measured with repeat >= 1,000,000"
    );
    let mut doc = Doc::new();
    let mut ids = Vec::new();
    for (i, n) in RULES.iter().enumerate() {
        let g = format!("g{n}");
        doc.group(&g, policy::ingress_rules(&g, *n, 0));
        ids.push(doc.local_port(&policy::local_ip(i), &[&g]));
    }
    doc.peers(PEERS);
    let model = doc.model()?;
    let ns = Ns::new(tag("cls"))?;
    let ports: Vec<(String, String, String, Mac)> = model
        .local_ports(HOST)
        .iter()
        .map(|p| {
            (
                p.id.clone(),
                p.device.clone(),
                p.fixed_ips[0].ip_address.to_string(),
                p.mac.0,
            )
        })
        .collect();
    let mut batch = String::new();
    // Taps: veth pairs (this kernel has no dummy driver), both ends in the namespace.
    for (i, (_, dev, _, _)) in ports.iter().enumerate() {
        batch.push_str(&format!(
            "link add {dev} type veth peer name vm{i}\nlink set {dev} up\nlink set vm{i} up\n"
        ));
    }
    ns.ip_batch(&batch)?;
    let pins = PinRoot::new("cls");
    let pin_path = pins.0.clone();
    let out = netns::run_in(Some(&ns.0), move || -> Result<Results> {
        let dp = Datapath::load(&LoadOptions {
            pin_root: Some(pin_path),
            ..Default::default()
        })?;
        let mut applier = Applier::adopt(dp, None, None)?;
        let t = Instant::now();
        let compiled = compile::compile(&model, HOST);
        let compile_s = t.elapsed().as_secs_f64();
        let links: BTreeMap<String, u32> = ports
            .iter()
            .map(|(_, dev, _, _)| Ok((dev.clone(), netns::ifindex(dev)?)))
            .collect::<Result<_>>()?;
        let t = Instant::now();
        applier.apply(&compiled)?;
        let apply_s = t.elapsed().as_secs_f64();
        let rules = applier.run_state(0).rules;
        let mut targets = Vec::new();
        let mut entries = Vec::new();
        for (n, id) in RULES.iter().zip(&ids) {
            let (_, dev, ip, mac) = ports.iter().find(|p| &p.0 == id).context("port")?;
            let match_rule = rules
                .iter()
                .find(|r| r.rule_id == format!("g{n}-match"))
                .context("match rule")?
                .index;
            targets.push(Target {
                ifindex: links[dev],
                mac: *mac,
                ip: ip.clone(),
                match_rule,
            });
            let cp = compiled
                .ports
                .iter()
                .find(|p| &p.id == id)
                .context("compiled port")?;
            let pol = &compiled.policies[cp.info.policy as usize - 1];
            entries.push((pol.classes.len(), pol.services.len()));
        }
        let mut floor_prog = Passthru::load()?;
        let mut dp = applier.dp;
        let mut cost = vec![vec![Vec::new(); RULES.len()]; CASES.len()];
        let mut floor = vec![Vec::new(); CASES.len()];
        let mut distinct = vec![Vec::new(); RULES.len()];
        let mut distinct_floor = Vec::new();
        for round in 0..rounds {
            dp.clear_flows()?;
            for t in &targets {
                establish(&mut dp, t)?;
            }
            for (c, case) in CASES.iter().enumerate() {
                let f = frame(*case, &targets[0]);
                floor[c].push(floor_prog.run(&f, repeat)?.as_nanos() as f64);
                for (i, t) in targets.iter().enumerate() {
                    cost[c][i].push(measure(&mut dp, *case, t, repeat)?.as_nanos() as f64);
                }
            }
            let f = frame(Case::NewAllowed, &targets[0]);
            let mut total = Duration::ZERO;
            for _ in 0..distinct_flows {
                total += floor_prog.run(&f, 1)?;
            }
            distinct_floor.push(total.as_nanos() as f64 / distinct_flows as f64);
            for (i, t) in targets.iter().enumerate() {
                distinct[i].push(distinct_new_flows(&mut dp, t, round, distinct_flows)?);
            }
        }
        Ok(Results {
            repeat,
            rounds,
            cost,
            floor,
            distinct,
            distinct_floor,
            distinct_flows,
            entries,
            compile_s,
            apply_s,
        })
    })??;
    drop(pins);
    drop(ns);
    Ok(out)
}

fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> IpPacket {
    IpPacket::new(
        src.parse().unwrap(),
        dst.parse().unwrap(),
        L4::Udp { sport, dport },
    )
}

fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> IpPacket {
    IpPacket::new(
        src.parse().unwrap(),
        dst.parse().unwrap(),
        L4::Tcp {
            sport,
            dport,
            flags,
            seq: 1,
            ack: 1,
        },
    )
}

fn to_vm(t: &Target, p: IpPacket) -> Vec<u8> {
    Frame::ip(GW_MAC, t.mac, p).build()
}

fn from_vm(t: &Target, p: IpPacket) -> Vec<u8> {
    Frame::ip(t.mac, GW_MAC, p).build()
}

/// The frame of a case for a port.
fn frame(case: Case, t: &Target) -> Vec<u8> {
    match case {
        Case::Established => to_vm(t, tcp("192.0.2.10", 443, &t.ip, 50000, TCP_ACK)),
        Case::NewAllowed | Case::Unmanaged => to_vm(t, udp(REMOTE, 40000, &t.ip, MATCH_PORT)),
        Case::NewDenied => to_vm(t, udp(REMOTE, 40000, &t.ip, DENY_PORT)),
        Case::Spoofed => from_vm(t, udp("10.99.99.99", 40000, REMOTE, 53)),
    }
}

/// The flow the established case belongs to: opened by the VM (Neutron's default egress rule).
fn establish(dp: &mut Datapath, t: &Target) -> Result<()> {
    let syn = from_vm(t, tcp(&t.ip, 50000, "192.0.2.10", 443, TCP_SYN));
    expect(dp, PROG_FROM_VM, &syn, t.ifindex, REASON_ALLOW_RULE, None)?;
    let synack = to_vm(t, tcp("192.0.2.10", 443, &t.ip, 50000, TCP_SYN | TCP_ACK));
    expect(dp, PROG_TO_VM, &synack, t.ifindex, REASON_ALLOW_ESTABLISHED, None)
}

fn expect(
    dp: &mut Datapath,
    prog: &str,
    f: &[u8],
    ifindex: u32,
    reason: u8,
    rule: Option<u32>,
) -> Result<()> {
    let (v, rec) = dp.trace_run(prog, f, ifindex)?;
    let want = if reason_allows(reason) {
        TC_ACT_UNSPEC
    } else {
        TC_ACT_SHOT
    };
    if rec.reason != reason || v != want || rule.is_some_and(|r| r != rec.rule) {
        bail!(
            "{prog} on ifindex {ifindex}: expected {} (rule {rule:?}), got {} (rule {}, verdict {v})",
            reason_name(reason),
            reason_name(rec.reason),
            rec.rule
        );
    }
    Ok(())
}

fn check(dp: &mut Datapath, case: Case, t: &Target) -> Result<()> {
    let f = frame(case, t);
    match case {
        Case::Established => expect(dp, PROG_TO_VM, &f, t.ifindex, REASON_ALLOW_ESTABLISHED, None),
        Case::NewAllowed => expect(
            dp,
            PROG_TO_VM,
            &f,
            t.ifindex,
            REASON_ALLOW_RULE,
            Some(t.match_rule),
        ),
        Case::NewDenied => expect(dp, PROG_TO_VM, &f, t.ifindex, REASON_DROP_NO_RULE, None),
        Case::Spoofed => expect(dp, PROG_FROM_VM, &f, t.ifindex, REASON_DROP_SPOOF_IP, None),
        Case::Unmanaged => {
            // Loopback has no SG_PORTS entry: the program passes it without a trace record.
            let v = dp.test_run(PROG_TO_VM, &f, 1, 0)?;
            ensure!(v == TC_ACT_UNSPEC, "unmanaged interface: verdict {v}");
            Ok(())
        }
    }
}

fn measure(dp: &mut Datapath, case: Case, t: &Target, repeat: u32) -> Result<Duration> {
    check(dp, case, t)?;
    let (prog, ifindex) = match case {
        Case::Spoofed => (PROG_FROM_VM, t.ifindex),
        Case::Unmanaged => (PROG_TO_VM, 1),
        _ => (PROG_TO_VM, t.ifindex),
    };
    let d = dp.test_run_repeat(prog, &frame(case, t), ifindex, 0, repeat)?.1;
    check(dp, case, t)?;
    Ok(d)
}

/// Average kernel time of `n` UDP frames that each start a new flow (repeat 1 each).
fn distinct_new_flows(dp: &mut Datapath, t: &Target, round: usize, n: usize) -> Result<f64> {
    let src = format!("203.0.113.{}", 10 + round % 200);
    let frames: Vec<Vec<u8>> = (0..n)
        .map(|i| to_vm(t, udp(&src, 1024 + (i % 60000) as u16, &t.ip, MATCH_PORT)))
        .collect();
    let before = dp.conntrack()?.keys().count();
    let mut total = Duration::ZERO;
    for f in &frames {
        let (v, d) = dp.test_run_repeat(PROG_TO_VM, f, t.ifindex, 0, 1)?;
        ensure!(v == TC_ACT_UNSPEC, "a distinct new flow was dropped");
        total += d;
    }
    let after = dp.conntrack()?.keys().count();
    ensure!(
        after >= before + n.min(60000),
        "every distinct frame created a flow ({before} → {after})"
    );
    Ok(total.as_nanos() as f64 / n as f64)
}

/// The floor: sg_passthru, its own object.
struct Passthru {
    ebpf: aya::Ebpf,
}

impl Passthru {
    fn load() -> Result<Self> {
        let mut ebpf = EbpfLoader::new().load(PASSTHRU_OBJECT)?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut("sg_passthru")
            .context("sg_passthru in the object")?
            .try_into()?;
        prog.load()?;
        Ok(Self { ebpf })
    }

    fn run(&mut self, frame: &[u8], repeat: u32) -> Result<Duration> {
        let prog: &mut SchedClassifier = self.ebpf.program_mut("sg_passthru").unwrap().try_into()?;
        let mut ctx = [0u8; SKB_CTX_LEN];
        ctx[SKB_IFINDEX_OFF..SKB_IFINDEX_OFF + 4].copy_from_slice(&1u32.to_ne_bytes());
        let mut out = vec![0u8; frame.len() + 256];
        let r = prog.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            repeat,
            ..Default::default()
        })?;
        ensure!(
            r.return_value as i32 == TC_ACT_UNSPEC,
            "pass-through returned {}",
            r.return_value
        );
        Ok(r.duration)
    }
}
