//! Step 4: make the kernel hold what [`super::render()`] printed, in the current network
//! namespace (or a named one), without touching what is not Neutron's.
//!
//! One apply:
//! 1. read the live state: `iptables-save` / `ip6tables-save` and the ipsets;
//! 2. per table, compare the live Neutron part with the render in the kernel's canonical form
//!    ([`super::canon`]); tables that match are left alone, so a repeat apply changes nothing;
//! 3. create the sets that do not exist yet, with Neutron's sequence (`create -exist`,
//!    `restore` into `NAME-n`, `swap`, `destroy`); nothing references them yet;
//! 4. `iptables-restore --test --noflush` both families: a rejected ruleset changes nothing
//!    (the new sets are destroyed again) and the error names the family and table;
//! 5. refill the existing sets whose members changed (`restore` into `NAME-n`, `swap`);
//! 6. `iptables-restore --noflush`, then `ip6tables-restore --noflush`. The input declares the
//!    Neutron chains (creating or flushing them), deletes the previous Neutron rules from the
//!    builtin chains and `neutron-filter-top`, inserts the new ones at their top (where
//!    Neutron puts them, before foreign rules), deletes Neutron chains no longer used. Builtin
//!    chains are never declared: policies, counters and foreign rules stay. If a family
//!    fails, the families already restored get their previous tables back and the sets are
//!    swapped back;
//! 7. destroy the temporary sets and the `NIPv4…`/`NIPv6…` sets nothing uses any more.
//!
//! Commands run as children of the calling thread, so they act in that thread's network
//! namespace (a thread that has `setns`'d works); with a netns name they run under
//! `ip netns exec`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::Write as _;
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

use super::canon::kernel_form;
use super::neutron::{self, RuleDict};
use super::{IpSet, RenderOptions, Rendered, Table, render};
use crate::model::{Direction, Ethertype, Model, Remote, addr};

/// The iptables back end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// iptables-nft (nf_tables kernel API).
    Nft,
    /// iptables-legacy (x_tables).
    Legacy,
}

impl Backend {
    fn tool(self, family: Ethertype, what: &str) -> String {
        let ip = match family {
            Ethertype::IPv4 => "iptables",
            Ethertype::IPv6 => "ip6tables",
        };
        let b = match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        };
        format!("{ip}-{b}-{what}")
    }

    pub fn save_cmd(self, family: Ethertype) -> String {
        self.tool(family, "save")
    }

    pub fn restore_cmd(self, family: Ethertype) -> String {
        self.tool(family, "restore")
    }
}

/// One table as `iptables-save` lists it on the host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LiveTable {
    /// User chains.
    pub chains: Vec<String>,
    /// (chain, rule) in order.
    pub rules: Vec<(String, String)>,
}

/// Parses `iptables-save` output into tables.
pub fn parse_save(text: &str) -> BTreeMap<String, LiveTable> {
    let mut out: BTreeMap<String, LiveTable> = BTreeMap::new();
    let mut cur: Option<String> = None;
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(t) = line.strip_prefix('*') {
            cur = Some(t.to_string());
            out.entry(t.to_string()).or_default();
        } else if line == "COMMIT" {
            cur = None;
        } else if let Some(t) = cur.as_ref().and_then(|c| out.get_mut(c)) {
            if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split(' ').next().unwrap_or_default().to_string();
                let policy = decl.split(' ').nth(1).unwrap_or("-");
                if policy == "-" {
                    t.chains.push(name);
                }
            } else if let Some(rest) = line.strip_prefix("-A ") {
                let (chain, rule) = rest.split_once(' ').unwrap_or((rest, ""));
                t.rules.push((chain.to_string(), rule.to_string()));
            }
        }
    }
    out
}

const FILTER_TOP: &str = "neutron-filter-top";

/// Seconds `iptables-restore` waits for the xtables lock (`-w`, as Neutron passes it):
/// iptables-legacy holds one lock for all network namespaces, so concurrent writers elsewhere
/// on the host would otherwise make a restore fail at once. iptables-nft ignores it.
const LOCK_WAIT: &str = "10";

