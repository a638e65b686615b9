//! HBONE client: opens CONNECT streams over pooled mTLS HTTP/2 connections. Connections are
//! pooled per (shard, source identity, source address, destination address, expected
//! identities), carry up to
//! `max_streams_per_conn` streams each, are kept alive with PINGs and released when idle. Each
//! shard ([`crate::shards`]) has its own connections, driven on its own thread, and spreads
//! its streams over its share of `parallel_connections`.

use super::{H2Settings, H2Stream, HboneError};
use crate::identity::store::CertStore;
use crate::identity::Identity;
use crate::tls;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Opens the TCP connection under the tunnel from the given source address, if any (ztunnel
/// marks its sockets so they are never captured again, and leaves from the source pod's
/// address).
pub type Dialer = Arc<
    dyn Fn(
            Option<IpAddr>,
            SocketAddr,
        ) -> Pin<Box<dyn Future<Output = std::io::Result<TcpStream>> + Send>>
        + Send
        + Sync,
>;

/// A plain dialer with TCP_NODELAY, from the host's own address (ignores the source).
pub fn plain_dialer() -> Dialer {
    Arc::new(|_src, addr| {
        Box::pin(async move {
            let s = TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            Ok(s)
        })
    })
}

/// What a pooled connection is shared by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src: Identity,
    /// The address the connection leaves from (the source pod's), or `None` for the host's.
    pub src_ip: Option<IpAddr>,
    pub dst: SocketAddr,
    pub expected: Vec<Identity>,
}

/// Pool timings.
#[derive(Debug, Clone, Copy)]
pub struct PoolTimings {
    pub connect_timeout: Duration,
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    pub idle_timeout: Duration,
}

impl Default for PoolTimings {
    fn default() -> Self {
        PoolTimings {
            connect_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(10),
            ping_timeout: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(300),
        }
    }
}

struct PooledConn {
    send: h2::client::SendRequest<Bytes>,
    active: AtomicUsize,
    alive: Arc<AtomicBool>,
    /// Milliseconds since the pool's epoch when the last stream ended.
    idle_since: AtomicU64,
    cert_generation: u64,
}

/// Keeps a pooled connection's stream count right for as long as a stream lives.
pub struct StreamLease(Arc<PooledConn>, Arc<Instant>);

impl Drop for StreamLease {
    fn drop(&mut self) {
        self.0
            .idle_since
            .store(self.1.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One attempt to open a connection for a key; everyone who needs it waits for the same
/// outcome.
type Pending = Arc<tokio::sync::OnceCell<Result<(), Arc<HboneError>>>>;

/// The connections of one (shard, key), and the one being opened, if any. The lock is never
/// held across an await.
#[derive(Default)]
struct KeyState {
    conns: Vec<Arc<PooledConn>>,
    pending: Option<Pending>,
}

type KeyPool = Arc<Mutex<KeyState>>;

fn lock_state(pool: &KeyPool) -> std::sync::MutexGuard<'_, KeyState> {
    pool.lock().unwrap_or_else(|p| p.into_inner())
}

/// The pool of outbound HBONE connections of one proxy.
pub struct HboneClient {
    certs: Arc<CertStore>,
    settings: H2Settings,
    timings: PoolTimings,
    dialer: Dialer,
    /// Per (shard, key).
    pools: Mutex<HashMap<(usize, PoolKey), KeyPool>>,
    epoch: Arc<Instant>,
    connections_opened: AtomicU64,
}

/// A CONNECT to send: the authority and extra headers.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    pub authority: String,
    pub headers: HeaderMap,
}

impl HboneClient {
    pub fn new(
        certs: Arc<CertStore>,
        settings: H2Settings,
        timings: PoolTimings,
        dialer: Dialer,
    ) -> Arc<Self> {
        Arc::new(HboneClient {
            certs,
            settings,
            timings,
            dialer,
            pools: Mutex::new(HashMap::new()),
            epoch: Arc::new(Instant::now()),
            connections_opened: AtomicU64::new(0),
        })
    }

