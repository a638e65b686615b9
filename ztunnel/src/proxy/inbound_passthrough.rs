//! Inbound plaintext (15006): TCP to a local mesh pod that did not come over HBONE. Refused
//! under PeerAuthentication STRICT; under PERMISSIVE, L4 policy (with no peer identity) applies
//! and the connection is delivered with the client's IP.

use super::access_log::AccessLog;
use super::revalidate::{self, Authorized, Path};
use crate::metrics::{Reporter, SecurityPolicy, TcpLabels};
use crate::state::ProxyState;
use common::copy::copy_tcp_tcp;
use common::model::MtlsMode;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpStream;

pub async fn handle(
    state: Arc<ProxyState>,
    stream: TcpStream,
    peer: SocketAddr,
    _permit: common::admission::ConnPermit,
) {
    let target = match stream.local_addr() {
        Ok(a) => a,
        Err(_) => return,
    };
    let mut log = AccessLog::new("inbound_plaintext", peer, target);
    log.upstream = Some(target);
    let snap = state.config.current();
    let refuse = |why: String, stream: TcpStream, mut log: AccessLog| {
        state.metrics.refused.inc();
        log.error = Some(why);
        log.emit();
        super::reset(stream);
    };
    let Some(dst) = super::local_workload(&snap, &state.node, target.ip()) else {
        refuse(
            format!("{} is not a workload on this node", target.ip()),
            stream,
            log,
        );
        return;
    };
    log.dst_workload = Some(dst.name.clone());
    if snap.mtls_mode(&dst, target.port()) == MtlsMode::Strict {
        refuse(
            format!(
                "plaintext refused: PeerAuthentication STRICT for {}",
                dst.name
            ),
            stream,
            log,
        );
        return;
    }
    if let Err(denied) = super::authorize(&snap, &dst, target, peer.ip(), None) {
        refuse(denied.to_string(), stream, log);
        return;
    }
    let source = snap.workload_by_ip(peer.ip()).cloned();
    log.src_workload = source.as_ref().map(|w| w.name.clone());
    let labels = TcpLabels::new(
        Reporter::destination,
        source.as_deref(),
        None,
        Some(&dst),
        None,
        SecurityPolicy::none,
    );
    let authorized = Authorized {
        path: Path::InboundPlaintext,
        src_ip: peer.ip(),
        identity: None,
        target,
    };
    let (_live, revoked) = match revalidate::register(&state, &snap, authorized) {
        Ok(v) => v,
        Err(why) => {
            refuse(why, stream, log);
            return;
        }
    };
    drop(snap);
    let upstream = match super::connect_to_pod(peer.ip(), target).await {
        Ok(u) => u,
        Err(e) => {
            refuse(format!("connect {target}: {e}"), stream, log);
            return;
        }
    };
    let recorder = state.metrics.open(labels);
    let r = revalidate::until_revoked(copy_tcp_tcp(stream, upstream), revoked).await;
    recorder.close(r.sent, r.received);
    log.received = r.sent;
    log.sent = r.received;
    log.error = r.error.map(|e| e.to_string());
    log.emit();
}
