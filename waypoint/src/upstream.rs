//! The upstream leg: HTTP connections to endpoints, each carried by its own HBONE CONNECT
//! stream to the endpoint's node ztunnel (15008) with the waypoint's identity, or, for an
//! endpoint outside the mesh (a ServiceEntry's, MESH_EXTERNAL or DNS-resolved), a plain TCP
//! connection from the waypoint (an egress waypoint, as Istio's). HTTP/1.1 connections are
//! kept alive and reused; h2c connections multiplex requests.

use crate::body::{self, Body};
use common::hbone::client::{ConnectRequest, HboneClient, PoolKey, StreamLease};
use common::hbone::io::TunnelIo;
use common::hbone::{forwarded_value, headers, HBONE_PORT};
use common::identity::Identity;
use common::l7::actions::AttemptOutcome;
use common::l7::destination_rule::ConnectionPool;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncWrite};

/// The HTTP version spoken to an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpstreamProtocol {
    Http1,
    H2c,
}

/// Why forwarding failed before a response arrived (maps to Envoy's response flags).
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The tunnel or the HTTP handshake could not be established (`UF`).
    #[error("upstream connect failure: {0}")]
    Connect(String),
    /// The connection broke before a response (`UC`/reset).
    #[error("upstream reset before response: {0}")]
    Reset(String),
    /// The endpoint refused the HTTP/2 stream (RST_STREAM REFUSED_STREAM): it did not process
    /// the request, so `refused-stream` may retry it (`UR`).
    #[error("upstream refused the stream: {0}")]
    RefusedStream(String),
    /// No response within the retry policy's `perTryTimeout` (`UT`, answered 504).
    #[error("upstream request timeout")]
    PerTryTimeout,
}

impl UpstreamError {
    /// Classifies a failed exchange on an established connection.
    fn from_hyper(e: hyper::Error) -> UpstreamError {
        if refused_stream(&e) {
            UpstreamError::RefusedStream(e.to_string())
        } else {
            UpstreamError::Reset(e.to_string())
        }
    }

    /// The attempt outcome a retry policy judges.
    pub fn outcome(&self) -> AttemptOutcome {
        match self {
            UpstreamError::Connect(_) => AttemptOutcome::ConnectFailure,
            UpstreamError::RefusedStream(_) => AttemptOutcome::RefusedStream,
            // Envoy resets the stream when a per-try timeout fires and judges it as a reset
            // (retried under `5xx`, `gateway-error` and `reset`).
            UpstreamError::Reset(_) | UpstreamError::PerTryTimeout => AttemptOutcome::Reset {
                before_request: false,
            },
        }
    }

    /// The status of the local reply when this is the final outcome.
    pub fn status(&self) -> StatusCode {
        match self {
            UpstreamError::PerTryTimeout => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// Whether `e` is an HTTP/2 RST_STREAM with REFUSED_STREAM from the endpoint.
fn refused_stream(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(h2e) = err.downcast_ref::<h2::Error>() {
            return h2e.is_reset() && h2e.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        cur = err.source();
    }
    false
}

/// Why the retry loop stopped although the last outcome was retriable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryStop {
    /// The policy's `attempts` were used up (Envoy's `URX`).
    LimitExceeded,
    /// `maxRetries` retries were already in flight for the cluster (Envoy's `UO`).
    Overflow,
}

/// The response flags of a forwarded request, in Envoy's access-log form: the final attempt's
/// failure (`UT`, `UR`, `UF`, `UC`) and why it was not retried, comma-separated in Envoy's
/// order (`UF,URX`), `-` for none.
pub fn response_flags(error: Option<&UpstreamError>, stop: Option<RetryStop>) -> &'static str {
    use RetryStop::*;
    use UpstreamError::*;
    match (error, stop) {
        (None, None) => "-",
        (None, Some(LimitExceeded)) => "URX",
        (None, Some(Overflow)) => "UO",
        (Some(PerTryTimeout), None) => "UT",
        (Some(PerTryTimeout), Some(LimitExceeded)) => "UT,URX",
        (Some(PerTryTimeout), Some(Overflow)) => "UT,UO",
        (Some(RefusedStream(_)), None) => "UR",
        (Some(RefusedStream(_)), Some(LimitExceeded)) => "UR,URX",
        (Some(RefusedStream(_)), Some(Overflow)) => "UR,UO",
        (Some(Connect(_)), None) => "UF",
        (Some(Connect(_)), Some(LimitExceeded)) => "UF,URX",
        (Some(Connect(_)), Some(Overflow)) => "UF,UO",
        (Some(Reset(_)), None) => "UC",
        (Some(Reset(_)), Some(LimitExceeded)) => "UC,URX",
        (Some(Reset(_)), Some(Overflow)) => "UC,UO",
    }
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Body>),
    H2(hyper::client::conn::http2::SendRequest<Body>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }
    fn is_ready(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_ready(),
            Sender::H2(s) => s.is_ready(),
        }
    }
}

