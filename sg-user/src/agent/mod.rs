//! The agent: follow taps, watch the input, reconcile the datapath, and keep enforcement in
//! place.
//!
//! The loop drives one of two back ends (`--dataplane`): sg's eBPF datapath, or Neutron's own
//! iptables ruleset ([`crate::iptables`], for hosts without eBPF and as the reference side of
//! the differential test). The input is a file (`--state`), what the Neutron driver pushes
//! through the local API (`--api-socket`, [`api`]), or both (the union of the two). Its sources
//! of change:
//! - the input file or directory changed ([`watch`]): validate, compile, apply; a rejected
//!   input is logged and the running policy stays as it is;
//! - a driver call arrived on the API: validated with the model's rules, applied, persisted
//!   (`neutron-state.json` in the run directory, [`pushed`]), answered; a rejected call changes
//!   nothing;
//! - a tap appeared, went or was renamed: the taps thread ([`taps`]) enforces it on its own,
//!   at once, and tells the loop, which records where each port is enforced;
//! - a pin vanished ([`pins`]), or the housekeeping timer: check that every map and link is
//!   still pinned and attached, and restore what someone removed; collect expired conntrack
//!   entries and pins of vanished interfaces; compare the input's identity in case an event
//!   was missed; record that the agent is alive ([`lock::AgentRecord`]);
//! - `sg debug` through the control socket ([`crate::observe`], whose threads read the maps
//!   and events without ever waiting for this loop).
//!
//! An agent holds an exclusive lock on its pin root ([`lock::PinLock`]) for its whole life.
//! Exiting (SIGTERM, SIGINT, or a crash) leaves maps and links pinned: enforcement stays, and
//! the next agent takes the links over with an atomic program swap.

pub mod api;
pub mod apply;
mod delta;
pub mod links;
pub mod lock;
mod pins;
pub mod pushed;
pub mod taps;
mod watch;

use std::{
    collections::{BTreeSet, HashMap},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Map, Value, json};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, mpsc::UnboundedReceiver, watch as tokio_watch},
};
use tracing::{debug, error, info, warn};

use self::{
    api::{ApiError, ApiOptions, Call, Enforced, Event, Reply, Request},
    apply::{Applier, RunState, log_report},
    lock::{AgentRecord, PinLock},
    pins::PinWatch,
    pushed::{Op, Pushed},
};
use crate::{
    compile,
    datapath::{Datapath, LoadOptions},
    iptables, model, pinned,
};

#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Neutron input: a JSON file or a directory of them.
    pub state: Option<PathBuf>,
    /// The local API for the Neutron driver.
    pub api: Option<ApiOptions>,
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
    pub observe: ObserveOptions,
}

/// The security-group log, `/metrics`, and the control socket of `sg monitor` / `sg debug`
/// (eBPF back end only).
#[derive(Debug, Clone)]
pub struct ObserveOptions {
    /// Serve `/metrics` here.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Also export per-rule hit counters.
    pub metrics_rule_hits: bool,
    /// A file path, or `syslog` (Neutron's default).
    pub log_output: String,
    /// Per-port events per second and burst (Neutron's `rate_limit`, `burst_limit`).
    pub log_rate_limit: u32,
    pub log_burst_limit: u32,
}

