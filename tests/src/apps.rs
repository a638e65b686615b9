//! Real applications the tests run in pods: an echo server that records what each connection
//! carried, a hash ("sink") server that answers with the SHA-256 and peer it saw, a tiny HTTP/1.1
//! server answering with its pod name and the caller's IP, and the matching clients (streaming
//! deterministic pseudo-random data and verifying both directions). All run on the caller's tokio
//! runtime over sockets created inside the pod's namespace.

use crate::netns::Netns;
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// What a server saw on one finished connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnRecord {
    pub peer: SocketAddr,
    pub bytes: u64,
    pub sha256: String,
}

/// A server task; aborted on drop. `records` fills in as connections finish.
pub struct Server {
    pub addr: SocketAddr,
    records: Arc<Mutex<Vec<ConnRecord>>>,
    task: JoinHandle<()>,
}

impl Server {
    /// Records of finished connections so far.
    pub fn records(&self) -> Vec<ConnRecord> {
        self.records.lock().unwrap().clone()
    }

    /// Waits until at least `n` connections finished (or `timeout`), returning the records.
    pub async fn wait_records(&self, n: usize, timeout: Duration) -> Result<Vec<ConnRecord>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let r = self.records();
            if r.len() >= n {
                return Ok(r);
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "server {} saw {} finished connections, expected {n}",
                    self.addr,
                    r.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The distinct peer IPs seen so far.
    pub fn peer_ips(&self) -> Vec<IpAddr> {
        let mut ips: Vec<IpAddr> = self.records().iter().map(|r| r.peer.ip()).collect();
        ips.sort();
        ips.dedup();
        ips
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn serve<F, Fut>(listener: TcpListener, handler: F) -> Result<Server>
where
    F: Fn(TcpStream, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<ConnRecord>> + Send + 'static,
{
    let addr = listener.local_addr()?;
    let records = Arc::new(Mutex::new(Vec::new()));
    let recs = records.clone();
    let handler = Arc::new(handler);
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let recs = recs.clone();
            let handler = handler.clone();
            tokio::spawn(async move {
                if let Ok(rec) = handler(stream, peer).await {
                    recs.lock().unwrap().push(rec);
                }
            });
        }
    });
    Ok(Server {
        addr,
        records,
        task,
    })
}

/// An echo server in `ns` on `addr`: writes back everything it reads, half-closes after EOF,
/// and records the peer, byte count and SHA-256 of what it received.
pub fn echo_server(ns: &Netns, addr: SocketAddr) -> Result<Server> {
    serve(ns.tcp_listener(addr)?, |mut stream, peer| async move {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut bytes = 0u64;
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            bytes += n as u64;
            stream.write_all(&buf[..n]).await?;
        }
        stream.shutdown().await?;
        Ok(ConnRecord {
            peer,
            bytes,
            sha256: hex(&hasher.finalize()),
        })
    })
}

/// A sink server: reads until EOF, then answers `<sha256 hex> <bytes> <peer ip:port>\n`.
pub fn hash_server(ns: &Netns, addr: SocketAddr) -> Result<Server> {
    serve(ns.tcp_listener(addr)?, |mut stream, peer| async move {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut bytes = 0u64;
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            bytes += n as u64;
        }
        let sha256 = hex(&hasher.finalize());
        stream
            .write_all(format!("{sha256} {bytes} {peer}\n").as_bytes())
            .await?;
        stream.shutdown().await?;
        Ok(ConnRecord {
            peer,
            bytes,
            sha256,
        })
    })
}

/// An HTTP/1.1 server answering every request with `<pod name> <peer ip>\n` (`Connection:
/// close`).
pub fn http_server(ns: &Netns, addr: SocketAddr, pod_name: &str) -> Result<Server> {
    let name = pod_name.to_string();
    serve(ns.tcp_listener(addr)?, move |mut stream, peer| {
        let name = name.clone();
        async move {
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    bail!("EOF before end of request headers");
                }
                req.extend_from_slice(&buf[..n]);
            }
            let body = format!("{name} {}\n", peer.ip());
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(resp.as_bytes()).await?;
            stream.shutdown().await?;
            Ok(ConnRecord {
                peer,
                bytes: req.len() as u64,
                sha256: hex(&Sha256::digest(&req)),
            })
        }
    })
}

