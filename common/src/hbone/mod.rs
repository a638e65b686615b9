//! HBONE: TCP tunnelled as HTTP/2 CONNECT streams over mutual TLS. `client` owns the pooled
//! connections a proxy opens, `server` terminates them; this module owns the wire settings and
//! the tunnel stream type both sides hand to the byte copier.

pub mod client;
pub mod io;
pub mod server;
pub mod transport;

use bytes::Bytes;
use h2::{RecvStream, SendStream};

/// Well-known ports.
pub const HBONE_PORT: u16 = 15008;
pub const WAYPOINT_HBONE_PORT: u16 = 15006;

/// HTTP/2 settings. The production ztunnel uses a 4 MiB stream and 16 MiB connection window;
/// we use larger windows so a single stream never stalls on a 2-core box where the reader may
/// be descheduled for a few milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct H2Settings {
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame_size: u32,
    pub max_streams_per_conn: usize,
    pub server_max_concurrent_streams: u32,
    /// Streams to one destination are spread over up to this many connections before any
    /// connection carries a second stream, so bulk flows encrypt on different cores (the
    /// production ztunnel funnels them all through one connection and does not scale).
    pub parallel_connections: usize,
    /// Largest request/response header block accepted (`SETTINGS_MAX_HEADER_LIST_SIZE`), on
    /// both sides; the production ztunnel uses 64 KiB too.
    pub max_header_list_size: u32,
    /// How long a peer may take for each step of opening a connection: the TLS handshake,
    /// the HTTP/2 preface, and (server side) its first CONNECT.
    pub handshake_timeout: std::time::Duration,
    /// HTTP/2 PING interval on established connections, both sides.
    pub keepalive_interval: std::time::Duration,
    /// A peer that has not answered a PING for this long is dead: the connection is closed.
    pub keepalive_timeout: std::time::Duration,
}

impl Default for H2Settings {
    fn default() -> Self {
        H2Settings {
            stream_window: 8 * 1024 * 1024,
            connection_window: 32 * 1024 * 1024,
            max_frame_size: 1024 * 1024,
            max_streams_per_conn: 100,
            server_max_concurrent_streams: 200,
            parallel_connections: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
                .clamp(1, 8),
            max_header_list_size: 64 * 1024,
            handshake_timeout: std::time::Duration::from_secs(10),
            keepalive_interval: std::time::Duration::from_secs(10),
            keepalive_timeout: std::time::Duration::from_secs(20),
        }
    }
}

/// Headers HBONE uses beyond the pseudo-headers.
pub mod headers {
    pub const FORWARDED: &str = "forwarded";
    pub const BAGGAGE: &str = "baggage";
    pub const TRACEPARENT: &str = "traceparent";
}

/// One established CONNECT stream: the two halves of the tunnel.
pub struct H2Stream {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
}

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with {addr}: {source}")]
    Tls {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    #[error("CONNECT {authority} answered {status}")]
    Status {
        authority: String,
        status: http::StatusCode,
    },
    #[error("certificate: {0}")]
    Cert(String),
    #[error("bad request: {0}")]
    Request(#[from] http::Error),
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// The outcome of a connection attempt another caller made for the same destination.
    #[error("{0}")]
    Shared(std::sync::Arc<HboneError>),
}

/// Sends a PING every `interval`; if one is not answered within `timeout` the peer is dead and
/// `dead` fires (whoever drives the connection closes it). Ends quietly when the connection does.
pub(crate) async fn keepalive(
    mut ping: h2::PingPong,
    interval: std::time::Duration,
    timeout: std::time::Duration,
    mut dead: tokio::sync::oneshot::Sender<()>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = dead.closed() => return,
        }
        match tokio::time::timeout(timeout, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return, // connection already gone: its driver notices by itself
            Err(_) => {
                let _ = dead.send(());
                return;
            }
        }
    }
}

/// Builds the `forwarded` header value: `for="<ip:port>"`, plus `;host=<service>` when the
/// target was a service.
pub fn forwarded_value(client: std::net::SocketAddr, host: Option<&str>) -> String {
    let mut v = match client {
        std::net::SocketAddr::V4(a) => format!("for=\"{a}\""),
        std::net::SocketAddr::V6(a) => format!("for=\"[{}]:{}\"", a.ip(), a.port()),
    };
    if let Some(h) = host {
        v.push_str(";host=");
        v.push_str(h);
    }
    v
}

/// Extracts the client address from a `forwarded` header (first `for=` element).
pub fn forwarded_for(value: &str) -> Option<std::net::SocketAddr> {
    value
        .split([';', ','])
        .map(str::trim)
        .find_map(|p| p.strip_prefix("for=").or_else(|| p.strip_prefix("For=")))
        .map(|v| v.trim_matches('"'))
        .and_then(|v| {
            v.parse::<std::net::SocketAddr>().ok().or_else(|| {
                v.parse::<std::net::IpAddr>()
                    .ok()
                    .map(|ip| std::net::SocketAddr::new(ip, 0))
            })
        })
}

/// The `host=` element of a `forwarded` header (the service hostname the client targeted).
pub fn forwarded_host(value: &str) -> Option<&str> {
    value
        .split([';', ','])
        .map(str::trim)
        .find_map(|p| p.strip_prefix("host="))
        .map(|v| v.trim_matches('"'))
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_round_trip() {
        let a: std::net::SocketAddr = "10.244.1.2:4567".parse().unwrap();
        let v = forwarded_value(a, Some("echo.default.svc.cluster.local"));
        assert_eq!(
            v,
            "for=\"10.244.1.2:4567\";host=echo.default.svc.cluster.local"
        );
        assert_eq!(forwarded_for(&v), Some(a));
        assert_eq!(forwarded_host(&v), Some("echo.default.svc.cluster.local"));
        assert_eq!(forwarded_host("for=\"1.2.3.4:5\""), None);
        let v6: std::net::SocketAddr = "[fd00::1]:80".parse().unwrap();
        assert_eq!(forwarded_for(&forwarded_value(v6, None)), Some(v6));
        assert_eq!(
            forwarded_for("for=10.0.0.1").map(|s| s.ip()),
            Some("10.0.0.1".parse().unwrap())
        );
        assert_eq!(forwarded_for("proto=http"), None);
    }
}
