//! Waypoint binding. A Service, pod or namespace names its waypoint with the label
//! `istio.io/use-waypoint: <gateway>` (`none` opts out; the object's own label beats its
//! namespace's; `istio.io/use-waypoint-namespace` for a Gateway elsewhere). The Gateway is of
//! class `istio-waypoint` (or another class whose GatewayClass names our controller, see
//! [`crate::gateway_class`]), or our users' early `istio-mesh` form (no listeners, annotation
//! `istio.io/service-account: <sa>`, which also binds every workload of its namespace running
//! as that service account). `istio.io/waypoint-for` (Gateway label, else GatewayClass label,
//! default `service`) says whether services, workloads, both or neither are bound.
//!
//! The address is the waypoint's Service (named after the Gateway, in its namespace):
//! `"/<VIP>"`, which the data plane resolves to one of that Service's pods, with the
//! waypoint's identity (the Gateway's service account) and our waypoint's HBONE port.
//!
//! **Fail closed** (unlike istiod): a binding to a Gateway that does not exist, is not a
//! waypoint, or has no Service or no ready pod is kept. Without a Service the address is the
//! hostname the Service will have, which the data plane cannot resolve, so traffic is refused
//! rather than sent around the waypoint's L7 policy. [`WaypointStatus`] reports each such case.
//! A `waypoint-for` mismatch is a deliberate choice of the waypoint's owner: no binding (as in
//! Istio), reported too. A namespace-level label does not bind workloads to a missing Gateway
//! (the default traffic type is `service`).

use super::objects::Gateway;
use super::{Dep, Index, Key};
use crate::gateway_class::{waypoint_form, Form, WAYPOINT_CLASS};
use common::config::waypoints::{GATEWAY_NAME_LABEL, USE_WAYPOINT_LABEL};
use common::identity::Identity;
use common::model::GatewayAddress;
use std::collections::BTreeMap;

pub const USE_WAYPOINT_NAMESPACE_LABEL: &str = "istio.io/use-waypoint-namespace";
pub const WAYPOINT_FOR_LABEL: &str = "istio.io/waypoint-for";
/// The early `istio-mesh` form: the service account the waypoint serves (and runs as).
pub const SERVICE_ACCOUNT_ANNOTATION: &str = "istio.io/service-account";
/// istiod's override of a waypoint's service account.
pub const GATEWAY_SERVICE_ACCOUNT_ANNOTATION: &str = "gateway.istio.io/service-account";
/// Objects the waypoint controller manages (the waypoint's own Service never takes one).
pub const MANAGED_LABEL: &str = "gateway.istio.io/managed";

/// What the index keeps of a GatewayClass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassInfo {
    pub labels: BTreeMap<String, String>,
    pub controller: String,
}

/// What the index keeps of a Gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayInfo {
    pub class: String,
    /// Ours and in which form, from the class's GatewayClass ([`crate::gateway_class`]);
    /// recomputed when the GatewayClass changes.
    pub form: Option<Form>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

impl GatewayInfo {
    /// `class_controller`: `controllerName` of the Gateway's GatewayClass, if seen.
    pub fn from_gateway(g: &Gateway, class_controller: Option<&str>) -> Self {
        GatewayInfo {
            class: g.spec.gateway_class_name.clone(),
            form: waypoint_form(&g.spec.gateway_class_name, class_controller),
            labels: g.metadata.labels.clone(),
            annotations: g.metadata.annotations.clone(),
        }
    }

    pub fn is_waypoint(&self) -> bool {
        self.form.is_some()
    }

    /// The early form's service account, whose workloads it serves.
    pub fn bound_service_account(&self) -> Option<&str> {
        (self.form == Some(Form::Early))
            .then(|| self.annotations.get(SERVICE_ACCOUNT_ANNOTATION))
            .flatten()
            .map(String::as_str)
    }

    /// The service account the waypoint pods run as.
    pub fn service_account<'a>(&'a self, gateway_name: &'a str) -> &'a str {
        self.bound_service_account()
            .or_else(|| {
                self.annotations
                    .get(GATEWAY_SERVICE_ACCOUNT_ANNOTATION)
                    .map(String::as_str)
            })
            .unwrap_or(gateway_name)
    }
}

/// `istio.io/waypoint-for`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrafficType {
    Service,
    Workload,
    All,
    None,
}

