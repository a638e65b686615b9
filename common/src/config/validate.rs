//! Cross-document checks and resolution that turn everything collected from a file into a
//! [`Snapshot`]: unique workload IPs, uids, service keys and VIPs, well-formed VIPs, unique
//! policy names, waypoint addresses resolved to the waypoint's identity, and the mesh defaults
//! (root namespace → policy scope, trust domain, outbound traffic policy) applied; then the L7
//! resources are compiled (per-resource rejection, see [`crate::l7`]).

use super::{Collected, ConfigError, Origin};
use crate::identity::Identity;
use crate::model::{GatewayAddress, PolicyScope, Service, Workload};
use crate::snapshot::{parse_network_address, Snapshot};
use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

fn err(source: &str, origin: &Origin, field: &str, message: String) -> ConfigError {
    let field = origin.field(field);
    ConfigError {
        file: source.to_string(),
        document: Some(origin.doc),
        resource: Some(origin.resource.clone()),
        field: (!field.is_empty()).then_some(field),
        message,
    }
}

pub(super) fn finish(c: Collected, source: &str) -> Result<Snapshot, ConfigError> {
    let mesh = c.mesh.map(|(m, _)| m).unwrap_or_default();
    let mut workloads = c.workloads;
    for (w, _, explicit_td) in &mut workloads {
        if !*explicit_td && w.trust_domain != mesh.trust_domain {
            Arc::make_mut(w).trust_domain = mesh.trust_domain.clone();
        }
    }

    // Workloads: unique IPs and uids.
    let mut by_ip: HashMap<IpAddr, usize> = HashMap::new();
    let mut by_uid: HashMap<&str, usize> = HashMap::new();
    for (i, (w, origin, _)) in workloads.iter().enumerate() {
        for (j, ip) in w.workload_ips.iter().enumerate() {
            if let Some(&first) = by_ip.get(&ip.to_canonical()) {
                let (fw, fo, _) = &workloads[first];
                let msg = format!(
                    "{ip} is already used by workload {}/{} (document {})",
                    fw.namespace, fw.name, fo.doc
                );
                return Err(err(source, origin, &format!("workloadIps[{j}]"), msg));
            }
            by_ip.insert(ip.to_canonical(), i);
        }
        if !w.uid.is_empty() {
            if let Some(&first) = by_uid.get(w.uid.as_str()) {
                let (fw, fo, _) = &workloads[first];
                let msg = format!(
                    "uid {:?} is already used by workload {}/{} (document {})",
                    w.uid, fw.namespace, fw.name, fo.doc
                );
                return Err(err(source, origin, "uid", msg));
            }
            by_uid.insert(&w.uid, i);
        }
    }

    // Services: unique keys, well-formed and unique VIPs.
    let services = c.services;
    let mut by_key: HashMap<String, usize> = HashMap::new();
    let mut by_vip: HashMap<IpAddr, usize> = HashMap::new();
    for (i, (s, origin)) in services.iter().enumerate() {
        if let Some(&first) = by_key.get(&s.key()) {
            let msg = format!(
                "service {} is already defined (document {})",
                s.key(),
                services[first].1.doc
            );
            return Err(err(source, origin, "hostname", msg));
        }
        by_key.insert(s.key(), i);
        for (j, vip) in s.vips.iter().enumerate() {
            let field = format!("vips[{j}]");
            let (_, ip) = parse_network_address(vip).map_err(|m| err(source, origin, &field, m))?;
            if let Some(&first) = by_vip.get(&ip) {
                let (fs, fo) = &services[first];
                let msg = format!(
                    "VIP {ip} is already claimed by service {} (document {})",
                    fs.key(),
                    fo.doc
                );
                return Err(err(source, origin, &field, msg));
            }
            by_vip.insert(ip, i);
        }
    }

    // Waypoints: resolve each destination to the waypoint's identity. A waypoint Service
    // with no endpoint (scaled to zero, no pod ready yet) is a state, not an error: the
    // binding is kept without an identity and ztunnel refuses the traffic (fail closed).
    // From the control plane, any unresolvable waypoint is kept that way too: refusing the
    // whole resource would drop the bound service from the registry, and traffic to it
    // would pass through around the waypoint.
    let from_xds = source == super::assemble::XDS_SOURCE;
    let identities = WaypointIdentities {
        workloads: &workloads,
        services: &services,
        by_ip: &by_ip,
        by_vip: &by_vip,
        known: RefCell::new(HashMap::new()),
    };
    let resolve = |gw: &mut GatewayAddress, origin: &Origin| -> Result<(), ConfigError> {
        let fail = |m: String| {
            let e = err(
                source,
                origin,
                "waypoint.destination",
                format!("{:?}: {m}", gw.destination),
            );
            if from_xds {
                tracing::warn!(error = %e, "waypoint unresolved: traffic for it is refused until it resolves");
                Ok(None)
            } else {
                Err(e)
            }
        };
        let identity = match parse_network_address(&gw.destination) {
            Err(m) if from_xds => fail(m)?,
            Err(m) => return Err(err(source, origin, "waypoint.destination", m)),
            Ok((_, ip)) => match identities.of(ip) {
                Ok(id) => id,
                Err(m) => fail(m)?,
            },
        };
        gw.identity = identity;
        Ok(())
    };
    // Only a workload whose waypoint identity changes is copied; the rest are shared.
    let mut resolved_workloads = Vec::with_capacity(workloads.len());
    for (w, origin, _) in &workloads {
        let mut w = Arc::clone(w);
        if let Some(gw) = &w.waypoint {
            let mut resolved = gw.clone();
            resolve(&mut resolved, origin)?;
            if resolved != *gw {
                Arc::make_mut(&mut w).waypoint = Some(resolved);
            }
        }
        resolved_workloads.push(w);
    }
    let gateways = super::waypoints::waypoint_gateways(&c.other_resources);
    let namespace_waypoints = super::waypoints::namespace_waypoints(&c.other_resources);
    let plain_workloads: Vec<&crate::model::Workload> =
        workloads.iter().map(|(w, _, _)| &**w).collect();
    let mut rejected = c.rejected;
    // A service's (or its namespace's) `use-waypoint` label. The binding is rejected, not the
    // file; the service fails closed (its traffic must not skip the waypoint, where its
    // policies may live).
    let bind = |s: &mut Service,
                origin: &Origin,
                rejected: &mut Vec<ConfigError>|
     -> Result<(), ConfigError> {
        match super::waypoints::bind(s, &gateways, &namespace_waypoints, &plain_workloads) {
            Ok(()) => {
                if let Some(gw) = s.waypoint.as_mut() {
                    resolve(gw, origin)?;
                }
            }
            Err(m) => {
                s.waypoint = Some(super::waypoints::unresolved());
                rejected.push(err(
                    source,
                    origin,
                    "labels",
                    format!(
                        "{m}; fail-closed: connections to the service are refused until its waypoint exists"
                    ),
                ));
            }
        }
        Ok(())
    };
    let mut resolved_services = Vec::with_capacity(services.len());
    for (s, origin) in &services {
        let mut s = Service::clone(s);
        bind(&mut s, origin, &mut rejected)?;
        resolved_services.push(Arc::new(s));
    }

    // Policies: unique names; Istio-form scope from the root namespace.
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut authorizations = Vec::with_capacity(c.policies.len());
    for (mut p, origin, from_istio) in c.policies {
        let key = format!("{}/{}", p.namespace, p.name);
        if let Some(first) = seen.insert(key.clone(), origin.doc) {
            return Err(err(
                source,
                &origin,
                "",
                format!("authorization policy {key} is already defined (document {first})"),
            ));
        }
        if from_istio {
            p.scope = if !p.selector.is_empty() {
                PolicyScope::WorkloadSelector
            } else if p.namespace == mesh.root_namespace {
                PolicyScope::Global
            } else {
                PolicyScope::Namespace
            };
        }
        authorizations.push(Arc::new(p));
    }

    let sidecars = c
        .sidecars
        .into_iter()
        .map(|(mut s, explicit)| {
            if !explicit {
                s.outbound_traffic_policy = mesh.outbound_traffic_policy.mode;
            }
            s
        })
        .collect();

    // ServiceEntries join the registry as services (and endpoint workloads).
    let mut l7 = super::l7::finish(c.l7, &mut rejected, source);
    let (mut resolved_workloads, mut resolved_services) = (resolved_workloads, resolved_services);
    let headless =
        super::kube::headless_entries(&c.headless, &c.endpoints, crate::l7::DEFAULT_DOMAIN_SUFFIX);
    let registered_from = resolved_services.len();
    let entry_rejections = crate::service_entries::register(
        &l7.service_entries,
        &headless,
        &mut resolved_workloads,
        &mut resolved_services,
        &mesh.trust_domain,
    );
    // Their hosts bind to waypoints like Kubernetes services (the entry's own label, else its
    // namespace's), so an egress waypoint sees their traffic.
    // From the control plane, the controller's decision (an annotation) replaces the labels.
    for s in &mut resolved_services[registered_from..] {
        let entry = entry_of(&l7.service_entries, &headless, s);
        let kind = if s.service_entry.is_some() {
            "ServiceEntry"
        } else {
            "Service"
        };
        let origin = Origin {
            doc: entry.map_or(0, |e| e.document),
            resource: format!("{kind} {}/{}", s.namespace, s.name),
            field: String::new(),
        };
        let s = Arc::make_mut(s);
        if !from_xds {
            bind(s, &origin, &mut rejected)?;
            continue;
        }
        let bound = entry.and_then(|e| {
            e.annotations
                .get(super::waypoints::BOUND_WAYPOINT_ANNOTATION)
        });
        if let Some(text) = bound {
            let mut gw = serde_json::from_str::<GatewayAddress>(text)
                .unwrap_or_else(|_| super::waypoints::unresolved());
            resolve(&mut gw, &origin)?;
            s.waypoint = Some(gw);
        }
    }
    // Checked once ServiceEntries are registered: a pod an entry selects lists its host.
    if !from_xds {
        let defined: std::collections::HashSet<String> =
            resolved_services.iter().map(|s| s.key()).collect();
        for (w, origin, _) in &workloads {
            for (key, _) in w.services.iter() {
                if !defined.contains(key) {
                    tracing::warn!(file = source, document = origin.doc, workload = %origin.resource,
                        "workload lists service {key:?}, which is not defined");
                }
            }
        }
    }
    if !entry_rejections.is_empty() {
        l7.service_entries.retain(|se| {
            !entry_rejections.iter().any(|r| {
                r.kind == "ServiceEntry" && r.namespace == se.namespace && r.name == se.name
            })
        });
    }
    for r in entry_rejections {
        let e = ConfigError {
            file: source.to_string(),
            document: Some(r.document).filter(|d| *d != 0),
            resource: Some(format!("{} {}/{}", r.kind, r.namespace, r.name)),
            field: Some(r.field),
            message: r.message,
        };
        tracing::warn!("rejected, the rest of the configuration applies: {e}");
        rejected.push(e);
    }

    let mut snapshot = Snapshot::default();
    snapshot.workloads = resolved_workloads;
    snapshot.services = resolved_services;
    snapshot.authorizations = authorizations;
    snapshot.peer_authentications = c.peer_authentications;
    snapshot.sidecars = sidecars;
    snapshot.root_namespace = mesh.root_namespace;
    snapshot.trust_domain = mesh.trust_domain;
    snapshot.outbound_traffic_policy = mesh.outbound_traffic_policy.mode;
    snapshot.other_resources = c.other_resources;
    snapshot.l7 = Arc::new(l7);
    snapshot.rejected = rejected;
    Ok(snapshot.indexed())
}

