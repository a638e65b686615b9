//! ServiceEntries bound to waypoints. A ServiceEntry reaches the proxies as a config resource
//! (the object as it is; they register its hosts as services), but its waypoint binding depends
//! on what only the controller sees: the entry's or its namespace's `istio.io/use-waypoint`
//! label, `istio.io/use-waypoint-namespace`, the Gateway, its class and its Service. So the
//! controller decides the binding exactly as for a Kubernetes Service
//! ([`Index::service_binding`]) and sends the entry with the chosen waypoint's address in
//! [`BOUND_WAYPOINT_ANNOTATION`] (removed from entries that are not bound, so a user's own
//! annotation never counts).
//!
//! An Istio ztunnel knows ServiceEntries only as Address resources, so each entry is also sent
//! in that form ([`addresses`]).

use super::waypoints::Binding;
use super::{Index, Key};
use common::config::assemble::{assemble, Parts};
use common::config::waypoints::BOUND_WAYPOINT_ANNOTATION;
use common::model::{Service, Workload};
use common::xds::SERVICE_ENTRY_MARKER;
use serde::Deserialize;
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

/// The string-valued entries of the object at `pointer` in `value` (labels, selectors).
fn string_map(value: &Value, pointer: &str) -> Option<BTreeMap<String, String>> {
    let m = value.pointer(pointer)?.as_object()?;
    Some(
        m.iter()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
            .collect(),
    )
}

