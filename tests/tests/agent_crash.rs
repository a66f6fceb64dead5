//! Crash consistency (issue 14): the agent is SIGKILLed at random points while it applies a
//! change, over and over, on a namespace node with four taps. The changes cycle through every
//! kind of apply: a rule added on a new remote and a rule removed (policies changed in place),
//! remote-group members added and removed (in place), and a port moved to other groups plus a
//! change of both shapes (policies written under fresh ids).
//!
//! After each kill, before anything restarts, every tap is probed with the real program on the
//! pinned maps (BPF_PROG_TEST_RUN with the dry trace mark, which writes nothing): each probe's
//! verdict must be the one of the old input or of the new one (computed from the model by the
//! reference rule walk), never a third. Then the agent is started again and must converge to
//! the new input (every probe as the new input says) and leave nothing behind: no policy or
//! address-set entries that no port uses, no in-place edit marked in flight, exactly two link
//! pins and two tcx links per tap.
//!
//! `SG_CRASH_KILLS` sets the number of kills (default 100, the CI run; the long run uses 1,000).

use std::{
    collections::BTreeSet,
    sync::mpsc::{Receiver, Sender, channel},
    time::Duration,
};

use serde_json::{Value, json};
use sg_common::*;
use sg_tests::{Agent, Netns, spawn_in};
use sg_user::{
    compile::{Packet, reference_first_rule},
    datapath::{Datapath, LoadOptions},
    model::{self, Direction},
    packet::{Frame, IpPacket, L4, TCP_SYN},
};

/// Taps are Neutron's names for the port ids (`port_id`): "tap" and the id's first 11 characters.
const TAPS: [&str; 4] = [
    "tapc0000000-00",
    "tapc1000000-00",
    "tapc2000000-00",
    "tapc3000000-00",
];

fn port_id(i: usize) -> String {
    format!("c{i}000000-0000-4000-8000-000000000000")
}
const GW_MAC: [u8; 6] = [0xfa, 0x16, 0x3e, 0xee, 0, 1];
/// Filler rules per group: enough that an apply takes a while and kills land inside it.
const FILLER: usize = 300;

fn mac(i: usize) -> String {
    format!("fa:16:3e:00:c0:{i:02x}")
}

fn vm_ip(i: usize) -> String {
    format!("10.60.0.{}", 10 + i)
}

fn rule(id: &str, port: u16, remote: Value) -> Value {
    let mut r = json!({"id": id, "direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
                       "port_range_min": port, "port_range_max": port});
    for (k, v) in remote.as_object().unwrap() {
        r[k] = v.clone();
    }
    r
}

/// Input number `k` of the cycle. Every step changes one kind of thing (module doc).
fn input(k: usize) -> Value {
    let step = k % 6;
    let mut big: Vec<Value> = (0..FILLER)
        .map(|j| {
            rule(
                &format!("f{j}"),
                1000 + j as u16,
                json!({"remote_ip_prefix": format!("10.{}.{}.0/24", 100 + j / 256, j % 256)}),
            )
        })
        .collect();
    big.push(rule("ssh", 22, json!({"remote_ip_prefix": "0.0.0.0/0"})));
    if matches!(step, 1 | 2) {
        // A rule on a remote the policies do not use yet.
        big.push(rule("lab", 7000, json!({"remote_ip_prefix": "198.18.0.0/16"})));
    }
    if step == 2 {
        // A rule removed from a remote still in use.
        big.retain(|r| r["id"] != "ssh");
    }
    let web = vec![
        rule("http", 80, json!({"remote_group_id": "web"})),
        rule("https", 443, json!({"remote_ip_prefix": "0.0.0.0/0"})),
    ];
    // Remote-group members: ports on another host, more of them at steps 3 and 4.
    let members = match step {
        3 | 4 => 40,
        _ => 10,
    };
    let mut ports: Vec<Value> = (0..members)
        .map(|m| {
            json!({"id": format!("d{m:07}-0000-4000-8000-000000000000"), "mac_address": format!("fa:16:3e:00:d0:{m:02x}"),
                   "network_id": "net-c", "binding:host_id": "compute-9",
                   "fixed_ips": [{"ip_address": format!("10.61.0.{}", 10 + m)}], "security_groups": ["web"]})
        })
        .collect();
    for i in 0..TAPS.len() {
        // Port 3 moves between groups at step 4, and at step 5 gets a change of both shapes
        // (new remote and a rule gone): written under a fresh id.
        let groups = match (i, step) {
            (3, 4) => vec!["web"],
            (0 | 1, _) => vec!["big"],
            _ => vec!["big", "web"],
        };
        ports.push(json!({"id": port_id(i), "mac_address": mac(i),
                          "network_id": "net-c", "binding:host_id": "compute-1",
                          "fixed_ips": [{"ip_address": vm_ip(i)}], "security_groups": groups}));
    }
    let mut groups = vec![
        json!({"id": "big", "security_group_rules": big}),
        json!({"id": "web", "security_group_rules": web}),
    ];
    if step == 5 {
        groups[1]["security_group_rules"] = json!([
            rule("http", 80, json!({"remote_group_id": "web"})),
            rule("alt", 8443, json!({"remote_ip_prefix": "203.0.113.0/24"})),
        ]);
    }
    json!({"security_groups": groups, "address_groups": [], "ports": ports})
}

