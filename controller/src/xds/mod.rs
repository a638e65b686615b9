//! The delta ADS server (`envoy.service.discovery.v3.AggregatedDiscoveryService/
//! DeltaAggregatedResources`) that Istio's ztunnel and our own proxies subscribe to.
//!
//! The glue publishes [`Change`]s with [`XdsServer::publish`]: each resource is wrapped and
//! versioned once ([`cache`]), an unchanged content hash is a no-op, and changed names are
//! debounced ([`debounce`]) and then marked dirty on every stream that requested their type.
//! Each stream ([`stream`] state machine, driven by [`server`]) builds its responses from the
//! shared cache when it can send, so a slow client gets the latest state, not a backlog.
//! [`transport`] serves the gRPC routes over TLS (or plaintext for tests) with keepalive and a
//! jittered max connection age; [`metrics`] counts pushes, NACKs, latency, clients, resources;
//! [`nack`] splits a NACK into per-resource reports for the Event writer; [`wire`] writes each
//! response out while it is sent, its resources' encodings shared with the cache.

pub mod cache;
pub mod debounce;
pub mod metrics;
pub mod nack;
pub mod node;
pub mod server;
pub mod stream;
pub mod transport;
pub mod wire;

pub use cache::{CachedResource, Change};
pub use debounce::DebounceConfig;
pub use metrics::Metrics;
pub use nack::NackReport;
pub use node::NodeInfo;
pub use server::{AdsService, ConnectionInfo};
pub use transport::{serve, ConnectionContext, ServeConfig};

use crate::auth::Authenticator;
use cache::{Cache, Prepared};
use debounce::{Batch, Pending};
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock, Weak};
use tokio::sync::{Notify, Semaphore};

/// Server settings.
#[derive(Debug, Clone)]
pub struct XdsConfig {
    /// Push debouncing.
    pub debounce: DebounceConfig,
    /// Responses built and sent concurrently, over all streams (istiod's `PILOT_PUSH_THROTTLE`
    /// default: min(15 + 5 × cores, 100)).
    pub push_concurrency: usize,
    /// Largest request accepted (a reconnecting client lists every name and version it has).
    pub max_decoding_message_size: usize,
    /// Largest response sent.
    pub max_encoding_message_size: usize,
    /// Resource bytes per part when a first response is split for a client that accepts parts
    /// (ours, see [`common::xds::CHUNKED_METADATA`]).
    pub chunk_bytes: usize,
}

impl Default for XdsConfig {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        XdsConfig {
            debounce: DebounceConfig::default(),
            push_concurrency: (15 + 5 * cores).min(100),
            max_decoding_message_size: 64 << 20,
            max_encoding_message_size: 200 << 20,
            chunk_bytes: stream::CHUNK_BYTES,
        }
    }
}

