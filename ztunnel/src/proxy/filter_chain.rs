//! Outbound filter-chain selection: from (source IP, destination IP, destination port) and the
//! config snapshot, decide where a captured connection goes. Pure logic, no I/O.

use common::hbone::HBONE_PORT;
use common::identity::Identity;
use common::model::{Protocol, Service, Workload};
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
    /// Not in the registry: plain TCP to the original destination.
    Passthrough { target: SocketAddr },
}

impl Chain {
    /// The filter-chain name used in logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Chain::Waypoint { .. } => "outbound_waypoint",
            Chain::Hbone { .. } => "outbound_hbone",
            Chain::Local { .. } => "outbound_local",
            Chain::Tcp { .. } => "outbound_tcp",
            Chain::Passthrough { .. } => "passthrough",
        }
    }

    pub fn service(&self) -> Option<&Arc<Service>> {
        match self {
            Chain::Waypoint { service, .. }
            | Chain::Hbone { service, .. }
            | Chain::Local { service, .. }
            | Chain::Tcp { service, .. } => service.as_ref(),
            Chain::Passthrough { .. } => None,
        }
    }

    pub fn workload(&self) -> Option<&Arc<Workload>> {
        match self {
            Chain::Hbone { workload, .. }
            | Chain::Local { workload, .. }
            | Chain::Tcp { workload, .. } => Some(workload),
            Chain::Waypoint { workload, .. } => workload.as_ref(),
            Chain::Passthrough { .. } => None,
        }
    }
}

/// Why a captured connection is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("source {0} is not a mesh workload on this node")]
    UnknownSource(IpAddr),
    #[error("destination {0} is not in the registry (REGISTRY_ONLY)")]
    RegistryOnly(SocketAddr),
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

    if let Some(svc) = snap.service_by_vip(dst.ip()) {
        if !snap.egress_allowed(&source, EgressTarget::Service(svc), dst.port()) {
            return Err(Refusal::RegistryOnly(dst));
        }
        if let Some(wp) = &svc.waypoint {
            return waypoint_chain(snap, wp, dst, Some(svc.clone()), None, pick)
                .map(|c| (source, c));
        }
        let endpoints = snap.endpoints(svc, dst.port());
        if endpoints.is_empty() {
            return Err(Refusal::NoEndpoint {
                service: svc.hostname.clone(),
                port: dst.port(),
            });
        }
        let ep = &endpoints[pick(&svc.key(), endpoints.len()) % endpoints.len()];
        let ip = ep
            .workload
            .workload_ips
            .first()
            .copied()
            .ok_or_else(|| Refusal::NoEndpoint {
                service: svc.hostname.clone(),
                port: dst.port(),
            })?;
        let chain = workload_chain(
            node,
            ep.workload.clone(),
            SocketAddr::new(ip, ep.target_port),
            Some(svc.clone()),
        );
        return Ok((source, chain));
    }

    if let Some(w) = snap.workload_by_ip(dst.ip()) {
        if !snap.egress_allowed(&source, EgressTarget::Workload(w), dst.port()) {
            return Err(Refusal::RegistryOnly(dst));
        }
        if let Some(wp) = &w.waypoint {
            // Traffic from the waypoint itself must not loop back to it.
            if !wp.destination.ends_with(&format!("/{}", src.ip())) {
                return waypoint_chain(snap, wp, dst, None, Some(w.clone()), pick)
                    .map(|c| (source, c));
            }
        }
        return Ok((source, workload_chain(node, w.clone(), dst, None)));
    }

    if own_ports.contains(&dst.port()) && (dst.ip().is_loopback() || dst.port() == HBONE_PORT) {
        return Err(Refusal::Loop(dst));
    }
    if !snap.egress_allowed(&source, EgressTarget::Unknown, dst.port()) {
        return Err(Refusal::RegistryOnly(dst));
    }
    Ok((source, Chain::Passthrough { target: dst }))
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
            Refusal::RegistryOnly("10.0.0.2:7000".parse().unwrap())
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
}
