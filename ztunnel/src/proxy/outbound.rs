//! Outbound (15001): a captured connection from a local pod is matched to a filter chain and
//! carried over HBONE (to the destination's node or its waypoint), delivered in-process to a
//! pod on this node, or passed through as plain TCP.

use super::access_log::AccessLog;
use super::filter_chain::{self, Chain};
use super::revalidate::{self, Authorized, Path};
use crate::metrics::{Reporter, SecurityPolicy, TcpLabels};
use crate::socket;
use crate::state::ProxyState;
use common::copy::{copy_tcp_h2, copy_tcp_tcp, CopyResult};
use common::hbone::client::{ConnectRequest, PoolKey};
use common::hbone::{forwarded_value, headers, HBONE_PORT};
use common::identity::Identity;
use common::model::{Service, Workload};
use http::{HeaderMap, HeaderValue};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpStream;

pub async fn handle(
    state: Arc<ProxyState>,
    stream: TcpStream,
    peer: SocketAddr,
    _permit: common::admission::ConnPermit,
) {
    let orig = match stream.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "outbound: no original destination");
            return;
        }
    };
    let snap = state.config.current();
    let selected = filter_chain::select(
        &snap,
        &state.node,
        peer,
        orig,
        &state.own_ports,
        |key, n| state.next_index(key, orig.port(), n),
    );
    let (source, chain) = match selected {
        Ok(s) => s,
        Err(refusal) => {
            state.metrics.refused.inc();
            let mut log = AccessLog::new("outbound_refused", peer, orig);
            log.error = Some(refusal.to_string());
            log.emit();
            super::reset(stream);
            return;
        }
    };
    let mut log = AccessLog::new(chain.name(), peer, orig);
    log.src_workload = Some(source.name.clone());
    log.dst_workload = chain.workload().map(|w| w.name.clone());
    log.dst_service = chain.service().map(|s| s.hostname.clone());
    let result = match &chain {
        Chain::Hbone {
            workload,
            target,
            service,
        } => {
            let key = PoolKey {
                src: source.identity(),
                src_ip: Some(peer.ip()),
                dst: SocketAddr::new(target.ip(), HBONE_PORT),
                expected: expected_identities(workload, service.as_deref()),
            };
            log.upstream = Some(key.dst);
            log.peer_identity = Some(workload.identity());
            let labels = TcpLabels::new(
                Reporter::source,
                Some(&source),
                None,
                Some(workload),
                service.as_deref(),
                SecurityPolicy::mutual_tls,
            );
            tunnel(
                &state,
                stream,
                peer,
                &source,
                key,
                *target,
                service.as_deref(),
                labels,
            )
            .await
        }
        Chain::Waypoint {
            waypoint,
            identity,
            authority,
            service,
            workload,
        } => {
            let key = PoolKey {
                src: source.identity(),
                src_ip: Some(peer.ip()),
                dst: *waypoint,
                expected: vec![identity.clone()],
            };
            log.upstream = Some(*waypoint);
            log.peer_identity = Some(identity.clone());
            let labels = TcpLabels::new(
                Reporter::source,
                Some(&source),
                None,
                workload.as_deref(),
                service.as_deref(),
                SecurityPolicy::mutual_tls,
            );
            tunnel(
                &state,
                stream,
                peer,
                &source,
                key,
                *authority,
                service.as_deref(),
                labels,
            )
            .await
        }
        Chain::Local {
            workload,
            target,
            service,
        } => {
            log.upstream = Some(*target);
            log.peer_identity = Some(source.identity());
            local(
                &state,
                &snap,
                stream,
                peer,
                &source,
                workload,
                *target,
                service.as_deref(),
            )
            .await
        }
        Chain::Tcp {
            workload,
            target,
            service,
        } => {
            log.upstream = Some(*target);
            let labels = TcpLabels::new(
                Reporter::source,
                Some(&source),
                None,
                Some(workload),
                service.as_deref(),
                SecurityPolicy::none,
            );
            plain(&state, stream, *target, labels).await
        }
        Chain::Passthrough { target, service } => {
            log.upstream = Some(*target);
            let labels = TcpLabels::new(
                Reporter::source,
                Some(&source),
                None,
                None,
                service.as_deref(),
                SecurityPolicy::none,
            );
            plain(&state, stream, *target, labels).await
        }
        Chain::Dns { service, port } => {
            let labels = TcpLabels::new(
                Reporter::source,
                Some(&source),
                None,
                None,
                Some(service),
                SecurityPolicy::none,
            );
            match resolve_target(&state, service, *port).await {
                Ok(target) => {
                    log.upstream = Some(target);
                    plain(&state, stream, target, labels).await
                }
                Err(e) => {
                    state.metrics.refused.inc();
                    super::reset(stream);
                    CopyResult {
                        error: Some(std::io::Error::other(e)),
                        ..Default::default()
                    }
                }
            }
        }
    };
    log.received = result.sent;
    log.sent = result.received;
    log.error = result.error.map(|e| e.to_string());
    log.emit();
}