fn is_builtin(table: &str, chain: &str) -> bool {
    render::BUILTIN
        .iter()
        .any(|(t, cs)| *t == table && cs.contains(&chain))
}

/// Whether a live line belongs to Neutron's manager for `wrap`: it names the wrap (its chain
/// or its target), or it is the shared `neutron-filter-top` hook (as Neutron, which drops
/// every line equal to one of its own rules before re-adding them).
fn owned(wrap: &str, chain: &str, rule: &str) -> bool {
    chain.contains(wrap) || rule.contains(wrap) || is_top_hook(chain, rule)
}

fn is_top_hook(chain: &str, rule: &str) -> bool {
    (chain == "FORWARD" || chain == "OUTPUT") && rule == format!("-j {FILTER_TOP}")
}

/// Owned lines sg removes. When the render has no `neutron-filter-top` (no local port) but
/// the host's holds other agents' rules, the chain stays and so do its hooks: removing them
/// would cut those agents off.
fn removable(t: &Table, live: &LiveTable, wrap: &str, chain: &str, rule: &str) -> bool {
    if !owned(wrap, chain, rule) {
        return false;
    }
    if !is_top_hook(chain, rule) {
        return true;
    }
    let keep_hooks = !t.chains.iter().any(|c| c == FILTER_TOP)
        && live.chains.iter().any(|c| c == FILTER_TOP)
        && !stale_chains(t, live, wrap).iter().any(|c| c == FILTER_TOP);
    !(keep_hooks && is_top_hook(chain, rule))
}

/// Chains whose Neutron lines sg edits in place (`-D` / `-I`) rather than by declaring them:
/// builtin chains, and `neutron-filter-top` when it exists (it is shared with Neutron's other
/// agents, whose rules in it must stay).
fn edited_in_place(table: &str, chain: &str, live: &LiveTable) -> bool {
    is_builtin(table, chain) || (chain == FILTER_TOP && live.chains.iter().any(|c| c == FILTER_TOP))
}

/// Rules grouped by chain, in order (one pass: tables hold ~10^5 rules on a busy host).
fn by_chain(rules: &[(String, String)]) -> HashMap<&str, Vec<&str>> {
    let mut m: HashMap<&str, Vec<&str>> = HashMap::new();
    for (c, r) in rules {
        m.entry(c.as_str()).or_default().push(r.as_str());
    }
    m
}

/// Stale Neutron chains: live chains of this wrap that the render no longer has;
/// `neutron-filter-top` too when unused and holding nothing foreign.
fn stale_chains(t: &Table, live: &LiveTable, wrap: &str) -> Vec<String> {
    let mut out: Vec<String> = live
        .chains
        .iter()
        .filter(|c| c.contains(wrap) && !t.chains.contains(c))
        .cloned()
        .collect();
    if !t.chains.iter().any(|c| c == FILTER_TOP)
        && live.chains.iter().any(|c| c == FILTER_TOP)
        && live
            .rules
            .iter()
            .filter(|(c, _)| c == FILTER_TOP)
            .all(|(c, r)| owned(wrap, c, r))
        && live
            .rules
            .iter()
            .filter(|(_, r)| r.split(' ').any(|x| x == FILTER_TOP))
            .all(|(c, r)| owned(wrap, c, r))
    {
        out.push(FILTER_TOP.to_string());
    }
    out
}

/// Whether two rule lists are the same once in the kernel's canonical form.
fn same_rules(want: &[&str], have: &[&str]) -> bool {
    want.len() == have.len()
        && want
            .iter()
            .zip(have)
            .all(|(w, h)| w == h || kernel_form(w) == kernel_form(h))
}

/// Whether the live table already holds exactly the rendered Neutron part.
pub fn in_sync(t: &Table, live: &LiveTable, wrap: &str) -> bool {
    restore_plan(t, live, wrap).is_empty()
}

