//! Routing decisions: the VirtualService route a request matched (or Istio's default route to
//! the service itself), the destination it chose (weights → DestinationRule subset), and the
//! endpoint for each attempt (load-balancing policy, minus outlier-ejected endpoints).

use crate::app::State;
use crate::upstream::Target;
use common::l7::destination_rule::EffectivePolicy;
use common::l7::route::{Destination, WeightedDestination};
use common::l7::select::{self, Candidate, PickInput, Picker};
use common::l7::LbPolicy;
use common::model::{Protocol, Service, Workload};
use common::snapshot::{Endpoint, Snapshot};
use http::StatusCode;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A reply the waypoint makes itself, with Envoy's response flag.
#[derive(Debug, Clone)]
pub struct LocalReply {
    pub status: StatusCode,
    pub flag: &'static str,
    pub body: String,
}

impl LocalReply {
    pub fn new(status: StatusCode, flag: &'static str, body: impl Into<String>) -> Self {
        LocalReply {
            status,
            flag,
            body: body.into(),
        }
    }
}

/// The destination chosen for a request: a service port, optionally a subset, with its
/// endpoints and the DestinationRule policy in force.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub service: Arc<Service>,
    /// Envoy-style name: `outbound|<port>|<subset>|<host>`.
    pub name: String,
    pub endpoints: Vec<Endpoint>,
    pub policy: EffectivePolicy,
    /// The service port.
    pub port: u16,
    /// The subset's labels, when a subset was chosen.
    pub subset_labels: Option<BTreeMap<String, String>>,
}

/// The endpoint picked for one attempt.
#[derive(Debug, Clone)]
pub struct Pick {
    pub target: Target,
    pub endpoint: Arc<Workload>,
}

/// The service a destination host names (FQDN or short name in `namespace`).
fn service_for_host<'s>(
    snap: &'s Snapshot,
    host: &str,
    namespace: &str,
) -> Option<&'s Arc<Service>> {
    let fqdn = common::l7::resolve_host(host, namespace, common::l7::DEFAULT_DOMAIN_SUFFIX);
    snap.services
        .iter()
        .find(|s| s.hostname.eq_ignore_ascii_case(&fqdn) || s.hostname.eq_ignore_ascii_case(host))
}

/// For traffic addressed to a workload that names this waypoint itself (not through a service
/// VIP): a stand-in service for that workload, so the pipeline serves it like any other (no
/// VirtualService applies to a bare address; policies, metrics and logs do). Its hostname is
/// the workload's IP and it has no VIP.
pub fn workload_service(snap: &Snapshot, target: SocketAddr) -> Option<Arc<Service>> {
    let w = snap.workload_by_ip(target.ip())?;
    w.waypoint.as_ref()?;
    Some(Arc::new(Service {
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        hostname: target.ip().to_string(),
        vips: Vec::new(),
        ports: [(target.port(), target.port())].into(),
        subject_alt_names: Vec::new(),
        app_protocols: Default::default(),
        labels: Default::default(),
        waypoint: w.waypoint.clone(),
        load_balancer: None,
        ip_families: None,
        service_entry: None,
    }))
}

/// The one endpoint of a [`workload_service`] stand-in.
fn workload_endpoint(snap: &Snapshot, svc: &Service, port: u16) -> Option<Endpoint> {
    if !svc.vips.is_empty() {
        return None;
    }
    let ip: std::net::IpAddr = svc.hostname.parse().ok()?;
    Some(Endpoint {
        workload: snap.workload_by_ip(ip)?.clone(),
        target_port: port,
    })
}

/// Resolves a route destination (or the service itself) to a cluster, with the
/// DestinationRule exported to the waypoint's namespace `viewer`.
pub fn cluster_for(
    snap: &Snapshot,
    viewer: &str,
    dest: Option<&Destination>,
    service: &Arc<Service>,
    port: u16,
) -> Result<Cluster, LocalReply> {
    let (svc, subset, port) = match dest {
        None => (service.clone(), None, port),
        Some(d) => {
            let svc = service_for_host(snap, &d.host, &service.namespace)
                .cloned()
                .ok_or_else(|| {
                    LocalReply::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "NC",
                        format!("no cluster for destination host {}", d.host),
                    )
                })?;
            // A destination without a port keeps the request's port when the service has it,
            // else uses the service's only port.
            let p = d.port.unwrap_or_else(|| {
                if svc.ports.contains_key(&port) || svc.ports.len() != 1 {
                    port
                } else {
                    svc.ports.keys().next().copied().unwrap_or(port)
                }
            });
            (svc, d.subset.clone(), p)
        }
    };
    let name = format!(
        "outbound|{port}|{}|{}",
        subset.as_deref().unwrap_or(""),
        svc.hostname
    );
    let dr = snap.l7.destination_rule(&svc.hostname, viewer);
    let labels = match (&subset, dr) {
        (None, _) => None,
        (Some(s), Some(dr)) => {
            Some(dr.subset(s).map(|sub| sub.labels.clone()).ok_or_else(|| {
                LocalReply::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "NC",
                    format!("subset {s} of {} is not defined", svc.hostname),
                )
            })?)
        }
        (Some(s), None) => {
            return Err(LocalReply::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "NC",
                format!("no DestinationRule defines subset {s} of {}", svc.hostname),
            ))
        }
    };
    let workload_target = workload_endpoint(snap, &svc, port);
    let all = match &workload_target {
        Some(ep) => std::slice::from_ref(ep),
        None => snap.endpoints(&svc, port),
    };
    let endpoints: Vec<Endpoint> = select::subset_endpoints(all, labels.as_ref())
        .into_iter()
        .cloned()
        .collect();
    let policy = snap
        .l7
        .effective_policy(&svc.hostname, viewer, subset.as_deref(), port);
    Ok(Cluster {
        service: svc,
        name,
        endpoints,
        policy,
        port,
        subset_labels: labels,
    })
}

