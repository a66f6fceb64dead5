//! The agent: follow taps, watch the input, reconcile the datapath.
//!
//! The loop drives one of two back ends (`--dataplane`): sg's eBPF datapath, or Neutron's own
//! iptables ruleset ([`crate::iptables`], for hosts without eBPF and as the reference side of
//! the differential test). One loop, three sources of change:
//! - the input file or directory changed (inotify): validate, compile, apply; a rejected input
//!   is logged and the running policy stays as it is;
//! - an interface appeared, disappeared or was renamed (rtnetlink): re-apply the last good
//!   compilation against the new name → ifindex table;
//! - a timer: collect expired conntrack entries and pins of vanished interfaces.
//!
//! Exiting (SIGTERM, SIGINT, or a crash) leaves maps and links pinned: enforcement stays, and
//! the next agent takes the links over with an atomic program swap.

pub mod apply;
mod delta;
pub mod links;
mod watch;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use self::apply::{Applier, RunState, log_report};
use crate::{
    compile::{self, Compiled},
    datapath::{Datapath, LoadOptions},
    iptables, model, pinned,
};

#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Neutron input: a JSON file or a directory of them.
    pub state: PathBuf,
    pub host: String,
    pub pin_root: PathBuf,
    /// Where the run-state file for the CLI goes.
    pub run_dir: PathBuf,
    /// Named netns holding the taps (for namespace compute nodes); `None`: this one.
    pub netns: Option<String>,
    /// Capacity of SG_CONNTRACK (flows not assured yet) and of SG_CT_ASSURED.
    pub ct_entries: u32,
    pub ct_assured_entries: u32,
    pub gc_interval: Duration,
    pub dataplane: DataplaneOptions,
}

/// Which back end enforces the input.
#[derive(Debug, Clone)]
pub enum DataplaneOptions {
    /// sg's eBPF programs at tcx on the taps.
    Ebpf,
    /// Neutron's iptables ruleset ([`crate::iptables`]), as its agent would install it.
    Iptables {
        backend: iptables::Backend,
        agent: iptables::Agent,
        comments: bool,
        ipset: bool,
    },
}

/// Loads, validates and compiles the input. Errors carry every validation problem.
pub fn load_and_compile(path: &Path, host: &str) -> Result<(model::Model, Compiled)> {
    let model = load(path)?;
    let compiled = compile::compile(&model, host);
    Ok((model, compiled))
}

fn load(path: &Path) -> Result<model::Model> {
    model::load(path).map_err(|e| anyhow::anyhow!("{} rejected:\n{e}", path.display()))
}

type LinkTable = std::collections::BTreeMap<String, u32>;

/// What the reconcile loop drives: one of the two back ends.
trait Dataplane {
    /// Applies a validated input. On error the running policy stays as it was.
    fn apply(&mut self, model: &model::Model, links: &LinkTable, generation: u64) -> Result<()>;
    /// Interfaces appeared, went or were renamed (`changed`: the name → ifindex table differs).
    fn links_changed(
        &mut self,
        deleted: &[u32],
        links: &LinkTable,
        changed: bool,
        generation: u64,
    ) -> Result<()>;
    /// Periodic housekeeping.
    fn gc(&mut self);
    fn describe_exit(&self) -> String;
}

/// The eBPF back end: compile, then swap maps and programs (agent::apply).
struct Ebpf {
    applier: Applier,
    /// The last compilation applied, re-applied when interfaces change.
    current: Option<Compiled>,
    opts: AgentOptions,
}

impl Dataplane for Ebpf {
    fn apply(&mut self, model: &model::Model, links: &LinkTable, generation: u64) -> Result<()> {
        let compiled = compile::compile(model, &self.opts.host);
        apply_and_record(&mut self.applier, &compiled, links, &self.opts, generation)?;
        self.current = Some(compiled);
        Ok(())
    }

    fn links_changed(
        &mut self,
        deleted: &[u32],
        links: &LinkTable,
        changed: bool,
        generation: u64,
    ) -> Result<()> {
        let forgot = self.applier.forget_deleted(deleted);
        if (changed || forgot)
            && let Some(c) = &self.current
        {
            apply_and_record(&mut self.applier, c, links, &self.opts, generation)?;
        }
        Ok(())
    }

    fn gc(&mut self) {
        // Entries of ports that left the input go too, once an input has been applied: before
        // that the agent does not know which ports are gone.
        let ports: Option<std::collections::BTreeSet<u32>> = self
            .current
            .as_ref()
            .map(|_| self.applier.ports().map(|p| p.port_idx).collect());
        match pinned::collect_expired(&self.opts.pin_root, ports.as_ref()) {
            Ok(n) if n > 0 => info!(deleted = n, "conntrack: expired entries collected"),
            Ok(_) => {}
            Err(e) => warn!("conntrack GC: {e:#}"),
        }
        if let Err(e) = crate::datapath::collect_stale_links(&self.opts.pin_root, self.opts.netns.as_deref())
        {
            warn!("pin GC: {e:#}");
        }
    }

    fn describe_exit(&self) -> String {
        format!(
            "exiting; maps and links stay pinned under {}, so enforcement continues",
            self.opts.pin_root.display()
        )
    }
}

/// The iptables back end: render Neutron's ruleset, apply it, cut flows as Neutron does.
struct Iptables {
    dp: iptables::IptablesDataplane,
    render: iptables::RenderOptions,
    /// The last input applied, for the conntrack cleanup of the next change.
    current: Option<model::Model>,
    run_dir: PathBuf,
}

