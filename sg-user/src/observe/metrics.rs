//! `sg agent --metrics-addr ADDR`: `/metrics` in the Prometheus text format (0.0.4).
//!
//! The datapath's counters are read from the pinned maps when Prometheus scrapes, through this
//! thread's own descriptors, so a scrape shows the maps as they are and never waits for, or
//! holds up, an apply. Each map is read whole with BPF_MAP_LOOKUP_BATCH, a few syscalls per
//! map rather than two per entry. The agent's own measurements (apply durations and errors) are ordinary
//! metrics it updates after each apply.
//!
//! Per-rule hit counters (`--metrics-rule-hits`) are off by default: their cardinality is the
//! number of rules on the node.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    sync::{Arc, atomic::Ordering},
};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, MapInfo, MapType};
use prometheus::{
    Encoder as _, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
    core::{Collector, Desc},
    proto::MetricFamily,
};
use sg_common::*;

use super::{EventCounters, Shared, port_ids};
use crate::datapath::batch;

/// What the agent records itself.
#[derive(Clone)]
pub struct AgentMetrics {
    pub apply_duration: Histogram,
    pub apply_errors: IntCounter,
}

/// The registry behind `/metrics`.
pub struct Metrics {
    pub registry: Registry,
    pub agent: AgentMetrics,
}

impl Metrics {
    pub fn new(
        pin_root: &Path,
        shared: Shared,
        counters: Arc<EventCounters>,
        rule_hits: bool,
    ) -> Result<Self> {
        let registry = Registry::new();
        let apply_duration = Histogram::with_opts(
            HistogramOpts::new(
                "sg_apply_duration_seconds",
                "Time to compile and apply a validated input (an input file change or a Neutron driver call).",
            )
            .buckets(prometheus::exponential_buckets(0.001, 2.0, 14)?),
        )?;
        let apply_errors = IntCounter::new(
            "sg_apply_errors_total",
            "Applies that failed; the running policy stayed as it was.",
        )?;
        registry.register(Box::new(apply_duration.clone()))?;
        registry.register(Box::new(apply_errors.clone()))?;
        registry.register(Box::new(MapCollector::new(
            pin_root, shared, counters, rule_hits,
        )?))?;
        Ok(Self {
            registry,
            agent: AgentMetrics {
                apply_duration,
                apply_errors,
            },
        })
    }

    /// The exposition, in the Prometheus text format.
    pub fn render(&self) -> Result<String> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(String::from_utf8(out)?)
    }

    /// Serves `/metrics` on `addr` from a thread of its own. Returns the bound address.
    pub fn serve(self: Arc<Self>, addr: SocketAddr) -> Result<SocketAddr> {
        let listener =
            std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr} for /metrics"))?;
        listener.set_nonblocking(true)?;
        let bound = listener.local_addr()?;
        std::thread::Builder::new()
            .name("sg-metrics".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!("metrics server: {e}");
                        return;
                    }
                };
                rt.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!("metrics server: {e}");
                            return;
                        }
                    };
                    let app = axum::Router::new().route(
                        "/metrics",
                        axum::routing::get(move || {
                            let m = self.clone();
                            async move {
                                match m.render() {
                                    Ok(body) => (
                                        axum::http::StatusCode::OK,
                                        [(
                                            axum::http::header::CONTENT_TYPE,
                                            TextEncoder::new().format_type().to_string(),
                                        )],
                                        body,
                                    ),
                                    Err(e) => (
                                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                                        [(axum::http::header::CONTENT_TYPE, "text/plain".to_string())],
                                        format!("{e:#}\n"),
                                    ),
                                }
                            }
                        }),
                    );
                    if let Err(e) = axum::serve(listener, app).await {
                        tracing::error!("metrics server stopped: {e}");
                    }
                });
            })?;
        Ok(bound)
    }
}

/// A pinned map, opened once: its descriptor and shape.
struct Pinned {
    name: &'static str,
    data: MapData,
    map_type: MapType,
    key_size: usize,
    value_size: usize,
    max_entries: u32,
}

impl Pinned {
    fn open(root: &Path, name: &'static str) -> Result<Self> {
        let path = root.join("maps").join(name);
        let data =
            MapData::from_pin(&path).with_context(|| format!("opening pinned map {}", path.display()))?;
        let info = MapInfo::from_pin(&path)?;
        Ok(Self {
            name,
            data,
            map_type: info.map_type()?,
            key_size: info.key_size() as usize,
            value_size: info.value_size() as usize,
            max_entries: info.max_entries(),
        })
    }

    /// Every entry, `f(key, value)` on the raw bytes; returns how many.
    fn each(&self, f: impl FnMut(&[u8], &[u8])) -> Result<usize> {
        let per_cpu = matches!(
            self.map_type,
            MapType::PerCpuHash | MapType::PerCpuArray | MapType::LruPerCpuHash
        );
        batch::lookup_all(&self.data, self.key_size, self.value_size, per_cpu, 4096, f)
            .with_context(|| format!("reading {}", self.name))
    }
}