/// (remote address, TCP port) probes: every rule the cycle changes, and some it never does.
fn probes() -> Vec<(&'static str, u16)> {
    vec![
        ("198.51.100.7", 22),
        ("198.18.4.4", 7000),
        ("10.100.3.9", 1003),
        ("10.101.10.9", 1266),
        ("10.61.0.12", 80),
        ("10.61.0.45", 80),
        ("10.61.0.19", 80),
        ("198.51.100.7", 443),
        ("203.0.113.5", 8443),
        ("192.0.2.1", 9999),
    ]
}

/// Whether input `m` admits the probe towards port `i` (the reference rule walk).
fn admits(m: &model::Model, i: usize, remote: &str, port: u16) -> bool {
    let p = m.ports.iter().find(|p| p.id == port_id(i)).unwrap();
    reference_first_rule(
        m,
        &p.security_groups,
        &Packet {
            dir: Direction::Ingress,
            remote: remote.parse().unwrap(),
            proto: 6,
            sport: 40000,
            port,
        },
    )
    .is_some()
}

fn syn(i: usize, remote: &str, port: u16) -> Vec<u8> {
    let mac: Vec<u8> = mac(i)
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect();
    Frame::ip(
        GW_MAC,
        mac.try_into().unwrap(),
        IpPacket::new(
            remote.parse().unwrap(),
            vm_ip(i).parse().unwrap(),
            L4::Tcp {
                sport: 40000,
                dport: port,
                flags: TCP_SYN,
                seq: 1,
                ack: 1,
            },
        ),
    )
    .build()
}

enum Ask {
    Probe,
    Leftovers,
}

enum Answer {
    Probe(Vec<Vec<bool>>),
    Leftovers(BTreeSet<u32>, BTreeSet<u32>, bool),
}

/// The test's own copy of the programs on the agent's pinned maps, in the node's namespace:
/// it answers questions about what the maps decide and hold, whether or not an agent runs.
struct Prober {
    ask: Sender<Ask>,
    answer: Receiver<Answer>,
}

impl Prober {
    fn new(node: &str, pins: &std::path::Path) -> Self {
        let (ask, asks) = channel::<Ask>();
        let (answers, answer) = channel::<Answer>();
        let pins = pins.to_path_buf();
        spawn_in(node, move || {
            let mut dp = Datapath::load(&LoadOptions {
                pin_root: Some(pins),
                ..Default::default()
            })
            .unwrap();
            for a in asks {
                let reply = match a {
                    Ask::Probe => Answer::Probe(probe_all(&mut dp)),
                    Ask::Leftovers => {
                        let (p, a, i) = leftovers(&mut dp);
                        Answer::Leftovers(p, a, i)
                    }
                };
                if answers.send(reply).is_err() {
                    break;
                }
            }
        });
        Self { ask, answer }
    }

    fn probe(&self) -> Vec<Vec<bool>> {
        self.ask.send(Ask::Probe).unwrap();
        match self.answer.recv().unwrap() {
            Answer::Probe(v) => v,
            _ => unreachable!(),
        }
    }

    fn leftovers(&self) -> (BTreeSet<u32>, BTreeSet<u32>, bool) {
        self.ask.send(Ask::Leftovers).unwrap();
        match self.answer.recv().unwrap() {
            Answer::Leftovers(p, a, i) => (p, a, i),
            _ => unreachable!(),
        }
    }
}

/// The verdict of every probe on every tap, as the pinned maps decide it now: `[tap][probe]`.
fn probe_all(dp: &mut Datapath) -> Vec<Vec<bool>> {
    TAPS.iter()
        .enumerate()
        .map(|(i, tap)| {
            let ifindex = sg_user::netns::ifindex(tap).unwrap();
            probes()
                .iter()
                .map(|(remote, port)| {
                    let v = dp
                        .test_run(PROG_TO_VM, &syn(i, remote, *port), ifindex, TRACE_DRY_MARK)
                        .unwrap();
                    v == TC_ACT_UNSPEC
                })
                .collect()
        })
        .collect()
}

fn expected(m: &model::Model) -> Vec<Vec<bool>> {
    (0..TAPS.len())
        .map(|i| probes().iter().map(|(r, p)| admits(m, i, r, *p)).collect())
        .collect()
}