impl TrafficType {
    fn parse(v: &str) -> TrafficType {
        match v {
            "workload" => TrafficType::Workload,
            "all" => TrafficType::All,
            "none" => TrafficType::None,
            _ => TrafficType::Service,
        }
    }
    fn services(self) -> bool {
        matches!(self, TrafficType::Service | TrafficType::All)
    }
    fn workloads(self) -> bool {
        matches!(self, TrafficType::Workload | TrafficType::All)
    }
    fn as_str(self) -> &'static str {
        match self {
            TrafficType::Service => "service",
            TrafficType::Workload => "workload",
            TrafficType::All => "all",
            TrafficType::None => "none",
        }
    }
}

/// How an object came to name a waypoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    OwnLabel,
    Namespace,
    ServiceAccount,
}

/// The waypoint an object names, and whether it is bound to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub gateway: Key,
    pub bound: bool,
    pub via: Via,
}

enum Request {
    OptOut,
    Nothing,
    Use(Key, Via),
}

fn request(
    own: &BTreeMap<String, String>,
    namespace: &str,
    ns_labels: Option<&BTreeMap<String, String>>,
) -> Request {
    let pick = |labels: &BTreeMap<String, String>, via| {
        let gw = labels.get(USE_WAYPOINT_LABEL)?;
        if gw == "none" {
            return Some(Request::OptOut);
        }
        let ns = labels
            .get(USE_WAYPOINT_NAMESPACE_LABEL)
            .map_or(namespace, String::as_str);
        Some(Request::Use((ns.to_string(), gw.clone()), via))
    };
    pick(own, Via::OwnLabel)
        .or_else(|| ns_labels.and_then(|l| pick(l, Via::Namespace)))
        .unwrap_or(Request::Nothing)
}

impl Index {
    fn traffic_type(&self, gw: &GatewayInfo) -> TrafficType {
        gw.labels
            .get(WAYPOINT_FOR_LABEL)
            .or_else(|| {
                self.gateway_classes
                    .get(&gw.class)
                    .and_then(|c| c.labels.get(WAYPOINT_FOR_LABEL))
            })
            .map_or(TrafficType::Service, |v| TrafficType::parse(v))
    }

    fn waypoint(&self, gw: &Key) -> Option<&GatewayInfo> {
        self.gateways.get(gw).filter(|g| g.is_waypoint())
    }

    /// The waypoint binding of a pod (not called for waypoint pods).
    pub(crate) fn pod_binding(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        service_account: &str,
    ) -> Option<Binding> {
        let ns_labels = self.namespaces.get(namespace);
        let decide = |gateway: Key, via: Via| {
            let bound = match self.waypoint(&gateway) {
                Some(g) => self.traffic_type(g).workloads(),
                // Fail closed when the pod itself asked for it.
                None => via == Via::OwnLabel,
            };
            Binding {
                gateway,
                bound,
                via,
            }
        };
        let namespace_request = match request(labels, namespace, None) {
            Request::OptOut => return None,
            Request::Use(gw, via) => return Some(decide(gw, via)),
            Request::Nothing => request(&BTreeMap::new(), namespace, ns_labels),
        };
        let by_sa = self
            .gateways
            .iter()
            .filter(|((ns, _), g)| {
                ns == namespace && g.bound_service_account() == Some(service_account)
            })
            .map(|(k, _)| k.clone())
            .min();
        if let Some(gateway) = by_sa {
            return Some(Binding {
                gateway,
                bound: true,
                via: Via::ServiceAccount,
            });
        }
        match namespace_request {
            Request::Use(gw, via) => Some(decide(gw, via)),
            _ => None,
        }
    }

    /// The waypoint binding of a Service.
    pub(crate) fn service_binding(
        &self,
        key: &Key,
        labels: &BTreeMap<String, String>,
    ) -> Option<Binding> {
        // A waypoint's own Service (named by labels, not by name: the early form's Gateway is
        // often named like the application Service it serves).
        let own_waypoint_service =
            labels.contains_key(MANAGED_LABEL) || labels.contains_key(GATEWAY_NAME_LABEL);
        if own_waypoint_service {
            return None;
        }
        match request(labels, &key.0, self.namespaces.get(&key.0)) {
            Request::Use(gateway, via) => {
                let bound = match self.waypoint(&gateway) {
                    Some(g) => self.traffic_type(g).services(),
                    None => true,
                };
                Some(Binding {
                    gateway,
                    bound,
                    via,
                })
            }
            _ => None,
        }
    }

