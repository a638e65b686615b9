//! Forwarding to the node's upstream resolvers (the nameservers of `--resolv-conf`): the
//! client's query bytes go out unchanged except for a fresh random ID, over UDP from a marked
//! socket (never captured); a truncated answer is fetched again over TCP. Bounded: at most
//! `max_in_flight` queries upstream at once (more get SERVFAIL at once), and each query gets
//! [`UPSTREAM_TIMEOUT`] in total, shared by the nameservers in order.

use crate::capture::SOCKET_MARK;
use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, UdpSocket};
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// Total time a forwarded query may take.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// Default bound on queries upstream at once.
pub const MAX_IN_FLIGHT: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardError {
    #[error("no upstream resolver: {0}")]
    NoUpstream(String),
    #[error("too many queries upstream")]
    Overloaded,
    #[error("upstream timed out")]
    Timeout,
    #[error("upstream: {0}")]
    Io(String),
}

impl ForwardError {
    /// Label for `ztunnel_dns_failures_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            ForwardError::NoUpstream(_) => "no_upstream",
            ForwardError::Overloaded => "overloaded",
            ForwardError::Timeout => "timeout",
            ForwardError::Io(_) => "upstream_error",
        }
    }
}

pub struct Forwarder {
    upstreams: Result<Vec<SocketAddr>, String>,
    in_flight: Arc<Semaphore>,
    timeout: Duration,
}

impl Forwarder {
    /// Forwards to the nameservers of `resolv_conf` (the same file and parser as
    /// [`crate::dns`]). A file that cannot be read leaves no upstream: forwarded queries get
    /// SERVFAIL, answers the proxy gives itself still work.
    pub fn from_resolv_conf(resolv_conf: &Path, max_in_flight: usize) -> Forwarder {
        let upstreams = common::dns_cache::nameservers(resolv_conf);
        match &upstreams {
            Ok(u) => tracing::info!(upstreams = ?u, "DNS proxy forwards to"),
            Err(e) => tracing::warn!(error = %e, "DNS proxy has no upstream resolver"),
        }
        Forwarder::new(upstreams, max_in_flight)
    }

    pub fn new(upstreams: Result<Vec<SocketAddr>, String>, max_in_flight: usize) -> Forwarder {
        let upstreams = upstreams.and_then(|u| {
            if u.is_empty() {
                Err("no nameserver".to_string())
            } else {
                Ok(u)
            }
        });
        Forwarder {
            upstreams,
            in_flight: Arc::new(Semaphore::new(max_in_flight.max(1))),
            timeout: UPSTREAM_TIMEOUT,
        }
    }

    /// Sends `query` (a parsed, well-formed query) upstream and returns the answer with the
    /// client's ID, at most `limit` bytes long (a longer TCP answer is replaced by the
    /// truncated UDP one, so the client retries over TCP).
    pub async fn forward(&self, query: &[u8], limit: usize) -> Result<Vec<u8>, ForwardError> {
        let upstreams = self
            .upstreams
            .as_ref()
            .map_err(|e| ForwardError::NoUpstream(e.clone()))?;
        let _permit = self
            .in_flight
            .clone()
            .try_acquire_owned()
            .map_err(|_| ForwardError::Overloaded)?;
        if query.len() < 12 {
            return Err(ForwardError::Io("query shorter than a header".into()));
        }
        let client_id = [query[0], query[1]];
        let deadline = Instant::now() + self.timeout;
        let mut last = ForwardError::Timeout;
        for (i, upstream) in upstreams.iter().enumerate() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            // The time left, shared by the nameservers not tried yet.
            let share = (deadline - now) / (upstreams.len() - i) as u32;
            match tokio::time::timeout(share, exchange(*upstream, query, limit)).await {
                Ok(Ok(mut answer)) => {
                    answer[0] = client_id[0];
                    answer[1] = client_id[1];
                    return Ok(answer);
                }
                Ok(Err(e)) => {
                    tracing::debug!(%upstream, error = %e, "upstream DNS query failed");
                    last = ForwardError::Io(e.to_string());
                }
                Err(_) => {
                    tracing::debug!(%upstream, "upstream DNS query timed out");
                    last = ForwardError::Timeout;
                }
            }
        }
        Err(last)
    }
}

fn random_id() -> u16 {
    let mut b = [0u8; 2];
    // SAFETY: writes at most 2 bytes into a 2-byte buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 2 {
        // getrandom cannot fail for 2 bytes after boot; a clock-derived ID still works.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        return t.subsec_nanos() as u16;
    }
    u16::from_be_bytes(b)
}

fn marked(domain: Domain, ty: Type, proto: Protocol) -> io::Result<Socket> {
    let s = Socket::new(domain, ty, Some(proto))?;
    // Needs CAP_NET_ADMIN; without it (unit tests) the socket works unmarked.
    if let Err(e) = s.set_mark(SOCKET_MARK) {
        tracing::trace!(error = %e, "SO_MARK not set");
    }
    s.set_nonblocking(true)?;
    Ok(s)
}

