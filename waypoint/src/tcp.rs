//! L4 through the waypoint: a tunnelled stream that is not HTTP goes, bytes unchanged, to one
//! endpoint of the service over a new HBONE stream with the waypoint's identity (plain TCP to
//! an endpoint outside the mesh), chosen by the
//! VirtualService's `tls` routes (by the ClientHello's server name) or `tcp` routes.

use crate::app::State;
use crate::route;
use common::l7::destination_rule::HashKey;
use common::l7::select::fnv1a64;
use common::l7::{L4Info, LbPolicy};
use common::model::Service;
use std::net::SocketAddr;
use std::sync::Arc;

struct Decision {
    target: crate::upstream::Target,
    cluster: String,
}
use tokio::io::{AsyncRead, AsyncWrite};

/// The tunnelled connection being forwarded at L4.
pub struct L4Conn<'a> {
    /// The CONNECT authority: the service VIP and port the client dialled.
    pub target: SocketAddr,
    /// The original client (from `forwarded`, else the peer).
    pub client: SocketAddr,
    /// The client's workload, when the client IP is one.
    pub source: Option<&'a common::model::Workload>,
    /// The client's verified identity (the peer of the tunnel).
    pub peer: &'a common::identity::Identity,
    /// The server name of the stream's TLS ClientHello, when it starts with one.
    pub sni: Option<&'a str>,
}

pub async fn forward<S>(state: &State, service: &Service, conn: L4Conn<'_>, mut io: S)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (port, client) = (conn.target.port(), conn.client);
    let snap = state.config.current();
    let svc = Arc::new(service.clone());
    // A VirtualService `tcp` route may send the connection elsewhere (weights, subsets).
    let no_labels = common::model::Labels::new();
    let info = L4Info {
        destination_ip: Some(conn.target.ip()),
        port,
        source_labels: conn.source.map_or(&no_labels, |w| &w.labels),
        source_namespace: conn.source.map_or("", |w| w.namespace.as_str()),
        sni: conn.sni,
    };
    let dest = snap
        .l7
        .routes
        .mesh(&service.hostname, &state.identity.namespace)
        // TLS is matched by `tls` routes first (server name), then like any TCP stream.
        .and_then(|t| {
            conn.sni
                .and_then(|_| t.match_tls(&info))
                .or_else(|| t.match_tcp(&info))
        })
        .and_then(|r| route::pick_destination(&r.destinations))
        .map(|d| d.destination.clone());
    let cluster =
        match route::cluster_for(&snap, &state.identity.namespace, dest.as_ref(), &svc, port) {
            Ok(c) => route::with_dns_endpoints(state, c).await,
            Err(r) => Err(r),
        };
    let decision = cluster.and_then(|c| {
        // Of the consistent-hash keys only the source IP exists below HTTP (Istio gives
        // the TCP proxy that hash policy too); the others fall back to the picker's default.
        let hash = match &c.policy.load_balancer {
            LbPolicy::ConsistentHash(HashKey::SourceIp) => {
                Some(fnv1a64(client.ip().to_canonical().to_string().as_bytes()))
            }
            _ => None,
        };
        route::pick_endpoint(state, &c, hash, &[], conn.target).map(|p| (c, p))
    });
    let (cluster, pick) = match decision {
        Ok(v) => v,
        Err(reply) => {
            tracing::info!(target: "access", service = %service.hostname, port, %client, flag = reply.flag, "tcp: {}", reply.body);
            return;
        }
    };
    // Authorization at L4, as Envoy's RBAC network filter does for non-HTTP traffic: the
    // policies of the chosen endpoint with the client's identity; rules with HTTP fields fail
    // closed (a DENY with them matches every connection, an ALLOW with them matches none), so
    // a client cannot dodge path or header rules by not speaking HTTP.
    let authz = common::policy::ConnectionInfo {
        src_ip: client.ip(),
        src_identity: Some(conn.peer),
        dst: &pick.endpoint,
        dst_ip: pick.target.addr.ip(),
        dst_port: pick.target.addr.port(),
        via_waypoint: false,
    };
    let decision = common::policy::authorize(&snap, &authz).and_then(|()| {
        crate::authz::attached_l4(state, &snap, [service, &cluster.service], &authz)
    });
    if let Err(denied) = decision {
        tracing::info!(
            target: "access",
            chain = "waypoint_tcp",
            service = %service.hostname,
            %client,
            upstream = %pick.target.addr,
            response_flags = "-",
            error = %denied,
            "tcp connection denied"
        );
        return;
    }
    let authorized = Authorized {
        src_ip: client.ip(),
        identity: conn.peer.clone(),
        endpoint: pick.target.addr,
        service: service.hostname.clone(),
    };
    let live = state.live.register(authorized.clone());
    let now = state.config.current();
    if !Arc::ptr_eq(&now, &snap) {
        if let Some(why) = decide(&now, &authorized) {
            tracing::info!(target: "access", chain = "waypoint_tcp", service = %service.hostname, %client, upstream = %pick.target.addr, error = %why, "tcp connection denied");
            return;
        }
    }
    drop((now, snap));
    let (_live, revoked) = live;
    let decision = Decision {
        target: pick.target,
        cluster: cluster.name,
    };
    // Circuit breaking and connect timeout as for HTTP/1.1: one `maxConnections` slot per
    // connection (up to `http1MaxPendingRequests` may wait), `connectTimeout` for the tunnel.
    let pool = &cluster.policy.connection_pool;
    let Some(_admitted) = state
        .limits
        .admit(
            &decision.cluster,
            pool,
            crate::upstream::UpstreamProtocol::Http1,
        )
        .await
    else {
        tracing::info!(target: "access", chain = "waypoint_tcp", service = %service.hostname, %client, upstream_cluster = %decision.cluster, response_flags = "UO", "tcp connection refused: connection pool is full");
        return;
    };
    let start = std::time::Instant::now();
    let connected = tokio::time::timeout(
        pool.connect_timeout.0,
        crate::upstream::open(&state.hbone, &state.identity, &decision.target, client),
    )
    .await
    .unwrap_or_else(|_| Err(format!("connect timeout {:?}", pool.connect_timeout.0)));
    match connected {
        Ok((mut up, _lease)) => {
            let r = tokio::select! {
                r = tokio::io::copy_bidirectional(&mut io, &mut up) => r,
                why = revoked.wait() => Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!("closed: {why}"),
                )),
            };
            let (sent, received) = r.as_ref().map(|(a, b)| (*a, *b)).unwrap_or((0, 0));
            tracing::info!(
                target: "access",
                chain = "waypoint_tcp",
                service = %service.hostname,
                %client,
                upstream = %decision.target.addr,
                upstream_cluster = %decision.cluster,
                bytes_received = sent,
                bytes_sent = received,
                duration_ms = start.elapsed().as_millis() as u64,
                error = r.err().map(|e| e.to_string()).unwrap_or_default(),
                "tcp connection complete"
            );
        }
        Err(e) => {
            tracing::info!(target: "access", chain = "waypoint_tcp", service = %service.hostname, %client, upstream = %decision.target.addr, error = %e, "tcp upstream connect failed");
        }
    }
}

