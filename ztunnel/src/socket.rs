//! Socket plumbing: transparent capture listeners, marked upstream sockets that are never
//! captured again, and upstream connections that spoof the original client's address.

use crate::capture::SOCKET_MARK;
use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::SocketAddr;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// A listener with `IP_TRANSPARENT`, so TPROXY can hand it connections for any destination;
/// `local_addr()` of each accepted socket is the original destination.
///
/// `SO_REUSEPORT`: a new ztunnel binds the same port while the old one still runs (upgrade in
/// place); the kernel spreads new connections over both listeners until the old one closes
/// its listener when it starts draining (see [`enable_request_migration`] for the connections
/// queued on it at that moment). Only a process of the same user can join the group.
pub fn transparent_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_ip_transparent(true).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("IP_TRANSPARENT on {addr} (needs CAP_NET_ADMIN): {e}"),
        )
    })?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())
        .map_err(|e| io::Error::new(e.kind(), format!("bind {addr}: {e}")))?;
    s.listen(4096)?;
    TcpListener::from_std(s.into())
}

/// The sysctl that hands a closing listener's queued connections to another listener of its
/// `SO_REUSEPORT` group (Linux ≥ 5.14).
pub const MIGRATE_REQ_SYSCTL: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// Turns on `net.ipv4.tcp_migrate_req` in this network namespace: when the draining ztunnel
/// closes its listeners, connections already in their SYN or accept queues move to the new
/// ztunnel's listeners instead of being reset. Best effort: without it (older kernel, no
/// permission) those few queued connections are reset, and the clients retry.
pub fn enable_request_migration() {
    match std::fs::read_to_string(MIGRATE_REQ_SYSCTL) {
        Ok(v) if v.trim() == "1" => {}
        Ok(_) => {
            if let Err(e) = std::fs::write(MIGRATE_REQ_SYSCTL, "1") {
                tracing::warn!(error = %e, "cannot enable net.ipv4.tcp_migrate_req; connections queued on a draining listener will be reset");
            } else {
                tracing::info!("enabled net.ipv4.tcp_migrate_req (queued connections move to the next ztunnel on drain)");
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "net.ipv4.tcp_migrate_req unavailable (kernel < 5.14?); connections queued on a draining listener will be reset")
        }
    }
}

fn upstream_socket(dst: SocketAddr, mark: bool) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
    if mark {
        // Needs CAP_NET_ADMIN; without it (tests on loopback) the socket works unmarked.
        if let Err(e) = s.set_mark(SOCKET_MARK) {
            tracing::debug!(error = %e, "SO_MARK not set");
        }
    }
    s.set_nodelay(true)?;
    s.set_nonblocking(true)?;
    Ok(s)
}

/// Connects from the node's own address, marked so capture rules never match it.
pub async fn connect_marked(dst: SocketAddr) -> io::Result<TcpStream> {
    let s = upstream_socket(dst, true)?;
    let sock = TcpSocket::from_std_stream(s.into());
    sock.connect(dst).await
}

/// `IP_BIND_ADDRESS_NO_PORT`: `bind(ip, 0)` leaves the port to `connect`, which picks one free
/// for the whole 4-tuple. Without it `bind` searches a port free for that source IP alone,
/// walking every bound socket (TIME_WAIT included): under a stream of new connections that
/// search was ~30 % of the inbound ztunnel's CPU.
fn set_bind_address_no_port(s: &Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket fd, and a pointer/length pair to a live c_int.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Connects to a local pod with the original client's address as source (`IP_TRANSPARENT` +
/// bind), so the pod sees the real client. The pod's replies reach this socket through the
/// `socket transparent` capture rule.
pub async fn connect_spoofed(src: std::net::IpAddr, dst: SocketAddr) -> io::Result<TcpStream> {
    let s = upstream_socket(dst, true)?;
    s.set_ip_transparent(true)?;
    s.set_reuse_address(true)?;
    set_bind_address_no_port(&s)?;
    s.bind(&SocketAddr::new(src, 0).into())
        .map_err(|e| io::Error::new(e.kind(), format!("bind {src} for spoofing: {e}")))?;
    let sock = TcpSocket::from_std_stream(s.into());
    sock.connect(dst).await
}

/// Connects from `src` when given (the source pod's address, so the peer sees the pod as the
/// TCP source), else from the node; marked either way. If the address cannot be bound (no
/// `CAP_NET_ADMIN`), falls back to the node's address with a warning.
pub async fn connect_from(src: Option<std::net::IpAddr>, dst: SocketAddr) -> io::Result<TcpStream> {
    let Some(src) = src else {
        return connect_marked(dst).await;
    };
    match connect_spoofed(src, dst).await {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            tracing::warn!(%src, %dst, error = %e, "cannot leave from the pod's address; connecting from the node");
            connect_marked(dst).await
        }
        Err(e) => Err(e),
    }
}
