//! Outbound filter-chain selection: from (source IP, destination IP, destination port) and the
//! config snapshot, decide where a captured connection goes. Pure logic, no I/O.

use common::hbone::HBONE_PORT;
use common::identity::Identity;
use common::l7::select;
use common::l7::service_entry::Resolution;
use common::model::{Protocol, Service, Workload};
use common::service_entries::visible_from;
use common::snapshot::{EgressTarget, Snapshot};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// Where a captured outbound connection goes.
#[derive(Debug, Clone)]
pub enum Chain {
    /// The destination (or its service) has a waypoint: tunnel to the waypoint with the
    /// original destination as authority.
    Waypoint {
        waypoint: SocketAddr,
        identity: Identity,
        authority: SocketAddr,
        service: Option<Arc<Service>>,
        workload: Option<Arc<Workload>>,
    },
    /// A mesh workload on another node: tunnel to its node's ztunnel (`<pod IP>:15008`).
    Hbone {
        workload: Arc<Workload>,
        target: SocketAddr,
        service: Option<Arc<Service>>,
    },
    /// A mesh workload on this node: delivered in-process (inbound policy still applies).
    Local {
        workload: Arc<Workload>,
        target: SocketAddr,
        service: Option<Arc<Service>>,
    },
    /// A known workload outside the mesh (protocol TCP): plain TCP to it.
    Tcp {
        workload: Arc<Workload>,
        target: SocketAddr,
        service: Option<Arc<Service>>,
    },
    /// A DNS-resolved ServiceEntry: the proxy resolves `targets` (in order, the first that
    /// answers) and connects with plain TCP to `<address>:<target port>`.
    Dns { service: Arc<Service>, port: u16 },
    /// Plain TCP to the original destination: not in the registry, or a ServiceEntry with
    /// resolution NONE (then `service` names it).
    Passthrough {
        target: SocketAddr,
        service: Option<Arc<Service>>,
    },
}

impl Chain {
    /// The filter-chain name used in logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Chain::Waypoint { .. } => "outbound_waypoint",
            Chain::Hbone { .. } => "outbound_hbone",
            Chain::Local { .. } => "outbound_local",
            Chain::Tcp { .. } => "outbound_tcp",
            Chain::Dns { .. } => "outbound_dns",
            Chain::Passthrough { .. } => "passthrough",
        }
    }

    pub fn service(&self) -> Option<&Arc<Service>> {
        match self {
            Chain::Waypoint { service, .. }
            | Chain::Hbone { service, .. }
            | Chain::Local { service, .. }
            | Chain::Tcp { service, .. }
            | Chain::Passthrough { service, .. } => service.as_ref(),
            Chain::Dns { service, .. } => Some(service),
        }
    }

    pub fn workload(&self) -> Option<&Arc<Workload>> {
        match self {
            Chain::Hbone { workload, .. }
            | Chain::Local { workload, .. }
            | Chain::Tcp { workload, .. } => Some(workload),
            Chain::Waypoint { workload, .. } => workload.as_ref(),
            Chain::Passthrough { .. } | Chain::Dns { .. } => None,
        }
    }
}

/// Why a captured connection is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("source {0} is not a mesh workload on this node")]
    UnknownSource(IpAddr),
    #[error("destination {0} is not in the registry: refused by {1}")]
    RegistryOnly(SocketAddr, String),
    #[error("service {service} has no healthy endpoint for port {port}")]
    NoEndpoint { service: String, port: u16 },
    #[error("destination {0} is one of ztunnel's own ports (loop)")]
    Loop(SocketAddr),
    #[error("waypoint {0} of the destination is not a known workload")]
    UnknownWaypoint(String),
    /// The bound waypoint's Service has no ready pod. Refused rather than sent around the
    /// waypoint (and its L7 policy), which is what Istio does.
    #[error("waypoint {0} of the destination has no ready pod (fail closed: the waypoint is never bypassed)")]
    WaypointUnavailable(String),
}

