//! Protocol detection on a tunnelled byte stream: HTTP/1.x request line, the HTTP/2 preface
//! (h2c, gRPC), a TLS ClientHello (for SNI routing, [`crate::client_hello`]), or anything else
//! (TCP). The bytes read while sniffing are replayed to whoever
//! serves the stream through [`Prefixed`].

use bytes::{Buf, Bytes, BytesMut};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// What the first bytes of a stream say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Detected {
    Http1,
    H2c,
    /// A complete first TLS handshake record (its ClientHello names the server).
    Tls,
    Tcp,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: &[&str] = &[
    "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE",
];

/// Classifies a prefix: `None` while more bytes could still change the answer.
pub fn classify(buf: &[u8]) -> Option<Detected> {
    if buf.is_empty() {
        return None;
    }
    match crate::client_hello::verdict(buf) {
        crate::client_hello::Verdict::Complete => return Some(Detected::Tls),
        crate::client_hello::Verdict::Incomplete => return None,
        crate::client_hello::Verdict::NotTls => {}
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Some(Detected::H2c)
        } else {
            None
        };
    }
    // "<METHOD> <target> HTTP/1.x\r\n"
    let line_end = buf.windows(2).position(|w| w == b"\r\n");
    let head = &buf[..line_end.unwrap_or(buf.len())];
    let text = match std::str::from_utf8(head) {
        Ok(t) => t,
        Err(_) => return Some(Detected::Tcp),
    };
    let method = text.split(' ').next().unwrap_or("");
    let method_ok = METHODS.contains(&method);
    let method_prefix = METHODS.iter().any(|m| m.starts_with(method)) && !text.contains(' ');
    match line_end {
        Some(_) => {
            let mut parts = text.split(' ');
            let (m, target, version) = (parts.next(), parts.next(), parts.next());
            if m.is_some_and(|m| METHODS.contains(&m))
                && target.is_some_and(|t| !t.is_empty())
                && version.is_some_and(|v| v == "HTTP/1.1" || v == "HTTP/1.0")
                && parts.next().is_none()
            {
                Some(Detected::Http1)
            } else {
                Some(Detected::Tcp)
            }
        }
        None if method_ok || method_prefix => None,
        None => Some(Detected::Tcp),
    }
}

/// Reads until the protocol is known, `limit` bytes were seen, EOF, or `timeout` passes (a
/// server-speaks-first protocol sends nothing: that is TCP). Returns the verdict and the bytes.
pub async fn detect<R: AsyncRead + Unpin>(
    io: &mut R,
    timeout: Duration,
) -> io::Result<(Detected, Bytes)> {
    let mut buf = BytesMut::with_capacity(4096);
    let deadline = common::duration::deadline(timeout);
    loop {
        if let Some(d) = classify(&buf) {
            return Ok((d, buf.freeze()));
        }
        // A request line gets 8 KiB; a TLS record may take up to its maximum size.
        let limit = if buf.first() == Some(&0x16) {
            crate::client_hello::MAX_RECORD + 5 + 256
        } else {
            8192
        };
        if buf.len() >= limit {
            return Ok((Detected::Tcp, buf.freeze()));
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => return Ok((Detected::Tcp, buf.freeze())),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// A stream whose first reads return `prefix`.
pub struct Prefixed<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Prefixed<T> {
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Prefixed { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_http1_h2c_and_tcp() {
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\nhost: x\r\n"),
            Some(Detected::Http1)
        );
        assert_eq!(classify(b"POST /a?b HTTP/1.0\r\n"), Some(Detected::Http1));
        assert_eq!(classify(H2_PREFACE), Some(Detected::H2c));
        assert_eq!(classify(b"PRI * HTTP/2.0"), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"GET /x"), None);
        assert_eq!(
            classify(b"\x16\x03\x01\x02\x00"),
            None,
            "a TLS record, incomplete"
        );
        assert_eq!(
            classify(b"\x16\x03\x01\x00\x02ab"),
            Some(Detected::Tls),
            "a complete first TLS record"
        );
        assert_eq!(
            classify(b"\x16\x07\x01"),
            Some(Detected::Tcp),
            "not TLS after all"
        );
        assert_eq!(classify(b"HELLO world\r\n"), Some(Detected::Tcp));
        assert_eq!(classify(b"GET / SPDY/3\r\n"), Some(Detected::Tcp));
    }

    #[tokio::test]
    async fn detect_replays_the_sniffed_bytes() {
        let (mut a, b) = tokio::io::duplex(1024);
        tokio::io::AsyncWriteExt::write_all(&mut a, b"GET / HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut b = b;
        let (d, prefix) = detect(&mut b, Duration::from_secs(1)).await.unwrap();
        assert_eq!(d, Detected::Http1);
        drop(a);
        let mut p = Prefixed::new(prefix, b);
        let mut all = Vec::new();
        p.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"GET / HTTP/1.1\r\n\r\n");
    }

    #[tokio::test]
    async fn silent_client_is_tcp_after_timeout() {
        let (_a, mut b) = tokio::io::duplex(64);
        let (d, prefix) = detect(&mut b, Duration::from_millis(50)).await.unwrap();
        assert_eq!(d, Detected::Tcp);
        assert!(prefix.is_empty());
    }
}
