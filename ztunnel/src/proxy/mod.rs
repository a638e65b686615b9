//! The data-plane listeners and what they share: the accept loop, delivery to a local pod
//! (used by every inbound path), refusal with a TCP reset, and the per-connection access log.
//!
//! - `outbound`: 15001, captured pod egress → filter chain → HBONE / local / passthrough.
//! - `inbound`: 15008, HBONE termination → policy → pod (client IP preserved).
//! - `inbound_passthrough`: 15006, plaintext to a local pod → PeerAuthentication + policy → pod.

pub mod access_log;
pub mod filter_chain;
pub mod inbound;
pub mod inbound_passthrough;
pub mod outbound;
pub mod revalidate;

use crate::socket;
use crate::state::ProxyState;
use common::admission::{Admission, ConnPermit};
use common::identity::Identity;
use common::model::Workload;
use common::policy::{self, ConnectionInfo, Denied};
use common::shards::Shards;
use common::snapshot::Snapshot;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};

/// Accepts until drain; each connection admitted under the listener's caps runs `handler` on
/// the least-loaded shard, tracked for drain, holding its admission permit; one over a cap is
/// reset at once.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    admission: Arc<Admission>,
    state: Arc<ProxyState>,
    shards: Arc<Shards>,
    handler: F,
) where
    F: Fn(Arc<ProxyState>, TcpStream, SocketAddr, ConnPermit) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let name = admission.listener();
    let mut drain = state.drain.clone();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = drain.signaled() => {
                tracing::info!(listener = name, "draining: no longer accepting");
                return;
            }
        };
        match accepted {
            Ok((stream, peer)) => {
                let Ok(permit) = admission.admit(peer.ip()) else {
                    reset(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                keepalive(&stream);
                let guard = state.track();
                let (state, handler) = (state.clone(), handler.clone());
                shards.dispatch(stream, peer, move |stream, peer| async move {
                    handler(state, stream, peer, permit).await;
                    drop(guard);
                });
            }
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(listener = name, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

pub use common::sockopt::keepalive;

pub fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
}

/// L4 authorization of a connection to a local workload.
pub fn authorize(
    snap: &Snapshot,
    dst: &Workload,
    target: SocketAddr,
    src_ip: IpAddr,
    identity: Option<&Identity>,
) -> Result<(), Denied> {
    let via_waypoint = identity.is_some_and(|id| is_waypoint_of(snap, dst, id));
    policy::authorize(
        snap,
        &ConnectionInfo {
            src_ip,
            src_identity: identity,
            dst,
            dst_ip: target.ip(),
            dst_port: target.port(),
            via_waypoint,
        },
    )
}

/// Whether `peer` is the waypoint of `dst` or of one of the services `dst` serves.
fn is_waypoint_of(snap: &Snapshot, dst: &Workload, peer: &Identity) -> bool {
    let is = |wp: &Option<common::model::GatewayAddress>| {
        wp.as_ref()
            .and_then(|w| w.identity.as_ref())
            .is_some_and(|id| id == peer)
    };
    is(&dst.waypoint)
        || dst
            .services
            .keys()
            .filter_map(|k| snap.service_by_key(k))
            .any(|svc| is(&svc.waypoint))
}

/// Opens the connection to a local pod, with the client's IP as source where possible.
pub async fn connect_to_pod(client: IpAddr, target: SocketAddr) -> std::io::Result<TcpStream> {
    match socket::connect_spoofed(client, target).await {
        Ok(s) => {
            keepalive(&s);
            Ok(s)
        }
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Err(e),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Err(e),
        Err(e) => {
            tracing::warn!(%client, %target, error = %e, "cannot preserve the client IP; connecting from the node");
            socket::connect_marked(target).await
        }
    }
}

/// The local mesh workload owning `ip` on this node, if any.
pub fn local_workload(snap: &Snapshot, node: &str, ip: IpAddr) -> Option<Arc<Workload>> {
    snap.workload_by_ip(ip).filter(|w| w.node == node).cloned()
}