/// The address a DNS-resolved ServiceEntry connection goes to: round robin over
/// [`common::dns_cache::entry_addresses`].
async fn resolve_target(
    state: &ProxyState,
    svc: &Service,
    port: u16,
) -> Result<SocketAddr, String> {
    let candidates = common::dns_cache::entry_addresses(&state.dns, svc, port).await?;
    let i = state.next_index(&svc.key(), port, candidates.len());
    Ok(candidates[i % candidates.len()].addr)
}

/// The identities a destination may present: the workload's, plus its service's SANs.
fn expected_identities(w: &Workload, service: Option<&Service>) -> Vec<Identity> {
    let mut ids = vec![w.identity()];
    if let Some(svc) = service {
        ids.extend(
            svc.subject_alt_names
                .iter()
                .filter_map(|s| Identity::parse(s).ok()),
        );
    }
    ids
}

fn connect_headers(source: &Workload, peer: SocketAddr, service: Option<&Service>) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Ok(v) =
        HeaderValue::from_str(&forwarded_value(peer, service.map(|s| s.hostname.as_str())))
    {
        h.insert(headers::FORWARDED, v);
    }
    let baggage = format!(
        "k8s.cluster.name={},k8s.namespace.name={},k8s.pod.name={},service.name={},service.version={}",
        if source.cluster_id.is_empty() { "Kubernetes" } else { &source.cluster_id },
        source.namespace,
        source.name,
        source.canonical_service(),
        source
            .labels
            .get("version")
            .map(String::as_str)
            .unwrap_or("latest"),
    );
    if let Ok(v) = HeaderValue::from_str(&baggage) {
        h.insert(headers::BAGGAGE, v);
    }
    h
}

#[allow(clippy::too_many_arguments)]
async fn tunnel(
    state: &ProxyState,
    stream: TcpStream,
    peer: SocketAddr,
    source: &Workload,
    key: PoolKey,
    authority: SocketAddr,
    service: Option<&Service>,
    labels: TcpLabels,
) -> CopyResult {
    let req = ConnectRequest {
        authority: authority.to_string(),
        headers: connect_headers(source, peer, service),
    };
    let recorder = state.metrics.open(labels);
    match state.hbone.connect(&key, &req).await {
        Ok((h2, _lease)) => {
            let r = copy_tcp_h2(stream, h2).await;
            recorder.close(r.sent, r.received);
            r
        }
        Err(e) => {
            recorder.close(0, 0);
            super::reset(stream);
            CopyResult {
                error: Some(std::io::Error::other(e.to_string())),
                ..Default::default()
            }
        }
    }
}

async fn plain(
    state: &ProxyState,
    stream: TcpStream,
    target: SocketAddr,
    labels: TcpLabels,
) -> CopyResult {
    let recorder = state.metrics.open(labels);
    match socket::connect_marked(target).await {
        Ok(up) => {
            let r = copy_tcp_tcp(stream, up).await;
            recorder.close(r.sent, r.received);
            r
        }
        Err(e) => {
            recorder.close(0, 0);
            super::reset(stream);
            CopyResult {
                error: Some(e),
                ..Default::default()
            }
        }
    }
}

/// Same-node delivery: the inbound checks run here, without a tunnel.
#[allow(clippy::too_many_arguments)]
async fn local(
    state: &ProxyState,
    snap: &Arc<common::snapshot::Snapshot>,
    stream: TcpStream,
    peer: SocketAddr,
    source: &Workload,
    dst: &Workload,
    target: SocketAddr,
    service: Option<&Service>,
) -> CopyResult {
    let identity = source.identity();
    let refuse = |why: String, stream: TcpStream| {
        state.metrics.refused.inc();
        super::reset(stream);
        CopyResult {
            error: Some(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                why,
            )),
            ..Default::default()
        }
    };
    if let Err(denied) = super::authorize(snap, dst, target, peer.ip(), Some(&identity)) {
        return refuse(denied.to_string(), stream);
    }
    let authorized = Authorized {
        path: Path::Local,
        src_ip: peer.ip(),
        identity: Some(identity.clone()),
        target,
    };
    let (_live, revoked) = match revalidate::register(state, snap, authorized) {
        Ok(v) => v,
        Err(why) => return refuse(why, stream),
    };
    let out = state.metrics.open(TcpLabels::new(
        Reporter::source,
        Some(source),
        None,
        Some(dst),
        service,
        SecurityPolicy::mutual_tls,
    ));
    let inb = state.metrics.open(TcpLabels::new(
        Reporter::destination,
        Some(source),
        Some(&identity),
        Some(dst),
        service,
        SecurityPolicy::mutual_tls,
    ));
    match super::connect_to_pod(peer.ip(), target).await {
        Ok(up) => {
            let r = revalidate::until_revoked(copy_tcp_tcp(stream, up), revoked).await;
            out.close(r.sent, r.received);
            inb.close(r.sent, r.received);
            r
        }
        Err(e) => {
            out.close(0, 0);
            inb.close(0, 0);
            super::reset(stream);
            CopyResult {
                error: Some(e),
                ..Default::default()
            }
        }
    }
}
