//! The gRPC service: authenticates each stream (optional
//! [`Authenticator`](crate::auth::Authenticator)), registers it so pushes reach it, and drives
//! its [`StreamState`]: read requests, take dirty names from the mailbox the debouncer fills,
//! and — when the transport can take a response and a push permit is free — build the next
//! response from the cache. A stream ends cleanly (gRPC OK, which makes Istio's ztunnel
//! reconnect at once) when its connection reaches its max age. Requests are decoded by tonic;
//! responses go out through [`ResponseBody`].

use super::debounce::Batch;
use super::node::NodeInfo;
use super::stream::{Event, StreamState};
use super::transport::ConnectionContext;
use super::wire::{Outgoing, ResponseBody};
use super::{lock, Inner};
use crate::auth::CallerIdentity;
use common::xds::discovery::aggregated_discovery_service_server::SERVICE_NAME;
use common::xds::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::SystemTime;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tonic::codec::{BufferSettings, Streaming};
use tonic::codegen::Service;
use tonic::server::NamedService;
use tonic::Status;

/// What is known about one connected stream.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    /// Server-unique stream id (also the prefix of its nonces).
    pub id: u64,
    /// The proxy's claims (first request with a node).
    pub node: Option<NodeInfo>,
    /// The authenticated caller, when an authenticator is configured.
    pub caller: Option<CallerIdentity>,
    /// Remote address, when the transport knows it.
    pub peer: Option<SocketAddr>,
    /// When the stream opened.
    pub connected_at: SystemTime,
    /// Type URLs requested.
    pub types: Vec<String>,
}

/// Names pushed to a stream, waiting for its driver.
#[derive(Default)]
struct Mailbox {
    /// Types the stream requested (pushes of other types are not recorded).
    types: HashSet<String>,
    dirty: HashMap<String, (HashMap<String, u64>, Option<Instant>)>,
}

/// The part of a stream the debouncer and [`super::XdsServer::connections`] see.
pub(crate) struct StreamShared {
    mailbox: Mutex<Mailbox>,
    notify: Notify,
    info: Mutex<ConnectionInfo>,
}

impl StreamShared {
    pub(crate) fn mark_dirty(&self, batch: &Batch) {
        let mut any = false;
        {
            let mut mb = lock(&self.mailbox);
            for (t, names) in &batch.names {
                if !mb.types.contains(t) {
                    continue;
                }
                let e = mb.dirty.entry(t.clone()).or_default();
                for (n, seq) in names {
                    let s = e.0.entry(n.clone()).or_default();
                    *s = (*s).max(*seq);
                }
                e.1 = match (e.1, batch.first) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                any = true;
            }
        }
        if any {
            self.notify.notify_one();
        }
    }

    pub(crate) fn info(&self) -> ConnectionInfo {
        lock(&self.info).clone()
    }
}

/// The gRPC service: `envoy.service.discovery.v3.AggregatedDiscoveryService`, whose one method
/// (`DeltaAggregatedResources`) is served here rather than through tonic's generated server,
/// so responses are written out as they are sent ([`ResponseBody`]) instead of through a
/// per-stream encode buffer that keeps the size of the largest response.
#[derive(Clone)]
pub struct AdsService {
    inner: Arc<Inner>,
}

const DELTA_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

impl NamedService for AdsService {
    const NAME: &'static str = SERVICE_NAME;
}

impl AdsService {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        AdsService { inner }
    }
}

type HttpResponse = http::Response<tonic::body::Body>;

impl Service<http::Request<tonic::body::Body>> for AdsService {
    type Response = HttpResponse;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move {
            Ok(match delta(inner, req).await {
                Ok(r) => r,
                Err(status) => status.into_http(),
            })
        })
    }
}

/// One `DeltaAggregatedResources` stream: authenticate, then hand the requests to a driver
/// task and answer with a body that sends what the driver builds.
async fn delta(
    inner: Arc<Inner>,
    req: http::Request<tonic::body::Body>,
) -> Result<HttpResponse, Status> {
    if req.uri().path() != DELTA_PATH {
        return Err(Status::unimplemented(format!(
            "{} is not served",
            req.uri().path()
        )));
    }
    if let Some(enc) = req.headers().get("grpc-encoding") {
        if enc.as_bytes() != b"identity" {
            return Err(Status::unimplemented(format!(
                "requests compressed with {enc:?} are not supported"
            )));
        }
    }
    let (parts, body) = req.into_parts();
    let ctx = parts.extensions.get::<ConnectionContext>().cloned();
    let peer = ctx.as_ref().and_then(|c| c.peer);
    let caller = match &inner.authenticator {
        Some(a) => {
            let metadata = tonic::metadata::MetadataMap::from_headers(parts.headers);
            match a.authenticate(&metadata).await {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(?peer, error = %e.message(), "xDS stream rejected");
                    return Err(e);
                }
            }
        }
        None => None,
    };
    let decoder =
        tonic_prost::ProstCodec::<DeltaDiscoveryResponse, DeltaDiscoveryRequest>::raw_decoder(
            BufferSettings::default(),
        );
    let requests = Streaming::new_request(
        decoder,
        body,
        None,
        Some(inner.cfg.max_decoding_message_size),
    );
    let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
    let shared = Arc::new(StreamShared {
        mailbox: Mutex::new(Mailbox::default()),
        notify: Notify::new(),
        info: Mutex::new(ConnectionInfo {
            id,
            node: None,
            caller,
            peer,
            connected_at: SystemTime::now(),
            types: Vec::new(),
        }),
    });
    lock(&inner.streams).insert(id, shared.clone());
    let (tx, rx) = mpsc::channel(1);
    let max = inner.cfg.max_encoding_message_size;
    tokio::spawn(async move {
        let closing = ctx.map(|c| c.closing);
        drive(&inner, id, &shared, requests, tx, closing).await;
        lock(&inner.streams).remove(&id);
    });
    let mut resp = http::Response::new(tonic::body::Body::new(ResponseBody::new(rx, max)));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    Ok(resp)
}

