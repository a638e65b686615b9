//! ServiceEntries bound to waypoints. A ServiceEntry reaches the proxies as a config resource
//! (the object as it is; they register its hosts as services), but its waypoint binding depends
//! on what only the controller sees: the entry's or its namespace's `istio.io/use-waypoint`
//! label, `istio.io/use-waypoint-namespace`, the Gateway, its class and its Service. So the
//! controller decides the binding exactly as for a Kubernetes Service
//! ([`Index::service_binding`]) and sends the entry with the chosen waypoint's address in
//! [`BOUND_WAYPOINT_ANNOTATION`] (removed from entries that are not bound, so a user's own
//! annotation never counts).

use super::waypoints::Binding;
use super::{Index, Key};
use common::config::waypoints::BOUND_WAYPOINT_ANNOTATION;
use serde_json::Value;
use std::collections::BTreeMap;

/// `metadata.labels` of an object (string values only).
fn labels(value: &Value) -> BTreeMap<String, String> {
    value
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// The ServiceEntry `value` (key `key`) as sent to the proxies, and its binding.
pub(crate) fn with_binding(index: &Index, key: &Key, value: &Value) -> (Value, Option<Binding>) {
    let binding = index.service_binding(key, &labels(value));
    let mut out = value.clone();
    let annotations = out
        .as_object_mut()
        .and_then(|o| o.get_mut("metadata"))
        .and_then(Value::as_object_mut)
        .map(|m| {
            m.entry("annotations")
                .or_insert_with(|| Value::Object(Default::default()))
        });
    if let Some(Value::Object(annotations)) = annotations {
        annotations.remove(BOUND_WAYPOINT_ANNOTATION);
        if let Some(b) = binding.as_ref().filter(|b| b.bound) {
            let gw = index.waypoint_address(&b.gateway);
            let address = serde_json::json!({
                "destination": gw.destination,
                "hboneMtlsPort": gw.hbone_mtls_port,
            });
            annotations.insert(
                BOUND_WAYPOINT_ANNOTATION.to_string(),
                Value::String(address.to_string()),
            );
        }
        if annotations.is_empty() {
            if let Some(m) = out.get_mut("metadata").and_then(Value::as_object_mut) {
                m.remove("annotations");
            }
        }
    }
    (out, binding)
}
