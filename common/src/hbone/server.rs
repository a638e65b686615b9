//! HBONE server: drives one mTLS HTTP/2 connection, hands each CONNECT stream to a handler on
//! its own task, and answers malformed requests on that stream only. Draining sends GOAWAY and
//! lets the streams in flight finish.

use super::{H2Settings, H2Stream};
use crate::drain::DrainWatch;
use crate::identity::Identity;
use crate::snapshot::Snapshot;
use crate::task::AbortOnDrop;
use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use tokio::io::{AsyncRead, AsyncWrite};

/// A CONNECT request waiting for its answer.
pub struct IncomingConnect {
    pub authority: SocketAddr,
    pub headers: HeaderMap,
    respond: SendResponse<Bytes>,
    recv: RecvStream,
}

/// A terminated HBONE transport: TLS over a buffered TCP socket.
pub type HboneTls =
    tokio_rustls::server::TlsStream<super::transport::Transport<tokio::net::TcpStream>>;

/// Terminates mTLS on an accepted HBONE socket and returns the peer's SPIFFE identity. The error says why, for the access log.
pub async fn accept_tls(
    stream: tokio::net::TcpStream,
    config: std::sync::Arc<rustls::ServerConfig>,
    timeout: std::time::Duration,
) -> Result<(HboneTls, crate::identity::Identity), String> {
    // The large read buffer and send queue come only after the handshake: a peer that stalls
    // in it holds a socket and rustls' own state, nothing more.
    let accept =
        tokio_rustls::TlsAcceptor::from(config).accept(super::transport::Transport::new(stream));
    let mut tls = match tokio::time::timeout(timeout, accept).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(format!("TLS handshake failed: {e}")),
        Err(_) => return Err(format!("TLS handshake timed out after {timeout:?}")),
    };
    let (transport, session) = tls.get_mut();
    transport.enable_buffer();
    session.set_buffer_limit(Some(crate::tls::TLS_SEND_BUFFER_LIMIT));
    let id = crate::tls::peer_identity(tls.get_ref().1.peer_certificates())
        .map_err(|e| format!("peer has no identity: {e}"))?;
    Ok((tls, id))
}

/// Whether the HBONE peer is a waypoint of the mesh: its verified identity is that of a
/// workload at the peer's own address, and some service or workload names that address and
/// identity as its waypoint. Only such a peer proxies for others; both must hold.
pub fn is_known_waypoint(snap: &Snapshot, peer_ip: IpAddr, peer_id: &Identity) -> bool {
    let Some(w) = snap.workload_by_ip(peer_ip) else {
        return false;
    };
    if w.identity() != *peer_id {
        return false;
    }
    // A waypoint pod, or a pod of a waypoint's Service (scaled waypoints are named by VIP),
    // whose identity is the one the binding resolved to.
    let mut addresses = snap.waypoint_addresses();
    addresses.retain(|_, id| id.is_some_and(|id| id == peer_id));
    snap.is_waypoint(w, &addresses)
}

impl IncomingConnect {
    /// The `forwarded: for=` address, if the header has one.
    pub fn forwarded_for(&self) -> Option<SocketAddr> {
        self.headers
            .get(super::headers::FORWARDED)
            .and_then(|v| v.to_str().ok())
            .and_then(super::forwarded_for)
    }

    /// The original client: the TCP peer, unless the peer is a waypoint this snapshot knows
    /// ([`is_known_waypoint`]), whose `forwarded: for=` names the client it proxies. Any
    /// other peer's `forwarded` is ignored (a mesh peer cannot choose the source address
    /// policy and the destination pod see), except for its port when it names the peer's own
    /// address (the client application's port, for access logs).
    pub fn client(&self, snap: &Snapshot, peer: SocketAddr, peer_id: &Identity) -> SocketAddr {
        let Some(fwd) = self.forwarded_for() else {
            return peer;
        };
        if fwd.ip() == peer.ip() {
            // The address is the wire's; the port is the application's own (for logs).
            return if fwd.port() == 0 { peer } else { fwd };
        }
        if is_known_waypoint(snap, peer.ip(), peer_id) {
            return fwd;
        }
        tracing::debug!(%peer, peer_identity = %peer_id, forwarded_for = %fwd, "ignoring `forwarded` from a peer that is not a known waypoint");
        peer
    }

