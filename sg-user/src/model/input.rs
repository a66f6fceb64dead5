//! Reading input files and recognising the shapes Neutron hands out: the combined document,
//! the REST API's single and list wrappers, and the bare objects of `openstack ... show -f json`.

use std::path::Path;

use serde_json::{Map, Value};

use super::error::ValidationErrors;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    SecurityGroup,
    AddressGroup,
    Port,
    /// The member lists of one remote group (RPC shape: `sg_member_ips`).
    Members,
    /// A device of `process_trusted_ports` (RPC shape).
    TrustedPort,
}

/// One resource object found in the input, with where it was found.
pub(crate) struct RawObject {
    pub kind: Kind,
    /// `file.json security_groups[3]`: used in messages when the object has no usable id.
    pub origin: String,
    pub fields: Map<String, Value>,
    /// Found in an agent RPC-shaped document ([`super::rpc`]): rules carry the agent's keys,
    /// member lists are explicit, and a group may be named before (or without) its rules.
    pub rpc: bool,
}

/// Reads a file, or every `*.json` file of a directory in name order.
pub(crate) fn read_path(path: &Path, errs: &mut ValidationErrors) -> Vec<(String, Value)> {
    let mut files = Vec::new();
    if path.is_dir() {
        match std::fs::read_dir(path) {
            Ok(entries) => {
                let mut names: Vec<_> = entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "json"))
                    .collect();
                names.sort();
                files = names;
            }
            Err(e) => errs.push("document", &path.display().to_string(), "", "", e.to_string()),
        }
        if files.is_empty() && errs.is_empty() {
            errs.push(
                "document",
                &path.display().to_string(),
                "",
                "",
                "no *.json file in directory",
            );
        }
    } else {
        files.push(path.to_path_buf());
    }
    let mut docs = Vec::new();
    for file in files {
        let name = file.display().to_string();
        match std::fs::read_to_string(&file) {
            Ok(text) => match serde_json::from_str::<Value>(&text) {
                Ok(v) => docs.push((name, v)),
                Err(e) => errs.push("document", &name, "", "", format!("not valid JSON: {e}")),
            },
            Err(e) => errs.push("document", &name, "", "", format!("cannot read: {e}")),
        }
    }
    docs
}

const WRAPPERS: [(&str, Kind, bool); 6] = [
    ("security_groups", Kind::SecurityGroup, true),
    ("security_group", Kind::SecurityGroup, false),
    ("address_groups", Kind::AddressGroup, true),
    ("address_group", Kind::AddressGroup, false),
    ("ports", Kind::Port, true),
    ("port", Kind::Port, false),
];

/// Splits one document into resource objects.
pub(crate) fn objects(origin: &str, doc: Value, out: &mut Vec<RawObject>, errs: &mut ValidationErrors) {
    match doc {
        Value::Array(items) => {
            for (i, item) in items.into_iter().enumerate() {
                bare(&format!("{origin}[{i}]"), item, out, errs);
            }
        }
        Value::Object(map) if super::rpc::is_rpc_document(&map) => {
            super::rpc::objects(origin, map, out, errs)
        }
        Value::Object(map) if is_wrapper(&map) => {
            let mut map = map;
            for (key, kind, list) in WRAPPERS {
                let Some(v) = map.remove(key) else { continue };
                match (v, list) {
                    (Value::Array(items), true) => {
                        for (i, item) in items.into_iter().enumerate() {
                            push(kind, format!("{origin} {key}[{i}]"), item, out, errs);
                        }
                    }
                    (Value::Null, true) => {}
                    (item @ Value::Object(_), false) => {
                        push(kind, format!("{origin} {key}"), item, out, errs)
                    }
                    (other, _) => errs.push(
                        "document",
                        origin,
                        key,
                        super::error::show(&other),
                        if list {
                            "expected a list of objects"
                        } else {
                            "expected an object"
                        },
                    ),
                }
            }
        }
        other => bare(origin, other, out, errs),
    }
}

/// A document is a wrapper when it has one of the wrapper keys and is not itself a port (a
/// bare REST port also has a `security_groups` list, of ids).
fn is_wrapper(map: &Map<String, Value>) -> bool {
    !map.contains_key("mac_address") && WRAPPERS.iter().any(|(k, _, _)| map.contains_key(*k))
}

fn bare(origin: &str, v: Value, out: &mut Vec<RawObject>, errs: &mut ValidationErrors) {
    let kind = match &v {
        Value::Object(m)
            if ["mac_address", "fixed_ips", "security_group_ids"]
                .iter()
                .any(|k| m.contains_key(*k)) =>
        {
            Some(Kind::Port)
        }
        Value::Object(m) if m.contains_key("rules") || m.contains_key("security_group_rules") => {
            Some(Kind::SecurityGroup)
        }
        Value::Object(m) if m.contains_key("addresses") => Some(Kind::AddressGroup),
        _ => None,
    };
    match kind {
        Some(kind) => push(kind, origin.to_string(), v, out, errs),
        None => errs.push(
            "document",
            origin,
            "",
            "",
            "not a recognised Neutron object: expected {\"security_groups\"|\"address_groups\"|\"ports\": [...]}, \
             a REST {\"security_group\"|\"address_group\"|\"port\": {...}}, or a bare security group \
             (with rules), port (with mac_address) or address group (with addresses)",
        ),
    }
}

fn push(kind: Kind, origin: String, v: Value, out: &mut Vec<RawObject>, errs: &mut ValidationErrors) {
    match v {
        Value::Object(fields) => out.push(RawObject {
            kind,
            origin,
            fields,
            rpc: false,
        }),
        other => errs.push(
            "document",
            &origin,
            "",
            super::error::show(&other),
            "expected an object",
        ),
    }
}
