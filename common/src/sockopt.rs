//! Socket options both proxies set on proxied TCP sockets.

use tokio::net::TcpStream;

/// TCP keepalive on a proxied socket, so a peer that vanished without a FIN or RST (power
/// loss, a dropped route) is noticed even on a connection idle in both directions.
pub fn keepalive(stream: &TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(std::time::Duration::from_secs(180))
        .with_interval(std::time::Duration::from_secs(20))
        .with_retries(3);
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&ka);
}