/// Deterministic pseudo-random bytes (xorshift64*), reproducible from `seed`.
pub struct PseudoRandom(u64);

impl PseudoRandom {
    pub fn new(seed: u64) -> Self {
        PseudoRandom(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// What a client sent and got back on one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    pub sent_bytes: u64,
    pub sent_sha256: String,
    pub received_bytes: u64,
    pub received_sha256: String,
    /// The first bytes received (up to 4 KiB), for short replies.
    pub received_head: Vec<u8>,
}

impl Transfer {
    /// True when everything sent came back unchanged.
    pub fn echoed_intact(&self) -> bool {
        self.sent_bytes == self.received_bytes && self.sent_sha256 == self.received_sha256
    }
}

/// Streams `len` bytes from the generator over `stream` while reading whatever comes back until
/// EOF; half-closes after sending. Both directions are hashed.
pub async fn stream_through(
    stream: TcpStream,
    len: u64,
    mut gen: impl FnMut(&mut [u8]) + Send,
) -> Result<Transfer> {
    let (mut rd, mut wr) = stream.into_split();
    let reader = tokio::spawn(async move {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut bytes = 0u64;
        let mut head = Vec::new();
        loop {
            let n = rd.read(&mut buf).await.context("reading echo")?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            if head.len() < 4096 {
                let take = n.min(4096 - head.len());
                head.extend_from_slice(&buf[..take]);
            }
            bytes += n as u64;
        }
        anyhow::Ok((bytes, hex(&hasher.finalize()), head))
    });
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        gen(&mut buf[..n]);
        hasher.update(&buf[..n]);
        wr.write_all(&buf[..n]).await.context("writing data")?;
        left -= n as u64;
    }
    wr.shutdown().await.context("half-closing")?;
    let (received_bytes, received_sha256, received_head) = reader.await??;
    Ok(Transfer {
        sent_bytes: len,
        sent_sha256: hex(&hasher.finalize()),
        received_bytes,
        received_sha256,
        received_head,
    })
}

/// Streams `len` pseudo-random bytes (from `seed`) over `stream` to an echo server and returns
/// the transfer (check [`Transfer::echoed_intact`]).
pub async fn echo_random(stream: TcpStream, len: u64, seed: u64) -> Result<Transfer> {
    let mut rng = PseudoRandom::new(seed);
    stream_through(stream, len, move |b| rng.fill(b)).await
}

/// Streams `len` bytes made of `pattern` repeated (for wire-capture tests).
pub async fn echo_pattern(stream: TcpStream, len: u64, pattern: &[u8]) -> Result<Transfer> {
    let pattern = pattern.to_vec();
    let mut pos = 0usize;
    stream_through(stream, len, move |b| {
        for byte in b.iter_mut() {
            *byte = pattern[pos % pattern.len()];
            pos += 1;
        }
    })
    .await
}

/// The reply of the hash server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashReply {
    pub sha256: String,
    pub bytes: u64,
    pub peer: SocketAddr,
}

/// Sends `len` pseudo-random bytes to a hash server, checks its hash and byte count, returns the
/// peer address it saw.
pub async fn send_to_hash_server(stream: TcpStream, len: u64, seed: u64) -> Result<HashReply> {
    let t = echo_random(stream, len, seed).await?;
    let reply = String::from_utf8(t.received_head.clone()).context("hash reply not UTF-8")?;
    let mut parts = reply.split_whitespace();
    let (Some(sha256), Some(bytes), Some(peer)) = (parts.next(), parts.next(), parts.next()) else {
        bail!("malformed hash reply {reply:?}");
    };
    let reply = HashReply {
        sha256: sha256.to_string(),
        bytes: bytes.parse()?,
        peer: peer.parse()?,
    };
    if reply.sha256 != t.sent_sha256 || reply.bytes != t.sent_bytes {
        bail!(
            "hash server got {} bytes sha256 {}, client sent {} bytes sha256 {}",
            reply.bytes,
            reply.sha256,
            t.sent_bytes,
            t.sent_sha256
        );
    }
    Ok(reply)
}

