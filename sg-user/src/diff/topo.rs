//! The namespace compute node the differential test runs on, built from the input: one
//! Linux bridge `brq<network[:11]>` per network (the name Neutron's raw-table zone rules
//! match), one tap per local port with the VM's end in its own namespace, and one "uplink"
//! namespace per network that stands for every remote host.
//!
//! No interface gets an IP address and IPv6 is off everywhere: the namespaces' own stacks
//! must never answer or emit anything (ARP replies, RSTs, router solicitations), so that the
//! only frames on the wire are the ones a scenario sends.

use std::{collections::BTreeMap, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::model::{Model, Port};

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn bridge(ns: &str, args: &[&str]) -> Result<()> {
    let out = Command::new("bridge")
        .args(["-n", ns])
        .args(args)
        .output()
        .context("running bridge")?;
    if !out.status.success() {
        bail!(
            "bridge {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let value = value.to_string();
    crate::netns::run_in(Some(ns), move || {
        std::fs::write(&path, &value).with_context(|| path.clone())
    })??;
    Ok(())
}

/// Disables IPv6 and IPv4 autoconfiguration noise in a fresh namespace.
fn quiet(ns: &str) -> Result<()> {
    for key in [
        "net.ipv6.conf.all.disable_ipv6",
        "net.ipv6.conf.default.disable_ipv6",
    ] {
        sysctl(ns, key, "1")?;
    }
    ip(&["-n", ns, "link", "set", "lo", "up"])
}

/// One namespace the harness created; deleted on drop.
pub struct Ns(pub String);

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "delete", &self.0]).output();
    }
}

pub struct Endpoint {
    pub ns: String,
    pub dev: String,
}

pub struct Topology {
    /// The compute node: bridges and taps, where iptables or sg run.
    pub node: Ns,
    /// Port id → the VM side of its tap.
    pub vms: BTreeMap<String, Endpoint>,
    /// Network id → the uplink endpoint standing for remote hosts.
    pub uplinks: BTreeMap<String, Endpoint>,
    /// The VM and uplink namespaces (deleting the node first takes their veths with it).
    _others: Vec<Ns>,
}

pub fn bridge_name(network_id: &str) -> String {
    format!("brq{}", &network_id[..network_id.len().min(11)])
}

impl Topology {
    /// Builds the node for the ports of `model` local to `host`. `tag` makes the namespace
    /// names unique to this run.
    pub fn build(model: &Model, host: &str, tag: &str) -> Result<Self> {
        let node = Ns(format!("sgd-{tag}-node"));
        ip(&["netns", "add", &node.0])?;
        quiet(&node.0)?;
        let mut owned = Vec::new();
        let ports: Vec<&Port> = model.local_ports(host);
        let mut networks: Vec<String> = ports.iter().map(|p| p.network_id.clone()).collect();
        networks.sort();
        networks.dedup();
        let mut uplinks = BTreeMap::new();
        for (i, net) in networks.iter().enumerate() {
            let br = bridge_name(net);
            // Without snooping the bridge joins no all-snoopers group, so it sends no IGMP
            // or MLD reports of its own to the taps.
            ip(&[
                "-n",
                &node.0,
                "link",
                "add",
                &br,
                "type",
                "bridge",
                "mcast_snooping",
                "0",
            ])?;
            ip(&["-n", &node.0, "link", "set", &br, "up"])?;
            let ns = Ns(format!("sgd-{tag}-up{i}"));
            ip(&["netns", "add", &ns.0])?;
            quiet(&ns.0)?;
            let host_end = format!("uplink{i}");
            ip(&[
                "-n", &node.0, "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns",
                &ns.0,
            ])?;
            ip(&["-n", &node.0, "link", "set", &host_end, "master", &br, "up"])?;
            ip(&["-n", &ns.0, "link", "set", "eth0", "up"])?;
            uplinks.insert(
                net.clone(),
                Endpoint {
                    ns: ns.0.clone(),
                    dev: "eth0".into(),
                },
            );
            owned.push(ns);
        }
        let mut vms = BTreeMap::new();
        for (i, p) in ports.iter().enumerate() {
            let ns = Ns(format!("sgd-{tag}-vm{i}"));
            ip(&["netns", "add", &ns.0])?;
            quiet(&ns.0)?;
            let mac = p.mac.to_string();
            ip(&[
                "-n", &node.0, "link", "add", &p.device, "type", "veth", "peer", "name", "eth0", "address",
                &mac, "netns", &ns.0,
            ])?;
            ip(&[
                "-n",
                &node.0,
                "link",
                "set",
                &p.device,
                "master",
                &bridge_name(&p.network_id),
                "up",
            ])?;
            ip(&["-n", &ns.0, "link", "set", "eth0", "up"])?;
            vms.insert(
                p.id.clone(),
                Endpoint {
                    ns: ns.0.clone(),
                    dev: "eth0".into(),
                },
            );
            owned.push(ns);
        }
        // Forwarding must not depend on earlier scenarios, nor flood unicast frames to other
        // ports (an accepting port's copy would confirm conntrack for the whole zone): no
        // learning, and static entries for every VM MAC on its tap and for the remote MAC on
        // each uplink. Unknown destinations and broadcasts still flood, as on a real bridge.
        let remote_mac = crate::packet::format_mac(&super::scenario::REMOTE_MAC);
        for i in 0..networks.len() {
            let uplink = format!("uplink{i}");
            bridge(&node.0, &["link", "set", "dev", &uplink, "learning", "off"])?;
            bridge(
                &node.0,
                &["fdb", "add", &remote_mac, "dev", &uplink, "master", "static"],
            )?;
        }
        for p in &ports {
            bridge(&node.0, &["link", "set", "dev", &p.device, "learning", "off"])?;
            bridge(
                &node.0,
                &[
                    "fdb",
                    "add",
                    &p.mac.to_string(),
                    "dev",
                    &p.device,
                    "master",
                    "static",
                ],
            )?;
        }
        Ok(Self {
            node,
            vms,
            uplinks,
            _others: owned,
        })
    }

    /// Turns bridged IP traffic through iptables on or off on the node (br_netfilter is
    /// per network namespace).
    pub fn bridge_netfilter(&self, on: bool) -> Result<()> {
        set_bridge_netfilter(&self.node.0, on)
    }
}

/// Bridged IP traffic through iptables (br_netfilter) on or off in namespace `ns`.
pub fn set_bridge_netfilter(ns: &str, on: bool) -> Result<()> {
    for key in [
        "net.bridge.bridge-nf-call-iptables",
        "net.bridge.bridge-nf-call-ip6tables",
    ] {
        sysctl(ns, key, if on { "1" } else { "0" })?;
    }
    Ok(())
}
