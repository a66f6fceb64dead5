//! Observability of a running agent: the security-group log and `sg monitor` (both fed by the
//! datapath's SG_EVENTS ring buffer, read here on a thread of its own), the control socket
//! behind `sg monitor` and `sg debug`, and the Prometheus `/metrics` endpoint.
//!
//! None of it runs on the agent's reconcile loop: the event reader, the control socket and the
//! metrics server each have a thread, read the pinned maps through their own descriptors, and
//! see the agent's ports through [`Shared`], which an apply replaces in one pointer swap after
//! it finished. A slow log file, a stuck monitor client or a scrape never delays an apply.

pub mod control;
pub mod metrics;
pub mod netlog;
pub mod pkt;

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::{SyncSender, TrySendError},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use aya::maps::{Array, MapData, RingBuf};
use sg_common::*;
use tracing::warn;

use crate::{agent::apply::LiveRule, model::PortLog, pinned};

/// One managed port as the observers see it.
#[derive(Debug, Clone, Default)]
pub struct PortView {
    pub id: String,
    pub device: String,
    pub ifindex: Option<u32>,
    /// The tap (or its hybrid veth) has the port's SG_PORTS entry.
    pub enforced: bool,
    /// The port left the input while its tap exists: every frame is dropped.
    pub closed: bool,
    pub log: PortLog,
}

/// What the observers know of the agent's state, replaced whole after each apply.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub generation: u64,
    /// By port_idx.
    pub ports: BTreeMap<u32, PortView>,
    /// By rule index.
    pub rules: BTreeMap<u32, LiveRule>,
    /// Entries of the maps only the agent writes (the LPM tries), as the agent counts them.
    pub map_entries: BTreeMap<&'static str, usize>,
}

impl View {
    /// A port by id, unique id prefix or tap name.
    pub fn find_port(&self, key: &str) -> Result<(u32, &PortView), String> {
        let hits: Vec<(u32, &PortView)> = self
            .ports
            .iter()
            .filter(|(_, p)| p.id == key || p.device == key || p.id.starts_with(key))
            .map(|(i, p)| (*i, p))
            .collect();
        match hits.as_slice() {
            [one] => Ok(*one),
            [] => Err(format!("no managed port with id, id prefix or tap name {key:?}")),
            _ => Err(format!(
                "{key:?} matches {} ports; give more of the id",
                hits.len()
            )),
        }
    }
}

/// The agent's side of the observers: it publishes a new [`View`] after each apply.
#[derive(Clone, Default)]
pub struct Shared {
    view: Arc<RwLock<Arc<View>>>,
}

impl Shared {
    pub fn publish(&self, view: View) {
        *self.view.write().expect("view lock") = Arc::new(view);
    }

    pub fn view(&self) -> Arc<View> {
        self.view.read().expect("view lock").clone()
    }
}

/// The stage of the pipeline that gave a reason (sg-ebpf/README.md's sections).
pub fn stage(reason: u8) -> &'static str {
    match reason {
        REASON_ALLOW_UNFILTERED => "unfiltered",
        REASON_DROP_MALFORMED | REASON_DROP_VLAN | REASON_DROP_IPV6_EXT | REASON_ALLOW_NON_IP => "parse",
        REASON_DROP_ETHERTYPE | REASON_DROP_SPOOF_MAC | REASON_DROP_SPOOF_ARP | REASON_ALLOW_ARP => {
            "port-security"
        }
        REASON_DROP_SPOOF_IP
        | REASON_DROP_DHCP_SPOOF
        | REASON_DROP_DHCP6_SPOOF
        | REASON_DROP_RA
        | REASON_ALLOW_DHCP_CLIENT
        | REASON_ALLOW_DHCP6_CLIENT
        | REASON_ALLOW_ICMP6
        | REASON_ALLOW_DAD_MLD
        | REASON_ALLOW_ND_MLD
        | REASON_ALLOW_RA
        | REASON_ALLOW_DHCP_REPLY
        | REASON_ALLOW_DHCP6_REPLY => "fixed-rules",
        REASON_ALLOW_FRAG | REASON_DROP_FRAG_NO_FIRST | REASON_DROP_FRAG_DENIED => "fragment",
        REASON_ALLOW_ESTABLISHED | REASON_ALLOW_RELATED | REASON_DROP_INVALID | REASON_DROP_REVOKED => {
            "conntrack"
        }
        REASON_DROP_PORT_CLOSED => "port-closed",
        REASON_ALLOW_RULE | REASON_DROP_NO_RULE => "policy",
        _ => "unknown",
    }
}

