//! Serves gRPC routes (the ADS service, and the CA next to it) on a TCP listener: TLS with
//! rustls (ALPN `h2`; Istio's ztunnel dials https only and checks the certificate's DNS SAN)
//! or plaintext for tests, HTTP/2 keepalive pings, and a max connection age with jitter so
//! clients rebalance across replicas: at its age a connection sends GOAWAY and its ADS streams
//! end cleanly (ztunnel reconnects at once, on a new connection), then it gets a grace period.

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::codegen::Service;
use tonic::service::Routes;

/// Transport settings.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// TLS; `None` serves plaintext HTTP/2 (tests). `h2` is added to the ALPN list.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Close connections after about this long (istiod: 30 min); `None` keeps them.
    pub max_connection_age: Option<Duration>,
    /// Each connection's age is drawn from `age × (1 ± jitter)`.
    pub max_connection_age_jitter: f64,
    /// After GOAWAY, how long open streams may take before the connection is dropped; also the
    /// shutdown grace.
    pub grace: Duration,
    /// HTTP/2 PING interval (`None`: no pings) and how long to wait for the answer.
    pub keepalive_interval: Option<Duration>,
    /// See `keepalive_interval`.
    pub keepalive_timeout: Duration,
    /// TLS handshake deadline.
    pub handshake_timeout: Duration,
    /// HTTP/2 flow-control windows (large: a full push is megabytes).
    pub stream_window: u32,
    /// See `stream_window`.
    pub connection_window: u32,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            tls: None,
            max_connection_age: Some(Duration::from_secs(30 * 60)),
            max_connection_age_jitter: 0.1,
            grace: Duration::from_secs(10),
            keepalive_interval: Some(Duration::from_secs(30)),
            keepalive_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            stream_window: 4 << 20,
            connection_window: 16 << 20,
        }
    }
}

/// Attached to every request of a connection served by [`serve`].
#[derive(Debug, Clone)]
pub struct ConnectionContext {
    /// The client's address.
    pub peer: Option<SocketAddr>,
    /// Becomes `true` when the connection is closing (max age, shutdown): long-lived streams
    /// should end.
    pub closing: watch::Receiver<bool>,
}

/// A random factor in `[1 - jitter, 1 + jitter]`.
fn jittered(age: Duration, jitter: f64) -> Duration {
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let unit = (r >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
    let j = jitter.clamp(0.0, 1.0);
    age.mul_f64(1.0 - j + 2.0 * j * unit)
}

/// Serves `routes` on `listener` until `shutdown` resolves; then stops accepting, tells every
/// connection to close (streams end cleanly, GOAWAY) and waits up to `cfg.grace` for them.
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    cfg: ServeConfig,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let tls = cfg.tls.clone().map(|c| {
        let mut c = (*c).clone();
        if !c.alpn_protocols.iter().any(|p| p == b"h2") {
            c.alpn_protocols.push(b"h2".to_vec());
        }
        tokio_rustls::TlsAcceptor::from(Arc::new(c))
    });
    let cfg = Arc::new(cfg);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        while conns.try_join_next().is_some() {}
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "gRPC accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let routes = routes.clone();
        let cfg = cfg.clone();
        let tls = tls.clone();
        let stop = stop_rx.clone();
        conns.spawn(async move {
            match tls {
                None => serve_conn(tcp, peer, routes, &cfg, stop).await,
                Some(acc) => {
                    match tokio::time::timeout(cfg.handshake_timeout, acc.accept(tcp)).await {
                        Ok(Ok(s)) => serve_conn(s, peer, routes, &cfg, stop).await,
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(cfg.grace + Duration::from_secs(1), async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    conns.shutdown().await;
    Ok(())
}

async fn serve_conn<IO>(
    io: IO,
    peer: SocketAddr,
    routes: Routes,
    cfg: &ServeConfig,
    mut stop: watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (closing_tx, closing_rx) = watch::channel(false);
    let ctx = ConnectionContext {
        peer: Some(peer),
        closing: closing_rx,
    };
    let svc = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
        let mut routes = routes.clone();
        req.extensions_mut().insert(ctx.clone());
        async move {
            std::future::poll_fn(|cx| {
                Service::<http::Request<Incoming>>::poll_ready(&mut routes, cx)
            })
            .await?;
            routes.call(req).await
        }
    });
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .keep_alive_interval(cfg.keepalive_interval)
        .keep_alive_timeout(cfg.keepalive_timeout)
        .initial_stream_window_size(cfg.stream_window)
        .initial_connection_window_size(cfg.connection_window)
        .max_concurrent_streams(100);
    let mut conn = std::pin::pin!(b.serve_connection(TokioIo::new(io), svc));
    let age = cfg
        .max_connection_age
        .map(|a| jittered(a, cfg.max_connection_age_jitter));
    let aged = async {
        match age {
            Some(a) => tokio::time::sleep(a).await,
            None => std::future::pending().await,
        }
    };
    let stopping = async {
        if stop.wait_for(|s| *s).await.is_err() {
            std::future::pending::<()>().await
        }
    };
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "gRPC connection ended");
            }
            return;
        }
        _ = aged => tracing::debug!(%peer, ?age, "gRPC connection reached its max age"),
        _ = stopping => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = closing_tx.send(true);
    if tokio::time::timeout(cfg.grace, conn.as_mut())
        .await
        .is_err()
    {
        tracing::debug!(%peer, "gRPC connection still busy after the grace period; dropping it");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_in_range_and_varies() {
        let base = Duration::from_secs(1000);
        let v: Vec<Duration> = (0..50).map(|_| jittered(base, 0.1)).collect();
        assert!(v
            .iter()
            .all(|d| *d >= Duration::from_secs(900) && *d <= Duration::from_secs(1100)));
        assert!(
            v.iter().any(|d| *d != v[0]),
            "50 draws should not all be equal"
        );
        assert_eq!(jittered(base, 0.0), base);
    }
}
