//! Services and EndpointSlices. A Service becomes a `common::model::Service` keyed
//! `<ns>/<name>.<ns>.svc.<domain>`: VIPs from `clusterIPs` (none when headless), ports →
//! numeric target ports (0 when the targetPort is named: it is resolved per pod from the
//! pod's container ports, so each workload's `services` map carries the number), the
//! application protocol from `appProtocol` or the port name, its labels and its waypoint.
//! EndpointSlices (label `kubernetes.io/service-name`) say which pods are endpoints of which
//! Service; their endpoints without a Pod behind them (selector-less Services, e.g. a
//! mirrored `Endpoints` object) become workloads of their own (see [`super::workloads`]).

use super::waypoints::Binding;
use super::{Index, Key};
use common::model::Service;
use k8s_openapi::api::core::v1::Service as K8sService;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::BTreeMap;
use std::net::IpAddr;

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A Service's target port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Number(u16),
    Named(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvcPort {
    pub name: String,
    pub port: u16,
    pub target: Target,
    pub app_protocol: Option<String>,
}

/// What the index keeps of a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvcInfo {
    pub labels: BTreeMap<String, String>,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<SvcPort>,
}

fn port_u16(p: i32) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| *p != 0)
}

impl SvcInfo {
    pub fn from_service(svc: &K8sService) -> Self {
        let spec = svc.spec.clone().unwrap_or_default();
        let mut ips: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
        if ips.is_empty() {
            ips.extend(spec.cluster_ip.clone());
        }
        let vips = ips.iter().filter_map(|ip| ip.parse().ok()).collect();
        let ports = spec
            .ports
            .unwrap_or_default()
            .into_iter()
            .filter_map(|p| {
                let port = port_u16(p.port)?;
                let target = match p.target_port {
                    None => Target::Number(port),
                    Some(IntOrString::Int(n)) => Target::Number(port_u16(n).unwrap_or(port)),
                    Some(IntOrString::String(s)) => match s.parse::<u16>() {
                        Ok(n) if n != 0 => Target::Number(n),
                        _ => Target::Named(s),
                    },
                };
                Some(SvcPort {
                    name: p.name.unwrap_or_default(),
                    port,
                    target,
                    app_protocol: p.app_protocol,
                })
            })
            .collect();
        SvcInfo {
            labels: svc.metadata.labels.clone().unwrap_or_default(),
            vips,
            ports,
        }
    }

    /// Service port → target port for one pod (named target ports resolved from the pod's
    /// container ports; a name the pod does not declare drops the port, as in Istio).
    pub fn target_ports(&self, container_ports: &BTreeMap<String, u16>) -> BTreeMap<u16, u16> {
        self.ports
            .iter()
            .filter_map(|p| match &p.target {
                Target::Number(n) => Some((p.port, *n)),
                Target::Named(name) => container_ports.get(name).map(|n| (p.port, *n)),
            })
            .collect()
    }

    /// Service port → target port for a selector-less endpoint: the EndpointSlice's port of
    /// the same name, else the numeric target port.
    pub fn slice_target_ports(&self, slice: &SliceInfo) -> BTreeMap<u16, u16> {
        self.ports
            .iter()
            .filter_map(|p| {
                let by_name = slice
                    .ports
                    .iter()
                    .find(|(name, _)| *name == p.name)
                    .map(|(_, n)| *n);
                match (&p.target, by_name) {
                    (_, Some(n)) => Some((p.port, n)),
                    (Target::Number(n), None) => Some((p.port, *n)),
                    (Target::Named(_), None) => None,
                }
            })
            .collect()
    }
}

/// One endpoint of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointInfo {
    pub addresses: Vec<IpAddr>,
    /// The pod behind it (same namespace), if any.
    pub pod: Option<String>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

/// What the index keeps of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceInfo {
    /// The Service it belongs to (`kubernetes.io/service-name`).
    pub service: Option<String>,
    /// (port name, port number).
    pub ports: Vec<(String, u16)>,
    pub endpoints: Vec<EndpointInfo>,
}

impl SliceInfo {
    pub fn from_slice(slice: &EndpointSlice) -> Self {
        let service = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .cloned();
        let ports = slice
            .ports
            .iter()
            .flatten()
            .filter_map(|p| Some((p.name.clone().unwrap_or_default(), port_u16(p.port?)?)))
            .collect();
        let endpoints = slice
            .endpoints
            .iter()
            .map(|e| {
                let c = e.conditions.clone().unwrap_or_default();
                // Kubernetes: an unknown `ready` means ready; `serving` defaults to `ready`.
                let ready = c.ready.unwrap_or(true);
                EndpointInfo {
                    addresses: e.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
                    pod: e
                        .target_ref
                        .as_ref()
                        .filter(|t| t.kind.as_deref() == Some("Pod"))
                        .and_then(|t| t.name.clone()),
                    ready,
                    serving: c.serving.unwrap_or(ready),
                    terminating: c.terminating.unwrap_or(false),
                }
            })
            .collect();
        SliceInfo {
            service,
            ports,
            endpoints,
        }
    }

    /// Names of the pods it lists.
    pub fn pods(&self) -> impl Iterator<Item = String> + '_ {
        self.endpoints.iter().filter_map(|e| e.pod.clone())
    }
}

/// The model Service for `key`, and its waypoint binding.
pub(crate) fn service(
    index: &Index,
    key: &Key,
    svc: &SvcInfo,
) -> (Option<Service>, Option<Binding>) {
    let binding = index.service_binding(key, &svc.labels);
    let waypoint = binding
        .as_ref()
        .filter(|b| b.bound)
        .map(|b| index.waypoint_address(&b.gateway));
    let ports = svc
        .ports
        .iter()
        .map(|p| {
            let target = match p.target {
                Target::Number(n) => n,
                Target::Named(_) => 0,
            };
            (p.port, target)
        })
        .collect();
    let app_protocols = svc
        .ports
        .iter()
        .filter_map(|p| {
            let proto = p
                .app_protocol
                .clone()
                .or_else(|| (!p.name.is_empty()).then(|| p.name.clone()))?;
            Some((p.port, proto))
        })
        .collect();
    let service = Service {
        name: key.1.clone(),
        namespace: key.0.clone(),
        hostname: index.hostname(&key.0, &key.1),
        vips: svc.vips.iter().map(|ip| format!("/{ip}")).collect(),
        ports,
        subject_alt_names: Vec::new(),
        app_protocols,
        labels: svc.labels.clone(),
        waypoint,
        load_balancer: None,
        ip_families: None,
        service_entry: None,
    };
    (Some(service), binding)
}
