//! An in-process fake Kubernetes API server for tests: a hyper HTTP/1.1 server on
//! 127.0.0.1:<ephemeral> speaking the real API protocol (list with paging, watch with
//! bookmarks and 410 expiry, create/replace/patch/server-side apply/delete, status
//! subresources, ownerReference garbage collection, TokenReview), so code built on
//! `kube::Client` and `kube::runtime` runs against it unchanged.
//!
//! ```no_run
//! # async fn t() {
//! let server = fake_apiserver::FakeApiServer::start().await;
//! server.apply_yaml("apiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n").unwrap();
//! let client = server.client();
//! # }
//! ```

mod apply;
mod discovery;
mod error;
mod http;
mod resources;
mod selectors;
mod store;
mod tokenreview;
mod watch;

pub use error::ApiError;
pub use resources::ResourceType;
pub use tokenreview::{TokenInfo, API_AUDIENCE};

use crate::apply::Scope;
use crate::store::{key_of, DeleteOpts, Deleted, State, WriteCtx};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::watch as signal;

/// One request the server answered (for assertions).
#[derive(Clone, Debug, PartialEq)]
pub struct RequestRecord {
    /// HTTP method.
    pub method: String,
    /// URL path.
    pub path: String,
    /// Raw query string.
    pub query: String,
    /// Content-Type header, if any.
    pub content_type: Option<String>,
    /// Response status (200 for watches, whatever the stream carried).
    pub status: u16,
}

impl RequestRecord {
    /// The decoded value of a query parameter.
    pub fn param(&self, name: &str) -> Option<String> {
        form_urlencoded::parse(self.query.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }
}

/// State shared by the HTTP handlers, watch tasks and the test-side handle.
pub(crate) struct Shared {
    state: Mutex<State>,
    addr: SocketAddr,
    rv_tx: signal::Sender<u64>,
    close_tx: signal::Sender<u64>,
    paused_tx: signal::Sender<bool>,
    bookmark_interval: Mutex<Duration>,
    tokens: Mutex<HashMap<String, TokenInfo>>,
    requests: Mutex<Vec<RequestRecord>>,
    open_watches: AtomicUsize,
    expired_watches: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Runs a mutation and wakes the watches.
    pub(crate) fn write<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let (out, rv) = {
            let mut s = self.lock();
            let out = f(&mut s);
            (out, s.rv())
        };
        self.rv_tx.send_replace(rv);
        out
    }

    pub(crate) fn bookmark_interval(&self) -> Duration {
        *lock(&self.bookmark_interval)
    }

    pub(crate) fn record(&self, r: RequestRecord) {
        lock(&self.requests).push(r);
    }
}

/// The running fake API server. Dropping it stops accepting connections.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.accept.abort();
        self.close_watches();
    }
}

impl FakeApiServer {
    /// Binds 127.0.0.1:<ephemeral> and serves in the current tokio runtime.
    ///
    /// # Panics
    /// When no loopback port can be bound (a broken test machine).
    pub async fn start() -> FakeApiServer {
        match Self::try_start().await {
            Ok(s) => s,
            Err(e) => panic!("fake-apiserver: cannot bind 127.0.0.1:0: {e}"),
        }
    }

    /// Like [`FakeApiServer::start`], returning the bind error.
    pub async fn try_start() -> std::io::Result<FakeApiServer> {
        Self::serve(tokio::net::TcpListener::bind("127.0.0.1:0").await?)
    }

