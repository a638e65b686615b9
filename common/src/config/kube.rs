//! Kubernetes `Endpoints` and headless, selector-less `Service` documents in a local file: the
//! pattern users have for a database outside the cluster (`clusterIP: None`, no selector, an
//! `Endpoints` object listing its address). Joined by namespace/name, they become a registry
//! service `<name>.<ns>.svc.cluster.local` without a VIP whose endpoints are those addresses
//! (through the same path as a STATIC ServiceEntry, [`crate::service_entries`]), so the
//! addresses are in the registry under REGISTRY_ONLY and metrics name the service. Every
//! Service is still kept verbatim as well; an `Endpoints` object without its headless Service
//! has no effect. A malformed `Endpoints` object is rejected alone.

use super::{Collected, ConfigError, Document};
use crate::l7::service_entry::{
    Location, Resolution, ServiceEntry, ServiceEntrySpec, ServicePort, WorkloadEntry,
};
use serde_yaml_ng::Value;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

/// A headless, selector-less Service: its ports.
#[derive(Debug, Clone)]
pub(crate) struct Headless {
    pub namespace: String,
    pub name: String,
    pub ports: Vec<ServicePort>,
    pub document: usize,
    /// `metadata.labels` (`istio.io/use-waypoint`).
    pub labels: BTreeMap<String, String>,
}

/// An `Endpoints` object: addresses and named ports.
#[derive(Debug, Clone)]
pub(crate) struct EndpointsObj {
    pub namespace: String,
    pub name: String,
    /// (address, port name → port)
    pub addresses: Vec<(IpAddr, BTreeMap<String, u16>)>,
}

fn meta(value: &Value) -> Option<(String, String)> {
    let m = value.get("metadata")?;
    let name = m.get("name")?.as_str()?.to_string();
    let ns = m
        .get("namespace")
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_string();
    Some((ns, name))
}

fn port_number(v: Option<&Value>) -> Option<u16> {
    v?.as_u64().and_then(|n| u16::try_from(n).ok())
}

/// Records a `v1 Service` if it is headless and has no selector (it is kept verbatim as well).
pub(super) fn note_service(doc: &Document, value: &Value, out: &mut Collected) {
    let Some((namespace, name)) = meta(value) else {
        return;
    };
    let Some(spec) = value.get("spec") else {
        return;
    };
    let headless = spec.get("clusterIP").and_then(Value::as_str) == Some("None");
    let selector = spec
        .get("selector")
        .and_then(Value::as_mapping)
        .is_some_and(|m| !m.is_empty());
    if !headless || selector {
        return;
    }
    let ports = spec
        .get("ports")
        .and_then(Value::as_sequence)
        .map(|ports| {
            ports
                .iter()
                .filter_map(|p| {
                    Some(ServicePort {
                        number: port_number(p.get("port"))?,
                        protocol: p
                            .get("protocol")
                            .and_then(Value::as_str)
                            .map(str::to_string),
                        name: p
                            .get("name")
                            .and_then(Value::as_str)
                            .filter(|n| !n.is_empty())
                            .map(str::to_string),
                        target_port: port_number(p.get("targetPort")),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    out.headless.push(Headless {
        namespace,
        name,
        ports,
        document: doc.index,
        labels: super::l7::metadata_labels(value),
    });
}

/// Loads a `v1 Endpoints` document; a malformed one is rejected alone.
pub(super) fn load_endpoints(doc: &Document, value: &Value, source: &str, out: &mut Collected) {
    let reject = |resource: String, field: String, message: String| ConfigError {
        file: source.to_string(),
        document: Some(doc.index),
        resource: Some(resource),
        field: Some(field),
        message,
    };
    let Some((namespace, name)) = meta(value) else {
        out.rejected.push(reject(
            "Endpoints".into(),
            "metadata.name".into(),
            "missing".into(),
        ));
        return;
    };
    let resource = format!("Endpoints {namespace}/{name}");
    let mut addresses = Vec::new();
    let subsets = value
        .get("subsets")
        .and_then(Value::as_sequence)
        .cloned()
        .unwrap_or_default();
    for (s, subset) in subsets.iter().enumerate() {
        let mut ports = BTreeMap::new();
        for (p, port) in subset
            .get("ports")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let Some(number) = port_number(port.get("port")).filter(|n| *n != 0) else {
                out.rejected.push(reject(
                    resource,
                    format!("subsets[{s}].ports[{p}].port"),
                    "missing or not a port number".into(),
                ));
                return;
            };
            let pname = port.get("name").and_then(Value::as_str).unwrap_or("");
            ports.insert(pname.to_string(), number);
        }
        for (a, addr) in subset
            .get("addresses")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .enumerate()
        {
            match addr
                .get("ip")
                .and_then(Value::as_str)
                .map(str::parse::<IpAddr>)
            {
                Some(Ok(ip)) => addresses.push((ip.to_canonical(), ports.clone())),
                _ => {
                    out.rejected.push(reject(
                        resource,
                        format!("subsets[{s}].addresses[{a}].ip"),
                        "missing or not an IP address".into(),
                    ));
                    return;
                }
            }
        }
    }
    out.endpoints.push(EndpointsObj {
        namespace,
        name,
        addresses,
    });
}

/// Joins headless Services with their `Endpoints` into STATIC entries for
/// [`crate::service_entries::register`].
pub(crate) fn headless_entries(
    headless: &[Headless],
    endpoints: &[EndpointsObj],
    domain: &str,
) -> Vec<Arc<ServiceEntry>> {
    headless
        .iter()
        .filter_map(|h| {
            let eps = endpoints
                .iter()
                .find(|e| e.namespace == h.namespace && e.name == h.name)?;
            let unnamed = eps
                .addresses
                .first()
                .and_then(|(_, ports)| ports.get(""))
                .copied();
            let ports = h
                .ports
                .iter()
                .map(|p| ServicePort {
                    target_port: match &p.name {
                        None => unnamed.or(p.target_port),
                        Some(_) => p.target_port,
                    },
                    ..p.clone()
                })
                .collect();
            let spec = ServiceEntrySpec {
                hosts: vec![format!("{}.{}.svc.{domain}", h.name, h.namespace)],
                ports,
                location: Location::MeshInternal,
                resolution: Resolution::Static,
                endpoints: eps
                    .addresses
                    .iter()
                    .map(|(ip, ports)| WorkloadEntry {
                        address: Some(ip.to_string()),
                        ports: ports
                            .iter()
                            .filter(|(n, _)| !n.is_empty())
                            .map(|(n, p)| (n.clone(), *p))
                            .collect(),
                        ..WorkloadEntry::default()
                    })
                    .collect(),
                ..ServiceEntrySpec::default()
            };
            Some(Arc::new(ServiceEntry {
                name: h.name.clone(),
                namespace: h.namespace.clone(),
                spec,
                document: h.document,
                labels: h.labels.clone(),
                annotations: BTreeMap::new(),
            }))
        })
        .collect()
}