    /// The address of waypoint `gw`: its Service's VIP, else the hostname that Service will
    /// have (unresolvable by the data plane: traffic is refused until it exists).
    pub(crate) fn waypoint_address(&self, gw: &Key) -> GatewayAddress {
        let destination = self
            .waypoint_service(gw)
            .and_then(|s| s.vips.first())
            .map(|ip| format!("/{ip}"))
            .unwrap_or_else(|| self.hostname(&gw.0, &gw.1));
        let sa = self
            .gateways
            .get(gw)
            .map_or(gw.1.as_str(), |g| g.service_account(&gw.1));
        GatewayAddress {
            destination,
            hbone_mtls_port: self.cfg.waypoint_port,
            identity: Some(Identity::new(&self.cfg.trust_domain, &gw.0, sa)),
        }
    }

    /// The waypoint's Service: one labelled `gateway.networking.k8s.io/gateway-name: <gw>` in
    /// its namespace (as the waypoint controller creates it), else, for an `istio-waypoint`
    /// Gateway, the Service of the same name.
    pub(crate) fn waypoint_service(&self, gw: &Key) -> Option<&super::services::SvcInfo> {
        let labelled = self
            .waypoint_services
            .get(gw)
            .and_then(|names| names.iter().next())
            .and_then(|n| self.k8s_services.get(&(gw.0.clone(), n.clone())));
        labelled.or_else(|| {
            self.gateways
                .get(gw)
                .filter(|g| g.form == Some(Form::Canonical))
                .and_then(|_| self.k8s_services.get(gw))
        })
    }

    fn ready_waypoint_pods(&self, gw: &Key) -> usize {
        self.pods_by_ns.get(&gw.0).map_or(0, |names| {
            names
                .iter()
                .filter_map(|n| self.pods.get(&(gw.0.clone(), n.clone())))
                .filter(|p| p.labels.get(GATEWAY_NAME_LABEL) == Some(&gw.1))
                .filter(|p| p.ready && !p.deleting && !p.terminal && !p.ips.is_empty())
                .count()
        })
    }

    /// Problems with waypoint bindings, for Service/Gateway status and Events.
    pub fn waypoint_status(&self) -> Vec<WaypointStatus> {
        let mut out = Vec::new();
        for (dep, b) in &self.bindings {
            let (object, what) = match dep {
                Dep::Pod((ns, n)) => (format!("Pod {ns}/{n}"), "workload"),
                Dep::Service((ns, n)) => (format!("Service {ns}/{n}"), "service"),
                Dep::ServiceEntry((ns, n)) => (format!("ServiceEntry {ns}/{n}"), "service"),
            };
            let gw = format!("{}/{}", b.gateway.0, b.gateway.1);
            let message = match (self.waypoint(&b.gateway), b.bound) {
                (Some(g), false) => format!(
                    "Gateway {gw} is a waypoint for {} traffic ({WAYPOINT_FOR_LABEL}), not {what} traffic: not bound",
                    self.traffic_type(g).as_str()
                ),
                (None, false) => continue,
                (None, true) => format!(
                    "no waypoint Gateway {gw} (class {WAYPOINT_CLASS}): bound anyway, traffic is refused until it exists"
                ),
                (Some(_), true) if self.waypoint_service(&b.gateway).is_none() => format!(
                    "waypoint {gw} has no Service yet: traffic is refused until it exists"
                ),
                (Some(_), true) if self.ready_waypoint_pods(&b.gateway) == 0 => {
                    format!("waypoint {gw} has no ready pod: traffic is refused until one is ready")
                }
                (Some(_), true) => continue,
            };
            out.push(WaypointStatus {
                object,
                waypoint: gw,
                bound: b.bound,
                message,
            });
        }
        out.sort_by(|a, b| a.object.cmp(&b.object));
        out
    }
}

/// A waypoint binding that needs attention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaypointStatus {
    /// `Service <ns>/<name>`, `ServiceEntry <ns>/<name>` or `Pod <ns>/<name>`.
    pub object: String,
    /// `<ns>/<gateway>`.
    pub waypoint: String,
    /// Whether the object is bound (fail closed) despite the problem.
    pub bound: bool,
    pub message: String,
}