/// Sends an HTTP/1.1 GET for `/` and returns (status, body).
pub async fn http_get(mut stream: TcpStream, host: &str) -> Result<(u16, String)> {
    let req = format!("GET / HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await?;
    let mut resp = Vec::new();
    stream.read_to_end(&mut resp).await?;
    parse_http_response(&resp)
}

/// Parses a full HTTP/1.x response (status line + headers + body) into (status, body).
pub fn parse_http_response(resp: &[u8]) -> Result<(u16, String)> {
    let text = String::from_utf8_lossy(resp);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("incomplete HTTP response {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line in {head:?}"))?;
    Ok((status, body.to_string()))
}

/// How an attempt to talk to a server ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The payload came back (echo).
    Echoed,
    /// Connected, but the connection closed without returning data.
    ClosedWithoutData,
    /// Connection reset (during connect or after).
    Reset,
    /// Connection refused.
    Refused,
    /// No answer within the timeout.
    TimedOut,
    /// Something else (unreachable, wrong data, …).
    Other(String),
}

impl Outcome {
    /// True for every outcome where no data came back.
    pub fn is_blocked(&self) -> bool {
        matches!(
            self,
            Outcome::ClosedWithoutData | Outcome::Reset | Outcome::Refused | Outcome::TimedOut
        )
    }
}

/// Connects from `ns` to `addr`, sends a short payload and expects it echoed back, classifying
/// the result.
pub async fn probe_echo(ns: &Netns, addr: SocketAddr, timeout: Duration) -> Outcome {
    let socket = match ns.tcp_socket() {
        Ok(s) => s,
        Err(e) => return Outcome::Other(format!("{e:#}")),
    };
    let attempt = async move {
        let mut stream = socket.connect(addr).await.map_err(classify)?;
        let payload = b"probe-payload-0123456789";
        stream.write_all(payload).await.map_err(classify)?;
        // Do not half-close: some proxies answer a half-closed connection differently.
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while got.len() < payload.len() {
            let n = stream.read(&mut buf).await.map_err(classify)?;
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        if got.is_empty() {
            Err(Outcome::ClosedWithoutData)
        } else if got == payload {
            Ok(Outcome::Echoed)
        } else {
            Err(Outcome::Other(format!(
                "unexpected reply {:?}",
                String::from_utf8_lossy(&got)
            )))
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(o)) | Ok(Err(o)) => o,
        Err(_) => Outcome::TimedOut,
    }
}

fn classify(e: std::io::Error) -> Outcome {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => Outcome::Refused,
        ConnectionReset | ConnectionAborted | BrokenPipe => Outcome::Reset,
        TimedOut => Outcome::TimedOut,
        _ => Outcome::Other(e.to_string()),
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `data` and reads exactly as many bytes back (the connection stays open), failing if
/// the echo differs.
pub async fn echo_roundtrip(stream: &mut TcpStream, data: &[u8]) -> Result<()> {
    let (mut rd, mut wr) = stream.split();
    let write = async {
        wr.write_all(data).await.context("writing")?;
        anyhow::Ok(())
    };
    let read = async {
        let mut got = vec![0u8; data.len()];
        rd.read_exact(&mut got).await.context("reading echo")?;
        anyhow::Ok(got)
    };
    let (w, got) = tokio::join!(write, read);
    w?;
    anyhow::ensure!(got? == data, "echo differs from what was sent");
    Ok(())
}

/// `len` pseudo-random bytes from `seed`.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    PseudoRandom::new(seed).fill(&mut v);
    v
}
