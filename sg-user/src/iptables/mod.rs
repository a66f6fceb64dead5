//! iptables parity mode: print and apply exactly what Neutron's iptables firewall driver
//! installs (`IptablesFirewallDriver` on a Linux bridge compute node, the hybrid driver on an
//! OVS one), following `shared/spec/neutron-iptables.md` and proven against Neutron itself
//! (`tests/oracle/`, `tests/tests/oracle.rs`).
//!
//! The code reads top-down:
//! 1. [`neutron`]: the model as Neutron's server hands it to the agent (port dicts with
//!    provider rules, reduced rule dicts, remote-group member lists);
//! 2. [`mod@render`]: the driver and its `IptablesManager`: chains and rules in the order they end
//!    up in the kernel, the ipset commands;
//! 3. this module: the text (the oracle's format, `iptables-restore` input);
//! 4. [`apply`]: ipsets, `iptables-restore --noflush`, conntrack cleanup.
//!
//! What is rendered is one agent start on a fresh host with the *complete* member lists
//! (Neutron's 20-device batching loses some, tests/DIFFERENCES.md D1).
//!
//! # Output
//! [`Rendered::text`] is the oracle's format (tests/oracle/README.md): `# IPv4` and `# IPv6`
//! sections in `iptables-save` layout (filter, raw, nat), then `# ipset` with the ipset
//! commands Neutron runs. Rule text is Neutron's, not the kernel's canonical form.
//!
//! # Kernel canonicalisations
//! Loaded into the kernel, `iptables-save` prints Neutron's text with these rewrites (the same
//! for iptables-nft and iptables-legacy 1.8.9; [`canon::kernel_form`] applies them, and the
//! kernel check test holds the list to account):
//! - MAC addresses in lower case (Neutron prints them upper-case);
//! - host bits of a prefix cleared (`-s 10.0.0.5/24` → `-s 10.0.0.0/24`: Linux bridge rule
//!   prefixes, pair CIDRs in spoof chains);
//! - `-s 0.0.0.0/0` / `-s ::/0` omitted (spoof rules of `/0` pairs);
//! - `-p ip` / `-p hopopt` omitted (protocol 0 is "all");
//! - `--icmp-type 255[/C]` printed as `--icmp-type any` (type 255 is iptables' wildcard);
//! - the order of tables in a dump is the back end's own (nft: raw, filter, nat; legacy: nat,
//!   raw, filter); sg prints filter, raw, nat.
//!
//! Neutron compares with upper-cased MACs only, so on a host its own diff never converges for
//! the other rewrites; sg's apply compares in the canonical form and converges.

pub mod apply;
pub mod canon;
pub mod neutron;
pub mod protocols;
pub mod render;

pub use apply::{ApplyReport, Backend, ChangeReport, ConntrackDelete, IptablesDataplane, conntrack_cleanup};

use crate::model::{Ethertype, Model};

/// Which Neutron agent's driver to reproduce.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Agent {
    /// Linux bridge agent, `IptablesFirewallDriver`: wrap `neutron-linuxbri`, device = tap,
    /// conntrack zone per network.
    #[value(name = "linuxbridge")]
    LinuxBridge,
    /// OVS agent with `firewall_driver = iptables_hybrid`: wrap `neutron-openvswi`, device = port
    /// UUID, `qvb…` bridge side, conntrack zone per port.
    #[value(name = "ovs-hybrid")]
    OvsHybrid,
}

impl Agent {
    /// The wrap name: `basename(argv[0])[:16]` of the agent binary.
    pub fn wrap(self) -> &'static str {
        match self {
            Agent::LinuxBridge => "neutron-linuxbri",
            Agent::OvsHybrid => "neutron-openvswi",
        }
    }
}

#[derive(Clone, Debug)]
pub struct RenderOptions {
    /// Ports bound here (`binding:host_id`) or unbound are local.
    pub host: String,
    pub agent: Agent,
    /// `[AGENT] comment_iptables_rules` (Neutron's default: on).
    pub comments: bool,
    /// `[SECURITYGROUP] enable_ipset` (default on); off: one rule per remote member.
    pub ipset: bool,
}