/// What an L4 connection through the waypoint was authorized on, for re-checking it when the
/// configuration changes.
#[derive(Debug, Clone)]
pub struct Authorized {
    pub src_ip: std::net::IpAddr,
    pub identity: common::identity::Identity,
    /// The endpoint (pod IP and target port) the connection was sent to.
    pub endpoint: SocketAddr,
    pub service: String,
}

/// Why `a` is no longer allowed under `snap`, or `None` if it still is.
fn decide(snap: &common::snapshot::Snapshot, a: &Authorized) -> Option<String> {
    let Some(dst) = snap.workload_by_ip(a.endpoint.ip()) else {
        return Some(format!("endpoint {} is no longer known", a.endpoint.ip()));
    };
    let authz = common::policy::ConnectionInfo {
        src_ip: a.src_ip,
        src_identity: Some(&a.identity),
        dst,
        dst_ip: a.endpoint.ip(),
        dst_port: a.endpoint.port(),
        via_waypoint: false,
    };
    common::policy::authorize(snap, &authz)
        .err()
        .map(|d| d.to_string())
}

/// [`decide`] for the revalidator, logging each connection it closes.
pub fn check(snap: &common::snapshot::Snapshot, a: &Authorized) -> Option<String> {
    let why = decide(snap, a)?;
    tracing::info!(
        target: "access",
        chain = "waypoint_tcp",
        service = %a.service,
        client = %a.src_ip,
        upstream = %a.endpoint,
        peer_identity = %a.identity,
        reason = %why,
        "closing live connection: no longer allowed by the new configuration"
    );
    Some(why)
}
