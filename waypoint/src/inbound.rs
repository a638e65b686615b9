//! `inbound_CONNECT_terminate` (15006): mTLS + HTTP/2 CONNECT from ztunnels. The authority
//! names the service (VIP:port) the client meant, or a workload (pod IP:port) that names this
//! waypoint itself; the tunnelled bytes are served as HTTP when
//! they are HTTP (sniffed), and proxied at L4 to an endpoint otherwise.

use crate::app::State;
use crate::proxy::{self, ConnContext};
use crate::sniff::{self, Detected, Prefixed};
use crate::upstream::UpstreamProtocol;
use common::admission::{Admission, ConnPermit};
use common::hbone::io::TunnelIo;
use common::hbone::server::{accept_tls, serve_connection, IncomingConnect};
use common::identity::Identity;
use common::model::PortProtocol;
use common::shards::Shards;
use http::StatusCode;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

pub const LISTENER: &str = "inbound_CONNECT_terminate";

/// Accepts until drain; each connection admitted under the listener's caps lives on the
/// least-loaded shard with its permit; one over a cap is reset at once.
pub async fn serve(
    listener: TcpListener,
    admission: Arc<Admission>,
    state: Arc<State>,
    shards: Arc<Shards>,
) {
    let mut drain = state.drain.clone();
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(listener = LISTENER, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = drain.signaled() => return,
        };
        let Ok(permit) = admission.admit(peer.ip()) else {
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let guard = state.track();
        shards.dispatch(stream, peer, move |stream, peer| async move {
            handle_connection(state, stream, peer, permit).await;
            drop(guard);
        });
    }
}

async fn handle_connection(
    state: Arc<State>,
    stream: TcpStream,
    peer: SocketAddr,
    permit: ConnPermit,
) {
    let cert = match state.certs.get_wait(&state.identity).await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(listener = LISTENER, error = %e, "no certificate");
            return;
        }
    };
    // Waiting for a handshake place and the handshake itself share one deadline.
    let deadline = tokio::time::Instant::now() + state.settings.handshake_timeout;
    let Ok(handshake) = permit.handshake(deadline).await else {
        return;
    };
    // Boxed: a connection waiting above for its source's handshake place keeps only this
    // small future, not the TLS and HTTP/2 state machines (see common::admission).
    Box::pin(serve_tls(state, stream, peer, cert, handshake, deadline)).await;
    drop(permit);
}

/// The TLS handshake (within `deadline`) and the HBONE connection that follows.
async fn serve_tls(
    state: Arc<State>,
    stream: TcpStream,
    peer: SocketAddr,
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
            tracing::info!(listener = LISTENER, %peer, "{why}");
            return;
        }
    };
    drop(handshake);
    let st = state.clone();
    let pid = peer_id.clone();
    let r = serve_connection(
        tls_stream,
        state.settings,
        state.drain.clone(),
        move |req| handle_stream(st.clone(), peer, pid.clone(), req),
    )
    .await;
    if let Err(e) = r {
        tracing::debug!(listener = LISTENER, %peer, error = %e, "HBONE connection ended");
    }
}

async fn handle_stream(
    state: Arc<State>,
    peer: SocketAddr,
    peer_id: Identity,
    req: IncomingConnect,
) {
    let _guard = state.track();
    let target = req.authority;
    let snap = state.config.current();
    // The TCP peer (the client's ztunnel connects from the client pod's address), unless the
    // peer is itself a known waypoint proxying for someone.
    let client = req.client(&snap, peer, &peer_id);
    let service = snap
        .service_by_vip(target.ip())
        .cloned()
        .or_else(|| crate::route::workload_service(&snap, target));
    let Some(service) = service else {
        tracing::info!(listener = LISTENER, %target, %client, "no service or waypoint-enabled workload at this address");
        req.reject(StatusCode::BAD_REQUEST);
        return;
    };
    if !service.ports.contains_key(&target.port()) {
        tracing::info!(listener = LISTENER, %target, service = %service.hostname, "service has no such port");
        req.reject(StatusCode::SERVICE_UNAVAILABLE);
        return;
    }
    let source = snap.workload_by_ip(client.ip()).cloned();
    drop(snap);
    let tunnel = match req.accept() {
        Ok(t) => t,
        Err(_) => return,
    };
    let mut io = TunnelIo::new(tunnel);
    // Protocol selection as Istio does it: the port's declared protocol, else sniffing.
    let declared = service.port_protocol(target.port());
    if declared == PortProtocol::Tcp {
        let io = Prefixed::new(bytes::Bytes::new(), io);
        let conn = crate::tcp::L4Conn {
            target,
            client,
            source: source.as_deref(),
            peer: &peer_id,
            sni: None,
        };
        crate::tcp::forward(&state, &service, conn, io).await;
        return;
    }
    // A client on a declared HTTP port must start its request within the request-header
    // deadline (then hyper times the rest of the head); a TLS client speaks first too, but a
    // port with nothing declared may carry a server-first protocol.
    let sniff_timeout = match declared {
        PortProtocol::Sniff => state.sniff_timeout,
        PortProtocol::Tls => state.settings.handshake_timeout,
        _ => state.request_header_timeout,
    };
    let (detected, prefix) = match sniff::detect(&mut io, sniff_timeout).await {
        Ok((_, prefix)) if prefix.is_empty() && declared != PortProtocol::Sniff => {
            tracing::info!(listener = LISTENER, %client, %target, "client sent nothing within {sniff_timeout:?}; closing");
            return;
        }
        Ok(v) => v,
        Err(e) => {
            tracing::debug!(listener = LISTENER, error = %e, "stream failed while sniffing");
            return;
        }
    };
    let protocol = match (declared, detected) {
        (PortProtocol::Http2, _) | (PortProtocol::Http | PortProtocol::Sniff, Detected::H2c) => {
            UpstreamProtocol::H2c
        }
        (PortProtocol::Http, _) | (PortProtocol::Sniff, Detected::Http1) => UpstreamProtocol::Http1,
        _ => {
            // L4: TLS is routed by the ClientHello's server name (`tls` routes).
            let sni = (detected == Detected::Tls)
                .then(|| crate::client_hello::server_name(&prefix))
                .flatten();
            let io = Prefixed::new(prefix, io);
            let conn = crate::tcp::L4Conn {
                target,
                client,
                source: source.as_deref(),
                peer: &peer_id,
                sni: sni.as_deref(),
            };
            crate::tcp::forward(&state, &service, conn, io).await;
            return;
        }
    };
    let io = Prefixed::new(prefix, io);
    let ctx = Arc::new(ConnContext {
        service,
        port: target.port(),
        target,
        client,
        peer: peer_id,
        source,
        protocol,
        series: Default::default(),
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // hyper's header-read timeout is silently off without a timer.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(state.request_header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(state.settings.max_header_list_size)
        .keep_alive_interval(Some(state.settings.keepalive_interval))
        .keep_alive_timeout(state.settings.keepalive_timeout);
    let svc = hyper::service::service_fn(move |req| proxy::handle(state.clone(), ctx.clone(), req));
    if let Err(e) = builder
        .serve_connection_with_upgrades(TokioIo::new(io), svc)
        .await
    {
        tracing::debug!(listener = LISTENER, error = %e, "HTTP connection ended with error");
    }
}