    /// How many TLS connections this pool has opened so far.
    pub fn connections_opened(&self) -> u64 {
        self.connections_opened.load(Ordering::Relaxed)
    }

    /// Live pooled connections (for `/config_dump` and tests).
    pub fn pooled_connections(&self) -> usize {
        let pools: Vec<KeyPool> = self.lock_pools().values().cloned().collect();
        pools.iter().map(|p| lock_state(p).conns.len()).sum()
    }

    /// Pool keys held (for `/config_dump` and tests): one per (shard, source, destination,
    /// expected identities) with a live connection or one being opened.
    pub fn pool_keys(&self) -> usize {
        self.lock_pools().len()
    }

    /// Forgets dead connections and, for destinations `keep` no longer wants (a departed pod,
    /// a node that left), closes the idle ones; then drops every key left with no connection
    /// and no attempt under way. Busy connections are never cut: their streams finish and the
    /// next prune takes them. Returns the idle connections closed. Without it the map of keys
    /// only grows (one entry per source pod × destination ever seen).
    pub fn retain(&self, keep: impl Fn(&PoolKey) -> bool) -> usize {
        let mut closed = 0;
        self.lock_pools().retain(|(_, key), pool| {
            let wanted = keep(key);
            let mut state = lock_state(pool);
            state.conns.retain(|c| {
                if !c.alive.load(Ordering::Acquire) {
                    return false;
                }
                if !wanted && c.active.load(Ordering::Acquire) == 0 {
                    c.alive.store(false, Ordering::Release);
                    closed += 1;
                    return false;
                }
                true
            });
            !state.conns.is_empty() || state.pending.is_some()
        });
        closed
    }

    /// [`HboneClient::retain`] keeping every destination: forgets dead connections and empty
    /// keys.
    pub fn prune(&self) {
        self.retain(|_| true);
    }

