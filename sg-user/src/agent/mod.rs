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
    pub ct_entries: u32,
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
    /// The last compilation applied, re-applied when interfaces change.
    current: Option<Compiled>,
    opts: AgentOptions,
    shared: crate::observe::Shared,
    debug: Option<DebugSession>,
}

impl Ebpf {
    /// Tells the observers (log, monitor, metrics) what the ports are now.
    fn publish(&self, generation: u64) {
        let Some(c) = &self.current else { return };
        let logs: std::collections::HashMap<&str, &model::PortLog> =
            c.ports.iter().map(|p| (p.id.as_str(), &p.log)).collect();
        let mut view = crate::observe::View {
            generation,
            ..Default::default()
        };
        for p in self.applier.ports() {
            view.ports.insert(
                p.port_idx,
                crate::observe::PortView {
                    id: p.id.clone(),
                    device: p.device.clone(),
                    ifindex: p.ifindex,
                    enforced: p.ifindex.is_some(),
                    log: logs.get(p.id.as_str()).map(|l| (*l).clone()).unwrap_or_default(),
                },
            );
        }
        for r in self.applier.run_state(generation).rules {
            view.rules.insert(r.index, r);
        }
        self.shared.publish(view);
    }
}

impl Dataplane for Ebpf {
    fn apply(&mut self, model: &model::Model, links: &LinkTable, generation: u64) -> Result<()> {
        let compiled = compile::compile(model, &self.opts.host);
        apply_and_record(&mut self.applier, &compiled, links, &self.opts, generation)?;
        self.current = Some(compiled);
        self.publish(generation);
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
            self.publish(generation);
        }
        Ok(())
    }

    fn gc(&mut self) {
        match pinned::collect_expired(&self.opts.pin_root) {
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

    fn debug(&mut self, req: &crate::observe::control::DebugRequest) -> Result<String, String> {
        // The normal programs back on the links of the port being debugged, if any.
        let stop = |this: &mut Self| -> Result<Option<String>, String> {
            let Some(s) = this.debug.take() else {
                return Ok(None);
            };
            let iface = crate::datapath::Iface::new(&s.device, this.opts.netns.as_deref());
            this.applier
                .dp
                .attach(&iface)
                .map_err(|e| format!("restoring the programs of {}: {e:#}", s.device))?;
            info!(port = %s.port, tap = %s.device, "datapath debug off");
            Ok(Some(s.port.clone()))
        };
        if !req.on {
            return match stop(self)? {
                Some(p) => Ok(format!("debug records of port {p} are off")),
                None => Ok("no port was being debugged".into()),
            };
        }
        let view = self.shared.view();
        let (_, port) = view.find_port(&req.port)?;
        let (id, device) = (port.id.clone(), port.device.clone());
        let iface = crate::datapath::Iface::new(&device, self.opts.netns.as_deref());
        if port.ifindex.is_none() {
            return Err(format!("port {id} has no tap ({device}) on this host"));
        }
        stop(self)?;
        let opts = LoadOptions::matching_pins(&self.opts.pin_root).map_err(|e| format!("{e:#}"))?;
        let (mut dp, mut reader) = Datapath::load_debug(&opts, DebugLog { port: id.clone() })
            .map_err(|e| format!("loading the debug programs: {e:#}"))?;
        dp.attach(&iface)
            .map_err(|e| format!("swapping the debug programs into {device}: {e:#}"))?;
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
            let _ = self.applier.dp.attach(&iface);
            return Err(format!("starting the debug reader: {e}"));
        }
        info!(port = %id, tap = %device, "datapath debug on: per-stage records of this port follow");
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
    let shared = crate::observe::Shared::default();
    let mut observers: Option<Observers> = None;
    let (debug_tx, mut debug_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut dp: Box<dyn Dataplane> = match &opts.dataplane {
        DataplaneOptions::Ebpf => {
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
            applier.set_log_limits(opts.observe.log_rate_limit, opts.observe.log_burst_limit);
            generation = previous.map(|p| p.generation).unwrap_or(0);
            observers = Some(Observers::start(&opts, shared.clone(), debug_tx.clone())?);
            Box::new(Ebpf {
                applier,
                current: None,
                opts: opts.clone(),
                shared: shared.clone(),
                debug: None,
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
    let metrics = observers.as_ref().and_then(|o| o.metrics.clone());
    let timed = |dp: &mut Box<dyn Dataplane>, f: &mut dyn FnMut(&mut Box<dyn Dataplane>) -> Result<()>| {
        let t = Instant::now();
        let r = f(dp);
        if let Some(m) = &metrics {
            m.apply_duration.observe(t.elapsed().as_secs_f64());
            if r.is_err() {
                m.apply_errors.inc();
            }
        }
        r
    };
    let mut table = links.dump().await?;
    if let Some(m) = &initial {
        generation += 1;
        timed(&mut dp, &mut |dp| dp.apply(m, &table, generation))?;
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
                if let Err(e) = timed(&mut dp, &mut |dp| dp.links_changed(&deleted, &table, changed, generation)) {
                    error!("re-applying after an interface change: {e:#}");
                }
            }
            changed = watcher.changed() => {
                changed?;
                match load(&opts.state) {
                    Ok(m) => {
                        info!(model = %m.summary(), "input changed");
                        generation += 1;
                        if let Err(e) = timed(&mut dp, &mut |dp| dp.apply(&m, &table, generation)) {
                            error!("{e:#}");
                        }
                    }
                    Err(e) => error!("{e:#}\nthe running policy is unchanged"),
                }
            }
            _ = gc.tick() => dp.gc(),
            Some(call) = debug_rx.recv() => {
                let _ = call.reply.send(dp.debug(&call.request));
            }
        }
    }
    // A port being debugged gets the normal programs back: nobody would read its records.
    let _ = dp.debug(&crate::observe::control::DebugRequest {
        port: String::new(),
        on: false,
    });
    if let Some(o) = observers {
        o.stop();
    }
    info!("{}", dp.describe_exit());
    Ok(())
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
        info!(socket = %sock.display(), log = %o.log_output, "control socket and security-group log ready");
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