    /// Answers 200 and returns the tunnel stream.
    pub fn accept(mut self) -> Result<H2Stream, h2::Error> {
        let send = self
            .respond
            .send_response(status_response(StatusCode::OK), false)?;
        Ok(H2Stream {
            send,
            recv: self.recv,
        })
    }

    /// Answers with an error status and ends the stream.
    pub fn reject(mut self, status: StatusCode) {
        let _ = self.respond.send_response(status_response(status), true);
    }
}

fn status_response(status: StatusCode) -> Response<()> {
    let mut r = Response::new(());
    *r.status_mut() = status;
    r
}

/// Validates an incoming request as an HBONE CONNECT: method CONNECT and an `ip:port` authority.
pub fn parse_connect(req: &Request<RecvStream>) -> Result<SocketAddr, (StatusCode, String)> {
    if req.method() != Method::CONNECT {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("method {} is not CONNECT", req.method()),
        ));
    }
    let authority = req
        .uri()
        .authority()
        .ok_or_else(|| (StatusCode::BAD_REQUEST, "missing :authority".to_string()))?;
    authority.as_str().parse::<SocketAddr>().map_err(|_| {
        (
            StatusCode::BAD_REQUEST,
            format!("authority {authority} is not <ip>:<port>"),
        )
    })
}

/// Why a served HBONE connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    #[error("peer sent no {what} within {after:?}")]
    Timeout {
        what: &'static str,
        after: std::time::Duration,
    },
    #[error("peer did not answer a PING within {0:?}")]
    Dead(std::time::Duration),
}

