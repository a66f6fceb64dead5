//! Datapath cost per packet, measured with BPF_PROG_TEST_RUN (the kernel runs the program
//! `repeat` times on one frame and reports the average), against a pass-through classifier
//! as the floor. A benchmark, not a test: it prints numbers and ratios, it asserts nothing
//! except that every measured frame gets the decision the case is about.
//!
//! ```sh
//! cargo run --release -p sg-user --example datapath_bench            # as root
//! cargo run --release -p sg-user --example datapath_bench -- 5000000 # repeat count
//! ```
//!
//! Cases, each at 10 and at 10,000 security-group rules on the port:
//! - new flow, stateful: a TCP SYN towards the VM that the policy admits. Repeated, the SYN
//!   finds its own SYN_SENT entry, which is still NEW: conntrack lookup, both policy lookups,
//!   conntrack update, counters.
//! - new flow, stateless: the same SYN on a stateless port: policy only.
//! - established: an ACK of a flow the VM opened: conntrack lookup and update, no policy.
//!
//! The 10,000 rules are TCP rules with distinct remote /24s and ports (10,000 classes and
//! services); the measured packet matches the one in the middle. The machine may be shared:
//! the two rule counts are measured in alternation for several rounds and each case keeps its
//! best round, so that noise from other work lands on neither side in particular.
//!
//! A supplementary line measures distinct new flows (a different source port each time, so
//! every SYN misses conntrack and inserts an entry). TEST_RUN repeats one frame, so these runs
//! use repeat 1 and average the kernel-measured durations, which include one clock read.

use std::time::Duration;

use anyhow::{Context as _, Result};
use aya::{EbpfLoader, TestRun as _, TestRunOptions, programs::SchedClassifier};
use sg_common::*;
use sg_user::{
    datapath::{
        Datapath, LoadOptions,
        fixture::{self, PortSpec, Rule},
    },
    packet::{Frame, IpPacket, L4, TCP_ACK, TCP_SYN},
};

static PASSTHRU: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sg-passthru"));

const IF: u32 = 1; // loopback: TEST_RUN needs an existing device
const VM_MAC: [u8; 6] = [0xfa, 0x16, 0x3e, 0, 0, 5];
const GW_MAC: [u8; 6] = [0xfa, 0x16, 0x3e, 0, 0, 1];
const VM4: &str = "10.0.0.5";

const ROUNDS: usize = 5;
const DISTINCT_FLOWS: u16 = 20_000;

fn main() -> Result<()> {
    let repeat: u32 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()
        .context("repeat count")?
        .unwrap_or(1_000_000);
    anyhow::ensure!(repeat >= 1_000_000, "measure with repeat >= 1,000,000");
    let mut floor_env = Passthru::load()?;
    let mut small = Bench::new(10)?;
    let mut large = Bench::new(10_000)?;
    let (mut floor, mut s, mut l) = (Duration::MAX, Costs::worst(), Costs::worst());
    for _ in 0..ROUNDS {
        floor = floor.min(floor_env.run(repeat)?);
        s = s.min(&small.run(repeat)?);
        l = l.min(&large.run(repeat)?);
    }
    let (s_new, l_new) = (small.distinct_new_flows()?, large.distinct_new_flows()?);

    println!(
        "BPF_PROG_TEST_RUN, repeat {repeat}, ns per packet (kernel average), best of {ROUNDS} \
         alternating rounds\n"
    );
    println!("| case | 10 rules | 10,000 rules | 10k / 10 | 10 rules − floor | 10k rules − floor |");
    println!("|---|---:|---:|---:|---:|---:|");
    println!("| pass-through (floor) | {} | {} | | | |", ns(floor), ns(floor));
    for (name, a, b) in [
        (
            "new flow, stateful (SYN, admitted)",
            s.new_stateful,
            l.new_stateful,
        ),
        (
            "new flow, stateless (SYN, admitted)",
            s.new_stateless,
            l.new_stateless,
        ),
        ("established (ACK of a flow)", s.established, l.established),
    ] {
        row(name, a, b, floor);
    }
    println!("\nSupplementary, repeat 1 over {DISTINCT_FLOWS} distinct flows (conntrack miss + insert):\n");
    row("new flow, stateful, distinct SYNs", s_new, l_new, floor);
    println!(
        "\nSG_SERVICES entries written: {} (10 rules), {} (10,000 rules)",
        small.services, large.services
    );
    Ok(())
}

