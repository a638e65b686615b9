//! `ServiceEntry` → registry: every host of a validated entry becomes a [`Service`] (hostname =
//! the host, in the entry's namespace), so ztunnel's filter chain, REGISTRY_ONLY checks,
//! metrics and access logs treat it like a Kubernetes service.
//!
//! - addresses: IPs become VIPs; CIDRs are kept in [`EntryInfo::cidrs`] (matched by
//!   [`crate::snapshot::Snapshot::service_by_cidr`]); a host without addresses and with a
//!   resolution other than NONE gets the automatic VIP of [`crate::vip`];
//! - STATIC endpoints become endpoint workloads (plain TCP, not on any node) of the service,
//!   or add the service to the mesh workload that already owns the address (then traffic goes
//!   over HBONE); `workloadSelector` adds the service to the selected workloads of the entry's
//!   namespace;
//! - DNS / DNS_ROUND_ROBIN keep the names to resolve in [`EntryInfo::dns`] (the endpoints'
//!   addresses, else the host itself); the proxy resolves them;
//! - NONE: connections keep their original destination; the service only names it.
//!
//! An entry that would redefine an existing service (same `<namespace>/<host>`) or claim a VIP
//! another service holds is rejected alone. An endpoint's `weight` becomes its workload's
//! `capacity` (endpoints are picked in proportion); its `network` and `locality`
//! (`region/zone/subzone`) are carried on its workload (and to an Istio ztunnel) but no
//! balancer prefers by locality yet.

use crate::l7::service_entry::{Location, Resolution, ServiceEntry, ServicePort};
use crate::model::{Service, Workload};
use crate::snapshot::{parse_network_address, selector_matches};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

/// How a ServiceEntry-derived service is reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EntryInfo {
    /// `<namespace>/<name>` of the ServiceEntry.
    pub entry: String,
    pub location: Location,
    pub resolution: Resolution,
    /// CIDR `addresses` (single IPs are the service's VIPs).
    pub cidrs: Vec<ipnet::IpNet>,
    /// DNS / DNS_ROUND_ROBIN: the names to resolve, in order.
    pub dns: Vec<DnsTarget>,
    /// `exportTo` as written (empty: everywhere).
    pub export_to: Vec<String>,
    /// The VIP was allocated automatically ([`crate::vip`]).
    pub auto_vip: bool,
}

/// One name a DNS-resolved entry connects to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DnsTarget {
    pub hostname: String,
    /// Service port → port to connect to on the resolved addresses.
    pub ports: BTreeMap<u16, u16>,
    /// The endpoint's labels (DestinationRule subsets select by them).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl DnsTarget {
    /// The port to connect to for service port `port`.
    pub fn target_port(&self, port: u16) -> u16 {
        self.ports.get(&port).copied().unwrap_or(port)
    }
}

/// Whether `svc` is visible to workloads of namespace `ns` (`exportTo` of a ServiceEntry;
/// Kubernetes services are visible everywhere).
pub fn visible_from(svc: &Service, ns: &str) -> bool {
    let Some(info) = &svc.service_entry else {
        return true;
    };
    info.export_to.is_empty()
        || info
            .export_to
            .iter()
            .any(|e| e == "*" || (e == "." && ns == svc.namespace) || e == ns)
}

/// A ServiceEntry left out, with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// `ServiceEntry`, or `Service` for a headless Service with `Endpoints`.
    pub kind: &'static str,
    pub name: String,
    pub namespace: String,
    pub document: usize,
    pub field: String,
    pub message: String,
}

/// The `(namespace, host)` pairs that get an automatic VIP: hosts without addresses, not
/// wildcards, with a resolution other than NONE (Istio's rule).
pub fn auto_vip_hosts(entries: &[Arc<ServiceEntry>]) -> Vec<(&str, &str)> {
    entries
        .iter()
        .filter(|se| se.spec.addresses.is_empty() && se.spec.resolution != Resolution::None)
        .flat_map(|se| {
            se.spec
                .hosts
                .iter()
                .filter(|h| !h.starts_with('*'))
                .map(|h| (se.namespace.as_str(), h.as_str()))
        })
        .collect()
}

fn endpoint_port(p: &ServicePort, named: &BTreeMap<String, u16>) -> u16 {
    p.name
        .as_deref()
        .and_then(|n| named.get(n))
        .copied()
        .or(p.target_port)
        .unwrap_or(p.number)
}

/// What one entry adds, before it is committed.
struct Planned {
    services: Vec<Service>,
    /// (address, service key, service port → endpoint port, entry endpoint index)
    endpoints: Vec<(IpAddr, String, BTreeMap<u16, u16>, usize)>,
    /// (workload index, service key, ports) from `workloadSelector`.
    selected: Vec<(usize, String, BTreeMap<u16, u16>)>,
}