struct Pooled {
    sender: Sender,
    _lease: Option<Arc<StreamLease>>,
    /// Requests this connection has carried (DestinationRule `maxRequestsPerConnection`).
    requests: u32,
    idle_since: std::time::Instant,
}

/// One endpoint to forward to.
#[derive(Debug, Clone)]
pub struct Target {
    /// `<pod ip>:<target port>`: the CONNECT authority.
    pub addr: SocketAddr,
    /// The identity the endpoint's ztunnel presents (the endpoint workload's).
    pub identity: Identity,
    /// Reached over HBONE (a mesh workload); else plain TCP from the waypoint (an endpoint
    /// outside the mesh).
    pub tunnel: bool,
    /// Hostname of the service the request was for (`forwarded: …;host=`).
    pub service: String,
}

/// A byte stream to an endpoint: an HBONE stream or a plain TCP connection.
pub trait EndpointIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> EndpointIo for T {}

/// Opens a byte stream to `target`: an HBONE CONNECT stream to its node's ztunnel (the client
/// address in `forwarded`, the waypoint's identity, the endpoint's identity verified), or a
/// plain TCP connection from the waypoint to an endpoint outside the mesh. The lease keeps the
/// HBONE connection's slot while the stream lives.
pub async fn open(
    hbone: &HboneClient,
    identity: &Identity,
    target: &Target,
    client: SocketAddr,
) -> Result<(Box<dyn EndpointIo>, Option<StreamLease>), String> {
    if !target.tunnel {
        let s = tokio::net::TcpStream::connect(target.addr)
            .await
            .map_err(|e| format!("connect {}: {e}", target.addr))?;
        let _ = s.set_nodelay(true);
        common::sockopt::keepalive(&s);
        return Ok((Box::new(s), None));
    }
    let key = PoolKey {
        src: identity.clone(),
        src_ip: None,
        dst: SocketAddr::new(target.addr.ip(), HBONE_PORT),
        expected: vec![target.identity.clone()],
    };
    let mut hdrs = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&forwarded_value(client, Some(&target.service))) {
        hdrs.insert(headers::FORWARDED, v);
    }
    let req = ConnectRequest {
        authority: target.addr.to_string(),
        headers: hdrs,
    };
    let (stream, lease) = hbone.connect(&key, &req).await.map_err(|e| e.to_string())?;
    Ok((Box::new(TunnelIo::new(stream)), Some(lease)))
}

/// (shard, endpoint, protocol, original client IP).
type IdleKey = (usize, SocketAddr, UpstreamProtocol, std::net::IpAddr);

pub struct Upstreams {
    hbone: Arc<HboneClient>,
    identity: Identity,
    /// Idle connections per (shard, endpoint, protocol, original client IP): a connection is
    /// driven on the shard that opened it and reused only there ([`common::shards`]); the
    /// client IP travels in the tunnel's `forwarded` header, so a connection is only reused
    /// for the same client.
    idle: Mutex<HashMap<IdleKey, Vec<Pooled>>>,
    max_idle_per_endpoint: usize,
}

impl Upstreams {
    pub fn new(hbone: Arc<HboneClient>, identity: Identity) -> Self {
        Upstreams {
            hbone,
            identity,
            idle: Mutex::new(HashMap::new()),
            max_idle_per_endpoint: 64,
        }
    }

