//! `sg`: Neutron security groups on eBPF.
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::{CommandFactory as _, Parser, Subcommand};
use sg_user::{
    agent, compile, config,
    datapath::{self, Datapath, Iface, LoadOptions, allowlist::Allow},
    diff, inspect, iptables, model,
    observe::control,
    trace,
};

#[derive(Parser)]
#[command(
    name = "sg",
    version,
    about = "Neutron security groups enforced by eBPF at tcx on VM taps",
    // A flag given twice takes its last value: the command line's, after the config file's.
    args_override_self = true
)]
struct Cli {
    /// TOML file of agent flags (`/etc/sg/sg.toml` in the package): each key is a long flag of
    /// `sg agent` without the dashes (`ct-entries = 524288`, `no-ipset = true`). Flags on the
    /// command line override the file. Other subcommands read only its `pin-root` and `run-dir`.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// bpffs directory holding sg's pinned maps and links.
    #[arg(long, global = true, default_value = datapath::DEFAULT_PIN_ROOT)]
    pin_root: PathBuf,
    /// Directory of the agent's run state (port ↔ tap ↔ index, rule texts) for the CLI.
    #[arg(long, global = true, default_value = "/run/sg")]
    run_dir: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check a Neutron input (file or directory of JSON documents); every error is reported.
    Validate { input: PathBuf },
    /// Compile a Neutron input into the map contents sg would load on this host.
    Compile {
        input: PathBuf,
        /// Filter the ports bound to this host (`binding:host_id`); ports without a host are
        /// local everywhere. Default: this machine's hostname.
        #[arg(long)]
        host: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Load the programs and attach them to one interface with a fixed ingress allow-list.
    ///
    /// Links and maps are pinned, so enforcement stays after `sg` exits; a second attach to
    /// the same interface swaps the program in place. Egress is allowed; ingress only what
    /// `--allow` lists.
    Attach {
        /// Interface (tap) name.
        #[arg(long)]
        iface: String,
        /// Named network namespace (`ip netns`) holding the interface.
        #[arg(long)]
        netns: Option<String>,
        /// Ingress allow entry: tcp/80, udp/53, icmp, tcp, any, or a protocol number.
        #[arg(long = "allow", value_name = "PROTO[/PORT]")]
        allows: Vec<Allow>,
        /// Port index (conntrack zone and counter key) for this interface.
        #[arg(long, default_value_t = 1)]
        port_idx: u32,
    },
    /// Run the agent: attach to every local port's tap, apply the input, follow changes.
    ///
    /// The input is a file (`--state`), what Neutron's agent pushes through the sg_neutron
    /// firewall driver (`--api-socket`), or both.
    #[command(after_long_help = AGENT_NOTES)]
    Agent {
        /// Neutron input (file or directory); watched for changes.
        #[arg(long, required_unless_present = "api_socket")]
        state: Option<PathBuf>,
        /// Serve the local API for the sg_neutron firewall driver on this Unix socket (mode
        /// 0660; protocol in sg-user/neutron/PROTOCOL.md). What the driver pushes is kept in
        /// the run directory (neutron-state.json) and resumed after a restart.
        #[arg(long, value_name = "PATH")]
        api_socket: Option<PathBuf>,
        /// Group owning the API socket, whose members (Neutron's agent user) may use it.
        /// Default: only root and the agent's own user.
        #[arg(long, value_name = "GROUP", requires = "api_socket")]
        api_group: Option<String>,
        /// This host's name for `binding:host_id` (default: the hostname).
        #[arg(long)]
        host: Option<String>,
        /// Named network namespace holding the taps (namespace compute nodes).
        #[arg(long)]
        netns: Option<String>,
        /// Conntrack capacity for flows not assured yet (SG_CONNTRACK, LRU: when it is full, a
        /// new flow evicts the least recently used of them).
        #[arg(long, default_value_t = sg_common::DEFAULT_CT_ENTRIES)]
        ct_entries: u32,
        /// Conntrack capacity for assured flows (SG_CT_ASSURED, never evicted) [default: the
        /// value of --ct-entries].
        #[arg(long)]
        ct_assured_entries: Option<u32>,
        /// How often expired conntrack entries and stale pins are collected.
        #[arg(long, default_value_t = 10_000)]
        gc_interval_ms: u64,
        /// The back end: sg's eBPF programs, or Neutron's iptables ruleset (parity mode: what
        /// `sg iptables apply` installs, plus Neutron's conntrack cleanup on changes).
        #[arg(long, value_enum, default_value = "ebpf")]
        dataplane: DataplaneArg,
        /// With `--dataplane iptables`: the iptables back end.
        #[arg(long, value_enum, default_value = "nft")]
        backend: iptables::Backend,
        /// With `--dataplane iptables`: which Neutron agent's driver to reproduce.
        #[arg(long, value_enum, default_value = "linuxbridge")]
        agent: iptables::Agent,
        /// With `--dataplane iptables`: `[AGENT] comment_iptables_rules = False`.
        #[arg(long)]
        no_comments: bool,
        /// With `--dataplane iptables`: `[SECURITYGROUP] enable_ipset = False`.
        #[arg(long)]
        no_ipset: bool,
        /// Serve Prometheus metrics on this address (`/metrics`), e.g. 127.0.0.1:9477.
        #[arg(long, value_name = "ADDR")]
        metrics_addr: Option<std::net::SocketAddr>,
        /// Also export a hit counter per security-group rule (cardinality: the node's rules).
        #[arg(long)]
        metrics_rule_hits: bool,
        /// Where the security-group log (Neutron network logs) goes: a file, or `syslog`
        /// (Neutron's `[network_log] local_output_log_base`; syslog when unset).
        #[arg(long, default_value = "syslog", value_name = "FILE|syslog")]
        log_output: String,
        /// Security-group log events per second and port (Neutron `[network_log] rate_limit`).
        #[arg(long, default_value_t = sg_common::LOG_RATE_LIMIT, value_parser = clap::value_parser!(u32).range(100..))]
        log_rate_limit: u32,
        /// Events a port may log at once (Neutron `[network_log] burst_limit`).
        #[arg(long, default_value_t = sg_common::LOG_BURST_LIMIT, value_parser = clap::value_parser!(u32).range(25..))]
        log_burst_limit: u32,
    },
    /// A live stream of verdicts from the running agent, one line each: time, tap, direction,
    /// verdict, reason, stage, rule, port, length and packet. The datapath sends them only while
    /// a monitor is attached, at most --rate per second.
    Monitor {
        /// Only this port (id, id prefix or tap name).
        #[arg(long)]
        port: Option<String>,
        /// Only these reasons (repeatable; names as `sg stats` prints them, e.g. drop-no-rule).
        #[arg(long = "reason", value_name = "REASON")]
        reasons: Vec<String>,
        /// Only dropped packets (every drop reason).
        #[arg(long)]
        drops: bool,
        /// Events per second the datapath sends at most.
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        #[arg(long, default_value_t = 100)]
        burst: u32,
        /// Stop after this many lines.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Per-stage datapath debug records (aya-log) for one port, into the agent's log: the
    /// agent swaps a debug build of the programs into that port's links; `off` swaps the
    /// normal ones back. Other ports never run the debug code.
    Debug {
        /// Port id, id prefix or tap name.
        port: String,
        #[arg(value_enum)]
        state: OnOff,
    },
    /// iptables parity mode: what Neutron's iptables firewall driver installs.
    Iptables {
        #[command(subcommand)]
        what: IptablesCmd,
    },
    /// Whether the agent runs, and each port's state checked against the kernel: enforced,
    /// closed, no tap, or unfiltered. Exits 3 when the agent is down or a tap is unfiltered.
    Status {
        /// Only this port (id, id prefix or tap name): exits 0 if and only if it is enforced,
        /// 3 otherwise. A cheap check for "is this port filtered now".
        #[arg(long)]
        port: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// One port in detail: its rules, counters and conntrack size.
    Show {
        #[command(subcommand)]
        what: ShowWhat,
    },
    /// Conntrack entries.
    Conntrack {
        #[command(subcommand)]
        what: ConntrackWhat,
    },
    /// Counters per port, direction and reason, and hits per rule.
    Stats {
        /// Only this port (id, id prefix or tap name).
        #[arg(long)]
        port: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Run one packet through the real program on a port and explain the verdict.
    #[command(after_help = trace::SYNTAX)]
    Trace {
        /// Port id, id prefix or tap name.
        #[arg(long)]
        port: String,
        /// Named netns holding the taps, if not this one.
        #[arg(long)]
        netns: Option<String>,
        /// `to-vm` (Neutron ingress) or `from-vm` (egress).
        direction: Direction,
        /// PROTO SRC DST [OPTIONS...]
        #[arg(required = true, num_args = 3..)]
        packet: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// The differential test: the same frames through kernel iptables (loaded from the parity
    /// render) and through the eBPF datapath, on a namespace compute node; every verdict must
    /// agree. Exits non-zero on any mismatch and writes reproductions.
    Diff {
        /// Neutron input files (or directories); each is one configuration.
        #[arg(long = "input")]
        inputs: Vec<PathBuf>,
        /// Random configurations from the seeded generator.
        #[arg(long, default_value_t = 0)]
        random: usize,
        /// First seed (configuration i uses seed + i).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Random scenarios per configuration (the documented-difference ones come on top).
        #[arg(long, default_value_t = 40)]
        scenarios: usize,
        /// Host of --input files (the generated configurations use compute-1).
        #[arg(long, default_value = "compute-1")]
        host: String,
        /// iptables flavour of the reference side.
        #[arg(long, value_enum, default_value = "nft")]
        iptables: IptablesFlavour,
        /// Where reproductions of mismatches go.
        #[arg(long, default_value = "target/sg-diff")]
        out: PathBuf,
        /// Do not shrink failing inputs.
        #[arg(long)]
        no_shrink: bool,
    },
    /// Remove sg's links and pins, and the agent's run state. Refused while an agent runs on the
    /// pin root.
    Detach {
        /// Everything sg pinned under --pin-root.
        #[arg(long)]
        all: bool,
        /// Detach even though an agent holds the pin root. That agent notices and restores
        /// enforcement at once: stop it first to remove sg from the node.
        #[arg(long)]
        force: bool,
    },
    /// Write the man pages and the bash and zsh completions into DIR/man and DIR/completions
    /// (the package build runs it).
    #[command(hide = true)]
    GenerateDocs { dir: PathBuf },
}

const AGENT_NOTES: &str = "\
Installed from the Debian package, the agent runs as sg-agent.service: \
`sg --config /etc/sg/sg.toml agent`. Every flag above can be set in that file, as a key \
without the dashes (`ct-entries = 524288`, `no-ipset = true`); flags on the command line \
override it.

Stopping the agent (SIGTERM, SIGINT, or a crash) leaves its programs attached and its maps \
pinned: the taps stay filtered, and the next agent adopts them.

Exit status 78: the configuration file is wrong, or the pinned maps have a layout this \
version cannot use (the message names the change and the ways out); the unit does not \
restart on it.";

/// Options shared by `sg iptables render` and `apply`.
#[derive(clap::Args)]
struct NeutronOpts {
    /// Neutron input (file or directory of JSON documents).
    input: PathBuf,
    /// Filter the ports bound to this host; unbound ports are local everywhere.
    /// Default: this machine's hostname.
    #[arg(long)]
    host: Option<String>,
    /// Which Neutron agent's driver: wrap name, device, zone and chain naming.
    #[arg(long, value_enum, default_value = "linuxbridge")]
    agent: iptables::Agent,
    /// `[AGENT] comment_iptables_rules = False`.
    #[arg(long)]
    no_comments: bool,
    /// `[SECURITYGROUP] enable_ipset = False`: remote groups expanded into one rule per member.
    #[arg(long)]
    no_ipset: bool,
}

impl NeutronOpts {
    fn load(&self) -> Result<(model::Model, iptables::RenderOptions)> {
        let model = load(&self.input)?;
        let opts = iptables::RenderOptions {
            host: self.host.clone().unwrap_or_else(model::default_host),
            agent: self.agent,
            comments: !self.no_comments,
            ipset: !self.no_ipset,
        };
        Ok((model, opts))
    }
}

#[derive(Subcommand)]
enum IptablesCmd {
    /// Print the iptables and ipset state Neutron's driver installs for the input, byte for
    /// byte as Neutron writes it. (Loaded, the kernel lists a few rules in its own canonical
    /// form: MAC addresses in lower case, host bits of prefixes cleared, `/0` and `-p ip`
    /// omitted, ICMP type 255 as `any`.)
    ///
    /// Save format (default): `# IPv4` and `# IPv6` sections in iptables-save layout (filter,
    /// raw, nat), then `# ipset` with the ipset commands Neutron runs (a shell script).
    /// Restore format: input for `iptables-restore --noflush` on a host without Neutron chains:
    /// Neutron's chains declared and filled, the hook rules inserted at the top of the builtin
    /// chains; builtin chains, policies and foreign rules are left alone. (`sg iptables apply`
    /// also removes the previous hook rules, so that applying again converges.)
    Render {
        #[command(flatten)]
        neutron: NeutronOpts,
        #[arg(long, value_enum, default_value = "save")]
        format: iptables::Format,
        /// Print one family only. In save format the `# ipset` section then holds only that
        /// family's sets (those its rules reference), so the output still loads on its own. In
        /// restore format only the restore input is printed, without any header and without
        /// ipset commands, ready to pipe into `iptables-restore -n` / `ip6tables-restore -n`
        /// (the sets must exist first).
        #[arg(long, value_parser = ["4", "6"])]
        family: Option<String>,
    },
    /// Install the render in this network namespace: create and swap the ipsets, then
    /// `iptables-restore --noflush` and `ip6tables-restore --noflush`. Only Neutron's chains
    /// and hook rules change; a second apply of the same input changes nothing. Invalid input
    /// or a ruleset the kernel rejects changes nothing. Run under `ip netns exec NS` for
    /// another namespace.
    Apply {
        #[command(flatten)]
        neutron: NeutronOpts,
        #[arg(long, value_enum, default_value = "nft")]
        backend: iptables::Backend,
    },
}

#[derive(Subcommand)]
enum ShowWhat {
    /// A port by id, id prefix or tap name.
    Port {
        id: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ConntrackWhat {
    /// List entries, optionally of one port.
    List {
        #[arg(long)]
        port: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DataplaneArg {
    Ebpf,
    Iptables,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum IptablesFlavour {
    Nft,
    Legacy,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Direction {
    ToVm,
    FromVm,
}

fn print_out<T: serde::Serialize>(json: bool, value: &T, table: impl FnOnce(&T) -> String) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print!("{}", table(value));
    }
    Ok(())
}

/// Errors are the user's to read: the message and its causes, never a backtrace, whatever
/// `RUST_BACKTRACE` says (anyhow would print the one it captured). A bug panics instead, and
/// panics keep their backtraces.
fn main() -> std::process::ExitCode {
    let args = match config::expand(&Cli::command(), std::env::args_os().collect()) {
        Ok(args) => args,
        Err(e) => {
            eprint!("{}", error_report(&e));
            return std::process::ExitCode::from(EX_CONFIG);
        }
    };
    match run(Cli::parse_from(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprint!("{}", error_report(&e));
            if e.chain().any(|c| c.is::<datapath::LayoutMismatch>()) {
                std::process::ExitCode::from(EX_CONFIG)
            } else {
                std::process::ExitCode::FAILURE
            }
        }
    }
}

/// sysexits' EX_CONFIG: the configuration file or the pinned layout needs the operator; the
/// unit does not restart on it (RestartPreventExitStatus).
const EX_CONFIG: u8 = 78;

/// `Error: <message>` and, if there are any, its causes in anyhow's numbered layout.
fn error_report(e: &anyhow::Error) -> String {
    let mut out = format!("Error: {e}\n");
    let causes: Vec<String> = e.chain().skip(1).map(|c| c.to_string()).collect();
    if !causes.is_empty() {
        out += "\nCaused by:\n";
        for (i, c) in causes.iter().enumerate() {
            out += &format!("    {i}: {c}\n");
        }
    }
    out
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Validate { input } => {
            let model = load(&input)?;
            println!("{}: valid ({})", input.display(), model.summary());
        }
        Cmd::Compile { input, host, json } => {
            let model = load(&input)?;
            let host = host.unwrap_or_else(model::default_host);
            let compiled = compile::compile(&model, &host);
            if json {
                print!("{}", compile::render_json(&compiled));
            } else {
                print!("{}", compile::render_table(&compiled));
            }
        }
        Cmd::Attach {
            iface,
            netns,
            allows,
            port_idx,
        } => {
            let mut dp = Datapath::load(&LoadOptions {
                pin_root: Some(cli.pin_root.clone()),
                ..Default::default()
            })?;
            let iface = Iface::new(iface, netns.as_deref());
            let (ifindex, how) = dp.attach(&iface)?;
            datapath::allowlist::install(&mut dp, ifindex, port_idx, &allows)?;
            println!(
                "{} {} (ifindex {ifindex}{}): ingress allows {}",
                match how {
                    datapath::Attached::New => "attached to",
                    datapath::Attached::TookOver => "took over",
                },
                iface.name,
                iface
                    .netns
                    .as_deref()
                    .map(|n| format!(", netns {n}"))
                    .unwrap_or_default(),
                if allows.is_empty() {
                    "nothing".to_string()
                } else {
                    allows
                        .iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            );
        }
        Cmd::Agent {
            state,
            api_socket,
            api_group,
            host,
            netns,
            ct_entries,
            ct_assured_entries,
            gc_interval_ms,
            dataplane,
            backend,
            agent,
            no_comments,
            no_ipset,
            metrics_addr,
            metrics_rule_hits,
            log_output,
            log_rate_limit,
            log_burst_limit,
        } => {
            // stderr, as every diagnostic: under systemd it is the journal (with each line's
            // priority), by hand the terminal.
            let journal = sg_user::journal::stderr_is_journal();
            tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_ansi(!journal && std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .event_format(sg_user::journal::Prefixed::new(
                    tracing_subscriber::fmt::format().with_target(false),
                    journal,
                ))
                .init();
            let opts = agent::AgentOptions {
                state,
                api: api_socket.map(|socket| agent::api::ApiOptions {
                    socket,
                    group: api_group,
                }),
                host: host.unwrap_or_else(model::default_host),
                pin_root: cli.pin_root,
                run_dir: cli.run_dir,
                netns,
                ct_entries,
                ct_assured_entries: ct_assured_entries.unwrap_or(ct_entries),
                gc_interval: std::time::Duration::from_millis(gc_interval_ms),
                dataplane: match dataplane {
                    DataplaneArg::Ebpf => agent::DataplaneOptions::Ebpf,
                    DataplaneArg::Iptables => agent::DataplaneOptions::Iptables {
                        backend,
                        agent,
                        comments: !no_comments,
                        ipset: !no_ipset,
                    },
                },
                observe: agent::ObserveOptions {
                    metrics_addr,
                    metrics_rule_hits,
                    log_output,
                    log_rate_limit,
                    log_burst_limit,
                },
            };
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(agent::run(opts))?;
        }
        Cmd::Iptables {
            what:
                IptablesCmd::Render {
                    neutron,
                    format,
                    family,
                },
        } => {
            let (model, opts) = neutron.load()?;
            let rendered = iptables::render(&model, &opts);
            let family = family.map(|f| {
                if f == "4" {
                    model::Ethertype::IPv4
                } else {
                    model::Ethertype::IPv6
                }
            });
            print!("{}", rendered.format(format, family));
        }
        Cmd::Iptables {
            what: IptablesCmd::Apply { neutron, backend },
        } => {
            let (model, opts) = neutron.load()?;
            let started = std::time::Instant::now();
            let report = iptables::IptablesDataplane::new(backend).apply(&model, &opts)?;
            println!(
                "{}: {report} ({} ms)",
                neutron.input.display(),
                started.elapsed().as_millis()
            );
        }
        Cmd::Status { port, json } => {
            let src = inspect::Sources {
                pin_root: &cli.pin_root,
                run_dir: &cli.run_dir,
            };
            let ok = match port {
                Some(id) => {
                    let p = inspect::port_state(&src, &id)?;
                    print_out(json, &p, |p| inspect::status_table(std::slice::from_ref(p)))?;
                    p.enforced
                }
                None => {
                    let status = inspect::status(&src)?;
                    print_out(json, &status, inspect::status_text)?;
                    status.healthy
                }
            };
            if !ok {
                std::process::exit(3);
            }
        }
        Cmd::Show {
            what: ShowWhat::Port { id, json },
        } => {
            let src = inspect::Sources {
                pin_root: &cli.pin_root,
                run_dir: &cli.run_dir,
            };
            print_out(json, &inspect::show_port(&src, &id)?, inspect::show_port_text)?;
        }
        Cmd::Conntrack {
            what: ConntrackWhat::List { port, json },
        } => {
            let src = inspect::Sources {
                pin_root: &cli.pin_root,
                run_dir: &cli.run_dir,
            };
            print_out(json, &inspect::conntrack(&src, port.as_deref())?, |v| {
                inspect::conntrack_table(v)
            })?;
        }
        Cmd::Stats { port, json } => {
            let src = inspect::Sources {
                pin_root: &cli.pin_root,
                run_dir: &cli.run_dir,
            };
            print_out(
                json,
                &inspect::stats(&src, port.as_deref())?,
                inspect::stats_table,
            )?;
        }
        Cmd::Trace {
            port,
            netns,
            direction,
            packet,
            json,
        } => {
            let src = inspect::Sources {
                pin_root: &cli.pin_root,
                run_dir: &cli.run_dir,
            };
            let dir = match direction {
                Direction::ToVm => sg_common::DIR_INGRESS,
                Direction::FromVm => sg_common::DIR_EGRESS,
            };
            let t = trace::trace(&src, netns.as_deref(), &port, dir, &packet)?;
            print_out(json, &t, trace::trace_text)?;
        }
        Cmd::Diff {
            inputs,
            random,
            seed,
            scenarios,
            host,
            iptables,
            out,
            no_shrink,
        } => {
            anyhow::ensure!(
                !inputs.is_empty() || random > 0,
                "give --input FILE or --random N"
            );
            let flavour = match iptables {
                IptablesFlavour::Nft => iptables::Backend::Nft,
                IptablesFlavour::Legacy => iptables::Backend::Legacy,
            };
            let opts = diff::DiffOptions {
                inputs,
                random,
                seed,
                scenarios,
                host,
                out,
                shrink: !no_shrink,
            };
            let make = move |topo: &diff::topo::Topology, cfg: &diff::Config, tag: &str| {
                let ipt: Box<dyn diff::backend::Backend> =
                    Box::new(diff::backend::Iptables::new(topo, &cfg.host, flavour)?);
                let ebpf: Box<dyn diff::backend::Backend> =
                    Box::new(diff::backend::Ebpf::new(topo, &cfg.host, tag)?);
                Ok((ipt, ebpf))
            };
            let started = std::time::Instant::now();
            diff::stop_on_interrupt();
            let summary = diff::run(&opts, &make, &mut |line| println!("{line}"))?;
            println!(
                "
TOTAL {summary} in {:.1?}",
                started.elapsed()
            );
            diff::check(&summary)?;
        }
        Cmd::Monitor {
            port,
            mut reasons,
            drops,
            rate,
            burst,
            count,
        } => {
            use std::io::{BufRead as _, Write as _};
            if drops {
                reasons.extend(
                    (sg_common::REASON_FIRST_DROP..=sg_common::REASON_LAST)
                        .map(|r| sg_common::reason_name(r).to_string()),
                );
            }
            let req = control::Request::Monitor(control::MonitorRequest {
                port,
                reasons,
                rate,
                burst,
            });
            let (hello, conn) = control::call(&cli.run_dir, &req)?;
            eprintln!("{hello}");
            let mut out = std::io::stdout().lock();
            for (n, line) in (1..).zip(conn.lines()) {
                let line = line?;
                if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() || count.is_some_and(|c| n >= c)
                {
                    break;
                }
            }
        }
        Cmd::Debug { port, state } => {
            let req = control::Request::Debug(control::DebugRequest {
                port,
                on: state == OnOff::On,
            });
            let (msg, _) = control::call(&cli.run_dir, &req)?;
            println!("{msg}");
        }
        Cmd::Detach { all, force } => {
            anyhow::ensure!(all, "only `sg detach --all` is supported");
            let running = agent::lock::holder(&cli.pin_root)?;
            if let Some(pid) = running {
                anyhow::ensure!(
                    force,
                    "an sg agent (pid {pid}) holds {}: detaching would leave its taps unfiltered \
                     while it reports them enforced. Stop the agent first (its pins stay and keep \
                     enforcing), then detach. --force detaches anyway, and the running agent \
                     restores enforcement at once",
                    cli.pin_root.display()
                );
                eprintln!(
                    "warning: detaching under a running agent (pid {pid}); it will restore its \
                     maps and links"
                );
            }
            let n = datapath::detach_all(&cli.pin_root)
                .with_context(|| format!("removing pins under {}", cli.pin_root.display()))?;
            println!("removed {n} pins under {}", cli.pin_root.display());
            // The run state describes those pins: without them it would mislead the next agent
            // and `sg status`. A running agent (--force) keeps and rewrites its own.
            if running.is_none()
                && agent::remove_run_state(&cli.run_dir)
                    .with_context(|| format!("removing the run state in {}", cli.run_dir.display()))?
            {
                println!("removed the run state in {}", cli.run_dir.display());
            }
        }
        Cmd::GenerateDocs { dir } => {
            for f in config::generate_docs(Cli::command(), &dir)? {
                println!("{}", f.display());
            }
        }
    }
    Ok(())
}

/// Loads and validates an input; on errors prints all of them, one per line, and fails.
fn load(input: &std::path::Path) -> Result<model::Model> {
    model::load(input).map_err(|errors| {
        eprintln!("{errors}");
        anyhow::anyhow!(
            "{}: {} validation error(s); nothing was applied",
            input.display(),
            errors.len()
        )
    })
}