/// The sum over CPUs of a per-CPU `Counter` value.
fn per_cpu_sum(v: &[u8]) -> (u64, u64) {
    let stride = size_of::<Counter>().next_multiple_of(8);
    v.chunks_exact(stride).fold((0, 0), |a, c| {
        let c: Counter = bytemuck::pod_read_unaligned(&c[..size_of::<Counter>()]);
        (a.0 + c.packets, a.1 + c.bytes)
    })
}

/// The families read from the maps at scrape time.
struct MapCollector {
    maps: Vec<Pinned>,
    shared: Shared,
    counters: Arc<EventCounters>,
    rule_hits: bool,
    descs: Vec<Desc>,
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition")
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition")
}

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).expect("valid metric definition")
}

const PORT_LABELS: [&str; 4] = ["port", "device", "direction", "reason"];

/// Fresh instances of every family, so that each scrape starts from the maps alone.
struct Families {
    build_info: IntGaugeVec,
    packets: IntCounterVec,
    bytes: IntCounterVec,
    ct_entries: IntGaugeVec,
    ct_capacity: IntGaugeVec,
    ports: IntGaugeVec,
    map_entries: IntGaugeVec,
    map_capacity: IntGaugeVec,
    log_events: IntCounterVec,
    log_lines: IntCounter,
    log_write_errors: IntCounter,
    monitor_events: IntCounterVec,
    rule_packets: IntCounterVec,
    rule_bytes: IntCounterVec,
}

impl Families {
    fn new() -> Self {
        Self {
            build_info: gauge_vec("sg_build_info", "The running sg: always 1.", &["version"]),
            packets: counter_vec(
                "sg_packets_total",
                "Packets decided on a port, by direction (to-vm, from-vm) and reason.",
                &PORT_LABELS,
            ),
            bytes: counter_vec(
                "sg_bytes_total",
                "Bytes of the packets decided on a port, by direction and reason.",
                &PORT_LABELS,
            ),
            ct_entries: gauge_vec(
                "sg_conntrack_entries",
                "Conntrack entries, expired ones included until collected, by table: unassured \
                 (SG_CONNTRACK) or assured (SG_CT_ASSURED).",
                &["table"],
            ),
            ct_capacity: gauge_vec(
                "sg_conntrack_capacity",
                "Capacity of a conntrack table; a full unassured table evicts its least recently \
                 used flow, a full assured table admits no new assured flow.",
                &["table"],
            ),
            ports: gauge_vec(
                "sg_ports",
                "Managed ports by state: enforced (the tap or its hybrid veth has the port's \
                 entry), pending, no-tap, closed (left the input while its tap exists).",
                &["state"],
            ),
            map_entries: gauge_vec("sg_map_entries", "Entries in each pinned map.", &["map"]),
            map_capacity: gauge_vec(
                "sg_map_capacity",
                "Capacity (max_entries) of each pinned map.",
                &["map"],
            ),
            log_events: counter_vec(
                "sg_log_events_total",
                "Security-group log events of a port: admitted by its token bucket, limited by it, \
                 or lost because the event buffer was full.",
                &["port", "device", "result"],
            ),
            log_lines: counter("sg_log_lines_total", "Security-group log lines written."),
            log_write_errors: counter(
                "sg_log_write_errors_total",
                "Security-group log lines that could not be written.",
            ),
            monitor_events: counter_vec(
                "sg_monitor_events_total",
                "Verdict events for `sg monitor` since it was last switched on, by result.",
                &["result"],
            ),
            rule_packets: counter_vec(
                "sg_rule_hits_packets_total",
                "Packets of new flows a security-group rule admitted (--metrics-rule-hits).",
                &["rule_index", "security_group_id", "rule_id"],
            ),
            rule_bytes: counter_vec(
                "sg_rule_hits_bytes_total",
                "Bytes of the packets a security-group rule admitted (--metrics-rule-hits).",
                &["rule_index", "security_group_id", "rule_id"],
            ),
        }
    }

    fn descs(&self, rule_hits: bool) -> Vec<Desc> {
        let mut v: Vec<Desc> = Vec::new();
        let mut add = |c: &dyn Collector| v.extend(c.desc().into_iter().cloned());
        add(&self.build_info);
        add(&self.packets);
        add(&self.bytes);
        add(&self.ct_entries);
        add(&self.ct_capacity);
        add(&self.ports);
        add(&self.map_entries);
        add(&self.map_capacity);
        add(&self.log_events);
        add(&self.log_lines);
        add(&self.log_write_errors);
        add(&self.monitor_events);
        if rule_hits {
            add(&self.rule_packets);
            add(&self.rule_bytes);
        }
        v
    }
}

impl MapCollector {
    fn new(pin_root: &Path, shared: Shared, counters: Arc<EventCounters>, rule_hits: bool) -> Result<Self> {
        Ok(Self {
            maps: PINNED_MAPS
                .iter()
                .map(|n| Pinned::open(pin_root, n))
                .collect::<Result<_>>()?,
            shared,
            counters,
            rule_hits,
            descs: Families::new().descs(rule_hits),
        })
    }