impl RenderOptions {
    /// Neutron's defaults on a Linux bridge node.
    pub fn new(host: impl Into<String>) -> Self {
        RenderOptions {
            host: host.into(),
            agent: Agent::LinuxBridge,
            comments: true,
            ipset: true,
        }
    }
}

/// One table as `iptables-save` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    pub name: &'static str,
    /// Builtin chains in hook order (policy ACCEPT on a fresh host).
    pub builtin: Vec<&'static str>,
    /// User chains, sorted by name.
    pub chains: Vec<String>,
    /// (chain, rule text after `-A chain `), grouped by chain in save order.
    pub rules: Vec<(String, String)>,
}

impl Table {
    /// `iptables-save` layout without the `# Generated` lines.
    pub fn save_text(&self) -> String {
        let mut s = format!("*{}\n", self.name);
        for c in &self.builtin {
            s.push_str(&format!(":{c} ACCEPT [0:0]\n"));
        }
        for c in &self.chains {
            s.push_str(&format!(":{c} - [0:0]\n"));
        }
        for (c, r) in &self.rules {
            s.push_str(&format!("-A {c} {r}\n"));
        }
        s.push_str("COMMIT\n");
        s
    }

    pub fn chain_rules<'a>(&'a self, chain: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.rules
            .iter()
            .filter(move |(c, _)| c == chain)
            .map(|(_, r)| r.as_str())
    }
}

/// One ipset and the commands Neutron's `IpsetManager` runs for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpSet {
    /// `("N" + ethertype + remote id)[:29]`.
    pub name: String,
    pub family: Ethertype,
    /// Entries as ipset is given them (`str(IPNetwork)`, `/0` split into two `/1`), in order,
    /// duplicates kept.
    pub members: Vec<String>,
    /// Shell lines (a command given standard input is followed by it as a here-document).
    pub commands: Vec<String>,
    pub(crate) created: bool,
}

/// `IPSET_ADD_BULK_THRESHOLD`.
const IPSET_BULK: usize = 5;

impl IpSet {
    pub fn set_type(&self) -> &'static str {
        match self.family {
            Ethertype::IPv4 => "inet",
            Ethertype::IPv6 => "inet6",
        }
    }

    /// The temporary set of a refresh.
    pub fn swap_name(&self) -> String {
        format!("{}-n", self.name)
    }

    /// `IpsetManager.set_members`.
    pub(crate) fn set_members(&mut self, new: Vec<String>) {
        let cur: std::collections::HashSet<&String> = self.members.iter().collect();
        let want: std::collections::HashSet<&String> = new.iter().collect();
        let add: Vec<String> = new.iter().filter(|m| !cur.contains(m)).cloned().collect();
        let del: Vec<String> = self
            .members
            .iter()
            .filter(|m| !want.contains(m))
            .cloned()
            .collect();
        if self.created && add.is_empty() && del.is_empty() {
            return;
        }
        if !self.created {
            self.commands.push(format!(
                "ipset create -exist {} hash:net family {}",
                self.name,
                self.set_type()
            ));
            self.created = true;
            self.refresh(new);
        } else if add.len() + del.len() < IPSET_BULK {
            for a in add {
                self.commands.push(format!("ipset add -exist {} {a}", self.name));
                self.members.push(a);
            }
            for d in del {
                self.commands.push(format!("ipset del {} {d}", self.name));
                self.members.retain(|m| *m != d);
            }
        } else {
            self.refresh(new);
        }
    }

    fn refresh(&mut self, new: Vec<String>) {
        let tmp = self.swap_name();
        self.commands.push("ipset restore -exist <<'EOF'".to_string());
        self.commands
            .push(format!("create {tmp} hash:net family {}", self.set_type()));
        for m in &new {
            self.commands.push(format!("add {tmp} {m}"));
        }
        self.commands.push("EOF".to_string());
        self.commands.push(format!("ipset swap {tmp} {}", self.name));
        self.commands.push(format!("ipset destroy {tmp}"));
        self.members = new;
    }
}