/// The reason code of a `reason_name`.
pub fn reason_code(name: &str) -> Option<u8> {
    (1..=REASON_LAST).find(|r| reason_name(*r) == name)
}

/// The captured bytes of an event.
pub fn captured(e: &Event) -> &[u8] {
    &e.data[..(e.cap_len as usize).min(EVENT_SNAP_LEN)]
}

/// Wall-clock time of an event (its timestamp is CLOCK_MONOTONIC), as seconds since the epoch.
pub fn event_time(e: &Event) -> f64 {
    let now_mono = pinned::monotonic_ns();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    now - (now_mono.saturating_sub(e.ts_ns)) as f64 / 1e9
}

/// `YYYY-mm-dd HH:MM:SS.mmm` (local time, as oslo.log writes it) and `HH:MM:SS.uuuuuu`.
pub fn local_time(t: f64) -> (String, String) {
    let secs = t.floor() as libc::time_t;
    let frac = t - t.floor();
    // SAFETY: localtime_r writes the struct we pass.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    unsafe { libc::localtime_r(&secs, &mut tm) };
    let date = format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:03}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        ((frac * 1000.0) as u32).min(999)
    );
    let short = format!(
        "{:02}:{:02}:{:02}.{:06}",
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        ((frac * 1e6) as u32).min(999_999)
    );
    (date, short)
}

/// A `sg monitor` line: time, tap, direction, verdict, reason, stage, rule, packet.
pub fn monitor_line(e: &Event, view: &View) -> String {
    let (_, time) = local_time(event_time(e));
    let (device, port) = match view.ports.get(&e.port_idx) {
        Some(p) => (p.device.as_str(), p.id.as_str()),
        None => ("?", "?"),
    };
    let dir = if e.dir == DIR_INGRESS {
        "to-vm  "
    } else {
        "from-vm"
    };
    let verdict = if reason_allows(e.reason) { "ALLOW" } else { "DROP " };
    let rule = match (e.rule, view.rules.get(&e.rule)) {
        (0, _) => "-".to_string(),
        (i, Some(r)) => format!("{i} ({}: {})", r.security_group_id, r.text),
        (i, None) => i.to_string(),
    };
    format!(
        "{time} {device} {dir} {verdict} {reason} stage={stage} rule={rule} port={port} len={len} {pkt}",
        reason = reason_name(e.reason),
        stage = stage(e.reason),
        len = e.pkt_len,
        pkt = pkt::summary(captured(e)),
    )
}

/// What a monitor client asked for.
#[derive(Debug, Clone)]
pub struct MonitorFilter {
    /// port_idx, or None for every port.
    pub port_idx: Option<u32>,
    /// Reasons wanted (bit r); all when the client named none.
    pub reasons: u64,
    pub rate: u32,
    pub burst: u32,
}

struct Client {
    id: u64,
    filter: MonitorFilter,
    tx: SyncSender<String>,
    dropped: Arc<AtomicU64>,
}

/// The attached `sg monitor` clients, and SG_MONITOR kept to their union.
pub struct Monitors {
    pin_root: PathBuf,
    clients: Mutex<Vec<Client>>,
    next_id: AtomicU64,
}

impl Monitors {
    pub fn new(pin_root: &Path) -> Self {
        Self {
            pin_root: pin_root.to_path_buf(),
            clients: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
        }
    }

