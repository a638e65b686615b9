//! Routing decisions: which endpoint a request goes to (or which local reply it gets). Without
//! a VirtualService a service's requests go round robin over its healthy endpoints, as Istio's
//! default route does.

use crate::app::State;
use crate::upstream::Target;
use common::model::{Service, Workload};
use common::snapshot::Snapshot;
use http::StatusCode;
use std::net::SocketAddr;
use std::sync::Arc;

/// Where a request goes.
#[derive(Debug, Clone)]
pub struct Decision {
    pub target: Target,
    pub endpoint: Arc<Workload>,
    /// Envoy-style cluster name: `outbound|<port>|<subset>|<host>`.
    pub cluster: String,
    pub route_name: String,
}

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

/// Picks an endpoint of `service` for a request that arrived for `port`.
pub fn decide(
    state: &State,
    snap: &Snapshot,
    service: &Service,
    port: u16,
) -> Result<Decision, LocalReply> {
    let endpoints = snap.endpoints(service, port);
    if endpoints.is_empty() {
        return Err(LocalReply::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "UH",
            format!("no healthy upstream for {}:{port}", service.hostname),
        ));
    }
    let cluster = format!("outbound|{port}||{}", service.hostname);
    let ep = &endpoints[state.next_index(&cluster, endpoints.len()) % endpoints.len()];
    let ip = ep.workload.workload_ips.first().copied().ok_or_else(|| {
        LocalReply::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "UH",
            format!("endpoint {} has no address", ep.workload.name),
        )
    })?;
    Ok(Decision {
        target: Target {
            addr: SocketAddr::new(ip, ep.target_port),
            identity: ep.workload.identity(),
            service: service.hostname.clone(),
        },
        endpoint: ep.workload.clone(),
        cluster,
        route_name: "default".to_string(),
    })
}

/// The routes per service, for `/config_dump`.
pub fn dump(snap: &Snapshot) -> serde_json::Value {
    let services: Vec<serde_json::Value> = snap
        .services
        .iter()
        .filter(|s| s.waypoint.is_some())
        .map(|s| {
            serde_json::json!({
                "service": s.hostname,
                "routes": [{"name": "default", "action": "round robin over healthy endpoints"}],
            })
        })
        .collect();
    serde_json::Value::Array(services)
}