fn plan(
    se: &ServiceEntry,
    headless: bool,
    auto: &BTreeMap<(String, String), std::net::Ipv4Addr>,
    workloads: &[Arc<Workload>],
    keys: &HashSet<String>,
    vips: &HashMap<IpAddr, String>,
) -> Result<Planned, (String, String)> {
    let spec = &se.spec;
    let mut vip_list = Vec::new();
    let mut cidrs = Vec::new();
    for (i, a) in spec.addresses.iter().enumerate() {
        match a.parse::<IpAddr>() {
            Ok(ip) => {
                if let Some(owner) = vips.get(&ip.to_canonical()) {
                    return Err((
                        format!("spec.addresses[{i}]"),
                        format!("{ip} is already the VIP of service {owner}"),
                    ));
                }
                vip_list.push(ip.to_canonical());
            }
            Err(_) => match a.parse::<ipnet::IpNet>() {
                Ok(net) => cidrs.push(net.trunc()),
                Err(_) => {
                    return Err((
                        format!("spec.addresses[{i}]"),
                        format!("{a:?} is not an IP address or CIDR block"),
                    ))
                }
            },
        }
    }
    let ports: BTreeMap<u16, u16> = spec
        .ports
        .iter()
        .map(|p| (p.number, p.target_port.unwrap_or(0)))
        .collect();
    let app_protocols: BTreeMap<u16, String> = spec
        .ports
        .iter()
        .filter_map(|p| {
            p.protocol
                .as_deref()
                .or(p.name.as_deref())
                .map(|proto| (p.number, proto.to_ascii_lowercase()))
        })
        .collect();
    let dns_resolved = matches!(spec.resolution, Resolution::Dns | Resolution::DnsRoundRobin);
    // DNS with endpoints: the endpoints' names, shared by every host of the entry.
    let endpoint_names: Vec<DnsTarget> = spec
        .endpoints
        .iter()
        .filter(|_| dns_resolved)
        .filter_map(|ep| {
            Some(DnsTarget {
                hostname: ep.address.clone()?,
                ports: spec
                    .ports
                    .iter()
                    .map(|p| (p.number, endpoint_port(p, &ep.ports)))
                    .collect(),
                labels: ep.labels.clone(),
            })
        })
        .collect();
    let mut out = Planned {
        services: Vec::new(),
        endpoints: Vec::new(),
        selected: Vec::new(),
    };
    for (i, host) in spec.hosts.iter().enumerate() {
        let key = format!("{}/{host}", se.namespace);
        if keys.contains(&key) {
            return Err((
                format!("spec.hosts[{i}]"),
                format!("service {key} is already defined"),
            ));
        }
        let auto_vip = auto
            .get(&(se.namespace.clone(), host.to_ascii_lowercase()))
            .filter(|_| !headless);
        let mut host_vips: Vec<String> = vip_list.iter().map(|ip| format!("/{ip}")).collect();
        if let Some(ip) = auto_vip.filter(|_| vip_list.is_empty() && cidrs.is_empty()) {
            if let Some(owner) = vips.get(&IpAddr::V4(*ip)) {
                return Err((
                    format!("spec.hosts[{i}]"),
                    format!("its automatic VIP {ip} is already the VIP of service {owner}"),
                ));
            }
            host_vips.push(format!("/{ip}"));
        }
        // DNS without endpoints: each host resolves itself.
        let dns = if !dns_resolved {
            Vec::new()
        } else if spec.endpoints.is_empty() {
            vec![DnsTarget {
                hostname: host.clone(),
                ports: spec
                    .ports
                    .iter()
                    .map(|p| (p.number, endpoint_port(p, &BTreeMap::new())))
                    .collect(),
                labels: BTreeMap::new(),
            }]
        } else {
            endpoint_names.clone()
        };
        let info = EntryInfo {
            entry: format!("{}/{}", se.namespace, se.name),
            location: spec.location,
            resolution: spec.resolution,
            cidrs: cidrs.clone(),
            dns,
            export_to: spec.export_to.clone(),
            auto_vip: auto_vip.is_some() && vip_list.is_empty() && cidrs.is_empty(),
        };
        out.services.push(Service {
            name: se.name.clone(),
            namespace: se.namespace.clone(),
            hostname: host.clone(),
            vips: host_vips,
            ports: ports.clone(),
            subject_alt_names: spec.subject_alt_names.clone(),
            app_protocols: app_protocols.clone(),
            labels: se.labels.clone(),
            waypoint: None,
            load_balancer: None,
            ip_families: None,
            service_entry: (!headless).then(|| Arc::new(info)),
        });
        if spec.resolution == Resolution::Static {
            for (e, ep) in spec.endpoints.iter().enumerate() {
                let Some(Ok(ip)) = ep.address.as_deref().map(str::parse::<IpAddr>) else {
                    continue; // unix:// endpoints: nothing to connect to from a node.
                };
                let eports = spec
                    .ports
                    .iter()
                    .map(|p| (p.number, endpoint_port(p, &ep.ports)))
                    .collect();
                out.endpoints
                    .push((ip.to_canonical(), key.clone(), eports, e));
            }
        }
        if let Some(sel) = &spec.workload_selector {
            for (w, wl) in workloads.iter().enumerate() {
                if wl.namespace == se.namespace && selector_matches(&sel.labels, &wl.labels) {
                    let wports = spec
                        .ports
                        .iter()
                        .map(|p| (p.number, p.target_port.unwrap_or(p.number)))
                        .collect();
                    out.selected.push((w, key.clone(), wports));
                }
            }
        }
    }
    Ok(out)
}

