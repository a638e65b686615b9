//! From the index's change feed to xDS: each changed workload or service becomes an
//! `istio.workload.Address`, each policy an `istio.security.Authorization`, each config object a
//! `ConfigResource`, encoded once here and handed to the ADS server (which hashes, debounces and
//! fans out). Aliases are Istio's: `<network>/<ip>` per address of a workload or VIP of a service.

use crate::index::Changes;
use crate::xds::cache::node_group;
use crate::xds::Change;
use common::model::{Service, Workload};
use common::xds::{
    convert, mesh_config, workload as wds, ADDRESS_TYPE, AUTHORIZATION_TYPE, CONFIG_TYPE,
};
use prost::Message;

fn workload_change(name: &str, w: &Workload) -> Option<Change> {
    match convert::workload_to_proto(w) {
        Ok(p) => {
            let aliases = w
                .workload_ips
                .iter()
                .map(|ip| format!("{}/{ip}", w.network))
                .collect();
            let msg = wds::Address {
                r#type: Some(wds::address::Type::Workload(p)),
            };
            let mut groups: Vec<String> = w.services.keys().cloned().collect();
            if !w.node.is_empty() {
                groups.push(node_group(&w.node));
            }
            Some(
                Change::upsert(ADDRESS_TYPE, name, msg.encode_to_vec(), aliases)
                    .with_groups(groups),
            )
        }
        Err(e) => {
            tracing::error!(workload = %name, error = %e, "cannot encode workload; not published");
            None
        }
    }
}

fn service_change(name: &str, s: &Service) -> Option<Change> {
    match convert::service_to_proto(s) {
        Ok(p) => {
            let msg = wds::Address {
                r#type: Some(wds::address::Type::Service(p)),
            };
            Some(Change::upsert(
                ADDRESS_TYPE,
                name,
                msg.encode_to_vec(),
                s.vips.clone(),
            ))
        }
        Err(e) => {
            tracing::error!(service = %name, error = %e, "cannot encode service; not published");
            None
        }
    }
}

fn config_change(name: &str, v: &serde_json::Value) -> Change {
    let s = |p: &[&str]| {
        let mut cur = v;
        for k in p {
            cur = cur.get(*k).unwrap_or(&serde_json::Value::Null);
        }
        cur.as_str().unwrap_or_default().to_string()
    };
    let msg = mesh_config::ConfigResource {
        api_version: s(&["apiVersion"]),
        kind: s(&["kind"]),
        namespace: s(&["metadata", "namespace"]),
        name: s(&["metadata", "name"]),
        json: v.to_string(),
    };
    Change::upsert(CONFIG_TYPE, name, msg.encode_to_vec(), Vec::new())
}

/// The xDS changes for one batch of index changes.
pub fn to_xds(changes: &Changes) -> Vec<Change> {
    let mut out = Vec::new();
    for (name, w) in &changes.workloads.upserted {
        out.extend(workload_change(name, w));
    }
    for (name, s) in &changes.services.upserted {
        out.extend(service_change(name, s));
    }
    for name in changes
        .workloads
        .removed
        .iter()
        .chain(&changes.services.removed)
    {
        out.push(Change::remove(ADDRESS_TYPE, name));
    }
    for (name, p) in &changes.authorizations.upserted {
        let msg = convert::authorization_to_proto(p);
        out.push(Change::upsert(
            AUTHORIZATION_TYPE,
            name,
            msg.encode_to_vec(),
            Vec::new(),
        ));
    }
    for name in &changes.authorizations.removed {
        out.push(Change::remove(AUTHORIZATION_TYPE, name));
    }
    for (name, v) in &changes.configs.upserted {
        out.push(config_change(name, v));
    }
    for name in &changes.configs.removed {
        out.push(Change::remove(CONFIG_TYPE, name));
    }
    out
}