/// The entry (or headless Service) that registered `s`.
fn entry_of<'e>(
    entries: &'e [Arc<crate::l7::service_entry::ServiceEntry>],
    headless: &'e [Arc<crate::l7::service_entry::ServiceEntry>],
    s: &Service,
) -> Option<&'e Arc<crate::l7::service_entry::ServiceEntry>> {
    let list = if s.service_entry.is_some() {
        entries
    } else {
        headless
    };
    list.iter()
        .find(|e| e.namespace == s.namespace && e.name == s.name)
}

/// The identity behind a waypoint address: the workload with that IP, or the single identity
/// shared by the endpoints of the service with that VIP (`None` while it has none). Answers
/// are remembered: thousands of workloads name the same few waypoints, and a VIP's answer
/// takes a pass over every workload.
struct WaypointIdentities<'a> {
    workloads: &'a [(Arc<Workload>, Origin, bool)],
    services: &'a [(Arc<Service>, Origin)],
    by_ip: &'a HashMap<IpAddr, usize>,
    by_vip: &'a HashMap<IpAddr, usize>,
    known: RefCell<HashMap<IpAddr, Result<Option<Identity>, String>>>,
}

impl WaypointIdentities<'_> {
    fn of(&self, ip: IpAddr) -> Result<Option<Identity>, String> {
        if let Some(known) = self.known.borrow().get(&ip) {
            return known.clone();
        }
        let answer = self.compute(ip);
        self.known.borrow_mut().insert(ip, answer.clone());
        answer
    }

    fn compute(&self, ip: IpAddr) -> Result<Option<Identity>, String> {
        if let Some(&i) = self.by_ip.get(&ip) {
            return Ok(Some(self.workloads[i].0.identity()));
        }
        let Some(&s) = self.by_vip.get(&ip) else {
            return Err("names no known workload IP (or service VIP)".to_string());
        };
        let key = self.services[s].0.key();
        let ids: BTreeSet<Identity> = self
            .workloads
            .iter()
            .filter(|(w, _, _)| w.services.contains_key(&key))
            .map(|(w, _, _)| w.identity())
            .collect();
        let mut iter = ids.into_iter();
        match (iter.next(), iter.next()) {
            (Some(id), None) => Ok(Some(id)),
            (None, _) => Ok(None),
            (Some(a), Some(b)) => Err(format!(
                "is the VIP of service {key}, whose endpoints have different identities ({a}, {b}, …)"
            )),
        }
    }
}
