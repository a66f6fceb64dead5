//! iptables parity benchmark (not a test): 200 local ports, each in two shared groups holding
//! 422 rules together (tcp/udp ports and ranges, prefixes, ICMP, remote groups, IPv4 and IPv6),
//! on the Linux bridge agent's defaults. Times `render`, and with `--apply` (root) also
//! `sg iptables apply` into a fresh network namespace, a repeat apply (no change) and an
//! apply after one rule changed.
//!
//! `cargo run --release -p sg-user --example iptables_bench [-- --apply [nft|legacy]]`

use std::process::Command;
use std::time::Instant;

use serde_json::{Value, json};
use sg_user::iptables::{self, Backend, IptablesDataplane, RenderOptions};
use sg_user::model;

const HOST: &str = "bench-host";
const PORTS: usize = 200;
const RULES: [usize; 2] = [400, 22];

fn rules(group: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let v6 = i % 5 == 4;
            let mut r = json!({"id": format!("{group}-r{i}"), "direction": if i % 11 == 10 { "egress" } else { "ingress" },
                               "ethertype": if v6 { "IPv6" } else { "IPv4" }});
            match i % 6 {
                0 => {
                    r["protocol"] = json!("tcp");
                    r["port_range_min"] = json!(1000 + i);
                    r["port_range_max"] = json!(1000 + i);
                }
                1 => {
                    r["protocol"] = json!("udp");
                    r["port_range_min"] = json!(2000 + i);
                    r["port_range_max"] = json!(2100 + i);
                    r["remote_ip_prefix"] = json!(if v6 { format!("2001:db8:{i:x}::/48") } else { format!("172.{}.{}.0/24", i % 32, i % 250) });
                }
                2 => {
                    r["protocol"] = json!("tcp");
                    r["port_range_min"] = json!(3000 + i);
                    r["port_range_max"] = json!(3000 + i);
                    r["remote_group_id"] = json!("sg-a");
                }
                3 => {
                    r["protocol"] = json!(if v6 { "ipv6-icmp" } else { "icmp" });
                    r["port_range_min"] = json!(i % 250);
                    r["port_range_max"] = json!(0);
                }
                4 => {
                    r["protocol"] = json!("sctp");
                    r["port_range_min"] = json!(4000 + i);
                    r["port_range_max"] = json!(4000 + i);
                    r["remote_ip_prefix"] = json!(if v6 { format!("2001:db8:1:{i:x}::1/128") } else { format!("10.{}.{}.7/32", i % 200, i % 250) });
                }
                _ => {
                    r["protocol"] = json!("udp");
                    r["port_range_min"] = json!(5000 + i);
                    r["port_range_max"] = json!(5000 + i);
                    r["remote_group_id"] = json!("sg-b");
                }
            }
            r
        })
        .collect()
}

fn input(extra_port: u16) -> Value {
    let mut a = rules("a", RULES[0]);
    a[0]["port_range_min"] = json!(extra_port);
    a[0]["port_range_max"] = json!(extra_port);
    let groups = json!([
        {"id": "sg-a", "name": "a", "security_group_rules": a},
        {"id": "sg-b", "name": "b", "security_group_rules": rules("b", RULES[1])},
    ]);
    let ports: Vec<Value> = (0..PORTS)
        .map(|i| {
            json!({
                "id": format!("{:08x}-0000-4000-8000-{:012x}", 0x1000_0000 + i, i),
                "mac_address": format!("fa:16:3e:00:{:02x}:{:02x}", i / 256, i % 256),
                "network_id": format!("net-{}", i % 4),
                "fixed_ips": [{"ip_address": format!("10.{}.{}.{}", i % 4, i / 250, 10 + i % 240)},
                              {"ip_address": format!("2001:db8:{}::{:x}", i % 4, 10 + i)}],
                "security_groups": ["sg-a", "sg-b"],
                "binding:host_id": HOST,
            })
        })
        .collect();
    json!({"security_groups": groups, "address_groups": [], "ports": ports})
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let m = model::from_values(vec![("bench".into(), input(1000))]).map_err(|e| anyhow::anyhow!("{e}"))?;
    let opts = RenderOptions::new(HOST);
    let _ = iptables::render(&m, &opts); // warm the protocol table
    let t = Instant::now();
    let r = iptables::render(&m, &opts);
    let took = t.elapsed();
    let rules: usize = r.tables.iter().flatten().map(|t| t.rules.len()).sum();
    println!(
        "render: {PORTS} ports x {} rules: {rules} iptables rules, {} sets, {} KiB of text in {took:.1?}",
        RULES.iter().sum::<usize>(),
        r.ipsets.len(),
        (r.v4.len() + r.v6.len() + r.ipset.len()) / 1024
    );
    if let Some(i) = args.iter().position(|a| a == "--dump") {
        let dir = std::path::Path::new(&args[i + 1]);
        std::fs::write(dir.join("v4"), &r.v4)?;
        std::fs::write(dir.join("v6"), &r.v6)?;
        std::fs::write(dir.join("ipset"), &r.ipset)?;
        std::fs::write(dir.join("input.json"), serde_json::to_vec(&input(1000))?)?;
    }
    if let Some(i) = args.iter().position(|a| a == "--apply") {
        let backend = match args.get(i + 1).map(String::as_str) {
            Some("legacy") => Backend::Legacy,
            _ => Backend::Nft,
        };
        let ns = format!("sg-bench-{}", std::process::id());
        Command::new("ip").args(["netns", "add", &ns]).status()?;
        let result = (|| -> anyhow::Result<()> {
            let dp = IptablesDataplane::new(backend).in_netns(Some(ns.clone()));
            let t = Instant::now();
            let rep = dp.apply_rendered(&r)?;
            println!(
                "apply ({backend:?}), fresh namespace: {rep} in {:.1?}",
                t.elapsed()
            );
            let t = Instant::now();
            let rep = dp.apply_rendered(&r)?;
            println!("apply again: {rep} in {:.1?}", t.elapsed());
            let m2 =
                model::from_values(vec![("bench".into(), input(999))]).map_err(|e| anyhow::anyhow!("{e}"))?;
            let t = Instant::now();
            let rep = dp.apply(&m2, &opts)?;
            println!(
                "apply after one rule changed (render included): {rep} in {:.1?}",
                t.elapsed()
            );
            Ok(())
        })();
        Command::new("ip").args(["netns", "delete", &ns]).status()?;
        result?;
    }
    Ok(())
}
