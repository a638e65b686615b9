//! The proxies' delta xDS client: one ADS stream to the control plane subscribing (wildcard) to
//! Istio's `Address` and `Authorization` types and, for our proxies, our config type. Behaves as
//! Istio's ztunnel does on the wire (node id and metadata on each initial request, ACK with the
//! nonce, NACK listing `<name>: <reason>`, `initial_resource_versions` on reconnect, backoff
//! from 10 ms doubling to 15 s) and, on every response, rebuilds the config [`Snapshot`] with
//! [`crate::config::assemble`] and swaps it into the [`ConfigStore`] atomically.
//!
//! A resource that does not decode or convert is NACKed alone and the rest applies; a response
//! whose resources cannot form a snapshot together is NACKed whole and undone, so the last good
//! snapshot stays. State survives reconnects (the proxy keeps serving on what it has).

use super::discovery::{
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DeltaDiscoveryRequest,
    DeltaDiscoveryResponse, Node, Status as RpcStatus,
};
use super::{
    convert, mesh_config, security, workload, ADDRESS_TYPE, AUTHORIZATION_TYPE, CHUNKED_METADATA,
    CONFIG_TYPE, PARTIAL_RESPONSE, SERVICE_ENTRY_MARKER,
};
use crate::config::assemble::{self, Parts};
use crate::config::watch::ConfigStore;
use crate::model::{Authorization, Service, Workload};
use prost::Message;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// Where and how to reach the control plane.
#[derive(Debug, Clone)]
pub struct XdsConfig {
    /// `https://host:port` (or `http://` for tests).
    pub address: String,
    /// PEM file the server certificate must chain to (Istio's `XDS_ROOT_CA`).
    pub root_cert: Option<PathBuf>,
    /// Name the server certificate must carry, when it differs from the address's host
    /// (Istio's `ALT_XDS_HOSTNAME`).
    pub server_name: Option<String>,
    /// Bearer token source, read before every connection (Istio's `AUTH_TOKEN`): a file, or a
    /// literal token when no such file exists.
    pub token: Option<String>,
    /// `clusterid` header (Istio: `ISTIO_META_CLUSTER_ID`, else `Kubernetes`).
    pub cluster_id: String,
    /// Node id, e.g. `ztunnel~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`.
    pub node_id: String,
    /// Node metadata (all strings): `NODE_NAME`, `NAME`, `NAMESPACE`, `INSTANCE_IPS`, …
    pub metadata: BTreeMap<String, String>,
    /// Type URLs to subscribe to, in order.
    pub types: Vec<String>,
}

impl XdsConfig {
    /// The types ztunnel needs; `with_config` adds our config type (PeerAuthentication, Sidecar,
    /// L7 resources).
    pub fn default_types(with_config: bool) -> Vec<String> {
        let mut t = vec![ADDRESS_TYPE.to_string(), AUTHORIZATION_TYPE.to_string()];
        if with_config {
            t.push(CONFIG_TYPE.to_string());
        }
        t
    }