/// Adds the services of `entries` to `services` and their endpoints to `workloads`; returns
/// the entries left out. `headless` are headless Kubernetes services with `Endpoints`, in the
/// form of STATIC entries: they register the same way but get no automatic VIP and behave as
/// Kubernetes services. Endpoint workloads it creates get `trust_domain`.
pub fn register(
    entries: &[Arc<ServiceEntry>],
    headless: &[Arc<ServiceEntry>],
    workloads: &mut Vec<Arc<Workload>>,
    services: &mut Vec<Arc<Service>>,
    trust_domain: &str,
) -> Vec<Rejection> {
    let auto = crate::vip::allocate(auto_vip_hosts(entries));
    let mut keys: HashSet<String> = services.iter().map(|s| s.key()).collect();
    let mut vips: HashMap<IpAddr, String> = HashMap::new();
    for s in services.iter() {
        for v in &s.vips {
            if let Ok((_, ip)) = parse_network_address(v) {
                vips.entry(ip).or_insert_with(|| s.key());
            }
        }
    }
    let mut by_ip: HashMap<IpAddr, usize> = HashMap::new();
    for (i, w) in workloads.iter().enumerate() {
        for ip in &w.workload_ips {
            by_ip.entry(ip.to_canonical()).or_insert(i);
        }
    }
    let mut rejected = Vec::new();
    let all = entries
        .iter()
        .map(|e| (e, false))
        .chain(headless.iter().map(|e| (e, true)));
    for (se, is_headless) in all {
        let kind = if is_headless {
            "Service"
        } else {
            "ServiceEntry"
        };
        let planned = match plan(se, is_headless, &auto, workloads, &keys, &vips) {
            Ok(p) => p,
            Err((field, message)) => {
                rejected.push(Rejection {
                    kind,
                    name: se.name.clone(),
                    namespace: se.namespace.clone(),
                    document: se.document,
                    field,
                    message,
                });
                continue;
            }
        };
        for s in planned.services {
            keys.insert(s.key());
            for v in &s.vips {
                if let Ok((_, ip)) = parse_network_address(v) {
                    vips.entry(ip).or_insert_with(|| s.key());
                }
            }
            services.push(Arc::new(s));
        }
        for (w, key, ports) in planned.selected {
            if let Some(wl) = workloads.get_mut(w) {
                Arc::make_mut(wl).services.insert(key, ports);
            }
        }
        for (ip, key, ports, e) in planned.endpoints {
            let i = match by_ip.get(&ip) {
                Some(&i) => i,
                None => {
                    let ep = &se.spec.endpoints[e];
                    let mut w = Workload::outside_mesh(
                        format!("{kind}/{}/{}/{ip}", se.namespace, se.name),
                        &se.name,
                        &se.namespace,
                        Some(ip),
                        &kind.to_ascii_lowercase(),
                    );
                    if let Some(sa) = &ep.service_account {
                        w.service_account = sa.clone();
                    }
                    w.trust_domain = trust_domain.to_string();
                    w.network = ep.network.clone().unwrap_or_default();
                    w.labels = ep
                        .labels
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    w.capacity = ep.weight;
                    w.locality = ep.locality.as_deref().map(crate::model::Locality::parse);
                    workloads.push(Arc::new(w));
                    by_ip.insert(ip, workloads.len() - 1);
                    workloads.len() - 1
                }
            };
            if let Some(wl) = workloads.get_mut(i) {
                Arc::make_mut(wl).services.insert(key, ports);
            }
        }
    }
    rejected
}

#[cfg(test)]
#[path = "service_entries_tests.rs"]
mod tests;
