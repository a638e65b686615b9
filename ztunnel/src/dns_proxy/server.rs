//! The DNS proxy's sockets on 127.0.0.1:15053.
//!
//! - UDP: one `IP_TRANSPARENT` socket, so nft TPROXY can hand it pods' datagrams to any
//!   nameserver address, with `IP_RECVORIGDSTADDR` to learn the address each was sent to. The
//!   answer must come from that address and port or the pod's resolver drops it, so it is sent
//!   from a transparent socket bound to it (kept in a small cache; unconnected, so TPROXY's
//!   established-socket lookup never steers queries to it). A query not diverted (sent to
//!   15053 itself) is answered from the listening socket.
//! - TCP: a transparent listener (the accepted socket's local address is the original
//!   destination, and answers leave from it by construction); 2-byte length framing
//!   (RFC 1035 4.2.2), queries answered in order; [`TcpLimits`]: at most 8 connections per
//!   client address and 512 in all, closed after 10 s without a complete query.
//!
//! Each UDP query runs in its own task (forwarded ones are bounded by the forwarder).

use super::{DnsProxy, Transport};
use crate::capture::SOCKET_MARK;
use nix::sys::socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, SockaddrIn};
use socket2::{Domain, Protocol, Socket, Type};
use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::Interest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

/// Bounds on the TCP side.
#[derive(Debug, Clone, Copy)]
pub struct TcpLimits {
    /// Connections at once from one client address (more are closed at once).
    pub per_client: usize,
    /// Connections at once in all.
    pub total: usize,
    /// A connection is closed when no complete query arrives for this long.
    pub idle: Duration,
}

impl Default for TcpLimits {
    fn default() -> Self {
        TcpLimits {
            per_client: 8,
            total: 512,
            idle: Duration::from_secs(10),
        }
    }
}
/// Reply sockets kept (one per nameserver address pods query; normally one or two).
const REPLY_SOCKETS: usize = 64;

/// The UDP socket: transparent, reporting each datagram's original destination.
pub fn udp_socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.set_ip_transparent(true).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("IP_TRANSPARENT on udp {addr} (needs CAP_NET_ADMIN): {e}"),
        )
    })?;
    setsockopt(&s, sockopt::Ipv4OrigDstAddr, &true).map_err(io::Error::from)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())
        .map_err(|e| io::Error::new(e.kind(), format!("bind udp {addr}: {e}")))?;
    UdpSocket::from_std(s.into())
}

/// Sockets bound (transparently) to the nameserver addresses pods queried.
struct ReplySockets {
    sockets: Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>,
}

impl ReplySockets {
    fn get(&self, from: SocketAddr) -> io::Result<Arc<UdpSocket>> {
        let mut sockets = self.sockets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = sockets.get(&from) {
            return Ok(s.clone());
        }
        let s = Socket::new(Domain::for_address(from), Type::DGRAM, Some(Protocol::UDP))?;
        s.set_reuse_address(true)?;
        s.set_ip_transparent(true)?;
        if let Err(e) = s.set_mark(SOCKET_MARK) {
            tracing::trace!(error = %e, "SO_MARK not set");
        }
        s.set_nonblocking(true)?;
        s.bind(&from.into())?;
        let s = Arc::new(UdpSocket::from_std(s.into())?);
        if sockets.len() >= REPLY_SOCKETS {
            sockets.clear();
        }
        sockets.insert(from, s.clone());
        Ok(s)
    }
}

/// One datagram: bytes, sender, original destination (if diverted).
fn recv_with_orig_dst(
    socket: &UdpSocket,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddr, Option<SocketAddr>)> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut cmsg = nix::cmsg_space!(libc::sockaddr_in);
    let msg = recvmsg::<SockaddrIn>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::empty(),
    )
    .map_err(io::Error::from)?;
    let Some(peer) = msg.address else {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "no sender"));
    };
    let mut orig = None;
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::Ipv4OrigDstAddr(a) = c {
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            orig = Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(a.sin_port),
            )));
        }
    }
    let peer = SocketAddr::V4(SocketAddrV4::new(peer.ip(), peer.port()));
    Ok((msg.bytes, peer, orig))
}

