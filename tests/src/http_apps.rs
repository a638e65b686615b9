//! HTTP applications for the L7 (waypoint) tests, built on hyper: a test server that answers
//! with its pod name, the request and the peer it saw (keep-alive HTTP/1.1 and h2c with prior
//! knowledge, detected per connection), keep-alive HTTP/1.1 and HTTP/2 clients that run over a
//! socket made inside a pod, and a server-speaks-first TCP server for the L4 fallback.
//!
//! The HTTP server's behaviour per request:
//! - every response carries `x-pod: <pod>` and `x-peer: <ip:port the server saw>`;
//! - `x-status: <code>` sets the response status, `x-delay-ms: <ms>` delays the response,
//!   `x-conn-close: 1` answers with `connection: close` (the server closes the connection);
//! - an HTTP/1.1 upgrade request (`connection: upgrade`, `upgrade: <proto>`) is answered with
//!   `101 Switching Protocols`, after which the server echoes the raw bytes of the connection;
//! - a path starting with `/echo` streams the request body back (no content-length, so HTTP/1.1
//!   answers chunked) with `x-body-len` / `x-body-sha256` of what arrived;
//! - any other path answers a JSON document: `pod`, `method`, `path`, `version`, `peer`,
//!   `body_len` and all request `headers` (name → value, repeated ones joined with `,`).
//!
//! Each request is recorded ([`HttpRecord`]), with the id of the connection it came on.

use crate::apps::hex;
use crate::netns::Netns;
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

/// Error type of request bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type the clients send.
pub type ReqBody = BoxBody<Bytes, BoxError>;
type RespBody = BoxBody<Bytes, BoxError>;

/// Which HTTP versions the server accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpMode {
    /// HTTP/1.x, or HTTP/2 when the connection starts with the h2 preface (h2c prior knowledge).
    Auto,
    Http1Only,
    H2cOnly,
}

/// One request as the server saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRecord {
    pub pod: String,
    pub method: String,
    /// Path and query.
    pub path: String,
    /// `HTTP/1.0`, `HTTP/1.1` or `HTTP/2`.
    pub version: String,
    pub peer: SocketAddr,
    /// Header names lower-cased, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body_len: u64,
    pub body_sha256: String,
    /// Server-local id of the connection the request arrived on (1, 2, …).
    pub conn: u64,
}

