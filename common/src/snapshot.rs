//! The immutable configuration snapshot both proxies read on every connection: the workloads,
//! services and policies of one loaded configuration plus the lookup indices built once when it
//! is assembled (workload by IP, service by VIP or key, endpoints per service port). It also
//! owns the lookups derived from Istio semantics: PeerAuthentication precedence (`mtls_mode`),
//! Sidecar selection (`sidecar_for`) and REGISTRY_ONLY egress checks (`egress_allowed`).
//! The compiled L7 configuration (routes, DestinationRules, ServiceEntries, L7 policies) rides
//! along in `l7`, with the L7 resources the loader rejected in `rejected`.
//! `config` builds snapshots; `config::watch` swaps them atomically.

use crate::model::{
    Authorization, HealthStatus, Labels, MtlsMode, OutboundTrafficMode, PeerAuthentication,
    Service, SidecarScope, Workload,
};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

/// The default Istio root namespace.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// One endpoint of a service port: the workload and the port to connect to on it.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    pub workload: Arc<Workload>,
    pub target_port: u16,
}

/// The destination of an outbound connection, for [`Snapshot::egress_allowed`].
#[derive(Debug, Clone, Copy)]
pub enum EgressTarget<'a> {
    Service(&'a Service),
    Workload(&'a Workload),
    Unknown,
}

#[derive(Debug, Clone, Default)]
struct Index {
    workload_by_ip: HashMap<IpAddr, Arc<Workload>>,
    service_by_vip: HashMap<IpAddr, Arc<Service>>,
    service_by_key: HashMap<String, Arc<Service>>,
    authorization_by_key: HashMap<String, Arc<Authorization>>,
    /// service key → service port → endpoints.
    endpoints: HashMap<String, BTreeMap<u16, Vec<Endpoint>>>,
    /// ServiceEntry CIDR addresses, longest prefix first.
    service_by_cidr: Vec<(ipnet::IpNet, Arc<Service>)>,
    /// Lower-case hostname → the VIPs of the services with that hostname.
    addresses_by_host: HashMap<String, Vec<IpAddr>>,
    /// Lower-case hostname → the services with that hostname (headless ones included).
    services_by_host: HashMap<String, Vec<Arc<Service>>>,
}

/// A complete, immutable configuration. Mutating the public fields leaves the indices stale:
/// call [`Snapshot::reindex`] afterwards.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    pub workloads: Vec<Arc<Workload>>,
    pub services: Vec<Arc<Service>>,
    pub authorizations: Vec<Arc<Authorization>>,
    pub peer_authentications: Vec<PeerAuthentication>,
    pub sidecars: Vec<SidecarScope>,
    pub root_namespace: String,
    pub trust_domain: String,
    /// Mesh-wide default, used when no Sidecar applies.
    pub outbound_traffic_policy: OutboundTrafficMode,
    /// Resources kept for `/config_dump` but not consumed by any data plane (Gateways,
    /// Kubernetes Deployments, Services…).
    pub other_resources: Vec<serde_json::Value>,
    /// The compiled VirtualServices, DestinationRules, ServiceEntries and L7 policies.
    pub l7: Arc<crate::l7::L7Config>,
    /// Resources rejected alone, with the reason; the rest of their file applied. A rejected
    /// security resource is replaced by a fail-closed stand-in (`config::reject`).
    pub rejected: Vec<crate::config::ConfigError>,
    #[serde(skip)]
    index: Index,
}

impl Default for Snapshot {
    fn default() -> Self {
        Snapshot {
            workloads: Vec::new(),
            services: Vec::new(),
            authorizations: Vec::new(),
            peer_authentications: Vec::new(),
            sidecars: Vec::new(),
            root_namespace: DEFAULT_ROOT_NAMESPACE.to_string(),
            trust_domain: crate::identity::DEFAULT_TRUST_DOMAIN.to_string(),
            outbound_traffic_policy: OutboundTrafficMode::AllowAny,
            other_resources: Vec::new(),
            l7: Arc::default(),
            rejected: Vec::new(),
            index: Index::default(),
        }
    }
}