/// The server: cache, debouncer, connected streams, metrics. Cheap to clone.
#[derive(Clone)]
pub struct XdsServer {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) cfg: XdsConfig,
    pub(crate) cache: RwLock<Cache>,
    pending: Arc<Mutex<Pending>>,
    wake: Arc<Notify>,
    pub(crate) streams: Mutex<HashMap<u64, Arc<server::StreamShared>>>,
    pub(crate) next_id: AtomicU64,
    pub(crate) push_permits: Semaphore,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) authenticator: Option<Arc<dyn Authenticator>>,
    /// Where per-resource NACKs go ([`XdsServer::nack_reports`]); full or absent: dropped.
    pub(crate) nack_sink: Mutex<Option<tokio::sync::mpsc::Sender<NackReport>>>,
    debouncer: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(h) = lock(&self.debouncer).take() {
            h.abort();
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl XdsServer {
    /// A server with its own metrics registry. Must be called within a tokio runtime (it
    /// spawns the debouncer). `authenticator`: checked once per stream; `None` accepts all
    /// callers (tests, or a deployment that authenticates elsewhere).
    pub fn new(cfg: XdsConfig, authenticator: Option<Arc<dyn Authenticator>>) -> Self {
        Self::with_metrics(cfg, authenticator, Arc::new(Metrics::standalone()))
    }

    /// A server reporting into `metrics` (e.g. registered in the lead's registry).
    pub fn with_metrics(
        cfg: XdsConfig,
        authenticator: Option<Arc<dyn Authenticator>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let inner = Arc::new(Inner {
            push_permits: Semaphore::new(cfg.push_concurrency.max(1)),
            cfg,
            cache: RwLock::new(Cache::default()),
            pending: Arc::new(Mutex::new(Pending::default())),
            wake: Arc::new(Notify::new()),
            streams: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            metrics,
            authenticator,
            nack_sink: Mutex::new(None),
            debouncer: Mutex::new(None),
        });
        let weak: Weak<Inner> = Arc::downgrade(&inner);
        let task = tokio::spawn(debounce::run(
            inner.pending.clone(),
            inner.wake.clone(),
            inner.cfg.debounce,
            move |batch| {
                if let Some(inner) = weak.upgrade() {
                    inner.flush(batch);
                }
            },
        ));
        *lock(&inner.debouncer) = Some(task.abort_handle());
        XdsServer { inner }
    }

    /// Publishes changes. Each resource is wrapped and hashed here, once; a resource whose
    /// content hash is unchanged, or the removal of an absent name, pushes nothing. The rest is
    /// pushed to the subscribed streams after the debounce.
    pub fn publish(&self, changes: Vec<Change>) {
        if changes.is_empty() {
            return;
        }
        let prepared: Vec<Prepared> = changes.into_iter().map(Prepared::new).collect();
        let now = tokio::time::Instant::now();
        let changed = {
            let mut cache = self.inner.cache.write().unwrap_or_else(|e| e.into_inner());
            let changed = cache.apply(prepared);
            let types: std::collections::BTreeSet<&str> =
                changed.iter().map(|(t, _, _)| t.as_str()).collect();
            for t in types {
                self.inner.metrics.set_resources(t, cache.len(t));
            }
            changed
        };
        if changed.is_empty() {
            return;
        }
        lock(&self.inner.pending).add(now, changed);
        self.inner.wake.notify_one();
    }

    /// The gRPC service to add to a router (with [`serve`], or any tonic server).
    pub fn service(&self) -> AdsService {
        AdsService::new(self.inner.clone())
    }

    /// The connected streams: node claims and authenticated caller.
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        let streams: Vec<_> = lock(&self.inner.streams).values().cloned().collect();
        let mut v: Vec<ConnectionInfo> = streams.iter().map(|s| s.info()).collect();
        v.sort_by_key(|c| c.id);
        v
    }

    /// From now on, every resource a proxy NACKs is also sent here (up to `capacity` queued;
    /// beyond that, reports are dropped rather than slowing a stream). Replaces an earlier
    /// receiver.
    pub fn nack_reports(&self, capacity: usize) -> tokio::sync::mpsc::Receiver<NackReport> {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity.max(1));
        *lock(&self.inner.nack_sink) = Some(tx);
        rx
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Number of cached resources of `type_url`.
    pub fn resource_count(&self, type_url: &str) -> usize {
        self.inner
            .cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .len(type_url)
    }

    /// Names of the resources of `type_url` being served (tests, debugging).
    pub fn resource_names(&self, type_url: &str) -> Vec<String> {
        self.inner
            .cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .all(type_url)
            .map(|r| r.name.clone())
            .collect()
    }

    /// Pushes pending changes now, without waiting for the debounce (tests, shutdown).
    pub fn flush_now(&self) {
        let batch = {
            let mut p = lock(&self.inner.pending);
            std::mem::take(&mut *p)
        };
        self.inner.flush(batch.into_batch());
    }
}

impl Inner {
    /// Marks a batch's names dirty on every stream that requested their type.
    fn flush(&self, batch: Batch) {
        if batch.names.is_empty() {
            return;
        }
        let streams: Vec<_> = lock(&self.streams).values().cloned().collect();
        for s in streams {
            s.mark_dirty(&batch);
        }
    }
}
