//! Compiler benchmark (not a test): 1,000 local ports × 100 rules in 3 shared groups, one of
//! which is a remote group of 5,000 members (the local ports plus 4,000 on other hosts).
//!
//! `cargo run --release -p sg-user --example compile_bench`

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sg_user::compile::{compile, render_json};
use sg_user::model;

const HOST: &str = "bench-host";
const LOCAL: usize = 1_000;
const MEMBERS: usize = 5_000;

fn rules(group: &str, n: usize, seed: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let k = i + seed + 1;
            let mut r = json!({"id": format!("{group}-r{i}"), "direction": "ingress", "ethertype": "IPv4"});
            match k % 10 {
                0 => {
                    r["protocol"] = json!("tcp");
                    r["port_range_min"] = json!(k);
                    r["port_range_max"] = json!(k);
                    r["remote_group_id"] = json!("base");
                }
                1 => {
                    r["protocol"] = json!("tcp");
                    r["port_range_min"] = json!(1024 + k);
                    r["port_range_max"] = json!(65535);
                    r["remote_group_id"] = json!("base");
                }
                2 => {
                    r["protocol"] = json!("udp");
                    r["port_range_min"] = json!(5000 + 7 * k);
                    r["port_range_max"] = json!(5100 + 13 * k);
                    r["remote_ip_prefix"] = json!(format!("172.{}.0.0/16", k % 32));
                }
                3 => {
                    r["protocol"] = json!("icmp");
                    r["port_range_min"] = json!(k % 20);
                    r["remote_ip_prefix"] = json!(format!("10.{}.0.0/16", k % 8));
                }
                4 => {
                    r["direction"] = json!("egress");
                    r["protocol"] = json!("tcp");
                    r["port_range_min"] = json!(k);
                    r["port_range_max"] = json!(k + 100);
                }
                5 => {
                    r["ethertype"] = json!("IPv6");
                    r["protocol"] = json!("tcp");
                    r["port_range_min"] = json!(8000 + k);
                    r["port_range_max"] = json!(8000 + k);
                    r["remote_ip_prefix"] = json!(format!("2001:db8:{:x}::/48", k));
                }
                6 => {
                    r["ethertype"] = json!("IPv6");
                    r["protocol"] = json!("ipv6-icmp");
                    r["port_range_min"] = json!(k % 256);
                    r["remote_group_id"] = json!("base");
                }
                7 => {
                    r["direction"] = json!("egress");
                    r["remote_ip_prefix"] = json!(format!("192.168.{}.0/24", k % 200));
                }
                8 => {
                    r["protocol"] = json!("tcp");
                    r["port_range_min"] = json!(k);
                    r["port_range_max"] = json!(k);
                    r["remote_ip_prefix"] = json!(format!("10.{}.{}.0/24", k % 8, k % 200));
                }
                _ => {
                    r["protocol"] = json!(if k.is_multiple_of(3) { "sctp" } else { "udp" });
                    r["port_range_min"] = json!(k);
                    r["port_range_max"] = json!(k * 3);
                    r["remote_address_group_id"] = json!("partners");
                }
            }
            r
        })
        .collect()
}

fn document() -> Value {
    let groups = vec![
        json!({"id": "base", "name": "base", "security_group_rules": rules("base", 34, 0)}),
        json!({"id": "web", "name": "web", "security_group_rules": rules("web", 33, 40)}),
        json!({"id": "app", "name": "app", "security_group_rules": rules("app", 33, 80)}),
    ];
    let partners = json!({"id": "partners", "addresses": (0..50).map(|i| format!("198.51.{}.0/24", i)).collect::<Vec<_>>()});
    let ports: Vec<Value> = (0..MEMBERS)
        .map(|i| {
            let local = i < LOCAL;
            let (hi, lo) = (i / 250, i % 250 + 1);
            let mut p = json!({
                "id": format!("{:08x}-0000-4000-8000-{:012x}", i, i),
                "mac_address": format!("fa:16:3e:{:02x}:{:02x}:{:02x}", i >> 16, (i >> 8) & 0xff, i & 0xff),
                "network_id": "net",
                "fixed_ips": [{"ip_address": format!("10.{}.{}.{}", hi / 256, hi % 256, lo)},
                              {"ip_address": format!("2001:db8:ffff::{:x}", i + 1)}],
                "security_groups": if local { json!(["base", "web", "app"]) } else { json!(["base"]) },
                "binding:host_id": if local { HOST.to_string() } else { format!("compute-{}", i % 40) },
            });
            if i.is_multiple_of(100) {
                p["allowed_address_pairs"] = json!([{"ip_address": format!("10.200.{}.0/24", i / 100)}]);
            }
            p
        })
        .collect();
    json!({"security_groups": groups, "address_groups": [partners], "ports": ports})
}

fn main() {
    let doc = document();
    let t = Instant::now();
    let m = model::from_values(vec![("bench".into(), doc)]).unwrap_or_else(|e| panic!("{e}"));
    let load = t.elapsed();

    let mut times: Vec<Duration> = Vec::new();
    let mut compiled = None;
    for _ in 0..7 {
        let t = Instant::now();
        let c = compile(&m, HOST);
        times.push(t.elapsed());
        compiled = Some(c);
    }
    times.sort();
    let c = compiled.unwrap();
    assert_eq!(render_json(&c), render_json(&compile(&m, HOST)), "deterministic");

    println!(
        "input: {} ports ({LOCAL} local), {} groups, {} rules per local port, remote group of {MEMBERS} members",
        m.ports.len(),
        m.security_groups.len(),
        m.security_groups.iter().map(|s| s.rules.len()).sum::<usize>()
    );
    println!("validate+normalise: {:.1} ms", load.as_secs_f64() * 1e3);
    println!(
        "compile: median {:.1} ms (min {:.1}, max {:.1}) over {} runs",
        times[times.len() / 2].as_secs_f64() * 1e3,
        times[0].as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3,
        times.len()
    );
    let s = c.stats;
    for (name, m) in [
        ("SG_PORTS", s.ports),
        ("SG_ADDRS", s.addrs),
        ("SG_CLASSES", s.classes),
        ("SG_SERVICES", s.services),
    ] {
        println!("  {name:<12} {:>8} entries {:>10} bytes", m.entries, m.bytes);
    }
    let total: usize = [s.ports, s.addrs, s.classes, s.services]
        .iter()
        .map(|m| m.bytes)
        .sum();
    println!(
        "  total {:.2} MiB; {} policies, {} classes, {} rules",
        total as f64 / 1048576.0,
        s.policies,
        s.class_ids,
        s.rules
    );
}