impl HttpRecord {
    /// The first header named `name` (lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A running HTTP server; aborted on drop.
pub struct HttpServer {
    pub addr: SocketAddr,
    pub pod: String,
    records: Arc<Mutex<Vec<HttpRecord>>>,
    connections: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl HttpServer {
    /// Requests served so far.
    pub fn records(&self) -> Vec<HttpRecord> {
        self.records.lock().unwrap().clone()
    }

    /// Number of requests served so far.
    pub fn request_count(&self) -> usize {
        self.records.lock().unwrap().len()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Distinct peer IPs seen so far.
    pub fn peer_ips(&self) -> Vec<IpAddr> {
        let mut ips: Vec<IpAddr> = self.records().iter().map(|r| r.peer.ip()).collect();
        ips.sort();
        ips.dedup();
        ips
    }

    /// Waits until at least `n` requests were served; returns the records.
    pub async fn wait_requests(&self, n: usize, timeout: Duration) -> Result<Vec<HttpRecord>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let r = self.records();
            if r.len() >= n {
                return Ok(r);
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "HTTP server {} ({}) served {} requests, expected {n}",
                    self.pod,
                    self.addr,
                    r.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the test HTTP server in `ns` on `addr`, answering as pod `pod`.
pub fn http_server(ns: &Netns, addr: SocketAddr, pod: &str, mode: HttpMode) -> Result<HttpServer> {
    http_server_inner(ns, addr, pod, mode, None)
}

/// Like [`http_server`], but every response without an `x-status` request header gets status
/// `status` (a pod that always fails, e.g. for outlier detection).
pub fn http_server_with_status(
    ns: &Netns,
    addr: SocketAddr,
    pod: &str,
    mode: HttpMode,
    status: u16,
) -> Result<HttpServer> {
    http_server_inner(ns, addr, pod, mode, StatusCode::from_u16(status).ok())
}

fn http_server_inner(
    ns: &Netns,
    addr: SocketAddr,
    pod: &str,
    mode: HttpMode,
    default_status: Option<StatusCode>,
) -> Result<HttpServer> {
    let listener = ns.tcp_listener(addr)?;
    let addr = listener.local_addr()?;
    let records = Arc::new(Mutex::new(Vec::new()));
    let connections = Arc::new(AtomicU64::new(0));
    let (recs, conns, pod_name) = (records.clone(), connections.clone(), pod.to_string());
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            let conn = conns.fetch_add(1, Ordering::Relaxed) + 1;
            let (recs, pod) = (recs.clone(), pod_name.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    handle(req, pod.clone(), peer, conn, recs.clone(), default_status)
                });
                let mut builder =
                    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                builder = match mode {
                    HttpMode::Auto => builder,
                    HttpMode::Http1Only => builder.http1_only(),
                    HttpMode::H2cOnly => builder.http2_only(),
                };
                let _ = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(HttpServer {
        addr,
        pod: pod.to_string(),
        records,
        connections,
        task,
    })
}

fn version_str(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "?",
    }
}

fn full_body(b: impl Into<Bytes>) -> RespBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

/// A body streamed as several frames of varying sizes (so HTTP/1.1 sends it chunked).
pub fn chunked_body(data: Bytes, chunk: usize) -> ReqBody {
    let chunk = chunk.max(1);
    let mut frames = Vec::new();
    let mut off = 0;
    let mut i = 0usize;
    while off < data.len() {
        // Vary the sizes around `chunk` so chunk boundaries do not line up with anything.
        let size = (chunk / 2 + (i * 7919) % chunk).max(1);
        let end = (off + size).min(data.len());
        frames.push(Ok::<_, BoxError>(Frame::data(data.slice(off..end))));
        off = end;
        i += 1;
    }
    StreamBody::new(futures_util::stream::iter(frames)).boxed()
}

/// An empty request body.
pub fn empty_body() -> ReqBody {
    Full::new(Bytes::new()).map_err(|e| match e {}).boxed()
}

/// A request body of known length (sent with `content-length`).
pub fn full_request_body(b: impl Into<Bytes>) -> ReqBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

fn is_upgrade(req: &Request<Incoming>) -> Option<String> {
    let connection = req.headers().get("connection")?.to_str().ok()?;
    if !connection
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
    {
        return None;
    }
    Some(req.headers().get("upgrade")?.to_str().ok()?.to_string())
}

async fn handle(
    mut req: Request<Incoming>,
    pod: String,
    peer: SocketAddr,
    conn: u64,
    records: Arc<Mutex<Vec<HttpRecord>>>,
    default_status: Option<StatusCode>,
) -> Result<Response<RespBody>, Infallible> {
    let upgrade = is_upgrade(&req).map(|proto| (proto, hyper::upgrade::on(&mut req)));
    let (parts, body) = req.into_parts();
    let mut headers: Vec<(String, String)> = Vec::new();
    for (k, v) in &parts.headers {
        headers.push((
            k.as_str().to_string(),
            String::from_utf8_lossy(v.as_bytes()).into_owned(),
        ));
    }
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let body = match body.collect().await {
        Ok(b) if upgrade.is_none() => b.to_bytes(),
        Ok(_) => Bytes::new(),
        Err(e) => {
            let mut resp = Response::new(full_body(format!("reading request body: {e}\n")));
            *resp.status_mut() = StatusCode::BAD_REQUEST;
            return Ok(resp);
        }
    };
    let record = HttpRecord {
        pod: pod.clone(),
        method: parts.method.to_string(),
        path: path.clone(),
        version: version_str(parts.version).to_string(),
        peer,
        headers,
        body_len: body.len() as u64,
        body_sha256: hex(&Sha256::digest(&body)),
        conn,
    };
    records.lock().unwrap().push(record.clone());

    let hdr = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    if let Some(ms) = hdr("x-delay-ms").and_then(|v| v.parse::<u64>().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let status = hdr("x-status")
        .and_then(|v| v.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .or(default_status)
        .unwrap_or(StatusCode::OK);

    if let Some((proto, on_upgrade)) = upgrade {
        tokio::spawn(async move {
            let Ok(upgraded) = on_upgrade.await else {
                return;
            };
            let mut io = TokioIo::new(upgraded);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match io.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = io.shutdown().await;
        });
        let mut r = Response::new(full_body(Bytes::new()));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = r.headers_mut();
        h.insert("connection", HeaderValue::from_static("upgrade"));
        if let Ok(v) = HeaderValue::from_str(&proto) {
            h.insert("upgrade", v);
        }
        if let Ok(v) = HeaderValue::from_str(&pod) {
            h.insert("x-pod", v);
        }
        return Ok(r);
    }

    let mut resp = if path.starts_with("/echo") {
        let mut r = Response::new(chunked_body(body.clone(), 48 * 1024));
        let h = r.headers_mut();
        h.insert("x-body-len", HeaderValue::from(body.len() as u64));
        if let Ok(v) = HeaderValue::from_str(&record.body_sha256) {
            h.insert("x-body-sha256", v);
        }
        h.insert(
            "content-type",
            HeaderValue::from_static("application/octet-stream"),
        );
        r
    } else {
        let mut hmap: BTreeMap<String, String> = BTreeMap::new();
        for (k, v) in &record.headers {
            hmap.entry(k.clone())
                .and_modify(|old| {
                    old.push(',');
                    old.push_str(v);
                })
                .or_insert_with(|| v.clone());
        }
        let doc = serde_json::json!({
            "pod": pod,
            "method": record.method,
            "path": record.path,
            "version": record.version,
            "peer": peer.to_string(),
            "body_len": record.body_len,
            "headers": hmap,
        });
        let mut r = Response::new(full_body(format!("{doc}\n")));
        r.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/json"));
        r
    };
    *resp.status_mut() = status;
    if hdr("x-conn-close").is_some() {
        resp.headers_mut()
            .insert("connection", HeaderValue::from_static("close"));
    }
    if let Ok(v) = HeaderValue::from_str(&pod) {
        resp.headers_mut().insert("x-pod", v);
    }
    if let Ok(v) = HeaderValue::from_str(&peer.to_string()) {
        resp.headers_mut().insert("x-peer", v);
    }
    Ok(resp)
}

/// A whole response as a client got it.
#[derive(Debug, Clone)]
pub struct HttpReply {
    pub status: u16,
    /// `HTTP/1.1` or `HTTP/2`.
    pub version: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl HttpReply {
    /// The header `name` as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as (lossy) text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON (the test server's info document).
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("response body is not JSON: {:?}", self.text()))
    }

    /// The pod that answered (`x-pod`), or `""`.
    pub fn pod(&self) -> String {
        self.header("x-pod").unwrap_or_default().to_string()
    }

    /// The peer address the answering server saw (`x-peer`).
    pub fn peer(&self) -> Option<SocketAddr> {
        self.header("x-peer")?.parse().ok()
    }

    /// SHA-256 (hex) of the body.
    pub fn body_sha256(&self) -> String {
        hex(&Sha256::digest(&self.body))
    }
}

async fn read_reply(resp: Response<Incoming>) -> Result<HttpReply> {
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .context("reading the response body")?
        .to_bytes();
    Ok(HttpReply {
        status: parts.status.as_u16(),
        version: version_str(parts.version).to_string(),
        headers: parts.headers,
        body,
    })
}

/// Builds a request: `path` (path and query), extra headers, body.
pub fn request(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: ReqBody,
) -> Request<ReqBody> {
    let mut b = Request::builder().method(method).uri(path);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(body).expect("valid request")
}

/// A keep-alive HTTP/1.1 client connection opened from inside a pod.
pub struct Http1Client {
    sender: hyper::client::conn::http1::SendRequest<ReqBody>,
    /// Default `host` header.
    pub host: String,
    /// The client side of the TCP connection.
    pub local_addr: SocketAddr,
    conn: JoinHandle<()>,
}

impl Http1Client {
    /// Connects from `ns` to `addr` and performs the (trivial) HTTP/1.1 handshake.
    pub async fn connect(ns: &Netns, addr: SocketAddr) -> Result<Http1Client> {
        let stream = ns.connect(addr).await?;
        let _ = stream.set_nodelay(true);
        let local_addr = stream.local_addr()?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP/1.1 handshake")?;
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Http1Client {
            sender,
            host: addr.to_string(),
            local_addr,
            conn,
        })
    }

    /// Sends `req` (adding `host` when absent) and reads the whole response.
    pub async fn send(&mut self, mut req: Request<ReqBody>) -> Result<HttpReply> {
        if !req.headers().contains_key("host") {
            req.headers_mut()
                .insert("host", HeaderValue::from_str(&self.host)?);
        }
        let what = format!("{} {}", req.method(), req.uri());
        self.sender
            .ready()
            .await
            .with_context(|| format!("{what}: connection not ready"))?;
        let resp = self
            .sender
            .send_request(req)
            .await
            .with_context(|| format!("{what}: HTTP/1.1 request"))?;
        read_reply(resp).await.with_context(|| what)
    }

    /// `GET path` with extra headers.
    pub async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Result<HttpReply> {
        self.send(request("GET", path, headers, empty_body())).await
    }

    /// `POST path` with `data` sent chunked (`transfer-encoding: chunked`, ~`chunk`-sized
    /// pieces).
    pub async fn post_chunked(
        &mut self,
        path: &str,
        data: Bytes,
        chunk: usize,
    ) -> Result<HttpReply> {
        self.send(request(
            "POST",
            path,
            &[("transfer-encoding", "chunked")],
            chunked_body(data, chunk),
        ))
        .await
    }

    /// True once the connection has closed.
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }
}

impl Drop for Http1Client {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

/// An HTTP/2 (prior knowledge, cleartext) client connection opened from inside a pod. Clone
/// [`H2Client::sender`] to run concurrent streams.
#[derive(Clone)]
pub struct H2Client {
    sender: hyper::client::conn::http2::SendRequest<ReqBody>,
    /// `:authority` of requests.
    pub authority: String,
    pub local_addr: SocketAddr,
    /// Aborts the connection task when the last clone goes.
    _conn: Arc<ConnTask>,
}

struct ConnTask(JoinHandle<()>);

impl Drop for ConnTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl H2Client {
    /// Connects from `ns` to `addr` and sends the HTTP/2 preface (no upgrade, no TLS).
    pub async fn connect(ns: &Netns, addr: SocketAddr) -> Result<H2Client> {
        let stream = ns.connect(addr).await?;
        let _ = stream.set_nodelay(true);
        let local_addr = stream.local_addr()?;
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .context("HTTP/2 handshake")?;
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(H2Client {
            sender,
            authority: addr.to_string(),
            local_addr,
            _conn: Arc::new(ConnTask(conn)),
        })
    }