/// Picks the chain. `pick(n)` chooses among `n` endpoints (round robin in production).
pub fn select(
    snap: &Snapshot,
    node: &str,
    src: SocketAddr,
    dst: SocketAddr,
    own_ports: &[u16],
    pick: impl FnOnce(&str, usize) -> usize,
) -> Result<(Arc<Workload>, Chain), Refusal> {
    let source = snap
        .workload_by_ip(src.ip())
        .filter(|w| w.node == node)
        .cloned()
        .ok_or(Refusal::UnknownSource(src.ip()))?;

    let visible = |s: &&Arc<Service>| visible_from(s, &source.namespace);
    if let Some(svc) = snap.service_by_vip(dst.ip()).filter(visible) {
        let chain = service_chain(snap, node, &source, svc, dst, pick)?;
        return Ok((source, chain));
    }

    if let Some(w) = snap.workload_by_ip(dst.ip()) {
        snap.egress_decision(&source, EgressTarget::Workload(w), dst.port())
            .map_err(|p| Refusal::RegistryOnly(dst, p))?;
        if let Some(wp) = &w.waypoint {
            // Traffic from the waypoint itself must not loop back to it.
            if !wp.destination.ends_with(&format!("/{}", src.ip())) {
                return waypoint_chain(snap, wp, dst, None, Some(w.clone()), pick)
                    .map(|c| (source, c));
            }
        }
        // A plain-TCP endpoint (e.g. of a ServiceEntry) reached by its own address is named
        // by the service it belongs to in metrics and logs.
        let service = (w.protocol == Protocol::Tcp)
            .then(|| {
                w.services
                    .keys()
                    .filter_map(|k| snap.service_by_key(k))
                    .find(|s| visible_from(s, &source.namespace))
                    .cloned()
            })
            .flatten();
        return Ok((source, workload_chain(node, w.clone(), dst, service)));
    }

    if let Some(svc) = snap
        .service_by_cidr(dst.ip())
        .filter(visible)
        .filter(|s| s.ports.contains_key(&dst.port()))
    {
        let chain = service_chain(snap, node, &source, svc, dst, pick)?;
        return Ok((source, chain));
    }

    if own_ports.contains(&dst.port()) && (dst.ip().is_loopback() || dst.port() == HBONE_PORT) {
        return Err(Refusal::Loop(dst));
    }
    snap.egress_decision(&source, EgressTarget::Unknown, dst.port())
        .map_err(|p| Refusal::RegistryOnly(dst, p))?;
    Ok((
        source,
        Chain::Passthrough {
            target: dst,
            service: None,
        },
    ))
}

/// A connection addressed to a service (by VIP, or inside a ServiceEntry CIDR): its waypoint,
/// else by the ServiceEntry resolution (NONE: the original destination; DNS: resolved by the
/// proxy), else one of its endpoints.
fn service_chain(
    snap: &Snapshot,
    node: &str,
    source: &Workload,
    svc: &Arc<Service>,
    dst: SocketAddr,
    pick: impl FnOnce(&str, usize) -> usize,
) -> Result<Chain, Refusal> {
    snap.egress_decision(source, EgressTarget::Service(svc), dst.port())
        .map_err(|p| Refusal::RegistryOnly(dst, p))?;
    if let Some(wp) = &svc.waypoint {
        return waypoint_chain(snap, wp, dst, Some(svc.clone()), None, pick);
    }
    let resolution = svc.service_entry.as_ref().map(|i| i.resolution);
    if matches!(
        resolution,
        Some(Resolution::None | Resolution::Dns | Resolution::DnsRoundRobin)
    ) && !svc.ports.contains_key(&dst.port())
    {
        return Err(Refusal::NoEndpoint {
            service: svc.hostname.clone(),
            port: dst.port(),
        });
    }
    match resolution {
        Some(Resolution::None) => {
            return Ok(Chain::Passthrough {
                target: dst,
                service: Some(svc.clone()),
            })
        }
        Some(Resolution::Dns | Resolution::DnsRoundRobin) => {
            return Ok(Chain::Dns {
                service: svc.clone(),
                port: dst.port(),
            });
        }
        Some(Resolution::Static) | None => {}
    }
    let endpoints = snap.endpoints(svc, dst.port());
    if endpoints.is_empty() {
        return Err(Refusal::NoEndpoint {
            service: svc.hostname.clone(),
            port: dst.port(),
        });
    }
    // Round robin over the endpoints' weights (all 1 unless a ServiceEntry or the control
    // plane says otherwise).
    let weights: Vec<u32> = endpoints.iter().map(|e| e.workload.weight()).collect();
    let total = usize::try_from(select::total_weight(&weights)).unwrap_or(usize::MAX);
    let draw = pick(&svc.key(), total) as u64;
    let ep = &endpoints[select::weighted_slot(&weights, draw).unwrap_or(0) % endpoints.len()];
    let ip = ep
        .workload
        .workload_ips
        .first()
        .copied()
        .ok_or_else(|| Refusal::NoEndpoint {
            service: svc.hostname.clone(),
            port: dst.port(),
        })?;
    Ok(workload_chain(
        node,
        ep.workload.clone(),
        SocketAddr::new(ip, ep.target_port),
        Some(svc.clone()),
    ))
}

