//! L7 authorization of HTTP requests at the waypoint, in two places:
//! - **addressed service**, first of all phases (as Envoy's RBAC filter runs before CORS, faults
//!   and the router): the policies of every endpoint of the service the client addressed, so a
//!   request those policies deny gets no redirect, fault, 404 or preflight answer either;
//! - **chosen endpoint**, once per attempt (and for each mirror) just before the request is
//!   sent: the policies of the workload that actually receives it, evaluated against the request
//!   as it will arrive there (after rewrites and header operations; `destination.ip` / `.port`
//!   of that endpoint). A route may send the request to another service, and that service's
//!   ztunnel skips L7-rule policies for the waypoint's connections, so this is where its DENY
//!   rules are enforced; retries to another endpoint are authorized again.
//!
//! Policies attached to this waypoint with `targetRefs` join both: those targeting its Gateway
//! always, those targeting a Service when the request is for that service (the addressed one
//! first, then the one the route chose).
//!
//! Both are skipped at no cost when the snapshot has no L7 policy.
//!
//! An upgraded connection (WebSocket…) outlives its request: what it was authorized on is kept
//! as a [`Grant`] and checked again against every new configuration ([`recheck`]); one no
//! longer allowed is closed, as L4 streams are.

use crate::app::State;
use crate::proxy::ConnContext;
use crate::route::{self, Cluster, Pick};
use common::config::waypoints::GATEWAY_NAME_LABEL;
use common::l7::attached::Through;
use common::l7::policy::{authorize, AuthzRequest};
use common::l7::L7Policy;
use common::model::Service;
use common::policy::Denied;
use common::snapshot::Snapshot;
use http::{header, request::Parts, HeaderMap};

/// Whether no L7 policy of any kind exists (the cheap path).
fn none(snap: &Snapshot) -> bool {
    snap.l7.authorization_policies.is_empty() && snap.l7.attached_policies.is_empty()
}

/// The Gateway this waypoint implements: its workload's `gateway-name` label, else its
/// workload name (a waypoint Deployment is named after its Gateway).
pub fn through<'s>(state: &'s State, snap: &'s Snapshot) -> Through<'s> {
    through_of(&state.workload, snap)
}

/// [`through`] for the waypoint workload `(namespace, name)`.
fn through_of<'s>(workload: &'s (String, String), snap: &'s Snapshot) -> Through<'s> {
    if snap.l7.attached_policies.is_empty() {
        return Through { gateway: None };
    }
    let (ns, name) = (&workload.0, &workload.1);
    let gateway = snap
        .workloads
        .iter()
        .find(|w| w.namespace == *ns && w.name == *name)
        .and_then(|w| w.labels.get(GATEWAY_NAME_LABEL))
        .map_or(name.as_str(), |g| g.as_str());
    Through {
        gateway: Some((ns.as_str(), gateway)),
    }
}

/// The policies attached to this waypoint that apply to requests for `service`.
fn attached<'s>(state: &'s State, snap: &'s Snapshot, service: &'s Service) -> Vec<&'s L7Policy> {
    snap.l7
        .attached_for(through(state, snap), Some(service))
        .map(|p| p.l7.as_ref())
        .collect()
}

/// The body and flag of a denial, as Envoy's RBAC filter answers.
pub const DENIED_BODY: &str = "RBAC: access denied";

/// The L7 authorization policies of the addressed service's endpoints (all of them, so the
/// decision does not depend on which endpoint a route or the balancer picks later: a policy
/// bound to some of them restricts requests to the service), evaluated for the request.
/// Returns the service's own cluster when it had to resolve it (policies exist), for reuse.
pub fn addressed_service(
    state: &State,
    ctx: &ConnContext,
    snap: &Snapshot,
    method: &str,
    headers: &HeaderMap,
    authority: &str,
    path: &str,
) -> Result<Option<Cluster>, Denied> {
    if none(snap) {
        return Ok(None);
    }
    let mut policies = attached(state, snap, &ctx.service);
    let own = route::cluster_for(
        snap,
        &state.identity.namespace,
        None,
        &ctx.service,
        ctx.port,
    )
    .ok();
    let endpoints = own.as_ref().map_or(&[][..], |c| c.endpoints.as_slice());
    for ep in endpoints {
        for p in snap.l7.policies_for(snap, &ep.workload) {
            if !policies.iter().any(|q| std::ptr::eq(*q, p)) {
                policies.push(p);
            }
        }
    }
    if policies.is_empty() {
        return Ok(own);
    }
    let (destination_ip, destination_port) = match endpoints.first() {
        Some(first) => (
            first.workload.workload_ips.first().copied(),
            first.target_port,
        ),
        None => (Some(ctx.target.ip()), ctx.target.port()),
    };
    let areq = AuthzRequest {
        method,
        host: authority,
        path,
        headers,
        source: Some(&ctx.peer),
        source_ip: Some(ctx.client.ip()),
        destination_ip,
        destination_port,
    };
    authorize(policies, &areq)?;
    Ok(own)
}