    /// Prunes every `every` until the client is dropped (idle connections also close on their
    /// own after the idle timeout; this takes away what they leave behind).
    pub fn spawn_pruner(self: &Arc<Self>, every: Duration) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(client) = weak.upgrade() else { return };
                client.prune();
            }
        });
    }

    fn lock_pools(&self) -> std::sync::MutexGuard<'_, HashMap<(usize, PoolKey), KeyPool>> {
        self.pools.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a tunnel: a CONNECT stream answered 200 by the peer.
    pub async fn connect(
        &self,
        key: &PoolKey,
        req: &ConnectRequest,
    ) -> Result<(H2Stream, StreamLease), HboneError> {
        // One retry on a fresh connection if a pooled one turns out to be dead (GOAWAY, reset).
        let mut last_err = None;
        for attempt in 0..2 {
            let conn = self.checkout(key, attempt > 0).await?;
            let lease = StreamLease(conn.clone(), self.epoch.clone());
            match self.open_stream(&conn, req).await {
                Ok(stream) => return Ok((stream, lease)),
                Err(HboneError::H2(e)) if attempt == 0 && (is_goaway(&e) || e.is_io()) => {
                    conn.alive.store(false, Ordering::Release);
                    last_err = Some(HboneError::H2(e));
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or(HboneError::Timeout(self.timings.connect_timeout)))
    }

    async fn open_stream(
        &self,
        conn: &PooledConn,
        req: &ConnectRequest,
    ) -> Result<H2Stream, HboneError> {
        let mut send = conn.send.clone().ready().await?;
        let mut request = Request::builder()
            .method(Method::CONNECT)
            .uri(req.authority.as_str())
            .body(())?;
        *request.headers_mut() = req.headers.clone();
        let (response, send_stream) = send.send_request(request, false)?;
        let response = tokio::time::timeout(self.timings.connect_timeout, response)
            .await
            .map_err(|_| HboneError::Timeout(self.timings.connect_timeout))??;
        if response.status() != StatusCode::OK {
            return Err(HboneError::Status {
                authority: req.authority.clone(),
                status: response.status(),
            });
        }
        Ok(H2Stream {
            send: send_stream,
            recv: response.into_body(),
        })
    }

    /// A pooled connection with room for one more stream, opening one if needed. At most one
    /// connection per key is being opened at a time: callers that need one while it is under
    /// way wait for that attempt and share its outcome (a failure is reported to everyone who
    /// waited for it and then forgotten), so the k-th caller to a dead destination waits one
    /// connect timeout, not k of them.
    async fn checkout(
        &self,
        key: &PoolKey,
        mut fresh: bool,
    ) -> Result<Arc<PooledConn>, HboneError> {
        let pool = self
            .lock_pools()
            .entry((crate::shards::current(), key.clone()))
            .or_default()
            .clone();
        let cert = self
            .certs
            .get_wait(&key.src)
            .await
            .map_err(|e| HboneError::Cert(e.to_string()))?;
        loop {
            let pending = {
                let mut state = lock_state(&pool);
                let now_ms = self.epoch.elapsed().as_millis() as u64;
                let idle_ms = self.timings.idle_timeout.as_millis() as u64;
                // Drop dead connections, idle ones past the idle timeout, and idle ones still
                // carrying a rotated-out certificate (they will never be picked again).
                state.conns.retain(|c| {
                    let idle = c.active.load(Ordering::Acquire) == 0;
                    c.alive.load(Ordering::Acquire)
                        && !(idle
                            && (c.cert_generation != cert.generation
                                || now_ms.saturating_sub(c.idle_since.load(Ordering::Relaxed))
                                    > idle_ms))
                });
                if !fresh {
                    // The least-loaded current connection, unless a busy one should get a
                    // sibling (and none is being opened already).
                    let current = state
                        .conns
                        .iter()
                        .filter(|c| c.cert_generation == cert.generation)
                        .min_by_key(|c| c.active.load(Ordering::Acquire));
                    if let Some(c) = current {
                        let active = c.active.load(Ordering::Acquire);
                        let spread = active > 0
                            && state.conns.len()
                                < crate::shards::per_shard(self.settings.parallel_connections);
                        if active < self.settings.max_streams_per_conn
                            && (!spread || state.pending.is_some())
                        {
                            // We hold the key's lock: nobody else can check out from this set.
                            c.active.fetch_add(1, Ordering::AcqRel);
                            return Ok(c.clone());
                        }
                    }
                }
                state.pending.get_or_insert_with(Default::default).clone()
            };
            let outcome = pending
                .get_or_init(|| self.open_pooled(&pool, &pending, key, &cert))
                .await;
            match outcome {
                // The new connection is in the set now: pick again (it may already be full).
                Ok(()) => fresh = false,
                Err(e) => return Err(HboneError::Shared(e.clone())),
            }
        }
    }

    /// Opens one connection for `key` (the single attempt `pending` stands for), adds it to
    /// the key's set and retires `pending`, whatever the outcome.
    async fn open_pooled(
        &self,
        pool: &KeyPool,
        pending: &Pending,
        key: &PoolKey,
        cert: &crate::identity::store::WorkloadCert,
    ) -> Result<(), Arc<HboneError>> {
        let opened = match cert.client_config(self.certs.roots(), key.expected.clone()) {
            Err(e) => Err(HboneError::Cert(e.to_string())),
            Ok(client_config) => tokio::time::timeout(
                self.timings.connect_timeout,
                self.establish(key.src_ip, key.dst, client_config, cert.generation),
            )
            .await
            .unwrap_or(Err(HboneError::Timeout(self.timings.connect_timeout))),
        };
        let mut state = lock_state(pool);
        if state
            .pending
            .as_ref()
            .is_some_and(|p| Arc::ptr_eq(p, pending))
        {
            state.pending = None;
        }
        match opened {
            Ok(conn) => {
                state.conns.push(conn);
                Ok(())
            }
            Err(e) => Err(Arc::new(e)),
        }
    }

    async fn establish(
        &self,
        src: Option<IpAddr>,
        dst: SocketAddr,
        client_config: rustls::ClientConfig,
        cert_generation: u64,
    ) -> Result<Arc<PooledConn>, HboneError> {
        let tcp = (self.dialer)(src, dst)
            .await
            .map_err(|source| HboneError::Connect { addr: dst, source })?;
        // The HTTP/2 PING keepalive finds a dead peer while the connection is in use; TCP
        // keepalive also covers a pooled connection whose ping task is between rounds and
        // any dialer's socket alike.
        crate::sockopt::keepalive(&tcp);
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
        let mut tls = connector
            .connect(
                tls::no_sni_name(dst.ip()),
                super::transport::Transport::new(tcp),
            )
            .await
            .map_err(|source| HboneError::Tls { addr: dst, source })?;
        let (transport, session) = tls.get_mut();
        transport.enable_buffer();
        session.set_buffer_limit(Some(tls::TLS_SEND_BUFFER_LIMIT));
        let (send, mut connection) = h2::client::Builder::new()
            .initial_window_size(self.settings.stream_window)
            .initial_connection_window_size(self.settings.connection_window)
            .max_frame_size(self.settings.max_frame_size)
            .max_send_buffer_size(self.settings.max_frame_size as usize * 4)
            .enable_push(false)
            .max_header_list_size(self.settings.max_header_list_size)
            .handshake::<_, Bytes>(tls)
            .await?;
        self.connections_opened.fetch_add(1, Ordering::Relaxed);
        let alive = Arc::new(AtomicBool::new(true));
        let pooled = Arc::new(PooledConn {
            send,
            active: AtomicUsize::new(0),
            alive: alive.clone(),
            idle_since: AtomicU64::new(self.epoch.elapsed().as_millis() as u64),
            cert_generation,
        });
        let ping = connection.ping_pong();
        let (dead_tx, dead_rx) = tokio::sync::oneshot::channel::<()>();
        if let Some(ping) = ping {
            tokio::spawn(super::keepalive(
                ping,
                self.timings.ping_interval,
                self.timings.ping_timeout,
                dead_tx,
            ));
        }
        // The driver holds the pooled entry weakly (its send handle would keep the
        // connection open) and closes the connection once it has been idle too long, whether
        // or not anyone checks the pool out again.
        let weak = Arc::downgrade(&pooled);
        let (epoch, idle_timeout) = (self.epoch.clone(), self.timings.idle_timeout);
        tokio::spawn(async move {
            let mut check = tokio::time::interval(
                (idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(30)),
            );
            check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tokio::pin!(connection);
            tokio::pin!(dead_rx);
            loop {
                tokio::select! {
                    r = &mut connection => {
                        if let Err(e) = r {
                            tracing::debug!(%dst, error = %e, "pooled HBONE connection ended");
                        }
                        break;
                    }
                    _ = &mut dead_rx => {
                        tracing::warn!(%dst, "pooled HBONE connection failed its keepalive; closing");
                        break;
                    }
                    _ = check.tick() => {
                        let Some(c) = weak.upgrade() else { break };
                        let idle_ms = (epoch.elapsed().as_millis() as u64)
                            .saturating_sub(c.idle_since.load(Ordering::Relaxed));
                        if c.active.load(Ordering::Acquire) == 0
                            && idle_ms > idle_timeout.as_millis() as u64
                        {
                            c.alive.store(false, Ordering::Release);
                            tracing::debug!(%dst, "closing idle pooled HBONE connection");
                            break;
                        }
                    }
                }
            }
            alive.store(false, Ordering::Release);
        });
        tracing::debug!(%dst, "opened pooled HBONE connection");
        Ok(pooled)
    }
}

fn is_goaway(e: &h2::Error) -> bool {
    e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ca::MeshCa;

    fn client_with(dialer: Dialer, connect_timeout: Duration) -> Arc<HboneClient> {
        let ca = MeshCa::generate("cluster.local").unwrap();
        let certs = Arc::new(CertStore::new(ca, Duration::from_secs(3600)).unwrap());
        HboneClient::new(
            certs,
            H2Settings::default(),
            PoolTimings {
                connect_timeout,
                ..PoolTimings::default()
            },
            dialer,
        )
    }

    fn key() -> PoolKey {
        PoolKey {
            src: Identity::new("cluster.local", "default", "a"),
            src_ip: None,
            dst: "10.255.0.1:15008".parse().unwrap(),
            expected: vec![Identity::new("cluster.local", "default", "b")],
        }
    }

    /// A black-holed destination (the SYN is never answered): N concurrent callers share one
    /// connect attempt and all fail after about one connect timeout, not N of them; the failure
    /// is not remembered, so the next caller tries again.
    #[tokio::test]
    async fn concurrent_connects_to_a_dead_destination_share_one_attempt() {
        let dials = Arc::new(AtomicUsize::new(0));
        let counted = dials.clone();
        let dialer: Dialer = Arc::new(move |_src, _addr| {
            counted.fetch_add(1, Ordering::SeqCst);
            Box::pin(std::future::pending())
        });
        let timeout = Duration::from_millis(300);
        let client = client_with(dialer, timeout);
        let req = ConnectRequest {
            authority: "10.255.0.1:80".into(),
            headers: HeaderMap::new(),
        };
        let start = Instant::now();
        let calls = (0..8).map(|_| {
            let client = client.clone();
            let req = req.clone();
            async move { client.connect(&key(), &req).await.map(|_| ()) }
        });
        let results = futures_util::future::join_all(calls).await;
        let elapsed = start.elapsed();
        assert!(results.iter().all(|r| r.is_err()), "{results:?}");
        assert_eq!(dials.load(Ordering::SeqCst), 1, "one attempt shared by all");
        assert!(
            elapsed < timeout * 2,
            "8 callers took {elapsed:?} (connect timeout {timeout:?})"
        );
        // Not cached: a later caller dials again.
        assert!(client.connect(&key(), &req).await.is_err());
        assert_eq!(dials.load(Ordering::SeqCst), 2);
    }

    /// A pooled connection nobody uses is closed once it has been idle for the idle timeout,
    /// even if no other caller ever comes to prune the pool.
    #[tokio::test]
    async fn idle_pooled_connection_is_closed_without_new_callers() {
        let ca = MeshCa::generate("cluster.local").unwrap();
        let certs = Arc::new(CertStore::new(ca, Duration::from_secs(3600)).unwrap());
        let server_id = Identity::new("cluster.local", "default", "b");
        let server_config = certs.get(&server_id).unwrap().server_config.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let (tls, _) =
                super::super::server::accept_tls(tcp, server_config, Duration::from_secs(5))
                    .await
                    .unwrap();
            // The large read buffer exists once the handshake is done.
            assert!(tls.get_ref().0.is_buffered());
            let (_drain, watch) = crate::drain::Drain::new();
            let r = super::super::server::serve_connection(
                tls,
                H2Settings::default(),
                watch,
                |req| async move {
                    let _ = req.accept();
                },
            )
            .await;
            let _ = closed_tx.send(r.is_ok());
        });
        let client = HboneClient::new(
            certs,
            H2Settings::default(),
            PoolTimings {
                idle_timeout: Duration::from_millis(300),
                ..PoolTimings::default()
            },
            plain_dialer(),
        );
        let key = PoolKey { dst: addr, ..key() };
        let req = ConnectRequest {
            authority: "10.0.0.1:80".into(),
            headers: HeaderMap::new(),
        };
        let (stream, lease) = client.connect(&key, &req).await.unwrap();
        drop((stream, lease));
        assert_eq!(client.pooled_connections(), 1);
        tokio::time::timeout(Duration::from_secs(5), closed_rx)
            .await
            .expect("idle pooled connection still open")
            .unwrap();
    }

    /// An HBONE server on loopback accepting every CONNECT, for pool tests.
    async fn accepting_server(certs: &CertStore) -> SocketAddr {
        let server_id = Identity::new("cluster.local", "default", "b");
        let server_config = certs.get(&server_id).unwrap().server_config.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let server_config = server_config.clone();
                tokio::spawn(async move {
                    let Ok((tls, _)) = super::super::server::accept_tls(
                        tcp,
                        server_config,
                        Duration::from_secs(5),
                    )
                    .await
                    else {
                        return;
                    };
                    let (_drain, watch) = crate::drain::Drain::new();
                    let _ = super::super::server::serve_connection(
                        tls,
                        H2Settings::default(),
                        watch,
                        |req| async move {
                            let _ = req.accept();
                        },
                    )
                    .await;
                });
            }
        });
        addr
    }

    /// The socket under every pooled connection has TCP keepalive, whatever the dialer.
    #[tokio::test]
    async fn pooled_connections_have_tcp_keepalive() {
        let ca = MeshCa::generate("cluster.local").unwrap();
        let certs = Arc::new(CertStore::new(ca, Duration::from_secs(3600)).unwrap());
        let addr = accepting_server(&certs).await;
        let sockets: Arc<std::sync::Mutex<Vec<socket2::Socket>>> = Arc::default();
        let seen = sockets.clone();
        let dialer: Dialer = Arc::new(move |_src, addr| {
            let seen = seen.clone();
            Box::pin(async move {
                let s = TcpStream::connect(addr).await?;
                // Same socket, second descriptor: lets the test read its options later.
                seen.lock()
                    .unwrap()
                    .push(socket2::SockRef::from(&s).try_clone()?);
                Ok(s)
            })
        });
        let client = HboneClient::new(certs, H2Settings::default(), PoolTimings::default(), dialer);
        let req = ConnectRequest {
            authority: "10.0.0.1:80".into(),
            headers: HeaderMap::new(),
        };
        let key = PoolKey { dst: addr, ..key() };
        let _open = client.connect(&key, &req).await.unwrap();
        let sockets = sockets.lock().unwrap();
        assert_eq!(sockets.len(), 1);
        assert!(sockets[0].keepalive().unwrap(), "SO_KEEPALIVE set");
        assert_eq!(
            sockets[0].keepalive_time().unwrap(),
            Duration::from_secs(180)
        );
    }

    /// Keys of departed destinations go away: idle connections to them are closed at once,
    /// busy ones only when their last stream ends, and keys of failed attempts are not kept.
    #[tokio::test]
    async fn retain_closes_idle_connections_to_departed_destinations_and_drops_empty_keys() {
        let ca = MeshCa::generate("cluster.local").unwrap();
        let certs = Arc::new(CertStore::new(ca, Duration::from_secs(3600)).unwrap());
        let addr = accepting_server(&certs).await;
        let client = HboneClient::new(
            certs,
            H2Settings::default(),
            PoolTimings::default(),
            plain_dialer(),
        );
        let req = ConnectRequest {
            authority: "10.0.0.1:80".into(),
            headers: HeaderMap::new(),
        };
        let pods: Vec<PoolKey> = (0..3)
            .map(|i| PoolKey {
                src_ip: Some(IpAddr::from([10, 244, 1, 10 + i])),
                dst: addr,
                ..key()
            })
            .collect();
        let mut busy = None;
        for (i, k) in pods.iter().enumerate() {
            let (stream, lease) = client.connect(k, &req).await.unwrap();
            if i == 2 {
                busy = Some((stream, lease));
            }
        }
        // A failed attempt leaves a key with nothing in it.
        let dead = PoolKey {
            dst: "127.0.0.1:1".parse().unwrap(),
            ..key()
        };
        assert!(client.connect(&dead, &req).await.is_err());
        assert_eq!((client.pool_keys(), client.pooled_connections()), (4, 3));

        client.prune();
        assert_eq!((client.pool_keys(), client.pooled_connections()), (3, 3));

        // Pods 1 and 2 leave: 1's idle connection closes now, 2's busy one stays.
        let gone = [pods[1].src_ip, pods[2].src_ip];
        assert_eq!(client.retain(|k| !gone.contains(&k.src_ip)), 1);
        assert_eq!((client.pool_keys(), client.pooled_connections()), (2, 2));
        drop(busy);
        assert_eq!(client.retain(|k| !gone.contains(&k.src_ip)), 1);
        assert_eq!((client.pool_keys(), client.pooled_connections()), (1, 1));
        // The remaining pod still tunnels over its pooled connection.
        let opened = client.connections_opened();
        client.connect(&pods[0], &req).await.unwrap();
        assert_eq!(client.connections_opened(), opened);
    }
}