    /// Closes idle upstream connections that are closed already or idle longer than
    /// `max_idle`, or whose endpoint `known` no longer lists, and forgets keys left empty (one
    /// key per endpoint × client: without this the map grows with every client ever seen).
    /// Returns the connections dropped.
    pub fn prune(
        &self,
        max_idle: std::time::Duration,
        known: impl Fn(&SocketAddr) -> bool,
    ) -> usize {
        let now = std::time::Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let mut dropped = 0;
        idle.retain(|(_, endpoint, _, _), list| {
            let keep_endpoint = known(endpoint);
            let before = list.len();
            list.retain(|p| {
                keep_endpoint
                    && !p.sender.is_closed()
                    && now.duration_since(p.idle_since) < max_idle
            });
            dropped += before - list.len();
            !list.is_empty()
        });
        dropped
    }

    fn take_idle(&self, key: IdleKey, limits: &ConnectionPool) -> Option<Pooled> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(&key)?;
        let max_idle = limits.idle_timeout.0;
        let now = std::time::Instant::now();
        list.retain(|p| !p.sender.is_closed() && now.duration_since(p.idle_since) < max_idle);
        let i = list.iter().position(|p| p.sender.is_ready())?;
        Some(list.swap_remove(i))
    }

    fn put_idle(&self, key: IdleKey, mut p: Pooled, limits: &ConnectionPool) {
        if limits.max_requests_per_connection > 0
            && p.requests >= limits.max_requests_per_connection
        {
            return; // dropping it closes the connection once its response is done
        }
        p.idle_since = std::time::Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(key).or_default();
        if list.len() < self.max_idle_per_endpoint {
            list.push(p);
        }
    }

    async fn connect(
        &self,
        target: &Target,
        proto: UpstreamProtocol,
        client: SocketAddr,
    ) -> Result<Pooled, UpstreamError> {
        let (io, lease) = open(&self.hbone, &self.identity, target, client)
            .await
            .map_err(UpstreamError::Connect)?;
        let io = TokioIo::new(io);
        let sender = match proto {
            UpstreamProtocol::Http1 => {
                let (send, conn) = hyper::client::conn::http1::Builder::new()
                    .handshake(io)
                    .await
                    .map_err(|e| UpstreamError::Connect(e.to_string()))?;
                tokio::spawn(async move {
                    let _ = conn.with_upgrades().await;
                });
                Sender::H1(send)
            }
            UpstreamProtocol::H2c => {
                let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                    .handshake(io)
                    .await
                    .map_err(|e| UpstreamError::Connect(e.to_string()))?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Sender::H2(send)
            }
        };
        Ok(Pooled {
            sender,
            _lease: lease.map(Arc::new),
            requests: 0,
            idle_since: std::time::Instant::now(),
        })
    }

    /// Sends `req` to `target`, reusing an idle connection when there is one. `client` is the
    /// original client address, carried to the endpoint's ztunnel in `forwarded`.
    pub async fn send(
        &self,
        target: &Target,
        proto: UpstreamProtocol,
        client: SocketAddr,
        limits: &ConnectionPool,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let key = (common::shards::current(), target.addr, proto, client.ip());
        let pooled = match self.take_idle(key, limits) {
            Some(p) => p,
            None => tokio::time::timeout(
                limits.connect_timeout.0,
                self.connect(target, proto, client),
            )
            .await
            .map_err(|_| {
                UpstreamError::Connect(format!("connect timeout {:?}", limits.connect_timeout.0))
            })??,
        };
        let Pooled {
            sender,
            _lease,
            requests,
            idle_since,
        } = pooled;
        let requests = requests + 1;
        match sender {
            Sender::H1(mut s) => {
                let fut = s.send_request(req);
                let resp = fut.await.map_err(UpstreamError::from_hyper);
                // The connection becomes ready again once the response body is consumed;
                // `take_idle` only hands out ready ones.
                if !s.is_closed() {
                    self.put_idle(
                        key,
                        Pooled {
                            sender: Sender::H1(s),
                            _lease,
                            requests,
                            idle_since,
                        },
                        limits,
                    );
                }
                resp
            }
            Sender::H2(mut s) => {
                let send = s.send_request(req);
                // h2 multiplexes: the connection is immediately available to others.
                self.put_idle(
                    key,
                    Pooled {
                        sender: Sender::H2(s.clone()),
                        _lease,
                        requests,
                        idle_since,
                    },
                    limits,
                );
                send.await.map_err(UpstreamError::from_hyper)
            }
        }
    }
}

