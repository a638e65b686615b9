//! Moving bytes between the two legs of a proxied connection (TCP ↔ HBONE stream, TCP ↔ TCP)
//! with half-close honoured, large reusable buffers, and byte counts kept even when a leg fails.

use crate::hbone::io::h2_err;
use crate::hbone::H2Stream;
use bytes::{Bytes, BytesMut};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Read size per syscall. Large enough that one wake-up moves many TLS records' worth.
pub const CHUNK: usize = 256 * 1024;

/// What a copy moved: `sent` = from the downstream (first) leg to the upstream (second) leg.
#[derive(Debug, Default)]
pub struct CopyResult {
    pub sent: u64,
    pub received: u64,
    pub error: Option<io::Error>,
}

/// Reads from `rd` and sends as DATA frames on `send`; END_STREAM on EOF.
async fn read_to_h2<R: AsyncRead + Unpin>(
    rd: &mut R,
    send: &mut h2::SendStream<Bytes>,
    count: &AtomicU64,
) -> io::Result<()> {
    let mut buf = BytesMut::with_capacity(CHUNK);
    loop {
        buf.reserve(CHUNK);
        let n = rd.read_buf(&mut buf).await?;
        if n == 0 {
            send.send_data(Bytes::new(), true).map_err(h2_err)?;
            return Ok(());
        }
        count.fetch_add(n as u64, Ordering::Relaxed);
        let mut data = buf.split().freeze();
        while !data.is_empty() {
            send.reserve_capacity(data.len());
            let cap = match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(c)) => c,
                Some(Err(e)) => return Err(crate::hbone::io::h2_err(e)),
                None => return Err(io::Error::new(io::ErrorKind::BrokenPipe, "stream closed")),
            };
            if cap == 0 {
                continue;
            }
            let chunk = data.split_to(cap.min(data.len()));
            send.send_data(chunk, false).map_err(h2_err)?;
        }
    }
}

/// Receives DATA frames and writes them to `wr`; shuts `wr` down for writing on END_STREAM.
async fn h2_to_write<W: AsyncWrite + Unpin>(
    recv: &mut h2::RecvStream,
    wr: &mut W,
    count: &AtomicU64,
) -> io::Result<()> {
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.map_err(h2_err)?;
        let n = chunk.len();
        wr.write_all(&chunk).await?;
        count.fetch_add(n as u64, Ordering::Relaxed);
        recv.flow_control().release_capacity(n).map_err(h2_err)?;
    }
    wr.shutdown().await
}

/// Copies between a TCP-like stream and an HBONE tunnel stream until both directions end.
pub async fn copy_tcp_h2<S>(tcp: S, tunnel: H2Stream) -> CopyResult
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut rd, mut wr) = tokio::io::split(tcp);
    let H2Stream { mut send, mut recv } = tunnel;
    let sent = AtomicU64::new(0);
    let received = AtomicU64::new(0);
    let result = tokio::try_join!(
        read_to_h2(&mut rd, &mut send, &sent),
        h2_to_write(&mut recv, &mut wr, &received)
    );
    if result.is_err() {
        send.send_reset(h2::Reason::CANCEL);
    }
    CopyResult {
        sent: sent.into_inner(),
        received: received.into_inner(),
        error: result.err(),
    }
}

async fn pump<R, W>(rd: &mut R, wr: &mut W, count: &AtomicU64) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = rd.read(&mut buf).await?;
        if n == 0 {
            return wr.shutdown().await;
        }
        wr.write_all(&buf[..n]).await?;
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Copies between two TCP-like streams until both directions end (half-close honoured).
pub async fn copy_tcp_tcp<A, B>(a: A, b: B) -> CopyResult
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let sent = AtomicU64::new(0);
    let received = AtomicU64::new(0);
    let result = tokio::try_join!(
        pump(&mut ar, &mut bw, &sent),
        pump(&mut br, &mut aw, &received)
    );
    CopyResult {
        sent: sent.into_inner(),
        received: received.into_inner(),
        error: result.err(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tcp_copy_honours_half_close_and_counts() {
        // Small pipe buffers so the copy has to work through back-pressure.
        let (client, proxy_a) = tokio::io::duplex(1024);
        let (proxy_b, mut server) = tokio::io::duplex(1024);
        let task = tokio::spawn(copy_tcp_tcp(proxy_a, proxy_b));
        let (mut cr, mut cw) = tokio::io::split(client);
        let writer = tokio::spawn(async move {
            cw.write_all(&[7u8; 10_000]).await.unwrap();
            cw.shutdown().await.unwrap();
            cw
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        let _cw = writer.await.unwrap();
        assert_eq!(got.len(), 10_000);
        // The server can still answer after the client's half-close.
        server.write_all(b"reply").await.unwrap();
        server.shutdown().await.unwrap();
        let mut reply = Vec::new();
        cr.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"reply");
        let r = task.await.unwrap();
        assert_eq!((r.sent, r.received), (10_000, 5));
        assert!(r.error.is_none());
    }
}
