//! The model back to input JSON, and the smaller inputs the differential test's shrinker
//! tries. The JSON holds what Neutron stored (after API normalisation), so loading it again
//! gives the same model.

use serde_json::{Value, json};

use super::{Model, from_values};

/// The model as one input document.
pub fn to_json(m: &Model) -> Value {
    json!({
        "security_groups": m.security_groups.iter().map(|sg| json!({
            "id": sg.id,
            "name": sg.name,
            "stateful": sg.stateful,
            "security_group_rules": sg.rules.iter().map(|r| json!({
                "id": r.id,
                "security_group_id": r.security_group_id,
                "direction": r.direction.as_str(),
                "ethertype": r.ethertype.as_str(),
                "protocol": r.protocol,
                "port_range_min": r.port_range_min,
                "port_range_max": r.port_range_max,
                "source_port_range_min": r.source_port_range_min,
                "source_port_range_max": r.source_port_range_max,
                "remote_ip_prefix": r.remote_ip_prefix,
                "normalized_cidr": r.normalized_cidr,
                "remote_group_id": r.remote_group_id,
                "remote_address_group_id": r.remote_address_group_id,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "address_groups": m.address_groups.iter().map(|ag| json!({
            "id": ag.id, "name": ag.name, "addresses": ag.addresses,
        })).collect::<Vec<_>>(),
        "ports": m.ports.iter().map(|p| json!({
            "id": p.id,
            "name": p.name,
            "mac_address": p.mac_address,
            "fixed_ips": p.fixed_ips.iter().map(|f| json!({"ip_address": f.ip_address, "subnet_id": f.subnet_id})).collect::<Vec<_>>(),
            "allowed_address_pairs": p.allowed_address_pairs.iter().map(|a| json!({"ip_address": a.ip_address, "mac_address": a.mac_address})).collect::<Vec<_>>(),
            "security_groups": p.security_groups,
            "port_security_enabled": p.port_security_enabled,
            "network_id": p.network_id,
            "device_owner": p.device_owner,
            "binding:host_id": p.binding_host_id,
            "device": p.device,
        })).collect::<Vec<_>>(),
    })
}

/// Every valid input with one thing fewer: a rule, an allowed address pair, an address
/// group, a security group, or a port not in `keep`. Removals that make the input invalid
/// (a group still referenced) are skipped.
pub fn shrink_candidates(m: &Model, keep: &[String]) -> Vec<Model> {
    let doc = to_json(m);
    let mut out = Vec::new();
    let mut try_doc = |d: Value| {
        if let Ok(model) = from_values(vec![("shrink".into(), d)]) {
            out.push(model);
        }
    };
    let n_ports = doc["ports"].as_array().map_or(0, Vec::len);
    for i in 0..n_ports {
        let id = doc["ports"][i]["id"].as_str().unwrap_or_default().to_string();
        if !keep.contains(&id) {
            let mut d = doc.clone();
            d["ports"].as_array_mut().unwrap().remove(i);
            try_doc(d);
        }
    }
    for (gi, sg) in doc["security_groups"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let mut d = doc.clone();
        d["security_groups"].as_array_mut().unwrap().remove(gi);
        let id = sg["id"].clone();
        for p in d["ports"].as_array_mut().unwrap() {
            if let Some(groups) = p["security_groups"].as_array_mut() {
                groups.retain(|g| *g != id);
            }
        }
        try_doc(d);
        for ri in 0..sg["security_group_rules"].as_array().map_or(0, Vec::len) {
            let mut d = doc.clone();
            d["security_groups"][gi]["security_group_rules"]
                .as_array_mut()
                .unwrap()
                .remove(ri);
            try_doc(d);
        }
    }
    for i in 0..doc["address_groups"].as_array().map_or(0, Vec::len) {
        let mut d = doc.clone();
        d["address_groups"].as_array_mut().unwrap().remove(i);
        try_doc(d);
    }
    for pi in 0..n_ports {
        for ai in 0..doc["ports"][pi]["allowed_address_pairs"]
            .as_array()
            .map_or(0, Vec::len)
        {
            let mut d = doc.clone();
            d["ports"][pi]["allowed_address_pairs"]
                .as_array_mut()
                .unwrap()
                .remove(ai);
            try_doc(d);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_json() {
        let m = crate::model::load(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/web1.json")).unwrap();
        let again = from_values(vec![("again".into(), to_json(&m))]).unwrap();
        assert_eq!(to_json(&again), to_json(&m));
        assert_eq!(
            crate::compile::render_json(&crate::compile::compile(&again, "compute-1")),
            crate::compile::render_json(&crate::compile::compile(&m, "compute-1"))
        );
    }

    #[test]
    fn candidates_are_valid_and_smaller() {
        let m = crate::model::load(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/web1.json")).unwrap();
        let keep = vec![m.ports[0].id.clone()];
        let c = shrink_candidates(&m, &keep);
        assert!(!c.is_empty());
        let rules = |m: &Model| m.security_groups.iter().map(|s| s.rules.len()).sum::<usize>();
        for x in &c {
            assert!(x.ports.iter().any(|p| p.id == keep[0]), "the kept port stays");
            assert!(
                rules(x) < rules(&m)
                    || x.security_groups.len() < m.security_groups.len()
                    || x.ports.len() < m.ports.len()
            );
        }
    }
}