/// Parses Istio's `"<network>/<IP>"` address form (the network may be empty) or a plain IP.
pub fn parse_network_address(s: &str) -> Result<(&str, IpAddr), String> {
    let (network, ip) = match s.parse::<IpAddr>() {
        Ok(ip) => return Ok(("", ip)),
        Err(_) => s.split_once('/').unwrap_or(("", s)),
    };
    ip.parse::<IpAddr>()
        .map(|ip| (network, ip.to_canonical()))
        .map_err(|_| format!("{s:?} is not \"<network>/<IP>\" or an IP address"))
}

/// Whether every selector label is present with the same value in `labels`.
pub fn selector_matches(selector: &BTreeMap<String, String>, labels: &impl LabelLookup) -> bool {
    selector.iter().all(|(k, v)| labels.label(k) == Some(v))
}

/// A label set, however it is stored.
pub trait LabelLookup {
    fn label(&self, key: &str) -> Option<&String>;
}

impl LabelLookup for Labels {
    fn label(&self, key: &str) -> Option<&String> {
        self.get(key)
    }
}

impl LabelLookup for BTreeMap<String, String> {
    fn label(&self, key: &str) -> Option<&String> {
        self.get(key)
    }
}

impl Snapshot {
    /// (Re)builds the lookup indices from the public fields. Duplicates (rejected by the
    /// loader) resolve to the first occurrence.
    pub fn reindex(&mut self) {
        let mut index = Index::default();
        for w in &self.workloads {
            for ip in &w.workload_ips {
                index
                    .workload_by_ip
                    .entry(ip.to_canonical())
                    .or_insert_with(|| w.clone());
            }
        }
        for s in &self.services {
            index
                .service_by_key
                .entry(s.key())
                .or_insert_with(|| s.clone());
            index
                .services_by_host
                .entry(s.hostname.to_ascii_lowercase())
                .or_default()
                .push(s.clone());
            for vip in &s.vips {
                if let Ok((_, ip)) = parse_network_address(vip) {
                    index.service_by_vip.entry(ip).or_insert_with(|| s.clone());
                    let addrs = index
                        .addresses_by_host
                        .entry(s.hostname.to_ascii_lowercase())
                        .or_default();
                    if !addrs.contains(&ip) {
                        addrs.push(ip);
                    }
                }
            }
            if let Some(info) = &s.service_entry {
                for net in &info.cidrs {
                    index.service_by_cidr.push((*net, s.clone()));
                }
            }
        }
        // Stable: equal prefixes keep configuration order.
        index
            .service_by_cidr
            .sort_by_key(|(net, _)| std::cmp::Reverse(net.prefix_len()));
        for a in &self.authorizations {
            let key = format!("{}/{}", a.namespace, a.name);
            index
                .authorization_by_key
                .entry(key)
                .or_insert_with(|| a.clone());
        }
        for (key, svc) in &index.service_by_key {
            let mut per_port = BTreeMap::new();
            for (&port, &svc_target) in &svc.ports {
                let eps: Vec<Endpoint> = self
                    .workloads
                    .iter()
                    .filter(|w| w.status == HealthStatus::Healthy)
                    .filter_map(|w| {
                        let ports = w.services.get(key)?;
                        let target_port = match ports.get(&port) {
                            Some(&p) if p != 0 => p,
                            _ if svc_target != 0 => svc_target,
                            _ => port,
                        };
                        Some(Endpoint {
                            workload: w.clone(),
                            target_port,
                        })
                    })
                    .collect();
                per_port.insert(port, eps);
            }
            index.endpoints.insert(key.clone(), per_port);
        }
        self.index = index;
    }

