//! What the Neutron driver pushed through the local API: one document in the agent's RPC shape
//! (`model::rpc`), changed by one operation per driver call, persisted atomically in the run
//! directory so that a restarted agent resumes without Neutron resending.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Map, Value, json};

use crate::model::rpc::Plug;

/// The pushed document.
#[derive(Debug, Clone, PartialEq)]
pub struct Pushed {
    pub plug: Plug,
    /// Port dicts by Neutron device name.
    pub devices: BTreeMap<String, Value>,
    /// Agent rule dicts by security group id.
    pub security_groups: BTreeMap<String, Vec<Value>>,
    /// `{"IPv4": [[ip, mac], ...], "IPv6": [...]}` by remote group or address group id.
    pub sg_member_ips: BTreeMap<String, Value>,
    pub trusted_ports: Vec<String>,
    /// Network log objects (`/v2.0/log/logs` shape) by id, from the driver's log extension.
    pub logs: BTreeMap<String, Value>,
}

impl Default for Pushed {
    fn default() -> Self {
        Pushed {
            plug: Plug::Direct,
            devices: BTreeMap::new(),
            security_groups: BTreeMap::new(),
            sg_member_ips: BTreeMap::new(),
            trusted_ports: Vec::new(),
            logs: BTreeMap::new(),
        }
    }
}

/// One change, as one driver call makes it. Arguments are checked for shape when the request
/// is parsed ([`super::api`]); their content is validated with the model's rules.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Plug(Plug),
    Rules {
        sg_id: String,
        rules: Vec<Value>,
    },
    Members {
        sg_id: String,
        members: Value,
    },
    /// `prepare_port_filter` (`prepare: true`) or `update_port_filter`.
    Port {
        device: String,
        port: Value,
        prepare: bool,
    },
    RemovePort {
        device: String,
    },
    Trusted {
        add: bool,
        devices: Vec<String>,
    },
    /// A network log object created or changed (`start_logging`, or `stop_logging` of a
    /// disabled one): replaces the object with its id.
    Log {
        id: String,
        log: Value,
    },
    /// A network log object deleted.
    RemoveLog {
        id: String,
    },
}

impl Op {
    /// A document holding only what this operation brings, for validating it alone: errors
    /// then name this call's objects only.
    pub fn alone(&self, plug: Plug) -> Option<Value> {
        let mut doc = Map::new();
        doc.insert("plug".into(), json!(plug.as_str()));
        match self {
            Op::Rules { sg_id, rules } => {
                doc.insert("security_groups".into(), json!({ sg_id: rules }));
            }
            Op::Members { sg_id, members } => {
                doc.insert("sg_member_ips".into(), json!({ sg_id: members }));
            }
            Op::Port { device, port, .. } => {
                doc.insert("devices".into(), json!({ device: port }));
            }
            Op::Trusted { add: true, devices } => {
                doc.insert("trusted_ports".into(), json!(devices));
            }
            Op::Log { log, .. } => {
                // (`devices` marks the document as RPC-shaped, as the pushed one is.)
                doc.insert("devices".into(), json!({}));
                doc.insert("logs".into(), json!([log]));
            }
            Op::Plug(_) | Op::RemovePort { .. } | Op::Trusted { add: false, .. } | Op::RemoveLog { .. } => {
                return None;
            }
        }
        Some(Value::Object(doc))
    }
}

