//! The tonic service: authenticates each stream (optional [`Authenticator`]), registers it so
//! pushes reach it, and drives its [`StreamState`]: read requests, take dirty names from the
//! mailbox the debouncer fills, and — when the transport can take a response and a push permit
//! is free — build the next response from the cache. A stream ends cleanly (gRPC OK, which
//! makes Istio's ztunnel reconnect at once) when its connection reaches its max age.

use super::debounce::Batch;
use super::node::NodeInfo;
use super::stream::{Event, StreamState};
use super::transport::ConnectionContext;
use super::{lock, Inner};
use crate::auth::{Authenticator, CallerIdentity};
use common::xds::discovery::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use common::xds::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use futures_util::Stream;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tonic::{Request, Response, Status, Streaming};

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

/// The gRPC service implementation.
pub struct AdsService {
    inner: Arc<Inner>,
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

impl AdsService {
    pub(crate) fn server(inner: Arc<Inner>) -> AggregatedDiscoveryServiceServer<AdsService> {
        let dec = inner.cfg.max_decoding_message_size;
        let enc = inner.cfg.max_encoding_message_size;
        AggregatedDiscoveryServiceServer::new(AdsService { inner })
            .max_decoding_message_size(dec)
            .max_encoding_message_size(enc)
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsService {
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let caller = match &self.inner.authenticator {
            Some(a) => Some(authenticate(a.as_ref(), &request).await?),
            None => None,
        };
        let ctx = request.extensions().get::<ConnectionContext>().cloned();
        let peer = ctx
            .as_ref()
            .and_then(|c| c.peer)
            .or_else(|| request.remote_addr());
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
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
        lock(&self.inner.streams).insert(id, shared.clone());
        let (tx, mut rx) = mpsc::channel(1);
        let inner = self.inner.clone();
        let requests = request.into_inner();
        tokio::spawn(async move {
            let closing = ctx.map(|c| c.closing);
            drive(&inner, id, &shared, requests, tx, closing).await;
            lock(&inner.streams).remove(&id);
        });
        let out = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        Ok(Response::new(Box::pin(out)))
    }
}

use std::sync::atomic::Ordering;

async fn authenticate(
    a: &dyn Authenticator,
    request: &Request<Streaming<DeltaDiscoveryRequest>>,
) -> Result<CallerIdentity, Status> {
    match a.authenticate(request.metadata()).await {
        Ok(c) => Ok(c),
        Err(e) => {
            tracing::warn!(peer = ?request.remote_addr(), error = %e.message(), "xDS stream rejected");
            Err(e)
        }
    }
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
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
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
