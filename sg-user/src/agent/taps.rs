//! Where each port is enforced: the tcx links of its tap and the SG_PORTS entry that names the
//! port to the programs (design §1, §8).
//!
//! One owner does all of it, on a thread of its own (`sg-taps`) that lives in the taps'
//! network namespace and follows rtnetlink itself. A tap of a known port is enforced as soon as
//! its RTM_NEWLINK arrives, whatever the rest of the agent is doing: a policy apply writes the
//! LPM maps on the agent's thread for seconds at a time, and never holds this one up. The
//! applier sends each port's SG_PORTS value here (`switch`) and the switch happens on this
//! thread, so an event and a switch never interleave.
//!
//! Where a port is enforced ("its point"):
//! - **Hybrid plugging** (Neutron's OVS agent with an iptables-type driver): the tap sits on a
//!   Linux bridge `qbr<id>` whose only other port is the veth `qvb<id>`. Every frame of the VM
//!   crosses `qvb<id>`, which os-vif creates before the tap and keeps while the tap is deleted
//!   and re-created (reboots, resizes, migrations). The programs go there: `sg_to_vm` at its tcx
//!   ingress, `sg_from_vm` at its tcx egress. A re-created tap is then filtered from its first
//!   frame, with or without a running agent.
//! - Otherwise the tap itself, as soon as it exists. What remains is the time between the
//!   tap's RTM_NEWLINK and the two tcx attachments (README, "The agent on a node").
//!
//! A port that leaves the input while its point exists is closed (`PORT_F_CLOSED`: every frame
//! dropped) until the point goes.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::mpsc as std_mpsc,
};

use anyhow::{Context as _, Result, anyhow};
use aya::{
    maps::{HashMap, MapData},
    programs::{SchedClassifier, TcAttachType},
};
use sg_common::*;
use tokio::sync::mpsc as tokio_mpsc;
use tracing::{error, info, warn};

use super::links::{Link, LinkChange, Links};
use crate::datapath::{self, Attached, Iface, TapHandles};

/// What a device (a port's tap) should get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapPlan {
    pub port_id: String,
    pub info: PortInfo,
}

/// Where a device's port is enforced.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Point {
    /// The interface holding the links: the tap, or its hybrid peer `qvb<id>`.
    pub name: String,
    pub ifindex: u32,
}

/// What one switch did, for the log and the run state.
#[derive(Debug, Default, Clone)]
pub struct SwitchReport {
    /// Devices whose SG_PORTS value changed in place.
    pub switched: Vec<String>,
    /// Devices attached afresh.
    pub attached: Vec<String>,
    /// Devices whose pinned links (of a previous agent) got this agent's programs.
    pub taken_over: Vec<String>,
    /// Devices of the plan that do not exist.
    pub missing: Vec<String>,
    /// Leaving ports whose device exists: now closed.
    pub closed: Vec<String>,
    /// Failures, one line each; the other devices were switched.
    pub errors: Vec<String>,
}

/// The taps thread's view of one device, for the run state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceView {
    pub point: Option<Point>,
    pub closed: bool,
    pub port_id: String,
    pub info: PortInfo,
}

type Reply<T> = std_mpsc::Sender<Result<T>>;

enum Request {
    Switch {
        plan: BTreeMap<String, TapPlan>,
        leaving: Vec<(String, TapPlan)>,
        reply: Reply<SwitchReport>,
    },
    View {
        reply: Reply<BTreeMap<String, DeviceView>>,
    },
    Verify {
        reply: Reply<usize>,
    },
    Subscribe {
        events: tokio_mpsc::UnboundedSender<()>,
        reply: Reply<()>,
    },
    Debug {
        on: Option<DebugPrograms>,
        reply: Reply<Option<(String, Point)>>,
    },
}