/// Serves one HBONE connection until the peer closes it or a drain completes. `handler` runs on
/// its own task for every well-formed CONNECT; malformed ones are answered here.
pub async fn serve_connection<IO, F, Fut>(
    io: IO,
    settings: H2Settings,
    mut drain: DrainWatch,
    handler: F,
) -> Result<(), ServeError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    F: Fn(IncomingConnect) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let handshake = h2::server::Builder::new()
        .initial_window_size(settings.stream_window)
        .initial_connection_window_size(settings.connection_window)
        .max_frame_size(settings.max_frame_size)
        .max_concurrent_streams(settings.server_max_concurrent_streams)
        .max_send_buffer_size(settings.max_frame_size as usize * 4)
        .max_header_list_size(settings.max_header_list_size)
        .handshake::<_, Bytes>(io);
    let mut conn = tokio::time::timeout(settings.handshake_timeout, handshake)
        .await
        .map_err(|_| ServeError::Timeout {
            what: "HTTP/2 preface",
            after: settings.handshake_timeout,
        })??;
    // A peer that never asks for a stream is closed at the handshake deadline; one that goes
    // silent later is found by PINGs.
    let first_deadline = tokio::time::sleep(settings.handshake_timeout);
    tokio::pin!(first_deadline);
    let mut got_stream = false;
    let (dead_tx, mut dead_rx) = tokio::sync::oneshot::channel::<()>();
    let _keepalive = conn.ping_pong().map(|ping| {
        AbortOnDrop(tokio::spawn(super::keepalive(
            ping,
            settings.keepalive_interval,
            settings.keepalive_timeout,
            dead_tx,
        )))
    });
    let mut draining = drain.is_draining();
    if draining {
        conn.graceful_shutdown();
    }
    loop {
        let next = tokio::select! {
            next = conn.accept() => next,
            _ = drain.signaled(), if !draining => {
                draining = true;
                conn.graceful_shutdown();
                continue;
            }
            _ = &mut first_deadline, if !got_stream => {
                conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                return Err(ServeError::Timeout {
                    what: "CONNECT request",
                    after: settings.handshake_timeout,
                });
            }
            Ok(()) = &mut dead_rx => {
                conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                return Err(ServeError::Dead(settings.keepalive_timeout));
            }
        };
        got_stream = true;
        let Some(next) = next else { return Ok(()) };
        let (req, mut respond) = match next {
            Ok(r) => r,
            Err(e) if e.is_reset() => continue,
            Err(e) => return Err(e.into()),
        };
        match parse_connect(&req) {
            Ok(authority) => {
                let (parts, recv) = req.into_parts();
                tokio::spawn(handler(IncomingConnect {
                    authority,
                    headers: parts.headers,
                    respond,
                    recv,
                }));
            }
            Err((status, why)) => {
                tracing::info!(%status, reason = %why, "rejected malformed HBONE request");
                let _ = respond.send_response(status_response(status), true);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn settings(deadline: Duration) -> H2Settings {
        H2Settings {
            handshake_timeout: deadline,
            ..H2Settings::default()
        }
    }

    /// Serves one in-memory connection with a handler that accepts every CONNECT.
    fn serve(
        io: tokio::io::DuplexStream,
        settings: H2Settings,
    ) -> tokio::task::JoinHandle<Result<(), ServeError>> {
        let (drain, watch) = crate::drain::Drain::new();
        tokio::spawn(async move {
            let _drain = drain;
            serve_connection(io, settings, watch, |req: IncomingConnect| async move {
                if let Ok(mut s) = req.accept() {
                    let _ = s.send.send_data(Bytes::from_static(b"ok"), true);
                }
            })
            .await
        })
    }

    /// A peer that completes TLS and then never sends the HTTP/2 preface is closed at the
    /// deadline.
    #[tokio::test]
    async fn silent_peer_without_preface_is_closed() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let start = Instant::now();
        let served = serve(server, settings(Duration::from_millis(300)));
        let r = tokio::time::timeout(Duration::from_secs(5), served)
            .await
            .expect("server still waiting for the preface");
        assert!(r.unwrap().is_err());
        assert!(start.elapsed() < Duration::from_secs(2));
        drop(client);
    }

    /// A peer that sends the preface but never a CONNECT is closed at the deadline too.
    #[tokio::test]
    async fn peer_without_a_connect_is_closed() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let start = Instant::now();
        let served = serve(server, settings(Duration::from_millis(300)));
        let (_send, conn) = h2::client::handshake(client).await.unwrap();
        let driver = tokio::spawn(conn);
        let r = tokio::time::timeout(Duration::from_secs(5), served)
            .await
            .expect("server still waiting for a CONNECT");
        assert!(r.unwrap().is_err());
        assert!(start.elapsed() < Duration::from_secs(2));
        // The client sees its connection end.
        let _ = tokio::time::timeout(Duration::from_secs(5), driver)
            .await
            .expect("client connection not closed");
    }

    /// Request headers beyond 64 KiB are refused; a normal CONNECT on the same connection
    /// still works.
    #[tokio::test]
    async fn oversized_headers_are_refused() {
        let (client, server) = tokio::io::duplex(1 << 20);
        let _served = serve(server, settings(Duration::from_secs(5)));
        let (send, conn) = h2::client::handshake(client).await.unwrap();
        tokio::spawn(conn);
        let connect = |extra: usize| {
            let mut send = send.clone();
            async move {
                send = send.ready().await?;
                let mut req = Request::builder()
                    .method(Method::CONNECT)
                    .uri("10.0.0.1:80")
                    .body(())
                    .unwrap();
                if extra > 0 {
                    let big = "a".repeat(extra);
                    req.headers_mut()
                        .insert("x-big", http::HeaderValue::from_str(&big).unwrap());
                }
                let (resp, _send) = send.send_request(req, false)?;
                resp.await.map(|r| r.status())
            }
        };
        let big = connect(100 * 1024).await;
        assert!(
            big.as_ref().map_or(true, |s| *s != StatusCode::OK),
            "100 KiB of headers answered {big:?}"
        );
        assert_eq!(connect(1024).await.unwrap(), StatusCode::OK);
    }
}