impl Default for ObserveOptions {
    fn default() -> Self {
        Self {
            metrics_addr: None,
            metrics_rule_hits: false,
            log_output: "syslog".into(),
            log_rate_limit: sg_common::LOG_RATE_LIMIT,
            log_burst_limit: sg_common::LOG_BURST_LIMIT,
        }
    }
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

/// The files an agent keeps in its run directory: the run state, the agent's record, what
/// Neutron's driver pushed, their temporary files, and the control socket a killed agent
/// left. `sg detach --all` (and so `dpkg -r`)
/// deletes them with the pins they describe.
pub fn run_files(run_dir: &Path) -> Vec<PathBuf> {
    vec![
        run_dir.join(RunState::FILE),
        run_dir.join(format!("{}.tmp", RunState::FILE)),
        run_dir.join(lock::AgentRecord::FILE),
        run_dir.join(format!("{}.tmp", lock::AgentRecord::FILE)),
        pushed::Pushed::path(run_dir),
        pushed::Pushed::tmp_path(run_dir),
        run_dir.join(crate::observe::control::SOCKET),
    ]
}

/// Deletes `run_files`, and `run_dir` if nothing else is left in it. Returns whether there was
/// any.
pub fn remove_run_state(run_dir: &Path) -> Result<bool> {
    let mut found = false;
    for path in run_files(run_dir) {
        match std::fs::remove_file(&path) {
            Ok(()) => found = true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
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
    /// The taps whose port's policy is in force now (what `prepare_port_filter` waits for).
    fn enforced_taps(&self) -> BTreeSet<String>;
    fn describe_exit(&self) -> String;
    /// `sg debug PORT on|off`.
    fn debug(&mut self, _req: &crate::observe::control::DebugRequest) -> Result<String, String> {
        Err("`sg debug` needs the eBPF back end".into())
    }
}

/// A port whose links run the debug instance of the programs (`sg debug PORT on`).
struct DebugSession {
    port: String,
    device: String,
    /// The debug instance; dropped once the normal programs are back on the links.
    _dp: Datapath,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for DebugSession {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// aya-log records of the debug instance, into the agent's log.
struct DebugLog {
    port: String,
}

impl log::Log for DebugLog {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        info!(port = %self.port, "datapath debug: {}", record.args());
    }
    fn flush(&self) {}
}

/// The eBPF back end: compile, then swap maps and programs (agent::apply).
struct Ebpf {
    applier: Applier,
    opts: AgentOptions,
    lock: PinLock,
    /// An input has been applied: the applier knows which ports are gone.
    applied: bool,
    /// The log objects covering each port (by port id) of the last compilation applied.
    logs: std::collections::HashMap<String, model::PortLog>,
    shared: crate::observe::Shared,
    debug: Option<DebugSession>,
    /// Apply durations and errors for /metrics.
    metrics: Option<crate::observe::metrics::AgentMetrics>,
}

impl Ebpf {
    /// Writes the run state for the CLI and tells the observers (log, monitor, metrics) what
    /// the ports are now: both follow every apply and every move of a tap.
    fn save_state(&self, generation: u64) -> Result<()> {
        let state = self.applier.run_state(generation);
        let mut view = crate::observe::View {
            generation,
            ..Default::default()
        };
        for p in &state.ports {
            view.ports.insert(
                p.port_idx,
                crate::observe::PortView {
                    id: p.id.clone(),
                    device: p.device.clone(),
                    ifindex: p.ifindex,
                    enforced: p.ifindex.is_some() && !p.closed,
                    closed: p.closed,
                    log: self.logs.get(&p.id).cloned().unwrap_or_default(),
                },
            );
        }
        for r in &state.rules {
            view.rules.insert(r.index, r.clone());
        }
        view.map_entries.extend(self.applier.lpm_entries());
        self.shared.publish(view);
        state.save(&self.opts.run_dir).context("writing the run state")
    }
}

impl Dataplane for Ebpf {
    fn apply(&mut self, model: &model::Model, generation: u64) -> Result<()> {
        let t0 = Instant::now();
        let compiled = compile::compile(model, &self.opts.host);
        let t = Instant::now();
        let result = self.applier.apply(&compiled);
        self.applied = true;
        self.logs = compiled
            .ports
            .iter()
            .map(|p| (p.id.clone(), p.log.clone()))
            .collect();
        if let Some(m) = &self.metrics {
            m.apply_duration.observe(t0.elapsed().as_secs_f64());
            if result.is_err() {
                m.apply_errors.inc();
            }
        }
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

    /// A tap is enforced once its port's programs hold its policy where the port is enforced:
    /// the tap, or its hybrid peer `qvb` (agent::taps).
    fn enforced_taps(&self) -> BTreeSet<String> {
        match self.applier.taps().view() {
            Ok(view) => view
                .into_iter()
                .filter(|(_, v)| v.point.is_some() && !v.closed)
                .map(|(device, _)| device)
                .collect(),
            Err(e) => {
                warn!("asking the taps thread where ports are enforced: {e:#}");
                BTreeSet::new()
            }
        }
    }

    fn describe_exit(&self) -> String {
        format!(
            "exiting; maps and links stay pinned under {}, so enforcement continues",
            self.opts.pin_root.display()
        )
    }

    fn debug(&mut self, req: &crate::observe::control::DebugRequest) -> Result<String, String> {
        if !req.on {
            let Some(s) = self.debug.take() else {
                return Ok("no port was being debugged".into());
            };
            self.applier
                .taps()
                .debug(None)
                .map_err(|e| format!("restoring the programs of {}: {e:#}", s.device))?;
            info!(port = %s.port, tap = %s.device, "datapath debug off");
            return Ok(format!("debug records of port {} are off", s.port));
        }
        let view = self.shared.view();
        let (_, port) = view.find_port(&req.port)?;
        let (id, device) = (port.id.clone(), port.device.clone());
        if port.closed {
            return Err(format!("port {id} left the input: its tap {device} is closed"));
        }
        if port.ifindex.is_none() {
            return Err(format!("port {id} has no tap ({device}) on this host"));
        }
        let opts = LoadOptions::matching_pins(&self.opts.pin_root).map_err(|e| format!("{e:#}"))?;
        let (mut dp, mut reader) = Datapath::load_debug(&opts, DebugLog { port: id.clone() })
            .map_err(|e| format!("loading the debug programs: {e:#}"))?;
        let progs = dp
            .tap_handles()
            .map_err(|e| format!("the debug programs: {e:#}"))?
            .progs;
        // The taps thread swaps them into the port's links (the tap, or the hybrid veth) and
        // the normal programs back into the links of a port debugged before.
        let had = self.debug.take();
        let (_, point) = self
            .applier
            .taps()
            .debug(Some(taps::DebugPrograms {
                device: device.clone(),
                progs,
            }))
            .map_err(|e| format!("swapping the debug programs into {device}: {e:#}"))?
            .expect("debugging a device");
        if let Some(h) = had {
            info!(port = %h.port, tap = %h.device, "datapath debug off");
        }
        let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done = flag.clone();
        // aya-log 0.3 does not poll by itself: a thread waits on the buffer and flushes it.
        let spawned = std::thread::Builder::new()
            .name("sg-debug".into())
            .spawn(move || {
                use std::os::fd::AsRawFd as _;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let mut pfd = libc::pollfd {
                        fd: reader.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(&mut pfd, 1, 200) };
                    reader.flush();
                }
            });
        if let Err(e) = spawned {
            let _ = self.applier.taps().debug(None);
            return Err(format!("starting the debug reader: {e}"));
        }
        info!(port = %id, tap = %device, point = %point.name, "datapath debug on: per-stage records of this port follow");
        self.debug = Some(DebugSession {
            port: id.clone(),
            device: device.clone(),
            _dp: dp,
            stop: flag,
        });
        Ok(format!(
            "debug records of {device} ({id}) are on: they go to the agent's log; `sg debug {} off` ends them",
            req.port
        ))
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

    /// The rules match taps by name (physdev), whether the tap exists yet or not.
    fn enforced_taps(&self) -> BTreeSet<String> {
        let host = &self.render.host;
        self.current
            .iter()
            .flat_map(|m| m.local_ports(host))
            .map(|p| p.device.clone())
            .collect()
    }

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
    if opts.state.is_none() && opts.api.is_none() {
        bail!("the agent needs an input: --state FILE, --api-socket PATH, or both");
    }
    // The socket is bound first, so that a driver connecting while the agent starts waits for
    // its answer instead of failing.
    let api = match &opts.api {
        Some(a) => Some(api::listen(a)?),
        None => None,
    };
    let pushed = match &opts.api {
        None => None,
        Some(_) => Some(
            Pushed::load(&opts.run_dir)
                .with_context(|| {
                    format!(
                        "the state the Neutron driver pushed ({}) cannot be read: move it away to \
                         start empty (Neutron's agent then resends everything on its next resync)",
                        Pushed::path(&opts.run_dir).display()
                    )
                })?
                .unwrap_or_default(),
        ),
    };
    let mut generation = 0;
    let mut tap_events: Option<UnboundedReceiver<()>> = None;
    let mut pin_watch: Option<PinWatch> = None;
    let shared = crate::observe::Shared::default();
    let mut observers: Option<Observers> = None;
    let (debug_tx, mut debug_rx) = tokio::sync::mpsc::unbounded_channel();
    let dp: Box<dyn Dataplane> = match &opts.dataplane {
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
            let mut applier = Applier::adopt(dp, opts.netns.clone(), previous.as_ref())?;
            applier.set_log_limits(opts.observe.log_rate_limit, opts.observe.log_burst_limit);
            generation = previous.map(|p| p.generation).unwrap_or(0);
            tap_events = Some(applier.taps().subscribe()?);
            pin_watch = Some(PinWatch::new(&opts.pin_root, opts.netns.as_deref())?);
            let o = Observers::start(opts, shared.clone(), debug_tx.clone())?;
            let metrics = o.metrics.clone();
            observers = Some(o);
            Box::new(Ebpf {
                applier,
                opts: opts.clone(),
                lock,
                applied: false,
                logs: Default::default(),
                shared: shared.clone(),
                debug: None,
                metrics,
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
    let mut watcher = opts.state.as_deref().map(watch::Watcher::new).transpose()?;
    let (enforced_tx, enforced_rx) = tokio_watch::channel(Enforced::default());
    let mut agent = Agent {
        dp,
        generation,
        pushed,
        batches: HashMap::new(),
        enforced: enforced_tx,
        opts: opts.clone(),
    };

    match agent.model(agent.pushed.as_ref()) {
        Ok(m) => {
            info!(model = %m.summary(), input = %agent.describe_input(), "input loaded");
            agent.generation += 1;
            let generation = agent.generation;
            agent.dp.apply(&m, generation)?;
        }
        Err(e) => error!("{} rejected:\n{e}", agent.describe_input()),
    }
    agent.publish();
    let mut api_events = api.map(|(listener, gid)| {
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(api::serve(listener, gid, tx, enforced_rx.clone()));
        rx
    });
    info!(elapsed_ms = started.elapsed().as_millis() as u64, "ready");

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut gc = tokio::time::interval(opts.gc_interval);
    gc.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                if let Err(e) = agent.dp.taps_changed(agent.generation) {
                    error!("{e:#}");
                }
                agent.publish();
            }
            fired = fired(&mut pin_watch) => {
                fired?;
                agent.dp.check(agent.generation)?;
                if let Some(w) = &mut pin_watch {
                    w.rearm();
                }
                agent.publish();
            }
            changed = async {
                match &mut watcher {
                    Some(w) => w.changed().await,
                    None => std::future::pending().await,
                }
            } => {
                changed?;
                agent.reload();
            }
            ev = async {
                match &mut api_events {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => match ev {
                Some(Event::Call(call)) => agent.call(call),
                Some(Event::Closed(conn)) => {
                    if agent.batches.remove(&conn).is_some() {
                        warn!(conn, "a driver connection closed in the middle of a batch: its calls are dropped");
                    }
                }
                None => bail!("the API server stopped"),
            },
            _ = gc.tick() => {
                agent.dp.check(agent.generation)?;
                if let Some(w) = &mut pin_watch {
                    w.rearm();
                }
                agent.dp.gc();
                // A backstop for any event the input watch missed.
                if let Some(w) = &mut watcher
                    && w.check()
                {
                    warn!("the input changed without an event the watch saw");
                    agent.reload();
                }
                agent.publish();
                if let Some(r) = record.as_mut()
                    && let Err(e) = r.alive(&opts.run_dir)
                {
                    warn!("recording that the agent is alive: {e:#}");
                }
            }
            Some(call) = debug_rx.recv() => {
                let _ = call.reply.send(agent.dp.debug(&call.request));
            }
        }
    };
    // A port being debugged gets the normal programs back: nobody would read its records.
    let _ = agent.dp.debug(&crate::observe::control::DebugRequest {
        port: String::new(),
        on: false,
    });
    if let Some(o) = observers {
        o.stop();
    }
    info!("{}", agent.dp.describe_exit());
    // The socket is ours; a stale one would only be replaced by the next agent, and would be
    // left in the run directory when the package is removed.
    if let Some(a) = &opts.api {
        let _ = std::fs::remove_file(&a.socket);
    }
    let _ = std::fs::remove_file(opts.run_dir.join(crate::observe::control::SOCKET));
    Ok(exit)
}

/// The threads that watch the datapath for the operator: the event reader (security-group
/// log, monitor), the control socket and `/metrics`.
struct Observers {
    monitors: std::sync::Arc<crate::observe::Monitors>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
    metrics: Option<crate::observe::metrics::AgentMetrics>,
}

impl Observers {
    fn start(
        opts: &AgentOptions,
        shared: crate::observe::Shared,
        debug: tokio::sync::mpsc::UnboundedSender<crate::observe::control::DebugCall>,
    ) -> Result<Self> {
        use std::sync::Arc;
        let o = &opts.observe;
        let monitors = Arc::new(crate::observe::Monitors::new(&opts.pin_root));
        // A monitor of a previous agent is gone with it.
        monitors.off();
        let counters = Arc::new(crate::observe::EventCounters::default());
        let sink = crate::observe::netlog::Sink::open(&o.log_output)?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = crate::observe::spawn_reader(
            &opts.pin_root,
            shared.clone(),
            Some(sink),
            monitors.clone(),
            counters.clone(),
            stop.clone(),
        )?;
        let sock = crate::observe::control::serve(&opts.run_dir, shared.clone(), monitors.clone(), debug)?;
        info!(socket = %sock.display(), log = %o.log_output, "control socket listening, security-group log open");
        let mut metrics = None;
        if let Some(addr) = o.metrics_addr {
            let m = Arc::new(crate::observe::metrics::Metrics::new(
                &opts.pin_root,
                shared,
                counters,
                o.metrics_rule_hits,
            )?);
            metrics = Some(m.agent.clone());
            let bound = m.serve(addr)?;
            info!(addr = %bound, "serving /metrics");
        }
        Ok(Self {
            monitors,
            stop,
            reader: Some(reader),
            metrics,
        })
    }

    fn stop(mut self) {
        self.monitors.off();
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// A deferred batch of one connection (`filter_defer_apply_on` .. `_off`).
struct Batch {
    ops: Vec<Op>,
    /// The groups and remote ids known when it began: the end of the batch forgets those no
    /// port needs any more, as Neutron's driver does.
    groups: BTreeSet<String>,
    remotes: BTreeSet<String>,
}

/// The loop's state.
struct Agent {
    opts: AgentOptions,
    dp: Box<dyn Dataplane>,
    generation: u64,
    /// What the driver pushed; None without `--api-socket`.
    pushed: Option<Pushed>,
    batches: HashMap<u64, Batch>,
    enforced: tokio_watch::Sender<Enforced>,
}

impl Agent {
    /// The input: the file's documents, then the pushed one.
    fn model(&self, pushed: Option<&Pushed>) -> Result<model::Model, model::ValidationErrors> {
        let extra = pushed
            .map(|p| {
                vec![(
                    Pushed::path(&self.opts.run_dir).display().to_string(),
                    p.to_document(),
                )]
            })
            .unwrap_or_default();
        model::load_with(self.opts.state.as_deref(), extra)
    }

    /// The input changed on disk: validate, apply, or keep the running policy.
    fn reload(&mut self) {
        match self.model(self.pushed.as_ref()) {
            Ok(m) => {
                info!(model = %m.summary(), "input changed");
                self.generation += 1;
                if let Err(e) = self.dp.apply(&m, self.generation) {
                    error!("{e:#}");
                }
                self.publish();
            }
            Err(e) => error!(
                "{} rejected:\n{e}\nthe running policy is unchanged",
                self.describe_input()
            ),
        }
    }

    fn describe_input(&self) -> String {
        match (&self.opts.state, &self.pushed) {
            (Some(f), None) => f.display().to_string(),
            (None, _) => "the state pushed by the Neutron driver".to_string(),
            (Some(f), Some(_)) => format!("{} with the state pushed by the Neutron driver", f.display()),
        }
    }

    fn publish(&self) {
        let e = Enforced {
            taps: self.dp.enforced_taps(),
            plug: self.pushed.as_ref().map(|p| p.plug),
        };
        self.enforced.send_if_modified(|cur| {
            let changed = *cur != e;
            *cur = e;
            changed
        });
    }

    /// One driver call.
    fn call(&mut self, call: Call) {
        let Call { conn, request, reply } = call;
        let name = request.name();
        let t = Instant::now();
        let answer = self.handle(conn, request);
        match &answer.result {
            Ok(_) => debug!(
                conn,
                op = name,
                elapsed_us = t.elapsed().as_micros() as u64,
                "API call"
            ),
            Err(e) if e.kind == "invalid" => warn!(
                conn,
                op = name,
                "API call rejected, nothing changed:\n{}",
                e.message
            ),
            Err(e) => warn!(conn, op = name, kind = e.kind, "API call failed: {}", e.message),
        }
        let _ = reply.send(answer);
    }

    fn handle(&mut self, conn: u64, request: Request) -> Reply {
        let Some(pushed) = &self.pushed else {
            return Reply::err(ApiError::new("protocol", "the agent serves no pushed state"));
        };
        let plug = pushed.plug;
        match request {
            Request::Hello {
                plug: new_plug,
                client,
            } => {
                info!(conn, client = %client, plug = ?new_plug, "Neutron driver connected");
                if let Some(p) = new_plug
                    && p != plug
                    && let Err(e) = self.commit(vec![Op::Plug(p)], None)
                {
                    return Reply::err(e);
                }
                let mut body = self.body();
                body.insert("versions".into(), json!([api::PROTOCOL_VERSION]));
                body.insert("agent".into(), json!(format!("sg {}", env!("CARGO_PKG_VERSION"))));
                body.insert("host".into(), json!(self.opts.host));
                Reply::ok(body)
            }
            Request::SecurityGroupUpdated => Reply::ok(self.body()),
            Request::State => {
                let mut body = self.body();
                body.insert("document".into(), pushed.to_document());
                Reply::ok(body)
            }
            Request::Enforcement { devices, wait } => {
                let taps: Vec<(String, String)> = devices.iter().map(|d| (d.clone(), plug.tap(d))).collect();
                let now = self.dp.enforced_taps();
                let state: Map<String, Value> = taps
                    .iter()
                    .map(|(d, t)| (d.clone(), Value::Bool(now.contains(t))))
                    .collect();
                let mut body = self.body();
                body.insert("enforced".into(), Value::Object(state));
                Reply {
                    result: Ok(body),
                    wait: wait.map(|w| (taps, w)),
                }
            }
            Request::DeferOn => {
                self.batches.entry(conn).or_insert_with(|| Batch {
                    ops: Vec::new(),
                    groups: pushed.security_groups.keys().cloned().collect(),
                    remotes: pushed.sg_member_ips.keys().cloned().collect(),
                });
                Reply::ok(self.body())
            }
            Request::DeferOff { wait } => {
                let Some(batch) = self.batches.remove(&conn) else {
                    return Reply::ok(self.body());
                };
                let waits = waited_devices(&batch.ops);
                match self.commit(batch.ops, Some((&batch.groups, &batch.remotes))) {
                    Ok(()) => self.wait_reply(waits, wait),
                    Err(e) => Reply::err(e),
                }
            }
            Request::Change { op, wait } => {
                if let Some(batch) = self.batches.get_mut(&conn) {
                    // A call in a batch is checked alone when it arrives, so that a bad one
                    // fails by itself (its errors name only its objects) and the batch goes on.
                    if let Some(doc) = op.alone(plug)
                        && let Err(errs) = model::from_values(vec![(format!("{} call", op_name(&op)), doc)])
                    {
                        return Reply::err(ApiError::invalid(&errs));
                    }
                    batch.ops.push(op);
                    let mut body = self.body();
                    body.insert("deferred".into(), json!(true));
                    return Reply::ok(body);
                }
                // Outside a batch the call is validated with the whole input it makes, which
                // was valid before it: the errors are this call's.
                let waits = waited_devices(std::slice::from_ref(&op));
                match self.commit(vec![op], None) {
                    Ok(()) => self.wait_reply(waits, wait),
                    Err(e) => Reply::err(e),
                }
            }
        }
    }

    fn body(&self) -> Map<String, Value> {
        let mut body = Map::new();
        body.insert("generation".into(), json!(self.generation));
        body
    }

    fn wait_reply(&self, devices: Vec<String>, wait: Option<Duration>) -> Reply {
        let plug = self.pushed.as_ref().map_or(model::rpc::Plug::Direct, |p| p.plug);
        let devices: Vec<(String, String)> = devices
            .into_iter()
            .filter(|d| self.pushed.as_ref().is_some_and(|p| p.devices.contains_key(d)))
            .map(|d| {
                let tap = plug.tap(&d);
                (d, tap)
            })
            .collect();
        Reply {
            result: Ok(self.body()),
            wait: wait.filter(|_| !devices.is_empty()).map(|w| (devices, w)),
        }
    }

    /// Applies `ops` to the pushed state as one change: validated as a whole with the model's
    /// rules, applied, persisted. On any error nothing changed.
    fn commit(
        &mut self,
        ops: Vec<Op>,
        collect: Option<(&BTreeSet<String>, &BTreeSet<String>)>,
    ) -> Result<(), ApiError> {
        let current = self.pushed.as_ref().expect("API calls come with a pushed state");
        let mut candidate = current.clone();
        let mut changed = false;
        for op in &ops {
            changed |= candidate.apply(op);
        }
        if let Some((groups, remotes)) = collect {
            candidate.collect_unused(groups, remotes);
        }
        if !changed && candidate == *current {
            return Ok(());
        }
        let model = self.model(Some(&candidate)).map_err(|e| ApiError::invalid(&e))?;
        let generation = self.generation + 1;
        self.dp
            .apply(&model, generation)
            .map_err(|e| ApiError::new("apply", format!("{e:#}")))?;
        self.generation = generation;
        let saved = candidate.save(&self.opts.run_dir);
        self.pushed = Some(candidate);
        self.publish();
        saved.map_err(|e| {
            ApiError::new(
                "persist",
                format!(
                    "applied, but the state could not be saved ({e:#}): a restarted agent would not have it"
                ),
            )
        })
    }
}

fn op_name(op: &Op) -> &'static str {
    Request::Change {
        op: op.clone(),
        wait: None,
    }
    .name()
}

/// The devices a batch prepared or updated, whose enforcement its answer waits for.
fn waited_devices(ops: &[Op]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for op in ops {
        if let Op::Port { device, .. } = op
            && !out.contains(device)
        {
            out.push(device.clone());
        }
    }
    out
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
