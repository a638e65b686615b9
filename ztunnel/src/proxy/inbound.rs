//! Inbound HBONE (15008): terminate mTLS presenting the certificate of the pod the connection
//! was addressed to, extract the peer identity, and for each CONNECT stream check the authority,
//! apply L4 policy and connect to the pod with the original client IP.

use super::access_log::AccessLog;
use super::revalidate::{self, Authorized, Path};
use crate::metrics::{Reporter, SecurityPolicy, TcpLabels};
use crate::state::ProxyState;
use common::copy::copy_tcp_h2;
use common::hbone::server::{accept_tls, serve_connection, IncomingConnect};
use common::hbone::{forwarded_host, headers};
use common::identity::Identity;
use common::model::Protocol;
use http::StatusCode;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpStream;

pub async fn handle(
    state: Arc<ProxyState>,
    stream: TcpStream,
    peer: SocketAddr,
    permit: common::admission::ConnPermit,
) {
    let local = match stream.local_addr() {
        Ok(a) => a,
        Err(_) => return,
    };
    let refuse = |why: String, stream: TcpStream| {
        state.metrics.refused.inc();
        let mut log = AccessLog::new("inbound_hbone_refused", peer, local);
        log.error = Some(why);
        log.emit();
        super::reset(stream);
    };
    let snap = state.config.current();
    let Some(dst) = super::local_workload(&snap, &state.node, local.ip())
        .filter(|w| w.protocol == Protocol::Hbone)
    else {
        refuse(
            format!("{} is not a mesh workload on this node", local.ip()),
            stream,
        );
        return;
    };
    drop(snap);
    let cert = match state.certs.get_wait(&dst.identity()).await {
        Ok(c) => c,
        Err(e) => {
            refuse(
                format!("no certificate for {}: {e}", dst.identity()),
                stream,
            );
            return;
        }
    };
    // Waiting for a handshake place and the handshake itself share one deadline.
    let deadline = tokio::time::Instant::now() + state.settings.handshake_timeout;
    let Ok(handshake) = permit.handshake(deadline).await else {
        super::reset(stream);
        return;
    };
    // Boxed: a connection waiting above for its source's handshake place keeps only this
    // small future, not the TLS and HTTP/2 state machines (see common::admission).
    Box::pin(serve_tls(
        state, stream, peer, local, cert, handshake, deadline,
    ))
    .await;
    drop(permit);
}

/// The TLS handshake (within `deadline`) and the HBONE connection that follows.
async fn serve_tls(
    state: Arc<ProxyState>,
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    cert: Arc<common::identity::store::WorkloadCert>,
    handshake: common::admission::HandshakePermit,
    deadline: tokio::time::Instant,
) {
    let (tls_stream, peer_id) = match accept_tls(
        stream,
        cert.server_config.clone(),
        deadline.saturating_duration_since(tokio::time::Instant::now()),
    )
    .await
    {
        Ok(v) => v,
        Err(why) => {
            state.metrics.refused.inc();
            let mut log = AccessLog::new("inbound_hbone_refused", peer, local);
            log.error = Some(why);
            log.emit();
            return;
        }
    };
    drop(handshake);
    let st = state.clone();
    let pid = peer_id.clone();
    let result = serve_connection(
        tls_stream,
        state.settings,
        state.drain.clone(),
        move |req| handle_stream(st.clone(), peer, local, pid.clone(), req),
    )
    .await;
    if let Err(e) = result {
        tracing::debug!(%peer, peer_identity = %peer_id, error = %e, "HBONE connection ended with error");
    }
}

async fn handle_stream(
    state: Arc<ProxyState>,
    peer: SocketAddr,
    local: SocketAddr,
    peer_id: Identity,
    req: IncomingConnect,
) {
    let _guard = state.track();
    let target = req.authority;
    let snap = state.config.current();
    // The TCP peer is the client (its ztunnel connects from the client pod's own address),
    // unless a known waypoint proxies for it.
    let client = req.client(&snap, peer, &peer_id);
    let mut log = AccessLog::new("inbound_hbone", client, target);
    log.peer_identity = Some(peer_id.clone());
    log.upstream = Some(target);
    let reject = |status: StatusCode, why: String, req: IncomingConnect, mut log: AccessLog| {
        state.metrics.refused.inc();
        log.error = Some(format!("{status}: {why}"));
        log.emit();
        req.reject(status);
    };
    if target.ip() != local.ip() {
        reject(
            StatusCode::BAD_REQUEST,
            format!(
                "authority {target} does not match the address the connection arrived on ({})",
                local.ip()
            ),
            req,
            log,
        );
        return;
    }
    let Some(dst) = super::local_workload(&snap, &state.node, target.ip()) else {
        reject(
            StatusCode::BAD_REQUEST,
            format!("{} is not a workload on this node", target.ip()),
            req,
            log,
        );
        return;
    };
    log.dst_workload = Some(dst.name.clone());
    if let Err(denied) = super::authorize(&snap, &dst, target, client.ip(), Some(&peer_id)) {
        reject(StatusCode::UNAUTHORIZED, denied.to_string(), req, log);
        return;
    }
    let source = snap.workload_by_ip(client.ip()).cloned();
    log.src_workload = source.as_ref().map(|w| w.name.clone());
    let service = req
        .headers
        .get(headers::FORWARDED)
        .and_then(|v| v.to_str().ok())
        .and_then(forwarded_host)
        .and_then(|host| {
            dst.services
                .keys()
                .find(|k| k.rsplit_once('/').is_some_and(|(_, h)| h == host))
                .and_then(|k| snap.service_by_key(k))
                .cloned()
        });
    log.dst_service = service.as_ref().map(|s| s.hostname.clone());
    let labels = TcpLabels::new(
        Reporter::destination,
        source.as_deref(),
        Some(&peer_id),
        Some(&dst),
        service.as_deref(),
        SecurityPolicy::mutual_tls,
    );
    let authorized = Authorized {
        path: Path::InboundHbone,
        src_ip: client.ip(),
        identity: Some(peer_id.clone()),
        target,
    };
    let (_live, revoked) = match revalidate::register(&state, &snap, authorized) {
        Ok(v) => v,
        Err(why) => {
            reject(StatusCode::UNAUTHORIZED, why, req, log);
            return;
        }
    };
    drop(snap);
    let upstream = match super::connect_to_pod(client.ip(), target).await {
        Ok(u) => u,
        Err(e) => {
            reject(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("connect {target}: {e}"),
                req,
                log,
            );
            return;
        }
    };
    let tunnel = match req.accept() {
        Ok(t) => t,
        Err(e) => {
            log.error = Some(format!("stream closed before answer: {e}"));
            log.emit();
            return;
        }
    };
    let recorder = state.metrics.open(labels);
    // tcp→h2 is pod→client (Istio "sent"), h2→tcp is client→pod ("received").
    let r = revalidate::until_revoked(copy_tcp_h2(upstream, tunnel), revoked).await;
    recorder.close(r.received, r.sent);
    log.received = r.received;
    log.sent = r.sent;
    log.error = r.error.map(|e| e.to_string());
    log.emit();
}
