//! The two back ends the differential test compares, behind one interface.

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::{Context as _, Result};

use super::topo::Topology;
use crate::{
    agent::apply::Applier,
    compile,
    datapath::{Datapath, LoadOptions},
    model::Model,
    netns,
};

pub trait Backend {
    fn name(&self) -> &'static str;
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
    devices: Vec<String>,
}

impl Ebpf {
    pub fn new(topo: &Topology, host: &str, model: &Model, tag: &str) -> Result<Self> {
        topo.bridge_netfilter(false)?;
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
            devices: model.local_ports(host).iter().map(|p| p.device.clone()).collect(),
        })
    }

    fn links(&self) -> Result<BTreeMap<String, u32>> {
        let devices = self.devices.clone();
        netns::run_in(Some(&self.node), move || {
            devices
                .iter()
                .map(|d| Ok((d.clone(), netns::ifindex(d)?)))
                .collect::<Result<BTreeMap<_, _>>>()
        })?
    }
}

impl Backend for Ebpf {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn apply(&mut self, model: &Model, _old: Option<&Model>) -> Result<()> {
        let compiled = compile::compile(model, &self.host);
        let links = self.links()?;
        self.applier
            .as_mut()
            .context("torn down")?
            .apply(&compiled, &links)?;
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