impl Pushed {
    /// Applies one operation. Returns false when it changes nothing Neutron's driver would act
    /// on (an update or removal of a device it does not filter).
    pub fn apply(&mut self, op: &Op) -> bool {
        match op {
            Op::Plug(p) => {
                let changed = self.plug != *p;
                self.plug = *p;
                changed
            }
            Op::Rules { sg_id, rules } => {
                self.security_groups.insert(sg_id.clone(), rules.clone());
                true
            }
            Op::Members { sg_id, members } => {
                self.sg_member_ips.insert(sg_id.clone(), members.clone());
                true
            }
            Op::Port {
                device,
                port,
                prepare,
            } => {
                // Neutron's driver ignores an update of a port it does not filter.
                if !prepare && !self.devices.contains_key(device) {
                    return false;
                }
                self.trusted_ports.retain(|d| d != device);
                self.devices.insert(device.clone(), port.clone());
                true
            }
            Op::RemovePort { device } => self.devices.remove(device).is_some(),
            Op::Trusted { add: true, devices } => {
                let mut changed = false;
                for d in devices {
                    // `_get_trusted_devices` never lists a filtered device.
                    if !self.devices.contains_key(d) && !self.trusted_ports.contains(d) {
                        self.trusted_ports.push(d.clone());
                        changed = true;
                    }
                }
                changed
            }
            Op::Trusted { add: false, devices } => {
                let before = self.trusted_ports.len();
                self.trusted_ports.retain(|d| !devices.contains(d));
                before != self.trusted_ports.len()
            }
            Op::Log { id, log } => self.logs.insert(id.clone(), log.clone()).as_ref() != Some(log),
            Op::RemoveLog { id } => self.logs.remove(id).is_some(),
        }
    }

    /// Forgets the rules and member lists, among `groups` and `remotes` (what was known when a
    /// deferred batch began), that no device needs any more: Neutron's driver does the same at
    /// the end of each batch (`_remove_unused_security_group_info`).
    pub fn collect_unused(&mut self, groups: &BTreeSet<String>, remotes: &BTreeSet<String>) {
        let used_groups: BTreeSet<&str> = self
            .devices
            .values()
            .filter_map(|p| p.get("security_groups").and_then(Value::as_array))
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let unused: Vec<String> = groups
            .iter()
            .filter(|g| !used_groups.contains(g.as_str()))
            .cloned()
            .collect();
        for g in unused {
            self.security_groups.remove(&g);
        }
        let used_remotes: BTreeSet<String> = self
            .security_groups
            .iter()
            .filter(|(g, _)| used_groups.contains(g.as_str()))
            .flat_map(|(_, rules)| rules.iter())
            .flat_map(|r| {
                ["remote_group_id", "remote_address_group_id"]
                    .into_iter()
                    .filter_map(|k| r.get(k).and_then(Value::as_str).map(str::to_string))
            })
            .collect();
        for r in remotes.iter().filter(|r| !used_remotes.contains(*r)) {
            self.sg_member_ips.remove(r);
        }
    }

    /// The document in the agent's RPC shape, as `sg validate` reads it.
    pub fn to_document(&self) -> Value {
        json!({
            "plug": self.plug.as_str(),
            "devices": self.devices,
            "security_groups": self.security_groups,
            "sg_member_ips": self.sg_member_ips,
            "trusted_ports": self.trusted_ports,
            "logs": self.logs.values().collect::<Vec<_>>(),
        })
    }