fn row(name: &str, a: Duration, b: Duration, floor: Duration) {
    println!(
        "| {name} | {} | {} | {:.2}× | {} | {} |",
        ns(a),
        ns(b),
        b.as_nanos() as f64 / a.as_nanos().max(1) as f64,
        ns(a.saturating_sub(floor)),
        ns(b.saturating_sub(floor)),
    );
}

fn ns(d: Duration) -> String {
    format!("{}", d.as_nanos())
}

#[derive(Clone, Copy)]
struct Costs {
    new_stateful: Duration,
    new_stateless: Duration,
    established: Duration,
}

impl Costs {
    fn worst() -> Self {
        Self {
            new_stateful: Duration::MAX,
            new_stateless: Duration::MAX,
            established: Duration::MAX,
        }
    }

    fn min(&self, o: &Costs) -> Costs {
        Costs {
            new_stateful: self.new_stateful.min(o.new_stateful),
            new_stateless: self.new_stateless.min(o.new_stateless),
            established: self.established.min(o.established),
        }
    }
}

/// Rule i admits TCP to port 1000 + i from 10.(i / 256).(i % 256).0/24; the last rule lets
/// everything out.
fn rules(n: u32) -> Vec<Rule> {
    let mut r: Vec<Rule> = (0..n)
        .map(|i| {
            Rule::ingress_v4()
                .tcp(1000 + i as u16, 1000 + i as u16)
                .remote(&format!("10.{}.{}.0/24", (i >> 8) & 0xff, i & 0xff))
        })
        .collect();
    r.push(Rule::egress_v4());
    r
}

fn frame(src: &str, sport: u16, dst: &str, dport: u16, flags: u8, to_vm: bool) -> Vec<u8> {
    let p = IpPacket::new(
        src.parse().unwrap(),
        dst.parse().unwrap(),
        L4::Tcp {
            sport,
            dport,
            flags,
            seq: 1,
            ack: 1,
        },
    );
    let (s, d) = if to_vm { (GW_MAC, VM_MAC) } else { (VM_MAC, GW_MAC) };
    Frame::ip(s, d, p).build()
}

/// One loaded datapath with one port and `n` rules.
struct Bench {
    n: u32,
    dp: Datapath,
    port: PortSpec,
    services: usize,
    syn: Vec<u8>,
    in_ack: Vec<u8>,
    remote: String,
}

impl Bench {
    fn new(n: u32) -> Result<Self> {
        let mut dp = Datapath::load(&LoadOptions::default())?;
        let port = PortSpec::new(IF, 1, VM_MAC).fixed_ip(VM4).stateful();
        let services = fixture::install_policy(&mut dp, 1, &rules(n))?;
        fixture::install_port(&mut dp, &port, 1)?;
        let k = n / 2;
        let remote = format!("10.{}.{}.5", (k >> 8) & 0xff, k & 0xff);
        let syn = frame(&remote, 40000, VM4, 1000 + k as u16, TCP_SYN, true);
        let mut b = Self {
            n,
            dp,
            port,
            services,
            syn,
            in_ack: frame("192.0.2.10", 443, VM4, 50000, TCP_ACK, true),
            remote,
        };
        // A flow the VM opened, whose ACKs towards the VM are the established case.
        b.expect(
            PROG_FROM_VM,
            &frame(VM4, 50000, "192.0.2.10", 443, TCP_SYN, false),
            REASON_ALLOW_RULE,
        )?;
        b.expect(
            PROG_TO_VM,
            &frame("192.0.2.10", 443, VM4, 50000, TCP_SYN | TCP_ACK, true),
            REASON_ALLOW_ESTABLISHED,
        )?;
        Ok(b)
    }

