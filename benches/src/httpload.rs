//! The L7 benchmark's two ends: a fast hyper HTTP/1.1 backend in pod b (a fixed ~100-byte body,
//! keep-alive; it counts the requests that carry the `x-routed` header a proxy's route set, so
//! each run proves the routing really happened), and a hand-written minimal HTTP/1.1 load
//! generator in pod a (N keep-alive connections, one request in flight per connection — no
//! pipelining — for a fixed time, every request timed).

use crate::load::Sockets;
use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tests::netns::Netns;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// The backend's response body: 100 bytes.
pub const BODY: &[u8; 100] =
    b"ok: a small fixed response body from the benchmark backend, exactly one hundred bytes long.........\n";

/// Header the proxies' route sets on the way to the backend.
pub const ROUTED_HEADER: &str = "x-routed";

/// Requests served by the backend so far, and how many of them carried [`ROUTED_HEADER`].
#[derive(Debug, Default)]
pub struct Served {
    pub total: AtomicU64,
    pub routed: AtomicU64,
}

impl Served {
    pub fn snapshot(&self) -> (u64, u64) {
        (
            self.total.load(Ordering::Relaxed),
            self.routed.load(Ordering::Relaxed),
        )
    }
}

/// The backend server; aborted on drop.
pub struct Backend {
    pub served: Arc<Served>,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the HTTP/1.1 backend on `addr` inside `ns` (on the caller's runtime).
pub fn start_backend(ns: &Netns, addr: SocketAddr) -> Result<Backend> {
    let listener = ns.tcp_listener(addr)?;
    let served = Arc::new(Served::default());
    let counts = served.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            let counts = counts.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    counts.total.fetch_add(1, Ordering::Relaxed);
                    if req.headers().contains_key(ROUTED_HEADER) {
                        counts.routed.fetch_add(1, Ordering::Relaxed);
                    }
                    let resp = Response::builder()
                        .header("content-type", "text/plain")
                        .body(Full::new(Bytes::from_static(BODY)))
                        .expect("valid response");
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(Backend { served, task })
}

/// What one load run measured.
#[derive(Debug, Clone)]
pub struct HttpLoad {
    pub requests: u64,
    pub secs: f64,
    sorted_ns: Vec<u64>,
}

impl HttpLoad {
    pub fn per_sec(&self) -> f64 {
        self.requests as f64 / self.secs
    }

    /// The `q` quantile (0..=1) of the request latency, in microseconds.
    pub fn quantile_us(&self, q: f64) -> f64 {
        if self.sorted_ns.is_empty() {
            return f64::NAN;
        }
        let i = ((self.sorted_ns.len() as f64 * q) as usize).min(self.sorted_ns.len() - 1);
        self.sorted_ns[i] as f64 / 1000.0
    }
}

/// The request every connection sends: `GET <path>` with a `host` header, nothing else.
pub fn request_bytes(path: &str, host: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nuser-agent: bench-l7\r\naccept: */*\r\n\r\n")
        .into_bytes()
}

/// A keep-alive HTTP/1.1 connection that sends one request at a time.
struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
    filled: usize,
}

impl Conn {
    async fn open(sockets: &Sockets, addr: SocketAddr) -> Result<Conn> {
        Ok(Conn {
            s: sockets.connect(addr).await?,
            buf: vec![0u8; 16 * 1024],
            filled: 0,
        })
    }

    /// Sends `req` and reads the whole response; fails unless it is a 200 with [`BODY`]'s
    /// length.
    async fn exchange(&mut self, req: &[u8]) -> Result<()> {
        self.s.write_all(req).await.context("writing the request")?;
        loop {
            if let Some(len) = parse_response(&self.buf[..self.filled])? {
                // No pipelining: nothing may follow the response.
                ensure!(
                    len == self.filled,
                    "{} unexpected bytes after a response",
                    self.filled - len
                );
                self.filled = 0;
                return Ok(());
            }
            if self.filled == self.buf.len() {
                bail!("response larger than {} bytes", self.buf.len());
            }
            let n = self
                .s
                .read(&mut self.buf[self.filled..])
                .await
                .context("reading the response")?;
            ensure!(n > 0, "connection closed mid-response");
            self.filled += n;
        }
    }
}

/// The length of the complete 200 response at the start of `b`, or `None` while incomplete.
fn parse_response(b: &[u8]) -> Result<Option<usize>> {
    let Some(end) = b.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&b[..end]).context("non-UTF-8 response head")?;
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    ensure!(
        status.starts_with("HTTP/1.1 200"),
        "unexpected response: {head}"
    );
    let mut content_length = None;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                content_length = Some(v.trim().parse::<usize>().context("content-length")?);
            }
        }
    }
    let cl = content_length.with_context(|| format!("no content-length: {head}"))?;
    ensure!(
        cl == BODY.len(),
        "body of {cl} bytes, expected {}",
        BODY.len()
    );
    let total = end + 4 + cl;
    Ok((b.len() >= total).then_some(total))
}

/// One request from pod a to `addr` (a smoke check before a run).
pub async fn probe(sockets: &Sockets, addr: SocketAddr, req: &[u8]) -> Result<()> {
    let mut c = Conn::open(sockets, addr).await?;
    c.exchange(req).await
}

/// `conns` keep-alive connections from pod a to `addr`, each having sent `warmup` untimed
/// requests (pooled upstream connections, caches and allocators are warm afterwards).
pub struct Warmed {
    conns: Vec<Conn>,
    req: Arc<[u8]>,
}

pub async fn connect_and_warm(
    sockets: &Arc<Sockets>,
    addr: SocketAddr,
    req: &[u8],
    conns: usize,
    warmup: usize,
) -> Result<Warmed> {
    sockets.prefill(conns)?;
    let mut open = Vec::with_capacity(conns);
    for _ in 0..conns {
        open.push(
            Conn::open(sockets, addr)
                .await
                .with_context(|| format!("connecting to {addr}"))?,
        );
    }
    let req: Arc<[u8]> = req.into();
    let mut warm = tokio::task::JoinSet::new();
    for mut c in open {
        let req = req.clone();
        warm.spawn(async move {
            for _ in 0..warmup {
                c.exchange(&req).await?;
            }
            Ok::<_, anyhow::Error>(c)
        });
    }
    let mut conns = Vec::with_capacity(conns);
    while let Some(r) = warm.join_next().await {
        conns.push(r?.context("warm-up request")?);
    }
    Ok(Warmed { conns, req })
}

/// All warmed connections loop for `duration`, one request in flight each, timing every
/// request. Requests in flight at the deadline finish and count; the time runs until the last
/// one has. The connections are closed afterwards.
pub async fn timed(warmed: Warmed, duration: Duration) -> Result<HttpLoad> {
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for mut c in warmed.conns {
        let req = warmed.req.clone();
        tasks.spawn(async move {
            let mut times = Vec::with_capacity(16 * 1024);
            while Instant::now() < deadline {
                let t = Instant::now();
                c.exchange(&req).await?;
                times.push(t.elapsed().as_nanos() as u64);
            }
            Ok::<_, anyhow::Error>(times)
        });
    }
    let mut sorted_ns = Vec::new();
    while let Some(r) = tasks.join_next().await {
        sorted_ns.extend(r?.context("timed request")?);
    }
    let secs = start.elapsed().as_secs_f64();
    sorted_ns.sort_unstable();
    Ok(HttpLoad {
        requests: sorted_ns.len() as u64,
        secs,
        sorted_ns,
    })
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn parses_responses() {
        let head = "HTTP/1.1 200 OK\r\ncontent-length: 100\r\nx: y\r\n\r\n";
        let mut r = head.as_bytes().to_vec();
        assert_eq!(parse_response(&r).unwrap(), None);
        r.extend_from_slice(BODY);
        assert_eq!(parse_response(&r).unwrap(), Some(head.len() + 100));
        assert!(parse_response(b"HTTP/1.1 503 x\r\ncontent-length: 0\r\n\r\n").is_err());
        assert_eq!(BODY.len(), 100);
    }
}
