//! The agent: follow taps, watch the input, reconcile the datapath.
//!
//! One loop, three sources of change:
//! - the input file or directory changed (inotify): validate, compile, apply; a rejected input
//!   is logged and the running policy stays as it is;
//! - an interface appeared, disappeared or was renamed (rtnetlink): re-apply the last good
//!   compilation against the new name → ifindex table;
//! - a timer: collect expired conntrack entries and pins of vanished interfaces.
//!
//! Exiting (SIGTERM, SIGINT, or a crash) leaves maps and links pinned: enforcement stays, and
//! the next agent takes the links over with an atomic program swap.

pub mod apply;
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
    model, pinned,
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
    pub ct_entries: u32,
    pub gc_interval: Duration,
}

/// Loads, validates and compiles the input. Errors carry every validation problem.
pub fn load_and_compile(path: &Path, host: &str) -> Result<(model::Model, Compiled)> {
    let model = model::load(path).map_err(|e| anyhow::anyhow!("{} rejected:\n{e}", path.display()))?;
    let compiled = compile::compile(&model, host);
    Ok((model, compiled))
}

pub async fn run(opts: AgentOptions) -> Result<()> {
    let started = Instant::now();
    let dp = Datapath::load(&LoadOptions {
        pin_root: Some(opts.pin_root.clone()),
        ct_entries: opts.ct_entries,
        ..Default::default()
    })?;
    let previous = RunState::load(&opts.run_dir).unwrap_or_else(|e| {
        warn!("ignoring the previous run state: {e:#}");
        None
    });
    let mut applier = Applier::adopt(dp, opts.netns.clone(), previous.as_ref())?;
    let mut generation = previous.map(|p| p.generation).unwrap_or(0);
    let mut links = links::Links::open(opts.netns.as_deref())?;
    let mut watcher = watch::Watcher::new(&opts.state)?;

    let mut current: Option<Compiled> = match load_and_compile(&opts.state, &opts.host) {
        Ok((m, c)) => {
            info!(input = %opts.state.display(), model = %m.summary(), "input loaded");
            Some(c)
        }
        Err(e) => {
            error!("{e:#}");
            None
        }
    };
    let mut table = links.dump().await?;
    if let Some(c) = &current {
        generation += 1;
        apply_and_record(&mut applier, c, &table, &opts, generation)?;
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
                let forgot = applier.forget_deleted(&deleted);
                let new_table = links.dump().await?;
                if new_table != table || forgot {
                    table = new_table;
                    if let Some(c) = &current
                        && let Err(e) = apply_and_record(&mut applier, c, &table, &opts, generation)
                    {
                        error!("re-applying after an interface change: {e:#}");
                    }
                }
            }
            changed = watcher.changed() => {
                changed?;
                match load_and_compile(&opts.state, &opts.host) {
                    Ok((m, c)) => {
                        info!(model = %m.summary(), "input changed");
                        generation += 1;
                        match apply_and_record(&mut applier, &c, &table, &opts, generation) {
                            Ok(()) => current = Some(c),
                            Err(e) => error!("{e:#}"),
                        }
                    }
                    Err(e) => error!("{e:#}\nthe running policy is unchanged"),
                }
            }
            _ = gc.tick() => {
                match pinned::collect_expired(&opts.pin_root) {
                    Ok(n) if n > 0 => info!(deleted = n, "conntrack: expired entries collected"),
                    Ok(_) => {}
                    Err(e) => warn!("conntrack GC: {e:#}"),
                }
                if let Err(e) = crate::datapath::collect_stale_links(&opts.pin_root, opts.netns.as_deref()) {
                    warn!("pin GC: {e:#}");
                }
            }
        }
    }
    info!(
        "exiting; maps and links stay pinned under {}, so enforcement continues",
        opts.pin_root.display()
    );
    Ok(())
}

fn apply_and_record(
    applier: &mut Applier,
    compiled: &Compiled,
    table: &std::collections::BTreeMap<String, u32>,
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