    /// Serves on `listener` (bound anywhere, e.g. inside a test's network namespace) in the
    /// current tokio runtime.
    pub fn serve(listener: tokio::net::TcpListener) -> std::io::Result<FakeApiServer> {
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new(resources::Registry::default())),
            addr,
            rv_tx: signal::channel(0).0,
            close_tx: signal::channel(0).0,
            paused_tx: signal::channel(false).0,
            bookmark_interval: Mutex::new(Duration::from_secs(5)),
            tokens: Mutex::new(HashMap::new()),
            requests: Mutex::new(Vec::new()),
            open_watches: AtomicUsize::new(0),
            expired_watches: AtomicUsize::new(0),
        });
        let s = shared.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| http::handle(s.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(FakeApiServer { shared, accept })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// A `kube::Client` for this server (no TLS, no auth, default namespace `default`).
    pub fn client(&self) -> kube::Client {
        let uri: ::http::Uri = match self.url().parse() {
            Ok(u) => u,
            Err(e) => panic!("fake-apiserver: own URL does not parse: {e}"),
        };
        match kube::Client::try_from(kube::Config::new(uri)) {
            Ok(c) => c,
            Err(e) => panic!("fake-apiserver: cannot build a client: {e}"),
        }
    }

    /// Serves another kind (or replaces the definition of a known one).
    pub fn register(&self, t: ResourceType) {
        self.shared.lock().registry.register(t);
    }

    /// Stops serving a kind, as on a cluster without its CRD (creating a
    /// CustomResourceDefinition for it serves it again).
    pub fn unregister(&self, group: &str, kind: &str) {
        self.shared.lock().registry.unregister(group, kind);
    }

    fn resource_type(&self, api_version: &str, kind: &str) -> Result<ResourceType, ApiError> {
        self.shared
            .lock()
            .registry
            .by_kind(api_version, kind)
            .cloned()
            .ok_or_else(|| ApiError::no_route(&format!("{api_version} {kind}")))
    }

    fn raw_ctx(rt: &ResourceType) -> WriteCtx {
        WriteCtx {
            scope: Scope::All,
            raw: true,
            manager: "fake-apiserver".into(),
            api_version: rt.api_version(rt.storage_version()),
        }
    }

    fn typed(&self, obj: &Value) -> Result<(ResourceType, Value), ApiError> {
        let s = |k: &str| obj.get(k).and_then(Value::as_str).unwrap_or_default();
        let rt = self.resource_type(s("apiVersion"), s("kind"))?;
        let mut obj = obj.clone();
        if rt.namespaced && key_of(&obj).0.is_empty() {
            obj["metadata"]["namespace"] = Value::String("default".into());
        }
        Ok((rt, obj))
    }

    /// Creates an object as given (status, uid and timestamps kept; namespace defaults to
    /// `default`); the server assigns the resourceVersion.
    pub fn create(&self, obj: Value) -> Result<Value, ApiError> {
        let (rt, obj) = self.typed(&obj)?;
        self.shared
            .write(|s| s.create(&rt, obj, &Self::raw_ctx(&rt)))
    }

    /// Replaces an existing object as given, status included, with no resourceVersion check.
    pub fn update(&self, obj: Value) -> Result<Value, ApiError> {
        let (rt, obj) = self.typed(&obj)?;
        let key = key_of(&obj);
        self.shared
            .write(|s| s.replace(&rt, &key, obj, &Self::raw_ctx(&rt)))
    }

    /// Creates or replaces every object of a multi-document YAML (a `kind: List` is unpacked).
    pub fn apply_yaml(&self, yaml: &str) -> Result<Vec<Value>, ApiError> {
        let mut out = Vec::new();
        for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
            let v: Value = serde::Deserialize::deserialize(doc)
                .map_err(|e| ApiError::bad_request(format!("invalid YAML: {e}")))?;
            if v.is_null() {
                continue;
            }
            let items = match (v.get("kind").and_then(Value::as_str), v.get("items")) {
                (Some(k), Some(Value::Array(items))) if k.ends_with("List") => items.clone(),
                _ => vec![v],
            };
            for item in items {
                let (rt, obj) = self.typed(&item)?;
                let exists = self.shared.lock().get(&rt, &key_of(&obj)).is_some();
                out.push(if exists {
                    self.update(obj)?
                } else {
                    self.create(obj)?
                });
            }
        }
        Ok(out)
    }

    /// The object, if it exists (`ns` is ignored for cluster-scoped kinds).
    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        ns: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let rt = self.resource_type(api_version, kind).ok()?;
        let ns = if rt.namespaced {
            ns.unwrap_or("default")
        } else {
            ""
        };
        let obj = self
            .shared
            .lock()
            .get(&rt, &(ns.to_string(), name.to_string()))?;
        let mut obj = obj.as_ref().clone();
        obj["apiVersion"] = Value::String(api_version.to_string());
        Some(obj)
    }

    /// Every object of a kind, across namespaces.
    pub fn list(&self, api_version: &str, kind: &str) -> Vec<Value> {
        let Ok(rt) = self.resource_type(api_version, kind) else {
            return Vec::new();
        };
        let items = self.shared.lock().list(&rt, None, None).unwrap_or_default();
        items
            .iter()
            .map(|o| {
                let mut o = o.as_ref().clone();
                o["apiVersion"] = Value::String(api_version.to_string());
                o
            })
            .collect()
    }

    /// Deletes an object like `DELETE` does (finalizers, garbage collection). Returns the
    /// last state, or None when it did not exist.
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        ns: Option<&str>,
        name: &str,
    ) -> Result<Option<Value>, ApiError> {
        let rt = self.resource_type(api_version, kind)?;
        let ns = if rt.namespaced {
            ns.unwrap_or("default")
        } else {
            ""
        };
        let key = (ns.to_string(), name.to_string());
        match self
            .shared
            .write(|s| s.delete(&rt, &key, &DeleteOpts::default()))
        {
            Ok(Deleted::Pending(v) | Deleted::Gone(v)) => Ok(Some(v)),
            Err(e) if e.code == 404 => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Turns ownerReference garbage collection on (the default) or off: off, deleting an
    /// owner leaves its dependents, as in a cluster whose garbage collector lags behind.
    pub fn set_garbage_collection(&self, enabled: bool) {
        self.shared.lock().gc_enabled = enabled;
    }

    /// The latest resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv()
    }

    /// Expires all history up to now: a watch or continue token from an older resourceVersion
    /// gets 410 Expired. Open watches that have caught up keep running.
    pub fn compact(&self) {
        self.shared.lock().compact();
    }

    /// Ends every open watch stream cleanly; clients resume from their last resourceVersion.
    pub fn close_watches(&self) {
        self.shared.close_tx.send_modify(|e| *e += 1);
    }

    /// Closes open watches and holds new watch requests until [`FakeApiServer::resume_watches`]
    /// (a partition between clients and the server's watch cache).
    pub fn pause_watches(&self) {
        self.shared.paused_tx.send_replace(true);
        self.close_watches();
    }

    /// Lets held and new watch requests through again.
    pub fn resume_watches(&self) {
        self.shared.paused_tx.send_replace(false);
    }

    /// Watch streams currently open.
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches.load(Ordering::SeqCst)
    }

    /// How many watch streams were answered with an ERROR 410 (Expired) event.
    pub fn expired_watches(&self) -> usize {
        self.shared.expired_watches.load(Ordering::SeqCst)
    }

    /// Sets the BOOKMARK interval for watches started from now on (default 5 s).
    pub fn set_bookmark_interval(&self, d: Duration) {
        *lock(&self.shared.bookmark_interval) = d.max(Duration::from_millis(1));
    }

    /// Registers a bearer token for TokenReview.
    pub fn add_token(&self, token: &str, info: TokenInfo) {
        lock(&self.shared.tokens).insert(token.to_string(), info);
    }

    /// Forgets a token (reviews of it then fail).
    pub fn remove_token(&self, token: &str) {
        lock(&self.shared.tokens).remove(token);
    }

    /// Every request answered so far, in order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.shared.requests).clone()
    }

    /// Forgets the request log.
    pub fn clear_requests(&self) {
        lock(&self.shared.requests).clear();
    }
}