/// `iptables-restore --noflush` input turning `live` into `t` (see module docs); only the
/// chains that differ are touched, so a one-rule change rewrites one chain. With an empty
/// `live` this is what `sg iptables render --format restore` prints.
pub fn restore_input(t: &Table, live: &LiveTable, wrap: &str) -> String {
    let mut s = format!("*{}\n", t.name);
    for line in restore_plan(t, live, wrap) {
        s.push_str(&line);
        s.push('\n');
    }
    s.push_str("COMMIT\n");
    s
}

fn rules_of<'a>(m: &HashMap<&str, Vec<&'a str>>, chain: &str) -> Vec<&'a str> {
    m.get(chain).cloned().unwrap_or_default()
}

/// The restore commands of [`restore_input`], empty when the table is in sync.
fn restore_plan(t: &Table, live: &LiveTable, wrap: &str) -> Vec<String> {
    let stale = stale_chains(t, live, wrap);
    let desired = by_chain(&t.rules);
    let current = by_chain(&live.rules);

    // Chains sg declares (creating or flushing them) and fills: those missing or different.
    let declared: Vec<&String> = t
        .chains
        .iter()
        .filter(|c| !edited_in_place(t.name, c, live))
        .filter(|c| !live.chains.contains(c) || !same_rules(&rules_of(&desired, c), &rules_of(&current, c)))
        .collect();
    // Chains edited in place whose Neutron part is not ours-first-and-only.
    let in_place: Vec<String> = t
        .builtin
        .iter()
        .map(|c| c.to_string())
        .chain(t.chains.iter().cloned())
        .chain(live.rules.iter().map(|(c, _)| c.clone()))
        .collect::<BTreeSet<String>>()
        .into_iter()
        .filter(|c| edited_in_place(t.name, c, live) && !stale.contains(c))
        .filter(|c| {
            let want = rules_of(&desired, c);
            let have = rules_of(&current, c);
            let head = &have[..want.len().min(have.len())];
            !same_rules(&want, head) || have[head.len()..].iter().any(|r| removable(t, live, wrap, c, r))
        })
        .collect();

    let mut out = Vec::new();
    for c in declared
        .iter()
        .map(|c| c.as_str())
        .chain(stale.iter().map(String::as_str))
    {
        out.push(format!(":{c} - [0:0]"));
    }
    // Previous Neutron lines of the chains kept in place.
    for (c, r) in &live.rules {
        if in_place.contains(c) && removable(t, live, wrap, c, r) {
            out.push(format!("-D {c} {r}"));
        }
    }
    for c in &in_place {
        for (i, r) in rules_of(&desired, c).iter().enumerate() {
            out.push(format!("-I {c} {} {r}", i + 1));
        }
    }
    for c in &declared {
        for r in rules_of(&desired, c) {
            out.push(format!("-A {c} {r}"));
        }
    }
    for c in &stale {
        out.push(format!("-X {c}"));
    }
    out
}

/// What an apply changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// (family, table) restored.
    pub tables: Vec<(Ethertype, &'static str)>,
    pub sets_created: Vec<String>,
    pub sets_updated: Vec<String>,
    pub sets_destroyed: Vec<String>,
}

impl ApplyReport {
    pub fn changed(&self) -> bool {
        !(self.tables.is_empty()
            && self.sets_created.is_empty()
            && self.sets_updated.is_empty()
            && self.sets_destroyed.is_empty())
    }
}

impl std::fmt::Display for ApplyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.changed() {
            return f.write_str("no change");
        }
        let tables: Vec<String> = self
            .tables
            .iter()
            .map(|(e, t)| format!("{} {t}", e.as_str()))
            .collect();
        write!(
            f,
            "tables restored: [{}]; sets created {}, updated {}, destroyed {}",
            tables.join(", "),
            self.sets_created.len(),
            self.sets_updated.len(),
            self.sets_destroyed.len()
        )
    }
}

/// What [`IptablesDataplane::apply_change`] did.
#[derive(Clone, Debug, Default)]
pub struct ChangeReport {
    pub apply: ApplyReport,
    /// The conntrack deletions run.
    pub conntrack: Vec<ConntrackDelete>,
    /// Set when a deletion failed (the rules are applied all the same).
    pub conntrack_error: Option<String>,
}

