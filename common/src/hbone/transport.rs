//! The socket under an HBONE TLS session: unbuffered while the handshake runs, then reading
//! through a large buffer ([`crate::tls::TRANSPORT_READ_BUFFER`]). A peer that connects and
//! stalls (or a flood of them) therefore costs no large allocation; only connections that
//! complete the handshake get the buffer that makes bulk reads cheap.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadBuf};

/// A socket whose read buffer is allocated only by [`Transport::enable_buffer`].
pub enum Transport<T> {
    Plain(T),
    Buffered(BufReader<T>),
    /// Only while switching modes.
    Switching,
}

impl<T: AsyncRead + Unpin> Transport<T> {
    pub fn new(io: T) -> Self {
        Transport::Plain(io)
    }

    /// Starts reading through the large buffer (after the handshake). Idempotent.
    pub fn enable_buffer(&mut self) {
        if !matches!(self, Transport::Plain(_)) {
            return;
        }
        if let Transport::Plain(io) = std::mem::replace(self, Transport::Switching) {
            *self = Transport::Buffered(BufReader::with_capacity(
                crate::tls::TRANSPORT_READ_BUFFER,
                io,
            ));
        }
    }

    /// Whether the large read buffer is allocated.
    pub fn is_buffered(&self) -> bool {
        matches!(self, Transport::Buffered(_))
    }

    pub fn get_ref(&self) -> Option<&T> {
        match self {
            Transport::Plain(io) => Some(io),
            Transport::Buffered(b) => Some(b.get_ref()),
            Transport::Switching => None,
        }
    }
}

fn switching() -> io::Error {
    io::Error::other("transport used while switching modes")
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Transport<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(io) => Pin::new(io).poll_read(cx, buf),
            Transport::Buffered(b) => Pin::new(b).poll_read(cx, buf),
            Transport::Switching => Poll::Ready(Err(switching())),
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Transport<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(io) => Pin::new(io).poll_write(cx, buf),
            Transport::Buffered(b) => Pin::new(b).poll_write(cx, buf),
            Transport::Switching => Poll::Ready(Err(switching())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Transport::Buffered(b) => Pin::new(b).poll_write_vectored(cx, bufs),
            Transport::Switching => Poll::Ready(Err(switching())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Transport::Plain(io) => io.is_write_vectored(),
            Transport::Buffered(b) => b.is_write_vectored(),
            Transport::Switching => false,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(io) => Pin::new(io).poll_flush(cx),
            Transport::Buffered(b) => Pin::new(b).poll_flush(cx),
            Transport::Switching => Poll::Ready(Err(switching())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(io) => Pin::new(io).poll_shutdown(cx),
            Transport::Buffered(b) => Pin::new(b).poll_shutdown(cx),
            Transport::Switching => Poll::Ready(Err(switching())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Bytes flow the same unbuffered and buffered, including data that arrived before the
    /// switch and was not yet read.
    #[tokio::test]
    async fn reads_and_writes_in_both_modes() {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let mut t = Transport::new(a);
        assert!(!t.is_buffered());
        b.write_all(b"hello ").await.unwrap();
        let mut got = [0u8; 6];
        t.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello ");
        b.write_all(b"world").await.unwrap();
        t.enable_buffer();
        t.enable_buffer();
        assert!(t.is_buffered());
        let mut got = [0u8; 5];
        t.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"world");
        t.write_all(b"back").await.unwrap();
        let mut back = [0u8; 4];
        b.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"back");
    }
}