/// Programs that replace this thread's own on one device's point (`sg debug DEVICE on`): a
/// second instance of the datapath, built with its per-stage records on, over the same maps.
pub struct DebugPrograms {
    pub device: String,
    pub progs: Vec<(&'static str, SchedClassifier, TcAttachType)>,
}

/// The handle the applier holds; the thread ends when it is dropped.
pub struct TapsHandle {
    tx: Option<tokio_mpsc::UnboundedSender<Request>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TapsHandle {
    /// Starts the taps thread in netns `netns` (or this thread's).
    pub fn spawn(handles: TapHandles, netns: Option<String>) -> Result<Self> {
        let (tx, rx) = tokio_mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = std_mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("sg-taps".into())
            .spawn(move || serve(handles, netns, rx, ready_tx))
            .context("starting the taps thread")?;
        ready_rx
            .recv()
            .map_err(|_| anyhow!("the taps thread died while starting"))??;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T> {
        let (reply, rx) = std_mpsc::channel();
        self.tx
            .as_ref()
            .expect("open until drop")
            .send(make(reply))
            .map_err(|_| anyhow!("the taps thread is gone"))?;
        rx.recv().map_err(|_| anyhow!("the taps thread is gone"))?
    }

    /// Makes every device of `plan` enforce its port, and closes the `leaving` devices (with
    /// the plan they had) that still exist. Resolves the namespace's interfaces afresh first.
    pub fn switch(
        &self,
        plan: BTreeMap<String, TapPlan>,
        leaving: Vec<(String, TapPlan)>,
    ) -> Result<SwitchReport> {
        self.call(|reply| Request::Switch { plan, leaving, reply })
    }

    /// Every device the thread enforces or closes, and every device of the plan.
    pub fn view(&self) -> Result<BTreeMap<String, DeviceView>> {
        self.call(|reply| Request::View { reply })
    }

    /// Checks that every enforced point still has both programs attached and its link pins;
    /// restores what is missing. Returns the number of links restored.
    pub fn verify(&self) -> Result<usize> {
        self.call(|reply| Request::Verify { reply })
    }

    /// Swaps `on`'s programs into its device's links, and the normal programs back into the
    /// links of the device debugged before (if any): this thread owns every link, so a tap
    /// event or a restore keeps the debug programs where they are. `None` ends debugging.
    /// Returns the device now debugged and its point.
    pub fn debug(&self, on: Option<DebugPrograms>) -> Result<Option<(String, Point)>> {
        self.call(|reply| Request::Debug { on, reply })
    }

    /// A wake-up whenever a device was attached, moved, closed or lost on the thread's own
    /// initiative (rtnetlink events, restores).
    pub fn subscribe(&self) -> Result<tokio_mpsc::UnboundedReceiver<()>> {
        let (events, rx) = tokio_mpsc::unbounded_channel();
        self.call(|reply| Request::Subscribe { events, reply })?;
        Ok(rx)
    }
}

impl Drop for TapsHandle {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    handles: TapHandles,
    netns: Option<String>,
    mut rx: tokio_mpsc::UnboundedReceiver<Request>,
    ready: std_mpsc::Sender<Result<()>>,
) {
    let setup = || -> Result<(tokio::runtime::Runtime, Taps)> {
        if let Some(ns) = &netns {
            let path = crate::netns::netns_path(ns);
            let file = std::fs::File::open(&path)
                .with_context(|| format!("network namespace {ns} ({})", path.display()))?;
            // SAFETY: setns on this thread only, which lives in the namespace from now on.
            if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) } != 0 {
                anyhow::bail!("setns into {ns}: {}", std::io::Error::last_os_error());
            }
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let taps = Taps::new(handles, netns.clone())?;
        Ok((rt, taps))
    };
    let (rt, mut taps) = match setup() {
        Ok(x) => x,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    rt.block_on(async move {
        // The socket exists before the first dump, so no event falls between the two.
        let mut links = match Links::open(None) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        let mut subscribers: Vec<tokio_mpsc::UnboundedSender<()>> = Vec::new();
        loop {
            tokio::select! {
                req = rx.recv() => {
                    let Some(req) = req else { break };
                    // Interface events that arrived first are handled first.
                    let queued = links.queued();
                    if !queued.is_empty() && handle_links(&mut taps, &links, queued).await {
                        notify(&mut subscribers);
                    }
                    match req {
                        Request::Switch { plan, leaving, reply } => {
                            let r = match links.dump().await {
                                Ok(table) => {
                                    taps.links = table;
                                    Ok(taps.switch(plan, leaving))
                                }
                                Err(e) => Err(e),
                            };
                            let _ = reply.send(r);
                        }
                        Request::View { reply } => {
                            let _ = reply.send(Ok(taps.view()));
                        }
                        Request::Verify { reply } => {
                            // Every device against a fresh table first: a backstop for any
                            // event this thread did not see.
                            let resynced =
                                handle_links(&mut taps, &links, vec![LinkChange::Overrun]).await;
                            let r = taps.verify();
                            if resynced || matches!(r, Ok(n) if n > 0) {
                                notify(&mut subscribers);
                            }
                            let _ = reply.send(r);
                        }
                        Request::Subscribe { events, reply } => {
                            subscribers.push(events);
                            let _ = reply.send(Ok(()));
                        }
                        Request::Debug { on, reply } => {
                            let _ = reply.send(taps.debug(on));
                        }
                    }
                }
                change = links.next() => {
                    let Some(change) = change else {
                        error!("the taps thread's rtnetlink connection closed: new taps are no longer followed");
                        break;
                    };
                    // Handle this event at once, and the ones already queued with it.
                    let mut changes = vec![change];
                    changes.extend(links.queued());
                    if handle_links(&mut taps, &links, changes).await {
                        notify(&mut subscribers);
                    }
                }
            }
        }
    });
}

/// Interface events; after an overrun (events lost), the whole table read again and every
/// device reconciled.
async fn handle_links(taps: &mut Taps, links: &Links, changes: Vec<LinkChange>) -> bool {
    if changes.contains(&LinkChange::Overrun) {
        match links.dump().await {
            Ok(table) => {
                taps.links = table;
                return taps.reconcile_all("interfaces re-read");
            }
            Err(e) => error!("re-reading the interfaces: {e:#}"),
        }
    }
    taps.on_links(changes)
}

fn notify(subscribers: &mut Vec<tokio_mpsc::UnboundedSender<()>>) {
    subscribers.retain(|s| s.send(()).is_ok());
}

/// The hook of a program at a point. On the tap, frames from the VM arrive (tcx ingress) and
/// frames to it leave (tcx egress); the hybrid bridge's veth sees them the other way round.
pub fn hook_at(on_tap: TcAttachType, hybrid: bool) -> TcAttachType {
    match (on_tap, hybrid) {
        (TcAttachType::Ingress, true) => TcAttachType::Egress,
        (TcAttachType::Egress, true) => TcAttachType::Ingress,
        (t, _) => t,
    }
}

/// `tapXXXXXXXX-XX` → `qvbXXXXXXXX-XX`: the veth that hybrid plugging puts on the tap's bridge.
pub fn hybrid_peer(device: &str) -> Option<String> {
    device.strip_prefix("tap").map(|id| format!("qvb{id}"))
}

struct Taps {
    progs: Vec<(&'static str, SchedClassifier, TcAttachType)>,
    /// The ids of `progs`, as a tcx query lists them.
    prog_ids: Vec<u32>,
    ports: HashMap<MapData, u32, PortInfo>,
    pin_root: Option<PathBuf>,
    netns: Option<String>,
    /// Device → what it should get: the input's local ports, and the closed ones.
    plan: BTreeMap<String, TapPlan>,
    /// Devices of `plan` whose port left the input.
    closed: BTreeSet<String>,
    /// The namespace's interfaces, kept current from rtnetlink.
    links: BTreeMap<String, Link>,
    /// Device → where its port is enforced now.
    points: BTreeMap<String, Point>,
    /// The device whose points get the debug programs instead of `progs`, and their ids.
    debug: Option<(DebugPrograms, Vec<u32>)>,
}

impl Taps {
    fn new(h: TapHandles, netns: Option<String>) -> Result<Self> {
        let prog_ids = h
            .progs
            .iter()
            .map(|(_, p, _)| Ok(p.info()?.id()))
            .collect::<Result<_>>()?;
        Ok(Self {
            progs: h.progs,
            prog_ids,
            ports: HashMap::try_from(aya::maps::Map::from_map_data(h.ports)?)?,
            pin_root: h.pin_root,
            netns,
            plan: BTreeMap::new(),
            closed: BTreeSet::new(),
            links: BTreeMap::new(),
            points: BTreeMap::new(),
            debug: None,
        })
    }

    /// The programs `device`'s point runs, and their ids.
    fn programs_of(
        &mut self,
        device: &str,
    ) -> (&mut Vec<(&'static str, SchedClassifier, TcAttachType)>, &[u32]) {
        match &mut self.debug {
            Some((d, ids)) if d.device == device => (&mut d.progs, ids),
            _ => (&mut self.progs, &self.prog_ids),
        }
    }

    /// Swaps the programs of `device`'s point (its pinned links) for the ones `programs_of`
    /// gives now.
    fn swap_programs(&mut self, device: &str) -> Result<Point> {
        let at = self
            .points
            .get(device)
            .cloned()
            .ok_or_else(|| anyhow!("{device} is not enforced on this host (no tap)"))?;
        let iface = self.iface(&at.name);
        let hybrid = at.name != device;
        let pin_root = self.pin_root.clone();
        let (progs, _) = self.programs_of(device);
        for (name, prog, attach_type) in progs.iter_mut() {
            let pin = pin_root
                .as_ref()
                .map(|root| datapath::link_pin_path(root, &iface, at.ifindex, name));
            datapath::attach_here(prog, hook_at(*attach_type, hybrid), &at.name, pin.as_deref())?;
        }
        Ok(at)
    }

    fn debug(&mut self, on: Option<DebugPrograms>) -> Result<Option<(String, Point)>> {
        if let Some((old, _)) = self.debug.take()
            && self.points.contains_key(&old.device)
        {
            // On failure the normal programs are still what this device wants: the next check
            // finds them missing and restores them.
            self.swap_programs(&old.device)
                .with_context(|| format!("putting the normal programs back on {}", old.device))?;
        }
        let Some(on) = on else { return Ok(None) };
        let ids = on
            .progs
            .iter()
            .map(|(_, p, _)| Ok(p.info()?.id()))
            .collect::<Result<Vec<u32>>>()?;
        let device = on.device.clone();
        self.debug = Some((on, ids));
        match self.swap_programs(&device) {
            Ok(at) => Ok(Some((device, at))),
            Err(e) => {
                self.debug = None;
                let _ = self.swap_programs(&device);
                Err(e)
            }
        }
    }

    fn iface(&self, name: &str) -> Iface {
        Iface::new(name, self.netns.as_deref())
    }

    /// Where `device`'s port should be enforced now: its hybrid peer when that is a port of a
    /// bridge and the tap is absent, not yet on a bridge, or on that same bridge; else the tap.
    fn wanted_point(&self, device: &str) -> Option<Point> {
        let tap = self.links.get(device);
        if let Some(peer) = hybrid_peer(device)
            && let Some(q) = self.links.get(&peer)
            && let Some(bridge) = q.master
            && tap.is_none_or(|t| t.master.is_none() || t.master == Some(bridge))
        {
            return Some(Point {
                name: peer,
                ifindex: q.ifindex,
            });
        }
        tap.map(|t| Point {
            name: device.to_string(),
            ifindex: t.ifindex,
        })
    }

    fn switch(&mut self, plan: BTreeMap<String, TapPlan>, leaving: Vec<(String, TapPlan)>) -> SwitchReport {
        let mut report = SwitchReport::default();
        for (device, had) in leaving {
            if plan.contains_key(&device) {
                continue;
            }
            // The applier's word covers a port this thread never saw (a previous agent's).
            let old = self.plan.get(&device).cloned().unwrap_or(had);
            if self.points.contains_key(&device) || self.wanted_point(&device).is_some() {
                warn!(
                    port = %old.port_id, tap = %device,
                    "port left the input while its tap exists: every frame of the tap is dropped until the tap is gone"
                );
                self.closed.insert(device.clone());
                self.plan.insert(device.clone(), closed_plan(&old));
                report.closed.push(device);
            } else {
                warn!(port = %old.port_id, tap = %device, "port left the input; it has no tap here");
                self.plan.remove(&device);
                self.closed.remove(&device);
            }
        }
        for (device, p) in plan {
            self.closed.remove(&device);
            self.plan.insert(device, p);
        }
        let devices: Vec<String> = self.plan.keys().cloned().collect();
        for device in devices {
            let _ = self.reconcile(&device, &mut report);
        }
        report
    }

    /// Interface events: enforce the known devices they concern, at once.
    fn on_links(&mut self, changes: Vec<LinkChange>) -> bool {
        let t = std::time::Instant::now();
        // The interface names the events touch; a device is touched through its own name or
        // its hybrid peer's.
        let mut names: BTreeSet<String> = BTreeSet::new();
        for c in changes {
            match c {
                LinkChange::New { name, link } => {
                    // A rename leaves the old name behind under the same ifindex.
                    let old: Vec<String> = self
                        .links
                        .iter()
                        .filter(|(n, l)| l.ifindex == link.ifindex && **n != name)
                        .map(|(n, _)| n.clone())
                        .collect();
                    for n in old {
                        self.links.remove(&n);
                        names.insert(n);
                    }
                    self.links.insert(name.clone(), link);
                    names.insert(name);
                }
                LinkChange::Overrun => {}
                LinkChange::Deleted { ifindex } => {
                    let gone: Vec<String> = self
                        .links
                        .iter()
                        .filter(|(_, l)| l.ifindex == ifindex)
                        .map(|(n, _)| n.clone())
                        .collect();
                    for n in gone {
                        self.links.remove(&n);
                        names.insert(n);
                    }
                    for (d, p) in &self.points {
                        if p.ifindex == ifindex {
                            names.insert(d.clone());
                        }
                    }
                }
            }
        }
        let devices: Vec<String> = self
            .plan
            .keys()
            .filter(|d| names.contains(*d) || hybrid_peer(d).is_some_and(|q| names.contains(&q)))
            .cloned()
            .collect();
        let mut report = SwitchReport::default();
        let mut changed = false;
        for device in devices {
            changed |= self.reconcile(&device, &mut report);
        }
        if !(report.attached.is_empty() && report.taken_over.is_empty() && report.switched.is_empty()) {
            info!(
                elapsed_us = t.elapsed().as_micros() as u64,
                attached = ?report.attached,
                took_over = ?report.taken_over,
                switched = ?report.switched,
                "interfaces changed: enforced"
            );
        }
        changed || !(report.switched.is_empty() && report.errors.is_empty())
    }

    /// Reconciles every device against `links`; returns whether anything changed.
    fn reconcile_all(&mut self, what: &str) -> bool {
        let mut report = SwitchReport::default();
        let mut changed = false;
        let devices: Vec<String> = self.plan.keys().cloned().collect();
        for device in devices {
            changed |= self.reconcile(&device, &mut report);
        }
        log_switch(what, &report);
        changed || !(report.switched.is_empty() && report.errors.is_empty())
    }

    /// Brings one device to its plan: its point attached with the port's SG_PORTS value, a
    /// point it no longer has released once the new one enforces (or the old one is gone).
    fn reconcile(&mut self, device: &str, report: &mut SwitchReport) -> bool {
        let Some(plan) = self.plan.get(device).cloned() else {
            return false;
        };
        let before = (self.points.get(device).cloned(), self.plan.contains_key(device));
        let want = self.wanted_point(device);
        let have = self.points.get(device).cloned();
        let mut moved = false;
        if let Some(w) = &want {
            let r = if have.as_ref() == Some(w) {
                self.ensure_entry(w, &plan, device, report)
            } else {
                self.enforce_at(w, &plan, device, report).map(|()| moved = true)
            };
            if let Err(e) = r {
                let line = format!("{device} ({}): {e:#}", w.name);
                error!("enforcing {line}");
                report.errors.push(line);
            }
        }
        if let Some(h) = have
            && want.as_ref() != Some(&h)
        {
            let still_there = self.links.get(&h.name).is_some_and(|l| l.ifindex == h.ifindex);
            if moved || !still_there {
                self.release(&h);
                if !moved {
                    self.points.remove(device);
                }
                if !still_there {
                    info!(port = %plan.port_id, tap = %device, point = %h.name, ifindex = h.ifindex, "interface gone");
                }
            }
        }
        if want.is_none() && !self.points.contains_key(device) {
            if self.closed.remove(device) {
                warn!(port = %plan.port_id, tap = %device, "the tap of a port that left the input is gone: no longer closed");
                self.plan.remove(device);
            } else {
                report.missing.push(device.to_string());
            }
        }
        before != (self.points.get(device).cloned(), self.plan.contains_key(device))
    }

    fn ensure_entry(
        &mut self,
        at: &Point,
        plan: &TapPlan,
        device: &str,
        report: &mut SwitchReport,
    ) -> Result<()> {
        if self.ports.get(&at.ifindex, 0).ok() != Some(plan.info) {
            // The switch: one update, so a packet sees the old or the new policy.
            self.ports
                .insert(at.ifindex, plan.info, 0)
                .with_context(|| format!("SG_PORTS entry of {} (ifindex {})", at.name, at.ifindex))?;
            report.switched.push(device.to_string());
        }
        Ok(())
    }

    fn enforce_at(
        &mut self,
        at: &Point,
        plan: &TapPlan,
        device: &str,
        report: &mut SwitchReport,
    ) -> Result<()> {
        // The entry first: the programs pass a frame of an interface without one untouched.
        if self.ports.get(&at.ifindex, 0).ok() != Some(plan.info) {
            self.ports
                .insert(at.ifindex, plan.info, 0)
                .with_context(|| format!("SG_PORTS entry of {} (ifindex {})", at.name, at.ifindex))?;
            report.switched.push(device.to_string());
        }
        let iface = self.iface(&at.name);
        let mut how = Attached::New;
        let hybrid = at.name != device;
        let pin_root = self.pin_root.clone();
        let (progs, _) = self.programs_of(device);
        for (name, prog, attach_type) in progs.iter_mut() {
            let pin = pin_root
                .as_ref()
                .map(|root| datapath::link_pin_path(root, &iface, at.ifindex, name));
            let hook = hook_at(*attach_type, hybrid);
            if datapath::attach_here(prog, hook, &at.name, pin.as_deref())? == Attached::TookOver {
                how = Attached::TookOver;
            }
        }
        self.points.insert(device.to_string(), at.clone());
        if at.name != device
            && let Some(tap) = self.links.get(device).map(|l| l.ifindex)
        {
            // Links a previous agent pinned on the tap itself would filter every frame twice.
            self.release(&Point {
                name: device.to_string(),
                ifindex: tap,
            });
        }
        match how {
            Attached::New => report.attached.push(device.to_string()),
            Attached::TookOver => report.taken_over.push(device.to_string()),
        }
        if at.name != device {
            info!(tap = %device, point = %at.name, ifindex = at.ifindex, "enforced on the hybrid bridge's veth");
        }
        Ok(())
    }

    /// A point that no longer enforces its device: its entry and its links go.
    fn release(&mut self, at: &Point) {
        let _ = self.ports.remove(&at.ifindex);
        if let Some(root) = &self.pin_root
            && let Err(e) = datapath::unpin_links(root, &self.iface(&at.name), at.ifindex)
        {
            warn!("unpinning the links of {} ({}): {e:#}", at.name, at.ifindex);
        }
    }

    fn view(&self) -> BTreeMap<String, DeviceView> {
        self.plan
            .iter()
            .map(|(d, p)| {
                (
                    d.clone(),
                    DeviceView {
                        point: self.points.get(d).cloned(),
                        closed: self.closed.contains(d),
                        port_id: p.port_id.clone(),
                        info: p.info,
                    },
                )
            })
            .collect()
    }

    /// Every point still has both programs attached (a tcx query) and, with a pin root, its
    /// link pins. What is missing is attached and pinned again.
    fn verify(&mut self) -> Result<usize> {
        let mut restored = 0;
        let points: Vec<(String, Point)> = self.points.iter().map(|(d, p)| (d.clone(), p.clone())).collect();
        for (device, at) in points {
            // A point whose interface was deleted or re-created a moment ago is the event
            // handling's business, not a removal behind the agent's back.
            if crate::netns::ifindex(&at.name).ok() != Some(at.ifindex) {
                continue;
            }
            let iface = self.iface(&at.name);
            let hybrid = at.name != device;
            let pin_root = self.pin_root.clone();
            let (progs, ids) = self.programs_of(&device);
            for (i, (name, prog, attach_type)) in progs.iter_mut().enumerate() {
                let hook = hook_at(*attach_type, hybrid);
                let attached = datapath::tcx_prog_ids(at.ifindex, hook)
                    .map(|got| got.contains(&ids[i]))
                    .unwrap_or(false);
                let pin = pin_root
                    .as_ref()
                    .map(|root| datapath::link_pin_path(root, &iface, at.ifindex, name));
                let pinned = pin.as_ref().is_none_or(|p| p.exists());
                if attached && pinned {
                    continue;
                }
                if attached {
                    // The pin is gone but the link lives on through an fd someone else holds
                    // (a detach in progress): it is detached when that fd closes, and the next
                    // check attaches afresh. The kernel refuses a second attachment before.
                    warn!(tap = %device, point = %at.name, program = %name, "the link pin was removed; the link is still attached");
                    continue;
                }
                error!(
                    tap = %device, point = %at.name, ifindex = at.ifindex, program = %name, pinned,
                    "enforcement was removed from under the agent (sg detach --force? bpftool link detach?): restoring it"
                );
                if let Some(p) = &pin
                    && p.exists()
                {
                    std::fs::remove_file(p).with_context(|| format!("removing {}", p.display()))?;
                }
                datapath::attach_here(prog, hook, &at.name, pin.as_deref())?;
                restored += 1;
            }
        }
        Ok(restored)
    }
}

fn closed_plan(old: &TapPlan) -> TapPlan {
    TapPlan {
        port_id: old.port_id.clone(),
        info: PortInfo {
            policy: 0,
            addr_id: 0,
            flags: PORT_F_FILTERED | PORT_F_CLOSED,
            ..old.info
        },
    }
}

pub fn log_switch(what: &str, r: &SwitchReport) {
    if r.attached.is_empty() && r.taken_over.is_empty() && r.switched.is_empty() && r.closed.is_empty() {
        return;
    }
    info!(
        attached = ?r.attached,
        took_over = ?r.taken_over,
        switched = ?r.switched,
        closed = ?r.closed,
        "{what}"
    );
}
