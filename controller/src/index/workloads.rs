//! Pods → workloads (uid `<cluster>//Pod/<ns>/<name>`), and the endpoints of selector-less
//! Services → workloads of their own (uid
//! `<cluster>/discovery.k8s.io/EndpointSlice/<ns>/<slice>/<ip>`, protocol TCP).
//!
//! A pod without an IP, or finished (`Succeeded`/`Failed`: its IP may already be another
//! pod's), is no workload. Its protocol comes from [`super::membership`]. `status` is
//! Unhealthy when the pod is not Ready or is being deleted; `terminating` marks a deleted pod
//! its EndpointSlices still list as serving (an endpoint of last resort).
//!
//! **hostNetwork pods** are workloads without `workloadIps`: their IP is the node's, and
//! indexing it would make the node's own traffic (kubelet probes, host daemons) look like the
//! pod's. Istio sends the address with `network_mode: HOST_NETWORK` instead; our model has no
//! such field, so such a pod is not reachable through the mesh as a service endpoint.

use super::membership::{membership, Membership};
use super::services::SliceInfo;
use super::waypoints::Binding;
use super::{Index, Key};
use common::model::{HealthStatus, Labels, Locality, SmallMap, Workload};
use common::snapshot::selector_matches;
use k8s_openapi::api::core::v1::{Node, Pod};
use std::collections::BTreeMap;
use std::net::IpAddr;

pub const CANONICAL_NAME_LABEL: &str = "service.istio.io/canonical-name";
pub const CANONICAL_REVISION_LABEL: &str = "service.istio.io/canonical-revision";

/// What the index keeps of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
    pub node: String,
    pub service_account: String,
    pub host_network: bool,
    /// `Succeeded` or `Failed`.
    pub terminal: bool,
    pub ready: bool,
    /// `deletionTimestamp` is set.
    pub deleting: bool,
    /// Container port name → number.
    pub container_ports: BTreeMap<String, u16>,
    /// The owning Deployment (ReplicaSet name without its pod-template hash), else the
    /// owner's name, else the pod's.
    pub workload_name: String,
}

impl PodInfo {
    pub fn from_pod(pod: &Pod) -> Self {
        let meta = &pod.metadata;
        let spec = pod.spec.clone().unwrap_or_default();
        let status = pod.status.clone().unwrap_or_default();
        let labels = meta.labels.clone().unwrap_or_default();
        let name = meta.name.clone().unwrap_or_default();
        let mut ips: Vec<IpAddr> = status
            .pod_ips
            .iter()
            .flatten()
            .filter_map(|p| p.ip.parse().ok())
            .collect();
        if ips.is_empty() {
            ips.extend(
                status
                    .pod_ip
                    .as_deref()
                    .and_then(|ip| ip.parse::<IpAddr>().ok()),
            );
        }
        let ready = status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        let container_ports = spec
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|p| {
                let port = u16::try_from(p.container_port).ok()?;
                Some((p.name.clone()?, port))
            })
            .collect();
        let owner = meta
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.controller == Some(true))
            .or_else(|| meta.owner_references.iter().flatten().next());
        let workload_name = match owner {
            Some(o) if o.kind == "ReplicaSet" => labels
                .get("pod-template-hash")
                .and_then(|h| o.name.strip_suffix(&format!("-{h}")))
                .unwrap_or(&o.name)
                .to_string(),
            Some(o) => o.name.clone(),
            None => name.clone(),
        };
        PodInfo {
            namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
            name,
            annotations: meta.annotations.clone().unwrap_or_default(),
            ips,
            node: spec.node_name.clone().unwrap_or_default(),
            service_account: spec
                .service_account_name
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".into()),
            host_network: spec.host_network.unwrap_or(false),
            terminal: matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")),
            ready,
            deleting: meta.deletion_timestamp.is_some(),
            container_ports,
            workload_name,
            labels,
        }
    }

    pub fn key(&self) -> Key {
        (self.namespace.clone(), self.name.clone())
    }

    /// Istio's canonical service name.
    pub fn canonical_name(&self) -> String {
        [
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ]
        .iter()
        .find_map(|l| self.labels.get(*l))
        .cloned()
        .unwrap_or_else(|| self.workload_name.clone())
    }

    /// Istio's canonical revision.
    pub fn canonical_revision(&self) -> String {
        [
            CANONICAL_REVISION_LABEL,
            "app.kubernetes.io/version",
            "version",
        ]
        .iter()
        .find_map(|l| self.labels.get(*l))
        .cloned()
        .unwrap_or_else(|| "latest".to_string())
    }
}

/// Locality from a Node's topology labels (`None` when it has none).
pub fn node_locality(node: &Node) -> Option<Locality> {
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
    let l = Locality {
        region: get("topology.kubernetes.io/region"),
        zone: get("topology.kubernetes.io/zone"),
        subzone: get("topology.istio.io/subzone"),
    };
    (l != Locality::default()).then_some(l)
}