/// Waits until the connection is closing (never, without a connection context).
async fn closed(closing: &mut Option<watch::Receiver<bool>>) {
    match closing {
        Some(rx) => {
            if rx.wait_for(|c| *c).await.is_err() {
                std::future::pending::<()>().await
            }
        }
        None => std::future::pending::<()>().await,
    }
}

async fn drive(
    inner: &Inner,
    id: u64,
    shared: &StreamShared,
    mut requests: Streaming<DeltaDiscoveryRequest>,
    tx: mpsc::Sender<Result<Outgoing, Status>>,
    mut closing: Option<watch::Receiver<bool>>,
) {
    let _connected = inner.metrics.connected();
    let mut st = StreamState::new(id).with_chunk_bytes(inner.cfg.chunk_bytes);
    let mut node_id = String::new();
    let end: Result<(), Status> = loop {
        let dirty = std::mem::take(&mut lock(&shared.mailbox).dirty);
        for (t, (names, first)) in dirty {
            st.mark_dirty(&t, names, first);
        }
        let want = st.has_work();
        tokio::select! {
            biased;
            _ = closed(&mut closing) => {
                tracing::debug!(stream = id, node = %node_id, "connection at max age; ending the xDS stream");
                break Ok(());
            }
            r = requests.message() => match r {
                Ok(Some(req)) => match st.on_request(req) {
                    Ok(ev) => {
                        if node_id.is_empty() {
                            if let Some(n) = st.node() {
                                node_id = n.id.clone();
                                lock(&shared.info).node = Some(n.clone());
                                tracing::info!(stream = id, node = %node_id, "xDS stream connected");
                            }
                        }
                        on_event(inner, shared, &node_id, ev);
                    }
                    Err(e) => break Err(Status::invalid_argument(e.to_string())),
                },
                Ok(None) => break Ok(()),
                Err(e) => {
                    tracing::debug!(stream = id, node = %node_id, error = %e, "xDS request stream failed");
                    break Err(e);
                }
            },
            _ = shared.notify.notified() => {}
            permit = tx.reserve(), if want => {
                let Ok(permit) = permit else { break Ok(()) };
                let Ok(_push) = inner.push_permits.acquire().await else { break Ok(()) };
                let built = {
                    let cache = inner.cache.read().unwrap_or_else(|e| e.into_inner());
                    st.build(&cache)
                };
                if let Some(b) = built {
                    inner.metrics.pushed(&b.response.type_url, b.oldest_change.map(|t| t.elapsed()));
                    tracing::debug!(
                        stream = id, node = %node_id, type_url = %b.response.type_url,
                        nonce = %b.response.nonce, resources = b.response.resources.len(),
                        removed = b.response.removed_resources.len(), initial = b.initial,
                        "xDS push"
                    );
                    permit.send(Ok(b.response));
                }
            }
        }
    };
    tracing::info!(stream = id, node = %node_id, "xDS stream closed");
    if let Err(status) = end {
        let _ = tx.send(Err(status)).await;
    }
}

fn on_event(inner: &Inner, shared: &StreamShared, node_id: &str, ev: Event) {
    match ev {
        Event::Initial { type_url } => {
            // Registered before the first response reads the cache, so no change is lost.
            lock(&shared.mailbox).types.insert(type_url.clone());
            lock(&shared.info).types.push(type_url);
        }
        Event::Nack { type_url, message } => {
            inner.metrics.nacked(&type_url);
            tracing::warn!(node = %node_id, %type_url, %message, "xDS NACK");
            let entries = super::nack::resources(&message);
            inner.metrics.nacked_resources(&type_url, entries.len());
            let sink = lock(&inner.nack_sink).clone();
            if let Some(sink) = sink {
                for (resource, reason) in entries {
                    let report = super::NackReport {
                        node: node_id.to_string(),
                        type_url: type_url.clone(),
                        resource,
                        reason,
                    };
                    if sink.try_send(report).is_err() {
                        break;
                    }
                }
            }
        }
        Event::StaleNonce { type_url, nonce } => {
            tracing::debug!(node = %node_id, %type_url, %nonce, "xDS: ignoring a stale nonce");
        }
        Event::Ack { .. } | Event::Subscription { .. } => {}
    }
}