/// `metadata.labels` of an object (string values only).
fn labels(value: &Value) -> BTreeMap<String, String> {
    string_map(value, "/metadata/labels").unwrap_or_default()
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

/// The entry's hosts and endpoints in Istio's Address form, for an Istio ztunnel (ours reads the
/// entry itself and skips these, see [`SERVICE_ENTRY_MARKER`]): each host a Service (its
/// addresses, else the automatic VIP every proxy allocates for it, its ports, its waypoint);
/// each STATIC endpoint outside the mesh a Workload with its address; each name a DNS entry
/// resolves a Workload with that `hostname`. Endpoints on a pod's address are left to the pod's
/// own workload (two workloads must never claim one address). A `workloadSelector` entry's
/// pods list its hosts in their own workloads instead ([`selectors_in`]).
pub(crate) fn addresses(
    index: &Index,
    key: &Key,
    entry: &Value,
    binding: Option<&Binding>,
) -> (Vec<Service>, Vec<Workload>) {
    // The loader the proxies run, on the entry alone, without any binding annotation (the
    // binding is set below from the controller's own decision).
    let mut plain = entry.clone();
    if let Some(a) = plain
        .pointer_mut("/metadata/annotations")
        .and_then(Value::as_object_mut)
    {
        a.remove(BOUND_WAYPOINT_ANNOTATION);
    }
    let parts = Parts {
        documents: vec![(format!("{}/{}", key.0, key.1), Arc::new(plain))],
        ..Default::default()
    };
    let Ok(snapshot) = assemble(parts) else {
        return (Vec::new(), Vec::new());
    };
    let waypoint = binding
        .filter(|b| b.bound)
        .map(|b| index.waypoint_address(&b.gateway));
    let pod_ips: HashSet<IpAddr> = index
        .pods
        .values()
        .flat_map(|p| p.ips.iter().map(|ip| ip.to_canonical()))
        .collect();
    let marker = format!("{}/{}", key.0, key.1);
    let uid = |what: &str| {
        format!(
            "{}/networking.istio.io/ServiceEntry/{}/{}/{what}",
            index.cfg.cluster_id, key.0, key.1
        )
    };
    let mark = |w: &mut Workload| {
        w.annotations
            .insert(SERVICE_ENTRY_MARKER.to_string(), marker.clone());
        w.cluster_id = index.cfg.cluster_id.clone();
        w.trust_domain = index.cfg.trust_domain.clone();
    };

    let mut services = Vec::new();
    let mut workloads: BTreeMap<String, Workload> = BTreeMap::new();
    for s in snapshot
        .services
        .iter()
        .filter(|s| s.service_entry.is_some())
    {
        let mut s = Service::clone(s);
        s.waypoint = waypoint.clone();
        if s.service_entry.as_ref().is_some_and(|i| i.auto_vip) {
            // Allocated over every entry in the cluster, as each proxy does.
            let vip = index
                .auto_vips
                .get(&(s.namespace.clone(), s.hostname.to_ascii_lowercase()));
            s.vips = vip.map(|ip| format!("/{ip}")).into_iter().collect();
        }
        let info = s.service_entry.as_ref();
        for target in info.map(|i| i.dns.as_slice()).unwrap_or_default() {
            let w = workloads
                .entry(uid(&target.hostname))
                .or_insert_with_key(|uid| {
                    let mut w =
                        Workload::outside_mesh(uid.clone(), &key.1, &key.0, None, "serviceentry");
                    w.hostname = target.hostname.clone();
                    w.labels = target
                        .labels
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    mark(&mut w);
                    w
                });
            w.services.insert(s.key(), target.ports.clone());
        }
        services.push(s);
    }
    for w in snapshot.workloads.iter() {
        let Some(ip) = w.workload_ips.first() else {
            continue;
        };
        if pod_ips.contains(&ip.to_canonical()) {
            continue;
        }
        let mut w = Workload::clone(w);
        w.uid = uid(&ip.to_string());
        mark(&mut w);
        workloads.insert(w.uid.clone(), w);
    }
    (services, workloads.into_values().collect())
}

/// The automatic VIPs of all entries' hosts ([`common::vip`]), chosen by the proxies' own rule
/// ([`common::service_entries::auto_vip_hosts`]) over the entries they would accept.
pub(crate) fn auto_vips(
    policies: &super::policies::Policies,
) -> BTreeMap<(String, String), std::net::Ipv4Addr> {
    use common::l7::service_entry::{self, ServiceEntry, ServiceEntrySpec};
    let entries: Vec<Arc<ServiceEntry>> = policies
        .all_of(super::objects::Kind::ServiceEntry)
        .filter_map(|((ns, name), v)| {
            let spec = ServiceEntrySpec::deserialize(&v["spec"]).ok()?;
            service_entry::validate(&spec).ok()?;
            Some(Arc::new(ServiceEntry {
                name: name.clone(),
                namespace: ns.clone(),
                spec,
                labels: BTreeMap::new(),
                annotations: BTreeMap::new(),
                document: 0,
            }))
        })
        .collect();
    common::vip::allocate(common::service_entries::auto_vip_hosts(&entries))
}

/// A `workloadSelector` ServiceEntry as it touches pods: the pods of its namespace with these
/// labels are endpoints of its hosts (`<ns>/<host>` → service port → target port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Selector {
    pub labels: BTreeMap<String, String>,
    pub services: Vec<(String, BTreeMap<u16, u16>)>,
}

/// The `workloadSelector` entries of namespace `ns`, as the proxies' loader reads them
/// (hosts as written; a port's `targetPort`, else its number).
pub(crate) fn selectors_in(policies: &super::policies::Policies, ns: &str) -> Vec<Selector> {
    let kind = super::objects::Kind::ServiceEntry;
    let mut out = Vec::new();
    for key in policies.keys_in(kind, ns) {
        let Some(spec) = policies.stored(kind, &key).map(|v| &v["spec"]) else {
            continue;
        };
        let Some(labels) = string_map(spec, "/workloadSelector/labels") else {
            continue;
        };
        let port = |v: &Value| u16::try_from(v.as_u64()?).ok();
        let ports: BTreeMap<u16, u16> = spec["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| {
                let number = port(&p["number"])?;
                Some((number, port(&p["targetPort"]).unwrap_or(number)))
            })
            .collect();
        let services = spec["hosts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(|h| (format!("{ns}/{h}"), ports.clone()))
            .collect();
        out.push(Selector { labels, services });
    }
    out
}
