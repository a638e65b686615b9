//! The upstream leg: HTTP connections to endpoints, each carried by its own HBONE CONNECT
//! stream to the endpoint's node ztunnel (15008) with the waypoint's identity. HTTP/1.1
//! connections are kept alive and reused; h2c connections multiplex requests.

use crate::body::{self, Body};
use common::hbone::client::{ConnectRequest, HboneClient, PoolKey, StreamLease};
use common::hbone::io::TunnelIo;
use common::hbone::{forwarded_value, headers, HBONE_PORT};
use common::identity::Identity;
use common::l7::destination_rule::ConnectionPool;
use http::{HeaderMap, HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

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
    _lease: Arc<StreamLease>,
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
    /// Hostname of the service the request was for (`forwarded: …;host=`).
    pub service: String,
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
        let key = PoolKey {
            src: self.identity.clone(),
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
        let (stream, lease) = self
            .hbone
            .connect(&key, &req)
            .await
            .map_err(|e| UpstreamError::Connect(e.to_string()))?;
        let io = TokioIo::new(TunnelIo::new(stream));
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
            _lease: Arc::new(lease),
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
                let resp = fut.await.map_err(|e| UpstreamError::Reset(e.to_string()));
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
                send.await.map_err(|e| UpstreamError::Reset(e.to_string()))
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
