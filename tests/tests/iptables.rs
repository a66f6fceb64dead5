//! sg's iptables back end in the kernel, in throwaway network namespaces (removed on drop,
//! also when a test fails):
//!
//! - kernel check of sg's own output, for iptables-nft and iptables-legacy: the ipset section
//!   runs, both families load with `iptables-restore --test`, `sg iptables apply` installs
//!   them, and the kernel's `iptables-save` equals the render apart from the documented
//!   canonicalisations (`sg_user::iptables` module docs); a second apply changes nothing and a
//!   foreign rule in FORWARD survives;
//! - apply across a sequence of inputs converges each time and keeps foreign rules and other
//!   agents' `neutron-filter-top` rules; rejected input and a ruleset the kernel refuses change
//!   nothing and say why;
//! - the CLI's formats (`--format restore`, `--family`);
//! - Neutron's conntrack cleanup cuts the flows of a removed rule, and only those;
//! - `sg agent --dataplane iptables` applies the input and follows its changes.

use std::{
    collections::BTreeSet,
    io::Write as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use sg_tests::{Netns, corpus, generator::LOCAL_HOST, unified_diff, unique, workspace_bin, workspace_root};
use sg_user::{
    iptables::{
        self, Agent, Backend, IptablesDataplane, RenderOptions, Rendered,
        apply::{LiveTable, parse_save},
        canon::{kernel_form, tokens},
    },
    model::{self, Ethertype},
};

/// Runs `cmd` in `ns` with `stdin`; fails with its stderr.
fn ns_run(ns: &str, argv: &[&str], stdin: Option<&str>) -> Result<String> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(argv)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(s) = stdin {
        child.stdin.take().unwrap().write_all(s.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{} in {ns}: {}",
            argv.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn save(ns: &str, backend: Backend, family: Ethertype) -> String {
    let text = ns_run(ns, &[&backend.save_cmd(family)], None).unwrap();
    // Without the "# Generated ... on <date>" lines.
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect()
}

fn model_of(name: &str, doc: &Value) -> model::Model {
    model::from_values(vec![(name.to_string(), doc.clone())]).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn opts(agent: Agent, comments: bool, ipset: bool) -> RenderOptions {
    RenderOptions {
        host: LOCAL_HOST.to_string(),
        agent,
        comments,
        ipset,
    }
}

fn variants() -> Vec<(&'static str, RenderOptions)> {
    vec![
        ("linuxbridge", opts(Agent::LinuxBridge, true, true)),
        ("linuxbridge --no-comments", opts(Agent::LinuxBridge, false, true)),
        ("linuxbridge --no-ipset", opts(Agent::LinuxBridge, true, false)),
        ("ovs-hybrid", opts(Agent::OvsHybrid, true, true)),
    ]
}

/// The documented canonicalisations a kernel rewrite of `ours` into `kernel` used; an
/// undocumented difference is an error.
fn rewrites(ours: &str, kernel: &str) -> Result<BTreeSet<&'static str>> {
    let mut used = BTreeSet::new();
    if ours == kernel {
        return Ok(used);
    }
    if kernel_form(ours) != kernel_form(kernel) {
        bail!("undocumented difference:\n  sg:     {ours}\n  kernel: {kernel}");
    }
    let t = tokens(ours);
    for (i, tok) in t.iter().enumerate() {
        let next = t.get(i + 1).map(String::as_str).unwrap_or("");
        match tok.as_str() {
            "--mac-source"
                if next != next.to_ascii_lowercase() && kernel.contains(&next.to_ascii_lowercase()) =>
            {
                used.insert("MAC addresses in lower case");
            }
            "-s" | "-d" if next.ends_with("/0") => {
                used.insert("-s/-d of a /0 prefix omitted");
            }
            "-s" | "-d" => {
                if let Some(n) = model::addr::parse_network(next)
                    && n != n.trunc()
                {
                    used.insert("host bits of a prefix cleared");
                }
            }
            "-p" if next == "ip" || next == "hopopt" => {
                used.insert("-p ip / -p hopopt (protocol 0) omitted");
            }
            "--icmp-type" if next == "255" || next.starts_with("255/") => {
                used.insert("ICMP type 255 printed as any");
            }
            _ => {}
        }
    }
    if used.is_empty() {
        bail!("a difference no documented canonicalisation explains:\n  sg:     {ours}\n  kernel: {kernel}");
    }
    Ok(used)
}

/// Compares the kernel's tables with the render: same user chains, and per chain the rendered
/// rules first (in the kernel's canonical form), then exactly `foreign` rules of that chain.
fn compare(
    r: &Rendered,
    family: Ethertype,
    kernel: &str,
    foreign: &[(&str, &str)],
) -> Result<BTreeSet<&'static str>> {
    let live = parse_save(kernel);
    let mut used = BTreeSet::new();
    let idx = if family == Ethertype::IPv4 { 0 } else { 1 };
    for t in &r.tables[idx] {
        let l = live.get(t.name).cloned().unwrap_or_else(LiveTable::default);
        // Chains of other owners (another agent's) are not compared.
        let wrap = r.agent.wrap();
        let mut live_chains: Vec<String> = l
            .chains
            .iter()
            .filter(|c| c.contains(wrap) || *c == "neutron-filter-top")
            .cloned()
            .collect();
        live_chains.sort();
        if live_chains != t.chains {
            bail!(
                "{} {}: chains differ: sg {:?}, kernel {:?}",
                family.as_str(),
                t.name,
                t.chains,
                l.chains
            );
        }
        let chains = t
            .builtin
            .iter()
            .map(|c| c.to_string())
            .chain(t.chains.iter().cloned());
        for chain in chains {
            let ours: Vec<&str> = t.chain_rules(&chain).collect();
            let theirs: Vec<&str> = l
                .rules
                .iter()
                .filter(|(c, _)| *c == chain)
                .map(|(_, r)| r.as_str())
                .collect();
            let extra: Vec<&str> = foreign
                .iter()
                .filter(|(c, _)| *c == chain)
                .map(|(_, r)| *r)
                .collect();
            if theirs.len() != ours.len() + extra.len() {
                bail!(
                    "{} {} {chain}: {} rules in the kernel, sg rendered {} (+{} foreign)\n{}",
                    family.as_str(),
                    t.name,
                    theirs.len(),
                    ours.len(),
                    extra.len(),
                    unified_diff("sg", &ours.join("\n"), "kernel", &theirs.join("\n"))
                );
            }
            for (o, k) in ours.iter().zip(&theirs) {
                used.extend(
                    rewrites(o, k).with_context(|| format!("{} {} {chain}", family.as_str(), t.name))?,
                );
            }
            for (e, k) in extra.iter().zip(&theirs[ours.len()..]) {
                if e != k {
                    bail!("{chain}: foreign rule {e:?} became {k:?}");
                }
            }
        }
    }
    Ok(used)
}

const FOREIGN_V4: &str = "-s 192.0.2.1/32 -j ACCEPT";
const FOREIGN_V6: &str = "-s 2001:db8:ffff::1/128 -j ACCEPT";

fn add_foreign(ns: &str, backend: Backend) {
    let ipt = |f| backend.save_cmd(f).replace("-save", "");
    ns_run(
        ns,
        &[
            &ipt(Ethertype::IPv4),
            "-w",
            "10",
            "-A",
            "FORWARD",
            "-s",
            "192.0.2.1",
            "-j",
            "ACCEPT",
        ],
        None,
    )
    .unwrap();
    ns_run(
        ns,
        &[
            &ipt(Ethertype::IPv6),
            "-w",
            "10",
            "-A",
            "FORWARD",
            "-s",
            "2001:db8:ffff::1",
            "-j",
            "ACCEPT",
        ],
        None,
    )
    .unwrap();
}

fn foreign(family: Ethertype) -> Vec<(&'static str, &'static str)> {
    match family {
        Ethertype::IPv4 => vec![("FORWARD", FOREIGN_V4)],
        Ethertype::IPv6 => vec![("FORWARD", FOREIGN_V6)],
    }
}

/// The kernel check of one render in a fresh namespace (see the module docs).
fn kernel_check(r: &Rendered, backend: Backend) -> Result<BTreeSet<&'static str>> {
    let ns = Netns::new("sgk")?;
    ns_run(&ns.name, &["bash", "-e", "-s"], Some(&r.ipset_text(None))).context("the # ipset section")?;
    for (family, text) in [(Ethertype::IPv4, &r.v4), (Ethertype::IPv6, &r.v6)] {
        ns_run(
            &ns.name,
            &[&backend.restore_cmd(family), "--test", "-w", "10"],
            Some(text),
        )
        .with_context(|| format!("{} --test", family.as_str()))?;
    }
    add_foreign(&ns.name, backend);
    let dp = IptablesDataplane::new(backend).in_netns(Some(ns.name.clone()));
    dp.apply_rendered(r).context("sg iptables apply")?;
    let mut used = BTreeSet::new();
    let mut first = Vec::new();
    for family in Ethertype::ALL {
        let text = save(&ns.name, backend, family);
        used.extend(compare(r, family, &text, &foreign(family))?);
        first.push(text);
    }
    let again = dp.apply_rendered(r).context("second apply")?;
    if again.changed() {
        bail!("a second apply changed something: {again}");
    }
    for (i, family) in Ethertype::ALL.into_iter().enumerate() {
        let text = save(&ns.name, backend, family);
        if text != first[i] {
            bail!(
                "the second apply changed the kernel:\n{}",
                unified_diff("first", &first[i], "second", &text)
            );
        }
    }
    Ok(used)
}

fn kernel_check_all(backend: Backend) {
    let started = Instant::now();
    let mut used: BTreeSet<&'static str> = BTreeSet::new();
    let mut failures = Vec::new();
    let mut n = 0;
    for (name, doc) in corpus() {
        let m = model_of(&name, &doc);
        for (label, o) in variants() {
            n += 1;
            match kernel_check(&iptables::render(&m, &o), backend) {
                Ok(u) => used.extend(u),
                Err(e) => failures.push(format!("{name} [{label}] {backend:?}: {e:#}")),
            }
        }
    }
    eprintln!(
        "kernel check ({backend:?}): {n} renders in {:.1?}; canonicalisations seen: {used:#?}",
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    // The corpus exercises every documented canonicalisation.
    assert_eq!(used.len(), 5, "{used:?}");
}

#[test]
fn kernel_check_of_sg_output_nft() {
    kernel_check_all(Backend::Nft);
}

#[test]
fn kernel_check_of_sg_output_legacy() {
    kernel_check_all(Backend::Legacy);
}

fn corpus_doc(name: &str) -> Value {
    corpus()
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("{name}"))
        .1
}

#[test]
fn apply_converges_across_inputs_and_keeps_foreign_rules() {
    for backend in [Backend::Nft, Backend::Legacy] {
        let ns = Netns::new("sga").unwrap();
        add_foreign(&ns.name, backend);
        // Another Neutron agent's rules in the shared neutron-filter-top chain.
        let ipt = backend.save_cmd(Ethertype::IPv4).replace("-save", "");
        for args in [
            &["-N", "neutron-filter-top"][..],
            &["-N", "neutron-l3-agent-local"],
            &["-A", "neutron-filter-top", "-j", "neutron-l3-agent-local"],
            &["-A", "FORWARD", "-j", "neutron-filter-top"],
        ] {
            let mut a = vec![ipt.as_str(), "-w", "10"];
            a.extend_from_slice(args);
            ns_run(&ns.name, &a, None).unwrap();
        }
        let dp = IptablesDataplane::new(backend).in_netns(Some(ns.name.clone()));
        for name in [
            "spec12",
            "shared-group",
            "web1",
            "stateless",
            "empty",
            "aap",
            "aap",
        ] {
            let m = model_of(name, &corpus_doc(name));
            for (label, o) in [
                ("lb", opts(Agent::LinuxBridge, true, true)),
                ("lb --no-ipset", opts(Agent::LinuxBridge, true, false)),
            ] {
                let r = iptables::render(&m, &o);
                dp.apply_rendered(&r)
                    .unwrap_or_else(|e| panic!("{name} [{label}] {backend:?}: {e:#}"));
                let again = dp.apply_rendered(&r).unwrap();
                assert!(
                    !again.changed(),
                    "{name} [{label}] {backend:?}: second apply: {again}"
                );
                let v4 = save(&ns.name, backend, Ethertype::IPv4);
                assert!(v4.contains(&format!("-A FORWARD {FOREIGN_V4}\n")), "{v4}");
                assert!(
                    v4.contains("-A neutron-filter-top -j neutron-l3-agent-local\n"),
                    "{name}: {v4}"
                );
                assert!(v4.contains("-A FORWARD -j neutron-filter-top\n"), "{name}: {v4}");
                let v6 = save(&ns.name, backend, Ethertype::IPv6);
                assert!(v6.contains(&format!("-A FORWARD {FOREIGN_V6}\n")), "{v6}");
                if name != "empty" {
                    let mut f4 = foreign(Ethertype::IPv4);
                    f4.push(("neutron-filter-top", "-j neutron-l3-agent-local"));
                    compare(&r, Ethertype::IPv4, &v4, &f4)
                        .unwrap_or_else(|e| panic!("{name} [{label}]: {e:#}"));
                    compare(&r, Ethertype::IPv6, &v6, &foreign(Ethertype::IPv6))
                        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
                } else {
                    assert!(!v4.contains("neutron-linuxbri"), "{v4}");
                    let sets = ns_run(&ns.name, &["ipset", "list", "-n"], None).unwrap();
                    assert!(sets.trim().is_empty(), "sets left: {sets}");
                }
            }
        }
    }
}

#[test]
fn apply_of_rejected_input_or_refused_rules_changes_nothing() {
    let ns = Netns::new("sgr").unwrap();
    let dp = IptablesDataplane::new(Backend::Nft).in_netns(Some(ns.name.clone()));
    let spec12 = corpus_doc("spec12");
    dp.apply(&model_of("spec12", &spec12), &RenderOptions::new(LOCAL_HOST))
        .unwrap();
    let before = (
        save(&ns.name, Backend::Nft, Ethertype::IPv4),
        save(&ns.name, Backend::Nft, Ethertype::IPv6),
    );
    let sets_before = ns_run(&ns.name, &["ipset", "list", "-n"], None).unwrap();

    // Input Neutron's API refuses: the CLI names the object, field and value; nothing applied.
    let mut bad = spec12.clone();
    bad["ports"][0]["allowed_address_pairs"] = json!([{"ip_address": "::/0"}]);
    let dir = std::env::temp_dir().join(unique("sg-bad-"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.json");
    std::fs::write(&path, serde_json::to_vec(&bad).unwrap()).unwrap();
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(workspace_bin("sg").unwrap())
        .args(["iptables", "apply", "--host", LOCAL_HOST])
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(
            "port 7f7c1a9b-4412-4b3b-8a3c-2f1f9f3f0c11: allowed_address_pairs[0].ip_address=\"::/0\""
        ) && stderr.contains("multicast")
            && stderr.contains("nothing was applied"),
        "{stderr}"
    );

    // A ruleset the kernel refuses (here: a jump to a chain that does not exist, in the IPv6
    // filter table, with a new set in the render): the error names family and table, and
    // neither family nor the sets change.
    let mut doc = spec12.clone();
    doc["security_groups"][0]["security_group_rules"][5]["remote_group_id"] =
        json!("5e2b6c4d-1a2b-4c3d-8e9f-0a1b2c3d4e5f");
    doc["security_groups"][0]["security_group_rules"][5]["protocol"] = json!("udp");
    let mut r = iptables::render(&model_of("changed", &doc), &RenderOptions::new(LOCAL_HOST));
    r.tables[1][0]
        .rules
        .push(("neutron-linuxbri-sg-fallback".into(), "-j NO-SUCH-CHAIN".into()));
    let err = format!("{:#}", dp.apply_rendered(&r).unwrap_err());
    assert!(
        err.contains("IPv6") && err.contains("table filter") && err.contains("nothing was changed"),
        "{err}"
    );
    assert_eq!(save(&ns.name, Backend::Nft, Ethertype::IPv4), before.0);
    assert_eq!(save(&ns.name, Backend::Nft, Ethertype::IPv6), before.1);
    assert_eq!(
        ns_run(&ns.name, &["ipset", "list", "-n"], None).unwrap(),
        sets_before
    );
}

fn sg_cli(args: &[&str]) -> String {
    let out = Command::new(workspace_bin("sg").unwrap())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sg {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn render_formats_and_families() {
    let input = workspace_root().join("tests/corpus/spec12.json");
    let input = input.to_str().unwrap();
    let all = sg_cli(&["iptables", "render", "--host", LOCAL_HOST, input]);
    let v6 = sg_cli(&["iptables", "render", "--host", LOCAL_HOST, "--family", "6", input]);
    assert!(
        v6.starts_with("# IPv6\n*filter\n") && !v6.contains("# IPv4"),
        "{v6}"
    );
    let (_, v6_sets) = v6.split_once("# ipset\n").unwrap();
    assert!(
        v6_sets.contains("NIPv6") && !v6_sets.contains("NIPv4"),
        "{v6_sets}"
    );
    assert!(all.contains(&v6[..v6.find("# ipset").unwrap()]));
    let no_ipset = sg_cli(&["iptables", "render", "--host", LOCAL_HOST, "--no-ipset", input]);
    assert!(
        no_ipset.ends_with("COMMIT\n# ipset\n") && !no_ipset.contains("-m set"),
        "{no_ipset}"
    );

    // Restore format, one family: pipes into iptables-restore -n once the sets exist.
    let ns = Netns::new("sgf").unwrap();
    let m = model_of("spec12", &corpus_doc("spec12"));
    let r = iptables::render(&m, &RenderOptions::new(LOCAL_HOST));
    for (family, flag) in [(Ethertype::IPv4, "4"), (Ethertype::IPv6, "6")] {
        let save_fam = sg_cli(&[
            "iptables", "render", "--host", LOCAL_HOST, "--family", flag, input,
        ]);
        let sets = save_fam.split_once("# ipset\n").unwrap().1;
        ns_run(&ns.name, &["bash", "-e", "-s"], Some(sets)).unwrap();
        let restore = sg_cli(&[
            "iptables", "render", "--host", LOCAL_HOST, "--format", "restore", "--family", flag, input,
        ]);
        assert!(
            restore.starts_with("*filter\n:neutron-filter-top - [0:0]\n"),
            "{restore}"
        );
        assert!(
            restore.contains("-I FORWARD 1 -j neutron-filter-top\n"),
            "{restore}"
        );
        ns_run(
            &ns.name,
            &[&Backend::Nft.restore_cmd(family), "-n"],
            Some(&restore),
        )
        .unwrap();
        compare(&r, family, &save(&ns.name, Backend::Nft, family), &[]).unwrap();
    }
    let both = sg_cli(&[
        "iptables", "render", "--host", LOCAL_HOST, "--format", "restore", input,
    ]);
    assert!(both.starts_with("# IPv4\n*filter\n") && both.contains("# IPv6\n") && both.contains("# ipset\n"));
}

/// Spec §8.3: removing a rule makes Neutron's agent delete the conntrack entries of the rule's
/// protocol to the port's addresses in its zone. sg computes the same commands from the old
/// and new input and runs them.
#[test]
fn conntrack_cleanup_cuts_the_flows_of_a_removed_rule() {
    let old_doc = corpus_doc("spec12");
    let mut new_doc = old_doc.clone();
    // r5: ingress IPv4 tcp 22.
    new_doc["security_groups"][0]["security_group_rules"]
        .as_array_mut()
        .unwrap()
        .remove(4);
    let o = RenderOptions::new(LOCAL_HOST);
    let deletes = iptables::conntrack_cleanup(&model_of("old", &old_doc), &model_of("new", &new_doc), &o);
    let argv: Vec<String> = deletes.iter().map(|d| d.argv().join(" ")).collect();
    assert_eq!(
        argv,
        [
            "conntrack -D -p tcp -f ipv4 -d 10.0.0.100/32 -w 4097",
            "conntrack -D -p tcp -f ipv4 -d 10.0.0.5/32 -w 4097"
        ],
        "{deletes:#?}"
    );
    // Nothing to clean when nothing was removed.
    assert!(
        iptables::conntrack_cleanup(&model_of("new", &new_doc), &model_of("new", &new_doc), &o).is_empty()
    );

    let ns = Netns::new("sgct").unwrap();
    let ct = |args: &str| ns_run(&ns.name, &args.split(' ').collect::<Vec<_>>(), None).unwrap();
    ct(
        "conntrack -I -p tcp -s 10.0.0.9 -d 10.0.0.5 --sport 40000 --dport 22 --state ESTABLISHED -u ASSURED -t 120 -w 4097",
    );
    ct("conntrack -I -p udp -s 10.0.0.9 -d 10.0.0.5 --sport 40000 --dport 53 -t 120 -w 4097");
    ct(
        "conntrack -I -p tcp -s 10.0.0.9 -d 10.0.0.5 --sport 40001 --dport 22 --state ESTABLISHED -u ASSURED -t 120 -w 4098",
    );
    // The input change as the agent handles it: apply, then the cleanup.
    let dp = IptablesDataplane::new(Backend::Nft).in_netns(Some(ns.name.clone()));
    let (old, new) = (model_of("old", &old_doc), model_of("new", &new_doc));
    let change = dp.apply_change(Some(&old), &new, &o).unwrap();
    assert!(
        change.apply.changed() && change.conntrack_error.is_none(),
        "{change:?}"
    );
    assert_eq!(change.conntrack, deletes);
    let left = ct("conntrack -L");
    assert!(
        !left.contains("sport=40000 dport=22"),
        "the removed rule's flow survived:\n{left}"
    );
    assert!(
        left.contains("dport=53") && left.contains("zone=4098"),
        "other flows must stay:\n{left}"
    );

    // Members leaving a remote group cut flows from them, both directions.
    let mut fewer = old_doc.clone();
    fewer["ports"][1]["binding:host_id"] = json!("compute-2");
    fewer["ports"][1]["fixed_ips"] = json!([{"ip_address": "2001:db8::6"}]);
    let deletes = iptables::conntrack_cleanup(&model_of("old", &old_doc), &model_of("fewer", &fewer), &o);
    let argv: Vec<String> = deletes.iter().map(|d| d.argv().join(" ")).collect();
    assert!(
        argv.contains(&"conntrack -D -f ipv4 -d 10.0.0.5/32 -w 4097 -s 10.0.0.6".to_string()),
        "{argv:#?}"
    );
    assert!(
        argv.contains(&"conntrack -D -f ipv4 -s 10.0.0.5/32 -w 4097 -d 10.0.0.6".to_string()),
        "{argv:#?}"
    );
}

#[test]
fn agent_with_the_iptables_dataplane_applies_and_follows_the_input() {
    let ns = Netns::new("sgag").unwrap();
    let dir = std::env::temp_dir().join(unique("sg-ipt-agent-"));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("input.json");
    let run_dir = dir.join("run");
    std::fs::write(&input, serde_json::to_vec(&corpus_doc("spec12")).unwrap()).unwrap();
    let log = std::fs::File::create(dir.join("agent.log")).unwrap();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(workspace_bin("sg").unwrap())
        .args([
            "--run-dir",
            run_dir.to_str().unwrap(),
            "agent",
            "--dataplane",
            "iptables",
            "--backend",
            "legacy",
        ])
        .args(["--state", input.to_str().unwrap(), "--host", LOCAL_HOST])
        .env("NO_COLOR", "1")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let generation = || -> Option<u64> {
        let s = std::fs::read(run_dir.join("state.json")).ok()?;
        serde_json::from_slice::<Value>(&s).ok()?["generation"].as_u64()
    };
    let wait = |g: u64| {
        let deadline = Instant::now() + Duration::from_secs(15);
        while generation().is_none_or(|x| x < g) {
            assert!(
                Instant::now() < deadline,
                "agent did not reach generation {g}:\n{}",
                std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let check = |name: &str| {
        let r = iptables::render(
            &model_of(name, &corpus_doc(name)),
            &RenderOptions::new(LOCAL_HOST),
        );
        for family in Ethertype::ALL {
            compare(&r, family, &save(&ns.name, Backend::Legacy, family), &[])
                .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        }
    };
    wait(1);
    check("spec12");
    let tmp = dir.join("input.tmp");
    std::fs::write(&tmp, serde_json::to_vec(&corpus_doc("shared-group")).unwrap()).unwrap();
    std::fs::rename(&tmp, &input).unwrap();
    wait(2);
    check("shared-group");
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap();
    // The rules stay after the agent exits.
    check("shared-group");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The differential harness applies from a thread that has `setns`'d into the compute node's
/// namespace: the commands must act there, not in the test's namespace.
#[test]
fn apply_from_a_thread_inside_the_namespace() {
    let ns = Netns::new("sgt").unwrap();
    let r = iptables::render(
        &model_of("spec12", &corpus_doc("spec12")),
        &RenderOptions::new(LOCAL_HOST),
    );
    let r2 = r.clone();
    sg_tests::spawn_in(&ns.name, move || {
        IptablesDataplane::new(Backend::Nft)
            .apply_rendered(&r2)
            .map(|_| ())
    })
    .join()
    .unwrap()
    .unwrap()
    .unwrap();
    for family in Ethertype::ALL {
        compare(&r, family, &save(&ns.name, Backend::Nft, family), &[]).unwrap();
    }
    let here = Command::new("ipset").args(["list", "-n"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&here.stdout).contains("NIPv45e2b6c4d-1a2b-4c3d-8e9f-"),
        "the sets went to the test's own namespace"
    );
}

/// Issue 12's reproduction: without ipset, a remote group's rules are expanded in address
/// order, for both families and both agents. As text, `2001:db8:1::68b` sorts before `::99`
/// and `10.0.0.10` before `10.0.0.9`.
#[test]
fn remote_group_members_expand_in_address_order() {
    let sg = "5e1f0000-0000-4000-8000-000000000001";
    let port = |id: &str, host: &str, ips: &[&str], mac: &str| {
        json!({"id": id, "mac_address": mac, "network_id": "net-1", "binding:host_id": host,
               "fixed_ips": ips.iter().map(|ip| json!({"ip_address": ip})).collect::<Vec<_>>(),
               "security_groups": [sg]})
    };
    let doc = json!({
        "security_groups": [{"id": sg, "security_group_rules": [
            {"id": "r6", "direction": "egress", "ethertype": "IPv6", "protocol": "tcp",
             "port_range_min": 22, "port_range_max": 22, "remote_group_id": sg},
            {"id": "r4", "direction": "egress", "ethertype": "IPv4", "protocol": "tcp",
             "port_range_min": 22, "port_range_max": 22, "remote_group_id": sg}]}],
        "address_groups": [],
        "ports": [
            port("aaaa0000-0000-4000-8000-000000000001", LOCAL_HOST, &["2001:db8:1::5", "10.0.0.5"], "fa:16:3e:00:00:01"),
            port("bbbb0000-0000-4000-8000-000000000002", "compute-2", &["2001:db8:1::68b", "10.0.0.10"], "fa:16:3e:00:00:02"),
            port("cccc0000-0000-4000-8000-000000000003", "compute-2", &["2001:db8:1::ae6", "10.0.0.100"], "fa:16:3e:00:00:03"),
            port("dddd0000-0000-4000-8000-000000000004", "compute-2", &["2001:db8:1::99", "10.0.0.9"], "fa:16:3e:00:00:04"),
        ],
    });
    let dir = std::env::temp_dir().join(unique("sg-order-"));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("members.json");
    std::fs::write(&input, doc.to_string()).unwrap();
    for agent in ["linuxbridge", "ovs-hybrid"] {
        for (family, want) in [
            (
                "6",
                ["2001:db8:1::99/128", "2001:db8:1::68b/128", "2001:db8:1::ae6/128"],
            ),
            ("4", ["10.0.0.9/32", "10.0.0.10/32", "10.0.0.100/32"]),
        ] {
            let out = sg_cli(&[
                "iptables",
                "render",
                "--host",
                LOCAL_HOST,
                "--no-ipset",
                "--agent",
                agent,
                "--family",
                family,
                input.to_str().unwrap(),
            ]);
            let order: Vec<&str> = out
                .lines()
                .filter(|l| l.contains("--dport 22"))
                .filter_map(|l| l.split(" -d ").nth(1)?.split(' ').next())
                .collect();
            assert_eq!(order, want, "{agent}, IPv{family}:\n{out}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