/// The iptables back end of sg: applies renders, runs conntrack cleanups.
#[derive(Clone, Debug)]
pub struct IptablesDataplane {
    pub backend: Backend,
    /// Named network namespace (`ip netns exec`); None: the calling thread's.
    pub netns: Option<String>,
}

struct Output {
    ok: bool,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl IptablesDataplane {
    pub fn new(backend: Backend) -> Self {
        IptablesDataplane { backend, netns: None }
    }

    pub fn in_netns(mut self, netns: Option<String>) -> Self {
        self.netns = netns;
        self
    }

    fn run(&self, argv: &[&str], stdin: Option<&str>) -> Result<Output> {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).args(argv);
                c
            }
            None => {
                let mut c = Command::new(argv[0]);
                c.args(&argv[1..]);
                c
            }
        };
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", argv.join(" ")))?;
        if let Some(input) = stdin {
            let mut w = child.stdin.take().expect("piped");
            let input = input.to_string();
            // A writer thread: a large input must not dead-lock against a full stdout pipe.
            let h = std::thread::spawn(move || w.write_all(input.as_bytes()));
            let out = child.wait_with_output()?;
            let _ = h.join();
            return Ok(Output {
                ok: out.status.success(),
                code: out.status.code(),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        let out = child.wait_with_output()?;
        Ok(Output {
            ok: out.status.success(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    fn run_ok(&self, argv: &[&str], stdin: Option<&str>) -> Result<String> {
        let out = self.run(argv, stdin)?;
        if !out.ok {
            bail!("`{}` failed: {}", argv.join(" "), out.stderr.trim());
        }
        Ok(out.stdout)
    }

    /// `iptables-save` of one family.
    pub fn save(&self, family: Ethertype) -> Result<String> {
        self.run_ok(&[&self.backend.save_cmd(family)], None)
    }

    /// Names of the ipsets that exist.
    fn live_sets(&self) -> Result<BTreeSet<String>> {
        Ok(self
            .run_ok(&["ipset", "list", "-n"], None)?
            .lines()
            .map(str::to_string)
            .collect())
    }

    /// Members of a set as networks (ipset prints `/32` hosts without the length).
    fn set_members(&self, name: &str) -> Result<BTreeSet<String>> {
        let text = self.run_ok(&["ipset", "list", name], None)?;
        Ok(text
            .lines()
            .skip_while(|l| !l.starts_with("Members:"))
            .skip(1)
            .filter_map(|l| l.split_whitespace().next())
            .filter_map(canonical_member)
            .collect())
    }

    /// Runs one set's Neutron commands; with `keep_old` the swapped-out set `NAME-n` is kept
    /// (holding the previous members) for a rollback, and destroyed by the caller.
    fn run_set_commands(&self, set: &IpSet, keep_old: bool) -> Result<()> {
        let mut lines = set.commands.iter();
        while let Some(line) = lines.next() {
            if line == "ipset restore -exist <<'EOF'" {
                let mut input = String::new();
                for l in lines.by_ref() {
                    if l == "EOF" {
                        break;
                    }
                    input.push_str(l);
                    input.push('\n');
                }
                self.run_ok(&["ipset", "restore", "-exist"], Some(&input))
                    .with_context(|| format!("ipset {}", set.name))?;
                continue;
            }
            if keep_old && line.starts_with("ipset destroy ") {
                continue;
            }
            let argv: Vec<&str> = line.split(' ').collect();
            self.run_ok(&argv, None)
                .with_context(|| format!("ipset {}", set.name))?;
        }
        Ok(())
    }

    fn destroy_set(&self, name: &str) -> Result<()> {
        self.run_ok(&["ipset", "destroy", name], None).map(|_| ())
    }

    /// Renders `model` and applies it (module docs).
    pub fn apply(&self, model: &Model, opts: &RenderOptions) -> Result<ApplyReport> {
        self.apply_rendered(&super::render(model, opts))
    }

    /// A change of input as Neutron's agent handles it: apply `new`, then delete the conntrack
    /// entries of what went away since `old` ([`conntrack_cleanup`]), so that established
    /// flows a removed rule or member allowed are cut as under Neutron. An error means nothing
    /// was applied; a failed cleanup after a good apply is reported in the result.
    pub fn apply_change(
        &self,
        old: Option<&Model>,
        new: &Model,
        opts: &RenderOptions,
    ) -> Result<ChangeReport> {
        let apply = self.apply(new, opts)?;
        let conntrack = old.map(|o| conntrack_cleanup(o, new, opts)).unwrap_or_default();
        let conntrack_error = self.conntrack_delete(&conntrack).err().map(|e| format!("{e:#}"));
        Ok(ChangeReport {
            apply,
            conntrack,
            conntrack_error,
        })
    }

    /// Applies a render (module docs).
    pub fn apply_rendered(&self, r: &Rendered) -> Result<ApplyReport> {
        let wrap = r.agent.wrap();
        let mut report = ApplyReport::default();

        // 1-2. live state, restore inputs of the tables that differ.
        let mut before: Vec<(Ethertype, String)> = Vec::new();
        let mut inputs: Vec<(Ethertype, String, Vec<&'static str>)> = Vec::new();
        for (i, family) in Ethertype::ALL.into_iter().enumerate() {
            let text = self
                .save(family)
                .with_context(|| format!("reading the {} ruleset", family.as_str()))?;
            let live = parse_save(&text);
            let mut input = String::new();
            let mut changed = Vec::new();
            for t in &r.tables[i] {
                let l = live.get(t.name).cloned().unwrap_or_default();
                if !in_sync(t, &l, wrap) {
                    input.push_str(&restore_input(t, &l, wrap));
                    changed.push(t.name);
                }
            }
            if !changed.is_empty() {
                before.push((family, text));
                inputs.push((family, input, changed));
            }
        }

        // 3. new sets; which existing ones change.
        let live_sets = self.live_sets()?;
        let mut created: Vec<&IpSet> = Vec::new();
        let mut updated: Vec<&IpSet> = Vec::new();
        let undo_created = |created: &[&IpSet]| {
            for s in created {
                let _ = self.destroy_set(&s.name);
                let _ = self.run(&["ipset", "destroy", &s.swap_name()], None);
            }
        };
        for set in &r.ipsets {
            if live_sets.contains(&set.name) {
                let want: BTreeSet<String> = set.members.iter().filter_map(|m| canonical_member(m)).collect();
                if self.set_members(&set.name)? != want {
                    updated.push(set);
                }
            } else {
                if let Err(e) = self.run_set_commands(set, false) {
                    undo_created(&created);
                    let _ = self.destroy_set(&set.name);
                    return Err(e.context("creating the ipsets; nothing was changed"));
                }
                created.push(set);
            }
        }

        // 4. dry run.
        for (family, input, _) in &inputs {
            let tool = self.backend.restore_cmd(*family);
            let out = self.run(&[&tool, "--test", "--noflush", "-w", LOCK_WAIT], Some(input))?;
            if !out.ok {
                undo_created(&created);
                bail!(
                    "{} rejected the {} rules ({}): {}; nothing was changed",
                    tool,
                    family.as_str(),
                    failing_table(input, &out.stderr),
                    out.stderr.trim()
                );
            }
        }

        // 5. refill changed sets, keeping the old members in NAME-n for a rollback.
        let mut swapped: Vec<&IpSet> = Vec::new();
        let rollback_sets = |swapped: &[&IpSet]| {
            for s in swapped {
                let _ = self.run(&["ipset", "swap", &s.swap_name(), &s.name], None);
                let _ = self.run(&["ipset", "destroy", &s.swap_name()], None);
            }
        };
        for set in &updated {
            let refresh = IpSet {
                commands: refresh_commands(set),
                ..(*set).clone()
            };
            if let Err(e) = self.run_set_commands(&refresh, true) {
                rollback_sets(&swapped);
                undo_created(&created);
                return Err(e.context("updating the ipsets; nothing was changed"));
            }
            swapped.push(set);
        }

        // 6. restore, family by family.
        let mut done: Vec<Ethertype> = Vec::new();
        for (family, input, tables) in &inputs {
            let tool = self.backend.restore_cmd(*family);
            let out = self.run(&[&tool, "--noflush", "-w", LOCK_WAIT], Some(input))?;
            if !out.ok {
                // Put back what this apply changed: the families already restored get their
                // previous tables (the full save text, without --noflush, replaces each table
                // it lists), the sets their previous members.
                let mut rolled_back = true;
                for f in &done {
                    let prev = &before.iter().find(|(e, _)| e == f).expect("saved").1;
                    if !self
                        .run(&[&self.backend.restore_cmd(*f), "-w", LOCK_WAIT], Some(prev))
                        .is_ok_and(|o| o.ok)
                    {
                        rolled_back = false;
                    }
                }
                rollback_sets(&swapped);
                undo_created(&created);
                let note = match (done.is_empty(), rolled_back) {
                    (true, _) => "; nothing was changed".to_string(),
                    (false, true) => format!(
                        "; the {} rules were put back: nothing was changed",
                        done.iter().map(|f| f.as_str()).collect::<Vec<_>>().join(" and ")
                    ),
                    (false, false) => format!(
                        "; putting back the previous {} rules FAILED: the host is half-applied",
                        done.iter().map(|f| f.as_str()).collect::<Vec<_>>().join(" and ")
                    ),
                };
                bail!(
                    "{} failed on the {} rules ({}): {}{}",
                    tool,
                    family.as_str(),
                    failing_table(input, &out.stderr),
                    out.stderr.trim(),
                    note
                );
            }
            done.push(*family);
            report.tables.extend(tables.iter().map(|t| (*family, *t)));
        }

        // 7. clean up.
        for s in &swapped {
            let _ = self.run(&["ipset", "destroy", &s.swap_name()], None);
        }
        report.sets_created = created.iter().map(|s| s.name.clone()).collect();
        report.sets_updated = swapped.iter().map(|s| s.name.clone()).collect();
        let wanted: HashSet<&str> = r.ipsets.iter().map(|s| s.name.as_str()).collect();
        for name in live_sets {
            if (name.starts_with("NIPv4") || name.starts_with("NIPv6")) && !wanted.contains(name.as_str()) {
                // A set still referenced by someone else's rule cannot go; that is theirs.
                if self.destroy_set(&name).is_ok() {
                    report.sets_destroyed.push(name);
                }
            }
        }
        Ok(report)
    }

    /// Runs conntrack deletions (exit status 1, "0 flow entries deleted", is success).
    pub fn conntrack_delete(&self, deletes: &[ConntrackDelete]) -> Result<()> {
        for d in deletes {
            let argv = d.argv();
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            let out = self.run(&argv, None)?;
            if !(out.ok || out.code == Some(1)) {
                bail!("`{}` failed: {}", argv.join(" "), out.stderr.trim());
            }
        }
        Ok(())
    }
}

/// The refresh sequence for an existing set (`_refresh_set`).
fn refresh_commands(set: &IpSet) -> Vec<String> {
    let tmp = set.swap_name();
    let mut c = vec![
        "ipset restore -exist <<'EOF'".to_string(),
        format!("create {tmp} hash:net family {}", set.set_type()),
    ];
    c.extend(set.members.iter().map(|m| format!("add {tmp} {m}")));
    c.push("EOF".to_string());
    c.push(format!("ipset swap {tmp} {}", set.name));
    c.push(format!("ipset destroy {tmp}"));
    c
}

/// An ipset entry as a network string (`10.0.0.5` and `10.0.0.5/32` are the same entry).
fn canonical_member(m: &str) -> Option<String> {
    addr::parse_network(m).map(|n| addr::net_to_string(n.trunc()))
}

/// Which table of a restore input the failing line ("line N failed") is in.
fn failing_table(input: &str, stderr: &str) -> String {
    // legacy: "iptables-restore: line 5 failed"; nft: "Error occurred at line: 5"
    let line_no = stderr.split("line").skip(1).find_map(|s| {
        let s = s.trim_start_matches([':', ' ']);
        let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<usize>().ok()
    });
    let Some(n) = line_no else {
        return "table unknown".to_string();
    };
    let mut table = "?";
    for (i, l) in input.lines().enumerate() {
        if let Some(t) = l.strip_prefix('*') {
            table = t;
        }
        if i + 1 == n {
            return format!("table {table}, line {n}: {l}");
        }
    }
    format!("line {n}")
}

/// One `conntrack -D` Neutron's agent runs (spec §8.3).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConntrackDelete {
    /// `-p` value as stored in the rule (`0` written `ip`); None: any protocol.
    pub protocol: Option<String>,
    /// `ipv4` / `ipv6`.
    pub family: &'static str,
    /// The port's rule direction: ingress flows are matched by destination (`-d port-ip`).
    pub direction: Direction,
    /// `str(IPNetwork(ip))` of a port's fixed IP or pair address.
    pub port_ip: String,
    pub zone: u32,
    /// A removed member: the flow's other end (`-s` for ingress, `-d` for egress).
    pub remote_ip: Option<String>,
}

impl ConntrackDelete {
    pub fn argv(&self) -> Vec<String> {
        let mut a = vec!["conntrack".to_string(), "-D".to_string()];
        if let Some(p) = &self.protocol {
            a.extend([
                "-p".to_string(),
                if p == "0" { "ip".to_string() } else { p.clone() },
            ]);
        }
        a.extend(["-f".to_string(), self.family.to_string()]);
        let (mine, theirs) = match self.direction {
            Direction::Ingress => ("-d", "-s"),
            Direction::Egress => ("-s", "-d"),
        };
        a.extend([
            mine.to_string(),
            self.port_ip.clone(),
            "-w".to_string(),
            self.zone.to_string(),
        ]);
        if let Some(r) = &self.remote_ip {
            a.extend([theirs.to_string(), r.clone()]);
        }
        a
    }
}

/// The conntrack deletions Neutron's agent runs when the input goes from `old` to `new`
/// (spec §8.3; `iptables_firewall.py` `_remove_conntrack_entries_from_sg_updates`,
/// `_update_ipset_members`, `_remove_conntrack_entries_from_port_deleted`):
/// - a rule removed from a group: for every filtered local port still in the group, flows of
///   the rule's protocol (no port or remote match) to (ingress) / from (egress) each of the
///   port's addresses of the rule's family;
/// - members removed from a remote *security* group: for every port whose rules reference
///   the group, flows between the port's addresses and each removed member, both directions
///   (address-group changes clean nothing: Neutron only tracks remote SGs here);
/// - a security group removed from a port, and a port removed: all flows of the port's
///   addresses, both directions.
///
/// Zones are the ones the flows were tracked in: the old render's for ports that existed.
pub fn conntrack_cleanup(old: &Model, new: &Model, opts: &RenderOptions) -> Vec<ConntrackDelete> {
    let old_view = neutron::server_view(old, opts);
    let new_view = neutron::server_view(new, opts);
    let old_zones = render::zones(&old_view, opts);
    let new_zones = render::zones(&new_view, opts);
    let zone_of = |id: &str| old_zones.get(id).or(new_zones.get(id)).copied();
    let mut out: BTreeSet<ConntrackDelete> = BTreeSet::new();

    let port_ips = |p: &crate::model::Port, e: Ethertype| -> Vec<String> {
        p.fixed_ips
            .iter()
            .map(|f| addr::ip_to_string(f.ip))
            .chain(p.allowed_address_pairs.iter().map(|a| a.ip_address.clone()))
            .filter_map(|ip| addr::parse_network(&ip))
            .filter(|n| Ethertype::of_net(*n) == e)
            .map(addr::net_to_string)
            .collect()
    };
    let filtered_new: Vec<&neutron::PortDict> = new_view
        .devices
        .iter()
        .filter(|d| d.port.port_security_enabled)
        .collect();
    let family = |e: Ethertype| match e {
        Ethertype::IPv4 => "ipv4",
        Ethertype::IPv6 => "ipv6",
    };
    let flush = |p: &crate::model::Port,
                 e: Ethertype,
                 rule: Option<&RuleDict>,
                 dirs: &[Direction],
                 remote: Option<&str>,
                 out: &mut BTreeSet<ConntrackDelete>| {
        let Some(zone) = zone_of(&p.id) else { return };
        for ip in port_ips(p, e) {
            for &d in dirs {
                out.insert(ConntrackDelete {
                    protocol: rule.and_then(|r| r.protocol.clone()),
                    family: family(e),
                    direction: d,
                    port_ip: ip.clone(),
                    zone,
                    remote_ip: remote.map(str::to_string),
                });
            }
        }
    };

    // Removed rules.
    for (sg_id, old_rules) in &old_view.sg_rules {
        let new_rules = new_view.sg_rules.get(sg_id).map(Vec::as_slice).unwrap_or(&[]);
        for rule in old_rules.iter().filter(|r| !new_rules.contains(r)) {
            for d in filtered_new
                .iter()
                .filter(|d| d.port.security_groups.contains(sg_id))
            {
                flush(
                    d.port,
                    rule.ethertype,
                    Some(rule),
                    &[rule.direction],
                    None,
                    &mut out,
                );
            }
        }
    }

    // Removed members of remote security groups.
    for d in &filtered_new {
        let referenced: BTreeSet<(String, Ethertype)> = d
            .port
            .security_groups
            .iter()
            .filter_map(|g| new.security_group(g))
            .flat_map(|sg| sg.rules.iter())
            .filter_map(|r| match &r.remote {
                Remote::Group(g) => Some((g.clone(), r.ethertype)),
                _ => None,
            })
            .collect();
        let sources: BTreeSet<&String> = referenced.iter().map(|(g, _)| g).collect();
        for g in sources {
            for e in Ethertype::ALL {
                let ips = |v: &neutron::ServerView, ipset: bool| -> BTreeSet<String> {
                    v.members
                        .get(g)
                        .and_then(|m| m.get(&e))
                        .map(|m| {
                            m.iter()
                                .map(|(ip, _)| {
                                    if ipset {
                                        // ipset path: the removed entry's address (`IPNetwork(x).ip`)
                                        addr::parse_network(ip)
                                            .map(|n| addr::ip_to_string(n.addr()))
                                            .unwrap_or_else(|| ip.clone())
                                    } else {
                                        ip.clone()
                                    }
                                })
                                .collect()
                        })
                        .unwrap_or_default()
                };
                let removed: Vec<String> = ips(&old_view, opts.ipset)
                    .difference(&ips(&new_view, opts.ipset))
                    .cloned()
                    .collect();
                for remote in removed {
                    flush(d.port, e, None, &Direction::ALL, Some(&remote), &mut out);
                }
            }
        }
    }

    // A group removed from a port; a port gone.
    let old_filtered: HashMap<&str, &neutron::PortDict> = old_view
        .devices
        .iter()
        .filter(|d| d.port.port_security_enabled)
        .map(|d| (d.port.id.as_str(), d))
        .collect();
    let new_ids: HashSet<&str> = filtered_new.iter().map(|d| d.port.id.as_str()).collect();
    for (id, od) in &old_filtered {
        let gone = !new_ids.contains(id);
        let lost_group = filtered_new.iter().find(|d| d.port.id == *id).is_some_and(|nd| {
            od.port
                .security_groups
                .iter()
                .any(|g| !nd.port.security_groups.contains(g))
        });
        if gone || lost_group {
            let port = if gone {
                od.port
            } else {
                filtered_new
                    .iter()
                    .find(|d| d.port.id == *id)
                    .expect("found")
                    .port
            };
            for e in Ethertype::ALL {
                flush(port, e, None, &Direction::ALL, None, &mut out);
            }
        }
    }
    out.into_iter().collect()
}
