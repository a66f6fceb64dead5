//! The agent: follow taps, watch the input, reconcile the datapath, and keep enforcement in
//! place.
//!
//! The loop drives one of two back ends (`--dataplane`): sg's eBPF datapath, or Neutron's own
//! iptables ruleset ([`crate::iptables`], for hosts without eBPF and as the reference side of
//! the differential test). Its sources of change:
//! - the input file or directory changed ([`watch`]): validate, compile, apply; a rejected
//!   input is logged and the running policy stays as it is;
//! - a tap appeared, went or was renamed: the taps thread ([`taps`]) enforces it on its own,
//!   at once, and tells the loop, which records where each port is enforced;
//! - a pin vanished ([`pins`]), or the housekeeping timer: check that every map and link is
//!   still pinned and attached, and restore what someone removed; collect expired conntrack
//!   entries and pins of vanished interfaces; compare the input's identity in case an event
//!   was missed; record that the agent is alive ([`lock::AgentRecord`]).
//!
//! An agent holds an exclusive lock on its pin root ([`lock::PinLock`]) for its whole life.
//! Exiting (SIGTERM, SIGINT, or a crash) leaves maps and links pinned: enforcement stays, and
//! the next agent takes the links over with an atomic program swap.

pub mod apply;
pub mod links;
pub mod lock;
mod pins;
pub mod taps;
mod watch;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc::UnboundedReceiver,
};
use tracing::{error, info, warn};