/// The protocol of the upstream leg: the client's, unless the DestinationRule upgrades
/// HTTP/1.1 to HTTP/2 (`h2UpgradePolicy: UPGRADE` without `useClientProtocol`).
pub fn protocol_for(downstream: UpstreamProtocol, limits: &ConnectionPool) -> UpstreamProtocol {
    if limits.h2_upgrade && !limits.use_client_protocol {
        UpstreamProtocol::H2c
    } else {
        downstream
    }
}

/// Adapts an upstream response for the downstream side.
pub fn into_downstream(resp: Response<Incoming>) -> Response<Body> {
    resp.map(body::incoming)
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::l7::actions::RetryPolicy;

    /// The error a hyper h2 client gets when the server resets its stream with `reason`.
    async fn h2_reset_error(reason: h2::Reason) -> UpstreamError {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(server_io).await.unwrap();
            if let Some(Ok((_req, mut respond))) = conn.accept().await {
                respond.send_reset(reason);
            }
            // Keep the connection driven until the client goes away.
            while conn.accept().await.is_some() {}
        });
        let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(client_io))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::builder()
            .uri("http://endpoint/")
            .body(body::full("x"))
            .unwrap();
        let err = send.send_request(req).await.unwrap_err();
        server.abort();
        UpstreamError::from_hyper(err)
    }

    #[tokio::test]
    async fn refused_stream_is_told_apart_from_other_resets() {
        let e = h2_reset_error(h2::Reason::REFUSED_STREAM).await;
        assert!(matches!(e, UpstreamError::RefusedStream(_)), "{e:?}");
        assert_eq!(e.outcome(), AttemptOutcome::RefusedStream);
        assert_eq!(response_flags(Some(&e), None), "UR");
        let e = h2_reset_error(h2::Reason::INTERNAL_ERROR).await;
        assert!(matches!(e, UpstreamError::Reset(_)), "{e:?}");
        assert_eq!(response_flags(Some(&e), None), "UC");
    }

    #[test]
    fn istio_default_retries_refused_streams_but_not_per_try_timeouts() {
        let p = RetryPolicy::istio_default();
        let refused = UpstreamError::RefusedStream("x".into());
        let connect = UpstreamError::Connect("x".into());
        let reset = UpstreamError::Reset("x".into());
        let timeout = UpstreamError::PerTryTimeout;
        assert!(p.retriable(refused.outcome()));
        assert!(p.retriable(connect.outcome()));
        // Envoy retries a per-try timeout (a local reset) only under 5xx, gateway-error or
        // reset, none of which Istio's default has.
        assert!(!p.retriable(timeout.outcome()));
        assert!(!p.retriable(reset.outcome()));
        let mut five = RetryPolicy::istio_default();
        five.retry_on = vec![common::l7::actions::RetryOn::FiveXx];
        assert!(five.retriable(timeout.outcome()));
        assert!(five.retriable(refused.outcome()));
    }

    #[test]
    fn final_failures_answer_envoys_status_and_flags() {
        let timeout = UpstreamError::PerTryTimeout;
        assert_eq!(timeout.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(timeout.to_string(), "upstream request timeout");
        assert_eq!(response_flags(Some(&timeout), None), "UT");
        assert_eq!(
            response_flags(Some(&timeout), Some(RetryStop::LimitExceeded)),
            "UT,URX"
        );
        let connect = UpstreamError::Connect("refused".into());
        assert_eq!(connect.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            response_flags(Some(&connect), Some(RetryStop::LimitExceeded)),
            "UF,URX"
        );
        assert_eq!(
            response_flags(Some(&connect), Some(RetryStop::Overflow)),
            "UF,UO"
        );
        assert_eq!(response_flags(None, Some(RetryStop::LimitExceeded)), "URX");
        assert_eq!(response_flags(None, None), "-");
    }
}