/// A DNS-resolution ServiceEntry has no endpoints in the registry: they are the addresses its
/// names resolve to (a fresh cached answer, else a lookup; refreshed in the background, see
/// [`common::dns_cache`]), as endpoints outside the mesh carrying the entry endpoint's labels
/// (so subsets select among them). Other clusters are returned as they are.
pub async fn with_dns_endpoints(
    state: &State,
    mut cluster: Cluster,
) -> Result<Cluster, LocalReply> {
    let dns_resolved = cluster
        .service
        .service_entry
        .as_ref()
        .is_some_and(|i| !i.dns.is_empty());
    if !dns_resolved || !cluster.endpoints.is_empty() {
        return Ok(cluster);
    }
    let svc = cluster.service.clone();
    let resolved = common::dns_cache::entry_addresses(&state.dns, &svc, cluster.port)
        .await
        .map_err(|e| {
            LocalReply::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "UH",
                format!("no healthy upstream for {}: {e}", cluster.name),
            )
        })?;
    let endpoints: Vec<Endpoint> = resolved
        .iter()
        .map(|r| {
            let mut w = Workload::outside_mesh(
                format!("dns/{}/{}", svc.hostname, r.addr.ip()),
                &r.target.hostname,
                &svc.namespace,
                Some(r.addr.ip()),
                "dns",
            );
            w.labels = r
                .target
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            Endpoint {
                workload: Arc::new(w),
                target_port: r.addr.port(),
            }
        })
        .collect();
    cluster.endpoints = select::subset_endpoints(&endpoints, cluster.subset_labels.as_ref())
        .into_iter()
        .cloned()
        .collect();
    Ok(cluster)
}

/// Picks a weighted destination of a route.
pub fn pick_destination(dests: &[WeightedDestination]) -> Option<&WeightedDestination> {
    select::pick_weighted(dests, crate::rand::u64())
}

/// Per-cluster load-balancer state and per-endpoint in-flight request counts.
/// A cluster's picker, remembered with the policy it was made for.
type ClusterPicker = (LbPolicy, Arc<dyn Picker>);

#[derive(Default)]
pub struct Balancers {
    pickers: Mutex<HashMap<String, ClusterPicker>>,
    active: Mutex<HashMap<SocketAddr, Arc<AtomicU32>>>,
}