/// Serves UDP queries forever.
pub async fn serve_udp(socket: UdpSocket, proxy: Arc<DnsProxy>) {
    let socket = Arc::new(socket);
    let own = socket.local_addr().ok();
    let replies = Arc::new(ReplySockets {
        sockets: Mutex::new(HashMap::new()),
    });
    let mut buf = vec![0u8; 65535];
    loop {
        let received = socket
            .async_io(Interest::READABLE, || recv_with_orig_dst(&socket, &mut buf))
            .await;
        let (n, peer, orig) = match received {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "DNS proxy: receive failed");
                continue;
            }
        };
        let bytes = buf[..n].to_vec();
        let (socket, proxy, replies) = (socket.clone(), proxy.clone(), replies.clone());
        tokio::spawn(async move {
            let Some(answer) = proxy.handle(&bytes, peer.ip(), Transport::Udp).await else {
                return;
            };
            let sent = match orig.filter(|o| Some(*o) != own) {
                Some(from) => match replies.get(from) {
                    Ok(s) => s.send_to(&answer, peer).await,
                    Err(e) => Err(io::Error::new(
                        e.kind(),
                        format!("cannot answer from {from}: {e}"),
                    )),
                },
                None => socket.send_to(&answer, peer).await,
            };
            if let Err(e) = sent {
                tracing::debug!(%peer, error = %e, "DNS proxy: answer not sent");
            }
        });
    }
}

/// Counts TCP connections, in all and per client.
struct TcpSlots {
    limits: TcpLimits,
    per_client: Mutex<HashMap<IpAddr, usize>>,
}

struct TcpSlot {
    slots: Arc<TcpSlots>,
    client: IpAddr,
}

impl Drop for TcpSlot {
    fn drop(&mut self) {
        let mut m = self
            .slots
            .per_client
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.client);
            }
        }
    }
}

impl TcpSlots {
    fn take(self: &Arc<Self>, client: IpAddr) -> Option<TcpSlot> {
        let mut m = self.per_client.lock().unwrap_or_else(|p| p.into_inner());
        let total: usize = m.values().sum();
        let mine = m.get(&client).copied().unwrap_or(0);
        if total >= self.limits.total || mine >= self.limits.per_client {
            return None;
        }
        m.insert(client, mine + 1);
        Some(TcpSlot {
            slots: self.clone(),
            client,
        })
    }
}

/// Serves TCP queries forever.
pub async fn serve_tcp(listener: TcpListener, proxy: Arc<DnsProxy>, limits: TcpLimits) {
    let slots = Arc::new(TcpSlots {
        limits,
        per_client: Mutex::new(HashMap::new()),
    });
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "DNS proxy: accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Some(slot) = slots.take(peer.ip()) else {
            tracing::debug!(%peer, "DNS proxy: too many TCP connections; closed");
            continue;
        };
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = tcp_connection(stream, peer.ip(), &proxy, limits.idle).await {
                tracing::debug!(%peer, error = %e, "DNS proxy: TCP connection ended");
            }
        });
    }
}

async fn tcp_connection(
    mut stream: tokio::net::TcpStream,
    client: IpAddr,
    proxy: &DnsProxy,
    idle: Duration,
) -> io::Result<()> {
    let mut buf = vec![0u8; 65535];
    loop {
        let read = async {
            let n = usize::from(stream.read_u16().await?);
            stream.read_exact(&mut buf[..n]).await?;
            io::Result::Ok(n)
        };
        let n = match tokio::time::timeout(idle, read).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(()), // idle
        };
        let Some(answer) = proxy.handle(&buf[..n], client, Transport::Tcp).await else {
            // Unreadable header: nothing sensible to say on this stream.
            return Ok(());
        };
        let len = u16::try_from(answer.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "answer too long"))?;
        let mut framed = Vec::with_capacity(answer.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&answer);
        stream.write_all(&framed).await?;
    }
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