/// One query to one nameserver: UDP, then TCP if the answer is truncated.
async fn exchange(upstream: SocketAddr, query: &[u8], limit: usize) -> io::Result<Vec<u8>> {
    let id = random_id();
    let mut out = query.to_vec();
    out[..2].copy_from_slice(&id.to_be_bytes());
    let s = marked(Domain::for_address(upstream), Type::DGRAM, Protocol::UDP)?;
    let any: SocketAddr = match upstream.ip() {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    s.bind(&any.into())?;
    let udp = UdpSocket::from_std(s.into())?;
    // Connected: only the nameserver's datagrams are received.
    udp.connect(upstream).await?;
    udp.send(&out).await?;
    let mut buf = vec![0u8; 65535];
    let answer = loop {
        let n = udp.recv(&mut buf).await?;
        // Another ID, or not a response: a stray or spoofed datagram; keep waiting.
        if n >= 12 && buf[..2] == id.to_be_bytes() && buf[2] & 0x80 != 0 {
            break buf[..n].to_vec();
        }
    };
    if answer[2] & 0x02 == 0 {
        return Ok(answer);
    }
    // Truncated: ask again over TCP (RFC 7766), keep the UDP answer if the full one is too big
    // for the client's transport.
    let full = exchange_tcp(upstream, &out, id).await?;
    Ok(if full.len() <= limit { full } else { answer })
}

async fn exchange_tcp(upstream: SocketAddr, query: &[u8], id: u16) -> io::Result<Vec<u8>> {
    let s = marked(Domain::for_address(upstream), Type::STREAM, Protocol::TCP)?;
    let stream = TcpSocket::from_std_stream(s.into())
        .connect(upstream)
        .await?;
    let mut stream = tokio::io::BufStream::new(stream);
    let len = u16::try_from(query.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "query too long"))?;
    stream.write_all(&len.to_be_bytes()).await?;
    stream.write_all(query).await?;
    stream.flush().await?;
    let n = stream.read_u16().await?;
    let mut answer = vec![0u8; usize::from(n)];
    stream.read_exact(&mut answer).await?;
    if answer.len() < 12 || answer[..2] != id.to_be_bytes() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "TCP answer with another ID",
        ));
    }
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A nameserver on loopback: answers every UDP query with TC set (header + question echoed)
    /// and every TCP query with the query itself marked as a response plus `extra` bytes of
    /// padding in its length, so the test sees which transport answered.
    async fn truncating_server(tcp_extra: usize) -> SocketAddr {
        let udp = UdpSocket::bind("127.0.0.1:0").await.expect("udp");
        let addr = udp.local_addr().expect("addr");
        let tcp = tokio::net::TcpListener::bind(addr).await.expect("tcp");
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, peer)) = udp.recv_from(&mut buf).await {
                let mut r = buf[..n].to_vec();
                r[2] |= 0x80 | 0x02;
                let _ = udp.send_to(&r, peer).await;
            }
        });
        tokio::spawn(async move {
            while let Ok((mut s, _)) = tcp.accept().await {
                let Ok(n) = s.read_u16().await else { continue };
                let mut q = vec![0u8; usize::from(n)];
                if s.read_exact(&mut q).await.is_err() {
                    continue;
                }
                q[2] |= 0x80;
                q.extend(std::iter::repeat_n(0u8, tcp_extra));
                let _ = s.write_all(&(q.len() as u16).to_be_bytes()).await;
                let _ = s.write_all(&q).await;
            }
        });
        addr
    }

    fn query_bytes() -> Vec<u8> {
        // ID 0xabcd, RD, one question: "x." A IN.
        vec![
            0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'x', 0, 0, 1, 0, 1,
        ]
    }

    #[tokio::test]
    async fn truncated_udp_answers_are_fetched_over_tcp() {
        let server = truncating_server(3).await;
        let f = Forwarder::new(Ok(vec![server]), 4);
        let q = query_bytes();
        let got = f.forward(&q, 65535).await.expect("answer");
        assert_eq!(&got[..2], &[0xab, 0xcd], "the client's ID is restored");
        assert_eq!(got[2] & 0x02, 0, "the TCP answer is not truncated");
        assert_eq!(got.len(), q.len() + 3);
        // Too big for the client's UDP limit: the truncated answer, so it retries over TCP.
        let got = f.forward(&q, q.len()).await.expect("answer");
        assert_ne!(got[2] & 0x02, 0);
        assert_eq!(&got[..2], &[0xab, 0xcd]);
    }

    #[tokio::test]
    async fn silent_upstreams_time_out_and_in_flight_is_bounded() {
        // Bound but never answering.
        let silent = UdpSocket::bind("127.0.0.1:0").await.expect("udp");
        let mut f = Forwarder::new(Ok(vec![silent.local_addr().expect("addr")]), 1);
        f.timeout = Duration::from_millis(200);
        let f = Arc::new(f);
        let q = query_bytes();
        let (f2, q2) = (f.clone(), q.clone());
        let first = tokio::spawn(async move { f2.forward(&q2, 512).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(f.forward(&q, 512).await, Err(ForwardError::Overloaded));
        assert_eq!(first.await.expect("join"), Err(ForwardError::Timeout));
        // The permit came back.
        assert_eq!(f.forward(&q, 512).await, Err(ForwardError::Timeout));
        let none = Forwarder::new(Ok(vec![]), 1);
        assert!(matches!(
            none.forward(&q, 512).await,
            Err(ForwardError::NoUpstream(_))
        ));
    }
}