/// Counts a request in flight to an endpoint for as long as it lives (least request).
pub struct InFlight(Arc<AtomicU32>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Balancers {
    fn picker(&self, cluster: &str, policy: &LbPolicy) -> Option<Arc<dyn Picker>> {
        let mut p = self.pickers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((pol, picker)) = p.get(cluster) {
            if pol == policy {
                return Some(picker.clone());
            }
        }
        let picker: Arc<dyn Picker> = Arc::from(select::picker_for(policy)?);
        p.insert(cluster.to_string(), (policy.clone(), picker.clone()));
        Some(picker)
    }

    fn counter(&self, addr: SocketAddr) -> Arc<AtomicU32> {
        self.active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(addr)
            .or_default()
            .clone()
    }

    /// Forgets in-flight counters of endpoints with nothing in flight (a counter is made again
    /// on the next request), so departed endpoints do not stay in the map.
    pub fn prune(&self) -> usize {
        let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        let before = active.len();
        active.retain(|_, c| Arc::strong_count(c) > 1 || c.load(Ordering::Relaxed) > 0);
        before - active.len()
    }

    pub fn in_flight(&self, addr: SocketAddr) -> InFlight {
        let c = self.counter(addr);
        c.fetch_add(1, Ordering::Relaxed);
        InFlight(c)
    }
}

fn endpoint_addr(e: &Endpoint) -> Option<SocketAddr> {
    e.workload
        .workload_ips
        .first()
        .map(|ip| SocketAddr::new(*ip, e.target_port))
}

/// Picks the endpoint for one attempt: healthy (not ejected) endpoints, preferring ones not in
/// `tried` (Istio retries prefer other hosts), by the cluster's load-balancing policy.
/// `original` is the address the client asked for: `PASSTHROUGH` forwards there when it is an
/// endpoint; a service VIP is not one, and then the pick is random, as kube-proxy's would be
/// for a connection to the VIP.
pub fn pick_endpoint(
    state: &State,
    cluster: &Cluster,
    hash: Option<u64>,
    tried: &[SocketAddr],
    original: SocketAddr,
) -> Result<Pick, LocalReply> {
    let mut all: Vec<(SocketAddr, &Endpoint)> = cluster
        .endpoints
        .iter()
        .filter_map(|e| endpoint_addr(e).map(|a| (a, e)))
        .collect();
    if all.is_empty() {
        return Err(LocalReply::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "UH",
            format!("no healthy upstream for {}", cluster.name),
        ));
    }
    if let Some(outlier) = &cluster.policy.outlier_detection {
        let addrs: Vec<SocketAddr> = all.iter().map(|(a, _)| *a).collect();
        let ejected = state
            .outliers
            .ejected(&cluster.name, &addrs, outlier, Instant::now());
        if ejected.len() < all.len() {
            all.retain(|(a, _)| !ejected.contains(a));
        }
    }
    let fresh: Vec<(SocketAddr, &Endpoint)> = all
        .iter()
        .filter(|(a, _)| !tried.contains(a))
        .cloned()
        .collect();
    let pool = if fresh.is_empty() { all } else { fresh };
    let Some(picker) = state
        .balancers
        .picker(&cluster.name, &cluster.policy.load_balancer)
    else {
        // PASSTHROUGH: the original destination if it is an endpoint, else as kube-proxy.
        let random = || pool.get((crate::rand::u64() % pool.len() as u64) as usize);
        let (addr, ep) = pool
            .iter()
            .find(|(a, _)| a.ip() == original.ip())
            .or_else(random)
            .cloned()
            .ok_or_else(|| LocalReply::new(StatusCode::SERVICE_UNAVAILABLE, "UH", "no endpoint"))?;
        return Ok(pick(addr, ep, cluster));
    };
    let keys: Vec<String> = pool.iter().map(|(a, _)| a.to_string()).collect();
    let counts: Vec<u32> = pool
        .iter()
        .map(|(a, _)| state.balancers.counter(*a).load(Ordering::Relaxed))
        .collect();
    let candidates: Vec<Candidate> = keys
        .iter()
        .zip(&counts)
        .zip(&pool)
        .map(|((k, c), (_, ep))| Candidate {
            key: k,
            active_requests: *c,
            weight: ep.workload.weight(),
        })
        .collect();
    let i = picker
        .pick(
            &candidates,
            &PickInput {
                random: crate::rand::u64(),
                hash,
            },
        )
        .unwrap_or(0);
    let (addr, ep) = pool[i.min(pool.len() - 1)];
    Ok(pick(addr, ep, cluster))
}

fn pick(addr: SocketAddr, ep: &Endpoint, cluster: &Cluster) -> Pick {
    Pick {
        target: Target {
            addr,
            identity: ep.workload.identity(),
            tunnel: ep.workload.protocol == Protocol::Hbone,
            service: cluster.service.hostname.clone(),
        },
        endpoint: ep.workload.clone(),
    }
}

/// The routes per service with a waypoint as a waypoint in namespace `viewer` uses them, for
/// `/config_dump`.
pub fn dump(snap: &Snapshot, viewer: &str) -> serde_json::Value {
    let services: Vec<serde_json::Value> = snap
        .services
        .iter()
        .filter(|s| s.waypoint.is_some())
        .map(|s| match snap.l7.routes.mesh(&s.hostname, viewer) {
            Some(table) => serde_json::json!({
                "service": s.hostname,
                "virtualService": table.virtual_service,
                "routes": &table.http,
                "tcpRoutes": &table.tcp,
            }),
            None => serde_json::json!({
                "service": s.hostname,
                "routes": [{"name": "default", "action": "forward to the service (DestinationRule load balancing)"}],
            }),
        })
        .collect();
    serde_json::Value::Array(services)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In-flight counters exist while a request is in flight and are forgotten afterwards.
    #[test]
    fn balancers_prune_forgets_endpoints_with_nothing_in_flight() {
        let b = Balancers::default();
        let (x, y): (SocketAddr, SocketAddr) = (
            "10.0.0.1:80".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
        );
        let held = b.in_flight(x);
        drop(b.in_flight(y));
        assert_eq!(b.prune(), 1);
        assert_eq!(b.counter(x).load(Ordering::Relaxed), 1);
        drop(held);
        assert_eq!(b.prune(), 1);
        assert!(b.active.lock().unwrap().is_empty());
    }
}