    fn map(&self, name: &str) -> &Pinned {
        self.maps
            .iter()
            .find(|m| m.name == name)
            .expect("every pinned map is opened")
    }

    fn read(&self) -> Result<Vec<MetricFamily>> {
        let f = Families::new();
        let view = self.shared.view();
        let ids = port_ids(&view);
        f.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        let stats = self.map(MAP_STATS).each(|k, v| {
            let k: StatKey = bytemuck::pod_read_unaligned(k);
            let (port, device) = ids.get(&k.port_idx).copied().unwrap_or(("", ""));
            let dir = if k.dir == DIR_INGRESS { "to-vm" } else { "from-vm" };
            let labels = [port, device, dir, reason_name(k.reason)];
            let (p, b) = per_cpu_sum(v);
            f.packets.with_label_values(&labels).inc_by(p);
            f.bytes.with_label_values(&labels).inc_by(b);
        })?;

        for m in &self.maps {
            f.map_capacity
                .with_label_values(&[m.name])
                .set(m.max_entries as i64);
            let n = match m.map_type {
                MapType::RingBuf => continue,
                MapType::Array | MapType::PerCpuArray => m.max_entries as usize,
                // The tries are the agent's: it counts what it wrote (Applier::lpm_entries).
                MapType::LpmTrie => match view.map_entries.get(m.name) {
                    Some(n) => *n,
                    None => continue,
                },
                _ if m.name == MAP_STATS => stats,
                _ => m.each(|_, _| {})?,
            };
            f.map_entries.with_label_values(&[m.name]).set(n as i64);
            let table = match m.name {
                MAP_CONNTRACK => Some("unassured"),
                MAP_CT_ASSURED => Some("assured"),
                _ => None,
            };
            if let Some(t) = table {
                f.ct_entries.with_label_values(&[t]).set(n as i64);
                f.ct_capacity.with_label_values(&[t]).set(m.max_entries as i64);
            }
        }

        let mut states: BTreeMap<&str, i64> =
            [("enforced", 0), ("pending", 0), ("no-tap", 0), ("closed", 0)].into();
        for p in view.ports.values() {
            let s = match (p.ifindex, p.enforced) {
                _ if p.closed => "closed",
                (None, _) => "no-tap",
                (Some(_), true) => "enforced",
                (Some(_), false) => "pending",
            };
            *states.get_mut(s).expect("listed") += 1;
        }
        for (s, n) in states {
            f.ports.with_label_values(&[s]).set(n);
        }

        self.map(MAP_LOG_LIMITS).each(|k, v| {
            let idx: u32 = bytemuck::pod_read_unaligned(k);
            let b: LogLimit = bytemuck::pod_read_unaligned(v);
            let (port, device) = ids.get(&idx).copied().unwrap_or(("", ""));
            for (result, n) in [("admitted", b.admitted), ("limited", b.limited), ("lost", b.lost)] {
                f.log_events.with_label_values(&[port, device, result]).inc_by(n);
            }
        })?;
        f.log_lines
            .inc_by(self.counters.log_lines.load(Ordering::Relaxed));
        f.log_write_errors
            .inc_by(self.counters.log_write_errors.load(Ordering::Relaxed));
        self.map(MAP_MONITOR).each(|_, v| {
            let m: MonitorCfg = bytemuck::pod_read_unaligned(v);
            for (result, n) in [
                ("admitted", m.bucket.admitted),
                ("limited", m.bucket.limited),
                ("lost", m.bucket.lost),
            ] {
                f.monitor_events.with_label_values(&[result]).inc_by(n);
            }
        })?;

        if self.rule_hits {
            self.map(MAP_RULE_HITS).each(|k, v| {
                let idx: u32 = bytemuck::pod_read_unaligned(k);
                let Some(rule) = view.rules.get(&idx) else {
                    return;
                };
                let (p, b) = per_cpu_sum(v);
                let labels = [
                    idx.to_string(),
                    rule.security_group_id.clone(),
                    rule.rule_id.clone(),
                ];
                f.rule_packets.with_label_values(&labels).inc_by(p);
                f.rule_bytes.with_label_values(&labels).inc_by(b);
            })?;
        }

        let mut out = Vec::new();
        let mut add = |c: &dyn Collector| out.extend(c.collect());
        add(&f.build_info);
        add(&f.packets);
        add(&f.bytes);
        add(&f.ct_entries);
        add(&f.ct_capacity);
        add(&f.ports);
        add(&f.map_entries);
        add(&f.map_capacity);
        add(&f.log_events);
        add(&f.log_lines);
        add(&f.log_write_errors);
        add(&f.monitor_events);
        if self.rule_hits {
            add(&f.rule_packets);
            add(&f.rule_bytes);
        }
        Ok(out)
    }
}

impl Collector for MapCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        match self.read() {
            Ok(v) => v,
            Err(e) => {
                // A scrape shows what it could read; the gap is in the agent's log.
                tracing::warn!("metrics: reading the pinned maps: {e:#}");
                Vec::new()
            }
        }
    }
}