/// The workload of a pod (if it is one) and its waypoint binding.
pub(crate) fn pod_workload(index: &Index, pod: &PodInfo) -> (Option<Workload>, Option<Binding>) {
    if pod.terminal || pod.ips.is_empty() {
        return (None, None);
    }
    let ns = &pod.namespace;
    let member = membership(
        &pod.labels,
        &pod.annotations,
        pod.host_network,
        index.namespaces.get(ns),
    );
    let binding = match member {
        Membership::Waypoint => None,
        _ => index.pod_binding(ns, &pod.labels, &pod.service_account),
    };
    let waypoint = binding
        .as_ref()
        .filter(|b| b.bound)
        .map(|b| index.waypoint_address(&b.gateway));
    let mut services = SmallMap::new();
    let mut terminating = false;
    for slice_name in index.pod_slices.get(&pod.key()).into_iter().flatten() {
        let Some(slice) = index.slices.get(&(ns.clone(), slice_name.clone())) else {
            continue;
        };
        terminating |= slice
            .endpoints
            .iter()
            .any(|e| e.pod.as_ref() == Some(&pod.name) && e.serving && e.terminating);
        let Some(svc_name) = &slice.service else {
            continue;
        };
        let Some(svc) = index.k8s_services.get(&(ns.clone(), svc_name.clone())) else {
            continue;
        };
        let key = format!("{ns}/{}", index.hostname(ns, svc_name));
        services.insert(key, svc.target_ports(&pod.container_ports));
    }
    // ServiceEntries selecting the pod (MESH_INTERNAL workloadSelector), as istiod does.
    for sel in index.entry_selectors.get(ns).into_iter().flatten() {
        if selector_matches(&sel.labels, &pod.labels) {
            for (key, ports) in &sel.services {
                if !services.contains_key(key) {
                    services.insert(key.clone(), ports.clone());
                }
            }
        }
    }
    let healthy = pod.ready && !pod.deleting;
    let workload = Workload {
        uid: index.pod_uid(ns, &pod.name),
        name: pod.name.clone(),
        namespace: ns.clone(),
        service_account: pod.service_account.clone(),
        trust_domain: index.cfg.trust_domain.clone(),
        workload_ips: if pod.host_network {
            Vec::new()
        } else {
            pod.ips.clone()
        },
        protocol: member.protocol(),
        node: pod.node.clone(),
        network: String::new(),
        cluster_id: index.cfg.cluster_id.clone(),
        hostname: String::new(),
        workload_name: pod.workload_name.clone(),
        workload_type: "pod".to_string(),
        canonical_name: pod.canonical_name(),
        canonical_revision: pod.canonical_revision(),
        waypoint,
        status: if healthy {
            HealthStatus::Healthy
        } else {
            HealthStatus::Unhealthy
        },
        terminating: terminating && pod.deleting,
        locality: index.nodes.get(&pod.node).cloned().flatten(),
        authorization_policies: index.policies.selected(ns, &pod.labels),
        services,
        labels: pod
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        // Only what the node agent reads rides along (WDS stays small).
        annotations: pod
            .annotations
            .iter()
            .filter(|(k, _)| k.as_str() == common::model::DNS_CAPTURE_ANNOTATION)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        capacity: None,
    };
    (Some(workload), binding)
}

/// Workloads for the endpoints of an EndpointSlice that have no pod behind them.
pub(crate) fn slice_workloads(
    index: &Index,
    key: &Key,
    slice: &SliceInfo,
) -> BTreeMap<String, Workload> {
    let (ns, slice_name) = key;
    let svc = slice.service.as_ref().and_then(|s| {
        index
            .k8s_services
            .get(&(ns.clone(), s.clone()))
            .map(|i| (s, i))
    });
    let mut out = BTreeMap::new();
    for e in slice.endpoints.iter().filter(|e| e.pod.is_none()) {
        for ip in &e.addresses {
            let uid = format!(
                "{}/discovery.k8s.io/EndpointSlice/{ns}/{slice_name}/{ip}",
                index.cfg.cluster_id
            );
            let mut services = SmallMap::new();
            if let Some((svc_name, info)) = svc {
                services.insert(
                    format!("{ns}/{}", index.hostname(ns, svc_name)),
                    info.slice_target_ports(slice),
                );
            }
            let name = svc.map_or(slice_name.as_str(), |(n, _)| n.as_str());
            let w = Workload {
                uid: uid.clone(),
                name: format!("{name}-{ip}"),
                namespace: ns.clone(),
                service_account: "default".to_string(),
                trust_domain: index.cfg.trust_domain.clone(),
                workload_ips: vec![*ip],
                protocol: common::model::Protocol::Tcp,
                node: String::new(),
                network: String::new(),
                cluster_id: index.cfg.cluster_id.clone(),
                hostname: String::new(),
                workload_name: name.to_string(),
                workload_type: "pod".to_string(),
                canonical_name: name.to_string(),
                canonical_revision: "latest".to_string(),
                waypoint: None,
                status: if e.ready {
                    HealthStatus::Healthy
                } else {
                    HealthStatus::Unhealthy
                },
                terminating: e.serving && e.terminating,
                locality: None,
                authorization_policies: Vec::new(),
                services,
                labels: Labels::new(),
                annotations: BTreeMap::new(),
                capacity: None,
            };
            out.insert(uid, w);
        }
    }
    out
}