    fn expect(&mut self, prog: &str, f: &[u8], reason: u8) -> Result<()> {
        let (v, t) = self.dp.trace_run(prog, f, IF)?;
        let want = if reason_allows(reason) {
            TC_ACT_UNSPEC
        } else {
            TC_ACT_SHOT
        };
        anyhow::ensure!(
            t.reason == reason && v == want,
            "{} rules: expected {}, got {} (verdict {v})",
            self.n,
            reason_name(reason),
            reason_name(t.reason)
        );
        Ok(())
    }

    fn set_stateful(&mut self, on: bool) -> Result<()> {
        self.port.stateful = on;
        fixture::set_policy(&mut self.dp, &self.port, 1)
    }

    fn measure(&mut self, prog: &str, f: &[u8], reason: u8, repeat: u32) -> Result<Duration> {
        self.expect(prog, f, reason)?;
        let d = self.dp.test_run_repeat(prog, f, IF, 0, repeat)?.1;
        self.expect(prog, f, reason)?;
        Ok(d)
    }

    fn run(&mut self, repeat: u32) -> Result<Costs> {
        let (syn, ack) = (self.syn.clone(), self.in_ack.clone());
        self.set_stateful(true)?;
        let new_stateful = self.measure(PROG_TO_VM, &syn, REASON_ALLOW_RULE, repeat)?;
        let established = self.measure(PROG_TO_VM, &ack, REASON_ALLOW_ESTABLISHED, repeat)?;
        self.set_stateful(false)?;
        let new_stateless = self.measure(PROG_TO_VM, &syn, REASON_ALLOW_RULE, repeat)?;
        self.set_stateful(true)?;
        Ok(Costs {
            new_stateful,
            new_stateless,
            established,
        })
    }

    /// Average kernel-measured time of DISTINCT_FLOWS SYNs that each start a new flow.
    fn distinct_new_flows(&mut self) -> Result<Duration> {
        self.set_stateful(true)?;
        self.dp.clear_flows()?;
        let k = self.n / 2;
        let mut total = Duration::ZERO;
        for sport in 1..=DISTINCT_FLOWS {
            let f = frame(&self.remote, sport, VM4, 1000 + k as u16, TCP_SYN, true);
            total += self.dp.test_run_repeat(PROG_TO_VM, &f, IF, 0, 1)?.1;
        }
        let entries = self.dp.conntrack()?.keys().count();
        anyhow::ensure!(
            entries >= DISTINCT_FLOWS as usize,
            "every SYN created a flow ({entries})"
        );
        Ok(total / DISTINCT_FLOWS as u32)
    }
}

/// The floor: sg_passthru from its own object.
struct Passthru {
    ebpf: aya::Ebpf,
    frame: Vec<u8>,
}

impl Passthru {
    fn load() -> Result<Self> {
        let mut ebpf = EbpfLoader::new().load(PASSTHRU)?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut("sg_passthru")
            .context("sg_passthru in the object")?
            .try_into()?;
        prog.load()?;
        Ok(Self {
            ebpf,
            frame: frame("192.0.2.10", 443, VM4, 50000, TCP_ACK, true),
        })
    }

    fn run(&mut self, repeat: u32) -> Result<Duration> {
        let prog: &mut SchedClassifier = self.ebpf.program_mut("sg_passthru").unwrap().try_into()?;
        let mut ctx = [0u8; 192];
        ctx[40..44].copy_from_slice(&IF.to_ne_bytes());
        let mut out = vec![0u8; self.frame.len() + 256];
        let r = prog.test_run(TestRunOptions {
            data_in: Some(&self.frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            repeat,
            ..Default::default()
        })?;
        anyhow::ensure!(
            r.return_value as i32 == TC_ACT_UNSPEC,
            "pass-through returned {}",
            r.return_value
        );
        Ok(r.duration)
    }
}