    /// Reads back what `to_document` wrote (the shapes were validated when pushed).
    pub fn from_document(doc: &Value) -> Result<Pushed> {
        let obj = |key: &str| -> Result<Map<String, Value>> {
            match doc.get(key) {
                None | Some(Value::Null) => Ok(Map::new()),
                Some(Value::Object(m)) => Ok(m.clone()),
                Some(_) => bail!("{key}: expected an object"),
            }
        };
        let plug = match doc.get("plug").and_then(Value::as_str) {
            None => Plug::Direct,
            Some(p) => Plug::parse(p).with_context(|| format!("plug {p:?}"))?,
        };
        let mut security_groups = BTreeMap::new();
        for (g, rules) in obj("security_groups")? {
            let Value::Array(rules) = rules else {
                bail!("security_groups[{g:?}]: expected a list");
            };
            security_groups.insert(g, rules);
        }
        let trusted_ports = match doc.get("trusted_ports") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .context("trusted_ports: expected names")
                })
                .collect::<Result<_>>()?,
            Some(_) => bail!("trusted_ports: expected a list"),
        };
        let mut logs = BTreeMap::new();
        match doc.get("logs") {
            None | Some(Value::Null) => {}
            Some(Value::Array(items)) => {
                for l in items {
                    let id = l
                        .get("id")
                        .and_then(Value::as_str)
                        .context("logs: an object without an id")?;
                    logs.insert(id.to_string(), l.clone());
                }
            }
            Some(_) => bail!("logs: expected a list"),
        }
        Ok(Pushed {
            plug,
            devices: obj("devices")?.into_iter().collect(),
            security_groups,
            sg_member_ips: obj("sg_member_ips")?.into_iter().collect(),
            trusted_ports,
            logs,
        })
    }

    /// The file in the run directory.
    pub fn path(run_dir: &Path) -> PathBuf {
        run_dir.join("neutron-state.json")
    }

    /// The temporary file `save` writes first.
    pub fn tmp_path(run_dir: &Path) -> PathBuf {
        run_dir.join(".neutron-state.json.tmp")
    }

    pub fn load(run_dir: &Path) -> Result<Option<Pushed>> {
        let path = Self::path(run_dir);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let doc: Value =
                    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))?;
                Ok(Some(
                    Self::from_document(&doc).with_context(|| format!("reading {}", path.display()))?,
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Written to a temporary file, flushed to disk and renamed over the old one, then the
    /// directory is synced: after a crash the file is the old state or the new one, whole.
    pub fn save(&self, run_dir: &Path) -> Result<()> {
        std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
        let path = Self::path(run_dir);
        let tmp = Self::tmp_path(run_dir);
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(&serde_json::to_vec_pretty(&self.to_document())?)?;
        f.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
        drop(f);
        std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
        std::fs::File::open(run_dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {}", run_dir.display()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(device: &str, groups: &[&str]) -> Op {
        Op::Port {
            device: device.into(),
            port: json!({"device": device, "security_groups": groups}),
            prepare: true,
        }
    }

    #[test]
    fn operations_follow_neutrons_driver() {
        let mut p = Pushed::default();
        assert!(p.apply(&Op::Trusted {
            add: true,
            devices: vec!["tapdhcp".into()]
        }));
        // An update of a device not filtered changes nothing.
        let mut update = port("tap1", &["g"]);
        if let Op::Port { prepare, .. } = &mut update {
            *prepare = false;
        }
        assert!(!p.apply(&update));
        assert!(p.apply(&port("tap1", &["g"])));
        assert!(p.apply(&update));
        // A trusted device that becomes a filtered port stops being trusted, and back.
        assert!(p.apply(&port("tapdhcp", &[])));
        assert!(p.trusted_ports.is_empty());
        assert!(!p.apply(&Op::Trusted {
            add: true,
            devices: vec!["tapdhcp".into()]
        }));
        assert!(p.apply(&Op::RemovePort {
            device: "tapdhcp".into()
        }));
        assert!(!p.apply(&Op::RemovePort {
            device: "tapdhcp".into()
        }));
    }

    #[test]
    fn unused_groups_known_before_a_batch_are_collected() {
        let mut p = Pushed::default();
        p.apply(&port("tap1", &["used"]));
        for g in ["used", "old", "new"] {
            p.apply(&Op::Rules {
                sg_id: g.into(),
                rules: vec![json!({"direction": "ingress", "ethertype": "IPv4", "remote_group_id": "r"})],
            });
        }
        p.apply(&Op::Members {
            sg_id: "r".into(),
            members: json!({"IPv4": []}),
        });
        p.apply(&Op::Members {
            sg_id: "gone".into(),
            members: json!({"IPv4": []}),
        });
        let groups = ["used", "old"].map(String::from).into();
        let remotes = ["r", "gone"].map(String::from).into();
        p.collect_unused(&groups, &remotes);
        assert_eq!(p.security_groups.keys().collect::<Vec<_>>(), ["new", "used"]);
        assert_eq!(p.sg_member_ips.keys().collect::<Vec<_>>(), ["r"]);
    }

    #[test]
    fn document_round_trips_and_saves_atomically() {
        let dir = std::env::temp_dir().join(format!("sg-pushed-{}", std::process::id()));
        let mut p = Pushed {
            plug: Plug::Hybrid,
            ..Pushed::default()
        };
        p.apply(&port("adcc4b66-c1e2", &["g"]));
        p.save(&dir).unwrap();
        assert_eq!(Pushed::load(&dir).unwrap(), Some(p.clone()));
        assert!(!dir.join(".neutron-state.json.tmp").exists());
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(Pushed::load(&dir).unwrap(), None);
    }
}