    /// Builder-style [`Snapshot::reindex`].
    pub fn indexed(mut self) -> Self {
        self.reindex();
        self
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.index.workload_by_ip.get(&ip.to_canonical())
    }

    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.index.service_by_vip.get(&ip.to_canonical())
    }

    /// Addresses named as some service's or workload's waypoint (a waypoint pod's IP, or the
    /// VIP of a waypoint's Service), with the identity they resolved to, if any.
    pub fn waypoint_addresses(&self) -> HashMap<IpAddr, Option<&crate::identity::Identity>> {
        self.services
            .iter()
            .filter_map(|s| s.waypoint.as_ref())
            .chain(self.workloads.iter().filter_map(|w| w.waypoint.as_ref()))
            .filter_map(|g| {
                parse_network_address(&g.destination)
                    .ok()
                    .map(|(_, ip)| (ip.to_canonical(), g.identity.as_ref()))
            })
            .collect()
    }

    /// Whether `w` is a waypoint in `addresses` ([`Snapshot::waypoint_addresses`]): one of its
    /// IPs is named as a waypoint, or it is an endpoint of a Service whose VIP is (a scaled
    /// waypoint). Such pods speak HBONE themselves: never captured, and their `forwarded`
    /// header is trusted when their identity is the waypoint's.
    pub fn is_waypoint(
        &self,
        w: &Workload,
        addresses: &HashMap<IpAddr, Option<&crate::identity::Identity>>,
    ) -> bool {
        let id = w.identity();
        let matches = |ip: &IpAddr| {
            addresses
                .get(&ip.to_canonical())
                .is_some_and(|named| named.is_none_or(|n| *n == id))
        };
        w.workload_ips.iter().any(matches)
            || w.services.keys().any(|key| {
                self.service_by_key(key).is_some_and(|s| {
                    s.vips
                        .iter()
                        .filter_map(|v| parse_network_address(v).ok())
                        .any(|(_, ip)| matches(&ip))
                })
            })
    }

    /// The ServiceEntry service whose CIDR `addresses` contain `ip` (longest prefix).
    pub fn service_by_cidr(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        let ip = ip.to_canonical();
        self.index
            .service_by_cidr
            .iter()
            .find(|(net, _)| net.contains(&ip))
            .map(|(_, s)| s)
    }

    /// The addresses a name resolves to inside the mesh: the VIPs (explicit, or the automatic
    /// ones of [`crate::vip`] for ServiceEntry hosts) of every service with that hostname
    /// (ASCII case-insensitive), in configuration order. For a DNS proxy.
    pub fn addresses_for_host(&self, host: &str) -> &[IpAddr] {
        self.index
            .addresses_by_host
            .get(&host.to_ascii_lowercase())
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Every service with hostname `host` (ASCII case-insensitive; a wildcard ServiceEntry
    /// host is matched literally, `*.example.com`), in configuration order, headless ones
    /// included. For a DNS proxy.
    pub fn services_for_host(&self, host: &str) -> &[Arc<Service>] {
        self.index
            .services_by_host
            .get(&host.to_ascii_lowercase())
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// `key` is `<namespace>/<hostname>`.
    pub fn service_by_key(&self, key: &str) -> Option<&Arc<Service>> {
        self.index.service_by_key.get(key)
    }

    /// `key` is `<namespace>/<name>`.
    pub fn authorization_by_key(&self, key: &str) -> Option<&Arc<Authorization>> {
        self.index.authorization_by_key.get(key)
    }

    /// Healthy endpoints of `svc` on service port `port`, in configuration order. A port the
    /// service does not declare has none.
    pub fn endpoints(&self, svc: &Service, port: u16) -> &[Endpoint] {
        self.index
            .endpoints
            .get(&svc.key())
            .and_then(|ports| ports.get(&port))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Workloads scheduled on `node`.
    pub fn local_workloads<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Arc<Workload>> {
        self.workloads.iter().filter(move |w| w.node == node)
    }

    /// The effective PeerAuthentication mode for `w` on `port`, with Istio's precedence:
    /// workload-selector policy (port-level first) > namespace policy > mesh policy (root
    /// namespace) > PERMISSIVE. `UNSET` inherits from the next level.
    pub fn mtls_mode(&self, w: &Workload, port: u16) -> MtlsMode {
        let workload_level = self.peer_authentications.iter().find(|pa| {
            pa.namespace == w.namespace
                && !pa.selector.is_empty()
                && selector_matches(&pa.selector, &w.labels)
        });
        if let Some(pa) = workload_level {
            if let Some(mode) = pa.port_level.get(&port).copied().or(pa.mode) {
                return mode;
            }
        }
        let level = |ns: &str| {
            self.peer_authentications
                .iter()
                .find(|pa| pa.namespace == ns && pa.selector.is_empty())
                .and_then(|pa| pa.mode)
        };
        level(&w.namespace)
            .or_else(|| level(&self.root_namespace))
            .unwrap_or(MtlsMode::Permissive)
    }

    /// The Sidecar that applies to `w`: a selector-matching one in its namespace, else its
    /// namespace's selector-less one, else the root namespace's selector-less one.
    pub fn sidecar_for(&self, w: &Workload) -> Option<&SidecarScope> {
        let in_ns = |ns: &str| {
            self.sidecars
                .iter()
                .find(|s| s.namespace == ns && s.selector.is_empty())
        };
        self.sidecars
            .iter()
            .find(|s| {
                s.namespace == w.namespace
                    && !s.selector.is_empty()
                    && selector_matches(&s.selector, &w.labels)
            })
            .or_else(|| in_ns(&w.namespace))
            .or_else(|| in_ns(&self.root_namespace))
    }

    /// Whether `src` may open an outbound connection to `dst` on `port` under its
    /// outboundTrafficPolicy (the applicable Sidecar's, else the mesh default).
    pub fn egress_allowed(&self, src: &Workload, dst: EgressTarget<'_>, port: u16) -> bool {
        self.egress_decision(src, dst, port).is_ok()
    }

    /// Like [`Snapshot::egress_allowed`]; a refusal names the policy that refused
    /// (`Sidecar <ns>/<name> (REGISTRY_ONLY)` or `mesh outboundTrafficPolicy REGISTRY_ONLY`).
    ///
    /// Under REGISTRY_ONLY the registry is the services (Kubernetes and ServiceEntry, as far as
    /// `exportTo` makes them visible to `src`'s namespace) and the known workloads, narrowed by
    /// the Sidecar's `egress[].hosts` (and `port`) when it lists any. A workload reached by its
    /// own address matches a host pattern by its name or by any service it is an endpoint of.
    pub fn egress_decision(
        &self,
        src: &Workload,
        dst: EgressTarget<'_>,
        port: u16,
    ) -> Result<(), String> {
        let sidecar = self.sidecar_for(src);
        let mode = sidecar.map_or(self.outbound_traffic_policy, |s| s.outbound_traffic_policy);
        if mode == OutboundTrafficMode::AllowAny {
            return Ok(());
        }
        let policy = || match sidecar {
            Some(s) => format!("Sidecar {}/{} (REGISTRY_ONLY)", s.namespace, s.name),
            None => "mesh outboundTrafficPolicy REGISTRY_ONLY".to_string(),
        };
        let candidates: Vec<(&str, &str)> = match dst {
            EgressTarget::Unknown => return Err(policy()),
            EgressTarget::Service(s) => {
                if !crate::service_entries::visible_from(s, &src.namespace) {
                    return Err(policy());
                }
                vec![(s.namespace.as_str(), s.hostname.as_str())]
            }
            EgressTarget::Workload(w) => std::iter::once((w.namespace.as_str(), w.name.as_str()))
                .chain(w.services.keys().filter_map(|k| {
                    let svc = self.service_by_key(k)?;
                    crate::service_entries::visible_from(svc, &src.namespace)
                        .then_some((svc.namespace.as_str(), svc.hostname.as_str()))
                }))
                .collect(),
        };
        let Some(sidecar) = sidecar else {
            return Ok(());
        };
        if sidecar.egress.is_empty() {
            return Ok(());
        }
        let listed = sidecar.egress.iter().any(|l| {
            l.port.is_none_or(|p| p == port)
                && l.hosts.iter().any(|h| {
                    candidates
                        .iter()
                        .any(|(ns, host)| host_pattern_matches(h, &sidecar.namespace, ns, host))
                })
        });
        if listed {
            Ok(())
        } else {
            Err(policy())
        }
    }
}

/// Matches a Sidecar egress host pattern `<ns>/<host>` against a destination. Namespace part:
/// `*` any, `.` the Sidecar's own namespace, `~` none, else exact. Host part: `*` any,
/// `*.suffix`, else exact (ASCII case-insensitive).
pub fn host_pattern_matches(pattern: &str, sidecar_ns: &str, ns: &str, host: &str) -> bool {
    let Some((pns, phost)) = pattern.split_once('/') else {
        return false;
    };
    let ns_ok = match pns {
        "*" => true,
        "~" => false,
        "." => ns == sidecar_ns,
        other => ns == other,
    };
    if !ns_ok {
        return false;
    }
    if phost == "*" {
        return true;
    }
    match phost.strip_prefix('*') {
        Some(suffix) => {
            host.len() > suffix.len()
                && host
                    .get(host.len() - suffix.len()..)
                    .is_some_and(|t| t.eq_ignore_ascii_case(suffix))
        }
        None => phost.eq_ignore_ascii_case(host),
    }
}

#[cfg(test)]
#[path = "snapshot_tests.rs"]
mod tests;