/// What the pinned maps say about leftovers: (policy ids with entries but no port, address
/// sets with entries but no port, in-place edit in flight).
fn leftovers(dp: &mut Datapath) -> (BTreeSet<u32>, BTreeSet<u32>, bool) {
    let ports: Vec<PortInfo> = dp.ports().unwrap().iter().map(|r| r.unwrap().1).collect();
    let used: BTreeSet<u32> = ports.iter().map(|p| p.policy).collect();
    let used_addr: BTreeSet<u32> = ports.iter().map(|p| p.addr_id).collect();
    let mut ids: BTreeSet<u32> = dp
        .classes()
        .unwrap()
        .iter()
        .map(|r| r.unwrap().0.data().policy)
        .collect();
    ids.extend(dp.services().unwrap().iter().map(|r| r.unwrap().0.data().policy));
    let addrs: BTreeSet<u32> = dp
        .addrs()
        .unwrap()
        .iter()
        .map(|r| r.unwrap().0.data().addr_id)
        .collect();
    let in_place = dp.next_ids().unwrap().in_place != 0;
    (
        ids.difference(&used).copied().collect(),
        addrs.difference(&used_addr).copied().collect(),
        in_place,
    )
}

/// The programs attached at tcx to `tap` (ingress and egress), by name, asked of the kernel in
/// the node's namespace.
fn tcx_programs(node: &str, tap: &'static str) -> Vec<String> {
    use aya::programs::{SchedClassifier, TcAttachType};
    spawn_in(node, move || {
        [TcAttachType::Ingress, TcAttachType::Egress]
            .into_iter()
            .flat_map(|t| SchedClassifier::query_tcx(tap, t).unwrap().1)
            .map(|p| p.name_as_str().unwrap_or("?").to_string())
            .collect()
    })
    .join()
    .unwrap()
    .unwrap()
}

#[test]
fn sigkill_during_applies_leaves_old_or_new_and_a_restart_converges() {
    let kills: usize = std::env::var("SG_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let seed: u64 = std::env::var("SG_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("SG_CRASH_SEED={seed} SG_CRASH_KILLS={kills}");
    // xorshift64: the kill times, reproducible from the seed.
    let mut state = seed;
    let mut next_delay_us = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % 100_000
    };

    let node = Netns::new("crash").unwrap();
    for (i, tap) in TAPS.iter().enumerate() {
        node.ip(&[
            "link",
            "add",
            tap,
            "type",
            "veth",
            "peer",
            "name",
            &format!("vmc{i}"),
        ])
        .unwrap();
        node.ip(&["link", "set", tap, "up"]).unwrap();
        node.ip(&["link", "set", &format!("vmc{i}"), "up"]).unwrap();
    }
    let models: Vec<model::Model> = (0..6)
        .map(|k| model::from_values(vec![("crash".into(), input(k))]).unwrap())
        .collect();
    let mut agent = Agent::start(&node.name, &input(0)).unwrap();
    let prober = Prober::new(&node.name, &agent.pins.path);
    assert_eq!(prober.probe(), expected(&models[0]));

    let (mut torn_in_place, mut torn_fresh, mut unfinished) = (0, 0, 0);
    for kill in 0..kills {
        let (old, new) = (&models[kill % 6], &models[(kill + 1) % 6]);
        let generation = agent.generation().unwrap();
        agent.write_input(&input(kill + 1)).unwrap();
        std::thread::sleep(Duration::from_micros(next_delay_us()));
        agent.stop(true).unwrap();

        // Old or new, probe by probe.
        let seen = prober.probe();
        let (want_old, want_new) = (expected(old), expected(new));
        for (i, tap) in TAPS.iter().enumerate() {
            for (j, (remote, port)) in probes().iter().enumerate() {
                assert!(
                    seen[i][j] == want_old[i][j] || seen[i][j] == want_new[i][j],
                    "kill {kill} (seed {seed}): {tap} decided {remote} → tcp {port} as {}, neither \
                     the old input ({}) nor the new one ({})",
                    seen[i][j],
                    want_old[i][j],
                    want_new[i][j]
                );
            }
        }
        let (stale, _, in_place) = prober.leftovers();
        torn_in_place += usize::from(in_place);
        torn_fresh += usize::from(!stale.is_empty());
        unfinished += usize::from(agent.generation() == Some(generation));

        // A restarted agent converges to the new input and leaves nothing behind.
        agent.spawn().unwrap();
        agent.wait_generation(agent.generation().unwrap() + 1).unwrap();
        assert_eq!(
            prober.probe(),
            want_new,
            "kill {kill} (seed {seed}): the restarted agent did not converge to the new input"
        );
        let (stale, stale_addrs, in_place) = prober.leftovers();
        assert!(
            stale.is_empty() && stale_addrs.is_empty() && !in_place,
            "kill {kill} (seed {seed}): left behind policies {stale:?}, address sets {stale_addrs:?}, \
             in-place edit in flight: {in_place}"
        );
        let links = std::fs::read_dir(agent.pins.path.join("links").join(&node.name))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(links, 2 * TAPS.len(), "kill {kill}: link pins");
        for tap in TAPS {
            let mut progs = tcx_programs(&node.name, tap);
            progs.sort();
            assert_eq!(
                progs,
                [PROG_FROM_VM, PROG_TO_VM],
                "kill {kill}: tcx programs of {tap}"
            );
        }
    }
    eprintln!(
        "{kills} kills: {unfinished} before the apply finished, {torn_in_place} inside an in-place \
         edit, {torn_fresh} with a policy written but not yet in use or not yet deleted"
    );
    agent.stop(false).unwrap();
}
