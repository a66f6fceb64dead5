//! The two back ends the differential test compares, behind one interface.

use std::path::PathBuf;

use anyhow::{Context as _, Result};

use super::topo::Topology;
use crate::{
    agent::apply::Applier,
    compile,
    datapath::{Datapath, LoadOptions},
    model::Model,
};

pub trait Backend {
    fn name(&self) -> &'static str;
    /// Takes the node over at the start of this back end's pass (the other one was torn
    /// down): e.g. puts bridged traffic through iptables or takes it out.
    fn start(&mut self) -> Result<()>;
    /// Makes the node enforce `model`; `old` is what it enforced until now (a change).
    fn apply(&mut self, model: &Model, old: Option<&Model>) -> Result<()>;
    /// Forgets every connection (between scenarios).
    fn reset(&mut self) -> Result<()>;
    /// Leaves the node as it was before this back end.
    fn teardown(&mut self) -> Result<()>;
}

/// sg's datapath, applied by the agent's applier, with iptables out of the bridge path.
pub struct Ebpf {
    applier: Option<Applier>,
    pin_root: PathBuf,
    node: String,
    host: String,
}

impl Ebpf {
    pub fn new(topo: &Topology, host: &str, tag: &str) -> Result<Self> {
        let pin_root = PathBuf::from(format!("/sys/fs/bpf/sgdiff-{tag}"));
        let dp = Datapath::load(&LoadOptions {
            pin_root: Some(pin_root.clone()),
            ..Default::default()
        })?;
        let applier = Applier::adopt(dp, Some(topo.node.0.clone()), None)?;
        Ok(Self {
            applier: Some(applier),
            pin_root,
            node: topo.node.0.clone(),
            host: host.to_string(),
        })
    }
}

impl Backend for Ebpf {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn start(&mut self) -> Result<()> {
        super::topo::set_bridge_netfilter(&self.node, false)
    }

    fn apply(&mut self, model: &Model, _old: Option<&Model>) -> Result<()> {
        let compiled = compile::compile(model, &self.host);
        self.applier.as_mut().context("torn down")?.apply(&compiled)?;
        Ok(())
    }

    fn reset(&mut self) -> Result<()> {
        self.applier.as_mut().context("torn down")?.dp.clear_flows()
    }

    fn teardown(&mut self) -> Result<()> {
        self.applier = None;
        crate::datapath::detach_all(&self.pin_root)?;
        Ok(())
    }
}

impl Drop for Ebpf {
    fn drop(&mut self) {
        if self.pin_root.exists() {
            let _ = crate::datapath::detach_all(&self.pin_root);
        }
    }
}

/// Real kernel iptables loaded from sg's parity render, br_netfilter on, real conntrack; a
/// change also runs the conntrack deletions Neutron's agent would.
pub struct Iptables {
    dp: crate::iptables::IptablesDataplane,
    opts: crate::iptables::RenderOptions,
    node: String,
}

impl Iptables {
    pub fn new(topo: &Topology, host: &str, backend: crate::iptables::Backend) -> Result<Self> {
        let node = topo.node.0.clone();
        Ok(Self {
            dp: crate::iptables::IptablesDataplane::new(backend).in_netns(Some(node.clone())),
            opts: crate::iptables::RenderOptions::new(host),
            node,
        })
    }

    fn sh(&self, argv: &[&str]) -> Result<()> {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &self.node])
            .args(argv)
            .output()?;
        if !out.status.success() {
            anyhow::bail!(
                "{} failed: {}",
                argv.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

impl Backend for Iptables {
    fn name(&self) -> &'static str {
        "iptables"
    }

    fn start(&mut self) -> Result<()> {
        super::topo::set_bridge_netfilter(&self.node, true)
    }

    fn apply(&mut self, model: &Model, old: Option<&Model>) -> Result<()> {
        self.dp.apply(model, &self.opts)?;
        if let Some(old) = old {
            let deletes = crate::iptables::conntrack_cleanup(old, model, &self.opts);
            self.dp.conntrack_delete(&deletes)?;
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<()> {
        // conntrack -F exits 0 on an empty table too.
        self.sh(&["conntrack", "-F"]).context("flushing conntrack")
    }

    fn teardown(&mut self) -> Result<()> {
        // Empty every table this back end filled, then take bridged traffic out of iptables,
        // so the next back end sees an untouched bridge path.
        for family in [crate::model::Ethertype::IPv4, crate::model::Ethertype::IPv6] {
            let restore = self.dp.backend.restore_cmd(family);
            let flush = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n\
                         *raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n\
                         *nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n";
            let mut child = std::process::Command::new("ip")
                .args(["netns", "exec", &self.node, &restore])
                .stdin(std::process::Stdio::piped())
                .spawn()?;
            use std::io::Write as _;
            child.stdin.take().context("stdin")?.write_all(flush.as_bytes())?;
            if !child.wait()?.success() {
                anyhow::bail!("{restore} could not empty the tables");
            }
        }
        self.sh(&["ipset", "destroy"])?;
        self.sh(&["conntrack", "-F"])?;
        super::topo::set_bridge_netfilter(&self.node, false)
    }
}