    /// Sends `req` (its path made absolute with `http://<authority>` when relative) on a new
    /// stream and reads the whole response.
    pub async fn send(&self, mut req: Request<ReqBody>) -> Result<HttpReply> {
        if req.uri().authority().is_none() {
            let pq = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_else(|| "/".into());
            *req.uri_mut() = format!("http://{}{pq}", self.authority).parse()?;
        }
        let what = format!("{} {}", req.method(), req.uri());
        let mut sender = self.sender.clone();
        sender
            .ready()
            .await
            .with_context(|| format!("{what}: connection not ready"))?;
        let resp = sender
            .send_request(req)
            .await
            .with_context(|| format!("{what}: HTTP/2 request"))?;
        read_reply(resp).await.with_context(|| what)
    }

    /// `GET path` with extra headers.
    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Result<HttpReply> {
        self.send(request("GET", path, headers, empty_body())).await
    }

    /// True once the connection has closed.
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }
}

/// A TCP server that speaks first: on each connection it sends `banner`, then echoes
/// everything until EOF. Aborted on drop.
pub struct BannerServer {
    pub addr: SocketAddr,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    task: JoinHandle<()>,
}

impl BannerServer {
    /// Peers of the connections accepted so far.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }
}

impl Drop for BannerServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts a [`BannerServer`] in `ns` on `addr`.
pub fn banner_echo_server(ns: &Netns, addr: SocketAddr, banner: &[u8]) -> Result<BannerServer> {
    let listener = ns.tcp_listener(addr)?;
    let addr = listener.local_addr()?;
    let peers = Arc::new(Mutex::new(Vec::new()));
    let (p, banner) = (peers.clone(), banner.to_vec());
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, peer)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            p.lock().unwrap().push(peer);
            let banner = banner.clone();
            tokio::spawn(async move {
                stream.write_all(&banner).await?;
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = stream.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    stream.write_all(&buf[..n]).await?;
                }
                stream.shutdown().await?;
                std::io::Result::Ok(())
            });
        }
    });
    Ok(BannerServer { addr, peers, task })
}

/// Sends an HTTP/1.1 upgrade request (`GET /upgrade`, protocol `echo-proto`, which the
/// `Auto` servers accept) on `stream` and returns the response head.
pub async fn upgrade_handshake(
    stream: &mut tokio::net::TcpStream,
    host: &str,
    what: &str,
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let req = format!(
        "GET /upgrade HTTP/1.1\r\nhost: {host}\r\nconnection: upgrade\r\nupgrade: echo-proto\r\n\r\n"
    );
    stream
        .write_all(req.as_bytes())
        .await
        .expect("write the upgrade request");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = crate::support::within(10, "upgrade response head", stream.read(&mut byte))
            .await
            .expect("read the upgrade response");
        assert!(
            n > 0,
            "{what}: connection closed before the end of the upgrade response: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}