fn workload_chain(
    node: &str,
    workload: Arc<Workload>,
    target: SocketAddr,
    service: Option<Arc<Service>>,
) -> Chain {
    match workload.protocol {
        Protocol::Hbone if workload.node == node => Chain::Local {
            workload,
            target,
            service,
        },
        Protocol::Hbone => Chain::Hbone {
            workload,
            target,
            service,
        },
        Protocol::Tcp => Chain::Tcp {
            workload,
            target,
            service,
        },
    }
}

/// The waypoint to tunnel to. Its address is a waypoint pod, or the VIP of the waypoint's
/// Service (a scaled waypoint): then one of its pods is picked like any service endpoint.
fn waypoint_chain(
    snap: &Snapshot,
    wp: &common::model::GatewayAddress,
    authority: SocketAddr,
    service: Option<Arc<Service>>,
    workload: Option<Arc<Workload>>,
    pick: impl FnOnce(&str, usize) -> usize,
) -> Result<Chain, Refusal> {
    let unknown = || Refusal::UnknownWaypoint(wp.destination.clone());
    let ip: IpAddr = wp
        .destination
        .rsplit('/')
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(unknown)?;
    let ip = match snap.service_by_vip(ip) {
        None => ip,
        Some(wsvc) => {
            let pods: Vec<IpAddr> = wsvc
                .ports
                .keys()
                .flat_map(|p| snap.endpoints(wsvc, *p))
                .filter_map(|e| e.workload.workload_ips.first().copied())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            if pods.is_empty() {
                return Err(Refusal::WaypointUnavailable(wsvc.hostname.clone()));
            }
            pods[pick(&wsvc.key(), pods.len()) % pods.len()]
        }
    };
    let identity = wp.identity.clone().ok_or_else(unknown)?;
    Ok(Chain::Waypoint {
        waypoint: SocketAddr::new(ip, wp.hbone_mtls_port),
        identity,
        authority,
        service,
        workload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
workloads:
- {uid: a, name: a, namespace: default, serviceAccount: sa-a, workloadIps: [10.244.1.2], protocol: HBONE, node: n1, labels: {run: client}}
- {uid: c, name: c, namespace: default, serviceAccount: sa-c, workloadIps: [10.244.1.3], protocol: HBONE, node: n1}
- {uid: b, name: b, namespace: default, serviceAccount: sa-b, workloadIps: [10.244.2.2], protocol: HBONE, node: n2, services: {"default/echo.default.svc.cluster.local": {8080: 9000}}}
- {uid: d, name: d, namespace: default, serviceAccount: sa-d, workloadIps: [10.244.2.3], protocol: HBONE, node: n2, services: {"default/echo.default.svc.cluster.local": {8080: 9000}}}
- {uid: t, name: t, namespace: default, workloadIps: [10.244.2.9], protocol: TCP, node: n2}
- {uid: w, name: wp, namespace: default, serviceAccount: waypoint, workloadIps: [10.244.2.50], protocol: HBONE, node: n2}
services:
- {name: echo, namespace: default, hostname: echo.default.svc.cluster.local, vips: ["/10.96.0.10"], ports: {8080: 9000}}
- {name: l7, namespace: default, hostname: l7.default.svc.cluster.local, vips: ["/10.96.0.20"], ports: {80: 8080}, waypoint: {destination: "/10.244.2.50", hboneMtlsPort: 15006}}
"#;

    fn snap(extra: &str) -> Snapshot {
        common::config::load_str(&format!("{CONFIG}{extra}"), "test.yaml").unwrap()
    }

    fn sel(s: &Snapshot, src: &str, dst: &str) -> Result<Chain, Refusal> {
        select(
            s,
            "n1",
            src.parse().unwrap(),
            dst.parse().unwrap(),
            &[15001, 15006, 15008],
            |_, _| 1,
        )
        .map(|(_, c)| c)
    }

    #[test]
    fn vip_picks_endpoint_and_maps_target_port() {
        let c = sel(&snap(""), "10.244.1.2:5000", "10.96.0.10:8080").unwrap();
        match c {
            Chain::Hbone {
                target, service, ..
            } => {
                assert_eq!(target, "10.244.2.3:9000".parse().unwrap());
                assert_eq!(service.unwrap().name, "echo");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn same_node_workload_is_local_and_tcp_workload_is_plain() {
        let s = snap("");
        assert!(matches!(
            sel(&s, "10.244.1.2:5000", "10.244.1.3:9000").unwrap(),
            Chain::Local { .. }
        ));
        assert!(matches!(
            sel(&s, "10.244.1.2:5000", "10.244.2.9:80").unwrap(),
            Chain::Tcp { .. }
        ));
    }

    #[test]
    fn service_with_waypoint_goes_to_waypoint_with_vip_authority() {
        match sel(&snap(""), "10.244.1.2:5000", "10.96.0.20:80").unwrap() {
            Chain::Waypoint {
                waypoint,
                identity,
                authority,
                ..
            } => {
                assert_eq!(waypoint, "10.244.2.50:15006".parse().unwrap());
                assert_eq!(identity.service_account, "waypoint");
                assert_eq!(authority, "10.96.0.20:80".parse().unwrap());
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn waypoint_behind_its_own_service_vip_picks_a_waypoint_pod() {
        let extra = r#"
- {uid: w2, name: wp2, namespace: default, serviceAccount: waypoint, workloadIps: [10.244.2.51], protocol: HBONE, node: n2, services: {"default/wp.default.svc.cluster.local": {15006: 15006}}}
"#;
        let text = CONFIG
            .replace(
                "services:\n- {name: echo",
                &format!("{}services:\n- {{name: echo", extra.trim_start()),
            )
            .replace("\"/10.244.2.50\"", "\"/10.96.0.99\"")
            + "- {name: wp, namespace: default, hostname: wp.default.svc.cluster.local, vips: [\"/10.96.0.99\"], ports: {15006: 15006}}\n";
        let s = common::config::load_str(&text, "test.yaml").unwrap();
        match sel(&s, "10.244.1.2:5000", "10.96.0.20:80").unwrap() {
            Chain::Waypoint { waypoint, .. } => {
                assert_eq!(waypoint, "10.244.2.51:15006".parse().unwrap())
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    /// The config of the test above with waypoint pods `pods` (IP, status) behind the VIP.
    fn scaled_waypoint(pods: &[(&str, &str)]) -> Snapshot {
        let extra: String = pods
            .iter()
            .enumerate()
            .map(|(i, (ip, status))| format!("- {{uid: wp{i}, name: wp{i}, namespace: default, serviceAccount: waypoint, workloadIps: [{ip}], protocol: HBONE, node: n2, status: {status}, services: {{\"default/wp.default.svc.cluster.local\": {{15006: 15006}}}}}}\n"))
            .collect();
        let text = CONFIG
            .replace(
                "services:\n- {name: echo",
                &format!("{extra}services:\n- {{name: echo"),
            )
            .replace("\"/10.244.2.50\"", "\"/10.96.0.99\"")
            + "- {name: wp, namespace: default, hostname: wp.default.svc.cluster.local, vips: [\"/10.96.0.99\"], ports: {15006: 15006}}\n";
        common::config::load_str(&text, "test.yaml").unwrap()
    }

    #[test]
    fn scaled_waypoint_spreads_over_ready_pods_and_fails_closed_without_one() {
        let s = scaled_waypoint(&[
            ("10.244.2.51", "Healthy"),
            ("10.244.2.52", "Unhealthy"),
            ("10.244.3.53", "Healthy"),
        ]);
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..4 {
            let src: SocketAddr = "10.244.1.2:5000".parse().unwrap();
            let dst: SocketAddr = "10.96.0.20:80".parse().unwrap();
            match select(&s, "n1", src, dst, &[15001], |_, _| i).unwrap().1 {
                Chain::Waypoint { waypoint, .. } => seen.insert(waypoint.ip().to_string()),
                other => panic!("unexpected {other:?}"),
            };
        }
        assert_eq!(
            seen.into_iter().collect::<Vec<_>>(),
            ["10.244.2.51", "10.244.3.53"],
            "every ready pod and only them"
        );

        let s = scaled_waypoint(&[("10.244.2.51", "Unhealthy")]);
        let err = sel(&s, "10.244.1.2:5000", "10.96.0.20:80").unwrap_err();
        assert!(
            matches!(&err, Refusal::WaypointUnavailable(h) if h == "wp.default.svc.cluster.local"),
            "{err:?}"
        );
        assert!(err.to_string().contains("no ready pod"), "{err}");
    }

    #[test]
    fn unknown_destination_passes_through_unless_registry_only() {
        let s = snap("");
        assert!(matches!(
            sel(&s, "10.244.1.2:5000", "10.0.0.2:7000").unwrap(),
            Chain::Passthrough { .. }
        ));
        let strict = snap("meshConfig: {outboundTrafficPolicy: {mode: REGISTRY_ONLY}}\n");
        assert_eq!(
            sel(&strict, "10.244.1.2:5000", "10.0.0.2:7000").unwrap_err(),
            Refusal::RegistryOnly(
                "10.0.0.2:7000".parse().unwrap(),
                "mesh outboundTrafficPolicy REGISTRY_ONLY".into()
            )
        );
        // Known services stay reachable under REGISTRY_ONLY.
        assert!(sel(&strict, "10.244.1.2:5000", "10.96.0.10:8080").is_ok());
    }

    #[test]
    fn unknown_source_port_without_endpoints_and_loops_are_refused() {
        let s = snap("");
        assert!(matches!(
            sel(&s, "10.244.9.9:5000", "10.96.0.10:8080"),
            Err(Refusal::UnknownSource(_))
        ));
        assert!(matches!(
            sel(&s, "10.244.2.2:5000", "10.96.0.10:8080"),
            Err(Refusal::UnknownSource(_))
        ));
        assert!(matches!(
            sel(&s, "10.244.1.2:5000", "10.96.0.10:9999"),
            Err(Refusal::NoEndpoint { .. })
        ));
        assert!(matches!(
            sel(&s, "10.244.1.2:5000", "127.0.0.1:15001"),
            Err(Refusal::Loop(_))
        ));
    }

    const ENTRIES: &str = r#"---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: pg, namespace: default}
spec:
  hosts: [pg.example.com]
  addresses: [10.96.5.5]
  ports: [{number: 5432, name: tcp-pg}]
  resolution: STATIC
  endpoints: [{address: 10.250.0.10, ports: {tcp-pg: 15432}}, {address: 10.244.2.3}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: net, namespace: default}
spec:
  hosts: [net.example.com]
  addresses: [10.80.0.0/16]
  ports: [{number: 7000, name: tcp}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: default}
spec:
  hosts: [api.example.com]
  addresses: [10.90.0.1]
  ports: [{number: 443, name: https}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: private, namespace: other}
spec:
  hosts: [private.example.com]
  addresses: [10.91.0.1]
  ports: [{number: 80, name: http}]
  resolution: NONE
  exportTo: ["."]
"#;

    #[test]
    fn service_entries_route_by_resolution() {
        let s = snap(&format!(
            "meshConfig: {{outboundTrafficPolicy: {{mode: REGISTRY_ONLY}}}}\n{ENTRIES}"
        ));
        assert!(s.rejected.is_empty(), "{:?}", s.rejected);
        // STATIC by VIP: endpoints in registry order (mesh workload d: HBONE; the outside
        // address: plain TCP, port mapped by name).
        let pick = |i: usize| {
            select(
                &s,
                "n1",
                "10.244.1.2:5000".parse().unwrap(),
                "10.96.5.5:5432".parse().unwrap(),
                &[15001],
                move |_, n| {
                    assert_eq!(n, 2);
                    i
                },
            )
            .map(|(_, c)| c)
            .unwrap()
        };
        match pick(0) {
            Chain::Hbone {
                target, service, ..
            } => {
                assert_eq!(target, "10.244.2.3:5432".parse().unwrap());
                assert_eq!(service.unwrap().hostname, "pg.example.com");
            }
            other => panic!("unexpected {other:?}"),
        }
        match pick(1) {
            Chain::Tcp { target, .. } => {
                assert_eq!(target, "10.250.0.10:15432".parse().unwrap())
            }
            other => panic!("unexpected {other:?}"),
        }
        // The outside endpoint by its own address: plain TCP, named by the entry.
        match sel(&s, "10.244.1.2:5000", "10.250.0.10:15432").unwrap() {
            Chain::Tcp { service, .. } => {
                assert_eq!(service.unwrap().hostname, "pg.example.com")
            }
            other => panic!("unexpected {other:?}"),
        }
        // NONE inside the CIDR on a declared port: original destination, named.
        match sel(&s, "10.244.1.2:5000", "10.80.3.4:7000").unwrap() {
            Chain::Passthrough { target, service } => {
                assert_eq!(target, "10.80.3.4:7000".parse().unwrap());
                assert_eq!(service.unwrap().hostname, "net.example.com");
            }
            other => panic!("unexpected {other:?}"),
        }
        // Undeclared port of the CIDR: not the entry, so not in the registry.
        assert!(matches!(
            sel(&s, "10.244.1.2:5000", "10.80.3.4:7001"),
            Err(Refusal::RegistryOnly(..))
        ));
        // DNS: resolved by the proxy.
        assert!(matches!(
            sel(&s, "10.244.1.2:5000", "10.90.0.1:443").unwrap(),
            Chain::Dns { port: 443, .. }
        ));
        assert!(matches!(
            sel(&s, "10.244.1.2:5000", "10.90.0.1:80"),
            Err(Refusal::NoEndpoint { .. })
        ));
        // exportTo ".": invisible from default, so under REGISTRY_ONLY not in its registry.
        assert_eq!(
            sel(&s, "10.244.1.2:5000", "10.91.0.1:80").unwrap_err(),
            Refusal::RegistryOnly(
                "10.91.0.1:80".parse().unwrap(),
                "mesh outboundTrafficPolicy REGISTRY_ONLY".into()
            )
        );
        // ALLOW_ANY: the invisible entry's address is just an unknown destination.
        let open = snap(ENTRIES);
        assert!(matches!(
            sel(&open, "10.244.1.2:5000", "10.91.0.1:80").unwrap(),
            Chain::Passthrough { service: None, .. }
        ));
    }

    /// A STATIC entry's endpoint `weight`s: round robin hands out connections in proportion.
    #[test]
    fn service_entry_endpoint_weights_shape_the_round_robin() {
        let s = snap(
            r#"---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: default}
spec:
  hosts: [db.example.com]
  addresses: [10.96.9.9]
  ports: [{number: 5432, name: tcp}]
  resolution: STATIC
  endpoints: [{address: 192.0.2.1, weight: 3}, {address: 192.0.2.2}]
"#,
        );
        let mut counter = 0usize;
        let mut seen = std::collections::BTreeMap::<String, usize>::new();
        for _ in 0..8 {
            let chain = select(
                &s,
                "n1",
                "10.244.1.2:5000".parse().unwrap(),
                "10.96.9.9:5432".parse().unwrap(),
                &[15001, 15006, 15008],
                |_, n| {
                    counter += 1;
                    (counter - 1) % n
                },
            )
            .map(|(_, c)| c)
            .unwrap();
            let Chain::Tcp { target, .. } = chain else {
                panic!("plain TCP to an entry endpoint, got {chain:?}")
            };
            *seen.entry(target.ip().to_string()).or_default() += 1;
        }
        assert_eq!(seen["192.0.2.1"], 6, "{seen:?}");
        assert_eq!(seen["192.0.2.2"], 2, "{seen:?}");
    }

    #[test]
    fn sidecar_refusal_names_the_sidecar() {
        let sidecar = r#"---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: client, namespace: default}
spec:
  workloadSelector: {labels: {run: client}}
  outboundTrafficPolicy: {mode: REGISTRY_ONLY}
  egress: [{hosts: ["*/pg.example.com"]}]
"#;
        let s = snap(&format!("{ENTRIES}{sidecar}"));
        assert!(sel(&s, "10.244.1.2:5000", "10.96.5.5:5432").is_ok());
        // Direct to the entry's outside endpoint: allowed through the entry's host.
        assert!(sel(&s, "10.244.1.2:5000", "10.250.0.10:15432").is_ok());
        assert_eq!(
            sel(&s, "10.244.1.2:5000", "10.96.0.10:8080").unwrap_err(),
            Refusal::RegistryOnly(
                "10.96.0.10:8080".parse().unwrap(),
                "Sidecar default/client (REGISTRY_ONLY)".into()
            )
        );
        // Pod c is not selected: no Sidecar, mesh default ALLOW_ANY.
        assert!(sel(&s, "10.244.1.3:5000", "10.96.0.10:8080").is_ok());
    }
}