use self::{
    apply::{Applier, RunState, log_report},
    lock::{AgentRecord, PinLock},
    pins::PinWatch,
};
use crate::{
    compile,
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

/// The files an agent keeps in its run directory. `sg detach --all` (and so `dpkg -r`) deletes
/// them with the pins they describe.
pub const RUN_FILES: [&str; 2] = [RunState::FILE, lock::AgentRecord::FILE];

/// Deletes the run state (RUN_FILES and their temporary files), and `run_dir` if nothing else
/// is left in it. Returns whether there was any.
pub fn remove_run_state(run_dir: &Path) -> Result<bool> {
    let mut found = false;
    for name in RUN_FILES {
        for name in [name.to_string(), format!("{name}.tmp")] {
            let path = run_dir.join(&name);
            match std::fs::remove_file(&path) {
                Ok(()) => found = true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
            }
        }
    }
    // Not empty (files that are not sg's) or gone already: both are fine.
    let _ = std::fs::remove_dir(run_dir);
    Ok(found)
}

/// Loads, validates and compiles the input. Errors carry every validation problem.
pub fn load_and_compile(path: &Path, host: &str) -> Result<(model::Model, compile::Compiled)> {
    let model = load(path)?;
    let compiled = compile::compile(&model, host);
    Ok((model, compiled))
}

fn load(path: &Path) -> Result<model::Model> {
    model::load(path).map_err(|e| anyhow::anyhow!("{} rejected:\n{e}", path.display()))
}

/// What the reconcile loop drives: one of the two back ends.
trait Dataplane {
    /// Applies a validated input. On error the running policy stays as it was.
    fn apply(&mut self, model: &model::Model, generation: u64) -> Result<()>;
    /// The taps thread enforced, moved or lost a tap: record where ports are enforced now.
    fn taps_changed(&mut self, generation: u64) -> Result<()>;
    /// Checks that enforcement is in place and restores what someone removed. An error is
    /// fatal: the agent can no longer stand for what is enforced.
    fn check(&mut self, generation: u64) -> Result<()>;
    /// Periodic housekeeping.
    fn gc(&mut self);
    fn describe_exit(&self) -> String;
}

/// The eBPF back end: compile, then swap maps and programs (agent::apply).
struct Ebpf {
    applier: Applier,
    opts: AgentOptions,
    lock: PinLock,
    /// An input has been applied: the applier knows which ports are gone.
    applied: bool,
}

impl Ebpf {
    fn save_state(&self, generation: u64) -> Result<()> {
        self.applier
            .run_state(generation)
            .save(&self.opts.run_dir)
            .context("writing the run state")
    }
}

impl Dataplane for Ebpf {
    fn apply(&mut self, model: &model::Model, generation: u64) -> Result<()> {
        let compiled = compile::compile(model, &self.opts.host);
        let t = Instant::now();
        let result = self.applier.apply(&compiled);
        self.applied = true;
        if let Ok(report) = &result {
            log_report(report, &compiled);
            if report.changed() {
                info!(
                    elapsed_us = t.elapsed().as_micros() as u64,
                    generation, "apply done"
                );
            }
        }
        // Also after a partial failure: the ports that were switched are recorded.
        self.save_state(generation)?;
        result.map(|_| ())
    }

    fn taps_changed(&mut self, generation: u64) -> Result<()> {
        self.save_state(generation)
    }

    fn check(&mut self, generation: u64) -> Result<()> {
        // Another agent on the pin root, or another map pinned in ours, ends this agent; any
        // other failure (the pins being removed while they are restored) is retried at the
        // next wake-up.
        let fatal = |e: &anyhow::Error| e.is::<lock::Taken>() || e.is::<crate::datapath::ForeignPin>();
        let root = self.opts.pin_root.clone();
        let mut restored = false;
        if !self.lock.still_held() {
            error!(
                pin_root = %root.display(),
                "the pin root was removed under the running agent (sg detach --all --force?): \
                 taking it back and restoring maps and links"
            );
            match PinLock::acquire(&root) {
                Ok(l) => self.lock = l,
                Err(e) if fatal(&e) => return Err(e.context("taking the removed pin root back")),
                Err(e) => {
                    error!("taking the removed pin root back: {e:#}; retrying");
                    return Ok(());
                }
            }
            restored = true;
        }
        let maps = match self.applier.dp.repin_maps() {
            Ok(m) => m,
            Err(e) if fatal(&e) => return Err(e.context("restoring the map pins")),
            Err(e) => {
                error!("restoring the map pins: {e:#}; retrying");
                return Ok(());
            }
        };
        if !maps.is_empty() {
            error!(
                maps = ?maps,
                "map pins were removed under the running agent: pinned again (flows and counters kept)"
            );
            restored = true;
        }
        match self.applier.taps().verify() {
            Ok(0) => {}
            Ok(n) => {
                error!(
                    links = n,
                    "tcx links were removed under the running agent: attached and pinned again"
                );
                restored = true;
            }
            Err(e) => error!("checking the taps' links: {e:#}"),
        }
        if restored {
            self.save_state(generation)?;
        }
        Ok(())
    }

    fn gc(&mut self) {
        // Entries of ports that left the input go too, once an input has been applied: before
        // that the agent does not know which ports are gone.
        let ports: Option<std::collections::BTreeSet<u32>> = self
            .applied
            .then(|| self.applier.ports().map(|p| p.port_idx).collect());
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
    fn apply(&mut self, model: &model::Model, generation: u64) -> Result<()> {
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
        if let Some(old) = &self.current {
            let now: std::collections::BTreeSet<&str> = model
                .local_ports(&self.render.host)
                .iter()
                .map(|p| p.id.as_str())
                .collect();
            for p in old.local_ports(&self.render.host) {
                if !now.contains(p.id.as_str()) {
                    warn!(port = %p.id, tap = %p.device, "port left the input: its chains are removed");
                }
            }
        }
        self.current = Some(model.clone());
        RunState {
            generation,
            ..Default::default()
        }
        .save(&self.run_dir)
        .context("writing the run state")
    }

    fn taps_changed(&mut self, _: u64) -> Result<()> {
        Ok(())
    }

    /// The rules match taps by name (physdev) and live in the kernel's tables.
    fn check(&mut self, _: u64) -> Result<()> {
        Ok(())
    }

    /// The kernel's conntrack expires its own entries.
    fn gc(&mut self) {}

    fn describe_exit(&self) -> String {
        "exiting; the iptables rules and ipsets stay, so enforcement continues".to_string()
    }
}

pub async fn run(opts: AgentOptions) -> Result<()> {
    let mut record: Option<AgentRecord> = None;
    let result = run_inner(&opts, &mut record).await;
    if let Some(r) = &mut record {
        let reason = match &result {
            Ok(signal) => signal.to_string(),
            Err(e) => format!("error: {e:#}"),
        };
        if let Err(e) = r.stopped(&opts.run_dir, &reason) {
            warn!("recording the agent's exit: {e:#}");
        }
    }
    result.map(|_| ())
}

async fn run_inner(opts: &AgentOptions, record: &mut Option<AgentRecord>) -> Result<&'static str> {
    let started = Instant::now();
    let mut generation = 0;
    let mut tap_events: Option<UnboundedReceiver<()>> = None;
    let mut pin_watch: Option<PinWatch> = None;
    let mut dp: Box<dyn Dataplane> = match &opts.dataplane {
        DataplaneOptions::Ebpf => {
            // First the lock: nothing is touched while another agent runs on this root.
            let lock = PinLock::acquire(&opts.pin_root)?;
            *record = Some(AgentRecord::start(&opts.run_dir, &opts.pin_root)?);
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
            tap_events = Some(applier.taps().subscribe()?);
            pin_watch = Some(PinWatch::new(&opts.pin_root, opts.netns.as_deref())?);
            Box::new(Ebpf {
                applier,
                opts: opts.clone(),
                lock,
                applied: false,
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
    let mut watcher = watch::Watcher::new(&opts.state)?;

    match load(&opts.state) {
        Ok(m) => {
            info!(input = %opts.state.display(), model = %m.summary(), "input loaded");
            generation += 1;
            dp.apply(&m, generation)?;
        }
        Err(e) => error!("{e:#}"),
    }
    info!(elapsed_ms = started.elapsed().as_millis() as u64, "ready");

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut gc = tokio::time::interval(opts.gc_interval);
    gc.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let reload = |dp: &mut Box<dyn Dataplane>, generation: &mut u64| match load(&opts.state) {
        Ok(m) => {
            info!(model = %m.summary(), "input changed");
            *generation += 1;
            if let Err(e) = dp.apply(&m, *generation) {
                error!("{e:#}");
            }
        }
        Err(e) => error!("{e:#}\nthe running policy is unchanged"),
    };
    let exit = loop {
        tokio::select! {
            _ = sigterm.recv() => break "stopped by SIGTERM",
            _ = sigint.recv() => break "stopped by SIGINT",
            ev = recv(&mut tap_events) => {
                // The taps thread holds the sender for its whole life.
                anyhow::ensure!(ev.is_some(), "the taps thread stopped: new taps would go unfiltered");
                if let Some(rx) = &mut tap_events {
                    while rx.try_recv().is_ok() {}
                }
                if let Err(e) = dp.taps_changed(generation) {
                    error!("{e:#}");
                }
            }
            fired = fired(&mut pin_watch) => {
                fired?;
                dp.check(generation)?;
                if let Some(w) = &mut pin_watch {
                    w.rearm();
                }
            }
            changed = watcher.changed() => {
                changed?;
                reload(&mut dp, &mut generation);
            }
            _ = gc.tick() => {
                dp.check(generation)?;
                if let Some(w) = &mut pin_watch {
                    w.rearm();
                }
                dp.gc();
                // A backstop for any event the input watch missed.
                if watcher.check() {
                    warn!("the input changed without an event the watch saw");
                    reload(&mut dp, &mut generation);
                }
                if let Some(r) = record.as_mut()
                    && let Err(e) = r.alive(&opts.run_dir)
                {
                    warn!("recording that the agent is alive: {e:#}");
                }
            }
        }
    };
    info!("{}", dp.describe_exit());
    Ok(exit)
}

async fn recv(rx: &mut Option<UnboundedReceiver<()>>) -> Option<()> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn fired(w: &mut Option<PinWatch>) -> Result<()> {
    match w {
        Some(w) => w.fired().await,
        None => std::future::pending().await,
    }
}
