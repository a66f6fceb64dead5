//! §5 Observability (issue 15): what the security-group log, `sg monitor` and `sg debug` cost
//! when they are off and when the log is on, and how long a `/metrics` scrape takes.
//!
//! 1. Classifier, everything off: this build against the datapath before issue 15 (built from
//!    git at `--observe-baseline`, default the last commit without it), BPF_PROG_TEST_RUN of the
//!    same frames on the same compiled maps, interleaved round by round.
//! 2. Logging on: the same policy on two ports, one covered by a network log (event ALL): the
//!    cost of allowed traffic on the logged port against the unlogged one, and a drop flood on
//!    the logged port: events per second the datapath let through its token bucket.
//! 3. Scrape: `/metrics` rendered from the pinned maps of the 200 ports × 422 rules node
//!    (counters on every port, a conntrack table of 20,000 flows) while another thread applies
//!    a changing input in a loop.

use std::{
    collections::BTreeMap,
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use sg_common::*;
use sg_user::{
    agent::apply::Applier,
    compile,
    datapath::{Datapath, LoadOptions},
    netns,
    observe::{self, metrics::Metrics},
    packet::{Frame, IpPacket, L4, Mac, TCP_ACK, TCP_SYN},
};

use crate::{
    control::node_doc,
    env::{Ns, PinRoot, tag},
    policy::{self, DENY_PORT, Doc, HOST, MATCH_PORT},
};

/// The datapath before issue 15: main when it was last merged into this branch.
pub const DEFAULT_BASELINE: &str = "96802af";
const GW_MAC: Mac = [0xfa, 0x16, 0x3e, 0xff, 0, 1];
const REMOTE: &str = "203.0.113.7";

#[derive(Debug, Serialize, Deserialize, Default)]
pub struct Results {
    pub baseline_rev: String,
    pub repeat: u32,
    /// ns per packet, `[case][round]`, this build with everything off and the baseline.
    pub off: Vec<Vec<f64>>,
    pub baseline: Vec<Vec<f64>>,
    /// ns per packet on the logged port and on the unlogged one, `[case][round]`.
    pub logged: Vec<Vec<f64>>,
    pub unlogged: Vec<Vec<f64>>,
    /// Drop flood on the logged port: (packets, seconds, events admitted, refused), per round.
    pub flood: Vec<(u64, f64, u64, u64)>,
    /// The flood's denied packet on the unlogged port and on the logged one: ns per packet,
    /// per round.
    #[serde(default)]
    pub flood_unlogged: Vec<f64>,
    #[serde(default)]
    pub flood_logged: Vec<f64>,
    pub rate_limit: u32,
    pub burst_limit: u32,
    /// Scrape durations (s) while applies ran, how many applies ran meanwhile, series exported.
    pub scrapes: Vec<f64>,
    pub applies_during: usize,
    pub series: usize,
}

pub const CASES: [&str; 3] = [
    "established (TCP ACK to the VM)",
    "new flow allowed (UDP)",
    "new flow denied (UDP)",
];

/// Builds the baseline datapath object at `rev` (from `git archive`, into target/), once.
pub fn baseline_object(root: &Path, rev: &str) -> Result<Vec<u8>> {
    let dir = root.join("target/bench-baseline").join(rev);
    let obj = dir.join("target/bpfel-unknown-none/release/sg");
    if !obj.exists() {
        let src = dir.join("src");
        std::fs::create_dir_all(&src)?;
        let archive = Command::new("git")
            .args(["archive", "--format=tar", rev])
            .current_dir(root)
            .output()
            .context("git archive")?;
        ensure!(
            archive.status.success(),
            "git archive {rev}: {}",
            String::from_utf8_lossy(&archive.stderr)
        );
        let mut tar = Command::new("tar")
            .args(["-x", "-C"])
            .arg(&src)
            .stdin(std::process::Stdio::piped())
            .spawn()?;
        use std::io::Write as _;
        tar.stdin.take().unwrap().write_all(&archive.stdout)?;
        ensure!(tar.wait()?.success(), "tar -x");
        eprintln!("    building the baseline datapath at {rev} (once)");
        let st = Command::new("cargo")
            .args([
                "+nightly",
                "build",
                "--package",
                "sg-ebpf",
                "--bins",
                "--release",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
            ])
            .current_dir(&src)
            .env("CARGO_TARGET_DIR", dir.join("target"))
            // As aya-build does it for sg-user/build.rs.
            .env(
                "CARGO_ENCODED_RUSTFLAGS",
                "--cfg=bpf_target_arch=\"x86_64\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf",
            )
            .env_remove("RUSTC")
            .env_remove("RUSTC_WORKSPACE_WRAPPER")
            .env_remove("RUSTFLAGS")
            .status()?;
        ensure!(st.success(), "building the baseline datapath at {rev}");
        let _ = std::fs::remove_dir_all(&src);
    }
    Ok(std::fs::read(&obj)?)
}

struct Port {
    ifindex: u32,
    mac: Mac,
    ip: String,
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

fn frames(p: &Port) -> [Vec<u8>; 3] {
    [
        Frame::ip(GW_MAC, p.mac, tcp("192.0.2.10", 443, &p.ip, 50000, TCP_ACK)).build(),
        Frame::ip(GW_MAC, p.mac, udp(REMOTE, 40000, &p.ip, MATCH_PORT)).build(),
        Frame::ip(GW_MAC, p.mac, udp(REMOTE, 40000, &p.ip, DENY_PORT)).build(),
    ]
}

const REASONS: [u8; 3] = [REASON_ALLOW_ESTABLISHED, REASON_ALLOW_RULE, REASON_DROP_NO_RULE];

/// Opens the established flow and checks every case's reason.
fn prepare(dp: &mut Datapath, p: &Port) -> Result<()> {
    let syn = Frame::ip(p.mac, GW_MAC, tcp(&p.ip, 50000, "192.0.2.10", 443, TCP_SYN)).build();
    dp.test_run(PROG_FROM_VM, &syn, p.ifindex, 0)?;
    let synack = Frame::ip(
        GW_MAC,
        p.mac,
        tcp("192.0.2.10", 443, &p.ip, 50000, TCP_SYN | TCP_ACK),
    )
    .build();
    dp.test_run(PROG_TO_VM, &synack, p.ifindex, 0)?;
    for (f, r) in frames(p).iter().zip(REASONS) {
        let (_, rec) = dp.trace_run(PROG_TO_VM, f, p.ifindex)?;
        ensure!(
            rec.reason == r,
            "expected {}, got {}",
            reason_name(r),
            reason_name(rec.reason)
        );
    }
    Ok(())
}

fn cost(dp: &mut Datapath, p: &Port, case: usize, repeat: u32) -> Result<f64> {
    Ok(dp
        .test_run_repeat(PROG_TO_VM, &frames(p)[case], p.ifindex, 0, repeat)?
        .1
        .as_nanos() as f64)
}

pub fn run(rounds: usize, repeat: u32, baseline_rev: &str, root: &Path) -> Result<Results> {
    let baseline_obj = baseline_object(root, baseline_rev)?;
    // Two ports with the same 100-rule policy; the second is covered by a network log.
    let mut doc = Doc::new();
    doc.group("g100", policy::ingress_rules("g100", 100, 0));
    let a = doc.local_port(&policy::local_ip(0), &["g100"]);
    let b = doc.local_port(&policy::local_ip(1), &["g100"]);
    let mut v = doc.build();
    v["logs"] = serde_json::json!([{"id": "bench-log", "project_id": "bench", "resource_type": "security_group",
        "target_id": b, "event": "ALL"}]);
    let model = sg_user::model::from_values(vec![("bench".into(), v)]).map_err(|e| anyhow::anyhow!("{e}"))?;
    let ns = Ns::new(tag("obs"))?;
    let devs: Vec<(String, String, Mac)> = model
        .local_ports(HOST)
        .iter()
        .map(|p| (p.id.clone(), p.device.clone(), p.mac.0))
        .collect();
    let mut batch = String::new();
    for (i, (_, dev, _)) in devs.iter().enumerate() {
        batch.push_str(&format!(
            "link add {dev} type veth peer name vm{i}\nlink set {dev} up\n"
        ));
    }
    ns.ip_batch(&batch)?;
    let compiled = compile::compile(&model, HOST);
    let out = netns::run_in(Some(&ns.0), move || -> Result<Results> {
        let links: BTreeMap<String, u32> = devs
            .iter()
            .map(|(_, d, _)| Ok((d.clone(), netns::ifindex(d)?)))
            .collect::<Result<_>>()?;
        let port = |id: &str, i: usize| -> Result<Port> {
            let (_, d, mac) = devs.iter().find(|p| p.0 == id).context("port")?;
            Ok(Port {
                ifindex: links[d],
                mac: *mac,
                ip: policy::local_ip(i),
            })
        };
        let (pa, pb) = (port(&a, 0)?, port(&b, 1)?);
        let mut new = Applier::adopt(Datapath::load(&LoadOptions::default())?, None, None)?;
        new.apply(&compiled)?;
        let old_dp = Datapath::load_object(&baseline_obj, &LoadOptions::default(), 0, |_| Ok(()))?;
        let mut old = Applier::adopt(old_dp, None, None)?;
        // The baseline has no log flags or maps: it gets the input without the log (the
        // unlogged port, the one compared, has the same entry in both).
        let mut plain = compiled.clone();
        for p in &mut plain.ports {
            p.info.flags &= !(PORT_F_LOG_ACCEPT | PORT_F_LOG_DROP);
        }
        old.apply(&plain)?;
        let (mut new, mut old) = (new.dp, old.dp);
        prepare(&mut new, &pa)?;
        prepare(&mut new, &pb)?;
        prepare(&mut old, &pa)?;
        let mut r = Results {
            baseline_rev: baseline_rev.to_string(),
            repeat,
            off: vec![Vec::new(); 3],
            baseline: vec![Vec::new(); 3],
            logged: vec![Vec::new(); 3],
            unlogged: vec![Vec::new(); 3],
            rate_limit: LOG_RATE_LIMIT,
            burst_limit: LOG_BURST_LIMIT,
            ..Default::default()
        };
        let pb_idx = new.ports()?.get(&pb.ifindex, 0)?.port_idx;
        for _ in 0..rounds {
            for c in 0..3 {
                r.baseline[c].push(cost(&mut old, &pa, c, repeat)?);
                r.off[c].push(cost(&mut new, &pa, c, repeat)?);
                // Allowed traffic only: a denied packet on the logged port is an event.
                if c < 2 {
                    r.unlogged[c].push(cost(&mut new, &pa, c, repeat)?);
                    r.logged[c].push(cost(&mut new, &pb, c, repeat)?);
                }
            }
            // The drop flood: every packet is a DROP event candidate. Nothing reads SG_EVENTS
            // here; what the bucket admits is the rate the log would see.
            let before = new.log_limits()?.get(&pb_idx, observe::BPF_F_LOCK)?;
            let t = Instant::now();
            new.test_run_repeat(PROG_TO_VM, &frames(&pb)[2], pb.ifindex, 0, repeat)?;
            let secs = t.elapsed().as_secs_f64();
            let after = new.log_limits()?.get(&pb_idx, observe::BPF_F_LOCK)?;
            // What a log candidate costs: the same denied packet, unlogged and logged.
            r.flood_unlogged.push(cost(&mut new, &pa, 2, repeat)?);
            r.flood_logged.push(cost(&mut new, &pb, 2, repeat)?);
            r.flood.push((
                repeat as u64,
                secs,
                after.admitted - before.admitted,
                after.limited - before.limited,
            ));
        }
        Ok(r)
    })??;
    drop(ns);
    let mut out = out;
    scrape(&mut out, rounds.max(10))?;
    Ok(out)
}

/// §5.3: scrapes of the 200 × 422 node while applies run.
fn scrape(r: &mut Results, scrapes: usize) -> Result<()> {
    let doc = node_doc(200, 400, 21, 20, 1_000);
    let m = doc.model()?;
    let compiled = compile::compile(&m, HOST);
    // The same node with one tenant rule changed: what the apply loop alternates with.
    let mut changed = node_doc(200, 400, 21, 20, 1_000).build();
    changed["security_groups"][3]["security_group_rules"][0]["port_range_min"] = 4001.into();
    changed["security_groups"][3]["security_group_rules"][0]["port_range_max"] = 4001.into();
    let changed = compile::compile(
        &sg_user::model::from_values(vec![("bench".into(), changed)]).map_err(|e| anyhow::anyhow!("{e}"))?,
        HOST,
    );
    let pins = PinRoot::new("scr");
    let ns = Ns::new(tag("scr"))?;
    let devices: Vec<String> = m.local_ports(HOST).iter().map(|p| p.device.clone()).collect();
    let mut batch = String::new();
    for (i, d) in devices.iter().enumerate() {
        batch.push_str(&format!(
            "link add {d} type veth peer name p{i}\nlink set {d} up\n"
        ));
    }
    ns.ip_batch(&batch)?;
    let nsname = ns.0.clone();
    let pin_path = pins.0.clone();
    let first_apply = &compiled;
    let mut applier = netns::run_in(Some(&ns.0), move || -> Result<Applier> {
        let dp = Datapath::load(&LoadOptions {
            pin_root: Some(pin_path),
            ..Default::default()
        })?;
        let mut a = Applier::adopt(dp, Some(nsname), None)?;
        a.apply(first_apply)?;
        Ok(a)
    })??;
    // Counters on every port (four reasons each) and 20,000 flows, as a busy node has.
    let mut view = observe::View::default();
    view.map_entries.extend(applier.lpm_entries());
    for p in applier.ports() {
        view.ports.insert(
            p.port_idx,
            observe::PortView {
                id: p.id.clone(),
                device: p.device.clone(),
                ifindex: p.ifindex,
                enforced: true,
                ..Default::default()
            },
        );
    }
    {
        let mut stats = applier.dp.stats()?;
        let cpus = aya::util::nr_cpus().map_err(|(w, e)| anyhow::anyhow!("{w}: {e}"))?;
        for idx in view.ports.keys() {
            for (dir, reason) in [
                (DIR_INGRESS, REASON_ALLOW_ESTABLISHED),
                (DIR_INGRESS, REASON_DROP_NO_RULE),
                (DIR_EGRESS, REASON_ALLOW_RULE),
                (DIR_EGRESS, REASON_ALLOW_ESTABLISHED),
            ] {
                let k = StatKey {
                    port_idx: *idx,
                    dir,
                    reason,
                    _pad: [0; 2],
                };
                let c = Counter {
                    packets: 1000,
                    bytes: 100_000,
                };
                stats.insert(k, aya::maps::PerCpuValues::try_from(vec![c; cpus])?, 0)?;
            }
        }
        let mut ct = applier.dp.conntrack()?;
        for i in 0..20_000u32 {
            let mut k = CtKey {
                zone: 1 + i % 200,
                family: FAMILY_V4,
                proto: 17,
                ..Default::default()
            };
            k.addr_a[..4].copy_from_slice(&i.to_be_bytes());
            ct.insert(
                k,
                CtVal {
                    expires_ns: u64::MAX,
                    ..Default::default()
                },
                0,
            )?;
        }
    }
    let shared = observe::Shared::default();
    shared.publish(view);
    let metrics = Metrics::new(
        &pins.0,
        shared,
        Arc::new(observe::EventCounters::default()),
        false,
    )?;
    let first = metrics.render()?;
    r.series = first.lines().filter(|l| !l.starts_with('#')).count();

    let stop = Arc::new(AtomicBool::new(false));
    let applies = Arc::new(AtomicUsize::new(0));
    let (s2, a2) = (stop.clone(), applies.clone());
    let ns_name = ns.0.clone();
    let worker = std::thread::spawn(move || -> Result<()> {
        netns::run_in(Some(&ns_name), move || -> Result<()> {
            let mut flip = false;
            while !s2.load(Ordering::Relaxed) {
                applier.apply(if flip { &changed } else { &compiled })?;
                flip = !flip;
                a2.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })?
    });
    // Wait for the applies to be under way, then scrape.
    let t = Instant::now();
    while applies.load(Ordering::Relaxed) == 0 {
        if t.elapsed() > Duration::from_secs(30) {
            bail!("no apply finished in 30 s");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let a0 = applies.load(Ordering::Relaxed);
    for _ in 0..scrapes {
        let t = Instant::now();
        let body = metrics.render()?;
        r.scrapes.push(t.elapsed().as_secs_f64());
        ensure!(
            body.contains("sg_packets_total"),
            "a scrape without packet counters"
        );
    }
    r.applies_during = applies.load(Ordering::Relaxed) - a0;
    stop.store(true, Ordering::Relaxed);
    worker
        .join()
        .map_err(|_| anyhow::anyhow!("apply thread panicked"))??;
    drop(pins);
    drop(ns);
    Ok(())
}
