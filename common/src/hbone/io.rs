//! `AsyncRead`/`AsyncWrite` over an HBONE tunnel stream, for code that needs a byte stream
//! (an HTTP server or client running inside the tunnel). Bulk TCP copying uses
//! `copy::copy_tcp_h2` instead, which avoids the extra copy this adapter makes on writes.

use super::H2Stream;
use bytes::{Buf, Bytes};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A tunnel stream as a byte stream. Shutting down the write side sends END_STREAM.
pub struct TunnelIo {
    stream: H2Stream,
    pending: Bytes,
    read_eof: bool,
    write_closed: bool,
}

impl TunnelIo {
    pub fn new(stream: H2Stream) -> Self {
        TunnelIo {
            stream,
            pending: Bytes::new(),
            read_eof: false,
            write_closed: false,
        }
    }
}

/// An HTTP/2 error as an I/O error (the underlying one when there is one).
pub fn h2_err(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("h2 io error"))
    } else {
        io::Error::other(e)
    }
}

impl AsyncRead for TunnelIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.pending.is_empty() {
            if this.read_eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.stream.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.stream.recv.flow_control().release_capacity(data.len());
                    this.pending = data;
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_err(e))),
                None => this.read_eof = true,
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TunnelIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let send = &mut self.stream.send;
        send.reserve_capacity(buf.len());
        loop {
            match ready!(send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(cap)) => {
                    let n = cap.min(buf.len());
                    send.send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .map_err(h2_err)?;
                    return Poll::Ready(Ok(n));
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_err(e))),
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "tunnel stream closed",
                    )))
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // DATA frames are handed to the connection task on send; nothing is held here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.write_closed {
            self.write_closed = true;
            self.stream
                .send
                .send_data(Bytes::new(), true)
                .map_err(h2_err)?;
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for TunnelIo {
    /// A stream whose peer already finished sending is closed with END_STREAM (a clean
    /// close, as when an HTTP/1.0 server hangs up after its response); otherwise dropping the
    /// send half resets the stream, which is right for an abandoned one.
    fn drop(&mut self) {
        if self.read_eof && !self.write_closed {
            let _ = self.stream.send.send_data(Bytes::new(), true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A real HTTP/2 CONNECT over an in-memory pipe: the client writes through `TunnelIo`, the
    /// server echoes, half-close travels as END_STREAM.
    #[tokio::test]
    async fn tunnel_io_round_trips_and_half_closes() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(b).await.unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            let send = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            let mut io = TunnelIo::new(H2Stream {
                send,
                recv: req.into_body(),
            });
            let mut got = Vec::new();
            io.read_to_end(&mut got).await.unwrap();
            io.write_all(&got).await.unwrap();
            io.shutdown().await.unwrap();
        });
        let (send_req, conn) = h2::client::handshake(a).await.unwrap();
        tokio::spawn(conn);
        let mut send_req = send_req.ready().await.unwrap();
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri("10.0.0.1:80")
            .body(())
            .unwrap();
        let (resp, send) = send_req.send_request(req, false).unwrap();
        let resp = resp.await.unwrap();
        let mut io = TunnelIo::new(H2Stream {
            send,
            recv: resp.into_body(),
        });
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        io.write_all(&payload).await.unwrap();
        io.shutdown().await.unwrap();
        let mut back = Vec::new();
        io.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, payload);
        server.await.unwrap();
    }
}