impl Dataplane for Iptables {
    fn apply(&mut self, model: &model::Model, _links: &LinkTable, generation: u64) -> Result<()> {
        let t = Instant::now();
        // Established flows survive a rule removal under iptables (RELATED,ESTABLISHED comes
        // first) until Neutron's agent deletes their conntrack entries: apply_change does too.
        let change = self.dp.apply_change(self.current.as_ref(), model, &self.render)?;
        if change.apply.changed() {
            info!(elapsed_us = t.elapsed().as_micros() as u64, generation, report = %change.apply, "apply done");
        }
        if !change.conntrack.is_empty() {
            info!(commands = change.conntrack.len(), "conntrack cleanup");
        }
        if let Some(e) = change.conntrack_error {
            warn!("conntrack cleanup: {e}");
        }
        self.current = Some(model.clone());
        RunState {
            generation,
            ports: Vec::new(),
            rules: Vec::new(),
        }
        .save(&self.run_dir)
        .context("writing the run state")
    }

    /// The rules match taps by name (physdev), so they need no change when taps come and go.
    fn links_changed(&mut self, _: &[u32], _: &LinkTable, _: bool, _: u64) -> Result<()> {
        Ok(())
    }

    /// The kernel's conntrack expires its own entries.
    fn gc(&mut self) {}

    fn describe_exit(&self) -> String {
        "exiting; the iptables rules and ipsets stay, so enforcement continues".to_string()
    }
}

pub async fn run(opts: AgentOptions) -> Result<()> {
    let started = Instant::now();
    let mut generation = 0;
    let mut dp: Box<dyn Dataplane> = match &opts.dataplane {
        DataplaneOptions::Ebpf => {
            let dp = Datapath::load(&LoadOptions {
                pin_root: Some(opts.pin_root.clone()),
                ct_entries: opts.ct_entries,
                ct_assured_entries: opts.ct_assured_entries,
                ..Default::default()
            })?;
            let previous = RunState::load(&opts.run_dir).unwrap_or_else(|e| {
                warn!("ignoring the previous run state: {e:#}");
                None
            });
            let applier = Applier::adopt(dp, opts.netns.clone(), previous.as_ref())?;
            generation = previous.map(|p| p.generation).unwrap_or(0);
            Box::new(Ebpf {
                applier,
                current: None,
                opts: opts.clone(),
            })
        }
        DataplaneOptions::Iptables {
            backend,
            agent,
            comments,
            ipset,
        } => {
            if let Ok(Some(p)) = RunState::load(&opts.run_dir) {
                generation = p.generation;
            }
            Box::new(Iptables {
                dp: iptables::IptablesDataplane::new(*backend).in_netns(opts.netns.clone()),
                render: iptables::RenderOptions {
                    host: opts.host.clone(),
                    agent: *agent,
                    comments: *comments,
                    ipset: *ipset,
                },
                current: None,
                run_dir: opts.run_dir.clone(),
            })
        }
    };
    let mut links = links::Links::open(opts.netns.as_deref())?;
    let mut watcher = watch::Watcher::new(&opts.state)?;

    let initial = match load(&opts.state) {
        Ok(m) => {
            info!(input = %opts.state.display(), model = %m.summary(), "input loaded");
            Some(m)
        }
        Err(e) => {
            error!("{e:#}");
            None
        }
    };
    let mut table = links.dump().await?;
    if let Some(m) = &initial {
        generation += 1;
        dp.apply(m, &table, generation)?;
    }
    info!(elapsed_ms = started.elapsed().as_millis() as u64, "ready");

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut gc = tokio::time::interval(opts.gc_interval);
    gc.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            ev = links.changed() => {
                let Some(mut deleted) = ev else {
                    anyhow::bail!("the rtnetlink connection closed");
                };
                // Taps come in bursts (create, rename, up): settle, then read the table once.
                tokio::time::sleep(Duration::from_millis(20)).await;
                deleted.extend(links.drain());
                let new_table = links.dump().await?;
                let changed = new_table != table;
                table = new_table;
                if let Err(e) = dp.links_changed(&deleted, &table, changed, generation) {
                    error!("re-applying after an interface change: {e:#}");
                }
            }
            changed = watcher.changed() => {
                changed?;
                match load(&opts.state) {
                    Ok(m) => {
                        info!(model = %m.summary(), "input changed");
                        generation += 1;
                        if let Err(e) = dp.apply(&m, &table, generation) {
                            error!("{e:#}");
                        }
                    }
                    Err(e) => error!("{e:#}\nthe running policy is unchanged"),
                }
            }
            _ = gc.tick() => dp.gc(),
        }
    }
    info!("{}", dp.describe_exit());
    Ok(())
}

fn apply_and_record(
    applier: &mut Applier,
    compiled: &Compiled,
    table: &LinkTable,
    opts: &AgentOptions,
    generation: u64,
) -> Result<()> {
    let t = Instant::now();
    let report = applier.apply(compiled, table)?;
    log_report(&report, compiled);
    if report.changed() {
        info!(
            elapsed_us = t.elapsed().as_micros() as u64,
            generation, "apply done"
        );
    }
    applier
        .run_state(generation)
        .save(&opts.run_dir)
        .context("writing the run state")
}