    /// Registers a client; returns its id and the counter of lines it was too slow to take.
    pub fn attach(&self, filter: MonitorFilter, tx: SyncSender<String>) -> Result<(u64, Arc<AtomicU64>)> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let dropped = Arc::new(AtomicU64::new(0));
        let mut clients = self.clients.lock().expect("monitor lock");
        clients.push(Client {
            id,
            filter,
            tx,
            dropped: dropped.clone(),
        });
        self.write_config(&clients)?;
        Ok((id, dropped))
    }

    pub fn detach(&self, id: u64) {
        let mut clients = self.clients.lock().expect("monitor lock");
        clients.retain(|c| c.id != id);
        if let Err(e) = self.write_config(&clients) {
            warn!("switching the monitor off: {e:#}");
        }
    }

    /// Switches the datapath's monitor events off, whatever clients think (agent exit).
    pub fn off(&self) {
        let mut clients = self.clients.lock().expect("monitor lock");
        clients.clear();
        let _ = self.write_config(&clients);
    }

    fn write_config(&self, clients: &[Client]) -> Result<()> {
        let mut cfg = MonitorCfg::default();
        if !clients.is_empty() {
            let rate = clients.iter().map(|c| c.filter.rate).max().unwrap_or(1);
            let burst = clients.iter().map(|c| c.filter.burst).max().unwrap_or(1);
            cfg.bucket = Bucket::new(rate, burst);
            cfg.enabled = 1;
            let ports: Vec<Option<u32>> = clients.iter().map(|c| c.filter.port_idx).collect();
            cfg.port_idx = match ports[0] {
                Some(p) if ports.iter().all(|x| *x == Some(p)) => p,
                _ => 0,
            };
            cfg.reasons = clients.iter().fold(0, |a, c| a | c.filter.reasons);
        }
        let mut map: Array<MapData, MonitorCfg> = pinned::open(&self.pin_root, MAP_MONITOR)?.try_into()?;
        map.set(0, cfg, BPF_F_LOCK).context("writing SG_MONITOR")?;
        Ok(())
    }

    fn dispatch(&self, e: &Event, view: &View) {
        let clients = self.clients.lock().expect("monitor lock");
        let mut line = None;
        for c in clients.iter() {
            if c.filter.port_idx.is_some_and(|p| p != e.port_idx)
                || e.reason >= 64
                || (c.filter.reasons >> e.reason) & 1 == 0
            {
                continue;
            }
            let l = line.get_or_insert_with(|| monitor_line(e, view)).clone();
            if let Err(TrySendError::Full(_)) = c.tx.try_send(l) {
                c.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// BPF_F_LOCK: read or write a map value that holds a bpf_spin_lock under that lock.
pub const BPF_F_LOCK: u64 = 4;

/// Counters of the event reader, for the metrics.
#[derive(Default)]
pub struct EventCounters {
    pub log_lines: AtomicU64,
    pub log_write_errors: AtomicU64,
    pub monitor_events: AtomicU64,
}

/// Reads SG_EVENTS until `stop`: log events to `sink`, monitor events to the clients.
pub fn spawn_reader(
    pin_root: &Path,
    shared: Shared,
    sink: Option<netlog::Sink>,
    monitors: Arc<Monitors>,
    counters: Arc<EventCounters>,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>> {
    let mut ring: RingBuf<MapData> = pinned::open(pin_root, MAP_EVENTS)?
        .try_into()
        .context("SG_EVENTS is not a ring buffer")?;
    let mut sink = sink;
    Ok(std::thread::Builder::new()
        .name("sg-events".into())
        .spawn(move || {
            use std::os::fd::AsRawFd as _;
            let fd = ring.as_raw_fd();
            while !stop.load(Ordering::Relaxed) {
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, 200) };
                let view = shared.view();
                while let Some(item) = ring.next() {
                    if item.len() < size_of::<Event>() {
                        continue;
                    }
                    let e: Event = bytemuck::pod_read_unaligned(&item[..size_of::<Event>()]);
                    drop(item);
                    if e.flags & (EVENT_F_LOG_ACCEPT | EVENT_F_LOG_DROP) != 0
                        && let Some(sink) = sink.as_mut()
                    {
                        // A port the view no longer has (removed since) has nothing to name.
                        if let Some(line) = netlog::line(&e, &view) {
                            match sink.write(&line) {
                                Ok(()) => {
                                    counters.log_lines.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(err) => {
                                    if counters.log_write_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                                        warn!("writing the security-group log: {err:#}");
                                    }
                                }
                            }
                        }
                    }
                    if e.flags & EVENT_F_MONITOR != 0 {
                        counters.monitor_events.fetch_add(1, Ordering::Relaxed);
                        monitors.dispatch(&e, &view);
                    }
                }
            }
        })?)
}

/// How often a monitor's writer checks that its client is still there.
pub const CLIENT_CHECK: Duration = Duration::from_millis(500);

/// port_idx -> port id, for metrics labels.
pub fn port_ids(view: &View) -> HashMap<u32, (&str, &str)> {
    view.ports
        .iter()
        .map(|(i, p)| (*i, (p.id.as_str(), p.device.as_str())))
        .collect()
}