/// The policies of the endpoint `pick` (the workload that receives the request) and those
/// attached to the service it belongs to (`cluster`), evaluated for the request as it will be
/// sent (`parts`, after rewrites; `authority` when it carries no host).
pub fn chosen_endpoint(
    state: &State,
    ctx: &ConnContext,
    snap: &Snapshot,
    parts: &Parts,
    authority: &str,
    cluster: &Cluster,
    pick: &Pick,
) -> Result<(), Denied> {
    if none(snap) {
        return Ok(());
    }
    let mut policies = attached(state, snap, &cluster.service);
    policies.extend(snap.l7.policies_for(snap, &pick.endpoint));
    if policies.is_empty() {
        return Ok(());
    }
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()))
        .unwrap_or(authority);
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let areq = AuthzRequest {
        method: parts.method.as_str(),
        host,
        path,
        headers: &parts.headers,
        source: Some(&ctx.peer),
        source_ip: Some(ctx.client.ip()),
        destination_ip: Some(pick.target.addr.ip()),
        destination_port: pick.target.addr.port(),
    };
    authorize(policies, &areq)
}

/// Streams proxied at L4: the L4 form of the policies attached to this waypoint for the
/// addressed service and for the service of the chosen endpoint (their HTTP rules fail closed,
/// as for the endpoint's own policies).
pub fn attached_l4(
    state: &State,
    snap: &Snapshot,
    services: [&Service; 2],
    conn: &common::policy::ConnectionInfo,
) -> Result<(), Denied> {
    if snap.l7.attached_policies.is_empty() {
        return Ok(());
    }
    let through = through(state, snap);
    let mut policies: Vec<&common::model::Authorization> = Vec::new();
    for svc in services {
        for p in snap.l7.attached_for(through, Some(svc)) {
            if !policies.iter().any(|q| std::ptr::eq(*q, p.l4.as_ref())) {
                policies.push(p.l4.as_ref());
            }
        }
    }
    if policies.is_empty() {
        return Ok(());
    }
    common::policy::decide(policies, conn)
}

/// What an upgraded request (a WebSocket, any `Upgrade` protocol) was authorized on, kept
/// while its connection lives.
#[derive(Debug, Clone)]
pub struct Grant {
    /// This waypoint's workload `(namespace, name)` (for policies attached to its Gateway).
    pub waypoint: (String, String),
    pub method: String,
    pub host: String,
    pub path: String,
    pub headers: HeaderMap,
    pub peer: common::identity::Identity,
    pub client: std::net::IpAddr,
    /// `<namespace>/<hostname>` of the addressed service and of the one the route chose.
    pub services: [String; 2],
    /// The endpoint the request was sent to.
    pub endpoint: std::net::SocketAddr,
}

impl Grant {
    /// The grant of a request sent as `parts` to `pick` of `cluster`.
    pub fn new(
        state: &State,
        ctx: &ConnContext,
        parts: &Parts,
        authority: &str,
        cluster: &Cluster,
        pick: &Pick,
    ) -> Grant {
        Grant {
            waypoint: state.workload.clone(),
            method: parts.method.as_str().to_string(),
            host: parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or(authority)
                .to_string(),
            path: parts
                .uri
                .path_and_query()
                .map_or_else(|| "/".to_string(), |p| p.as_str().to_string()),
            headers: parts.headers.clone(),
            peer: ctx.peer.clone(),
            client: ctx.client.ip(),
            services: [ctx.service.key(), cluster.service.key()],
            endpoint: pick.target.addr,
        }
    }
}

/// Why the upgraded connection of `g` is no longer allowed under `snap`, if it is not: the
/// policies of the endpoint it reached and those attached to this waypoint for either service,
/// evaluated for the request again.
pub fn recheck(snap: &Snapshot, g: &Grant) -> Option<String> {
    let Some(endpoint) = snap.workload_by_ip(g.endpoint.ip()) else {
        return Some(format!("endpoint {} is no longer known", g.endpoint.ip()));
    };
    if none(snap) {
        return None;
    }
    let through = through_of(&g.waypoint, snap);
    let mut policies: Vec<&L7Policy> = Vec::new();
    for key in &g.services {
        let Some(svc) = snap.service_by_key(key) else {
            return Some(format!("service {key} is no longer known"));
        };
        for p in snap.l7.attached_for(through, Some(svc)) {
            if !policies.iter().any(|q| std::ptr::eq(*q, p.l7.as_ref())) {
                policies.push(p.l7.as_ref());
            }
        }
    }
    for p in snap.l7.policies_for(snap, endpoint) {
        if !policies.iter().any(|q| std::ptr::eq(*q, p)) {
            policies.push(p);
        }
    }
    if policies.is_empty() {
        return None;
    }
    let areq = AuthzRequest {
        method: &g.method,
        host: &g.host,
        path: &g.path,
        headers: &g.headers,
        source: Some(&g.peer),
        source_ip: Some(g.client),
        destination_ip: Some(g.endpoint.ip()),
        destination_port: g.endpoint.port(),
    };
    authorize(policies, &areq).err().map(|d| d.to_string())
}

/// [`recheck`] for the revalidator, logging each upgraded connection it closes.
pub fn check_upgraded(snap: &Snapshot, g: &Grant) -> Option<String> {
    let why = recheck(snap, g)?;
    tracing::info!(
        target: "access",
        chain = "waypoint_upgraded",
        service = %g.services[1],
        client = %g.client,
        upstream = %g.endpoint,
        peer_identity = %g.peer,
        path = %g.path,
        reason = %why,
        "closing live connection: no longer allowed by the new configuration"
    );
    Some(why)
}