    /// A configuration the way Istio's proxies derive it from their environment: node id
    /// `<proxy_type>~<INSTANCE_IP>~<POD_NAME>.<POD_NAMESPACE>~<POD_NAMESPACE>.svc.cluster.local`,
    /// metadata `NAME`, `NAMESPACE`, `INSTANCE_IPS`, `NODE_NAME` plus every `ISTIO_META_<K>`
    /// as `<K>`, `clusterid` from `ISTIO_META_CLUSTER_ID` / `CLUSTER_ID` (else `Kubernetes`),
    /// token from `AUTH_TOKEN` (else Istio's default token path when it exists).
    pub fn from_env(address: String, proxy_type: &str, node_name: &str, with_config: bool) -> Self {
        let env = |k: &str| std::env::var(k).unwrap_or_default();
        let instance_ip = std::env::var("INSTANCE_IP").unwrap_or_else(|_| "1.1.1.1".into());
        let (pod, ns) = (env("POD_NAME"), env("POD_NAMESPACE"));
        let mut metadata: BTreeMap<String, String> = std::env::vars()
            .filter_map(|(k, v)| k.strip_prefix("ISTIO_META_").map(|k| (k.to_string(), v)))
            .collect();
        metadata.insert("NAME".into(), pod.clone());
        metadata.insert("NAMESPACE".into(), ns.clone());
        metadata.insert("INSTANCE_IPS".into(), instance_ip.clone());
        metadata.insert("NODE_NAME".into(), node_name.to_string());
        let cluster_id = ["ISTIO_META_CLUSTER_ID", "CLUSTER_ID"]
            .iter()
            .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
            .unwrap_or_else(|| "Kubernetes".into());
        let default_token = "/var/run/secrets/tokens/istio-token";
        let token = std::env::var("AUTH_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
            .or_else(|| {
                std::path::Path::new(default_token)
                    .exists()
                    .then(|| default_token.into())
            });
        XdsConfig {
            address,
            root_cert: std::env::var_os("XDS_ROOT_CA").map(PathBuf::from),
            server_name: std::env::var("ALT_XDS_HOSTNAME")
                .ok()
                .filter(|s| !s.is_empty()),
            token,
            cluster_id,
            node_id: format!("{proxy_type}~{instance_ip}~{pod}.{ns}~{ns}.svc.cluster.local"),
            metadata,
            types: Self::default_types(with_config),
        }
    }

    fn token(&self) -> Option<String> {
        let t = self.token.as_ref()?;
        match std::fs::read_to_string(t) {
            Ok(s) => Some(s.trim().to_string()),
            Err(_) if !t.contains('/') => Some(t.clone()),
            Err(e) => {
                tracing::warn!(file = %t, error = %e, "cannot read the xDS token");
                None
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error("bad xDS address {0:?}: {1}")]
    Address(String, String),
    #[error("cannot read the xDS root certificate {0}: {1}")]
    Root(PathBuf, std::io::Error),
    #[error("connecting to the control plane: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("xDS stream: {0}")]
    Stream(#[from] tonic::Status),
    #[error("xDS stream: request channel closed")]
    Closed,
}

struct Entry<T> {
    version: String,
    value: T,
}

/// Everything received, by type and name.
#[derive(Default)]
struct Resources {
    workloads: BTreeMap<String, Entry<Arc<Workload>>>,
    services: BTreeMap<String, Entry<Arc<Service>>>,
    /// `None`: a dry-run policy (received and ACKed, not enforced).
    authorizations: BTreeMap<String, Entry<Option<Arc<Authorization>>>>,
    documents: BTreeMap<String, Entry<Arc<serde_json::Value>>>,
    /// Address resources derived from ServiceEntries (see [`SERVICE_ENTRY_MARKER`]): only
    /// their versions are kept, so a reconnect does not fetch them again.
    skipped: BTreeMap<String, String>,
}

/// One change of a response, kept so a response that fails as a whole can be undone.
enum Undo {
    Workload(String, Option<Entry<Arc<Workload>>>),
    Service(String, Option<Entry<Arc<Service>>>),
    Authorization(String, Option<Entry<Option<Arc<Authorization>>>>),
    Document(String, Option<Entry<Arc<serde_json::Value>>>),
    Skipped(String, Option<String>),
}

enum Decoded {
    Workload(Arc<Workload>),
    Service(Arc<Service>),
    Authorization(Option<Arc<Authorization>>),
    /// A config object and, when the loader rejected it alone, why (it is still applied: the
    /// loader leaves a route out, or puts a fail-closed stand-in for a security resource).
    Document(Arc<serde_json::Value>, Option<String>),
    /// A ServiceEntry-derived address, built from the entry itself instead.
    Skipped,
}

fn decode(type_url: &str, bytes: &[u8]) -> Result<Decoded, String> {
    match type_url {
        ADDRESS_TYPE => {
            let a = workload::Address::decode(bytes).map_err(|e| format!("decode: {e}"))?;
            match a.r#type {
                Some(workload::address::Type::Workload(w)) => convert::workload_from_proto(w)
                    .map(|w| {
                        if w.annotations.contains_key(SERVICE_ENTRY_MARKER) {
                            Decoded::Skipped
                        } else {
                            Decoded::Workload(Arc::new(w))
                        }
                    })
                    .map_err(|e| e.to_string()),
                Some(workload::address::Type::Service(s)) => {
                    if s.extensions.iter().any(|e| e.name == SERVICE_ENTRY_MARKER) {
                        return Ok(Decoded::Skipped);
                    }
                    convert::service_from_proto(s)
                        .map(|s| Decoded::Service(Arc::new(s)))
                        .map_err(|e| e.to_string())
                }
                None => Err("an Address carries neither a workload nor a service".into()),
            }
        }
        AUTHORIZATION_TYPE => {
            let p = security::Authorization::decode(bytes).map_err(|e| format!("decode: {e}"))?;
            convert::authorization_from_proto(p)
                .map(|p| Decoded::Authorization(p.map(Arc::new)))
                .map_err(|e| e.to_string())
        }
        CONFIG_TYPE => {
            let r =
                mesh_config::ConfigResource::decode(bytes).map_err(|e| format!("decode: {e}"))?;
            let value: serde_json::Value =
                serde_json::from_str(&r.json).map_err(|e| format!("json: {e}"))?;
            let soft = assemble::check_document(&value).map_err(|e| e.to_string())?;
            Ok(Decoded::Document(
                Arc::new(value),
                soft.map(|e| e.to_string()),
            ))
        }
        other => Err(format!("unsupported type {other}")),
    }
}

impl Resources {
    fn versions(&self, type_url: &str) -> HashMap<String, String> {
        fn v<T>(m: &BTreeMap<String, Entry<T>>) -> impl Iterator<Item = (String, String)> + '_ {
            m.iter().map(|(k, e)| (k.clone(), e.version.clone()))
        }
        match type_url {
            ADDRESS_TYPE => v(&self.workloads)
                .chain(v(&self.services))
                .chain(self.skipped.iter().map(|(k, v)| (k.clone(), v.clone())))
                .collect(),
            AUTHORIZATION_TYPE => v(&self.authorizations).collect(),
            CONFIG_TYPE => v(&self.documents).collect(),
            _ => HashMap::new(),
        }
    }

    fn insert(&mut self, name: String, version: String, d: Decoded) -> Undo {
        match d {
            Decoded::Workload(value) => {
                let old = self
                    .workloads
                    .insert(name.clone(), Entry { version, value });
                Undo::Workload(name, old)
            }
            Decoded::Service(value) => {
                let old = self.services.insert(name.clone(), Entry { version, value });
                Undo::Service(name, old)
            }
            Decoded::Authorization(value) => {
                let old = self
                    .authorizations
                    .insert(name.clone(), Entry { version, value });
                Undo::Authorization(name, old)
            }
            Decoded::Skipped => {
                let old = self.skipped.insert(name.clone(), version);
                Undo::Skipped(name, old)
            }
            Decoded::Document(value, _) => {
                let old = self
                    .documents
                    .insert(name.clone(), Entry { version, value });
                Undo::Document(name, old)
            }
        }
    }

    fn remove(&mut self, type_url: &str, name: &str) -> Option<Undo> {
        let n = name.to_string();
        match type_url {
            // As Istio's ztunnel: a workload uid first, else a `<namespace>/<hostname>` service.
            ADDRESS_TYPE => {
                if let Some(old) = self.workloads.remove(name) {
                    Some(Undo::Workload(n, Some(old)))
                } else if let Some(old) = self.services.remove(name) {
                    Some(Undo::Service(n, Some(old)))
                } else {
                    self.skipped
                        .remove(name)
                        .map(|old| Undo::Skipped(n, Some(old)))
                }
            }
            AUTHORIZATION_TYPE => self
                .authorizations
                .remove(name)
                .map(|old| Undo::Authorization(n, Some(old))),
            CONFIG_TYPE => self
                .documents
                .remove(name)
                .map(|old| Undo::Document(n, Some(old))),
            _ => None,
        }
    }

    fn undo(&mut self, log: Vec<Undo>) {
        fn put<T>(m: &mut BTreeMap<String, Entry<T>>, k: String, v: Option<Entry<T>>) {
            match v {
                Some(v) => m.insert(k, v),
                None => m.remove(&k),
            };
        }
        for u in log.into_iter().rev() {
            match u {
                Undo::Workload(k, v) => put(&mut self.workloads, k, v),
                Undo::Service(k, v) => put(&mut self.services, k, v),
                Undo::Authorization(k, v) => put(&mut self.authorizations, k, v),
                Undo::Document(k, v) => put(&mut self.documents, k, v),
                Undo::Skipped(k, v) => match v {
                    Some(v) => {
                        self.skipped.insert(k, v);
                    }
                    None => {
                        self.skipped.remove(&k);
                    }
                },
            }
        }
    }

    fn parts(&self) -> Parts {
        Parts {
            workloads: self.workloads.values().map(|e| e.value.clone()).collect(),
            services: self.services.values().map(|e| e.value.clone()).collect(),
            authorizations: self
                .authorizations
                .values()
                .filter_map(|e| e.value.clone())
                .collect(),
            documents: self
                .documents
                .iter()
                .map(|(k, e)| (k.clone(), e.value.clone()))
                .collect(),
        }
    }
}

/// The client: resources received so far, the store it feeds and its readiness.
pub struct XdsClient {
    cfg: XdsConfig,
    store: Arc<ConfigStore>,
    ready: Arc<AtomicBool>,
    resources: Resources,
    /// Types that have had at least one response ACKed (readiness needs all).
    acked: BTreeSet<String>,
    /// Types that have had at least one response applied.
    received: BTreeSet<String>,
    /// Whether a snapshot has been built from the feed yet.
    built: bool,
}

/// What applying one response produced: the NACK message, if any.
struct Applied {
    nack: Option<String>,
}

impl XdsClient {
    pub fn new(cfg: XdsConfig, store: Arc<ConfigStore>, ready: Arc<AtomicBool>) -> Self {
        XdsClient {
            cfg,
            store,
            ready,
            resources: Resources::default(),
            acked: BTreeSet::new(),
            received: BTreeSet::new(),
            built: false,
        }
    }

    /// Runs forever: connect, stream, reconnect with backoff (10 ms doubling to 15 s; reset
    /// once a stream has delivered a response).
    pub async fn run(mut self) {
        let mut backoff = Duration::from_millis(10);
        loop {
            match self.stream_once().await {
                Ok(got_response) => {
                    tracing::info!("xDS stream ended; reconnecting");
                    if got_response {
                        backoff = Duration::from_millis(10);
                    }
                }
                Err((e, got_response)) => {
                    if got_response {
                        backoff = Duration::from_millis(10);
                    }
                    tracing::warn!(error = %e, retry_in = ?backoff, "xDS stream failed");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(15));
        }
    }

    async fn channel(&self) -> Result<Channel, XdsError> {
        let addr = &self.cfg.address;
        let mut ep = Endpoint::from_shared(addr.clone())
            .map_err(|e| XdsError::Address(addr.clone(), e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        if addr.starts_with("https://") {
            let mut tls = ClientTlsConfig::new();
            if let Some(root) = &self.cfg.root_cert {
                let pem = std::fs::read(root).map_err(|e| XdsError::Root(root.clone(), e))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            if let Some(name) = &self.cfg.server_name {
                tls = tls.domain_name(name.clone());
            }
            ep = ep.tls_config(tls)?;
        }
        Ok(ep.connect().await?)
    }

    fn node(&self) -> Node {
        let string = |v: &str| prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(v.to_string())),
        };
        let mut fields: std::collections::BTreeMap<String, prost_types::Value> = self
            .cfg
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), string(v)))
            .collect();
        // A large first response may come in parts (see `apply`).
        fields.insert(CHUNKED_METADATA.to_string(), string("1"));
        Node {
            id: self.cfg.node_id.clone(),
            cluster: String::new(),
            metadata: Some(prost_types::Struct {
                fields: fields.into_iter().collect(),
            }),
            build_version: String::new(),
        }
    }

    /// One stream. Returns whether any response arrived (to reset the backoff).
    async fn stream_once(&mut self) -> Result<bool, (XdsError, bool)> {
        let channel = self.channel().await.map_err(|e| (e, false))?;
        let token = self.cfg.token();
        let cluster_id = self.cfg.cluster_id.clone();
        let mut client = AggregatedDiscoveryServiceClient::with_interceptor(
            channel,
            move |mut req: tonic::Request<()>| {
                if let Some(t) = &token {
                    if let Ok(v) = format!("Bearer {t}").parse() {
                        req.metadata_mut().insert("authorization", v);
                    }
                }
                if let Ok(v) = cluster_id.parse() {
                    req.metadata_mut().insert("clusterid", v);
                }
                Ok(req)
            },
        )
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20);

        let (tx, mut rx) = mpsc::channel::<DeltaDiscoveryRequest>(16);
        for type_url in &self.cfg.types {
            let req = DeltaDiscoveryRequest {
                node: Some(self.node()),
                type_url: type_url.clone(),
                initial_resource_versions: self.resources.versions(type_url),
                ..Default::default()
            };
            tx.send(req).await.map_err(|_| (XdsError::Closed, false))?;
        }
        let requests = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let mut responses = client
            .delta_aggregated_resources(requests)
            .await
            .map_err(|e| (XdsError::Stream(e), false))?
            .into_inner();
        tracing::info!(address = %self.cfg.address, "xDS stream open");
        let mut got = false;
        loop {
            let resp = match responses.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return Ok(got),
                Err(e) => return Err((XdsError::Stream(e), got)),
            };
            got = true;
            let type_url = resp.type_url.clone();
            let nonce = resp.nonce.clone();
            let partial = resp.system_version_info == PARTIAL_RESPONSE;
            let applied = self.apply(resp, partial).await;
            let error_detail = applied.nack.map(|message| {
                tracing::warn!(type_url = %type_url, %message, "NACK");
                RpcStatus {
                    code: 0,
                    message,
                    details: Vec::new(),
                }
            });
            if error_detail.is_none() && !partial {
                self.acked.insert(type_url.clone());
                if self.cfg.types.iter().all(|t| self.acked.contains(t))
                    && !self.ready.swap(true, Ordering::AcqRel)
                {
                    tracing::info!("every xDS type ACKed; ready");
                }
            }
            let ack = DeltaDiscoveryRequest {
                type_url,
                response_nonce: nonce,
                error_detail,
                ..Default::default()
            };
            tx.send(ack).await.map_err(|_| (XdsError::Closed, got))?;
        }
    }

    /// Applies one response and swaps in the new snapshot (or undoes it). `partial`: more of
    /// the same first response follows ([`PARTIAL_RESPONSE`]).
    async fn apply(&mut self, resp: DeltaDiscoveryResponse, partial: bool) -> Applied {
        let type_url = resp.type_url.as_str();
        let mut rejected: Vec<String> = Vec::new();
        let mut log = Vec::new();
        for r in resp.resources {
            let Some(any) = r.resource.as_ref() else {
                rejected.push(format!("{}: no resource", r.name));
                continue;
            };
            match decode(type_url, &any.value) {
                Ok(d) => {
                    if let Decoded::Document(_, Some(why)) = &d {
                        rejected.push(format!("{}: {why}", r.name));
                    }
                    log.push(self.resources.insert(r.name, r.version, d));
                }
                Err(e) => rejected.push(format!("{}: {e}", r.name)),
            }
        }
        for name in &resp.removed_resources {
            if let Some(u) = self.resources.remove(type_url, name) {
                log.push(u);
            }
        }
        if log.is_empty() && !rejected.is_empty() {
            return Applied {
                nack: Some(rejected.join("; ")),
            };
        }
        if !partial {
            self.received.insert(type_url.to_string());
        }
        if partial || (!self.built && !self.cfg.types.iter().all(|t| self.received.contains(t))) {
            // The first snapshot waits for every type: one assembly of the whole feed, not
            // one per type (each a full pass, and memory for two snapshots at its peak); a
            // response sent in parts is assembled once, at its last part. A resource refused
            // alone has been reported; whatever would fail the snapshot as a whole fails (and
            // is NACKed on) the response completing the set.
            return Applied {
                nack: (!rejected.is_empty()).then(|| rejected.join("; ")),
            };
        }
        let parts = self.resources.parts();
        // Parsing and validating thousands of resources is CPU work: off the reactor.
        let built = tokio::task::spawn_blocking(move || assemble::assemble(parts)).await;
        match built {
            Ok(Ok(snapshot)) => {
                self.store.replace(snapshot);
                self.built = true;
                // The old snapshot and the assembly's scratch are freed: give the pages back.
                let _ = tokio::task::spawn_blocking(crate::config::release_freed_memory).await;
                Applied {
                    nack: (!rejected.is_empty()).then(|| rejected.join("; ")),
                }
            }
            Ok(Err(e)) => {
                self.resources.undo(log);
                rejected.push(format!("configuration: {e}"));
                Applied {
                    nack: Some(rejected.join("; ")),
                }
            }
            Err(e) => {
                self.resources.undo(log);
                Applied {
                    nack: Some(format!("configuration: {e}")),
                }
            }
        }
    }
}
