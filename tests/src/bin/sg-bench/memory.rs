//! §4 Memory: what each map costs, from its definition (key and value sizes, capacity) and from
//! the kernel's own accounting (`bpftool map show`: `bytes_memlock`, which for LPM tries
//! follows the number of entries and for preallocated maps is fixed by the capacity), before
//! and after a reference node is applied.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use sg_common::*;
use sg_user::{
    agent::apply::Applier,
    compile,
    datapath::{Datapath, LoadOptions},
};

use crate::{
    control::node_doc,
    env::{PinRoot, RcuExpedited, run},
    policy::HOST,
};

#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct MapRow {
    pub name: String,
    pub kind: String,
    pub key: u64,
    pub value: u64,
    pub capacity: u64,
    pub memlock_empty: u64,
    pub memlock_loaded: u64,
    pub entries: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Results {
    pub input: String,
    pub ports: usize,
    pub policies: usize,
    pub rules_per_port: usize,
    /// (policy, rule) pairs: the rules the maps hold, counted once per distinct policy.
    pub policy_rules: usize,
    pub maps: Vec<MapRow>,
    /// SG_CONNTRACK memlock at other `--ct-entries` settings: (entries, bytes).
    pub ct_settings: Vec<(u32, u64)>,
}

fn show(path: &std::path::Path) -> Result<serde_json::Value> {
    let out = run(
        "bpftool",
        &["-j", "map", "show", "pinned", path.to_str().unwrap()],
    )?;
    Ok(serde_json::from_str(&out)?)
}

fn memlocks(root: &std::path::Path) -> Result<BTreeMap<String, serde_json::Value>> {
    PINNED_MAPS
        .iter()
        .map(|m| Ok((m.to_string(), show(&root.join("maps").join(m))?)))
        .collect()
}

pub fn run_all() -> Result<Results> {
    // The reference node: 200 ports × 422 rules, 20 distinct policies, 1,000 remote members.
    let doc = node_doc(200, 400, 21, 20, 1_000);
    let m = doc.model()?;
    let compiled = compile::compile(&m, HOST);
    let pins = PinRoot::new("mem");
    let dp = Datapath::load(&LoadOptions {
        pin_root: Some(pins.0.clone()),
        ..Default::default()
    })?;
    let empty = memlocks(&pins.0)?;
    // Ports need ifindexes to get SG_PORTS entries; taps in a namespace.
    let ns = crate::env::Ns::new(crate::env::tag("mem"))?;
    let devices: Vec<String> = m.local_ports(HOST).iter().map(|p| p.device.clone()).collect();
    let mut batch = String::new();
    for (i, d) in devices.iter().enumerate() {
        batch.push_str(&format!(
            "link add {d} type veth peer name p{i}\nlink set {d} up\n"
        ));
    }
    ns.ip_batch(&batch)?;
    let nsname = ns.0.clone();
    {
        let _rcu = RcuExpedited::on();
        let mut a = Applier::adopt(dp, Some(nsname), None)?;
        a.apply(&compiled)?;
    }
    let loaded = memlocks(&pins.0)?;
    let counts: BTreeMap<&str, u64> = BTreeMap::from([
        (MAP_PORTS, compiled.stats.ports.entries as u64),
        (MAP_ADDRS, compiled.stats.addrs.entries as u64),
        (MAP_CLASSES, compiled.stats.classes.entries as u64),
        (MAP_SERVICES, compiled.stats.services.entries as u64),
        (MAP_CONNTRACK, 0),
        (MAP_FRAGS, 0),
        (MAP_STATS, 0),
        (MAP_RULE_HITS, compiled.rules.len() as u64),
    ]);
    let mut maps = Vec::new();
    for name in PINNED_MAPS {
        let (e, l) = (&empty[name], &loaded[name]);
        let n = |v: &serde_json::Value, k: &str| v[k].as_u64().with_context(|| format!("{name} {k}"));
        maps.push(MapRow {
            name: name.to_string(),
            kind: e["type"].as_str().unwrap_or("?").to_string(),
            key: n(e, "bytes_key")?,
            value: n(e, "bytes_value")?,
            capacity: n(e, "max_entries")?,
            memlock_empty: n(e, "bytes_memlock")?,
            memlock_loaded: n(l, "bytes_memlock")?,
            entries: counts[name],
        });
    }
    drop(pins);
    let mut ct_settings = Vec::new();
    for entries in [65_536u32, DEFAULT_CT_ENTRIES, 1_048_576] {
        let p = PinRoot::new("mct");
        let _dp = Datapath::load(&LoadOptions {
            pin_root: Some(p.0.clone()),
            ct_entries: entries,
            ..Default::default()
        })?;
        let v = show(&p.0.join("maps").join(MAP_CONNTRACK))?;
        ct_settings.push((entries, v["bytes_memlock"].as_u64().context("memlock")?));
    }
    let policy_rules: usize = compiled
        .policies
        .iter()
        .map(|p| m.groups_rules(&p.security_groups).count())
        .sum();
    Ok(Results {
        input: m.summary(),
        ports: compiled.ports.len(),
        policies: compiled.policies.len(),
        rules_per_port: 422,
        policy_rules,
        maps,
        ct_settings,
    })
}