/// Everything Neutron would install for one input.
#[derive(Clone, Debug)]
pub struct Rendered {
    pub agent: Agent,
    /// `iptables-save` text of filter, raw, nat (IPv4).
    pub v4: String,
    /// The same for ip6tables.
    pub v6: String,
    /// The ipset commands (empty with ipset off).
    pub ipset: String,
    /// [IPv4, IPv6] tables: filter, raw, nat.
    pub tables: [Vec<Table>; 2],
    /// The sets, by name.
    pub ipsets: Vec<IpSet>,
    /// Conntrack zone of each filtered local port, by port id.
    pub zones: std::collections::BTreeMap<String, u32>,
}

/// Renders what Neutron's driver installs for `model` on `opts.host`.
pub fn render(model: &Model, opts: &RenderOptions) -> Rendered {
    let view = neutron::server_view(model, opts);
    let (tables, ipsets, zones) = render::run(&view, opts);
    let save = |ts: &[Table]| ts.iter().map(Table::save_text).collect::<String>();
    let ipset = ipsets
        .iter()
        .flat_map(|s| s.commands.iter())
        .map(|l| format!("{l}\n"))
        .collect::<String>();
    Rendered {
        agent: opts.agent,
        v4: save(&tables[0]),
        v6: save(&tables[1]),
        ipset,
        tables,
        ipsets,
        zones,
    }
}

/// `--format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// `iptables-save` layout (the oracle's format).
    Save,
    /// `iptables-restore --noflush` input for a host without Neutron chains.
    Restore,
}

impl Rendered {
    /// The oracle's full output: `# IPv4`, `# IPv6`, `# ipset`.
    pub fn text(&self) -> String {
        self.format(Format::Save, None)
    }

    fn family_index(e: Ethertype) -> usize {
        match e {
            Ethertype::IPv4 => 0,
            Ethertype::IPv6 => 1,
        }
    }

    /// The ipset commands of one family's sets (all with None).
    pub fn ipset_text(&self, family: Option<Ethertype>) -> String {
        self.ipsets
            .iter()
            .filter(|s| family.is_none_or(|f| s.family == f))
            .flat_map(|s| s.commands.iter())
            .map(|l| format!("{l}\n"))
            .collect()
    }

    /// `iptables-restore --noflush` input that installs this family's tables on a host without
    /// Neutron chains yet: every Neutron chain declared (which creates it, or flushes it when
    /// it exists), the hook rules inserted at the top of the builtin chains (where Neutron puts
    /// them, before foreign rules), the chains' rules appended. Builtin chains are not declared,
    /// so their policies, counters and foreign rules stay. `sg iptables apply` feeds this after
    /// removing the previous hook rules it finds, which makes a repeat apply converge.
    pub fn restore_text(&self, family: Ethertype) -> String {
        let mut s = String::new();
        for t in &self.tables[Self::family_index(family)] {
            s.push_str(&apply::restore_input(
                t,
                &apply::LiveTable::default(),
                self.agent.wrap(),
            ));
        }
        s
    }

    /// The text `sg iptables render` prints. Save: the sections of `family` (both when None),
    /// each under its `# IPv4` / `# IPv6` header, then `# ipset` with the sets those rules
    /// reference (all sets for both families), so that the output loads on its own. Restore
    /// with one family: that family's restore input alone, no header, ready for
    /// `iptables-restore -n` (create the sets first); with both: the same sections as save.
    pub fn format(&self, format: Format, family: Option<Ethertype>) -> String {
        let body = |e: Ethertype| match format {
            Format::Save => match e {
                Ethertype::IPv4 => self.v4.clone(),
                Ethertype::IPv6 => self.v6.clone(),
            },
            Format::Restore => self.restore_text(e),
        };
        if let (Format::Restore, Some(e)) = (format, family) {
            return body(e);
        }
        let mut out = String::new();
        for e in Ethertype::ALL {
            if family.is_none_or(|f| f == e) {
                out.push_str(&format!("# {}\n", e.as_str()));
                out.push_str(&body(e));
            }
        }
        out.push_str("# ipset\n");
        out.push_str(&self.ipset_text(family));
        out
    }
}
