//! `sg`: Neutron security groups on eBPF.
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use sg_user::{
    compile,
    datapath::{self, Datapath, Iface, LoadOptions, allowlist::Allow},
    model,
};

#[derive(Parser)]
#[command(
    name = "sg",
    version,
    about = "Neutron security groups enforced by eBPF at tcx on VM taps"
)]
struct Cli {
    /// bpffs directory holding sg's pinned maps and links.
    #[arg(long, global = true, default_value = datapath::DEFAULT_PIN_ROOT)]
    pin_root: PathBuf,
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
    /// Remove sg's links and pins.
    Detach {
        /// Everything sg pinned under --pin-root.
        #[arg(long)]
        all: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
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
        Cmd::Detach { all } => {
            anyhow::ensure!(all, "only `sg detach --all` is supported");
            let n = datapath::detach_all(&cli.pin_root)
                .with_context(|| format!("removing pins under {}", cli.pin_root.display()))?;
            println!("removed {n} pins under {}", cli.pin_root.display());
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
